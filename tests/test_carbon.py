"""Carbon accounting (CONTRACT §7): the shipped parameters, exact figures, aggregation."""

from __future__ import annotations

from datetime import date
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from agent.ledger import Record
from agent.ledger.carbon import (
    CarbonParamsError,
    aggregate,
    as_dict,
    fmt,
    load_params,
    parse_params,
    reductions,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
YEAR_MS = 365 * 86_400_000


def rec(slot: int, mwh: int, start: int = T0, sid: str = "KH-A-0001") -> Record:
    return Record(
        kind="interval",
        sid=sid,
        slot=slot,
        start_ms=start,
        end_ms=start + 900_000,
        mwh=mwh,
        held_mwh=0,
        flags=(),
        from_key=(1, 0),
        to_key=(1, 1),
        e_from=0,
        e_to=mwh,
        version="m1",
    )


def test_shipped_parameters_are_labelled_and_sourced() -> None:
    p = load_params()
    assert (p.id, p.version) == ("example-kh", "2026.1")
    assert "none independently verified" in p.notice
    for name, values in p.params.items():
        for v in values:
            assert v.source, name
            assert (
                v.placeholder
                or "not independently verified" in v.note.lower()
                or "not a measured value" in v.note.lower()
            ), name
    assert p.value("ef_grid", date(2026, 1, 1)).value == Fraction("0.588")
    assert p.value("tdl", date(2026, 1, 1)).placeholder


def test_battery_side_record_hand_worked() -> None:
    [x] = reductions([rec(1, 1_000_000)], load_params())  # 1 kWh into a battery
    assert x.point == "battery" and "EC_grid derived" in x.derived and "0.90" in x.derived
    assert x.ec_batt_kwh == 1 and x.ec_grid_mwh == Fraction(1, 900)
    # BE = 1 kWh / 0.030 kWh/km x (0.035 L/km x 2.3 kg/L / 1000) = 161/60000 t
    assert x.be == Fraction(161, 60000)
    # PE = (1/900 MWh) x 0.588 t/MWh x (1 + 0) = 49/75000 t
    assert x.pe == Fraction(49, 75000)
    assert x.er == Fraction(609, 300000) and fmt(x.er) == "0.002030"
    assert (x.params_id, x.params_version, x.vintage) == ("example-kh", "2026.1", 2026)
    assert x.placeholders == ("le_t_per_mwh", "tdl")
    assert x.values["sec"] == "0.030"


def test_grid_side_record_hand_worked() -> None:
    [x] = reductions([rec(0, 1_000_000)], load_params())  # 1 kWh from the grid meter
    assert x.point == "grid" and "EC_batt derived" in x.derived
    assert x.pe == Fraction("0.000588")
    assert x.be == Fraction("0.9") / Fraction("0.03") * Fraction("0.0000805")
    assert fmt(x.er) == "0.001827"


def test_aggregates_per_station_vintage_and_point_never_mixing_sides() -> None:
    p = load_params()
    recs = [
        rec(1, 500_000),
        rec(2, 500_000),
        rec(0, 1_100_000),
        rec(1, 1_000_000, start=T0 + YEAR_MS),
        rec(1, 7, sid="KH-B-0002"),
    ]
    ag = aggregate(reductions(recs, p))
    assert [(a.sid, a.vintage, a.point, a.records, a.mwh) for a in ag] == [
        ("KH-A-0001", 2026, "battery", 2, 1_000_000),
        ("KH-A-0001", 2026, "grid", 1, 1_100_000),
        ("KH-A-0001", 2027, "battery", 1, 1_000_000),
        ("KH-B-0002", 2026, "battery", 1, 7),
    ]
    assert ag[0].er == Fraction(609, 300000)  # summed exactly, rounded only when shown
    assert ag[0].placeholders == ("le_t_per_mwh", "tdl")
    d = as_dict(ag[0])
    assert d["er"] == "0.002030" and d["params_id"] == "example-kh"


def doc(**over: Any) -> dict[str, Any]:
    def one(value: str, **kw: Any) -> dict[str, Any]:
        return {"values": [{"value": value, "effective_from": "2020-01-01", "source": "s", **kw}]}

    d: dict[str, Any] = {
        "id": "t",
        "version": "1",
        "effective_from": "2020-01-01",
        "params": {
            "ef_grid": {"unit": "tCO2/MWh", **one("0.5")},
            "tdl": {"unit": "fraction", **one("0.1")},
            "sec": {"unit": "kWh/km", **one("0.02")},
            "fuel_l_per_km": {"unit": "L/km", **one("0.04")},
            "fuel_kgco2_per_l": {"unit": "kgCO2/L", **one("2.0")},
            "charger_efficiency": {"unit": "fraction", **one("0.8")},
        },
    }
    d.update(over)
    return d


def test_values_follow_their_effective_dates() -> None:
    d = doc()
    d["params"]["ef_grid"]["values"] = [
        {
            "value": "0.5",
            "effective_from": "2020-01-01",
            "effective_to": "2027-01-01",
            "source": "a",
        },
        {"value": "0.4", "effective_from": "2027-01-01", "source": "b"},
    ]
    p = parse_params(d)
    a, b = reductions([rec(0, 10**9), rec(0, 10**9, start=T0 + YEAR_MS)], p)
    assert a.pe == Fraction("0.5") * Fraction("1.1") and b.pe == Fraction("0.4") * Fraction("1.1")
    assert a.le == 0 and a.values["le_t_per_mwh"] == "0"
    with pytest.raises(ValueError, match="not in effect"):
        reductions([rec(0, 1, start=0)], p)  # 1970: before the set's effective_from


@pytest.mark.parametrize(
    "change, msg",
    [
        (lambda d: d["params"]["sec"].update(unit="Wh/km"), "unit must be"),
        (lambda d: d["params"].pop("tdl"), "missing parameter 'tdl'"),
        (lambda d: d["params"]["sec"]["values"][0].update(value="zero"), "not a decimal"),
        (lambda d: d["params"]["sec"]["values"][0].pop("source"), "missing 'source'"),
        (lambda d: d["params"]["charger_efficiency"]["values"][0].update(value="1.2"), "fraction"),
        (lambda d: d["params"].update(co2={"unit": "t"}), "unknown parameter"),
        (
            lambda d: d["params"]["tdl"]["values"].append(
                {"value": "0.2", "effective_from": "2021-01-01", "source": "x"}
            ),
            "overlap",
        ),
        (lambda d: d.pop("version"), "missing 'version'"),
    ],
)
def test_bad_parameter_files_are_refused_with_a_reason(change: Any, msg: str) -> None:
    d = doc()
    change(d)
    with pytest.raises(CarbonParamsError, match=msg):
        parse_params(d)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CarbonParamsError, match="No such file"):
        load_params(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("id = [")
    with pytest.raises(CarbonParamsError, match="not TOML"):
        load_params(bad)
    ok = tmp_path / "ok.toml"
    ok.write_text(
        Path(load_params().path).read_text().replace('version = "2026.1"', 'version = "2026.2"')
    )
    assert load_params(ok).version == "2026.2"


def test_fmt_rounds_half_even_without_floats() -> None:
    assert fmt(Fraction(1, 3)) == "0.333333"
    assert fmt(Fraction(2, 3)) == "0.666667"
    assert fmt(Fraction(5, 10**7)) == "0.000000"  # half to even (0)
    assert fmt(Fraction(15, 10**7)) == "0.000002"  # half to even (2)
    assert fmt(Fraction(-1234567891, 10**9)) == "-1.234568"
    assert fmt(Fraction(-5, 10**7)) == "0.000000"
    assert fmt(Fraction(7, 2), 0) == "4"
