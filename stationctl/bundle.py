"""`stationctl bundle --db URL --from ISO --to ISO --out FILE [--keys-out FILE]
[--config FILE] [--carbon-params FILE] [--overdue-policy P]`: what a verifier needs to
check a period, and nothing more, in one zip file (docs/mrv.md).

Members (a zip, deterministic: fixed times, sorted names):

- `raw.jsonl`: every raw message of the bundled stations, each one's signed bytes exactly
  as received (base64) with sid, kind, topic, boot, seq, kid, recv_ms; in (sid, boot, seq)
  order. Each station's whole stream from its start to the moment of bundling (beside a
  running agent, to the last message it has metered: docs/agent.md): a record's
  value depends on the readings before the period (baseline, marks, restored registers)
  and at its edges on the readings after it (rule 5 spreads a credit over the time between
  two readings; an unsynced boot's clock is the smallest receive time − up over the whole
  boot), so the whole stream is the one exact choice that needs no checkpoint state;
- `records/interval.jsonl`, `records/day.jsonl`, `records/session.jsonl`: what
  `stationctl export --format json` gives for the period (credited: the meter register's
  layer applied); `records/stored/…` the stored metering records (`export
  --no-meter-policy`) when they differ;
- `metering.json`: the metering parameters (the agent config's [metering]) and the
  overdue policy; `carbon_params.toml`: the carbon parameter file used;
  `meters/register.json`: the meter register (and each meter's status at the end of the
  period);
- `report/report.html` and `report/*.csv`: the monitoring report of the period;
- `manifest.json`: the period, the stations, and the sha256 and size of every other member.

OCPP chargers (CONTRACT §11) are stations too: their frames go into `raw.jsonl` like the
rest (kind `ocpp`, topic `ocpp/<proto>/<sid>`, kid 1 when their OCMF signatures were
checked on receipt, else 0, the frame's exact bytes; no HMAC signature), and
`ocpp/public_keys.json` holds each bundled charger's OCMF public key ('' when none is
registered), so that `verify --bundle` checks the signed meter values again. A public key
is no secret: it verifies, it cannot sign. An unsigned OCPP reading has nothing to check
but its place in the stream: only the CSMS's receipt vouches for it (docs/mrv.md).

The keys that check the signatures are not in the bundle: `--keys-out FILE` writes them to
a separate file (mode 0600) that the operator chooses to hand over, only the (station,
kid) pairs present in `raw.jsonl`. An HMAC key signs as well as verifies: whoever holds
it could make messages the station never sent; it is handed to the verifier for the audit
only (docs/mrv.md).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from stationctl.errors import UsageError

FORMAT = "stationctl-bundle/1"
KEYS_FORMAT = "stationctl-keys/1"
MANIFEST = "manifest.json"
RAW = "raw.jsonl"
METERING = "metering.json"
CARBON = "carbon_params.toml"
REGISTER = "meters/register.json"
OCPP_KEYS = "ocpp/public_keys.json"
OCPP_KEYS_FORMAT = "stationctl-ocpp-keys/1"
OCPP_KIND = "ocpp"  # agent.ocpp.frames.KIND
KINDS = ("interval", "day", "session")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def records_name(kind: str, stored: bool = False) -> str:
    return f"records/{'stored/' if stored else ''}{kind}.jsonl"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bundle", help="a period's raw messages, records, parameters and report for a verifier"
    )
    p.add_argument("--db", required=True, metavar="URL", help="the agent database")
    p.add_argument("--from", dest="start", required=True, metavar="ISO", help="inclusive start")
    p.add_argument("--to", dest="end", required=True, metavar="ISO", help="exclusive end")
    p.add_argument("--out", required=True, metavar="FILE", help="the bundle to write (.zip)")
    p.add_argument(
        "--keys-out",
        metavar="FILE",
        help="also write the keys that check the bundle's signatures to FILE (mode 0600; "
        "hand it over only for the audit: an HMAC key can sign as the station)",
    )
    p.add_argument("--config", metavar="FILE", help="the agent's config ([metering], [meters])")
    p.add_argument("--carbon-params", metavar="FILE", help="carbon parameter file")
    p.add_argument(
        "--overdue-policy",
        choices=["discount", "exclude", "none"],
        help="as export applies it (default: --config's [meters], else discount)",
    )
    p.set_defaults(func=run)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw_line(row: Any) -> bytes:
    return (
        json.dumps(
            {
                "sid": row.sid,
                "kind": row.kind,
                "topic": row.topic,
                "boot": row.boot,
                "seq": row.seq,
                "kid": row.kid,
                "recv_ms": row.recv_ms,
                "b64": base64.b64encode(row.record).decode(),
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
    )


def write_keys(path: str, keys: list[dict[str, Any]]) -> None:
    """The keys file, created 0600 (an existing file is truncated and set to 0600)."""
    data = json.dumps({"format": KEYS_FORMAT, "keys": keys}, indent=1).encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def read_keys(path: str) -> Any:
    """A keys file as a `wire.StaticKeys` (UsageError when it is not one)."""
    from agent.wire import StaticKeys

    try:
        doc = json.loads(Path(path).read_bytes())
        if doc.get("format") != KEYS_FORMAT:
            raise ValueError(f"not a {KEYS_FORMAT} file")
        keys: dict[tuple[str, int], bytes | None] = {}
        for k in doc["keys"]:
            keys[(str(k["sid"]), int(k["kid"]))] = (
                None if k.get("revoked") else bytes.fromhex(k["key"])
            )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--keys {path}: {e}") from None
    return StaticKeys(keys)


def ocpp_keys_doc(points: dict[str, str]) -> bytes:
    """The bundle's OCPP public keys member: {sid: OCMF public key, '' when none}."""
    doc = {
        "format": OCPP_KEYS_FORMAT,
        "note": "OCMF public keys of the bundled OCPP charge points: they verify the "
        "chargers' signed meter values and cannot sign (not secrets). '' : no key registered.",
        "points": points,
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def read_ocpp_keys(data: bytes) -> dict[str, str]:
    """The member back (ValueError when it is not one)."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("format") != OCPP_KEYS_FORMAT:
        raise ValueError(f"{OCPP_KEYS}: not a {OCPP_KEYS_FORMAT} document")
    points = doc.get("points")
    if not isinstance(points, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in points.items()
    ):
        raise ValueError(f"{OCPP_KEYS}: points is not a map of station to key")
    return dict(points)


def register_from_dict(doc: dict[str, Any]) -> Any:
    """`agent.meters.Register` from `Register.as_dict()` (the bundle's copy)."""
    from agent.meters import Calibration, Install, Meter, Register

    meters = {}
    cals = {}
    for m in doc.get("meters", ()):
        meters[m["serial"]] = Meter(
            m["serial"], m["model"], m["accuracy_class"], int(m["added_ms"]), m.get("note", "")
        )
        cals[m["serial"]] = tuple(
            Calibration(
                m["serial"], c["calibrated_on"], c["next_due"], c["certificate"], c["at_ms"]
            )
            for c in m.get("calibrations", ())
        )
    installs = tuple(
        Install(i["serial"], i["sid"], i["from_ms"], i["to_ms"], i["by"], i["at_ms"])
        for i in doc.get("installs", ())
    )
    return Register(meters, cals, installs)


def run(args: argparse.Namespace) -> int:
    from agent.archive import snapshot
    from agent.keys import KeyStore
    from agent.report.collect import station_sids
    from agent.report.render import write_all
    from stationctl.dbopen import DB_ERRORS, name, open_store, reason
    from stationctl.export import policy_of
    from stationctl.report import (
        export_argv,
        export_bytes,
        generated_line,
        period,
        report_of,
    )

    t0 = time.monotonic()
    period(args)  # bad dates are bad usage before anything is read
    policy = policy_of(args)
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out}: a directory (give a file name, e.g. period.zip)")
    if args.keys_out and Path(args.keys_out).resolve() == out.resolve():
        raise UsageError("--keys-out must be another file than --out")
    rep, _read, lo, hi, mparams, cparams = report_of(args)
    members: dict[str, bytes] = {}
    stored_differ = False
    for kind in KINDS:
        argv = export_argv(
            args.db, args.start, args.end, kind, config=args.config, policy=args.overdue_policy
        )
        credited = export_bytes(argv)
        stored = export_bytes(
            export_argv(args.db, args.start, args.end, kind, config=None, policy=None)
            + ["--no-meter-policy"]
        )
        members[records_name(kind)] = credited
        if stored != credited:
            members[records_name(kind, stored=True)] = stored
            stored_differ = True
    sids = sorted(
        {r[0] for r in rep.tables["energy"].rows if r[0] != "TOTAL"}
        | {json.loads(x)["sid"] for x in members[records_name("session")].splitlines()}
    )
    store = open_store(args.db, readonly=True)
    keys: list[dict[str, Any]] = []
    try:
        with snapshot(store):
            from agent.ledger.agent_meter import metered_keys
            from agent.ledger.periods import load_locks
            from agent.meters import load_register

            reg = load_register(store)
            locks = load_locks(store)  # the monitoring periods locked (CONTRACT §6.8)
            # a running agent's newest messages, not metered yet, are in no record: left out
            upto = metered_keys(store)
            have = set(station_sids(store))
            raw = bytearray()
            pairs: set[tuple[str, int]] = set()
            ocpp: dict[str, str] = {}  # OCPP station -> its protocol
            n_raw = 0
            for sid in sids:
                if sid not in have:
                    continue
                top = upto.get(sid)
                for row in store.iter_raw_keys(sid):
                    if top is not None and (row.boot, row.seq) > top:
                        break  # (key order)
                    raw += raw_line(row)
                    if row.kind == OCPP_KIND:  # no HMAC key: an OCMF public key, if any
                        parts = row.topic.split("/")
                        ocpp.setdefault(row.sid, parts[1] if len(parts) > 2 else "")
                    else:
                        pairs.add((row.sid, row.kid))
                    n_raw += 1
            pub: dict[str, str] = {}
            if ocpp:
                from agent.ocpp.points import ocpp_public_keys

                known = ocpp_public_keys(store)
                pub = {sid: known.get(sid, "") for sid in sorted(ocpp)}
            if args.keys_out:
                ks = KeyStore(store)
                for sid, kid in sorted(pairs):
                    k = ks.get(sid, kid)
                    if k is None:
                        if any(i.kid == kid for i in ks.list(sid)):
                            keys.append({"sid": sid, "kid": kid, "revoked": True})
                        continue
                    keys.append({"sid": sid, "kid": kid, "key": k.hex()})
    except DB_ERRORS as e:
        raise UsageError(f"database {name(args.db)}: {reason(args.db, e)}") from None
    finally:
        store.close()
    members[RAW] = bytes(raw)
    if pub:
        members[OCPP_KEYS] = ocpp_keys_doc(pub)
    members[METERING] = (
        json.dumps(
            {
                "metering": dataclasses.asdict(mparams),
                "overdue_policy": policy,
                "locks": [dataclasses.asdict(lk) for lk in locks],
            },
            indent=1,
            sort_keys=True,
        ).encode()
        + b"\n"
    )
    members[CARBON] = Path(cparams.path).read_bytes()
    members[REGISTER] = (
        json.dumps(
            {
                "register": reg.as_dict(),
                "digest": reg.digest(),
                "status_at_period_end": rep.inputs.register or [],
            },
            indent=1,
            sort_keys=True,
        ).encode()
        + b"\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for p in write_all(rep, Path(tmp), generated_line(), name(args.db), pdf=False):
            members[f"report/{p.name}"] = p.read_bytes()
    manifest = {
        "format": FORMAT,
        "period": {"from": rep.summary["period_from"], "to": rep.summary["period_to"]},
        "stations": sids,
        "raw_messages": n_raw,
        "ocpp_stations": {sid: ocpp[sid] for sid in sorted(ocpp)},
        "raw_scope": "each station's whole stream, from its first message to the bundling",
        "stored_records_differ": stored_differ,
        "carbon_params": {
            "id": cparams.id,
            "version": cparams.version,
            "validated": bool(getattr(cparams, "validated", False)),
        },
        "files": {
            n: {"sha256": sha256(members[n]), "bytes": len(members[n])} for n in sorted(members)
        },
    }
    members[MANIFEST] = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    tmp_out = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp_out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for n in sorted(members):
            info = zipfile.ZipInfo(n, ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, members[n])
    os.replace(tmp_out, out)
    if args.keys_out:
        write_keys(args.keys_out, keys)
    size = out.stat().st_size
    print(
        f"bundle {out}: {len(sids)} stations, {n_raw} raw messages (whole streams), "
        f"{sum(len(members[records_name(k)].splitlines()) for k in KINDS)} records, "
        f"{size / 1e6:.1f} MB, in {time.monotonic() - t0:.1f} s"
    )
    if pub:
        print(
            f"OCPP: {len(pub)} charge point(s) in the bundle, "
            f"{sum(1 for k in pub.values() if k)} with an OCMF public key ({OCPP_KEYS})"
        )
    if args.keys_out:
        print(
            f"keys {args.keys_out} (0600): {len(keys)} station key(s); an HMAC key can sign "
            "as its station: hand it over for the audit only"
        )
    return 0
