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
        g.check(cmd("reboot", "nonce-%02d" % i, exp=NOW + 60000 + i), NOW)
    g2 = gate(root)
    assert len(g2._ring) == commands.RING == 64
    assert g2.forgot_ms == NOW + 60005  # nonce-00..05 let go of, the earliest exps first
    assert code(g2, cmd("reboot", "nonce-69", exp=NOW + 60069)) == "replay"
    assert code(g2, cmd("reboot", "nonce-06", exp=NOW + 60006)) == "replay"
    assert code(g2, cmd("reboot", "nonce-00", exp=NOW + 60000)) == "replay"
    assert code(g2, cmd("reboot", "nonce-00", exp=NOW - 1)) == "expired"
    # the price: a new command no later than one let go of is refused too
    assert code(g2, cmd("reboot", "new", exp=NOW + 60005)) == "replay"
    assert g2.check(cmd("reboot", "new", exp=NOW + 60070), NOW)["cmd"] == "reboot"


def test_expired_nonces_leave_the_ring_first():
    g = gate()
    for i in range(commands.RING):
        g.check(cmd("reboot", "old-%d" % i, exp=NOW + 1000), NOW)
    later = NOW + 2000  # all of them past: refused as expired whatever the ring holds
    g.check(cmd("reboot", "new", exp=later + 60000), later)
    assert len(g._ring) == 1 and g.forgot_ms == -1


def test_torn_nonce_write_keeps_the_previous_ring():
    root = tmpdir("cmd-torn")
    g = gate(root)
    g.check(cmd("reboot", "a"), NOW)
    g.check(cmd("reboot", "b"), NOW)  # seq 2: tear its copy as a power cut would
    ab = persist.ABFile(root + "/nonce")
    assert ab.load() is not None and ab.seq == 3  # 1 is the first boot's empty record
    with open(ab.paths[ab._newest], "wb") as f:
        f.write(b"0000")
    g2 = gate(root)
    # "b" never returned from check(), so it was never acted on
    assert [e[0] for e in g2._ring] == [commands.nonce_id("a")] and not g2.lost
    assert code(g2, cmd("reboot", "a")) == "replay"


def test_garbage_in_the_nonce_file_counts_as_lost():
    # an intact CRC around something that is not a nonce record: the record is lost
    for data in (b'{"x":1}', b"[1]", b'{"floor":1,"nonces":[{}]}', b'{"floor":"1","nonces":[]}'):
        root = tmpdir("cmd-garbage")
        persist.ABFile(root + "/nonce").save(data)
        g = gate(root)
        assert g.lost and g._ring == [] and g.floor_ms == 0, data
        assert code(g, cmd("reboot", "z"), None) == "replay"
        assert code(g, cmd("reboot", "z"), NOW) == "replay"  # synced: a day to wait


def test_a_nonce_ring_in_the_former_file_format_is_read():
    # as the firmware wrote it before persist.ABFile was the one A/B format
    root = tmpdir("cmd-old")
    data = wire.encode({"floor": NOW, "nonces": ["n1", "n2"]})
    s = b"7"
    with open(root + "/nonce.b", "wb") as f:
        f.write(b"%08x " % persist.crc32(data, persist.crc32(s)) + s + b"\n" + data)
    g = gate(root)
    ids = [commands.nonce_id(n) for n in ("n1", "n2", "n3")]
    assert [e[0] for e in g._ring] == ids[:2] and g.floor_ms == NOW and not g.lost
    assert g._ring[0][1] == NOW + commands.MAX_AHEAD_MS  # their exps unknown: a day at most
    assert code(g, cmd("reboot", "n2")) == "replay"
    assert g.check(cmd("reboot", "n3"), NOW)["cmd"] == "reboot"
    with open(root + "/nonce.a", "rb") as f:  # written in the one format, seq going on
        seq, got = persist.unpack(f.read())
    assert seq == 8 and [e[0] for e in wire.decode(got)["nonces"]] == ids
    assert [e[0] for e in gate(root)._ring] == ids


# ---- issue 14 item 6: every way a captured, validly signed command could act twice --------


def _corrupt(root):
    for s in ("a", "b"):
        with open(root + "/nonce." + s, "wb") as f:
            f.write(b"AB1 9\nflash rot\n00000000\n")


def test_a_nonce_the_ring_let_go_of_is_still_refused():
    # a long exp (a day) outlives 64 newer commands with shorter ones: FIFO forgot it
    root = tmpdir("cmd-evict")
    g = gate(root)
    first = cmd("reboot", "first", exp=NOW + 86400000)
    assert g.check(first, NOW)["cmd"] == "reboot"
    early = []
    for i in range(commands.RING + 6):
        p = cmd("reboot", "e%d" % i, exp=NOW + 60000 + i)
        early.append(p)
        g.check(p, NOW)
    for now in (NOW, NOW + 1000, None):
        assert code(g, first, now) == "replay", now
        assert code(g, early[0], now) == "replay", now  # let go of: its exp is not after
    g2 = gate(root)  # the same after a restart, synced or not
    for now in (NOW + 2000, None):
        assert code(g2, first, now) == "replay"
        assert code(g2, early[0], now) == "replay"
        assert code(g2, early[-1], now) == "replay"
    # a fresh command with a later exp than any let go of is accepted
    assert g2.check(cmd("reboot", "fresh", exp=NOW + 120000), NOW)["cmd"] == "reboot"


def test_a_nonce_the_ring_let_go_of_is_refused_while_unsynced():
    # unsynced, no floor: every exp is acceptable, so only the ring stands in the way
    root = tmpdir("cmd-evict-unsynced")
    g = gate(root)
    ps = [cmd("reboot", "u%d" % i, exp=NOW + i) for i in range(commands.RING + 10)]
    for p in ps:
        assert g.check(p, None)["cmd"] == "reboot"
    for p in ps:
        assert code(g, p, None) == "replay"
        assert code(gate(root), p, None) == "replay"
    assert len(g._ring) <= commands.RING


def test_a_power_cut_between_saving_and_acting_loses_the_command_not_the_nonce():
    root = tmpdir("cmd-cut")
    p = cmd("reboot", "cut")
    assert gate(root).check(p, None)["cmd"] == "reboot"  # saved; the cut came before acting
    g = gate(root)
    assert code(g, p, None) == "replay" and code(g, p, NOW) == "replay"


def test_both_nonce_copies_lost_refuses_until_synced_and_for_a_day():
    root = tmpdir("cmd-lost")
    g = gate(root)
    old = cmd("reboot", "old", exp=NOW + 3600000)
    assert g.check(old, NOW)["cmd"] == "reboot"
    assert g.check(cmd("reboot", "old2", exp=NOW + 3600000), NOW)["cmd"] == "reboot"
    _corrupt(root)  # A and B both bad
    g = gate(root)
    assert g.lost
    assert code(g, old, None) == "replay"  # unsynced: nothing at all is accepted
    assert code(g, cmd("reboot", "new", exp=NOW + 60000), None) == "replay"
    t = cmd("time", "t-lost", exp=NOW + 60000, now_ms=NOW)
    assert code(g, t, None) == "replay"  # not even a time command: it could be an old one
    assert code(gate(root), old, None) == "replay"  # still lost after another restart
    # synced: every command the station may have accepted before expires within a day
    assert code(g, old, NOW + 1000) == "replay"
    assert code(g, cmd("reboot", "new2", exp=NOW + 60000), NOW + 1000) == "replay"
    assert not g.lost
    g2 = gate(root)  # the day is remembered across a restart
    assert not g2.lost
    assert code(g2, old, None) == "replay"
    later = NOW + 1000 + 86400000
    assert g2.check(cmd("reboot", "next-day", exp=later + 60000), later)["cmd"] == "reboot"


def test_a_torn_first_save_is_a_fresh_start_not_a_loss():
    # the only copy torn, the other never written: no command was ever acted on
    root = tmpdir("cmd-first")
    with open(root + "/nonce.a", "wb") as f:
        f.write(b'AB1 1\n{"floo')
    g = gate(root)
    assert not g.lost
    assert g.check(cmd("reboot", "x"), NOW)["cmd"] == "reboot"


def test_a_failed_nonce_write_refuses_the_command():
    g = gate()

    def full(data):
        raise OSError(28)

    def too_big(data):
        raise ValueError("over max_bytes")

    p = cmd("config", "full", telemetry_s=30)
    save = g._ab.save
    for fail in (full, too_big):
        g._ab.save = fail
        assert code(g, p) == "unsaved"
        assert code(g, p, None) == "unsaved"
        assert code(g, cmd("selfdestruct", "sd")) == "unsaved"
    assert g.refused["unsaved"] == 6 and g.accepted == 0
    g._ab.save = save  # the disk has room again: the command never acted, so it may now
    assert g.check(p, NOW)["telemetry_s"] == 30
    assert code(g, p) == "replay"


def test_a_nonce_in_another_spelling_is_the_same_nonce():
    root = tmpdir("cmd-spell")
    g = gate(root)
    assert g.check(cmd("reboot", "A/1"), NOW)["cmd"] == "reboot"
    base = '{"cmd":"reboot","exp":%d,"kid":1,"nonce":"%s","sid":"KH-PNH-0001","v":1}'
    for spelt in ("\\u0041/1", "A\\/1", "\\u0041\\u002f1", "\\u0041\\u002F1"):
        assert code(g, raw((base % (NOW + 60000, spelt)).encode())) == "replay", spelt
    assert g.check(cmd("reboot", 5), NOW)["nonce"] == 5
    assert g.check(cmd("reboot", "5"), NOW)["nonce"] == "5"  # the agent signed both
    g2 = gate(root)
    assert code(g2, cmd("reboot", 5)) == "replay" and code(g2, cmd("reboot", "5")) == "replay"
    assert g2.check(cmd("reboot", "a/1"), NOW)["nonce"] == "a/1"  # case matters
    # no spelling of a nonce carries whitespace or control characters
    for spelt in (" A/1", "A/1 ", "A\\t1", "A\\n1", "A\\u00201"):
        assert code(g, raw((base % (NOW + 60000, spelt)).encode())) == "malformed", spelt


def test_the_signature_covers_every_field():
    g = gate()
    p = cmd("config", "sig1", telemetry_s=30)
    for a, b in (
        (b'"exp":%d' % (NOW + 60000), b'"exp":%d' % (NOW + 600000)),
        (b'"nonce":"sig1"', b'"nonce":"sig2"'),
        (b'"sid":"KH-PNH-0001"', b'"sid":"KH-PNH-0002"'),
        (b'"kid":1', b'"kid":2'),
        (b'"cmd":"config"', b'"cmd":"reboot"'),
        (b'"v":1', b'"v":2'),
    ):
        assert a in p, a
        assert code(g, p.replace(a, b)) == "bad_sig", b
    assert code(g, p[:-1] + b',"exp":1}') == "bad_sig"  # nothing may follow sig
    # another station's command, replayed here: its key is not ours
    o = {"v": 1, "sid": "KH-PNH-0002", "kid": 1, "cmd": "reboot", "exp": NOW + 1, "nonce": "o"}
    assert code(g, wire.sign(o, OTHER)) == "bad_sig"
    assert code(g, wire.sign(o, KEY)) == "wrong_sid"  # a key shared by mistake: the sid
    assert g.accepted == 0
    assert g.check(p, NOW)["cmd"] == "config"


def test_expiry_as_the_clock_goes_from_unsynced_to_synced():
    root = tmpdir("cmd-sync")
    g = gate(root)
    a = cmd("reboot", "a", exp=NOW - 5000)
    assert g.check(a, None)["cmd"] == "reboot"  # unsynced, no floor: only the nonce
    assert code(g, a, None) == "replay"
    assert code(g, a, NOW) == "expired"
    b = cmd("reboot", "b", exp=NOW - 1)  # never seen, but now past
    assert code(g, b, NOW) == "expired"
    assert g.check(cmd("reboot", "c"), NOW)["cmd"] == "reboot"  # floor NOW
    g2 = gate(root)  # restarted, unsynced again: the floor holds
    assert code(g2, b, None) == "expired"
    assert code(g2, cmd("reboot", "d", exp=NOW + 86400001), NOW) == "expired"
    # unsynced, an exp far ahead cannot be judged; it is bounded to JSON's exact ints
    assert g2.check(cmd("reboot", "e", exp=NOW + 86400001), None)["cmd"] == "reboot"
    assert code(g2, cmd("reboot", "f", exp=1 << 53), None) == "malformed"
    assert code(g2, cmd("reboot", "g", exp=-1), None) == "malformed"


def test_a_time_command_never_sets_the_clock_before_a_time_seen():
    root = tmpdir("cmd-time")
    g = gate(root)
    g.check(cmd("reboot", "r"), NOW)  # floor NOW
    t = cmd("time", "t", exp=NOW + 60000, now_ms=NOW - 30000)  # sent before, delivered late
    assert gate(root).check(t, None)["now_ms"] == NOW
