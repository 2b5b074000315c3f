# MQTT 3.1.1 packet codec, sans-I/O: encoders for what a station sends, a streaming
# decoder for what a broker sends. No sockets, no clocks; mqtt_client drives it.
#
# The decoder is strict: anything a correct 3.1.1 broker would not send to a client that
# publishes at QoS 0/1 and subscribes at QoS <= 1 raises ProtocolError, and the client then
# drops the connection. Once it has raised, the decoder stays failed until reset().
try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef,misc]
        return x


CONNECT = const(1)
CONNACK = const(2)
PUBLISH = const(3)
PUBACK = const(4)
SUBSCRIBE = const(8)
SUBACK = const(9)
PINGREQ = const(12)
PINGRESP = const(13)
DISCONNECT = const(14)

_MAX_RL = const(268435455)  # largest remaining length 4 varint bytes can carry

PINGREQ_PKT = b"\xc0\x00"
DISCONNECT_PKT = b"\xe0\x00"


class ProtocolError(Exception):
    """The peer sent bytes that are not a packet we accept (malformed, oversize, unexpected)."""


# ---- encoders -------------------------------------------------------------------------


def _utf8(s, what):
    b = s.encode() if isinstance(s, str) else bytes(s)
    if len(b) > 65535:
        raise ValueError("%s over 65535 bytes" % what)
    return b


def _topic(topic):
    t = _utf8(topic, "topic")
    if not t or b"+" in t or b"#" in t or b"\x00" in t:
        raise ValueError("bad topic name %r" % (topic,))
    return t


def _start(hdr, n):
    """A bytearray for a packet with fixed header byte hdr and remaining length n,
    header written; returns (buf, offset of the variable header)."""
    if n > _MAX_RL:
        raise ValueError("packet too large")
    vl = 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4
    buf = bytearray(1 + vl + n)
    buf[0] = hdr
    i = 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            buf[i] = b | 0x80
            i += 1
        else:
            buf[i] = b
            return buf, i + 1


def _put(buf, i, b):
    """Write a two-byte length then b at buf[i]; return the offset after it."""
    n = len(b)
    buf[i] = n >> 8
    buf[i + 1] = n & 0xFF
    buf[i + 2 : i + 2 + n] = b
    return i + 2 + n


def _check_pid(pid):
    if not 0 < pid < 65536:
        raise ValueError("packet id must be 1..65535")


def connect(
    client_id,
    keepalive=60,
    clean_session=True,
    user=None,
    password=None,
    will_topic=None,
    will_payload=b"",
    will_qos=0,
    will_retain=False,
):
    """CONNECT (protocol level 4). keepalive in seconds (0 disables it)."""
    cid = _utf8(client_id, "client id")
    if not cid and not clean_session:
        raise ValueError("an empty client id needs clean_session")
    if not 0 <= keepalive <= 65535:
        raise ValueError("keepalive must be 0..65535 s")
    if password is not None and user is None:
        raise ValueError("MQTT 3.1.1 has no password without a user name")
    flags = 0x02 if clean_session else 0
    n = 10 + 2 + len(cid)
    wt = wp = u = p = b""
    if will_topic is not None:
        if not 0 <= will_qos <= 2:
            raise ValueError("will qos must be 0..2")
        wt = _topic(will_topic)
        wp = bytes(will_payload)
        if len(wp) > 65535:
            raise ValueError("will payload over 65535 bytes")
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        n += 4 + len(wt) + len(wp)
    if user is not None:
        u = _utf8(user, "user")
        flags |= 0x80
        n += 2 + len(u)
    if password is not None:
        p = _utf8(password, "password")
        flags |= 0x40
        n += 2 + len(p)
    buf, i = _start(0x10, n)
    i = _put(buf, i, b"MQTT")
    buf[i] = 4
    buf[i + 1] = flags
    buf[i + 2] = keepalive >> 8
    buf[i + 3] = keepalive & 0xFF
    i = _put(buf, i + 4, cid)
    if flags & 0x04:
        i = _put(buf, i, wt)
        i = _put(buf, i, wp)
    if flags & 0x80:
        i = _put(buf, i, u)
    if flags & 0x40:
        i = _put(buf, i, p)
    return bytes(buf)


def publish(topic, payload, qos=0, retain=False, dup=False, pid=0):
    """PUBLISH as a bytearray (mutable, so a retransmission can set DUP in place:
    buf[0] |= 0x08). QoS 0 takes no packet id and no DUP."""
    t = _topic(topic)
    if qos == 0:
        if pid or dup:
            raise ValueError("QoS 0 has no packet id and no DUP")
    elif qos in (1, 2):
        _check_pid(pid)
    else:
        raise ValueError("qos must be 0..2")
    n = 2 + len(t) + (2 if qos else 0) + len(payload)
    buf, i = _start(0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0), n)
    i = _put(buf, i, t)
    if qos:
        buf[i] = pid >> 8
        buf[i + 1] = pid & 0xFF
        i += 2
    buf[i:] = payload
    return buf


def set_pid(pkt, pid):
    """Write a packet id into an encoded QoS>0 PUBLISH (encode once, number it later)."""
    _check_pid(pid)
    i = 1
    while pkt[i] & 0x80:
        i += 1
    i += 1
    i += 2 + ((pkt[i] << 8) | pkt[i + 1])
    pkt[i] = pid >> 8
    pkt[i + 1] = pid & 0xFF


def puback(pid):
    _check_pid(pid)
    return bytes((0x40, 2, pid >> 8, pid & 0xFF))


def subscribe(pid, topic, qos=1):
    """SUBSCRIBE to one topic filter (wildcards allowed)."""
    _check_pid(pid)
    if not 0 <= qos <= 2:
        raise ValueError("qos must be 0..2")
    t = _utf8(topic, "topic filter")
    if not t or b"\x00" in t:
        raise ValueError("bad topic filter %r" % (topic,))
    buf, i = _start(0x82, 2 + 2 + len(t) + 1)
    buf[i] = pid >> 8
    buf[i + 1] = pid & 0xFF
    i = _put(buf, i + 2, t)
    buf[i] = qos
    return bytes(buf)


def pingreq():
    return PINGREQ_PKT


def disconnect():
    return DISCONNECT_PKT


# ---- decoder --------------------------------------------------------------------------


class Packet:
    """One decoded packet. type is CONNACK, PUBLISH, PUBACK, SUBACK or PINGRESP; the
    other fields are set as they apply (the rest keep their defaults):
      CONNACK: rc (0 accepted, 1..5 refused), session_present
      PUBLISH: topic (str), payload (bytes), qos, dup, retain, pid (0 for QoS 0)
      PUBACK:  pid
      SUBACK:  pid, codes (bytes: granted QoS 0..2 or 0x80 failure, one per filter)"""

    def __init__(self, type, flags):
        self.type = type
        self.flags = flags
        self.pid = 0
        self.rc = 0
        self.session_present = False
        self.topic = ""
        self.payload = b""
        self.qos = 0
        self.dup = False
        self.retain = False
        self.codes = b""

    def __repr__(self):
        return "Packet(type=%d, pid=%d)" % (self.type, self.pid)


class Decoder:
    """Streaming decoder: feed(data) takes any chunk of the byte stream and returns the
    list of packets it completed (often empty). Holds at most one packet of max_packet
    bytes (fixed header included), in a buffer allocated once."""

    def __init__(self, max_packet=8192):
        if max_packet < 16:
            raise ValueError("max_packet too small")
        self.max_packet = max_packet
        self._buf = bytearray(max_packet)
        self.reset()

    def reset(self):
        """Forget any partial packet (a new connection starts a new stream)."""
        self._st = 0  # 0 header byte, 1 remaining length, 2 body, 3 failed
        self._hdr = 0
        self._rl = 0
        self._nv = 0
        self._got = 0

    def _fail(self, msg):
        self._st = 3
        raise ProtocolError(msg)

    def feed(self, data):
        out = []
        if self._st == 3:
            raise ProtocolError("decoder failed earlier; reset() it")
        mv = memoryview(data)
        n = len(mv)
        i = 0
        while i < n:
            st = self._st
            if st == 0:
                self._header(mv[i])
                i += 1
                self._rl = 0
                self._nv = 0
                self._st = 1
            elif st == 1:
                b = mv[i]
                i += 1
                self._rl |= (b & 0x7F) << (7 * self._nv)
                self._nv += 1
                if b & 0x80:
                    if self._nv == 4:
                        self._fail("remaining length longer than 4 bytes")
                    continue
                self._length()
                self._got = 0
                if self._rl:
                    self._st = 2
                else:
                    self._st = 0
                    out.append(self._parse())
            else:
                take = self._rl - self._got
                if take > n - i:
                    take = n - i
                g = self._got
                self._buf[g : g + take] = mv[i : i + take]
                self._got = g + take
                i += take
                if self._got == self._rl:
                    self._st = 0
                    out.append(self._parse())
        return out

    def _header(self, h):
        """Reject a first byte no broker may send us, before reading further."""
        t = h >> 4
        f = h & 0x0F
        if t == PUBLISH:
            q = (f >> 1) & 3
            if q == 3:
                self._fail("PUBLISH with QoS 3")
            if q == 0 and f & 0x08:
                self._fail("QoS 0 PUBLISH with DUP set")
        elif t in (CONNACK, PUBACK, SUBACK, PINGRESP):
            if f:
                self._fail("reserved flags 0x%x set on packet type %d" % (f, t))
        else:
            self._fail("unexpected packet type %d (first byte 0x%02x)" % (t, h))
        self._hdr = h

    def _length(self):
        """Check the remaining length against the packet type and the size cap."""
        rl = self._rl
        if 1 + self._nv + rl > self.max_packet:
            self._fail(
                "packet of %d bytes over the %d byte maximum" % (1 + self._nv + rl, self.max_packet)
            )
        t = self._hdr >> 4
        if t == CONNACK or t == PUBACK:
            ok = rl == 2
        elif t == PINGRESP:
            ok = rl == 0
        elif t == SUBACK:
            ok = rl >= 3
        else:  # PUBLISH: topic length, a topic of at least one byte, packet id if QoS > 0
            ok = rl >= (5 if self._hdr & 0x06 else 3)
        if not ok:
            self._fail("remaining length %d wrong for packet type %d" % (rl, t))

    def _parse(self):
        h = self._hdr
        t = h >> 4
        b = self._buf
        rl = self._rl
        p = Packet(t, h & 0x0F)
        if t == CONNACK:
            if b[0] & 0xFE:
                self._fail("CONNACK reserved flags set")
            p.session_present = bool(b[0] & 1)
            p.rc = b[1]
            if p.rc > 5:
                self._fail("CONNACK return code %d" % p.rc)
            if p.rc and p.session_present:
                self._fail("CONNACK refusal with session present")
        elif t == PUBACK:
            p.pid = self._pid(0)
        elif t == SUBACK:
            p.pid = self._pid(0)
            p.codes = bytes(b[2:rl])
            for c in p.codes:
                if c > 2 and c != 0x80:
                    self._fail("SUBACK return code 0x%02x" % c)
        elif t == PUBLISH:
            p.qos = (h >> 1) & 3
            p.dup = bool(h & 0x08)
            p.retain = bool(h & 1)
            tl = (b[0] << 8) | b[1]
            i = 2 + tl
            if tl == 0 or i + (2 if p.qos else 0) > rl:
                self._fail("PUBLISH topic length %d does not fit remaining length %d" % (tl, rl))
            try:
                p.topic = str(b[2:i], "utf-8")
            except Exception:  # UnicodeError on CPython, UnicodeError/ValueError on MicroPython
                self._fail("PUBLISH topic is not UTF-8")
            if "+" in p.topic or "#" in p.topic or "\x00" in p.topic:
                self._fail("PUBLISH topic with a wildcard or NUL")
            if p.qos:
                p.pid = self._pid(i)
                i += 2
            p.payload = bytes(b[i:rl])
        return p

    def _pid(self, i):
        pid = (self._buf[i] << 8) | self._buf[i + 1]
        if not pid:
            self._fail("packet id 0")
        return pid
