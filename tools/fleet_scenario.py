"""What happens at one virtual station: motorcycles arrive and swap batteries.

A rider puts a depleted battery into an empty slot (it charges CC/CV) and takes the
fullest battery out: a full one when there is one, else the fullest still charging if it is
at least `take_min_soc` (a removal mid-charge), else nothing. With every slot occupied the
charged battery comes out first and the depleted one goes into its slot. Now and then a technician
pulls a battery at random, and a charger channel faults and recovers. Everything is on the
fleet's virtual clock (seconds) and drawn from one seeded RNG per station, so a run is
reproducible for the same seed and the same timing of steps.

The driver only touches the rig through `insert`, `remove`, `set_fault`, `clear_fault` and
`model.sample` (all thread-safe), and returns every action as an `Action` (the fleet's event log, which also
feeds the integration bound: an abrupt change of power between two samples is where a
trapezoid is least exact).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tools.rig import Rig


@dataclass(frozen=True, kw_only=True)
class ScenarioParams:
    """Defaults: e-motorcycle packs of 1.5–3 kWh charged at 0.6–1.5 kW (2–4 h a charge),
    a rider every 20 min on average at each station."""

    arrival_mean_s: float = 1200.0  # mean virtual time between riders at one station
    capacity_wh: tuple[float, float] = (1500.0, 3000.0)
    power_w: tuple[float, float] = (600.0, 1500.0)
    arrive_soc: tuple[float, float] = (0.05, 0.35)  # a rider's depleted battery
    packs: tuple[str, ...] = ("60V", "72V")
    take_min_soc: float = 0.6  # below this, a rider who finds nothing full leaves without
    initial_fill: float = 0.75  # share of slots holding a battery at start
    random_removal_per_h: float = 0.05  # per station: a technician pulls any battery
    charger_fault_p: float = 0.02  # chance that a charge meets a charger fault
    fault_clear_s: tuple[float, float] = (300.0, 1800.0)  # how long a charger fault lasts
    start_delay_s: float = 5.0  # W (handshake) before charging; the fleet raises it to
    ramp_s: float = 60.0  # soft start; the fleet raises it to two sampling periods

    def __post_init__(self) -> None:
        if self.arrival_mean_s <= 0:
            raise ValueError("arrival_mean_s must be > 0")
        for name in ("capacity_wh", "power_w", "arrive_soc", "fault_clear_s"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be a range lo <= hi")
        if not (10.0 <= self.power_w[0] and self.power_w[1] <= 5000.0):
            raise ValueError("power_w must be within 10..5000 W")
        if not 0.0 <= self.initial_fill <= 1.0 or not 0.0 <= self.charger_fault_p <= 1.0:
            raise ValueError("initial_fill and charger_fault_p are fractions")
        if self.arrive_soc[1] > 1.0 or not 0.0 <= self.take_min_soc <= 1.0:
            raise ValueError("state of charge is a fraction 0..1")


@dataclass(frozen=True, kw_only=True)
class Action:
    """One thing the scenario (or the fleet) did to a rig. `p_w`: the slot's power just
    before it (what a sampler can mis-integrate across an abrupt change); `e_mwh`, for a
    power cut: the energy the slot took in the window before it that the station may not
    have saved or sent yet."""

    t_v: float  # virtual seconds since the fleet's clock started
    what: str  # insert | take | remove | fault | clear | cut | offline | restore | leave | exit
    slot: int = 0
    p_w: float = 0.0
    soc: float | None = None
    battery: str | None = None
    e_mwh: int = 0


@dataclass
class _Slot:
    power_w: float = 0.0
    fault_at: float | None = None
    clear_at: float | None = None


@dataclass
class StationScenario:
    slots: int
    rng: random.Random
    params: ScenarioParams = field(default_factory=ScenarioParams)
    start_delay_s: float = 5.0
    ramp_s: float = 60.0
    next_arrival: float | None = None
    next_removal: float | None = None
    state: dict[int, _Slot] = field(default_factory=dict)
    turned_away: int = 0

    def __post_init__(self) -> None:
        self.state = {s: _Slot() for s in range(1, self.slots + 1)}

    # -- helpers ------------------------------------------------------------------------
    def _u(self, r: tuple[float, float]) -> float:
        return self.rng.uniform(r[0], r[1])

    def _insert(self, rig: Rig, t: float, slot: int, soc: float) -> Action:
        p = self.params
        power = round(self._u(p.power_w))
        b = rig.insert(
            slot,
            pack=self.rng.choice(p.packs),
            power_w=power,
            capacity_wh=round(self._u(p.capacity_wh)),
            soc=soc,
            start_delay_s=self.start_delay_s,
            ramp_s=self.ramp_s,
        )
        st = self.state[slot]
        st.power_w = power
        st.fault_at = st.clear_at = None
        if self.rng.random() < p.charger_fault_p:
            st.fault_at = t + self.start_delay_s + self.rng.uniform(600.0, 3600.0)
        return Action(t_v=t, what="insert", slot=slot, soc=soc, battery=b.serial)

    def _remove(self, rig: Rig, t: float, slot: int, what: str) -> Action:
        s = rig.model.sample(slot)
        b = rig.remove(slot)
        st = self.state[slot]
        st.fault_at = st.clear_at = None
        return Action(
            t_v=t,
            what=what,
            slot=slot,
            p_w=s.p_w,
            soc=s.battery.soc if s.battery is not None else None,
            battery=b.serial if b is not None else None,
        )

    def power_of(self, slot: int) -> float:
        return self.state[slot].power_w

    # -- the scenario -------------------------------------------------------------------
    def start(self, rig: Rig, t: float) -> list[Action]:
        """Fill some slots (state of charge anywhere, some full soon) and plan the first rider."""
        out = []
        for slot in range(1, self.slots + 1):
            if self.rng.random() < self.params.initial_fill:
                out.append(self._insert(rig, t, slot, round(self.rng.uniform(0.05, 0.95), 3)))
        self.next_arrival = t + self.rng.expovariate(1.0 / self.params.arrival_mean_s)
        rate = self.params.random_removal_per_h
        self.next_removal = t + self.rng.expovariate(rate / 3600.0) if rate > 0 else None
        return out

    def step(self, rig: Rig, t: float) -> list[Action]:
        """Everything due at virtual time t (call often: a few times per sampling period)."""
        out: list[Action] = []
        for slot, st in self.state.items():
            if st.fault_at is not None and t >= st.fault_at:
                s = rig.model.sample(slot)
                st.fault_at = None
                if s.state in "CV":  # only a charge in progress can fault
                    rig.set_fault(slot, self.rng.choice((17, 33, 65)))
                    st.clear_at = t + self._u(self.params.fault_clear_s)
                    out.append(Action(t_v=t, what="fault", slot=slot, p_w=s.p_w))
            if st.clear_at is not None and t >= st.clear_at:
                st.clear_at = None
                rig.clear_fault(slot)
                out.append(Action(t_v=t, what="clear", slot=slot))
        while self.next_arrival is not None and t >= self.next_arrival:
            out.extend(self._arrive(rig, t))
            self.next_arrival += self.rng.expovariate(1.0 / self.params.arrival_mean_s)
        while self.next_removal is not None and t >= self.next_removal:
            full = [s for s in self.state if rig.model.sample(s).battery is not None]
            if full:
                out.append(self._remove(rig, t, self.rng.choice(full), "remove"))
            self.next_removal += self.rng.expovariate(self.params.random_removal_per_h / 3600.0)
        return out

    def _arrive(self, rig: Rig, t: float) -> list[Action]:
        """A rider with a depleted battery: into an empty slot, then out with the fullest one.
        With no slot empty, the cabinet first releases a charged battery and takes the
        depleted one in its place; with nothing charged enough either, the rider leaves."""
        samples = {s: rig.model.sample(s) for s in self.state}
        empty = [s for s, x in samples.items() if x.battery is None]
        full = [s for s, x in samples.items() if x.state == "F"]
        socs = {s: x.battery.soc for s, x in samples.items() if x.battery is not None}
        take: int | None = None
        if full:
            take = self.rng.choice(full)
        elif socs:
            best = max(socs, key=lambda s: socs[s])
            take = best if socs[best] >= self.params.take_min_soc else None
        soc_in = round(self._u(self.params.arrive_soc), 3)
        if empty:
            out = [self._insert(rig, t, self.rng.choice(empty), soc_in)]
            if take is not None:
                out.append(self._remove(rig, t, take, "take"))
            return out
        if take is None:
            self.turned_away += 1
            return [Action(t_v=t, what="leave")]
        return [self._remove(rig, t, take, "take"), self._insert(rig, t, take, soc_in)]
