"""Station keys in the agent database (the `keys` table of agent/store/).

Each station has one or more 32-byte HMAC keys, numbered by `kid` (CONTRACT §5.1). The
newest is `active` (what the station signs with); adding or rotating makes the previous
one `retired`: it still verifies the messages it signed (a station's outbox may hold
them for days) until it is revoked. A `revoked` key verifies nothing.

Keys are never logged or printed; `list()` returns everything but the key bytes.
The flashing tool uses this API: `add` / `rotate` to provision, `current` to write a
station's config, `max_boot` for its `boot_base` (CONTRACT §5.1).
"""

from __future__ import annotations

import secrets
import time
from typing import NamedTuple, Self

from agent.store import Store, now_ms
from agent.wire import Reason, WireError, check_sid

KEY_BYTES = 32
STATES = ("active", "retired", "revoked")


class KeyInfo(NamedTuple):
    sid: str
    kid: int
    state: str  # active | retired | revoked
    created_ms: int
    retired_ms: int | None
    revoked_ms: int | None


class KeyStore:
    """`KeyStore("sqlite:///agent.db")` (or a path, a postgresql:// URL, or an open `Store`)."""

    def __init__(self, db: str | Store) -> None:
        self._own = not isinstance(db, Store)
        self.store = Store(db) if isinstance(db, str) else db

    def close(self) -> None:
        if self._own:
            self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, sid: str, key: bytes, kid: int | None = None) -> int:
        """Add a key; returns its kid (next free one when None). The key with the highest
        kid is the station's active key; the one it replaces becomes retired."""
        check_sid(sid)
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a station key is {KEY_BYTES} bytes")
        if kid is not None and (type(kid) is not int or kid < 0):
            raise ValueError("kid must be a non-negative integer")
        t = now_ms()
        with self.store.transaction() as db:
            if self.store.engine == "postgresql":
                # one add per station at a time (SQLite's BEGIN IMMEDIATE is a write lock
                # already): two would each retire the active key they see, both new ones
                # active; the next statement's snapshot sees what the other committed
                db.execute("SELECT pg_advisory_xact_lock(7262002, hashtext(?))", (sid,))
            top = db.execute("SELECT MAX(kid) FROM keys WHERE sid = ?", (sid,)).fetchone()[0]
            if kid is None:
                kid = 1 if top is None else int(top) + 1
            elif db.execute("SELECT 1 FROM keys WHERE sid = ? AND kid = ?", (sid, kid)).fetchone():
                raise ValueError(f"{sid} already has a key {kid}")
            newest = top is None or kid > int(top)
            if newest:
                db.execute(
                    "UPDATE keys SET state = 'retired', retired_ms = ? "
                    "WHERE sid = ? AND state = 'active'",
                    (t, sid),
                )
            db.execute(
                "INSERT INTO keys (sid, kid, key, state, created_ms, retired_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (sid, kid, key, "active" if newest else "retired", t, None if newest else t),
            )
        return kid

    def rotate(self, sid: str) -> tuple[int, bytes]:
        """A fresh random key with the next kid; the old ones stay valid until revoked."""
        key = secrets.token_bytes(KEY_BYTES)
        return self.add(sid, key), key

    def revoke(self, sid: str, kid: int | None = None) -> int:
        """Revoke one key, or every key of the station; returns how many were revoked."""
        check_sid(sid)
        q = "UPDATE keys SET state = 'revoked', revoked_ms = ? WHERE sid = ? AND state != 'revoked'"
        args: tuple[object, ...] = (now_ms(), sid)
        if kid is not None:
            q += " AND kid = ?"
            args += (kid,)
        with self.store.transaction() as db:
            return int(db.execute(q, args).rowcount)

    def get(self, sid: str, kid: int) -> bytes | None:
        """The key that verifies (sid, kid), or None if unknown or revoked."""
        row = self.store.db.execute(
            "SELECT key FROM keys WHERE sid = ? AND kid = ? AND state != 'revoked'", (sid, kid)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def current(self, sid: str) -> tuple[int, bytes] | None:
        """The station's active (kid, key), for writing its config; None if it has none."""
        row = self.store.db.execute(
            "SELECT kid, key FROM keys WHERE sid = ? AND state = 'active'", (sid,)
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def list(self, sid: str | None = None) -> list[KeyInfo]:
        q = "SELECT sid, kid, state, created_ms, retired_ms, revoked_ms FROM keys"
        args: tuple[str, ...] = ()
        if sid is not None:
            q += " WHERE sid = ?"
            args = (sid,)
        rows = self.store.db.execute(q + " ORDER BY sid, kid", args).fetchall()
        return [KeyInfo(r[0], int(r[1]), r[2], r[3], r[4], r[5]) for r in rows]

    def max_boot(self, sid: str) -> int | None:
        """Highest boot stored in raw for the station (the flashing tool's boot_base − 1)."""
        return self.store.max_boot(sid)

    def ring(self, min_reload_s: float = 1.0) -> CachedKeys:
        return CachedKeys(self, min_reload_s)


class CachedKeys:
    """The ingest path's `wire.KeyRing`: all keys in memory, reloaded on `reload()` (the
    service calls it every few seconds, so revocations take effect) and on a miss (at most
    once per `min_reload_s`, so a flood of unknown stations costs one query a second).

    Every load notes the stations that gained a usable key (all of them on the first
    load); `take_learned()` hands them over, so that the service re-verifies what was
    quarantined for want of that key."""

    def __init__(self, keystore: KeyStore, min_reload_s: float = 1.0) -> None:
        self._ks = keystore
        self._min = min_reload_s
        self._keys: dict[tuple[str, int], bytes | None] = {}
        self._sids: set[str] = set()
        self._learned: set[str] = set()
        self._loaded = 0.0
        self.reload()

    def __repr__(self) -> str:  # never show key bytes
        return f"<CachedKeys {len(self._keys)} keys>"

    def reload(self) -> None:
        rows = self._ks.store.db.execute("SELECT sid, kid, key, state FROM keys").fetchall()
        keys = {(r[0], int(r[1])): None if r[3] == "revoked" else bytes(r[2]) for r in rows}
        old = self._keys
        self._learned.update(
            sk[0] for sk, k in keys.items() if k is not None and old.get(sk) is None
        )
        self._keys = keys
        self._sids = {r[0] for r in rows}
        self._loaded = time.monotonic()

    def take_learned(self) -> set[str]:
        """Stations that gained a usable (sid, kid) since the last call (cleared)."""
        got, self._learned = self._learned, set()
        return got

    def key(self, sid: str, kid: int) -> bytes:
        k = self._keys.get((sid, kid), b"")
        if k == b"" and time.monotonic() - self._loaded >= self._min:
            self.reload()
            k = self._keys.get((sid, kid), b"")
        if k is None:
            raise WireError(Reason.REVOKED_KEY, f"{sid} key {kid} is revoked")
        if k == b"":
            if sid in self._sids:
                raise WireError(Reason.UNKNOWN_KID, f"{sid} has no key {kid}")
            raise WireError(Reason.UNKNOWN_STATION, f"no key for station {sid}")
        return k
