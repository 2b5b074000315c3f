"""The loop parses each topic once (agent/service.py `_message`, TOPICS_KEPT): a topic
seen before gives the same station and kind, a bad topic is quarantined every time (it is
never kept), and the topics kept stay bounded."""

from __future__ import annotations

import pathlib

import pytest

from agent import service
from agent.config import AgentConfig, DbConfig
from agent.keys import KeyStore
from agent.service import Service
from agent.sources.mqtt import Delivery
from tests.agent_helpers import Station, key_for


def test_topics_are_parsed_once_bad_ones_never_kept_and_the_cache_is_bounded(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    sids = [f"KH-TOP-{i:04d}" for i in range(5)]
    with KeyStore(url) as ks:
        for s in sids:
            ks.add(s, key_for(s))
    monkeypatch.setattr(service, "TOPICS_KEPT", 3)
    svc = Service(AgentConfig(db=DbConfig(url=url)))
    try:
        stations = [Station(s, slots=2) for s in sids]
        d = Delivery(1, 1, 0)
        for _ in range(2):  # the second round reads the topics kept (and re-parses the rest)
            for st in stations:
                st.advance()
                topic, payload = st.topic("telemetry"), st.telemetry()[1]
                svc._message(topic, payload, d)
                assert len(svc._topics) <= 3
            b = svc._batch
            assert [r.sid for r in b.rows[-5:]] == sids
            assert {r.kind for r in b.rows} == {"telemetry"}
        # a bad topic: quarantined each time, never kept
        bad = "stations/kh-lower/telemetry"
        for _ in range(2):
            svc._message(bad, payload, d)
        assert [q.reason for q in svc._batch.quarantine] == ["bad_topic", "bad_topic"]
        assert bad not in svc._topics
        # a topic kept is bound to its own station: another station's payload on it is caught
        kept = next(iter(svc._topics))
        other = stations[(sids.index(svc._topics[kept][0]) + 1) % 5]
        other.advance()
        svc._message(kept, other.telemetry()[1], d)
        assert svc._batch.quarantine[-1].reason == "topic_mismatch"
    finally:
        svc.store.close()
