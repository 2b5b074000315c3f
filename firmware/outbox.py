# Flash outbox: every signed message is appended here before it is sent and removed only
# after its PUBACK (the caller calls ack), so a power cut or a broker outage loses nothing
# that was appended, within the byte bound.
#
# Layout (one directory, littlefs on the board, a folder on the unix port):
#   s<first id>    append-only segment files of records
#                  [magic 0xB5][kind t|e|b][len u16][id u32][crc32 u32][payload], little-endian;
#                  the CRC covers the 8 header bytes before it and the payload
#   ack.a, ack.b   the removal state "head next id1 id2 ...", kept as a persist.ABFile (the
#                  station's one A/B record format: sequence number + CRC, newest valid copy
#                  wins, so a torn write falls back to the older one): every id below head is
#                  gone, and so are the listed ids (acked out of order); next is a floor for
#                  new ids
#   c.tmp          a segment being compacted (renamed over the segment when complete)
#
# Power safety (SIGKILL or power cut at any moment):
#   - an append that returned is durable (its file was closed); a torn append fails its CRC,
#     scanning a segment stops at the first bad record, and the next append starts a new
#     segment, so nothing is ever written after garbage;
#   - an ack that returned is durable; an ack torn mid-write reverts to the previous state,
#     so that one record comes back and is sent again, byte-identical: a duplicate the agent
#     drops by (sid, boot, seq);
#   - compaction writes c.tmp and renames it over the segment (atomic on littlefs and POSIX).
# Ids grow by one per append and continue after a restart above everything on flash and the
# last saved ack state (an id may come again only if nothing on flash refers to it any more:
# a torn append, or records dropped after the last ack).
#
# Bound: segment bytes on flash <= max_bytes. When an append would pass it, the oldest
# segment holding telemetry is compacted without its telemetry (whole segments at a time,
# so compaction runs about once per segment of new data, not per message); events go only
# when no telemetry is left, and then only for a new event or boot record; boot records
# never go. A new telemetry record that cannot fit after that is itself dropped (append
# returns None). A boot record is always stored, even over the bound. Drops are counted in
# `dropped` (since start) and reported once through take_dropped(), for an outbox_drop event
# (a count not yet taken is lost with a restart; the agent still sees the seq gap).
# Edge case: when boot records alone nearly fill the bound, a new event first pushes out the
# older events and may then not fit either (the bound does not know live bytes per kind).
#
# RAM: one byte per record id in the live segments (its kind while pending, 0 once gone),
# a small ack set, one copy buffer. Payloads stay on flash until pending() reads them.
# Flash wear: one append of the message bytes and one small ack write per message; a
# segment is deleted when all its records are gone.
import os
import struct
from binascii import crc32

from persist import ABFile

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef,misc]
        return x


_MAGIC = const(0xB5)
_HDR = const(12)
_FMT = "<BBHII"
_T = const(116)  # ord("t")
_E = const(101)  # ord("e")
_B = const(98)  # ord("b")
_MAX_PAYLOAD = const(65535)
_COPY = const(512)


def _crc(hdr, payload):
    return crc32(payload, crc32(bytes(hdr[:8]))) & 0xFFFFFFFF


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


class _Seg:
    """A segment in RAM: ids first .. first+len(kinds)-1, kinds[i] the kind byte of a
    pending record or 0 once acked/dropped/absent. pos/pos_id: a record offset in the file
    below which every record is gone (where pending() starts reading)."""

    def __init__(self, first):
        self.first = first
        self.kinds = bytearray()
        self.size = 0
        self.live = 0
        self.pos = 0
        self.pos_id = first
        self.closed = False  # torn tail or failed write: never append to it again

    def end(self):
        return self.first + len(self.kinds)


class Outbox:
    """Records (kind, payload bytes) on flash until acked. kind: "t" telemetry, "e" event,
    "b" boot event (never dropped). Not reentrant: call from one task."""

    def __init__(self, root, max_bytes, seg_bytes=None, max_acked=64):
        self.root = root
        self.max_bytes = max_bytes
        if seg_bytes is None:
            seg_bytes = max(1024, min(16384, max_bytes // 8))
        self.seg_bytes = seg_bytes
        self.max_acked = max_acked
        self.dropped = 0  # records dropped because the outbox was full, since start
        self.corrupt = 0  # records found damaged after start (not torn appends), skipped
        self._undropped = 0  # dropped but not yet reported by take_dropped()
        self._hdr = bytearray(_HDR)
        self._buf = bytearray(_COPY)
        self._segs = []  # type: list
        self._acked = set()  # type: set
        self._head = 0
        self._next = 0
        self._live = 0
        self._bytes = 0
        if not _exists(root):
            os.mkdir(root)
        # head, next and at most max_acked + 1 ids of 10 digits at a save
        self._ab = ABFile(root + "/ack", max(4096, 12 * (max_acked + 4)), _parse_ack)
        self._load()

    # ---- public

    def __len__(self):
        return self._live

    @property
    def bytes_used(self):
        """Bytes of segment files on flash (headers and dead records included)."""
        return self._bytes

    def take_dropped(self):
        """Records dropped since the last call (for an outbox_drop event); resets to 0."""
        n = self._undropped
        self._undropped = 0
        return n

    def append(self, kind, payload):
        """Store payload durably; return its id, or None when it was dropped for lack of
        room (a "t" or "e" record when only boot records are left)."""
        k = _kind(kind)
        n = len(payload)
        if n > _MAX_PAYLOAD:
            raise ValueError("payload of %d bytes is too long" % n)
        need = _HDR + n
        if self._bytes + need > self.max_bytes and not self._make_room(need, k):
            self._count_drop(1)
            return None
        seg = self._segs[-1] if self._segs else None
        if seg is None or seg.closed or seg.size >= self.seg_bytes or seg.end() != self._next:
            seg = _Seg(self._next)
            self._segs.append(seg)
        rid = self._next
        h = self._hdr
        struct.pack_into(_FMT, h, 0, _MAGIC, k, n, rid, 0)
        struct.pack_into("<I", h, 8, _crc(h, payload))
        try:
            with open(self._path(seg), "ab") as f:
                f.write(h)
                f.write(payload)
        except OSError:
            # a partial record may be there: never append to this file again
            if seg.kinds:
                seg.closed = True
                self._resize(seg)
            else:  # a segment this append created: its name is reused by the next one
                _remove(self._path(seg))
                self._segs.pop()
            raise
        seg.kinds.append(k)
        seg.size += need
        seg.live += 1
        self._live += 1
        self._bytes += need
        self._next = rid + 1
        return rid

    def pending(self, limit=8, after=-1):
        """Up to limit pending records with an id above `after`, oldest first: a list of
        (id, kind, payload). Reads the payloads from flash on each call (those at or below
        `after`, already in flight, are skipped unread); kind "t" goes to the telemetry
        topic, "e" and "b" to the event topic."""
        out = []  # type: list
        for seg in self._segs:
            if len(out) >= limit:
                break
            if seg.live and seg.end() - 1 > after:
                self._read(seg, limit, out, after)
        return out

    def ack(self, rid):
        """Remove record rid (after its PUBACK). True if it was pending; an unknown, already
        acked or dropped id is a no-op (a late PUBACK)."""
        seg = self._seg_of(rid)
        if seg is None or not seg.kinds[rid - seg.first]:
            return False
        self._kill(seg, rid)
        if rid == self._head:
            self._advance()
        else:
            self._acked.add(rid)
        self._save()
        self._tidy()
        while len(self._acked) > self.max_acked:
            # out-of-order acks pile up: make them physical so the ack state stays small
            x = min(self._acked)
            seg = self._seg_of(x)
            if seg is None:
                self._acked.discard(x)
            else:
                self._compact(seg, 0)
        return True

    # ---- internals

    def _path(self, seg):
        return "%s/s%d" % (self.root, seg.first)

    def _seg_of(self, rid):
        for seg in self._segs:
            if seg.first <= rid < seg.end():
                return seg
        return None

    def _kill(self, seg, rid):
        seg.kinds[rid - seg.first] = 0
        seg.live -= 1
        self._live -= 1

    def _count_drop(self, n):
        self.dropped += n
        self._undropped += n

    def _advance(self):
        """head := the lowest pending id (or the next id when nothing is pending)."""
        for seg in self._segs:
            if seg.live:
                kinds = seg.kinds
                for i in range(len(kinds)):
                    if kinds[i]:
                        self._head = seg.first + i
                        break
                break
        else:
            self._head = self._next
        self._acked = {x for x in self._acked if x > self._head}

    def _tidy(self):
        """Delete segments with nothing pending and forget their acked ids."""
        keep = []
        for seg in self._segs:
            if seg.live:
                keep.append(seg)
                continue
            _remove(self._path(seg))
            self._bytes -= seg.size
            self._prune(seg)
        self._segs = keep

    def _prune(self, seg):
        a, b = seg.first, seg.end()
        self._acked = {x for x in self._acked if not a <= x < b}

    def _save(self):
        ids = sorted(self._acked)
        parts = [b"%d" % self._head, b"%d" % self._next]
        for x in ids:
            parts.append(b"%d" % x)
        self._ab.save(b" ".join(parts))

    def _resize(self, seg):
        try:
            size = os.stat(self._path(seg))[6]
        except OSError:
            size = 0
        self._bytes += size - seg.size
        seg.size = size

    def _make_room(self, need, k):
        """Drop oldest telemetry (then events, for an e/b record) until need fits."""
        while self._bytes + need > self.max_bytes:
            if self._drop_oldest(_T):
                continue
            if k != _T and self._drop_oldest(_E):
                continue
            return k == _B  # a boot record is stored over the bound
        return True

    def _drop_oldest(self, k):
        for seg in self._segs:
            if seg.live and seg.kinds.find(bytes((k,))) >= 0:
                self._compact(seg, k)
                return True
        return False

    def _compact(self, seg, drop):
        """Rewrite seg with its pending records only, less those of kind drop (0: none)."""
        kinds = seg.kinds
        n = 0
        for i in range(len(kinds)):
            if kinds[i] and kinds[i] == drop:
                kinds[i] = 0
                n += 1
        seg.live -= n
        self._live -= n
        self._count_drop(n)
        if seg.live == 0:
            self._tidy()
            self._advance()
            return
        tmp = self.root + "/c.tmp"
        size = 0
        h = self._hdr
        mv = memoryview(self._buf)
        with open(self._path(seg), "rb") as src, open(tmp, "wb") as dst:
            src.seek(seg.pos)
            while True:
                if src.readinto(h) != _HDR:
                    break
                magic, _, ln, rid, _ = struct.unpack_from(_FMT, h, 0)
                if magic != _MAGIC or not seg.first <= rid < seg.end():
                    break
                if kinds[rid - seg.first]:
                    dst.write(h)
                    left = ln
                    while left:
                        got = src.readinto(mv[: min(left, _COPY)])
                        if not got:
                            break
                        dst.write(mv[:got])
                        left -= got
                    size += _HDR + ln
                else:
                    src.seek(ln, 1)
        os.rename(tmp, self._path(seg))
        self._bytes += size - seg.size
        seg.size = size
        seg.pos = 0
        seg.pos_id = seg.first
        seg.closed = False
        self._prune(seg)
        # The persisted ack state may still name ids that are now physically gone: harmless
        # (ids stay above them after a restart), and rewritten with the next ack.
        self._advance()

    def _read(self, seg, limit, out, after=-1):
        kinds = seg.kinds
        h = self._hdr
        last = seg.pos_id - 1  # the last record id framed in this pass
        with open(self._path(seg), "rb") as f:
            f.seek(seg.pos)
            pos = seg.pos
            lead = True  # still in the run of gone records at the start
            while len(out) < limit and seg.live:
                if f.readinto(h) != _HDR:
                    break
                magic, kind, ln, rid, crc = struct.unpack_from(_FMT, h, 0)
                if magic != _MAGIC or not last < rid < seg.end():
                    # damaged flash (a torn append was cut off at load): nothing after
                    # this point can be framed any more
                    for i in range(last + 1 - seg.first, len(kinds)):
                        if kinds[i]:
                            self.corrupt += 1
                            self._kill(seg, seg.first + i)
                    break
                last = rid
                nxt = pos + _HDR + ln
                if kinds[rid - seg.first] and lead:
                    seg.pos, seg.pos_id = pos, rid
                    lead = False
                if kinds[rid - seg.first] and rid > after:
                    payload = f.read(ln)
                    if len(payload) == ln and _crc(h, payload) == crc:
                        out.append((rid, chr(kind), payload))
                    else:
                        self.corrupt += 1
                        self._kill(seg, rid)
                else:
                    f.seek(ln, 1)
                pos = nxt

    def _load(self):
        ids = self._ab.load()
        if ids:
            self._head = ids[0]
            self._next = ids[1]
            self._acked = set(ids[2:])
        firsts = []
        for name in os.listdir(self.root):
            if name.endswith(".tmp"):
                _remove(self.root + "/" + name)
            elif name[:1] == "s" and name[1:].isdigit():
                firsts.append(int(name[1:]))
        firsts.sort()
        last = -1
        for j in range(len(firsts)):
            limit = firsts[j + 1] if j + 1 < len(firsts) else None
            seg = _Seg(firsts[j])
            self._scan(seg, limit)
            self._segs.append(seg)
            self._bytes += seg.size
            if seg.kinds:
                last = seg.end() - 1
        top = max(self._acked) if self._acked else -1
        self._next = max(self._next, self._head, top + 1, last + 1)
        present = set()
        for seg in self._segs:
            for x in self._acked:
                if seg.first <= x < seg.end():
                    present.add(x)
        self._acked = present
        self._advance()
        self._tidy()

    def _scan(self, seg, limit):
        """Build seg's index from its file, checking every CRC; stop at the first bad record."""
        h = self._hdr
        kinds = seg.kinds
        pos = 0
        prev = seg.first - 1
        with open(self._path(seg), "rb") as f:
            while True:
                if f.readinto(h) != _HDR:
                    break
                magic, kind, ln, rid, crc = struct.unpack_from(_FMT, h, 0)
                if (
                    magic != _MAGIC
                    or kind not in (_T, _E, _B)
                    or rid <= prev
                    or (limit is not None and rid >= limit)
                    or rid - seg.first > 1000000
                ):
                    break
                payload = f.read(ln)
                if len(payload) != ln or _crc(h, payload) != crc:
                    break
                while len(kinds) < rid - seg.first:
                    kinds.append(0)
                live = rid >= self._head and rid not in self._acked
                kinds.append(kind if live else 0)
                if live:
                    seg.live += 1
                    self._live += 1
                prev = rid
                pos += _HDR + ln
        seg.size = os.stat(self._path(seg))[6]  # torn tail included
        seg.closed = seg.size != pos


def _parse_ack(data):
    """The ack state's bytes -> [head, next, acked ids...]; ValueError when not one."""
    ids = [int(x) for x in data.split(b" ")]
    if len(ids) < 2:
        raise ValueError("ack state needs head and next")
    return ids


def _kind(kind):
    if kind == "t":
        return _T
    if kind == "e":
        return _E
    if kind == "b":
        return _B
    raise ValueError("outbox kind must be t, e or b, not %r" % (kind,))
