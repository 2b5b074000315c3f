"""OCPP test helpers: the agent with its OCPP endpoint in this process, and charge points
made from the `ocpp` library's own ChargePoint classes over a real WebSocket.

    async with OcppAgent(db_url, {"CP-1": PASSWORD}) as ag:
        async with connect(ag.port, "CP-1", "ocpp1.6") as cp:
            await cp.call(call16.BootNotification(...))

`fill_ocpp_db(url)` leaves a database holding one 1.6 and one 2.0.1 charger's short
charging sequence with exact expected energy (for the report, bundle, export, dashboard
and verify tests that need OCPP stations beside their own).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import websockets
from ocpp.v16 import ChargePoint as Cp16
from ocpp.v16 import call as call16
from ocpp.v201 import ChargePoint as Cp201
from ocpp.v201 import call as call201

from agent.config import AgentConfig, BrokerConfig, DbConfig, IngestConfig, OcppConfig
from agent.ocpp.points import Points
from agent.service import Service
from agent.store import Store

PASSWORD = "test-password-0123456789"
T0_MS = 1_796_342_400_000  # 2026-12-04T00:00:00Z


def iso(ms: int) -> str:
    return (
        dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    )


def register(url: str, points: dict[str, str], keys: dict[str, str] | None = None) -> None:
    """Make the database (when new) and register the charge points."""
    Store(url, create=True).close()
    with Points(Store(url)) as p:
        for sid, pw in points.items():
            if p.get(sid) is None:
                p.add(sid, pw, (keys or {}).get(sid, ""))


class OcppAgent:
    """The agent (Service) with `[ocpp]` on a free loopback port; MQTT points nowhere
    (these tests are about OCPP)."""

    def __init__(
        self, url: str, points: dict[str, str], keys: dict[str, str] | None = None, **ocpp: Any
    ) -> None:
        register(url, points, keys)
        self.cfg = AgentConfig(
            db=DbConfig(url=url),
            broker=BrokerConfig(host="127.0.0.1", port=9),
            ingest=IngestConfig(),
            ocpp=OcppConfig(listen="127.0.0.1:0", **ocpp),
        )
        self.svc: Service | None = None
        self.port = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OcppAgent:
        self.svc = Service(self.cfg)
        self._task = asyncio.create_task(self.svc.run(self._stop))
        for _ in range(400):
            if self.svc.ocpp is not None and self.svc.ocpp.port:
                break
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.025)
        assert self.svc.ocpp is not None, "the OCPP endpoint did not start"
        self.port = self.svc.ocpp.port
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def counters(self) -> dict[str, int]:
        assert self.svc is not None and self.svc.ocpp is not None
        return {**self.svc.counters, **self.svc.ocpp.counters}


def auth(sid: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{sid}:{password}".encode()).decode()}


@contextlib.asynccontextmanager
async def connect(port: int, sid: str, proto: str, password: str = PASSWORD) -> AsyncIterator[Any]:
    """A library ChargePoint connected to the agent, its receive loop running."""
    ws = await websockets.connect(
        f"ws://127.0.0.1:{port}/{sid}",
        subprotocols=[proto],  # type: ignore[list-item]
        additional_headers=auth(sid, password),
    )
    cp = (Cp16 if proto == "ocpp1.6" else Cp201)(sid, ws, response_timeout=15)
    task = asyncio.create_task(cp.start())
    try:
        yield cp
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await ws.close()


def energy(
    wh: int | str, *, ts: int, unit: str = "Wh", context: str = "Sample.Periodic"
) -> dict[str, Any]:
    """A 1.6 meterValue entry with the energy register."""
    sv = {
        "value": str(wh),
        "measurand": "Energy.Active.Import.Register",
        "unit": unit,
        "context": context,
    }
    return {"timestamp": iso(ts), "sampledValue": [sv]}


def energy201(wh: int | str, *, ts: int, context: str = "Sample.Periodic") -> dict[str, Any]:
    sv = {"value": float(wh), "measurand": "Energy.Active.Import.Register", "context": context}
    return {"timestamp": iso(ts), "sampledValue": [sv]}


async def session16(cp: Any, connector: int, wh: list[int], t0: int, step_ms: int = 60_000) -> int:
    """Start at wh[0], a MeterValues for each later value, stop at the last: returns the
    transaction id the agent gave."""
    r = await cp.call(
        call16.StartTransaction(
            connector_id=connector, id_tag="TAG1", meter_start=wh[0], timestamp=iso(t0)
        )
    )
    tx = r.transaction_id
    for i, v in enumerate(wh[1:-1], 1):
        await cp.call(
            call16.MeterValues(
                connector_id=connector,
                transaction_id=tx,
                meter_value=[energy(v, ts=t0 + i * step_ms)],
            )
        )
    await cp.call(
        call16.StopTransaction(
            meter_stop=wh[-1], timestamp=iso(t0 + (len(wh) - 1) * step_ms), transaction_id=tx
        )
    )
    return int(tx)


async def session201(
    cp: Any, evse: int, wh: list[int], t0: int, tx: str, step_ms: int = 60_000
) -> None:
    """A 2.0.1 transaction: Started with wh[0], Updated per later value, Ended with the
    last."""
    n = len(wh)
    for i, v in enumerate(wh):
        kind = "Started" if i == 0 else "Ended" if i == n - 1 else "Updated"
        ctx = {"Started": "Transaction.Begin", "Ended": "Transaction.End"}.get(
            kind, "Sample.Periodic"
        )
        extra: dict[str, Any] = {}
        if i == 0:
            extra["evse"] = {"id": evse, "connector_id": 1}
            extra["id_token"] = {"id_token": "TAG1", "type": "ISO14443"}
        info: dict[str, Any] = {"transaction_id": tx}
        if kind == "Ended":
            info["stopped_reason"] = "EVDisconnected"
        await cp.call(
            call201.TransactionEvent(
                event_type=kind,
                timestamp=iso(t0 + i * step_ms),
                trigger_reason="MeterValuePeriodic" if kind == "Updated" else "Authorized",
                seq_no=i,
                transaction_info=info,
                meter_value=[energy201(v, ts=t0 + i * step_ms, context=ctx)],
                **extra,
            )
        )


async def boot16(cp: Any) -> None:
    await cp.call(call16.BootNotification(charge_point_model="Sim", charge_point_vendor="Test"))


async def boot201(cp: Any) -> None:
    await cp.call(
        call201.BootNotification(
            charging_station={"model": "Sim", "vendor_name": "Test"}, reason="PowerUp"
        )
    )


async def _fill(url: str) -> dict[str, int]:
    async with OcppAgent(url, {"OCPP-16": PASSWORD, "OCPP-201": PASSWORD}) as ag:
        async with connect(ag.port, "OCPP-16", "ocpp1.6") as cp:
            await boot16(cp)
            await session16(cp, 1, [10_000, 10_500, 11_200, 12_000], T0_MS + 3_600_000)
            await session16(cp, 2, [5_000, 5_400, 6_000], T0_MS + 7_200_000)
        async with connect(ag.port, "OCPP-201", "ocpp2.0.1") as cp:
            await boot201(cp)
            await session201(cp, 1, [20_000, 20_700, 21_500], T0_MS + 3_600_000, "tx-a")
    # credited: the first reading of each connector is its baseline (rule 0)
    return {"OCPP-16/1": 2_000_000, "OCPP-16/2": 1_000_000, "OCPP-201/1": 1_500_000}


def fill_ocpp_db(url: str) -> dict[str, int]:
    """Two chargers' sessions on 2026-12-04 into the database at `url` (made if new):
    the mWh credited per `sid/connector` (sessions: the same, one per transaction)."""
    return asyncio.run(_fill(url))
