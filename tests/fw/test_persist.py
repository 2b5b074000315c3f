import os
import sys

import persist
from fwtest import raises, tmpdir
from persist import ABStore, PersistPolicy


def _get(path):
    with open(path, "rb") as f:
        return f.read()


def _put(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _rm(path):
    try:
        os.remove(path)
    except OSError:
        os.rmdir(path)


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _two_saves(tag):
    d = tmpdir(tag)
    s = ABStore(d, "regs")
    s.save({"regs": [100, 7]})
    s.save({"regs": [200, 9]})
    return d, s


def _corruptions(good):
    """Every way a slot file can be damaged: each truncation, each byte flipped (two ways),
    empty, garbage, a longer copy with trailing junk."""
    out = []
    for n in range(len(good)):
        out.append(("truncated at %d" % n, good[:n]))
    for i in range(len(good)):
        for mask in (0x01, 0xFF):
            b = bytearray(good)
            b[i] ^= mask
            out.append(("byte %d ^ %02x" % (i, mask), bytes(b)))
    out.append(("empty", b""))
    out.append(("garbage", bytes([(i * 37 + 11) & 0xFF for i in range(len(good))])))
    out.append(("trailing junk", good + b"x"))
    out.append(("zeros", bytes(len(good))))
    return out


def test_crc32_known_value_with_and_without_binascii():
    assert persist.crc32(b"123456789") == 0xCBF43926
    saved = persist._crc32
    try:
        persist._crc32 = None
        assert persist.crc32(b"123456789") == 0xCBF43926
        assert persist.crc32(b"") == 0
    finally:
        persist._crc32 = saved


def test_encode_decode_round_trip_and_format():
    data = persist.encode(5, {"a": [1, 2**70]})
    assert data.startswith(b"AB1 5\n{") and data.endswith(b"\n")
    assert persist.decode(data) == (5, {"a": [1, 2**70]})
    assert persist.decode(b"") is None


def test_state_files_keep_their_bytes():
    # as the firmware wrote them before ABFile became the one A/B format for every store
    assert persist.encode(5, [1, 2**70, "x\ny"]) == (
        b'AB1 5\n[1,1180591620717411303424,"x\\ny"]\nce181459\n'
    )
    assert persist.encode(12, {"boot": 41}) == b'AB1 12\n{"boot":41}\n38644ebe\n'
    d = tmpdir("persist-old")
    _put(d + "/station.b", b'AB1 12\n{"boot":41}\n38644ebe\n')
    s = ABStore(d, "station")
    assert s.load() == {"boot": 41} and s.seq == 12


def test_abfile_holds_any_bytes():
    for data in (b"", b"\n", b"a\nb\n", bytes(range(256)), b"AB1 7\nx\n00000000\n"):
        raw = persist.pack(9, data)
        assert raw == b"AB1 9\n" + data + b"\n%08x\n" % persist.crc32(b"AB1 9\n" + data)
        assert persist.unpack(raw) == (9, data)
        d = tmpdir("abfile-bytes")
        ab = persist.ABFile(d + "/x")
        assert ab.load() is None and ab.save(data) == 1 and ab.save(data + b"!") == 2
        t = persist.ABFile(d + "/x")
        assert t.load() == data + b"!" and t.seq == 2
    assert persist.crc32(b"6789", persist.crc32(b"12345")) == persist.crc32(b"123456789")


def _v0(seq, data):
    """A slot file in the outbox's former format."""
    s = b"%d" % seq
    return b"%08x " % persist.crc32(data, persist.crc32(s)) + s + b"\n" + data


def test_former_outbox_format_is_read_and_never_mistaken():
    assert persist.unpack_v0(b"3700c07f 2\n5 9 7") == (2, b"5 9 7")  # made by that firmware
    good = _v0(41, b"x\ny")
    assert persist.unpack_v0(good) == (41, b"x\ny") and persist.unpack(good) is None
    assert persist.unpack_v0(persist.pack(41, b"x\ny")) is None
    # newer copy in the former format, damaged every way: the older copy in the one format
    d = tmpdir("abfile-v0")
    ab = persist.ABFile(d + "/x")
    ab.save(b"older")
    n = 0
    for what, bad in _corruptions(good):
        _put(d + "/x.b", bad)
        t = persist.ABFile(d + "/x")
        assert t.load() == b"older" and t.seq == 1, what
        n += 1
    assert n > 3 * len(good)
    _put(d + "/x.b", good)
    t = persist.ABFile(d + "/x")
    assert t.load() == b"x\ny" and t.seq == 41
    assert t.save(b"new") == 42  # over the older copy, in the one format
    assert _get(d + "/x.b") == good and persist.unpack(_get(d + "/x.a")) == (42, b"new")


def test_a_copy_its_parser_rejects_counts_as_invalid():
    d = tmpdir("abfile-parse")
    persist.ABFile(d + "/x").save(b"12")
    persist.ABFile(d + "/x").save(b"twelve")
    ab = persist.ABFile(d + "/x", parse=int)
    assert ab.load() == 12 and ab.seq == 1
    assert ab.save(b"13") == 2  # over the rejected copy, never the valid one
    assert persist.ABFile(d + "/x", parse=int).load() == 13
    _put(d + "/x.a", persist.pack(3, b"x"))
    _put(d + "/x.b", persist.pack(4, b"y"))
    both = persist.ABFile(d + "/x", parse=int)
    assert both.load() is None and both.seq == 0


def test_fresh_store_then_saves_alternate_and_never_touch_the_newest():
    d = tmpdir("persist-fresh")
    s = ABStore(d, "st")
    assert s.load() is None and s.seq == 0
    assert s.save({"n": 1}) == 1
    a, b = d + "/st.a", d + "/st.b"
    assert _exists(a) and not _exists(b)
    first = _get(a)
    assert s.save({"n": 2}) == 2 and _get(a) == first  # the newest copy was left alone
    second = _get(b)
    assert s.save({"n": 3}) == 3 and _get(b) == second
    third = _get(a)
    t = ABStore(d, "st")
    assert t.load() == {"n": 3} and t.seq == 3
    assert t.save({"n": 4}) == 4 and _get(a) == third and _get(b) != second


def test_save_without_load_finds_the_newest_first():
    d, s = _two_saves("persist-noload")
    newest = _get(d + "/regs.b")
    t = ABStore(d, "regs")
    t.save({"regs": [300, 9]})
    assert _get(d + "/regs.b") == newest and t.seq == 3
    assert ABStore(d, "regs").load() == {"regs": [300, 9]}


def test_unbounded_ints_round_trip():
    d = tmpdir("persist-big")
    v = {"boot": 3, "regs": [2**70, 0, 12345678901234567890], "sessions": {"1": {"bat": "B1"}}}
    ABStore(d, "station").save(v)
    assert ABStore(d, "station").load() == v


def _check_fallback(tag, damage_newer):
    d, s = _two_saves(tag)
    older, newer = d + "/regs.a", d + "/regs.b"
    good_older, good_newer = _get(older), _get(newer)
    victim, good, survivor = (
        (newer, good_newer, good_older) if damage_newer else (older, good_older, good_newer)
    )
    want = {"regs": [100, 7]} if damage_newer else {"regs": [200, 9]}
    want_seq = 1 if damage_newer else 2
    n = 0
    for what, bad in _corruptions(good):
        _put(victim, bad)
        t = ABStore(d, "regs")
        got = t.load()
        assert got == want and t.seq == want_seq, (what, got, t.seq)
        assert got["regs"][0] >= 100  # never below the older intact slot
        # the next save goes to the damaged slot, never over the intact copy
        t.save({"regs": [300, 9]})
        assert _get(older if victim == newer else newer) == survivor, what
        assert ABStore(d, "regs").load() == {"regs": [300, 9]}, what
        _put(victim, good)
        n += 1
    assert n > 3 * len(good)
    # a missing file and a directory in its place
    _rm(victim)
    assert ABStore(d, "regs").load() == want
    os.mkdir(victim)
    assert ABStore(d, "regs").load() == want
    os.rmdir(victim)


def test_damaged_newer_slot_falls_back_to_the_older():
    _check_fallback("persist-newer", True)


def test_damaged_older_slot_keeps_the_newer():
    _check_fallback("persist-older", False)


def test_both_damaged_is_none_and_the_store_starts_over():
    d, s = _two_saves("persist-both")
    _put(d + "/regs.a", b"")
    _put(d + "/regs.b", b"AB1 9\n{}\n00000000\n")
    t = ABStore(d, "regs")
    assert t.load() is None and t.seq == 0
    t.save({"regs": [1]})
    assert ABStore(d, "regs").load() == {"regs": [1]}


def test_oversized_file_is_ignored():
    d, s = _two_saves("persist-big-file")
    pad = persist.encode(99, {"regs": [1], "pad": "x" * 200})
    _put(d + "/regs.b", pad)
    assert ABStore(d, "regs").load()["regs"] == [1]
    t = ABStore(d, "regs", max_bytes=100)
    assert t.load() == {"regs": [100, 7]}
    raises(ValueError, t.save, {"pad": "y" * 200})


def test_failed_save_leaves_the_newest_copy_and_is_retried_on_the_same_slot():
    d, s = _two_saves("persist-fail")
    newest = _get(d + "/regs.b")
    _rm(d + "/regs.a")
    os.mkdir(d + "/regs.a")  # the target slot cannot be opened for writing
    raises(OSError, s.save, {"regs": [300, 9]})
    assert s.seq == 2 and _get(d + "/regs.b") == newest
    raises(OSError, s.save, {"regs": [300, 9]})  # still aims at the same (older) slot
    os.rmdir(d + "/regs.a")
    assert s.save({"regs": [300, 9]}) == 3 and _get(d + "/regs.b") == newest
    assert ABStore(d, "regs").load() == {"regs": [300, 9]}


def test_unserialisable_value_writes_nothing():
    d, s = _two_saves("persist-type")
    a, b = _get(d + "/regs.a"), _get(d + "/regs.b")
    raises(TypeError, s.save, {"x": object()})
    assert _get(d + "/regs.a") == a and _get(d + "/regs.b") == b and s.seq == 2


def test_bad_name():
    raises(ValueError, ABStore, "/tmp", "a/b")
    raises(ValueError, ABStore, "/tmp", "")


def test_policy():
    p = PersistPolicy(every_mwh=100000, every_s=60)
    assert not p.due(0, 10**9)  # nothing accrued: no write, however long
    assert not p.due(99999, 59999)
    assert p.due(100000, 0)
    assert p.due(1, 60000)
    assert not p.due(1, 59999)
    only_time = PersistPolicy(every_mwh=0, every_s=10)
    assert not only_time.due(10**9, 9999) and only_time.due(1, 10000)
    only_energy = PersistPolicy(every_mwh=5, every_s=0)
    assert not only_energy.due(4, 10**9) and only_energy.due(5, 0)
    raises(ValueError, PersistPolicy, 0, 0)
    raises(ValueError, PersistPolicy, -1, 10)


# --- littlefs, as on the ESP32: a RAM block device that loses power mid-save ---------------


class CutBD:
    """A littlefs block device over `data` (a bytearray that outlives reboots). cut_at=n:
    the n-th program/erase from now loses power: a program writes only its first half, an
    erase clears only half the block, and from then on this device is dead (nothing reaches
    the flash; reads give 0xFF), as the chip is for the old filesystem instance. After a
    reboot a new CutBD works on the same data. No allocation in the callbacks: littlefs
    may call them from a finaliser, with the heap locked."""

    def __init__(self, data, bs):
        self.data = data
        self.bs = bs
        self.n = len(data) // bs
        self.ops = 0
        self.cut_at = 0
        self.dead = False

    def _cut(self):
        self.ops += 1
        if self.cut_at and self.ops >= self.cut_at:
            self.dead = True
            return True
        return False

    def readblocks(self, block, buf, off=0):
        a = block * self.bs + off
        data = self.data
        dead = self.dead
        for i in range(len(buf)):
            buf[i] = 0xFF if dead else data[a + i]

    def writeblocks(self, block, buf, off=0):
        if self.dead:
            return
        a = block * self.bs + off
        n = len(buf) // 2 if self._cut() else len(buf)
        data = self.data
        for i in range(n):
            data[a + i] = buf[i]
        if self.dead:
            raise OSError(5)

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return self.bs
        if op == 6:  # erase
            if self.dead:
                return 0
            a = arg * self.bs
            n = self.bs // 2 if self._cut() else self.bs
            data = self.data
            for i in range(n):
                data[a + i] = 0xFF
            if self.dead:
                raise OSError(5)
        return 0


def test_littlefs_power_cut_at_every_flash_operation_of_a_save():
    """MicroPython only (CPython has no littlefs): cut the power at each program/erase a save
    makes, remount as after a reboot, and check load() and later saves."""
    if sys.implementation.name != "micropython":
        return
    import vfs  # type: ignore[import-not-found]

    mnt = "/fwtest_lfs"
    flash = bytearray(b"\xff" * (4096 * 24))  # ESP32 flash blocks are 4 KB
    bd = CutBD(flash, 4096)
    vfs.VfsLfs2.mkfs(bd)
    # the station's shape and size: 16 registers, a few open sessions (about 1 KB: not inline)
    sess = {"bat": "B0012345", "e0": 123456789012, "soc0": 532, "up0": 5025000, "t0": 1764150000123}
    payload = {"boot": 1, "regs": [10**12 + i for i in range(16)], "sessions": {}}
    for i in range(1, 9):
        payload["sessions"][str(i)] = sess

    def mount():
        try:
            vfs.umount(mnt)
        except OSError:
            pass
        dev = CutBD(flash, 4096)
        vfs.mount(vfs.VfsLfs2(dev), mnt)
        return dev

    bd = mount()
    store = ABStore(mnt, "station")
    done = 0
    cuts = 0
    k = 1
    try:
        for _ in range(6):  # a few clean saves, so both slots hold data
            done += 1
            payload["regs"][0] = done * 1000
            store.save(payload)
        while k < 400:
            bd.cut_at = bd.ops + k
            payload["regs"][0] = (done + 1) * 1000
            try:
                store.save(payload)
                finished = True
            except OSError:
                finished = False
                cuts += 1
            bd = mount()  # reboot
            store = ABStore(mnt, "station")
            got = store.load()
            assert got is not None, k
            if finished:
                done += 1
                assert got["regs"][0] == done * 1000, (k, got["regs"][0])
                if k > 2 and cuts:
                    break  # the cut came after the whole save: every point has been tried
            else:
                assert got["regs"][0] in (done * 1000, (done + 1) * 1000), (k, got["regs"][0])
                done = got["regs"][0] // 1000
            k += 1
            # the store keeps working after the cut
            done += 1
            payload["regs"][0] = done * 1000
            store.save(payload)
            assert ABStore(mnt, "station").load()["regs"][0] == done * 1000
        assert cuts >= 3, cuts
        print("littlefs: power cut at %d points of a save" % cuts)
    finally:
        vfs.umount(mnt)
