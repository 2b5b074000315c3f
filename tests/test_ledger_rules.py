"""agent/ledger/rules.py and records.py, function by function: the CONTRACT §6 rules with
numbers worked from the contract's words (and docs/metering.md's decisions), not from
running the code."""

from __future__ import annotations

import random

import pytest

from agent.ledger import IncrementalMeter, MeterParams, RawMsg, Record, record_id, rules
from agent.ledger.records import (
    FLAG_BITS,
    FLAG_NAMES,
    PROCESSING_VERSION,
    flag_bits,
    flag_names,
    make_record,
    make_record_id,
)

IV = 900_000  # the default interval, 15 min
SLOT_W = 3000  # default max power of a slot
METER_W = 50_000

# ---- rule 0: baseline ----------------------------------------------------------------------


def test_baseline_without_restored_value_credits_nothing() -> None:
    # "otherwise the first reading is the baseline and nothing is credited for it"
    assert rules.baseline(123_456, None) == (0, False)


def test_baseline_credits_first_minus_restored() -> None:
    assert rules.baseline(1500, 1000) == (500, False)
    # "a new station restores 0, so its first energy counts"
    assert rules.baseline(1234, 0) == (1234, False)
    assert rules.baseline(1000, 1000) == (0, False)


def test_baseline_below_restored_is_an_anomaly_not_a_negative_credit() -> None:
    assert rules.baseline(900, 1000) == (0, True)


# ---- rule 2: within a boot -----------------------------------------------------------------


def test_against_mark_credits_the_rise_only() -> None:
    assert rules.against_mark(1300, 1000) == (300, False)
    assert rules.against_mark(1000, 1000) == (0, False)  # at the mark: nothing, no anomaly
    assert rules.against_mark(900, 1000) == (0, True)  # below the mark: an anomaly


def test_a_glitch_down_and_back_up_is_never_credited_twice() -> None:
    # credit = max(0, value − mark), then mark = max(mark, value)
    mark, total, anomalies = 1000, 0, 0
    for v in (1000, 1100, 400, 1100, 1250, 1250, 300, 1300):
        credit, below = rules.against_mark(v, mark)
        total += credit
        anomalies += below
        mark = max(mark, v)
    assert total == 1300 - 1000  # the register rose 300 mWh, whatever the glitches
    assert anomalies == 2


# ---- rule 3: across boots ------------------------------------------------------------------


def test_across_boots_with_restore_counts_persisted_but_unsent_energy_once() -> None:
    # sent up to 1000 (the mark), persisted 1200 before the restart, first reading 1500
    x = rules.across_boots(mark=1000, first=1500, restored=1200)
    assert (x.persisted, x.credit, x.below) == (200, 300, False)
    assert x.persisted + x.credit == 1500 - 1000


def test_across_boots_energy_sent_but_not_persisted_was_already_counted() -> None:
    # sent up to 1500, only 1200 persisted before a power cut; the register restarts at 1200
    x = rules.across_boots(mark=1500, first=1600, restored=1200)
    assert (x.persisted, x.credit, x.below) == (0, 400, False)


def test_across_boots_first_below_the_restored_value_is_an_anomaly() -> None:
    x = rules.across_boots(mark=1000, first=1100, restored=1200)
    assert (x.persisted, x.credit, x.below) == (200, 0, True)


def test_across_boots_without_restore_credits_from_the_mark() -> None:
    assert rules.across_boots(mark=1000, first=1300, restored=None) == (0, 300, False)
    assert rules.across_boots(mark=1000, first=900, restored=None) == (0, 0, True)


def test_restored_value_prefers_the_boot_event() -> None:
    # docs/metering.md: the boot event's `restored` when it names the slot, else b_mwh
    assert rules.restored_value(700, 900) == 700
    assert rules.restored_value(0, 900) == 0  # a restored 0 is a value, not "unknown"
    assert rules.restored_value(None, 900) == 900
    assert rules.restored_value(None, None) is None


# ---- rule 4: meter resets and swaps --------------------------------------------------------


def test_meter_reset_credits_up_to_from_then_nothing_below() -> None:
    assert rules.meter_reset_credit(5000, 4200) == 800
    assert rules.meter_reset_credit(4200, 4200) == 0
    assert rules.meter_reset_credit(4000, 4200) == 0


def test_serial_swap_needs_both_serials_known_and_different() -> None:
    assert rules.serial_swapped(12345678, 12345679)
    assert not rules.serial_swapped(12345678, 12345678)
    assert not rules.serial_swapped(None, 12345678)  # first serial seen
    assert not rules.serial_swapped(12345678, None)  # a reading without sn
    assert rules.serial_swapped(0, 1)  # 0 is a serial, not "unknown"


# ---- rule 5: time --------------------------------------------------------------------------


def test_boot_offset_synced_beats_estimated() -> None:
    assert rules.boot_offset(1_000_000, 999_000) == (1_000_000, False)
    assert rules.boot_offset(None, 999_000) == (999_000, True)
    # an offset of 0 is still a synced offset
    assert rules.boot_offset(0, 999_000) == (0, False)


def test_reading_time_is_uptime_plus_offset() -> None:
    assert rules.reading_time(30_000, 1_767_225_600_000) == 1_767_225_630_000


def test_home_interval_a_reading_on_a_boundary_closes_the_earlier_interval() -> None:
    assert rules.home_interval(0, IV, IV) == 0
    assert rules.home_interval(0, IV + 1, IV) == 1
    assert rules.home_interval(IV - 5, IV - 1, IV) == 0


def test_home_interval_of_a_point_is_the_interval_holding_it() -> None:
    assert rules.home_interval(IV, IV, IV) == 1
    assert rules.home_interval(3 * IV, 2 * IV + 7, IV) == 2  # clocks that disagree: t1 rules


def test_spread_within_one_interval_is_whole() -> None:
    assert rules.spread(777, 100, 800, IV) == [(0, 777)]


def test_spread_in_proportion_to_the_overlap() -> None:
    # [600 s, 2100 s] of 15-min (900 s) intervals: 300 s, 900 s, 300 s of 1500 s
    assert rules.spread(10, 600_000, 2_100_000, IV) == [(0, 2), (1, 6), (2, 2)]
    assert rules.spread(900, 0, 2 * IV, IV) == [(0, 450), (1, 450)]


def test_spread_largest_remainder_gets_the_leftover() -> None:
    # overlaps 100, 900, 500 of 1500: exact shares 7·(1/15, 9/15, 5/15) = 0.47, 4.2, 2.33;
    # floors 0, 4, 2 leave 1 mWh, which goes to the largest remainder (0.47)
    assert rules.spread(7, 800_000, 2_300_000, IV) == [(0, 1), (1, 4), (2, 2)]


def test_spread_ties_go_to_the_earlier_interval() -> None:
    assert rules.spread(1, 0, 2 * IV, IV) == [(0, 1), (1, 0)]
    assert rules.spread(10, 0, 3 * IV, IV) == [(0, 4), (1, 3), (2, 3)]


def test_spread_creates_and_loses_no_mwh() -> None:
    rnd = random.Random(6)
    for _ in range(2000):
        iv = rnd.choice([60_000, IV, 3_600_000])
        t0 = rnd.randint(0, 10 * iv)
        t1 = t0 + rnd.randint(1, 5 * iv)
        c = rnd.choice([0, 1, 2, rnd.randint(0, 10**9)])
        shares = rules.spread(c, t0, t1, iv)
        assert sum(s for _, s in shares) == c
        assert [k for k, _ in shares] == list(range(t0 // iv, (t1 - 1) // iv + 1))
        assert all(s >= 0 for _, s in shares)
        for k, s in shares:  # each share within 1 mWh of its exact proportion
            overlap = min((k + 1) * iv, t1) - max(k * iv, t0)
            assert abs(s * (t1 - t0) - c * overlap) < (t1 - t0)


# ---- rule 6: implausible jumps -------------------------------------------------------------


def test_implausible_above_max_power_times_elapsed() -> None:
    # 3000 W for 10 s = 30 kJ = 8.333 Wh: 8333 mWh (integer division) is the limit
    assert not rules.implausible(8333, SLOT_W, 10_000)
    assert rules.implausible(8334, SLOT_W, 10_000)
    # the grid meter: 50 kW for an hour is 50 kWh
    assert not rules.implausible(50_000_000, METER_W, 3_600_000)
    assert rules.implausible(50_000_001, METER_W, 3_600_000)


def test_implausible_with_no_or_negative_elapsed_time() -> None:
    assert not rules.implausible(0, SLOT_W, 0)
    assert rules.implausible(1, SLOT_W, 0)
    assert rules.implausible(1, SLOT_W, -60_000)  # negative elapsed counts as 0


def test_level_shift_confirmed_when_plausible_from_the_held_reading() -> None:
    # mark 1000 at up 0; a jump to 100_000 at up 10 s was held; next reading at up 20 s
    held = dict(mark=1000, mark_up=0, held=100_000, held_up=10_000, max_power_w=SLOT_W)
    # 20 s from the mark allows 16_666 mWh; 10 s from the held reading 8333 mWh
    assert rules.level_shift_confirmed(100_500, 20_000, **held)
    assert rules.level_shift_confirmed(100_000 + 8333, 20_000, **held)
    assert not rules.level_shift_confirmed(100_000 + 8334, 20_000, **held)  # a new jump
    # back near the mark: the held reading was a spike
    assert not rules.level_shift_confirmed(1500, 20_000, **held)
    # below the held reading but still too far above the mark: plausible from it
    assert rules.level_shift_confirmed(99_000, 20_000, **held)


# ---- rule 8: finality ----------------------------------------------------------------------


def test_first_open_interval_locks_intervals_ending_by_the_lock() -> None:
    assert rules.first_open_interval(None, IV) is None
    assert rules.first_open_interval(2 * IV, IV) == 2  # [0, IV) and [IV, 2 IV) are locked
    assert rules.first_open_interval(2 * IV + 1, IV) == 2  # [2 IV, 3 IV) ends after it
    assert rules.first_open_interval(2 * IV - 1, IV) == 1


# ---- §6 flag gap ---------------------------------------------------------------------------


def test_seq_gap() -> None:
    seqs = [0, 1, 2, 5, 6]
    assert not rules.seq_gap(seqs[0], 0, seqs[2], 2)
    assert rules.seq_gap(seqs[2], 2, seqs[3], 3)  # 3 and 4 missing
    assert not rules.seq_gap(seqs[3], 3, seqs[4], 4)
    assert rules.seq_gap(seqs[0], 0, seqs[4], 4)
    assert rules.seq_gap(7, 4, 9, 5)  # one seq (8) missing
    assert not rules.seq_gap(7, 4, 8, 5)
    # seqs start at 0: a boot whose first received message is seq 3 lost 0..2
    assert rules.seq_gap(0, 0, 3, 0)
    assert not rules.seq_gap(0, 0, 0, 0)


# ---- the engine's inlined copies agree with the rules --------------------------------------

T0 = 1_767_225_600_000  # an interval boundary


def _tel(seq: int, up: int, e: int) -> RawMsg:
    body = {"up": up, "ts": T0 + up, "slots": [{"n": 1, "e_mwh": e}]}
    return RawMsg(sid="KH-A-0001", boot=1, seq=seq, recv_ms=T0 + up, body=body)


def test_engine_attributes_a_boundary_reading_to_the_earlier_interval() -> None:
    # home_interval and seq_gap are inlined in the engine's per-reading path
    im = IncrementalMeter(MeterParams())
    im.add([_tel(0, 0, 1000), _tel(1, 300_000, 2000), _tel(3, IV, 3000), _tel(4, IV + 1, 3000)])
    iv = {r.start_ms - T0: r for r in im.records("KH-A-0001") if r.kind == "interval"}
    assert iv[0].mwh == 2000 and iv[0].to_key == (1, 3)  # the reading at 15:00 closes 0
    assert "gap" in iv[0].flags  # seq 2 missing between seq 1 and seq 3
    assert iv[IV].mwh == 0 and "gap" not in iv[IV].flags


# ---- records -------------------------------------------------------------------------------


def _rec(kind: str, flags: tuple[str, ...] = ()) -> Record:
    return Record(
        kind=kind,
        sid="KH-A-0001",
        slot=2,
        start_ms=T0,
        end_ms=T0 + IV,
        mwh=5,
        held_mwh=0,
        flags=flags,
        from_key=(3, 0),
        to_key=(4, 17),
        e_from=0,
        e_to=5,
        version=PROCESSING_VERSION,
    )


def test_record_ids() -> None:
    assert record_id(_rec("interval")) == f"interval/KH-A-0001/2/{T0}"
    assert record_id(_rec("interval", ("adjustment",))) == f"interval/KH-A-0001/2/{T0}/adj"
    assert record_id(_rec("day")) == f"day/KH-A-0001/2/{T0}"
    # a session is named by its end event, not by its start time or its contents
    assert record_id(_rec("session")) == "session/KH-A-0001/2/4:17"
    for r in (_rec("interval"), _rec("interval", ("adjustment",)), _rec("session")):
        assert record_id(r) == make_record_id(
            r.kind,
            r.sid,
            r.slot,
            start_ms=r.start_ms,
            end_key=r.to_key,
            adjustment="adjustment" in r.flags,
        )


def test_record_id_does_not_depend_on_other_flags() -> None:
    assert record_id(_rec("interval", ("gap", "held"))) == record_id(_rec("interval"))


def test_a_day_record_id_does_not_depend_on_its_flags() -> None:
    assert record_id(_rec("day", ("adjustment",))) == record_id(_rec("day"))


def test_flags() -> None:
    assert FLAG_NAMES == tuple(sorted(FLAG_NAMES))
    assert len({bit for bit, _ in FLAG_BITS}) == len(FLAG_BITS)
    every = flag_bits(FLAG_NAMES)
    assert flag_names(every) == FLAG_NAMES
    assert flag_names(0) == ()
    assert flag_names(flag_bits(["time_est", "baseline"])) == ("baseline", "time_est")
    with pytest.raises(KeyError):
        flag_bits(["no_such_flag"])


def test_make_record_equals_the_dataclass() -> None:
    r = _rec("interval", ("gap",))
    fast = make_record(
        r.kind,
        r.sid,
        r.slot,
        r.start_ms,
        r.end_ms,
        r.mwh,
        r.held_mwh,
        r.flags,
        r.from_key,
        r.to_key,
        r.e_from,
        r.e_to,
    )
    assert fast == r and fast.extra == {} and fast.version == PROCESSING_VERSION
