"""Opening the agent database for a command (CONTRACT §8: `--db URL`).

A path, sqlite:///PATH or postgresql://…. Every failure is a UsageError (exit 2) of one
line that names the database without its password: a file that does not exist, a
PostgreSQL server that cannot be reached, a database that does not exist or is not an
agent's, or of another schema version.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from typing import Any, Final

import psycopg

from stationctl.errors import UsageError

DB_ERRORS: Final = (sqlite3.Error, psycopg.Error)


def name(url: str) -> str:
    """The database as messages name it (agent.store.sql.describe); a URL of another
    scheme is bad usage."""
    from agent.store.sql import describe

    try:
        return describe(url)
    except ValueError as e:
        raise UsageError(str(e)) from None


def reason(url: str, e: BaseException) -> str:
    """An error's message on one line, without the URL's password should it quote it."""
    text = " ".join(str(e).split()) or type(e).__name__
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return text


def open_store(url: str, **kw: Any) -> Any:
    """`agent.store.Store(url, **kw)`, its failures as UsageError (see above)."""
    from agent.store import Store
    from agent.store.sql import SchemaError

    n = name(url)
    try:
        return Store(url, **kw)
    except FileNotFoundError as e:
        raise UsageError(reason(url, e)) from None
    except (SchemaError, ValueError, *DB_ERRORS) as e:
        raise UsageError(f"database {n}: {reason(url, e)}") from None
