"""Export times print for any integer (a date past year 9999 used to raise in datetime)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from agent.ledger.export import iso_ms, parse_time

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def test_iso_ms_agrees_with_datetime_where_datetime_can_say() -> None:
    r = random.Random(7)
    lo = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)
    hi = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - EPOCH) // timedelta(
        milliseconds=1
    )
    cases = [lo, hi, 0, -1, 951_782_400_000, 4_107_542_400_000]  # 2000-02-29, 2100-03-01
    cases += [r.randrange(lo, hi + 1) for _ in range(20_000)]
    for ms in cases:
        dt = EPOCH + timedelta(milliseconds=ms)
        want = f"{dt.year:04d}-{dt:%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"
        assert iso_ms(ms) == want, ms


def test_past_year_9999_and_before_year_1() -> None:
    assert iso_ms(parse_time("9999-12-31T23:00-05:00")) == "10000-01-01T04:00:00.000Z"
    assert iso_ms(10**18) == "31690708-07-05T01:46:40.000Z"
    assert iso_ms(parse_time("0001-01-01") - 1) == "0000-12-31T23:59:59.999Z"
