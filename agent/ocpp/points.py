"""The OCPP charge points the agent accepts (CONTRACT §11; `stationctl ocpp`).

Each point is a station id (its OCPP identity, CONTRACT §5.1's station id rules) with its
own password (OCPP security profiles 1 and 2: HTTP Basic auth; kept as an argon2 hash,
never the password) and, when its meter signs its values (OCMF), the meter's public key.
A revoked point is refused at its next connection; its frames stay in raw and verify.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Self

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from agent.ocpp import ocmf
from agent.store import Store, now_ms
from agent.wire import check_sid

# A charger's password is a machine secret of 16..40 characters (OCPP 2.0.1's rule), not a
# person's: argon2 at 1 pass over 8 MiB (~4 ms here) keeps a fleet reconnecting at once
# (after an agent restart) from queueing seconds of hashing; the default (~100 ms each)
# made 100 chargers' logins take 10 s, past their handshake timeout.
_ph = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
MIN_PASSWORD = 16  # OCPP 2.0.1 asks 16..40 characters of a charger's basic auth password
MAX_PASSWORD = 40


@dataclass(frozen=True)
class Point:
    sid: str
    public_key: str  # '' when its meter does not sign
    created_ms: int
    revoked_ms: int | None
    note: str


class PointError(ValueError):
    pass


class Points:
    """`Points(store)`: add, change and list charge points; `check` a login."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()

    def add(
        self, sid: str, password: str | None = None, public_key: str = "", note: str = ""
    ) -> str:
        """Register a point; returns its password (a new random one when None)."""
        check_sid(sid)
        pw = password if password is not None else secrets.token_urlsafe(24)[:32]
        _check_password(pw)
        key = _check_key(public_key)
        with self.store.transaction() as db:
            if db.execute("SELECT 1 FROM ocpp_points WHERE sid = ?", (sid,)).fetchone():
                raise PointError(f"charge point {sid} exists (use `ocpp password` or `ocpp key`)")
            db.execute(
                "INSERT INTO ocpp_points (sid, secret, public_key, created_ms, revoked_ms, note)"
                " VALUES (?, ?, ?, ?, NULL, ?)",
                (sid, _ph.hash(pw), key, now_ms(), note),
            )
        return pw

    def set_password(self, sid: str, password: str | None = None) -> str:
        pw = password if password is not None else secrets.token_urlsafe(24)[:32]
        _check_password(pw)
        self._update(sid, "secret = ?", (_ph.hash(pw),))
        return pw

    def set_key(self, sid: str, public_key: str) -> None:
        self._update(sid, "public_key = ?", (_check_key(public_key),))

    def revoke(self, sid: str) -> None:
        self._update(sid, "revoked_ms = ?", (now_ms(),))

    def _update(self, sid: str, what: str, args: tuple[object, ...]) -> None:
        with self.store.transaction() as db:
            cur = db.execute(f"UPDATE ocpp_points SET {what} WHERE sid = ?", (*args, sid))
            if cur.rowcount == 0:
                raise PointError(f"no charge point {sid}")

    def get(self, sid: str) -> Point | None:
        row = self.store.db.execute(
            "SELECT sid, public_key, created_ms, revoked_ms, note FROM ocpp_points WHERE sid = ?",
            (sid,),
        ).fetchone()
        return None if row is None else Point(*row)

    def all(self) -> list[Point]:
        rows = self.store.db.execute(
            "SELECT sid, public_key, created_ms, revoked_ms, note FROM ocpp_points ORDER BY sid"
        ).fetchall()
        return [Point(*r) for r in rows]

    def public_keys(self) -> dict[str, str]:
        """Each point's OCMF public key, for `verify` (points without one left out)."""
        return {p.sid: p.public_key for p in self.all() if p.public_key}

    def check(self, sid: str, password: str) -> Point | None:
        """The point when `password` is its password and it is in service; else None.
        (argon2: tens of ms; the endpoint runs it off its event loop.)"""
        row = self.store.db.execute(
            "SELECT secret, revoked_ms FROM ocpp_points WHERE sid = ?", (sid,)
        ).fetchone()
        if row is None or row[1] is not None:
            return None
        try:
            _ph.verify(row[0], password)
        except (VerificationError, InvalidHashError):
            return None
        return self.get(sid)


def _check_password(pw: str) -> None:
    if not MIN_PASSWORD <= len(pw) <= MAX_PASSWORD or not pw.isprintable():
        raise PointError(
            f"a charge point's password is {MIN_PASSWORD}..{MAX_PASSWORD} printable characters"
        )


def _check_key(text: str) -> str:
    text = text.strip()
    if text:
        try:
            ocmf.load_public_key(text)
        except ocmf.OcmfError as e:
            raise PointError(f"public key: {e}") from None
    return text


def ocpp_public_keys(store: Store) -> dict[str, str]:
    """Every charge point's OCMF public key (for `verify`); {} on a database from before
    OCPP sources (schema < 6: no table)."""
    if (store.schema_version() or 0) < 6:
        return {}
    return Points(store).public_keys()
