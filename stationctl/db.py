"""`stationctl db version|upgrade --db URL`: the agent database's schema, for operators.

An agent refuses a database whose schema is not its own and says which; `upgrade` brings an
older one up to this program's version in one transaction (take a backup first: SQLite,
copy the file with the agent stopped; PostgreSQL, pg_dump). Neither creates a database.
"""

from __future__ import annotations

import argparse
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("db", help="the agent database's schema: version, upgrade (operators)")
    dsub = p.add_subparsers(dest="db_cmd", required=True, metavar="ACTION")
    for name, text in (
        ("version", "print the database's schema version and this program's"),
        ("upgrade", "upgrade an older database to this program's schema"),
    ):
        q = dsub.add_parser(name, help=text)
        q.add_argument(
            "--db", required=True, metavar="URL", help="a path, sqlite:///PATH or postgresql://…"
        )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.store import SCHEMA_VERSION, Store
    from agent.store.sql import SchemaError, describe

    try:
        name = describe(args.db)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        st = Store(args.db, create=False, upgrade=args.db_cmd == "upgrade")
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except SchemaError as e:
        if args.db_cmd == "upgrade":
            raise UsageError(str(e)) from None
        # version: say what the database has even when this program cannot use it
        print(f"{name}: {e}")
        return 1
    except Exception as e:
        raise UsageError(f"database {name}: {e}") from None
    with st:
        have = st.schema_version()
    print(f"{name}: schema {have}, this program's {SCHEMA_VERSION}")
    return 0
