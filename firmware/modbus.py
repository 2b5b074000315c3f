# Modbus RTU, master side, sans-I/O: request frames out, one transaction's reply parsed
# from bytes in. No clocks, no streams (modbus_master.py drives this over a serial link).
#
# Reply framing rule (RTU has no start marker; its frames are delimited by silence, which
# a parser without a clock cannot see, so frames are found by content):
#   A frame may start at any byte. A start is a unit address 1..247 followed by a
#   function code whose reply length is known: 0x80..0xFF (exception, 5 bytes),
#   1..4 (5 + byte count, count 1..250), 5/6/15/16 (8 bytes). Positions are tried in
#   order; a candidate is checked once all its bytes are in (CRC over the whole frame,
#   CRC included, is 0). The first candidate whose CRC checks is the reply: leading
#   garbage is thus skipped, and a reply split anywhere or fed a byte at a time is the
#   same as one fed whole.
#   "Ours" is a candidate with the expected unit and function (or its exception code) whose
#   header matches the request (byte count 2*count for 03/04; for 06/16 the echo of the
#   request's address and value/quantity). The first complete one of ours with a good CRC
#   is the reply. A good frame that is not ours is an AddrError (wrong unit, wrong
#   function, or a reply to another request), unless one of ours is still incomplete
#   before it: then it may be a coincidence inside our reply's data, and is ignored.
#   One of ours complete with a bad CRC is a CrcError, raised as soon as no other
#   candidate of ours is still incomplete (one may be the real reply behind a stale or
#   garbled copy; bad CRCs inside an incomplete reply of ours are ignored likewise).
#   At the response timeout, expired() says whether a reply of ours began (CrcError:
#   the reply was garbled or cut short) or nothing of ours came (Timeout).
# The buffer is bounded (256 bytes, the largest RTU frame): once full, bytes already
# ruled out as frame starts are dropped from its front.
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):  # type: ignore[no-redef,misc]
        return x


from array import array

_BUF = const(256)
_MAX_READ = const(125)  # registers per 03/04 request (spec limit)
_MAX_WRITE = const(123)  # registers per 16 request (spec limit)


class ModbusError(Exception):
    key = "mb_err"  # err counter key (CONTRACT 5.2) of each concrete error


class CrcError(ModbusError):
    key = "mb_crc"


class AddrError(ModbusError):
    """A reply from the wrong unit, for the wrong function, or to another request."""

    key = "mb_addr"


class ExceptionReply(ModbusError):
    key = "mb_exc"

    def __init__(self, code):
        super().__init__("exception reply %d" % code)
        self.code = code


class Timeout(ModbusError):
    key = "mb_to"


def _make_table():
    t = array("H", bytes(512))
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
        t[i] = c
    return t


_TABLE = _make_table()  # 512 bytes, built once at import


def _crc(buf, start, end, crc=0xFFFF):
    t = _TABLE
    for i in range(start, end):
        crc = (crc >> 8) ^ t[(crc ^ buf[i]) & 0xFF]
    return crc


def crc16(data, crc=0xFFFF):
    """CRC-16/MODBUS of data (sent low byte first); pass crc to continue a running CRC."""
    return _crc(data, 0, len(data), crc)


def _put_crc(buf, n):
    c = _crc(buf, 0, n)
    buf[n] = c & 0xFF
    buf[n + 1] = c >> 8
    return n + 2


def _check_unit(unit):
    # 0 is broadcast (no reply; a master waiting for one would only time out), 248+ reserved
    if not isinstance(unit, int) or not 1 <= unit <= 247:
        raise ValueError("unit must be 1..247")


def _check_u16(name, v):
    if not isinstance(v, int) or not 0 <= v <= 0xFFFF:
        raise ValueError(name + " must be 0..65535")


def _pack6(buf, unit, fn, a, b):
    """unit, function and two big-endian u16 (the shape of 03/04/06 requests) + CRC."""
    buf[0] = unit
    buf[1] = fn
    buf[2] = a >> 8
    buf[3] = a & 0xFF
    buf[4] = b >> 8
    buf[5] = b & 0xFF
    return _put_crc(buf, 6)


def pack_read(buf, unit, fn, addr, count):
    """Write a 03/04 request into buf (at least 8 bytes); return its length."""
    _check_unit(unit)
    if fn != 3 and fn != 4:
        raise ValueError("read function must be 3 or 4")
    _check_u16("addr", addr)
    if not isinstance(count, int) or not 1 <= count <= _MAX_READ or addr + count > 0x10000:
        raise ValueError("count must be 1..125 within the address space")
    return _pack6(buf, unit, fn, addr, count)


def pack_write_single(buf, unit, addr, value):
    """Write a 06 request into buf (at least 8 bytes); return its length."""
    _check_unit(unit)
    _check_u16("addr", addr)
    _check_u16("value", value)
    return _pack6(buf, unit, 6, addr, value)


def pack_write_multiple(buf, unit, addr, values):
    """Write a 16 request into buf (at least 9 + 2*len(values) bytes); return its length."""
    _check_unit(unit)
    _check_u16("addr", addr)
    try:
        n = len(values)
    except TypeError:
        raise ValueError("values must be a list of ints") from None
    if not 1 <= n <= _MAX_WRITE or addr + n > 0x10000:
        raise ValueError("1..123 values within the address space")
    for v in values:  # all checked before the buffer is touched
        _check_u16("value", v)
    buf[0] = unit
    buf[1] = 16
    buf[2] = addr >> 8
    buf[3] = addr & 0xFF
    buf[4] = 0
    buf[5] = n
    buf[6] = 2 * n
    i = 7
    for v in values:
        buf[i] = v >> 8
        buf[i + 1] = v & 0xFF
        i += 2
    return _put_crc(buf, i)


def read_request(unit, fn, addr, count):
    buf = bytearray(8)
    pack_read(buf, unit, fn, addr, count)
    return bytes(buf)


def write_single_request(unit, addr, value):
    buf = bytearray(8)
    pack_write_single(buf, unit, addr, value)
    return bytes(buf)


def write_multiple_request(unit, addr, values):
    buf = bytearray(9 + 2 * _MAX_WRITE)  # pack_write_multiple checks values
    n = pack_write_multiple(buf, unit, addr, values)
    return bytes(buf[:n])


def reply_len(fn, count):
    """Bytes in a normal reply to fn (count registers for 03/04)."""
    return 5 + 2 * count if fn == 3 or fn == 4 else 8


class Response:
    """Parser for the reply to one request. feed(data) returns None until the reply is
    complete, then the registers (list of int, 03/04) or True (06/16 echo), or raises
    CrcError / AddrError / ExceptionReply. expired() gives the error for a response
    timeout. reset() readies it for the next transaction without allocating.
    echo: the request bytes (06/16) whose address and value/quantity the reply must echo."""

    def __init__(self, unit=1, fn=3, count=1, echo=None):
        self._buf = bytearray(_BUF)
        self.reset(unit, fn, count, echo)

    def reset(self, unit, fn, count, echo=None):
        if fn not in (3, 4, 6, 16):
            raise ValueError("function must be 3, 4, 6 or 16")
        self.unit = unit
        self.fn = fn
        self.count = count
        self._echo = echo
        self._clear()
        self._began = False  # a header of ours was seen (for expired())

    def _clear(self):
        self._n = 0  # bytes in the buffer
        self._done = 0  # every position before this is ruled out as a frame start
        self._seen = 0  # bytes already scanned: frames complete within them were judged
        self._bad = False  # one of ours came complete with a bad CRC

    def feed(self, data):
        size = len(data)
        pos = 0
        buf = self._buf
        while pos < size:
            n = self._n
            if n == _BUF:
                self._compact()
                n = self._n
            take = min(_BUF - n, size - pos)
            if pos == 0 and take == size:
                buf[n : n + take] = data
            else:
                buf[n : n + take] = data[pos : pos + take]
            self._n = n + take
            pos += take
            r = self._scan()
            if r is not None:
                return r
        return None

    def expired(self):
        """The error for a transaction whose reply did not complete in time."""
        if self._began:
            return CrcError("reply incomplete or garbled")
        return Timeout("no reply")

    def _compact(self):
        # Drop ruled-out bytes from the front. With 256 bytes in, position 0 is always
        # ruled out (no frame is longer than 255), so this frees at least one byte.
        d = self._done
        if d == 0:
            d = 1
        buf = self._buf
        n = self._n
        for i in range(d, n):
            buf[i - d] = buf[i]
        self._n = n - d
        self._done = 0
        self._seen = max(0, self._seen - d)

    def _ours(self, i, fn):
        # header (all bytes before the data/CRC) of the candidate at i matches our request?
        buf = self._buf
        if fn == self.fn | 0x80:
            return True
        if self.fn == 3 or self.fn == 4:
            return buf[i + 2] == 2 * self.count
        e = self._echo
        if e is not None:
            return (
                buf[i + 2] == e[2]
                and buf[i + 3] == e[3]
                and buf[i + 4] == e[4]
                and buf[i + 5] == e[5]
            )
        if self.fn == 16:
            return buf[i + 4] == 0 and buf[i + 5] == self.count
        return True

    def _scan(self):
        buf = self._buf
        n = self._n
        unit = self.unit
        myfn = self.fn
        i = self._done
        first_open = -1  # first position still undecided (needs more bytes)
        blocked = False  # one of ours is incomplete before position i
        while i < n:
            u = buf[i]
            if u == 0 or u > 247:
                i += 1
                continue
            if i + 1 >= n:
                if first_open < 0:
                    first_open = i
                break
            fn = buf[i + 1]
            mine = u == unit and (fn == myfn or fn == myfn | 0x80)
            if mine:
                self._began = True
            if fn & 0x80:
                size = 5
            elif fn == 3 or fn == 4 or fn == 1 or fn == 2:
                if i + 2 >= n:
                    if first_open < 0:
                        first_open = i
                    if mine:
                        blocked = True
                    i += 1
                    continue
                bc = buf[i + 2]
                if bc == 0 or bc > 250:
                    i += 1
                    continue
                size = 5 + bc
            elif fn == 6 or fn == 16 or fn == 5 or fn == 15:
                size = 8
            else:
                i += 1
                continue
            if mine and fn == myfn and (myfn == 3 or myfn == 4):
                mine = buf[i + 2] == 2 * self.count  # known once the byte count is in
            if i + size > n:
                if first_open < 0:
                    first_open = i
                if mine:
                    blocked = True
                i += 1
                continue
            if i + size <= self._seen:
                i += 1  # complete at an earlier scan and ignored then: same bytes, same verdict
                continue
            if _crc(buf, i, i + size) == 0:
                if mine and self._ours(i, fn):
                    return self._result(i, fn)
                if not blocked:
                    self._clear()
                    if u != unit:
                        raise AddrError("reply from unit %d" % u)
                    if fn != myfn and fn != myfn | 0x80:
                        raise AddrError("reply for function %d" % fn)
                    raise AddrError("reply to another request")
            elif mine and not blocked and self._ours(i, fn):
                self._bad = True
            i += 1
        if self._bad and not blocked:
            self._clear()
            raise CrcError("bad CRC")
        if first_open < 0:
            self._clear()  # everything ruled out: start afresh
        else:
            self._done = first_open
            self._seen = n
        return None

    def _result(self, i, fn):
        buf = self._buf
        self._clear()  # the bytes stay in buf until the next feed
        if fn & 0x80:
            raise ExceptionReply(buf[i + 2])
        if fn == 3 or fn == 4:
            regs = [0] * self.count
            j = i + 3
            for k in range(self.count):
                regs[k] = (buf[j] << 8) | buf[j + 1]
                j += 2
            return regs
        return True
