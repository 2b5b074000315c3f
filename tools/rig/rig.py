"""Rig: the station's hardware (charger controller, BMS ×N, grid meter) on ptys.

    with Rig(slots=4, faults=FaultRates(mb_crc=0.1), seed=1, workdir=tmp) as rig:
        station opens rig.charger_path (115200) and rig.bus_path (9600)
        rig.insert(1, pack="72V", power_w=1000, capacity_wh=10, soc=0.3)
        ...
        rig.ground_truth_mwh()   # {1: mWh, 2: 0, ...}
        rig.fault_totals()       # {"mb_to": n, "mb_crc": n, ...}

A RigHost is one thread with one asyncio loop; any number of rigs can share one
(`Rig(host=host)`), which is what a fleet simulator wants. A Rig without a host gets a
private one, stopped with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import pathlib
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

from pymodbus.server import ModbusSerialServer

from .battery import Battery
from .bus_sim import make_server
from .faults import BusFaults, ChargerFaults, FaultLog, FaultRates
from .line import BusRelay, ChargerRelay, Pty, stats_json
from .model import RigModel

log = logging.getLogger(__name__)
T = TypeVar("T")

RIG_JSON = "rig.json"
TRUTH_JSON = "ground_truth.json"
FAULTS_JSON = "faults.json"


def write_json_atomic(path: pathlib.Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


class RigHost:
    """One background thread running one asyncio event loop for any number of rigs."""

    def __init__(self, name: str = "rig-host") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("RigHost is not started")
        return self._loop

    def start(self) -> RigHost:
        if self._thread is not None:
            return self
        ready = threading.Event()
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the host's loop and wait for its result (from another thread)."""
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class Rig:
    """Charger controller, BMS ×`slots` (unit 10 + slot) and a grid meter (unit 1)."""

    def __init__(
        self,
        *,
        slots: int = 4,
        meter: bool = True,
        bus_baud: int = 9600,
        charger_baud: int = 115200,
        faults: FaultRates | None = None,
        seed: int = 1,
        workdir: str | os.PathLike[str] | None = None,
        pace: bool = True,
        dt_s: float = 0.01,
        efficiency: float = 0.92,
        idle_w: float = 15.0,
        meter_start_kwh: float | None = None,
        meter_serial: int | None = None,
        turnaround_chars: float = 3.5,
        bus_char_bits: int = 10,
        host: RigHost | None = None,
        name: str = "rig",
        clock: Callable[[], float] | None = None,
    ) -> None:
        if bus_baud <= 0 or charger_baud <= 0:
            raise ValueError("baud rates must be > 0")
        self.name = name
        self.seed = seed
        self.bus_baud = bus_baud
        self.charger_baud = charger_baud
        self.pace = pace
        self.turnaround_chars = turnaround_chars
        if bus_char_bits not in (10, 11, 12):
            raise ValueError("bus_char_bits must be 10 (8N1), 11 (8E1, 8N2) or 12 (8E2)")
        self.bus_char_bits = bus_char_bits
        self.rates = faults if faults is not None else FaultRates()
        self.workdir = pathlib.Path(workdir) if workdir is not None else None
        self.model = RigModel(
            slots=slots,
            meter=meter,
            seed=seed,
            dt_s=dt_s,
            efficiency=efficiency,
            idle_w=idle_w,
            meter_start_kwh=meter_start_kwh,
            meter_serial=meter_serial,
            # a fleet's accelerated clock (seconds); pacing stays real time
            clock=time.monotonic if clock is None else clock,
        )
        # the fault log is on real time (time.monotonic), whatever the model's clock
        self.log = FaultLog(t0=self.model.t0 if clock is None else None)
        self._host = host
        self._own_host = host is None
        self._lock = threading.Lock()
        self._started = False
        self._ptys: list[Pty] = []
        self._charger_pty: Pty | None = None
        self._bus_pty: Pty | None = None
        self._server: ModbusSerialServer | None = None
        self._bus_relay: BusRelay | None = None
        self._charger_relay: ChargerRelay | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- life cycle -----------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self.model.slots

    @property
    def charger_path(self) -> str:
        if self._charger_pty is None:
            raise RuntimeError("rig not started")
        return self._charger_pty.path

    @property
    def bus_path(self) -> str:
        if self._bus_pty is None:
            raise RuntimeError("rig not started")
        return self._bus_pty.path

    def start(self) -> Rig:
        with self._lock:
            if self._started:
                return self
            if self._host is None:
                self._host = RigHost(f"{self.name}-host")
            self._host.start()
            self._host.call(self._astart())
            self._started = True
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.workdir / RIG_JSON, self.info())
            self.write_files()
        log.info("rig %s: charger %s, bus %s", self.name, self.charger_path, self.bus_path)
        return self

    async def _astart(self) -> None:
        loop = asyncio.get_running_loop()
        charger, bus, server_side = Pty(), Pty(), Pty()
        self._ptys = [charger, bus, server_side]
        self._charger_pty, self._bus_pty = charger, bus
        try:
            self._server = make_server(self.model, server_side.path, self.bus_baud)
            await self._server.serve_forever(background=True)
            self._bus_relay = BusRelay(
                loop=loop,
                model=self.model,
                station=bus,
                server=server_side,
                baud=self.bus_baud,
                faults=BusFaults(self.rates, self.log, self.seed),
                pace=self.pace,
                char_bits=self.bus_char_bits,
                turnaround_chars=self.turnaround_chars,
            )
            self._charger_relay = ChargerRelay(
                loop=loop,
                model=self.model,
                station=charger,
                baud=self.charger_baud,
                faults=ChargerFaults(self.rates, self.log, self.seed),
                pace=self.pace,
            )
            self._tasks = [
                loop.create_task(self._bus_relay.run(), name=f"{self.name}-bus"),
                loop.create_task(self._charger_relay.run(), name=f"{self.name}-charger"),
                loop.create_task(self._tick(), name=f"{self.name}-tick"),
            ]
        except BaseException:
            await self._astop()
            raise

    async def _tick(self) -> None:
        """Keep the physics caught up even when nobody polls, so that no later reading
        has to integrate a long stretch while holding the model's lock."""
        while True:
            await asyncio.sleep(1.0)
            self.model.ground_truth_mwh()

    async def _astop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks = []
        for r in (self._bus_relay, self._charger_relay):
            if r is not None:
                r.close()
        if self._server is not None:
            try:
                await self._server.shutdown()  # type: ignore[no-untyped-call]
            except Exception:  # closing a pty the peer already dropped
                log.debug("pymodbus shutdown", exc_info=True)
            self._server = None
        for p in self._ptys:
            p.close()

    def stop(self) -> None:
        """Stop serving; the ground truth and fault log stay readable and are written to
        the workdir one last time."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            host = self._host
            assert host is not None
            try:
                host.call(self._astop())
            finally:
                if self._own_host:
                    host.stop()
                    self._host = None
        if self.workdir is not None:
            self.write_files()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the hardware, driven by tests (thread-safe) ----------------------------------

    def insert(
        self,
        slot: int,
        pack: str = "72V",
        power_w: float = 1000.0,
        capacity_wh: float = 20.0,
        soc: float = 0.2,
        *,
        serial: str | None = None,
        battery: Battery | None = None,
        charge: bool = True,
        start_delay_s: float = 0.5,
        ramp_s: float = 1.5,
    ) -> Battery:
        """Insert a battery now. `soc` is a fraction 0..1. Returns the battery as inserted."""
        return self.model.insert(
            slot,
            pack=pack,
            power_w=power_w,
            capacity_wh=capacity_wh,
            soc=soc,
            serial=serial,
            battery=battery,
            charge=charge,
            start_delay_s=start_delay_s,
            ramp_s=ramp_s,
        )

    def remove(self, slot: int) -> Battery | None:
        """Remove the battery now (mid-charge allowed); returns it (re-insertable) or None."""
        return self.model.remove(slot)

    def set_fault(self, slot: int, code: int) -> None:
        """The charger channel goes to E with `code`; its current ramps to zero."""
        self.model.set_fault(slot, code)

    def clear_fault(self, slot: int) -> None:
        self.model.clear_fault(slot)

    def set_meter_fault(self, kind: str | None, register: str = "energy") -> None:
        """The meter answers its `register` ("energy" or "power") with a float that is not
        a reading: kind is one of model.METER_VALUE_FAULTS ("nan", "inf", "-inf",
        "negative", "huge" 1e30, "max" the largest float32, "above_range"); None clears it.
        Replies stay intact on the wire: the station's mb_* counters do not move, its
        err.mb_bad counts each such read (model.meter_fault_reads)."""
        self.model.set_meter_fault(kind, register)

    # -- what tests compare against -----------------------------------------------------

    def ground_truth_mwh(self) -> dict[int, int]:
        """Exact energy delivered into batteries per slot since the rig was made, mWh."""
        return self.model.ground_truth_mwh()

    def grid_mwh(self) -> int:
        """Grid energy since the rig was made (the meter register's increase), mWh."""
        return self.model.grid_mwh()

    def fault_log(self) -> list[dict[str, object]]:
        """One entry per failed transaction: seq, t, mono, link, kind, counter, unit, attempts."""
        return self.log.entries()

    def fault_totals(self) -> dict[str, int]:
        """Expected station error counters: mb_to, mb_crc, mb_exc, mb_addr, ser_to, ser_cs,
        ser_bad (every key present)."""
        return self.log.totals()

    def stats(self) -> dict[str, dict[str, int]]:
        return stats_json(*(r for r in (self._bus_relay, self._charger_relay) if r is not None))

    def info(self) -> dict[str, object]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "charger": self.charger_path,
            "bus": self.bus_path,
            "slots": self.slots,
            "meter": self.model.has_meter,
            "meter_unit": 1,
            "bms_unit_base": 10,
            "meter_serial": self.model.meter_serial,
            "bus_baud": self.bus_baud,
            "charger_baud": self.charger_baud,
            "seed": self.seed,
            "efficiency": self.model.efficiency,
            "idle_w": self.model.idle_w,
        }

    def write_files(self, workdir: str | os.PathLike[str] | None = None) -> None:
        """Write ground_truth.json and faults.json (atomically) to workdir."""
        d = pathlib.Path(workdir) if workdir is not None else self.workdir
        if d is None:
            raise ValueError("no workdir")
        d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(d / TRUTH_JSON, self.model.truth())
        faults = self.log.to_json()
        faults["stats"] = self.stats()
        write_json_atomic(d / FAULTS_JSON, faults)
