# Signed wire format (CONTRACT 5.1, 5.5): compact ASCII JSON, integers only, `sig` last.
#
# encode() is our own serializer rather than json.dumps: it rejects floats and non-ASCII,
# writes into one preallocated 4 KB buffer (no growing strings on a ~100 KB heap) and sorts
# keys, so that the same object gives the same bytes on MicroPython and CPython (MicroPython
# dicts have no stable order). String escapes match CPython's json.dumps (ensure_ascii), so
# encode(o) == json.dumps(o, separators=(",", ":"), sort_keys=True).encode() for valid o.
# Not reentrant (one shared buffer): fine on the station's single-threaded asyncio loop.
from hmac_sha256 import Hmac, equal

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef,misc]
        return x


MAX_BYTES = const(4096)  # a whole signed payload, CONTRACT 5.1
_SIG_LEN = const(74)  # len(',"sig":"') + 64 hex + len('"}')
_DEPTH = const(8)  # nesting limit (recursion on a small stack)
_SMALL = const(1000000000)  # below 2**30: a small int on the ESP32, digits without allocation

# `ev` values of CONTRACT 5.3
EVENTS = ("boot", "session_start", "session_end", "alarm", "meter_reset", "outbox_drop", "ota")
# keys Wire sets itself; a body must not carry them
_RESERVED = ("v", "sid", "kid", "boot", "seq", "up", "ts", "hist", "ev", "sig")

_mv = None  # memoryview over the shared buffer, made on first use


class WireError(ValueError):
    """A payload that fails verification. code: "unsigned", "bad_sig" or "malformed"."""

    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code


def _buffer():
    global _mv
    if _mv is None:
        _mv = memoryview(bytearray(MAX_BYTES))
    return _mv


# ---- encoder: each writer puts one value at mv[p:] and returns the new end. Writing past
# the buffer raises IndexError, turned into ValueError by _encode (no bound checks inside).


def _int(mv, p, n):
    if n < 0:
        mv[p] = 45  # -
        p += 1
        n = -n
    if n < _SMALL:
        e = p + 1
        m = n // 10
        while m:
            e += 1
            m //= 10
        q = e
        while True:
            q -= 1
            mv[q] = 48 + n % 10
            n //= 10
            if not n:
                return e
    for c in "%d" % n:  # a big int allocates anyway
        mv[p] = ord(c)
        p += 1
    return p


_ESC = {8: "b", 9: "t", 10: "n", 12: "f", 13: "r", 34: '"', 92: "\\"}
_HEX = b"0123456789abcdef"


def _str(mv, p, s):
    mv[p] = 34
    p += 1
    for c in s:
        o = ord(c)
        if o > 127:
            raise ValueError("non-ASCII character in %r" % s)
        if o < 32 or o == 34 or o == 92 or o == 127:
            mv[p] = 92  # backslash
            e = _ESC.get(o)
            if e is not None:
                mv[p + 1] = ord(e)
                p += 2
            else:  # other control characters as \u00XX, lowercase like CPython
                mv[p + 1] = 117
                mv[p + 2] = 48
                mv[p + 3] = 48
                mv[p + 4] = _HEX[o >> 4]
                mv[p + 5] = _HEX[o & 15]
                p += 6
        else:
            mv[p] = o
            p += 1
    mv[p] = 34
    return p + 1


_orders = {}  # type: dict
_ORDERS = const(24)


def _sorted_keys(o):
    """sorted(o), without allocating for a key set seen before: telemetry repeats the same
    few key sets (message, meter, slot, bat, err) every period. The cache is looked up by an
    order-free sum of key hashes and checked key by key, so a collision only costs a sort."""
    h = len(o)
    for k in o:
        if type(k) is not str:
            raise ValueError("object key %r is not a str" % (k,))
        h = (h + hash(k)) & 0xFFFFFFF
    ks = _orders.get(h)
    if ks is not None and len(ks) == len(o):
        for k in ks:
            if k not in o:
                break
        else:
            return ks
    ks = tuple(sorted(o))
    if len(_orders) >= _ORDERS:
        _orders.clear()
    _orders[h] = ks
    return ks


def _lit(mv, p, b):
    e = p + len(b)
    if e > len(mv):
        raise IndexError
    mv[p:e] = b
    return e


def _val(mv, p, o, depth):
    if o is None:
        return _lit(mv, p, b"null")
    if o is True:
        return _lit(mv, p, b"true")
    if o is False:
        return _lit(mv, p, b"false")
    t = type(o)
    if t is int:
        return _int(mv, p, o)
    if t is str:
        return _str(mv, p, o)
    if t is dict or t is list or t is tuple:
        if depth >= _DEPTH:
            raise ValueError("nested deeper than %d" % _DEPTH)
        if t is dict:
            mv[p] = 123  # {
            p += 1
            first = True
            for k in _sorted_keys(o):
                if first:
                    first = False
                else:
                    mv[p] = 44  # ,
                    p += 1
                p = _str(mv, p, k)
                mv[p] = 58  # :
                p = _val(mv, p + 1, o[k], depth + 1)
            mv[p] = 125  # }
            return p + 1
        mv[p] = 91  # [
        p += 1
        first = True
        for x in o:
            if first:
                first = False
            else:
                mv[p] = 44
                p += 1
            p = _val(mv, p, x, depth + 1)
        mv[p] = 93  # ]
        return p + 1
    if t is float:
        raise ValueError("float on the wire (integers only): %r" % (o,))
    raise ValueError("cannot encode a %s" % t.__name__)


def _encode(obj):
    """Encode obj into the shared buffer; return (memoryview, length)."""
    mv = _buffer()
    try:
        return mv, _val(mv, 0, obj, 0)
    except IndexError:
        raise ValueError("message over %d bytes" % MAX_BYTES)


def encode(obj):
    """Compact ASCII JSON bytes of obj (dict/list/tuple/str/int/bool/None; keys sorted).
    ValueError for a float, non-ASCII text, a non-str key, or more than 4096 bytes."""
    mv, n = _encode(obj)
    return bytes(mv[:n])


def _sign(obj, mac):
    if type(obj) is not dict:
        raise ValueError("a signed message is a JSON object")
    if "sig" in obj:
        raise ValueError('"sig" is added by sign(), not given')
    mv, n = _encode(obj)
    end = n + _SIG_LEN - 1
    if end > MAX_BYTES:
        raise ValueError("signed message of %d bytes is over %d" % (end, MAX_BYTES))
    hx = mac.hexdigest(mv[:n])
    mv[n - 1 : n + 7] = b',"sig":"'
    mv[n + 7 : n + 71] = hx
    mv[n + 71 : end] = b'"}'
    return bytes(mv[:end])


def sign(obj, key):
    """CONTRACT 5.5: B = encode(obj); B[:-1] + ',"sig":"' + hex HMAC-SHA256(key, B) + '"}'."""
    return _sign(obj, Hmac(key))


def _is_hex(b):
    for c in b:
        if not (48 <= c <= 57 or 97 <= c <= 102):
            return False
    return True


def verify(payload, key):
    """Check a signed payload (a command) and return its object, parsed from the signed bytes
    only. Raises WireError: "unsigned" (no ,"sig":"), "bad_sig" (tail not exactly 64 lowercase
    hex + "} or HMAC mismatch), "malformed" (too long, not strict compact JSON, not an object,
    duplicate keys, floats, or a "sig" inside the signed bytes)."""
    if type(payload) is not bytes:
        payload = bytes(payload)
    n = len(payload)
    if n > MAX_BYTES:
        raise WireError("malformed", "payload of %d bytes is over %d" % (n, MAX_BYTES))
    i = payload.rfind(b',"sig":"')
    if i < 0:
        raise WireError("unsigned", 'no ,"sig":" in payload')
    if n != i + _SIG_LEN or payload[n - 2 :] != b'"}' or not _is_hex(payload[i + 8 : i + 72]):
        raise WireError("bad_sig", 'payload must end in ,"sig":"<64 lowercase hex>"}')
    signed = payload[:i] + b"}"
    if not equal(Hmac(key).hexdigest(signed), payload[i + 8 : i + 72]):
        raise WireError("bad_sig", "signature does not match")
    obj = decode(signed)
    if type(obj) is not dict:
        raise WireError("malformed", "not a JSON object")
    if "sig" in obj:
        raise WireError("malformed", '"sig" inside the signed bytes')
    return obj


# ---- strict decoder for verified commands: compact JSON (no whitespace), ASCII only,
# integers only, no duplicate keys, nothing after the value. MicroPython's json.loads
# keeps the last of duplicate keys and accepts floats, so it cannot be used here.


def _bad(msg, p):
    return WireError("malformed", "%s at byte %d" % (msg, p))


def _pstr(b, p):
    """b[p] is the opening quote: return (str, index after the closing quote)."""
    p += 1
    start = p
    parts = None
    while True:
        c = b[p]
        if c == 34:
            s = b[start:p].decode()
            if parts is not None:
                parts.append(s)
                s = "".join(parts)
            return s, p + 1
        if c < 32 or c > 127:
            raise _bad("control or non-ASCII byte in string", p)
        if c == 92:
            if parts is None:
                parts = []
            parts.append(b[start:p].decode())
            e = b[p + 1]
            if e == 117:  # \uXXXX
                h = b[p + 2 : p + 6]
                if len(h) != 4:
                    raise IndexError
                for x in h:
                    if not (48 <= x <= 57 or 97 <= x <= 102 or 65 <= x <= 70):
                        raise _bad("bad \\u escape", p)
                u = int(h, 16)
                if 0xD800 <= u <= 0xDFFF:
                    raise _bad("surrogate escape", p)
                parts.append(chr(u))
                p += 6
            else:
                k = b'"\\/bfnrt'.find(bytes((e,)))
                if k < 0:
                    raise _bad("bad escape", p)
                parts.append('"\\/\b\f\n\r\t'[k])
                p += 2
            start = p
        else:
            p += 1


def _parse(b, p, depth):
    c = b[p]
    if c == 123 or c == 91:  # { [
        if depth >= _DEPTH:
            raise _bad("nested too deep", p)
        p += 1
        if c == 123:
            d = {}  # type: dict
            if b[p] == 125:
                return d, p + 1
            while True:
                if b[p] != 34:
                    raise _bad("expected a key", p)
                k, p = _pstr(b, p)
                if k in d:
                    raise _bad("duplicate key %r" % k, p)
                if b[p] != 58:
                    raise _bad("expected :", p)
                d[k], p = _parse(b, p + 1, depth + 1)
                c = b[p]
                if c == 125:
                    return d, p + 1
                if c != 44:
                    raise _bad("expected , or }", p)
                p += 1
        a = []  # type: list
        if b[p] == 93:
            return a, p + 1
        while True:
            v, p = _parse(b, p, depth + 1)
            a.append(v)
            c = b[p]
            if c == 93:
                return a, p + 1
            if c != 44:
                raise _bad("expected , or ]", p)
            p += 1
    if c == 34:
        return _pstr(b, p)
    if c == 45 or 48 <= c <= 57:
        start = p
        if c == 45:
            p += 1
        if b[p] == 48:
            p += 1
        elif 49 <= b[p] <= 57:
            while p < len(b) and 48 <= b[p] <= 57:
                p += 1
        else:
            raise _bad("bad number", p)
        if p < len(b) and b[p] in b".eE":
            raise _bad("not an integer", p)
        return int(b[start:p]), p
    for lit, v in ((b"true", True), (b"false", False), (b"null", None)):
        if b[p : p + len(lit)] == lit:
            return v, p + len(lit)
    raise _bad("unexpected byte", p)


def decode(b):
    """Parse strict compact JSON bytes (see above); WireError("malformed") otherwise."""
    try:
        v, p = _parse(b, 0, 0)
    except IndexError:
        raise WireError("malformed", "truncated JSON")
    except UnicodeError:
        raise WireError("malformed", "bad text")
    except WireError:
        raise
    except ValueError:  # CPython only: int() refuses more than 4300 digits
        raise WireError("malformed", "number too long")
    if p != len(b):
        raise _bad("trailing bytes", p)
    return v


class Wire:
    """Makes a station's signed telemetry and events: the common fields of CONTRACT 5.1 and
    seq 0, 1, 2 ... over both kinds within the boot. seq moves only when a message was made,
    so a refused message (ValueError) leaves no gap."""

    def __init__(self, sid, kid, key, boot, seq=0):
        if len(key) != 32:
            raise ValueError("station key must be 32 bytes")
        self.sid = sid
        self.kid = kid
        self.boot = boot
        self.seq = seq
        self._mac = Hmac(key)

    def _make(self, ev, body, up, ts, hist):
        if type(up) is not int or up < 0:
            raise ValueError("up must be a non-negative int")
        if ts is not None and type(ts) is not int:
            raise ValueError("ts must be an int or None")
        m = {"v": 1, "sid": self.sid, "kid": self.kid, "boot": self.boot, "seq": self.seq, "up": up}
        if ts is not None:
            m["ts"] = ts
        if hist:
            m["hist"] = 1
        if ev is not None:
            m["ev"] = ev
        if body:
            for k in body:
                if k in _RESERVED:
                    raise ValueError("%r is a common field set by Wire" % k)
                m[k] = body[k]
        out = _sign(m, self._mac)
        self.seq += 1
        return out

    def telemetry(self, body, up, ts=None, hist=False):
        """Signed telemetry: body holds meter/slots/err (CONTRACT 5.2)."""
        return self._make(None, body, up, ts, hist)

    def event(self, ev, fields, up, ts=None, hist=False):
        """Signed event ev (one of EVENTS) with its extra fields (a dict or None)."""
        if ev not in EVENTS:
            raise ValueError("unknown event %r" % (ev,))
        return self._make(ev, fields, up, ts, hist)
