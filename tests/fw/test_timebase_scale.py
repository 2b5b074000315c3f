import timebase


def test_scaled_uptime_runs_faster_in_integers():
    u = timebase.Uptime(60000)  # 60x: a minute per real second
    a = u.ms()
    timebase.sleep_ms(20)
    b = u.ms()
    assert type(b) is int
    assert b - a >= 15 * 60


def test_scaled_uptime_carries_the_remainder():
    u = timebase.Uptime(1500)  # 1.5x: 1 real ms gives 1, then 2 (not 1 and 1)
    u._last = timebase.ticks_add(timebase.ticks_ms(), -1)
    u._up = 0
    x = u.ms()
    assert x >= 1
    # a long stretch is exact to within one ms whatever the chunking
    v = timebase.Uptime(1500)
    v._up = 0
    total = 0
    for _ in range(10):
        v._last = timebase.ticks_add(timebase.ticks_ms(), -7)
        total = v.ms()
    assert total >= 105  # 70 real ms at 1.5x, no remainder lost on the way


def test_default_scale_is_real_time():
    assert timebase.SCALE_PERMILLE == 1000
    u = timebase.Uptime()
    assert u._k == 1000
