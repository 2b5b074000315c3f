"""Monitoring periods locked for MRV (CONTRACT §6.8; `stationctl period lock`): sequential
locks, each window frozen as it stood; later messages only as `adjustment` records in the
first open period; `verify` recomputes every window; the agent picks a lock up."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest

from agent.ledger.agent_meter import decode_row
from agent.ledger.compute import compute
from agent.ledger.inputs import MeterParams
from agent.ledger.periods import PeriodError, load_locks, params_now, take_lock
from agent.store import Store, record_to_row
from tests.agent_helpers import Station, assert_days_roll_up, fill_store, stored_rows
from tests.ocpp_helpers import PASSWORD, OcppAgent

DAY = 86_400_000
D0 = 1_764_201_600_000  # 2025-11-27T00:00:00Z
SID = "KH-LOCK-0001"


def _stream() -> list[tuple[str, bytes]]:
    """Three days of one charging slot from D0 − 1 h, a telemetry message every 10 min."""
    st = Station(SID, slots=1, meter=False, t0_ms=D0 - 3_600_000)
    out = [st.boot_event()]
    for _ in range(3 * 144 + 6):
        st.advance(600_000, w=900)
        out.append(st.telemetry())
    return [(st.topic(kind), payload) for kind, payload in out]


def _ts(payload: bytes) -> int:
    from agent.wire import decode_record

    return int(decode_record(payload)["ts"])


def _meter(url: str) -> None:
    """Meter every stored message as the agent does, with the last lock in force."""
    with Store(url, create=False) as st:
        msgs = [decode_row(r) for page in st.iter_raw() for r in page]
        params = params_now(MeterParams(), load_locks(st))
        st.replace_records({"": [record_to_row(r) for r in compute(msgs, params)]}, everything=True)


def _add(url: str, rows: list[Any]) -> None:
    with Store(url, create=False) as st:
        st.write_batch(rows)


def _window(url: str, lo: int, hi: int) -> list[Any]:
    with Store(url, create=False) as st:
        return [r for r in st.record_rows(kind="interval", sid=SID) if lo <= r.start_ms < hi]


def _sum(recs: list[Any], lo: int, hi: int) -> int:
    return sum(r.mwh for r in recs if r.kind == "interval" and lo <= r.start_ms < hi)


def _lock(url: str, lo: int, hi: int, at: int) -> None:
    with Store(url, create=False) as st:
        take_lock(st, lo, hi, params=MeterParams(), decode=decode_row, by="auditor", now=lambda: at)


def _verify(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stationctl", "verify", "--db", url],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_two_sequential_locks_adjustments_and_verify(db_url: str) -> None:
    stream = _stream()
    # received as sent (recv = ts + 1 s), except from 20:00 on day 1 to lock 1 (02:00 on
    # day 2): a link down, delivered after the lock
    a1 = D0 + DAY + 2 * 3_600_000  # lock 1 (day 1) taken at 02:00 on day 2
    a2 = D0 + 2 * DAY + 2 * 3_600_000  # lock 2 (day 2) taken at 02:00 on day 3
    late1 = [i for i, (_, p) in enumerate(stream) if i and D0 + 20 * 3_600_000 <= _ts(p) < a1]

    def recv(i: int) -> int:
        if i in late1:
            return a1 + 60_000 + i  # after lock 1
        return _ts(stream[i][1]) + 1000 if i else D0 - 3_600_000

    rows, msgs = stored_rows(stream, recv)
    first = [r for r in rows if r.recv_ms <= a1]
    fill_store(db_url, first, [m for m in msgs if m.recv_ms <= a1])
    before = _window(db_url, D0, D0 + DAY)
    _lock(db_url, D0, D0 + DAY, a1)
    with Store(db_url, create=False) as st:
        (lk,) = load_locks(st)
    assert (lk.n, lk.from_ms, lk.to_ms, lk.at_ms, lk.by) == (1, D0, D0 + DAY, a1, "auditor")
    frozen1 = _window(db_url, D0, D0 + DAY)
    assert [(r.rid, r.mwh) for r in frozen1] == [(r.rid, r.mwh) for r in before]

    # the rest arrives (day 1's late part, day 2, day 3 up to the second lock)
    _add(db_url, [r for r in rows if a1 < r.recv_ms <= a2])
    _meter(db_url)
    assert _window(db_url, D0, D0 + DAY) == frozen1  # the locked day did not move
    adj = [r for r in _window(db_url, D0 + DAY, D0 + DAY + 900_000) if "adjustment" in r.flags]
    # what the late messages moved into day 1: all messages against those by the lock
    late_energy = _sum(compute(msgs), D0, D0 + DAY) - _sum(
        compute([m for m in msgs if m.recv_ms <= a1]), D0, D0 + DAY
    )
    assert late_energy > 900 * 3_600_000 // 3600 * 3  # over 3 h at 900 W
    assert len(adj) == 1 and adj[0].mwh == late_energy, adj
    assert _verify(db_url).returncode == 0

    # lock 2: day 2 frozen with its adjustment; day 1 still as locked
    _lock(db_url, D0 + DAY, D0 + 2 * DAY, a2)
    frozen2 = _window(db_url, D0 + DAY, D0 + 2 * DAY)
    assert any("adjustment" in r.flags and r.mwh == late_energy for r in frozen2)
    _add(db_url, [r for r in rows if r.recv_ms > a2])
    _meter(db_url)
    assert _window(db_url, D0, D0 + DAY) == frozen1
    assert _window(db_url, D0 + DAY, D0 + 2 * DAY) == frozen2
    # nothing late since lock 2: no adjustment in day 3, and the credit is all there once
    day3 = _window(db_url, D0 + 2 * DAY, D0 + 3 * DAY)
    assert not [r for r in day3 if "adjustment" in r.flags]
    with Store(db_url, create=False) as st:
        total = sum(r.mwh for r in st.record_rows(kind="interval", sid=SID))
    every = sum(r.mwh for r in compute(msgs) if r.kind == "interval")
    assert total == every  # each mWh once: in its window, or as an adjustment
    out = _verify(db_url)
    assert out.returncode == 0, out.stdout + out.stderr

    # a frozen record altered: verify names it
    with Store(db_url, create=False) as st, st.transaction() as db:
        db.execute("UPDATE locked_records SET mwh = mwh + 1 WHERE rid = ?", (frozen1[40].rid,))
    bad = _verify(db_url)
    assert bad.returncode == 1 and frozen1[40].rid in bad.stdout


def test_lock_rules(db_url: str) -> None:
    stream = _stream()
    rows, msgs = stored_rows(stream, lambda i: D0)
    fill_store(db_url, rows, msgs)
    now = D0 + 3 * DAY
    with Store(db_url, create=False) as st:
        for lo, hi, why in [
            (D0 + 1, D0 + DAY, "whole UTC days"),
            (D0 + DAY, D0, "after --from"),
            (D0, D0 + 5 * DAY, "has ended"),
        ]:
            with pytest.raises(PeriodError, match=why):
                take_lock(
                    st, lo, hi, params=MeterParams(), decode=decode_row, by="x", now=lambda: now
                )
        take_lock(
            st, D0, D0 + DAY, params=MeterParams(), decode=decode_row, by="x", now=lambda: now
        )
        with pytest.raises(PeriodError, match="in order"):
            take_lock(
                st,
                D0 + 2 * DAY,
                D0 + 3 * DAY,
                params=MeterParams(),
                decode=decode_row,
                by="x",
                now=lambda: now,
            )
    # the command line: list, and a lock out of order is exit 2 with one line
    p = subprocess.run(
        [sys.executable, "-m", "stationctl", "period", "list", "--db", db_url, "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert '"n": 1' in p.stdout and '"by": "x"' in p.stdout
    p = subprocess.run(
        [sys.executable, "-m", "stationctl", "period", "lock", "--db", db_url,
         "--from", "2025-11-29", "--to", "2025-11-30"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run(
        [sys.executable, "-m", "stationctl", "period", "lock", "--db", db_url,
         "--from", "2025-11-28", "--to", "2025-11-29", "--by", "verifier", "--note", "MR-1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "period 2 locked" in p.stdout


async def test_a_running_agent_picks_the_lock_up(tmp_path: Any) -> None:
    url = str(tmp_path / "agent.db")
    async with OcppAgent(url, {"OCPP-L": PASSWORD}) as ag:
        assert ag.svc is not None and ag.svc.meter.params.locked_until_ms is None
        await asyncio.to_thread(_lock_now, url)
        for _ in range(200):
            if ag.svc.meter.params.locked_until_ms == D0 + DAY:
                break
            await asyncio.sleep(0.1)
        assert ag.svc.meter.params.locked_until_ms == D0 + DAY
        assert ag.svc.counters["relocks"] == 1


def _lock_now(url: str) -> None:
    with Store(url, create=False) as st:
        take_lock(st, D0, D0 + DAY, params=MeterParams(), decode=decode_row, by="ops", wait_s=10)


def test_bundle_of_locked_periods_verifies(tmp_path: Any) -> None:
    """A verifier's bundle over locked periods recomputes each window as it was frozen."""
    url = str(tmp_path / "agent.db")
    stream = _stream()
    a1 = D0 + DAY + 2 * 3_600_000
    late = {i for i, (_, p) in enumerate(stream) if i and D0 + 20 * 3_600_000 <= _ts(p) < a1}

    def recv(i: int) -> int:
        return a1 + 60_000 + i if i in late else (_ts(stream[i][1]) + 1000 if i else D0)

    rows, msgs = stored_rows(stream, recv)
    fill_store(url, [r for r in rows if r.recv_ms <= a1], [m for m in msgs if m.recv_ms <= a1])
    _lock(url, D0, D0 + DAY, a1)
    _add(url, [r for r in rows if r.recv_ms > a1])
    _meter(url)
    out, keys = tmp_path / "b.zip", tmp_path / "keys.json"
    run = [sys.executable, "-m", "stationctl"]
    subprocess.run(
        [*run, "bundle", "--db", url, "--from", "2025-11-27", "--to", "2025-11-30",
         "--out", str(out), "--keys-out", str(keys)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    p = subprocess.run(
        [*run, "verify", "--bundle", str(out), "--keys", str(keys)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_station_sealed_into_the_archive_is_frozen_too(tmp_path: Any) -> None:
    """A lock freezes every station with raw messages, those whose months were all sealed
    into the archive (they left the live table) included."""
    from agent.archive.seal import seal

    url = f"sqlite:///{tmp_path / 'a.db'}"
    rows, msgs = stored_rows(_stream(), lambda i: D0)
    fill_store(url, rows, msgs)
    before = _window(url, D0, D0 + DAY)
    with Store(url, create=False) as st:
        rep = seal(st, now_ms=D0 + 60 * DAY)
        assert rep.sealed and st.raw_count() == 0  # November sealed: nothing live
    _lock(url, D0, D0 + DAY, D0 + 3 * DAY)
    frozen = _window(url, D0, D0 + DAY)
    assert before and [(r.rid, r.mwh) for r in frozen] == [(r.rid, r.mwh) for r in before]
    out = _verify(url)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("batch", [1, 7, 50])
def test_the_agents_meter_under_a_lock_equals_compute(tmp_path: Any, batch: int) -> None:
    """The agent's own path (StoreMeter, a transaction a batch) with a lock in force, live
    messages after it and late ones for the locked day: its records, the day that holds the
    adjustment and the days after it (rolled up from the state) included, are compute()'s."""
    from agent.ledger.agent_meter import StoreMeter

    stream = _stream()
    until, at = D0 + DAY, D0 + DAY + 2 * 3_600_000
    params = MeterParams(locked_until_ms=until, locked_at_ms=at)
    late = {i for i, (_, p) in enumerate(stream) if i and D0 + 20 * 3_600_000 <= _ts(p) < at}

    def recv(i: int) -> int:
        return at + 60_000 + i if i in late else (_ts(stream[i][1]) + 1000 if i else D0 - 3_600_000)

    rows, msgs = stored_rows(stream, recv)
    order = sorted(range(len(rows)), key=lambda i: rows[i].recv_ms)
    url = f"sqlite:///{tmp_path / 'a.db'}"
    checks = 0
    with Store(url) as st:
        meter = StoreMeter(params, st)
        for j in range(0, len(order), batch):
            part = [rows[i] for i in order[j : j + batch]]
            st.write_batch(part, then=lambda res, part=part: meter.add(
                [decode_row(part[k]) for k in res.new]))  # fmt: skip
            # as each commit leaves them (what verify beside the agent reads), now and then
            if j // batch % max(1, 12 // batch) == 0 or j + batch >= len(order):
                seen = [msgs[i] for i in order[: j + batch]]
                want = {r.rid: r for r in map(record_to_row, compute(seen, params))}
                got = {r.rid: r for r in st.record_rows()}
                assert got == want, j
                assert_days_roll_up(list(got.values()))
                checks += 1
    assert checks >= min(30, len(order) // batch)
    adj = [r for r in want.values() if "adjustment" in r.flags.split("|")]
    assert adj and adj[0].start_ms == until  # the late energy, in the first open interval
    assert len({r.start_ms for r in want.values() if r.kind == "day"}) >= 3
