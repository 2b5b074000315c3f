"""Malformed messages through a real Mosquitto: each ends in quarantine with its precise
reason and its exact bytes, counted per reason, while the good messages around them are
stored and metered. Messages with a bad field outside the envelope are stored as received
with only that field's source spoiled (CONTRACT §6.9): counted and alarmed."""

from __future__ import annotations

import asyncio
import pathlib
from collections import Counter

from agent.config import AgentConfig, DbConfig, IngestConfig
from agent.keys import KeyStore
from agent.service import Service
from agent.sources.mqtt import BrokerConfig
from agent.store import Store
from tests.agent_helpers import (
    GOOD_SID,
    OTHER_SID,
    REVOKED_SID,
    Publisher,
    Station,
    compact,
    key_for,
    malformed_cases,
    spoiled_cases,
)
from tools.mosquitto import Mosquitto


async def wait_for(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


async def test_every_malformed_message_is_quarantined_with_its_reason(
    mosquitto: Mosquitto, tmp_path: pathlib.Path
) -> None:
    db = f"sqlite:///{tmp_path}/agent.db"
    with KeyStore(db) as ks:
        ks.add(GOOD_SID, key_for(GOOD_SID))
        ks.add(OTHER_SID, key_for(OTHER_SID))
        ks.add(REVOKED_SID, key_for(REVOKED_SID))
        ks.revoke(REVOKED_SID)
    cfg = AgentConfig(
        db=DbConfig(url=db, synchronous="normal"),
        broker=BrokerConfig(port=mosquitto.port, client_id="q-agent"),
        ingest=IngestConfig(records_interval_ms=50),
    )
    svc = Service(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    await asyncio.wait_for(svc.ready.wait(), 20)

    good = Station(GOOD_SID, slots=1)
    bad = malformed_cases()
    items: list[tuple[str, bytes]] = []
    good_payloads: list[bytes] = []
    for _name, topic, payload, _reason in bad:  # a good message before each bad one
        good.advance()
        kind, p = good.telemetry()
        items += [(good.topic(kind), p), (topic, payload)]
        good_payloads.append(p)
    spoiled = spoiled_cases()
    for _name, topic, payload, _sp in spoiled:
        items.append((topic, payload))
        good.advance()
        kind, p = good.telemetry()
        items.append((good.topic(kind), p))
        good_payloads.append(p)
    # a byte-identical repeat (duplicate) and another message under a stored key (conflict)
    items.append((good.topic("telemetry"), good_payloads[3]))
    good.seq = 2
    good.advance(1)
    conflict = good.telemetry()[1]
    items.append((good.topic("telemetry"), conflict))
    # status: birth (stored as the last status) and a status that is not JSON
    birth = compact(
        {"v": 1, "sid": GOOD_SID, "boot": 1, "state": "online", "fw": "t", "cfg": "0" * 12}
    )
    items += [(f"stations/{GOOD_SID}/status", birth), (f"stations/{OTHER_SID}/status", b"\xff")]
    # a signed event of the good station after all that still goes through
    good.seq = 100
    items.append((good.topic("event"), good.event("outbox_drop", n=2)[1]))

    pub = Publisher(mosquitto.port)
    await asyncio.to_thread(pub.send, items)
    pub.close()
    await wait_for(lambda: svc.counters["received"] >= len(items))
    stop.set()
    await task

    c = svc.counters
    want = Counter(reason for *_, reason in bad)
    want["conflict"] += 1
    want["bad_status"] += 1
    got = {k[2:]: v for k, v in c.items() if k.startswith("q.") and v}
    assert got == dict(want)
    assert c["stored"] == len(good_payloads) + len(spoiled) + 1  # + the event
    assert c["duplicate"] == 1 and c["conflict"] == 1 and c["status"] == 1
    assert c["quarantined"] == len(bad) + 2
    assert c["spoiled"] == sum(1 for *_, sp in spoiled if sp)
    kinds = Counter(src.split(":")[0] for *_, sp in spoiled for src, _path in sp)
    assert {k[8:]: v for k, v in c.items() if k.startswith("spoiled.") and v} == dict(kinds)

    with Store(db) as st:
        q = st.quarantine_rows()
        # every malformed message, with its reason, its topic and its exact bytes
        assert [
            (r.topic, r.record, r.reason) for r in q if r.reason not in ("conflict", "bad_status")
        ] == [(t, p, reason) for _, t, p, reason in bad]
        assert all(r.detail for r in q)
        conf = [r for r in q if r.reason == "conflict"]
        assert len(conf) == 1 and conf[0].record == conflict and conf[0].sid == GOOD_SID
        stored = [r.record for page in st.iter_raw() for r in page]
        # the good ones, in order, the first copy of seq 2, and each spoiled one as received
        sp_payloads = {p for *_, p, _sp in spoiled}
        assert [p for p in stored[:-1] if p not in sp_payloads] == good_payloads
        assert [p for p in stored if p in sp_payloads] == [p for *_, p, _sp in spoiled]
        alarms = st.alarms()
        assert [a[2] for a in alarms if a[2] != "bad_field"] == ["conflict"]
        # every spoiled field named by an alarm (one per station and field a minute)
        paths = {path for *_, sp in spoiled for _src, path in sp}
        got_paths = {a[4].split(":", 1)[0] for a in alarms if a[2] == "bad_field"}
        assert got_paths == paths
        assert all(a[1] == GOOD_SID and a[3] == "warn" for a in alarms if a[2] == "bad_field")
        assert st.db.execute("SELECT record FROM status").fetchall() == [(birth,)]
        # metering ran on the good ones
        assert st.record_rows(kind="interval")
