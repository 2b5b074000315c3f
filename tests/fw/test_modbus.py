# Modbus RTU core (firmware/modbus.py): CRC, request frames and the reply parser, against
# golden frames in tests/vectors/modbus.json (built with pymodbus, see tests/test_modbus_peer.py).
import modbus
from fwtest import raises, vector

V = vector("modbus.json")


def h(s):
    return bytes.fromhex(s)


def _parser(r):
    echo = h(r["request"]) if "request" in r else None
    return modbus.Response(r["unit"], r["fn"], r.get("count", 1), echo)


def _expect(r, got):
    if "regs" in r:
        assert got == r["regs"], (r, got)
    else:
        assert got is True, (r, got)


def _feed_all(p, chunks):
    """Feed chunks in turn; the result must come with the last one and not before."""
    for c in chunks[:-1]:
        assert p.feed(c) is None, chunks
    return p.feed(chunks[-1])


def _good():
    return [r for r in V["responses"] if "exc" not in r]


def _exc():
    return [r for r in V["responses"] if "exc" in r]


def test_crc_vectors():
    for c in V["crc"]:
        assert modbus.crc16(h(c["hex"])) == c["crc"], c
    # a running CRC continues over a split buffer
    data = h(V["crc"][0]["hex"])
    assert modbus.crc16(data[4:], modbus.crc16(data[:4])) == V["crc"][0]["crc"]
    # a frame's CRC over itself, CRC included, is 0
    for r in V["requests"] + V["responses"]:
        assert modbus.crc16(h(r["hex"])) == 0, r


def test_request_vectors():
    for r in V["requests"]:
        fn = r["fn"]
        if fn in (3, 4):
            got = modbus.read_request(r["unit"], fn, r["addr"], r["count"])
        elif fn == 6:
            got = modbus.write_single_request(r["unit"], r["addr"], r["value"])
        else:
            got = modbus.write_multiple_request(r["unit"], r["addr"], r["values"])
        assert got == h(r["hex"]), (r, got.hex())


def test_pack_into_buffer_matches():
    buf = bytearray(300)
    n = modbus.pack_write_multiple(buf, 17, 1, [10, 258])
    assert bytes(buf[:n]) == modbus.write_multiple_request(17, 1, [10, 258])
    n = modbus.pack_read(buf, 1, 4, 0x48, 2)
    assert n == 8 and bytes(buf[:8]) == modbus.read_request(1, 4, 0x48, 2)
    n = modbus.pack_write_multiple(buf, 1, 0, list(range(123)))
    assert n == 9 + 246 and modbus.crc16(buf[:n]) == 0


def test_bad_request_arguments():
    V_ = ValueError
    raises(V_, modbus.read_request, 0, 3, 0, 1)  # broadcast: a read needs a reply
    raises(V_, modbus.read_request, 248, 3, 0, 1)
    raises(V_, modbus.read_request, 1, 5, 0, 1)
    raises(V_, modbus.read_request, 1, 16, 0, 1)
    raises(V_, modbus.read_request, 1, 3, -1, 1)
    raises(V_, modbus.read_request, 1, 3, 0x10000, 1)
    raises(V_, modbus.read_request, 1, 3, 0, 0)
    raises(V_, modbus.read_request, 1, 3, 0, 126)
    raises(V_, modbus.read_request, 1, 3, 0xFFFF, 2)  # runs past the address space
    raises(V_, modbus.read_request, 1, 3, "0", 1)
    raises(V_, modbus.write_single_request, 1, 0, 0x10000)
    raises(V_, modbus.write_single_request, 1, 0, -1)
    raises(V_, modbus.write_single_request, 0, 0, 1)
    raises(V_, modbus.write_multiple_request, 1, 0, [])
    raises(V_, modbus.write_multiple_request, 1, 0, [0] * 124)
    raises(V_, modbus.write_multiple_request, 1, 0, [1, 0x10000])
    raises(V_, modbus.write_multiple_request, 1, 0xFFFF, [1, 2])
    raises(V_, modbus.write_multiple_request, 1, 0, 5)
    raises(V_, modbus.Response, 1, 5, 1)
    # limits themselves are fine
    assert len(modbus.read_request(247, 4, 0xFFFF, 1)) == 8
    assert len(modbus.read_request(1, 3, 0xFF83, 125)) == 8


def test_reply_fed_whole():
    for r in _good():
        _expect(r, _parser(r).feed(h(r["hex"])))


def test_reply_split_at_every_position():
    for r in _good():
        f = h(r["hex"])
        for k in range(1, len(f)):
            _expect(r, _feed_all(_parser(r), [f[:k], f[k:]]))


def test_reply_split_in_three_everywhere():
    r = V["responses"][0]
    f = h(r["hex"])
    p = _parser(r)
    for a in range(1, len(f) - 1):
        for b in range(a + 1, len(f)):
            p.reset(r["unit"], r["fn"], r["count"])  # one parser reused, as the driver does
            _expect(r, _feed_all(p, [f[:a], f[a:b], f[b:]]))


def test_reply_byte_by_byte():
    for r in _good():
        f = h(r["hex"])
        _expect(r, _feed_all(_parser(r), [f[i : i + 1] for i in range(len(f))]))


def test_reply_from_memoryview_chunks():
    r = V["responses"][1]
    buf = bytearray(h(r["hex"]))
    mv = memoryview(buf)
    p = _parser(r)
    assert p.feed(mv[:10]) is None
    _expect(r, p.feed(mv[10:]))


GARBAGE = [
    b"\x00",
    b"\xff\xff\x00",
    b"\x13\x37\xde\xad\xbe\xef\x00",
    b"\x11",  # a lone byte equal to a unit address
    b"\x0b\x2b",  # unit + a function code with no known reply length
    b"\x01\x03\x01\x02",  # unit 1, fn 3, byte count 1: a complete 6-byte candidate, bad CRC
    bytes(range(250, 256)) * 5,
]


def test_reply_after_garbage():
    for r in _good() + _exc():
        f = h(r["hex"])
        for g in GARBAGE:
            got_err = None
            try:
                got = _parser(r).feed(g + f)
            except modbus.ExceptionReply as e:
                got_err = e.code
            if "exc" in r:
                assert got_err == r["exc"], (r, g)
            else:
                _expect(r, got)
            # the same, byte by byte
            data = g + f
            p = _parser(r)
            got = None
            try:
                for i in range(len(data)):
                    got = p.feed(data[i : i + 1])
                    if got is not None:
                        assert i == len(data) - 1
            except modbus.ExceptionReply as e:
                got_err = e.code
                assert "exc" in r
            if "exc" not in r:
                _expect(r, got)


def test_reply_behind_a_stale_truncated_copy():
    # a cut-off copy of the reply (e.g. the tail of an earlier one) then the real reply
    r = V["responses"][1]
    f = h(r["hex"])
    for cut in (3, 10, len(f) - 2):
        p = _parser(r)
        got = None
        data = f[:cut] + f
        for i in range(len(data)):
            got = p.feed(data[i : i + 1])
            if got is not None:
                break
        _expect(r, got)


def test_long_garbage_is_bounded_and_resyncs():
    r = V["responses"][1]
    p = _parser(r)
    junk = bytes((i * 7 + 3) & 0xFF for i in range(1000))
    for i in range(0, len(junk), 37):
        assert p.feed(junk[i : i + 37]) is None
    assert p._n <= 256
    _expect(r, p.feed(h(r["hex"])))


def test_exception_replies():
    for r in _exc():
        f = h(r["hex"])
        e = raises(modbus.ExceptionReply, _parser(r).feed, f)
        assert e.code == r["exc"] and e.key == "mb_exc"
        assert isinstance(e, modbus.ModbusError)
        for k in range(1, len(f)):
            p = _parser(r)
            assert p.feed(f[:k]) is None
            assert raises(modbus.ExceptionReply, p.feed, f[k:]).code == r["exc"]


def _corrupt(f, i):
    b = bytearray(f)
    b[i] ^= 0x40
    return bytes(b)


def test_bad_crc():
    for r in _good() + _exc():
        f = h(r["hex"])
        # a flipped bit after the header (unit, fn, byte count / echoed address and value):
        # the frame is ours and its CRC fails
        hdr = 2 if "exc" in r else 3 if r["fn"] in (3, 4) else 6
        for i in range(len(f)):
            bad = _corrupt(f, i)
            if i < hdr:
                # a garbled header is not recognisably ours: nothing until the response
                # timeout, which then says CrcError when our unit and function came in
                p = _parser(r)
                assert p.feed(bad) is None, (r, i)
                assert isinstance(p.expired(), (modbus.CrcError, modbus.Timeout))
                if i >= 2:
                    assert isinstance(p.expired(), modbus.CrcError)
                continue
            e = raises(modbus.CrcError, _parser(r).feed, bad)
            assert e.key == "mb_crc"
            # byte by byte: CrcError by the last byte, or (when a byte of the data looks
            # like a header of ours) nothing until the response timeout says CrcError
            p = _parser(r)
            err = None
            try:
                for k in range(len(bad)):
                    assert p.feed(bad[k : k + 1]) is None
            except modbus.CrcError as e2:
                err = e2
            if err is None:
                assert isinstance(p.expired(), modbus.CrcError)


def test_bad_crc_then_good_copy_in_same_buffer():
    r = V["responses"][0]
    f = h(r["hex"])
    _expect(r, _parser(r).feed(_corrupt(f, len(f) - 1) + f))


def test_wrong_unit():
    r = V["responses"][0]  # unit 17
    p = modbus.Response(18, 3, 3)
    e = raises(modbus.AddrError, p.feed, h(r["hex"]))
    assert e.key == "mb_addr"
    # split anywhere, same verdict
    f = h(r["hex"])
    for k in range(1, len(f)):
        p = modbus.Response(18, 3, 3)
        assert p.feed(f[:k]) is None
        raises(modbus.AddrError, p.feed, f[k:])
    # an exception reply from another unit
    raises(modbus.AddrError, modbus.Response(2, 3, 10).feed, h(V["responses"][6]["hex"]))


def test_wrong_function():
    r = V["responses"][0]  # a 03 reply
    raises(modbus.AddrError, modbus.Response(17, 4, 3).feed, h(r["hex"]))
    # an exception reply for function 04 while 03 was asked
    raises(modbus.AddrError, modbus.Response(11, 3, 2).feed, h(V["responses"][7]["hex"]))
    # a 06 echo while 16 was asked
    raises(modbus.AddrError, modbus.Response(17, 16, 2).feed, h(V["responses"][4]["hex"]))


def test_reply_to_another_request():
    r = V["responses"][0]  # 3 registers
    raises(modbus.AddrError, modbus.Response(17, 3, 4).feed, h(r["hex"]))
    # a 06 echo of another address/value
    w = V["responses"][4]
    other = modbus.write_single_request(17, 1, 4)
    raises(modbus.AddrError, modbus.Response(17, 6, 1, other).feed, h(w["hex"]))
    # without the request, a 16 echo must still carry the asked quantity
    m = V["responses"][5]
    raises(modbus.AddrError, modbus.Response(17, 16, 3).feed, h(m["hex"]))
    assert modbus.Response(17, 16, 2).feed(h(m["hex"])) is True


def test_other_frame_inside_an_incomplete_reply_is_ignored():
    # data registers that happen to hold a complete, valid frame of another unit: while
    # our reply is incomplete it is not taken for a wrong-unit reply
    inner = modbus.write_single_request(2, 0x0102, 0x0304)  # 8 bytes, CRC valid
    regs = [(inner[2 * i] << 8) | inner[2 * i + 1] for i in range(4)] + [0x4142, 0x4344]
    frame = bytearray([5, 3, 12])
    for v in regs:
        frame.append(v >> 8)
        frame.append(v & 0xFF)
    c = modbus.crc16(frame)
    frame.append(c & 0xFF)
    frame.append(c >> 8)
    f = bytes(frame)
    p = modbus.Response(5, 3, 6)
    got = None
    for k in range(len(f)):
        got = p.feed(f[k : k + 1])
    assert got == regs


def test_timeout_and_truncated_reply():
    r = V["responses"][1]
    f = h(r["hex"])
    p = _parser(r)
    e = p.expired()
    assert isinstance(e, modbus.Timeout) and e.key == "mb_to"
    assert p.feed(b"\x00\xff") is None
    assert isinstance(p.expired(), modbus.Timeout)  # noise is not a reply
    assert p.feed(f[:20]) is None
    assert isinstance(p.expired(), modbus.CrcError)  # a reply of ours began, never checked
    p.reset(r["unit"], r["fn"], r["count"])
    assert isinstance(p.expired(), modbus.Timeout)


def test_reuse_after_result_and_error():
    r = V["responses"][0]
    f = h(r["hex"])
    p = _parser(r)
    _expect(r, p.feed(f))
    p.reset(r["unit"], r["fn"], r["count"])
    raises(modbus.CrcError, p.feed, _corrupt(f, 5))
    p.reset(r["unit"], r["fn"], r["count"])
    _expect(r, p.feed(f))


def test_error_classes_distinct():
    keys = [
        c.key for c in (modbus.Timeout, modbus.CrcError, modbus.AddrError, modbus.ExceptionReply)
    ]
    assert sorted(keys) == ["mb_addr", "mb_crc", "mb_exc", "mb_to"]
    for c in (modbus.Timeout, modbus.CrcError, modbus.AddrError, modbus.ExceptionReply):
        assert issubclass(c, modbus.ModbusError)
