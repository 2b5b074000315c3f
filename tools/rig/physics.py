"""One charger channel with its cradle and battery: pure, deterministic charging physics.

Time is passed in (seconds on any monotonic clock). The state is computed on a fixed grid
of `dt_s` steps anchored at the last event (insertion, removal, fault); between two grid
nodes voltage and current are linear in time, so the power curve the station samples is
continuous (apart from insertion and removal) and its integral, the ground truth, is exact:
the energy of each segment is the closed-form integral of (v0 + a·s)(i0 + b·s).
The trajectory depends only on the inputs and the event times, never on when or how often
it is sampled.

Charge cycle: W (handshake, `start_delay_s`) → soft-start ramp of the current over
`ramp_s` (raised cosine) → C (constant current, I = power_w / V_cv) → V (constant voltage, the current
tapers as the open-circuit voltage rises) → below `term_frac` of the CC current the
current ramps to zero over `stop_ramp_s` → F. A charger fault (E) ramps the current down
the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .battery import Battery, PackSpec

EMPTY, WAIT, CHARGE, STOP_FULL, FULL, STOP_FAULT, FAULT = range(7)

# Thermal model: first-order lag towards ambient + k·(heat). Time constants are short so
# that a test charge of a minute shows the rise.
_K_BATT = 0.04  # °C per A² (I²R heating of the pack)
_TAU_BATT = 20.0
_K_CHG = 0.006  # °C per W through the channel
_TAU_CHG = 15.0
_R_CONTACT = 0.007  # Ω between charger terminals and the BMS's voltage sense


@dataclass(frozen=True, kw_only=True)
class ChargeProfile:
    """How a channel charges the battery it was given."""

    power_w: float = 1000.0
    start_delay_s: float = 0.5
    ramp_s: float = 1.5
    stop_ramp_s: float = 0.5
    term_frac: float = 0.05
    enabled: bool = True  # False: the battery stays in W

    def __post_init__(self) -> None:
        if not 10.0 <= self.power_w <= 5000.0:
            raise ValueError(f"power_w {self.power_w} out of range 10..5000")
        if self.start_delay_s < 0 or self.ramp_s < 0 or self.stop_ramp_s < 0:
            raise ValueError("delays and ramps must be >= 0")
        if not 0.0 < self.term_frac < 1.0:
            raise ValueError(f"term_frac {self.term_frac} must be in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class BatteryView:
    """What the battery's BMS reports (floats; the register encoding is in model.py)."""

    serial: str
    soc: float  # fraction; 1.0 once the charge has ended in F
    soh: int
    v: float
    i: float
    t_hi: float
    t_lo: float
    cycles: int
    fault_bits: int
    lifetime_wh: float


@dataclass(frozen=True, kw_only=True)
class Sample:
    t: float
    state: str  # I W C V F E
    v: float  # charger output, V
    i: float  # A into the battery
    p_w: float
    charger_t: float  # °C
    fault: int
    e_j: float  # energy delivered by this channel since it was created (ground truth), J
    battery: BatteryView | None


class _Node:
    __slots__ = ("cv", "e", "i", "i0", "phase", "soc", "t", "tb", "tc", "timer", "v")

    def __init__(self, t: float, ambient: float) -> None:
        self.t = t
        self.v = 0.0
        self.i = 0.0
        self.soc = 0.0
        self.tb = ambient
        self.tc = ambient
        self.e = 0.0
        self.phase = EMPTY
        self.timer = 0.0
        self.cv = False
        self.i0 = 0.0

    def copy(self) -> _Node:
        n = _Node.__new__(_Node)
        n.t, n.v, n.i, n.soc, n.tb, n.tc = self.t, self.v, self.i, self.soc, self.tb, self.tc
        n.e, n.phase, n.timer, n.cv, n.i0 = self.e, self.phase, self.timer, self.cv, self.i0
        return n


def _smooth(x: float) -> float:
    """0 → 1 over x in 0..1 with zero slope at both ends (raised cosine): a 1 Hz
    sampler's trapezoid error over a ramp is then of fourth order, not second."""
    if x >= 1.0:
        return 1.0
    return 0.5 - 0.5 * math.cos(math.pi * x) if x > 0.0 else 0.0


def segment_j(v0: float, i0: float, v1: float, i1: float, span: float, tau: float) -> float:
    """∫₀^tau v(s)·i(s) ds for v, i linear from (v0, i0) at 0 to (v1, i1) at span."""
    if span <= 0.0 or tau <= 0.0:
        return 0.0
    a = (v1 - v0) / span
    b = (i1 - i0) / span
    return v0 * i0 * tau + (v0 * b + i0 * a) * tau * tau / 2.0 + a * b * tau**3 / 3.0


class Channel:
    """A charger channel. Not thread-safe: model.RigModel serialises access."""

    def __init__(self, slot: int, *, t: float, dt_s: float = 0.01, ambient_c: float = 25.0):
        if not 0.0005 <= dt_s <= 0.5:
            raise ValueError(f"dt_s {dt_s} out of range 0.0005..0.5")
        self.slot = slot
        self.dt = dt_s
        self.ambient = ambient_c
        self._bat: Battery | None = None
        self._spec: PackSpec | None = None
        self._prof = ChargeProfile()
        self._q = 1.0  # capacity, A·s
        self._icc = 0.0
        self._r = 0.1
        self._e_insert = 0.0
        self._fault_code = 0
        self._fault_active = False
        self._decay_b = math.exp(-dt_s / _TAU_BATT)
        self._decay_c = math.exp(-dt_s / _TAU_CHG)
        self._a = _Node(t, ambient_c)
        self._b = self._step(self._a)

    # -- events ---------------------------------------------------------------------

    @property
    def occupied(self) -> bool:
        return self._bat is not None

    def insert(self, t: float, battery: Battery, profile: ChargeProfile) -> None:
        if self._bat is not None:
            raise ValueError(f"slot {self.slot} already holds battery {self._bat.serial}")
        n = self._cut(t)
        spec = battery.spec
        self._bat, self._spec, self._prof = battery, spec, profile
        self._q = battery.capacity_wh * 3600.0 / spec.nominal_v
        self._icc = profile.power_w / spec.cv_v
        self._r = spec.ir_frac * spec.cv_v / self._icc
        self._e_insert = n.e
        self._fault_active = False
        self._fault_code = 0
        n.phase, n.timer, n.cv, n.i0 = WAIT, 0.0, False, 0.0
        n.soc, n.tb, n.i, n.v = battery.soc, battery.temp_c, 0.0, spec.ocv(battery.soc)
        self._b = self._step(n)

    def remove(self, t: float) -> Battery | None:
        """Take the battery out at t (mid-charge allowed: power drops to zero at t)."""
        if self._bat is None:
            return None
        n = self._cut(t)
        out = self._battery_after(n)
        self._bat = self._spec = None
        self._fault_active = False
        n.phase, n.timer, n.cv, n.i0 = EMPTY, 0.0, False, 0.0
        n.v = n.i = n.soc = 0.0
        n.tb = self.ambient
        self._b = self._step(n)
        return out

    def set_fault(self, t: float, code: int) -> None:
        """Charger fault on this channel: state E with `code`, current ramps to zero."""
        if not 1 <= code <= 0xFFFF:
            raise ValueError(f"fault code {code} must be 1..65535")
        if self._bat is None:
            raise ValueError(f"slot {self.slot} is empty: no charge to fault")
        n = self._cut(t)
        self._fault_code, self._fault_active = code, True
        if n.phase in (CHARGE, STOP_FULL, STOP_FAULT):
            n.phase, n.timer, n.i0 = STOP_FAULT, 0.0, n.i
        else:
            n.phase, n.timer = FAULT, 0.0
        self._b = self._step(n)

    def clear_fault(self, t: float) -> None:
        """Clear the fault: once the current is down, the channel restarts from W."""
        n = self._cut(t)
        self._fault_active = False
        self._b = self._step(n)

    # -- readings -------------------------------------------------------------------

    def energy_j(self, t: float) -> float:
        return self._at(t).e

    def sample(self, t: float) -> Sample:
        n = self._at(t)
        ph = n.phase
        if ph == EMPTY:
            state = "I"
        elif ph == WAIT:
            state = "W"
        elif ph == CHARGE:
            state = "V" if n.cv else "C"
        elif ph == STOP_FULL:
            state = "V"
        elif ph == FULL:
            state = "F"
        else:
            state = "E"
        return Sample(
            t=n.t,
            state=state,
            v=n.v,
            i=n.i,
            p_w=n.v * n.i,
            charger_t=n.tc,
            fault=self._fault_code if state == "E" else 0,
            e_j=n.e,
            battery=self._view(n) if self._bat is not None else None,
        )

    def _view(self, n: _Node) -> BatteryView:
        bat = self._battery_after(n)
        faulted = n.phase in (STOP_FAULT, FAULT)
        spread = 0.3 + 0.05 * n.i
        return BatteryView(
            serial=bat.serial,
            soc=1.0 if n.phase == FULL else bat.soc,
            soh=bat.soh,
            v=max(0.0, n.v - n.i * _R_CONTACT),
            i=n.i,
            t_hi=n.tb + spread,
            t_lo=n.tb - 0.8,
            cycles=bat.cycles,
            fault_bits=(1 if faulted else 0) | (2 if n.tb + spread > 55.0 else 0),
            lifetime_wh=bat.lifetime_wh,
        )

    def _battery_after(self, n: _Node) -> Battery:
        bat = self._bat
        assert bat is not None
        wh = (n.e - self._e_insert) / 3600.0
        acc = bat.cycle_wh + wh
        full = int(acc // bat.capacity_wh)
        return Battery(
            serial=bat.serial,
            pack=bat.pack,
            capacity_wh=bat.capacity_wh,
            soc=min(1.0, max(0.0, n.soc)),
            soh=bat.soh,
            cycles=min(0xFFFF, bat.cycles + full),
            cycle_wh=acc - full * bat.capacity_wh,
            lifetime_wh=bat.lifetime_wh + wh,
            temp_c=n.tb,
        )

    # -- grid -----------------------------------------------------------------------

    def _static(self, n: _Node) -> bool:
        ph = n.phase
        return (
            ph == EMPTY
            or ph == FULL
            or (ph == FAULT and self._fault_active)
            or (ph == WAIT and not self._prof.enabled)
        )

    def _advance(self, t: float) -> None:
        while t >= self._b.t:
            a = self._a
            if self._static(a):
                # nothing but temperatures moves: jump straight to the last node <= t
                m = int((t - a.t) / self.dt)
                if m >= 2:
                    self._a = self._decay(a, (m - 1) * self.dt)
                    self._b = self._step(self._a)
                    continue
            self._a = self._b
            self._b = self._step(self._a)

    def _at(self, t: float) -> _Node:
        """The state at t (clamped to the last event), interpolated between grid nodes."""
        a = self._a
        if t <= a.t:
            return a.copy()
        self._advance(t)
        a, b = self._a, self._b
        tau = t - a.t
        f = tau / self.dt
        n = a.copy()
        n.t = t
        n.timer = a.timer + tau
        n.v = a.v + (b.v - a.v) * f
        n.i = a.i + (b.i - a.i) * f
        n.soc = a.soc + (b.soc - a.soc) * f
        n.tb = a.tb + (b.tb - a.tb) * f
        n.tc = a.tc + (b.tc - a.tc) * f
        n.e = a.e + segment_j(a.v, a.i, b.v, b.i, self.dt, tau)
        return n

    def _cut(self, t: float) -> _Node:
        """Re-anchor the grid at t (an event); the caller edits the node and calls _step."""
        n = self._at(t)
        self._a = n
        return n

    def _decay(self, a: _Node, span: float) -> _Node:
        n = a.copy()
        n.t = a.t + span
        n.timer = a.timer + span
        n.tb = self.ambient + (a.tb - self.ambient) * math.exp(-span / _TAU_BATT)
        n.tc = self.ambient + (a.tc - self.ambient) * math.exp(-span / _TAU_CHG)
        return n

    def _step(self, a: _Node) -> _Node:
        dt = self.dt
        b = a.copy()
        b.t = a.t + dt
        b.timer = a.timer + dt
        ph = a.phase
        spec = self._spec
        prof = self._prof
        if spec is None or ph == EMPTY:
            b.v = b.i = 0.0
        else:
            r = self._r
            q = self._q
            if ph == WAIT:
                b.i, b.v = 0.0, spec.ocv(a.soc)
                if prof.enabled and b.timer >= prof.start_delay_s:
                    b.phase, b.timer, b.cv = CHARGE, 0.0, False
            elif ph == CHARGE:
                icc = self._icc
                i_set = icc * _smooth(b.timer / prof.ramp_s) if prof.ramp_s > 0 else icc
                cv_v = spec.cv_v
                i_cv = (cv_v - spec.ocv(a.soc + a.i * dt / q)) / r
                cv = i_cv < i_set
                i = max(0.0, i_cv) if cv else i_set
                soc = min(1.0, a.soc + (a.i + i) * 0.5 * dt / q)
                if cv:
                    i = max(0.0, (cv_v - spec.ocv(soc)) / r)
                b.i, b.soc, b.cv, b.v = i, soc, cv, spec.ocv(soc) + i * r
                if cv and b.timer >= prof.ramp_s and i <= prof.term_frac * icc:
                    b.phase, b.timer, b.i0 = STOP_FULL, 0.0, i
            elif ph == STOP_FULL or ph == STOP_FAULT:
                x = b.timer / prof.stop_ramp_s if prof.stop_ramp_s > 0 else 1.0
                i = a.i0 * (1.0 - _smooth(x)) if x < 1.0 else 0.0
                soc = min(1.0, a.soc + (a.i + i) * 0.5 * dt / q)
                b.i, b.soc, b.v = i, soc, spec.ocv(soc) + i * r
                if i <= 0.0:
                    b.phase, b.timer = (FULL if ph == STOP_FULL else FAULT), 0.0
            elif ph == FAULT and not self._fault_active:
                b.i, b.v = 0.0, spec.ocv(a.soc)
                b.phase, b.timer = WAIT, 0.0
            else:  # FULL, FAULT
                b.i, b.v = 0.0, spec.ocv(a.soc)
        b.e = a.e + segment_j(a.v, a.i, b.v, b.i, dt, dt)
        amb = self.ambient
        p = b.v * b.i
        tgt_b = amb + _K_BATT * b.i * b.i if spec is not None else amb
        b.tb = tgt_b + (a.tb - tgt_b) * self._decay_b
        tgt_c = amb + _K_CHG * p
        b.tc = tgt_c + (a.tc - tgt_c) * self._decay_c
        return b
