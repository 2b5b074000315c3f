"""The MQTT golden vectors (tests/vectors/mqtt.json) checked against paho-mqtt, an
independent implementation: paho, connected to a recording socket, must put exactly the
vector's bytes on the wire for the same call, and must read the decoder vectors' PUBLISH
packets into the same topic, payload, QoS, DUP, retain and packet id."""

from __future__ import annotations

import json
import pathlib
import socket
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest

VECTORS = json.loads((pathlib.Path(__file__).parent / "vectors" / "mqtt.json").read_text())


def _read_packet(conn: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            assert chunk, "paho closed the connection"
            out += chunk
        return out

    head = exactly(1)
    rl = shift = 0
    while True:
        b = exactly(1)
        head += b
        rl |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    return head + exactly(rl)


class Peer:
    """One paho client talking to a plain socket we hold the other end of."""

    def __init__(self, client_id: str = "vec", clean_session: bool = True) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1)
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        self.conn: socket.socket | None = None
        self.messages: list[mqtt.MQTTMessage] = []
        self.c.on_message = lambda _c, _u, m: self.messages.append(m)

    def connect(self, keepalive: int = 60) -> bytes:
        self.c.connect("127.0.0.1", self.srv.getsockname()[1], keepalive)
        self.conn, _ = self.srv.accept()
        self.conn.settimeout(5)
        self.pump()
        return _read_packet(self.conn)

    def pump(self) -> None:
        for _ in range(3):
            self.c.loop(0.05)

    def send(self, data: bytes) -> None:
        assert self.conn
        self.conn.sendall(data)
        self.pump()

    def next_packet(self) -> bytes:
        self.pump()
        assert self.conn
        return _read_packet(self.conn)

    def close(self) -> None:
        self.c.socket() and self.c.socket().close()  # type: ignore[union-attr]
        if self.conn:
            self.conn.close()
        self.srv.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.close()


def _enc(fn: str) -> list[dict[str, Any]]:
    return [v for v in VECTORS["encode"] if v["fn"] == fn and v["paho"]]


def _connected(client_id: str = "vec") -> Peer:
    p = Peer(client_id)
    p.connect()
    p.send(bytes.fromhex("20020000"))
    return p


@pytest.mark.parametrize("v", _enc("connect"), ids=lambda v: v["name"])
def test_connect_bytes_match_paho(v: dict[str, Any]) -> None:
    a = v["args"]
    p = Peer(a["client_id"], a["clean_session"])
    try:
        if a.get("user") is not None:
            p.c.username_pw_set(a["user"], a.get("password"))
        if a.get("will_topic") is not None:
            p.c.will_set(
                a["will_topic"],
                bytes.fromhex(a["will_payload_hex"]),
                a["will_qos"],
                a["will_retain"],
            )
        assert p.connect(a["keepalive"]).hex() == v["hex"]
    finally:
        p.close()


@pytest.mark.parametrize("v", _enc("publish"), ids=lambda v: v["name"])
def test_publish_bytes_match_paho(v: dict[str, Any]) -> None:
    a = v["args"]
    p = _connected()
    try:
        p.c._last_mid = (
            a.get("pid", 1) - 1
        )  # paho numbers from its counter; start it where the vector is
        info = p.c.publish(
            a["topic"], bytes.fromhex(a["payload_hex"]), a["qos"], a.get("retain", False)
        )
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        assert p.next_packet().hex() == v["hex"]
    finally:
        p.close()


@pytest.mark.parametrize("v", _enc("subscribe"), ids=lambda v: v["name"])
def test_subscribe_bytes_match_paho(v: dict[str, Any]) -> None:
    a = v["args"]
    p = _connected()
    try:
        p.c._last_mid = a["pid"] - 1
        p.c.subscribe(a["topic"], a["qos"])
        assert p.next_packet().hex() == v["hex"]
    finally:
        p.close()


@pytest.mark.parametrize("v", _enc("puback"), ids=lambda v: v["name"])
def test_puback_bytes_match_paho(v: dict[str, Any]) -> None:
    pid = v["args"]["pid"]
    p = _connected()
    try:
        # a QoS 1 PUBLISH on topic "t" with this packet id, built by hand
        p.send(bytes([0x32, 6, 0, 1]) + b"t" + pid.to_bytes(2, "big") + b"x")
        assert p.next_packet().hex() == v["hex"]
    finally:
        p.close()


def test_pingreq_and_disconnect_match_paho() -> None:
    want = {v["fn"]: v["hex"] for v in VECTORS["encode"] if v["fn"] in ("pingreq", "disconnect")}
    p = _connected()
    try:
        p.c._send_pingreq()
        assert p.next_packet().hex() == want["pingreq"]
        p.c.disconnect()
        assert p.next_packet().hex() == want["disconnect"]
    finally:
        p.close()


@pytest.mark.parametrize("v", [v for v in VECTORS["decode"] if v["paho"]], ids=lambda v: v["name"])
def test_publish_decode_vectors_read_the_same_by_paho(v: dict[str, Any]) -> None:
    p = _connected()
    try:
        p.send(bytes.fromhex(v["hex"]))
        (want,) = v["packets"]
        for _ in range(20):
            if p.messages:
                break
            p.pump()
        (m,) = p.messages
        assert m.topic == want["topic"]
        assert m.payload == bytes.fromhex(want["payload_hex"])
        assert (m.qos, bool(m.dup), bool(m.retain), m.mid if m.qos else 0) == (
            want["qos"],
            want["dup"],
            want["retain"],
            want["pid"],
        )
    finally:
        p.close()


def test_every_encoder_vector_is_checked_or_marked() -> None:
    # only DUP publishes are out of paho's reach (it sets DUP on its own retries only)
    unchecked = [v["name"] for v in VECTORS["encode"] if not v["paho"]]
    assert unchecked == ["publish_qos1_dup"]
