"""Three agents on one Mosquitto and one PostgreSQL share the fleet (agent/cluster.py); one
of them is SIGKILLed and started again ten times while the stations publish.

- An independent subscriber records every message published: none is missing from raw.
- The records equal, byte for byte, those of a single agent on SQLite that took the same
  messages on a session of its own.
- Each station has one writer at a time: a shard lock per session; the time until a
  killed agent's shards are held again (takeover) is printed for each kill.
"""

from __future__ import annotations

import pathlib
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from agent.cluster import LOCK_CLASS
from agent.keys import KeyStore
from agent.ledger.export import render
from agent.store import Store, row_to_record
from tests.agent_helpers import (
    AgentProcess,
    Publisher,
    fleet_stream,
    key_for,
    stored_and_computed,
)
from tools.mosquitto import Mosquitto
from tools.postgres import PgCluster

SHARDS = 6
STATIONS = [f"KH-SHR-{i:04d}" for i in range(12)]  # fleet_stream's names
PER_STATION = 150
KILLS = 10


class Recorder:
    """Every message the broker passes on, on a persistent session of its own."""

    def __init__(self, port: int) -> None:
        self.got: set[bytes] = set()
        self.lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="recorder", clean_session=False)
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.subscribe("stations/+/+", qos=1)
        self.c.loop_start()

    def _on(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.add(bytes(m.payload))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _stream() -> list[tuple[str, bytes]]:
    """A simulated day of the fleet, accelerated: boot events, telemetry every 10 minutes,
    a charging session per slot and a reboot half-way (tests/agent_helpers.fleet_stream)."""
    return fleet_stream(len(STATIONS), PER_STATION, sid_base="KH-SHR", step_ms=600_000)


def _held(db: str) -> int:
    with psycopg.connect(db, autocommit=True) as c:
        row = c.execute(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
            "AND granted",
            (LOCK_CLASS,),
        ).fetchone()
    return int(row[0]) if row else 0


def _until(cond: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.02)
    return time.monotonic() - t0


def _raw(db: str) -> list[bytes]:
    with Store(db, create=False) as st:
        return [r.record for page in st.iter_raw() for r in page]


def _missing(db: str, items: list[tuple[str, bytes]], agents: list[AgentProcess]) -> str:
    """What raw lacks, by shard, and the agents' logs: the story of a failure."""
    from agent.cluster import shard_of

    have = set(_raw(db))
    gone = [t.split("/")[1] for t, p in items if p not in have]
    first = [i for i, (_, p) in enumerate(items) if p not in have][:10]
    by: dict[int, int] = {}
    for sid in gone:
        by[shard_of(sid, SHARDS)] = by.get(shard_of(sid, SHARDS), 0) + 1
    logs = "\n".join(f"--- agent {i}\n" + a.log.read_text()[-4000:] for i, a in enumerate(agents))
    return f"{len(gone)} message(s) missing from raw, by shard {by}, first at {first}\n{logs}"


def _export(db: str) -> bytes:
    with Store(db, create=False) as st:
        recs = [row_to_record(r) for r in st.record_rows()]
    return b"".join(render(recs, "csv", by=by) for by in ("interval", "day", "session"))


def test_three_agents_one_killed_ten_times_lose_nothing(
    mosquitto: Mosquitto, pg_cluster: PgCluster, tmp_path: pathlib.Path
) -> None:
    pg = pg_cluster.create_db()
    single = f"sqlite:///{tmp_path}/single.db"
    for db in (pg, single):
        with KeyStore(db) as ks:
            for s in STATIONS:
                ks.add(s, key_for(s))
    items = _stream()
    rec = Recorder(mosquitto.port)
    agents = []
    for i in range(3):
        d = tmp_path / f"a{i}"
        d.mkdir()
        extra = f'[cluster]\nshards = {SHARDS}\nbalance_s = 0.3\nagent_id = "a{i}"\n'
        agents.append(AgentProcess(d, pg, mosquitto.port, client_id="agents", extra=extra).start())
    (tmp_path / "single").mkdir()
    one = AgentProcess(tmp_path / "single", single, mosquitto.port, client_id="single").start()
    takeovers: list[float] = []
    try:
        one.wait_log("subscribed to")
        _until(lambda: _held(pg) == SHARDS, 30, "the shards are never all held")
        # every shard's session exists (subscribed) before the fleet publishes: what is
        # published before a session's first SUBSCRIBE is not kept for it, as for one agent
        _until(
            lambda: sum(a.log_text().count("subscribed to") for a in agents) >= SHARDS,
            30,
            "the shard sessions never all subscribed",
        )
        pub = Publisher(mosquitto.port, client_id="fleet")
        sender = threading.Thread(target=pub.send, args=(items, 240.0, 0.004), daemon=True)
        sender.start()
        for n in range(KILLS):
            time.sleep(1.2)
            victim = agents[n % 3]
            victim.kill()
            takeovers.append(_until(lambda: _held(pg) == SHARDS, 30, f"kill {n}: no takeover"))
            victim.start()
        sender.join(240)
        assert not sender.is_alive()
        pub.close()
        published = {p for _, p in items}
        try:
            _until(lambda: len(set(_raw(pg))) == len(published), 60, "raw never complete")
        except TimeoutError:
            raise AssertionError(_missing(pg, items, agents)) from None
        _until(lambda: len(_raw(single)) == len(published), 60, "the single agent lags")
        _until(lambda: rec.got >= published, 30, "the recorder missed messages")
        for a in agents:  # each holds its share again (the last one restarted too)
            a.wait_log("shards held", 30)
        for a in agents:
            assert a.stop()[1] == 0, a.log.read_text()[-3000:]
        assert one.stop()[1] == 0
    finally:
        rec.close()
        for a in [*agents, one]:
            a.kill()
    print(
        "takeover after each SIGKILL (s): "
        + ", ".join(f"{t:.2f}" for t in takeovers)
        + f"; max {max(takeovers):.2f}"
    )
    raw = _raw(pg)
    assert len(raw) == len(set(raw)) == len(published)  # each message stored once
    assert set(raw) == rec.got & published == published
    assert _export(pg) == _export(single)


def test_an_agent_whose_database_connection_is_cut_gives_its_shards_up(
    mosquitto: Mosquitto, pg_cluster: PgCluster, tmp_path: pathlib.Path
) -> None:
    # a partition between one agent and PostgreSQL: its locks go with its connection, the
    # other agent takes its shards; when it reconnects it must find them taken, close their
    # sessions and write none of their rows (one writer per station)
    pg = pg_cluster.create_db()
    with KeyStore(pg) as ks:
        for s in STATIONS:
            ks.add(s, key_for(s))
    items = _stream()
    agents = []
    for i in range(2):
        d = tmp_path / f"c{i}"
        d.mkdir()
        extra = f'[cluster]\nshards = 4\nbalance_s = 0.3\nagent_id = "c{i}"\n'
        agents.append(AgentProcess(d, pg, mosquitto.port, client_id="cut", extra=extra).start())
    try:
        _until(lambda: _held(pg) == 4, 30, "the shards are never all held")
        _until(
            lambda: sum(a.log_text().count("subscribed to") for a in agents) >= 4,
            30,
            "the shard sessions never all subscribed",
        )
        time.sleep(1.0)  # balanced: two shards each
        pub = Publisher(mosquitto.port, client_id="fleet-cut")
        sender = threading.Thread(target=pub.send, args=(items, 240.0, 0.004), daemon=True)
        sender.start()
        time.sleep(1.5)
        with psycopg.connect(pg, autocommit=True) as c:
            # its shards, its connection cut, and their locks taken here at once (as by
            # another agent quicker than its reconnect), held until it has given them up
            mine = [
                int(k)
                for (k,) in c.execute(
                    "SELECT l.objid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.classid = %s "
                    "AND a.application_name = 'agent-writer:c0'",
                    (LOCK_CLASS,),
                )
            ]
            assert len(mine) == 2, mine
            cut = c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'agent-writer:c0'"
            ).fetchall()
            assert cut == [(True,)]
            for k in mine:
                _until(
                    lambda k=k: c.execute(
                        "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, k)
                    ).fetchone()[0],
                    10,
                    f"shard {k} never free",
                )
            agents[0].wait_log("lost shard", 30)
        # released: the other agent takes them and their sessions' messages
        sender.join(240)
        pub.close()
        published = {p for _, p in items}
        _until(lambda: len(set(_raw(pg))) == len(published), 60, "raw never complete")
        for a in agents:
            assert a.stop()[1] == 0, a.log.read_text()[-3000:]
    finally:
        for a in agents:
            a.kill()
    raw = _raw(pg)
    assert len(raw) == len(set(raw)) == len(published)
    stored, computed = stored_and_computed(pg)
    assert stored == computed
