"""firmware/mqtt_client.py on the real MicroPython interpreter (two tests on CPython too)
against a real Mosquitto (fixture `mosquitto`) checked by a paho subscriber, and against
tests/fake_broker.py for what a real broker will not do on demand (lost PUBACKs,
malformed and hostile replies).

Each test runs tests/mp_scripts/mqtt_publish.py (options as one JSON argument), which
prints one JSON line per event: "connect" (every (re)connect), "msg", and a final
"done"/"timeout" with the client's counters.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.fake_broker import FakeBroker, RecordingProxy
from tests.helpers import free_port, micropython_bin
from tools.mosquitto import Mosquitto, find_mosquitto

SCRIPT = pathlib.Path(__file__).parent / "mp_scripts" / "mqtt_publish.py"


class MP:
    """The MicroPython client process and its event lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.stderr = b""

    @classmethod
    async def start(cls, cpython: bool = False, **opts: Any) -> MP:
        interp = [sys.executable] if cpython else [micropython_bin(), "-X", "heapsize=256k"]
        proc = await asyncio.create_subprocess_exec(
            *interp,
            str(SCRIPT),
            json.dumps(opts),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def next(self, ev: str, timeout: float = 30) -> dict[str, Any]:
        """The next event line of this kind (fails on exit or timeout)."""
        assert self.proc.stdout
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                assert self.proc.stderr
                self.stderr = await self.proc.stderr.read()
                raise AssertionError(f"micropython exited: {self.stderr.decode()[-3000:]}")
            e = json.loads(line)
            self.events.append(e)
            if e["ev"] == ev or (ev == "done" and e["ev"] == "timeout"):
                return e

    async def finish(self, timeout: float = 60) -> dict[str, Any]:
        e = await self.next("done", timeout)
        await asyncio.wait_for(self.proc.wait(), 10)
        return e

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
async def mp_procs() -> Any:
    procs: list[MP] = []

    async def start(cpython: bool = False, **opts: Any) -> MP:
        p = await MP.start(cpython, **opts)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        await p.proc.wait()


class Subscriber:
    """A paho client on Mosquitto with a persistent session, collecting what arrives."""

    def __init__(self, port: int, topic: str, client_id: str = "checker") -> None:
        self.q: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        self.c.on_message = lambda _c, _u, m: self.q.put(m)
        self.c.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(topic, 1)
        self.c.on_subscribe = lambda *_: self.subscribed.set()
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.connect("127.0.0.1", port, 60)
        self.c.loop_start()
        assert self.subscribed.wait(10), "subscriber never subscribed"

    def take(self, n: int, timeout: float = 30) -> list[mqtt.MQTTMessage]:
        out = []
        for _ in range(n):
            out.append(self.q.get(timeout=timeout))
        return out

    async def wait_count(self, n: int, timeout: float = 30) -> list[mqtt.MQTTMessage]:
        return await asyncio.to_thread(self.take, n, timeout)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def subscriber(mosquitto: Mosquitto) -> Iterator[Any]:
    subs: list[Subscriber] = []

    def make(topic: str) -> Subscriber:
        s = Subscriber(mosquitto.port, topic, f"checker-{len(subs)}")
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.close()


def index(m: mqtt.MQTTMessage) -> int:
    return int(m.payload[:6])


# ---- against Mosquitto ----------------------------------------------------------------


@pytest.mark.parametrize("cpython", [False, True], ids=["micropython", "cpython"])
async def test_publish_n_qos1_all_arrive_all_acked(
    mosquitto: Mosquitto, subscriber: Any, mp_procs: Any, cpython: bool
) -> None:
    sub = subscriber("test/mp")
    n = 300
    mp = await mp_procs(cpython, port=mosquitto.port, n=n, size=600, topic="test/mp")
    done = await mp.finish()
    assert done["ev"] == "done", done
    assert done["acked"] == n and done["refs"] == n
    c = done["c"]
    assert (c["retransmits"], c["dup_acks"], c["proto_errors"], c["io_errors"]) == (0, 0, 0, 0)
    assert c["internal_errors"] == 0 and c["cb_errors"] == 0
    assert (c["connects"], c["reconnects"], c["inflight"]) == (1, 0, 0)
    got = await sub.wait_count(n)
    assert [index(m) for m in got] == list(range(n))  # one publisher at QoS 1: in order
    assert all(len(m.payload) == 600 and m.qos == 1 for m in got)
    assert sub.q.empty()


async def test_broker_restart_mid_stream_every_message_arrives_dup_retransmits(
    mosquitto: Mosquitto, subscriber: Any, mp_procs: Any
) -> None:
    sub = subscriber("test/mp")
    proxy = RecordingProxy(mosquitto.port)
    await proxy.start()
    try:
        n = 300
        window = 16
        mp = await mp_procs(
            port=proxy.port, n=n, size=200, topic="test/mp", gap_ms=5, window=window
        )
        seen = {index(m) for m in await sub.wait_count(50)}
        # Swallow Mosquitto's PUBACKs: the client fills its window and stops, holding
        # exactly `window` messages the broker has (and persists) but it never saw acked.
        proxy.drop_pubacks = True
        for _ in range(200):
            if proxy.dropped >= window:
                break
            await asyncio.sleep(0.05)
        assert proxy.dropped == window
        await asyncio.sleep(0.3)
        assert proxy.dropped == window  # the window is the bound: nothing more was sent
        before = len(proxy.conns)
        mosquitto.stop()
        await asyncio.sleep(1.5)  # the client retries against a dead upstream meanwhile
        proxy.drop_pubacks = False
        mosquitto.start()
        done = await mp.finish()
        assert done["ev"] == "done" and done["refs"] == n, done
        c = done["c"]
        assert c["reconnects"] >= 2 and c["connects"] >= 2 and c["io_errors"] >= 2
        assert c["retransmits"] >= window and c["internal_errors"] == 0

        # every message arrives at least once
        while len(seen) < n:
            seen |= {index(m) for m in await sub.wait_count(1, timeout=30)}
        assert seen == set(range(n))

        # the first publishes on the connection after the restart are the held window,
        # DUP set, same packet ids and same bytes as first sent, in the original order
        first_sent = [p for c_ in proxy.conns[:before] for p in c_.publishes]
        held = [p for p in first_sent if not p.dup][-window:]
        after = next(c_ for c_ in proxy.conns[before:] if c_.publishes)
        resent = after.publishes[:window]
        assert all(p.dup for p in resent)
        assert [(p.pid, p.without_dup()) for p in resent] == [(p.pid, p.raw) for p in held]
        assert not any(p.dup for p in after.publishes[window:])
    finally:
        await proxy.stop()


async def test_last_will_published_when_micropython_is_killed(
    mosquitto: Mosquitto, subscriber: Any, mp_procs: Any
) -> None:
    sub = subscriber("test/will/#")
    will = ["test/will/st1", '{"v":1,"sid":"st1","boot":3,"state":"offline"}', 1, True]
    mp = await mp_procs(port=mosquitto.port, client_id="st1", user="st1", will=will, hold=True)
    await mp.next("connect")
    await asyncio.sleep(0.2)
    assert sub.q.empty()  # no will while the station is up
    mp.proc.send_signal(signal.SIGKILL)
    (m,) = await sub.wait_count(1, timeout=15)
    assert (m.topic, m.payload, m.qos) == (will[0], will[1].encode(), 1)


async def test_no_will_after_a_clean_disconnect(
    mosquitto: Mosquitto, subscriber: Any, mp_procs: Any
) -> None:
    sub = subscriber("test/will/#")
    will = ["test/will/st2", "offline", 1, False]
    mp = await mp_procs(port=mosquitto.port, client_id="st2", will=will, n=1, topic="test/x")
    assert (await mp.finish())["ev"] == "done"
    await asyncio.sleep(1.0)
    assert sub.q.empty()


async def test_subscribed_message_arrives_and_is_acked(mosquitto: Mosquitto, mp_procs: Any) -> None:
    mp = await mp_procs(
        port=mosquitto.port, client_id="st3", sub="test/cmd/st3", hold=True, ping=True
    )
    await mp.next("connect")
    assert (await mp.next("ping"))["ms"] >= 0  # a PINGRESP came back
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="operator")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        await asyncio.sleep(0.3)  # the SUBSCRIBE is sent right after CONNACK
        info = pub.publish("test/cmd/st3", b'{"cmd":"config"}', qos=1)
        await asyncio.to_thread(info.wait_for_publish, 10)
        msg = await mp.next("msg")
        assert (msg["topic"], msg["payload"]) == ("test/cmd/st3", '{"cmd":"config"}')
    finally:
        pub.loop_stop()
        pub.disconnect()


# ---- against the fake broker ----------------------------------------------------------


@pytest.mark.parametrize("cpython", [False, True], ids=["micropython", "cpython"])
async def test_lost_puback_resent_with_dup_same_pid_same_bytes(
    mp_procs: Any, cpython: bool
) -> None:
    broker = FakeBroker(["drop_puback"])
    await broker.start()
    try:
        mp = await mp_procs(cpython, port=broker.port, n=3, size=100, topic="test/lost")
        done = await mp.finish()
        assert done["ev"] == "done" and done["refs"] == 3, done
        first, second = broker.conns[0], broker.conns[1]
        assert first.mode == "drop_puback" and second.mode == "good"
        lost = first.publishes
        assert lost and not any(p.dup for p in lost)
        resent = second.publishes[: len(lost)]
        assert all(p.dup for p in resent)
        # byte-identical apart from the DUP bit: same packet id, topic and payload
        assert [p.without_dup() for p in resent] == [p.raw for p in lost]
        assert [p.pid for p in resent] == [p.pid for p in lost]
        # every message reached the broker, and nothing new went out before the resends
        assert {p.payload[:6] for p in second.publishes} == {b"000000", b"000001", b"000002"}
        dups = [p.dup for p in second.publishes]
        assert dups == sorted(dups, reverse=True)
        assert done["c"]["retransmits"] >= len(lost)
        assert done["c"]["io_errors"] >= 1
    finally:
        await broker.stop()


HOSTILE_MODES = [
    "malformed_connack",
    "wrong_rl",
    "huge_rl",
    "varint5",
    "garbage",
    "bad_puback",
    "refuse",
    "silent",
    "close",
]


async def test_hostile_broker_never_crashes_the_client(mp_procs: Any) -> None:
    broker = FakeBroker(list(HOSTILE_MODES))
    await broker.start()
    try:
        mp = await mp_procs(
            port=broker.port,
            n=2,
            topic="test/hostile",
            connect_timeout_ms=1000,
            backoff_min_ms=50,
            backoff_max_ms=300,
        )
        done = await mp.finish(timeout=60)
        assert done["ev"] == "done" and done["refs"] == 2, done
        c = done["c"]
        # five malformed replies before CONNACK and the bad PUBACK: each a protocol error
        assert c["proto_errors"] == 6, c
        assert c["refused"] == 1 and c["timeouts"] >= 1 and c["io_errors"] >= 1, json.dumps(done)
        assert c["reconnects"] >= len(HOSTILE_MODES) and c["connects"] >= 2, c
        assert c["internal_errors"] == 0, c  # every failure was classified, none was a bug
        assert [x.mode for x in broker.conns[: len(HOSTILE_MODES)]] == HOSTILE_MODES
        # the publish cut off by the bad PUBACK was resent on a good connection
        good = [x for x in broker.conns if x.mode == "good"]
        payloads = {p.payload[:6] for x in good for p in x.publishes}
        assert payloads == {b"000000", b"000001"}
    finally:
        await broker.stop()


async def test_keepalive_pings_and_detects_a_dead_broker(mp_procs: Any) -> None:
    broker = FakeBroker(["no_pingresp"])
    await broker.start()
    try:
        mp = await mp_procs(port=broker.port, keepalive=1, hold=True, deadline_ms=4500)
        done = await mp.finish(timeout=30)
        c = done["c"]
        # the first connection never answers PINGREQ: dead after keepalive x 1.5
        assert c["timeouts"] >= 1 and c["connects"] >= 2, c
        assert broker.conns[0].count(12) >= 2  # PINGREQ at keepalive / 2
        # the good connection answers and stays up
        assert broker.conns[1].mode == "good" and broker.conns[1].count(12) >= 3
        assert c["connects"] == 2, c
    finally:
        await broker.stop()


async def test_backoff_doubles_with_jitter_and_caps(mp_procs: Any) -> None:
    broker = FakeBroker(default="close")  # every connection is closed at once
    await broker.start()
    try:
        mp = await mp_procs(
            port=broker.port,
            n=1,
            backoff_min_ms=100,
            backoff_max_ms=400,
            deadline_ms=3000,
        )
        done = await mp.finish(timeout=30)
        assert done["ev"] == "timeout" and done["c"]["connects"] == 0
        c = done["c"]
        # every attempt failed and was counted; the broker may also have seen the TCP
        # connection of one more attempt that the deadline cut before it was counted
        assert c["io_errors"] == c["attempts"], c
        assert c["attempts"] <= len(broker.conns) <= c["attempts"] + 1, (c, len(broker.conns))
        gaps = [b.t - a.t for a, b in zip(broker.conns, broker.conns[1:], strict=False)]
        want = [min(100 * 2**i, 400) / 1000 for i in range(len(gaps))]
        # never sooner than the backoff less its jitter (slow scheduling only adds)
        assert all(g >= 0.75 * w - 0.01 for g, w in zip(gaps, want, strict=False)), gaps
        # capped: no gap near the uncapped 800, 1600 ms...
        assert all(g < 0.5 + 0.5 for g in gaps[3:]), gaps
        # 3 s of doubling-then-capped retries: about 9 attempts, not hundreds
        assert 4 <= len(broker.conns) <= 12, gaps
        assert len({round(g, 2) for g in gaps[3:]}) > 1, gaps  # jittered, not in lockstep
    finally:
        await broker.stop()


# ---- TLS ------------------------------------------------------------------------------


def _make_ca(d: pathlib.Path, name: str) -> None:
    def ssl_(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ssl_(
        "req",
        "-x509",
        *ec,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
    )
    ssl_("x509", "-in", f"{name}.pem", "-outform", "DER", "-out", f"{name}.der")


@pytest.fixture
def tls_broker(tmp_path: pathlib.Path) -> Iterator[tuple[int, pathlib.Path]]:
    """Mosquitto with a TLS listener whose certificate test-ca signed (also for 127.0.0.1)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    _make_ca(tmp_path, "test-ca")
    _make_ca(tmp_path, "other-ca")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "test-ca.pem",
        "-CAkey",
        "test-ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    port = free_port()
    conf = [
        f"listener {port} 127.0.0.1",
        f"cafile {tmp_path}/test-ca.pem",
        f"certfile {tmp_path}/server.pem",
        f"keyfile {tmp_path}/server.key",
        "allow_anonymous true",
    ]
    if os.geteuid() == 0:
        conf.append("user root")
    (tmp_path / "tls.conf").write_text("\n".join(conf) + "\n")
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(tmp_path / "tls.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "no TLS broker"
                time.sleep(0.05)
        yield port, tmp_path
    finally:
        proc.kill()
        proc.wait()


async def test_tls_verified_broker(tls_broker: tuple[int, pathlib.Path], mp_procs: Any) -> None:
    port, d = tls_broker
    mp = await mp_procs(port=port, n=20, size=600, tls_ca=str(d / "test-ca.der"))
    done = await mp.finish()
    assert done["ev"] == "done" and done["refs"] == 20, done
    assert done["c"]["connects"] == 1


async def test_tls_wrong_ca_never_connects(
    tls_broker: tuple[int, pathlib.Path], mp_procs: Any
) -> None:
    port, d = tls_broker
    mp = await mp_procs(
        port=port,
        n=1,
        tls_ca=str(d / "other-ca.der"),
        deadline_ms=2000,
        backoff_min_ms=100,
        backoff_max_ms=200,
    )
    done = await mp.finish()
    c = done["c"]
    assert done["ev"] == "timeout" and c["connects"] == 0 and c["attempts"] >= 2, done
    # every attempt refused by the certificate check; the last may still be in its handshake
    # when the deadline ends the run
    # (counted as certificate refusals, apart from network failures)
    assert c["attempts"] - 1 <= c["cert_errors"] <= c["attempts"], done
    assert c["io_errors"] == 0 and c["internal_errors"] == 0, done
