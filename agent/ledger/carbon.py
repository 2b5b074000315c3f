"""Carbon accounting (CONTRACT §7): emission reductions from metered energy records.

ER = BE - PE - LE per record, aggregated per station, vintage (UTC calendar year) and
metering point. Arithmetic is exact (fractions.Fraction from decimal strings, integer mWh):
the same records and parameters give the same figures everywhere; rounding happens only
when a figure is shown (fmt(), half-even to 6 decimals of a tonne, i.e. grams).

The metering point comes from the record: slot 0 is the grid meter (grid side), slots 1..16
the chargers' battery-side registers. The side not metered is derived with the configured
charger efficiency, and the result says which one was derived. The grid and battery sides
of one station measure the same energy twice: aggregates keep them apart, never summed.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from itertools import pairwise
from pathlib import Path
from typing import Any

from agent.ledger.records import Record

DEFAULT_PATH = Path(__file__).with_name("carbon_params.toml")

# parameter -> unit; the formulas need the first seven
UNITS = {
    "ef_grid": "tCO2/MWh",
    "tdl": "fraction",
    "sec": "kWh/km",
    "fuel_l_per_km": "L/km",
    "fuel_kgco2_per_l": "kgCO2/L",
    "charger_efficiency": "fraction",
    "le_t_per_mwh": "tCO2/MWh",
    "petrol_ef": "tCO2/TJ",
    "petrol_ncv": "TJ/t",
}
REQUIRED = ("ef_grid", "tdl", "sec", "fuel_l_per_km", "fuel_kgco2_per_l", "charger_efficiency")
USED = (*REQUIRED, "le_t_per_mwh")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MWH = 1_000_000_000  # mWh per MWh
KWH = 1_000_000  # mWh per kWh


class CarbonParamsError(ValueError):
    """A parameter file that cannot be used, with a one-line reason."""


@dataclass(frozen=True, kw_only=True)
class ParamValue:
    value: Fraction
    text: str  # the value as written
    effective_from: date
    effective_to: date | None  # exclusive
    source: str
    note: str
    placeholder: bool = False


@dataclass(frozen=True, kw_only=True)
class CarbonParams:
    id: str
    version: str
    title: str
    effective_from: date
    effective_to: date | None
    notice: str
    params: Mapping[str, tuple[ParamValue, ...]]
    path: str = ""
    # the file says its values were validated for a project (`validated = true`); absent:
    # False, and the dashboard marks every figure "example parameters, not validated"
    validated: bool = False

    def value(self, name: str, day: date) -> ParamValue:
        """The value of a parameter in effect on a UTC day (ValueError if none)."""
        if day < self.effective_from or (self.effective_to and day >= self.effective_to):
            raise ValueError(f"parameter set {self.id} v{self.version} is not in effect on {day}")
        for v in self.params.get(name, ()):
            if v.effective_from <= day and (v.effective_to is None or day < v.effective_to):
                return v
        if name == "le_t_per_mwh":
            return _NO_LEAKAGE
        raise ValueError(f"no {name} in effect on {day} in parameter set {self.id} v{self.version}")


_NO_LEAKAGE = ParamValue(
    value=Fraction(0),
    text="0",
    effective_from=date.min,
    effective_to=None,
    source="not configured",
    note="no leakage",
)


def _date(x: Any, what: str) -> date:
    if isinstance(x, date) and not isinstance(x, datetime):
        return x
    if isinstance(x, str):
        try:
            return date.fromisoformat(x)
        except ValueError:
            pass
    raise CarbonParamsError(f"{what}: not a date (YYYY-MM-DD): {x!r}")


def _dec(x: Any, what: str) -> tuple[Fraction, str]:
    if isinstance(x, bool) or not isinstance(x, (str, int, float)):
        raise CarbonParamsError(f"{what}: not a number: {x!r}")
    text = x if isinstance(x, str) else repr(x)  # a TOML float's shortest repr: exact intent
    try:
        return Fraction(text.strip()), text.strip()
    except (ValueError, ZeroDivisionError):
        raise CarbonParamsError(f"{what}: not a decimal number: {x!r}") from None


def load_params(path: str | Path | None = None) -> CarbonParams:
    """Read and check a parameter file (default: the shipped example)."""
    p = Path(path) if path is not None else DEFAULT_PATH
    try:
        with p.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise CarbonParamsError(f"{p}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise CarbonParamsError(f"{p}: not TOML: {e}") from None
    return parse_params(doc, str(p))


def parse_params(doc: Mapping[str, Any], where: str = "<params>") -> CarbonParams:
    def need(d: Mapping[str, Any], key: str, what: str) -> Any:
        if key not in d or d[key] in ("", None):
            raise CarbonParamsError(f"{where}: {what}: missing {key!r}")
        return d[key]

    pid = str(need(doc, "id", "parameter set"))
    version = str(need(doc, "version", "parameter set"))
    eff_from = _date(need(doc, "effective_from", "parameter set"), f"{where}: effective_from")
    eff_to = (
        _date(doc["effective_to"], f"{where}: effective_to") if doc.get("effective_to") else None
    )
    validated = doc.get("validated", False)
    if not isinstance(validated, bool):
        raise CarbonParamsError(f"{where}: validated must be true or false, got {validated!r}")
    raw = doc.get("params")
    if not isinstance(raw, Mapping):
        raise CarbonParamsError(f"{where}: no [params] table")
    params: dict[str, tuple[ParamValue, ...]] = {}
    for name, spec in raw.items():
        what = f"{where}: params.{name}"
        if name not in UNITS:
            raise CarbonParamsError(f"{what}: unknown parameter (known: {', '.join(UNITS)})")
        if not isinstance(spec, Mapping):
            raise CarbonParamsError(f"{what}: not a table")
        unit = need(spec, "unit", what)
        if unit != UNITS[name]:
            raise CarbonParamsError(f"{what}: unit must be {UNITS[name]!r}, got {unit!r}")
        vals = spec.get("values")
        if not isinstance(vals, list) or not vals:
            raise CarbonParamsError(f"{what}: no values")
        out: list[ParamValue] = []
        for i, v in enumerate(vals):
            w = f"{what}.values[{i}]"
            if not isinstance(v, Mapping):
                raise CarbonParamsError(f"{w}: not a table")
            num, text = _dec(need(v, "value", w), w)
            f0 = _date(need(v, "effective_from", w), f"{w}: effective_from")
            f1 = _date(v["effective_to"], f"{w}: effective_to") if v.get("effective_to") else None
            if f1 is not None and f1 <= f0:
                raise CarbonParamsError(f"{w}: effective_to must be after effective_from")
            if name in ("sec", "charger_efficiency") and num <= 0:
                raise CarbonParamsError(f"{w}: {name} must be positive")
            if name == "charger_efficiency" and num > 1:
                raise CarbonParamsError(f"{w}: charger_efficiency is a fraction (0..1]")
            if num < 0:
                raise CarbonParamsError(f"{w}: must not be negative")
            out.append(
                ParamValue(
                    value=num,
                    text=text,
                    effective_from=f0,
                    effective_to=f1,
                    source=str(need(v, "source", w)),
                    note=str(v.get("note", "")),
                    placeholder=bool(v.get("placeholder", False)),
                )
            )
        out.sort(key=lambda x: x.effective_from)
        for a, b in pairwise(out):
            if a.effective_to is None or a.effective_to > b.effective_from:
                raise CarbonParamsError(f"{what}: values overlap in time")
        params[name] = tuple(out)
    for name in REQUIRED:
        if name not in params:
            raise CarbonParamsError(f"{where}: missing parameter {name!r}")
    return CarbonParams(
        id=pid,
        version=version,
        title=str(doc.get("title", "")),
        effective_from=eff_from,
        effective_to=eff_to,
        notice=str(doc.get("notice", "")),
        params=params,
        path=where,
        validated=validated,
    )


@dataclass(frozen=True, kw_only=True)
class Reduction:
    """BE, PE, LE and ER of one record, in tCO2 (exact fractions)."""

    kind: str
    sid: str
    slot: int
    start_ms: int
    end_ms: int
    vintage: int  # UTC calendar year of the record's start
    point: str  # metering point: "grid" (slot 0, the grid meter) or "battery"
    mwh: int  # the record's credited energy
    ec_grid_mwh: Fraction
    ec_batt_kwh: Fraction
    derived: str  # which side was derived from the other, and how
    be: Fraction
    pe: Fraction
    le: Fraction
    er: Fraction
    params_id: str
    params_version: str
    values: Mapping[str, str] = field(default_factory=dict)  # parameter -> value used
    placeholders: tuple[str, ...] = ()  # parameters used that are placeholders


@dataclass(frozen=True, kw_only=True)
class Aggregate:
    """Sum over the records of one station, vintage, metering point and record kind."""

    sid: str
    vintage: int
    point: str
    kind: str
    records: int
    mwh: int
    be: Fraction
    pe: Fraction
    le: Fraction
    er: Fraction
    params_id: str
    params_version: str
    placeholders: tuple[str, ...] = ()


def _day(ms: int) -> date:
    return (_EPOCH + timedelta(milliseconds=ms)).date()


def reduction(r: Record, params: CarbonParams) -> Reduction:
    day = _day(r.start_ms)
    v = {name: params.value(name, day) for name in USED}
    eff = v["charger_efficiency"].value
    if r.slot == 0:
        point = "grid"
        ec_grid = Fraction(r.mwh, MWH)
        ec_batt = Fraction(r.mwh, KWH) * eff
        derived = f"EC_batt derived = EC_grid x charger_efficiency ({v['charger_efficiency'].text})"
    else:
        point = "battery"
        ec_batt = Fraction(r.mwh, KWH)
        ec_grid = Fraction(r.mwh, MWH) / eff
        derived = f"EC_grid derived = EC_batt / charger_efficiency ({v['charger_efficiency'].text})"
    ef_km = v["fuel_l_per_km"].value * v["fuel_kgco2_per_l"].value / 1000  # tCO2/km
    pe = ec_grid * v["ef_grid"].value * (1 + v["tdl"].value)
    be = ec_batt / v["sec"].value * ef_km
    le = ec_batt / 1000 * v["le_t_per_mwh"].value
    return Reduction(
        kind=r.kind,
        sid=r.sid,
        slot=r.slot,
        start_ms=r.start_ms,
        end_ms=r.end_ms,
        vintage=day.year,
        point=point,
        mwh=r.mwh,
        ec_grid_mwh=ec_grid,
        ec_batt_kwh=ec_batt,
        derived=derived,
        be=be,
        pe=pe,
        le=le,
        er=be - pe - le,
        params_id=params.id,
        params_version=params.version,
        values={k: x.text for k, x in v.items()},
        placeholders=tuple(sorted(k for k, x in v.items() if x.placeholder)),
    )


def reductions(records: Iterable[Record], params: CarbonParams) -> list[Reduction]:
    """One Reduction per record (ValueError naming the parameter when one is not in effect
    on a record's day). Pass one kind of record (intervals, days or sessions) at a time
    to aggregate: they overlap."""
    return [reduction(r, params) for r in records]


def aggregate(results: Iterable[Reduction]) -> list[Aggregate]:
    """Sums per (sid, vintage, metering point, kind), sorted by those keys."""
    acc: dict[tuple[str, int, str, str, str, str], list[Any]] = {}
    for x in results:
        k = (x.sid, x.vintage, x.point, x.kind, x.params_id, x.params_version)
        a = acc.get(k)
        if a is None:
            a = acc[k] = [0, 0, Fraction(0), Fraction(0), Fraction(0), set()]
        a[0] += 1
        a[1] += x.mwh
        a[2] += x.be
        a[3] += x.pe
        a[4] += x.le
        a[5].update(x.placeholders)
    return [
        Aggregate(
            sid=k[0],
            vintage=k[1],
            point=k[2],
            kind=k[3],
            records=a[0],
            mwh=a[1],
            be=a[2],
            pe=a[3],
            le=a[4],
            er=a[2] - a[3] - a[4],
            params_id=k[4],
            params_version=k[5],
            placeholders=tuple(sorted(a[5])),
        )
        for k, a in sorted(acc.items())
    ]


def fmt(x: Fraction, places: int = 6) -> str:
    """A fraction as a decimal string, rounded half-even (no binary floats)."""
    scale = 10**places
    n = x * scale
    q, r = divmod(n.numerator, n.denominator)
    # half-even on the remainder r / denominator
    twice = 2 * r
    if twice > n.denominator or (twice == n.denominator and q % 2):
        q += 1
    sign = "-" if q < 0 else ""
    q = abs(q)
    whole, frac = divmod(q, scale)
    return f"{sign}{whole}.{frac:0{places}d}" if places else f"{sign}{whole}"


def as_dict(x: Reduction | Aggregate) -> dict[str, Any]:
    """JSON-ready: fractions as decimal strings (tonnes to 6 places, energy to 6)."""
    out: dict[str, Any] = {}
    for k, val in x.__dict__.items():
        if isinstance(val, Fraction):
            out[k] = fmt(val)
        elif isinstance(val, Mapping):
            out[k] = dict(val)
        elif isinstance(val, tuple):
            out[k] = list(val)
        else:
            out[k] = val
    return out
