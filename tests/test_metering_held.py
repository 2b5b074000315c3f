"""Metering held back (agent/service.py `_plan`, docs/agent.md): a station's committed
messages wait for its next metering step; its records are always those of its raw rows up
to its state's key, which `stationctl verify` recomputes beside the agent; a late message
meters its station at once; a crash loses nothing held; due stations spread out."""

from __future__ import annotations

import asyncio
import json
import pathlib
import sqlite3
import subprocess
import time
import zipfile
from typing import Any

import pytest

from agent import service
from agent.config import AgentConfig, DbConfig, IngestConfig
from agent.keys import KeyStore
from agent.ledger.agent_meter import metered_keys
from agent.ledger.inputs import raw_msg
from agent.service import Service, _Plan
from agent.sources.mqtt import BrokerConfig
from agent.store import Store
from tests.agent_helpers import (
    STATIONCTL,
    AgentProcess,
    Publisher,
    Station,
    key_for,
    stored_and_computed,
)
from tests.helpers import ROOT
from tools.mosquitto import Mosquitto

SID = "KH-HLD-0001"
LONG_MS = 120_000  # no step falls due during a test


def _stream(n: int) -> list[tuple[str, bytes]]:
    st = Station(SID, slots=2)
    out = []
    for _ in range(n):
        st.advance()
        out.append((st.topic("telemetry"), st.telemetry()[1]))
    return out


def _key(payload: bytes) -> tuple[int, int]:
    body = json.loads(payload[: payload.rfind(b',"sig":"')] + b"}")
    return body["boot"], body["seq"]


def _stationctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*STATIONCTL, *args], cwd=ROOT, capture_output=True, timeout=120, check=False
    )


def _verify(url: str) -> dict[str, Any]:
    r = _stationctl("verify", "--db", url, "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def _raw_count(url: str) -> int:
    with Store(url, create=False) as st:
        return st.raw_count()


async def _until(cond: Any, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met"
        await asyncio.sleep(0.02)


async def test_records_follow_raw_up_to_the_state_key_and_a_late_message_meters_at_once(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    url = f"sqlite:///{tmp_path}/agent.db"
    with KeyStore(url) as ks:
        ks.add(SID, key_for(SID))
    items = _stream(30)
    cfg = AgentConfig(
        db=DbConfig(url=url, synchronous="normal"),
        broker=BrokerConfig(port=mosquitto.port, client_id="held-agent"),
        ingest=IngestConfig(records_interval_ms=LONG_MS),
    )
    svc = Service(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    pub = Publisher(mosquitto.port)
    try:
        await asyncio.wait_for(svc.ready.wait(), 20)
        c = svc.counters
        # a station without a state is metered at once: its state is made
        await asyncio.to_thread(pub.send, items[10:11])
        await _until(lambda: c["stored"] == 1)
        assert metered_keys(svc.store) == {SID: _key(items[10][1])}
        # the next ones are committed and held: records stay those of the first
        await asyncio.to_thread(pub.send, items[11:])
        await _until(lambda: c["stored"] == 20)
        assert metered_keys(svc.store) == {SID: _key(items[10][1])}
        assert svc._held_n == 19 and svc.health.snapshot()["held"] == 19
        assert b"stationctl_agent_metering_held_messages 19.0" in svc.health.metrics()
        s = await asyncio.to_thread(_verify, url)
        assert s["ok"] and s["raw"] == s["verified"] == 20 and s["held"] == 19, s
        # messages below the metered key (late): the station's step runs in their commit,
        # with everything it held
        await asyncio.to_thread(pub.send, items[:10])
        await _until(lambda: c["stored"] == 30)
        assert metered_keys(svc.store) == {SID: _key(items[-1][1])}
        assert svc._held_n == 0
        s = await asyncio.to_thread(_verify, url)
        assert s["ok"] and s["raw"] == 30 and s["held"] == 0, s
    finally:
        pub.c.loop_stop()
        stop.set()
        await asyncio.wait_for(task, 20)
    stored, computed = stored_and_computed(url)
    assert stored == computed and stored.count(b"\n") > 2


def test_a_crash_loses_no_held_message(mosquitto: Mosquitto, tmp_path: pathlib.Path) -> None:
    url = f"sqlite:///{tmp_path}/agent.db"
    with KeyStore(url) as ks:
        ks.add(SID, key_for(SID))
    items = _stream(40)
    agent = AgentProcess(tmp_path, url, mosquitto.port, records_ms=LONG_MS).start()
    pub = Publisher(mosquitto.port)
    try:
        agent.wait_log("subscribed", 30)
        pub.send(items[:1])
        end = time.monotonic() + 30
        while _raw_count(url) < 1 or SID not in metered_keys(Store(url, create=False)):
            assert time.monotonic() < end
            time.sleep(0.05)
        pub.send(items[1:])
        while _raw_count(url) < len(items):
            assert time.monotonic() < end
            time.sleep(0.05)
        agent.kill()  # SIGKILL: 39 messages committed, acknowledged and not metered
    finally:
        pub.c.loop_stop()
        agent.kill()
    s = _verify(url)
    assert s["ok"] and s["raw"] == s["verified"] == len(items), s
    assert s["held"] == len(items) - 1
    # a held message is verified all the same: a changed byte in one fails the run
    db = sqlite3.connect(tmp_path / "agent.db")
    rid, rec = db.execute("SELECT id, record FROM raw ORDER BY id DESC LIMIT 1").fetchone()
    db.execute("UPDATE raw SET record = ? WHERE id = ?", (rec.replace(b'"up":', b'"up":1'), rid))
    db.commit()
    r = _stationctl("verify", "--db", url, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["bad_signatures"] == 1, r.stdout
    db.execute("UPDATE raw SET record = ? WHERE id = ?", (rec, rid))
    db.commit()
    db.close()
    stored, computed = stored_and_computed(url)
    assert stored != computed  # the records do lag
    # a bundle holds the raw rows its records are made of, and verifies
    out, keys = tmp_path / "b.zip", tmp_path / "keys.json"
    day = ["--from", "2025-11-26", "--to", "2025-11-27"]
    r = _stationctl("bundle", "--db", url, *day, "--out", str(out), "--keys-out", str(keys))
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(out) as z:
        assert len(z.read("raw.jsonl").splitlines()) == 1
    r = _stationctl("verify", "--bundle", str(out), "--keys", str(keys), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], (r.stdout, r.stderr)
    # the restart meters what was held (rows above the state's key)
    again = AgentProcess(tmp_path, url, mosquitto.port, client_id="held-again").start()
    try:
        again.wait_log("subscribed", 30)
    finally:
        _s, rc = again.stop()
    assert rc == 0
    s = _verify(url)
    assert s["ok"] and s["raw"] == len(items) and s["held"] == 0, s
    stored, computed = stored_and_computed(url)
    assert stored == computed


def test_due_stations_spread_out_and_a_commit_takes_a_few(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ing = IngestConfig(records_interval_ms=1000, records_sids_per_commit=16)
    svc = Service(AgentConfig(db=DbConfig(url=f"sqlite:///{tmp_path}/a.db"), ingest=ing))
    metered: list[str] = []
    step_s = [0.0]

    def add(msgs: list[Any]) -> set[str]:  # a station's step, as long as step_s says
        metered.append(msgs[0].sid)
        time.sleep(step_s[0])
        return {msgs[0].sid}

    monkeypatch.setattr(svc.meter, "add", add)
    db = svc.store.db

    def write_plan() -> _Plan:
        """What a write with no new message meters (rolled back: no raw to commit)."""
        db.execute("BEGIN")
        try:
            plan = svc._plan([])
            svc._meter_plan(plan, set())
        finally:
            db.execute("ROLLBACK")
        svc._hold(plan)
        return plan

    try:
        sids = [f"KH-HLD-{i:04d}" for i in range(200)]
        hold = {s: [raw_msg(s, 1, 1, 0, {"up": 1})] for s in sids}
        svc._hold(_Plan({}, hold, 0.0, [], False))
        due = dict(svc._due)
        assert svc._held_n == 200 and set(due) == set(sids)
        assert all(0.5 <= t < 1.5 for t in due.values())  # 0.5-1.5 x the interval
        assert len(set(due.values())) > 150  # a station's own factor, not one for all
        assert svc._held_due == min(due.values())
        soonest = sorted(sids, key=due.__getitem__)
        # all due now (time 0 was long ago): the soonest 16 in one write, quick steps
        plan = write_plan()
        assert sorted(plan.now) == sorted(soonest[:16]) and metered == soonest[:16]
        assert svc._held_n == 184 and not set(plan.now) & set(svc._held)
        assert svc._held_due == due[soonest[16]]
        # slow steps (3 ms): the write stops once its budget (5 ms) is spent, at least one
        step_s[0] = 0.003
        metered.clear()
        plan = write_plan()
        assert metered == soonest[16:18] and sorted(plan.now) == sorted(soonest[16:18])
        assert svc._held_n == 182 and svc._held_due == due[soonest[18]]
        step_s[0] = 0.02
        metered.clear()
        write_plan()
        assert metered == soonest[18:19]
        # too much held (over HOLD_MAX): the soonest stations, budget and cap aside, until
        # 3/4 of it is left
        step_s[0] = 0.001
        monkeypatch.setattr(service, "HOLD_MAX", 100)
        metered.clear()
        write_plan()
        assert metered == soonest[19:125] and svc._held_n == 75
        monkeypatch.setattr(service, "HOLD_MAX", 20_000)
        soonest = soonest[:19] + soonest[125:]
        svc._unhold(lambda s: s.endswith("7"))
        assert set(svc._held) == {s for s in soonest[19:] if s.endswith("7")}
        assert svc._held_n == len(svc._held)
        assert svc._held_due == min(due[s] for s in svc._held)
        svc._unhold()
        assert svc._held_n == 0 and not svc._due and svc._held_due == float("inf")
    finally:
        svc.store.close()
