# The thin I/O loop around charger.LineParser: one request, one wait, one counted outcome.
#
# Counting rule (CONTRACT §5.2 err): every poll that does not yield a reading for the polled
# slot counts exactly one error, chosen by precedence over what arrived before the deadline:
#   ser_cs   a line with a bad checksum arrived (most likely our reply damaged on the wire)
#   ser_bad  otherwise, a malformed line or a good reply for another slot arrived
#   ser_to   otherwise: nothing complete arrived in time, including a partial line that
#            was still unfinished at the deadline (the reply was late, not malformed)
# A poll that gets its reading counts nothing, whatever noise came before the reply.
# The wait runs to the deadline even after a bad line: the good reply may still follow
# (a stale reply to an earlier poll can arrive first).
import charger
import timebase

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):  # type: ignore[no-redef,misc]
        return x


_CHUNK = const(32)
# chunks of stale input dropped before a request (bounded: noise may never stop)
_DRAIN_MAX = const(8)


class ChargerLink:
    """Polls the charger controller over a duck-typed stream: write(bytes) and non-blocking
    readinto(buf) -> int (0 when nothing waits)."""

    def __init__(self, stream, timeout_ms=200, poll_ms=2):
        self.stream = stream
        self.timeout_ms = timeout_ms
        self.poll_ms = poll_ms
        self.err = {"ser_to": 0, "ser_cs": 0, "ser_bad": 0}
        self.ok = 0
        self.last_err = None  # the counter name of the last failed poll, None after a success
        self._parser = charger.LineParser()
        self._buf = bytearray(_CHUNK)
        self._mv = memoryview(self._buf)
        self._req = {}  # slot -> request bytes, built once

    def _drain(self):
        # Late bytes from an earlier poll belong to no transaction: drop them uncounted.
        n = 0
        while n < _DRAIN_MAX and self.stream.readinto(self._buf):
            n += 1
        self._parser.reset()

    async def poll(self, slot):
        """Request slot's reading; the Reply, or None after counting one error."""
        req = self._req.get(slot)
        if req is None:
            req = charger.request(slot)
            self._req[slot] = req
        self._drain()
        self.stream.write(req)
        deadline = timebase.ticks_add(timebase.ticks_ms(), self.timeout_ms)
        seen_cs = False
        seen_bad = False
        parser = self._parser
        buf = self._buf
        mv = self._mv
        while True:
            # read before checking the clock, so bytes that came in before the deadline
            # count even when this task was scheduled late
            n = self.stream.readinto(buf) or 0  # a raw machine.UART gives None
            for i in range(n):
                r = parser.push(mv[i])
                if r is None:
                    continue
                if isinstance(r, str):
                    if r == charger.CS:
                        seen_cs = True
                    else:
                        seen_bad = True
                elif r.slot == slot:
                    self.ok += 1
                    self.last_err = None
                    return r
                else:
                    seen_bad = True  # a reply for another slot is not a reading
            if timebase.ticks_diff(deadline, timebase.ticks_ms()) <= 0:
                break
            # always yield to the other tasks, at once while bytes are flowing
            await timebase.asleep_ms(0 if n else self.poll_ms)
        parser.reset()
        if seen_cs:
            name = "ser_cs"
        elif seen_bad:
            name = "ser_bad"
        else:
            name = "ser_to"
        self.err[name] += 1
        self.last_err = name
        return None
