import json

from fwtest import raises
from sessions import SessionTracker

T0 = 1764150000000


def _evs(events):
    return [e["ev"] for e in events]


def test_start_and_full():
    t = SessionTracker(4)
    assert t.update(1, "I", None, 1000, None, 0, T0) == []
    assert t.update(1, "W", "B1", 1000, 500, 1000, T0 + 1000) == []
    ev = t.update(1, "C", "B1", 1000, 501, 2000, T0 + 2000)
    assert ev == [{"ev": "session_start", "slot": 1, "bat": "B1", "e_mwh": 1000, "soc": 501}]
    assert t.active(1) == "B1"
    assert t.update(1, "C", "B1", 1500, 600, 3000, T0 + 3000) == []
    assert t.update(1, "V", "B1", 1900, 950, 4000, T0 + 4000) == []  # CC -> CV: same session
    ev = t.update(1, "F", "B1", 2000, 1000, 5000, T0 + 5000)
    assert ev == [
        {
            "ev": "session_end",
            "slot": 1,
            "bat": "B1",
            "e0_mwh": 1000,
            "e1_mwh": 2000,
            "soc0": 501,
            "soc1": 1000,
            "up0": 2000,
            "up1": 5000,
            "t0": T0 + 2000,
            "t1": T0 + 5000,
            "why": "full",
        }
    ]
    assert t.active(1) is None
    assert t.update(1, "F", "B1", 2000, 1000, 6000, T0 + 6000) == []


def test_every_end_reason():
    for state, why in (
        ("F", "full"),
        ("E", "fault"),
        ("X", "fault"),
        ("W", "stopped"),
        ("I", "removed"),
    ):
        t = SessionTracker(2)
        t.update(2, "C", "B7", 10, 100, 0)
        ev = t.update(2, state, None, 20, None, 1000)
        assert len(ev) == 1 and ev[0]["why"] == why and ev[0]["slot"] == 2, (state, ev)
        assert ev[0]["e0_mwh"] == 10 and ev[0]["e1_mwh"] == 20
        assert ev[0]["soc1"] == 100  # the last known SOC when the BMS did not answer


def test_stale_bms_neither_ends_nor_changes_a_session():
    t = SessionTracker(1)
    t.update(1, "C", "B1", 0, 300, 0)
    for i in range(1, 30):
        assert t.update(1, "C", None, i * 10, None, i * 1000) == []
    assert t.active(1) == "B1"
    ev = t.update(1, "F", None, 400, None, 31000)
    assert ev[0]["why"] == "full" and ev[0]["e1_mwh"] == 400 and ev[0]["soc1"] == 300


def test_no_charger_reading_changes_nothing():
    t = SessionTracker(1)
    t.update(1, "C", "B1", 0, 300, 0)
    assert t.update(1, None, None, 5, None, 1000) == []
    assert t.active(1) == "B1"
    t2 = SessionTracker(1)
    assert t2.update(1, None, "B1", 0, 300, 0) == [] and t2.active(1) is None


def test_battery_swap_without_an_I_ends_and_starts():
    t = SessionTracker(3)
    t.update(3, "C", "B1", 100, 200, 0)
    ev = t.update(3, "C", "B2", 150, 50, 1000, T0)
    assert _evs(ev) == ["session_end", "session_start"]
    assert ev[0]["bat"] == "B1" and ev[0]["why"] == "removed" and ev[0]["e1_mwh"] == 150
    assert ev[0]["soc1"] == 50  # what the BMS said this cycle (documented caveat)
    assert ev[1] == {"ev": "session_start", "slot": 3, "bat": "B2", "e_mwh": 150, "soc": 50}
    assert t.active(3) == "B2"


def test_a_swapped_battery_that_is_not_charging_only_ends_the_old_session():
    t = SessionTracker(1)
    t.update(1, "C", "B1", 100, 200, 0)
    ev = t.update(1, "W", "B2", 150, 50, 1000)
    assert _evs(ev) == ["session_end"] and ev[0]["why"] == "removed"
    assert t.active(1) is None


def test_charging_before_the_battery_id_is_known_starts_when_it_arrives():
    t = SessionTracker(1)
    assert t.update(1, "C", None, 500, None, 1000, T0 + 1000) == []
    assert t.update(1, "C", None, 520, None, 2000, T0 + 2000) == []
    ev = t.update(1, "C", "B9", 540, 333, 3000, T0 + 3000)
    assert ev == [{"ev": "session_start", "slot": 1, "bat": "B9", "e_mwh": 500, "soc": 333}]
    ev = t.update(1, "W", "B9", 600, 340, 4000)
    assert ev[0]["up0"] == 1000 and ev[0]["t0"] == T0 + 1000 and ev[0]["e0_mwh"] == 500
    assert "t1" not in ev[0] and ev[0]["why"] == "stopped"


def test_charging_that_stops_before_any_id_records_no_session():
    t = SessionTracker(1)
    t.update(1, "C", None, 500, None, 1000)
    assert t.update(1, "W", None, 520, None, 2000) == []
    # a later start is measured from its own beginning, not from the dropped pending one
    t.update(1, "C", None, 600, None, 3000)
    ev = t.update(1, "C", "B1", 610, 10, 4000)
    assert ev[0]["e_mwh"] == 600


def test_fields_omitted_when_unknown():
    t = SessionTracker(1)
    t.update(1, "V", None, 0, None, 0)
    ev = t.update(1, "V", "B1", 1, None, 10)
    assert ev == [{"ev": "session_start", "slot": 1, "bat": "B1", "e_mwh": 0}]
    ev = t.update(1, "I", None, 2, None, 20)
    assert sorted(ev[0].keys()) == sorted(
        ["ev", "slot", "bat", "e0_mwh", "e1_mwh", "up0", "up1", "why"]
    )


def test_slots_are_independent_and_checked():
    t = SessionTracker(2)
    t.update(1, "C", "A", 0, 1, 0)
    t.update(2, "C", "B", 0, 1, 0)
    assert t.update(1, "F", "A", 5, 2, 10)[0]["bat"] == "A"
    assert t.active(2) == "B" and t.active(1) is None
    raises(ValueError, t.update, 3, "C", "C", 0, 1, 0)
    raises(ValueError, t.update, 0, "C", "C", 0, 1, 0)
    raises(ValueError, SessionTracker, 0)
    raises(ValueError, SessionTracker, 17)


def test_snapshot_round_trips_through_json_and_restore_closes_with_reboot():
    t = SessionTracker(16)
    t.update(16, "C", "B16", 2**40, 100, 5000, T0)
    t.update(16, "C", "B16", 2**40 + 77, 120, 6000, T0 + 1000)
    t.update(2, "C", "B2", 7, None, 6000)  # started with an id but no SOC, no clock
    t.update(5, "C", None, 9, None, 6000)  # pending: not a session yet, not persisted
    snap = json.loads(json.dumps(t.snapshot()))
    assert sorted(snap.keys()) == ["16", "2"]
    r = SessionTracker(16)
    ev = r.restore(snap, 10, None)
    assert [e["slot"] for e in ev] == [2, 16]
    assert all(e["why"] == "reboot" and e["ev"] == "session_end" for e in ev)
    e16 = ev[1]
    assert e16["e0_mwh"] == 2**40 and e16["e1_mwh"] == 2**40 + 77
    assert e16["up0"] == 5000 and e16["up1"] == 6000  # both on the previous boot's clock
    assert e16["t0"] == T0 and e16["t1"] == T0 + 1000 and e16["soc0"] == 100 and e16["soc1"] == 120
    assert "soc0" not in ev[0] and "t0" not in ev[0] and ev[0]["e1_mwh"] == 7
    assert r.snapshot() == {} and r.active(16) is None
    # after the restart a battery still charging starts a new session
    assert _evs(r.update(16, "C", "B16", 2**40 + 77, 121, 100)) == ["session_start"]


def test_restore_replaces_open_sessions_and_skips_malformed_entries():
    t = SessionTracker(4)
    t.update(1, "C", "OLD", 0, 1, 0)
    snap = {
        "1": {"bat": "B1", "e0": 1, "up0": 2, "soc0": "x", "t0": 1.5},
        "2": {"bat": 5, "e0": 1, "up0": 2},
        "3": "nonsense",
        "9": {"bat": "B9", "e0": 1, "up0": 2},
        "x": {"bat": "Bx", "e0": 1, "up0": 2},
        "4": {"bat": "B4", "e0": 1},
    }
    ev = t.restore(snap)
    assert len(ev) == 1 and ev[0]["bat"] == "B1" and ev[0]["e1_mwh"] == 1 and ev[0]["up1"] == 2
    assert "soc0" not in ev[0] and "t0" not in ev[0]
    assert t.active(1) is None
    assert t.restore(None) == [] and t.restore([]) == []
