"""The station firmware's heap on a 32-bit MicroPython that anyone can install (issue 15).

The 32-bit interpreter is MicroPython's WebAssembly port from npm
(@micropython/micropython-webassembly-pyscript, pinned in bench/heap32/package.json and
package-lock.json: 1.29, the version of the unix port and of mpy-cross here) run under node;
`npm ci` installs it into bench/heap32/node_modules on the first run. The same measuring
script (bench/heap32/measure.py) runs on the MicroPython unix port (64-bit) for comparison.
Every figure is gc.mem_alloc() after a full collection; KB = 1024 bytes.

Measured:
  - the import of the running station's modules (MODULES in measure.py: everything
    app.py loads, config apart as app.load_config unloads it), from .py files, from
    mpy-cross .mpy files (tools/fwbuild.py, as on a board's filesystem) and, on the wasm
    port, from a ROMFS image of those .mpy files (mpremote's romfs builder; the port
    imports them in place, as a board with a ROMFS partition does): "code";
  - "data", everything in use beyond that code, for 1, 8 and 16 slots: the station built
    as app.py builds it (app.load_config, app.build, app.build_uplink) and connected; in
    steady state (sampling cycles, telemetry every 10th, every message acknowledged); with
    the in-flight window full (the broker holds its PUBACKs); with a backlog while the
    link is down (the outbox filled to its 256 KB bound); and during the drain of that
    backlog (the broker acknowledging 4 messages per 5 sampling cycles, so the window
    stays full while the backlog is read from flash behind it), the largest figure of it;
  - for 8 slots, the steady state over 10,000 cycles: first, last and largest figure, and
    the growth beyond the one message the drain task holds (the last one sent: its size
    follows the digits of its numbers, see measure.py's steady() and docs/firmware.md).
The fakes' own heap (charger and bus streams, broker, client subclass) is measured when
they are made and taken out of "data".

Not measured as on a board, and why:
  - the charger UART and the RS-485 bus: in-memory streams that answer each request at
    once with valid frames (bench/mp/station_cycle.py's fakes); the Modbus master runs on
    a fake clock (its `clock` parameter) so the inter-frame silence costs no real sleep.
    The drivers (ChargerLink, ModbusMaster, registers) are the firmware's own; hal/unix's
    Serial (termios, poll) is not run (the wasm port has neither);
  - the MQTT socket: the wasm port has no socket module. MQTTClient's socket opening
    (the MicroPython branch of _handshake) is replaced by an in-memory link to an
    in-memory broker (CONNACK, SUBACK, PINGRESP, PUBACK or held); the rest of the client
    (reader, window, retransmission, reconnect with backoff) is its own. No TLS.
  - the flash: a folder (the wasm port's in-memory filesystem; a temporary folder on
    the unix port), not littlefs;
  - asyncio on the wasm port is the port's own (driven by JavaScript timers); it is not
    the ESP32's. The port's bookkeeping of Python objects handed to JavaScript lives in
    the Python heap until V8 collects them and keeps its largest size: each measurement
    runs V8's collector first (run.mjs), and the bookkeeping is grown to more than the run
    needs before the baseline (measure.prime), so it is in no firmware figure;
  - the wasm port has double-precision floats (the ESP32 has single): a float is a heap
    object on both, 16 bytes either way. It does not enforce a heap size (it grows its
    heap on demand): figures, not MemoryErrors.

Run: `make heap32` (or `.venv/bin/python bench/bench_heap32.py [--quick] [--only wasm|unix]`).
Prints a table and writes every figure to bench/heap32/last.json. Fails (exit 1) with the
reason when node or npm is missing, `npm ci` fails, or a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "bench" / "heap32"
PKG = "@micropython/micropython-webassembly-pyscript"
sys.path.insert(0, str(ROOT))

from tools import fwbuild  # noqa: E402

TARGET_DATA_8 = 64 * 1024
KB = 1024


class BenchError(Exception):
    pass


def _fail(msg: str) -> None:
    print(f"heap32: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def ensure_wasm_port() -> str:
    """node, with the pinned npm package installed (`npm ci` when missing); node's path."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if not node or not npm:
        raise BenchError(
            "node and npm are needed for the 32-bit (WebAssembly) MicroPython: install Node.js "
            "18+ (Debian: apt-get install nodejs npm), or run with --only unix"
        )
    pinned = json.loads((HERE / "package.json").read_text())["dependencies"][PKG]
    installed = HERE / "node_modules" / PKG / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != pinned:
        print(f"heap32: npm ci in {HERE.relative_to(ROOT)} ({PKG} {pinned})", flush=True)
        r = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=HERE, capture_output=True, text=True
        )
        if r.returncode:
            raise BenchError(f"npm ci failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
        if not installed.exists():
            raise BenchError(f"npm ci did not install {PKG}")
    return node


def compile_measure(out: Path) -> Path:
    """measure.py as bytecode (mpy-cross), so that compiling it costs no heap."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [fwbuild.mpy_cross_bin(), "-o", str(out / "measure.mpy"), str(HERE / "measure.py")],
        check=True,
    )
    return out / "measure.mpy"


def romfs_image(mpy_dir: Path, measure: Path, out: Path) -> Path:
    """A ROMFS image of the .mpy build and the measuring script (mpremote's builder, as
    `mpremote romfs build`)."""
    from contextlib import redirect_stdout
    from io import StringIO

    from mpremote.romfs import make_romfs

    tree = out.with_suffix(".d")
    shutil.copytree(mpy_dir, tree)
    shutil.copy(measure, tree / "measure.mpy")
    with redirect_stdout(StringIO()):
        out.write_bytes(make_romfs(str(tree), mpy_cross=False))
    return out


def _parse(stdout: str, what: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("HEAP32 "):
            res: dict[str, Any] = json.loads(line[7:])
            return res
    raise BenchError(f"{what}: no figures in its output:\n{stdout[-2000:]}")


def run_wasm(
    node: str, args: dict[str, Any], fw: Path | None, romfs: Path | None, measure: Path
) -> dict[str, Any]:
    cmd = [node, "--expose-gc", str(HERE / "run.mjs"), "--args", json.dumps(args)]
    if fw is not None:
        cmd += ["--fw", str(fw)]
    if romfs is not None:
        cmd += ["--romfs", str(romfs), "--measure", "rom"]
    else:
        cmd += ["--measure", str(measure)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise BenchError(f"wasm run {args} failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    return _parse(r.stdout, f"wasm run {args}")


def run_unix(args: dict[str, Any], fw: Path, flash: Path, measure: Path) -> dict[str, Any]:
    args = dict(args, flash=str(flash))
    code = (
        "import gc\ngc.collect()\ne = gc.mem_alloc()\nimport asyncio\ngc.collect()\n"
        "a = gc.mem_alloc() - e\nimport measure\n"
        f"asyncio.run(measure.main(dict({json.dumps(args)}, empty=e, asyncio=a)))\n"
    )
    r = subprocess.run(
        [fwbuild.micropython_bin(), "-X", "heapsize=16m", "-c", code],
        capture_output=True,
        text=True,
        timeout=1800,
        env=dict(os.environ, MICROPYPATH=f"{measure.parent}:{fw}:.frozen"),
    )
    if r.returncode:
        raise BenchError(f"unix run {args} failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    return _parse(r.stdout, f"unix run {args}")


def held_bytes(payload_len: int, bits: int) -> int:
    """Heap taken by the data of a bytes object of that length: len + 1 (MicroPython ends
    it with a 0), in whole GC blocks of 4 words (MICROPY_BYTES_PER_GC_BLOCK: 16 bytes on
    32 bits, 32 on 64)."""
    block = 4 * bits // 8
    return -(-(payload_len + 1) // block) * block


def net_growth(run: dict[str, Any]) -> int:
    """The steady state's growth, first to last figure, beyond the change in size of the
    one message the drain task holds (measure.py, steady(): the last one sent; a bigger
    number in it, e.g. 8 registers passing 999 mWh, makes it a few bytes longer)."""
    st = run["steady"]
    held = st["held_len"]
    return int(
        st["growth"] - (held_bytes(held[-1], run["bits"]) - held_bytes(held[0], run["bits"]))
    )


def data_of(run: dict[str, Any], total: int) -> int:
    """Bytes in use beyond the code (interpreter, bench script, firmware modules) and the
    fakes."""
    return int(total - run["code"] - run["fakes"])


def summary(run: dict[str, Any]) -> dict[str, int]:
    d = run["drain"]
    s = run["steady"]
    return {
        "built": data_of(run, run["start"]),
        "steady": data_of(run, s["max"]),
        "window_full": data_of(run, run["window"]["max"]),
        "backlog_link_down": data_of(run, d["link_down"]),
        "draining": data_of(run, d["draining_max"]),
        "after_drain": data_of(run, d["after"]),
    }


def check(run: dict[str, Any]) -> None:
    """A run that did not work as meant gives no figures."""
    c = run["counters"]
    bad = {k: v for k, v in run["errors"].items() if v}
    if bad:
        raise BenchError(f"{run['interp']} {run['slots']} slots: bus or charger errors {bad}")
    if c["task_failures"] or c["internal_errors"] or c["cb_errors"] or c["proto_errors"]:
        raise BenchError(f"{run['interp']} {run['slots']} slots: failures {c}")
    if not c["persist_ok"] or c["lost"] or c["acked"] < c["made"] - c["outbox_dropped"]:
        raise BenchError(f"{run['interp']} {run['slots']} slots: messages missing {c}")
    if run["window"]["inflight"] != 16 or run["drain"]["peak_inflight"] != 16:
        raise BenchError(f"{run['interp']} {run['slots']} slots: the window never filled")


def kb(n: int | None) -> str:
    return "-" if n is None else f"{n / KB:.1f}"


def table(res: dict[str, Any]) -> str:
    runs: dict[str, list[dict[str, Any]]] = res["runs"]
    interps = [i for i in ("wasm32", "unix64") if i in runs]

    def pick(interp: str, mode: str, slots: int | None = None) -> dict[str, Any] | None:
        for r in runs.get(interp, []):
            if r["mode"] == mode and (slots is None or r["slots"] == slots):
                return r
        return None

    rows: list[tuple[str, list[str]]] = []

    def row(label: str, get: Any) -> None:
        vals = []
        for i in interps:
            try:
                vals.append(get(i))
            except (TypeError, KeyError):
                vals.append("-")
        rows.append((label, vals))

    row("interpreter at start", lambda i: kb(pick(i, "mpy")["empty"]))  # type: ignore[index]
    row("import asyncio (built in)", lambda i: kb(pick(i, "mpy")["asyncio"]))  # type: ignore[index]
    for mode, label in (
        ("py", "import firmware: .py files"),
        ("mpy", "import firmware: .mpy files"),
        ("rom", "import firmware: .mpy in ROMFS, run in place"),
    ):
        row(label, lambda i, m=mode: kb(pick(i, m)["import"]))  # type: ignore[index]
    for slots in (1, 8, 16):
        for key, label in (
            ("built", "built, connected"),
            ("steady", "steady state"),
            ("window_full", "in-flight window full (16)"),
            ("backlog_link_down", "backlog, link down"),
            ("draining", "outbox drain, largest"),
        ):
            row(
                f"data, {slots} slot{'s' if slots > 1 else ''}: {label}",
                lambda i, n=slots, k=key: kb(summary(pick(i, "mpy", n))[k]),  # type: ignore[arg-type]
            )
    r8 = pick(interps[0], "mpy", 8) if interps else None
    cycles = r8["steady"]["cycles"] if r8 else 0

    def growth(i: str) -> str:
        r = pick(i, "mpy", 8)
        st = r["steady"]  # type: ignore[index]
        first, last, top = (data_of(r, st[k]) for k in ("first", "last", "max"))  # type: ignore[arg-type]
        return f"{kb(first)} -> {kb(last)}, max {kb(top)} ({st['growth']:+d} B)"

    def net(i: str) -> str:
        r = pick(i, "mpy", 8)
        h = r["steady"]["held_len"]  # type: ignore[index]
        return f"{r['steady']['growth_net']:+d} B (message held {h[0]} -> {h[-1]} B)"  # type: ignore[index]

    row(f"data, 8 slots, {cycles} cycles: first -> last sample", growth)
    row("  growth beyond the last message, which the drain task holds", net)

    def board(i: str) -> str:
        rom = pick(i, "rom", 0)
        r = pick(i, "mpy", 8)
        worst = max(summary(r).values())  # type: ignore[arg-type]
        return kb(rom["empty"] + rom["asyncio"] + rom["import"] + worst)  # type: ignore[index]

    row("sum: interpreter + asyncio + ROMFS firmware + worst 8-slot data", board)
    w = max(len(r[0]) for r in rows)
    head = [f"{i} KB" for i in interps]
    cols = [max(len(head[k]), *(len(r[1][k]) for r in rows)) for k in range(len(interps))]
    out = [f"{'':{w}}  " + "  ".join(f"{h:>{cols[k]}}" for k, h in enumerate(head))]
    for label, vals in rows:
        out.append(f"{label:{w}}  " + "  ".join(f"{v:>{cols[k]}}" for k, v in enumerate(vals)))
    return "\n".join(out)


def where(run: dict[str, Any]) -> list[tuple[str, int]]:
    """Where a run's data is: the build steps, what running adds, the window, the drain, and
    some leaves measured by letting go of them at the end."""
    m = [v for _, v in run["marks"]]
    w = run["window"]["max"]
    return [
        ("app.load_config(): the configuration", m[2] - m[1]),
        ("app.build(): station, charger link, Modbus master, store", m[3] - m[2]),
        ("app.build_uplink(): MQTT client, Wire, outbox, gate", m[4] - m[3]),
        ("running: tasks, readings, sessions, wire buffer", m[5] - m[4]),
        ("steady state over built and running", run["steady"]["max"] - m[5]),
        (
            f"in-flight window full: 16 PUBLISHes of ~{run['drain']['record_bytes'] - 12} B",
            w - run["steady"]["max"],
        ),
        ("draining, beyond a full window", run["drain"]["draining_max"] - w),
        *((f"  leaf: {n}", v) for n, v in run["parts"]),
    ]


def parts_table(res: dict[str, Any]) -> str:
    """Where the 8-slot data is."""
    cols = []
    for interp in ("wasm32", "unix64"):
        for r in res["runs"].get(interp, []):
            if r["mode"] == "mpy" and r["slots"] == 8:
                cols.append((interp, where(r)))
    if not cols:
        return ""
    names = [n for n, _ in cols[0][1]]
    w = max(len(n) for n in names)
    heads = "  ".join(f"{i + ' KB':>10}" for i, _ in cols)
    out = [f"{'8 slots: where the data is':{w}}  {heads}"]
    for k, n in enumerate(names):
        out.append(f"{n:{w}}  " + "  ".join(f"{kb(p[k][1]):>10}" for _, p in cols))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 cycles instead of 10,000")
    ap.add_argument("--only", choices=("wasm", "unix"), help="one interpreter only")
    opts = ap.parse_args()
    long_cycles = 1000 if opts.quick else 10000
    plan: list[tuple[str, int, int, int]] = [  # mode, slots, cycles, sample every
        ("py", 0, 0, 0),
        ("mpy", 1, 1000, 250),
        ("mpy", 8, long_cycles, 1000 if long_cycles >= 5000 else 250),
        ("mpy", 16, 1000, 250),
    ]
    try:
        node = None if opts.only == "unix" else ensure_wasm_port()
        mpy = fwbuild.build()
        res: dict[str, Any] = {"runs": {}, "firmware": fwbuild.digest()}
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            measure = compile_measure(t / "bench")
            if node is not None:
                rom = romfs_image(mpy, measure, t / "fw.romfs")
                wasm_plan = [*plan, ("rom", 0, 0, 0), ("rom", 8, 1000, 250)]
                out: list[dict[str, Any]] = []
                res["runs"]["wasm32"] = out
                for mode, slots, cycles, every in wasm_plan:
                    args = {"mode": mode, "slots": slots, "cycles": cycles}
                    args.update(sample_every=every, flash="/flash", prime=20000)
                    print(f"heap32: wasm32 {mode} {slots} slots {cycles} cycles", flush=True)
                    fw = {"py": fwbuild.FIRMWARE, "mpy": mpy, "rom": None}[mode]
                    out.append(run_wasm(node, args, fw, rom if mode == "rom" else None, measure))
            if opts.only != "wasm":
                out = []
                res["runs"]["unix64"] = out
                for k, (mode, slots, cycles, every) in enumerate(plan):
                    args = {"mode": mode, "slots": slots, "cycles": cycles, "sample_every": every}
                    print(f"heap32: unix64 {mode} {slots} slots {cycles} cycles", flush=True)
                    fw = fwbuild.FIRMWARE if mode == "py" else mpy
                    out.append(run_unix(args, fw, t / f"flash{k}", measure))
        for runs in res["runs"].values():
            for r in runs:
                if r["slots"]:
                    check(r)
                    r["steady"]["growth_net"] = net_growth(r)
                    r["data"] = summary(r)
                    r["where"] = where(r)
    except BenchError as e:
        _fail(str(e))
    print()
    print("Heap in use after gc.collect() (KB = 1024 B); data = beyond code and fakes")
    print(table(res))
    print()
    print(parts_table(res))
    w8 = [r for r in res["runs"].get("wasm32", []) if r["mode"] == "mpy" and r["slots"] == 8]
    if w8:
        worst = max(w8[0]["data"].values())
        verdict = "met" if worst <= TARGET_DATA_8 else "NOT met"
        print(
            f"\ntarget <= 64 KB of data for 8 slots on 32 bits: {verdict} "
            f"(worst {kb(worst)} KB); growth over {w8[0]['steady']['cycles']} cycles "
            f"{w8[0]['steady']['growth']:+d} B, {w8[0]['steady']['growth_net']:+d} B beyond the "
            "message the drain task holds"
        )
    (HERE / "last.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"figures: {(HERE / 'last.json').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
