# ChargerLink against a scripted in-memory stream (the pty test, tests/test_charger_pty.py,
# runs the same cases over a real pty on both interpreters).
import charger
import timebase
from charger_link import ChargerLink

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore

GOOD1 = b"$C,1,C,67200,15250,312,0*31\r\n"


class ScriptStream:
    """write() records the request and arms the reply script: a list of (ms after the
    request, bytes); readinto() hands out what is due, at most len(buf) bytes at a time."""

    def __init__(self, script_for, pending=b""):
        self.script_for = script_for  # request bytes -> [(at_ms, bytes), ...]
        self.writes = []
        self._due = []
        self._t0 = timebase.ticks_ms()
        self._out = bytearray(pending)

    def write(self, data):
        self.writes.append(bytes(data))
        self._t0 = timebase.ticks_ms()
        self._due = list(self.script_for(bytes(data)))
        return len(data)

    def readinto(self, buf):
        now = timebase.ticks_diff(timebase.ticks_ms(), self._t0)
        while self._due and self._due[0][0] <= now:
            self._out += self._due.pop(0)[1]
        n = min(len(buf), len(self._out))
        for i in range(n):
            buf[i] = self._out[i]
        self._out = self._out[n:]
        return n


def _poll(link, slot):
    return asyncio.run(link.poll(slot))


def _errs(link):
    return (link.err["ser_to"], link.err["ser_cs"], link.err["ser_bad"])


def _link(script, timeout_ms=60, pending=b""):
    return ChargerLink(ScriptStream(script, pending), timeout_ms=timeout_ms)


def test_good_reply_is_a_reading_and_counts_nothing():
    link = _link(lambda req: [(2, GOOD1)])
    r = _poll(link, 1)
    assert isinstance(r, charger.Reply) and r.slot == 1 and r.mv == 67200 and r.ma == 15250
    assert link.ok == 1 and _errs(link) == (0, 0, 0) and link.last_err is None
    assert link.stream.writes == [b"$Q,1*4C\r\n"]


def test_noise_and_bad_lines_before_the_reply_count_nothing():
    link = _link(lambda req: [(1, b"\x00\xffjunk$C,1,Z*00\r\n$C,1,C,1*00\r\n"), (5, GOOD1)])
    r = _poll(link, 1)
    assert r is not None and r.slot == 1
    assert link.ok == 1 and _errs(link) == (0, 0, 0)


def test_reply_in_single_bytes_spread_over_time():
    link = _link(
        lambda req: [(i // 4, GOOD1[i : i + 1]) for i in range(len(GOOD1))], timeout_ms=200
    )
    r = _poll(link, 1)
    assert r is not None and r.fault == 0 and _errs(link) == (0, 0, 0)


def test_reply_for_another_slot_is_not_a_reading():
    link = _link(lambda req: [(1, charger.reply_line(2, "C", 1, 1, 1, 0))])
    assert _poll(link, 1) is None
    assert _errs(link) == (0, 0, 1) and link.last_err == "ser_bad" and link.ok == 0


def test_reply_for_another_slot_then_ours():
    link = _link(lambda req: [(1, charger.reply_line(2, "C", 1, 1, 1, 0)), (4, GOOD1)])
    r = _poll(link, 1)
    assert r is not None and r.slot == 1 and _errs(link) == (0, 0, 0)


def test_bad_checksum():
    link = _link(lambda req: [(1, b"$C,1,C,67200,15250,312,0*30\r\n")])
    assert _poll(link, 1) is None
    assert _errs(link) == (0, 1, 0) and link.last_err == "ser_cs"


def test_silence_is_a_timeout():
    link = _link(lambda req: [])
    t0 = timebase.ticks_ms()
    assert _poll(link, 3) is None
    assert timebase.ticks_diff(timebase.ticks_ms(), t0) >= 55
    assert _errs(link) == (1, 0, 0) and link.last_err == "ser_to"


def test_partial_line_then_silence_is_a_timeout():
    link = _link(lambda req: [(1, GOOD1[:12])])
    assert _poll(link, 1) is None
    assert _errs(link) == (1, 0, 0)


def test_bad_line_then_silence_counts_the_bad_line_not_the_timeout():
    link = _link(lambda req: [(1, b"$C,1,C,067200,15250,312,0*01\r\n")])
    assert _poll(link, 1) is None
    assert _errs(link) == (0, 0, 1)


def test_precedence_checksum_over_malformed_over_timeout():
    other = charger.reply_line(5, "I", 0, 0, 200, 0)
    link = _link(lambda req: [(1, other + b"$C,1,C,67200,15250,312,0*30\r\n" + b"$bad\r\n")])
    assert _poll(link, 1) is None
    assert _errs(link) == (0, 1, 0)


def test_exactly_one_error_per_failed_poll_over_many_polls():
    cases = [
        [],
        [(1, GOOD1[:5])],
        [(1, b"$C,1,C,67200,15250,312,0*30\r\n")],
        [(1, charger.reply_line(9, "W", 1, 0, 0, 0))],
        [(1, GOOD1)],
        [(1, b"noise only, no dollar\r\n")],
    ]
    state = {"i": 0}

    def script(req):
        c = cases[state["i"] % len(cases)]
        state["i"] += 1
        return c

    link = _link(script, timeout_ms=30)
    got = [_poll(link, 1) for _ in range(12)]
    failed = len([g for g in got if g is None])
    assert failed == 10 and link.ok == 2
    assert sum(_errs(link)) == failed
    assert _errs(link) == (6, 2, 2)


def test_stale_input_before_the_request_is_dropped_uncounted():
    # a late reply to an earlier poll is waiting; this poll gets no answer of its own
    link = _link(lambda req: [], pending=GOOD1 + b"$C,1,C,6")
    assert _poll(link, 1) is None
    assert _errs(link) == (1, 0, 0)


def test_endless_noise_does_not_hang_the_poll():
    class Noise:
        def write(self, data):
            return len(data)

        def readinto(self, buf):
            for i in range(len(buf)):
                buf[i] = 0x24 if i % 7 == 0 else 0x41  # '$AAAAAA' forever
            return len(buf)

    link = ChargerLink(Noise(), timeout_ms=40)
    t0 = timebase.ticks_ms()
    assert _poll(link, 2) is None
    assert timebase.ticks_diff(timebase.ticks_ms(), t0) < 5000
    assert _errs(link) == (0, 0, 1)


def test_request_cached_per_slot():
    link = _link(lambda req: [(1, charger.reply_line(int(req[3:-5]), "I", 0, 0, 0, 0))])
    for s in (1, 16, 1):
        r = _poll(link, s)
        assert r is not None and r.slot == s
    assert link.stream.writes == [b"$Q,1*4C\r\n", b"$Q,16*7A\r\n", b"$Q,1*4C\r\n"]
    assert link.ok == 3
