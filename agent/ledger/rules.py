"""CONTRACT §6, the metering rules, as small pure functions (processing version m2).

Plain ints in, a few ints (or a small NamedTuple) out; no engine state, no flags: the
engine (agent/ledger/engine.py) keeps the marks and the held readings, turns the
results into flags and attributes the credits to intervals. Each function names its
rule; docs/metering.md gives the decisions taken where the contract is silent.

Vocabulary: the *mark* of a stream in a boot is the highest register value credited so
far (rule 2); `up` is a message's uptime in ms; values are register readings in mWh.

Contract v2's additions are applied by the engine with these functions: rule 6
(`implausible`) on the baseline credit (elapsed = the first reading's up) and on rule 3's
parts (r − mark against max power × the cross-boot window, first − r against up, without
r first − mark against the time between the readings); the grid meter's mark in b' is
max(mark(b), first(b')).
"""

from __future__ import annotations

from typing import NamedTuple

# ---- rule 0: baseline --------------------------------------------------------------------


def baseline(first: int, restored: int | None) -> tuple[int, bool]:
    """Rule 0: (credit, below) of a stream's first reading.

    With the boot's restored value `r` known, the first reading is credited
    max(0, first − r), and `below` says first < r (flag anomaly_down); without it the
    first reading is only the baseline: nothing is credited. The credit must still pass
    rule 6 with elapsed = the first reading's up (v2; the engine holds it otherwise)."""
    if restored is None:
        return 0, False
    c = first - restored
    return (c, False) if c >= 0 else (0, True)


# ---- rule 2: within a boot ---------------------------------------------------------------


def against_mark(value: int, mark: int) -> tuple[int, bool]:
    """Rule 2: (credit, below) of a reading against its boot's mark.

    credit = max(0, value − mark); `below`: the reading is under the mark (an anomaly,
    flag anomaly_down, nothing credited). A credited reading becomes the mark (the mark is
    max(mark, value)), so a glitch down and back up is never credited twice. A credit
    still has to pass rule 6 (`implausible`) before it counts."""
    c = value - mark
    return (c, False) if c >= 0 else (0, True)


# ---- rule 3: across boots ----------------------------------------------------------------


class CrossBoot(NamedTuple):
    """What rule 3 credits from boot b to the next boot b' with readings of a stream."""

    persisted: int  # max(0, r(b') − mark(b)): persisted before the restart, never sent
    credit: int  # max(0, first(b') − r(b')), or max(0, first(b') − mark(b)) without r
    below: bool  # first(b') under r(b') (or under mark(b) without r): anomaly_down


def across_boots(mark: int, first: int, restored: int | None) -> CrossBoot:
    """Rule 3: the credit from the mark of an earlier boot to the first reading of the
    next boot b' of the stream.

    With r(b') known (a slot whose firmware restores its register): energy persisted but
    not yet sent before the restart counts once, `persisted` = max(0, r − mark); energy
    sent but not persisted was already counted; the register's gain after the restore is
    new, `credit` = max(0, first − r). Without r (the grid meter, or a slot that sends
    no b_mwh: flag no_restore): `credit` = max(0, first − mark). The next boot starts
    its own mark at first(b'); the grid meter at max(mark, first) (v2). Each part must
    still pass rule 6 (v2; the engine holds it otherwise)."""
    if restored is None:
        c = first - mark
        return CrossBoot(0, c, False) if c >= 0 else CrossBoot(0, 0, True)
    p = restored - mark
    c = first - restored
    return CrossBoot(p if p > 0 else 0, c if c > 0 else 0, c < 0)


def restored_value(from_boot_event: int | None, from_telemetry: int | None) -> int | None:
    """§6 r(b): a slot's restored value for a boot: the boot event's `restored` when it
    names the slot, else the `b_mwh` of the boot's lowest-seq telemetry carrying it (the
    contract says "any": they should agree; this makes a disagreement deterministic)."""
    return from_boot_event if from_boot_event is not None else from_telemetry


# ---- rule 4: meter resets and swaps ------------------------------------------------------


def meter_reset_credit(from_mwh: int, mark: int) -> int:
    """Rule 4: a meter_reset event credits max(0, from − mark); the new baseline is the
    event's `to`. (Not subject to rule 6.)"""
    c = from_mwh - mark
    return c if c > 0 else 0


def serial_swapped(seen: object, now: object) -> bool:
    """Rule 4: the grid meter was swapped without a meter_reset event: its serial number
    changed between two readings (both known). A new baseline starts at the new reading,
    nothing is credited across it."""
    return now is not None and seen is not None and now != seen


# ---- rule 5: time ------------------------------------------------------------------------


def boot_offset(sync_offset: int | None, est_offset: int | None) -> tuple[int, bool]:
    """Rule 5: (offset, estimated) of a boot's clock. `sync_offset` is `ts − up` of the
    boot's lowest-seq synced message, if any; else the offset is the smallest
    `recv_ms − up` over its messages (`est_offset`) and is estimated (flag time_est)."""
    if sync_offset is not None:
        return sync_offset, False
    return (est_offset or 0), True


def reading_time(up: int, offset: int) -> int:
    """Rule 5: a reading's time (Unix ms) is its uptime plus its boot's offset."""
    return up + offset


def home_interval(t0: int, t1: int, interval_ms: int) -> int:
    """Rule 5: the interval a segment [t0, t1] belongs to: the last one it overlaps, so a
    reading exactly on a boundary closes the earlier interval; a segment with t1 <= t0 (a
    point, or clocks that disagree across boots) goes whole to the interval holding t1."""
    return (t1 - 1) // interval_ms if t1 > t0 else t1 // interval_ms


def spread(credit: int, t0: int, t1: int, interval_ms: int) -> list[tuple[int, int]]:
    """Rule 5: (interval index, share) of a credit over the UTC-aligned intervals
    overlapping [t0, t1] (t1 > t0), in proportion to the overlap. Shares are integers
    that sum exactly to the credit: the largest remainders get the mWh left over, ties
    to the earlier interval."""
    iv = interval_ms
    k0 = t0 // iv
    d = t1 - t0
    ks = range(k0, (t1 - 1) // iv + 1)
    shares: list[int] = []
    rems: list[tuple[int, int]] = []
    total = 0
    for j, k in enumerate(ks):
        lo = k * iv
        overlap = min(lo + iv, t1) - max(lo, t0)
        q, r = divmod(credit * overlap, d)
        shares.append(q)
        rems.append((-r, j))
        total += q
    left = credit - total
    if left:
        rems.sort()
        for _, j in rems[:left]:
            shares[j] += 1
    return list(zip(ks, shares, strict=True))


# ---- rule 6: implausible jumps -----------------------------------------------------------


def implausible(rise: int, max_power_w: int, elapsed_ms: int) -> bool:
    """Rule 6: a rise of the register above `max_power_w × elapsed_ms // 3600` mWh
    (elapsed in uptime since the reading that set the mark; negative counts as 0) is
    implausible: it is held, not credited, and the mark does not move."""
    return rise > max_power_w * (elapsed_ms if elapsed_ms > 0 else 0) // 3600


def level_shift_confirmed(
    value: int, up: int, mark: int, mark_up: int, held: int, held_up: int, max_power_w: int
) -> bool:
    """Rule 6: the reading after a held one confirms a level shift when it is also too far
    above the mark but plausible from the held reading (a value below the held one counts
    as plausible): the mark then moves to the held reading (its amount stays held).
    Otherwise the held reading was a spike and stays held."""
    return implausible(value - mark, max_power_w, up - mark_up) and not implausible(
        value - held, max_power_w, up - held_up
    )


# ---- rule 8: finality --------------------------------------------------------------------


def first_open_interval(locked_until_ms: int | None, interval_ms: int) -> int | None:
    """Rule 8: the index of the first interval not locked: the intervals before it end
    at or before `locked_until_ms`. None: nothing is locked."""
    return locked_until_ms // interval_ms if locked_until_ms is not None else None


# ---- §6 flags: gap -----------------------------------------------------------------------


def seq_gap(seq_a: int, pos_a: int, seq_b: int, pos_b: int) -> bool:
    """§6 flag `gap`: a seq is missing between two messages of one boot, at positions
    pos_a < pos_b of the boot's received seqs (ascending): fewer messages were received
    between them than their seqs count. (A boot's seqs start at 0: `seq_gap(0, 0, seq, pos)`
    tells whether any seq before position pos is missing.)"""
    return seq_b - seq_a != pos_b - pos_a
