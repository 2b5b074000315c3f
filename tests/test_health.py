"""agent/health.py: /healthz and /metrics (Prometheus text), their listener, the agent's
health row and the banner readers make of it; served by a running agent on the
dashboard's port."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from agent import health
from agent.config import AgentConfig, DashboardConfig, DbConfig, IngestConfig
from agent.keys import KeyStore
from agent.service import Service
from agent.sources.mqtt import BrokerConfig
from agent.store import Store
from tests.agent_helpers import Publisher, Station, key_for
from tools.mosquitto import Mosquitto


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_are_prometheus_text_read_from_the_counters() -> None:
    c: Counter[str] = Counter(
        stored=10, duplicate=2, conflict=1, quarantined=4, spoiled=3, commit_failures=5
    )
    c.update(
        {"q.bad_sig": 2, "q.too_deep": 1, "q.conflict": 1, "spoiled.bat": 2, "spoiled.meter": 1}
    )
    h = health.Health(c)
    h.pending = lambda: 7
    h.oldest_ms = lambda: health.now_ms() - 3000
    h.committed(0.004)
    h.committed(0.3)
    m = _samples(h.metrics())
    for k in health.OUTCOMES:
        assert m[("stationctl_agent_messages_total", (("outcome", k),))] == c[k]
    assert m[("stationctl_agent_quarantine_total", (("reason", "bad_sig"),))] == 2
    assert m[("stationctl_agent_quarantine_total", (("reason", "too_deep"),))] == 1
    assert m[("stationctl_agent_spoiled_sources_total", (("source", "bat"),))] == 2
    assert m[("stationctl_agent_commit_failures_total", ())] == 5
    assert m[("stationctl_agent_pending_messages", ())] == 7
    assert 2.5 < m[("stationctl_agent_lag_seconds", ())] < 10
    assert m[("stationctl_agent_commit_seconds_count", ())] == 2
    assert m[("stationctl_agent_commit_seconds_bucket", (("le", "0.005"),))] == 1
    assert m[("stationctl_agent_failing", ())] == 0
    c["stored"] += 1  # read at scrape time
    assert (
        _samples(h.metrics())[("stationctl_agent_messages_total", (("outcome", "stored"),))] == 11
    )


def test_healthz_says_failing_until_a_commit_succeeds() -> None:
    h = health.Health(Counter())
    status, ctype, body = health.respond(h, "/healthz")
    assert status == 200 and ctype == "application/json"
    s = json.loads(body)
    assert s["status"] == "ok" and s["last_commit_ms"] is None and s["pending"] == 0
    assert h.failed(OSError(28, "No space left on device"))
    assert not h.failed(OSError(28, "No space left on device"))  # the same spell
    status, _, body = health.respond(h, "/healthz?x=1")
    s = json.loads(body)
    assert status == 503 and s["status"] == "failing" and s["failing_since_ms"]
    assert s["last_error"] == "OSError: [Errno 28] No space left on device"
    assert _samples(h.metrics())[("stationctl_agent_failing", ())] == 1
    since = s["failing_since_ms"]
    assert h.committed(0.01) == since
    status, _, body = health.respond(h, "/healthz")
    s = json.loads(body)
    assert status == 200 and s["failing_since_ms"] is None and s["last_commit_age_s"] < 1
    assert s["last_error"]  # the last error stays for the operator to read
    assert health.respond(h, "/nope")[0] == 404


def test_banner() -> None:
    now = 1_800_000_000_000
    assert health.banner(None, now) is None
    ok = json.dumps({"status": "ok"})
    assert health.banner((now - 2000, ok), now) is None
    assert health.banner((now - 15_000, ok), now) == "agent silent for 15 s"
    failing = json.dumps({"failing_since_ms": now - 60_000, "last_error": "OperationalError: x"})
    b = health.banner((now, failing), now)
    assert b == "agent failing since 2027-01-15 07:59:00Z: OperationalError: x"
    assert health.banner((now - 20_000, failing), now) == "agent silent for 20 s"
    stopped = json.dumps({"stopped_ms": now - 1000})
    assert health.banner((now - 1000, stopped), now) == "agent stopped at 2027-01-15 07:59:59Z"
    assert health.banner((now, "not json"), now) is None


def _get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status), r.headers["Content-Type"], bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), e.headers["Content-Type"], bytes(e.read())


async def test_the_small_listener() -> None:
    h = health.Health(Counter(stored=1))
    srv = health.HealthServer(h, "127.0.0.1", 0)
    await srv.start()
    try:
        status, ctype, body = await asyncio.to_thread(_get, srv.url + "healthz")
        assert status == 200 and ctype == "application/json" and json.loads(body)["status"] == "ok"
        status, ctype, body = await asyncio.to_thread(_get, srv.url + "metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert _samples(body)[("stationctl_agent_messages_total", (("outcome", "stored"),))] == 1
        assert (await asyncio.to_thread(_get, srv.url + "x"))[0] == 404
        assert (await asyncio.to_thread(_get, srv.url + "healthz", "POST"))[0] == 405
        status, _, body = await asyncio.to_thread(_get, srv.url + "healthz", "HEAD")
        assert status == 200 and body == b""
        h.failed(RuntimeError("boom"))
        assert (await asyncio.to_thread(_get, srv.url + "healthz"))[0] == 503
        # a client that sends nothing does not hold anything up
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        t0 = time.monotonic()
        await srv.stop()
        assert time.monotonic() - t0 < 2
        w.close()
    finally:
        await srv.stop()


async def test_agent_serves_health_on_the_dashboard_and_writes_its_row(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    db = f"sqlite:///{tmp_path}/agent.db"
    sid = "KH-HLT-0001"
    with KeyStore(db) as ks:
        ks.add(sid, key_for(sid))
    cfg = AgentConfig(
        db=DbConfig(url=db, synchronous="normal"),
        broker=BrokerConfig(port=mosquitto.port, client_id="health-agent"),
        ingest=IngestConfig(records_interval_ms=50),
        dashboard=DashboardConfig(port=0),
    )
    svc = Service(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    await asyncio.wait_for(svc.ready.wait(), 20)
    assert svc.health_url is not None
    st = Station(sid, slots=1)
    items = []
    for _ in range(5):
        st.advance()
        items.append((st.topic("telemetry"), st.telemetry()[1]))
    pub = Publisher(mosquitto.port, client_id="health-pub")
    await asyncio.to_thread(pub.send, items)
    pub.close()
    end = time.monotonic() + 20
    while svc.counters["stored"] < 5:
        assert time.monotonic() < end
        await asyncio.sleep(0.05)
    status, _, body = await asyncio.to_thread(_get, svc.health_url + "healthz")
    s: dict[str, Any] = json.loads(body)
    assert status == 200 and s["messages"]["stored"] == 5 and s["last_commit_ms"]
    status, _, body = await asyncio.to_thread(_get, svc.health_url + "metrics")
    assert _samples(body)[("stationctl_agent_messages_total", (("outcome", "stored"),))] == 5
    # the dashboard's own pages are still there
    assert (await asyncio.to_thread(_get, svc.health_url + "api/fleet"))[0] == 200

    def row() -> tuple[int, str] | None:
        with Store(db, create=False) as s:
            return s.agent_health()

    end = time.monotonic() + 10
    while (r := await asyncio.to_thread(row)) is None or json.loads(r[1])["messages"]["stored"] < 5:
        assert time.monotonic() < end, r
        await asyncio.sleep(0.1)
    assert health.banner(r) is None  # running, committing: nothing to say
    stop.set()
    await asyncio.wait_for(task, 10)
    r = row()
    assert r is not None and json.loads(r[1])["stopped_ms"]
    b = health.banner(r)
    assert b is not None and b.startswith("agent stopped at ")
