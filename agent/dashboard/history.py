"""The dashboard's history views, pure: completed sessions, kWh per station and UTC day with
its completeness, the alarm history, the fleet table filtered and sorted as the page does,
and CSV of each (docs/dashboard.md "History pages").

Ranges are whole UTC days, `from` and `to` inclusive (`YYYY-MM-DD`). Energy and sessions run
on station time (records), the alarm history on the agent's clock, as the live pages do.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from typing import Any, Final

from agent.ledger import Record, carbon

DAY_MS: Final = 86_400_000
INTERVAL_MS: Final = 900_000  # the metering default; the records' own length wins
MAX_DAYS: Final = 366
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
NOT_VALIDATED: Final = "example parameters, not validated"


class BadRequest(ValueError):
    """A bad query parameter (HTTP 400), with a one-line reason."""


def day_of(ms: int) -> date:
    return (_EPOCH + timedelta(milliseconds=ms)).date()


def ms_of(d: date) -> int:
    return (d - _EPOCH.date()).days * DAY_MS


def iso(ms: int | None) -> str:
    """Unix ms as ISO 8601 UTC with milliseconds ("" for None)."""
    if ms is None:
        return ""
    t = _EPOCH + timedelta(milliseconds=ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def kwh(mwh: int | None) -> str:
    """mWh as exact kWh with 6 decimals ("" for None)."""
    return "" if mwh is None else carbon.fmt(Fraction(mwh, 1_000_000), 6)


@dataclass(frozen=True)
class Range:
    """Whole UTC days, both ends included."""

    first: date
    last: date

    @property
    def from_ms(self) -> int:
        return ms_of(self.first)

    @property
    def to_ms(self) -> int:
        """Exclusive end: the start of the day after `last`."""
        return ms_of(self.last) + DAY_MS

    @property
    def label(self) -> str:
        return f"{self.first.isoformat()}_{self.last.isoformat()}"

    def as_json(self) -> dict[str, str]:
        return {"from": self.first.isoformat(), "to": self.last.isoformat()}


def parse_range(q: Mapping[str, str], today_ms: int, default_days: int = 7) -> Range:
    """`from` and `to` (YYYY-MM-DD, UTC, inclusive) of a query; `to` defaults to the day of
    today_ms, `from` to `default_days` days ending there."""

    def get(name: str) -> date | None:
        raw = q.get(name)
        if raw is None or raw == "":
            return None
        try:
            return date.fromisoformat(raw)
        except ValueError:
            raise BadRequest(f"{name} must be a date YYYY-MM-DD, got {raw!r}") from None

    last = get("to") or day_of(today_ms)
    first = get("from") or last - timedelta(days=default_days - 1)
    if first > last:
        raise BadRequest(f"from ({first}) is after to ({last})")
    if (last - first).days + 1 > MAX_DAYS:
        raise BadRequest(f"a range may span at most {MAX_DAYS} days")
    return Range(first, last)


def want_csv(q: Mapping[str, str]) -> bool:
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv"):
        raise BadRequest(f"format must be json or csv, got {fmt!r}")
    return fmt == "csv"


def carbon_label(info: Mapping[str, Any] | None) -> str:
    """The parameter set as a CSV cell: "example-kh 2026.1 (example parameters, not
    validated)"."""
    if not info:
        return ""
    s = f"{info['id']} {info['version']}"
    return s if info.get("validated") else f"{s} ({NOT_VALIDATED})"


# ---- CSV ------------------------------------------------------------------------------------

Column = tuple[str, Callable[[Mapping[str, Any]], Any]]


def to_csv(columns: Sequence[Column], rows: Iterable[Mapping[str, Any]]) -> bytes:
    """A header row, then one line per row (RFC 4180, CRLF)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow([name for name, _ in columns])
    for r in rows:
        w.writerow(["" if (v := get(r)) is None else v for _, get in columns])
    return buf.getvalue().encode()


# ---- sessions -------------------------------------------------------------------------------


def session_row(r: Record) -> dict[str, Any]:
    x = r.extra or {}
    return {
        "sid": r.sid,
        "slot": r.slot,
        "bat": x.get("bat"),
        "start_ms": r.start_ms,
        "end_ms": r.end_ms,
        "duration_ms": r.end_ms - r.start_ms,
        "mwh": r.mwh,
        "soc0": x.get("soc0"),
        "soc1": x.get("soc1"),
        "why": x.get("why"),
        "reg_check": x.get("reg_check"),
        "flags": list(r.flags),
        # an OCPP charger's session (CONTRACT §11), unsigned unless its meter signs (OCMF)
        "source": "ocpp" if "ocpp" in r.flags else "own",
        "unsigned": "unsigned" in r.flags,
    }


def _pct(v: Any) -> str:
    return carbon.fmt(Fraction(v, 10), 1) if type(v) is int else ""


SESSION_CSV: Final[tuple[Column, ...]] = (
    ("station", lambda r: r["sid"]),
    ("slot", lambda r: r["slot"]),
    ("battery", lambda r: r["bat"]),
    ("start_utc", lambda r: iso(r["start_ms"])),
    ("end_utc", lambda r: iso(r["end_ms"])),
    ("duration_s", lambda r: carbon.fmt(Fraction(r["duration_ms"], 1000), 3)),
    ("kwh", lambda r: kwh(r["mwh"])),
    ("soc_start_pct", lambda r: _pct(r["soc0"])),
    ("soc_end_pct", lambda r: _pct(r["soc1"])),
    ("end_reason", lambda r: r["why"]),
    ("flags", lambda r: " ".join(r["flags"])),
)


# ---- energy per station and day ---------------------------------------------------------------


def daily_rows(
    days: Iterable[Record],
    coverage: Iterable[tuple[str, int, int, bool]],
    rng: Range,
    today_of: Callable[[str], int],
    params: carbon.CarbonParams | None,
    sid: str | None = None,
) -> list[dict[str, Any]]:
    """One row per station and UTC day of the range (up to the station's today): battery
    side (the slots' day records summed), grid side (slot 0), and completeness: the
    intervals of the day with interval records and no `gap` flag, against the intervals a
    day has. A day is complete when it has them all and is over on the station's clock
    (today never is). Stations: those with records in the range (and `sid`).
    `today_of(sid)`: the start of the station's today (Unix ms, its clock)."""
    by: dict[tuple[str, int], list[Record]] = {}
    for r in days:
        by.setdefault((r.sid, r.start_ms), []).append(r)
    have: dict[tuple[str, int], int] = {}
    lengths: dict[str, dict[int, int]] = {}
    for s, start, length, gap in coverage:
        d = start - start % DAY_MS
        if not gap:
            have[(s, d)] = have.get((s, d), 0) + 1
        ln = lengths.setdefault(s, {})
        ln[length] = ln.get(length, 0) + 1
    sids = {k[0] for k in by} | set(lengths) | ({sid} if sid else set())
    rows = []
    for s in sorted(sids):
        today = today_of(s)
        ln = lengths.get(s, {})
        length = max(ln, key=ln.__getitem__) if ln else INTERVAL_MS
        expected = DAY_MS // length if 0 < length <= DAY_MS else DAY_MS // INTERVAL_MS
        for d in range(rng.from_ms, min(rng.to_ms, today + DAY_MS), DAY_MS):
            recs = by.get((s, d), [])
            n = have.get((s, d), 0)
            grid = [r for r in recs if r.slot == 0]
            co2, point = _co2e(grid or recs, "grid" if grid else "battery", params)
            rows.append(
                {
                    "sid": s,
                    "day": day_of(d).isoformat(),
                    "day_ms": d,
                    "mwh": sum(r.mwh for r in recs if r.slot != 0),
                    "grid_mwh": sum(r.mwh for r in grid),
                    "intervals": n,
                    "intervals_expected": expected,
                    "complete": n >= expected and d < today,
                    "today": d == today,
                    "flags": sorted({f for r in recs for f in r.flags}),
                    "unsigned": any("unsigned" in r.flags for r in recs),
                    "co2e_kg": co2,
                    "co2e_point": point if co2 is not None else None,
                }
            )
    return rows


def _co2e(
    recs: list[Record], point: str, params: carbon.CarbonParams | None
) -> tuple[str | None, str]:
    if params is None or not recs:
        return None, point
    try:
        er = sum((carbon.reduction(r, params).er for r in recs), Fraction(0))
    except ValueError:
        return None, point
    return carbon.fmt(er * 1000, 3), point


def daily_csv(info: Mapping[str, Any] | None) -> tuple[Column, ...]:
    label = carbon_label(info)
    return (
        ("station", lambda r: r["sid"]),
        ("day_utc", lambda r: r["day"]),
        ("battery_kwh", lambda r: kwh(r["mwh"])),
        ("grid_kwh", lambda r: kwh(r["grid_mwh"])),
        ("intervals", lambda r: f"{r['intervals']}/{r['intervals_expected']}"),
        ("complete", lambda r: "yes" if r["complete"] else "no"),
        ("co2e_kg", lambda r: r["co2e_kg"]),
        ("co2e_point", lambda r: r["co2e_point"]),
        ("flags", lambda r: " ".join(r["flags"])),
        ("carbon_params", lambda r: label if r["co2e_kg"] is not None else ""),
    )


# ---- the fleet table: filter and sort as the page does -----------------------------------------

STATES: Final = ("online", "silent", "offline", "unknown")
SORTS: Final = ("sid", "state", "power", "today", "alarms")
SOURCES: Final = ("own", "ocpp")  # the project's stations; OCPP chargers (CONTRACT §11)


def _sort_key(name: str) -> Callable[[Mapping[str, Any]], Any]:
    low = float("-inf")
    if name == "state":
        return lambda s: STATES.index(s["state"]) if s["state"] in STATES else len(STATES)
    if name == "power":
        return lambda s: low if s["power_w"] is None else s["power_w"]
    if name == "today":
        return lambda s: s["today_mwh"]
    if name == "alarms":
        return lambda s: (s["alarms"]["crit"], s["alarms"]["warn"])
    return lambda s: s["sid"]


def filter_stations(stations: list[dict[str, Any]], q: Mapping[str, str]) -> list[dict[str, Any]]:
    """The fleet's rows as the page shows them: `q` (a substring of the station id, any
    case), `state` (online, silent, offline, unknown; empty: all), `source` (own, ocpp;
    empty: all), `sort` (sid, state, power, today, alarms) and `dir` (asc, desc); ties in
    station id order."""
    text = q.get("q", "").strip().upper()
    state = q.get("state", "")
    source = q.get("source", "")
    if source and source not in SOURCES:
        raise BadRequest(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    sort = q.get("sort", "sid") or "sid"
    direction = q.get("dir", "asc") or "asc"
    if state and state not in STATES:
        raise BadRequest(f"state must be one of {', '.join(STATES)}, got {state!r}")
    if sort not in SORTS:
        raise BadRequest(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    if direction not in ("asc", "desc"):
        raise BadRequest(f"dir must be asc or desc, got {direction!r}")
    rows = [
        s
        for s in sorted(stations, key=lambda s: s["sid"])
        if text in s["sid"].upper()
        and (not state or s["state"] == state)
        and (not source or s.get("source", "own") == source)
    ]
    return sorted(rows, key=_sort_key(sort), reverse=direction == "desc")


def stations_csv(info: Mapping[str, Any] | None) -> tuple[Column, ...]:
    label = carbon_label(info)
    return (
        ("station", lambda s: s["sid"]),
        ("state", lambda s: s["state"]),
        ("last_seen_utc", lambda s: iso(s["last_seen_ms"])),
        ("power_w", lambda s: s["power_w"]),
        ("meter_w", lambda s: s["meter_w"]),
        ("charging", lambda s: s["charging"]),
        ("slots", lambda s: s["slots"]),
        ("today_kwh", lambda s: kwh(s["today_mwh"])),
        ("today_grid_kwh", lambda s: kwh(s["today_grid_mwh"])),
        ("co2e_today_kg", lambda s: s["co2e_today_kg"]),
        ("alarms_crit", lambda s: s["alarms"]["crit"]),
        ("alarms_warn", lambda s: s["alarms"]["warn"]),
        ("firmware", lambda s: s["fw"]),
        ("update", lambda s: (s["ota"] or {}).get("phase")),
        # own, or the OCPP charger's protocol (CONTRACT §11): "OCPP 1.6", "OCPP 2.0.1"
        ("source", lambda s: s.get("mark") or "own"),
        ("carbon_params", lambda s: label if s["co2e_today_kg"] is not None else ""),
    )


# ---- alarm history ----------------------------------------------------------------------------


def _parse_id(aid: str) -> tuple[str | None, str, int | None]:
    parts = aid.split(":")
    sid = None if parts[0] == "-" else parts[0]
    code = parts[1] if len(parts) > 1 else ""
    slot = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None
    return sid, code, slot


def alarm_history(
    occurrences: list[dict[str, Any]],
    agent_rows: Iterable[tuple[int, int, str | None, str, str, str]],
    acks: Iterable[Any],
    sid: str | None,
) -> list[dict[str, Any]]:
    """The alarm history, newest first (by when raised): the active alarms' occurrences
    the dashboard saw (raised, cleared), the agent's own alarms (one-off: no clearing),
    and acknowledgements (`users.Ack`) of occurrences it no longer remembers (a restart).
    Every item: id, sid, slot, code, level, msg, source, raised_ms, cleared_ms, acked_by,
    acked_at."""
    ack = {(a.alarm_id, a.since_ms): a for a in acks}
    out = []
    for o in occurrences:
        a = ack.pop((o["id"], o["since_ms"]), None)
        out.append(
            {
                "id": o["id"],
                "sid": o["sid"],
                "slot": o["slot"],
                "code": o["code"],
                "level": o["level"],
                "msg": o["msg"],
                "source": "dashboard",
                "raised_ms": o["since_ms"],
                "cleared_ms": o["cleared_ms"],
                "acked_by": a.user if a else None,
                "acked_at": a.at_ms if a else None,
            }
        )
    for rid, ts, asid, code, level, detail in agent_rows:
        out.append(
            {
                "id": f"agent:{rid}",
                "sid": asid,
                "slot": None,
                "code": code,
                "level": level,
                "msg": detail[:300],
                "source": "agent",
                "raised_ms": ts,
                "cleared_ms": None,
                "acked_by": None,
                "acked_at": None,
            }
        )
    for (aid, since), a in ack.items():
        asid, code, slot = _parse_id(aid)
        if sid is not None and asid != sid:
            continue
        out.append(
            {
                "id": aid,
                "sid": asid,
                "slot": slot,
                "code": code,
                "level": None,
                "msg": "acknowledged (raised before the dashboard last started)",
                "source": "ack",
                "raised_ms": since,
                "cleared_ms": None,
                "acked_by": a.user,
                "acked_at": a.at_ms,
            }
        )
    out.sort(key=lambda x: (x["raised_ms"], x["id"]), reverse=True)
    return out


ALARM_CSV: Final[tuple[Column, ...]] = (
    ("raised_utc", lambda a: iso(a["raised_ms"])),
    ("cleared_utc", lambda a: iso(a["cleared_ms"])),
    ("station", lambda a: a["sid"]),
    ("slot", lambda a: a["slot"]),
    ("code", lambda a: a["code"]),
    ("level", lambda a: a["level"]),
    ("message", lambda a: a["msg"]),
    ("source", lambda a: a["source"]),
    ("acked_by", lambda a: a["acked_by"]),
    ("acked_utc", lambda a: iso(a["acked_at"])),
)
