"""A hostile fake MQTT broker and a recording proxy, for testing the station's client.

Both parse the client's bytes with their own code (not firmware/mqtt_codec.py), so a
shared misunderstanding cannot hide. Both record every packet the client sends, raw.

FakeBroker: each accepted connection takes the next mode from `modes`, then `default`:
  good                CONNACK, PUBACK every QoS 1 PUBLISH, SUBACK, PINGRESP
  drop_puback         like good but never acks; closes 0.2 s after the first PUBLISH
  no_pingresp         like good but ignores PINGREQ (the client's keepalive must fire)
  malformed_connack   CONNACK with reserved ack flags set
  wrong_rl            CONNACK with remaining length 3
  huge_rl             a PUBLISH header claiming 268,435,455 bytes
  varint5             a remaining length of 5 bytes
  garbage             an HTTP error line instead of MQTT
  refuse              CONNACK return code 5 (not authorized)
  silent              accepts, reads, never answers
  close               closes at once
  bad_puback          good CONNACK, then a PUBACK with packet id 0 for the first PUBLISH
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

HOSTILE = {
    "malformed_connack": b"\x20\x02\xfe\x00",
    "wrong_rl": b"\x20\x03\x00\x00\x00",
    "huge_rl": b"\x30\xff\xff\xff\x7f",
    "varint5": b"\x20\x80\x80\x80\x80\x01",
    "garbage": b"HTTP/1.1 400 Bad Request\r\n\r\n",
    "refuse": b"\x20\x02\x00\x05",
}


@dataclass(frozen=True, kw_only=True)
class Publish:
    """A PUBLISH as the client sent it."""

    raw: bytes
    dup: bool
    qos: int
    retain: bool
    topic: str
    pid: int
    payload: bytes

    def without_dup(self) -> bytes:
        return bytes([self.raw[0] & ~0x08]) + self.raw[1:]


def parse_publish(raw: bytes) -> Publish:
    h = raw[0]
    i = 1
    while raw[i] & 0x80:
        i += 1
    i += 1
    tl = int.from_bytes(raw[i : i + 2], "big")
    topic = raw[i + 2 : i + 2 + tl].decode()
    i += 2 + tl
    qos = (h >> 1) & 3
    pid = 0
    if qos:
        pid = int.from_bytes(raw[i : i + 2], "big")
        i += 2
    return Publish(
        raw=raw,
        dup=bool(h & 8),
        qos=qos,
        retain=bool(h & 1),
        topic=topic,
        pid=pid,
        payload=raw[i:],
    )


async def read_packet(reader: asyncio.StreamReader) -> bytes:
    """One whole packet, raw (fixed header included); IncompleteReadError at EOF."""
    head = await reader.readexactly(1)
    rl = shift = 0
    for _ in range(4):
        b = await reader.readexactly(1)
        head += b
        rl |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    else:
        raise ValueError("client sent a remaining length over 4 bytes")
    return head + await reader.readexactly(rl)


@dataclass
class Conn:
    mode: str
    packets: list[bytes] = field(default_factory=list)
    t: float = field(default_factory=time.monotonic)  # when it was accepted

    @property
    def publishes(self) -> list[Publish]:
        return [parse_publish(p) for p in self.packets if p[0] >> 4 == 3]

    def count(self, ptype: int) -> int:
        return sum(1 for p in self.packets if p[0] >> 4 == ptype)


class FakeBroker:
    def __init__(self, modes: list[str] | None = None, default: str = "good") -> None:
        self.modes = list(modes or [])
        self.default = default
        self.conns: list[Conn] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server:
            self.server.close()
        for w in list(self._writers):
            w.close()
        if self.server:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    @property
    def publishes(self) -> list[tuple[int, Publish]]:
        """(connection index, publish) for every PUBLISH received, in order."""
        return [(i, p) for i, c in enumerate(self.conns) for p in c.publishes]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = self.modes.pop(0) if self.modes else self.default
        conn = Conn(mode)
        self.conns.append(conn)
        self._writers.add(writer)
        try:
            await self._speak(mode, conn, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _speak(
        self, mode: str, conn: Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if mode == "close":
            return
        first = await read_packet(reader)
        conn.packets.append(first)
        if first[0] != 0x10:
            raise ValueError("first packet is not CONNECT")
        if mode == "silent":
            while True:
                conn.packets.append(await read_packet(reader))
        if mode in HOSTILE:
            writer.write(HOSTILE[mode])
            await writer.drain()
            # keep reading until the client gives up on us
            while True:
                conn.packets.append(await read_packet(reader))
        writer.write(b"\x20\x02\x00\x00")
        await writer.drain()
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                pkt = await asyncio.wait_for(read_packet(reader), timeout)
            except TimeoutError:
                return  # drop_puback: close without having acked anything
            conn.packets.append(pkt)
            t = pkt[0] >> 4
            if t == 3:
                p = parse_publish(pkt)
                if mode == "drop_puback":
                    deadline = deadline or loop.time() + 0.2
                elif mode == "bad_puback":
                    writer.write(b"\x40\x02\x00\x00")
                elif p.qos == 1:
                    writer.write(b"\x40\x02" + p.pid.to_bytes(2, "big"))
            elif t == 8:
                writer.write(b"\x90\x03" + pkt[2:4] + bytes([pkt[-1]]))
            elif t == 12 and mode != "no_pingresp":
                writer.write(b"\xd0\x00")
            elif t == 14:
                return
            await writer.drain()


class RecordingProxy:
    """TCP proxy client <-> upstream broker that records every packet the client sends
    (one Conn per client connection) and can swallow the broker's PUBACKs (`drop_pubacks`),
    so that a test knows exactly which messages the client holds unacknowledged. When the
    upstream refuses or closes, the client's connection is closed too."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.conns: list[Conn] = []
        self.drop_pubacks = False
        self.dropped = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server:
            self.server.close()
        for t in list(self._tasks):
            t.cancel()

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        conn = Conn("proxy")
        self.conns.append(conn)
        try:
            br, bw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cw.close()
            return
        up = asyncio.create_task(self._pump(cr, bw, conn, False))
        down = asyncio.create_task(self._pump(br, cw, None, True))
        self._tasks |= {up, down}
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
                self._tasks.discard(t)
            cw.close()
            bw.close()

    async def _pump(
        self,
        r: asyncio.StreamReader,
        w: asyncio.StreamWriter,
        conn: Conn | None,
        from_broker: bool,
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ValueError):
            while True:
                pkt = await read_packet(r)
                if conn is not None:
                    conn.packets.append(pkt)
                if from_broker and self.drop_pubacks and pkt[0] >> 4 == 4:
                    self.dropped += 1
                    continue
                w.write(pkt)
                await w.drain()
