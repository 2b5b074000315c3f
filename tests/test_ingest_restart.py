"""`stationctl agent` as a process, a real Mosquitto, a long stream: SIGKILL the agent
mid-stream and start it again, stop and restart the broker; the final export is the same,
byte for byte, as a clean run's. Nothing is lost (every message stored once) and nothing
is counted twice (redeliveries and resends are duplicates)."""

from __future__ import annotations

import os
import pathlib
import signal
import sqlite3
import subprocess
import threading
import time

from agent.keys import KeyStore
from tests.agent_helpers import STATIONCTL, Publisher, fleet_stream, key_for
from tests.helpers import ROOT
from tools.mosquitto import Mosquitto

N_STATIONS = 6
PER_STATION = 250


def write_config(d: pathlib.Path, port: int, client_id: str) -> pathlib.Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "agent.toml"
    cfg.write_text(
        f'[db]\nurl = "sqlite:///agent.db"\n\n'
        f'[broker]\nport = {port}\nclient_id = "{client_id}"\nkeepalive = 5\n\n'
        f"[ingest]\nrecords_interval_ms = 100\nkey_reload_s = 0.5\n"
    )
    with KeyStore(f"sqlite:///{d}/agent.db") as ks:
        for i in range(N_STATIONS):
            sid = f"KH-TST-{i:04d}"
            ks.add(sid, key_for(sid))
    return cfg


def start_agent(cfg: pathlib.Path) -> subprocess.Popen[bytes]:
    with open(cfg.parent / "agent.log", "ab") as log:
        return subprocess.Popen(
            [*STATIONCTL, "agent", "--config", str(cfg)],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def wait_subscribed(d: pathlib.Path, n: int = 1, timeout: float = 30.0) -> None:
    """Until the agent's log says it subscribed (the n-th time): what is published from
    then on waits in its session."""
    end = time.monotonic() + timeout
    while (d / "agent.log").read_text().count("subscribed to") < n:
        if time.monotonic() > end:
            raise AssertionError((d / "agent.log").read_text()[-3000:])
        time.sleep(0.05)


def raw_count(d: pathlib.Path) -> int:
    try:
        with sqlite3.connect(f"file:{d}/agent.db?mode=ro", uri=True, timeout=10) as c:
            return int(c.execute("SELECT COUNT(*) FROM raw").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def wait_count(d: pathlib.Path, n: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while raw_count(d) < n:
        if time.monotonic() > end:
            log = (d / "agent.log").read_text()[-3000:]
            raise AssertionError(f"only {raw_count(d)} of {n} stored; agent log:\n{log}")
        time.sleep(0.05)


def stop_agent(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0


def export(d: pathlib.Path, *args: str) -> bytes:
    r = subprocess.run(
        [*STATIONCTL, "export", "--db", f"sqlite:///{d}/agent.db", *args],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


EXPORTS = [
    ("--by", by, "--format", fmt)
    for by in ("interval", "session", "day")
    for fmt in ("csv", "json")
]


def test_sigkill_and_broker_restart_give_the_clean_export(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    stream = fleet_stream(N_STATIONS, PER_STATION)
    total = len(stream)

    # clean run: its own broker, the whole stream, a graceful stop
    clean_broker = Mosquitto(tmp_path / "mq-clean", insecure=True)
    clean_broker.start()
    try:
        clean = tmp_path / "clean"
        agent = start_agent(write_config(clean, clean_broker.port, "clean-agent"))
        try:
            wait_subscribed(clean)
            pub = Publisher(clean_broker.port, "clean-pub", window=200)
            pub.send(stream)
            pub.close()
            wait_count(clean, total)
        finally:
            stop_agent(agent)
    finally:
        clean_broker.stop()
    want = {a: export(clean, *a) for a in EXPORTS}
    assert b"KH-TST-0005" in want[EXPORTS[0]] and want[EXPORTS[2]].count(b"\n") > 6

    # chaos run: SIGKILL mid-stream, restart; broker stopped and started mid-stream
    chaos = tmp_path / "chaos"
    cfg = write_config(chaos, mosquitto.port, "chaos-agent")
    agent = start_agent(cfg)
    wait_subscribed(chaos)
    pub = Publisher(mosquitto.port, "chaos-pub", window=50)
    err: list[BaseException] = []

    def publish() -> None:
        try:
            pub.send(stream, timeout=120, pace_s=0.002)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            err.append(e)

    t = threading.Thread(target=publish)
    t.start()
    try:
        wait_count(chaos, total // 4)
        os.killpg(agent.pid, signal.SIGKILL)  # no goodbye, no flush
        agent.wait()
        killed_at = raw_count(chaos)
        time.sleep(0.5)  # the stream goes on into the broker's session
        agent = start_agent(cfg)
        assert killed_at < total // 2
        wait_count(chaos, killed_at + total // 4)
        mosquitto.stop()  # persistence saved; the agent and the publisher lose the link
        assert t.is_alive() and raw_count(chaos) < total  # mid-stream
        time.sleep(1.0)
        mosquitto.start()
        t.join(180)
        assert not t.is_alive() and not err, err
        wait_count(chaos, total, timeout=60)
        time.sleep(0.3)  # anything still arriving would be a duplicate: checked below
    finally:
        pub.close()
        if agent.poll() is None:
            stop_agent(agent)
    assert raw_count(chaos) == total  # all stored, each once
    log = (chaos / "agent.log").read_text()
    assert "replayed" in log and "disconnected" in log
    for a in EXPORTS:
        assert export(chaos, *a) == want[a], a


def test_agent_restart_replays_only_what_the_states_have_not_seen(tmp_path: pathlib.Path) -> None:
    """The agent's start-up replay on a database holding many messages reads no raw row
    its metering states have seen (they commit with the rows); rows committed behind a
    state (here: written without metering) are the only ones read."""
    from agent.config import AgentConfig, DbConfig
    from agent.ledger import MeterParams
    from agent.ledger.agent_meter import StoreMeter, decode_row
    from agent.service import Service
    from agent.sources.mqtt import BrokerConfig
    from agent.store import RawRow, Store
    from tests.agent_helpers import Station

    url = f"sqlite:///{tmp_path}/agent.db"
    sids = [f"KH-TST-{i:04d}" for i in range(N_STATIONS)]
    with KeyStore(url) as ks:
        for sid in sids:
            ks.add(sid, key_for(sid))
    store = Store(url, synchronous="off")
    meter = StoreMeter(MeterParams(), store)
    stations = [Station(sid, slots=4) for sid in sids]
    rows: list[RawRow] = []
    for _ in range(500):
        for st in stations:
            st.advance()
            kind, payload = st.telemetry()
            rows.append(RawRow(st.sid, st.boot, st.seq - 1, kind, "t", 1, 1, payload))
    for i in range(0, len(rows), 250):
        part = rows[i : i + 250]
        store.write_batch(
            part, then=lambda res, p=part: meter.add([decode_row(p[j]) for j in res.new])
        )
    # a few rows committed without metering (a crash between a commit and its metering)
    tail: list[RawRow] = []
    for st in stations[:2]:
        st.advance()
        kind, payload = st.telemetry()
        tail.append(RawRow(st.sid, st.boot, st.seq - 1, kind, "t", 1, 1, payload))
    store.write_batch(tail)
    store.close()

    cfg = AgentConfig(db=DbConfig(url=url, synchronous="normal"), broker=BrokerConfig(port=1))
    for want in (len(tail), 0):  # then a second restart reads nothing at all
        svc = Service(cfg)
        try:
            assert svc.replay() == want
            assert svc.store.raw_rows_read == want
        finally:
            svc.store.close()
            svc._ckpt_store.close()
            svc._keystore.store.close()
