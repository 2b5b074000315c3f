# Charger controller line protocol (CONTRACT §3), sans-I/O: bytes in, replies or errors out.
#
#   request:  $Q,<slot>*<cs>\r\n
#   reply:    $C,<slot>,<state>,<mv>,<ma>,<t>,<fault>*<cs>\r\n
#
# The parser takes bytes one at a time (push) or in chunks (feed) from a preallocated line
# buffer and never allocates for noise or errors; a good line allocates one Reply.
#
# Ranges accepted (anything else is a malformed line, 'bad'). They bound every number to
# what a motorcycle pack and its charger can report, and keep every product downstream
# (mV x mA in energy.py) within MicroPython small ints:
#   slot 1..16, mv 0..200000 (200 V), ma -200000..200000 (200 A), t -1000..2000 (0.1 degC,
#   i.e. -100.0..200.0 degC; the contract allows no sign on t, but a battery at -5 degC must
#   be reportable: '-' is accepted on t as on ma), fault 0..65535.
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):  # type: ignore[no-redef,misc]
        return x


CS = "cs"  # a well-framed line whose checksum does not match
BAD = "bad"  # anything else that started with '$' and is not a valid reply

LINE_MAX = const(64)  # bytes between '$' and the line end; longest valid reply is ~40

_DOLLAR = const(0x24)
_STAR = const(0x2A)
_COMMA = const(0x2C)
_MINUS = const(0x2D)
_CR = const(0x0D)
_LF = const(0x0A)
_ZERO = const(0x30)
_NINE = const(0x39)
_C = const(0x43)

_IDLE = const(0)  # between lines: bytes are noise and skipped
_LINE = const(1)  # inside a line (after '$')
_OVER = const(2)  # line overflowed: already reported, skip to the next line start or end

_MAX_DIGITS = const(6)  # no accepted value has more: keeps parsing in small ints

# state letter -> interned one-character string (no allocation per reply)
_STATES = {0x49: "I", 0x57: "W", 0x43: "C", 0x56: "V", 0x46: "F", 0x45: "E", 0x58: "X"}

_HEX = "0123456789ABCDEF"


def checksum(body):
    """XOR of every byte of body (the bytes strictly between '$' and '*')."""
    cs = 0
    for b in body:
        cs ^= b
    return cs


def request(slot):
    """The poll line for a slot, e.g. request(1) == b'$Q,1*4C\\r\\n'."""
    if not isinstance(slot, int) or slot < 1 or slot > 16:
        raise ValueError("slot must be 1..16")
    body = b"Q," + str(slot).encode()
    return b"$" + body + b"*%02X\r\n" % checksum(body)


def reply_line(slot, state, mv, ma, t, fault):
    """A reply line as the controller sends it (for simulators and tests)."""
    body = ("C,%d,%s,%d,%d,%d,%d" % (slot, state, mv, ma, t, fault)).encode()
    return b"$" + body + b"*%02X\r\n" % checksum(body)


class Reply:
    """One good reply: slot (1..16), state (one of 'IWCVFEX'), mv, ma (signed, + into the
    battery), t (0.1 degC), fault (0..65535)."""

    __slots__ = ("slot", "state", "mv", "ma", "t", "fault")

    def __init__(self, slot, state, mv, ma, t, fault):
        self.slot = slot
        self.state = state
        self.mv = mv
        self.ma = ma
        self.t = t
        self.fault = fault

    def __eq__(self, other):
        return (
            isinstance(other, Reply)
            and self.slot == other.slot
            and self.state == other.state
            and self.mv == other.mv
            and self.ma == other.ma
            and self.t == other.t
            and self.fault == other.fault
        )

    def __repr__(self):
        return "Reply(%d,%s,%d,%d,%d,%d)" % (
            self.slot,
            self.state,
            self.mv,
            self.ma,
            self.t,
            self.fault,
        )


def _hexval(b):
    if _ZERO <= b <= _NINE:
        return b - _ZERO
    b |= 0x20  # lowercase accepted
    if 0x61 <= b <= 0x66:
        return b - 0x61 + 10
    return -1


class LineParser:
    """Feed it what the UART gives; it returns a Reply for each good line, CS for a framed
    line with a wrong checksum, BAD for any other line that began with '$' (bad field count,
    leading zeros, spaces, unknown state letter, out-of-range number, missing '*HH', a line
    cut short by a new '$', or longer than LINE_MAX: one BAD per overflowed line).

    Bytes outside a line (before a '$') are noise and skipped silently. A line ends at CR or
    LF (CRLF, LF or CR alone; the empty line between CR and LF is nothing). A '$' always
    starts a new line: that is how the parser resynchronises after noise."""

    def __init__(self):
        self._buf = bytearray(LINE_MAX)
        self._n = 0
        self._st = _IDLE
        self._i = 0  # parse cursor (kept on self so field parsing needs no tuples)

    def reset(self):
        """Forget any partial line (e.g. before a new request)."""
        self._n = 0
        self._st = _IDLE

    def pending(self):
        """True while a line has started and not ended."""
        return self._st == _LINE

    def push(self, b):
        """One byte in; a Reply, CS, BAD or None out."""
        st = self._st
        if b == _DOLLAR:
            self._n = 0
            self._st = _LINE
            return BAD if st == _LINE else None  # a line cut short by a new start
        if b == _CR or b == _LF:
            self._st = _IDLE
            if st == _LINE:
                return self._parse()
            return None
        if st == _LINE:
            n = self._n
            if n >= LINE_MAX:
                self._st = _OVER
                return BAD
            self._buf[n] = b
            self._n = n + 1
        return None

    def feed(self, data):
        """All of data in; yields each result (Reply, CS or BAD) in order. Iterate it to
        the end: bytes are consumed as the generator runs."""
        push = self.push
        for b in data:
            r = push(b)
            if r is not None:
                yield r

    # --- parsing one complete line held in self._buf[:self._n] ---

    def _parse(self):
        buf = self._buf
        n = self._n
        self._n = 0
        if n < 4 or buf[n - 3] != _STAR:
            return BAD
        hi = _hexval(buf[n - 2])
        lo = _hexval(buf[n - 1])
        if hi < 0 or lo < 0:
            return BAD
        end = n - 3
        cs = 0
        for i in range(end):
            cs ^= buf[i]
        if cs != (hi << 4) | lo:
            return CS
        # body: C,<slot>,<state>,<mv>,<ma>,<t>,<fault>
        if end < 2 or buf[0] != _C or buf[1] != _COMMA:
            return BAD
        self._i = 2
        slot = self._num(end, False)
        if slot is None or slot < 1 or slot > 16:
            return BAD
        i = self._i
        if i + 1 >= end or buf[i + 1] != _COMMA:
            return BAD
        state = _STATES.get(buf[i])
        if state is None:
            return BAD
        self._i = i + 2
        mv = self._num(end, False)
        if mv is None or mv > 200000:
            return BAD
        ma = self._num(end, True)
        if ma is None or ma < -200000 or ma > 200000:
            return BAD
        t = self._num(end, True)
        if t is None or t < -1000 or t > 2000:
            return BAD
        fault = self._num(end, False)
        if fault is None or fault > 65535 or self._i != end + 1:
            return BAD
        return Reply(slot, state, mv, ma, t, fault)

    def _num(self, end, signed):
        """Parse a decimal field at self._i up to ',' or end; advance past the separator.
        None when malformed: empty, non-digit, leading zero, '-0', too many digits."""
        buf = self._buf
        i = self._i
        neg = False
        if signed and i < end and buf[i] == _MINUS:
            neg = True
            i += 1
        start = i
        v = 0
        while i < end and buf[i] != _COMMA:
            b = buf[i]
            if b < _ZERO or b > _NINE:
                return None
            v = v * 10 + (b - _ZERO)
            i += 1
        digits = i - start
        if digits == 0 or digits > _MAX_DIGITS:
            return None
        if buf[start] == _ZERO and (digits > 1 or neg):
            return None
        self._i = i + 1  # past the ',' (or one past end for the last field)
        return -v if neg else v
