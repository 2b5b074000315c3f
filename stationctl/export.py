"""`stationctl export --db URL [--from ISO] [--to ISO] [--by interval|session|day]
--format csv|json [--sid SID …]` (CONTRACT §8): the records the agent stored, to stdout.

The bytes depend only on the database contents and the arguments: records are read in a
fixed order and rendered by agent/ledger/export.py, which sorts them itself.

Once a grid meter is registered (`stationctl meter`), grid-side records go through the
register's crediting layer (agent/meters.py): `mwh` is the credited value, the layer's
flags are added, and each record carries its meter, policy and metered mWh (JSON `meter`;
CSV columns after `kwh`). `--no-meter-policy` gives the stored records as they are (what
`stationctl verify` compares). With an empty register the output is the stored records.
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
    p.add_argument(
        "--overdue-policy",
        choices=["discount", "exclude", "none"],
        help="energy of a grid meter past its calibration's due date: discount (by its "
        "accuracy class; the default), exclude, or none (flag only); default: the "
        "[meters] overdue_policy of --config, else discount",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the agent's TOML configuration, for its [meters] overdue_policy",
    )
    p.add_argument(
        "--no-meter-policy",
        action="store_true",
        help="the stored metering records as they are, without the meter register's "
        "crediting layer (what `stationctl verify` recomputes)",
    )
    p.set_defaults(func=run)


def policy_of(args: argparse.Namespace) -> str:
    """The overdue policy: --overdue-policy, else --config's [meters], else the default."""
    from agent.meters import DEFAULT_POLICY

    if getattr(args, "overdue_policy", None):
        return str(args.overdue_policy)
    if getattr(args, "config", None):
        from agent.config import ConfigError, load_config

        try:
            return load_config(args.config).meters.overdue_policy
        except ConfigError as e:
            raise UsageError(f"--config: {e}") from None
    return DEFAULT_POLICY


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
    if args.no_meter_policy and (args.overdue_policy or args.config):
        raise UsageError("--no-meter-policy takes neither --overdue-policy nor --config")
    policy = None if args.no_meter_policy else policy_of(args)
    store = open_store(args.db, readonly=True)
    register = None
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
        if policy is not None:
            from agent.meters import load_register

            register = load_register(store)
    except DB_ERRORS as e:
        raise UsageError(f"database {name(args.db)}: {reason(args.db, e)}") from None
    finally:
        store.close()
    records = [row_to_record(r) for r in rows]
    if register is None or register.empty or policy is None:
        out = render(records, args.format, start, end, args.by)
    else:
        from agent.meters import apply_policy

        credited = apply_policy(records, register, policy)
        out = render(credited, args.format, start, end, args.by, meter=True)
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0
