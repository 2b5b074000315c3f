import timebase


def test_uptime_never_decreases_and_advances():
    u = timebase.Uptime()
    a = u.ms()
    timebase.sleep_ms(20)
    b = u.ms()
    assert a >= 0
    assert b - a >= 15


def test_uptime_accumulates_across_a_ticks_wrap():
    u = timebase.Uptime()
    # pretend the previous reading was just before a wrap: the diff stays small and positive
    u._last = timebase.ticks_add(timebase.ticks_ms(), -5)
    u._up = 1 << 40
    assert u.ms() >= (1 << 40) + 5
