"""The agent service against a real Mosquitto: persistent session, acknowledgement only
after commit, keys changing while it runs, records equal to a from-scratch computation."""

from __future__ import annotations

import asyncio
import pathlib
import signal
import sqlite3
import time
from collections.abc import Callable

from agent import wire
from agent.config import AgentConfig, DbConfig, IngestConfig
from agent.keys import KeyStore
from agent.ledger import MeterParams, RawMsg, compute
from agent.service import Service
from agent.sources.mqtt import BrokerConfig
from agent.store import Store, record_to_row
from tests.agent_helpers import Publisher, Station, fleet_stream, key_for
from tests.test_ingest_restart import raw_count, start_agent, wait_subscribed, write_config
from tools.mosquitto import Mosquitto


async def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


def config(db: str, port: int, client_id: str = "svc-agent") -> AgentConfig:
    return AgentConfig(
        db=DbConfig(url=db, synchronous="normal"),
        broker=BrokerConfig(port=port, client_id=client_id, keepalive=5),
        ingest=IngestConfig(records_interval_ms=50, key_reload_s=0.2),
    )


async def publish(port: int, items: list[tuple[str, bytes]]) -> None:
    pub = Publisher(port, "svc-pub")
    try:
        await asyncio.to_thread(pub.send, items)
    finally:
        pub.close()


async def test_messages_sent_while_the_agent_is_down_arrive_and_records_match_compute(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    db = f"sqlite:///{tmp_path}/agent.db"
    stream = fleet_stream(3, 60, sid_base="KH-SVC")
    with KeyStore(db) as ks:
        for i in range(3):
            ks.add(f"KH-SVC-{i:04d}", key_for(f"KH-SVC-{i:04d}"))
    half = len(stream) // 2

    svc = Service(config(db, mosquitto.port))
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    await asyncio.wait_for(svc.ready.wait(), 20)
    await publish(mosquitto.port, stream[:half])
    await wait_for(lambda: svc.counters["stored"] >= half)
    stop.set()
    await task

    await publish(mosquitto.port, stream[half:])  # nobody listening: the session keeps them

    svc = Service(config(db, mosquitto.port))
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    await wait_for(lambda: svc.counters["stored"] >= len(stream) - half)
    await svc.flush()
    stop.set()
    await task
    assert svc.counters["duplicate"] == 0 and svc.counters["quarantined"] == 0

    with Store(db) as st:
        raw = [r for page in st.iter_raw() for r in page]
        assert sorted(r.record for r in raw) == sorted(p for _, p in stream)
        msgs = [
            RawMsg(
                sid=r.sid,
                boot=r.boot,
                seq=r.seq,
                recv_ms=r.recv_ms,
                body=wire.decode_record(r.record),
            )
            for r in raw
        ]
        want = sorted(record_to_row(r) for r in compute(msgs, MeterParams()))
        got = sorted(st.record_rows())
    assert len(want) > 20
    assert got == want  # incremental records, written in pieces, equal the whole computation


async def test_keys_added_and_revoked_while_running(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    db = f"sqlite:///{tmp_path}/agent.db"
    st = Station("KH-KEY-0001")
    svc = Service(config(db, mosquitto.port))
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    await asyncio.wait_for(svc.ready.wait(), 20)

    def tel() -> tuple[str, bytes]:
        st.advance()
        kind, p = st.telemetry()
        return st.topic(kind), p

    await publish(mosquitto.port, [tel()])
    await wait_for(lambda: svc.counters["q.unknown_station"] == 1)
    with KeyStore(db) as ks:  # e.g. the flashing tool, another connection
        ks.add(st.sid, st.key)
    await asyncio.sleep(1.1)  # a miss reloads at most once a second
    await publish(mosquitto.port, [tel(), tel()])
    await wait_for(lambda: svc.counters["stored"] == 2)
    with KeyStore(db) as ks:
        ks.revoke(st.sid)
    await asyncio.sleep(0.5)  # key_reload_s = 0.2
    await publish(mosquitto.port, [tel()])
    await wait_for(lambda: svc.counters["q.revoked_key"] == 1)
    stop.set()
    await task


def test_no_acknowledgement_before_commit(mosquitto: Mosquitto, tmp_path: pathlib.Path) -> None:
    # The database is locked, so the agent cannot commit what it receives; it is killed
    # in that state. Had it acknowledged on receipt, the broker would have forgotten the
    # messages: they must come again to the next agent.
    d = tmp_path / "a"
    cfg = write_config(d, mosquitto.port, "ack-agent")
    agent = start_agent(cfg)
    wait_subscribed(d)
    st = Station("KH-TST-0000", key=key_for("KH-TST-0000"))
    items = []
    for _ in range(20):
        st.advance()
        kind, p = st.telemetry()
        items.append((st.topic(kind), p))
    lock = sqlite3.connect(d / "agent.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the agent's writes now wait (busy_timeout)
    try:
        pub = Publisher(mosquitto.port, "ack-pub")
        pub.send(items)
        pub.close()
        time.sleep(1.0)  # received and waiting to commit
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert raw_count(d) == 0
    agent = start_agent(cfg)
    try:
        end = time.monotonic() + 30
        while raw_count(d) < 20 and time.monotonic() < end:
            time.sleep(0.05)
        assert raw_count(d) == 20
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
