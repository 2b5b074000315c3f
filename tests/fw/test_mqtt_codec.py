# MQTT 3.1.1 codec against the golden vectors (tests/vectors/mqtt.json): encoders byte for
# byte, the decoder fed whole, split at every position, one byte at a time, behind other
# packets, and with malformed input. Runs on CPython and on MicroPython.
import binascii

import mqtt_codec as mc
from fwtest import raises, vector

V = vector("mqtt.json")


def _unhex(s):
    return binascii.unhexlify(s)


def _args(d):
    out = {}
    for k in d:
        if k.endswith("_hex"):
            out[k[:-4]] = _unhex(d[k])
        else:
            out[k] = d[k]
    return out


def _same(p, want, name):
    for k in want:
        if k.endswith("_hex"):
            got = getattr(p, k[:-4])
            assert bytes(got) == _unhex(want[k]), "%s: %s" % (name, k)
        else:
            got = getattr(p, k)
            assert got == want[k], "%s: %s is %r, want %r" % (name, k, got, want[k])


def _feed_chunks(data, cuts, max_packet):
    d = mc.Decoder(max_packet)
    out = []
    prev = 0
    for c in cuts + [len(data)]:
        out += d.feed(data[prev:c])
        prev = c
    return out


def test_encoders_match_vectors():
    assert len(V["encode"]) >= 15
    for v in V["encode"]:
        got = getattr(mc, v["fn"])(**_args(v["args"]))
        assert binascii.hexlify(bytes(got)).decode() == v["hex"], v["name"]


def test_publish_is_mutable_and_dup_is_one_bit():
    by = {}
    for v in V["encode"]:
        by[v["name"]] = _unhex(v["hex"])
    pkt = mc.publish("stations/KH-PNH-0001/telemetry", b'{"v":1,"seq":1}', 1, False, False, 1)
    assert isinstance(pkt, bytearray)
    pkt[0] |= 0x08
    assert bytes(pkt) == by["publish_qos1_dup"]


def test_set_pid():
    a = mc.publish("stations/x/telemetry", b"p" * 300, 1, False, False, 1)
    mc.set_pid(a, 0xBEEF)
    assert bytes(a) == bytes(
        mc.publish("stations/x/telemetry", b"p" * 300, 1, False, False, 0xBEEF)
    )
    raises(ValueError, mc.set_pid, a, 0)
    raises(ValueError, mc.set_pid, a, 65536)


def test_encoder_rejects_bad_arguments():
    raises(ValueError, mc.publish, "a/+", b"x", 1, False, False, 1)
    raises(ValueError, mc.publish, "a/#", b"x")
    raises(ValueError, mc.publish, "", b"x")
    raises(ValueError, mc.publish, "a", b"x", 1, False, False, 0)
    raises(ValueError, mc.publish, "a", b"x", 0, False, False, 5)
    raises(ValueError, mc.publish, "a", b"x", 0, False, True, 0)
    raises(ValueError, mc.publish, "a", b"x", 3, False, False, 1)
    raises(ValueError, mc.connect, "id", 70000)
    raises(ValueError, mc.connect, "", 60, False)
    raises(ValueError, mc.connect, "id", 60, True, None, "pw")
    raises(ValueError, mc.connect, "id", 60, True, None, None, "w/+")
    raises(ValueError, mc.connect, "id", 60, True, None, None, "w", b"", 3)
    raises(ValueError, mc.puback, 0)
    raises(ValueError, mc.subscribe, 0, "a")
    raises(ValueError, mc.subscribe, 1, "")
    raises(ValueError, mc.subscribe, 1, "a", 3)
    raises(ValueError, mc.publish, "t" * 65536, b"")


def test_remaining_length_boundaries():
    # 127 -> one varint byte, 128 -> two, 16383 -> two, 16384 -> three
    for rl, vl in ((127, 1), (128, 2), (16383, 2), (16384, 3)):
        pkt = mc.publish("t", bytes(rl - 3), 0)
        assert len(pkt) == 1 + vl + rl
        d = mc.Decoder(20000)
        ps = d.feed(pkt)
        assert len(ps) == 1 and len(ps[0].payload) == rl - 3


def test_decode_whole():
    for v in V["decode"]:
        ps = mc.Decoder(V["max_packet"]).feed(_unhex(v["hex"]))
        assert len(ps) == len(v["packets"]), v["name"]
        for p, want in zip(ps, v["packets"]):
            _same(p, want, v["name"])


def test_decode_split_at_every_position():
    for v in V["decode"]:
        data = _unhex(v["hex"])
        step = 1 if len(data) < 100 else 7
        for cut in range(0, len(data) + 1, step):
            ps = _feed_chunks(data, [cut], V["max_packet"])
            assert len(ps) == len(v["packets"]), "%s cut %d" % (v["name"], cut)
            for p, want in zip(ps, v["packets"]):
                _same(p, want, v["name"])


def test_decode_byte_by_byte():
    for v in V["decode"]:
        data = _unhex(v["hex"])
        d = mc.Decoder(V["max_packet"])
        ps = []
        for i in range(len(data)):
            got = d.feed(data[i : i + 1])
            if i < len(data) - 1 and len(v["packets"]) == 1:
                assert got == [], v["name"]
            ps += got
        assert len(ps) == len(v["packets"]), v["name"]
        for p, want in zip(ps, v["packets"]):
            _same(p, want, v["name"])


def test_decode_all_vectors_as_one_stream():
    data = b""
    want = []
    for v in V["decode"]:
        data += _unhex(v["hex"])
        want += v["packets"]
    for cuts in ([], [1, 2, 3, 50, 51, 700], list(range(0, len(data), 13))):
        ps = _feed_chunks(data, cuts, V["max_packet"])
        assert len(ps) == len(want)
        for p, w in zip(ps, want):
            _same(p, w, "stream")


def test_decode_accepts_memoryview_and_bytearray():
    d = mc.Decoder()
    buf = bytearray(b"\x40\x02\x00\x05\xd0\x00")
    ps = d.feed(memoryview(buf)[:3]) + d.feed(memoryview(buf)[3:])
    assert [p.type for p in ps] == [mc.PUBACK, mc.PINGRESP] and ps[0].pid == 5


def test_malformed_rejected_whole_and_byte_by_byte():
    assert len(V["malformed"]) >= 30
    for v in V["malformed"]:
        data = _unhex(v["hex"])
        raises(mc.ProtocolError, mc.Decoder(V["max_packet"]).feed, data)
        d = mc.Decoder(V["max_packet"])
        failed = False
        for i in range(len(data)):
            try:
                d.feed(data[i : i + 1])
            except mc.ProtocolError:
                failed = True
                break
        assert failed, v["name"]


def test_malformed_after_good_packets():
    good = _unhex("20020000" + "40020001")
    for v in V["malformed"]:
        d = mc.Decoder(V["max_packet"])
        assert len(d.feed(good)) == 2
        raises(mc.ProtocolError, d.feed, _unhex(v["hex"]))


def test_failed_decoder_stays_failed_until_reset():
    d = mc.Decoder()
    raises(mc.ProtocolError, d.feed, b"\x00\x00")
    raises(mc.ProtocolError, d.feed, b"\x40\x02\x00\x01")
    d.reset()
    assert d.feed(b"\x40\x02\x00\x01")[0].pid == 1


def test_huge_length_rejected_before_body():
    # the cap is checked as soon as the length is known, so nothing waits for 256 MB
    d = mc.Decoder(8192)
    raises(mc.ProtocolError, d.feed, b"\x30\xff\xff\xff\x7f")
    d = mc.Decoder(64)
    assert len(d.feed(mc.publish("t", bytes(64 - 2 - 3), 0))) == 1  # exactly 64 bytes
    raises(mc.ProtocolError, d.feed, mc.publish("t", bytes(64 - 2 - 2), 0))  # 65


def test_wrong_length_rejected_before_body():
    # a PUBACK claiming 3 bytes fails at its length byte, without waiting for the body
    raises(mc.ProtocolError, mc.Decoder().feed, b"\x40\x03")
    raises(mc.ProtocolError, mc.Decoder().feed, b"\x20\x7f")


def test_garbage_never_escapes_as_other_errors():
    # a pseudo-random byte soup only ever yields packets or ProtocolError
    x = 12345
    for _trial in range(200):
        d = mc.Decoder(512)
        data = bytearray(64)
        for i in range(64):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            data[i] = (x >> 16) & 0xFF
        try:
            d.feed(data)
        except mc.ProtocolError:
            pass


def test_incomplete_packet_yields_nothing():
    d = mc.Decoder()
    assert d.feed(b"\x32\x09\x00\x03a/b") == []
    assert d.feed(b"\x00\x2a") == []
    ps = d.feed(b"hi\xd0")
    assert len(ps) == 1 and ps[0].payload == b"hi" and ps[0].pid == 42
    assert d.feed(b"\x00")[0].type == mc.PINGRESP
