"""`stationctl verify --db URL [--config FILE] [--sid SID] [--archive DIR] [--json]`: the
auditor's check. (`stationctl verify --bundle FILE [--keys FILE | --no-signatures]`, the
same check of a bundle on a machine without agent or database, is a separate code path:
`run_bundle` below.)

Every stored raw message is verified again with the station keys from the store (its exact
signed bytes), the metering records are recomputed from those messages alone with the pure
§6 function, and the result is compared, record by record, with what the agent stored.
Station by station, its raw rows streamed in (boot, seq) order through the metering
engine: memory holds one station's records, never the raw table.
Raw messages are read from the raw archive (agent/archive/: sealed segments, `--archive`
or by default beside an SQLite database) and the live table as one, in one read snapshot;
a segment that is missing or whose hash differs fails its station, named.
A running agent meters a station's newest messages a moment after it commits them
(docs/agent.md, "Metering held back"): each station's records are compared with what its
raw rows up to its metering state's key give; the newer rows are verified and counted
(`held`).
`--from`/`--to` (ISO, UTC; from inclusive, to exclusive) limit the comparison to the records
that start in that range; the stations' whole streams are still verified and replayed, since
a record's value depends on what came before it.
OCPP chargers' frames (raw kind `ocpp`, CONTRACT §11) carry no HMAC signature: each is
re-read as stored (`frames.recheck`: still an OCPP-J frame, and when stored as checked its
OCMF values verify again against the charger's public key) and counted apart: OCPP
frames, of which OCMF-signed and verified, and unsigned (nothing but the frame to check;
never counted as a verified signature, nor as a failed one). A frame that fails its check
is named and fails the run, like a bad signature.
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
        metavar="URL",
        help="the agent database: a path, sqlite:///PATH or postgresql://… (or --bundle)",
    )
    p.add_argument(
        "--bundle",
        metavar="FILE",
        help="verify a bundle (`stationctl bundle`) instead of a database: no agent and no "
        "database needed",
    )
    p.add_argument(
        "--keys",
        metavar="FILE",
        help="with --bundle: the keys file the operator handed over (`bundle --keys-out`)",
    )
    p.add_argument(
        "--no-signatures",
        action="store_true",
        help="with --bundle and no --keys: check the rest and pass without the signatures",
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
    if args.bundle:
        return run_bundle(args)
    if not args.db:
        raise UsageError("give --db URL (a database) or --bundle FILE")
    if args.keys or args.no_signatures:
        raise UsageError("--keys and --no-signatures go with --bundle")
    return run_db(args)


def metering_params(config: str | None) -> Any:
    """The metering parameters of an agent config's [metering] (--config), else defaults."""
    from agent.ledger import MeterParams

    if not config:
        return MeterParams()
    from agent.config import load_config

    try:
        return load_config(config).metering
    except (OSError, ValueError) as e:
        raise UsageError(f"--config: {e}") from None


def run_db(args: argparse.Namespace) -> int:
    from agent.archive import ArchiveError, ArchiveReader, archive_dir, snapshot
    from agent.archive.index import has_segments
    from agent.keys import KeyStore
    from agent.ledger import RawMsg
    from agent.ledger.agent_meter import decode_row, metered_keys
    from agent.ledger.compute import compute_station
    from agent.ledger.inputs import raw_msg
    from agent.ledger.periods import bounds as lock_bounds
    from agent.ledger.periods import load_locks, open_records, params_now, window_records
    from agent.ocpp import frames as ocpp_frames
    from agent.ocpp.ocmf import OcmfError
    from agent.ocpp.points import ocpp_public_keys
    from agent.store import RecordRow, Store, record_to_row
    from agent.wire import WireError, verify

    t_from, t_to = _range(args)
    params = metering_params(args.config)
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
            locks = load_locks(store)
            ocpp_keys = ocpp_public_keys(store)
            # a running agent meters a station's newest rows a moment after it commits
            # them: its records are compared with the rows up to its state's key, and the
            # rows above it are counted (`held`)
            upto = metered_keys(store)
            held = [0]

            def verified(
                sid: str,
                start: tuple[int, int] = (-1, -1),
                boot: int | None = None,
                bad: list[str] | None = None,
                tally: list[int] | None = None,
            ) -> Iterator[RawMsg]:
                """A station's raw rows in key order, verified again, as metering input up
                to its metered key. `tally` (the counting pass): OCPP frames [good,
                OCMF-verified, failed]; the rows above that key are verified and counted
                in `held`, and are no metering input."""
                top = upto.get(sid)
                for row in archive.iter_raw_keys(sid, start, boot=boot):
                    if top is not None and (row.boot, row.seq) > top:
                        if tally is None:
                            return
                        for _msg in verified_one(row, bad, tally):
                            held[0] += 1
                        continue
                    yield from verified_one(row, bad, tally)

            def verified_one(
                row: Any, bad: list[str] | None, tally: list[int] | None
            ) -> Iterator[RawMsg]:
                """One raw row verified again: its message, or nothing (`bad` says why)."""
                if row.kind != ocpp_frames.KIND:
                    try:
                        v = verify(row.kind, row.sid, row.record, ring)
                    except WireError as e:
                        if bad is not None:
                            bad.append(f"{row.sid} {row.boot}:{row.seq}: {e}")
                        return
                    yield raw_msg(v.sid, v.boot, v.seq, row.recv_ms, v.body)
                    return
                try:  # CONTRACT §11: no HMAC; OCMF if any
                    proto = ocpp_frames.proto_of(row.topic)
                    ocpp_frames.recheck(row.kid, proto, row.record, ocpp_keys.get(row.sid, ""))
                    msg = decode_row(row)
                except (ocpp_frames.FrameError, OcmfError) as e:
                    if bad is not None:
                        bad.append(
                            f"{row.sid} {row.boot}:{row.seq}: OCPP frame "
                            f"({row.topic}): {e or type(e).__name__}"
                        )
                    if tally is not None:
                        tally[2] += 1
                    return
                if tally is not None:
                    tally[0] += 1
                    tally[1] += row.kid == ocpp_frames.SIGNED_KID
                yield msg

            bad_sig: list[str] = []
            missing: list[str] = []
            extra: list[str] = []
            differ: list[tuple[str, RecordRow, RecordRow]] = []
            archive_bad: list[str] = []
            n_raw = n_ok = n_stored = n_again = 0
            ocpp = [0, 0, 0]  # OCPP frames: read and checked, of them OCMF-verified; failed
            # station by station, its raw rows streamed in key order: memory holds one
            # station's records at a time, never the raw table
            known = set(archive.sids()) | set(store.record_sids())
            if args.sid and args.sid not in known:
                raise UsageError(f"unknown station {args.sid}: no raw message, no record")
            sids = [args.sid] if args.sid else sorted(known)
            for sid in sids:
                before = len(bad_sig)
                held_before = held[0]
                counted = _Counted(verified(sid, bad=bad_sig, tally=ocpp))
                try:
                    # the open part with the last lock in force, then each locked window
                    # in range as it was frozen (CONTRACT §6.8, agent/ledger/periods.py)
                    recs = open_records(
                        compute_station(
                            sid,
                            counted,
                            lambda s, k: verified(s, k),
                            lambda s, b: verified(s, boot=b),
                            params_now(params, locks),
                        ),
                        locks,
                    )
                    for n in range(len(locks)):
                        lo, hi = lock_bounds(locks, n)
                        if hi > t_from and lo < t_to:
                            recs += window_records(
                                sid,
                                verified(sid),
                                lambda s, key: verified(s, key),
                                lambda s, b: verified(s, boot=b),
                                params,
                                locks,
                                n,
                            )
                except ArchiveError as e:  # the station's raw messages cannot all be read
                    archive_bad.append(f"{sid}: {e}")
                    recs = None
                n_verified = counted.n + held[0] - held_before
                n_raw += n_verified + len(bad_sig) - before
                n_ok += n_verified
                if recs is None:
                    continue
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
    # (an archive that cannot be read is a failure below, not an empty range)
    n_ocpp = ocpp[0] + ocpp[2]
    n_unsigned = ocpp[0] - ocpp[1]
    n_ok -= n_unsigned  # an unsigned OCPP frame was read, not a signature verified
    if not archive_bad and (n_raw == 0 or (n_stored == 0 and n_again == 0)):
        what = "no raw message" if n_raw == 0 else "no record in that range"
        raise UsageError(f"nothing to verify: {what} (an empty range is not a pass)")
    summary = {
        "raw": n_raw,
        "verified": n_ok,
        "bad_signatures": len(bad_sig),
        "ocpp_frames": n_ocpp,
        "ocpp_ocmf_verified": ocpp[1],
        "ocpp_unsigned": n_unsigned,
        "ocpp_failed": ocpp[2],
        "records_stored": n_stored,
        "records_recomputed": n_again,
        "missing": len(missing),
        "extra": len(extra),
        "different": len(differ),
        "archive_errors": len(archive_bad),
        "held": held[0],
        "ok": not (bad_sig or missing or extra or differ or archive_bad),
    }
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"raw messages {n_raw}, signatures verified {n_ok}, failed {len(bad_sig)}")
        if held[0]:
            print(
                f"of them {held[0]} newer than the agent's metering (its next step): "
                "verified, their records not compared yet"
            )
        if n_ocpp:
            print(
                f"OCPP frames {n_ocpp} (no HMAC signature): OCMF-signed and verified "
                f"{ocpp[1]}, unsigned {n_unsigned} (only the CSMS's receipt), failed {ocpp[2]}"
            )
        print(
            f"records stored {n_stored}, recomputed {n_again}: "
            f"{len(missing)} missing, {len(extra)} not reproduced, {len(differ)} different"
        )
        for line in archive_bad:
            print("  archive:", line)
        for line in bad_sig[:20]:
            print("  bad frame:" if " OCPP frame (" in line else "  bad signature:", line)
        for k in missing[:20]:
            print("  missing from the store:", k)
        for k in extra[:20]:
            print("  stored but not reproduced:", k)
        for k, s, a in differ[:20]:
            print(
                "  different:", k, "stored", (s.mwh, s.held_mwh), "recomputed", (a.mwh, a.held_mwh)
            )
        ocpp_note = f" and OCPP frames ({n_unsigned} of them unsigned)" if n_ocpp else ""
        print(
            f"OK: every record is reproduced from signed raw messages{ocpp_note}"
            if summary["ok"]
            else "FAILED"
        )
    return 0 if summary["ok"] else 1


# ---- verify --bundle: a bundle on a clean machine (no agent, no database) ------------------


def _line_key(o: dict[str, Any], kind: str) -> tuple[Any, ...]:
    adj = "adjustment" in o["flags"]
    return (o["sid"], o["slot"], o["start"], adj, tuple(o["to"]) if kind == "session" else ())


def _compare_jsonl(what: str, want: bytes, got: bytes, kind: str) -> list[str]:
    """The differences between two exports of records (JSON Lines), record by record."""
    if want == got:
        return []
    a = {_line_key(o, kind): o for o in map(json.loads, want.splitlines())}
    b = {_line_key(o, kind): o for o in map(json.loads, got.splitlines())}
    out = []
    for k in sorted(set(a) | set(b), key=repr):
        name = f"{kind} {k[0]} slot {k[1]} {k[2]}{' adjustment' if k[3] else ''}"
        if k not in b:
            out.append(f"{what}: {name}: in the bundle, not reproduced")
        elif k not in a:
            out.append(f"{what}: {name}: reproduced, not in the bundle")
        elif a[k] != b[k]:
            fields = sorted(f for f in set(a[k]) | set(b[k]) if a[k].get(f) != b[k].get(f))
            diffs = ", ".join(f"{f} {a[k].get(f)!r} != {b[k].get(f)!r}" for f in fields)
            out.append(f"{what}: {name}: bundle != recomputed: {diffs}")
    return out or [f"{what}: {kind} records differ in their bytes (order or encoding)"]


def run_bundle(args: argparse.Namespace) -> int:
    """Check a bundle: the manifest's hashes, every signature (with --keys), every record
    recomputed from the raw messages with the §6 function, the credited records with the
    register's layer, and the report's record tables (energy, every tonne of CO2e with
    the bundle's carbon parameters, completeness, gaps, held energy, adjustments)
    rebuilt and compared byte for byte. OCPP frames (kind `ocpp`) have no HMAC: each is
    re-read with `frames.recheck` (OCMF against the bundle's `ocpp/public_keys.json`) and
    translated as the agent translates it (`collect.check_ocpp`), then metered with the
    rest; a frame that fails is named. Exit 0 all agree, 1 differences (listed), 2 bad
    usage, not a bundle, or OCPP frames on a machine without `cryptography`."""
    import base64
    import hashlib
    import tomllib
    import zipfile
    from collections import defaultdict
    from pathlib import Path

    from agent.ledger import MeterParams
    from agent.ledger.carbon import CarbonParamsError, parse_params
    from agent.ledger.export import parse_time, render
    from agent.ledger.inputs import raw_msg
    from agent.ledger.periods import Lock, compute_locked
    from agent.report import Inputs, SigCount, build
    from agent.report.collect import check_ocpp, message_time, source_of
    from agent.report.tables import OWN, RECORD_TABLES, source_label
    from agent.wire import WireError, decode_signed, split_signed, verify
    from stationctl import bundle as B
    from stationctl.report import parse_jsonl

    for opt in ("db", "sid", "t_from", "t_to", "archive", "config"):
        if getattr(args, opt, None):
            raise UsageError(f"--bundle takes no --{opt.replace('t_', '')}: the bundle has them")
    if args.keys and args.no_signatures:
        raise UsageError("--keys checks the signatures; --no-signatures is for no keys")
    path = Path(args.bundle)
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise UsageError(f"--bundle {path}: {e}") from None
    with z:
        names = set(z.namelist())
        try:
            manifest = json.loads(z.read(B.MANIFEST))
            if manifest.get("format") != B.FORMAT:
                raise ValueError(f"format is not {B.FORMAT}")
            listed = dict(manifest["files"])
            lo = parse_time(manifest["period"]["from"])
            hi = parse_time(manifest["period"]["to"])
        except (KeyError, ValueError, TypeError) as e:
            raise UsageError(f"--bundle {path}: not a bundle ({e})") from None
        members = {n: z.read(n) for n in sorted(names)}
    ring = B.read_keys(args.keys) if args.keys else None
    problems: dict[str, list[str]] = defaultdict(list)

    # 1. the manifest: every member present, hashed as listed, nothing unlisted
    for n, meta in sorted(listed.items()):
        if n not in members:
            problems["manifest"].append(f"{n}: listed, missing")
        elif hashlib.sha256(members[n]).hexdigest() != meta["sha256"]:
            problems["manifest"].append(f"{n}: sha256 differs from the manifest")
    for n in sorted(set(members) - set(listed) - {B.MANIFEST}):
        problems["manifest"].append(f"{n}: not in the manifest")
    for n in (B.RAW, B.METERING, B.CARBON, B.REGISTER, *map(B.records_name, B.KINDS)):
        if n not in members:
            raise UsageError(f"--bundle {path}: not a bundle (no {n})")

    # 2. the raw messages: signatures (with the keys), then metering input
    try:
        mdoc = json.loads(members[B.METERING])
        mparams = MeterParams(**mdoc["metering"])
        locks = [Lock(**x) for x in mdoc.get("locks", [])]  # (bundles before locks: none)
        policy = str(mdoc["overdue_policy"])
        cparams = parse_params(tomllib.loads(members[B.CARBON].decode()), f"{path}:{B.CARBON}")
        register = B.register_from_dict(json.loads(members[B.REGISTER])["register"])
    except (KeyError, ValueError, TypeError, CarbonParamsError) as e:
        if not problems["manifest"]:
            raise UsageError(f"--bundle {path}: {e}") from None
        # a member changed after bundling no longer reads: the manifest names it
        if args.json:
            print(json.dumps({"ok": False, "manifest_problems": len(problems["manifest"])}))
        else:
            for text in problems["manifest"]:
                print(f"  manifest: {text}")
            print(f"FAILED: the bundle was changed after it was made ({e})")
        return 1
    try:  # the OCPP chargers' OCMF public keys (public: they cannot sign)
        pub = B.read_ocpp_keys(members[B.OCPP_KEYS]) if B.OCPP_KEYS in members else {}
    except ValueError as e:
        problems["ocpp"].append(str(e))
        pub = {}
    msgs: dict[str, list[Any]] = defaultdict(list)
    # per station in the period: stored, verified, failed, OCPP frames, OCMF, unsigned
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0])
    readings: dict[str, set[int]] = defaultdict(set)
    labels: dict[str, set[str]] = defaultdict(set)
    n_raw = n_ok = n_own = 0
    ocpp = [0, 0, 0, 0]  # OCPP frames: all, OCMF-verified, unsigned, failed
    for i, line in enumerate(members[B.RAW].splitlines(), start=1):
        try:
            o = json.loads(line)
            payload = base64.b64decode(o["b64"], validate=True)
            sid, kind, recv = str(o["sid"]), str(o["kind"]), int(o["recv_ms"])
            if kind == B.OCPP_KIND:
                boot, seq, kid = int(o["boot"]), int(o["seq"]), int(o["kid"])
                topic = str(o["topic"])
        except (ValueError, KeyError, TypeError) as e:
            problems["raw"].append(f"{B.RAW} line {i}: {e}")
            continue
        n_raw += 1
        if kind == B.OCPP_KIND:  # CONTRACT §11: a frame as received, no HMAC signature
            try:
                c = check_ocpp(sid, boot, seq, kid, topic, payload, recv, pub.get(sid, ""))
            except ImportError as e:  # agent.ocpp needs `cryptography` (OCMF)
                raise UsageError(
                    f"--bundle {path}: it holds OCPP frames, whose check needs the "
                    f"`cryptography` package ({e}): pip install cryptography"
                ) from None
            ocpp[0] += 1
            labels[sid].add(source_label(c.proto))
            cnt = counts[sid] if lo <= c.time < hi else [0] * 6
            cnt[0] += 1
            cnt[3] += 1
            if c.error:
                ocpp[3] += 1
                cnt[2] += 1
                problems["ocpp"].append(f"{sid} {boot}:{seq}: OCPP frame ({topic}): {c.error}")
                continue
            if c.signed:
                ocpp[1] += 1
                n_ok += 1
                cnt[1] += 1
                cnt[4] += 1
            else:
                ocpp[2] += 1
                cnt[5] += 1
            if lo <= c.time < hi and c.msg.body.get("reg"):
                readings[sid].add(c.time - c.time % mparams.interval_ms)
            msgs[sid].append(c.msg)
            continue
        n_own += 1
        labels[sid].add(OWN)
        try:
            if ring is not None:
                v = verify(kind, sid, payload, ring)
                body: dict[str, Any] = v.body
            else:
                body = decode_signed(split_signed(payload)[0])
        except WireError as e:
            problems["signatures"].append(f"{sid} {o.get('boot')}:{o.get('seq')}: {e}")
            try:  # in the period by its time, as the report counted it
                t = message_time(decode_signed(split_signed(payload)[0]), recv)
            except WireError:
                t = recv
            if lo <= t < hi:
                counts[sid][0] += 1
                counts[sid][2] += ring is not None
            continue
        head = (body.get("sid"), body.get("boot"), body.get("seq"), body.get("kid"))
        if head != (sid, o.get("boot"), o.get("seq"), o.get("kid")):
            problems["raw"].append(f"{B.RAW} line {i}: its fields do not match its signed bytes")
            continue
        n_ok += ring is not None
        t = message_time(body, recv)
        if lo <= t < hi:
            counts[sid][0] += 1
            counts[sid][1] += ring is not None
            if kind == "telemetry":
                readings[sid].add(t - t % mparams.interval_ms)
        msgs[sid].append(raw_msg(sid, body["boot"], body["seq"], recv, body))

    # 3. every record recomputed with the §6 function, compared with the bundle's
    again = []
    for sid in sorted(msgs):
        again += compute_locked(msgs.pop(sid), mparams, locks)
    stored_given = any(B.records_name(k, stored=True) in members for k in B.KINDS)
    n_records = 0
    for kind in B.KINDS:
        got = render(again, "json", lo, hi, kind)
        name = B.records_name(kind, stored=stored_given)
        want = members.get(name, members[B.records_name(kind)])
        n_records += len(want.splitlines())
        problems["records"] += _compare_jsonl("metering", want, got, kind)
        if stored_given:  # the register's crediting layer over the recomputed records
            from agent.ledger.export import select
            from agent.meters import apply_policy

            credited = apply_policy(select(again, lo, hi, kind), register, policy)
            got_c = render(credited, "json", lo, hi, kind, meter=not register.empty)
            problems["records"] += _compare_jsonl(
                "credited", members[B.records_name(kind)], got_c, kind
            )

    # 4. the report's tables made from the records: energy, tonnes, completeness, ...
    try:
        inp = Inputs(
            start_ms=lo,
            end_ms=hi,
            interval_ms=mparams.interval_ms,
            intervals=parse_jsonl(members[B.records_name("interval")], "interval"),
            days=parse_jsonl(members[B.records_name("day")], "day"),
            params=cparams,
            sids=sorted(counts),
            signatures=[
                SigCount(s, c[0], c[1], c[2], c[0] - c[1] - c[2] - c[5], c[3], c[4], c[5])
                for s, c in sorted(counts.items())
            ],
            readings=readings,
            sources={s: source_of(x) for s, x in labels.items()},
        )
        rep = build(inp)
    except (KeyError, ValueError, TypeError) as e:
        problems["report"].append(f"the report's tables could not be rebuilt: {e}")
    else:
        tables = list(RECORD_TABLES) + (["signatures"] if ring is not None else [])
        for tname in tables:
            member = f"report/{tname}.csv"
            if member not in members:
                problems["report"].append(f"{member}: missing")
            elif members[member] != rep.tables[tname].csv():
                problems["report"].append(
                    f"{member}: differs from the one rebuilt from the records"
                )

    checked = ring is not None or n_own == 0  # (OCPP frames need no key file)
    failed = any(problems.values())
    ok = not failed and (checked or args.no_signatures)
    summary = {
        "bundle": str(path),
        "period": manifest["period"],
        "stations": len(manifest.get("stations", [])),
        "raw": n_raw,
        "signatures_checked": checked,
        "verified": n_ok,
        "bad_signatures": len(problems["signatures"]),
        "ocpp_frames": ocpp[0],
        "ocpp_ocmf_verified": ocpp[1],
        "ocpp_unsigned": ocpp[2],
        "ocpp_failed": ocpp[3],
        "records": n_records,
        "manifest_problems": len(problems["manifest"]),
        "record_differences": len(problems["records"]),
        "report_differences": len(problems["report"]),
        "ok": ok,
    }
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"bundle {path}: period {manifest['period']['from']} to {manifest['period']['to']}")
        print(
            f"manifest: {len(listed)} files, "
            + ("every hash agrees" if not problems["manifest"] else "PROBLEMS")
        )
        if checked:
            print(
                f"raw messages {n_raw}, signatures verified {n_ok}, failed {len(problems['signatures'])}"
            )
        else:
            print(f"raw messages {n_raw}: signatures NOT checked (no --keys)")
        if ocpp[0]:
            print(
                f"OCPP frames {ocpp[0]} (no HMAC signature; OCMF against {B.OCPP_KEYS}): "
                f"OCMF-signed and verified {ocpp[1]}, unsigned {ocpp[2]} (only the CSMS's "
                f"receipt), failed {ocpp[3]}"
            )
        print(
            f"records {n_records} recomputed from the raw messages: "
            f"{len(problems['records'])} difference(s)"
        )
        print(
            f"report tables ({', '.join(RECORD_TABLES)}) rebuilt with carbon parameters "
            f"{cparams.id} {cparams.version}: {len(problems['report'])} difference(s)"
        )
        for what in ("manifest", "raw", "signatures", "ocpp", "records", "report"):
            for text in problems[what][:20]:
                print(f"  {what}: {text}")
            if len(problems[what]) > 20:
                print(f"  {what}: … {len(problems[what]) - 20} more")
        if ok:
            print(
                "OK: every record and tonne is reproduced from the raw messages"
                + ("" if checked else " (signatures not checked: --no-signatures)")
            )
        elif not failed:
            print(
                "NOT VERIFIED: the signatures were not checked (give --keys FILE, or "
                "--no-signatures to accept the rest without them)"
            )
        else:
            print("FAILED")
    return 0 if ok else 1
