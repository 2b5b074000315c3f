"""Simulated OCPP charge points (1.6J and 2.0.1) for tests, benchmarks and the demo.

Built on the `ocpp` library's own client-side `ChargePoint` classes (`ocpp.v16`,
`ocpp.v201`) over a real WebSocket client (`websockets.connect`, subprotocol "ocpp1.6" or
"ocpp2.0.1", URL `<base>/<identity>`, `Authorization: Basic base64(identity:password)` as
OCPP security profiles 1/2 specify, an optional `ssl` context for wss).

Pieces
------
`SimClock`
    Simulated Unix milliseconds. `SimClock(accel=60)` runs 60x real time;
    `SimClock(manual=True)` only moves when stepped (`advance(ms)`, `set(ms)`,
    `sleep_until(ms)`), for tests. Every OCPP timestamp comes from it (`iso()`: ISO 8601 UTC
    with milliseconds and 'Z').
`Register`
    One per connector (1.6) / EVSE (2.0.1): an exact integer register in mWh, advanced by
    `power_w` x simulated time with integer arithmetic (W*ms / 3600 = mWh, the remainder is
    carried). The charger reports it in whole Wh (`mwh // 1000`) as
    `Energy.Active.Import.Register`; `advanced_mwh` counts every mWh it advanced (a reset to 0
    does not undo it).
`SimChargePoint(url, identity, password, version="1.6"|"2.0.1", connectors=2, clock=..., ...)`
    `connect()`, `boot()` (BootNotification, then Heartbeat every returned interval or
    `heartbeat_s`), `status(connector, status)`, `authorize(id_tag)`,
    `start(connector, id_tag, power_w=...)` -> `SimTransaction`, `sample(connector,
    context=...)`, `stop(connector, reason)`, `set_power(connector, w)`, `close()`,
    `charging_day(...)` -> ground truth, `ground_truth()`.
    Connector n of a 2.0.1 charger is EVSE n with connectorId 1.
    1.6: StartTransaction carries meterStart (Wh, from the register) and the CSMS's
    transactionId is used afterwards; MeterValues carry connectorId (+ transactionId while
    charging); StopTransaction carries meterStop, timestamp, transactionId, reason and
    transactionData with the Transaction.End value.
    2.0.1: TransactionEvent Started/Updated/Ended with a charger-made transaction id,
    evse {id, connectorId}, seqNo counting from 0 per transaction, triggerReason and
    meterValue contexts Transaction.Begin / Sample.Periodic (or Sample.Clock) /
    Transaction.End; MeterValues with evseId outside a transaction.

Options for testing a CSMS (constructor keywords unless noted)
----------------------------------------------------------------
`unit="Wh"|"kWh"`     energy values in Wh or in kWh with exactly 3 decimals. 1.6 values are
                      decimal strings ("1234" / "1.234"); 2.0.1 values are JSON numbers
                      (the 2.0.1 schema says number), 1234 or 1.234.
`extra_measurands`    each meter value also carries Power.Active.Import, Current.Import and
                      Voltage per phase, and per-phase energy registers (L1/L2/L3) next to
                      the total, which a CSMS must ignore.
`clock_aligned_s`     (charging_day) extra Sample.Clock values at multiples of this.
`zero_at_boot`        the first energy meter value after a boot, and the first of each
                      transaction, reads 0 (CitrineOS #1060), later ones the true value.
                      1.6 meterStart stays true (it is the register, and mandatory).
`retry_stop`          StopTransaction / TransactionEvent Ended is sent twice with the same
                      payload (a retry after a lost answer, CitrineOS #880); new message id.
`no_final_value`      2.0.1 Ended without meterValue; 1.6 StopTransaction without
                      transactionData (meterStop is mandatory and stays).
`reset_register(c)`   the register of connector c drops to 0; `reboot()` stops running
                      transactions (reason Reboot), closes the socket, reconnects and sends a
                      new BootNotification.
`go_offline()` / `come_online(order="in_order"|"shuffled", duplicate=False, seed=None)`
                      while offline (or whenever the socket is down) the charger keeps
                      charging and queues its transaction messages (StartTransaction,
                      MeterValues, StopTransaction / TransactionEvent with offline=true) with
                      their original timestamps; other messages (status, heartbeat) are
                      dropped. On reconnect the queue is delivered late, shuffled and/or each
                      message twice if asked. 1.6 needs the CSMS's transactionId, so queued
                      StartTransactions always go first, in order; the first transactionId
                      returned is used by the later messages of that transaction.
`signer`              `signer(mwh, time_ms, tx_stage) -> OCMF str` (tx_stage "B", "T" or
                      "E"): 1.6 adds a sampledValue with format="SignedData" and the OCMF
                      string next to the Raw value; 2.0.1 puts signedMeterValue
                      {signedMeterData: base64(OCMF), signingMethod: "", encodingMethod:
                      "OCMF", publicKey: ""} on the energy sampled value.
`garbage(n)`          sends n frames that are not OCPP (random text, a JSON object, arrays of
                      the wrong shape, a 2 MiB frame); the server may close the connection;
                      the simulator does not crash (it reconnects on the next `connect()`).

Ground truth (`ground_truth()`, JSON-able)::

    {"identity": "CP1", "version": "1.6",
     "connectors": {"1": {"start_mwh", "end_mwh", "advanced_mwh", "end_wh", "resets"}},
     "transactions": [{"connector", "tx_id", "id_tag", "start", "stop" (ISO),
                       "meter_start_wh", "meter_stop_wh", "energy_wh", "energy_mwh",
                       "reason"}]}

`energy_wh` = meter_stop_wh - meter_start_wh (what a CSMS must compute from the readings,
exactly); `energy_mwh` the exact energy of the session.

Fleet: `await run_points(url, [PointSpec("CP1", "pw", "1.6", 2), ...], accel=60,
stop=event, sample_s=60)` runs many chargers with random sessions until `stop` is set,
reconnecting with backoff while the server is down; returns {identity: ground truth}.

Manual run::

    python -m tools.ocpp_sim --url ws://127.0.0.1:9000/ocpp --id CP1 --password secret \\
        --version 1.6 --connectors 2 --accel 60 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import random
import ssl as ssl_mod
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import websockets
from ocpp.v16 import ChargePoint as _V16ChargePoint
from ocpp.v16 import call as v16_call
from ocpp.v16 import datatypes as v16_dt
from ocpp.v201 import ChargePoint as _V201ChargePoint
from ocpp.v201 import call as v201_call
from ocpp.v201 import datatypes as v201_dt
from websockets.exceptions import WebSocketException
from websockets.typing import Subprotocol

log = logging.getLogger("ocpp_sim")

Version = Literal["1.6", "2.0.1"]
Signer = Callable[[int, int, str], str]
ENERGY = "Energy.Active.Import.Register"
# what a dead or refusing connection raises (OSError covers ConnectionRefused, resets)
_NET_ERRORS = (OSError, WebSocketException, asyncio.TimeoutError, EOFError)


# ---------------------------------------------------------------------------- clock


class SimClock:
    """Simulated Unix ms. Real mode: `start_ms + accel * elapsed real time`. Manual mode:
    moves only when stepped (`advance`, `set`, `sleep_until`)."""

    def __init__(
        self, start_ms: int | None = None, *, accel: float = 1.0, manual: bool = False
    ) -> None:
        self.accel = accel
        self.manual = manual
        self._start_ms = int(time.time() * 1000) if start_ms is None else start_ms
        self._t0 = time.monotonic()
        self._now = self._start_ms

    def now_ms(self) -> int:
        if self.manual:
            return self._now
        return self._start_ms + int((time.monotonic() - self._t0) * self.accel * 1000)

    def advance(self, ms: int) -> None:
        if not self.manual:
            raise RuntimeError("advance() needs a manual SimClock")
        self._now += ms

    def set(self, ms: int) -> None:
        if not self.manual:
            raise RuntimeError("set() needs a manual SimClock")
        self._now = max(self._now, ms)

    def real_s(self, sim_s: float) -> float:
        """Real seconds that `sim_s` simulated seconds take (manual clocks: accel as given)."""
        return sim_s / self.accel

    async def sleep_until(self, ms: int) -> None:
        if self.manual:
            self.set(ms)
            await asyncio.sleep(0)
            return
        delay = (ms - self.now_ms()) / 1000 / self.accel
        if delay > 0:
            await asyncio.sleep(delay)

    def iso(self, ms: int | None = None) -> str:
        return iso_ms(self.now_ms() if ms is None else ms)


def iso_ms(ms: int) -> str:
    """ISO 8601 UTC with milliseconds and 'Z' (integer arithmetic, no float rounding)."""
    secs, milli = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{milli:03d}Z"


# ---------------------------------------------------------------------------- register


class Register:
    """Exact energy register in mWh, advanced by power_w x simulated time (integers)."""

    def __init__(self, now_ms: int, initial_mwh: int = 0) -> None:
        self.mwh = initial_mwh
        self.start_mwh = initial_mwh
        self.power_w = 0
        self.advanced_mwh = 0
        self.resets = 0
        self._rem = 0  # W*ms not yet a whole mWh (units of 1/3600 mWh)
        self._last_ms = now_ms

    def update(self, now_ms: int) -> int:
        dt = now_ms - self._last_ms
        if dt > 0:
            num = self.power_w * dt + self._rem
            inc, self._rem = divmod(num, 3600)
            self.mwh += inc
            self.advanced_mwh += inc
            self._last_ms = now_ms
        return self.mwh

    def set_power(self, now_ms: int, power_w: int) -> None:
        self.update(now_ms)
        self.power_w = int(power_w)

    def reset(self, now_ms: int) -> None:
        self.update(now_ms)
        self.mwh = 0
        self.resets += 1

    @property
    def wh(self) -> int:
        return self.mwh // 1000


# ---------------------------------------------------------------------------- messages


@dataclass
class SimTransaction:
    connector: int
    id_tag: str
    tx_id: str | int | None  # 2.0.1: charger-made str; 1.6: the CSMS's int (None: not yet)
    start_ms: int
    meter_start_wh: int
    start_advanced_mwh: int
    seq_no: int = 0
    stop_ms: int | None = None
    meter_stop_wh: int | None = None
    energy_mwh: int | None = None
    reason: str | None = None


@dataclass
class _Pending:
    payload: Any
    tx: SimTransaction | None  # 1.6: transactionId is filled in from tx at send time


class _V16Client(_V16ChargePoint):  # type: ignore[misc]
    sent: list[str]

    async def _send(self, message: str) -> None:
        self.sent.append(message)
        await super()._send(message)


class _V201Client(_V201ChargePoint):  # type: ignore[misc]
    sent: list[str]

    async def _send(self, message: str) -> None:
        self.sent.append(message)
        await super()._send(message)


_TO_201_STATUS = {
    "Available": "Available",
    "Preparing": "Occupied",
    "Charging": "Occupied",
    "SuspendedEV": "Occupied",
    "SuspendedEVSE": "Occupied",
    "Finishing": "Occupied",
    "Occupied": "Occupied",
    "Reserved": "Reserved",
    "Unavailable": "Unavailable",
    "Faulted": "Faulted",
}
_TO_16_STATUS = {"Occupied": "Charging"}
_STOP_TRIGGER = {
    "Local": "StopAuthorized",
    "Remote": "RemoteStop",
    "EVDisconnected": "EVCommunicationLost",
    "DeAuthorized": "Deauthorized",
    "EmergencyStop": "AbnormalCondition",
    "Reboot": "ResetCommand",
    "PowerLoss": "AbnormalCondition",
}
_TO_201_REASON = {"HardReset": "ImmediateReset", "SoftReset": "Reboot", "UnlockCommand": "Other"}
_TO_16_REASON = {"ImmediateReset": "HardReset", "StoppedByEV": "EVDisconnected"}


def kwh_str(wh: int) -> str:
    """Wh as kWh with exactly 3 decimals, as a decimal string ("1.234")."""
    sign = "-" if wh < 0 else ""
    q, r = divmod(abs(wh), 1000)
    return f"{sign}{q}.{r:03d}"


# ---------------------------------------------------------------------------- charge point


class SimChargePoint:
    """One simulated charger. See the module docstring for the options."""

    def __init__(
        self,
        url: str,
        identity: str,
        password: str | None = None,
        *,
        version: Version = "1.6",
        connectors: int = 2,
        clock: SimClock | None = None,
        ssl: ssl_mod.SSLContext | None = None,
        unit: Literal["Wh", "kWh"] = "Wh",
        extra_measurands: bool = False,
        zero_at_boot: bool = False,
        retry_stop: bool = False,
        no_final_value: bool = False,
        signer: Signer | None = None,
        initial_mwh: int | dict[int, int] = 0,
        heartbeat_s: float | None = None,
        response_timeout: float = 10.0,
        vendor: str = "SimVendor",
        model: str = "SimCP",
    ) -> None:
        if version not in ("1.6", "2.0.1"):
            raise ValueError(f"version must be '1.6' or '2.0.1', not {version!r}")
        if unit not in ("Wh", "kWh"):
            raise ValueError(f"unit must be 'Wh' or 'kWh', not {unit!r}")
        self.url = url.rstrip("/")
        self.identity = identity
        self.password = password
        self.version: Version = version
        self.clock = clock or SimClock()
        self.ssl = ssl
        self.unit = unit
        self.extra_measurands = extra_measurands
        self.zero_at_boot = zero_at_boot
        self.retry_stop = retry_stop
        self.no_final_value = no_final_value
        self.signer = signer
        self.heartbeat_s = heartbeat_s
        self.response_timeout = response_timeout
        self.vendor = vendor
        self.model = model
        now = self.clock.now_ms()
        self.registers: dict[int, Register] = {}
        for c in range(1, connectors + 1):
            init = initial_mwh.get(c, 0) if isinstance(initial_mwh, dict) else initial_mwh
            self.registers[c] = Register(now, init)
        self.transactions: dict[int, SimTransaction] = {}  # running, by connector
        self.history: list[SimTransaction] = []  # all, in start order
        self.queue: list[_Pending] = []
        self.sent: list[str] = []  # every frame sent, over all connections
        self.boot_interval: int | None = None
        self.offline = False  # go_offline(): stay disconnected until come_online()
        self._zero_next: set[int] = set()
        self._ws: Any = None
        self._cp: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

    # ---- connection

    @property
    def connected(self) -> bool:
        return self._cp is not None and self._reader is not None and not self._reader.done()

    def auth_header(self) -> str | None:
        if self.password is None:
            return None
        raw = f"{self.identity}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    async def connect(self) -> None:
        """Open the WebSocket (no BootNotification: see `boot()`)."""
        await self._drop_connection()
        headers = {}
        auth = self.auth_header()
        if auth is not None:
            headers["Authorization"] = auth
        proto = "ocpp1.6" if self.version == "1.6" else "ocpp2.0.1"
        ws = await websockets.connect(
            f"{self.url}/{self.identity}",
            subprotocols=[Subprotocol(proto)],
            additional_headers=headers,
            ssl=self.ssl,
            open_timeout=self.response_timeout,
            max_size=None,
        )
        if ws.subprotocol != proto:
            await ws.close()
            raise ConnectionError(f"server did not accept subprotocol {proto}: {ws.subprotocol}")
        cls = _V16Client if self.version == "1.6" else _V201Client
        cp = cls(self.identity, ws, response_timeout=self.response_timeout)
        cp.sent = self.sent
        self._ws, self._cp = ws, cp
        self._reader = asyncio.create_task(self._read(cp))

    async def _read(self, cp: Any) -> None:
        with contextlib.suppress(*_NET_ERRORS):
            await cp.start()

    async def _drop_connection(self) -> None:
        me = asyncio.current_task()
        for task in (self._heartbeat, self._reader):
            if task is not None and task is not me and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, *_NET_ERRORS):
                    await task
        self._heartbeat = self._reader = None
        if self._ws is not None:
            with contextlib.suppress(*_NET_ERRORS):
                await self._ws.close()
        self._ws = self._cp = None

    async def close(self) -> None:
        await self._drop_connection()

    async def _call(self, payload: Any) -> Any:
        """Send a CALL that is not about a transaction; returns the call_result dataclass,
        or None (not connected: dropped; connection lost; or a CallError)."""
        if not self.connected:
            return None
        try:
            return await self._send_call(payload)
        except _NET_ERRORS as e:
            log.info("%s: %s lost: %r", self.identity, type(payload).__name__, e)
            await self._drop_connection()
            return None

    async def _send_call(self, payload: Any) -> Any:
        """One call on the live connection; raises a network error if it dies meanwhile."""
        cp, reader = self._cp, self._reader
        if cp is None or reader is None or reader.done():
            raise ConnectionError("not connected")
        call = asyncio.create_task(cp.call(payload))
        done, _ = await asyncio.wait({call, reader}, return_when=asyncio.FIRST_COMPLETED)
        if call not in done:
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_NET_ERRORS):
                await call
            raise ConnectionError("connection closed while waiting for an answer")
        return call.result()

    async def flush(
        self, *, order: str = "in_order", duplicate: bool = False, seed: int | None = None
    ) -> int:
        """Deliver the queued transaction messages; returns how many frames were sent."""
        async with self._flush_lock:
            if not self.queue or not self.connected:
                return 0
            # messages stay queued until answered, so new ones queue behind them
            items = list(self.queue)
            if duplicate:
                items = [p for item in items for p in (item, dataclasses.replace(item))]
            if order == "shuffled":
                rng = random.Random(seed)
                if self.version == "1.6":
                    is_start = [isinstance(p.payload, v16_call.StartTransaction) for p in items]
                    starts = [p for p, st in zip(items, is_start, strict=True) if st]
                    rest = [p for p, st in zip(items, is_start, strict=True) if not st]
                    rng.shuffle(rest)
                    items = starts + rest
                else:
                    rng.shuffle(items)
            elif order != "in_order":
                raise ValueError(f"order must be 'in_order' or 'shuffled', not {order!r}")
            self.queue[:] = items
            sent = 0
            while self.queue:
                item = self.queue[0]
                payload = item.payload
                if self.version == "1.6" and item.tx is not None:
                    tx_id = item.tx.tx_id if isinstance(item.tx.tx_id, int) else 0
                    if isinstance(payload, v16_call.StopTransaction | v16_call.MeterValues):
                        payload = dataclasses.replace(payload, transaction_id=tx_id)
                try:
                    result = await self._send_call(payload)
                except _NET_ERRORS:
                    await self._drop_connection()
                    return sent
                self.queue.pop(0)
                sent += 1
                if isinstance(payload, v16_call.StartTransaction) and item.tx is not None:
                    if item.tx.tx_id is None and result is not None:
                        item.tx.tx_id = int(result.transaction_id)
            return sent

    async def _tx_call(self, payload: Any, tx: SimTransaction | None) -> Any:
        """A transaction message; 1.6 messages of a transaction whose StartTransaction is
        still queued get their transactionId when they leave."""
        if self.queue or self._is_offline():
            self.queue.append(_Pending(payload, tx))
            if not self._is_offline():
                await self.flush()
            return None
        try:
            return await self._send_call(payload)
        except _NET_ERRORS as e:
            log.info("%s: %s lost: %r", self.identity, type(payload).__name__, e)
            self.queue.insert(0, _Pending(payload, tx))
            await self._drop_connection()
            return None

    # ---- boot, heartbeat, status

    async def boot(self, reason: str = "PowerUp") -> Any:
        """BootNotification, then a Heartbeat task (interval from the answer or heartbeat_s)."""
        if self.version == "1.6":
            payload: Any = v16_call.BootNotification(
                charge_point_model=self.model,
                charge_point_vendor=self.vendor,
                charge_point_serial_number=self.identity,
                firmware_version="sim-1",
            )
        else:
            payload = v201_call.BootNotification(
                charging_station=v201_dt.ChargingStationType(
                    vendor_name=self.vendor,
                    model=self.model,
                    serial_number=self.identity,
                    firmware_version="sim-1",
                ),
                reason=reason,
            )
        if self._heartbeat is not None and self._heartbeat is not asyncio.current_task():
            self._heartbeat.cancel()
        result = await self._call(payload)
        if self.zero_at_boot:
            self._zero_next = set(self.registers)
        if result is not None:
            self.boot_interval = int(result.interval)
            interval = self.heartbeat_s if self.heartbeat_s is not None else result.interval
            if interval and interval > 0:
                self._heartbeat = asyncio.create_task(self._heartbeat_loop(float(interval)))
        return result

    async def _heartbeat_loop(self, interval_sim_s: float) -> None:
        while self.connected:
            await asyncio.sleep(max(self.clock.real_s(interval_sim_s), 0.01))
            hb = v16_call.Heartbeat() if self.version == "1.6" else v201_call.Heartbeat()
            with contextlib.suppress(*_NET_ERRORS):
                await self._call(hb)

    async def heartbeat(self) -> Any:
        hb = v16_call.Heartbeat() if self.version == "1.6" else v201_call.Heartbeat()
        return await self._call(hb)

    async def status(self, connector: int, status: str) -> Any:
        """StatusNotification; 1.6 names are mapped to 2.0.1 ones (Charging -> Occupied)."""
        ts = self.clock.iso()
        if self.version == "1.6":
            payload: Any = v16_call.StatusNotification(
                connector_id=connector,
                error_code="NoError",
                status=_TO_16_STATUS.get(status, status),
                timestamp=ts,
            )
        else:
            payload = v201_call.StatusNotification(
                timestamp=ts,
                connector_status=_TO_201_STATUS.get(status, status),
                evse_id=connector,
                connector_id=1,
            )
        return await self._call(payload)

    async def authorize(self, id_tag: str) -> Any:
        if self.version == "1.6":
            return await self._call(v16_call.Authorize(id_tag=id_tag))
        token = v201_dt.IdTokenType(id_token=id_tag, type="ISO14443")
        return await self._call(v201_call.Authorize(id_token=token))

    # ---- meter values

    def set_power(self, connector: int, power_w: int) -> None:
        self.registers[connector].set_power(self.clock.now_ms(), power_w)

    def reset_register(self, connector: int) -> None:
        """The charger's register of `connector` drops to 0 (e.g. a meter swap or reboot)."""
        self.registers[connector].reset(self.clock.now_ms())

    def _energy_value(self, wh: int) -> str | int | float:
        if self.version == "1.6":
            return str(wh) if self.unit == "Wh" else kwh_str(wh)
        # 2.0.1: a JSON number; float(kwh_str) is the double whose shortest repr is it
        return wh if self.unit == "Wh" else float(kwh_str(wh))

    def _meter_value(
        self, connector: int, context: str, stage: str, at_ms: int | None = None
    ) -> tuple[Any, int]:
        """One MeterValue for the connector now (or at `at_ms`); returns it and the
        reported Wh."""
        now = self.clock.now_ms() if at_ms is None else at_ms
        reg = self.registers[connector]
        mwh = reg.update(now)
        wh = mwh // 1000
        if connector in self._zero_next:
            self._zero_next.discard(connector)
            wh = mwh = 0
        v16 = self.version == "1.6"
        sampled: list[Any] = []

        def add(value: str | int | float, **kw: Any) -> None:
            if v16:
                unit = kw.pop("unit", None)
                sampled.append(
                    v16_dt.SampledValue(value=str(value), context=context, unit=unit, **kw)
                )
            else:
                unit = kw.pop("unit", None)
                kw.pop("format", None)
                uom = v201_dt.UnitOfMeasureType(unit=unit) if unit is not None else None
                num: Any = value if not isinstance(value, str) else float(value)
                sampled.append(
                    v201_dt.SampledValueType(value=num, context=context, unit_of_measure=uom, **kw)
                )

        energy = self._energy_value(wh)
        signed: Any = None
        if self.signer is not None:
            ocmf = self.signer(mwh, now, stage)
            if v16:
                sampled.append(
                    v16_dt.SampledValue(
                        value=ocmf,
                        context=context,
                        format="SignedData",
                        measurand=ENERGY,
                        location="Outlet",
                        unit=self.unit,
                    )
                )
            else:
                signed = v201_dt.SignedMeterValueType(
                    signed_meter_data=base64.b64encode(ocmf.encode()).decode("ascii"),
                    signing_method="",
                    encoding_method="OCMF",
                    public_key="",
                )
        if v16:
            sampled.insert(
                0,
                v16_dt.SampledValue(
                    value=str(energy),
                    context=context,
                    format="Raw",
                    measurand=ENERGY,
                    location="Outlet",
                    unit=self.unit,
                ),
            )
        else:
            sampled.insert(
                0,
                v201_dt.SampledValueType(
                    value=energy,
                    context=context,
                    measurand=ENERGY,
                    location="Outlet",
                    unit_of_measure=v201_dt.UnitOfMeasureType(unit=self.unit),
                    signed_meter_value=signed,
                ),
            )
        if self.extra_measurands:
            p = reg.power_w
            add(p, measurand="Power.Active.Import", unit="W", format="Raw")
            third_wh = [wh // 3 + (1 if i < wh % 3 else 0) for i in range(3)]
            for i, ph in enumerate(("L1", "L2", "L3")):
                amps = f"{p / 3 / 230:.2f}"
                add(amps, measurand="Current.Import", phase=ph, unit="A", format="Raw")
                add("230.0", measurand="Voltage", phase=f"{ph}-N", unit="V", format="Raw")
                add(
                    self._energy_value(third_wh[i]),
                    measurand=ENERGY,
                    phase=ph,
                    unit=self.unit,
                    format="Raw",
                )
        ts = iso_ms(now)
        if v16:
            return v16_dt.MeterValue(timestamp=ts, sampled_value=sampled), wh
        return v201_dt.MeterValueType(timestamp=ts, sampled_value=sampled), wh

    async def sample(self, connector: int, context: str = "Sample.Periodic") -> Any:
        """Send the register now: 1.6 MeterValues (with transactionId while charging);
        2.0.1 TransactionEvent Updated during a transaction, else MeterValues."""
        tx = self.transactions.get(connector)
        mv, _ = self._meter_value(connector, context, "T")
        if self.version == "1.6":
            payload: Any = v16_call.MeterValues(
                connector_id=connector,
                meter_value=[mv],
                transaction_id=tx.tx_id if tx is not None and isinstance(tx.tx_id, int) else None,
            )
            if tx is None:
                return await self._tx_call(payload, None)
            return await self._tx_call(payload, tx)
        if tx is None:
            return await self._tx_call(
                v201_call.MeterValues(evse_id=connector, meter_value=[mv]), None
            )
        tx.seq_no += 1
        trigger = "MeterValueClock" if context == "Sample.Clock" else "MeterValuePeriodic"
        payload = v201_call.TransactionEvent(
            event_type="Updated",
            timestamp=mv.timestamp,
            trigger_reason=trigger,
            seq_no=tx.seq_no,
            transaction_info=v201_dt.TransactionType(
                transaction_id=str(tx.tx_id), charging_state="Charging"
            ),
            meter_value=[mv],
            offline=True if self._is_offline() else None,
            evse=v201_dt.EVSEType(id=connector, connector_id=1),
        )
        return await self._tx_call(payload, tx)

    def _is_offline(self) -> bool:
        return self.offline or not self.connected

    # ---- transactions

    async def start(
        self, connector: int, id_tag: str = "TAG1", *, power_w: int | None = None
    ) -> SimTransaction:
        """Start a transaction (and set the connector's power if given)."""
        if connector in self.transactions:
            raise RuntimeError(f"connector {connector} already has a transaction")
        now = self.clock.now_ms()  # one instant for the power step, meterStart and stamps
        reg = self.registers[connector]
        reg.update(now)
        if power_w is not None:
            reg.set_power(now, power_w)
        if self.zero_at_boot:
            self._zero_next.add(connector)
        tx = SimTransaction(
            connector=connector,
            id_tag=id_tag,
            tx_id=None if self.version == "1.6" else uuid.uuid4().hex[:16],
            start_ms=now,
            meter_start_wh=reg.wh,
            start_advanced_mwh=reg.advanced_mwh,
        )
        self.transactions[connector] = tx
        self.history.append(tx)
        if self.version == "1.6":
            payload: Any = v16_call.StartTransaction(
                connector_id=connector, id_tag=id_tag, meter_start=reg.wh, timestamp=iso_ms(now)
            )
            result = await self._tx_call(payload, tx)
            if result is not None and tx.tx_id is None:
                tx.tx_id = int(result.transaction_id)
            return tx
        mv, _ = self._meter_value(connector, "Transaction.Begin", "B", now)
        payload = v201_call.TransactionEvent(
            event_type="Started",
            timestamp=iso_ms(now),
            trigger_reason="Authorized",
            seq_no=0,
            transaction_info=v201_dt.TransactionType(
                transaction_id=str(tx.tx_id), charging_state="Charging"
            ),
            meter_value=[mv],
            offline=True if self._is_offline() else None,
            evse=v201_dt.EVSEType(id=connector, connector_id=1),
            id_token=v201_dt.IdTokenType(id_token=id_tag, type="ISO14443"),
        )
        await self._tx_call(payload, tx)
        return tx

    async def stop(self, connector: int, reason: str = "Local") -> SimTransaction:
        """Stop the connector's transaction (power drops to 0)."""
        tx = self.transactions.pop(connector)
        now = self.clock.now_ms()
        reg = self.registers[connector]
        reg.set_power(now, 0)
        tx.stop_ms = now
        tx.meter_stop_wh = reg.wh
        tx.energy_mwh = reg.advanced_mwh - tx.start_advanced_mwh
        tx.reason = reason
        if self.version == "1.6":
            data = None
            if not self.no_final_value:
                mv, _ = self._meter_value(connector, "Transaction.End", "E", now)
                data = [mv]
            payload: Any = v16_call.StopTransaction(
                meter_stop=reg.wh,
                timestamp=iso_ms(now),
                transaction_id=tx.tx_id if isinstance(tx.tx_id, int) else 0,
                reason=_TO_16_REASON.get(reason, reason),
                id_tag=tx.id_tag,
                transaction_data=data,
            )
        else:
            tx.seq_no += 1
            mvs = None
            if not self.no_final_value:
                mv, _ = self._meter_value(connector, "Transaction.End", "E", now)
                mvs = [mv]
            payload = v201_call.TransactionEvent(
                event_type="Ended",
                timestamp=iso_ms(now),
                trigger_reason=_STOP_TRIGGER.get(reason, "StopAuthorized"),
                seq_no=tx.seq_no,
                transaction_info=v201_dt.TransactionType(
                    transaction_id=str(tx.tx_id),
                    charging_state="EVConnected",
                    stopped_reason=_TO_201_REASON.get(reason, reason),
                ),
                meter_value=mvs,
                offline=True if self._is_offline() else None,
                evse=v201_dt.EVSEType(id=connector, connector_id=1),
            )
        await self._tx_call(payload, tx)
        if self.retry_stop:
            await self._tx_call(payload, tx)
        return tx

    # ---- faults

    async def go_offline(self) -> None:
        """Lose the connection; keep charging, queue transaction messages."""
        self.offline = True
        await self._drop_connection()

    async def come_online(
        self,
        order: Literal["in_order", "shuffled"] = "in_order",
        duplicate: bool = False,
        seed: int | None = None,
    ) -> int:
        """Reconnect (no new BootNotification) and deliver the queue; returns frames sent."""
        if not self.connected:
            await self.connect()
        self.offline = False
        return await self.flush(order=order, duplicate=duplicate, seed=seed)

    async def reboot(self, *, reset_registers: bool = False) -> Any:
        """Stop running transactions (Reboot), close, optionally zero the registers,
        reconnect and send a new BootNotification."""
        for c in list(self.transactions):
            await self.stop(c, "Reboot")
        await self._drop_connection()
        if reset_registers:
            for c in self.registers:
                self.reset_register(c)
        await self.connect()
        await self.flush()
        return await self.boot("RemoteReset" if self.version == "2.0.1" else "PowerUp")

    async def garbage(self, n: int, *, seed: int | None = None) -> int:
        """Send n frames that are not OCPP; returns how many left. Never raises."""
        rng = random.Random(seed)
        huge = "[2," + json.dumps("x" * (2 << 20)) + "]"
        kinds: list[Callable[[], str]] = [
            lambda: bytes(rng.getrandbits(8) for _ in range(64)).decode("latin-1"),
            lambda: json.dumps({"not": "ocpp", "n": rng.randint(0, 99)}),
            lambda: json.dumps([2, "only-two"]),
            lambda: json.dumps([7, "bad-type", "Heartbeat", {}]),
            lambda: json.dumps([2, "x", "NoSuchAction", {"a": 1}]),
            lambda: json.dumps([2, str(uuid.uuid4()), "BootNotification", {"wrong": True}]),
            lambda: huge,
        ]
        sent = 0
        for i in range(n):
            if not self.connected or self._ws is None:
                break
            frame = kinds[i % len(kinds)]()
            try:
                await self._ws.send(frame)
            except _NET_ERRORS:
                break
            sent += 1
        await asyncio.sleep(0.05)
        return sent

    # ---- scenarios

    async def charging_day(
        self,
        *,
        sessions: int = 3,
        power_w: int | tuple[int, int] = (1000, 7000),
        sample_s: int = 60,
        day_s: int = 86400,
        clock_aligned_s: int | None = None,
        id_tag: str = "TAG1",
        seed: int | None = None,
        statuses: bool = True,
    ) -> dict[str, Any]:
        """A simulated day: on each connector `sessions` sessions, each after an idle gap,
        at a power drawn from `power_w` (W), sampled every `sample_s` simulated seconds
        (and at clock-aligned instants if asked). A manual clock is stepped; a real one is
        waited for. Returns `ground_truth()`."""
        rng = random.Random(seed)
        t0 = self.clock.now_ms()
        slot_ms = day_s * 1000 // max(sessions, 1)
        # (time, order, seq, kind, connector, arg): order keeps start < sample < stop
        events: list[tuple[int, int, int, str, int, int]] = []
        seq = 0
        for c in self.registers:
            for s in range(sessions):
                slot0 = t0 + s * slot_ms
                length = rng.randint(slot_ms // 4, slot_ms * 3 // 4)
                begin = slot0 + rng.randint(slot_ms // 20, slot_ms - length - slot_ms // 20)
                end = begin + length
                p = power_w if isinstance(power_w, int) else rng.randint(*power_w)
                events.append((begin, 0, seq, "start", c, p))
                t = begin + sample_s * 1000
                while t < end:
                    events.append((t, 1, seq, "sample", c, 0))
                    t += sample_s * 1000
                if clock_aligned_s:
                    step = clock_aligned_s * 1000
                    t = (begin // step + 1) * step
                    while t < end:
                        events.append((t, 1, seq, "clock", c, 0))
                        t += step
                events.append((end, 2, seq, "stop", c, 0))
                seq += 1
        events.sort()
        for t, _o, _s, kind, c, arg in events:
            await self.clock.sleep_until(t)
            if kind == "start":
                if statuses:
                    await self.status(c, "Preparing")
                await self.start(c, id_tag, power_w=arg)
                if statuses:
                    await self.status(c, "Charging")
            elif kind == "sample":
                await self.sample(c)
            elif kind == "clock":
                await self.sample(c, context="Sample.Clock")
            else:
                await self.stop(c, "EVDisconnected")
                if statuses:
                    await self.status(c, "Finishing")
                    await self.status(c, "Available")
        await self.clock.sleep_until(t0 + day_s * 1000)
        return self.ground_truth()

    def ground_truth(self) -> dict[str, Any]:
        now = self.clock.now_ms()
        conns: dict[str, Any] = {}
        for c, reg in self.registers.items():
            reg.update(now)
            conns[str(c)] = {
                "start_mwh": reg.start_mwh,
                "end_mwh": reg.mwh,
                "advanced_mwh": reg.advanced_mwh,
                "end_wh": reg.wh,
                "resets": reg.resets,
            }
        txs = []
        for tx in self.history:
            txs.append(
                {
                    "connector": tx.connector,
                    "tx_id": tx.tx_id,
                    "id_tag": tx.id_tag,
                    "start": iso_ms(tx.start_ms),
                    "stop": iso_ms(tx.stop_ms) if tx.stop_ms is not None else None,
                    "meter_start_wh": tx.meter_start_wh,
                    "meter_stop_wh": tx.meter_stop_wh,
                    "energy_wh": (
                        tx.meter_stop_wh - tx.meter_start_wh
                        if tx.meter_stop_wh is not None
                        else None
                    ),
                    "energy_mwh": tx.energy_mwh,
                    "reason": tx.reason,
                }
            )
        return {
            "identity": self.identity,
            "version": self.version,
            "connectors": conns,
            "transactions": txs,
        }


# ---------------------------------------------------------------------------- fleet


@dataclass
class PointSpec:
    identity: str
    password: str | None = None
    version: Version = "1.6"
    connectors: int = 2
    options: dict[str, Any] = field(default_factory=dict)  # SimChargePoint keywords


async def _wait(stop: asyncio.Event, real_s: float) -> bool:
    """Sleep real_s seconds or until stop is set; True if stop is set."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(real_s, 0))
    return stop.is_set()


async def _connector_loop(
    cp: SimChargePoint, c: int, stop: asyncio.Event, sample_s: float, rng: random.Random
) -> None:
    clock = cp.clock
    while not stop.is_set():
        if await _wait(stop, clock.real_s(rng.uniform(300, 3600))):  # idle gap
            return
        with contextlib.suppress(*_NET_ERRORS):
            await cp.status(c, "Preparing")
        tag = f"TAG-{c}-{cp.identity[-12:]}"  # (a 1.6 idTag is at most 20 characters)
        await cp.start(c, tag, power_w=rng.randint(1000, 7000))
        with contextlib.suppress(*_NET_ERRORS):
            await cp.status(c, "Charging")
        end_ms = clock.now_ms() + int(rng.uniform(1200, 7200) * 1000)
        while clock.now_ms() < end_ms:
            if await _wait(stop, clock.real_s(sample_s)):
                break
            await cp.sample(c)
        await cp.stop(c, "EVDisconnected")
        with contextlib.suppress(*_NET_ERRORS):
            await cp.status(c, "Available")


async def _run_point(
    cp: SimChargePoint, stop: asyncio.Event, sample_s: float, rng: random.Random
) -> dict[str, Any]:
    tasks = [
        asyncio.create_task(_connector_loop(cp, c, stop, sample_s, random.Random(rng.random())))
        for c in cp.registers
    ]
    backoff = 0.2
    try:
        while not stop.is_set():
            if not cp.connected:
                try:
                    cp.offline = True  # transaction messages wait until the boot is done
                    await cp.connect()
                    await cp.boot()
                    cp.offline = False
                    await cp.flush()
                    backoff = 0.2
                except (*_NET_ERRORS, ConnectionError) as e:
                    log.info("%s: connect failed (%r); retry in %.1fs", cp.identity, e, backoff)
                    await cp.close()
                    cp.offline = False
                    if await _wait(stop, backoff):
                        break
                    backoff = min(backoff * 2, 10.0)
                    continue
            await _wait(stop, 0.2)
        await asyncio.gather(*tasks)
        # a last chance to deliver what is queued
        with contextlib.suppress(*_NET_ERRORS, ConnectionError):
            if not cp.connected:
                await cp.connect()
                await cp.boot()
            await cp.flush()
    finally:
        for t in tasks:
            t.cancel()
        await cp.close()
    return cp.ground_truth()


async def run_points(
    url: str,
    points: Sequence[PointSpec],
    *,
    accel: float,
    stop: asyncio.Event,
    sample_s: float = 60,
    clock: SimClock | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Run simulated chargers with random sessions until `stop` is set (then each stops its
    transactions); reconnects with backoff while the server is down. Returns
    {identity: ground truth} (see the module docstring)."""
    clock = clock or SimClock(accel=accel)
    rng = random.Random(seed)
    cps = [
        SimChargePoint(
            url,
            p.identity,
            p.password,
            version=p.version,
            connectors=p.connectors,
            clock=clock,
            **p.options,
        )
        for p in points
    ]
    results = await asyncio.gather(
        *(_run_point(cp, stop, sample_s, random.Random(rng.random())) for cp in cps)
    )
    return {r["identity"]: r for r in results}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run simulated OCPP charge points.")
    ap.add_argument("--url", required=True, help="CSMS base URL; the identity is appended")
    ap.add_argument("--id", default="CP1", help="identity; with --count N, a prefix")
    ap.add_argument("--password", default=os.environ.get("OCPP_SIM_PASSWORD"))
    ap.add_argument("--version", choices=["1.6", "2.0.1"], default="1.6")
    ap.add_argument("--connectors", type=int, default=2)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--accel", type=float, default=60.0)
    ap.add_argument("--duration", type=float, default=30.0, help="real seconds")
    ap.add_argument("--sample-s", type=float, default=60.0, help="simulated seconds")
    ap.add_argument("--insecure", action="store_true", help="wss without certificate checks")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    opts: dict[str, Any] = {}
    if args.insecure:
        ctx = ssl_mod.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl_mod.CERT_NONE
        opts["ssl"] = ctx
    ids = [args.id] if args.count == 1 else [f"{args.id}{i + 1}" for i in range(args.count)]
    points = [PointSpec(i, args.password, args.version, args.connectors, dict(opts)) for i in ids]

    async def go() -> dict[str, Any]:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(args.duration, stop.set)
        return await run_points(
            args.url, points, accel=args.accel, stop=stop, sample_s=args.sample_s
        )

    print(json.dumps(asyncio.run(go()), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
