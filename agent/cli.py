"""`stationctl`: one command line for technicians, operators, test rigs and auditors."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stationctl", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="run a broker, virtual stations, the agent and the dashboard")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        print("stationctl demo: not yet (issue 7)", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
