"""The grid meter register and its crediting layer (docs/metering.md, "Meter register").

The register says which grid meter (serial, model, accuracy class) was installed at which
station when, and which calibration (date, next due date, certificate) was in force. It
lives in the agent database (tables `meters`, `meter_calibrations`, `meter_installs`,
schema 5) and is kept with `stationctl meter`.

The metering records stay exactly what CONTRACT §6 computes from the signed raw messages
(`stationctl verify` recomputes and compares them unchanged). The register's policy is a
**crediting layer** on top of them, a pure function of (records, register, policy):

- it touches grid-side records only (slot 0, the station's grid meter); a slot's
  battery-side register is the station's own measurement and passes through unchanged;
- the part of a record's [start, end) in which the installed meter was past its
  calibration's due date (flag `meter_overdue`), or had no calibration in force yet
  (flag `meter_uncalibrated`), is credited under the policy: `discount` (the default:
  that part × (1 − accuracy class / 100), rounded down to an integer mWh), `exclude`
  (0) or `none` (flag only);
- the part with no meter installed at the station (flag `meter_unregistered`) is
  credited unchanged;
- a record that straddles a boundary is split by time overlap into integer shares with
  the largest remainder (CONTRACT §6 rule 5: shares sum exactly to the record's mWh, ties
  to the earlier part); each share is credited on its own and rounded down, so the layer
  never creates energy. A negative share (a rule-8 adjustment down) is kept whole under
  every policy: a reduction is never reduced.

Dates are UTC days: a calibration is in force from 00:00 UTC of `calibrated_on` and a
meter is in calibration through the whole of its `next_due` day; it is overdue from
00:00 UTC of the day after, until a later calibration's `calibrated_on`. Interval and day
records never straddle a due date (intervals divide a day).

With an empty register (a deployment that does not use it) the layer changes nothing:
`apply_policy` returns every record with its own mWh and flags and `meter` None.

Functions for other commands (the monitoring report, the bundle): `load_register`,
`register_status`, `apply_policy`, `credit`, `Register.as_dict`, `check_alarms`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from fractions import Fraction
from typing import Any, Final

from agent.ledger.records import DAY_MS, Record

POLICIES: Final = ("discount", "exclude", "none")
DEFAULT_POLICY: Final = "discount"

FLAG_OVERDUE: Final = "meter_overdue"
FLAG_UNCALIBRATED: Final = "meter_uncalibrated"
FLAG_UNREGISTERED: Final = "meter_unregistered"
METER_FLAGS: Final = (FLAG_OVERDUE, FLAG_UNCALIBRATED, FLAG_UNREGISTERED)

GRID_SLOT: Final = 0
REGISTER_SCHEMA: Final = 5  # the store's schema version that has the register
DUE_SOON_DAYS: Final = 30  # meter_due_soon this many days ahead
CRIT_AFTER_DAYS: Final = 30  # meter_overdue is crit beyond this many days overdue

# states of a span of time at a station
OK: Final = "ok"
OVERDUE: Final = "overdue"
UNCALIBRATED: Final = "uncalibrated"
UNREGISTERED: Final = "unregistered"
DUE_SOON: Final = "due_soon"

SERIAL_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:/-]{0,63}$")
CLASS_RE: Final = re.compile(r"^\d{1,2}(\.\d{1,3})?$")
_DATE_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class RegisterError(ValueError):
    """A bad register entry or change (one line, naming what is wrong)."""


# ---- the register ------------------------------------------------------------------------


@dataclass(frozen=True)
class Meter:
    serial: str
    model: str
    accuracy_class: str  # decimal text, % (IEC / MID class), e.g. "1.0"
    added_ms: int
    note: str = ""


@dataclass(frozen=True)
class Calibration:
    serial: str
    calibrated_on: str  # YYYY-MM-DD (UTC day): in force from its 00:00 UTC
    next_due: str  # YYYY-MM-DD: in calibration through this whole day
    certificate: str
    at_ms: int  # when it was entered

    @property
    def start_ms(self) -> int:
        return day_ms(self.calibrated_on)

    @property
    def overdue_ms(self) -> int:
        """The first ms the meter is past this calibration's due date."""
        return day_ms(self.next_due) + DAY_MS


@dataclass(frozen=True)
class Install:
    serial: str
    sid: str
    from_ms: int
    to_ms: int | None  # None: still installed
    by: str
    at_ms: int


@dataclass(frozen=True)
class Register:
    """The whole register (small: one row per meter, calibration and installation)."""

    meters: Mapping[str, Meter] = field(default_factory=dict)
    calibrations: Mapping[str, tuple[Calibration, ...]] = field(default_factory=dict)
    installs: tuple[Install, ...] = ()

    @property
    def empty(self) -> bool:
        """No meter registered: the deployment does not use the register."""
        return not self.meters

    def calibrations_of(self, serial: str) -> tuple[Calibration, ...]:
        """A meter's calibrations, oldest first."""
        return self.calibrations.get(serial, ())

    def calibration_at(self, serial: str, t_ms: int) -> Calibration | None:
        """The calibration in force at t_ms: the latest whose calibrated_on day has begun."""
        best = None
        for c in self.calibrations_of(serial):
            if c.start_ms <= t_ms:
                best = c
        return best

    def installs_of(self, sid: str) -> list[Install]:
        return sorted((i for i in self.installs if i.sid == sid), key=lambda i: i.from_ms)

    def installed_at(self, sid: str, t_ms: int) -> Install | None:
        for i in self.installs_of(sid):
            if i.from_ms <= t_ms and (i.to_ms is None or t_ms < i.to_ms):
                return i
        return None

    def current_install(self, serial: str) -> Install | None:
        """The serial's open installation (to_ms None), if any."""
        for i in self.installs:
            if i.serial == serial and i.to_ms is None:
                return i
        return None

    def as_dict(self) -> dict[str, Any]:
        """The register as JSON-ready data, in a fixed order (the bundle's copy)."""
        return {
            "meters": [
                {
                    "serial": m.serial,
                    "model": m.model,
                    "accuracy_class": m.accuracy_class,
                    "added_ms": m.added_ms,
                    "note": m.note,
                    "calibrations": [
                        {
                            "calibrated_on": c.calibrated_on,
                            "next_due": c.next_due,
                            "certificate": c.certificate,
                            "at_ms": c.at_ms,
                        }
                        for c in self.calibrations_of(m.serial)
                    ],
                }
                for m in sorted(self.meters.values(), key=lambda m: m.serial)
            ],
            "installs": [
                {
                    "serial": i.serial,
                    "sid": i.sid,
                    "from_ms": i.from_ms,
                    "to_ms": i.to_ms,
                    "by": i.by,
                    "at_ms": i.at_ms,
                }
                for i in sorted(self.installs, key=lambda i: (i.sid, i.from_ms, i.serial))
            ],
        }

    def digest(self) -> str:
        """sha256 (first 16 hex) of `as_dict()` in canonical JSON: names the register state
        a credited record was computed with ("" for an empty register)."""
        if self.empty:
            return ""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- dates and values --------------------------------------------------------------------


def day_ms(text: str) -> int:
    """YYYY-MM-DD (a UTC day) -> Unix ms of its 00:00 UTC; RegisterError when not a date."""
    if not _DATE_RE.match(text):
        raise RegisterError(f"not a date (YYYY-MM-DD): {text!r}")
    try:
        d = date.fromisoformat(text)
    except ValueError as e:
        raise RegisterError(f"bad date {text!r}: {e}") from None
    return (d - date(1970, 1, 1)).days * DAY_MS


def day_text(ms: int) -> str:
    """Unix ms -> the UTC day holding it, YYYY-MM-DD."""
    return datetime.fromtimestamp(ms // DAY_MS * 86_400, UTC).date().isoformat()


def check_class(text: str) -> Fraction:
    """An accuracy class (decimal text, percent, above 0 and at most 10) as a Fraction."""
    if not CLASS_RE.match(text):
        raise RegisterError(f"accuracy class must be a decimal percentage like 1.0, not {text!r}")
    c = Fraction(text)
    if not 0 < c <= 10:
        raise RegisterError(f"accuracy class {text} is outside 0 < class <= 10 (percent)")
    return c


def check_serial(text: str) -> str:
    if not SERIAL_RE.match(text):
        raise RegisterError(
            f"meter serial {text!r}: letters, digits and . : / - only (1..64, no space)"
        )
    return text


def check_policy(name: str) -> str:
    if name not in POLICIES:
        raise RegisterError(f"overdue policy must be one of {', '.join(POLICIES)}, not {name!r}")
    return name


# ---- the crediting layer (pure) ------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A piece of time at a station with one register state."""

    start_ms: int
    end_ms: int
    state: str  # OK | OVERDUE | UNCALIBRATED | UNREGISTERED
    install: Install | None
    calibration: Calibration | None


def spans(register: Register, sid: str, start_ms: int, end_ms: int) -> list[Span]:
    """[start_ms, end_ms) at station `sid` cut where the installed meter or its calibration
    state changes, in time order (one point span when end_ms <= start_ms)."""
    if end_ms <= start_ms:
        return [_state_at(register, sid, start_ms, start_ms, start_ms)]
    cuts = {start_ms, end_ms}
    for i in register.installs_of(sid):
        for t in (i.from_ms, i.to_ms):
            if t is not None and start_ms < t < end_ms:
                cuts.add(t)
        for c in register.calibrations_of(i.serial):
            for t in (c.start_ms, c.overdue_ms):
                if start_ms < t < end_ms:
                    cuts.add(t)
    edges = sorted(cuts)
    out: list[Span] = []
    for a, b in zip(edges, edges[1:], strict=False):
        s = _state_at(register, sid, a, a, b)
        if out and (out[-1].state, out[-1].install, out[-1].calibration) == (
            s.state,
            s.install,
            s.calibration,
        ):
            out[-1] = Span(out[-1].start_ms, b, s.state, s.install, s.calibration)
        else:
            out.append(s)
    return out


def _state_at(register: Register, sid: str, t: int, a: int, b: int) -> Span:
    inst = register.installed_at(sid, t)
    if inst is None:
        return Span(a, b, UNREGISTERED, None, None)
    cal = register.calibration_at(inst.serial, t)
    if cal is None:
        return Span(a, b, UNCALIBRATED, inst, None)
    state = OVERDUE if t >= cal.overdue_ms else OK
    return Span(a, b, state, inst, cal)


def shares(total: int, weights: Sequence[int]) -> list[int]:
    """`total` split in proportion to `weights` (>= 0, not all 0) into integers that sum
    exactly to it: largest remainder, ties to the earlier part (CONTRACT §6 rule 5)."""
    w = sum(weights)
    if w <= 0:
        raise ValueError("weights must have a positive sum")
    sign = -1 if total < 0 else 1
    t = abs(total)
    base = [t * x // w for x in weights]
    rem = [t * x % w for x in weights]
    left = t - sum(base)
    order = sorted(range(len(weights)), key=lambda i: (-rem[i], i))
    for i in order[:left]:
        base[i] += 1
    return [sign * x for x in base]


def credit_share(mwh: int, state: str, policy: str, accuracy_class: str | None) -> int:
    """One share's credited mWh: a share in an overdue or uncalibrated span under
    `policy`; any other share (and any negative share) unchanged."""
    if mwh <= 0 or state not in (OVERDUE, UNCALIBRATED) or policy == "none":
        return mwh
    if policy == "exclude":
        return 0
    if accuracy_class is None:  # not reachable: a span with a meter has its class
        return 0
    c = Fraction(accuracy_class)
    return int(mwh * (1 - c / 100) // 1)  # floor: never more than was metered


@dataclass(frozen=True)
class MeterRef:
    """What a credited record says about the meter(s) and policy behind it (several
    meters in one record, a swap inside it: their values joined by "|", in time order)."""

    serial: str
    accuracy_class: str
    due: str  # next_due of the calibration in force ("" when none)
    policy: str
    metered_mwh: int  # the record's mwh before the policy
    register: str  # Register.digest(): the register state used

    def as_dict(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "class": self.accuracy_class,
            "due": self.due,
            "policy": self.policy,
            "metered_mwh": self.metered_mwh,
            "register": self.register,
        }


@dataclass(frozen=True, kw_only=True)
class CreditedRecord(Record):
    """A Record after the crediting layer: `mwh` is the credited value and `flags` include
    the layer's; `metered_mwh` is the stored (CONTRACT §6) value; `meter` None for a record
    the layer does not touch (battery side, or an empty register); `policy` the policy
    name applied ("" when untouched)."""

    metered_mwh: int = 0
    meter: MeterRef | None = None
    policy: str = ""


def credit(
    record: Record, register: Register, policy: str = DEFAULT_POLICY, *, digest: str | None = None
) -> CreditedRecord:
    """One record through the layer (see the module's docstring). `digest`: the register's
    digest when the caller has it (apply_policy computes it once)."""
    check_policy(policy)
    base = {f: getattr(record, f) for f in _RECORD_FIELDS}
    if register.empty or record.slot != GRID_SLOT:
        return CreditedRecord(**base, metered_mwh=record.mwh, meter=None, policy="")
    parts = spans(register, record.sid, record.start_ms, record.end_ms)
    if len(parts) == 1:
        split = [record.mwh]
    else:
        split = shares(record.mwh, [p.end_ms - p.start_ms for p in parts])
    credited = 0
    flags = set(record.flags)
    for p, m in zip(parts, split, strict=True):
        cls = register.meters[p.install.serial].accuracy_class if p.install else None
        credited += credit_share(m, p.state, policy, cls)
        if p.state == OVERDUE:
            flags.add(FLAG_OVERDUE)
        elif p.state == UNCALIBRATED:
            flags.add(FLAG_UNCALIBRATED)
        elif p.state == UNREGISTERED:
            flags.add(FLAG_UNREGISTERED)
    serials: list[str] = []
    classes: list[str] = []
    dues: list[str] = []
    for p in parts:
        if p.install is None:
            continue
        due = p.calibration.next_due if p.calibration else ""
        key = (p.install.serial, due)
        if serials and (serials[-1], dues[-1]) == key:
            continue
        serials.append(p.install.serial)
        classes.append(register.meters[p.install.serial].accuracy_class)
        dues.append(due)
    ref = MeterRef(
        serial="|".join(serials),
        accuracy_class="|".join(classes),
        due="|".join(dues),
        policy=policy,
        metered_mwh=record.mwh,
        register=register.digest() if digest is None else digest,
    )
    base["mwh"] = credited
    base["flags"] = tuple(sorted(flags))
    return CreditedRecord(**base, metered_mwh=record.mwh, meter=ref, policy=policy)


_RECORD_FIELDS: Final = (
    "kind",
    "sid",
    "slot",
    "start_ms",
    "end_ms",
    "mwh",
    "held_mwh",
    "flags",
    "from_key",
    "to_key",
    "e_from",
    "e_to",
    "version",
    "extra",
)


def apply_policy(
    records: Iterable[Record], register: Register, policy: str = DEFAULT_POLICY
) -> list[CreditedRecord]:
    """Every record through the crediting layer, in the order given: grid-side records
    (slot 0) credited under `policy` ("discount" | "exclude" | "none") with the layer's
    flags and a `meter` reference; battery-side records, and every record when the
    register is empty, unchanged (`meter` None). Pure: the same records, register and
    policy give the same result."""
    check_policy(policy)
    digest = register.digest()
    return [credit(r, register, policy, digest=digest) for r in records]


# ---- status ---------------------------------------------------------------------------------


def meter_status(register: Register, serial: str, at_ms: int) -> dict[str, Any]:
    """One meter's calibration status at `at_ms`: status ok | due_soon (due within
    DUE_SOON_DAYS) | overdue | uncalibrated (no calibration begun yet), days_to_due
    (negative when overdue), overdue_days (0 unless overdue)."""
    m = register.meters[serial]
    cal = register.calibration_at(serial, at_ms)
    placed = None  # its installation at `at_ms`
    for i in register.installs:
        if i.serial == serial and i.from_ms <= at_ms and (i.to_ms is None or at_ms < i.to_ms):
            placed = i
    if cal is None:
        status, days_to_due, overdue_days = UNCALIBRATED, None, 0
    else:
        today = at_ms // DAY_MS
        due_day = day_ms(cal.next_due) // DAY_MS
        days_to_due = due_day - today
        if at_ms >= cal.overdue_ms:
            status, overdue_days = OVERDUE, today - due_day
        elif days_to_due <= DUE_SOON_DAYS:
            status, overdue_days = DUE_SOON, 0
        else:
            status, overdue_days = OK, 0
    return {
        "serial": serial,
        "model": m.model,
        "class": m.accuracy_class,
        "calibrated_on": cal.calibrated_on if cal else None,
        "due": cal.next_due if cal else None,
        "certificate": cal.certificate if cal else None,
        "sid": placed.sid if placed else None,
        "installed_from": placed.from_ms if placed else None,
        "installed_by": placed.by if placed else None,
        "status": status,
        "days_to_due": days_to_due,
        "overdue_days": overdue_days,
        "note": m.note,
    }


def register_status(store: Any, at_ms: int) -> list[dict[str, Any]]:
    """Every registered meter's status at `at_ms`, by serial: serial, model, class,
    calibrated_on, due, certificate (the calibration in force), sid and installed_from
    (ms; None when not installed at `at_ms`), installed_by, status (ok | due_soon |
    overdue | uncalibrated), days_to_due, overdue_days, note. Reads only."""
    reg = load_register(store)
    return [meter_status(reg, s, at_ms) for s in sorted(reg.meters)]


# ---- the store -----------------------------------------------------------------------------


def load_register(store: Any) -> Register:
    """The register from an agent database (a Store). Reads only. A database from before
    schema 5 (opened read-only by an older-schema reader) has no register: empty."""
    have = store.schema_version()
    if have is None or have < REGISTER_SCHEMA:
        return Register()
    db = store.db
    meters = {
        r[0]: Meter(str(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]))
        for r in db.execute(
            "SELECT serial, model, accuracy_class, added_ms, note FROM meters ORDER BY serial"
        ).fetchall()
    }
    cals: dict[str, list[Calibration]] = {}
    for r in db.execute(
        "SELECT serial, calibrated_on, next_due, certificate, at_ms FROM meter_calibrations "
        "ORDER BY serial, calibrated_on"
    ).fetchall():
        cals.setdefault(str(r[0]), []).append(
            Calibration(str(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]))
        )
    installs = tuple(
        Install(str(r[0]), str(r[1]), int(r[2]), None if r[3] is None else int(r[3]), r[4], r[5])
        for r in db.execute(
            "SELECT serial, sid, from_ms, to_ms, by_name, at_ms FROM meter_installs "
            "ORDER BY sid, from_ms, serial"
        ).fetchall()
    )
    return Register(meters, {k: tuple(v) for k, v in cals.items()}, installs)


def add_meter(
    store: Any,
    *,
    serial: str,
    model: str,
    accuracy_class: str,
    calibrated_on: str,
    next_due: str,
    certificate: str,
    note: str = "",
    at_ms: int,
) -> None:
    """A new meter with its first calibration (RegisterError when it exists or is bad)."""
    check_serial(serial)
    check_class(accuracy_class)
    if not model.strip():
        raise RegisterError("--model is empty")
    _check_calibration(calibrated_on, next_due, certificate)
    with store.transaction() as db:
        if db.execute("SELECT 1 FROM meters WHERE serial = ?", (serial,)).fetchone():
            raise RegisterError(f"meter {serial} is already registered")
        db.execute(
            "INSERT INTO meters (serial, model, accuracy_class, added_ms, note) "
            "VALUES (?, ?, ?, ?, ?)",
            (serial, model.strip(), accuracy_class, at_ms, note),
        )
        db.execute(
            "INSERT INTO meter_calibrations (serial, calibrated_on, next_due, certificate, "
            "at_ms) VALUES (?, ?, ?, ?, ?)",
            (serial, calibrated_on, next_due, certificate, at_ms),
        )


def _check_calibration(calibrated_on: str, next_due: str, certificate: str) -> None:
    if day_ms(next_due) <= day_ms(calibrated_on):
        raise RegisterError(f"due date {next_due} is not after calibration date {calibrated_on}")
    if not certificate.strip():
        raise RegisterError("--certificate is empty")


def calibrate(
    store: Any, *, serial: str, calibrated_on: str, next_due: str, certificate: str, at_ms: int
) -> None:
    """A new calibration of a registered meter, kept beside the earlier ones: in force from
    its calibrated_on day (it must be later than every earlier calibration's)."""
    _check_calibration(calibrated_on, next_due, certificate)
    with store.transaction() as db:
        if not db.execute("SELECT 1 FROM meters WHERE serial = ?", (serial,)).fetchone():
            raise RegisterError(f"no meter {serial} in the register")
        last = db.execute(
            "SELECT MAX(calibrated_on) FROM meter_calibrations WHERE serial = ?", (serial,)
        ).fetchone()[0]
        if last is not None and calibrated_on <= str(last):
            raise RegisterError(
                f"meter {serial} already has a calibration of {last}: a new one must be later"
            )
        db.execute(
            "INSERT INTO meter_calibrations (serial, calibrated_on, next_due, certificate, "
            "at_ms) VALUES (?, ?, ?, ?, ?)",
            (serial, calibrated_on, next_due, certificate, at_ms),
        )


def install(store: Any, *, serial: str, sid: str, from_ms: int, by: str, at_ms: int) -> list[str]:
    """Install `serial` as `sid`'s grid meter from `from_ms`: the serial's open
    installation elsewhere and the station's open grid meter are closed at `from_ms`.
    Refused when it would overlap a closed installation of either. Returns what it closed
    (one line each)."""
    closed: list[str] = []
    with store.transaction() as db:
        if not db.execute("SELECT 1 FROM meters WHERE serial = ?", (serial,)).fetchone():
            raise RegisterError(f"no meter {serial} in the register")
        rows = db.execute(
            "SELECT serial, sid, from_ms, to_ms FROM meter_installs WHERE serial = ? OR sid = ? "
            "ORDER BY from_ms",
            (serial, sid),
        ).fetchall()
        for s, station, f, t in rows:
            if f >= from_ms or (t is not None and t > from_ms):
                raise RegisterError(
                    f"meter {s} at {station} from {_iso(f)}"
                    + (f" to {_iso(t)}" if t is not None else "")
                    + f" overlaps an installation from {_iso(from_ms)}"
                )
        for s, station, f, t in rows:
            if t is None:
                db.execute(
                    "UPDATE meter_installs SET to_ms = ? WHERE serial = ? AND sid = ? "
                    "AND from_ms = ?",
                    (from_ms, s, station, f),
                )
                closed.append(f"closed: meter {s} at {station} from {_iso(f)} to {_iso(from_ms)}")
        db.execute(
            "INSERT INTO meter_installs (serial, sid, from_ms, to_ms, by_name, at_ms) "
            "VALUES (?, ?, ?, NULL, ?, ?)",
            (serial, sid, from_ms, by, at_ms),
        )
    return closed


def remove(store: Any, *, serial: str, at: int) -> str:
    """Close the serial's open installation at `at` (ms); returns its station."""
    with store.transaction() as db:
        row = db.execute(
            "SELECT sid, from_ms FROM meter_installs WHERE serial = ? AND to_ms IS NULL",
            (serial,),
        ).fetchone()
        if row is None:
            raise RegisterError(f"meter {serial} is not installed anywhere")
        sid, f = str(row[0]), int(row[1])
        if at <= f:
            raise RegisterError(
                f"meter {serial} was installed at {sid} from {_iso(f)}: remove after it"
            )
        db.execute(
            "UPDATE meter_installs SET to_ms = ? WHERE serial = ? AND sid = ? AND from_ms = ?",
            (at, serial, sid, f),
        )
    return sid


def _iso(ms: int) -> str:
    from agent.ledger.export import iso_ms

    return iso_ms(ms)


# ---- alarms ---------------------------------------------------------------------------------

ALARM_OVERDUE: Final = "meter_overdue"
ALARM_DUE_SOON: Final = "meter_due_soon"


def check_alarms(
    store: Any, at_ms: int, policy: str = DEFAULT_POLICY
) -> list[tuple[str, str, str, str]]:
    """Alarms for installed meters at `at_ms`: `meter_overdue` (warn; crit beyond
    CRIT_AFTER_DAYS overdue) and `meter_due_soon` (warn, due within DUE_SOON_DAYS), each
    naming serial, station and due date, at most once per meter and code per UTC day (the
    alarms table is the memory: a restart, or a second agent, does not repeat one). The
    rows are written with ts_ms = at_ms, in one transaction. Returns the alarms added as
    (sid, code, level, detail)."""
    reg = load_register(store)
    if reg.empty:
        return []
    day0 = at_ms // DAY_MS * DAY_MS
    want: list[tuple[str, str, str, str]] = []
    for serial in sorted(reg.meters):
        st = meter_status(reg, serial, at_ms)
        sid = st["sid"]
        if sid is None:
            continue
        head = f"meter {serial} at {sid}: "
        if st["status"] == OVERDUE:
            level = "crit" if st["overdue_days"] > CRIT_AFTER_DAYS else "warn"
            detail = (
                f"{head}calibration due {st['due']}, overdue {st['overdue_days']} day(s) "
                f"(certificate {st['certificate']}); its energy is credited under policy "
                f"{policy!r}"
            )
            want.append((sid, ALARM_OVERDUE, level, detail))
        elif st["status"] == UNCALIBRATED:
            want.append((sid, ALARM_OVERDUE, "warn", f"{head}no calibration in force"))
        elif st["status"] == DUE_SOON:
            detail = f"{head}calibration due {st['due']}, in {st['days_to_due']} day(s)"
            want.append((sid, ALARM_DUE_SOON, "warn", detail))
    added: list[tuple[str, str, str, str]] = []
    if not want:
        return added
    with store.transaction() as db:
        if getattr(store, "engine", "") == "postgresql":  # agents sharing one database
            db.execute("SELECT pg_advisory_xact_lock(7262005)")
        for sid, code, level, detail in want:
            head = detail.split(": ", 1)[0] + ": "
            seen = db.execute(
                "SELECT 1 FROM alarms WHERE code = ? AND sid = ? AND ts_ms >= ? AND ts_ms < ? "
                "AND substr(detail, 1, ?) = ? LIMIT 1",
                (code, sid, day0, day0 + DAY_MS, len(head), head),
            ).fetchone()
            if seen:
                continue
            db.execute(
                "INSERT INTO alarms (ts_ms, sid, code, level, detail) VALUES (?, ?, ?, ?, ?)",
                (at_ms, sid, code, level, detail),
            )
            added.append((sid, code, level, detail))
    return added
