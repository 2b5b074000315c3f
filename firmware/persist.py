# Power-safe persistence in two slot files, A/B: a power cut during a save can only damage
# the slot being written, which never holds the newest valid copy; load() takes the newest
# valid slot and ignores torn, truncated, corrupt, oversized or empty files.
#
# Slot file <root>/<name>.a or .b, all ASCII:
#     AB1 <seq>\n<payload JSON>\n<crc32 of everything before this line, 8 lowercase hex>\n
# seq is an unbounded int, +1 per save; so are the payload's ints (MicroPython's JSON reads
# and writes long ints on ports with long-int support, the ESP32's included).
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


def crc32(data):
    """CRC-32 (IEEE, as zlib/binascii), unsigned."""
    if _crc32 is not None:
        return _crc32(data) & 0xFFFFFFFF
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0xEDB88320 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def _dumps(obj):
    try:
        s = json.dumps(obj, separators=(",", ":"))
    except TypeError:  # CPython: not serialisable (or an old port without separators)
        s = json.dumps(obj)
    try:  # MicroPython writes what JSON cannot hold as "<object>": refuse it before writing
        json.loads(s)
    except ValueError:
        raise TypeError("not JSON-serialisable")
    return s


def encode(seq, obj):
    """The bytes of one slot file."""
    body = _MAGIC + str(seq).encode() + b"\n" + _dumps(obj).encode()
    return body + b"\n" + ("%08x" % crc32(body)).encode() + b"\n"


def decode(data):
    """(seq, obj) from a slot file's bytes, or None when they are not one intact slot."""
    n = len(data)
    if n < 16 or data[n - 1] != 0x0A or data[n - 10] != 0x0A:
        return None
    crc = 0
    for b in data[n - 9 : n - 1]:
        if 0x30 <= b <= 0x39:
            crc = crc * 16 + b - 0x30
        elif 0x61 <= b <= 0x66:
            crc = crc * 16 + b - 0x57
        else:
            return None
    body = data[: n - 10]
    if crc32(body) != crc or body[:4] != _MAGIC:
        return None
    nl = body.find(b"\n")
    digits = body[4:nl]
    if nl < 5 or not digits.isdigit():
        return None
    try:
        return int(digits), json.loads(body[nl + 1 :])
    except (ValueError, TypeError, IndexError):
        return None


class ABStore:
    """A JSON value kept power-safe in <root>/<name>.a and <root>/<name>.b.

    load() returns the newest valid copy (None when neither slot is valid) and sets seq.
    save(obj) writes the other slot with seq + 1; it never touches the slot holding the
    newest valid copy. A failed save raises OSError and leaves that copy the newest."""

    def __init__(self, root, name, max_bytes=16384):
        if not name or "/" in name:
            raise ValueError("bad store name")
        self.paths = (root + "/" + name + _SUFFIX[0], root + "/" + name + _SUFFIX[1])
        self.max_bytes = max_bytes
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

    def load(self):
        best = None
        besti = -1
        for i in (0, 1):
            data = self._raw(i)
            r = None if data is None else decode(data)
            if r is not None and (best is None or r[0] > best[0]):
                best = r
                besti = i
        self._loaded = True
        if best is None:
            self.seq = 0
            self._newest = -1
            return None
        self.seq = best[0]
        self._newest = besti
        return best[1]

    def save(self, obj):
        """Write obj as the newest copy; returns its seq."""
        if not self._loaded:
            self.load()
        seq = self.seq + 1
        data = encode(seq, obj)  # raises TypeError for what JSON cannot hold, before any write
        if len(data) > self.max_bytes:
            raise ValueError("store %s: %d bytes > max_bytes" % (self.paths[0], len(data)))
        i = 1 if self._newest == 0 else 0
        with open(self.paths[i], "wb") as f:
            n = f.write(data)
            if n is not None and n != len(data):
                raise OSError(28)  # ENOSPC: a short write
            f.flush()
        if hasattr(os, "sync"):
            os.sync()  # type: ignore[attr-defined]
        if self._raw(i) != data:
            raise OSError(5, "store: slot did not read back")  # EIO; the old copy stays newest
        self.seq = seq
        self._newest = i
        return seq


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
