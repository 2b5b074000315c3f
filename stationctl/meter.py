"""`stationctl meter add|calibrate|install|remove|list|check`: the grid meter register.

Each grid meter (serial, model, accuracy class) with its calibrations (date, next due
date, certificate; history kept) and its installations at stations, in the agent database
(agent/meters.py; docs/metering.md, "Meter register"). `list` and `check` read and never
create a database; the others change the register of an existing agent database (a
mistyped --db is exit 2, never a new empty database). `check` exits 1 when any installed
meter is past its due date (for cron). Dates are UTC days, YYYY-MM-DD.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "meter", help="the grid meter register: add, calibrate, install, remove, list, check"
    )
    ms = p.add_subparsers(dest="meter_cmd", required=True, metavar="ACTION")

    def db(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--db",
            required=True,
            metavar="URL",
            help="the agent database: a path, sqlite:///PATH or postgresql://…",
        )

    a = ms.add_parser("add", help="register a grid meter with its calibration")
    db(a)
    a.add_argument("--serial", required=True, help="the meter's serial number")
    a.add_argument("--model", required=True, help="e.g. SDM630")
    a.add_argument(
        "--class",
        dest="accuracy_class",
        required=True,
        metavar="CLASS",
        help="accuracy class in percent, a decimal such as 1.0 or 0.5",
    )
    a.add_argument("--calibrated", required=True, metavar="YYYY-MM-DD")
    a.add_argument("--due", required=True, metavar="YYYY-MM-DD", help="next calibration due")
    a.add_argument("--certificate", required=True, metavar="REF", help="certificate reference")
    a.add_argument("--note", default="", help="free text")

    c = ms.add_parser("calibrate", help="record a new calibration (earlier ones are kept)")
    db(c)
    c.add_argument("--serial", required=True)
    c.add_argument("--calibrated", required=True, metavar="YYYY-MM-DD")
    c.add_argument("--due", required=True, metavar="YYYY-MM-DD")
    c.add_argument("--certificate", required=True, metavar="REF")

    i = ms.add_parser(
        "install",
        help="install a meter as a station's grid meter (closes its previous installation "
        "and the station's previous grid meter)",
    )
    db(i)
    i.add_argument("--serial", required=True)
    i.add_argument("--sid", required=True, help="station id")
    i.add_argument("--from", dest="start", required=True, metavar="ISO", help="installed from")
    i.add_argument("--by", help="who installed it (default: this user)")

    r = ms.add_parser("remove", help="end a meter's installation")
    db(r)
    r.add_argument("--serial", required=True)
    r.add_argument("--at", required=True, metavar="ISO")

    ls = ms.add_parser("list", help="every meter with its calibration status")
    db(ls)
    ls.add_argument("--json", action="store_true", help="JSON Lines, one meter a line")
    ls.add_argument("--at", metavar="ISO", help="status as of this time (default: now)")

    ck = ms.add_parser(
        "check", help="exit 1 when any installed meter is past its due date (for cron)"
    )
    db(ck)
    ck.add_argument("--at", metavar="ISO", help="as of this time (default: now)")
    p.set_defaults(func=run)


def _time(text: str, what: str) -> int:
    from agent.ledger.export import parse_time

    try:
        return parse_time(text)
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None


def _now() -> int:
    from agent.store import now_ms

    return int(now_ms())


def run(args: argparse.Namespace) -> int:
    from agent import meters
    from agent.store import SCHEMA_VERSION
    from stationctl.dbopen import DB_ERRORS, name, open_store, reason

    reads = args.meter_cmd in ("list", "check")
    at = _time(args.at, "--at") if reads and args.at else _now()
    if args.meter_cmd in ("add", "calibrate", "install", "remove"):
        _check_args(args)
    store = open_store(args.db, create=False, readonly=reads)
    try:
        have = store.schema_version()
        if not reads and have != SCHEMA_VERSION:  # an older one opens without upgrading
            raise UsageError(
                f"database {name(args.db)}: schema {have}, this program needs "
                f"{SCHEMA_VERSION}: run `stationctl db upgrade --db {name(args.db)}`"
            )
        return _run(args, store, at)
    except meters.RegisterError as e:
        raise UsageError(str(e)) from None
    except DB_ERRORS as e:
        raise UsageError(f"database {name(args.db)}: {reason(args.db, e)}") from None
    finally:
        store.close()


def _check_args(args: argparse.Namespace) -> None:
    """Bad input is exit 2 before the database is touched."""
    from agent import meters
    from agent.wire import SID_RE

    try:
        meters.check_serial(args.serial)
        if args.meter_cmd == "add":
            meters.check_class(args.accuracy_class)
        if args.meter_cmd in ("add", "calibrate"):
            meters.day_ms(args.calibrated)
            meters.day_ms(args.due)
    except meters.RegisterError as e:
        raise UsageError(str(e)) from None
    if args.meter_cmd == "install":
        if not SID_RE.fullmatch(args.sid):
            raise UsageError(f"not a station id: {args.sid!r}")
        _time(args.start, "--from")
    if args.meter_cmd == "remove":
        _time(args.at, "--at")


def _run(args: argparse.Namespace, store: Any, at: int) -> int:
    from agent import meters
    from agent.ledger.export import iso_ms

    cmd = args.meter_cmd
    if cmd == "add":
        meters.add_meter(
            store,
            serial=args.serial,
            model=args.model,
            accuracy_class=args.accuracy_class,
            calibrated_on=args.calibrated,
            next_due=args.due,
            certificate=args.certificate,
            note=args.note,
            at_ms=at,
        )
        print(f"meter {args.serial} added (class {args.accuracy_class}, due {args.due})")
        return 0
    if cmd == "calibrate":
        meters.calibrate(
            store,
            serial=args.serial,
            calibrated_on=args.calibrated,
            next_due=args.due,
            certificate=args.certificate,
            at_ms=at,
        )
        print(f"meter {args.serial} calibrated {args.calibrated}, due {args.due}")
        return 0
    if cmd == "install":
        start = _time(args.start, "--from")
        by = args.by or getpass.getuser()
        closed = meters.install(
            store, serial=args.serial, sid=args.sid, from_ms=start, by=by, at_ms=at
        )
        for line in closed:
            print(line)
        print(f"meter {args.serial} installed at {args.sid} from {iso_ms(start)}")
        return 0
    if cmd == "remove":
        when = _time(args.at, "--at")
        sid = meters.remove(store, serial=args.serial, at=when)
        print(f"meter {args.serial} removed from {sid} at {iso_ms(when)}")
        return 0
    rows = meters.register_status(store, at)
    if cmd == "list":
        if args.json:
            for row in rows:
                sys.stdout.write(json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n")
            return 0
        _table(rows)
        return 0
    # check
    bad = [r for r in rows if r["sid"] is not None and r["status"] in ("overdue", "uncalibrated")]
    for r in rows:
        if r["sid"] is not None:
            print(f"{r['serial']} at {r['sid']}: {status_text(r)}")
    if not rows:
        print("no meter registered")
    return 1 if bad else 0


def status_text(r: dict[str, Any]) -> str:
    """ok / due in N days / OVERDUE since D (N days) / no calibration in force."""
    if r["status"] == "overdue":
        return f"OVERDUE since {r['due']} ({r['overdue_days']} days)"
    if r["status"] == "uncalibrated":
        return "no calibration in force"
    if r["status"] == "due_soon":
        n = r["days_to_due"]
        return "due today" if n == 0 else f"due in {n} days"
    return "ok"


def _table(rows: list[dict[str, Any]]) -> None:
    from agent.ledger.export import iso_ms

    head = ("serial", "model", "class", "calibrated", "due", "certificate", "station", "since")
    lines = [
        (
            r["serial"],
            r["model"],
            r["class"],
            r["calibrated_on"] or "-",
            r["due"] or "-",
            r["certificate"] or "-",
            r["sid"] or "-",
            iso_ms(r["installed_from"])[:16] + "Z" if r["installed_from"] is not None else "-",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=False)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + "  status")
    for line, r in zip(lines, rows, strict=True):
        cells = "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True))
        print(cells + "  " + status_text(r))
