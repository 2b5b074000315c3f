"""One segment file: a station's raw rows of one month, sealed.

Layout (format `raw-zstd-1`): one zstd frame (with its content checksum) holding a
sequence of length-prefixed msgpack objects, each a 4-byte big-endian length and then:

- a header map: `{"format": "raw-zstd-1", "sid": …, "month": "YYYY-MM", "part": n}`;
- one array per raw row, in strictly increasing (boot, seq) order, every column as the
  `raw` table stores it: `[sid, boot, seq, kind, topic, recv_ms, kid, record]` (record:
  the exact signed bytes received);
- a trailer map: `{"end": true, "rows": n}` (a truncated file is an error even without
  its manifest).

The file's name holds the station, the month, the part and the sha256 of the whole
(compressed) file: `<sid>/<sid>.<YYYY-MM>.p<part>.<sha256>.rawz`. A file alone is
readable and checkable ten years on with zstd and any msgpack decoder.

Memory is bounded both ways: the writer streams rows into the compressor, the reader
decompresses in chunks and yields rows one at a time.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgspec
import zstandard

from agent.store import RawRow

FORMAT: Final = "raw-zstd-1"
SUFFIX: Final = ".rawz"
TMP_SUFFIX: Final = ".tmp"
# bench/bench_archive.py: level 1 is within ~4 % of 9's size (smaller on smooth data) at
# twice its speed; 19 is ~25 % smaller but ~50x slower (a station-month: ~15 min, not ~10 s)
DEFAULT_LEVEL: Final = 1
_LEN: Final = struct.Struct(">I")
_CHUNK: Final = 1 << 18


class ArchiveError(Exception):
    """A segment that is missing, altered or unreadable (the message names the file)."""


class Range(NamedTuple):
    boot: int
    seq_lo: int
    seq_hi: int


class Sealed(NamedTuple):
    """A segment file written, fsynced and renamed into place."""

    path: Path
    rel: str  # path relative to the archive directory (what the manifest stores)
    sha256: str
    n_rows: int
    n_bytes: int  # the compressed file
    raw_bytes: int  # the framed rows before compression
    ranges: list[Range]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def segment_name(sid: str, month: str, part: int, sha: str) -> str:
    return f"{sid}/{sid}.{month}.p{part}.{sha}{SUFFIX}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """The file under the compressor: every byte written is hashed on the way."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        self.h.update(mv)
        self.n += mv.nbytes
        self.f.write(mv)
        return mv.nbytes

    def flush(self) -> None:
        self.f.flush()


class SegmentWriter:
    """Write one segment: `add()` each row in key order, then `finish()` (or `abort()`)."""

    def __init__(
        self, directory: Path, sid: str, month: str, part: int, level: int = DEFAULT_LEVEL
    ) -> None:
        self.directory = directory
        self.sid, self.month, self.part = sid, month, part
        (directory / sid).mkdir(parents=True, exist_ok=True)
        self.tmp = directory / sid / f".{sid}.{month}.p{part}.{uuid.uuid4().hex}{TMP_SUFFIX}"
        self._f = open(self.tmp, "xb")  # closed in finish() or abort()
        self._hf = _HashingFile(self._f)
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._z = cctx.stream_writer(self._hf, closefd=False)  # type: ignore[arg-type]
        self.n_rows = 0
        self.raw_bytes = 0
        self.ranges: list[Range] = []
        self._last: tuple[int, int] | None = None
        self._frame({"format": FORMAT, "sid": sid, "month": month, "part": part})

    def _frame(self, obj: Any) -> None:
        b = msgspec.msgpack.encode(obj)
        self._z.write(_LEN.pack(len(b)))
        self._z.write(b)
        self.raw_bytes += 4 + len(b)

    def add(self, row: RawRow) -> None:
        if row.sid != self.sid:
            raise ValueError(f"row of {row.sid} in a segment of {self.sid}")
        key = (row.boot, row.seq)
        if self._last is not None and key <= self._last:
            raise ValueError(f"rows out of key order: {key} after {self._last}")
        self._frame(tuple(row))
        last = self.ranges[-1] if self.ranges else None
        if last is not None and last.boot == row.boot and last.seq_hi + 1 == row.seq:
            self.ranges[-1] = Range(row.boot, last.seq_lo, row.seq)
        else:
            self.ranges.append(Range(row.boot, row.seq, row.seq))
        self._last = key
        self.n_rows += 1

    def finish(self) -> Sealed:
        """Trailer, end of frame, fsync, rename to its hashed name, fsync the directory."""
        self._frame({"end": True, "rows": self.n_rows})
        self._z.flush(zstandard.FLUSH_FRAME)
        self._z.close()  # type: ignore[no-untyped-call]
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        sha = self._hf.h.hexdigest()
        rel = segment_name(self.sid, self.month, self.part, sha)
        final = self.directory / rel
        os.replace(self.tmp, final)
        fsync_dir(final.parent)
        fsync_dir(self.directory)  # the station's directory entry, when it was new
        return Sealed(final, rel, sha, self.n_rows, self._hf.n, self.raw_bytes, self.ranges)

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _frames(path: Path, f: Any) -> Iterator[Any]:
    """The decoded msgpack objects of an open segment, one at a time."""
    reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=False)
    buf = bytearray()
    pos = 0
    eof = False
    while True:
        if len(buf) - pos < 4 or len(buf) - pos < 4 + _LEN.unpack_from(buf, pos)[0]:
            if eof:
                if pos != len(buf):
                    raise ArchiveError(f"segment {path}: truncated (a partial frame at the end)")
                return
            del buf[:pos]
            pos = 0
            chunk = reader.read(_CHUNK)
            if not chunk:
                eof = True
            buf += chunk
            continue
        (n,) = _LEN.unpack_from(buf, pos)
        obj = msgspec.msgpack.decode(bytes(buf[pos + 4 : pos + 4 + n]))
        pos += 4 + n
        yield obj


def read_segment(
    path: Path,
    *,
    sha256: str | None = None,
    n_rows: int | None = None,
    sid: str | None = None,
    check_hash: bool = True,
) -> Iterator[RawRow]:
    """The rows of a segment file in key order, streamed. With `check_hash` the whole file
    is hashed first (before any row is yielded) against `sha256` (the manifest's) and the
    hash in its name; the trailer's row count is checked against `n_rows` at the end.
    Anything wrong raises ArchiveError naming the file."""
    if not path.exists():
        raise ArchiveError(f"segment {path}: missing")
    if check_hash:
        got = file_sha256(path)
        want = sha256 or name_hash(path)
        if got != want or (name_hash(path) not in (None, got)):
            raise ArchiveError(f"segment {path}: sha256 {got} is not the sealed {want}")
    n = 0
    last: tuple[int, int] | None = None
    try:
        with open(path, "rb") as f:
            frames = _frames(path, f)
            head = next(frames, None)
            if not isinstance(head, dict) or head.get("format") != FORMAT:
                raise ArchiveError(f"segment {path}: not a {FORMAT} segment")
            if sid is not None and head.get("sid") != sid:
                raise ArchiveError(f"segment {path}: holds {head.get('sid')}, not {sid}")
            for obj in frames:
                if isinstance(obj, dict):
                    if obj.get("end") is not True or obj.get("rows") != n:
                        raise ArchiveError(f"segment {path}: trailer {obj} after {n} rows")
                    if next(frames, None) is not None:
                        raise ArchiveError(f"segment {path}: data after the trailer")
                    if n_rows is not None and n != n_rows:
                        raise ArchiveError(f"segment {path}: {n} rows, the manifest says {n_rows}")
                    return
                row = RawRow(*obj)
                key = (row.boot, row.seq)
                if row.sid != head["sid"] or (last is not None and key <= last):
                    raise ArchiveError(f"segment {path}: row {row.sid} {key} out of place")
                last = key
                n += 1
                yield row
    except zstandard.ZstdError as e:
        raise ArchiveError(f"segment {path}: does not decompress ({e})") from None
    except (msgspec.DecodeError, TypeError, struct.error) as e:
        raise ArchiveError(f"segment {path}: undecodable ({e})") from None
    raise ArchiveError(f"segment {path}: truncated (no trailer after {n} rows)")


def name_hash(path: Path) -> str | None:
    """The sha256 a segment's file name holds (None for another name)."""
    parts = path.name.split(".")
    if len(parts) >= 3 and path.name.endswith(SUFFIX) and len(parts[-2]) == 64:
        return parts[-2]
    return None
