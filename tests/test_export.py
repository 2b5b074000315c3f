"""Export (CONTRACT §8): exact bytes for JSON Lines and CSV, filters, order, determinism;
the same bytes from records stored in either engine (`db_url`: SQLite, PostgreSQL)."""

from __future__ import annotations

import csv
import io
import json
import random

import pytest

from agent.ledger import MeterParams, Record, compute
from agent.ledger.export import iso_ms, kwh, parse_time, render
from agent.store import Store, record_to_row, row_to_record
from tests.test_metering_rules import T0, tel

DAY = 86_400_000


def rec(
    sid: str,
    slot: int,
    start: int,
    mwh: int,
    *,
    kind: str = "interval",
    flags: tuple[str, ...] = (),
    held: int = 0,
    extra: dict[str, object] | None = None,
    end: int | None = None,
) -> Record:
    return Record(
        kind=kind,
        sid=sid,
        slot=slot,
        start_ms=start,
        end_ms=end if end is not None else start + 900_000,
        mwh=mwh,
        held_mwh=held,
        flags=flags,
        from_key=(3, 17),
        to_key=(4, -1),
        e_from=1000,
        e_to=1000 + mwh,
        version="m1",
        extra=extra or {},
    )


RECS = [
    rec("KH-B-0002", 0, T0, 2_000_000),
    rec("KH-A-0001", 1, T0 + 900_000, 1_234_567, flags=("gap", "reboot"), held=5),
    rec("KH-A-0001", 1, T0, 7),
    rec("KH-A-0001", 0, T0, 0, flags=("baseline",)),
    rec("KH-A-0001", 1, T0, 3, kind="session", end=T0 + 5000, extra={"why": "full", "bat": "B1"}),
]


def test_json_lines_exact_bytes() -> None:
    out = render(RECS, "json", None, None, "interval")
    assert out == (
        b'{"sid":"KH-A-0001","slot":0,"start":"2026-01-01T00:00:00.000Z",'
        b'"end":"2026-01-01T00:15:00.000Z","mwh":0,"held_mwh":0,"flags":["baseline"],'
        b'"from":[3,17],"to":[4,-1],"e_from":1000,"e_to":1000,"version":"m1","extra":{}}\n'
        b'{"sid":"KH-A-0001","slot":1,"start":"2026-01-01T00:00:00.000Z",'
        b'"end":"2026-01-01T00:15:00.000Z","mwh":7,"held_mwh":0,"flags":[],'
        b'"from":[3,17],"to":[4,-1],"e_from":1000,"e_to":1007,"version":"m1","extra":{}}\n'
        b'{"sid":"KH-A-0001","slot":1,"start":"2026-01-01T00:15:00.000Z",'
        b'"end":"2026-01-01T00:30:00.000Z","mwh":1234567,"held_mwh":5,"flags":["gap","reboot"],'
        b'"from":[3,17],"to":[4,-1],"e_from":1000,"e_to":1235567,"version":"m1","extra":{}}\n'
        b'{"sid":"KH-B-0002","slot":0,"start":"2026-01-01T00:00:00.000Z",'
        b'"end":"2026-01-01T00:15:00.000Z","mwh":2000000,"held_mwh":0,"flags":[],'
        b'"from":[3,17],"to":[4,-1],"e_from":1000,"e_to":2001000,"version":"m1","extra":{}}\n'
    )


def test_csv_exact_bytes() -> None:
    out = render(RECS, "csv", None, None, "interval")
    assert out.decode().split("\n") == [
        "sid,slot,start,end,mwh,held_mwh,flags,from,to,e_from,e_to,version,extra,kwh",
        (
            "KH-A-0001,0,2026-01-01T00:00:00.000Z,2026-01-01T00:15:00.000Z,0,0,baseline,3:17,4:-1,"
            "1000,1000,m1,{},0.000000"
        ),
        (
            "KH-A-0001,1,2026-01-01T00:00:00.000Z,2026-01-01T00:15:00.000Z,7,0,,3:17,4:-1,"
            "1000,1007,m1,{},0.000007"
        ),
        (
            "KH-A-0001,1,2026-01-01T00:15:00.000Z,2026-01-01T00:30:00.000Z,1234567,5,gap|reboot,"
            "3:17,4:-1,1000,1235567,m1,{},1.234567"
        ),
        (
            "KH-B-0002,0,2026-01-01T00:00:00.000Z,2026-01-01T00:15:00.000Z,2000000,0,,3:17,4:-1,"
            "1000,2001000,m1,{},2.000000"
        ),
        "",
    ]


def test_session_extra_is_sorted_and_quoted_in_csv() -> None:
    out = render(RECS, "csv", None, None, "session").decode()
    row = list(csv.reader(io.StringIO(out)))[1]
    assert row[0] == "KH-A-0001" and row[3] == "2026-01-01T00:00:05.000Z"
    assert row[12] == '{"bat":"B1","why":"full"}' and row[13] == "0.000003"
    js = json.loads(render(RECS, "json", None, None, "session"))
    assert js["extra"] == {"bat": "B1", "why": "full"}


def test_from_inclusive_to_exclusive_on_start() -> None:
    out = render(RECS, "json", T0 + 900_000, T0 + 1_800_000, "interval")
    assert [json.loads(x)["mwh"] for x in out.splitlines()] == [1_234_567]
    out = render(RECS, "json", T0, T0 + 900_000, "interval")
    assert [json.loads(x)["mwh"] for x in out.splitlines()] == [0, 7, 2_000_000]
    assert render(RECS, "json", T0 + DAY, None, "interval") == b""
    assert render([], "csv", None, None, "day") == (
        b"sid,slot,start,end,mwh,held_mwh,flags,from,to,e_from,e_to,version,extra,kwh\n"
    )


def test_same_records_any_order_same_bytes() -> None:
    msgs = [
        tel(1, i, (i + 1) * 60_000, meter=100 + i, slots={1: 1000 * i, 2: 7 * i}) for i in range(40)
    ]
    recs = compute(msgs, MeterParams())
    for fmt in ("csv", "json"):
        for by in ("interval", "day", "session"):
            want = render(recs, fmt, None, None, by)
            shuffled = list(recs)
            random.Random(1).shuffle(shuffled)
            assert render(shuffled, fmt, None, None, by) == want
    assert render(recs, "csv", None, None, "day").count(b"\n") == 1 + 3  # header + 3 streams


def test_helpers() -> None:
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(T0 + 1) == "2026-01-01T00:00:00.001Z"
    assert iso_ms(-1) == "1969-12-31T23:59:59.999Z"
    assert kwh(1_234_567) == "1.234567" and kwh(-5) == "-0.000005" and kwh(0) == "0.000000"
    assert parse_time("2026-01-01") == T0
    assert parse_time("2026-01-01T00:00:01.5Z") == T0 + 1500
    assert parse_time("2026-01-01T07:00+07:00") == T0
    assert parse_time("2026-01-01 00:15") == T0 + 900_000
    for bad in ("yesterday", "2026-13-01", "2026-01-01T25:00"):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="format"):
        render(RECS, "xml", None, None, "interval")
    with pytest.raises(ValueError, match="--by"):
        render(RECS, "csv", None, None, "week")


def test_records_read_back_from_the_store_render_the_same_bytes(db_url: str) -> None:
    """What `stationctl export` does: records stored (flags, extra, a negative key, the
    grid meter's slot 0, large numbers), read back in the store's order and rendered."""
    recs = [*RECS, rec("KH-A-0001", 2, T0, 2**53 + 1, held=2**40, flags=("a", "b", "c"))]
    with Store(db_url) as st:
        st.replace_records({"": [record_to_row(r) for r in recs]}, everything=True)
    with Store(db_url, readonly=True) as st:
        for by in ("interval", "session", "day"):
            for start, end in ((None, None), (T0 + 900_000, T0 + 1_800_000), (T0, T0 + 1)):
                got = [row_to_record(r) for r in st.record_rows(by, start, end)]
                want = [r for r in recs if r.kind == by]
                for fmt in ("csv", "json"):
                    assert render(got, fmt, start, end, by) == render(want, fmt, start, end, by)
        back = sorted(
            map(row_to_record, st.record_rows()), key=lambda r: (r.kind, r.sid, r.slot, r.start_ms)
        )
        assert back == sorted(recs, key=lambda r: (r.kind, r.sid, r.slot, r.start_ms))
