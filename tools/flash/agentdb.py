"""What the flashing tool asks the agent's database, and what it registers there.

The agent answers three things about a station: whether it is known (it has keys or
messages), its key versions (the new key gets the next kid) and its highest boot (the
board's boot_base is that + 1, CONTRACT §5.1). The key is registered only once the board
has passed its self-test, so a half-provisioned board is never known as good; the kid it
was given is claimed then, and a kid taken meanwhile (a second technician on the same
station) fails the registration rather than overwriting anything.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from typing import Final

import psycopg

from agent.keys import KeyStore
from agent.store import Store
from agent.store.sql import describe, is_postgres
from tools.flash.errors import FlashError

# what the agent's database raises, either engine (SQLite, PostgreSQL)
DB_ERRORS: Final = (sqlite3.Error, psycopg.Error)


def _name(url: str) -> str:
    try:
        return describe(url)  # no password
    except ValueError:
        return url


def _why(e: BaseException) -> str:
    return " ".join(str(e).split())  # libpq's messages run over several lines


@dataclass(frozen=True, kw_only=True)
class AgentAnswer:
    url: str
    kids: list[int] = field(default_factory=list)
    active_kid: int | None = None
    max_boot: int | None = None

    @property
    def known(self) -> bool:
        return bool(self.kids) or self.max_boot is not None

    @property
    def next_kid(self) -> int:
        return max(self.kids, default=0) + 1

    @property
    def boot_base(self) -> int:
        return 0 if self.max_boot is None else self.max_boot + 1

    def as_dict(self) -> dict[str, object]:
        return {
            "url": self.url,
            "known": self.known,
            "kids": self.kids,
            "active_kid": self.active_kid,
            "max_boot": self.max_boot,
        }


def _open(url: str) -> KeyStore:
    try:
        path = None if is_postgres(url) else describe(url)
    except ValueError as e:
        raise FlashError("agent", f"agent database {url}: {e}") from None
    if path is not None and not os.path.exists(path):
        raise FlashError("agent", f"agent database {url} unreachable: no such file")
    try:
        return KeyStore(Store(url, create=False))
    except (*DB_ERRORS, OSError, ValueError) as e:
        raise FlashError("agent", f"agent database {_name(url)} unreachable: {_why(e)}") from None


def ask(url: str, sid: str) -> AgentAnswer:
    ks = _open(url)
    try:
        infos = ks.list(sid)
        cur = ks.current(sid)
        return AgentAnswer(
            url=_name(url),  # (it goes into the report: no password)
            kids=[i.kid for i in infos],
            active_kid=None if cur is None else cur[0],
            max_boot=ks.max_boot(sid),
        )
    except DB_ERRORS as e:
        raise FlashError("agent", f"agent database {_name(url)}: {_why(e)}") from None
    finally:
        ks.store.close()


def register(url: str, sid: str, key: bytes, kid: int) -> None:
    """Make (sid, kid, key) the station's active key; older kids stay valid (retired) for the
    messages still in the station's outbox."""
    ks = _open(url)
    try:
        ks.add(sid, key, kid)
    except ValueError as e:
        raise FlashError("register", f"the agent refused the key: {e}") from None
    except DB_ERRORS as e:
        raise FlashError("register", f"agent database {_name(url)}: {_why(e)}") from None
    finally:
        ks.store.close()
