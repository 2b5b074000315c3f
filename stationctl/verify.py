"""`stationctl verify --db URL [--config FILE] [--sid SID] [--archive DIR] [--json]`: the
auditor's check.

Every stored raw message is verified again with the station keys from the store (its exact
signed bytes), the metering records are recomputed from those messages alone with the pure
§6 function, and the result is compared, record by record, with what the agent stored.
Station by station, its raw rows streamed in (boot, seq) order through the metering
engine: memory holds one station's records, never the raw table.
Raw messages are read from the raw archive (agent/archive/: sealed segments, `--archive`
or by default beside an SQLite database) and the live table as one, in one read snapshot;
a segment that is missing or whose hash differs fails its station, named.
`--from`/`--to` (ISO, UTC; from inclusive, to exclusive) limit the comparison to the records
that start in that range; the stations' whole streams are still verified and replayed, since
a record's value depends on what came before it.
Exit 0 when every signature holds and every record is reproduced; 1 otherwise, with the
differences listed; 2 for bad usage, an unknown station, or nothing to verify (CONTRACT §8:
an empty range is not a pass).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any

from stationctl.errors import UsageError


def _range(args: argparse.Namespace) -> tuple[int, int]:
    from agent.ledger.export import parse_time

    try:
        lo = parse_time(args.t_from) if args.t_from else -(2**63)
        hi = parse_time(args.t_to) if args.t_to else 2**63
    except ValueError as e:
        raise UsageError(str(e)) from None
    if lo >= hi:
        raise UsageError("--from must be before --to")
    return lo, hi


class _Counted:
    """An iterable that counts what it yields (the signatures verified)."""

    def __init__(self, it: Iterable[Any]) -> None:
        self._it = it
        self.n = 0

    def __iter__(self) -> Iterator[Any]:
        for x in self._it:
            self.n += 1
            yield x


def register(sub: Any) -> None:
    p = sub.add_parser(
        "verify", help="re-verify raw messages and recompute every record (auditors)"
    )
    p.add_argument(
        "--db",
        required=True,
        metavar="URL",
        help="the agent database: a path, sqlite:///PATH or postgresql://…",
    )
    p.add_argument(
        "--config", metavar="FILE", help="the agent's config (its [metering] parameters)"
    )
    p.add_argument("--sid", help="one station only")
    p.add_argument("--from", dest="t_from", metavar="ISO", help="records from (inclusive)")
    p.add_argument("--to", dest="t_to", metavar="ISO", help="records before (exclusive)")
    p.add_argument(
        "--archive",
        metavar="DIR",
        help="the raw archive's directory (default: beside an SQLite database, PATH.archive/)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.archive import ArchiveError, ArchiveReader, archive_dir, snapshot
    from agent.archive.index import has_segments
    from agent.keys import KeyStore
    from agent.ledger import MeterParams, RawMsg
    from agent.ledger.compute import compute_station
    from agent.ledger.inputs import raw_msg
    from agent.store import RecordRow, Store, record_to_row
    from agent.wire import WireError, verify

    t_from, t_to = _range(args)
    params = MeterParams()
    if args.config:
        from agent.config import load_config

        try:
            params = load_config(args.config).metering
        except (OSError, ValueError) as e:
            raise UsageError(f"--config: {e}") from None
    try:
        store = Store(args.db, readonly=True)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except (ValueError, sqlite3.Error) as e:
        raise UsageError(f"database {args.db}: {e}") from None
    stack = contextlib.ExitStack()
    stack.callback(store.close)
    try:
        with stack:
            stack.enter_context(snapshot(store))  # one consistent read, beside an agent
            try:
                where = archive_dir(store, args.archive) if has_segments(store) else None
            except ValueError as e:
                raise UsageError(f"--archive: {e}") from None
            archive = ArchiveReader(store, where)
            ring = KeyStore(store).ring()

            def verified(
                sid: str,
                start: tuple[int, int] = (-1, -1),
                boot: int | None = None,
                bad: list[str] | None = None,
            ) -> Iterator[RawMsg]:
                """A station's raw rows in key order, verified again, as metering input."""
                for row in archive.iter_raw_keys(sid, start, boot=boot):
                    try:
                        v = verify(row.kind, row.sid, row.record, ring)
                    except WireError as e:
                        if bad is not None:
                            bad.append(f"{row.sid} {row.boot}:{row.seq}: {e}")
                        continue
                    yield raw_msg(v.sid, v.boot, v.seq, row.recv_ms, v.body)

            bad_sig: list[str] = []
            missing: list[str] = []
            extra: list[str] = []
            differ: list[tuple[str, RecordRow, RecordRow]] = []
            archive_bad: list[str] = []
            n_raw = n_ok = n_stored = n_again = 0
            # station by station, its raw rows streamed in key order: memory holds one
            # station's records at a time, never the raw table
            known = set(archive.sids()) | set(store.record_sids())
            if args.sid and args.sid not in known:
                raise UsageError(f"unknown station {args.sid}: no raw message, no record")
            sids = [args.sid] if args.sid else sorted(known)
            for sid in sids:
                before = len(bad_sig)
                counted = _Counted(verified(sid, bad=bad_sig))
                try:
                    recs = compute_station(
                        sid,
                        counted,
                        lambda s, k: verified(s, k),
                        lambda s, b: verified(s, boot=b),
                        params,
                    )
                except ArchiveError as e:  # the station's raw messages cannot all be read
                    archive_bad.append(f"{sid}: {e}")
                    n_raw += counted.n + len(bad_sig) - before
                    n_ok += counted.n
                    continue
                n_raw += counted.n + len(bad_sig) - before
                n_ok += counted.n
                again = {
                    row.rid: row
                    for row in map(record_to_row, recs)
                    if t_from <= row.start_ms < t_to
                }
                stored = {
                    r.rid: r for r in store.record_rows(sid=sid) if t_from <= r.start_ms < t_to
                }
                n_stored += len(stored)
                n_again += len(again)
                missing += sorted(set(again) - set(stored))
                extra += sorted(set(stored) - set(again))
                differ += [
                    (k, stored[k], again[k])
                    for k in sorted(set(again) & set(stored))
                    if again[k] != stored[k]
                ]
    except sqlite3.DatabaseError as e:
        raise UsageError(f"{args.db} is not an agent database ({e})") from None
    if n_raw == 0 or (n_stored == 0 and n_again == 0 and not archive_bad):
        what = "no raw message" if n_raw == 0 else "no record in that range"
        raise UsageError(f"nothing to verify: {what} (an empty range is not a pass)")
    summary = {
        "raw": n_raw,
        "verified": n_ok,
        "bad_signatures": len(bad_sig),
        "records_stored": n_stored,
        "records_recomputed": n_again,
        "missing": len(missing),
        "extra": len(extra),
        "different": len(differ),
        "archive_errors": len(archive_bad),
        "ok": not (bad_sig or missing or extra or differ or archive_bad),
    }
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"raw messages {n_raw}, signatures verified {n_ok}, failed {len(bad_sig)}")
        print(
            f"records stored {n_stored}, recomputed {n_again}: "
            f"{len(missing)} missing, {len(extra)} not reproduced, {len(differ)} different"
        )
        for line in archive_bad:
            print("  archive:", line)
        for line in bad_sig[:20]:
            print("  bad signature:", line)
        for k in missing[:20]:
            print("  missing from the store:", k)
        for k in extra[:20]:
            print("  stored but not reproduced:", k)
        for k, s, a in differ[:20]:
            print(
                "  different:", k, "stored", (s.mwh, s.held_mwh), "recomputed", (a.mwh, a.held_mwh)
            )
        print(
            "OK: every record is reproduced from signed raw messages" if summary["ok"] else "FAILED"
        )
    return 0 if summary["ok"] else 1
