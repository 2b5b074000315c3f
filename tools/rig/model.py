"""A rig's physical state: N charger channels, their batteries, and the grid meter.

Thread-safe (one lock): tests insert and remove batteries from their own thread while the
rig's event loop reads values to answer the station. Every reading is taken at the
moment of the call on one clock (time.monotonic by default, the clock the station's
ticks_ms follows), so the ground truth is on the same time base as the station's samples.
"""

from __future__ import annotations

import random
import struct
import threading
import time
from collections.abc import Callable

from .battery import Battery
from .lines import ChargerReading
from .physics import Channel, ChargeProfile, Sample

MAX_SLOTS = 16
METER_UNIT = 1
BMS_UNIT_BASE = 10
METER_INPUT_REGS = 0x4A  # input registers 0x0000..0x0049 exist (others read as 0)

# Meter value faults: the meter answers, intact on the wire, with a float that is not a
# reading (CONTRACT §4.1, §2). The station must count each such read (err.mb_bad) and omit
# `meter` from telemetry while it lasts.
METER_VALUE_FAULTS: dict[str, float] = {
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "negative": -1.0,
    "huge": 1e30,
    "max": 3.4028234663852886e38,  # the largest float32: 3.4e41 Wh as kWh
    "above_range": 1.5e8,  # kWh, just over the 10^8 kWh of a meter register; W: > 10^7
}
# which input registers a fault replaces: energy, or power (both places the rig serves it)
METER_FAULT_REGISTERS: dict[str, tuple[int, ...]] = {"energy": (0x0048,), "power": (0x000C, 0x0034)}


def _u16(x: float) -> int:
    return max(0, min(0xFFFF, round(x)))


def _s16(x: float) -> int:
    return max(-0x8000, min(0x7FFF, round(x))) & 0xFFFF


def _f32_regs(x: float) -> tuple[int, int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", x))
    return hi, lo


class RigModel:
    def __init__(
        self,
        *,
        slots: int = 4,
        meter: bool = True,
        seed: int = 1,
        dt_s: float = 0.01,
        efficiency: float = 0.92,
        idle_w: float = 15.0,
        meter_start_kwh: float | None = None,
        meter_serial: int | None = None,
        ambient_c: float = 25.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots {slots} must be 1..{MAX_SLOTS}")
        if not 0.5 <= efficiency <= 1.0:
            raise ValueError(f"efficiency {efficiency} must be 0.5..1")
        if idle_w < 0:
            raise ValueError("idle_w must be >= 0")
        self._lock = threading.Lock()
        self._clock = clock
        self._rng = random.Random(f"{seed}:model")
        self.slots = slots
        self.has_meter = meter
        self.efficiency = efficiency
        self.idle_w = idle_w
        self.ambient_c = ambient_c
        self.t0 = clock()
        self._ch = [
            Channel(s, t=self.t0, dt_s=dt_s, ambient_c=ambient_c) for s in range(1, slots + 1)
        ]
        self.meter_serial = (
            meter_serial
            if meter_serial is not None
            else self._rng.randrange(10_000_000, 99_999_999)
        )
        if not 0 <= self.meter_serial <= 0xFFFFFFFF:
            raise ValueError("meter_serial must fit a u32")
        start = meter_start_kwh if meter_start_kwh is not None else self._rng.uniform(100, 5000)
        self.meter_start_j = start * 3.6e6
        self._next_serial = self._rng.randrange(1, 9_000_000)
        self._v_phase = self._rng.uniform(0, 6.283)
        self._meter_fault: tuple[str, str, float] | None = None  # (kind, register, value)
        self.meter_fault_reads = 0  # function-04 reads answered with the faulted value

    def now(self) -> float:
        return self._clock()

    def _chan(self, slot: int) -> Channel:
        if not 1 <= slot <= self.slots:
            raise ValueError(f"slot {slot} out of range 1..{self.slots}")
        return self._ch[slot - 1]

    # -- events ---------------------------------------------------------------------

    def new_serial(self) -> str:
        with self._lock:
            n = self._next_serial
            self._next_serial += 1
        return f"B{n % 10_000_000:07d}"

    def insert(
        self,
        slot: int,
        *,
        pack: str = "72V",
        power_w: float = 1000.0,
        capacity_wh: float = 20.0,
        soc: float = 0.2,
        serial: str | None = None,
        battery: Battery | None = None,
        charge: bool = True,
        start_delay_s: float = 0.5,
        ramp_s: float = 1.5,
    ) -> Battery:
        """Put a battery in `slot` (a new one from the arguments, or `battery` as it came
        out of a slot); it starts charging after `start_delay_s` unless charge=False."""
        if battery is None:
            battery = Battery(
                serial=serial if serial is not None else self.new_serial(),
                pack=pack,
                capacity_wh=capacity_wh,
                soc=soc,
                soh=self._rng.randrange(900, 1000),
                cycles=self._rng.randrange(0, 400),
                lifetime_wh=0.0,
                temp_c=self.ambient_c + self._rng.uniform(-1.0, 3.0),
            )
        profile = ChargeProfile(
            power_w=power_w, enabled=charge, start_delay_s=start_delay_s, ramp_s=ramp_s
        )
        with self._lock:
            self._chan(slot).insert(self._clock(), battery, profile)
        return battery

    def remove(self, slot: int) -> Battery | None:
        with self._lock:
            return self._chan(slot).remove(self._clock())

    def set_fault(self, slot: int, code: int) -> None:
        with self._lock:
            self._chan(slot).set_fault(self._clock(), code)

    def clear_fault(self, slot: int) -> None:
        with self._lock:
            self._chan(slot).clear_fault(self._clock())

    # -- what the devices report ----------------------------------------------------

    def sample(self, slot: int) -> Sample:
        with self._lock:
            return self._chan(slot).sample(self._clock())

    def charger_reading(self, slot: int) -> ChargerReading:
        """The controller's answer for `slot` (X beyond its channels)."""
        if slot > self.slots:
            return ChargerReading(slot=slot, state="X", mv=0, ma=0, t=0, fault=0)
        s = self.sample(slot)
        return ChargerReading(
            slot=slot,
            state=s.state,
            mv=round(s.v * 1000),
            ma=round(s.i * 1000),
            t=round(s.charger_t * 10),
            fault=s.fault,
        )

    def unit_present(self, unit: int) -> bool:
        """Whether `unit` answers on the bus now (the meter; a BMS with a battery)."""
        if unit == METER_UNIT:
            return self.has_meter
        slot = unit - BMS_UNIT_BASE
        if 1 <= slot <= self.slots:
            with self._lock:
                return self._ch[slot - 1].occupied
        return False

    def bms_registers(self, slot: int) -> list[int] | None:
        """Holding registers 0..13 per CONTRACT §4.2, or None for an empty slot."""
        if not 1 <= slot <= self.slots:
            return None
        b = self.sample(slot).battery
        if b is None:
            return None
        sn = b.serial.encode("ascii")
        life = max(0, min(0xFFFFFFFF, int(b.lifetime_wh)))
        return [
            _u16(b.soc * 1000),
            b.soh,
            _u16(b.v * 100),
            _s16(b.i * 100),
            _s16(b.t_hi * 10),
            _s16(b.t_lo * 10),
            min(0xFFFF, b.cycles),
            b.fault_bits & 0xFFFF,
            (sn[0] << 8) | sn[1],
            (sn[2] << 8) | sn[3],
            (sn[4] << 8) | sn[5],
            (sn[6] << 8) | sn[7],
            life >> 16,
            life & 0xFFFF,
        ]

    def _grid(self, t: float) -> tuple[float, float]:
        """Grid (meter) power W and energy J at t: batteries / efficiency + idle load."""
        p = 0.0
        e = 0.0
        for ch in self._ch:
            s = ch.sample(t)
            p += s.p_w
            e += s.e_j
        eff = self.efficiency
        return self.idle_w + p / eff, self.meter_start_j + self.idle_w * (t - self.t0) + e / eff

    def meter_values(self) -> tuple[float, float, float, float]:
        """(volts, amps, watts, import kWh) as the meter shows them now."""
        import math

        with self._lock:
            t = self._clock()
            p, e = self._grid(t)
        v = 230.0 + 1.5 * math.sin(0.17 * (t - self.t0) + self._v_phase)
        return v, p / v, p, e / 3.6e6

    def set_meter_fault(self, kind: str | None, register: str = "energy") -> None:
        """From now on the meter's `register` ("energy" or "power") reads as the float of
        METER_VALUE_FAULTS[kind] (for power, "negative" is -2e7 W and "above_range" 1.5e7 W:
        a negative power is a valid export); None: the real values again."""
        if kind is None:
            with self._lock:
                self._meter_fault = None
            return
        if kind not in METER_VALUE_FAULTS:
            raise ValueError(f"meter fault {kind!r}: one of {', '.join(METER_VALUE_FAULTS)}")
        if register not in METER_FAULT_REGISTERS:
            raise ValueError(f"meter fault register {register!r}: energy or power")
        value = METER_VALUE_FAULTS[kind]
        if register == "power" and kind in ("negative", "above_range"):
            value = -2e7 if kind == "negative" else 1.5e7
        with self._lock:
            self._meter_fault = (kind, register, value)

    @property
    def meter_fault(self) -> tuple[str, str] | None:
        """(kind, register) of the meter value fault in force, or None."""
        f = self._meter_fault
        return None if f is None else (f[0], f[1])

    def meter_input_registers(self, address: int | None = None, count: int = 0) -> list[int]:
        """Input registers 0x0000..0x0049 (float32 big-endian, high word first). `address`
        and `count`: the request being answered, so that a read of a faulted register is
        counted in meter_fault_reads."""
        v, a, w, kwh = self.meter_values()
        regs = [0] * METER_INPUT_REGS
        # 0x000C is phase 1 power (SDM630; total power on an SDM120): the load is on phase 1
        for addr, x in ((0x0000, v), (0x0006, a), (0x000C, w), (0x0034, w), (0x0048, kwh)):
            regs[addr], regs[addr + 1] = _f32_regs(x)
        with self._lock:
            fault = self._meter_fault
            if fault is not None:
                hit = False
                for addr in METER_FAULT_REGISTERS[fault[1]]:
                    regs[addr], regs[addr + 1] = _f32_regs(fault[2])
                    if address is not None and address <= addr and addr + 2 <= address + count:
                        hit = True
                if hit:
                    self.meter_fault_reads += 1
        return regs

    def meter_holding_registers(self) -> list[int]:
        """Holding 0xFC00..0xFC01: the serial number as a u32, high word first."""
        return [self.meter_serial >> 16, self.meter_serial & 0xFFFF]

    # -- ground truth ---------------------------------------------------------------

    def ground_truth_mwh(self) -> dict[int, int]:
        """Energy each slot delivered into batteries since the rig started, mWh."""
        with self._lock:
            t = self._clock()
            return {ch.slot: round(ch.energy_j(t) / 3.6) for ch in self._ch}

    def truth(self) -> dict[str, object]:
        """Everything the ground-truth file holds, taken at one instant."""
        with self._lock:
            t = self._clock()
            slots = {str(ch.slot): round(ch.energy_j(t) / 3.6) for ch in self._ch}
            states = {str(ch.slot): ch.sample(t).state for ch in self._ch}
            p, e = self._grid(t)
        return {
            "mono": t,
            "t": round(t - self.t0, 6),
            "slots_mwh": slots,
            "states": states,
            "grid_mwh": round((e - self.meter_start_j) / 3.6),
            "meter_kwh": e / 3.6e6 if self.has_meter else None,
            "grid_w": p,
            "efficiency": self.efficiency,
            "idle_w": self.idle_w,
        }

    def grid_mwh(self) -> int:
        """Grid energy drawn since the rig started (the meter register's increase), mWh."""
        with self._lock:
            t = self._clock()
            _, e = self._grid(t)
        return round((e - self.meter_start_j) / 3.6)
