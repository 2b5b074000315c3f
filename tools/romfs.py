"""The firmware as a ROMFS image: bytecode a board executes in place, out of its heap.

MicroPython ≥ 1.25 built with `MICROPY_VFS_ROM` mounts a `romfs` flash partition at `/rom`
(appending `/rom` and `/rom/lib` to sys.path) and runs the bytecode of the .mpy files there
from the memory-mapped flash: bytecode, str/bytes constants and qstr text stay in flash
(py/persistentcode.c `mp_reader_try_read_rom`), where .mpy files on the filesystem are
copied into the heap at import.

The image holds the same bytecode as the .mpy build (tools/fwbuild.py: mpy-cross with `-s`
the module's path and `-march` the board's when it matches) in the same layout, every module
but main.py: main.py, config.json and the station's data (energy registers, boot counter,
keys, outbox) stay on the read-write filesystem and are never in the image. The image is
written with mpremote's own writer (`mpremote.romfs.VfsRomWriter`, what `mpremote romfs
build` uses; the format is MicroPython's docs/reference/romfs.rst), so the same sources and
mpy-cross give byte-identical images: its sha256 names a build.

    python -m tools.romfs [-o FILE] [--march ARCH]    # build, print size and sha256
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from tools import fwbuild
from tools.station_proc import StationProcess

ROMFS_HEADER = b"\xd2\xcd\x31"  # the record kind 0x14a6b1 as a varuint ("RM1")
# files that stay on the filesystem (the board runs main.py by name)
NOT_IN_IMAGE = ("main.py",)


@dataclass(frozen=True)
class Image:
    data: bytes
    files: dict[str, str]  # path in the image -> sha256 of its content
    march: str | None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def build_image(
    march: str | None = None, src: pathlib.Path = fwbuild.FIRMWARE, out: pathlib.Path | None = None
) -> Image:
    """The firmware's ROMFS image, from the same compiled tree as the .mpy deployment
    (fwbuild.build), every file but main.py, directories and names in sorted order."""
    from mpremote.romfs import VfsRomWriter

    tree = fwbuild.build(out, src=src, march=march)
    writer = VfsRomWriter()
    files: dict[str, str] = {}

    def add(d: pathlib.Path) -> None:
        for p in sorted(d.iterdir(), key=lambda x: x.name):
            rel = p.relative_to(tree).as_posix()
            if p.is_dir():
                writer.opendir(p.name)
                add(p)
                writer.closedir()
            elif rel not in NOT_IN_IMAGE:
                data = p.read_bytes()
                writer.mkfile(p.name, data)
                files[rel] = hashlib.sha256(data).hexdigest()

    add(tree)
    return Image(data=bytes(writer.finalise()), files=files, march=march)


def used_size(head: bytes) -> int | None:
    """How many bytes a ROMFS image starting with `head` spans (header, length, payload),
    None when `head` is no ROMFS (an erased or foreign partition)."""
    if not head.startswith(ROMFS_HEADER):
        return None
    n = 0
    for i, b in enumerate(head[3:12]):
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            return 3 + i + 1 + n
    return None


# ---- the unix port: the image mounted with vfs.VfsRom, as the board's /rom ---------------

UNIX_BOOT = """import os, sys, vfs
# the partition: the image in a bytearray (on the unix port it is heap, not flash)
_f = open(%(image)r, 'rb')
_rom = bytearray(os.stat(%(image)r)[6])
_f.readinto(_rom)
_f.close()
del _f
vfs.mount(vfs.VfsRom(_rom), '/rom')
sys.path.insert(0, '/rom')
%(then)s
"""


def unix_boot_script(image: str | pathlib.Path, then: str = "") -> str:
    """MicroPython code that mounts the image file at /rom with `vfs.VfsRom` and puts /rom
    first on sys.path, then runs `then`. The image is read into a bytearray, which on the
    unix port lives in the GC heap: give the process that much more heap than a board."""
    return UNIX_BOOT % {"image": str(image), "then": then}


def run_main(main_py: str | pathlib.Path) -> str:
    """`then` for unix_boot_script: main.py (source, as the board keeps it) run as __main__."""
    return f"exec(open({str(main_py)!r}).read(), {{'__name__': '__main__'}})"


# what a running station has imported (main.py -> app; app.build_uplink's imports)
STATION_MODULES = ("app", "commands", "mqtt_client", "outbox", "uplink", "wire")

HEAP_PROBE = """import gc
gc.collect()
_a0 = gc.mem_alloc()
import %(modules)s
gc.collect()
print('HEAP', _a0, gc.mem_alloc(), gc.mem_free())
"""


def import_heap(source: str, *, heap: str = "1M", march: str | None = None) -> dict[str, int]:
    """Heap in use on the unix port after importing STATION_MODULES and gc.collect(), from
    `source`: "romfs" (the image mounted with VfsRom; the image's own bytearray is allocated
    before the first figure, so it is not counted), "mpy" (the .mpy build) or "py" (the
    sources, compiled at import). {"before", "after", "imports" (after - before), "free"}."""
    probe = HEAP_PROBE % {"modules": ", ".join(STATION_MODULES)}
    with tempfile.TemporaryDirectory() as d:
        if source == "romfs":
            img = pathlib.Path(d) / "fw.romfs"
            img.write_bytes(build_image(march).data)
            code = unix_boot_script(img, probe)
        elif source == "mpy":
            code = f"import sys\nsys.path.insert(0, {str(fwbuild.build(march=march))!r})\n{probe}"
        elif source == "py":
            code = f"import sys\nsys.path.insert(0, {str(fwbuild.FIRMWARE)!r})\n{probe}"
        else:
            raise ValueError(f"unknown source {source!r}")
        script = pathlib.Path(d) / "probe.py"
        script.write_text(code)
        r = subprocess.run(
            [fwbuild.micropython_bin(), "-X", f"heapsize={heap}", str(script)],
            cwd=d,
            capture_output=True,
            text=True,
            timeout=60,
        )
    line = [x for x in r.stdout.splitlines() if x.startswith("HEAP ")]
    if r.returncode != 0 or not line:
        raise RuntimeError(f"heap probe ({source}) failed: {(r.stderr or r.stdout)[-400:]}")
    before, after, free = (int(x) for x in line[-1].split()[1:])
    return {"before": before, "after": after, "imports": after - before, "free": free}


class RomStation(StationProcess):
    """tools.station_proc.StationProcess booting the firmware from a ROMFS image instead of
    the .mpy folder: main.py (source) from the build, every module from /rom."""

    def __init__(self, *args: Any, image: str | pathlib.Path, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.image = pathlib.Path(image)

    def _script(self) -> pathlib.Path:
        """A boot script beside the flash folder (not on the "flash"): mount the image at
        /rom, then run the build's main.py."""
        boot = self.flash.parent / f"romboot-{self.flash.name}.py"
        then = "import app\nprint('romfs: app from', app.__file__)\n"
        boot.write_text(unix_boot_script(self.image, then + run_main(fwbuild.build() / "main.py")))
        return boot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.romfs", description=__doc__.split("\n")[0])
    p.add_argument("-o", "--output", default="firmware.romfs", help="image file to write")
    p.add_argument("--march", help="mpy-cross -march (default: plain bytecode)")
    args = p.parse_args(argv)
    img = build_image(args.march)
    pathlib.Path(args.output).write_bytes(img.data)
    print(f"{args.output}: {img.size} bytes, {len(img.files)} files, sha256 {img.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
