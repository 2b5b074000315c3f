# MQTT 3.1.1 client for the station: asyncio transport around mqtt_codec (which assumes a
# good link). This layer owns connectivity: connect with a timeout, keepalive, reconnect
# forever with jittered exponential backoff, and the QoS 1 in-flight window that survives
# reconnects (retransmitted with DUP, same packet id, same bytes, in order, before
# anything new). Runs on the ESP32, the MicroPython unix port and CPython.
#
# Use:
#     c = MQTTClient(host, port, sid, user=sid, will=(topic, payload, 1, True))
#     c.on_puback = lambda pid, ref: outbox.ack(ref)
#     asyncio.create_task(c.run())          # connects, reconnects, never raises
#     await c.publish(topic, payload, ref=outbox_id)
#
# Feeding from the outbox (pending() -> [(id, topic, payload)], oldest first; ack(id)):
#     for oid, topic, payload in outbox.pending():
#         if not c.holds(oid):               # already in flight: the client resends it
#             await c.publish(topic, payload, ref=oid)
# publish() blocks while the window is full or the link is down, so this loop is the
# flow control. `ref` travels with the message and comes back in on_puback(pid, ref):
# no pid bookkeeping in the caller, and no race with a PUBACK that arrives before
# publish() has returned. The in-flight window lives in RAM: after a reboot the outbox
# simply sends its pending messages again (new packet ids, DUP clear); the agent dedups
# on (sid, boot, seq).
import random

import mqtt_codec as mc
import timebase

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore

_MP = hasattr(asyncio, "sleep_ms")  # MicroPython's asyncio

if _MP:
    import errno
    import socket


async def _wait_ms(aw, ms):
    """Await aw for at most ms milliseconds (asyncio.TimeoutError after)."""
    if _MP:
        return await asyncio.wait_for_ms(aw, ms)  # type: ignore[attr-defined]
    return await asyncio.wait_for(aw, ms / 1000)


# mbedTLS: X509 certificate verification failed; the server's Certificate message bad
_MBEDTLS_CERT_ERRNOS = (-0x2700, -0x7A00)


class CertError(OSError):
    """The broker's TLS certificate was refused: not signed by the pinned CA, expired, or
    not issued for the host name we connect to. Not a network failure: retrying reaches
    the same broker, so the station raises an alarm (once per streak of them)."""


def _cert_failure(e):
    """Is this handshake failure the certificate check? MicroPython's TLS raises ValueError
    carrying mbedTLS's verification text (OSError(-0x2700) when built without it), CPython
    ssl.SSLCertVerificationError (a ValueError too)."""
    if isinstance(e, (CertError, ValueError)):
        return True
    return isinstance(e, OSError) and bool(e.args) and e.args[0] in _MBEDTLS_CERT_ERRNOS


def _cert_error(e):
    msg = e.args[-1] if e.args else e
    if not isinstance(msg, str):
        msg = str(msg)
    return CertError("broker certificate refused: " + " ".join(msg.split())[:120])


def _io(e):
    """Whatever the socket or TLS layer raised is an I/O failure (the certificate check
    was told apart before: MQTTClient._classify)."""
    if isinstance(e, (OSError, EOFError, asyncio.TimeoutError)):
        return e
    return OSError("%s: %s" % (type(e).__name__, e))


def _close_raw(raw):
    """MicroPython's TLS socket lets go of its TCP socket, unclosed, when the handshake
    fails (a refused certificate): one descriptor lost per attempt unless closed here.
    Closing it again after a normal close does nothing."""
    if raw is not None:
        try:
            raw.close()
        except Exception:
            pass


def tls_context(ca):
    """A TLS client context that requires the broker's certificate to chain to `ca` (one CA
    certificate, DER bytes) and, at wrap time, to name the host (server_hostname). Built
    once per client and reused for every connection: mbedTLS parses the CA here only."""
    import ssl

    if not _MP:
        # CPython: CERT_REQUIRED and check_hostname
        return ssl.create_default_context(cadata=ca)  # type: ignore[attr-defined]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # MicroPython's client default is CERT_NONE (the stubs miss the attribute)
    ctx.verify_mode = ssl.CERT_REQUIRED  # type: ignore[attr-defined]
    ctx.load_verify_locations(cadata=ca)
    return ctx


class MQTTError(Exception):
    """The broker refused the connection (CONNACK return code in .rc)."""

    def __init__(self, rc):
        super().__init__("connection refused, return code %d" % rc)
        self.rc = rc


class MQTTClient:
    """One MQTT 3.1.1 connection, kept up by run(). Callbacks (plain functions, called
    from the reader; an exception in one is counted in cb_errors, never kills the link):
      on_puback(pid, ref)            a QoS 1 publish was acknowledged
      on_message(topic, payload, retain)  a subscribed message (PUBACK follows the call)
      on_connect(session_present)    after every successful (re)connect, once the
                                     retransmissions are out (publish a birth from a task)
      on_cert_error(message)         the broker's TLS certificate was refused, the first
                                     time in a streak of failures (a connect ends it)
    TLS: tls=True with `ca` (the broker's CA, DER bytes) verifies the broker's certificate
    against it and against `host`; tls=True without a CA is refused (ValueError). `tls` may
    also be a ready ssl.SSLContext, used as it is.
    Counters (ints, for status and telemetry): attempts, connects, reconnects,
    proto_errors, timeouts, io_errors, cert_errors, refused, internal_errors, retransmits,
    acked, dup_acks, sub_errors, cb_errors; see counters()."""

    def __init__(
        self,
        host,
        port,
        client_id,
        user=None,
        password=None,
        keepalive_s=60,
        will=None,
        clean_session=False,
        window=16,
        tls=False,
        ca=None,
        max_packet=8192,
        connect_timeout_ms=10000,
        io_timeout_ms=10000,
        backoff_min_ms=500,
        backoff_max_ms=60000,
        stable_ms=30000,
    ):
        if not 1 <= window <= 1024:
            raise ValueError("window must be 1..1024")
        self.host = host
        self.port = port
        wt = wp = None
        wq = 0
        wr = False
        if will is not None:
            wt, wp, wq, wr = will
        # Built once: sent unchanged on every (re)connect.
        self._connect_pkt = mc.connect(
            client_id, keepalive_s, clean_session, user, password, wt, wp or b"", wq, wr
        )
        self._ka = keepalive_s * 1000
        self._window = window
        if tls is True:
            if not ca:
                raise ValueError("tls needs the broker's CA (ca=DER bytes): stations verify")
            tls = tls_context(ca)  # the CA parsed once, not at every connect
        self._tls = tls
        self._cto = connect_timeout_ms
        self._ito = io_timeout_ms
        self._bmin = backoff_min_ms
        self._bmax = backoff_max_ms
        self._stable = stable_ms
        self.on_puback = None
        self.on_message = None
        self.on_connect = None
        self.on_cert_error = None
        self.connected = False
        self.last_error = ""
        self.attempts = self.connects = self.reconnects = 0
        self.proto_errors = self.timeouts = self.io_errors = self.refused = 0
        self.cert_errors = 0
        self._cert_streak = False  # a certificate refusal since the last connect
        self._cause = None  # what ended the current attempt or connection first
        self.retransmits = self.acked = self.dup_acks = 0
        self.sub_errors = self.cb_errors = self.internal_errors = 0
        self._dec = mc.Decoder(max_packet)
        self._rbuf = bytearray(512)
        self._fl = []  # in flight, oldest first: [pid, packet bytearray, ref]; len <= window
        self._subs = []  # [topic filter, qos, sent]: at most 8; resent when the session is gone
        self._pid = 0
        self._lock = asyncio.Lock()  # one writer at a time (MicroPython allows one per socket)
        self._change = asyncio.Event()  # a window slot freed or the link came up
        self._ev = asyncio.Event()  # CONNACK arrived or the connection died
        self._pong = asyncio.Event()
        self._stop = asyncio.Event()
        self._running = False
        self._quitting = False
        self._down = True  # the current connection is dead (or there is none)
        self._rc = -1  # CONNACK return code, -1 until it arrives
        self._sp = False  # CONNACK session present
        self._r = self._w = self._sock = None
        self._raw = None  # the TCP socket under TLS: a refused handshake leaves it open
        self._tasks = []
        self._last_rx = timebase.ticks_ms()

    # ---- public ---------------------------------------------------------------------

    def counters(self):
        return {
            "attempts": self.attempts,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "proto_errors": self.proto_errors,
            "timeouts": self.timeouts,
            "io_errors": self.io_errors,
            "cert_errors": self.cert_errors,
            "refused": self.refused,
            "retransmits": self.retransmits,
            "acked": self.acked,
            "dup_acks": self.dup_acks,
            "sub_errors": self.sub_errors,
            "cb_errors": self.cb_errors,
            "internal_errors": self.internal_errors,
            "inflight": len(self._fl),
        }

    def inflight(self):
        """Number of QoS 1 publishes sent (or to be resent) and not yet acknowledged."""
        return len(self._fl)

    def holds(self, ref):
        """True while a publish made with this ref awaits its PUBACK."""
        for e in self._fl:
            if e[2] == ref:
                return True
        return False

    async def run(self):
        """Keep the connection up until disconnect(): connect, wait for the link to die,
        back off (jittered, doubling from backoff_min_ms to backoff_max_ms; back to the
        minimum after a connection that lasted stable_ms), repeat. Never raises."""
        self._running = True
        self._stop.clear()
        try:
            await self._run()
        finally:  # also when the caller cancels run(): leave no socket or task behind
            self._running = False
            self._abort()

    async def _run(self):
        backoff = self._bmin
        first = True
        while self._running:
            if not first:
                self.reconnects += 1
            first = False
            up = None
            try:
                await self.connect()
                up = timebase.ticks_ms()
                while not self._down:
                    self._ev.clear()  # no await since the check: a kill cannot be missed
                    await self._ev.wait()
            except Exception as e:  # every failure is counted by _fail, then we retry
                self._fail(e)
            await self._close()
            if not self._running:
                break
            if up is not None and timebase.ticks_diff(timebase.ticks_ms(), up) >= self._stable:
                backoff = self._bmin
            delay = backoff * (768 + random.getrandbits(9)) // 1024  # +-25 %
            backoff = min(backoff * 2, self._bmax)
            try:
                await _wait_ms(self._stop.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def connect(self):
        """One connection attempt within connect_timeout_ms: TCP (and TLS), CONNECT,
        CONNACK, resubscribe if the broker has no session, retransmit the in-flight
        window. Raises CertError (an OSError: the broker's certificate refused), OSError,
        asyncio.TimeoutError, mqtt_codec.ProtocolError or MQTTError; run() calls this
        for you."""
        await self._close()
        self.attempts += 1
        self._down = False
        self._rc = -1
        self._cause = None
        self._ev.clear()
        self._dec.reset()
        try:
            sp = await _wait_ms(self._handshake(), self._cto)
            await self._resume(sp)
        except Exception as e:
            self._fail(self._classify(e))
            await self._close()
            raise self._cause or e  # the first cause: a CertError says what went wrong
        self.connects += 1
        self._cert_streak = False
        self._last_rx = timebase.ticks_ms()
        if self._ka:
            self._tasks.append(asyncio.create_task(self._keepalive()))
        if self.on_connect:
            self._call(self.on_connect, sp)

    async def publish(self, topic, payload, qos=1, retain=False, ref=None):
        """Send a PUBLISH and return its packet id (0 for QoS 0) once it has been handed
        to the socket, not once acknowledged. Waits while the link is down or, for QoS 1,
        while the in-flight window is full. A QoS 1 message accepted here is kept until
        its PUBACK and resent after any reconnect; on_puback(pid, ref) reports the ack.
        Raises ValueError for a bad topic or qos (only 0 and 1 are supported)."""
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        pkt = mc.publish(topic, payload, qos, retain, False, 1 if qos else 0)
        while True:
            while not self.connected or (qos and len(self._fl) >= self._window):
                self._change.clear()
                await self._change.wait()
            async with self._lock:
                if not self.connected or (qos and len(self._fl) >= self._window):
                    continue  # the link dropped or the slot went while we queued
                pid = 0
                if qos:
                    pid = self._next_pid()
                    mc.set_pid(pkt, pid)
                    self._fl.append([pid, pkt, ref])
                await self._write(pkt)  # a failure is recorded; the message stays in flight
                return pid

    async def subscribe(self, topic, qos=1):
        """Subscribe now if connected, and again after any reconnect that finds no
        session on the broker. At most 8 filters; QoS 0 or 1."""
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        mc.subscribe(1, topic, qos)  # validates the filter
        for e in self._subs:
            if e[0] == topic:
                if e[1] != qos:
                    e[1] = qos
                    e[2] = False
                break
        else:
            if len(self._subs) >= 8:
                raise ValueError("too many subscriptions")
            self._subs.append([topic, qos, False])
        if self.connected:
            await self._send_subs()

    async def _send_subs(self):
        async with self._lock:
            await self._write_subs()

    async def _write_subs(self):
        """SUBSCRIBE every filter the broker's session lacks (lock held)."""
        for e in self._subs:
            if not e[2]:
                if not await self._write(mc.subscribe(self._next_pid(), e[0], e[1])):
                    return False
                e[2] = True
        return True

    async def ping(self, timeout_ms=5000):
        """PINGREQ and wait for the PINGRESP: the round trip in ms, or -1."""
        if not self.connected:
            return -1
        t0 = timebase.ticks_ms()
        self._pong.clear()
        if not await self._send(mc.PINGREQ_PKT):
            return -1
        try:
            await _wait_ms(self._pong.wait(), timeout_ms)
        except asyncio.TimeoutError:
            return -1
        return timebase.ticks_diff(timebase.ticks_ms(), t0)

    async def disconnect(self):
        """Send DISCONNECT (so the broker drops the will), close, and stop run()."""
        self._running = False
        self._stop.set()
        if self.connected:
            self._quitting = True  # the broker's close that follows is no error
            await self._send(mc.DISCONNECT_PKT)
        self._kill()
        await self._close()
        self._quitting = False

    # ---- connection -----------------------------------------------------------------

    async def _handshake(self):
        if _MP:
            # Our own socket rather than asyncio.open_connection, so that a connect that
            # times out still leaves us the socket to close (lwIP has few to spare).
            ai = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0]
            s = socket.socket(ai[0], ai[1], ai[2])
            self._sock = s
            s.setblocking(False)
            try:
                s.connect(ai[-1])
            except OSError as e:
                if e.errno != errno.EINPROGRESS:
                    raise
            if self._tls:
                import ssl

                ctx = self._tls
                if ctx is True:
                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                self._raw = s
                s = ctx.wrap_socket(s, server_hostname=self.host, do_handshake_on_connect=False)
                s.setblocking(False)
                self._sock = s
            self._r = self._w = asyncio.StreamWriter(s)  # type: ignore[call-arg]
        else:
            self._r, self._w = await asyncio.open_connection(
                self.host, self.port, ssl=self._tls or None
            )
        self._tasks.append(asyncio.create_task(self._reader()))
        if not await self._send(self._connect_pkt, True):
            raise self._cause or OSError("CONNECT not sent")
        while self._rc < 0 and not self._down:
            await self._ev.wait()
        if self._down:
            raise self._cause or OSError("connection lost before CONNACK")
        self._ev.clear()  # from now on it signals only the death of this connection
        if self._rc:
            raise MQTTError(self._rc)
        return self._sp

    async def _resume(self, session_present):
        """After CONNACK: subscriptions, then the unacked window (DUP, same pid, same
        bytes, original order), then open the gate for new publishes, under the write
        lock so that no new publish can slip in between."""
        async with self._lock:
            if not session_present:
                for e in self._subs:
                    e[2] = False
            if not await self._write_subs():
                raise OSError("SUBSCRIBE not sent")
            for e in list(self._fl):  # a copy: PUBACKs may remove entries meanwhile
                if e not in self._fl:
                    continue
                e[1][0] |= 0x08
                if not await self._write(e[1]):
                    raise OSError("retransmission not sent")
                self.retransmits += 1
            if self._down:
                raise OSError("connection lost while resuming")
            self.connected = True
        self._change.set()

    async def _close(self):
        self.connected = False
        self._down = True
        cur = asyncio.current_task()
        for t in self._tasks:
            if t is not cur:
                t.cancel()
        self._tasks = []
        s, w, raw = self._sock, self._w, self._raw
        self._r = self._w = self._sock = self._raw = None
        if s is None and w is None:
            return
        # Close only once no writer is inside drain() on this socket: a task left waiting
        # on a closed socket's descriptor could be woken by the next socket given the
        # same number. Writers give up within io_timeout_ms.
        locked = False
        try:
            await _wait_ms(self._lock.acquire(), self._ito + 1000)
            locked = True
        except Exception:
            pass
        try:
            if s is not None:
                s.close()
            elif w is not None:
                w.close()
                await _wait_ms(w.wait_closed(), 1000)
        except Exception:  # closing a dead socket may complain; it is closed either way
            pass
        finally:
            _close_raw(raw)
            if locked:
                self._lock.release()

    def _abort(self):
        """_close() without waiting: for a cancelled run()."""
        self.connected = False
        self._down = True
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        s, w, raw = self._sock, self._w, self._raw
        self._r = self._w = self._sock = self._raw = None
        try:
            if s is not None:
                s.close()
            elif w is not None:
                w.close()
        except Exception:
            pass
        _close_raw(raw)

    def _kill(self):
        """Mark the current connection dead and wake whoever waits on it."""
        self.connected = False
        self._down = True
        self._ev.set()

    def _classify(self, e):
        """A failure of the TLS handshake that is the certificate check becomes CertError."""
        if self._tls and self._rc < 0 and not isinstance(e, CertError) and _cert_failure(e):
            return _cert_error(e)
        return e

    def _fail(self, e):
        """Count a connection failure once (the first cause wins) and kill the link."""
        if self._down or self._quitting:
            return
        self._cause = e
        if isinstance(e, CertError):
            self.cert_errors += 1
            if not self._cert_streak:  # once per streak: not one alarm per retry
                self._cert_streak = True
                if self.on_cert_error:
                    self._call(self.on_cert_error, str(e))
        elif isinstance(e, mc.ProtocolError):
            self.proto_errors += 1
        elif isinstance(e, asyncio.TimeoutError):
            self.timeouts += 1
        elif isinstance(e, MQTTError):
            self.refused += 1
        elif isinstance(e, (OSError, EOFError)):
            self.io_errors += 1
        else:  # a bug of ours or of a library: counted apart, and recovered from all the same
            self.internal_errors += 1
        self.last_error = "%s: %s" % (type(e).__name__, e)
        self._kill()

    # ---- I/O ------------------------------------------------------------------------

    async def _write(self, pkt):
        """Write one packet with the lock held; on failure kill the link, return False."""
        w = self._w
        if w is None or self._down:
            return False
        try:
            w.write(pkt)
            await _wait_ms(w.drain(), self._ito)
            return True
        except Exception as e:
            if self._w is w:  # else the connection was replaced meanwhile: not its fault
                self._fail(_io(self._classify(e)))
            return False

    async def _send(self, pkt, handshake=False):
        async with self._lock:
            if not (self.connected or handshake):
                return False
            return await self._write(pkt)

    async def _reader(self):
        r = self._r
        buf = self._rbuf
        mv = memoryview(buf)
        dec = self._dec
        try:
            while True:
                try:
                    if _MP:
                        n = await r.readinto(buf)  # type: ignore[union-attr]
                        if n is None:  # spurious wake-up (EAGAIN)
                            continue
                        data = mv[:n]
                    else:
                        data = await r.read(len(buf))  # type: ignore[union-attr]
                        n = len(data)
                except Exception as e:
                    self._fail(_io(self._classify(e)))
                    return
                if not n:
                    raise OSError("connection closed by broker")
                self._last_rx = timebase.ticks_ms()
                for p in dec.feed(data):
                    await self._handle(p)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._fail(e)

    async def _handle(self, p):
        t = p.type
        if self._rc < 0:
            if t != mc.CONNACK:
                raise mc.ProtocolError("packet type %d before CONNACK" % t)
            self._rc = p.rc
            self._sp = p.session_present
            self._ev.set()
        elif t == mc.PUBACK:
            fl = self._fl
            for i in range(len(fl)):
                if fl[i][0] == p.pid:
                    ref = fl[i][2]
                    del fl[i]
                    self.acked += 1
                    self._change.set()
                    if self.on_puback:
                        self._call(self.on_puback, p.pid, ref)
                    return
            self.dup_acks += 1  # e.g. the ack of a retransmission already acked
        elif t == mc.PUBLISH:
            if p.qos > 1:
                raise mc.ProtocolError("QoS 2 PUBLISH (we subscribe at QoS <= 1)")
            if self.on_message:
                self._call(self.on_message, p.topic, p.payload, p.retain)
            if p.qos:
                await self._send(mc.puback(p.pid), True)
        elif t == mc.PINGRESP:
            self._pong.set()
        elif t == mc.SUBACK:
            if 0x80 in p.codes:
                self.sub_errors += 1
        else:
            raise mc.ProtocolError("unexpected packet type %d" % t)

    def _call(self, fn, *args):
        try:
            fn(*args)
        except Exception as e:
            self.cb_errors += 1
            self.last_error = "callback: %s: %s" % (type(e).__name__, e)

    async def _keepalive(self):
        """PINGREQ every keepalive/2; the link is dead when nothing has arrived for
        keepalive x 1.5 (a PINGRESP is due well before that)."""
        half = self._ka // 2
        step = min(half, 1000)
        last_ping = timebase.ticks_ms()
        while not self._down:
            await timebase.asleep_ms(step)
            now = timebase.ticks_ms()
            if timebase.ticks_diff(now, self._last_rx) > self._ka * 3 // 2:
                self._fail(asyncio.TimeoutError("no traffic for keepalive x 1.5"))
                return
            if timebase.ticks_diff(now, last_ping) >= half:
                last_ping = now
                await self._send(mc.PINGREQ_PKT)

    def _next_pid(self):
        while True:
            self._pid = self._pid % 65535 + 1
            for e in self._fl:
                if e[0] == self._pid:
                    break
            else:
                return self._pid
