"""Live updates: one poller thread for every client, and Server-Sent Events.

`Live` owns the `FleetState` and a read-only `Reader`. Its thread polls the database once a
second (sooner after `nudge()`, which the agent calls after a commit when the dashboard
runs inside it), applies what is new, then builds the payload of each topic that has
subscribers once, and hands the bytes to the `Hub` on the event loop. So the cost of a
tick does not grow with the number of clients; each client costs one socket write.

Topics (the `topic` query parameter of /api/live) carry the same JSON as a GET:
`fleet` (/api/fleet), `alarms` (/api/alarms), `station:<SID>` (/api/stations/<SID>).
A slow client never queues anything: it gets the newest payload when it is ready.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, TypeVar

import msgspec

from agent import health, wire
from agent.ledger import carbon
from agent.ocpp import frames
from agent.store import now_ms

from .reader import Raw, Reader
from .state import FleetState, ViewConfig

log = logging.getLogger(__name__)

KEEPALIVE_S: Final = 15.0
HEARTBEAT_S: Final = 5.0  # an unchanged topic is sent again this often ("last seen" ages)
T = TypeVar("T")
_encode = msgspec.json.Encoder().encode


def sse(payload: bytes) -> bytes:
    """One SSE message (the JSON is a single line)."""
    return b"data: " + payload + b"\n\n"


class Hub:
    """Topic → newest payload, and the clients waiting for the next one (loop thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _subs (read by the poller thread)
        self._subs: dict[str, int] = {}
        self._payload: dict[str, bytes] = {}
        self._events: dict[str, asyncio.Event] = {}
        self.closed = False
        self.clients = 0
        self.sent = 0  # messages written to clients

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, n in self._subs.items() if n > 0]

    def publish(self, payloads: dict[str, bytes]) -> None:
        for topic, p in payloads.items():
            self._payload[topic] = p
            ev = self._events.pop(topic, None)
            if ev is not None:
                ev.set()

    def close(self) -> None:
        self.closed = True
        for ev in self._events.values():
            ev.set()
        self._events.clear()

    async def stream(self, topic: str, first: bytes) -> AsyncIterator[bytes]:
        with self._lock:
            self._subs[topic] = self._subs.get(topic, 0) + 1
        self.clients += 1
        try:
            yield b"retry: 2000\n" + sse(first)
            last = first
            while not self.closed:
                ev = self._events.get(topic)
                if ev is None:
                    ev = self._events[topic] = asyncio.Event()
                try:
                    async with asyncio.timeout(KEEPALIVE_S):
                        await ev.wait()
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                p = self._payload.get(topic)
                if p is not None and p is not last and not self.closed:
                    last = p
                    self.sent += 1
                    yield sse(p)
        finally:
            self.clients -= 1
            with self._lock:
                self._subs[topic] -= 1
                if not self._subs[topic]:
                    del self._subs[topic]
                    self._payload.pop(topic, None)


class Live:
    """The dashboard's data: `start(loop)`, `stop()`, `nudge()`, `view(fn, *args)`."""

    def __init__(
        self,
        db_url: str,
        cfg: ViewConfig | None = None,
        *,
        carbon_params: str | None = None,
        poll_s: float = 1.0,
        records_s: float = 5.0,
        min_poll_s: float = 0.2,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.cfg = cfg or ViewConfig()
        try:
            params: carbon.CarbonParams | None = carbon.load_params(carbon_params)
        except carbon.CarbonParamsError as e:
            log.error("carbon parameters: %s (CO2e not shown)", e)
            params = None
        self.state = FleetState(self.cfg, params)
        self.reader = Reader(db_url)
        self._history = Reader(db_url)  # the history pages' queries (read())
        self._history_lock = threading.Lock()
        self.hub = Hub()
        self.lock = threading.Lock()
        self.poll_s = poll_s
        self.records_s = records_s
        self.min_poll_s = min_poll_s
        self.clock = clock
        self.counters = {"polls": 0, "rows": 0, "bad_rows": 0, "poll_errors": 0}
        self.poll_ms = 0.0  # duration of the last poll
        self.last_poll = 0  # Unix ms of the last successful poll
        self._last = {"raw": 0, "quarantine": 0, "alarms": 0}
        self._status: dict[str, bytes] = {}
        self._agent_row: tuple[int, str] | None = None  # the agent's health row, last read
        self._records_at = 0.0
        self._backfilled = False
        self._sent_at: dict[str, tuple[Any, float]] = {}  # topic -> (version, monotonic time)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- the poller thread ---------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dashboard-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.hub.close()
        self.reader.close()
        with self._history_lock:
            self._history.close()

    def nudge(self) -> None:
        """New rows were committed: poll soon (at most every `min_poll_s`)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.poll_once()
                self._publish()
            except Exception:  # a bad moment of the database must not end live updates
                self.counters["poll_errors"] += 1
                log.exception("dashboard poll failed")
                self.reader.close()
            took = time.monotonic() - t0
            self._wake.wait(max(0.0, self.poll_s - took))
            self._wake.clear()
            rest = self.min_poll_s - (time.monotonic() - t0)
            if rest > 0 and not self._stop.is_set():
                self._stop.wait(rest)

    def poll_once(self) -> bool:
        """Read what is new and apply it. False while the database cannot be opened."""
        if not self.reader.open():
            return False
        t0 = time.monotonic()
        now = self.clock()
        r = self.reader
        with self.lock:
            if not self._backfilled:
                self._backfill(now)
            else:
                for _ in range(10):  # at most 50k rows a tick; the rest next time
                    rows = r.raw_after(self._last["raw"], 5000)
                    self._apply(rows)
                    if len(rows) < 5000:
                        break
            self._agent_row = r.agent_health()
            for sid, recv, rec in r.status():
                if self._status.get(sid) != rec:
                    self._status[sid] = rec
                    try:
                        obj = msgspec.json.decode(rec)
                    except msgspec.DecodeError:
                        continue
                    if isinstance(obj, dict):
                        self.state.set_status(sid, recv, obj)
            for qid, recv, topic, reason, detail, qsid, res in r.quarantine_after(
                self._last["quarantine"]
            ):
                self._last["quarantine"] = max(self._last["quarantine"], qid)
                self.state.add_quarantine(recv, qsid, reason, detail, topic, qid, res)
            for aid, ts, asid, code, level, detail in r.alarms_after(self._last["alarms"]):
                self._last["alarms"] = max(self._last["alarms"], aid)
                self.state.add_agent_alarm(ts, asid, code, level, detail)
            if time.monotonic() - self._records_at >= self.records_s:
                self._records_at = time.monotonic()
                self._records(now)
                self.state.set_points(r.ocpp_points())
                first = self.state.first_reject_id()
                if first is not None:
                    self.state.resolve(r.resolved_from(first))
            self.state.tick(now)
        self.counters["polls"] += 1
        self.poll_ms = (time.monotonic() - t0) * 1000
        self.last_poll = now
        return True

    def _backfill(self, now: int) -> None:
        r = self.reader
        top = r.max_id("raw")
        start = r.first_id_since("raw", "recv_ms", now - self.cfg.history_s * 1000)
        start = max(start, top - self.cfg.backfill_rows + 1, 1)
        self._last["raw"] = start - 1
        while True:
            rows = r.raw_after(self._last["raw"], 5000)
            self._apply(rows)
            if len(rows) < 5000 or self._last["raw"] >= top:
                break
        # stations silent for longer than the window: their newest reading all the same;
        # an OCPP charger's picture is made of several frames (its BootNotification, the
        # newest status and register of each connector): its newest frames, applied again
        # (every value is kept by the key that set it: a frame seen twice changes nothing)
        for sid in r.sids():
            st = self.state.stations.get(sid)
            if st is None or st.tel is None or st.source != "own":
                tail = r.ocpp_tail(sid, self.cfg.ocpp_tail_rows)
                if tail:
                    self._apply(tail, advance=False)
                    continue
            if st is None or st.tel is None:
                row = r.latest_telemetry(sid)
                if row is not None:
                    self._apply([row], advance=False)
        self.state.set_points(r.ocpp_points())
        since = now - self.cfg.recent_s * 1000
        self._last["quarantine"] = r.first_id_since("quarantine", "recv_ms", since) - 1
        self._last["alarms"] = r.first_id_since("alarms", "ts_ms", since) - 1
        self._backfilled = True
        log.info(
            "dashboard: read back %d raw rows, %d stations",
            self.counters["rows"],
            len(self.state.stations),
        )

    def _apply(self, rows: list[Raw], advance: bool = True) -> None:
        for row in rows:
            if advance:
                self._last["raw"] = max(self._last["raw"], row.id)
            if row.kind == frames.KIND:  # a charger's OCPP frame, as received (§11)
                try:
                    proto = frames.proto_of(row.topic)
                    msg = frames.parse(row.record)
                    body = frames.body_of(
                        proto,
                        row.record,
                        row.recv_ms,
                        row.sid,
                        row.boot,
                        row.seq,
                        checked=row.kid == frames.SIGNED_KID,
                    )
                except Exception:  # noqa: BLE001  (stored frames parsed; count anything odd)
                    self.counters["bad_rows"] += 1
                    continue
                self.counters["rows"] += 1
                self.state.add_ocpp(row.sid, proto, row.recv_ms, (row.boot, row.seq), msg, body)
                continue
            try:
                body = wire.decode_record(row.record)
            except Exception:  # noqa: BLE001  (stored rows were verified; count anything odd)
                self.counters["bad_rows"] += 1
                continue
            self.counters["rows"] += 1
            self.state.add_raw(row.sid, row.kind, row.recv_ms, body)

    def _records(self, now: int) -> None:
        days_from, intervals_from = self.state.records_since(now)
        self.state.set_records(
            self.reader.day_records(days_from), self.reader.records("interval", intervals_from), now
        )

    # ---- payloads -------------------------------------------------------------------------

    def payload(self, topic: str) -> bytes | None:
        """The JSON of a topic now, or None when it names no known station."""
        now = self.clock()
        with self.lock:
            agent = self._agent(now)
            if topic == "fleet":
                return _encode({**self.state.fleet(now), "agent": agent})
            if topic == "alarms":
                return _encode({**self.state.alarms(now), "agent": agent})
            if topic.startswith("station:"):
                v = self.state.station(topic[len("station:") :], now)
                return None if v is None else _encode({**v, "agent": agent})
        return None

    def _agent(self, now: int) -> dict[str, Any]:
        """The agent as the dashboard shows it: `banner` is one line ("agent failing since
        …: reason", "agent silent for N s", "agent stopped at …") or None while all is well."""
        row = self._agent_row
        return {
            "banner": health.banner(row, now),
            "updated_ms": None if row is None else row[0],
        }

    def agent(self) -> dict[str, Any]:
        with self.lock:
            return self._agent(self.clock())

    def fleet(self) -> dict[str, Any]:
        """The fleet view with the agent's banner (what /api/fleet and `watch` show)."""
        with self.lock:
            now = self.clock()
            return {**self.state.fleet(now), "agent": self._agent(now)}

    def _version(self, topic: str) -> Any:
        s = self.state
        # the banner's kind (none, failing since …, silent, stopped) pushes at once; its
        # "for N s" follows the heartbeat
        b = health.banner(self._agent_row, self.clock())
        a = None if b is None else b.split(" for ")[0]
        if topic == "fleet":
            return (s.version, a)
        if topic == "alarms":
            return (s.alarm_version, a)
        st = s.stations.get(topic[len("station:") :])
        return (st.version if st else None, s.alarm_version, a)

    def _publish(self) -> None:
        """Build each subscribed topic whose content changed (or whose heartbeat is due)
        once, and hand the bytes to the hub."""
        loop = self._loop
        topics = self.hub.topics()
        if loop is None or not topics:
            return
        out = {}
        t = time.monotonic()
        for topic in topics:
            with self.lock:
                v = self._version(topic)
            last = self._sent_at.get(topic)
            if last is not None and last[0] == v and t - last[1] < HEARTBEAT_S:
                continue
            p = self.payload(topic)
            if p is not None:
                out[topic] = p
                self._sent_at[topic] = (v, t)
        for topic in list(self._sent_at):
            if topic not in topics:
                del self._sent_at[topic]
        if out:
            try:
                loop.call_soon_threadsafe(self.hub.publish, out)
            except RuntimeError:  # the loop closed under us (shutdown)
                pass

    def read(self, fn: Callable[[Reader], T]) -> T:
        """`fn(reader)` on a connection of its own (the history pages read on request,
        one at a time, and the poller never waits for them). RuntimeError when the
        database cannot be read (yet); a failed query closes the connection (the next
        request opens it again)."""
        with self._history_lock:
            r = self._history
            if not r.open():
                raise RuntimeError(f"database not readable: {r.error}")
            try:
                return fn(r)
            except Exception:
                r.close()
                raise

    def view(self, fn: Callable[[FleetState, int], T]) -> T:
        """`fn(state, now)` under the lock."""
        with self.lock:
            return fn(self.state, self.clock())

    def health(self) -> dict[str, Any]:
        return {
            "ok": self.reader.store is not None and self.last_poll > 0,
            "db": self.reader.name,
            "last_poll_ms": self.last_poll or None,
            "poll_ms": round(self.poll_ms, 2),
            "stations": len(self.state.stations),
            "clients": self.hub.clients,
            "sent": self.hub.sent,
            **self.counters,
        }
