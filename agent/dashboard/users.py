"""The dashboard's accounts, API tokens, login sessions and alarm acknowledgements: a SQLite
file of their own (never the agent's database: a dashboard reader must not need write
access there, and a PostgreSQL agent has no file to put them beside).

    store = UserStore.open("users.db", create=True)   # created 0600
    store.add_user("ana", "operator", "a password")
    user = store.check_password("ana", "a password")   # User or None

Passwords are argon2id hashes (argon2-cffi); tokens and session ids are random and only
their SHA-256 is kept, so a copy of the file lets no one in.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ROLES: Final = ("viewer", "operator", "admin")  # each may do what the ones before it may
USER_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
TOKEN_PREFIX: Final = "stk_"
SESSION_IDLE_MS: Final = 12 * 3600_000  # a session unused this long is over
SESSION_MAX_MS: Final = 7 * 86_400_000  # and every session after a week
_TOUCH_MS: Final = 60_000  # how stale a session's last-use time may get (one write a minute)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, pw_hash TEXT NOT NULL, created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    hash TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    csrf TEXT NOT NULL, created_ms INTEGER NOT NULL, used_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS acks (
    alarm_id TEXT NOT NULL, since_ms INTEGER NOT NULL, user TEXT NOT NULL, at_ms INTEGER NOT NULL,
    PRIMARY KEY (alarm_id, since_ms)
);
"""


class NoUsersDb(FileNotFoundError):
    """The users database does not exist (and the caller only reads)."""


class UserError(ValueError):
    """A bad name, role or password, or no such user or token: the message says which."""


@dataclass(frozen=True)
class User:
    name: str
    role: str


@dataclass(frozen=True)
class Session:
    id: str  # what the cookie holds (only its hash is stored)
    user: str
    role: str
    csrf: str


@dataclass(frozen=True)
class Ack:
    alarm_id: str
    since_ms: int
    user: str
    at_ms: int


def role_rank(role: str) -> int:
    return ROLES.index(role)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return role


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> int:
    return time.time_ns() // 1_000_000


_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so a wrong name costs what a wrong
    password costs (no telling names apart by the answer's time)."""
    return _hasher.hash(secrets.token_hex(16))


class UserStore:
    """One connection shared by the dashboard's threads (guarded by a lock)."""

    def __init__(self, path: str, db: sqlite3.Connection) -> None:
        self.path = path
        self._db = db
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False) -> UserStore:
        """Open the file; `create`: make it (mode 0600) if missing, else NoUsersDb."""
        p = os.fspath(path)
        if not os.path.exists(p):
            if not create:
                raise NoUsersDb(f"no users database {p}")
            # created by us with 0600 before SQLite opens it (its journal files follow
            # the main file's mode)
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        db = sqlite3.connect(p, check_same_thread=False, isolation_level=None, timeout=5.0)
        db.execute("PRAGMA foreign_keys = ON")
        db.executescript(_SCHEMA)
        return cls(p, db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> UserStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: tuple[object, ...]) -> tuple[object, ...] | None:
        with self._lock:
            row: tuple[object, ...] | None = self._db.execute(sql, args).fetchone()
            return row

    # ---- users ----------------------------------------------------------------------------

    def add_user(self, name: str, role: str, password: str) -> None:
        if not USER_RE.fullmatch(name):
            raise UserError(f"bad user name {name!r} (letters, digits, . _ @ -; up to 64)")
        check_role(role)
        _check_password(password)
        h = _hasher.hash(password)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise UserError(f"user {name} exists")
            db.execute(
                "INSERT INTO users (name, role, pw_hash, created_ms) VALUES (?, ?, ?, ?)",
                (name, role, h, _now()),
            )

    def users(self) -> list[User]:
        with self._lock:
            rows = self._db.execute("SELECT name, role FROM users ORDER BY name").fetchall()
        return [User(n, r) for n, r in rows]

    def user(self, name: str) -> User | None:
        row = self._one("SELECT name, role FROM users WHERE name = ?", (name,))
        return None if row is None else User(str(row[0]), str(row[1]))

    def remove_user(self, name: str) -> None:
        with self._tx() as db:
            if not db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount:
                raise UserError(f"no user {name}")

    def set_role(self, name: str, role: str) -> None:
        check_role(role)
        with self._tx() as db:
            if not db.execute("UPDATE users SET role = ? WHERE name = ?", (role, name)).rowcount:
                raise UserError(f"no user {name}")

    def set_password(self, name: str, password: str) -> None:
        """A new password; the user's sessions end (whoever knew the old one is out)."""
        _check_password(password)
        h = _hasher.hash(password)
        with self._tx() as db:
            if not db.execute("UPDATE users SET pw_hash = ? WHERE name = ?", (h, name)).rowcount:
                raise UserError(f"no user {name}")
            db.execute("DELETE FROM sessions WHERE user = ?", (name,))

    def check_password(self, name: str, password: str) -> User | None:
        """The user when `password` is theirs, else None (as slow either way)."""
        row = self._one("SELECT role, pw_hash FROM users WHERE name = ?", (name,))
        h = _dummy_hash() if row is None else str(row[1])
        try:
            _hasher.verify(h, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        if _hasher.check_needs_rehash(h):  # the library's parameters went up since
            with self._tx() as db:
                db.execute(
                    "UPDATE users SET pw_hash = ? WHERE name = ?", (_hasher.hash(password), name)
                )
        return User(name, str(row[0]))

    # ---- read-only API tokens ---------------------------------------------------------------

    def add_token(self, name: str) -> str:
        """A new token named `name`: returned once, only its hash is kept."""
        if not USER_RE.fullmatch(name):
            raise UserError(f"bad token name {name!r} (letters, digits, . _ @ -; up to 64)")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM tokens WHERE name = ?", (name,)).fetchone():
                raise UserError(f"token {name} exists")
            db.execute(
                "INSERT INTO tokens (name, hash, created_ms) VALUES (?, ?, ?)",
                (name, _sha(token), _now()),
            )
        return token

    def tokens(self) -> list[tuple[str, int]]:
        """(name, created_ms) of every token."""
        with self._lock:
            rows = self._db.execute("SELECT name, created_ms FROM tokens ORDER BY name").fetchall()
        return [(str(n), int(c)) for n, c in rows]

    def revoke_token(self, name: str) -> None:
        with self._tx() as db:
            if not db.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount:
                raise UserError(f"no token {name}")

    def token_name(self, token: str) -> str | None:
        """The name of a valid token (looked up by its hash), else None."""
        row = self._one("SELECT name FROM tokens WHERE hash = ?", (_sha(token),))
        return None if row is None else str(row[0])

    # ---- sessions -------------------------------------------------------------------------

    def new_session(self, user: User) -> Session:
        sid, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), _now()
        with self._tx() as db:
            db.execute(
                "DELETE FROM sessions WHERE used_ms < ? OR created_ms < ?",
                (now - SESSION_IDLE_MS, now - SESSION_MAX_MS),
            )
            db.execute(
                "INSERT INTO sessions (hash, user, csrf, created_ms, used_ms) VALUES (?, ?, ?, ?, ?)",
                (_sha(sid), user.name, csrf, now, now),
            )
        return Session(sid, user.name, user.role, csrf)

    def session(self, sid: str) -> Session | None:
        """The live session with this id, its user's role as it is now; None if unknown or
        expired."""
        h, now = _sha(sid), _now()
        row = self._one(
            "SELECT s.user, u.role, s.csrf, s.created_ms, s.used_ms FROM sessions s"
            " JOIN users u ON u.name = s.user WHERE s.hash = ?",
            (h,),
        )
        if row is None:
            return None
        user, role, csrf, created, used = row
        assert isinstance(created, int) and isinstance(used, int)
        if used < now - SESSION_IDLE_MS or created < now - SESSION_MAX_MS:
            return None
        if now - used > _TOUCH_MS:
            with self._tx() as db:
                db.execute("UPDATE sessions SET used_ms = ? WHERE hash = ?", (now, h))
        return Session(sid, str(user), str(role), str(csrf))

    def end_session(self, sid: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE hash = ?", (_sha(sid),))

    # ---- alarm acknowledgements -----------------------------------------------------------

    def ack(self, alarm_id: str, since_ms: int, user: str) -> Ack:
        """Record that `user` acknowledged the alarm `alarm_id` raised at `since_ms` (an
        alarm that clears and comes back is a new one); the first acknowledgement stays."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO acks (alarm_id, since_ms, user, at_ms) VALUES (?, ?, ?, ?)",
                (alarm_id, since_ms, user, _now()),
            )
            row = db.execute(
                "SELECT user, at_ms FROM acks WHERE alarm_id = ? AND since_ms = ?",
                (alarm_id, since_ms),
            ).fetchone()
        return Ack(alarm_id, since_ms, str(row[0]), int(row[1]))

    def acks(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], Ack]:
        """The acknowledgements of these (alarm id, since_ms)."""
        if not keys:
            return {}
        out: dict[tuple[str, int], Ack] = {}
        with self._lock:
            for aid, since in keys:
                row = self._db.execute(
                    "SELECT user, at_ms FROM acks WHERE alarm_id = ? AND since_ms = ?",
                    (aid, since),
                ).fetchone()
                if row is not None:
                    out[(aid, since)] = Ack(aid, since, str(row[0]), int(row[1]))
        return out

    def acks_between(self, from_ms: int, to_ms: int) -> list[Ack]:
        """The acknowledgements of alarm occurrences raised in [from_ms, to_ms) (the
        alarm history: they outlive the dashboard's memory of the alarm)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT alarm_id, since_ms, user, at_ms FROM acks"
                " WHERE since_ms >= ? AND since_ms < ? ORDER BY since_ms DESC",
                (from_ms, to_ms),
            ).fetchall()
        return [Ack(str(a), int(s), str(u), int(t)) for a, s, u, t in rows]


def _check_password(password: str) -> None:
    if len(password) < 8:
        raise UserError("a password needs at least 8 characters")
    if len(password) > 1024:
        raise UserError("a password may have at most 1024 characters")
