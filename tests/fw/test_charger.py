import binascii

import charger
from fwtest import raises, vector

V = vector("charger.json")


def _b(h):
    return binascii.unhexlify(h)


def _fields(r):
    return [r.slot, r.state, r.mv, r.ma, r.t, r.fault]


def _want(g):
    return [g["slot"], g["state"], g["mv"], g["ma"], g["t"], g["fault"]]


def _all(parser, data):
    return list(parser.feed(data))


def test_checksum_and_request_match_golden():
    assert charger.checksum(b"Q,1") == 0x4C
    assert charger.checksum(b"") == 0
    for r in V["requests"]:
        assert charger.request(r["slot"]) == _b(r["hex"]), r
    assert charger.request(1) == b"$Q,1*4C\r\n"


def test_request_rejects_bad_slots():
    for s in (0, 17, -1):
        raises(ValueError, charger.request, s)


def test_reply_line_reproduces_golden_lines():
    for g in V["good"]:
        line = charger.reply_line(g["slot"], g["state"], g["mv"], g["ma"], g["t"], g["fault"])
        raw = _b(g["hex"])
        # golden lines may use LF/CR only or lowercase hex: compare up to the case of the checksum
        assert line[:-2].upper() == raw.rstrip(b"\r\n").upper(), (line, raw)


def test_good_lines_whole():
    for g in V["good"]:
        p = charger.LineParser()
        out = _all(p, _b(g["hex"]))
        assert len(out) == 1 and isinstance(out[0], charger.Reply), (g["why"], out)
        assert _fields(out[0]) == _want(g), (g["why"], out)


def test_good_lines_one_byte_at_a_time_and_split_everywhere():
    for g in V["good"]:
        raw = _b(g["hex"])
        p = charger.LineParser()
        got = []
        for b in raw:
            r = p.push(b)
            if r is not None:
                got.append(r)
        assert len(got) == 1 and _fields(got[0]) == _want(g), g["why"]
        for cut in range(1, len(raw)):
            p = charger.LineParser()
            out = _all(p, raw[:cut]) + _all(p, raw[cut:])
            assert len(out) == 1 and _fields(out[0]) == _want(g), (g["why"], cut)


def test_bad_lines_classified():
    for v in V["bad"]:
        p = charger.LineParser()
        raw = _b(v["hex"])
        out = _all(p, raw)
        if v["why"].startswith("cut short"):
            assert out == [] and p.pending()
            out = _all(p, b"$")
        assert out == [v["class"]], (v["why"], out)


def test_each_bad_line_counted_once_then_parser_recovers():
    good = _b(V["good"][0]["hex"])
    for v in V["bad"]:
        p = charger.LineParser()
        out = _all(p, _b(v["hex"]) + good)
        assert len(out) == 2, (v["why"], out)
        assert out[0] == v["class"], (v["why"], out)
        assert _fields(out[1]) == _want(V["good"][0]), v["why"]


def test_noise_between_lines_is_skipped_and_dollar_resynchronises():
    g0, g1 = V["good"][0], V["good"][1]
    stream = b"\x00\xff garbage ##\r\n\n\r" + _b(g0["hex"]) + b"xx\x13" + _b(g1["hex"])
    out = _all(charger.LineParser(), stream)
    assert [_fields(r) for r in out] == [_want(g0), _want(g1)]
    # noise that contains a '$' costs one BAD, and the next '$' starts over
    out = _all(charger.LineParser(), b"$$$" + _b(g0["hex"]))
    assert out[:3] == ["bad", "bad", "bad"] and _fields(out[3]) == _want(g0)


def test_crlf_variants():
    body = b"C,1,C,67200,15250,312,0*31"
    for end in (b"\r\n", b"\n", b"\r", b"\n\r", b"\r\r\n\n"):
        out = _all(charger.LineParser(), b"$" + body + end + b"$" + body + end)
        assert len(out) == 2 and all(isinstance(r, charger.Reply) for r in out), (end, out)


def test_overflow_gives_one_bad_and_skips_to_the_line_end():
    p = charger.LineParser()
    out = _all(p, b"$" + b"9" * 500)
    assert out == ["bad"]
    out = _all(p, b"9" * 500 + b"\r\n" + _b(V["good"][2]["hex"]))
    assert len(out) == 1 and _fields(out[0]) == _want(V["good"][2])
    # exactly LINE_MAX bytes still fit; one more overflows
    p = charger.LineParser()
    assert _all(p, b"$" + b"A" * charger.LINE_MAX) == []
    assert _all(p, b"A") == ["bad"]


def test_reset_drops_a_partial_line():
    p = charger.LineParser()
    _all(p, b"$C,1,C,67")
    assert p.pending()
    p.reset()
    assert not p.pending()
    out = _all(p, b"200,15250,312,0*31\r\n" + _b(V["good"][0]["hex"]))
    assert len(out) == 1 and isinstance(out[0], charger.Reply)


def test_feed_accepts_memoryview_and_bytearray():
    raw = _b(V["good"][3]["hex"])
    for data in (bytearray(raw), memoryview(raw)):
        out = _all(charger.LineParser(), data)
        assert _fields(out[0]) == _want(V["good"][3])


def test_reply_equality_and_repr():
    a = charger.Reply(1, "C", 67200, 15250, 312, 0)
    b = charger.Reply(1, "C", 67200, 15250, 312, 0)
    c = charger.Reply(1, "C", 67200, 15251, 312, 0)
    assert a == b and a != c and a != "x"
    assert repr(a) == "Reply(1,C,67200,15250,312,0)"
