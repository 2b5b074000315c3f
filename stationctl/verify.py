"""`stationctl verify --db URL [--config FILE] [--sid SID] [--json]`: the auditor's check.

Every stored raw message is verified again with the station keys from the store (its exact
signed bytes), the metering records are recomputed from those messages alone with the pure
§6 function, and the result is compared, record by record, with what the agent stored.
Exit 0 when every signature holds and every record is reproduced; 1 otherwise, with the
differences listed.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "verify", help="re-verify raw messages and recompute every record (auditors)"
    )
    p.add_argument(
        "--db", required=True, metavar="URL", help="sqlite:///PATH of the agent database"
    )
    p.add_argument(
        "--config", metavar="FILE", help="the agent's config (its [metering] parameters)"
    )
    p.add_argument("--sid", help="one station only")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.keys import KeyStore
    from agent.ledger import MeterParams, RawMsg, compute
    from agent.store import Store, record_to_row
    from agent.wire import WireError, verify

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
    try:
        ring = KeyStore(store).ring()
        msgs: list[RawMsg] = []
        bad_sig: list[str] = []
        n_raw = 0
        for batch in store.iter_raw(args.sid):
            for row in batch:
                n_raw += 1
                try:
                    v = verify(row.kind, row.sid, row.record, ring)
                except WireError as e:
                    bad_sig.append(f"{row.sid} {row.boot}:{row.seq}: {e}")
                    continue
                msgs.append(
                    RawMsg(sid=v.sid, boot=v.boot, seq=v.seq, recv_ms=row.recv_ms, body=v.body)
                )
        stored = {r.rid: r for r in store.record_rows() if args.sid is None or r.sid == args.sid}
    except sqlite3.DatabaseError as e:
        raise UsageError(f"{args.db} is not an agent database ({e})") from None
    finally:
        store.close()
    again = {row.rid: row for row in map(record_to_row, compute(msgs, params))}
    missing = sorted(set(again) - set(stored))
    extra = sorted(set(stored) - set(again))
    differ = sorted(k for k in set(again) & set(stored) if again[k] != stored[k])
    summary = {
        "raw": n_raw,
        "verified": len(msgs),
        "bad_signatures": len(bad_sig),
        "records_stored": len(stored),
        "records_recomputed": len(again),
        "missing": len(missing),
        "extra": len(extra),
        "different": len(differ),
        "ok": not (bad_sig or missing or extra or differ),
    }
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"raw messages {n_raw}, signatures verified {len(msgs)}, failed {len(bad_sig)}")
        print(
            f"records stored {len(stored)}, recomputed {len(again)}: "
            f"{len(missing)} missing, {len(extra)} not reproduced, {len(differ)} different"
        )
        for line in bad_sig[:20]:
            print("  bad signature:", line)
        for k in missing[:20]:
            print("  missing from the store:", k)
        for k in extra[:20]:
            print("  stored but not reproduced:", k)
        for k in differ[:20]:
            s, a = stored[k], again[k]
            print(
                "  different:", k, "stored", (s.mwh, s.held_mwh), "recomputed", (a.mwh, a.held_mwh)
            )
        print(
            "OK: every record is reproduced from signed raw messages" if summary["ok"] else "FAILED"
        )
    return 0 if summary["ok"] else 1
