"""`stationctl`: one command line for technicians, operators, test rigs and auditors.

Each subcommand lives in its own module exposing `register(subparsers)`, which adds its
parser and sets `func` (called with the parsed arguments, returning the exit status).
Exit status (CONTRACT §8): 0 success, 2 bad usage or bad input, 1 other failure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from stationctl.errors import UsageError

# the modules of stationctl/ that provide subcommands, in help order (one per user task)
COMMANDS = [
    "stationctl.demo",
    "stationctl.agent",
    "stationctl.export",
    "stationctl.meter",
    "stationctl.period",
    "stationctl.verify",
    "stationctl.report",
    "stationctl.bundle",
    "stationctl.archive",
    "stationctl.keys",
    "stationctl.ocpp",
    "stationctl.db",
    "stationctl.flash",
    "stationctl.broker",
    "stationctl.sim",
    "stationctl.watch",
    "stationctl.dashboard",
    "stationctl.ota",
    "stationctl.users",
]


__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (CONTRACT §8), pointing at -h for the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="stationctl", description="Charging-station firmware, agent and tools.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except UsageError as e:
        print(f"stationctl {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`export … | head`): what it wanted it has; no traceback,
        # and nothing more to flush into the closed pipe at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
