"""The agent's health for operators: `/healthz` (JSON), `/metrics` (Prometheus text), and
the same state written to the database (`agent_health`) for the dashboard and
`stationctl watch --db`.

- `/healthz`: 200 while commits succeed, 503 while they fail; the body says when the last
  commit was, how many messages wait uncommitted (`pending`, not acknowledged), the lag
  (age of the oldest of them), since when commits fail and the last error.
- `/metrics`: messages by outcome (stored, duplicate, conflict, quarantined, spoiled),
  quarantine by reason, spoiled sources by kind, the commit latency histogram, pending
  depth, last commit age, failing (0/1). Counters are read at scrape time from the
  service's own `counters`, so the two never disagree.
- Served on the dashboard's server when `[dashboard]` is configured, else on a small
  listener of its own at `[health] host/port` (`HealthServer`, plain asyncio HTTP/1.1).
- The agent upserts its state into the database every few seconds (`Service`); a reader
  (`banner`) turns it into one line: "agent failing since …: reason" while commits fail,
  "agent silent for N s" when the row stops being refreshed (the agent is down, hung, or
  cannot write at all: a locked or full database), nothing while all is well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

WRITE_S: Final = 2.0  # the agent upserts its state this often
SILENT_S: Final = 15.0  # a state older than this: the agent is silent
OUTCOMES: Final = ("stored", "duplicate", "conflict", "quarantined", "spoiled")
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Health:
    """What the committer reports (`committed`, `failed`) and what operators read
    (`snapshot`, `metrics`). `pending`, `oldest_ms` and `held` are set by the service: the
    number of messages read and not yet committed, the receive time of the oldest of them,
    and the number committed and held for their station's metering step."""

    def __init__(self, counters: Counter[str]) -> None:
        self.counters = counters
        self.pending: Callable[[], int] = lambda: 0
        self.oldest_ms: Callable[[], int | None] = lambda: None
        self.held: Callable[[], int] = lambda: 0  # committed, waiting for metering
        self.started_ms = now_ms()
        self.last_commit_ms: int | None = None
        self.failing_since_ms: int | None = None
        self.last_error: str | None = None
        self.last_error_ms: int | None = None
        self.stopped_ms: int | None = None
        self.shards: list[int] | None = None  # one agent of several: the shards it holds
        self.registry = CollectorRegistry(auto_describe=False)
        self.commit_seconds = Histogram(
            "stationctl_agent_commit_seconds",
            "Time of one commit (one transaction: a batch of messages and due records)",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Collector(self))

    def committed(self, seconds: float) -> int | None:
        """A commit succeeded; returns when the failing spell it ends began (or None)."""
        self.commit_seconds.observe(seconds)
        self.last_commit_ms = now_ms()
        since, self.failing_since_ms = self.failing_since_ms, None
        return since

    def failed(self, exc: BaseException) -> bool:
        """A commit failed; True when this starts a failing spell."""
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        self.last_error_ms = now_ms()
        if self.failing_since_ms is None:
            self.failing_since_ms = self.last_error_ms
            return True
        return False

    def error(self, what: str) -> None:
        """Something went wrong that does not stop commits (metering, an alarm write)."""
        self.last_error = what[:300]
        self.last_error_ms = now_ms()

    @property
    def failing(self) -> bool:
        return self.failing_since_ms is not None

    def snapshot(self, now: int | None = None) -> dict[str, Any]:
        now = now_ms() if now is None else now
        oldest = self.oldest_ms()
        c = self.counters
        return {
            "status": "failing" if self.failing else "ok",
            "updated_ms": now,
            "pid": os.getpid(),
            "started_ms": self.started_ms,
            "last_commit_ms": self.last_commit_ms,
            "last_commit_age_s": _age(self.last_commit_ms, now),
            "pending": self.pending(),
            "lag_s": 0.0 if oldest is None else max(0, now - oldest) / 1000,
            "held": self.held(),
            "failing_since_ms": self.failing_since_ms,
            "last_error": self.last_error,
            "last_error_ms": self.last_error_ms,
            "stopped_ms": self.stopped_ms,
            "messages": {k: c[k] for k in OUTCOMES},
            **({"shards": self.shards} if self.shards is not None else {}),
        }

    def to_json(self, now: int | None = None) -> str:
        return msgspec.json.encode(self.snapshot(now)).decode()

    def metrics(self) -> bytes:
        return generate_latest(self.registry)


def _age(ms: int | None, now: int) -> float | None:
    return None if ms is None else max(0, now - ms) / 1000


class _Collector(Collector):
    """The service's counters as Prometheus metrics, read at scrape time."""

    def __init__(self, h: Health) -> None:
        self.h = h

    def collect(self) -> Iterator[Metric]:
        h = self.h
        c = dict(h.counters)
        m = CounterMetricFamily(
            "stationctl_agent_messages",
            "Messages by outcome (spoiled: stored with at least one source spoiled, §6.9)",
            labels=["outcome"],
        )
        for k in OUTCOMES:
            m.add_metric([k], c.get(k, 0))
        yield m
        q = CounterMetricFamily(
            "stationctl_agent_quarantine", "Quarantined messages by reason", labels=["reason"]
        )
        for k, v in sorted(c.items()):
            if k.startswith("q."):
                q.add_metric([k[2:]], v)
        yield q
        s = CounterMetricFamily(
            "stationctl_agent_spoiled_sources",
            "Sources spoiled by a bad field (meter, slot, bat, err, slots, event, hist)",
            labels=["source"],
        )
        for k, v in sorted(c.items()):
            if k.startswith("spoiled."):
                s.add_metric([k[8:]], v)
        yield s
        yield CounterMetricFamily(
            "stationctl_agent_commit_failures",
            "Commits that failed",
            value=c.get("commit_failures", 0),
        )
        yield CounterMetricFamily(
            "stationctl_agent_internal_errors",
            "Messages the agent failed on (quarantined as internal) and metering errors",
            value=c.get("q.internal", 0) + c.get("meter_errors", 0),
        )
        now = now_ms()
        yield GaugeMetricFamily(
            "stationctl_agent_pending_messages",
            "Messages read and not yet committed (so not acknowledged)",
            value=h.pending(),
        )
        oldest = h.oldest_ms()
        yield GaugeMetricFamily(
            "stationctl_agent_lag_seconds",
            "Age of the oldest message not yet committed",
            value=0.0 if oldest is None else max(0, now - oldest) / 1000,
        )
        yield GaugeMetricFamily(
            "stationctl_agent_metering_held_messages",
            "Messages committed and waiting for their station's metering step",
            value=h.held(),
        )
        age = _age(h.last_commit_ms, now)
        yield GaugeMetricFamily(
            "stationctl_agent_last_commit_age_seconds",
            "Seconds since the last successful commit (since start when none yet)",
            value=age if age is not None else max(0, now - h.started_ms) / 1000,
        )
        yield GaugeMetricFamily(
            "stationctl_agent_failing", "1 while commits fail", value=1 if h.failing else 0
        )


# ---- serving ----------------------------------------------------------------------------------


def respond(h: Health, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) for a GET of `path` (`/healthz`, `/metrics`)."""
    path = path.split("?", 1)[0]
    if path == "/healthz":
        body = msgspec.json.encode(h.snapshot())
        return (503 if h.failing else 200), "application/json", body
    if path == "/metrics":
        return 200, CONTENT_TYPE, h.metrics()
    return 404, "text/plain; charset=utf-8", b"not found\n"


def routes(h: Health) -> list[Any]:
    """The two endpoints as Starlette routes (for the dashboard's server)."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    def endpoint(request: Request) -> Response:
        status, ctype, body = respond(h, request.url.path)
        return Response(body, status_code=status, media_type=ctype)

    return [Route(p, endpoint, methods=["GET"]) for p in ("/healthz", "/metrics")]


_REASONS: Final = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Unavailable"}


class HealthServer:
    """`/healthz` and `/metrics` on host:port (0: a free port) in the running loop, for an
    agent without a dashboard: one GET per connection, closed after the answer."""

    def __init__(self, h: Health, host: str, port: int) -> None:
        self.h = h
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5.0)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3:
                return
            if parts[0] not in (b"GET", b"HEAD"):
                status, ctype, body = 405, "text/plain; charset=utf-8", b"GET only\n"
            else:
                status, ctype, body = respond(self.h, parts[1].decode("latin-1"))
            w.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if parts[0] == b"HEAD" else body)
            )
            await asyncio.wait_for(w.drain(), 5.0)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        except Exception:  # never let a scrape take anything down
            log.exception("health endpoint")
        finally:
            w.close()


# ---- reading it back (dashboard, watch) -------------------------------------------------------


def banner(row: tuple[int, str] | None, now: int | None = None) -> str | None:
    """One line about the agent from its `agent_health` row (updated_ms, state JSON), or
    None when all is well (or no agent ever wrote one: a database of another origin)."""
    if row is None:
        return None
    now = now_ms() if now is None else now
    updated, text = row
    try:
        st = msgspec.json.decode(text)
    except msgspec.DecodeError:
        st = {}
    if not isinstance(st, dict):
        st = {}
    if st.get("stopped_ms"):
        return f"agent stopped at {_iso(st['stopped_ms'])}"
    age = (now - updated) // 1000
    if age >= SILENT_S:
        return f"agent silent for {age} s"
    since = st.get("failing_since_ms")
    if since:
        return f"agent failing since {_iso(since)}: {st.get('last_error') or 'unknown error'}"
    return None


def _iso(ms: Any) -> str:
    try:
        return datetime.fromtimestamp(int(ms) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(ms)
