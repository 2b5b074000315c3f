"""`stationctl archive seal|list|check`: the raw archive (agent/archive/).

- `seal --db URL [--dir DIR] [--before YYYY-MM] [--grace-days N] [--level L]`: every
  closed month (UTC, of the receive time; closed = ended more than N days ago, default 7)
  of every station's raw messages into a compressed, content-hashed segment file; the
  rows leave the live table only once their segment is written, synced and read back.
- `list --db URL [--dir DIR] [--sid SID] [--json]`: the manifest.
- `check --db URL [--dir DIR]`: every segment re-hashed and decoded against the
  manifest; exit 1 naming each bad file.

`--dir`: the archive directory; by default `<database file>.archive/` beside an SQLite
database (a PostgreSQL database needs it given). Exit status as CONTRACT §8: 2 for bad
usage or input (one line on stderr), 1 for a failure. None of them creates a database.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("archive", help="the raw archive: seal closed months, list, check")
    asub = p.add_subparsers(dest="archive_cmd", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--db", required=True, metavar="URL", help="a path, sqlite:///PATH or postgresql://…"
        )
        q.add_argument(
            "--dir",
            metavar="DIR",
            help="the archive directory (default: beside an SQLite database, PATH.archive/)",
        )

    s = asub.add_parser("seal", help="seal closed months of raw messages into segments")
    common(s)
    s.add_argument("--before", metavar="YYYY-MM", help="seal only months before this one")
    s.add_argument(
        "--grace-days",
        type=int,
        default=None,
        metavar="N",
        help="a month is closed N days after it ends (default 7)",
    )
    s.add_argument("--level", type=int, default=None, metavar="L", help="zstd level (1..22)")
    ls = asub.add_parser("list", help="the sealed segments")
    common(ls)
    ls.add_argument("--sid", help="one station only")
    ls.add_argument("--json", action="store_true", help="one JSON object per segment")
    c = asub.add_parser("check", help="re-hash and decode every segment (exit 1 if any is bad)")
    common(c)
    p.set_defaults(func=run)


def _open(url: str, *, write: bool) -> Any:
    from agent.store import Store
    from agent.store.sql import describe

    try:
        name = describe(url)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        return Store(url, create=False, readonly=not write)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except Exception as e:
        raise UsageError(f"database {name}: {e}") from None


def _dir(store: Any, given: str | None) -> Path:
    from agent.archive import archive_dir

    try:
        return archive_dir(store, given)
    except ValueError as e:
        raise UsageError(f"--dir: {e}") from None


def run(args: argparse.Namespace) -> int:
    cmd = {"seal": _seal, "list": _list, "check": _check}[args.archive_cmd]
    return int(cmd(args))


def _seal(args: argparse.Namespace) -> int:
    from agent.archive import DEFAULT_GRACE_DAYS, DEFAULT_LEVEL, ArchiveError, seal
    from agent.archive.seal import parse_month

    if args.before is not None:
        try:
            parse_month(args.before)
        except ValueError as e:
            raise UsageError(f"--before: {e}") from None
    grace = DEFAULT_GRACE_DAYS if args.grace_days is None else args.grace_days
    if grace < 0:
        raise UsageError("--grace-days must not be negative")
    level = DEFAULT_LEVEL if args.level is None else args.level
    if not 1 <= level <= 22:
        raise UsageError("--level must be 1..22")
    store = _open(args.db, write=True)
    try:
        d = _dir(store, args.dir)
        try:
            rep = seal(store, d, before=args.before, grace_days=grace, level=level)
        except (ArchiveError, OSError) as e:
            print(f"FAILED: {e}")
            return 1
    finally:
        store.close()
    for sid, month, part, s in rep.sealed:
        ratio = s.raw_bytes / s.n_bytes if s.n_bytes else 0.0
        print(
            f"sealed {sid} {month} part {part}: {s.n_rows} rows, {s.n_bytes} bytes "
            f"({ratio:.1f}x), {s.rel}"
        )
    for o in rep.orphans_removed:
        print(f"removed orphan {o} (its rows are stored)")
    for o in rep.orphans_kept:
        print(f"WARNING: orphan segment kept as {d / o}: it holds rows stored nowhere else")
    if rep.skipped_archived:
        print(
            f"WARNING: {rep.skipped_archived} live rows have keys the archive holds already: "
            "left in raw"
        )
    print(
        f"{len(rep.sealed)} segments, {rep.rows} rows sealed into {d} (months before {rep.cutoff})"
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    from agent.archive import segments

    store = _open(args.db, write=False)
    try:
        d = _dir(store, args.dir)
        segs = segments(store, args.sid)
    finally:
        store.close()
    for s in segs:
        if args.json:
            obj = s._asdict()
            obj["path"] = str(d / s.file)
            print(json.dumps(obj, sort_keys=True))
        else:
            print(
                f"{s.sid} {s.month} p{s.part} rows {s.n_rows} bytes {s.n_bytes} "
                f"raw {s.raw_bytes} keys {s.first_boot}:{s.first_seq}..{s.last_boot}:{s.last_seq} "
                f"{s.file}"
            )
    if not args.json:
        print(f"{len(segs)} segments, {sum(s.n_rows for s in segs)} rows in {d}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from agent.archive import ArchiveError, read_segment, segments
    from agent.archive.segment import SUFFIX, Range

    store = _open(args.db, write=False)
    bad: list[str] = []
    try:
        d = _dir(store, args.dir)
        segs = segments(store)
        for s in segs:
            path = d / s.file
            want = [
                Range(int(b), int(lo), int(hi))
                for b, lo, hi in store.db.execute(
                    "SELECT boot, seq_lo, seq_hi FROM archive_ranges WHERE segment_id = ? "
                    "ORDER BY boot, seq_lo",
                    (s.id,),
                ).fetchall()
            ]
            got: list[Range] = []
            try:
                for r in read_segment(path, sha256=s.sha256, n_rows=s.n_rows, sid=s.sid):
                    g = got[-1] if got else None
                    if g is not None and g.boot == r.boot and g.seq_hi + 1 == r.seq:
                        got[-1] = Range(r.boot, g.seq_lo, r.seq)
                    else:
                        got.append(Range(r.boot, r.seq, r.seq))
            except ArchiveError as e:
                bad.append(str(e))
                continue
            if got != want:
                bad.append(f"segment {path}: its keys are not the manifest's ranges")
    finally:
        store.close()
    known = {s.file for s in segs}
    orphans = [
        p.relative_to(d).as_posix()
        for p in sorted(d.glob(f"*/*{SUFFIX}"))
        if p.relative_to(d).as_posix() not in known
    ]
    for line in bad:
        print("BAD", line)
    for o in orphans:
        print(f"orphan (no manifest row; the next seal handles it): {d / o}")
    print(f"{len(segs)} segments checked, {len(bad)} bad")
    return 1 if bad else 0
