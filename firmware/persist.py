# Power-safe persistence: the station's one A/B record format, and when to save.
#
# Every small state the station keeps across power cuts lives in two slot files, A/B:
# <path>.a and <path>.b. A power cut during a save can only damage the slot being written,
# which never holds the newest valid copy; load() takes the newest valid slot and ignores
# torn, truncated, corrupt, oversized or empty files. Users: the registers and boot counter
# (ABStore "state", JSON), the outbox's ack state (outbox.py, "ack") and the command nonce
# ring (commands.py, "nonce").
#
# Slot file, one format for all of them:
#     AB1 <seq>\n<data>\n<crc32 of everything before this line, 8 lowercase hex>\n
# seq is an unbounded decimal int, +1 per save; data is any bytes (newlines included: the
# trailer has a fixed length, so it is found from the end). ABStore's data is compact JSON,
# whose ints are unbounded too (MicroPython's JSON reads and writes long ints on ports with
# long-int support, the ESP32's included).
#
# Before this format was shared, the outbox and the nonce ring wrote "<crc32 hex> <seq>\n" +
# data (the CRC over the seq digits and data). load() still reads that older format, so a
# station keeps its ack state and nonces across the update; the next save writes this one.
#
# Durability: each save writes the file, flushes and closes it, calls os.sync() where the
# port has one (the ESP32's does; the unix port has neither sync nor fsync: closing hands
# the bytes to the kernel, which a killed process cannot take back), then reads the file
# back and checks it before counting it as the newest. littlefs (the ESP32's filesystem) is
# copy-on-write and commits a file at close, so a cut mid-save leaves that slot either
# as it was or as written; a plain filesystem may leave it torn. Both are covered.
# See docs/persistence.md for the write policy and the flash-wear budget.
import json
import os

try:
    from binascii import crc32 as _crc32
except ImportError:  # a port built without it
    _crc32 = None  # type: ignore[assignment]

_MAGIC = b"AB1 "
_SUFFIX = (".a", ".b")


def crc32(data, crc=0):
    """CRC-32 (IEEE, as zlib/binascii), unsigned; crc: the CRC of the bytes before data."""
    if _crc32 is not None:
        return _crc32(data, crc) & 0xFFFFFFFF
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0xEDB88320 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def pack(seq, data):
    """The bytes of one slot file holding data (bytes) as copy number seq."""
    head = b"AB1 %d\n" % seq
    return b"".join((head, data, b"\n%08x\n" % crc32(data, crc32(head))))


def _hex8(b):
    """8 lowercase hex digits -> int, else -1."""
    if len(b) != 8:
        return -1
    v = 0
    for c in b:
        if 0x30 <= c <= 0x39:
            v = v * 16 + c - 0x30
        elif 0x61 <= c <= 0x66:
            v = v * 16 + c - 0x57
        else:
            return -1
    return v


def unpack(raw):
    """(seq, data) from a slot file's bytes, or None when they are not one intact slot."""
    n = len(raw)
    if n < 16 or raw[n - 1] != 0x0A or raw[n - 10] != 0x0A:
        return None
    crc = _hex8(raw[n - 9 : n - 1])
    body = raw[: n - 10]
    if crc < 0 or body[:4] != _MAGIC or crc32(body) != crc:
        return None
    nl = body.find(b"\n")
    digits = body[4:nl]
    if nl < 5 or not digits.isdigit():
        return None
    return int(digits), body[nl + 1 :]


def unpack_v0(raw):
    """(seq, data) from a slot file in the outbox's former format, "<crc32, 8 lowercase hex>
    <seq>\\n" + data, the CRC over the seq digits and data; None when it is not one."""
    nl = raw.find(b"\n")
    if nl < 10 or raw[8] != 0x20:
        return None
    crc = _hex8(raw[:8])
    digits = raw[9:nl]
    if crc < 0 or not digits.isdigit():
        return None
    data = raw[nl + 1 :]
    if crc32(data, crc32(digits)) != crc:
        return None
    return int(digits), data


class ABFile:
    """Bytes kept power-safe in <path>.a and <path>.b.

    load() returns the newest valid copy (None when neither slot holds one) and sets seq.
    parse, when given, turns a copy's bytes into the value load() returns; a copy it rejects
    (ValueError, TypeError, KeyError, IndexError) counts as invalid, like a bad CRC.
    save(data) writes the other slot with seq + 1; it never touches the slot holding the
    newest valid copy. A failed save raises OSError (ValueError when the slot file would be
    over max_bytes) and leaves that copy the newest; the next save aims at the same slot."""

    def __init__(self, path, max_bytes=4096, parse=None):
        self.paths = (path + _SUFFIX[0], path + _SUFFIX[1])
        self.max_bytes = max_bytes
        self.parse = parse
        self.seq = 0  # sequence number of the newest valid copy, 0 when there is none
        self._newest = -1  # index of the slot holding it, -1 when none
        self._loaded = False

    def _raw(self, i):
        # size first: read(max_bytes + 1) would ask a ~100 KB heap for a block that large
        try:
            size = os.stat(self.paths[i])[6]
            if size > self.max_bytes:
                return None
            with open(self.paths[i], "rb") as f:
                data = f.read(size)
        except OSError:  # missing (or not a file)
            return None
        return data

    def _slot(self, i):
        raw = self._raw(i)
        if raw is None:
            return None
        return unpack(raw) or unpack_v0(raw)

    def load(self):
        a = self._slot(0)
        b = self._slot(1)
        order = (
            ((1, b), (0, a)) if b is not None and (a is None or b[0] > a[0]) else ((0, a), (1, b))
        )
        self._loaded = True
        for i, r in order:
            if r is None:
                continue
            value = r[1]
            if self.parse is not None:
                try:
                    value = self.parse(value)
                except (ValueError, TypeError, KeyError, IndexError):
                    continue
            self.seq = r[0]
            self._newest = i
            return value
        self.seq = 0
        self._newest = -1
        return None

    def save(self, data):
        """Write data (bytes) as the newest copy; returns its seq."""
        if not self._loaded:
            self.load()
        seq = self.seq + 1
        rec = pack(seq, data)
        if len(rec) > self.max_bytes:
            raise ValueError("%s: %d bytes > max_bytes" % (self.paths[0], len(rec)))
        i = 1 if self._newest == 0 else 0
        with open(self.paths[i], "wb") as f:
            n = f.write(rec)
            if n is not None and n != len(rec):
                raise OSError(28)  # ENOSPC: a short write
            f.flush()
        if hasattr(os, "sync"):
            os.sync()  # type: ignore[attr-defined]
        if self._raw(i) != rec:
            raise OSError(5, "A/B slot did not read back")  # EIO; the old copy stays newest
        self.seq = seq
        self._newest = i
        return seq


def _dumps(obj):
    try:
        s = json.dumps(obj, separators=(",", ":"))
    except TypeError:  # CPython: not serialisable (or an old port without separators)
        s = json.dumps(obj)
    try:  # MicroPython writes what JSON cannot hold as "<object>": refuse it before writing
        json.loads(s)
    except ValueError:
        raise TypeError("not JSON-serialisable")
    return s.encode()


def encode(seq, obj):
    """The bytes of one ABStore slot file: obj as compact JSON."""
    return pack(seq, _dumps(obj))


def decode(raw):
    """(seq, obj) from an ABStore slot file's bytes, or None when they are not one intact
    slot holding JSON."""
    r = unpack(raw)
    if r is None:
        return None
    try:
        return r[0], json.loads(r[1])
    except (ValueError, TypeError, IndexError):
        return None


class ABStore:
    """A JSON value kept power-safe in <root>/<name>.a and <root>/<name>.b: an ABFile whose
    data is compact JSON. load() returns the newest valid value (None when there is none)
    and sets seq; save(obj) writes it as the next copy and returns its seq (TypeError, before
    any write, for what JSON cannot hold)."""

    def __init__(self, root, name, max_bytes=16384):
        if not name or "/" in name:
            raise ValueError("bad store name")
        self.file = ABFile(root + "/" + name, max_bytes, json.loads)
        self.paths = self.file.paths

    @property
    def seq(self):
        return self.file.seq

    def load(self):
        return self.file.load()

    def save(self, obj):
        return self.file.save(_dumps(obj))


class PersistPolicy:
    """When to save the registers: after every_mwh of energy across all slots since the last
    save, or every_s seconds when any energy has accrued (an unchanged register needs no
    write: flash wear). 0 disables a criterion. Callers also save, without asking: at boot
    (the boot counter), when a session opens or closes, before a deliberate reboot."""

    def __init__(self, every_mwh=100000, every_s=60):
        if every_mwh < 0 or every_s < 0 or (every_mwh == 0 and every_s == 0):
            raise ValueError("every_mwh and every_s must be >= 0, not both 0")
        self.every_mwh = every_mwh
        self.every_ms = every_s * 1000

    def due(self, total_mwh_since_save, ms_since_save):
        if total_mwh_since_save <= 0:
            return False
        if self.every_mwh and total_mwh_since_save >= self.every_mwh:
            return True
        return bool(self.every_ms) and ms_since_save >= self.every_ms
