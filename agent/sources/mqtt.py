"""MQTT side of the agent: paho-mqtt 2.x driven by the asyncio loop's socket callbacks.

Why this shape (measured, see bench/bench_ingest.py and docs/agent.md):
- paho runs in the event loop's thread (no paho thread): one thread does network, verify
  and bookkeeping, with no lock hand-offs; the database commits in a writer thread.
- paho reads a packet's header one byte per `recv()`; `_BufferedClient` reads the socket
  64 KB at a time and feeds paho from that buffer, which cuts the syscalls per message
  from four to a fraction of one (bare paho drains ~60k msg/s here; this path ~60k/s with
  manual acks).
- QoS 1 with `manual_ack=True`: the PUBACK for a message is sent only after its raw row
  (or its quarantine row) is committed, so a SIGKILL never loses what the broker thinks
  delivered; the broker redelivers the rest, and they become counted duplicates.
- A persistent session (clean_session=False, fixed client id): what stations publish
  while the agent is down waits in the broker and arrives on reconnect.
- PUBACKs belong to one connection: a message received on an earlier connection is never
  acknowledged on a later one (the broker resends it, with the same or another packet id).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    user: str | None = None
    password: str | None = None
    tls: bool = False
    tls_ca: str | None = None  # CA bundle; the system's when None
    tls_cert: str | None = None  # client certificate (optional)
    tls_key: str | None = None
    tls_insecure: bool = False  # skip host name check (test rigs only)
    client_id: str = "stationctl-agent"
    prefix: str = "stations"
    keepalive: int = 30
    share_group: str | None = None  # several agents on one subscription ($share/<group>/…)

    def topics(self) -> list[tuple[str, int]]:
        share = f"$share/{self.share_group}/" if self.share_group else ""
        t = [(f"{share}{self.prefix}/+/{k}", 1) for k in ("telemetry", "event")]
        # status is retained and informational; a shared subscription would split it
        t.append((f"{self.prefix}/+/status", 1))
        return t


_PUBLISH = 0x30
_NO_MSG = lambda topic, payload, mid, qos: None


class _FastClient(mqtt.Client):
    """paho Client with a lean read path for MQTT 3.1.1 (see the module doc).

    `_packet_read` takes whole packets from a 64 KB receive buffer; a PUBLISH goes straight
    to `deliver(topic, payload, mid, qos)` (no MQTTMessage, no topic matcher, no locks);
    every other packet is handed to paho's own `_packet_handle`, so connect, subscribe,
    ping and disconnect keep paho's logic. QoS 2 publishes (never subscribed to here) also
    take paho's path."""

    _rbuf: bytes = b""
    _rpos: int = 0
    would_block: bool = False
    deliver: Callable[[bytes, bytes, int, int], None] = staticmethod(_NO_MSG)

    def reset_buffer(self) -> None:
        self._rbuf = b""
        self._rpos = 0

    def _fill(self) -> int:
        """Append what the socket has to the unread rest; 0 ok, else a paho error code."""
        sock = self._sock
        if sock is None:
            return int(mqtt.MQTT_ERR_NO_CONN)
        try:
            data = sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            self.would_block = True
            return int(mqtt.MQTT_ERR_AGAIN)
        except ssl.SSLWantWriteError:
            self.would_block = True
            self._call_socket_register_write()
            return int(mqtt.MQTT_ERR_AGAIN)
        except OSError as e:
            log.warning("socket read failed: %s", e)
            return int(mqtt.MQTT_ERR_CONN_LOST)
        if not data:
            return int(mqtt.MQTT_ERR_CONN_LOST)
        rest = self._rbuf[self._rpos :]
        self._rbuf = rest + data if rest else data
        self._rpos = 0
        with self._msgtime_mutex:
            self._last_bytes_received = time.monotonic()
        return 0

    def _packet_read(self) -> MQTTErrorCode:
        while True:
            buf = self._rbuf
            pos = self._rpos
            n = len(buf)
            # fixed header: command byte, remaining length (1..4 bytes, 7 bits each)
            if n - pos >= 2:
                rl = 0
                shift = 0
                i = pos + 1
                while i < n:
                    b = buf[i]
                    rl |= (b & 127) << shift
                    i += 1
                    if not b & 128:
                        break
                    shift += 7
                    if shift > 21:
                        return mqtt.MQTT_ERR_PROTOCOL
                else:
                    i = -1  # length incomplete
                if i > 0 and i + rl <= n:
                    break
            rc = self._fill()
            if rc:
                return MQTTErrorCode(rc)
        end = i + rl
        self._rpos = end
        cmd = buf[pos]
        if cmd & 0xF0 == _PUBLISH and cmd & 0x06 != 0x04 and self._protocol != mqtt.MQTTv5:
            # topic length, topic, packet id when QoS > 0, payload
            if rl < 2:
                return mqtt.MQTT_ERR_PROTOCOL
            tl = (buf[i] << 8) | buf[i + 1]
            p = i + 2 + tl
            qos = (cmd & 0x06) >> 1
            if tl == 0 or p + (2 if qos else 0) > end:
                return mqtt.MQTT_ERR_PROTOCOL
            mid = 0
            if qos:
                mid = (buf[p] << 8) | buf[p + 1]
                p += 2
            self.deliver(buf[i + 2 : i + 2 + tl], buf[p:end], mid, qos)
            return mqtt.MQTT_ERR_SUCCESS
        # anything else: paho's handlers, fed the way its own reader would
        self._in_packet = {
            "command": cmd,
            "have_remaining": 1,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": rl,
            "packet": bytearray(buf[i:end]),
            "to_process": 0,
            "pos": 0,
        }
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            log.warning("malformed packet from the broker: %s", exc)
            rc = mqtt.MQTT_ERR_PROTOCOL
        self._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        return rc


class Delivery:
    """What a message needs for its PUBACK: packet id, QoS and the connection it came on."""

    __slots__ = ("conn", "mid", "qos")

    def __init__(self, mid: int, qos: int, conn: int) -> None:
        self.mid = mid
        self.qos = qos
        self.conn = conn


OnMessage = Callable[[str, bytes, Delivery], None]


class MqttSource:
    """Connects, subscribes, reconnects; hands each message to `on_message(topic, payload,
    delivery)` in the loop thread and acknowledges deliveries when told (`ack`)."""

    def __init__(
        self,
        cfg: BrokerConfig,
        on_message: OnMessage,
        *,
        on_drained: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self._on_message = on_message
        self._on_drained = on_drained or (lambda: None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.conn = 0  # connection number: bumped on every new socket
        self.connected = asyncio.Event()  # connected and subscribed
        self._closed = asyncio.Event()
        self._stopping = False
        self._paused = False
        self._fd = -1
        self.drain_max = 500
        self.counters = {"connects": 0, "disconnects": 0, "stale_acks": 0}
        c = _FastClient(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        if cfg.user:
            c.username_pw_set(cfg.user, cfg.password)
        if cfg.tls:
            c.tls_set(ca_certs=cfg.tls_ca, certfile=cfg.tls_cert, keyfile=cfg.tls_key)
            if cfg.tls_insecure:
                c.tls_insecure_set(True)
        c.on_connect = self._connected
        c.on_subscribe = self._subscribed
        c.on_message = self._message  # QoS 2 or MQTT 5 only (paho's own path)
        c.deliver = self._deliver
        c.on_socket_open = self._sock_open
        c.on_socket_close = self._sock_close
        c.on_socket_register_write = self._want_write
        c.on_socket_unregister_write = self._no_write
        c.connect_async(cfg.host, cfg.port, cfg.keepalive)
        self.client = c

    # ---- callbacks from paho (loop thread, except socket open during reconnect) ----------

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _sock_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.client.reset_buffer()
        self.conn += 1
        self._fd = sock.fileno()
        self._call(self._add_reader, self._fd)

    def _add_reader(self, fd: int) -> None:
        assert self._loop is not None
        if not self._paused:
            self._loop.add_reader(fd, self._readable)

    def _sock_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        fd, self._fd = self._fd, -1
        self.counters["disconnects"] += 1
        self._call(self._removed, fd)

    def _removed(self, fd: int) -> None:
        assert self._loop is not None
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        self.connected.clear()
        self._closed.set()
        if not self._stopping:
            log.warning("disconnected from %s:%d", self.cfg.host, self.cfg.port)

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        self._call(self._add_writer, fd)

    def _add_writer(self, fd: int) -> None:
        assert self._loop is not None
        if fd == self._fd:
            self._loop.add_writer(fd, self._writable)

    def _no_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        fd = self._fd
        if fd >= 0:
            self._call(self._loop_remove_writer, fd)

    def _loop_remove_writer(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.remove_writer(fd)

    def _connected(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        self.counters["connects"] += 1
        log.info(
            "connected to %s:%d as %s (session present: %s)",
            self.cfg.host,
            self.cfg.port,
            self.cfg.client_id,
            bool(flags.session_present),
        )
        self.client.subscribe(self.cfg.topics())

    def _subscribed(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        bad = [str(c) for c in codes if c.is_failure]
        if bad:
            log.error("broker refused subscriptions: %s", ", ".join(bad))
            return
        log.info("subscribed to %s", ", ".join(t for t, _ in self.cfg.topics()))
        self.connected.set()

    def _message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        try:
            topic = m.topic
        except UnicodeDecodeError:
            topic = m._topic.decode("ascii", "replace")
        self._on_message(topic, bytes(m.payload), Delivery(m.mid, m.qos, self.conn))

    def _deliver(self, topic: bytes, payload: bytes, mid: int, qos: int) -> None:
        try:
            t = topic.decode()
        except UnicodeDecodeError:
            t = topic.decode("utf-8", "replace")
        self._on_message(t, payload, Delivery(mid, qos, self.conn))

    def _readable(self) -> None:
        # Read until the socket is empty, but hand over every `drain_max` packets (the
        # committer then starts on what is here while we read on): bounded latency under
        # a burst, and commits overlap reading.
        c = self.client
        c.would_block = False
        k = 0
        try:
            while not c.would_block and not self._paused:
                if c.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
                k += 1
                if k >= self.drain_max:
                    assert self._loop is not None
                    self._loop.call_soon(self._readable)  # the buffer may hold more
                    break
        finally:
            self._on_drained()

    def _writable(self) -> None:
        self.client.loop_write()

    # ---- control ---------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop reading (back-pressure); buffered data is read after `resume`."""
        if not self._paused:
            self._paused = True
            if self._fd >= 0 and self._loop is not None:
                self._loop.remove_reader(self._fd)

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            if self._fd >= 0 and self._loop is not None:
                self._loop.add_reader(self._fd, self._readable)
                self._loop.call_soon(self._readable)  # bytes may already sit in the buffer

    def ack(self, deliveries: list[Delivery]) -> None:
        """PUBACK each delivery of the current connection, in order, then write them out."""
        c = self.client
        conn = self.conn
        stale = 0
        pubacks = []
        for d in deliveries:
            if d.conn != conn:
                stale += d.qos > 0
            elif d.qos == 1:
                pubacks.append(d.mid)
            elif d.qos:
                c.ack(d.mid, d.qos)
        self.counters["stale_acks"] += stale
        if pubacks and self._fd >= 0:
            # one write for all of them: PUBACK is 0x40 0x02 <packet id>
            data = b"".join([b"\x40\x02" + m.to_bytes(2, "big") for m in pubacks])
            c._packet_queue(mqtt.PUBACK, data, 0, 0)
        if c.want_write():
            c.loop_write()

    async def run(self) -> None:
        """Connect and stay connected (reconnecting with backoff) until `stop()`."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        misc = asyncio.create_task(self._misc())
        backoff = 0.1
        try:
            while not self._stopping:
                self._closed.clear()
                try:
                    await self._loop.run_in_executor(None, self.client.reconnect)
                except (OSError, ssl.SSLError) as e:
                    log.warning(
                        "cannot connect to %s:%d: %s (retry in %.1fs)",
                        self.cfg.host,
                        self.cfg.port,
                        e,
                        backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                t0 = time.monotonic()
                await self._closed.wait()
                if time.monotonic() - t0 > 10:
                    backoff = 0.1
                if not self._stopping:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            misc.cancel()

    async def _misc(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._fd >= 0:
                self.client.loop_misc()  # keepalive pings, dead-connection detection

    def stop(self) -> None:
        """Disconnect cleanly (the session stays on the broker)."""
        self._stopping = True
        if self._fd >= 0:
            self.client.disconnect()
            self.client.loop_write()
        self._closed.set()
