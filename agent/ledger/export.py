"""Record export (CONTRACT §8): JSON Lines or CSV, byte-for-byte deterministic.

Same records, same arguments: the same bytes. Columns, in order: sid, slot, start, end,
mwh, held_mwh, flags, from, to, e_from, e_to, version, extra; CSV adds kwh (6 decimals).
Lines end in "\\n" (both formats); CSV quotes only where needed (csv.QUOTE_MINIMAL).

With `meter=True` (records that went through the meter register's crediting layer,
agent/meters.py: `mwh` is then the credited value) each JSON object gains a `meter` object
(null for a record the layer does not touch) and CSV gains METER_COLUMNS after `kwh`,
at the end of the line: CONTRACT §8's columns keep their order.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.ledger.records import Record

FORMATS = ("csv", "json")
KINDS = ("interval", "session", "day")
COLUMNS = (
    "sid",
    "slot",
    "start",
    "end",
    "mwh",
    "held_mwh",
    "flags",
    "from",
    "to",
    "e_from",
    "e_to",
    "version",
    "extra",
)

# appended to the CSV header when the meter register's layer applies (docs/metering.md)
METER_COLUMNS = (
    "meter_serial",
    "meter_class",
    "meter_due",
    "meter_policy",
    "metered_mwh",
    "meter_register",
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_ms(ms: int) -> str:
    """Unix ms -> YYYY-MM-DDTHH:MM:SS.sssZ (UTC), for any integer: plain arithmetic on the
    proleptic Gregorian calendar, so a time past year 9999 (or before year 1), which
    datetime cannot hold, prints instead of raising (the year then has more digits or a
    sign)."""
    days, rest = divmod(ms, 86_400_000)
    y, m, d = civil_from_days(days)
    hh, rest = divmod(rest, 3_600_000)
    mi, rest = divmod(rest, 60_000)
    ss, frac = divmod(rest, 1000)
    year = f"{y:04d}" if y >= 0 else f"-{-y:04d}"
    return f"{year}-{m:02d}-{d:02d}T{hh:02d}:{mi:02d}:{ss:02d}.{frac:03d}Z"


def civil_from_days(days: int) -> tuple[int, int, int]:
    """Days since 1970-01-01 -> (year, month, day) (H. Hinnant's algorithm, exact)."""
    z = days + 719_468
    era, doe = divmod(z, 146_097)
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (m <= 2), m, d


_ISO = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?)?"
    r"(Z|[+-]\d{2}:?\d{2})?$"
)


def parse_time(text: str) -> int:
    """ISO 8601 date or date-time -> Unix ms. No zone means UTC (days are UTC).
    Raises ValueError with a one-line reason."""
    m = _ISO.match(text.strip())
    if not m:
        raise ValueError(f"not an ISO date or date-time: {text!r}")
    y, mo, d, hh, mi, ss, frac, zone = m.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(hh or 0), int(mi or 0), int(ss or 0), tzinfo=UTC)
    except ValueError as e:
        raise ValueError(f"bad date {text!r}: {e}") from None
    ms = (dt - _EPOCH) // timedelta(milliseconds=1)
    if frac:
        ms += int(frac.ljust(6, "0")) // 1000
    if zone and zone != "Z":
        sign = -1 if zone[0] == "+" else 1  # 10:00+07:00 is 03:00Z
        z = zone[1:].replace(":", "")
        ms += sign * (int(z[:2]) * 60 + int(z[2:])) * 60_000
    return ms


def kwh(mwh: int) -> str:
    """mWh -> kWh with exactly 6 decimals, without floats."""
    sign = "-" if mwh < 0 else ""
    q, r = divmod(abs(mwh), 1_000_000)
    return f"{sign}{q}.{r:06d}"


def select(
    records: Iterable[Record], start_ms: int | None, end_ms: int | None, by: str
) -> list[Record]:
    """The records of one kind whose start is in [start_ms, end_ms), in export order."""
    if by not in KINDS:
        raise ValueError(f"--by must be one of {', '.join(KINDS)}, got {by!r}")
    out = [
        r
        for r in records
        if r.kind == by
        and (start_ms is None or r.start_ms >= start_ms)
        and (end_ms is None or r.start_ms < end_ms)
    ]
    out.sort(
        key=lambda r: (
            r.sid,
            r.slot,
            r.start_ms,
            "adjustment" in r.flags,
            r.end_ms,
            r.from_key,
            r.to_key,
            r.flags,
        )
    )
    return out


def _extra(r: Record) -> dict[str, Any]:
    return {k: r.extra[k] for k in sorted(r.extra)}


def _obj(r: Record) -> dict[str, Any]:
    return {
        "sid": r.sid,
        "slot": r.slot,
        "start": iso_ms(r.start_ms),
        "end": iso_ms(r.end_ms),
        "mwh": r.mwh,
        "held_mwh": r.held_mwh,
        "flags": list(r.flags),
        "from": list(r.from_key),
        "to": list(r.to_key),
        "e_from": r.e_from,
        "e_to": r.e_to,
        "version": r.version,
        "extra": _extra(r),
    }


def _meter_obj(r: Record) -> dict[str, Any] | None:
    ref = getattr(r, "meter", None)
    return None if ref is None else dict(ref.as_dict())


def _meter_cells(r: Record) -> tuple[Any, ...]:
    ref = getattr(r, "meter", None)
    if ref is None:
        return ("",) * len(METER_COLUMNS)
    return (
        ref.serial,
        ref.accuracy_class,
        ref.due,
        ref.policy,
        ref.metered_mwh,
        ref.register,
    )


def render(
    records: Iterable[Record],
    fmt: str,
    start_ms: int | None = None,
    end_ms: int | None = None,
    by: str = "interval",
    *,
    meter: bool = False,
) -> bytes:
    """Export records per CONTRACT §8. fmt: "csv" | "json" (JSON Lines). `meter`: the
    records are agent.meters.CreditedRecord and the output carries their meter columns."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be csv or json, got {fmt!r}")
    rows = select(records, start_ms, end_ms, by)
    if fmt == "json":
        out = []
        for r in rows:
            obj = _obj(r)
            if meter:
                obj["meter"] = _meter_obj(r)
            out.append(json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n")
        return b"".join(out)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow((*COLUMNS, "kwh", *(METER_COLUMNS if meter else ())))
    for r in rows:
        w.writerow(
            (
                r.sid,
                r.slot,
                iso_ms(r.start_ms),
                iso_ms(r.end_ms),
                r.mwh,
                r.held_mwh,
                "|".join(r.flags),
                f"{r.from_key[0]}:{r.from_key[1]}",
                f"{r.to_key[0]}:{r.to_key[1]}",
                r.e_from,
                r.e_to,
                r.version,
                json.dumps(_extra(r), separators=(",", ":"), ensure_ascii=True),
                kwh(r.mwh),
                *(_meter_cells(r) if meter else ()),
            )
        )
    return buf.getvalue().encode("utf-8")
