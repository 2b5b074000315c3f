"""The agent when things go wrong underneath it (real Mosquitto, real SQLite files):

- a row SQLite cannot store (an integer beyond 64 bits that got past verification) is
  quarantined as `internal` with its exception's class, and the rest of its batch is stored;
- metering that raises for one station stops no other;
- a full disk (a small tmpfs) and a locked database (another connection in BEGIN EXCLUSIVE):
  nothing is acknowledged while it lasts, /healthz says failing, ingest resumes by itself
  afterwards, and every message published is in raw exactly once;
- SIGTERM ends `stationctl agent` within 5 s: idle, mid-backlog, and with the database
  locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent import ranges
from agent.config import AgentConfig, DbConfig, HealthConfig, IngestConfig
from agent.keys import KeyStore
from agent.service import Service
from agent.sources.mqtt import BrokerConfig, Delivery
from agent.store import Store
from tests.agent_helpers import (
    AgentProcess,
    Publisher,
    Station,
    key_for,
    signed,
    stored_and_computed,
)
from tests.helpers import free_port, in_ci
from tools.mosquitto import Mosquitto

SID = "KH-FLT-0001"
OTHER = "KH-FLT-0002"
HUGE = 34 * 10**40


def _stream(sid: str, n: int, pad: int = 0, boot: int = 1) -> list[tuple[str, bytes]]:
    st = Station(sid, slots=1, boot=boot)
    out = []
    for _ in range(n):
        st.advance()
        _, p = st.telemetry()
        if pad:
            m = json.loads(p[: p.rfind(b',"sig":"')] + b"}")
            p = signed(dict(m, pad="x" * pad), st.key)
        out.append((st.topic("telemetry"), p))
    return out


def _keys(db: str, *sids: str) -> None:
    with KeyStore(db) as ks:
        for sid in sids:
            ks.add(sid, key_for(sid))


async def _until(cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(what or "condition not met")
        await asyncio.sleep(0.02)


class _Agent:
    """A Service in this loop, its acknowledgements recorded (time, count)."""

    def __init__(self, db: str, port: int, *, health: bool = False) -> None:
        self.cfg = AgentConfig(
            db=DbConfig(url=db, synchronous="normal"),
            broker=BrokerConfig(port=port, client_id="fault-agent"),
            ingest=IngestConfig(records_interval_ms=50, batch_max=100),
            health=HealthConfig(port=free_port()) if health else None,
        )
        self.svc = Service(self.cfg)
        self.acks: list[tuple[float, int]] = []
        ack = self.svc.source.ack

        def record(ds: list[Delivery]) -> None:
            self.acks.append((time.monotonic(), len(ds)))
            ack(ds)

        self.svc.source.ack = record  # type: ignore[method-assign]
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Agent:
        self.task = asyncio.create_task(self.svc.run(self.stop))
        await asyncio.wait_for(self.svc.ready.wait(), 20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)

    async def healthz(self) -> tuple[int, dict[str, Any]]:
        return await asyncio.to_thread(self._healthz)

    def _healthz(self) -> tuple[int, dict[str, Any]]:
        assert self.cfg.health is not None
        url = f"http://127.0.0.1:{self.cfg.health.port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return int(r.status), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return int(e.code), json.loads(e.read())


async def _publish(port: int, items: list[tuple[str, bytes]], client_id: str = "fault-pub") -> None:
    pub = Publisher(port, client_id=client_id)
    try:
        await asyncio.to_thread(pub.send, items, 120.0)
    finally:
        pub.close()


def _raw(db: str) -> list[bytes]:
    with Store(db, create=False) as st:
        return [r.record for page in st.iter_raw() for r in page]


# ---- one message, one guarded step -------------------------------------------------------------


async def test_a_row_sqlite_cannot_hold_is_quarantined_and_the_batch_goes_on(
    mosquitto: Mosquitto, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what stopped the fleet: an integer beyond 64 bits reaching SQLite. Verification now
    # refuses it; widen its bound to let one through and see the committer isolate it.
    monkeypatch.setattr(ranges, "U31", 2**200)
    db = f"sqlite:///{tmp_path}/agent.db"
    _keys(db, SID, OTHER)
    good = _stream(SID, 60)
    st = Station(OTHER, slots=1, boot=HUGE)
    st.advance()
    poison = (st.topic("telemetry"), st.telemetry()[1])
    items = good[:30] + [poison] + good[30:]
    async with _Agent(db, mosquitto.port) as a:
        await _publish(mosquitto.port, items)
        c = a.svc.counters
        await _until(lambda: c["received"] >= len(items), what=str(c))
        await a.svc.flush()
        assert c["stored"] == len(good) and c["q.internal"] == 1, c
        assert c["commit_failures"] == 0  # never retried: found, quarantined, committed
        # ingest goes on
        more = _stream(SID, 5, boot=2)
        await _publish(mosquitto.port, more)
        await _until(lambda: c["stored"] == len(good) + 5, what=str(c))
    with Store(db, create=False) as s:
        q = s.quarantine_rows()
        assert [(r.reason, r.record, r.sid) for r in q] == [("internal", poison[1], OTHER)]
        assert q[0].detail.startswith("OverflowError while storing"), q[0].detail
        alarms = s.alarms()
        assert [(a[1], a[2]) for a in alarms] == [(OTHER, "internal")]
        assert "OverflowError" in alarms[0][4]
    assert sorted(_raw(db)) == sorted(p for _, p in good + more)


async def test_a_batch_that_fails_whatever_is_left_out_is_written_message_by_message(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    # the last resort: a write that fails for the whole batch (a bug outside any one row)
    # is redone one message per transaction; only the message that fails alone is kept in
    # quarantine, nothing is retried forever
    db = f"sqlite:///{tmp_path}/agent.db"
    _keys(db, SID)
    items = _stream(SID, 40)
    poison = items[17][1]
    async with _Agent(db, mosquitto.port) as a:
        write = a.svc._write

        def broken(b: Any, metering: bool = True) -> Any:
            if len(b.rows) > 1 or any(r.record == poison for r in b.rows):
                raise TypeError("a bug in writing")
            return write(b, metering)

        a.svc._write = broken  # type: ignore[method-assign]
        await _publish(mosquitto.port, items)
        c = a.svc.counters
        await _until(lambda: c["received"] >= len(items), what=str(c))
        await a.svc.flush()
        assert c["stored"] == len(items) - 1 and c["q.internal"] == 1, c
        assert c["commit_failures"] == 0
    with Store(db, create=False) as s:
        q = s.quarantine_rows()
        assert [(r.reason, r.record) for r in q] == [("internal", poison)]
        assert q[0].detail.startswith("TypeError while storing: a bug in writing")
    assert sorted(_raw(db)) == sorted(p for _, p in items if p != poison)


async def test_metering_that_raises_for_one_station_stops_no_other(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    db = f"sqlite:///{tmp_path}/agent.db"
    _keys(db, SID, OTHER)
    items = [x for pair in zip(_stream(SID, 40), _stream(OTHER, 40), strict=True) for x in pair]
    async with _Agent(db, mosquitto.port) as a:
        add = a.svc.meter.add

        def add_or_raise(msgs: Any) -> set[str]:
            msgs = list(msgs)
            if any(m.sid == OTHER for m in msgs):
                raise KeyError("a metering bug")
            return add(msgs)

        a.svc.meter.add = add_or_raise  # type: ignore[method-assign]
        await _publish(mosquitto.port, items)
        c = a.svc.counters
        await _until(lambda: c["received"] >= len(items), what=str(c))
        await a.svc.flush()
        assert c["stored"] == len(items) and c["meter_errors"] >= 1
    with Store(db, create=False) as s:
        sids = {r.sid for r in s.record_rows(kind="interval")}
        assert SID in sids and OTHER not in sids
        assert any(a[1] == OTHER and a[2] == "internal" and "metering" in a[4] for a in s.alarms())


async def test_a_station_whose_metering_raised_is_metered_again_from_raw(
    mosquitto: Mosquitto, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a metering bug that hit one station once: its raw is stored meanwhile, and the agent
    # meters it from raw again by itself (no restart), records as a clean run's
    from agent import service

    monkeypatch.setattr(service, "METER_RETRY_S", 0.5)
    db = f"sqlite:///{tmp_path}/agent.db"
    _keys(db, SID, OTHER)
    items = [x for pair in zip(_stream(SID, 40), _stream(OTHER, 40), strict=True) for x in pair]
    async with _Agent(db, mosquitto.port) as a:
        add = a.svc.meter.add
        faults = [1]

        def add_or_raise(msgs: Any) -> set[str]:
            msgs = list(msgs)
            if faults and any(m.sid == OTHER for m in msgs):
                faults.pop()
                raise KeyError("a metering bug, once")
            return add(msgs)

        a.svc.meter.add = add_or_raise  # type: ignore[method-assign]
        await _publish(mosquitto.port, items[:40])
        c = a.svc.counters
        await _until(lambda: c["meter_errors"] >= 1, what=str(c))
        await _publish(mosquitto.port, items[40:], "pub-more")  # stored, not metered yet
        await _until(lambda: c["stored"] == len(items) and c["meter_recovered"] == 1, 15, str(c))
        await a.svc.flush()
    stored, computed = stored_and_computed(db)
    assert stored == computed and OTHER.encode() in stored


# ---- the database fails underneath -------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        if in_ci():
            pytest.fail(f"cannot mount a tmpfs in CI: {r.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: pathlib.Path) -> pathlib.Path:
    """Fill the filesystem at `path` to the last byte."""
    f = path / "filler"
    chunk = b"\0" * 65536
    with f.open("wb", buffering=0) as fh:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    fh.write(chunk[:size])
                except OSError:
                    break
    return f


async def _fault_then_recover(
    a: _Agent,
    port: int,
    db: str,
    before: list[tuple[str, bytes]],
    during: list[tuple[str, bytes]],
    fault: Callable[[], None],
    clear: Callable[[], None],
) -> dict[str, Any]:
    c = a.svc.counters
    await _publish(port, before, "pub-before")
    await _until(lambda: c["stored"] == len(before), what=str(c))
    await a.svc.flush()
    fault()
    t_fault = time.monotonic()
    await _publish(port, during, "pub-during")
    await _until(lambda: a.svc.health.failing, 30, "never failing")
    status, h = await a.healthz()
    assert status == 503 and h["status"] == "failing" and h["failing_since_ms"], h
    assert h["last_error"] and h["pending"] > 0, h
    stored = c["stored"]
    await asyncio.sleep(2.0)  # it lasts: retried with backoff, nothing acknowledged
    assert c["stored"] == stored and a.svc.health.failing
    t_clear = time.monotonic()
    clear()
    await _until(lambda: c["stored"] == len(before) + len(during), 30, str(c))
    await _until(lambda: not a.svc.health.failing, 10)
    status, h2 = await a.healthz()
    assert status == 200 and h2["status"] == "ok" and h2["failing_since_ms"] is None, h2
    assert not [n for t, n in a.acks if t_fault + 0.5 < t < t_clear and n], a.acks
    assert c["commit_failures"] >= 2 and c["duplicate"] == 0 and c["quarantined"] == 0
    await a.svc.flush()
    got = _raw(db)
    assert len(got) == len(set(got)) == len(before) + len(during)
    assert set(got) == {p for _, p in before + during}
    return h


async def test_disk_full_stops_acknowledging_and_resumes_by_itself(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    with _tmpfs(tmp_path / "fs", "6m") as fs:
        db = f"sqlite:///{fs}/agent.db"
        _keys(db, SID)
        filler: list[pathlib.Path] = []
        async with _Agent(db, mosquitto.port, health=True) as a:
            h = await _fault_then_recover(
                a,
                mosquitto.port,
                db,
                _stream(SID, 20),
                _stream(SID, 600, pad=3000, boot=2),
                lambda: filler.append(_fill(fs)),
                lambda: filler[0].unlink(),
            )
            assert "full" in h["last_error"], h
        with Store(db, create=False) as s:
            assert any(x[2] == "agent_db" and "full" in x[4] for x in s.alarms())


async def test_locked_database_stops_acknowledging_and_resumes_by_itself(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    db = f"sqlite:///{tmp_path}/agent.db"
    _keys(db, SID)
    lock = sqlite3.connect(tmp_path / "agent.db", isolation_level=None, check_same_thread=False)
    async with _Agent(db, mosquitto.port, health=True) as a:
        h = await _fault_then_recover(
            a,
            mosquitto.port,
            db,
            _stream(SID, 20),
            _stream(SID, 200, boot=2),
            lambda: lock.execute("BEGIN EXCLUSIVE"),
            lambda: lock.execute("ROLLBACK"),
        )
        assert "locked" in h["last_error"], h
    lock.close()
    with Store(db, create=False) as s:
        assert any(x[2] == "agent_db" and "locked" in x[4] for x in s.alarms())


async def test_database_file_gone_stops_acknowledging_until_it_is_back(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    # a commit into a file deleted under the agent would succeed into nowhere: the agent
    # checks before each write that its file is still at its path
    dbp = tmp_path / "agent.db"
    db = f"sqlite:///{dbp}"
    _keys(db, SID)
    keep = tmp_path / "kept.db"  # the same file under another name (a hard link)

    def gone() -> None:
        os.link(dbp, keep)
        os.unlink(dbp)

    async with _Agent(db, mosquitto.port, health=True) as a:
        h = await _fault_then_recover(
            a,
            mosquitto.port,
            db,
            _stream(SID, 20),
            _stream(SID, 100, boot=2),
            gone,
            lambda: os.link(keep, dbp),
        )
        assert "gone" in h["last_error"], h


# ---- SIGTERM within 5 s --------------------------------------------------------------------------


def _count(db: pathlib.Path) -> int:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(c.execute("SELECT COUNT(*) FROM raw").fetchone()[0])
    finally:
        c.close()


def test_sigterm_within_5s_idle_mid_backlog_and_locked(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    dbp = tmp_path / "agent.db"
    db = f"sqlite:///{dbp}"
    _keys(db, SID, OTHER)
    times: dict[str, float] = {}

    # idle
    a = AgentProcess(tmp_path, db, mosquitto.port, client_id="term-agent").start()
    try:
        a.wait_log("subscribed to")
        time.sleep(0.5)
        times["idle"], rc = a.stop()
        assert rc == 0
    finally:
        a.kill()

    # mid-backlog: a backlog waits in the broker for the agent's session
    backlog = _stream(SID, 15_000, pad=200, boot=3)
    pub = Publisher(mosquitto.port, client_id="term-pub", window=500)
    pub.send(backlog, timeout=300)
    pub.close()
    a = AgentProcess(tmp_path, db, mosquitto.port, client_id="term-agent").start()
    try:
        a.wait_log("subscribed to")
        end = time.monotonic() + 60
        while _count(dbp) == 0 and time.monotonic() < end:
            time.sleep(0.01)
        n0 = _count(dbp)
        times["mid_backlog"], rc = a.stop()
        n1 = _count(dbp)
        assert rc == 0 and 0 < n0 and n1 < len(backlog), (n0, n1)
    finally:
        a.kill()

    # database locked while messages arrive: the agent is in its failing commit loop
    lock = sqlite3.connect(dbp, isolation_level=None)
    a = AgentProcess(tmp_path, db, mosquitto.port, client_id="term-agent").start()
    try:
        a.wait_log("subscribed to")
        lock.execute("BEGIN EXCLUSIVE")
        pub = Publisher(mosquitto.port, client_id="term-pub2")
        pub.send(_stream(OTHER, 50, boot=1), timeout=60)
        pub.close()
        end = time.monotonic() + 30
        while a.healthz()[0] != 503:
            assert time.monotonic() < end, a.log_text()[-2000:]
            time.sleep(0.1)
        times["locked"], rc = a.stop()
        assert rc == 0, a.log_text()[-2000:]
    finally:
        a.kill()
        lock.execute("ROLLBACK")
        lock.close()

    # nothing lost: a last run takes in the whole backlog and the locked-out messages
    a = AgentProcess(tmp_path, db, mosquitto.port, client_id="term-agent").start()
    try:
        want = len(backlog) + 50
        end = time.monotonic() + 120
        while _count(dbp) < want:
            assert time.monotonic() < end, (_count(dbp), want)
            time.sleep(0.2)
        times["after_catch_up"], rc = a.stop()
    finally:
        a.kill()
    c = sqlite3.connect(f"file:{dbp}?mode=ro", uri=True)
    recs = [bytes(r[0]) for r in c.execute("SELECT record FROM raw")]
    c.close()
    assert len(recs) == len(set(recs)) == len(backlog) + 50
    print(json.dumps({"sigterm_s": {k: round(v, 3) for k, v in times.items()}}))
    assert all(v < 5.0 for v in times.values()), times
    assert os.path.exists(dbp)


def test_the_watchdog_ends_a_process_that_does_not_stop() -> None:
    # the last line of defence after SIGTERM: whatever holds the process, it is gone at
    # the deadline with exit status 1
    import sys

    code = (
        "import time, stationctl.agent as a\n"
        "a.STOP_DEADLINE_S = 0.3\n"
        "a._watchdog()\n"
        "time.sleep(30)\n"
    )
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and time.monotonic() - t0 < 10
    assert "exiting now" in r.stderr
