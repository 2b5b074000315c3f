"""`stationctl demo` (issue 7 builds it)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="broker, virtual stations, agent and dashboard in one command")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("stationctl demo: not built yet (issue 7)", file=sys.stderr)
    return 1
