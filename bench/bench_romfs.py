"""The firmware's heap on the MicroPython unix port: imported from a ROMFS image (mounted with
vfs.VfsRom: bytecode, constants and qstr text used in place), from .mpy files and from .py
sources; the smallest heap each import fits in; and the smallest heap a running 8-slot
station (sampling and persisting, no broker) fits in, from the image and from files.

The unix port is 64-bit with double floats: objects are about twice an ESP32's, so these are
relative figures (what the image takes out of the heap), not an ESP32's budget. On the unix
port the image itself is a bytearray in the heap (on a board it is flash): it is allocated
before the first figure and subtracted from the others.

    .venv/bin/python bench/bench_romfs.py [--json]
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tools import fwbuild, romfs  # noqa: E402
from tools.flash.virtual import _free_port as free_port  # noqa: E402
from tools.rig.rig import Rig  # noqa: E402
from tools.station_proc import StationProcess, station_config  # noqa: E402

SOURCES = ("romfs", "mpy", "py")
CYCLES = 40


def fits(source: str, heap_k: int, image: pathlib.Path) -> bool:
    """Whether STATION_MODULES import under -X heapsize=heap_k k."""
    probe = romfs.HEAP_PROBE % {"modules": ", ".join(romfs.STATION_MODULES)}
    if source == "romfs":
        code = romfs.unix_boot_script(image, probe)
    else:
        path = fwbuild.build() if source == "mpy" else fwbuild.FIRMWARE
        code = f"import sys\nsys.path.insert(0, {str(path)!r})\n{probe}"
    with tempfile.TemporaryDirectory() as d:
        (pathlib.Path(d) / "p.py").write_text(code)
        r = subprocess.run(
            [fwbuild.micropython_bin(), "-X", f"heapsize={heap_k}k", "p.py"],
            cwd=d,
            capture_output=True,
            text=True,
            timeout=60,
        )
    return r.returncode == 0 and "HEAP " in r.stdout


def smallest_heap_k(source: str, image: pathlib.Path) -> int:
    lo, hi = 16, 1024  # lo fails, hi fits
    while hi - lo > 2:
        mid = (lo + hi) // 2
        if fits(source, mid, image):
            hi = mid
        else:
            lo = mid
    return hi


def station_runs(
    source: str, heap_k: int, image: pathlib.Path, rig: Rig, d: str, uplink: bool
) -> bool:
    """Whether an 8-slot station (sampling, persisting; with uplink: its MQTT client
    retrying a broker that refuses, the outbox filling) runs CYCLES cycles to a clean exit
    under -X heapsize=heap_k k, with no task failure and no MemoryError."""
    cfg = station_config(
        "KH-BEN-0001", rig.charger_path, rig.bus_path, slots=8, broker_port=free_port()
    )
    cfg["sample_ms"] = 100
    cfg["telemetry_s"] = 1
    flash = pathlib.Path(d) / f"flash-{source}-{heap_k}-{uplink}"
    env = {"STATION_CYCLES": str(CYCLES)}
    st: StationProcess
    if source == "romfs":
        heap = f"{heap_k + image.stat().st_size // 1024 + 1}k"  # + the image's bytearray
        st = romfs.RomStation(
            flash, cfg, image=image, heap=heap, trace_ms=1000, uplink=uplink, env=env
        )
    else:
        st = StationProcess(flash, cfg, heap=f"{heap_k}k", trace_ms=1000, uplink=uplink, env=env)
    st.start()
    assert st.proc is not None
    deadline = time.monotonic() + CYCLES * 0.1 + 15
    try:
        while st.proc.poll() is None and time.monotonic() < deadline:
            if any("MemoryError" in x for x in st.output):
                return False
            time.sleep(0.1)
    finally:
        st.stop()
    tel = st.telemetry()
    return (
        st.proc.returncode == 0
        and bool(tel)
        and tel[-1].get("cycles", 0) >= CYCLES
        and not tel[-1].get("task_failures")
        and not any("MemoryError" in x for x in st.output)
    )


def smallest_station_heap_k(source: str, image: pathlib.Path, uplink: bool) -> int:
    with tempfile.TemporaryDirectory() as d, Rig(slots=8, seed=2, workdir=f"{d}/rig") as rig:
        for s in range(1, 9):
            rig.insert(s, pack="72V", power_w=1000, capacity_wh=20, soc=0.3)
        lo, hi = 32, 512  # lo fails, hi runs
        while hi - lo > 4:
            mid = (lo + hi) // 2
            if station_runs(source, mid, image, rig, d, uplink):
                hi = mid
            else:
                lo = mid
    return hi


def main() -> None:
    as_json = "--json" in sys.argv
    img = romfs.build_image()
    with tempfile.TemporaryDirectory() as d:
        image = pathlib.Path(d) / "fw.romfs"
        image.write_bytes(img.data)
        mpy_bytes = sum(
            p.stat().st_size
            for p in fwbuild.build().rglob("*.mpy")
            if p.relative_to(fwbuild.build()).as_posix() in img.files
        )
        out: dict[str, object] = {
            "interpreter": "MicroPython unix port (64-bit, double floats) "
            + subprocess.run(
                [fwbuild.micropython_bin(), "-c", "import sys; print(sys.implementation)"],
                capture_output=True,
                text=True,
            ).stdout.strip(),
            "image": {"bytes": img.size, "files": len(img.files), "mpy_bytes": mpy_bytes},
            "modules": list(romfs.STATION_MODULES),
            "import": {s: romfs.import_heap(s) for s in SOURCES},
        }
        smallest = {s: smallest_heap_k(s, image) for s in SOURCES}
        # the romfs run holds the image in its heap too: subtract it
        smallest["romfs"] -= img.size // 1024
        out["smallest_heap_k"] = smallest
        out["station_8_slots_smallest_heap_k"] = {
            f"{s}{'+uplink' if up else ''}": smallest_station_heap_k(s, image, up)
            for up in (False, True)
            for s in ("romfs", "mpy")
        }
    if as_json:
        print(json.dumps(out, indent=2))
        return
    print(out["interpreter"])
    im = out["image"]
    assert isinstance(im, dict)
    print(
        f"image: {im['bytes']} bytes, {im['files']} files "
        f"(the same .mpy files: {im['mpy_bytes']} bytes)"
    )
    print(f"heap in use after importing {', '.join(romfs.STATION_MODULES)} + gc.collect():")
    imp = out["import"]
    assert isinstance(imp, dict)
    for s in SOURCES:
        print(f"  {s:6} {imp[s]['imports']:>8} bytes")
    print("smallest -X heapsize the import fits in (romfs: less the image's bytearray):")
    for s in SOURCES:
        print(f"  {s:6} {smallest[s]:>5} KB")
    print(
        f"smallest -X heapsize an 8-slot station (sampling, persisting; +uplink: its MQTT "
        f"client and outbox, the broker refusing) runs {CYCLES} cycles in (romfs: plus the "
        "image's bytearray):"
    )
    ss = out["station_8_slots_smallest_heap_k"]
    assert isinstance(ss, dict)
    for s, v in ss.items():
        print(f"  {s:12} {v:>5} KB")


if __name__ == "__main__":
    main()
