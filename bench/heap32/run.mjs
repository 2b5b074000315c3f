// Runs bench/heap32/measure.py on MicroPython's WebAssembly port (32-bit; npm package
// @micropython/micropython-webassembly-pyscript, pinned in package.json) under node.
//
//   node --expose-gc run.mjs --args '{"mode": "mpy", "slots": 8, ...}' [--fw DIR]
//        [--romfs FILE] [--measure FILE|rom]
//
// --fw DIR     copied into the port's filesystem at /fw and put first on sys.path
//              (the firmware as .py files, or as .mpy files from tools/fwbuild.py)
// --romfs FILE a ROMFS image (mpremote romfs build): the port mounts it at /rom, on
//              sys.path, and imports its .mpy files in place (bytecode outside the heap)
// --measure    the measuring script to load (default: measure.py beside this file; its .mpy
//              from mpy-cross costs less heap; "rom": it is in the ROMFS image)
// --args JSON  measure.main()'s arguments (a JSON object of strings and integers)
//
// Prints measure.py's output (a line "HEAP32 {json}"); exits 1 on a Python error.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";

const here = path.dirname(fileURLToPath(import.meta.url));

function option(name) {
  const i = process.argv.indexOf(name);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : undefined;
}

const args = JSON.parse(option("--args") ?? "{}");
const fwDir = option("--fw");
const romfsFile = option("--romfs");
const measure = option("--measure") ?? path.join(here, "measure.py");

const opts = {
  heapsize: 1024 * 1024, // the first heap area; this port adds more on demand (no cap)
  linebuffer: true,
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stderr.write(line + "\n"),
};
if (romfsFile) opts.romfs = new Uint8Array(fs.readFileSync(romfsFile));
const mp = await loadMicroPython(opts);

function copyInto(src, dst) {
  mp.FS.mkdirTree(dst);
  for (const name of fs.readdirSync(src)) {
    const p = path.join(src, name);
    if (fs.statSync(p).isDirectory()) copyInto(p, `${dst}/${name}`);
    else mp.FS.writeFile(`${dst}/${name}`, fs.readFileSync(p));
  }
}

mp.FS.mkdirTree("/bench");
if (measure !== "rom") {
  mp.FS.writeFile(`/bench/${path.basename(measure)}`, fs.readFileSync(measure));
}
// The port has no socket module; mqtt_client imports it at the top (the bench replaces the
// one method that uses it), so an empty module stands in.
mp.FS.writeFile("/bench/socket.py", "# stand-in: the WebAssembly port has no socket module\n");
if (fwDir) copyInto(fwDir, "/fw");

// The port collects garbage only at the top level (when no Python runs): gc.collect()
// inside Python merely asks for it. And every Python object handed to JavaScript (each
// asyncio timer callback, each awaited promise's resolver) stays referenced from the
// Python heap until V8 collects its proxy and runs the FinalizationRegistry, whenever
// that may be. So a measurement (request(), then Python polls busy() and reads value())
// first runs V8's collector and lets the finalizers free those references, then collects
// MicroPython's heap and reads gc.mem_alloc() before any Python runs again.
if (typeof global.gc !== "function") {
  process.stderr.write("heap32: run node with --expose-gc (see bench/bench_heap32.py)\n");
  process.exit(2);
}
mp.runPython("import gc");
const gc = mp.pyimport("gc");
const collect = gc.collect;
const memAlloc = gc.mem_alloc;
const readHeap = () => {
  collect(); // this call's return to JavaScript runs the collection
  return memAlloc();
};
// the interpreter alone, then with asyncio imported (the firmware's first import)
args.empty = readHeap();
mp.runPython("import asyncio");
args.asyncio = readHeap() - args.empty;
const tick = () => new Promise((resolve) => setTimeout(resolve, 0));
let busy = false;
let value = 0;
mp.registerJsModule("heap32", {
  request: () => {
    busy = true;
    setImmediate(async () => {
      for (let i = 0; i < 3; i++) {
        global.gc();
        await tick();
      }
      value = readHeap();
      busy = false;
    });
  },
  busy: () => busy,
  value: () => value,
  jsgc: () => global.gc(), // lets finalizers free the references of Python objects
});

const paths = ["/bench", ...(fwDir ? ["/fw"] : [])];
try {
  await mp.runPythonAsync(
    `import sys\nsys.path[:0] = ${JSON.stringify(paths)}\nimport measure\n` +
      `await measure.main(${JSON.stringify(args)})\n`,
  );
} catch (e) {
  process.stderr.write(`heap32: MicroPython raised: ${e?.message ?? e}\n`);
  process.exit(1);
}
process.exit(0);
