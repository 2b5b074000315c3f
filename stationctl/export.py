"""`stationctl export --db URL [--from ISO] [--to ISO] [--by interval|session|day]
--format csv|json [--sid SID …]` (CONTRACT §8): the records the agent stored, to stdout.

The bytes depend only on the database contents and the arguments: records are read in a
fixed order and rendered by agent/ledger/export.py, which sorts them itself.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="metering records as CSV or JSON Lines (CONTRACT §8)")
    p.add_argument(
        "--db",
        required=True,
        metavar="URL",
        help="the agent database: a path, sqlite:///PATH or postgresql://…",
    )
    p.add_argument(
        "--from",
        dest="start",
        metavar="ISO",
        help="inclusive start, UTC unless the time says otherwise (e.g. 2025-11-01)",
    )
    p.add_argument("--to", dest="end", metavar="ISO", help="exclusive end")
    p.add_argument("--by", choices=["interval", "session", "day"], default="interval")
    p.add_argument("--format", required=True, choices=["csv", "json"])
    p.add_argument(
        "--sid",
        action="append",
        metavar="SID",
        help="only this station (repeatable); a station with no record at all is exit 2",
    )
    p.set_defaults(func=run)


def _time(text: str, what: str) -> int:
    from agent.ledger.export import parse_time

    try:
        return parse_time(text)
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None


def run(args: argparse.Namespace) -> int:
    from agent.ledger.export import render
    from agent.store import row_to_record
    from stationctl.dbopen import DB_ERRORS, name, open_store, reason

    start = _time(args.start, "--from") if args.start is not None else None
    end = _time(args.end, "--to") if args.end is not None else None
    if start is not None and end is not None and end < start:
        raise UsageError("--to is before --from")
    store = open_store(args.db, readonly=True)
    try:
        if args.sid:
            known = set(store.record_sids())
            unknown = sorted(set(args.sid) - known)
            if unknown:
                raise UsageError(f"unknown station(s) {', '.join(unknown)}: no record")
            rows = [
                r
                for sid in sorted(set(args.sid))
                for r in store.record_rows(kind=args.by, start_ms=start, end_ms=end, sid=sid)
            ]
        else:
            rows = store.record_rows(kind=args.by, start_ms=start, end_ms=end)
    except DB_ERRORS as e:
        raise UsageError(f"database {name(args.db)}: {reason(args.db, e)}") from None
    finally:
        store.close()
    out = render([row_to_record(r) for r in rows], args.format, start, end, args.by)
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0
