"""Shared helpers for host-side tests: tool paths, free ports, a private Mosquitto."""

from __future__ import annotations

import os
import pathlib

from tools.fwbuild import micropython_bin  # noqa: F401  (tests import it from here)
from tools.mosquitto import free_port  # noqa: F401  (tests import it from here)

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
