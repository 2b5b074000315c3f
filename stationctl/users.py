"""`stationctl users`: the dashboard's accounts and read-only API tokens (docs/dashboard.md,
Login), in their own SQLite file (created 0600 by the first `add` or `token add`).

    stationctl users --users-db users.db add ana --role operator      # asks for the password
    stationctl users add ana --role admin --password-file pw.txt      # or --password-stdin
    stationctl users list | remove NAME | set-role NAME ROLE | passwd NAME
    stationctl users token add grafana        # prints the token once; only its hash is kept
    stationctl users token list | revoke NAME

The file: `--users-db`, else `[dashboard] users_db` of `--config`, else users.db beside the
SQLite agent database of `--config` (or `--db`). A command that only reads never creates it.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    # where the file is: before or after the action (`users --users-db F list` or
    # `users list --users-db F`); SUPPRESS keeps an action's parser from resetting it
    where = argparse.ArgumentParser(add_help=False)
    g = where.add_mutually_exclusive_group()
    g.add_argument(
        "--users-db", metavar="FILE", default=argparse.SUPPRESS, help="the users database"
    )
    g.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="agent TOML (its users_db)"
    )
    g.add_argument(
        "--db", metavar="URL", default=argparse.SUPPRESS, help="agent db: users.db beside it"
    )
    u = sub.add_parser(
        "users", parents=[where], help="dashboard accounts, roles and read-only API tokens"
    )
    cmd = u.add_subparsers(dest="users_cmd", required=True, metavar="ACTION")

    def password_args(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--password-file", metavar="F", help="read the password from file F")
        g.add_argument("--password-stdin", action="store_true", help="read it from stdin")

    p = cmd.add_parser("add", help="add an account", parents=[where])
    p.add_argument("user")
    p.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    password_args(p)
    p.set_defaults(users_func=_add)
    p = cmd.add_parser("list", help="list the accounts and their roles", parents=[where])
    p.set_defaults(users_func=_list)
    p = cmd.add_parser("remove", help="remove an account (its sessions end)", parents=[where])
    p.add_argument("user")
    p.set_defaults(users_func=_remove)
    p = cmd.add_parser("set-role", help="change an account's role", parents=[where])
    p.add_argument("user")
    p.add_argument("role", choices=["viewer", "operator", "admin"])
    p.set_defaults(users_func=_set_role)
    p = cmd.add_parser(
        "passwd", help="set an account's password (its sessions end)", parents=[where]
    )
    p.add_argument("user")
    password_args(p)
    p.set_defaults(users_func=_passwd)
    t = cmd.add_parser("token", help="read-only API tokens (Authorization: Bearer …)")
    tcmd = t.add_subparsers(dest="token_cmd", required=True, metavar="ACTION")
    p = tcmd.add_parser("add", help="make a token and print it (once)", parents=[where])
    p.add_argument("name")
    p.set_defaults(users_func=_token_add)
    p = tcmd.add_parser(
        "list", help="list the tokens (names and dates, never the tokens)", parents=[where]
    )
    p.set_defaults(users_func=_token_list)
    p = tcmd.add_parser("revoke", help="revoke a token", parents=[where])
    p.add_argument("name")
    p.set_defaults(users_func=_token_revoke)
    u.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.dashboard.users import NoUsersDb, UserError, UserStore

    path = users_db_arg(args)
    creates = args.users_func in (_add, _token_add)
    try:
        store = UserStore.open(path, create=creates)
    except NoUsersDb:
        raise UsageError(f"no users database {path} (`stationctl users add` makes it)") from None
    except Exception as e:  # sqlite3.Error, OSError: not a file we can use
        raise UsageError(f"users database {path}: {e}") from None
    with store:
        try:
            args.users_func(store, args)
        except UserError as e:
            raise UsageError(str(e)) from None
    return 0


def users_db_arg(args: argparse.Namespace) -> str:
    """The users database the arguments name (see the module's doc)."""
    from agent.config import ConfigError, load_config
    from agent.dashboard.auth import users_db_path

    users_db, config, db = (getattr(args, k, None) for k in ("users_db", "config", "db"))
    if users_db:
        return str(users_db)
    try:
        if config:
            cfg = load_config(config)
            dc = cfg.dashboard
            return users_db_path(dc.users_db if dc else None, cfg.db.url)
        if db:
            return users_db_path(None, db)
    except (ConfigError, ValueError) as e:
        raise UsageError(str(e)) from None
    raise UsageError("name the users database: --users-db FILE, --config FILE or --db URL")


def _password(args: argparse.Namespace, user: str) -> str:
    if args.password_file:
        try:
            with open(args.password_file) as f:
                return f.read().rstrip("\r\n")
        except OSError as e:
            raise UsageError(f"cannot read {args.password_file}: {e.strerror}") from None
    if args.password_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    pw = getpass.getpass(f"password for {user}: ")
    if getpass.getpass("again: ") != pw:
        raise UsageError("the passwords differ")
    return pw


def _add(store: Any, args: argparse.Namespace) -> None:
    store.add_user(args.user, args.role, _password(args, args.user))
    print(f"added {args.user} ({args.role}) to {store.path}")


def _list(store: Any, args: argparse.Namespace) -> None:
    for u in store.users():
        print(f"{u.name}\t{u.role}")


def _remove(store: Any, args: argparse.Namespace) -> None:
    store.remove_user(args.user)
    print(f"removed {args.user}")


def _set_role(store: Any, args: argparse.Namespace) -> None:
    store.set_role(args.user, args.role)
    print(f"{args.user} is now {args.role}")


def _passwd(store: Any, args: argparse.Namespace) -> None:
    if store.user(args.user) is None:
        raise UsageError(f"no user {args.user}")
    store.set_password(args.user, _password(args, args.user))
    print(f"password of {args.user} changed (their sessions ended)")


def _token_add(store: Any, args: argparse.Namespace) -> None:
    token = store.add_token(args.name)
    print(token)
    print(
        f"token {args.name}: read-only (GET /api/*), shown this once; "
        "send it as `Authorization: Bearer <token>`",
        file=sys.stderr,
    )


def _token_list(store: Any, args: argparse.Namespace) -> None:
    for name, created in store.tokens():
        print(f"{name}\t{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(created / 1000))}")


def _token_revoke(store: Any, args: argparse.Namespace) -> None:
    store.revoke_token(args.name)
    print(f"revoked {args.name}")
