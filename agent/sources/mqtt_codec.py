"""MQTT 3.1.1 for a subscriber, sans-I/O: encoders for what the agent sends, a decoder for
what a broker sends. No sockets, no clocks, no threads; agent/sources/mqtt.py drives it.

The agent connects, subscribes at QoS ≤ 1, acknowledges QoS 1 messages and pings; it
never publishes. So the decoder accepts CONNACK, PUBLISH (QoS 0/1), PUBACK, SUBACK and
PINGRESP and raises `ProtocolError` on anything else (the caller drops the connection).

Framing is checked strictly (packet type, reserved flags, lengths, packet id 0, QoS 2 or
3 that was never granted). The *content* of a well-framed PUBLISH is not: a topic that is
not UTF-8 (decoded with replacement characters), empty, or holds a wildcard or NUL is
delivered as it is, so that the ingest quarantines the message (and acknowledges it).
Refusing it here would drop the link, and the broker would send the same message again
after every reconnect: ingest would stall on one bad message. A correct broker never
sends such a topic anyway.

The decoder is built for throughput on CPython: `feed()` keeps a reference to the chunk
(no copy unless a partial packet is left over), `next()` slices one whole packet out of it.
The firmware's codec (firmware/mqtt_codec.py) is the same protocol built for a small heap;
both are checked against tests/vectors/mqtt.json.
"""

from __future__ import annotations

import struct

import msgspec

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBSCRIBE = 8
SUBACK = 9
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

MAX_PACKET = 1 + 4 + 268_435_455  # the largest packet MQTT can frame

PINGREQ_PKT = b"\xc0\x00"
DISCONNECT_PKT = b"\xe0\x00"

CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
SUBACK_FAILURE = 0x80


class ProtocolError(Exception):
    """The broker sent bytes that are not a packet a subscriber accepts."""


# ---- encoders ---------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    if not 0 <= n <= 268_435_455:
        raise ValueError("packet too large")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _str(s: str | bytes, what: str) -> bytes:
    b = s.encode() if isinstance(s, str) else bytes(s)
    if len(b) > 65535:
        raise ValueError(f"{what} over 65535 bytes")
    return len(b).to_bytes(2, "big") + b


def _pid(pid: int) -> bytes:
    if not 0 < pid < 65536:
        raise ValueError("packet id must be 1..65535")
    return pid.to_bytes(2, "big")


def connect(
    client_id: str,
    *,
    keepalive: int = 60,
    clean_session: bool = True,
    user: str | None = None,
    password: str | None = None,
) -> bytes:
    """CONNECT, protocol level 4 (3.1.1). keepalive in seconds, 0 disables it."""
    if not client_id and not clean_session:
        raise ValueError("an empty client id needs clean_session")
    if not 0 <= keepalive <= 65535:
        raise ValueError("keepalive must be 0..65535 s")
    if password is not None and user is None:
        raise ValueError("MQTT 3.1.1 has no password without a user name")
    flags = 0x02 if clean_session else 0
    tail = _str(client_id, "client id")
    if user is not None:
        flags |= 0x80
        tail += _str(user, "user")
    if password is not None:
        flags |= 0x40
        tail += _str(password, "password")
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + keepalive.to_bytes(2, "big") + tail
    return b"\x10" + _varint(len(body)) + body


def subscribe(pid: int, topics: list[tuple[str, int]]) -> bytes:
    """SUBSCRIBE to one or more topic filters, each with its maximum QoS."""
    if not topics:
        raise ValueError("no topic filter")
    body = bytearray(_pid(pid))
    for topic, qos in topics:
        if not 0 <= qos <= 2:
            raise ValueError("qos must be 0..2")
        if not topic or "\x00" in topic:
            raise ValueError(f"bad topic filter {topic!r}")
        body += _str(topic, "topic filter")
        body.append(qos)
    return b"\x82" + _varint(len(body)) + bytes(body)


def puback(pid: int) -> bytes:
    return b"\x40\x02" + _pid(pid)


def pubacks(pids: list[int]) -> bytes:
    """The PUBACKs for many packet ids, back to back (one write). A PUBACK is the four bytes
    0x40 0x02 <id>: the big-endian integer 0x40020000 | id."""
    for pid in pids:
        if not 0 < pid < 65536:
            raise ValueError("packet id must be 1..65535")
    return struct.pack(f">{len(pids)}I", *[0x40020000 | p for p in pids])


# ---- decoder -------------------------------------------------------------------------------


class Publish(msgspec.Struct):
    # a Struct: one is made for every message, in ~0.08 µs against ~0.19 for a class with
    # an __init__ of its own
    topic: str
    payload: bytes
    qos: int
    pid: int  # 0 for QoS 0
    dup: bool
    retain: bool

    def __repr__(self) -> str:
        return f"Publish({self.topic!r}, {len(self.payload)} B, qos={self.qos}, pid={self.pid})"


class ConnAck:
    __slots__ = ("rc", "session_present")

    def __init__(self, session_present: bool, rc: int) -> None:
        self.session_present = session_present
        self.rc = rc  # 0 accepted, 1..5 refused (CONNACK_REASONS)

    def __repr__(self) -> str:
        return f"ConnAck(session_present={self.session_present}, rc={self.rc})"


class SubAck:
    __slots__ = ("codes", "pid")

    def __init__(self, pid: int, codes: bytes) -> None:
        self.pid = pid
        self.codes = codes  # one per filter: granted QoS 0..2 or SUBACK_FAILURE

    def __repr__(self) -> str:
        return f"SubAck(pid={self.pid}, codes={self.codes.hex()})"


class PubAck:
    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __repr__(self) -> str:
        return f"PubAck(pid={self.pid})"


class PingResp:
    __slots__ = ()

    def __repr__(self) -> str:
        return "PingResp()"


Packet = Publish | ConnAck | SubAck | PubAck | PingResp
_PINGRESP = PingResp()

# fixed-header first byte → what it is, for every byte a broker may send a subscriber;
# a PUBLISH may carry DUP (QoS > 0), QoS 0 or 1 and RETAIN
_FIRST: dict[int, int] = {0x20: CONNACK, 0x40: PUBACK, 0x90: SUBACK, 0xD0: PINGRESP}
for _h in range(0x30, 0x40):
    _q = (_h >> 1) & 3
    if _q < 2 and not (_q == 0 and _h & 0x08):
        _FIRST[_h] = PUBLISH


def _bad_first(h: int) -> str:
    t = h >> 4
    if t == PUBLISH:
        q = (h >> 1) & 3
        if q == 3:
            return "PUBLISH with QoS 3"
        if q == 2:
            return "PUBLISH with QoS 2 (never subscribed to)"
        return "QoS 0 PUBLISH with DUP set"
    if t in (CONNACK, PUBACK, SUBACK, PINGRESP):
        return f"reserved flags 0x{h & 15:x} set on packet type {t}"
    return f"unexpected packet type {t} (first byte 0x{h:02x})"


class Decoder:
    """Streaming decoder. `feed(data)` adds a chunk of the byte stream; `next()` returns
    the next whole packet, or None until more bytes come. After a `ProtocolError` it
    stays failed until `reset()` (a new connection)."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        if max_packet < 16:
            raise ValueError("max_packet too small")
        self.max_packet = max_packet
        self.reset()

    def reset(self) -> None:
        self._buf = b""
        self._pos = 0
        self._failed: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet returned as packets."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos :] + data
        else:
            self._buf = bytes(data)
        self._pos = 0

    def _fail(self, msg: str) -> ProtocolError:
        self._failed = msg
        return ProtocolError(msg)

    def next(self) -> Packet | None:
        if self._failed is not None:
            raise ProtocolError(f"decoder failed earlier ({self._failed}); reset() it")
        buf = self._buf
        pos = self._pos
        n = len(buf)
        if pos >= n:
            return None
        h = buf[pos]
        kind = _FIRST.get(h)
        if kind is None:
            raise self._fail(_bad_first(h))
        # remaining length: 1..4 bytes, 7 bits each, least significant first
        i = pos + 1
        rl = 0
        shift = 0
        while True:
            if i >= n:
                return None
            b = buf[i]
            i += 1
            rl |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift == 28:
                raise self._fail("remaining length longer than 4 bytes")
        if i - pos + rl > self.max_packet:
            raise self._fail(
                f"packet of {i - pos + rl} bytes over the {self.max_packet} byte maximum"
            )
        end = i + rl
        if kind == PUBLISH:
            # checked before the body is all here, like the other types' lengths below
            if rl < (5 if h & 0x06 else 3):
                raise self._fail(f"remaining length {rl} wrong for PUBLISH")
            if end > n:
                return None
            self._pos = end
            tl = (buf[i] << 8) | buf[i + 1]
            p = i + 2 + tl
            if h & 0x06:
                if p + 2 > end:
                    raise self._fail(f"PUBLISH topic length {tl} overruns remaining length {rl}")
                pid = (buf[p] << 8) | buf[p + 1]
                if not pid:
                    raise self._fail("packet id 0")
                return Publish(
                    buf[i + 2 : p].decode("utf-8", "replace"),
                    buf[p + 2 : end],
                    1,
                    pid,
                    bool(h & 0x08),
                    bool(h & 1),
                )
            if p > end:
                raise self._fail(f"PUBLISH topic length {tl} overruns remaining length {rl}")
            return Publish(
                buf[i + 2 : p].decode("utf-8", "replace"), buf[p:end], 0, 0, False, bool(h & 1)
            )
        if kind == CONNACK or kind == PUBACK:
            ok = rl == 2
        elif kind == SUBACK:
            ok = rl >= 3
        else:
            ok = rl == 0
        if not ok:
            raise self._fail(f"remaining length {rl} wrong for packet type {kind}")
        if end > n:
            return None
        self._pos = end
        if kind == PINGRESP:
            return _PINGRESP
        if kind == CONNACK:
            flags = buf[i]
            rc = buf[i + 1]
            if flags & 0xFE:
                raise self._fail("CONNACK reserved flags set")
            if rc > 5:
                raise self._fail(f"CONNACK return code {rc}")
            if rc and flags:
                raise self._fail("CONNACK refusal with session present")
            return ConnAck(bool(flags), rc)
        pid = (buf[i] << 8) | buf[i + 1]
        if not pid:
            raise self._fail("packet id 0")
        if kind == PUBACK:
            return PubAck(pid)
        codes = buf[i + 2 : end]
        for c in codes:
            if c > 2 and c != SUBACK_FAILURE:
                raise self._fail(f"SUBACK return code 0x{c:02x}")
        return SubAck(pid, codes)
