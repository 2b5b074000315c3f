"""`stationctl report --db URL --from ISO --to ISO --out DIR [--config FILE]
[--carbon-params FILE] [--no-pdf]`: the monitoring report of a period (docs/mrv.md).

Writes DIR/report.html (self-contained), DIR/report.pdf and one CSV per table. Every
number comes from the records `stationctl export` gives for the same range, read through
export's own code (`export_records` runs `stationctl.export.run` and parses its JSON
Lines), so the report and export agree whatever export applies to the stored records.
Same database and arguments: the same CSV bytes; the HTML and PDF differ only in the line
that says when they were generated.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="the monitoring report of a period: HTML, PDF and CSV")
    p.add_argument("--db", required=True, metavar="URL", help="the agent database")
    p.add_argument("--from", dest="start", required=True, metavar="ISO", help="inclusive start")
    p.add_argument("--to", dest="end", required=True, metavar="ISO", help="exclusive end")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the report")
    p.add_argument(
        "--config", metavar="FILE", help="the agent's config (its [metering] interval length)"
    )
    p.add_argument(
        "--carbon-params",
        metavar="FILE",
        help="carbon parameter file (default: the shipped example, not validated)",
    )
    p.add_argument(
        "--overdue-policy",
        choices=["discount", "exclude", "none"],
        help="energy of a grid meter past its calibration's due date, as export applies it "
        "(default: --config's [meters] overdue_policy, else discount)",
    )
    p.add_argument("--no-pdf", action="store_true", help="HTML and CSV only")
    p.set_defaults(func=run)


# ---- export's records -----------------------------------------------------------------------


class _Capture:
    """Stands in for sys.stdout while export writes to sys.stdout.buffer."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def write(self, text: str) -> int:
        return self.buffer.write(text.encode())

    def flush(self) -> None:
        pass


def export_bytes(argv: list[str]) -> bytes:
    """What `stationctl export ARGV…` writes to stdout: export's own parser and `run`."""
    from stationctl import export

    p = argparse.ArgumentParser(prog="stationctl")
    export.register(p.add_subparsers(dest="cmd"))
    ns = p.parse_args(["export", *argv])
    cap = _Capture()
    real = sys.stdout
    sys.stdout = cap  # type: ignore[assignment,unused-ignore]
    try:
        export.run(ns)
    finally:
        sys.stdout = real
    return cap.buffer.getvalue()


def export_argv(
    db: str, start: str, end: str, by: str, *, config: str | None, policy: str | None
) -> list[str]:
    argv = ["--db", db, "--from", start, "--to", end, "--by", by, "--format", "json"]
    if config:
        argv += ["--config", config]
    if policy:
        argv += ["--overdue-policy", policy]
    return argv


def parse_jsonl(data: bytes, kind: str) -> list[Any]:
    """Export's JSON Lines back into Records (kind: the --by they were exported with); a
    line with a `meter` object (the register's crediting layer) into an
    agent.meters.CreditedRecord carrying it."""
    from agent.ledger.export import parse_time
    from agent.ledger.records import Record

    out: list[Any] = []
    for line in data.splitlines():
        o = json.loads(line)
        fields: dict[str, Any] = dict(
            kind=kind,
            sid=o["sid"],
            slot=int(o["slot"]),
            start_ms=parse_time(o["start"]),
            end_ms=parse_time(o["end"]),
            mwh=int(o["mwh"]),
            held_mwh=int(o["held_mwh"]),
            flags=tuple(o["flags"]),
            from_key=(int(o["from"][0]), int(o["from"][1])),
            to_key=(int(o["to"][0]), int(o["to"][1])),
            e_from=int(o["e_from"]),
            e_to=int(o["e_to"]),
            version=o["version"],
            extra=o["extra"],
        )
        m = o.get("meter")
        if m:
            from agent.meters import CreditedRecord, MeterRef

            ref = MeterRef(
                serial=m["serial"],
                accuracy_class=m["class"],
                due=m["due"],
                policy=m["policy"],
                metered_mwh=int(m["metered_mwh"]),
                register=m["register"],
            )
            out.append(
                CreditedRecord(**fields, metered_mwh=ref.metered_mwh, meter=ref, policy=ref.policy)
            )
        else:
            out.append(Record(**fields))
    return out


def export_records(
    db: str, start: str, end: str, by: str, *, config: str | None = None, policy: str | None = None
) -> list[Any]:
    """The records `stationctl export … --by BY --format json` gives, as Records."""
    argv = export_argv(db, start, end, by, config=config, policy=policy)
    return parse_jsonl(export_bytes(argv), by)


# ---- the report -----------------------------------------------------------------------------


def period(args: argparse.Namespace) -> tuple[int, int]:
    from agent.ledger.export import parse_time

    try:
        lo, hi = parse_time(args.start), parse_time(args.end)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if hi <= lo:
        raise UsageError("--to must be after --from")
    return lo, hi


def meter_params(path: str | None) -> Any:
    from agent.ledger import MeterParams

    if not path:
        return MeterParams()
    from agent.config import load_config

    try:
        return load_config(path).metering
    except (OSError, ValueError) as e:
        raise UsageError(f"--config: {e}") from None


def carbon_params(path: str | None) -> Any:
    from agent.ledger.carbon import CarbonParamsError, load_params

    try:
        return load_params(path)
    except CarbonParamsError as e:
        raise UsageError(f"--carbon-params: {e}") from None


def build_report(
    db: str,
    start: str,
    end: str,
    lo: int,
    hi: int,
    mparams: Any,
    cparams: Any,
    *,
    config: str | None = None,
    policy: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """(the Report, what was read for it: records by kind, the register) of a period."""
    from agent.archive import snapshot
    from agent.keys import KeyStore
    from agent.report import Inputs, build, collect
    from stationctl.dbopen import DB_ERRORS, name, open_store, reason

    intervals = export_records(db, start, end, "interval", config=config, policy=policy)
    days = export_records(db, start, end, "day", config=config, policy=policy)
    store = open_store(db, readonly=True)
    try:
        with snapshot(store):
            ring = KeyStore(store).ring()
            sigs, readings, sources = collect.scan(store, ring, lo, hi, mparams.interval_ms)
            quar = collect.quarantine(store, lo, hi)
            reg, note = collect.register(store, hi)
    except DB_ERRORS as e:
        raise UsageError(f"database {name(db)}: {reason(db, e)}") from None
    finally:
        store.close()
    inp = Inputs(
        start_ms=lo,
        end_ms=hi,
        interval_ms=mparams.interval_ms,
        intervals=intervals,
        days=days,
        params=cparams,
        sids=[s.sid for s in sigs],
        signatures=sigs,
        quarantine=quar,
        register=reg,
        register_note=note,
        readings=readings,
        sources=sources,
    )
    return build(inp), {"interval": intervals, "day": days, "register": reg}


def report_of(args: argparse.Namespace) -> tuple[Any, dict[str, Any], int, int, Any, Any]:
    """The report of the period the command line names (report and bundle share it):
    (report, what was read, from ms, to ms, metering parameters, carbon parameters)."""
    lo, hi = period(args)
    mparams = meter_params(args.config)
    cparams = carbon_params(args.carbon_params)
    rep, read = build_report(
        args.db,
        args.start,
        args.end,
        lo,
        hi,
        mparams,
        cparams,
        config=args.config,
        policy=args.overdue_policy,
    )
    return rep, read, lo, hi, mparams, cparams


def generated_line() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + " by stationctl report"


def run(args: argparse.Namespace) -> int:
    from agent.report.render import write_all
    from stationctl.dbopen import name

    t0 = time.monotonic()
    rep, _read, lo, hi, mparams, cparams = report_of(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a directory")
    paths = write_all(rep, out, generated_line(), name(args.db), pdf=not args.no_pdf)
    s = rep.summary
    print(
        f"report {s['period_from']} to {s['period_to']}: {s['stations']} stations, "
        f"battery {s['battery_kwh']} kWh, grid {s['grid_kwh']} kWh, "
        f"completeness {s['completeness_percent'] or '-'} %"
        + ("" if rep.validated else " (carbon: example parameters, not validated)")
    )
    for p in paths:
        if p.suffix != ".csv":
            print(f"  {p}")
    print(f"  {len([p for p in paths if p.suffix == '.csv'])} CSV tables in {out}/")
    print(f"  in {time.monotonic() - t0:.1f} s")
    return 0
