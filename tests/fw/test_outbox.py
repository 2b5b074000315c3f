# Flash outbox: order, exact bytes, persistence, torn writes, bounds and drops.
import os

import outbox
import persist
from fwtest import raises, tmpdir


def payload(i, n=None):
    # every byte value shows up somewhere, lengths vary
    if n is None:
        n = 20 + (i * 37) % 300
    return bytes((i * 7 + j) & 0xFF for j in range(n))


class Rng:
    """A tiny LCG: the same sequence on both interpreters."""

    def __init__(self, seed):
        self.s = seed

    def below(self, n):
        self.s = (self.s * 1103515245 + 12345) & 0x7FFFFFFF
        return (self.s >> 8) % n


def newest_copy(path):
    """The slot file (path.a or path.b) that holds the newest intact copy."""
    ab = persist.ABFile(path)
    ab.load()
    return ab.paths[ab._newest]


def segs(root):
    return sorted(int(f[1:]) for f in os.listdir(root) if f[:1] == "s")


def test_append_pending_ack_in_order_with_exact_bytes():
    root = tmpdir("ob-basic")
    ob = outbox.Outbox(root, 100000)
    ids = [ob.append("t" if i % 3 else "e", payload(i)) for i in range(10)]
    assert ids == list(range(10))
    assert len(ob) == 10
    assert ob.bytes_used == sum(12 + len(payload(i)) for i in range(10))
    got = ob.pending(4)
    assert [(r[0], r[1]) for r in got] == [(0, "e"), (1, "t"), (2, "t"), (3, "e")]
    assert [r[2] for r in got] == [payload(i) for i in range(4)]
    assert ob.ack(0) and ob.ack(2)
    assert not ob.ack(2) and not ob.ack(99) and not ob.ack(-1)
    assert [r[0] for r in ob.pending(100)] == [1, 3, 4, 5, 6, 7, 8, 9]
    assert len(ob) == 8
    assert ob.pending(0) == []


def test_survives_restart_and_ids_continue():
    root = tmpdir("ob-restart")
    ob = outbox.Outbox(root, 100000)
    for i in range(6):
        ob.append("t", payload(i))
    ob.ack(0)
    ob.ack(3)  # out of order
    ob2 = outbox.Outbox(root, 100000)
    assert [(r[0], r[2]) for r in ob2.pending(10)] == [(i, payload(i)) for i in (1, 2, 4, 5)]
    assert len(ob2) == 4 and ob2.bytes_used == ob.bytes_used
    assert ob2.append("b", b"boot") == 6
    for i in (1, 2, 4, 5, 6):
        assert ob2.ack(i)
    assert len(ob2) == 0 and segs(root) == []
    ob3 = outbox.Outbox(root, 100000)
    assert len(ob3) == 0 and ob3.pending(5) == [] and ob3.bytes_used == 0
    assert ob3.append("t", b"x") == 7


def test_segments_roll_over_and_are_deleted_when_acked():
    root = tmpdir("ob-segs")
    ob = outbox.Outbox(root, 100000, seg_bytes=1024)
    for i in range(30):
        ob.append("t", payload(i, 200))
    assert len(segs(root)) == 6  # 5 records of 212 bytes reach 1024
    for i in range(12):
        ob.ack(i)
    assert segs(root)[0] == 10  # segment 0..4 and 5..9 deleted, 10..14 still holds 12..14
    assert ob.bytes_used == sum(os.stat(root + "/s%d" % f)[6] for f in segs(root))
    assert [r[0] for r in outbox.Outbox(root, 100000, seg_bytes=1024).pending(3)] == [12, 13, 14]


def tear(root, extra):
    last = segs(root)[-1]
    with open(root + "/s%d" % last, "ab") as f:
        f.write(extra)


def test_torn_append_is_ignored_and_appends_go_on():
    for i, junk in enumerate(
        (
            b"\xb5",
            b"\xb5t\x10\x00\x05\x00\x00\x00\x00",
            b"\xb5t\x10\x00\x05\x00\x00\x00\x01\x02\x03\x04ab",
        )
    ):
        root = tmpdir("ob-torn%d" % i)
        ob = outbox.Outbox(root, 100000)
        for j in range(5):
            ob.append("t", payload(j))
        tear(root, junk)
        ob2 = outbox.Outbox(root, 100000)
        assert [r[2] for r in ob2.pending(10)] == [payload(j) for j in range(5)]
        assert ob2.append("e", b"after") == 5
        assert len(segs(root)) == 2  # never written after the torn bytes
        ob3 = outbox.Outbox(root, 100000)
        assert [r[2] for r in ob3.pending(10)][-1] == b"after" and len(ob3) == 6


def test_flipped_byte_in_the_last_record_cuts_it_off():
    root = tmpdir("ob-crc")
    ob = outbox.Outbox(root, 100000)
    for j in range(3):
        ob.append("t", payload(j))
    path = root + "/s0"
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    raw[-1] ^= 1
    with open(path, "wb") as f:
        f.write(raw)
    ob2 = outbox.Outbox(root, 100000)
    assert [r[0] for r in ob2.pending(10)] == [0, 1]


def test_torn_ack_write_falls_back_to_the_previous_state():
    root = tmpdir("ob-ack")
    ob = outbox.Outbox(root, 100000)
    for j in range(4):
        ob.append("t", payload(j))
    ob.ack(0)
    ob.ack(1)  # newest copy; tear it
    newest = newest_copy(root + "/ack")
    with open(newest, "rb") as f:
        raw = f.read()
    with open(newest, "wb") as f:
        f.write(raw[:-1])
    ob2 = outbox.Outbox(root, 100000)
    assert [r[0] for r in ob2.pending(10)] == [1, 2, 3]  # 1 comes back: a duplicate send at most
    ob2.ack(1)
    assert [r[0] for r in outbox.Outbox(root, 100000).pending(10)] == [2, 3]


def test_ab_file_keeps_the_newest_intact_copy():
    root = tmpdir("ob-abf")
    ab = outbox.ABFile(root + "/x")
    assert ab.load() is None
    ab.save(b"one")
    ab.save(b"two words")
    ab2 = outbox.ABFile(root + "/x")
    assert ab2.load() == b"two words" and ab2.seq == 2
    with open(newest_copy(root + "/x"), "wb") as f:  # the copy holding seq 2: tear it
        f.write(b"garbage")
    ab3 = outbox.ABFile(root + "/x")
    assert ab3.load() == b"one" and ab3.seq == 1
    ab3.save(b"three")  # overwrites the torn copy
    assert outbox.ABFile(root + "/x").load() == b"three"


# The ack state as the outbox wrote it before persist.ABFile was its format, made by that
# firmware: seq 2 in ack.a, seq 1 in ack.b.
OLD_ACK_A = b"3700c07f 2\n5 9 7"
OLD_ACK_B = b"8030a13e 1\n4 9"


def old_ab(seq, data):
    """A slot file in the former outbox format: "<crc32 hex> <seq>\\n" + data."""
    s = b"%d" % seq
    return b"%08x " % persist.crc32(data, persist.crc32(s)) + s + b"\n" + data


def test_old_format_ack_files_are_read_then_rewritten_in_the_one_format():
    assert old_ab(2, b"5 9 7") == OLD_ACK_A and old_ab(1, b"4 9") == OLD_ACK_B
    root = tmpdir("ob-old-ack")
    ob = outbox.Outbox(root, 100000)
    for j in range(5):
        ob.append("t", payload(j))
    del ob
    # an outbox left by the former firmware: 0 acked in order, 2 out of order, 1 3 4 pending
    for name in os.listdir(root):
        if name.startswith("ack."):
            os.remove(root + "/" + name)
    with open(root + "/ack.b", "wb") as f:  # older copy: nothing acked yet
        f.write(old_ab(6, b"0 5"))
    with open(root + "/ack.a", "wb") as f:
        f.write(old_ab(7, b"1 5 2"))
    ob = outbox.Outbox(root, 100000)
    assert ob._ab.seq == 7
    assert [r[0] for r in ob.pending(10)] == [1, 3, 4] and ob.append("t", payload(5)) == 5
    ob.ack(3)  # the first save after the update: the one format, over the older copy
    with open(root + "/ack.b", "rb") as f:
        assert persist.unpack(f.read()) == (8, b"1 6 2 3")
    with open(root + "/ack.a", "rb") as f:
        assert f.read() == old_ab(7, b"1 5 2")  # the newest copy was left alone
    assert [r[0] for r in outbox.Outbox(root, 100000).pending(10)] == [1, 4, 5]
    # the old newest copy torn: the older old-format copy still counts
    root2 = tmpdir("ob-old-torn")
    with open(root2 + "/ack.a", "wb") as f:
        f.write(OLD_ACK_A[:-1])
    with open(root2 + "/ack.b", "wb") as f:
        f.write(OLD_ACK_B)
    ab = persist.ABFile(root2 + "/ack")
    assert ab.load() == b"4 9" and ab.seq == 1


def test_an_intact_ack_copy_that_does_not_parse_falls_back():
    root = tmpdir("ob-ack-parse")
    ob = outbox.Outbox(root, 100000)
    for j in range(3):
        ob.append("t", payload(j))
    ob.ack(0)
    ab = persist.ABFile(root + "/ack")
    ab.save(b"not ids")  # a valid copy (CRC fine) whose contents are no ack state
    assert ab.seq == 2
    ob2 = outbox.Outbox(root, 100000)
    assert [r[0] for r in ob2.pending(10)] == [1, 2] and ob2._ab.seq == 1
    ob2.ack(1)  # over the unparsable copy, with a seq above it
    assert ob2._ab.seq == 2 and [r[0] for r in outbox.Outbox(root, 100000).pending(10)] == [2]


def test_full_outbox_drops_oldest_telemetry_never_boot():
    root = tmpdir("ob-drop")
    ob = outbox.Outbox(root, 4096, seg_bytes=1024)
    b0 = ob.append("b", b"B" * 100)
    e0 = ob.append("e", b"E" * 100)
    t = [ob.append("t", payload(i, 188)) for i in range(40)]  # 200 bytes each
    assert ob.bytes_used <= 4096
    assert ob.dropped > 0 and ob.dropped == 40 + 2 - len(ob)
    n = ob.take_dropped()
    assert n == ob.dropped and ob.take_dropped() == 0
    rows = ob.pending(100)
    ids = [r[0] for r in rows]
    assert ids[:2] == [b0, e0] and ids == sorted(ids)
    kept = [r[0] for r in rows[2:]]
    assert kept == t[-len(kept) :]  # the newest telemetry survives, contiguous
    for r in rows[2:]:
        assert r[2] == payload(r[0] - 2, 188)
    assert not ob.ack(t[0])  # a late PUBACK for a dropped record is a no-op
    again = outbox.Outbox(root, 4096, seg_bytes=1024)
    assert [r[0] for r in again.pending(100)] == ids


def test_events_go_only_when_no_telemetry_is_left():
    root = tmpdir("ob-drop-e")
    ob = outbox.Outbox(root, 2048, seg_bytes=512)
    bs = [ob.append("b", b"B" * 88) for _ in range(4)]  # 100 bytes each
    es = [ob.append("e", b"E" * 188) for _ in range(6)]  # 200 each: 1600 in all
    assert ob.dropped == 0
    assert ob.append("t", b"T" * 588) is None  # no telemetry to drop: the new one goes
    assert ob.take_dropped() == 1 and len(ob) == 10
    e_new = ob.append("e", b"N" * 588)  # an event may push out the oldest events
    assert e_new is not None
    kinds = [r[1] for r in ob.pending(100)]
    assert kinds.count("b") == 4 and kinds[-1] == "e"
    assert ob.take_dropped() > 0 and ob.bytes_used <= 2048
    # a boot record is stored even past the bound once only boot records could go
    for _ in range(30):
        ob.append("b", b"B" * 88)
    assert len([r for r in ob.pending(100) if r[1] == "b"]) == 34
    assert ob.bytes_used > 2048
    assert [r[1] for r in outbox.Outbox(root, 2048, seg_bytes=512).pending(100)].count("b") == 34
    assert bs[0] == 0 and es[0] == 4


def test_many_out_of_order_acks_stay_bounded():
    root = tmpdir("ob-ooo")
    ob = outbox.Outbox(root, 1000000, seg_bytes=2048, max_acked=8)
    for i in range(60):
        ob.append("t", payload(i, 50))
    for i in range(1, 60, 2):  # every odd one; 0 stays pending so head cannot move
        assert ob.ack(i)
    assert len(ob._acked) <= 8
    with open(root + "/ack." + ("a" if ob._ab.seq % 2 == 0 else "b"), "rb") as f:
        assert len(f.read()) < 200
    want = [(i, payload(i, 50)) for i in range(0, 60, 2)]
    assert [(r[0], r[2]) for r in ob.pending(100)] == want
    assert [
        (r[0], r[2]) for r in outbox.Outbox(root, 1000000, seg_bytes=2048, max_acked=8).pending(100)
    ] == want


def test_stale_compaction_file_is_removed():
    root = tmpdir("ob-tmp")
    ob = outbox.Outbox(root, 100000)
    ob.append("t", b"x")
    with open(root + "/c.tmp", "wb") as f:
        f.write(b"half a segment")
    ob2 = outbox.Outbox(root, 100000)
    assert "c.tmp" not in os.listdir(root) and [r[2] for r in ob2.pending(5)] == [b"x"]


def test_a_failed_write_leaves_the_outbox_consistent():
    root = tmpdir("ob-fail")
    ob = outbox.Outbox(root, 100000, seg_bytes=1024)
    assert ob.append("t", payload(0, 1100)) == 0
    os.mkdir(root + "/s1")  # the next segment cannot be opened
    raises(OSError, ob.append, "t", b"lost")
    assert len(ob) == 1 and ob.bytes_used == 1112
    os.rmdir(root + "/s1")
    assert ob.append("e", b"next") == 1
    assert [(r[0], r[2]) for r in outbox.Outbox(root, 100000, seg_bytes=1024).pending(5)] == [
        (0, payload(0, 1100)),
        (1, b"next"),
    ]


def test_bad_arguments():
    ob = outbox.Outbox(tmpdir("ob-bad"), 100000)
    raises(ValueError, ob.append, "x", b"1")
    raises(ValueError, ob.append, "t", b"1" * 70000)
    assert len(ob) == 0


def test_random_operations_match_a_model():
    # No drops here (large bound): every append is pending until acked, across reopenings.
    rng = Rng(7)
    root = tmpdir("ob-model")
    ob = outbox.Outbox(root, 10**7, seg_bytes=700, max_acked=5)
    model = {}
    for step in range(600):
        r = rng.below(100)
        if r < 50:
            p = payload(step, rng.below(150))
            kind = "teb"[rng.below(3)]
            model[ob.append(kind, p)] = (kind, p)
        elif r < 90 and model:
            ids = sorted(model)
            rid = ids[rng.below(min(len(ids), 6))]  # mostly near the oldest, like PUBACKs
            assert ob.ack(rid)
            del model[rid]
        elif r < 95:
            ob = outbox.Outbox(root, 10**7, seg_bytes=700, max_acked=5)
        got = ob.pending(1000)
        assert [x[0] for x in got] == sorted(model)
        for rid, kind, p in got:
            assert model[rid] == (kind, p)
        assert len(ob) == len(model)
    assert ob.bytes_used == sum(os.stat(root + "/s%d" % f)[6] for f in segs(root))


def test_random_operations_with_drops_keep_the_invariants():
    rng = Rng(11)
    root = tmpdir("ob-model-drop")
    ob = outbox.Outbox(root, 6000, seg_bytes=900)
    made = {}
    boots = set()  # boot records appended and not acked: never lost
    acked = 0
    appended = 0
    dropped = 0
    for step in range(800):
        r = rng.below(100)
        if r < 60:
            kind = "t" if rng.below(10) < 8 else ("e" if rng.below(4) else "b")
            p = payload(step, 30 + rng.below(200))
            rid = ob.append(kind, p)
            appended += 1
            if rid is not None:
                made[rid] = (kind, p)
                if kind == "b":
                    boots.add(rid)
            else:
                assert kind != "b"
        elif r < 80:
            got = ob.pending(3)
            if got:
                rid = got[rng.below(len(got))][0]
                assert ob.ack(rid)
                boots.discard(rid)
                acked += 1
        elif r < 83:
            dropped += ob.dropped
            ob = outbox.Outbox(root, 6000, seg_bytes=900)
        got = ob.pending(1000)
        ids = [x[0] for x in got]
        assert ids == sorted(ids)
        for rid in boots:
            assert rid in ids
        for rid, kind, p in got:
            assert made[rid] == (kind, p)
        assert appended == len(got) + acked + dropped + ob.dropped
        assert ob.bytes_used <= 6000 or all(x[1] == "b" for x in got)
    assert dropped + ob.dropped > 0
