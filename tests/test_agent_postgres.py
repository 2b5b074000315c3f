"""The agent on PostgreSQL when the database fails underneath it (a real Mosquitto, a
private PostgreSQL cluster of each test's own, so that it can be killed):

- the agent's export equals a SQLite agent's over the same messages, byte for byte;
- PostgreSQL SIGKILLed mid-stream and started again: nothing acknowledged while it is
  down, /healthz says failing, ingest resumes by itself, every message in raw once;
- the connection cut in the middle of a batch's transaction (pg_terminate_backend): the
  batch is rolled back, retried on a new connection, nothing lost or counted twice;
- PostgreSQL down when `stationctl agent` starts: it says so and waits, then ingests.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from agent.ledger.export import render
from agent.store import Store, row_to_record
from tests.agent_helpers import AgentProcess, stored_and_computed
from tests.test_agent_faults import (
    SID,
    _Agent,
    _fault_then_recover,
    _keys,
    _publish,
    _raw,
    _stream,
    _until,
)
from tools.mosquitto import Mosquitto
from tools.postgres import PgCluster


@pytest.fixture
def pg() -> Iterator[PgCluster]:
    """A cluster of this test's own (it gets killed); in a temporary directory of its own,
    which the `postgres` user can reach (pytest's tmp_path is root's alone)."""
    with PgCluster() as c:
        yield c


def _export(db: str) -> str:
    with Store(db, create=False) as st:
        recs = [row_to_record(r) for r in st.record_rows()]
    return render(recs, "csv", by="interval").decode() + render(recs, "csv", by="day").decode()


async def test_export_equals_the_sqlite_agents(
    mosquitto: Mosquitto, pg_cluster: PgCluster, tmp_path: pathlib.Path
) -> None:
    items = [x for b in (1, 2) for x in _stream(SID, 60, boot=b)]
    out = {}
    for name, db in (
        ("sqlite", f"sqlite:///{tmp_path}/a.db"),
        ("postgresql", pg_cluster.create_db()),
    ):
        _keys(db, SID)
        async with _Agent(db, mosquitto.port) as a:  # the first acknowledged all it read
            await _publish(mosquitto.port, items, f"pub-{name}")
            c = a.svc.counters
            await _until(lambda c=c: c["stored"] == len(items), what=str(c))
            await a.svc.flush()
        out[name] = _export(db)
    assert out["postgresql"] == out["sqlite"] and out["sqlite"].count("\n") >= 6


async def test_postgres_killed_mid_stream_resumes_by_itself(
    mosquitto: Mosquitto, pg: PgCluster
) -> None:
    db = pg.create_db("agent")
    _keys(db, SID)
    async with _Agent(db, mosquitto.port, health=True) as a:
        h = await _fault_then_recover(
            a,
            mosquitto.port,
            db,
            _stream(SID, 20),
            _stream(SID, 200, boot=2),
            pg.kill,
            pg.start,
        )
        assert h["last_error"], h
    with Store(db, create=False) as s:
        assert any(x[2] == "agent_db" for x in s.alarms())


async def test_connection_cut_mid_transaction_is_retried_on_a_new_one(
    mosquitto: Mosquitto, pg_cluster: PgCluster
) -> None:
    db = pg_cluster.create_db()
    _keys(db, SID)
    items = _stream(SID, 120)
    cuts: list[int] = []
    async with _Agent(db, mosquitto.port) as a:
        add = a.svc.meter.add

        def add_then_cut(msgs: Any) -> set[str]:
            out = add(msgs)
            if len(cuts) < 2:
                # inside the batch's transaction, after its raw rows and metering: the
                # writer's connection is terminated before COMMIT
                pid = a.svc.store.db._conn.info.backend_pid
                with psycopg.connect(db, autocommit=True) as other:
                    other.execute("SELECT pg_terminate_backend(%s)", (pid,))
                cuts.append(pid)
            return out

        a.svc.meter.add = add_then_cut  # type: ignore[method-assign]
        await _publish(mosquitto.port, items)
        c = a.svc.counters
        await _until(lambda: c["stored"] == len(items), 60, str(c))
        await a.svc.flush()
        assert len(cuts) == 2 and c["commit_failures"] >= 2, c
        assert c["duplicate"] == 0 and c["quarantined"] == 0, c
    got = _raw(db)
    assert sorted(got) == sorted(p for _, p in items)
    # the records equal the pure computation's over the raw messages: the batches whose
    # transaction was cut were metered once, on the new connection
    stored, computed = stored_and_computed(db)
    assert stored == computed


def test_postgres_down_at_start_the_agent_waits_then_ingests(
    mosquitto: Mosquitto, pg: PgCluster, tmp_path: pathlib.Path
) -> None:
    db = pg.create_db("agent")
    _keys(db, SID)
    pg.stop()
    agent = AgentProcess(tmp_path, db, mosquitto.port, client_id="pg-late").start()
    try:
        agent.wait_log("unreachable", 20, count=2)  # said, and tried again
        assert agent.proc.poll() is None
        pg.start()
        agent.wait_log("subscribed to", 30)
        items = _stream(SID, 30)
        asyncio.run(_publish(mosquitto.port, items))
        end = time.monotonic() + 30
        while len(_raw(db)) < len(items) and time.monotonic() < end:
            time.sleep(0.1)
        assert sorted(_raw(db)) == sorted(p for _, p in items)
    finally:
        agent.stop()
