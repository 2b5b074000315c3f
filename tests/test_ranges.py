"""agent/ranges.py: CONTRACT §2 ranges and §6.9 (a bad field spoils only its source)."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ranges import MAX_DEPTH, U53, WH_MAX, clean, depth


def telemetry() -> dict[str, Any]:
    return {
        "v": 1, "sid": "KH-PNH-0001", "kid": 1, "boot": 3, "seq": 7, "up": 5000,
        "meter": {"e_wh": 1234, "p_w": 2150, "sn": 12345678},
        "slots": [
            {"n": 1, "st": "C", "mv": 67200, "ma": 15250, "e_mwh": 9876, "b_mwh": 9000,
             "bat": {"id": "B0012345", "soc": 532, "soh": 981, "mv": 67100, "ma": 15200,
                     "t": 312, "tmin": 295, "cyc": 412, "flt": 0, "life_wh": 402113}},
            {"n": 2, "st": "I", "mv": 0, "ma": 0, "e_mwh": 5, "b_mwh": 5},
        ],
        "err": {"mb_to": 3, "mb_crc": 0},
    }  # fmt: skip


def test_a_good_telemetry_is_untouched() -> None:
    b = telemetry()
    got = clean(b)
    assert got.body == b and got.spoiled == ()


def test_meter_above_its_range_spoils_the_meter_only() -> None:
    b = telemetry()
    b["meter"]["e_wh"] = WH_MAX + 1
    got = clean(b)
    assert "meter" not in got.body and got.body["slots"] == telemetry()["slots"]
    assert got.spoiled == (("meter", "meter.e_wh"),)
    assert b["meter"]["e_wh"] == WH_MAX + 1  # the input is not changed


def test_a_huge_register_spoils_its_slot_and_not_the_other() -> None:
    b = telemetry()
    b["slots"][1]["e_mwh"] = 10**41
    got = clean(b)
    assert [s["n"] for s in got.body["slots"]] == [1]
    assert got.body["meter"] == b["meter"]
    assert got.spoiled == (("slot:2", "slots[n=2].e_mwh"),)


def test_bad_soc_spoils_the_battery_not_the_register() -> None:
    b = telemetry()
    b["slots"][0]["bat"]["soc"] = 1001
    got = clean(b)
    assert got.body["slots"][0]["e_mwh"] == 9876 and "bat" not in got.body["slots"][0]
    assert got.spoiled == (("bat:1", "slots[n=1].bat.soc"),)


def test_types_are_exact() -> None:
    for bad in (True, 1.0, "5", None, -1, U53 + 1):
        b = telemetry()
        b["slots"][0]["e_mwh"] = bad
        assert clean(b).spoiled == (("slot:1", "slots[n=1].e_mwh"),), bad


def test_err_and_slots_shapes() -> None:
    b = telemetry()
    b["err"]["mb_to"] = -3
    b["slots"] = "many"
    got = clean(b)
    assert "err" not in got.body and "slots" not in got.body and "meter" in got.body
    assert dict(got.spoiled) == {"err": "err.mb_to", "slots": "slots"}


def test_events() -> None:
    base = {"v": 1, "sid": "KH-PNH-0001", "kid": 1, "boot": 3, "seq": 8, "up": 6000}
    good = dict(base, ev="meter_reset", from_wh=10, to_wh=0, sn=5)
    assert clean(good) == (good, ())
    bad = dict(good, from_wh=WH_MAX * 10)
    got = clean(bad)
    assert got.body == dict(base, ev="invalid") and got.spoiled == (("event", "from_wh"),)
    unknown = dict(base, ev="firmware_party")
    assert clean(unknown).body["ev"] == "invalid"
    boot = dict(base, ev="boot", fw="1.0", reset="power", restored={"1": 5, "17": 3})
    got = clean(boot)
    assert "restored" not in got.body and got.body["fw"] == "1.0"
    assert got.spoiled == (("event", "restored"),)
    start = dict(base, ev="session_start", slot=1, bat=None, e_mwh=3, soc=None)
    assert clean(start).spoiled == ()
    no_slot = {k: v for k, v in start.items() if k != "slot"}
    assert clean(no_slot).spoiled == (("event", "slot"),)


def test_depth_counts_without_recursion() -> None:
    assert depth(telemetry()) == 4
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    assert depth({"a": deep}) == MAX_DEPTH + 1


values = st.one_of(
    st.integers(min_value=-(10**45), max_value=10**45), st.floats(), st.text(max_size=4),
    st.none(), st.booleans(), st.lists(st.integers(), max_size=2),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["meter", "slot", "bat", "err"]),
    st.sampled_from(["e_wh", "p_w", "sn", "n", "e_mwh", "b_mwh", "mv", "ma", "soc", "t"]),
    values,
)
def test_any_value_in_any_field_spoils_at_most_its_source(
    where: str, field: str, value: Any
) -> None:
    b = telemetry()
    target = {
        "meter": b["meter"], "slot": b["slots"][1], "bat": b["slots"][0]["bat"],
        "err": b["err"],
    }[where]  # fmt: skip
    target[field] = value
    before = copy.deepcopy(b)
    got = clean(b)
    assert b == before
    sources = {s for s, _ in got.spoiled}
    assert sources <= {"meter", "slot:2", "bat:1", "err", "slots"}
    if where != "meter":
        assert got.body.get("meter") == telemetry()["meter"]
    if where != "slot" and where != "bat":
        assert got.body["slots"] == telemetry()["slots"]
    if where == "bat":  # slot 1's register survives a bad battery
        assert got.body["slots"][0]["e_mwh"] == 9876
