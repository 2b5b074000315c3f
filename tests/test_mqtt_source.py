"""The agent's MQTT subscriber: its sans-I/O codec (agent/sources/mqtt_codec.py) against
the golden vectors, then the source (agent/sources/mqtt.py) against a real Mosquitto:
acknowledgement only on `ack()`, redelivery after a crash, pause/resume, reconnection
after a broker restart, a dead link, a refused subscription."""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent.sources import mqtt_codec as codec
from agent.sources.mqtt import BrokerConfig, Delivery, MqttSource
from tests.agent_helpers import Publisher
from tests.helpers import ROOT
from tools.mosquitto import Mosquitto

VECTORS = json.loads((ROOT / "tests" / "vectors" / "mqtt.json").read_text())

# well-framed PUBLISH packets whose topic is bad: the host decoder delivers them (ingest
# quarantines them; refusing would drop the link and bring the message back forever)
CONTENT_ONLY = {
    "publish_empty_topic",
    "publish_wildcard_topic",
    "publish_hash_topic",
    "publish_bad_utf8",
    "publish_nul_topic",
}


# ---- codec ---------------------------------------------------------------------------------


def _as_dict(p: codec.Packet) -> dict[str, Any]:
    if isinstance(p, codec.ConnAck):
        return {"type": 2, "rc": p.rc, "session_present": p.session_present}
    if isinstance(p, codec.Publish):
        return {
            "type": 3,
            "topic": p.topic,
            "payload_hex": p.payload.hex(),
            "qos": p.qos,
            "pid": p.pid,
            "dup": p.dup,
            "retain": p.retain,
        }
    if isinstance(p, codec.PubAck):
        return {"type": 4, "pid": p.pid}
    if isinstance(p, codec.SubAck):
        return {"type": 9, "pid": p.pid, "codes_hex": p.codes.hex()}
    return {"type": 13}


def decode_chunks(chunks: list[bytes], max_packet: int = codec.MAX_PACKET) -> list[codec.Packet]:
    d = codec.Decoder(max_packet)
    out = []
    for ch in chunks:
        d.feed(ch)
        while (p := d.next()) is not None:
            out.append(p)
    assert d.buffered == 0
    return out


def splits(data: bytes) -> list[list[bytes]]:
    """The stream whole, cut at every point, and one byte at a time."""
    ways = [[data], [bytes([b]) for b in data]]
    ways += [[data[:i], data[i:]] for i in range(1, len(data))]
    return ways


@pytest.mark.parametrize("v", VECTORS["decode"], ids=lambda v: v["name"])
def test_decode_vectors_whole_split_and_bytewise(v: dict[str, Any]) -> None:
    data = bytes.fromhex(v["hex"])
    for chunks in splits(data):
        assert [_as_dict(p) for p in decode_chunks(chunks)] == v["packets"]


def test_decode_all_vectors_back_to_back() -> None:
    data = b"".join(bytes.fromhex(v["hex"]) for v in VECTORS["decode"])
    want = [p for v in VECTORS["decode"] for p in v["packets"]]
    for step in (1, 3, 7, 64, len(data)):
        chunks = [data[i : i + step] for i in range(0, len(data), step)]
        assert [_as_dict(p) for p in decode_chunks(chunks)] == want


@pytest.mark.parametrize("v", VECTORS["malformed"], ids=lambda v: v["name"])
def test_malformed_vectors(v: dict[str, Any]) -> None:
    data = bytes.fromhex(v["hex"])
    max_packet = VECTORS["max_packet"]
    if v["name"] in CONTENT_ONLY:
        (p,) = decode_chunks([data], max_packet)
        assert isinstance(p, codec.Publish)  # delivered, for ingest to quarantine
        return
    for chunks in ([data], [bytes([b]) for b in data]):
        d = codec.Decoder(max_packet)
        with pytest.raises(codec.ProtocolError):
            for ch in chunks:
                d.feed(ch)
                while d.next() is not None:
                    pass
        with pytest.raises(codec.ProtocolError, match="failed earlier"):
            d.next()  # stays failed
        d.reset()
        d.feed(bytes.fromhex("d000"))
        assert isinstance(d.next(), codec.PingResp)


def test_garbage_before_a_packet_and_a_bad_topic_decoded_with_replacement() -> None:
    d = codec.Decoder()
    d.feed(b"HTTP/1.1 400\r\n" + bytes.fromhex("d000"))
    with pytest.raises(codec.ProtocolError):
        d.next()
    (p,) = decode_chunks([bytes.fromhex("30050002c32878")])
    assert isinstance(p, codec.Publish) and p.topic == "\ufffd(" and p.payload == b"x"


def test_qos2_publish_is_refused_it_was_never_granted() -> None:
    d = codec.Decoder()
    d.feed(bytes.fromhex("3405000174000178"))
    with pytest.raises(codec.ProtocolError, match="QoS 2"):
        d.next()


def test_a_length_too_large_fails_before_the_body_arrives() -> None:
    d = codec.Decoder(max_packet=100)
    d.feed(bytes.fromhex("328001"))  # 128 bytes announced, none sent
    with pytest.raises(codec.ProtocolError, match="maximum"):
        d.next()


_ENCODERS: dict[str, Callable[..., bytes]] = {
    "connect": lambda a: codec.connect(
        a["client_id"],
        keepalive=a["keepalive"],
        clean_session=a["clean_session"],
        user=a.get("user"),
        password=a.get("password"),
    ),
    "subscribe": lambda a: codec.subscribe(a["pid"], [(a["topic"], a["qos"])]),
    "puback": lambda a: codec.puback(a["pid"]),
    "pingreq": lambda a: codec.PINGREQ_PKT,
    "disconnect": lambda a: codec.DISCONNECT_PKT,
}


@pytest.mark.parametrize(
    "v",
    [
        v
        for v in VECTORS["encode"]
        if v["fn"] in _ENCODERS and "will_topic" not in v["args"]  # the agent has no will
    ],
    ids=lambda v: v["name"],
)
def test_encode_vectors(v: dict[str, Any]) -> None:
    assert _ENCODERS[v["fn"]](v["args"]).hex() == v["hex"]


def test_subscribe_many_filters_and_pubacks_in_one_write() -> None:
    pkt = codec.subscribe(7, [("a/+/t", 1), ("$share/g/b/#", 0)])
    assert pkt == bytes.fromhex("821900070005612f2b2f7401000c2473686172652f672f622f2300")
    assert codec.pubacks([1, 0x1234, 65535]) == b"".join(
        codec.puback(p) for p in (1, 0x1234, 65535)
    )
    assert codec.pubacks([]) == b""
    for bad in (0, 65536):
        with pytest.raises(ValueError):
            codec.pubacks([bad])
    with pytest.raises(ValueError):
        codec.connect("", clean_session=False)
    with pytest.raises(ValueError):
        codec.connect("x", password="p")


# ---- the source against Mosquitto --------------------------------------------------------------


class Sink:
    """An MqttSource that records what it is handed."""

    def __init__(self, port: int, client_id: str = "src-test", **kw: Any) -> None:
        self.got: list[tuple[str, bytes, Delivery]] = []
        self.on_msg: Callable[[Sink], None] = lambda s: None
        self.src = MqttSource(
            BrokerConfig(port=port, client_id=client_id, **{"watch_dropped": False, **kw}),
            self._message,
        )
        self.task: asyncio.Task[None] | None = None

    def _message(self, topic: str, payload: bytes, d: Delivery) -> None:
        self.got.append((topic, payload, d))
        self.on_msg(self)

    async def start(self) -> Sink:
        self.task = asyncio.create_task(self.src.run())
        await asyncio.wait_for(self.src.connected.wait(), 10)
        return self

    async def stop(self) -> None:
        self.src.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)

    def payloads(self) -> list[bytes]:
        return [p for _, p, _ in self.got]

    async def wait(self, n: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while len(self.got) < n:
            if time.monotonic() > end:
                raise TimeoutError(f"got {len(self.got)} of {n}")
            await asyncio.sleep(0.01)


def items(n: int, base: int = 0, sid: str = "T-1") -> list[tuple[str, bytes]]:
    return [(f"stations/{sid}/telemetry", b"m%05d" % (base + i)) for i in range(n)]


async def publish(port: int, its: list[tuple[str, bytes]]) -> None:
    pub = Publisher(port, "src-pub")
    try:
        await asyncio.to_thread(pub.send, its)
    finally:
        pub.close()


async def test_acknowledged_only_when_told(mosquitto: Mosquitto) -> None:
    s = await Sink(mosquitto.port).start()
    await publish(mosquitto.port, items(10))
    await s.wait(10)
    assert s.payloads() == [p for _, p in items(10)]
    assert all(d.qos == 1 and d.mid > 0 for _, _, d in s.got)
    s.src.ack([d for _, _, d in s.got[:4]])  # the first four only
    await asyncio.sleep(0.2)
    await s.stop()  # a clean DISCONNECT: the session stays, with six unacknowledged

    s = await Sink(mosquitto.port).start()
    await s.wait(6)
    await asyncio.sleep(0.3)
    assert s.payloads() == [p for _, p in items(10)[4:]]  # redelivered, nothing else
    s.src.ack([d for _, _, d in s.got])
    await asyncio.sleep(0.2)
    await s.stop()

    s = await Sink(mosquitto.port).start()
    await asyncio.sleep(0.5)
    assert s.got == []  # all acknowledged
    await s.stop()


CRASHER = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from agent.sources.mqtt import BrokerConfig, MqttSource

async def main():
    def on(topic, payload, d):
        print(json.dumps([topic, payload.decode()]), flush=True)
    src = MqttSource(BrokerConfig(port=int(sys.argv[2]), client_id="src-crash", watch_dropped=False), on)
    task = asyncio.create_task(src.run())
    await src.connected.wait()
    print("subscribed", flush=True)
    await task

asyncio.run(main())
"""


async def test_redelivered_after_a_crash_without_ack(mosquitto: Mosquitto) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(ROOT), str(mosquitto.port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        assert line.strip() == "subscribed"
        await publish(mosquitto.port, items(20))
        seen = [
            json.loads(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10))
            for _ in range(20)
        ]
        assert [p.encode() for _, p in seen] == [p for _, p in items(20)]
    finally:
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT, no PUBACK
        proc.wait()
    s = await Sink(mosquitto.port, "src-crash").start()
    await s.wait(20)
    await asyncio.sleep(0.3)
    assert s.payloads() == [p for _, p in items(20)]
    s.src.ack([d for _, _, d in s.got])
    await s.stop()


async def test_pause_stops_reading_and_resume_hands_over_the_rest(
    mosquitto: Mosquitto,
) -> None:
    s = await Sink(mosquitto.port).start()
    s.src.pause()
    await publish(mosquitto.port, items(30))  # the broker takes them; we read nothing
    await asyncio.sleep(0.5)
    assert s.got == []
    s.src.resume()
    await s.wait(30)
    # paused from inside the callback: the packets already read wait in the decoder
    s.on_msg = lambda sink: sink.src.pause() if len(sink.got) == 35 else None
    await publish(mosquitto.port, items(30, base=30))
    await asyncio.sleep(0.5)
    assert len(s.got) == 35
    s.src.resume()
    await s.wait(60)
    await asyncio.sleep(0.2)
    assert s.payloads() == [p for _, p in items(60)]
    s.src.ack([d for _, _, d in s.got])
    await s.stop()


async def test_a_backlog_of_mixed_sizes_arrives_whole_and_in_order(
    mosquitto: Mosquitto,
) -> None:
    # large reads cut packets anywhere; every message must come out intact
    s = await Sink(mosquitto.port).start()
    s.src.pause()
    its = [
        (f"stations/T-{i % 7}/telemetry", bytes([i % 251]) * ((i * 7919) % 6000))
        for i in range(1500)
    ]
    await publish(mosquitto.port, its)
    s.on_msg = lambda sink: sink.src.ack([sink.got[-1][2]])
    s.src.resume()
    await s.wait(len(its), 30)
    assert [(t, p) for t, p, _ in s.got] == its
    await s.stop()


async def test_reconnects_after_the_broker_restarts(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "agent.sources.mqtt")
    s = await Sink(mosquitto.port).start()
    await publish(mosquitto.port, items(5))
    await s.wait(5)
    conn = s.src.conn
    old = [d for _, _, d in s.got]
    await asyncio.to_thread(mosquitto.restart)  # persistence saved: the session survives
    await asyncio.wait_for(s.src.connected.wait(), 15)
    assert s.src.conn == conn + 1 and s.src.counters["connects"] == 2
    await s.wait(10)  # the five unacknowledged come again, on the new connection
    assert s.payloads()[5:] == [p for _, p in items(5)]
    s.src.ack(old)  # for the dead connection: not sent, counted
    assert s.src.counters["stale_acks"] == 5
    s.src.ack([d for _, _, d in s.got[5:]])
    await publish(mosquitto.port, items(3, base=5))
    await s.wait(13)
    s.src.ack([d for _, _, d in s.got[10:]])
    await asyncio.sleep(0.2)
    await s.stop()
    assert "disconnected from" in caplog.text
    s = await Sink(mosquitto.port).start()
    await asyncio.sleep(0.5)
    assert s.got == []
    await s.stop()


async def test_a_dead_link_is_found_by_keepalive(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    assert mosquitto.proc is not None
    s = await Sink(mosquitto.port, keepalive=1).start()
    mosquitto.proc.send_signal(signal.SIGSTOP)  # the socket stays open; nobody answers
    try:
        end = time.monotonic() + 10
        while s.src.connected.is_set() and time.monotonic() < end:
            await asyncio.sleep(0.05)
        assert not s.src.connected.is_set()
        assert "no PINGRESP" in caplog.text
    finally:
        mosquitto.proc.send_signal(signal.SIGCONT)
    await asyncio.wait_for(s.src.connected.wait(), 15)  # and back
    await s.stop()


class Scripted:
    """A broker that answers CONNECT with CONNACK and SUBSCRIBE with `suback(pid)`, then
    sends `after`: for what Mosquitto will not do (it grants every 3.1.1 subscription and
    filters by ACL on delivery; it sends no malformed packets)."""

    def __init__(self, suback: Callable[[bytes], bytes], after: bytes = b"") -> None:
        self.suback = suback
        self.after = after
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for _ in range(2):  # CONNECT, then SUBSCRIBE
                head = await r.readexactly(2)
                rl, shift, b = 0, 0, head[1]
                while True:
                    rl |= (b & 0x7F) << shift
                    if not b & 0x80:
                        break
                    shift += 7
                    b = (await r.readexactly(1))[0]
                body = await r.readexactly(rl)
                w.write(b"\x20\x02\x00\x00" if head[0] == 0x10 else self.suback(body[:2]))
            w.write(self.after)
            await r.read()  # until the client goes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


async def test_refused_subscription_is_retried_and_never_connected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Scripted(lambda pid: b"\x90\x05" + pid + b"\x01\x80\x01") as broker:
        s = Sink(broker.port)
        task = asyncio.create_task(s.src.run())
        await asyncio.sleep(1.0)
        assert not s.src.connected.is_set() and not task.done()
        assert "refused subscriptions: stations/+/event" in caplog.text
        assert broker.connections >= 2  # retried, with backoff
        s.src.stop()
        await asyncio.wait_for(task, 10)


async def test_a_malformed_packet_drops_the_link_and_it_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Scripted(
        lambda pid: b"\x90\x05" + pid + b"\x01\x01\x01", after=b"HTTP/1.1 400\r\n"
    ) as broker:
        s = await Sink(broker.port).start()
        await asyncio.sleep(1.0)
        assert s.src.counters["protocol_errors"] >= 2 and broker.connections >= 2
        assert "protocol error" in caplog.text and "reserved flags 0x8" in caplog.text  # "H"
        await s.stop()


async def test_stop_while_the_broker_is_down_returns(tmp_path: pathlib.Path) -> None:
    broker = Mosquitto(tmp_path / "mq", insecure=True)  # never started: connection refused
    s = Sink(broker.port)
    task = asyncio.create_task(s.src.run())
    await asyncio.sleep(0.5)
    assert not task.done()
    s.src.stop()
    await asyncio.wait_for(task, 5)
