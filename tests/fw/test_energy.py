from energy import SlotEnergy
from fwtest import raises

Q_PER_MWH = 7200000000  # half-uW.ms per mWh


class Lcg:
    """Deterministic pseudo-random numbers, the same on both interpreters."""

    def __init__(self, seed):
        self.x = seed

    def below(self, n):
        self.x = (self.x * 1103515245 + 12345) % 2147483648
        return (self.x >> 8) % n


def _exact_q(samples, stale_ms):
    """Reference: sum of (p0 + p1) * dt with big ints, power clamped at 0, stale gaps skipped."""
    q = 0
    prev = None
    for up, mv, ma in samples:
        p = mv * ma if mv > 0 and ma > 0 else 0
        if prev is not None and up - prev[0] <= stale_ms:
            q += (prev[1] + p) * (up - prev[0])
        prev = (up, p)
    return q


def _run(e, samples):
    gaps = []
    for up, mv, ma in samples:
        g = e.sample(up, mv, ma)
        if g:
            gaps.append(g)
    return gaps


def test_constant_power_for_an_hour_is_exact():
    e = SlotEnergy()
    for i in range(3601):
        assert e.sample(i * 1000, 84000, 15000) == 0
    assert e.mwh == 1260000 and e.rem == 0  # 84 V x 15 A = 1260 W for 1 h


def test_small_increments_are_carried_not_rounded_away():
    e = SlotEnergy()
    e.sample(0, 1000, 1)  # 1 V x 1 mA = 1 mW: 1/3600 mWh per second
    for i in range(1, 3600):
        e.sample(i * 1000, 1000, 1)
    assert e.mwh == 0 and e.rem == 3599 * 2000000
    e.sample(3600000, 1000, 1)
    assert e.mwh == 1 and e.rem == 0


def test_trapezoid_of_a_ramp():
    # 0 W to 1000 W over one hour, sampled once: area 500 Wh
    e = SlotEnergy(stale_ms=4000000)
    e.sample(0, 50000, 0)
    e.sample(3600000, 50000, 20000)
    assert e.mwh == 500000 and e.rem == 0


def test_random_samples_match_the_exact_sum():
    rnd = Lcg(7)
    for stale in (1500, 10000):
        samples = []
        up = rnd.below(1 << 20)
        for _ in range(1500):
            up += 1 + rnd.below(1800)
            mv = rnd.below(200001) - (5000 if rnd.below(20) == 0 else 0)
            ma = rnd.below(400001) - 200000
            samples.append((up, mv, ma))
        e = SlotEnergy(stale_ms=stale)
        gaps = _run(e, samples)
        q = _exact_q(samples, stale)
        assert e.mwh * Q_PER_MWH + e.rem == q, (stale, e.mwh, e.rem, q)
        want_gaps = [b[0] - a[0] for a, b in zip(samples, samples[1:]) if b[0] - a[0] > stale]
        assert gaps == want_gaps and (stale > 1800 or gaps)


def test_values_beyond_the_small_int_range_stay_exact():
    samples = [(0, 900000, 3000000), (70000, 10**7, 10**7), (200000, 123456789, 987654)]
    e = SlotEnergy(stale_ms=1000000)
    _run(e, samples)
    assert e.mwh * Q_PER_MWH + e.rem == _exact_q(samples, 1000000)


def test_discharge_contributes_nothing_and_the_register_never_falls():
    e = SlotEnergy(mwh=1000)
    e.sample(0, 67000, 15000)
    before = e.mwh
    e.sample(1000, 67000, -15000)  # half a trapezoid from 1005 W down to 0
    mid = e.mwh
    assert mid >= before and mid * Q_PER_MWH + e.rem == 1000 * Q_PER_MWH + 67000 * 15000 * 1000
    for i in range(2, 100):
        e.sample(i * 1000, 67000, -15000)
        assert e.mwh == mid
    e.sample(100000, 0, 15000)
    e.sample(101000, -5, 15000)
    assert e.mwh == mid


def test_a_missed_sample_is_bridged_by_the_next_good_one():
    a = SlotEnergy()
    b = SlotEnergy()
    for up in (0, 1000, 2000, 3000):
        a.sample(up, 60000, 10000)
    for up in (0, 1000, 3000):  # the sample at 2000 ms was lost
        b.sample(up, 60000, 10000)
    assert a.mwh == b.mwh and a.rem == b.rem


def test_a_stale_gap_is_not_integrated_and_is_reported():
    e = SlotEnergy(stale_ms=5000)
    e.sample(0, 60000, 10000)
    e.sample(5000, 60000, 10000)  # exactly stale_ms: still bridged
    after = (e.mwh, e.rem)
    assert after[0] * Q_PER_MWH + after[1] == 2 * 600000000 * 5000
    assert e.sample(5000 + 5001, 60000, 10000) == 5001
    assert (e.mwh, e.rem) == after
    assert e.sample(11001, 60000, 10000) == 0  # integration resumes from the gap's end
    assert e.mwh * Q_PER_MWH + e.rem == 2 * 600000000 * (5000 + 1000)


def test_first_sample_and_equal_times():
    e = SlotEnergy()
    assert e.last_up is None
    assert e.sample(123, 60000, 10000) == 0 and e.mwh == 0 and e.rem == 0
    assert e.sample(123, 60000, 20000) == 0 and e.rem == 0  # no time passed: nothing added
    e.sample(1123, 60000, 20000)
    assert e.rem == 2 * 1200000000 * 1000 % Q_PER_MWH  # the later power at 123 ms was kept
    assert e.last_up == 1123


def test_time_going_backwards_is_refused_and_changes_nothing():
    e = SlotEnergy()
    e.sample(1000, 60000, 10000)
    raises(ValueError, e.sample, 999, 60000, 10000)
    assert e.last_up == 1000
    e.sample(2000, 60000, 10000)
    assert e.mwh * Q_PER_MWH + e.rem == 2 * 600000000 * 1000


def test_bad_constructor_arguments():
    raises(ValueError, SlotEnergy, -1)
    raises(ValueError, SlotEnergy, 0, 0)
    raises(ValueError, SlotEnergy, 0, 1000, Q_PER_MWH)


def test_large_register_carries_across_the_split_and_restores_with_its_remainder():
    start = (1 << 40) + 999999999
    e = SlotEnergy(mwh=start, rem=Q_PER_MWH - 1)
    assert e.mwh == start and e.rem == Q_PER_MWH - 1
    e.sample(0, 84000, 15000)
    e.sample(1000, 84000, 15000)  # exactly 350 mWh: the remainder stays just short of 1 mWh
    assert e.mwh == start + 350 and e.rem == Q_PER_MWH - 1
    e.sample(1001, 84000, 15000)  # one more ms tips it over
    assert e.mwh == start + 351 and e.rem == 2 * 1260000000 - 1
    # persisting (mwh, rem) and resuming gives the same register as running on
    ref = SlotEnergy()
    part = SlotEnergy()
    for i in range(50):
        ref.sample(i * 700, 67000 + i, 15000 - i * 3)
        if i < 25:
            part.sample(i * 700, 67000 + i, 15000 - i * 3)
    resumed = SlotEnergy(mwh=part.mwh, rem=part.rem)
    resumed.sample(
        24 * 700, 67000 + 24, 15000 - 24 * 3
    )  # the resumed slot re-reads the last sample
    for i in range(25, 50):
        resumed.sample(i * 700, 67000 + i, 15000 - i * 3)
    assert (resumed.mwh, resumed.rem) == (ref.mwh, ref.rem)


def test_uptime_past_small_ints():
    e = SlotEnergy()
    base = (1 << 31) + 17
    for i in range(3601):
        e.sample(base + i * 1000, 84000, 15000)
    assert e.mwh == 1260000 and e.rem == 0
