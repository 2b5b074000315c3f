"""`stationctl keys add|rotate|revoke|list`: station keys in the agent database.

Key bytes never go to stdout, stderr or logs: `add` reads a key file (64 hex digits) or
generates one into a new file (mode 0600), `rotate` writes the new key to a new file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("keys", help="station keys: add, rotate, revoke, list")
    ks = p.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        g = q.add_mutually_exclusive_group(required=True)
        g.add_argument(
            "--db",
            metavar="URL",
            help="the agent database: a path, sqlite:///PATH or postgresql://…",
        )
        g.add_argument("--config", metavar="FILE", help="the agent's TOML (its db.url is used)")

    a = ks.add_parser("add", help="add a station key (from a file, or generated into one)")
    common(a)
    a.add_argument("sid")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--key-file", metavar="FILE", help="file holding the key as 64 hex digits")
    src.add_argument(
        "--generate",
        metavar="FILE",
        help="generate a random key and write it to FILE (must not exist)",
    )
    a.add_argument("--kid", type=int, help="key version (default: next free)")
    a.add_argument(
        "--create",
        action="store_true",
        help="make the database when it does not exist yet (a new deployment); without it a "
        "mistyped --db is an error, not a new empty database",
    )
    r = ks.add_parser("rotate", help="new key with the next kid; old keys stay valid")
    common(r)
    r.add_argument("sid")
    r.add_argument(
        "--key-out",
        required=True,
        metavar="FILE",
        help="write the new key (64 hex) to FILE (must not exist)",
    )
    v = ks.add_parser("revoke", help="revoke one key (--kid) or every key of a station")
    common(v)
    v.add_argument("sid")
    v.add_argument("--kid", type=int)
    ls = ks.add_parser("list", help="sid, kid, state and dates (never the key)")
    common(ls)
    ls.add_argument("sid", nargs="?")
    p.set_defaults(func=run)


def _db_url(args: argparse.Namespace) -> str:
    if args.db:
        return str(args.db)
    from agent.config import ConfigError, load_config

    try:
        return load_config(args.config).db.url
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _read_key(path: str) -> bytes:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise UsageError(f"cannot read key file {path}: {e.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"key file {path}: not hex") from None
    if len(key) != 32:
        raise UsageError(f"key file {path}: a key is 32 bytes (64 hex digits)")
    return key


def _write_key(path: str, key: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise UsageError(f"cannot create key file {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    t = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def run(args: argparse.Namespace) -> int:
    from agent.keys import KeyStore
    from stationctl.dbopen import DB_ERRORS, name, open_store, reason

    url = _db_url(args)
    # a command that reads never creates a database, nor does one that changes a key
    # (CONTRACT v2 §8): only `add --create` makes a new one
    create = args.keys_cmd == "add" and args.create
    readonly = args.keys_cmd == "list"
    try:
        store = open_store(url, create=create, readonly=readonly)
    except OSError as e:  # e.g. a directory that does not exist
        raise UsageError(f"database {name(url)}: {reason(url, e)}") from None
    except UsageError as e:
        if args.keys_cmd == "add" and not create:
            raise UsageError(f"{e} (`keys add --create` makes a new one)") from None
        raise
    with KeyStore(store) as ks:
        try:
            return _do(ks, args)
        except ValueError as e:
            raise UsageError(str(e)) from None
        except DB_ERRORS as e:
            print(f"stationctl keys: database {name(url)}: {reason(url, e)}", file=sys.stderr)
            return 1
        finally:
            store.close()


def _do(ks: Any, args: argparse.Namespace) -> int:
    import secrets

    cmd = args.keys_cmd
    if cmd == "add":
        if args.key_file:
            key = _read_key(args.key_file)
            kid = ks.add(args.sid, key, args.kid)
        else:
            key = secrets.token_bytes(32)
            _write_key(args.generate, key)
            try:
                kid = ks.add(args.sid, key, args.kid)
            except ValueError:
                os.unlink(args.generate)  # no file for a key the database refused
                raise
            print(f"{args.sid} kid {kid} added; key written to {args.generate}")
            return 0
        print(f"{args.sid} kid {kid} added")
    elif cmd == "rotate":
        key = secrets.token_bytes(32)
        _write_key(args.key_out, key)
        try:
            kid = ks.add(args.sid, key)  # what KeyStore.rotate does, with the file made first
        except ValueError:
            os.unlink(args.key_out)
            raise
        print(
            f"{args.sid} kid {kid} active; key written to {args.key_out}; older kids stay "
            "valid until revoked"
        )
    elif cmd == "revoke":
        n = ks.revoke(args.sid, args.kid)
        if n == 0:
            what = f"key {args.kid}" if args.kid is not None else "key"
            raise UsageError(f"{args.sid} has no unrevoked {what}")
        print(f"{args.sid}: {n} key(s) revoked")
    else:
        print("sid\tkid\tstate\tcreated\tretired\trevoked")
        for i in ks.list(args.sid):
            print(
                f"{i.sid}\t{i.kid}\t{i.state}\t{_iso(i.created_ms)}\t{_iso(i.retired_ms)}\t"
                f"{_iso(i.revoked_ms)}"
            )
    return 0
