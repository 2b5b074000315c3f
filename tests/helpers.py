"""Shared helpers for host-side tests: tool paths, free ports, a private Mosquitto."""

from __future__ import annotations

import os
import pathlib
import socket

from tools.fwbuild import micropython_bin  # noqa: F401  (tests import it from here)

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
