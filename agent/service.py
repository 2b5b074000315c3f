"""The agent service: MQTT → verify → raw store / quarantine → PUBACK → metering → records.

Threads: the asyncio loop thread runs the MQTT client (agent/sources/mqtt.py) and
verification; one database thread runs every write and, inside the writes'
transactions, the metering (agent/ledger/agent_meter.py; each station's messages a
moment after they are committed, `_plan`: the records and the station's state commit
with the raw rows up to the state's key), so a commit (an fsync with synchronous=FULL)
never stalls the network. Batches form by themselves (group commit): while one batch
commits, the next accumulates, so a quiet agent commits each message at once and a busy
one commits thousands at a time. Acknowledgements go out only after the commit.

Failure policy (no message can stop ingest; nothing acknowledged is ever lost):
- Bad input is quarantined with its reason and counted, never raised. A verified message
  with a bad field outside the envelope is stored as received; only the field's source is
  spoiled (CONTRACT §6.9, agent/ranges.py): counted `spoiled.<source kind>`, alarmed
  (`bad_field`, naming the field), and metering gets the body without that source.
- Each message is its own guarded step. One that raises anywhere — in verification, in
  the batch's insert (e.g. an integer SQLite cannot hold) — is quarantined as `internal`
  with the exception's class and its bytes, counted and alarmed, and the rest of its batch
  goes on: a batch whose insert fails with a data error is probed row by row (savepoints,
  rolled back) to find the culprits, which go to quarantine, then written again. Metering
  runs per station inside the batch's transaction; a station whose metering raises is
  rolled back to its savepoint, alarmed and counted (its raw is safe, its records are
  recomputed from raw a minute later, METER_RETRY_S, or at the next start).
- A commit that cannot succeed (disk full, database locked or gone) acknowledges nothing,
  stops reading, marks the agent failing (`/healthz` 503, `stationctl_agent_failing`),
  retries with backoff up to 5 s and resumes by itself when the cause goes; the spell is
  then written as an alarm (`agent_db`). The writer's busy timeout is 1 s, so a locked
  database is a failure to report, not a hang.
- Stopping (SIGTERM) takes under 5 s in every state: what was read is committed and
  acknowledged for up to 2 s, the rest is left unacknowledged to the broker; a commit
  still running is interrupted (it rolls back).

Health (agent/health.py): `/healthz` and `/metrics` on the dashboard's port or the
`[health]` listener, and an `agent_health` row upserted every 2 s for the dashboard and
`stationctl watch --db`.

Late keys: a station may publish a moment before the agent has loaded its new key (it was
just provisioned by `stationctl flash` or `stationctl keys add`, another process). Those
messages are quarantined (`unknown_station` / `unknown_kid`, and acknowledged: the station
will not send them again). When the key ring learns a key (at start, on its periodic
reload or on a miss), the committer re-verifies that station's such rows from their stored
bytes, after every batch read before the key was learned has committed, and ingests the
ones that now verify like any arrival (duplicate/conflict rules, metering); their
quarantine rows stay, marked resolved. Counted as `rekey.*`. It runs only when keys change.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import gc
import heapq
import logging
import math
import os
import sqlite3
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from agent import cluster, meters, native, ranges, wire
from agent.config import AgentConfig, ConfigError
from agent.health import WRITE_S, Health, HealthServer
from agent.keys import CachedKeys, KeyStore
from agent.ledger import reads
from agent.ledger.agent_meter import StoreMeter
from agent.ledger.inputs import RawMsg, metering_input, raw_msg
from agent.ledger.periods import load_locks, params_now
from agent.sources.mqtt import DROPPED_TOPIC, Delivery, MqttSource
from agent.sources.sharded import ShardedSource
from agent.store import (
    CONFLICT,
    DUPLICATE,
    STORED,
    BatchResult,
    QuarantineEntry,
    QuarantineRow,
    RawRow,
    Store,
    now_ms,
)
from agent.store.sqlite import others_can_read

log = logging.getLogger(__name__)


# ---- the pipeline ---------------------------------------------------------------------------


# reasons that mean "no key for it yet": worth re-verifying once the station's key is known
REKEY_REASONS = (wire.Reason.UNKNOWN_STATION.value, wire.Reason.UNKNOWN_KID.value)
_REKEY_PAGE = 1000  # quarantine rows verified per step (bounds the loop's stall: ~6 ms)
_REKEY_RETRY_S = 5.0  # after a failed re-verification (database error)
_FIRST = " (first quarantined as "  # how a re-verified row's detail keeps its first reason
BUSY_MS = 1000  # the writer's busy timeout: a locked database fails a commit (retried)
_HEALTH_BUSY_MS = 250  # the health row's writer waits no longer
BACKOFF_MAX_S = 5.0  # between attempts at a commit that fails
STOP_FLUSH_S = 2.0  # on stop, commit and acknowledge what was read for up to this long
STOP_DB_S = 1.5  # then wait this long for the database thread (interrupted) to finish
ALARM_EVERY_S = 60.0  # one bad_field alarm per (station, field) per minute (counts exact)
METER_RETRY_S = 60.0  # a station whose metering raised is metered from raw again this often
METER_CHECK_S = 3600.0  # the grid meter register's calibration check (agent/meters.py)
LOCK_POLL_S = 5.0  # how often the agent looks for a newly locked monitoring period
# metering held back (see _plan): a station's committed messages wait for its next step
# about records_interval_ms, at most HOLD_STATION of them, and HOLD_MAX (~5 KB each) in all
HOLD_STATION = 500
HOLD_MAX = 20_000
STEP_BUDGET_S = 0.005  # the due stations' steps in one write (_meter_plan)
TOPICS_KEPT = 65_536  # topics parsed once (a fleet's stations x 3 kinds), then parsed afresh
INTERNAL = wire.Reason.INTERNAL.value
# a failed commit the database is to blame for (locked, full, gone, corrupt, I/O): the
# batch is kept and retried; anything else raised by a write is a data error of some row
_ENV_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.OperationalError,
    sqlite3.InternalError,
    OSError,
    MemoryError,
)


class DatabaseGone(OSError):
    """The database file the writer has open is no longer at its path."""


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_env(e: BaseException) -> bool:
    # sqlite3.DatabaseError itself (not a subclass): "file is not a database", corruption
    if isinstance(e, _ENV_ERRORS) or type(e) is sqlite3.DatabaseError:
        return True
    pg = sys.modules.get("agent.store.postgres")  # loaded only with a PostgreSQL store
    return pg is not None and isinstance(e, pg.ENV_ERRORS)


def _keep_shards(b: _Batch, keep: Callable[[str], bool]) -> None:
    """Leave in a batch only the rows (raw, quarantine, status) of stations `keep` keeps."""
    idx = [i for i, r in enumerate(b.rows) if keep(r.sid)]
    if len(idx) != len(b.rows):
        b.rows = [b.rows[i] for i in idx]
        b.cleaned = [b.cleaned[i] for i in idx]
    b.quarantine = [q for q in b.quarantine if keep(q.sid or "")]
    b.status = [x for x in b.status if keep(x[0])]


_tuple_new = tuple.__new__


class _Batch:
    __slots__ = (
        "deliveries",
        "first_ms",
        "internal",
        "quarantine",
        "rekey",
        "rows",
        "cleaned",
        "status",
        "waiters",
    )

    def __init__(self) -> None:
        self.first_ms = 0  # receive time of its first message (lag)
        self.rows: list[RawRow] = []
        # per row: what §6.9 leaves of it (the body metering reads) and what it spoiled
        # (for agent.ledger.inputs.raw_msg(…, cleaned=…), and the spoiled counts and alarms)
        self.cleaned: list[ranges.Cleaned] = []
        self.internal = 0  # rows moved to quarantine as `internal` by the write's probe
        self.quarantine: list[QuarantineRow] = []
        self.status: list[tuple[str, int, bytes]] = []
        self.deliveries: list[Delivery] = []
        # stations whose quarantine to re-verify once this batch (and so every message
        # verified before their key was learned) has committed
        self.rekey: set[str] = set()
        # frames of other sources (OCPP) whose senders wait for the commit (Service.enqueue)
        self.waiters: list[asyncio.Future[None]] = []

    def release(self, error: BaseException | None = None) -> None:
        """Tell the waiters: committed (error None), or not (they get `error`)."""
        for f in self.waiters:
            if not f.done():
                if error is None:
                    f.set_result(None)
                else:
                    f.set_exception(error)
        self.waiters = []


# a frame of another source (OCPP): nothing to acknowledge to the broker
_LOCAL = Delivery(0, 0, -1)

OnCommit = Callable[[list[RawRow]], None]


class _Plan(NamedTuple):
    """A write's metering (Service._plan): the stations metered in its transaction with
    their messages (those held and the batch's), the batch's messages held back, and the
    stations due, soonest first, metered while the write's budget lasts (_meter_plan)."""

    now: dict[str, list[RawMsg]]
    hold: dict[str, list[RawMsg]]
    at: float  # monotonic time of the write
    due: list[str]
    rush: bool  # flush, or too much held: every due station, no budget


class _Written(NamedTuple):
    new: list[int]
    dups: int
    conflicts: int
    records_error: str | None = None  # the records could not be written (metering output)


class Service:
    """Run with `await Service(cfg).run(stop_event)`. `counters` holds every count
    (received, stored, duplicate, conflict, quarantined, `q.<reason>`, …)."""

    def __init__(self, cfg: AgentConfig, *, on_commit: OnCommit | None = None) -> None:
        self.cfg = cfg
        self.counters: Counter[str] = Counter()
        self._on_commit = on_commit
        # the writer connection (used by the db thread only); WAL checkpoints run from a
        # connection of their own in another thread, off the commit path
        cl = cfg.cluster
        self.store = Store(
            cfg.db.url,
            synchronous=cfg.db.synchronous,
            autocheckpoint=100_000,
            app=cluster.WRITER_APP + cl.ident() if cl else "agent",
        )
        self.store.archive_dir = cfg.db.archive_dir  # recomputations read sealed raw too
        sqlite = self.store.engine == "sqlite"
        if sqlite and self.store.path is not None:
            mode = others_can_read(self.store.path)
            if mode is not None:
                self.store.close()
                raise ConfigError(
                    f"{self.store.path} is readable by others (mode {mode:04o}) and holds "
                    f"every station's key: `chmod 600 {self.store.path}` (and its -wal, -shm)"
                )
        if sqlite:
            self.store.db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
        # the file the writer has open: a commit into a file deleted or replaced under the
        # agent would "succeed" into nowhere, so each write first checks it is still there
        self._db_file = _file_id(self.store.path) if self.store.path else None
        self._ckpt_store = Store(
            cfg.db.url, synchronous=cfg.db.synchronous, create=False, app="agent-health"
        )
        if sqlite:
            self._ckpt_store.db.execute(f"PRAGMA busy_timeout = {_HEALTH_BUSY_MS}")
        self._ckpt = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agent-ckpt")
        self._ckpt_busy = False
        self._keystore = KeyStore(Store(cfg.db.url, synchronous=cfg.db.synchronous))
        self.keys: CachedKeys = self._keystore.ring()
        # metering runs in the db thread, inside each batch's transaction (_write)
        # with the last monitoring period lock in force (CONTRACT §6.8; `stationctl period`)
        self.meter = StoreMeter(params_now(cfg.metering, load_locks(self.store)), self.store)
        # messages committed and held back from metering, per station (db thread only;
        # the loop reads _held_n and _held_due); see _plan
        self._held: dict[str, list[RawMsg]] = {}
        self._due: dict[str, float] = {}  # when a station holding messages is due (monotonic)
        self._due_heap: list[tuple[float, str]] = []  # the same, soonest first (lazily pruned)
        self._held_n = 0
        self._held_due = math.inf  # when the soonest is due
        self._meter_all = False  # flush(): meter everything held at the next write
        self._meter_failed: set[str] = set()  # stations whose metering raised (retried)
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agent-db")
        self._batch = _Batch()  # filling
        self._sealed: collections.deque[_Batch] = collections.deque()  # full, to commit
        self._wake = asyncio.Event()
        self._committing = False
        self._stopping = False
        self._idle = asyncio.Event()  # set after each commit cycle
        self._rekey_retry: set[str] = set()  # re-verifications that failed, retried later
        self._rekey_retry_at = 0.0
        self._inflight: _Batch | None = None  # the batch being committed
        self._stop_now = asyncio.Event()  # set on stop: ends a commit's backoff at once
        self._alarmed: dict[tuple[str | None, str], float] = {}  # (sid, code/path) -> time
        self._health_busy = False
        self._pending_alarms: list[tuple[str | None, str, str, str, str]] = []
        self.health = Health(self.counters)
        self.health.pending = self._pending
        self.health.oldest_ms = self._oldest_ms
        self.health.held = lambda: self._held_n
        # one agent: one session for the fleet; one of several: a session per shard it holds
        self.source: MqttSource | ShardedSource
        self.leases: cluster.Leases | None = None
        if cl is None:
            self.source = MqttSource(cfg.broker, self._message, on_drained=self._wake.set)
        else:
            self.source = ShardedSource(
                cfg.broker, cl.shards, self._message, on_drained=self._wake.set
            )
            self.leases = cluster.Leases(self.store, cl)
            self.health.shards = []
        self._balanced = asyncio.Event()  # the first round of shard taking is done
        self._loop: asyncio.AbstractEventLoop | None = None  # run()'s, for the db thread
        self._dropped_seen: int | None = None  # the broker's dropped count last read
        self._bg: set[asyncio.Future[None]] = set()  # alarms written off the message path
        self._prefix = cfg.broker.prefix
        self._topics: dict[str, tuple[str, str]] = {}  # topic -> (sid, kind), see _message
        self.ready = asyncio.Event()  # set once raw is replayed and the agent is subscribed
        self.ocpp: Any = None  # the OCPP endpoint (agent/ocpp/csms.py) when [ocpp] is set
        self._ocpp_ingest: Any = None
        self.health_url: str | None = None  # where /healthz and /metrics are served

    # ---- loop thread: each message as paho delivers it -----------------------------------

    def _message(self, topic: str, payload: bytes, d: Delivery) -> None:
        if topic == DROPPED_TOPIC:
            self._broker_dropped(payload)
            return
        b = self._batch
        recv = now_ms()
        if not b.deliveries:
            b.first_ms = recv
        b.deliveries.append(d)
        try:
            parsed = self._topics.get(topic)
            if parsed is None:
                parsed = wire.parse_topic(topic, self._prefix)  # a bad one raises: not kept
                if len(self._topics) >= TOPICS_KEPT:
                    self._topics.clear()
                self._topics[topic] = parsed
            sid, kind = parsed
            if kind == "status":
                self._status(b, sid, topic, payload, recv)
            else:
                row, cleaned = self._verified(sid, kind, topic, payload, recv)
                b.rows.append(row)
                b.cleaned.append(cleaned)
        except wire.WireError as e:
            b.quarantine.append(
                QuarantineRow(
                    recv, topic, e.reason.value, e.detail, _sid_of(topic, self._prefix), payload
                )
            )
        except Exception as e:  # a bug (or RecursionError, MemoryError …) must not stop ingest
            log.exception("unexpected error on %s", topic)
            b.quarantine.append(
                QuarantineRow(
                    recv,
                    topic,
                    INTERNAL,
                    _internal("verifying", e),
                    _sid_of(topic, self._prefix),
                    payload,
                )
            )
        if len(b.deliveries) >= self.cfg.ingest.batch_max:
            self._sealed.append(b)  # full: the committer takes it as one transaction
            self._batch = _Batch()
            self._wake.set()
            if len(self._sealed) * self.cfg.ingest.batch_max >= self.cfg.ingest.max_pending:
                self.source.pause()

    def _verified(
        self, sid: str, kind: str, topic: str, payload: bytes, recv: int
    ) -> tuple[RawRow, ranges.Cleaned]:
        """A message verified (else WireError) as its raw row, and what metering is to read
        of it (inputs.raw_msg takes that in the db thread): a clean telemetry in one typed
        decode (wire.admit_telemetry), whose reads metering takes packed, anything else
        through wire.verify and what §6.9 leaves of it."""
        t = (
            wire.admit_telemetry(sid, payload, self.keys, recv_ms=recv)
            if kind == "telemetry"
            else None
        )
        if t is not None:
            # tuple.__new__ itself: a NamedTuple's __new__ is a Python function, ~0.25 µs a
            # message more for the two. Metering gets the reads packed while `t` is hot; `t`
            # is freed here (agent/ledger/reads.py)
            row = _tuple_new(RawRow, (sid, t.boot, t.seq, kind, topic, recv, t.kid, payload))
            return row, _tuple_new(ranges.Cleaned, (reads.pack(t), ()))
        v = wire.verify(kind, sid, payload, self.keys, recv_ms=recv)
        row = RawRow(sid, v.boot, v.seq, kind, topic, recv, v.kid, payload)
        return row, metering_input(kind, payload, v.cleaned)

    def enqueue(
        self,
        row: RawRow | None,
        cleaned: ranges.Cleaned | None,
        q: QuarantineRow | None,
    ) -> asyncio.Future[None]:
        """A frame of another source (OCPP, agent/ocpp/ingest.py), already checked: into
        the batch being filled, as a stored row or a quarantine row. The future is done
        once its batch is committed (an error when the agent stopped first)."""
        b = self._batch
        if not b.deliveries:
            b.first_ms = now_ms()
        b.deliveries.append(_LOCAL)
        if row is not None and cleaned is not None:
            b.rows.append(row)
            b.cleaned.append(cleaned)
        elif q is not None:
            b.quarantine.append(q)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._stopping:
            fut.set_exception(ConnectionAbortedError("the agent is stopping"))
            return fut
        b.waiters.append(fut)
        if len(b.deliveries) >= self.cfg.ingest.batch_max:
            self._sealed.append(b)
            self._batch = _Batch()
        self._wake.set()
        return fut

    def _broker_dropped(self, payload: bytes) -> None:
        """The broker's count of messages it dropped since it started (a queue limit hit:
        its publishers had their PUBACKs, the agent never sees them): alarmed as it grows."""
        try:
            n = int(payload)
        except ValueError:
            return
        seen = self._dropped_seen
        self._dropped_seen = n
        if seen is not None and n < seen:
            seen = 0  # the broker restarted: its count did too
        if n > (seen or 0):
            self.counters["broker_dropped"] += n - (seen or 0)
            since = "since it started" if seen is None else "in the last interval"
            why = (
                f"the broker dropped {n - (seen or 0)} message(s) {since} ({n} in all): "
                "queue limits reached; they never reached the agent"
            )
            log.error("%s", why)
            task = asyncio.ensure_future(
                self._alarm(None, "broker_dropped", "crit", why, key="broker_dropped", every=0.0)
            )
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    def _status(self, b: _Batch, sid: str, topic: str, payload: bytes, recv: int) -> None:
        # unsigned birth / last will: informational, kept as the station's last status
        if not payload:  # an empty retained message clears the status: nothing to keep
            self.counters["status_cleared"] += 1
            return
        try:
            obj = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise wire.WireError(wire.Reason.BAD_STATUS, "status is not a JSON object")
        if obj.get("sid") not in (None, sid):
            raise wire.WireError(wire.Reason.TOPIC_MISMATCH, f"status of {obj.get('sid')!r}")
        b.status.append((sid, recv, payload))

    # ---- the committer ---------------------------------------------------------------------

    def _write(self, b: _Batch, metering: bool = True) -> tuple[list[int], int, int]:
        """db thread: one transaction for a batch, the metering steps due (see `_plan`) and
        their records and states. `metering=False` (a batch whose metering failed as a
        whole): its stations are metered again from raw instead, as after a station's
        failure (`_meter_tx`)."""
        touched: set[str] = set()
        plan: _Plan | None = None
        apart: set[str] = set()

        def meter(res: BatchResult) -> None:
            nonlocal plan
            if self.leases is not None:
                self.leases.check()  # the shard locks are this connection's
            if not metering:
                apart.update(b.rows[i].sid for i in res.new)
                for sid in apart:
                    self.store.db.execute("DELETE FROM ledger_state WHERE sid = ?", (sid,))
                return
            msgs = []
            for i in res.new:
                r, c = b.rows[i], b.cleaned[i]
                msgs.append(raw_msg(r.sid, r.boot, r.seq, r.recv_ms, c.body, cleaned=c))
            plan = self._plan(msgs)
            self._meter_plan(plan, touched)

        try:
            res = self.store.write_batch(b.rows, b.quarantine, status=b.status, then=meter)
        except BaseException:
            # rolled back: the in-memory states of what was metered are ahead of the database
            for sid in touched:
                self.meter.forget(sid)
            raise
        if plan is not None:
            self._hold(plan)
        if apart:
            for sid in apart:
                self.meter.forget(sid)
            self._meter_failed |= apart
            self._unhold(lambda s: s not in apart)
        return res.new, res.duplicates, res.conflicts

    def _resolve(
        self,
        rows: list[RawRow],
        cleaned: list[ranges.Cleaned],
        qids: list[int],
        rejected: list[tuple[int, str, str]],
    ) -> tuple[BatchResult, list[str]]:
        """db thread: re-verified quarantine rows stored and metered in one transaction,
        as `_write` does."""
        touched: set[str] = set()
        plan: _Plan | None = None

        def meter(res: BatchResult) -> None:
            nonlocal plan
            if self.leases is not None:
                self.leases.check()
            msgs = [
                raw_msg(r.sid, r.boot, r.seq, r.recv_ms, cleaned[i].body, cleaned=cleaned[i])
                for i in res.new
                for r in (rows[i],)
            ]
            plan = self._plan(msgs)
            self._meter_plan(plan, touched)

        try:
            out = self.store.resolve_quarantine(rows, qids, rejected, then=meter)
        except BaseException:
            for sid in touched:
                self.meter.forget(sid)
            raise
        if plan is not None:
            self._hold(plan)
        return out

    # ---- metering, held back -------------------------------------------------------------

    def _plan(self, new: list[RawMsg]) -> _Plan:
        """db thread, in a write's transaction (its rows inserted): which stations take
        their metering step now, with which messages, and which of `new` wait.

        A station's step (its interval and day records upserted, its state serialized) costs
        ~0.3 ms whatever the messages in it, so a station meters messages held back since
        its last step: about records_interval_ms (`_hold`), HOLD_STATION of them, HOLD_MAX
        in all.
        Its state says which: every raw row of a station at or below its state's key is
        metered (its records are those rows'), none above it is. A message at or below the
        key (late), or of a station without a state, is metered now, with all the station
        holds; so is everything on flush() and at stop. A crash loses nothing: the rows
        above the key are in raw, and the restart meters them (StoreMeter.start, as always).
        `stationctl verify` compares each station's records with its rows up to that key."""
        now_ = time.monotonic()
        every = self._meter_all or self.cfg.ingest.records_interval_ms <= 0
        by_sid: dict[str, list[RawMsg]] = {}
        for m in new:
            if m.sid not in self._meter_failed:  # its raw is metered again from scratch
                by_sid.setdefault(m.sid, []).append(m)
        plan = _Plan({}, {}, now_, [], every)
        held = self._held
        for sid, msgs in by_sid.items():
            before = held.get(sid, [])
            if every or len(before) + len(msgs) >= HOLD_STATION or self._late(sid, msgs):
                plan.now[sid] = before + msgs
            else:
                plan.hold[sid] = msgs
        # the stations due soonest, a few a commit; while too much is held, as many more as
        # bring it down to 3/4 of HOLD_MAX (without the write's budget)
        n = self._held_n + sum(len(x) for x in plan.hold.values())
        cap = self.cfg.ingest.records_sids_per_commit
        rush = every or n > HOLD_MAX
        soonest = (
            sorted(self._due_heap) if rush else heapq.nsmallest(cap + len(plan.now), self._due_heap)
        )
        for due, sid in soonest:
            if sid in plan.now or self._due.get(sid) != due:
                continue  # metered now already, or a stale heap entry
            if not rush:
                if due > now_ or len(plan.due) >= cap:
                    break
            elif not every and n <= HOLD_MAX * 3 // 4:
                break  # was too much held: enough of it taken
            plan.due.append(sid)
            n -= len(held[sid]) + len(plan.hold.get(sid, ()))
        return plan._replace(rush=rush)

    def _meter_plan(self, plan: _Plan, touched: set[str]) -> None:
        """db thread, in the write's transaction: the stations that must be metered now,
        then those due while the write's metering has taken under STEP_BUDGET_S (at least
        one; all of them on flush or when too much is held), so that no commit grows long
        with the steps of many stations that happen to fall due together. The rest stay
        held for the next write (the committer comes back at once: they are due)."""
        t0 = time.perf_counter()
        self._meter_tx(plan.now, touched)
        for i, sid in enumerate(plan.due):
            if not plan.rush and i and time.perf_counter() - t0 > STEP_BUDGET_S:
                break
            msgs = self._held[sid] + plan.hold.pop(sid, [])
            plan.now[sid] = msgs
            self._meter_tx({sid: msgs}, touched)

    def _late(self, sid: str, msgs: list[RawMsg]) -> bool:
        """A message at or below the key the station is metered to, or no state yet."""
        key = self.meter.key_of(sid)
        if key is None:
            return True
        kb, ks = key
        for m in msgs:  # (a loop: no tuple a message, as a min over keys would make)
            b = m.boot
            if b < kb or (b == kb and m.seq <= ks):
                return True
        return False

    def _hold(self, plan: _Plan) -> None:
        """db thread, after the write's commit: what was metered leaves the held messages,
        what waits joins them. A station is due records_interval_ms after its first held
        message, times a factor of 0.5-1.5 of its own: stations that start together (a
        backlog, a restart) spread their steps out over the commits that follow."""
        held = self._held
        for sid in plan.now:
            lst = held.pop(sid, None)
            if lst is not None:
                self._held_n -= len(lst)
                del self._due[sid]
        every = self.cfg.ingest.records_interval_ms / 1000
        for sid, msgs in plan.hold.items():
            lst = held.get(sid)
            if lst is None:
                held[sid] = lst = []
                due = plan.at + every * (0.5 + (zlib.crc32(sid.encode()) & 1023) / 1024)
                self._due[sid] = due
                heapq.heappush(self._due_heap, (due, sid))
            lst.extend(msgs)
            self._held_n += len(msgs)
        self._prune_due()

    def _unhold(self, keep: Callable[[str], bool] | None = None) -> None:
        """db thread: drop the held messages of the stations not kept (all when None):
        their metering restarts from raw (a shard given up, a new lock, a rebuild)."""
        for sid in [s for s in self._held if keep is None or not keep(s)]:
            self._held_n -= len(self._held.pop(sid))
            del self._due[sid]
        self._prune_due()

    def _prune_due(self) -> None:
        h, due = self._due_heap, self._due
        if len(h) > 2 * len(due) + 64:
            h[:] = [(t, s) for s, t in due.items()]
            heapq.heapify(h)
        while h and due.get(h[0][1]) != h[0][0]:
            heapq.heappop(h)
        self._held_due = h[0][0] if h else math.inf

    def _meter_tx(self, todo: dict[str, list[RawMsg]], touched: set[str]) -> None:
        """db thread, in the batch's transaction: meter each station apart, in a savepoint,
        so that one whose metering raises stops no other (its records stay as they were;
        it is metered again from raw by `_remeter`, every METER_RETRY_S)."""
        db = self.store.db
        for sid, lst in todo.items():
            if sid in self._meter_failed:
                continue
            touched.add(sid)
            db.execute("SAVEPOINT meter")
            try:
                self.meter.add(lst)
            except Exception:
                db.execute("ROLLBACK TO meter")
                db.execute("RELEASE meter")
                self.meter.forget(sid)
                self._meter_failed.add(sid)
                # without a state it is metered from its raw rows at the next start
                db.execute("DELETE FROM ledger_state WHERE sid = ?", (sid,))
                log.exception("metering %s failed on %d message(s) (raw is stored)", sid, len(lst))
                continue
            db.execute("RELEASE meter")

    def _write_guarded(self, b: _Batch) -> _Written:
        """db thread: `_write`, with no row able to stop it. A database failure (`_is_env`)
        is raised for the committer to retry; any other error is some row's: the raw rows
        are probed one by one (in a transaction that is rolled back), the culprits move to
        quarantine as `internal` and the batch is written again; failing that it is
        written without metering (its stations are metered from raw again, METER_RETRY_S);
        failing that too, each message is written in a transaction of its own and one that
        fails alone is kept in quarantine as `internal`."""
        if self.leases is not None:
            self._reverify(b)
        if self.store.path is not None and _file_id(self.store.path) != self._db_file:
            raise DatabaseGone(
                f"{self.store.path} is gone or was replaced: nothing is written until it is back"
            )
        try:
            return _Written(*self._write(b))
        except Exception as e:
            if _is_env(e):
                raise
            log.error("a batch of %d failed to write (%r): finding the culprit", len(b.rows), e)
        bad = self._probe(b.rows)
        if bad:
            keep = [i for i in range(len(b.rows)) if i not in bad]
            for i, err in sorted(bad.items()):
                r = b.rows[i]
                log.error("(%s, %s, %s) cannot be stored: %r", r.sid, r.boot, r.seq, err)
                b.quarantine.append(
                    QuarantineRow(
                        r.recv_ms, r.topic, INTERNAL, _internal("storing", err), r.sid, r.record
                    )
                )
            b.rows = [b.rows[i] for i in keep]
            b.cleaned = [b.cleaned[i] for i in keep]
            b.internal += len(bad)
            try:
                return _Written(*self._write(b))
            except Exception as e:
                if _is_env(e):
                    raise
        try:
            w = self._write(b, metering=False)
        except Exception as e:
            if _is_env(e):
                raise
            log.exception("a batch cannot be written even without metering: message by message")
        else:
            why = "a batch's metering failed: its stations are metered again from raw"
            log.error("%s", why)
            return _Written(*w, records_error=why)
        # last resort: each message in a transaction of its own; one that fails alone goes
        # to quarantine (its bytes kept), the others are stored
        new: list[int] = []
        dups = conflicts = 0
        culprits: list[QuarantineRow] = []
        for i, r in enumerate(b.rows):
            one = _Batch()
            one.rows, one.cleaned = [r], [b.cleaned[i]]
            try:
                n1, d1, c1 = self._write(one, metering=False)
            except Exception as e:
                if _is_env(e):
                    raise
                log.error("(%s, %s, %s) cannot be stored alone: %r", r.sid, r.boot, r.seq, e)
                culprits.append(
                    QuarantineRow(
                        r.recv_ms, r.topic, INTERNAL, _internal("storing", e), r.sid, r.record
                    )
                )
                continue
            if n1:
                new.append(i)
            dups += d1
            conflicts += c1
        rest = _Batch()
        rest.quarantine = [
            q._replace(topic=ascii(q.topic)[1:-1], detail=ascii(q.detail)[1:-1])
            for q in b.quarantine + culprits
        ]
        rest.status = b.status
        try:
            self._write(rest, metering=False)
        except Exception as e:
            if _is_env(e):
                raise
            log.error("status rows dropped (%r): informational only", e)
            rest.status = []
            self._write(rest, metering=False)
        b.quarantine = rest.quarantine
        b.internal += len(culprits)
        return _Written(new, dups, conflicts, records_error="batch written message by message")

    def _probe(self, rows: list[RawRow]) -> dict[int, BaseException]:
        """db thread: which raw rows fail to insert on their own (data errors), each in a
        savepoint of a transaction that is rolled back at the end."""
        db = self.store.db
        bad: dict[int, BaseException] = {}
        self.store.db.execute("BEGIN IMMEDIATE")
        try:
            for i, r in enumerate(rows):
                db.execute("SAVEPOINT probe")
                try:
                    self.store._insert_raw(db, [r])
                except Exception as e:
                    if _is_env(e):
                        raise
                    bad[i] = e
                finally:
                    db.execute("ROLLBACK TO probe")
                    db.execute("RELEASE probe")
        finally:
            db.execute("ROLLBACK")
        return bad

    def _pending(self) -> int:
        """Messages read and not yet committed (none of them acknowledged)."""
        n = len(self._batch.deliveries) + sum(len(x.deliveries) for x in self._sealed)
        return n + (len(self._inflight.deliveries) if self._inflight is not None else 0)

    def _oldest_ms(self) -> int | None:
        for x in (self._inflight, *self._sealed, self._batch):
            if x is not None and x.deliveries:
                return x.first_ms
        return None

    async def _commit(self, b: _Batch) -> _Written | None:
        """Write `b` (retried with backoff while the database fails); None when stopping
        cut the retries short (nothing of `b` is acknowledged then)."""
        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            t0 = time.monotonic()
            try:
                w = await loop.run_in_executor(self._db, self._write_guarded, b)
            except Exception as e:
                self.counters["commit_failures"] += 1
                if self.health.failed(e):
                    log.error(
                        "commits fail: %r; nothing is acknowledged until they succeed "
                        "(reading paused, retrying)",
                        e,
                    )
                else:
                    log.warning("commit failed again (%r); retry in %.2fs", e, delay)
                self.source.pause()
                if self._stopping:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_now.wait(), delay)
                if self._stopping:
                    return None
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            since = self.health.committed(time.monotonic() - t0)
            if since is not None:
                await self._alarm(
                    None,
                    "agent_db",
                    "crit",
                    f"commits failed from {_iso(since)} to {_iso(now_ms())} "
                    f"(nothing acknowledged meanwhile): {self.health.last_error}",
                    key="agent_db",
                    every=0.0,
                )
                log.info("commits succeed again (failing since %s)", _iso(since))
            return w

    async def _committer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            records_due = self._held_due_now()
            if self._sealed:
                b = self._sealed.popleft()
            elif self._batch.deliveries or records_due or self._batch.rekey:
                b, self._batch = self._batch, _Batch()
            else:
                self._idle.set()
                continue
            self._committing = True
            self._inflight = b
            w = await self._commit(b)
            self._inflight = None
            if w is None:  # stopping while the database fails: leave it all to the broker
                self._committing = False
                err = ConnectionAbortedError("the agent stopped before committing")
                for x in (b, *self._sealed, self._batch):
                    x.release(err)
                self._sealed.clear()
                self._batch = _Batch()
                self._idle.set()
                continue
            new, dups, conflicts = w.new, w.dups, w.conflicts
            self.source.ack(b.deliveries)
            b.release()
            if not self._stopping and (
                len(self._sealed) * self.cfg.ingest.batch_max < self.cfg.ingest.max_pending
            ):
                self.source.resume()
            c = self.counters
            c["commits"] += 1
            if w.records_error is not None:
                c["records_errors"] += 1
                self.health.error(w.records_error)
            if b.deliveries:
                c["received"] += len(b.deliveries)
                c["stored"] += len(new)
                c["duplicate"] += dups
                c["conflict"] += conflicts
                c["status"] += len(b.status)
            if b.quarantine or conflicts:
                c["quarantined"] += len(b.quarantine) + conflicts
                for q in b.quarantine:
                    c["q." + q.reason] += 1
                c["q.conflict"] += conflicts
            if new:
                rows = [b.rows[i] for i in new]
                if self._on_commit is not None:
                    self._on_commit(rows)
                self._meter_errors(rows)
            await self._alarms(b, new)
            # committing until the batch's alarms are written: flush() (and so a stop)
            # waits for them
            self._committing = False
            if b.rekey:
                self._committing = True
                await self._rekey(b.rekey)
                self._committing = False
            if self._sealed or self._batch.deliveries or self._held_due_now():
                self._wake.set()
            self._idle.set()

    def _meter_errors(self, rows: list[RawRow]) -> None:
        """After a commit: each station among `rows` whose metering failed (in that
        transaction, or earlier: its rows wait to be metered again from raw) is counted
        (meter_errors) and alarmed, naming its messages; the others' rows are metered or
        held for their next step, nothing to do here."""
        failed = self._meter_failed
        if not failed:
            return
        by_sid: dict[str, list[RawRow]] = {}
        for r in rows:
            if r.sid in failed:
                by_sid.setdefault(r.sid, []).append(r)
        for sid, rs in by_sid.items():
            self.counters["meter_errors"] += 1
            keys = f"({rs[0].boot}, {rs[0].seq})" + (
                f" .. ({rs[-1].boot}, {rs[-1].seq})" if len(rs) > 1 else ""
            )
            what = f"metering failed on {len(rs)} message(s) {keys}; raw is stored"
            self.health.error(f"{sid}: {what}")
            self._pending_alarms.append((sid, INTERNAL, "crit", what, f"meter:{sid}"))

    async def _alarms(self, b: _Batch, new: list[int]) -> None:
        """Count the spoiled sources of the messages stored now and raise their alarms
        (`bad_field`, one per station and field a minute), the `internal` quarantines'
        and those queued by metering."""
        spoiled = [i for i in new if b.cleaned[i].spoiled]  # seldom any
        if spoiled:
            self._spoiled([b.rows[i] for i in spoiled], [b.cleaned[i] for i in spoiled])
        out = self._pending_alarms
        self._pending_alarms = []
        for q in b.quarantine:
            if q.reason == INTERNAL:
                out.append((q.sid, INTERNAL, "crit", f"quarantined: {q.detail}", INTERNAL))
        for asid, code, level, detail, key in out:
            await self._alarm(asid, code, level, detail, key=key)

    def _spoiled(self, rows: list[RawRow], cleaned: list[ranges.Cleaned]) -> None:
        """Count the spoiled sources of stored messages and queue their `bad_field` alarms
        (one per station and field per batch, naming the first message)."""
        c = self.counters
        firsts: dict[tuple[str, str], tuple[RawRow, int]] = {}
        for r, cl in zip(rows, cleaned, strict=True):
            if not cl.spoiled:
                continue
            c["spoiled"] += 1
            for source, path in cl.spoiled:
                c["spoiled." + source.split(":", 1)[0]] += 1
                k = (r.sid, path)
                first, n = firsts.get(k, (r, 0))
                firsts[k] = (first, n + 1)
        for (sid, path), (r, n) in firsts.items():
            more = f" (and {n - 1} more in this batch)" if n > 1 else ""
            self._pending_alarms.append(
                (
                    sid,
                    "bad_field",
                    "warn",
                    f"{path}: missing, of the wrong type or out of range in ({r.boot}, {r.seq})"
                    f"{more}; its source is not metered",
                    f"bad_field:{path}",
                )
            )

    async def _alarm(
        self,
        sid: str | None,
        code: str,
        level: str,
        detail: str,
        *,
        key: str,
        every: float = ALARM_EVERY_S,
    ) -> None:
        """An alarm row (db thread, its own transaction), at most one per (sid, key) per
        `every` s; a failure to write it is logged, never raised."""
        now = time.monotonic()
        last = self._alarmed.get((sid, key))
        if last is not None and now - last < every:
            self.counters["alarms_suppressed"] += 1
            return
        if len(self._alarmed) > 100_000:
            self._alarmed.clear()
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._db, self.store.add_alarm, sid, code, level, detail[:1000]
            )
            self.counters["alarms"] += 1
            self._alarmed[(sid, key)] = now  # a failed write is tried again next time
        except Exception as e:
            self.counters["alarm_errors"] += 1
            log.warning("could not write alarm %s for %s (%r): %s", code, sid, e, detail)

    # ---- one agent of several (agent/cluster.py) ---------------------------------------------

    def _owns(self, sid: str) -> bool:
        assert self.leases is not None
        return cluster.shard_of(sid, self.leases.cfg.shards) in self.leases.held

    async def _balancer(self) -> None:
        """Every balance_s: take the locks of the shards this agent should hold, open their
        sessions; give back one shard above its share; drop those lost with a connection."""
        assert self.leases is not None and isinstance(self.source, ShardedSource)
        loop = asyncio.get_running_loop()
        every = self.leases.cfg.balance_s
        while True:
            try:
                lost, taken, back, rekey = await loop.run_in_executor(self._db, self._balance_db)
            except Exception as e:
                log.warning("balancing shards failed (%r); retry in %.1fs", e, every)
            else:
                # what a dropped session delivered and is not committed is left out of every
                # write once its shard is not held (_reverify), unacknowledged: the shard's
                # next owner gets it from the broker
                for k in lost:
                    self.source.drop(k)
                for k in taken:
                    self.source.take(k)
                for k in back:
                    self.source.drop(k)  # nothing more comes from it
                    await loop.run_in_executor(self._db, self._give_back_db, k)
                if rekey:
                    self._batch.rekey |= rekey
                    self._wake.set()
                if taken or back or lost:
                    self.health.shards = sorted(self.leases.held)
                    log.info("shards held: %s", self.health.shards)
            self._balanced.set()
            await asyncio.sleep(every)

    def _balance_db(self) -> tuple[set[int], list[int], list[int], set[str]]:
        """db thread: one balancing round (after any commit queued before it)."""
        assert self.leases is not None
        lost = self.leases.reverify()
        for k in lost:
            self._forget_shard(k)
        taken, back = self.leases.balance()
        rekey: set[str] = set()
        for k in taken:
            try:
                rekey |= self._take_shard(k)
            except BaseException:
                self._forget_shard(k)
                with contextlib.suppress(Exception):
                    self.leases.give_back(k)
                raise
        return lost, taken, back, rekey

    def _take_shard(self, k: int) -> set[str]:
        """db thread, lock k just taken: its stations' metering resumes from their states
        (what the previous owner committed); returns those with quarantine to re-verify."""
        assert self.leases is not None
        n = self.leases.cfg.shards
        self._forget_shard(k)  # what memory held from an earlier turn is stale now

        def mine(s: str) -> bool:
            return cluster.shard_of(s, n) == k

        t0 = time.monotonic()
        rebuilt, rows = self.meter.start([s for s in self.store.key_sids() if mine(s)], only=mine)
        self.counters["replay_rows"] += rows
        log.info(
            "shard %d taken: %d station(s) metered from raw, %d raw row(s) read in %.2fs",
            k,
            rebuilt,
            rows,
            time.monotonic() - t0,
        )
        return {s for s in self.store.quarantined_sids(REKEY_REASONS) if mine(s)}

    def _give_back_db(self, k: int) -> None:
        """db thread, after the commits queued before: forget shard k and unlock it."""
        assert self.leases is not None
        self._forget_shard(k)
        self.leases.give_back(k)

    def _forget_shard(self, k: int) -> None:
        """db thread: drop shard k's stations from memory (metering state, rows waiting to
        be metered): whoever holds it next resumes them from the database."""
        assert self.leases is not None
        n = self.leases.cfg.shards
        for e in self.meter.ledger.engines():
            for sid in [s for s in e.stations if cluster.shard_of(s, n) == k]:
                self.meter.forget(sid)
        self._unhold(lambda s: cluster.shard_of(s, n) != k)
        self._meter_failed = {s for s in self._meter_failed if cluster.shard_of(s, n) != k}

    def _reverify(self, b: _Batch) -> None:
        """db thread, before a write: after a new connection, the shard locks are taken
        again and the sessions of shards lost meanwhile closed; the rows of every shard not
        held leave the batch (unacknowledged: the shard's owner gets them from the broker)."""
        assert self.leases is not None
        lost = self.leases.reverify()
        for k in lost:
            self._forget_shard(k)
        src, loop = self.source, self._loop
        if lost and loop is not None and isinstance(src, ShardedSource):
            for k in lost:
                loop.call_soon_threadsafe(src.drop, k)
        # the invariant, whatever the loop still holds: no row of a shard not held is written
        _keep_shards(b, self._owns)

    async def _rekey(self, sids: set[str]) -> None:
        """Re-verify the unresolved `unknown_station` / `unknown_kid` quarantine rows of
        `sids` with the current keys (exact stored bytes, topic and arrival time) and ingest
        those that verify, page by page (committer only, so ordered with the batches)."""
        loop = asyncio.get_running_loop()
        c = self.counters
        if self.leases is not None:  # only the stations this agent writes
            sids = {s for s in sids if self._owns(s)}
        try:
            if len(sids) > 64:  # at start: every keyed station; ask which have such rows
                have = await loop.run_in_executor(
                    self._db, self.store.quarantined_sids, REKEY_REASONS
                )
                todo = sorted(sids.intersection(have))
            else:
                todo = sorted(sids)
            for sid in todo:
                after = 0
                while True:
                    page = await loop.run_in_executor(
                        self._db, self.store.open_quarantine, sid, REKEY_REASONS, after, _REKEY_PAGE
                    )
                    if not page:
                        break
                    after = page[-1].id
                    await self._rekey_page(sid, page)
        except Exception:
            c["rekey.errors"] += 1
            log.exception(
                "re-verifying quarantined messages of %d station(s) failed; retry in %.0fs",
                len(sids),
                _REKEY_RETRY_S,
            )
            self._rekey_retry |= sids
            self._rekey_retry_at = time.monotonic() + _REKEY_RETRY_S

    async def _rekey_page(self, sid: str, page: list[QuarantineEntry]) -> None:
        loop = asyncio.get_running_loop()
        c = self.counters
        rows: list[RawRow] = []
        cleaned: list[ranges.Cleaned] = []
        qids: list[int] = []
        rejected: list[tuple[int, str, str]] = []
        waiting = final = 0
        for q in page:
            kind = q.topic.rsplit("/", 1)[-1]
            try:
                v = wire.verify(kind, sid, q.record, self.keys, recv_ms=q.recv_ms)
            except wire.WireError as e:
                # still no key for it (it stays for the next one), or a final verdict now
                # that the key is known (e.g. bad_sig): stays in quarantine, with the reason
                # that holds now and the first one in the detail
                if e.reason.value in REKEY_REASONS:
                    waiting += 1
                else:
                    final += 1
                if e.reason.value != q.reason:
                    i = q.detail.find(_FIRST)
                    first = q.detail[i:] if i >= 0 else f"{_FIRST}{q.reason}: {q.detail})"
                    rejected.append((q.id, e.reason.value, (e.detail + first)[:1000]))
                continue
            except Exception as e:  # a bug must not stop re-verification: stays as it was
                log.exception("re-verifying quarantine row %d failed", q.id)
                c["rekey.errors"] += 1
                self.health.error(f"re-verifying quarantine row {q.id}: {type(e).__name__}: {e}")
                continue
            rows.append(RawRow(sid, v.boot, v.seq, kind, q.topic, q.recv_ms, v.kid, q.record))
            cleaned.append(v.cleaned)
            qids.append(q.id)
        if rows or rejected:
            res, outcomes = await loop.run_in_executor(
                self._db, self._resolve, rows, cleaned, qids, rejected
            )
        else:
            res, outcomes = BatchResult([], 0, 0), []
        n = Counter(outcomes)
        c["rekey.checked"] += len(page)
        c["rekey.waiting"] += waiting
        c["rekey.rejected"] += final
        c["rekey.stored"] += n[STORED]
        c["rekey.duplicate"] += n[DUPLICATE]
        c["rekey.conflict"] += n[CONFLICT]
        if rows:
            log.info(
                "%s: %d quarantined message(s) verify with the key now known: %d stored, "
                "%d duplicate, %d conflict",
                sid,
                len(rows),
                n[STORED],
                n[DUPLICATE],
                n[CONFLICT],
            )
        if res.new:
            new_rows = [rows[i] for i in res.new]
            if self._on_commit is not None:
                self._on_commit(new_rows)
            self._meter_errors(new_rows)
            self._spoiled(new_rows, [cleaned[i] for i in res.new])

    def _remeter(self, sids: set[str]) -> None:
        """db thread: stations whose metering raised are metered from their raw rows again,
        each in a transaction of its own (its records and state, or nothing); one that
        raises again waits for the next round."""
        for sid in sorted(sids):
            try:
                with self.store.transaction():
                    self.meter.rebuild(sid)
            except Exception as e:
                self.meter.forget(sid)
                if _is_env(e):
                    log.warning("metering %s again failed (%r): the database; retried", sid, e)
                    return
                log.warning("metering %s from raw failed again (%r); retried later", sid, e)
                continue
            self._meter_failed.discard(sid)
            self._unhold(sid.__ne__)  # (none: a failed station holds none)
            self.counters["meter_recovered"] += 1
            log.info("%s metered again from its raw messages", sid)

    def _held_due_now(self) -> bool:
        """Loop thread: held messages whose stations are due for their step (or a flush)."""
        return self._held_n > 0 and (self._meter_all or time.monotonic() >= self._held_due)

    async def flush(self) -> None:
        """Commit (and acknowledge) every message read so far and meter everything held,
        records and states written, now (shutdown, tests, benchmarks)."""
        self._meter_all = True
        try:
            while (
                self._sealed
                or self._batch.deliveries
                or self._held_n
                or self._committing
                or self._batch.rekey
            ):
                self._idle.clear()
                self._wake.set()
                await self._idle.wait()
        finally:
            self._meter_all = False

    flush_records = flush

    async def _recorder(self) -> None:
        """Wake the committer when held stations fall due (no message may come to do it)."""
        every = self.cfg.ingest.records_interval_ms / 1000
        while True:
            wait = self._held_due - time.monotonic()
            await asyncio.sleep(min(every, max(0.01, wait)) if every > 0 else 0.05)
            if self._held_due_now():
                self._wake.set()

    async def _housekeeping(self) -> None:
        ing = self.cfg.ingest
        last_keys = last_stats = last_gc = last_ckpt = last_remeter = time.monotonic()
        last_locks = last_keys
        next_meters = 0.0  # the grid meter register's calibration check: now, then hourly
        last_health = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            if now - last_health >= WRITE_S and not self._health_busy:
                last_health = now
                self._health_busy = True
                fut = loop.run_in_executor(self._ckpt, self._put_health, self.health.to_json())
                fut.add_done_callback(lambda f: setattr(self, "_health_busy", False))
            if now - last_ckpt >= ing.checkpoint_s and not self._ckpt_busy:
                last_ckpt = now
                self._ckpt_busy = True
                fut = loop.run_in_executor(self._ckpt, self._checkpoint)
                fut.add_done_callback(lambda f: setattr(self, "_ckpt_busy", False))
            if now - last_keys >= ing.key_reload_s:
                last_keys = now
                try:
                    self.keys.reload()
                except Exception:
                    log.exception("reloading keys failed")
            # keys learned by that reload or by a miss on the hot path: re-verify what was
            # quarantined for want of them, after the batch now filling has committed
            learned = self.keys.take_learned()
            if self._rekey_retry and now >= self._rekey_retry_at:
                learned |= self._rekey_retry
                self._rekey_retry = set()
            if learned:
                self._batch.rekey |= learned
                self._wake.set()
            if self._meter_failed and now - last_remeter >= METER_RETRY_S:
                last_remeter = now
                await loop.run_in_executor(self._db, self._remeter, set(self._meter_failed))
            if ing.gc_full_s and now - last_gc >= ing.gc_full_s:
                last_gc = now
                gc.collect()
                log.debug("full garbage collection took %.0f ms", (time.monotonic() - now) * 1e3)
            if now - last_stats >= ing.stats_interval_s:
                last_stats = now
                log.info("counters: %s", dict(sorted(self.counters.items())))
            if now - last_locks >= LOCK_POLL_S and not self._stopping:
                last_locks = now
                await loop.run_in_executor(self._db, self._relock)
            if now >= next_meters and not self._stopping:  # at start, then hourly
                next_meters = now + METER_CHECK_S
                await loop.run_in_executor(self._db, self.check_meters)

    def _relock(self) -> bool:
        """db thread: a monitoring period locked since (`stationctl period lock`): meter on
        with it in force. States made under the old parameters are not resumed: each
        station is metered again from raw (streamed), as after a parameter change."""
        try:
            params = params_now(self.cfg.metering, load_locks(self.store))
        except Exception as e:  # a database that fails now is the committer's to report
            log.debug("reading period locks failed: %r", e)
            return False
        if params == self.meter.params:
            return False
        log.info(
            "a monitoring period was locked (until %s): metering again", params.locked_until_ms
        )
        self.meter = StoreMeter(params, self.store)
        self._unhold()  # metered again from raw below, held messages included
        mine = self._owns if self.leases is not None else None
        sids = [x for x in self.store.key_sids() if mine is None or mine(x)]
        _rebuilt, n = self.meter.start(sids, only=mine)
        self.counters["relocks"] += 1
        self.counters["replay_rows"] += n
        return True

    def check_meters(self, at_ms: int | None = None) -> list[tuple[str, str, str, str]]:
        """db thread: alarm installed grid meters past (`meter_overdue`) or near
        (`meter_due_soon`) their calibration's due date, once per meter and code per UTC day
        (agent/meters.py). Never raises: a failure is logged and counted."""
        try:
            added = meters.check_alarms(
                self.store, now_ms() if at_ms is None else at_ms, self.cfg.meters.overdue_policy
            )
        except Exception as e:
            self.counters["meter_check_errors"] += 1
            log.warning("checking the meter register failed: %r", e)
            return []
        for sid, code, _level, detail in added:
            self.counters["alarms"] += 1
            log.warning("%s %s: %s", code, sid, detail)
        return added

    def _put_health(self, state: str) -> None:
        """checkpoint thread: upsert the agent_health row (a locked or full database makes
        it fail, and the row's age then says the agent is silent)."""
        try:
            self._ckpt_store.put_agent_health(now_ms(), state)
        except Exception as e:
            log.debug("writing the health row failed: %r", e)

    def _checkpoint(self) -> None:
        try:
            self._ckpt_store.checkpoint()
        except Exception as e:  # the writer's autocheckpoint is the safety net
            if self._stopping and "interrupted" in str(e):
                log.info("WAL checkpoint interrupted by the stop (a later one completes it)")
            else:
                log.exception("WAL checkpoint failed")

    # ---- start-up and the whole run ---------------------------------------------------------

    def replay(self) -> int:
        """Resume metering from the stored states: a station with a state reads only the raw
        rows above its key (none, normally: states commit with their rows); one without a
        usable state (older database, other processing version or parameters) is metered
        from its raw rows once. Returns the number of raw messages read. One agent of
        several does this for each shard as it takes it (`_take_shard`)."""
        if self.leases is not None:
            return 0
        rebuilt, n = self.meter.start(self.store.key_sids())
        if rebuilt:
            log.info("metered %d station(s) from raw (no usable metering state)", rebuilt)
        self.counters["replay_rows"] += n
        return n

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        loop = self._loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        replay: asyncio.Future[int] = loop.run_in_executor(self._db, self.replay)
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait((replay, stopped), return_when=asyncio.FIRST_COMPLETED)
        if not replay.done():  # stopped while replaying: nothing was read or acknowledged
            log.info("stopped during the start-up replay")
            self._stopping = True
            self._db.shutdown(wait=False, cancel_futures=True)
            return
        stopped.cancel()
        try:
            n = replay.result()
            log.info(
                "replayed %d raw messages into metering in %.1fs (metering: %s)",
                n,
                time.monotonic() - t0,
                native.state,
            )
        except Exception as e:  # metering must not keep ingest from starting
            self.counters["meter_errors"] += 1
            why = f"replaying raw into metering failed ({type(e).__name__}: {e}); records may be stale"
            log.exception("%s; ingest starts all the same", why)
            self.health.error(why)
            self._pending_alarms.append((None, INTERNAL, "crit", why, "replay"))
        gc_was = gc.get_threshold()
        switch_was = sys.getswitchinterval()
        if self.cfg.ingest.switch_interval_s > 0:
            sys.setswitchinterval(self.cfg.ingest.switch_interval_s)
        if self.cfg.ingest.gc_full_s:
            gc.collect()
            gc.set_threshold(gc_was[0], gc_was[1], 1 << 30)  # no automatic full collection
        dashboard = await self._dashboard()
        health_server = await self._health_server() if dashboard is None else None
        ocpp = await self._ocpp()
        # every station with a key: what was quarantined before its key was added while
        # the agent was down (or before a crash) is re-verified first
        self._batch.rekey |= self.keys.take_learned()
        self._wake.set()
        jobs = [self.source.run(), self._committer(), self._recorder(), self._housekeeping()]
        if self.leases is not None:
            jobs.append(self._balancer())
        else:
            self._balanced.set()
        tasks = [asyncio.create_task(x) for x in jobs]

        async def _ready() -> None:
            await self._balanced.wait()
            await self.source.connected.wait()
            self.ready.set()

        ready = asyncio.create_task(_ready())
        try:
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for t in done:
                if t is not waiter:  # a task of the service ended: a bug, say so loudly
                    exc = t.exception()
                    raise RuntimeError(f"agent task ended: {t!r}") from exc
        finally:
            ready.cancel()
            if ocpp is not None:  # no new frame; those in a batch are committed below
                await ocpp.stop()
            servers = [x.stop() for x in (dashboard, health_server) if x is not None]
            await asyncio.gather(self._shutdown(tasks), *servers, return_exceptions=True)
            gc.set_threshold(*gc_was)
            sys.setswitchinterval(switch_was)

    async def _dashboard(self) -> Any:
        """The dashboard in this loop when configured: it reads the database on its own
        read-only connection and thread, and polls at once after each commit."""
        dc = self.cfg.dashboard
        if dc is None:
            return None
        from agent import health
        from agent.dashboard import DashboardServer, Live, make_app
        from agent.dashboard.auth import from_config
        from agent.dashboard.state import ViewConfig

        oc = self.cfg.ocpp  # an OCPP charger is silent after 3 of its heartbeat periods
        view = ViewConfig(ocpp_heartbeat_s=oc.heartbeat_s) if oc is not None else None
        live = Live(self.cfg.db.url, view, carbon_params=self.cfg.carbon_params)
        app = make_app(
            self.cfg.db.url,
            live=live,
            extra_routes=health.routes(self.health),
            auth=from_config(dc, self.cfg.db.url),
        )
        server = DashboardServer(app, dc.host, dc.port, stop_timeout=STOP_FLUSH_S + STOP_DB_S)
        try:
            await server.start()
        except OSError as e:
            raise ConfigError(
                f"dashboard: cannot listen on {dc.host}:{dc.port}: {e.strerror}"
            ) from None
        prev = self._on_commit

        def on_commit(rows: list[RawRow]) -> None:
            live.nudge()
            if prev is not None:
                prev(rows)

        self._on_commit = on_commit
        log.info("dashboard on %s (and %shealthz, %smetrics)", server.url, server.url, server.url)
        self.health_url = server.url
        return server

    async def _ocpp(self) -> Any:
        """The OCPP endpoint in this loop when configured (CONTRACT §11)."""
        oc = self.cfg.ocpp
        if oc is None:
            return None
        from agent.ocpp.csms import Endpoint
        from agent.ocpp.ingest import OcppIngest

        ingest = OcppIngest(self)
        ep = Endpoint(oc, ingest.submit, ingest.check)
        try:
            await ep.start()
        except OSError as e:
            ingest.close()
            raise ConfigError(f"ocpp: cannot listen on {oc.listen}: {e.strerror}") from None
        self.ocpp = ep
        self._ocpp_ingest = ingest
        return ep

    async def _health_server(self) -> HealthServer | None:
        hc = self.cfg.health
        if hc is None:
            return None
        server = HealthServer(self.health, hc.host, hc.port)
        try:
            await server.start()
        except OSError as e:
            raise ConfigError(
                f"health: cannot listen on {hc.host}:{hc.port}: {e.strerror}"
            ) from None
        log.info("health on %shealthz and %smetrics", server.url, server.url)
        self.health_url = server.url
        return server

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Within ~4 s whatever the state: stop reading; commit, acknowledge and meter what
        was read for up to STOP_FLUSH_S (the rest stays unacknowledged: the broker sends it
        again); interrupt a commit still running (it rolls back); say goodbye."""
        loop = asyncio.get_running_loop()
        self._stopping = True
        self._stop_now.set()
        self.source.pause()
        if not tasks[1].done():  # the committer
            try:
                await asyncio.wait_for(self.flush(), STOP_FLUSH_S)
            except TimeoutError:
                log.warning(
                    "stopping with %d message(s) not committed (not acknowledged: the "
                    "broker sends them again)",
                    self._pending(),
                )
        self.source.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # a commit still running in the db thread: cut it short (it rolls back; a busy wait
        # ends within BUSY_MS)
        self.store.db.interrupt()
        self._ckpt_store.db.interrupt()
        self.health.stopped_ms = now_ms()
        # each executor is one thread working in order: a no-op submitted now finishes once
        # what it was doing has (no thread is joined blindly: a stuck one is left to exit)
        drained = [loop.run_in_executor(ex, _noop) for ex in (self._db, self._ckpt)]
        done, _ = await asyncio.wait(drained, timeout=STOP_DB_S)
        for ex in (self._db, self._ckpt):
            ex.shutdown(wait=False, cancel_futures=True)
        if len(done) == len(drained):
            with contextlib.suppress(Exception):
                self._ckpt_store.put_agent_health(now_ms(), self.health.to_json())
            self._ckpt_store.close()
            self.store.close()
            self._keystore.store.close()
            if self._ocpp_ingest is not None:
                self._ocpp_ingest.close()
        else:
            log.warning("the database thread did not finish in time; exiting without it")
        log.info("stopped; counters: %s", dict(sorted(self.counters.items())))


def _noop() -> None:
    pass


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _internal(step: str, e: BaseException) -> str:
    """A quarantine detail for a message the agent failed on: the exception's class first."""
    return f"{type(e).__name__} while {step}: {e}"[:300]


def _sid_of(topic: str, prefix: str) -> str | None:
    parts = topic.split("/")
    n = len(prefix.split("/"))
    if len(parts) == n + 2 and wire.SID_RE.fullmatch(parts[n]):
        return parts[n]
    return None
