"""`stationctl period lock|list`: monitoring periods locked for MRV (CONTRACT §6.8).

    stationctl period lock --db URL --from 2026-11-01 --to 2026-12-01 [--by NAME] [--note TEXT]
    stationctl period list --db URL [--json]

A lock freezes the interval and day records of its UTC days as they stand (computed from
the raw messages received by the lock's time, agent/ledger/periods.py) and records when
and by whom. Periods are locked in order, each from the last one's end. Messages for a
locked period that arrive later are kept, and show as `adjustment` records in the first
open period, never as changes to the locked one. A running agent picks the lock up within
a few seconds. `list` reads and never creates a database.
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("period", help="monitoring periods: lock one for MRV, list the locks")
    ps = p.add_subparsers(dest="period_cmd", required=True, metavar="ACTION")
    lk = ps.add_parser("lock", help="lock a monitoring period (whole UTC days, in order)")
    lk.add_argument("--db", required=True, metavar="URL", help="the agent database")
    lk.add_argument("--from", dest="start", required=True, metavar="ISO", help="first day")
    lk.add_argument("--to", dest="end", required=True, metavar="ISO", help="the day after")
    lk.add_argument("--by", default=None, help="who locks it (default: this user)")
    lk.add_argument("--note", default="", help="free text (e.g. the monitoring report's id)")
    lk.add_argument("--config", metavar="FILE", help="the agent's config (its [metering])")
    lk.add_argument(
        "--wait", type=float, default=30.0, metavar="S", help="wait for the agent's commits"
    )
    ls = ps.add_parser("list", help="the locked periods")
    ls.add_argument("--db", required=True, metavar="URL")
    ls.add_argument("--json", action="store_true", help="JSON Lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.ledger.agent_meter import decode_row
    from agent.ledger.export import parse_time
    from agent.ledger.periods import PeriodError, load_locks, take_lock
    from agent.store import SCHEMA_VERSION
    from stationctl.dbopen import DB_ERRORS, name, open_store, reason
    from stationctl.verify import metering_params

    reads = args.period_cmd == "list"
    store = open_store(args.db, create=False, readonly=reads)
    try:
        if reads:
            for lk in load_locks(store):
                row = {
                    "n": lk.n,
                    "from": _iso(lk.from_ms),
                    "to": _iso(lk.to_ms),
                    "locked_at": _iso(lk.at_ms),
                    "by": lk.by,
                    "note": lk.note,
                }
                print(json.dumps(row) if args.json else "  ".join(str(v) for v in row.values()))
            return 0
        if store.schema_version() != SCHEMA_VERSION:
            raise UsageError(
                f"database {name(args.db)}: schema {store.schema_version()}, this program "
                f"needs {SCHEMA_VERSION}: run `stationctl db upgrade --db {name(args.db)}`"
            )
        try:
            start, end = parse_time(args.start), parse_time(args.end)
        except ValueError as e:
            raise UsageError(str(e)) from None
        lock, n = take_lock(
            store,
            start,
            end,
            params=metering_params(args.config),
            decode=decode_row,
            by=args.by or getpass.getuser(),
            note=args.note,
            wait_s=args.wait,
        )
        print(
            f"period {lock.n} locked: {_iso(lock.from_ms)} .. {_iso(lock.to_ms)} at "
            f"{_iso(lock.at_ms)} by {lock.by}; {n} interval and day records frozen"
        )
        return 0
    except PeriodError as e:
        raise UsageError(str(e)) from None
    except DB_ERRORS as e:
        raise UsageError(f"database {name(args.db)}: {reason(args.db, e)}") from None
    finally:
        store.close()


def _iso(ms: int) -> str:
    from agent.ledger.export import iso_ms

    return iso_ms(ms)
