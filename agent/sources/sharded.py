"""The MQTT side of an agent that is one of several (agent/cluster.py): one persistent
session per shard it holds, each keeping only its own stations' messages.

It offers the service what one MqttSource does (`run`, `ack`, `pause`, `resume`, `stop`,
`connected`), over the sessions of the shards taken (`take`) and given back (`drop`).
A message of another shard's station is acknowledged at once (its shard's session has
its own copy); the service's batches carry each delivery with the session it came on, and
`ack` sends each PUBACK there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import Callable

from agent.cluster import shard_client_id, shard_of
from agent.sources.mqtt import BrokerConfig, Delivery, MqttSource, OnMessage

log = logging.getLogger(__name__)


class ShardedSource:
    def __init__(
        self,
        cfg: BrokerConfig,
        shards: int,
        on_message: OnMessage,
        *,
        on_drained: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.shards = shards
        self._on_message = on_message
        self._on_drained = on_drained or (lambda: None)
        self.sources: dict[int, MqttSource] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._foreign: dict[int, list[Delivery]] = {}  # to acknowledge after this read
        self._paused = False
        self._stopping = False
        self._prefix_len = len(cfg.prefix) + 1
        self._stop = asyncio.Event()
        self.connected = asyncio.Event()
        self.connected.set()  # holding no shard, there is nothing to wait for
        self.counters: Counter[str] = Counter()

    # ---- shards ------------------------------------------------------------------------------

    def held(self) -> set[int]:
        return set(self.sources)

    def take(self, k: int) -> None:
        """Open shard k's session (the caller holds its lock)."""
        if k in self.sources or self._stopping:
            return
        cfg = dataclasses.replace(self.cfg, client_id=shard_client_id(self.cfg.client_id, k))
        src = MqttSource(
            cfg, functools.partial(self._message, k), on_drained=functools.partial(self._drained, k)
        )
        if self._paused:
            src.pause()
        self.sources[k] = src
        self._tasks[k] = asyncio.create_task(self._run(k, src))
        self.connected.clear()
        log.info("shard %d: session %s opened", k, cfg.client_id)

    def drop(self, k: int) -> None:
        """Close shard k's session: what it delivered and we did not acknowledge goes to
        the shard's next owner (the broker keeps the session)."""
        src = self.sources.pop(k, None)
        if src is None:
            return
        src.stop()
        self._foreign.pop(k, None)
        log.info("shard %d: session closed", k)
        self._update_connected()

    async def _run(self, k: int, src: MqttSource) -> None:
        waiter = asyncio.create_task(self._connected(src))
        try:
            await src.run()
        finally:
            waiter.cancel()
            self._tasks.pop(k, None)

    async def _connected(self, src: MqttSource) -> None:
        await src.connected.wait()
        self._update_connected()

    def _update_connected(self) -> None:
        if all(s.connected.is_set() for s in self.sources.values()):
            self.connected.set()
        else:
            self.connected.clear()

    # ---- messages ----------------------------------------------------------------------------

    def _message(self, k: int, topic: str, payload: bytes, d: Delivery) -> None:
        d.src = self.sources.get(k)
        if topic[:5] == "$SYS/":  # the broker's own figures: every session has them
            self._on_message(topic, payload, d)
            return
        end = topic.find("/", self._prefix_len)
        sid = topic[self._prefix_len : end] if end > 0 else ""
        if shard_of(sid, self.shards) != k:  # (no station id: shard 0's, like "")
            self._foreign.setdefault(k, []).append(d)  # its own shard's session keeps it
            self.counters["foreign"] += 1
            return
        self._on_message(topic, payload, d)

    def _drained(self, k: int) -> None:
        foreign = self._foreign.pop(k, None)
        src = self.sources.get(k)
        if foreign and src is not None:
            src.ack(foreign)
        self._on_drained()

    # ---- what the service calls ----------------------------------------------------------------

    def ack(self, deliveries: list[Delivery]) -> None:
        by: dict[int, tuple[MqttSource, list[Delivery]]] = {}
        for d in deliveries:
            s = d.src
            if s is None:
                continue
            e = by.get(id(s))
            if e is None:
                by[id(s)] = (s, [d])
            else:
                e[1].append(d)
        for s, ds in by.values():
            s.ack(ds)  # a session given back meanwhile writes nothing (counted stale)

    def pause(self) -> None:
        self._paused = True
        for s in self.sources.values():
            s.pause()

    def resume(self) -> None:
        self._paused = False
        for s in self.sources.values():
            s.resume()

    async def run(self) -> None:
        """Until `stop()`: the sessions run as their shards are taken."""
        await self._stop.wait()

    def stop(self) -> None:
        self._stopping = True
        self._stop.set()
        for k in list(self.sources):
            self.drop(k)
