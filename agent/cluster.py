"""Several agents on one broker and one PostgreSQL: fixed shards, one owner each.

The fleet's stations are split into `shards` fixed shards (`shard_of`: CRC-32 of the
station id). Each shard is one persistent MQTT session (client id `<client_id>-shard-NN`)
and one PostgreSQL advisory lock. The agent that holds the lock is the only one connected
with that client id, the only one that writes that shard's stations (raw rows, records,
metering state) and so each station has one writer at a time. Why this shape and what it
costs is in docs/scaling.md; in short:

- A shard's session outlives its owner: what arrives while no one holds it waits in the
  broker (persistent session), and what the dead owner read but had not acknowledged is
  sent again to the next owner that connects with the same client id. Nothing is lost,
  nothing reordered within a station; a message committed but not acknowledged comes
  again and is a counted duplicate.
- The lock lives on the agent's writer connection, the one that commits: a commit that
  succeeds was made while the lock was held (a session-level advisory lock goes only with
  its connection). When that connection breaks, every lock of the agent goes with it; the
  agent takes them again on its new connection before writing anything, and gives up
  (stops the session, forgets the stations) the shards another agent took meanwhile.
- A dead agent's connection closes with its process, PostgreSQL drops its locks at once,
  and the others take its shards at their next balancing round (every `balance_s`).
- Balance: an agent holds at most ceil(shards / live agents); live agents are the writer
  connections PostgreSQL sees (`application_name` agent-writer:<agent id>).

Every shard session subscribes to the whole fleet's topics and keeps only its own
stations' messages (the others are acknowledged at once: their own shard's session has
its copy). MQTT wildcards cannot split a topic space by a hash, and per-station
subscriptions would lose what a station publishes before its shard learns of it; the cost
is that the broker sends each message once per shard (measured in docs/scaling.md).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import zlib
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

LOCK_CLASS = 726_2013  # advisory lock namespace (first key) of the shard locks
WRITER_APP = "agent-writer:"  # application_name prefix of each agent's writer connection


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """[cluster]: this agent is one of several on a PostgreSQL database."""

    shards: int = 8  # fixed for a deployment: changing it moves stations between sessions
    agent_id: str = ""  # default: <host>-<pid>
    balance_s: float = 1.0  # how often shards are counted, taken and given back

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= 256:
            raise ValueError(f"shards must be 1..256, not {self.shards}")
        if not self.balance_s > 0:
            raise ValueError("balance_s must be > 0")

    def ident(self) -> str:
        return self.agent_id or f"{socket.gethostname()}-{os.getpid()}"


def shard_of(sid: str, shards: int) -> int:
    """The shard of a station: stable across processes, hosts and Python versions."""
    return zlib.crc32(sid.encode()) % shards


def shard_client_id(base: str, k: int) -> str:
    return f"{base}-shard-{k:02d}"


def target(shards: int, live: int) -> int:
    """Most shards one agent holds when `live` agents share them."""
    return math.ceil(shards / max(1, live))


class Leases:
    """The shard locks on the agent's writer connection (database thread only)."""

    def __init__(self, store: Any, cfg: ClusterConfig) -> None:
        self.store = store
        self.cfg = cfg
        self.held: set[int] = set()
        self.generation = store.db.generation  # the connection the locks were taken on

    def live_agents(self) -> int:
        row = self.store.db.execute(
            "SELECT COUNT(DISTINCT application_name) FROM pg_stat_activity "
            "WHERE application_name LIKE ? AND datname = current_database()",
            (WRITER_APP + "%",),
        ).fetchone()
        return max(1, int(row[0]))

    def try_take(self, k: int) -> bool:
        row = self.store.db.execute("SELECT pg_try_advisory_lock(?, ?)", (LOCK_CLASS, k)).fetchone()
        if row[0]:
            self.held.add(k)
        return bool(row[0])

    def give_back(self, k: int) -> None:
        self.held.discard(k)
        # session advisory locks count: one taken twice on a connection (re-taken after a
        # reconnect that happened during a round) is released as often
        for _ in range(8):
            row = self.store.db.execute(
                "SELECT pg_advisory_unlock(?, ?)", (LOCK_CLASS, k)
            ).fetchone()
            if not row[0]:
                break

    def reverify(self) -> set[int]:
        """After the writer connection was opened again (its locks went with the old one):
        take every held shard again; returns those another agent holds now (lost)."""
        db = self.store.db
        db.execute("SELECT 1")  # opens the connection again if it broke
        if db.generation == self.generation:
            return set()
        lost = set()
        for k in sorted(self.held):
            row = db.execute("SELECT pg_try_advisory_lock(?, ?)", (LOCK_CLASS, k)).fetchone()
            if not row[0]:
                lost.add(k)
        self.held -= lost
        self.generation = db.generation
        if lost:
            log.warning("lost shard(s) %s while the database connection was down", sorted(lost))
        return lost

    def check(self) -> None:
        """Inside a write transaction: the locks are those of this connection (else the
        transaction is rolled back and retried after `reverify`)."""
        if self.store.db.generation != self.generation:
            raise LeasesChanged("the database connection was opened again: shards to re-take")

    def balance(self) -> tuple[list[int], list[int]]:
        """One round: (shards taken now, one shard to give back when this agent holds more
        than its share). Free shards are tried from a point of the ring that depends on the
        agent id, so that agents starting together do not all try the same ones first."""
        want = target(self.cfg.shards, self.live_agents())
        if len(self.held) > want:
            return [], [max(self.held)]  # one per round: the others take it, then the next
        taken: list[int] = []
        n = self.cfg.shards
        start = zlib.crc32(self.cfg.ident().encode()) % n
        for k in ((start + i) % n for i in range(n)):
            if len(self.held) >= want:
                break
            if k not in self.held and self.try_take(k):
                taken.append(k)
        return taken, []


class LeasesChanged(ConnectionError):
    """The writer connection changed under a transaction: retried once the shard locks are
    taken again (an environment error, like a lost connection)."""
