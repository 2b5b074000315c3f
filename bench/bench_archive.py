"""The raw archive (agent/archive/): bytes per message live in SQLite vs sealed, by zstd
level; seal and read throughput; and whether a zstd dictionary pays.

One 8-slot station sends a signed telemetry message every 10 s for DAYS days (default 1,
~8.6k messages; `--days 31` is a full month, ~268k, and takes minutes at level 19). Two
message shapes: `plain`, the tests' Station telemetry (registers climbing, readings
constant: ~800 bytes, the shape of bench_ingest's 8-slot figure) and `noisy`, seven slots
with a battery object and every reading jittering as real sensors do (~1.7 KB: what
compresses worst). Everything is received in one month and sealed with the real `seal()`
at each level, each from a fresh copy of the database.

Prints, per shape:
1. live: bytes per message of the raw table and its key index in SQLite (dbstat);
2. per level: archived bytes per message, seal throughput (messages/s, MB/s of framed
   rows: reading SQLite, compressing, fsync, reading back, the delete transaction), read
   throughput of the merged reader over the sealed month (hash + decompress + decode),
   and the live table's own read throughput for comparison;
3. dictionary: a zstd dictionary trained on the first half of the month's framed rows,
   used on the second half, against no dictionary, at each level: as one stream (how a
   segment is written) and message by message (what a dictionary is for: small inputs).

No assertions: figures only. On the 2-core development machine (Dec 2026):

    live in SQLite: plain 1,053 B/msg, noisy 2,080 B/msg (raw table + key index)
    archived, B/msg    level 1   3     9     19
      plain              65     76    78    60
      noisy             225    247   216   166
    seal, noisy: level 1 ~30-36k msg/s, 9 ~12-20k, 19 ~300-500 (0.5-0.8 MB/s: a
      station-month of 268k messages takes ~15 min at 19, ~10 s at 1, ~22 s at 9)
    read (merged reader, hash + decompress + decode): ~150-400k msg/s at any level
    a full noisy month (--days 31): seal at 9 peaks at 52 MB RSS, at 1 at 36 MB; reading
      it back 28 MB; the delete transaction holds SQLite's write lock ~3 s
    dictionary (trained on the first half of a month): as one stream, -1 % .. +13 %:
      it does not pay; message by message it halves the size (565 -> 300 B), but that is
      still worse than any stream, so segments are streams and carry no dictionary.

    .venv/bin/python bench/bench_archive.py [--days 2] [--levels 1,3,9,19] [--shape both]
"""

from __future__ import annotations

import argparse
import pathlib
import random
import shutil
import struct
import sys
import tempfile
import time
from typing import Any, cast

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec
import zstandard

from agent.archive import ArchiveReader, seal, segments
from agent.archive.seal import month_start_ms
from agent.store import RawRow, Store
from tests.agent_helpers import Station, signed

SID = "KH-BEN-0001"
STEP_MS = 10_000
RECV0 = month_start_ms("2025-10")  # received from 1 October 2025 (31 days: one segment)
NOW = month_start_ms("2026-01") + 8 * 86_400_000  # October .. December closed


def noisy_telemetry(st: Station, rnd: random.Random) -> bytes:
    """8 slots: 5 charging, 2 full (with batteries), 1 empty; readings jitter."""
    m = st.common()
    m["meter"] = {"e_wh": st.e_wh, "p_w": 7500 + rnd.randint(-300, 300), "sn": 12345678}
    slots = []
    for i in range(8):
        state = "C" if i < 5 else ("F" if i < 7 else "I")
        s: dict[str, Any] = {
            "n": i + 1,
            "st": state,
            "mv": 67_000 + rnd.randint(-400, 400) if i < 7 else 0,
            "ma": 15_000 + rnd.randint(-300, 300) if i < 5 else 0,
            "e_mwh": st.e_mwh[i],
            "b_mwh": st.b_mwh[i],
        }
        if i < 7:
            s["bat"] = {
                "id": f"B{1000 * i + st.boot:07d}",
                "soc": min(1000, 200 + st.seq // 40 % 800 + rnd.randint(0, 3)),
                "soh": 981,
                "mv": 67_000 + rnd.randint(-400, 400),
                "ma": 15_000 + rnd.randint(-300, 300) if i < 5 else 0,
                "t": 300 + rnd.randint(-8, 8),
                "tmin": 290 + rnd.randint(-8, 8),
                "cyc": 412 + i,
                "flt": 0,
                "life_wh": 402_113 + st.e_mwh[i] // 1000,
            }
        slots.append(s)
    m["slots"] = slots
    m["err"] = {
        "mb_to": st.seq // 5000,
        "mb_crc": 0,
        "mb_exc": 0,
        "mb_addr": 0,
        "ser_cs": st.seq // 9000,
        "ser_to": 0,
        "ser_bad": 0,
    }
    return signed(m, st.key)


def make_rows(n: int, shape: str) -> list[RawRow]:
    st = Station(SID, slots=8)
    rnd = random.Random(1)
    rows = []
    topic = st.topic("telemetry")
    for i in range(n):
        st.advance(STEP_MS, 1200 if shape == "plain" else 1200 + rnd.randint(-50, 50))
        seq = st.seq
        if shape == "plain":
            payload = st.telemetry()[1]
        else:
            payload = noisy_telemetry(st, rnd)
        rows.append(
            RawRow(SID, st.boot, seq, "telemetry", topic, RECV0 + i * STEP_MS + i % 7, 1, payload)
        )
    return rows


def live_bytes(path: pathlib.Path) -> int:
    """Bytes the raw table and its (sid, boot, seq) index take in the database file."""
    import sqlite3

    db = sqlite3.connect(path)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'raw'")]
        marks = ", ".join("?" * len(names))
        row = db.execute(f"SELECT SUM(pgsize) FROM dbstat WHERE name IN ({marks})", names)
        return int(row.fetchone()[0])
    finally:
        db.close()


def frames(rows: list[RawRow]) -> list[bytes]:
    out = []
    for r in rows:
        b = msgspec.msgpack.encode(tuple(r))
        out.append(struct.pack(">I", len(b)) + b)
    return out


def dictionary(rows: list[RawRow], levels: list[int]) -> None:
    fr = frames(rows)
    half = len(fr) // 2
    train, test = fr[:half], fr[half:]
    blob = b"".join(test)
    n = len(test)
    t = time.perf_counter()
    d = zstandard.train_dictionary(112_640, cast(Any, train))
    t_train = time.perf_counter() - t
    print(
        f"  dictionary: {len(d.as_bytes()):,} bytes trained on {half:,} messages in "
        f"{t_train:.1f} s; used on the next {n:,}"
    )
    print("    level  stream B/msg (dict)  per-message B/msg (dict)  stream MB/s (dict)")
    for level in levels:
        got: dict[bool, tuple[float, float, float]] = {}
        for use in (False, True):
            c = zstandard.ZstdCompressor(level=level, dict_data=d if use else None)
            t = time.perf_counter()
            size = len(c.compress(blob))
            dt = time.perf_counter() - t
            sample = test[:: max(1, n // 2000)]  # per message: a sample is enough
            one = sum(len(c.compress(f)) for f in sample) / len(sample)
            got[use] = (size / n, one, len(blob) / dt / 1e6)
        a, b = got[False], got[True]
        print(
            f"    {level:>5}  {a[0]:7.1f} ({b[0]:7.1f})  {a[1]:10.1f} ({b[1]:7.1f})"
            f"      {a[2]:7.1f} ({b[2]:7.1f})"
        )


def run_shape(shape: str, n: int, levels: list[int], tmp: pathlib.Path) -> None:
    t = time.perf_counter()
    rows = make_rows(n, shape)
    payload = sum(len(r.record) for r in rows) / n
    print(
        f"\n== {shape}: {n:,} signed 8-slot telemetry messages of one station "
        f"({payload:.0f} bytes each on the wire; made in {time.perf_counter() - t:.1f} s)"
    )
    src = tmp / f"{shape}.db"
    with Store(str(src)) as st:
        for i in range(0, n, 5000):
            st.write_batch(rows[i : i + 5000])
        st.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        t = time.perf_counter()
        k = sum(1 for _ in st.iter_raw_keys(SID))
        live_read = k / (time.perf_counter() - t)
    live = live_bytes(src) / n
    print(
        f"  live in SQLite: {live:,.0f} bytes/message (raw table + key index); "
        f"read {live_read:,.0f} msg/s"
    )
    print("  level  archived B/msg  vs live  seal msg/s  seal MB/s  read msg/s  (hash+decode)")
    for level in levels:
        db = tmp / f"{shape}-{level}.db"
        shutil.copy(src, db)
        with Store(str(db)) as st:
            t = time.perf_counter()
            rep = seal(st, now_ms=NOW, level=level)
            dt = time.perf_counter() - t
            segs = segments(st)
            assert st.raw_count() == 0 and sum(s.n_rows for s in segs) == n
            n_bytes = sum(s.n_bytes for s in segs)
            raw_bytes = sum(s.raw_bytes for s in segs)
            reader = ArchiveReader(st)
            t = time.perf_counter()
            k = sum(1 for _ in reader.iter_raw_keys(SID))
            rt = time.perf_counter() - t
        print(
            f"  {level:>5}  {n_bytes / n:14.1f}  {live / (n_bytes / n):6.1f}x"
            f"  {n / dt:10,.0f}  {raw_bytes / dt / 1e6:9.1f}  {k / rt:10,.0f}"
        )
        del rep
        db.unlink()
        shutil.rmtree(tmp / f"{shape}-{level}.db.archive", ignore_errors=True)
    dictionary(rows, levels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=float, default=1.0, help="days of telemetry (31: a month)")
    ap.add_argument("--levels", default="1,3,9,19", help="zstd levels to seal and compare")
    ap.add_argument("--shape", choices=["plain", "noisy", "both"], default="both")
    args = ap.parse_args()
    n = int(args.days * 86_400_000 / STEP_MS)
    if n * STEP_MS > 92 * 86_400_000:
        ap.error("--days: at most 92 (October to December)")
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-archive-") as d:
        for shape in ("plain", "noisy") if args.shape == "both" else (args.shape,):
            run_shape(shape, n, levels, pathlib.Path(d))


if __name__ == "__main__":
    main()
