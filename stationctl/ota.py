"""`stationctl ota`: firmware updates over MQTT (CONTRACT §10, firmware/ota.py).

    stationctl ota build --version V --out DIR [--key-file F --sid SID [--kid N]]
    stationctl ota push --version-dir DIR (--station SID … | --fleet) --db URL
        --broker HOST[:PORT] [--canary N|P% [--rest N|P%|all]] [--timeout S] …
    stationctl ota status --db URL

A version folder (`build`) holds the firmware as it goes onto a board (tools/fwbuild.py: every
module as .mpy; main.py, the boot wrapper, is never part of an update) under DIR/files/ and
DIR/manifest.json: {"ver", "files": [[path, size, sha256 hex], …]}. Stations verify no
asymmetric signature (MicroPython has neither Ed25519 nor ECDSA verification), so the manifest
is signed at push time for each station with its own key from the agent database, as the
command `{"v":1,"sid","kid","cmd":"ota","ver","iat","exp","confirm_s","trial_s","boots",
"files","sig"}` on stations/<sid>/cmd. The station asks for chunks on stations/<sid>/ota and
the pusher answers on its cmd topic, each chunk with its own MAC (see firmware/ota.py).

Exit status: 0 every station confirmed, 2 bad usage or input, 1 a station refused, rolled
back or timed out (named on stderr; later waves are not started).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from stationctl.errors import UsageError
from tools.ota import OtaError, Pusher, build_version, rollout, signed_manifest


def register(sub: Any) -> None:
    p = sub.add_parser("ota", help="firmware updates over MQTT: build, push in waves, status")
    osub = p.add_subparsers(dest="ota_cmd", required=True, metavar="ACTION")
    b = osub.add_parser("build", help="a version folder: the firmware's files and its manifest")
    b.add_argument("--version", required=True, help="the version name (A-Za-z0-9._+-, ≤ 32)")
    b.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new)")
    b.add_argument("--src", metavar="DIR", help=argparse.SUPPRESS)  # a firmware tree (tests)
    b.add_argument("--key-file", metavar="F", help="also sign the manifest for one station")
    b.add_argument("--sid", help="the station --key-file belongs to")
    b.add_argument("--kid", type=int, default=1, help="its key version (default 1)")
    b.set_defaults(func=_bad_input_is_usage(run_build))

    q = osub.add_parser("push", help="push a version to stations, canaries first")
    q.add_argument("--version-dir", required=True, metavar="DIR", help="written by `ota build`")
    who = q.add_mutually_exclusive_group(required=True)
    who.add_argument("--station", action="append", metavar="SID", help="a station (repeat)")
    who.add_argument("--fleet", action="store_true", help="every station with an active key")
    q.add_argument("--db", required=True, metavar="URL", help="the agent database (keys)")
    q.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST[:PORT]")
    q.add_argument("--user", help="the operator's broker account")
    q.add_argument("--password-file", metavar="F", help="its password, in a file")
    q.add_argument("--cafile", metavar="F", help="the broker's CA (PEM): TLS")
    q.add_argument("--prefix", default="stations")
    q.add_argument("--canary", metavar="N|P%", help="the first wave: N stations or P %%")
    q.add_argument("--rest", default="all", metavar="N|P%|all", help="later waves' size")
    q.add_argument("--confirm-s", type=int, default=60, help="healthy window before confirming")
    q.add_argument("--trial-s", type=int, default=300, help="trial deadline (rolls back)")
    q.add_argument("--boots", type=int, default=3, help="trial boots before rolling back")
    q.add_argument("--timeout", type=float, default=900.0, help="seconds per wave")
    q.set_defaults(func=_bad_input_is_usage(run_push))

    s = osub.add_parser("status", help="each station's version and its last ota event")
    s.add_argument("--db", required=True, metavar="URL", help="the agent database")
    s.add_argument("--json", action="store_true", help="one JSON object per station")
    s.set_defaults(func=run_status)


# ---- build --------------------------------------------------------------------------------


def _bad_input_is_usage(
    fn: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """tools/ota's OtaError (a bad version, folder or share) is bad usage: exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except OtaError as e:
            raise UsageError(str(e)) from None

    return run


def run_build(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out)
    man = build_version(args.version, out, pathlib.Path(args.src) if args.src else None)
    total = sum(e[1] for e in man["files"])
    if args.key_file:
        if not args.sid:
            raise UsageError("--key-file needs --sid")
        from stationctl.keys import _read_key

        key = _read_key(args.key_file)
        (out / f"manifest.{args.sid}.signed").write_bytes(
            signed_manifest(man, args.sid, args.kid, key)
        )
    print(f"{args.version}: {len(man['files'])} files, {total} bytes in {out}")
    return 0


# ---- push ---------------------------------------------------------------------------------


def _broker(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    if not host:
        return spec, 1883
    try:
        return host, int(port)
    except ValueError:
        raise UsageError(f"bad --broker {spec!r}: HOST[:PORT]") from None


def _keys(db: str, sids: list[str] | None) -> dict[str, tuple[int, bytes]]:
    from agent.keys import KeyStore
    from stationctl.dbopen import open_store

    store = open_store(db, readonly=True)
    out: dict[str, tuple[int, bytes]] = {}
    with KeyStore(store) as ks:
        if sids is None:
            sids = sorted({k.sid for k in ks.list() if k.state == "active"})
        for sid in sids:
            cur = ks.current(sid)
            if cur is None:
                raise UsageError(f"{sid}: no active key in {db}")
            out[sid] = cur
    store.close()
    return out


def run_push(args: argparse.Namespace) -> int:
    keys = _keys(args.db, None if args.fleet else list(dict.fromkeys(args.station)))
    if not keys:
        raise UsageError("no stations to push to")
    host, port = _broker(args.broker)
    password = None
    if args.password_file:
        password = pathlib.Path(args.password_file).read_text().strip()
    try:
        p = Pusher(
            pathlib.Path(args.version_dir),
            keys,
            host,
            port,
            prefix=args.prefix,
            user=args.user,
            password=password,
            cafile=args.cafile,
            confirm_s=args.confirm_s,
            trial_s=args.trial_s,
            boots=args.boots,
            log=lambda s: print("  " + s, flush=True),
        )
    except OSError as e:
        print(f"stationctl ota push: {e}", file=sys.stderr)
        return 1
    try:
        code, failed = rollout(p, list(keys), args.canary, args.rest, args.timeout)
    finally:
        p.close()
    if failed:
        print(
            f"stationctl ota push: {p.ver} failed on {', '.join(failed)}; later waves not started",
            file=sys.stderr,
        )
    return code


# ---- status -------------------------------------------------------------------------------


def fleet_status(db: str) -> list[dict[str, Any]]:
    """Per station: the firmware of its newest boot event and its newest ota event."""
    from agent.wire import decode_record
    from stationctl.dbopen import open_store

    store = open_store(db, readonly=True)
    try:
        q = store.db.execute
        tops = q("SELECT sid, MAX(boot) FROM raw GROUP BY sid ORDER BY sid").fetchall()
        out = []
        for sid, top in tops:
            rows = q(
                "SELECT boot, seq, record FROM raw WHERE sid = ? AND kind = 'event' AND boot >= ? "
                "ORDER BY boot, seq",
                (sid, int(top) - 50),
            ).fetchall()
            fw = boot = ota = None
            for b, _s, rec in rows:
                body = decode_record(bytes(rec))
                if body.get("ev") == "boot":
                    fw, boot = body.get("fw"), int(b)
                elif body.get("ev") == "ota":
                    ota = {k: body.get(k) for k in ("phase", "from", "to", "why")}
                    ota["boot"] = int(b)
            out.append({"sid": sid, "fw": fw, "boot": boot, "ota": ota})
        return out
    finally:
        store.close()


def run_status(args: argparse.Namespace) -> int:
    rows = fleet_status(args.db)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"{'station':<16} {'firmware':<14} {'boot':>6}  last ota event")
    for r in rows:
        o = r["ota"]
        ev = "-"
        if o:
            ev = f"{o['phase']} {o['from']} -> {o['to']}" + (f" ({o['why']})" if o["why"] else "")
        print(
            f"{r['sid']:<16} {r['fw'] or '?':<14} {r['boot'] if r['boot'] is not None else '-':>6}  {ev}"
        )
    return 0
