"""Messages the broker drops (a session's queue limit reached while the agent was away)
never reach the agent, and their publishers had PUBACKs: the agent reads the broker's
`$SYS/broker/publish/messages/dropped` and raises a `broker_dropped` alarm when it grows."""

from __future__ import annotations

import asyncio
import pathlib

from agent.store import Store
from tests.test_agent_faults import SID, _Agent, _keys, _publish, _stream, _until
from tools.mosquitto import Mosquitto


async def test_a_queue_limit_that_drops_messages_is_alarmed(tmp_path: pathlib.Path) -> None:
    broker = Mosquitto(tmp_path / "mosq", max_queued=10, insecure=True)
    broker.start()
    try:
        db = f"sqlite:///{tmp_path}/agent.db"
        _keys(db, SID)
        async with _Agent(db, broker.port):
            pass  # the agent's session exists; now it is away
        items = _stream(SID, 40)
        await _publish(broker.port, items)  # every one PUBACKed by the broker
        async with _Agent(db, broker.port) as a:
            c = a.svc.counters
            await _until(lambda: c["broker_dropped"] >= 30, 15, str(c))
            await a.svc.flush()
            assert c["stored"] <= 10 + 1  # what the queue held (and one in flight)
            await asyncio.sleep(1.5)  # more $SYS reports: the same count is not alarmed again
        with Store(db, create=False) as s:
            alarms = [x for x in s.alarms() if x[2] == "broker_dropped"]
        assert len(alarms) == 1 and alarms[0][3] == "crit", alarms
        assert "dropped" in alarms[0][4] and "never reached the agent" in alarms[0][4]
    finally:
        broker.stop()
