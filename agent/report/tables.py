"""The monitoring report's tables, as pure functions of what was read (no I/O, no rendering).

`build(inputs)` turns the records `stationctl export` gives for the period (interval and
day records), the quarantine rows, the signature check of the period's raw messages and
the meter register into `Table`s: each a title, a header and rows of strings, written as
CSV beside the HTML and PDF (`Table.csv()`: the same bytes for the same inputs). Numbers
are exact: energy as integer mWh with kWh to 6 decimals (`agent.ledger.export.kwh`),
tonnes as `agent.ledger.carbon.fmt` (half-even, 6 decimals), percentages to 2 decimals by
integer arithmetic. Everything here imports only the standard library and agent.ledger,
so `stationctl verify --bundle` can rebuild the record-derived tables on a clean machine.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agent.ledger.carbon import CarbonParams, aggregate, fmt, reductions
from agent.ledger.export import iso_ms, kwh
from agent.ledger.records import DAY_MS, Record, make_record

NOT_VALIDATED = "example parameters, not validated"
BATTERY = "battery"
GRID = "grid"
TOTAL = "TOTAL"
OWN = "own"  # a station of this project (HMAC-signed messages)
UNSIGNED = "unsigned"  # the flag of a record whose OCPP readings carry no checked signature

# the tables computed from the records alone (and the carbon parameters): what
# `verify --bundle` rebuilds and compares byte for byte
RECORD_TABLES = (
    "energy",
    "energy_by_slot",
    "daily",
    "carbon",
    "completeness",
    "completeness_daily",
    "gaps",
    "held",
    "adjustments",
    "meter_policy",
)


@dataclass(frozen=True)
class Table:
    name: str  # the CSV's file name without .csv
    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""

    def csv(self) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.header)
        w.writerows(self.rows)
        return buf.getvalue().encode("utf-8")

    def column(self, name: str) -> list[str]:
        i = self.header.index(name)
        return [r[i] for r in self.rows]

    def row(self, first: str) -> tuple[str, ...] | None:
        """The row whose first cell is `first` (e.g. TOTAL)."""
        for r in self.rows:
            if r[0] == first:
                return r
        return None


def source_label(proto: str | None) -> str:
    """How the report names an OCPP station's source: "OCPP 1.6", "OCPP 2.0.1"."""
    return "OCPP " + proto[4:] if proto and proto.startswith("ocpp") else "OCPP"


@dataclass(frozen=True)
class SigCount:
    """One station's raw messages of the period: stored, and re-verified now.

    stored = verified + failed + unchecked + unsigned. `verified`: signatures that verify
    again (a station's HMAC, or the OCMF signatures of an OCPP frame stored as checked);
    `failed`: a signature that does not, or an OCPP frame that no longer reads; `unsigned`:
    OCPP frames without a checked meter signature (nothing to verify but the frame itself,
    never a failed signature); `ocpp`: the OCPP frames among `stored`, `ocmf` those of
    them whose OCMF signatures verified again."""

    sid: str
    stored: int
    verified: int
    failed: int
    unchecked: int = 0  # no key to check with (a bundle verified without keys)
    ocpp: int = 0
    ocmf: int = 0
    unsigned: int = 0


@dataclass(frozen=True)
class QuarantineCount:
    reason: str
    total: int
    resolved: int  # re-ingested once the station's key was known


@dataclass(frozen=True, kw_only=True)
class Inputs:
    start_ms: int
    end_ms: int
    interval_ms: int
    intervals: Sequence[Record]  # export --by interval of the period
    days: Sequence[Record]  # export --by day of the period
    params: CarbonParams
    sids: Sequence[str] = ()  # stations to show even without a record (the register's)
    signatures: Sequence[SigCount] | None = None  # None: not checked
    quarantine: Sequence[QuarantineCount] | None = None
    register: Sequence[Mapping[str, Any]] | None = None  # None: no register
    register_note: str = ""
    # per station, the starts of the intervals holding one of its telemetry messages or
    # OCPP frames with an energy reading (None: not read; completeness counts records)
    readings: Mapping[str, set[int]] | None = None
    # per station, where its raw messages come from: OWN, or source_label(proto) for an
    # OCPP charger (stations not named: OCPP when a record of it is flagged `ocpp`)
    sources: Mapping[str, str] | None = None


@dataclass
class Report:
    inputs: Inputs
    tables: dict[str, Table] = field(default_factory=dict)
    summary: dict[str, str] = field(default_factory=dict)
    validated: bool = False
    carbon_error: str = ""
    heat: dict[str, Any] = field(default_factory=dict)  # stations x days completeness

    def __getitem__(self, name: str) -> Table:
        return self.tables[name]


def validated(params: CarbonParams) -> bool:
    """Is the parameter set validated? A CarbonParams without the attribute is not."""
    return bool(getattr(params, "validated", False))


def pct(n: int, d: int) -> str:
    """n / d as a percentage with 2 decimals (half up), exactly; "" when d is 0."""
    if d <= 0:
        return ""
    q = (n * 20000 + d) // (2 * d)  # hundredths of a percent, rounded half up
    return f"{q // 100}.{q % 100:02d}"


def side(slot: int) -> str:
    return GRID if slot == 0 else BATTERY


def day_of(ms: int) -> str:
    return iso_ms(ms)[:10]


def interval_starts(start_ms: int, end_ms: int, interval_ms: int) -> list[int]:
    """The interval starts k·I in [start_ms, end_ms) (export's window: start in range)."""
    k0 = -(-start_ms // interval_ms)
    out = []
    t = k0 * interval_ms
    while t < end_ms:
        out.append(t)
        t += interval_ms
    return out


def sources_of(inp: Inputs, sids: Sequence[str]) -> dict[str, str]:
    """Each station's source: OWN or an OCPP label (Inputs.sources, else the records)."""
    given = inp.sources or {}
    flagged = {r.sid for r in inp.intervals if "ocpp" in r.flags}
    return {s: given.get(s) or (source_label(None) if s in flagged else OWN) for s in sids}


def _energy(
    inp: Inputs, sids: list[str], src: Mapping[str, str]
) -> tuple[Table, Table, dict[str, int]]:
    acc: dict[str, list[int]] = {s: [0, 0, 0, 0, 0, 0] for s in sids}
    by_slot: dict[tuple[str, int], list[int]] = {}
    for r in inp.intervals:
        a = acc[r.sid]
        if r.slot == 0:
            a[2] += r.mwh
            a[3] += r.held_mwh
        else:
            a[0] += r.mwh
            a[1] += r.held_mwh
        a[4] += 1
        b = by_slot.setdefault((r.sid, r.slot), [0, 0, 0, 0])
        b[0] += r.mwh
        b[1] += r.held_mwh
        b[2] += 1
        if UNSIGNED in r.flags:
            a[5] += r.mwh
            b[3] += r.mwh
    tot = [sum(a[i] for a in acc.values()) for i in range(6)]
    header = (
        "sid",
        "source",
        "battery_mwh",
        "battery_kwh",
        "battery_held_mwh",
        "grid_mwh",
        "grid_kwh",
        "grid_held_mwh",
        "records",
        "unsigned_mwh",
        "unsigned_kwh",
    )

    def row(name: str, source: str, a: list[int]) -> tuple[str, ...]:
        return (
            name,
            source,
            str(a[0]),
            kwh(a[0]),
            str(a[1]),
            str(a[2]),
            kwh(a[2]),
            str(a[3]),
            str(a[4]),
            str(a[5]),
            kwh(a[5]),
        )

    energy = Table(
        "energy",
        "Energy per station (credited, interval records of the period)",
        header,
        tuple(row(s, src[s], acc[s]) for s in sids) + (row(TOTAL, "", tot),),
        note="Battery side: the slots' registers (slots 1..16; for an OCPP charger, source "
        "OCPP 1.6 or 2.0.1, its connectors' energy registers); grid side: the grid meter "
        "(slot 0). They measure the same energy twice and are never added together. "
        "unsigned: credited energy of records flagged `unsigned` (OCPP readings without a "
        "meter signature checked against the charger's key: the CSMS's receipt is all "
        "that vouches for them), included in the battery figures.",
    )
    slots = Table(
        "energy_by_slot",
        "Energy per station and register stream",
        ("sid", "source", "slot", "side", "mwh", "kwh", "held_mwh", "records", "unsigned_mwh"),
        tuple(
            (s, src[s], str(slot), side(slot), str(b[0]), kwh(b[0]), str(b[1]), str(b[2]))
            + (str(b[3]),)
            for (s, slot), b in sorted(by_slot.items())
        ),
    )
    totals = {
        "battery_mwh": tot[0],
        "battery_held_mwh": tot[1],
        "grid_mwh": tot[2],
        "grid_held_mwh": tot[3],
        "records": tot[4],
        "unsigned_mwh": tot[5],
    }
    return energy, slots, totals


def _daily(inp: Inputs) -> Table:
    acc: dict[tuple[str, str], list[int]] = {}
    for r in inp.days:
        a = acc.setdefault((day_of(r.start_ms), r.sid), [0, 0])
        a[0 if r.slot else 1] += r.mwh
    return Table(
        "daily",
        "Energy per day and station (day records)",
        ("day", "sid", "battery_mwh", "battery_kwh", "grid_mwh", "grid_kwh"),
        tuple(
            (d, s, str(a[0]), kwh(a[0]), str(a[1]), kwh(a[1])) for (d, s), a in sorted(acc.items())
        ),
    )


def _carbon(inp: Inputs, ok: bool) -> tuple[Table, Table, str]:
    mark = "" if ok else NOT_VALIDATED
    header = (
        "sid",
        "vintage",
        "point",
        "records",
        "mwh",
        "kwh",
        "be_tco2",
        "pe_tco2",
        "le_tco2",
        "er_tco2e",
        "params_id",
        "params_version",
        "placeholders",
        "status",
    )
    p = inp.params
    used = Table(
        "parameters",
        f"Carbon parameters: set {p.id} version {p.version}",
        ("parameter", "value", "unit", "effective_from", "effective_to", "placeholder", "source"),
        tuple(
            (
                name,
                v.text,
                _unit(name),
                v.effective_from.isoformat(),
                v.effective_to.isoformat() if v.effective_to else "",
                "yes" if v.placeholder else "",
                v.source,
            )
            for name in sorted(p.params)
            for v in p.params[name]
        ),
        note=(p.notice or "") + ("" if ok else f" ({NOT_VALIDATED})"),
    )
    try:
        aggs = carbon_aggregates(inp.intervals, p)
    except ValueError as e:
        err = f"not computed: {e}"
        return Table("carbon", "Emission reductions", header, (), note=err), used, err
    rows: list[tuple[str, ...]] = []
    tot: dict[tuple[int, str], list[Any]] = {}
    for a in aggs:
        rows.append(
            (
                a.sid,
                str(a.vintage),
                a.point,
                str(a.records),
                str(a.mwh),
                kwh(a.mwh),
                fmt(a.be),
                fmt(a.pe),
                fmt(a.le),
                fmt(a.er),
                a.params_id,
                a.params_version,
                "|".join(a.placeholders),
                mark,
            )
        )
        t = tot.setdefault((a.vintage, a.point), [0, 0, 0, 0, 0, 0, set()])
        for i, x in enumerate((a.records, a.mwh, a.be, a.pe, a.le, a.er)):
            t[i] += x
        t[6].update(a.placeholders)
    for (vintage, point), t in sorted(tot.items()):
        rows.append(
            (
                TOTAL,
                str(vintage),
                point,
                str(t[0]),
                str(t[1]),
                kwh(t[1]),
                fmt(t[2]),
                fmt(t[3]),
                fmt(t[4]),
                fmt(t[5]),
                p.id,
                p.version,
                "|".join(sorted(t[6])),
                mark,
            )
        )
    return (
        Table(
            "carbon",
            "Emission reductions (ER = BE − PE − LE, tCO₂e, per station, vintage and "
            "metering point)",
            header,
            tuple(rows),
            note="Grid-metered and battery-metered results are the same energy seen twice: "
            "read one metering point, never their sum.",
        ),
        used,
        "",
    )


def carbon_aggregates(records: Sequence[Record], params: CarbonParams) -> list[Any]:
    """`carbon.aggregate(carbon.reductions(records, params))`, computed per station, slot
    and UTC day: a reduction is linear in the energy with the parameters of the record's
    day, and the arithmetic is exact (fractions), so summing the energy of a day first
    gives the same tonnes, ~100 times faster for 15-min records; `records` counts the
    records themselves."""
    energy: dict[tuple[str, int, int], int] = {}
    count: Counter[tuple[str, int, str]] = Counter()
    for r in records:
        k = (r.sid, r.slot, r.start_ms // DAY_MS)
        energy[k] = energy.get(k, 0) + r.mwh
        count[(r.sid, int(day_of(r.start_ms)[:4]), side(r.slot))] += 1
    days = [
        make_record(
            "interval", sid, slot, d * DAY_MS, d * DAY_MS + DAY_MS, mwh, 0, (), (0, 0), (0, 0), 0, 0
        )
        for (sid, slot, d), mwh in sorted(energy.items())
    ]
    return [
        replace(a, records=count[(a.sid, a.vintage, a.point)])
        for a in aggregate(reductions(days, params))
    ]


def _unit(name: str) -> str:
    from agent.ledger.carbon import UNITS

    return UNITS.get(name, "")


def _completeness(
    inp: Inputs, sids: list[str], src: Mapping[str, str]
) -> tuple[Table, Table, Table, dict[str, Any]]:
    """Per station: the intervals of the period, those with an interval record, and those
    holding at least one of its signed telemetry messages or, for an OCPP charger, one of
    its frames with an energy reading (a reading). Rule 5 spreads a
    credit over the time between two readings, so an interval inside a hole still gets a
    record (interpolated energy): records say where energy was booked, readings where
    data arrived; completeness, the gaps and the heat map count readings (records when
    the readings were not read)."""
    starts = interval_starts(inp.start_ms, inp.end_ms, inp.interval_ms)
    recs: dict[str, set[int]] = {s: set() for s in sids}
    for r in inp.intervals:
        if "adjustment" not in r.flags:
            recs[r.sid].add(r.start_ms)
    days = sorted({t // DAY_MS for t in starts})
    rows, drows, grows = [], [], []
    heat: dict[str, list[tuple[str, int, int]]] = {}
    n_all = 0
    for s in sids:
        got = recs[s] if inp.readings is None else set(inp.readings.get(s, ()))
        n_rec = sum(1 for t in starts if t in recs[s])
        n = sum(1 for t in starts if t in got)
        n_all += n
        rows.append(
            (
                s,
                src[s],
                str(len(starts)),
                str(n_rec),
                "" if inp.readings is None else str(n),
                str(len(starts) - n),
                pct(n, len(starts)),
            )
        )
        per_day: dict[int, list[int]] = {d: [0, 0] for d in days}
        for t in starts:
            c = per_day[t // DAY_MS]
            c[0] += 1
            c[1] += t in got
        heat[s] = []
        for d in days:
            e, w = per_day[d]
            drows.append((s, day_of(d * DAY_MS), str(e), str(w), pct(w, e)))
            heat[s].append((day_of(d * DAY_MS), e, w))
        run: list[int] = []
        for u in [*starts, None]:
            if u is not None and u not in got:
                run.append(u)
                continue
            if run:
                grows.append((s, iso_ms(run[0]), iso_ms(run[-1] + inp.interval_ms), str(len(run))))
                run = []
    what = (
        "reading (signed telemetry, or an OCPP frame with an energy reading)"
        if inp.readings is not None
        else "record"
    )
    comp = Table(
        "completeness",
        f"Data completeness ({inp.interval_ms // 60000}-min intervals of the period with at "
        f"least one {what})",
        (
            "sid",
            "source",
            "intervals_expected",
            "intervals_with_records",
            "intervals_with_readings",
            "intervals_missing",
            "percent",
        ),
        tuple(rows),
        note="An interval inside a hole in the data still has a record when the energy of "
        "the readings on both sides was spread over it (CONTRACT §6 rule 5): completeness "
        "counts the intervals holding a reading.",
    )
    daily = Table(
        "completeness_daily",
        "Data completeness per station and day",
        ("sid", "day", "intervals_expected", "intervals_with_data", "percent"),
        tuple(drows),
    )
    gaps = Table(
        "gaps",
        f"Gaps: runs of intervals without a {what}",
        ("sid", "from", "to", "intervals"),
        tuple(grows),
    )
    return comp, daily, gaps, {"heat": heat, "days": [day_of(d * DAY_MS) for d in days], "n": n_all}


def _held(inp: Inputs) -> Table:
    acc: dict[tuple[str, int, tuple[str, ...]], list[int]] = {}
    for r in inp.intervals:
        if r.held_mwh:
            a = acc.setdefault((r.sid, r.slot, r.flags), [0, 0])
            a[0] += 1
            a[1] += r.held_mwh
    return Table(
        "held",
        "Held energy (not credited: implausible jumps, CONTRACT §6 rule 6) with the flags "
        "of its records",
        ("sid", "slot", "side", "flags", "records", "held_mwh", "held_kwh"),
        tuple(
            (s, str(slot), side(slot), "|".join(fl), str(a[0]), str(a[1]), kwh(a[1]))
            for (s, slot, fl), a in sorted(acc.items())
        ),
    )


def _adjustments(inp: Inputs) -> Table:
    rows = []
    for r in inp.intervals:
        if "adjustment" in r.flags:
            x = r.extra
            rows.append(
                (
                    r.sid,
                    str(r.slot),
                    iso_ms(r.start_ms),
                    str(r.mwh),
                    kwh(r.mwh),
                    str(r.held_mwh),
                    iso_ms(int(x["locked_until_ms"])) if "locked_until_ms" in x else "",
                    str(x.get("locked_mwh", "")),
                    str(x.get("revised_mwh", "")),
                )
            )
    return Table(
        "adjustments",
        "Adjustments (late messages for a locked period, CONTRACT §6 rule 8)",
        (
            "sid",
            "slot",
            "start",
            "mwh",
            "kwh",
            "held_mwh",
            "locked_until",
            "locked_mwh",
            "revised_mwh",
        ),
        tuple(rows),
    )


def _meter_policy(inp: Inputs) -> Table:
    """Grid-side records the meter register's crediting layer touched (export applies it:
    agent/meters.py): metered against credited energy, per station, policy and flags."""
    acc: dict[tuple[str, str, str, str], list[int]] = {}
    for r in inp.intervals:
        ref = getattr(r, "meter", None)
        if ref is None:
            continue
        mflags = "|".join(f for f in r.flags if f.startswith("meter_"))
        a = acc.setdefault((r.sid, ref.serial, ref.policy, mflags), [0, 0, 0])
        a[0] += 1
        a[1] += ref.metered_mwh
        a[2] += r.mwh
    return Table(
        "meter_policy",
        "Grid meter register: energy metered and credited under the overdue policy",
        (
            "sid",
            "meter_serial",
            "policy",
            "meter_flags",
            "records",
            "metered_mwh",
            "credited_mwh",
            "credited_kwh",
            "not_credited_mwh",
        ),
        tuple(
            (s, ser, pol, fl, str(a[0]), str(a[1]), str(a[2]), kwh(a[2]), str(a[1] - a[2]))
            for (s, ser, pol, fl), a in sorted(acc.items())
        ),
        note="Grid-side energy in the other tables is the credited value. A meter past its "
        "calibration's due date (meter_overdue) or without a calibration in force "
        "(meter_uncalibrated) is credited under the policy: discount (by its accuracy "
        "class), exclude, or none (flag only).",
    )


def _quarantine(q: Sequence[QuarantineCount] | None) -> Table:
    rows = tuple(
        (c.reason, str(c.total), str(c.resolved), str(c.total - c.resolved))
        for c in sorted(q or (), key=lambda c: c.reason)
    )
    tot = sum(c.total for c in q or ())
    res = sum(c.resolved for c in q or ())
    return Table(
        "quarantine",
        "Quarantine by reason (messages received in the period that were not stored)",
        ("reason", "messages", "resolved", "open"),
        rows + ((TOTAL, str(tot), str(res), str(tot - res)),),
        note="" if q is not None else "not read",
    )


def _signatures(sig: Sequence[SigCount] | None, quarantined: int, src: Mapping[str, str]) -> Table:
    def row(sid: str, source: str, c: Sequence[int]) -> tuple[str, ...]:
        return (sid, source, *map(str, c), pct(c[1], c[0]))

    counts = [
        (c.sid, (c.stored, c.verified, c.failed, c.unchecked, c.ocpp, c.ocmf, c.unsigned))
        for c in sorted(sig or (), key=lambda c: c.sid)
    ]
    rows = [row(s, src.get(s, OWN), c) for s, c in counts]
    tot = [sum(c[i] for _s, c in counts) for i in range(7)]
    rows.append(row(TOTAL, "", tot))
    return Table(
        "signatures",
        "Signature coverage (raw messages of the period, signatures verified again)",
        (
            "sid",
            "source",
            "stored",
            "verified",
            "failed",
            "unchecked",
            "ocpp_frames",
            "ocmf_verified",
            "unsigned",
            "percent",
        ),
        tuple(rows),
        note="verified: HMAC signatures of the project's own stations and the OCMF "
        "signatures of OCPP frames (stored as checked against the charger's public key), "
        "verified again; failed: a signature that does not verify, or an OCPP frame that no "
        "longer reads; ocpp_frames: the OCPP frames among the stored messages, of which "
        "ocmf_verified carried meter signatures that verified and unsigned carried none "
        "that was checked (an unsigned frame is not a failed signature: nothing vouches "
        "for it but the CSMS's receipt). percent: verified of stored. Besides these, "
        f"{quarantined} message(s) received in the period were quarantined (see "
        "Quarantine): not stored, never metered.",
    )


REGISTER_COLUMNS = (
    "serial",
    "model",
    "class",
    "calibrated_on",
    "due",
    "certificate",
    "sid",
    "installed_from",
    "status",
    "days_to_due",
    "overdue_days",
)


def _cell(m: Mapping[str, Any], c: str) -> str:
    v = m.get(c)
    if v is None:
        return ""
    if c == "installed_from" and type(v) is int:
        return iso_ms(v)
    return str(v)


def _register(inp: Inputs) -> Table:
    rows = tuple(tuple(_cell(m, c) for c in REGISTER_COLUMNS) for m in inp.register or ())
    note = inp.register_note or ("" if inp.register is not None else "no meter register")
    return Table(
        "meters",
        "Meter register and calibration status (at the end of the period)",
        REGISTER_COLUMNS,
        rows,
        note=note,
    )


def build(inp: Inputs) -> Report:
    """Every table of the report, and its summary (key → value strings)."""
    ok = validated(inp.params)
    sids = sorted(
        {r.sid for r in inp.intervals}
        | {r.sid for r in inp.days}
        | set(inp.sids)
        | {c.sid for c in inp.signatures or ()}
        | set(inp.readings or ())
    )
    rep = Report(inputs=inp, validated=ok)
    src = sources_of(inp, sids)
    energy, by_slot, tot = _energy(inp, sids, src)
    carbon, used, err = _carbon(inp, ok)
    comp, comp_daily, gaps, cinfo = _completeness(inp, sids, src)
    q = _quarantine(inp.quarantine)
    quarantined = sum(c.total for c in inp.quarantine or ())
    for t in (
        energy,
        by_slot,
        _daily(inp),
        carbon,
        used,
        comp,
        comp_daily,
        gaps,
        _held(inp),
        _adjustments(inp),
        _meter_policy(inp),
        q,
        _signatures(inp.signatures, quarantined, src),
        _register(inp),
    ):
        rep.tables[t.name] = t
    rep.carbon_error = err
    rep.heat = cinfo
    expected = len(interval_starts(inp.start_ms, inp.end_ms, inp.interval_ms)) * len(sids)
    er = {r[2]: r[9] for r in carbon.rows if r[0] == TOTAL}
    sig = rep.tables["signatures"].row(TOTAL)
    rep.summary = {
        "period_from": iso_ms(inp.start_ms),
        "period_to": iso_ms(inp.end_ms),
        "stations": str(len(sids)),
        "battery_mwh": str(tot["battery_mwh"]),
        "battery_kwh": kwh(tot["battery_mwh"]),
        "grid_mwh": str(tot["grid_mwh"]),
        "grid_kwh": kwh(tot["grid_mwh"]),
        "held_mwh": str(tot["battery_held_mwh"] + tot["grid_held_mwh"]),
        "interval_records": str(tot["records"]),
        "intervals_expected": str(expected),
        "intervals_with_data": str(cinfo["n"]),
        "completeness_percent": pct(cinfo["n"], expected),
        "er_tco2e_grid_metered": er.get(GRID, ""),
        "er_tco2e_battery_metered": er.get(BATTERY, ""),
        "carbon_params": f"{inp.params.id} {inp.params.version}",
        "carbon_params_status": "validated" if ok else NOT_VALIDATED,
        "signatures_verified": "" if sig is None or inp.signatures is None else sig[3],
        "signatures_stored": "" if sig is None or inp.signatures is None else sig[2],
        "ocpp_stations": str(sum(1 for s in sids if src[s] != OWN)),
        "ocpp_frames": "" if sig is None or inp.signatures is None else sig[6],
        "ocpp_ocmf_verified": "" if sig is None or inp.signatures is None else sig[7],
        "ocpp_unsigned": "" if sig is None or inp.signatures is None else sig[8],
        "unsigned_mwh": str(tot["unsigned_mwh"]),
        "unsigned_kwh": kwh(tot["unsigned_mwh"]),
        "quarantined": str(quarantined) if inp.quarantine is not None else "",
        "adjustments": str(len(rep.tables["adjustments"].rows)),
        "meters": str(len(inp.register)) if inp.register is not None else "",
    }
    rep.tables["summary"] = Table(
        "summary",
        "Summary",
        ("key", "value"),
        tuple(rep.summary.items()),
    )
    return rep


def record_tables_csv(rep: Report) -> dict[str, bytes]:
    """The CSV bytes of the tables made from the records and carbon parameters alone."""
    return {n: rep.tables[n].csv() for n in RECORD_TABLES}


def daily_series(rep: Report) -> tuple[list[str], list[int], list[int]]:
    """(days, battery mWh, grid mWh) over the whole period, a zero where a day has none:
    what the daily chart plots."""
    days = rep.heat["days"]
    bat = dict.fromkeys(days, 0)
    grid = dict.fromkeys(days, 0)
    for d, _sid, b, _bk, g, _gk in rep.tables["daily"].rows:
        if d in bat:
            bat[d] += int(b)
            grid[d] += int(g)
    return days, [bat[d] for d in days], [grid[d] for d in days]
