"""MQTT side of the agent: our own MQTT 3.1.1 subscriber on asyncio's transports.

The packets are agent/sources/mqtt_codec.py (sans-I/O); this module is the thin loop
around it: connect (TCP or TLS), CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH in, PUBACK
out, PINGREQ, reconnect with backoff. No MQTT library, so no library internals to depend
on (paho-mqtt stays for the tests, the benches and the tools' publishers).

Why this shape (measured, see bench/bench_ingest.py and docs/agent.md):
- One thread: the asyncio loop reads, decodes, verifies and keeps the books; the database
  commits in a writer thread. The transport reads into our 1 MB buffer (`READ_SIZE`,
  asyncio.BufferedProtocol) and the decoder slices whole packets out of the chunk, so a
  message costs a fraction of a syscall and one small object (paho reads one header byte
  per `recv()` and builds an MQTTMessage, matches the topic and takes locks for each).
- Why 1 MB: the committer takes whatever was read while the previous commit ran, and a
  commit cycle spans about two loop iterations, so the batch is about two reads. With
  asyncio's own 256 KB reads a backlog drained in commits of ~1,100 messages and 10–20 %
  slower than with paho's reader (whose ~1,000 packets per iteration gave commits of
  5,000); with 1 MB reads, ~4,500 (bench/bench_ingest.py). A read is that large only
  when a backlog waits; the loop then runs ~100 ms of verification per read.
- QoS 1 with acknowledgement on request: a message's PUBACK goes out only when `ack()` is
  called with its delivery, after its raw row (or its quarantine row) is committed. A
  SIGKILL never loses what the broker thinks delivered; the broker redelivers the rest,
  and they become counted duplicates. The PUBACKs of a batch go out in one write.
- A persistent session (clean_session=False, fixed client id): what stations publish
  while the agent is down waits in the broker and arrives on reconnect.
- PUBACKs belong to one connection: a message received on an earlier connection is never
  acknowledged on a later one (the broker resends it, with the same or another packet id).
- Flow control: `pause()` stops reading the socket (the broker's in-flight window and TCP
  then hold the rest back); packets already read stay in the decoder until `resume()`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import msgspec

from agent.sources.mqtt_codec import (
    CONNACK_REASONS,
    DISCONNECT_PKT,
    PINGREQ_PKT,
    SUBACK_FAILURE,
    ConnAck,
    Decoder,
    PingResp,
    ProtocolError,
    PubAck,
    Publish,
    SubAck,
    connect,
    pubacks,
    subscribe,
)

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
CONNECT_TIMEOUT_S = 10.0  # TCP and TLS handshake
HANDSHAKE_TIMEOUT_S = 10.0  # CONNECT → CONNACK → SUBACK (time spent paused not counted)
STABLE_S = 10.0  # a connection that lasted this long resets the backoff
READ_SIZE = 1 << 20  # most bytes taken from the socket per loop iteration (see above)
DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line
    tls: bool = False
    tls_ca: str | None = None  # CA bundle; the system's when None
    tls_cert: str | None = None  # client certificate (optional)
    tls_key: str | None = None
    tls_insecure: bool = False  # skip host name check (test rigs only)
    client_id: str = "stationctl-agent"
    prefix: str = "stations"
    keepalive: int = 30
    # the broker's count of messages it dropped (queue limits): alarmed when it grows; a
    # broker that refuses this subscription (its ACL) only makes the agent say so once
    watch_dropped: bool = True

    def topics(self) -> list[tuple[str, int]]:
        # several agents do not share one subscription ($share loses the messages queued
        # for a member that died: docs/scaling.md); they hold shards (agent/cluster.py)
        t = [(f"{self.prefix}/+/{k}", 1) for k in ("telemetry", "event", "status")]
        if self.watch_dropped:
            t.append((DROPPED_TOPIC, 0))
        return t


def tls_context(cfg: BrokerConfig) -> ssl.SSLContext:
    """Certificate and host name verified (the host name check is off with
    `tls_insecure`); the system's CAs unless `tls_ca`; a client certificate if given."""
    ctx = ssl.create_default_context(cafile=cfg.tls_ca)
    if cfg.tls_cert:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_insecure:
        ctx.check_hostname = False
    return ctx


class Delivery(msgspec.Struct):
    """What a message needs for its PUBACK: packet id, QoS and the connection it came on.
    A Struct: one is made for every message, in ~0.08 µs against ~0.15–0.3 for a class
    with an __init__ of its own."""

    mid: int
    qos: int
    conn: int
    src: MqttSource | None = None  # the session it came on, when there are several


OnMessage = Callable[[str, bytes, Delivery], None]

_CONNECTING, _SUBSCRIBING, _UP = 0, 1, 2
_SUB_PID = 1  # the one SUBSCRIBE of a connection


class _Conn(asyncio.BufferedProtocol):
    """One connection to the broker: its transport, read buffer, decoder and handshake
    state."""

    def __init__(self, src: MqttSource, no: int) -> None:
        self.src = src
        self.no = no
        self.transport: asyncio.Transport | None = None
        self.decoder = Decoder()
        self._rbuf: memoryview | None = None  # the transport reads into it
        self.state = _CONNECTING
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.opened = time.monotonic()
        self.last_ping = self.opened
        self.ping_sent = 0.0  # when the oldest unanswered PINGREQ went out; 0: none
        self.why = ""  # why we dropped it, for the log

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.src._opened(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._rbuf is None:
            self._rbuf = memoryview(bytearray(READ_SIZE))
        return self._rbuf

    def buffer_updated(self, nbytes: int) -> None:
        assert self._rbuf is not None
        self.decoder.feed(self._rbuf[:nbytes].tobytes())  # the buffer is reused at once
        self.src._dispatch(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.src._lost(self, exc)

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def drop(self, why: str) -> None:
        """Close at once (unsent bytes are dropped: the broker keeps what is unacked)."""
        self.why = why
        if self.transport is not None:
            self.transport.abort()


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
        # built now, so that a missing certificate file is an error at start
        self._ssl = tls_context(cfg) if cfg.tls else None
        self._connect_pkt = connect(
            cfg.client_id,
            keepalive=cfg.keepalive,
            clean_session=False,
            user=cfg.user or None,
            password=cfg.password if cfg.user else None,
        )
        self._subscribe_pkt = subscribe(_SUB_PID, cfg.topics())
        self.conn = 0  # connection number: bumped on every new socket
        self.connected = asyncio.Event()  # connected and subscribed
        self._c: _Conn | None = None  # the open connection
        self._stop = asyncio.Event()
        self._stopping = False
        self._paused = False
        self.counters = {"connects": 0, "disconnects": 0, "stale_acks": 0, "protocol_errors": 0}

    # ---- the connection's callbacks (loop thread) ------------------------------------------

    def _opened(self, c: _Conn) -> None:
        assert c.transport is not None
        self._c = c
        self.conn = c.no
        if self._stopping:
            c.transport.close()
            return
        if self._paused:
            c.transport.pause_reading()
        c.write(self._connect_pkt)

    def _dispatch(self, c: _Conn) -> None:
        """Hand over the packets the decoder holds, until it needs bytes or we pause."""
        if c is not self._c:
            return  # a connection that is closing
        dec = c.decoder
        on_message = self._on_message
        no = c.no
        try:
            while not self._paused:
                p = dec.next()
                if p is None:
                    break
                if isinstance(p, Publish):
                    if c.state == _CONNECTING:
                        raise ProtocolError("PUBLISH before CONNACK")
                    on_message(p.topic, p.payload, Delivery(p.pid, p.qos, no))
                else:
                    self._control(c, p)
                    if c.why:
                        break  # dropped it
        except ProtocolError as e:
            self.counters["protocol_errors"] += 1
            log.error("protocol error from %s:%d: %s", self.cfg.host, self.cfg.port, e)
            c.drop(f"protocol error: {e}")
        finally:
            self._on_drained()

    def _control(self, c: _Conn, p: ConnAck | SubAck | PubAck | PingResp) -> None:
        cfg = self.cfg
        if isinstance(p, PingResp):
            c.ping_sent = 0.0
        elif isinstance(p, ConnAck):
            if c.state != _CONNECTING:
                raise ProtocolError("a second CONNACK")
            if p.rc:
                log.error("broker refused the connection: %s", CONNACK_REASONS[p.rc])
                c.drop(f"refused: {CONNACK_REASONS[p.rc]}")
                return
            self.counters["connects"] += 1
            log.info(
                "connected to %s:%d as %s (session present: %s)",
                cfg.host,
                cfg.port,
                cfg.client_id,
                p.session_present,
            )
            c.state = _SUBSCRIBING
            c.write(self._subscribe_pkt)
        elif isinstance(p, SubAck):
            topics = cfg.topics()
            if c.state != _SUBSCRIBING or p.pid != _SUB_PID or len(p.codes) != len(topics):
                raise ProtocolError(f"unexpected {p!r}")
            bad = [
                t for (t, _), code in zip(topics, p.codes, strict=True) if code == SUBACK_FAILURE
            ]
            if DROPPED_TOPIC in bad:  # informational: ingest goes on without it
                bad.remove(DROPPED_TOPIC)
                if not self.counters.get("sys_refused"):
                    log.warning(
                        "broker refused %s: its dropped messages cannot be alarmed "
                        "(allow the agent to read it in the broker's ACL)",
                        DROPPED_TOPIC,
                    )
                self.counters["sys_refused"] = 1
            if bad:
                # e.g. the broker's ACL: stay loud and retry (with backoff) until it is fixed
                log.error("broker refused subscriptions: %s", ", ".join(bad))
                c.drop("subscription refused")
                return
            c.state = _UP
            log.info("subscribed to %s", ", ".join(t for t, _ in topics))
            self.connected.set()
        else:
            raise ProtocolError(f"{p!r} for a message we never sent")

    def _lost(self, c: _Conn, exc: Exception | None) -> None:
        if c is self._c:
            self._c = None
            self.connected.clear()
        self.counters["disconnects"] += 1
        if not c.closed.done():
            c.closed.set_result(None)
        if not self._stopping:
            why = c.why or (str(exc) if exc else "closed by the broker")
            log.warning("disconnected from %s:%d (%s)", self.cfg.host, self.cfg.port, why)

    # ---- control -----------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop reading (back-pressure); what was read already is handed over after
        `resume`."""
        if not self._paused:
            self._paused = True
            c = self._c
            if c is not None and c.transport is not None:
                c.transport.pause_reading()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            c = self._c
            if c is not None and c.transport is not None and not c.transport.is_closing():
                c.transport.resume_reading()
                now = time.monotonic()
                if c.ping_sent:
                    c.ping_sent = now  # its answer could not be read while paused
                if c.state != _UP:
                    c.opened = now
                if c.decoder.buffered:
                    asyncio.get_running_loop().call_soon(self._dispatch, c)

    def ack(self, deliveries: list[Delivery]) -> None:
        """PUBACK each QoS 1 delivery of the current connection, in order, in one write.
        Deliveries of an earlier connection are not acknowledged (counted `stale_acks`):
        the broker sends them again."""
        c = self._c
        no = c.no if c is not None else -1
        pids = [d.mid for d in deliveries if d.conn == no and d.qos]
        stale = sum(1 for d in deliveries if d.qos and d.conn != no)
        if stale:
            self.counters["stale_acks"] += stale
        if pids and c is not None:
            c.write(pubacks(pids))

    async def run(self) -> None:
        """Connect and stay connected (reconnecting with backoff) until `stop()`."""
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        backoff = BACKOFF_MIN_S
        while not self._stopping:
            c = _Conn(self, self.conn + 1)
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(
                    loop.create_connection(
                        lambda c=c: c,
                        cfg.host,
                        cfg.port,
                        ssl=self._ssl,
                        server_hostname=cfg.host if self._ssl else None,
                    ),
                    CONNECT_TIMEOUT_S,
                )
            except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
                if c.transport is not None:
                    c.transport.abort()
                log.warning(
                    "cannot connect to %s:%d: %s (retry in %.1fs)",
                    cfg.host,
                    cfg.port,
                    str(e) or type(e).__name__,
                    backoff,
                )
            else:
                watch = asyncio.create_task(self._watch(c))
                try:
                    await c.closed
                finally:
                    watch.cancel()
                    if not self._stopping and c.transport is not None:
                        c.transport.abort()  # cancelled: do not leave the socket behind
                if time.monotonic() - t0 > STABLE_S:
                    backoff = BACKOFF_MIN_S
            if self._stopping:
                break
            try:
                await asyncio.wait_for(self._stop.wait(), backoff)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _watch(self, c: _Conn) -> None:
        """Handshake timeout, keepalive pings, and a dead link found by a missing PINGRESP."""
        ka = self.cfg.keepalive
        tick = min(1.0, ka / 4) if ka else 1.0
        while not c.closed.done():
            await asyncio.sleep(tick)
            now = time.monotonic()
            if c.state != _UP:
                if not self._paused and now - c.opened > HANDSHAKE_TIMEOUT_S:
                    what = "CONNACK" if c.state == _CONNECTING else "SUBACK"
                    c.drop(f"no {what} within {HANDSHAKE_TIMEOUT_S:.0f}s")
                    return
                if c.state == _CONNECTING:
                    continue
            if not ka:
                continue
            if c.ping_sent and not self._paused and now - c.ping_sent > ka:
                c.drop(f"no PINGRESP within {ka}s")
                return
            # a ping every keepalive/2 s; while paused even with one unanswered (its answer
            # waits unread), so that the broker keeps hearing from us
            if now - c.last_ping >= ka / 2 and (not c.ping_sent or self._paused):
                c.write(PINGREQ_PKT)
                c.last_ping = now
                if not c.ping_sent:
                    c.ping_sent = now

    def stop(self) -> None:
        """Disconnect cleanly (the session stays on the broker); `run()` returns."""
        self._stopping = True
        self._stop.set()
        c = self._c
        if c is not None and c.transport is not None and not c.transport.is_closing():
            c.transport.write(DISCONNECT_PKT)
            c.transport.close()
