"""Simulated OCPP chargers beside the virtual stations (`stationctl sim --ocpp N`, the demo).

`OcppFleet(n, url, …)` runs `tools.ocpp_sim.run_points` in a thread of its own (its own
event loop): half the chargers speak OCPP 1.6J, half 2.0.1, two connectors each, random
sessions at 1–7 kW, a meter value every `sample_s` simulated seconds. With `db` the
charge points are registered in that agent database first (a new random password each
start; the agent reads them at each login). `stop()` ends every transaction, delivers
what is queued and returns the ground truth per charger (also written to `truth_path`).
With `state_path` the chargers' registers and the simulated clock are kept there at
`stop()` and taken up at the next start, as the stations' fleet keeps its own
(tools/fleet.py): a restarted demo's chargers carry on instead of reading 0 at a clock
that went back.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import secrets
import threading
import time
from typing import Any

from tools.ocpp_sim import PointSpec, SimClock, run_points
from tools.rig.rig import write_json_atomic

OCPP_STATE_FILE = "ocpp_state.json"  # beside the stations' fleet_state.json


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
        state_path: pathlib.Path | None = None,
    ) -> None:
        if not 0 <= n <= 1000:
            raise ValueError("OCPP chargers must be 0..1000")
        self.sids = point_ids(sid_prefix, n)
        self.url = url
        self.passwords = passwords or (register_points(db, self.sids) if db else {})
        self.accel = accel
        self.sample_s = sample_s
        self.seed = seed
        self.state_path = state_path
        # {sid: {connector: mWh}} the registers start from, and the clock's start
        self.registers: dict[str, dict[int, int]] = {}
        saved = load_state(state_path) if state_path is not None else None
        if saved is not None:
            self.registers = saved[1]
            now = int(time.time() * 1000) if clock_ms is None else clock_ms
            clock_ms = max(now, saved[0] + 1000)
        self.clock = SimClock(clock_ms, accel=accel)
        self.truth_path = truth_path
        self.truth: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    def specs(self) -> list[PointSpec]:
        return [
            PointSpec(
                sid,
                self.passwords.get(sid),
                "1.6" if i % 2 == 0 else "2.0.1",
                2,
                {"initial_mwh": dict(self.registers.get(sid, {}))},
            )
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
        if self.state_path is not None:
            for sid, gt in self.truth.items():
                regs = self.registers.setdefault(sid, {})
                for c, conn in gt["connectors"].items():
                    regs[int(c)] = int(conn["end_mwh"])
            write_json_atomic(
                self.state_path,
                {
                    "unix_ms": self.clock.now_ms(),
                    "registers": {
                        s: {str(c): v for c, v in r.items()} for s, r in self.registers.items()
                    },
                },
            )
        return self.truth


def load_state(path: pathlib.Path) -> tuple[int, dict[str, dict[int, int]]] | None:
    """(simulated clock ms, {sid: {connector: register mWh}}) kept by `OcppFleet.stop()`,
    or None when there is none (or it cannot be read: the chargers start afresh)."""
    try:
        x = json.loads(path.read_text())
        regs = {s: {int(c): int(v) for c, v in r.items()} for s, r in x["registers"].items()}
        return int(x["unix_ms"]), regs
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
