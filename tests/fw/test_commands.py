# Signed commands (CONTRACT 5.4): every refusal code, replay protection across restarts.
import hashlib

import commands
import hmac_sha256
import persist
import wire
from fwtest import raises, tmpdir

KEY = hashlib.sha256(b"test_commands key").digest()
OTHER = hashlib.sha256(b"another station").digest()
SID = "KH-PNH-0001"
NOW = 1764150000000


def cmd(name, nonce, exp=NOW + 60000, key=KEY, **args):
    o = {"v": 1, "sid": SID, "kid": 1, "cmd": name, "exp": exp, "nonce": nonce}
    for k in args:
        o[k] = args[k]
    return wire.sign(o, key)


def raw(body, key=KEY):
    return body[:-1] + b',"sig":"' + hmac_sha256.Hmac(key).hexdigest(body) + b'"}'


def gate(root=None):
    return commands.CommandGate(SID, 1, KEY, root or tmpdir("cmd"))


def code(g, payload, now=NOW):
    return raises(commands.CommandError, g.check, payload, now).code


def test_known_commands_are_normalised():
    g = gate()
    assert g.check(cmd("config", "n1", telemetry_s=30), NOW) == {
        "cmd": "config",
        "nonce": "n1",
        "telemetry_s": 30,
    }
    assert g.check(cmd("time", "n2", now_ms=NOW + 5), None) == {
        "cmd": "time",
        "nonce": "n2",
        "now_ms": NOW + 5,
    }
    assert g.check(cmd("reboot", 77), NOW) == {"cmd": "reboot", "nonce": 77}
    assert g.accepted == 3 and sum(g.refused[c] for c in commands.CODES) == 0


def test_signature_codes():
    g = gate()
    assert (
        code(g, b'{"v":1,"sid":"KH-PNH-0001","kid":1,"cmd":"reboot","exp":1,"nonce":"x"}')
        == "unsigned"
    )
    assert code(g, cmd("reboot", "a", key=OTHER)) == "bad_sig"
    assert code(g, cmd("config", "b", telemetry_s=30).replace(b":30,", b":31,")) == "bad_sig"
    o = {"v": 1, "sid": SID, "kid": 2, "cmd": "reboot", "exp": NOW + 1000, "nonce": "c"}
    assert code(g, wire.sign(o, KEY)) == "bad_sig"  # our key, another key version named
    assert g.refused["unsigned"] == 1 and g.refused["bad_sig"] == 3 and g.accepted == 0


def test_malformed():
    g = gate()
    base = '"sid":"KH-PNH-0001","kid":1,"cmd":"reboot","exp":%d' % (NOW + 1000)
    for body in (
        '{%s,"nonce":"a"}' % base,  # no v
        '{"v":2,%s,"nonce":"a"}' % base,
        '{"v":true,%s,"nonce":"a"}' % base,
        '{"v":1,%s}' % base,  # no nonce
        '{"v":1,%s,"nonce":"a b"}' % base,
        '{"v":1,%s,"nonce":""}' % base,
        '{"v":1,%s,"nonce":"%s"}' % (base, "x" * 41),
        '{"v":1,%s,"nonce":-1}' % base,
        '{"v":1,%s,"nonce":1.5}' % base,
        '{"v":1,"sid":"KH-PNH-0001","kid":1,"cmd":"reboot","exp":"soon","nonce":"a"}',
        '{"v":1,"sid":"KH-PNH-0001","kid":"1","cmd":"reboot","exp":1,"nonce":"a"}',
        '{"v":1,"sid":"KH-PNH-0001","kid":1,"cmd":7,"exp":1,"nonce":"a"}',
        '{"v":1,%s,"nonce":"a","nonce":"b"}' % base,  # duplicate key
        '{"v":1, %s,"nonce":"a"}' % base,  # not compact
    ):
        assert code(g, raw(body.encode())) == "malformed", body
    assert g.refused["malformed"] == 14


def test_wrong_sid():
    g = commands.CommandGate("KH-PNH-0002", 1, KEY, tmpdir("cmd"))
    assert code(g, cmd("reboot", "a")) == "wrong_sid"


def test_expiry_when_synced_and_not():
    g = gate()
    assert code(g, cmd("reboot", "a", exp=NOW - 1)) == "expired"
    assert code(g, cmd("reboot", "b", exp=NOW + 86400001)) == "expired"  # too far ahead
    assert g.check(cmd("reboot", "c", exp=NOW - 1), None)["cmd"] == "reboot"  # unsynced: nonce only
    assert g.check(cmd("reboot", "d", exp=NOW), NOW)["cmd"] == "reboot"  # exp is inclusive


def test_replay_same_payload_and_same_nonce():
    g = gate()
    p = cmd("config", "n1", telemetry_s=30)
    g.check(p, NOW)
    assert code(g, p) == "replay"
    assert code(g, cmd("reboot", "n1")) == "replay"
    assert code(g, p, None) == "replay"
    assert g.check(cmd("reboot", "N1"), NOW)["nonce"] == "N1"
    assert g.check(cmd("reboot", 1), NOW)["nonce"] == 1  # int 1 and "1" are different nonces
    assert g.check(cmd("reboot", "1"), NOW)["nonce"] == "1"
    assert g.refused["replay"] == 3


def test_unknown_command_and_bad_args_use_up_the_nonce():
    g = gate()
    assert code(g, cmd("selfdestruct", "u1")) == "unknown_cmd"
    assert code(g, cmd("selfdestruct", "u1")) == "replay"
    cases = [
        cmd("config", "b1", telemetry_s=0),
        cmd("config", "b2", telemetry_s=3601),
        cmd("config", "b3", telemetry_s="30"),
        cmd("config", "b4", telemetry_s=True),
        cmd("config", "b5"),
        cmd("config", "b6", telemetry_s=30, sample_ms=100),
        cmd("reboot", "b7", delay=5),
        cmd("time", "b8"),
        cmd("time", "b9", now_ms=NOW + 70000),  # after its own exp
        cmd("time", "b10", now_ms=NOW + 60000 - 86400001),  # over a day before exp
        cmd("time", "b11", now_ms=-5),
    ]
    for p in cases:
        assert code(g, p) == "bad_args", p
    assert g.check(cmd("config", "ok1", telemetry_s=1), NOW)["telemetry_s"] == 1
    assert g.check(cmd("config", "ok2", telemetry_s=3600), NOW)["telemetry_s"] == 3600
    assert g.refused["bad_args"] == 11 and g.refused["unknown_cmd"] == 1


def test_nonces_and_floor_survive_a_restart_before_the_clock_syncs():
    root = tmpdir("cmd-persist")
    g = gate(root)
    old = cmd("reboot", "old", exp=NOW - 3600000)  # captured an hour before
    assert g.check(old, None)["cmd"] == "reboot"  # accepted while unsynced
    recent = cmd("reboot", "r1")
    assert g.check(recent, NOW)["cmd"] == "reboot"  # floor is now NOW
    g2 = gate(root)  # reboot: clock not synced yet
    assert g2.floor_ms == NOW
    assert code(g2, recent, None) == "replay"
    assert code(g2, old, None) == "expired"  # refused either way; expiry is checked first
    stale = cmd("config", "never-seen", exp=NOW - 1, telemetry_s=5)
    assert code(g2, stale, None) == "expired"  # older than a time already seen
    t = cmd("time", "t1", exp=NOW + 120000, now_ms=NOW + 60000)
    assert g2.check(t, None)["now_ms"] == NOW + 60000
    assert gate(root).floor_ms == NOW + 60000


def test_ring_is_bounded_and_persisted():
    root = tmpdir("cmd-ring")
    g = gate(root)
    for i in range(70):
        g.check(cmd("reboot", "nonce-%02d" % i), NOW)
    g2 = gate(root)
    assert len(g2._ring) == commands.RING == 64
    assert code(g2, cmd("reboot", "nonce-69")) == "replay"
    assert code(g2, cmd("reboot", "nonce-06")) == "replay"
    # nonce-00 left the ring; with exp checks it is still refused once the clock is synced
    assert code(g2, cmd("reboot", "nonce-00", exp=NOW - 1)) == "expired"


def test_torn_nonce_write_keeps_the_previous_ring():
    root = tmpdir("cmd-torn")
    g = gate(root)
    g.check(cmd("reboot", "a"), NOW)
    g.check(cmd("reboot", "b"), NOW)  # seq 2: tear its copy as a power cut would
    ab = persist.ABFile(root + "/nonce")
    assert ab.load() is not None and ab.seq == 2
    with open(ab.paths[ab._newest], "wb") as f:
        f.write(b"0000")
    g2 = gate(root)
    assert g2._ring == ["a"]  # "b" never returned from check(), so it was never acted on
    assert code(g2, cmd("reboot", "a")) == "replay"


def test_garbage_in_the_nonce_file_starts_empty():
    root = tmpdir("cmd-garbage")
    persist.ABFile(root + "/nonce").save(b'{"x":1}')
    g = gate(root)
    assert g._ring == [] and g.floor_ms == 0
    assert g.check(cmd("reboot", "z"), NOW)["cmd"] == "reboot"


def test_a_nonce_ring_in_the_former_file_format_is_read():
    # as the firmware wrote it before persist.ABFile was the one A/B format
    root = tmpdir("cmd-old")
    data = wire.encode({"floor": NOW, "nonces": ["n1", "n2"]})
    s = b"7"
    with open(root + "/nonce.b", "wb") as f:
        f.write(b"%08x " % persist.crc32(data, persist.crc32(s)) + s + b"\n" + data)
    g = gate(root)
    assert g._ring == ["n1", "n2"] and g.floor_ms == NOW
    assert code(g, cmd("reboot", "n2")) == "replay"
    assert g.check(cmd("reboot", "n3"), NOW)["cmd"] == "reboot"
    with open(root + "/nonce.a", "rb") as f:  # written in the one format, seq going on
        seq, got = persist.unpack(f.read())
    assert seq == 8 and wire.decode(got)["nonces"] == ["n1", "n2", "n3"]
    assert gate(root)._ring == ["n1", "n2", "n3"]
