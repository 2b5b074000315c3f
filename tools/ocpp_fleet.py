"""Simulated OCPP chargers beside the virtual stations (`stationctl sim --ocpp N`, the demo).

`OcppFleet(n, url, …)` runs `tools.ocpp_sim.run_points` in a thread of its own (its own
event loop): half the chargers speak OCPP 1.6J, half 2.0.1, two connectors each, random
sessions at 1–7 kW, a meter value every `sample_s` simulated seconds. With `db` the
charge points are registered in that agent database first (a new random password each
start; the agent reads them at each login). `stop()` ends every transaction, delivers
what is queued and returns the ground truth per charger (also written to `truth_path`).
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import secrets
import threading
from typing import Any

from tools.ocpp_sim import PointSpec, SimClock, run_points


def point_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(1, n + 1)]


def register_points(db: str, sids: list[str]) -> dict[str, str]:
    """Each charge point in the agent database with a new password: {sid: password}."""
    from agent.ocpp.points import Points
    from agent.store import Store

    out: dict[str, str] = {}
    with Points(Store(db)) as pts:
        for sid in sids:
            pw = secrets.token_urlsafe(18)[:24]
            if pts.get(sid) is None:
                pts.add(sid, pw, note="simulated (tools/ocpp_fleet.py)")
            else:
                pts.set_password(sid, pw)
            out[sid] = pw
    return out


class OcppFleet:
    def __init__(
        self,
        n: int,
        url: str,
        *,
        passwords: dict[str, str] | None = None,
        db: str | None = None,
        accel: float = 60.0,
        sample_s: float = 60.0,
        seed: int = 1,
        sid_prefix: str = "KH-OCPP-",
        clock_ms: int | None = None,
        truth_path: pathlib.Path | None = None,
    ) -> None:
        if not 0 <= n <= 1000:
            raise ValueError("OCPP chargers must be 0..1000")
        self.sids = point_ids(sid_prefix, n)
        self.url = url
        self.passwords = passwords or (register_points(db, self.sids) if db else {})
        self.accel = accel
        self.sample_s = sample_s
        self.seed = seed
        self.clock = SimClock(clock_ms, accel=accel)
        self.truth_path = truth_path
        self.truth: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    def specs(self) -> list[PointSpec]:
        return [
            PointSpec(sid, self.passwords.get(sid), "1.6" if i % 2 == 0 else "2.0.1", 2)
            for i, sid in enumerate(self.sids)
        ]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="ocpp-fleet", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _main(self) -> None:
        async def go() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            self.truth = await run_points(
                self.url,
                self.specs(),
                accel=self.accel,
                stop=self._stop,
                sample_s=self.sample_s,
                clock=self.clock,
                seed=self.seed,
            )

        asyncio.run(go())

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.truth_path is not None and self.truth:
            self.truth_path.write_text(json.dumps(self.truth, indent=1, sort_keys=True))
        return self.truth
