"""`stationctl ocpp add|password|key|revoke|list`: the OCPP charge points the agent accepts.

Each charge point is a station (CONTRACT §11): its OCPP identity is its station id, with
its own password (HTTP Basic auth; a random one is made and printed once when none is
given) and, when its meter signs its values (OCMF), the meter's public key (hex or base64
DER, or PEM; `--public-key-file`). `list` reads and never creates a database; the others
change an existing agent database. The agent's endpoint is `[ocpp]` in its config.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ocpp", help="OCPP charge points: add, password, key, revoke, list (CONTRACT §11)"
    )
    cs = p.add_subparsers(dest="ocpp_cmd", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser, sid: bool = True) -> None:
        q.add_argument("--db", required=True, metavar="URL", help="the agent database")
        if sid:
            q.add_argument("sid", metavar="ID", help="the charge point's OCPP identity")

    def secret(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--password-file",
            metavar="FILE",
            help="read the password from FILE (default: a new random one, printed once)",
        )

    def key(q: argparse.ArgumentParser, required: bool) -> None:
        g = q.add_mutually_exclusive_group(required=required)
        g.add_argument("--public-key", metavar="TEXT", help="its meter's OCMF public key")
        g.add_argument("--public-key-file", metavar="FILE", help="the key from a file")

    a = cs.add_parser("add", help="register a charge point")
    common(a)
    secret(a)
    key(a, False)
    a.add_argument("--note", default="", help="free text (make, model, site)")
    pw = cs.add_parser("password", help="give a charge point a new password")
    common(pw)
    secret(pw)
    k = cs.add_parser("key", help="set its meter's OCMF public key ('' to remove it)")
    common(k)
    key(k, True)
    r = cs.add_parser("revoke", help="refuse the charge point from its next connection")
    common(r)
    ls = cs.add_parser("list", help="the charge points")
    common(ls, sid=False)
    ls.add_argument("--json", action="store_true", help="JSON Lines")
    p.set_defaults(func=run)


def _read(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return pathlib.Path(path).read_text().strip()
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from None


def run(args: argparse.Namespace) -> int:
    from agent.ocpp.points import PointError, Points
    from stationctl.dbopen import DB_ERRORS, name, open_store, reason

    reads = args.ocpp_cmd == "list"
    store = open_store(args.db, create=False, readonly=reads)
    points = Points(store)
    try:
        if reads:
            for p in points.all():
                row = {
                    "sid": p.sid,
                    "signed": bool(p.public_key),
                    "created_ms": p.created_ms,
                    "revoked_ms": p.revoked_ms,
                    "note": p.note,
                }
                if args.json:
                    print(json.dumps(row, sort_keys=True))
                else:
                    state = "revoked" if p.revoked_ms else "in service"
                    key = "OCMF key" if p.public_key else "no OCMF key"
                    print(f"{p.sid:<24} {state:<10} {key:<11} {p.note}")
            return 0
        password = _read(getattr(args, "password_file", None), "--password-file")
        pub = getattr(args, "public_key", None)
        if pub is None:
            pub = _read(getattr(args, "public_key_file", None), "--public-key-file")
        if args.ocpp_cmd == "add":
            made = points.add(args.sid, password, pub or "", args.note)
            _say_password(args.sid, made, password is None)
        elif args.ocpp_cmd == "password":
            made = points.set_password(args.sid, password)
            _say_password(args.sid, made, password is None)
        elif args.ocpp_cmd == "key":
            points.set_key(args.sid, pub or "")
            print(f"{args.sid}: OCMF public key {'set' if pub else 'removed'}")
        elif args.ocpp_cmd == "revoke":
            points.revoke(args.sid)
            print(f"{args.sid}: revoked (refused from its next connection)")
        return 0
    except (PointError, ValueError) as e:
        raise UsageError(str(e)) from None
    except DB_ERRORS as e:
        raise UsageError(f"database {name(args.db)}: {reason(args.db, e)}") from None
    finally:
        store.close()


def _say_password(sid: str, pw: str, made: bool) -> None:
    if made:  # shown once: it is kept only as a hash
        print(f"{sid}: password {pw}")
        print("(shown once; give it to the charger's OCPP settings)", file=sys.stderr)
    else:
        print(f"{sid}: password set")
