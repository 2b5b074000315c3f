"""The agent service: MQTT → verify → raw store / quarantine → PUBACK → metering → records.

Threads: the asyncio loop thread runs paho (agent/sources/mqtt.py), verification and metering;
one database thread runs every write, so a commit (an fsync with synchronous=FULL) never
stalls the network. Batches form by themselves (group commit): while one batch commits,
the next accumulates, so a quiet agent commits each message at once and a busy one
commits thousands at a time. Acknowledgements go out only after the commit.

Failure policy: bad input is quarantined with its reason and counted, never raised; a
database error keeps the batch, unacknowledged, and retries it (the broker keeps
redelivering meanwhile); a metering error is logged and counted (raw is already safe
and the records can be recomputed from it).

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
import gc
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec

from agent import wire
from agent.config import AgentConfig, ConfigError
from agent.keys import CachedKeys, KeyStore
from agent.ledger import IncrementalMeter, RawMsg
from agent.sources.mqtt import Delivery, MqttSource
from agent.store import (
    CONFLICT,
    DUPLICATE,
    STORED,
    BatchResult,
    QuarantineEntry,
    QuarantineRow,
    RawRow,
    RecordRow,
    Store,
    now_ms,
    record_to_row,
)

log = logging.getLogger(__name__)


# ---- the pipeline ---------------------------------------------------------------------------


# reasons that mean "no key for it yet": worth re-verifying once the station's key is known
REKEY_REASONS = (wire.Reason.UNKNOWN_STATION.value, wire.Reason.UNKNOWN_KID.value)
_REKEY_PAGE = 1000  # quarantine rows verified per step (bounds the loop's stall: ~6 ms)
_REKEY_RETRY_S = 5.0  # after a failed re-verification (database error)
_FIRST = " (first quarantined as "  # how a re-verified row's detail keeps its first reason


class _Batch:
    __slots__ = ("bodies", "deliveries", "quarantine", "rekey", "rows", "status")

    def __init__(self) -> None:
        self.rows: list[RawRow] = []
        self.bodies: list[dict[str, Any]] = []
        self.quarantine: list[QuarantineRow] = []
        self.status: list[tuple[str, int, bytes]] = []
        self.deliveries: list[Delivery] = []
        # stations whose quarantine to re-verify once this batch (and so every message
        # verified before their key was learned) has committed
        self.rekey: set[str] = set()


OnCommit = Callable[[list[RawRow]], None]


class Service:
    """Run with `await Service(cfg).run(stop_event)`. `counters` holds every count
    (received, stored, duplicate, conflict, quarantined, `q.<reason>`, …)."""

    def __init__(self, cfg: AgentConfig, *, on_commit: OnCommit | None = None) -> None:
        self.cfg = cfg
        self.counters: Counter[str] = Counter()
        self._on_commit = on_commit
        # the writer connection (used by the db thread only); WAL checkpoints run from a
        # connection of their own in another thread, off the commit path
        self.store = Store(cfg.db.url, synchronous=cfg.db.synchronous, autocheckpoint=100_000)
        self._ckpt_store = Store(cfg.db.url, synchronous=cfg.db.synchronous, create=False)
        self._ckpt = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agent-ckpt")
        self._ckpt_busy = False
        self._keystore = KeyStore(Store(cfg.db.url, synchronous=cfg.db.synchronous))
        self.keys: CachedKeys = self._keystore.ring()
        self.meter = IncrementalMeter(cfg.metering)
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agent-db")
        self._batch = _Batch()  # filling
        self._sealed: collections.deque[_Batch] = collections.deque()  # full, to commit
        self._wake = asyncio.Event()
        self._dirty: set[str] = set()  # stations whose records changed and are not written
        self._records_due = 0.0  # monotonic time after which they are written
        self._committing = False
        self._stopping = False
        self._idle = asyncio.Event()  # set after each commit cycle
        self._rekey_retry: set[str] = set()  # re-verifications that failed, retried later
        self._rekey_retry_at = 0.0
        self.source = MqttSource(cfg.broker, self._message, on_drained=self._wake.set)
        self._prefix = cfg.broker.prefix
        self.ready = asyncio.Event()  # set once raw is replayed and the agent is subscribed

    # ---- loop thread: each message as paho delivers it -----------------------------------

    def _message(self, topic: str, payload: bytes, d: Delivery) -> None:
        b = self._batch
        b.deliveries.append(d)
        recv = now_ms()
        try:
            sid, kind = wire.parse_topic(topic, self._prefix)
            if kind == "status":
                self._status(b, sid, topic, payload, recv)
            else:
                v = wire.verify(kind, sid, payload, self.keys)
                b.rows.append(RawRow(sid, v.boot, v.seq, kind, topic, recv, v.kid, payload))
                b.bodies.append(v.body)
        except wire.WireError as e:
            b.quarantine.append(
                QuarantineRow(
                    recv, topic, e.reason.value, e.detail, _sid_of(topic, self._prefix), payload
                )
            )
        except Exception as e:  # a bug must not stop ingest: keep the bytes, say why
            log.exception("unexpected error on %s", topic)
            b.quarantine.append(
                QuarantineRow(
                    recv, topic, "internal", repr(e)[:300], _sid_of(topic, self._prefix), payload
                )
            )
        if len(b.deliveries) >= self.cfg.ingest.batch_max:
            self._sealed.append(b)  # full: the committer takes it as one transaction
            self._batch = _Batch()
            self._wake.set()
            if len(self._sealed) * self.cfg.ingest.batch_max >= self.cfg.ingest.max_pending:
                self.source.pause()

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

    def _write(
        self, b: _Batch, ups: list[RecordRow], gone: list[str]
    ) -> tuple[list[int], int, int]:
        """db thread: one transaction for a batch and the record changes that are due."""
        res = self.store.write_batch(
            b.rows, b.quarantine, status=b.status, records=ups, records_gone=gone
        )
        return res.new, res.duplicates, res.conflicts

    async def _committer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            records_due = bool(self._dirty) and time.monotonic() >= self._records_due
            if self._sealed:
                b = self._sealed.popleft()
            elif self._batch.deliveries or records_due or self._batch.rekey:
                b, self._batch = self._batch, _Batch()
            else:
                self._idle.set()
                continue
            self._committing = True
            ups, gone = self._changes() if records_due else ([], [])
            delay = 0.05
            while True:
                try:
                    new, dups, conflicts = await loop.run_in_executor(
                        self._db, self._write, b, ups, gone
                    )
                    break
                except Exception:
                    log.exception(
                        "database write failed; retrying in %.2fs (not acknowledged)", delay
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            self.source.ack(b.deliveries)
            self._committing = False
            if not self._stopping and (
                len(self._sealed) * self.cfg.ingest.batch_max < self.cfg.ingest.max_pending
            ):
                self.source.resume()
            c = self.counters
            c["commits"] += 1
            c["records_written"] += len(ups)
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
                self._meter(rows, [b.bodies[i] for i in new])
            if b.rekey:
                self._committing = True
                await self._rekey(b.rekey)
                self._committing = False
            if (
                self._sealed
                or self._batch.deliveries
                or (self._dirty and self._records_due <= time.monotonic())
            ):
                self._wake.set()
            self._idle.set()

    async def _rekey(self, sids: set[str]) -> None:
        """Re-verify the unresolved `unknown_station` / `unknown_kid` quarantine rows of
        `sids` with the current keys (exact stored bytes, topic and arrival time) and ingest
        those that verify, page by page (committer only, so ordered with the batches)."""
        loop = asyncio.get_running_loop()
        c = self.counters
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
        bodies: list[dict[str, Any]] = []
        qids: list[int] = []
        rejected: list[tuple[int, str, str]] = []
        waiting = final = 0
        for q in page:
            kind = q.topic.rsplit("/", 1)[-1]
            try:
                v = wire.verify(kind, sid, q.record, self.keys)
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
            rows.append(RawRow(sid, v.boot, v.seq, kind, q.topic, q.recv_ms, v.kid, q.record))
            bodies.append(v.body)
            qids.append(q.id)
        if rows or rejected:
            res, outcomes = await loop.run_in_executor(
                self._db, self.store.resolve_quarantine, rows, qids, rejected
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
            self._meter(new_rows, [bodies[i] for i in res.new])

    def _meter(self, rows: list[RawRow], bodies: list[dict[str, Any]]) -> None:
        msgs = [
            RawMsg(sid=r.sid, boot=r.boot, seq=r.seq, recv_ms=r.recv_ms, body=body)
            for r, body in zip(rows, bodies, strict=False)
        ]
        try:
            self._dirty |= self.meter.add(msgs)
        except Exception:
            self.counters["meter_errors"] += 1
            log.exception("metering failed on a batch of %d messages (raw is stored)", len(msgs))

    def _changes(self) -> tuple[list[RecordRow], list[str]]:
        """Record changes of up to `records_sids_per_commit` stations (the rest stay due,
        so that one commit never waits for a whole fleet's records)."""
        dirty = sorted(self._dirty)
        take = dirty[: self.cfg.ingest.records_sids_per_commit]
        self._dirty.difference_update(take)
        if not self._dirty:
            self._records_due = time.monotonic() + self.cfg.ingest.records_interval_ms / 1000
        ups: list[RecordRow] = []
        gone: list[str] = []
        for sid in take:
            try:
                changed, removed = self.meter.changes(sid)
            except Exception:
                self.counters["meter_errors"] += 1
                log.exception("metering changes failed for %s", sid)
                continue
            ups.extend(record_to_row(r) for r in changed)
            gone.extend(removed)
        return ups, gone

    async def flush(self) -> None:
        """Commit (and acknowledge) every message read so far and write every pending
        record change now (shutdown, tests, benchmarks)."""
        self._records_due = 0.0
        while (
            self._sealed
            or self._batch.deliveries
            or self._dirty
            or self._committing
            or self._batch.rekey
        ):
            self._idle.clear()
            self._wake.set()
            await self._idle.wait()

    flush_records = flush

    async def _recorder(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.ingest.records_interval_ms / 1000)
            if self._dirty:
                self._wake.set()

    async def _housekeeping(self) -> None:
        ing = self.cfg.ingest
        last_keys = last_stats = last_gc = last_ckpt = time.monotonic()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
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
            if ing.gc_full_s and now - last_gc >= ing.gc_full_s:
                last_gc = now
                gc.collect()
                log.debug("full garbage collection took %.0f ms", (time.monotonic() - now) * 1e3)
            if now - last_stats >= ing.stats_interval_s:
                last_stats = now
                log.info("counters: %s", dict(sorted(self.counters.items())))

    def _checkpoint(self) -> None:
        try:
            self._ckpt_store.checkpoint()
        except Exception:  # the writer's autocheckpoint is the safety net
            log.exception("WAL checkpoint failed")

    # ---- start-up and the whole run ---------------------------------------------------------

    def replay(self) -> int:
        """Rebuild the metering state from the raw table and rewrite every record (what a
        crash may have left stale). Returns the number of raw messages replayed."""
        n = 0
        for rows in self.store.iter_raw():
            msgs = [
                RawMsg(
                    sid=r.sid,
                    boot=r.boot,
                    seq=r.seq,
                    recv_ms=r.recv_ms,
                    body=wire.decode_record(r.record),
                )
                for r in rows
            ]
            self.meter.add(msgs)
            n += len(msgs)
        by_sid: dict[str, list[RecordRow]] = {}
        for sid in self.meter.sids():
            changed, _ = self.meter.changes(sid)
            by_sid[sid] = [record_to_row(r) for r in changed]
        self.store.replace_records(by_sid, everything=True)
        return n

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        n = await loop.run_in_executor(self._db, self.replay)
        log.info("replayed %d raw messages into metering in %.1fs", n, time.monotonic() - t0)
        gc_was = gc.get_threshold()
        if self.cfg.ingest.gc_full_s:
            gc.collect()
            gc.set_threshold(gc_was[0], gc_was[1], 1 << 30)  # no automatic full collection
        dashboard = await self._dashboard()
        # every station with a key: what was quarantined before its key was added while
        # the agent was down (or before a crash) is re-verified first
        self._batch.rekey |= self.keys.take_learned()
        self._wake.set()
        tasks = [
            asyncio.create_task(x)
            for x in (self.source.run(), self._committer(), self._recorder(), self._housekeeping())
        ]

        async def _ready() -> None:
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
            if dashboard is not None:
                await dashboard.stop()
            await self._shutdown(tasks)
            gc.set_threshold(*gc_was)

    async def _dashboard(self) -> Any:
        """The dashboard in this loop when configured: it reads the database on its own
        read-only connection and thread, and polls at once after each commit."""
        dc = self.cfg.dashboard
        if dc is None:
            return None
        from agent.dashboard import DashboardServer, Live, make_app

        live = Live(self.cfg.db.url, carbon_params=self.cfg.carbon_params)
        server = DashboardServer(make_app(self.cfg.db.url, live=live), dc.host, dc.port)
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
        log.info("dashboard on %s", server.url)
        return server

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        # stop reading; commit, acknowledge and meter what was read; then say goodbye
        self._stopping = True
        self.source.pause()
        if not tasks[1].done():  # the committer
            try:
                await asyncio.wait_for(self.flush(), 15.0)
            except TimeoutError:
                log.warning(
                    "could not commit everything before stopping (the broker keeps "
                    "what was not acknowledged)"
                )
        self.source.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._db.shutdown(wait=True)
        self._ckpt.shutdown(wait=True)
        self._ckpt_store.close()
        self.store.close()
        self._keystore.store.close()
        log.info("stopped; counters: %s", dict(sorted(self.counters.items())))


def _sid_of(topic: str, prefix: str) -> str | None:
    parts = topic.split("/")
    n = len(prefix.split("/"))
    if len(parts) == n + 2 and wire.SID_RE.fullmatch(parts[n]):
        return parts[n]
    return None
