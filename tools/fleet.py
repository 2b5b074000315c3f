"""A fleet of virtual stations: the real firmware on MicroPython, each against its own rig.

    fleet = Fleet(n_stations=8, slots=8, broker_port=1883, workdir=Path("sim"), keys=ks,
                  accel=60, fault_rate=0.02)
    fleet.start()
    ...
    fleet.power_cut("KH-SIM-0003")       # SIGKILL, cabinet dark, restart, batteries back
    fleet.offline(sid) / fleet.online(sid)
    fleet.ground_truth()                 # {sid: {slot: mWh}}, also workdir/ground_truth.json
    fleet.stop()

Each station is a `SimStation`: a `Rig` (charger controller, BMS ×slots, grid meter on ptys)
on one shared `RigHost` thread, a `StationProcess` running the firmware built by
tools/fwbuild (bytecode, as on the board) with its own flash folder, a 32-byte key
(registered in the agent's KeyStore when one is given), and a `StationScenario` (riders
swapping batteries, see tools/fleet_scenario.py) driven by one fleet thread.

Time acceleration ("a day in minutes"): the rig's physics runs on a `VirtualClock`
(accel × real time) and the firmware's uptime on the same scale (STATION_TIME_SCALE, read
by firmware/timebase.py), so the energy the station integrates and the energy the rig
delivers agree. Only the uptime is scaled: the sampling period, serial timeouts and MQTT
stay real time, so a sample every `sample_ms` real ms spans `accel × sample_ms` of
simulated time; stale windows and ramps are sized in sampling periods for that reason.
With accel != 1 the fleet sets each station's clock with a signed `time` command (virtual
Unix time) when it comes online, so records land on a simulated timeline.

A power cut is the whole cabinet going dark: the chargers stop (the rig's batteries are
taken out, held, and put back when power returns, behind a handshake delay) and the
firmware is SIGKILLed; `offline` is the same with SIGTERM, until `online`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import random
import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import wire
from agent.keys import KeyStore
from agent.wire import check_sid
from tools import fwbuild
from tools.fleet_scenario import Action, ScenarioParams, StationScenario
from tools.machine import proc_cpu_s
from tools.mosquitto import Accounts
from tools.rig import FaultRates, Rig, RigHost
from tools.rig.battery import Battery
from tools.rig.rig import write_json_atomic
from tools.station_proc import StationProcess, station_config

log = logging.getLogger(__name__)

TRUTH_FILE = "ground_truth.json"
STATE_FILE = "fleet_state.json"  # the simulated clock and meters, for a restart
ACTIONS_FILE = "actions.jsonl"


class VirtualClock:
    """Seconds that run `accel` times faster than time.monotonic() from the moment it is made.
    `now()` is the rig's clock; `unix_ms()` the simulated wall clock for the stations."""

    def __init__(self, accel: float = 1.0, unix0_ms: int | None = None) -> None:
        """`unix0_ms`: where the simulated wall clock starts (default: now)."""
        if not accel > 0:
            raise ValueError(f"accel {accel} must be > 0")
        self.accel = accel
        self.mono0 = time.monotonic()
        self.unix0_ms = time.time_ns() // 1_000_000 if unix0_ms is None else unix0_ms

    def elapsed(self) -> float:
        """Virtual seconds since the clock was made."""
        return (time.monotonic() - self.mono0) * self.accel

    def now(self) -> float:
        return self.mono0 + self.elapsed()

    def unix_ms(self) -> int:
        return self.unix0_ms + int(self.elapsed() * 1000)


def _read_state(path: pathlib.Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


@dataclass(eq=False)
class SimStation:
    sid: str
    index: int
    rig: Rig
    proc: StationProcess
    flash: pathlib.Path
    key: bytes
    kid: int
    scenario: StationScenario
    lock: threading.RLock = field(default_factory=threading.RLock)
    powered: bool = False
    busy: bool = False  # a power operation is in progress (the scenario leaves it alone)
    held: dict[int, Battery] = field(default_factory=dict)
    starts: int = 0
    cuts: int = 0
    crashes: int = 0
    cpu_done_s: float = 0.0  # CPU of the processes that have ended
    cpu_seen_s: float = 0.0  # the running process's CPU when last looked at
    started_mono: float = 0.0
    clock_sent: set[int] = field(default_factory=set)  # boots whose clock the fleet set
    # (virtual s, mWh per slot) snapshots of the ground truth, every half sampling period:
    # what a power cut may have taken from the station before it could save or send it
    history: deque[tuple[float, tuple[int, ...]]] = field(default_factory=lambda: deque(maxlen=400))

    def energy_since(self, t_v: float, now: dict[int, int]) -> dict[int, int]:
        """Energy per slot since virtual time t_v (from the newest snapshot at or before it;
        the oldest one kept when the history is shorter)."""
        base: tuple[int, ...] | None = None
        for t, snap in self.history:
            if t > t_v and base is not None:
                break
            base = snap
        if base is None:
            return {k: 0 for k in now}
        return {k: v - base[k - 1] for k, v in now.items()}

    def look_cpu(self) -> float:
        p = self.proc.proc
        if p is not None and p.poll() is None:
            self.cpu_seen_s = max(self.cpu_seen_s, proc_cpu_s(p.pid))
        return self.cpu_seen_s

    def ended(self) -> None:
        """Account the CPU of a process that has just ended (or is about to be killed)."""
        self.cpu_done_s += self.cpu_seen_s
        self.cpu_seen_s = 0.0

    def cpu_s(self) -> float:
        return self.cpu_done_s + self.look_cpu()


class Fleet:
    """N virtual stations. See the module doc; `start()`, `stop()`, or use as a context."""

    def __init__(
        self,
        n_stations: int = 8,
        slots: int = 8,
        broker_host: str = "127.0.0.1",
        broker_port: int = 1883,
        workdir: str | os.PathLike[str] | None = None,
        keys: KeyStore | None = None,
        accel: float = 1.0,
        fault_rate: float = 0.0,
        seed: int = 1,
        prefix: str = "stations",
        sample_ms: int = 1000,
        telemetry_s: int = 10,
        heap: str = "256k",
        sid_prefix: str = "KH-SIM-",
        *,
        scenario: ScenarioParams | None = None,
        stale_samples: int = 5,
        bus_timeout_ms: int = 150,
        charger_timeout_ms: int = 200,
        persist_s: int = 60,
        on_action: Callable[[str, Action], None] | None = None,
        accounts: Accounts | None = None,
    ) -> None:
        if not 1 <= n_stations <= 9999:
            raise ValueError(f"n_stations {n_stations} must be 1..9999")
        if not 1 <= slots <= 16:
            raise ValueError(f"slots {slots} must be 1..16")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate {fault_rate} must be within 0..1")
        if not 100 <= sample_ms <= 60000:
            raise ValueError(f"sample_ms {sample_ms} must be 100..60000")
        self.clock_accel = float(accel)
        if not self.clock_accel > 0:
            raise ValueError(f"accel {accel} must be > 0")
        self.n_stations = n_stations
        self.slots = slots
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.workdir = (
            pathlib.Path(workdir)
            if workdir is not None
            else pathlib.Path(tempfile.mkdtemp(prefix="fleet-"))
        )
        self.keys = keys
        self.accel = self.clock_accel
        self.fault_rate = fault_rate
        self.seed = seed
        self.prefix = prefix
        self.sample_ms = sample_ms
        self.telemetry_s = telemetry_s
        self.heap = heap
        self.sid_prefix = sid_prefix
        self.params = scenario or ScenarioParams()
        self.bus_timeout_ms = bus_timeout_ms
        self.charger_timeout_ms = charger_timeout_ms
        self.on_action = on_action
        self.accounts = accounts  # None: an anonymous broker on broker_port
        # one sampling period in simulated seconds, and what is sized from it
        self.dt_v = sample_ms / 1000 * self.accel
        self.stale_s = max(math.ceil(stale_samples * self.dt_v), math.ceil(2 * sample_ms / 1000))
        if self.stale_s > 3600:
            raise ValueError(
                f"accel {accel} × sample_ms {sample_ms}: a stale window of "
                f"{stale_samples} samples ({self.stale_s} s) exceeds 3600 s"
            )
        self.start_delay_s = max(self.params.start_delay_s, 1.5 * self.dt_v)
        self.ramp_s = max(self.params.ramp_s, 2 * self.dt_v)
        self.physics_dt = min(0.5, max(0.01, 0.01 * self.accel))
        # a cut loses what the station integrated since it last saved its registers or made
        # a telemetry message (both survive on flash), and what flowed after its last sample
        self.cut_window_s = min(float(persist_s), telemetry_s * self.accel) + 3 * self.dt_v
        if persist_s < 1:
            raise ValueError("persist_s must be >= 1")
        self.persist_every_s = persist_s  # simulated seconds (60 on a board)
        sids = [f"{sid_prefix}{i + 1:04d}" for i in range(n_stations)]
        for sid in sids:
            check_sid(sid)
        self._sids = sids
        # a fleet started again in the same folder carries on where it stopped: its
        # simulated clock never goes back and each grid meter keeps its register (else
        # every station would book a meter_reset and meter the same intervals again)
        self._resume = _read_state(self.workdir / STATE_FILE)
        now_ms = time.time_ns() // 1_000_000
        self.clock = VirtualClock(self.accel, max(now_ms, self._resume.get("unix_ms", 0) + 1000))
        self.host = RigHost("fleet-rigs")
        self.stations: list[SimStation] = []
        self._by_sid: dict[str, SimStation] = {}
        self.actions: list[tuple[str, Action]] = []
        self._actions_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._monitor: _Monitor | None = None
        self._started = False
        self.time_commands = 0

    # -- set-up ---------------------------------------------------------------------------
    def _provision(self, sid: str) -> tuple[bytes, int, int, bool]:
        """(key, kid, boot_base, registered now) for sid: what its flash already has, else a
        fresh key registered in the key store (boot_base after the agent's highest boot)."""
        flash = self.workdir / sid / "flash"
        cfg_path = flash / "config.json"
        key: bytes | None = None
        kid = 1
        boot_base = 0
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            key, kid, boot_base = bytes.fromhex(old["key"]), int(old["kid"]), int(old["boot_base"])
            if self.keys is not None:
                have = self.keys.get(sid, kid)
                if have is None:
                    self.keys.add(sid, key, kid)
                    return key, kid, boot_base, True
                if have != key:
                    raise ValueError(
                        f"{sid}: the key store's key {kid} is not the one in "
                        f"{cfg_path} (use a fresh workdir or agent database)"
                    )
            return key, kid, boot_base, False
        key = secrets.token_bytes(32)
        if self.keys is not None:
            kid = self.keys.add(sid, key)
            top = self.keys.max_boot(sid)
            boot_base = 0 if top is None else top + 1
        return key, kid, boot_base, self.keys is not None

    def _config(self, sid: str, rig: Rig, key: bytes, kid: int, boot_base: int) -> dict[str, Any]:
        return station_config(
            sid,
            rig.charger_path,
            rig.bus_path,
            slots=self.slots,
            key_hex=key.hex(),
            kid=kid,
            broker_port=self.broker_port,
            broker={"host": self.broker_host, "prefix": self.prefix, **self._login(sid)},
            boot_base=boot_base,
            sample_ms=self.sample_ms,
            telemetry_s=self.telemetry_s,
            stale_s=self.stale_s,
            bus={"timeout_ms": self.bus_timeout_ms},
            charger={"timeout_ms": self.charger_timeout_ms},
            persist={"every_mwh": 10000, "every_s": self.persist_every_s},
            ntp="host" if self.accel == 1.0 else None,
        )

    def _login(self, sid: str) -> dict[str, Any]:
        """The station's own account and listener on a locked-down broker."""
        if self.accounts is None:
            return {}
        a = self.accounts
        return {"port": a.station_port, "user": sid, "password": a.station_password(sid)}

    def start(self) -> Self:
        if self._started:
            return self
        self._started = True
        fwbuild.build()  # fail early (and once) if the firmware does not compile
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host.start()
        rates = FaultRates.uniform(
            self.fault_rate,
            bus_timeout_s=self.bus_timeout_ms / 1000,
            charger_timeout_s=self.charger_timeout_ms / 1000,
        )
        env = {} if self.accel == 1.0 else {"STATION_TIME_SCALE": repr(self.accel)}
        added = False
        try:
            meters = self._resume.get("meters", {})
            for i, sid in enumerate(self._sids):
                m = meters.get(sid) or {}
                rig = Rig(
                    meter_start_kwh=m.get("kwh"),
                    meter_serial=m.get("serial"),
                    slots=self.slots,
                    faults=rates,
                    seed=self.seed * 100_003 + i,
                    workdir=self.workdir / sid / "rig",
                    host=self.host,
                    name=sid,
                    clock=self.clock.now,
                    dt_s=self.physics_dt,
                )
                rig.start()
                key, kid, boot_base, new_key = self._provision(sid)
                added |= new_key
                flash = self.workdir / sid / "flash"
                cfg = self._config(sid, rig, key, kid, boot_base)
                proc = StationProcess(flash, cfg, heap=self.heap, env=env)
                rng = random.Random(f"{self.seed}:{sid}")
                sc = StationScenario(
                    self.slots,
                    rng,
                    self.params,
                    start_delay_s=self.start_delay_s,
                    ramp_s=self.ramp_s,
                )
                st = SimStation(
                    sid=sid, index=i, rig=rig, proc=proc, flash=flash, key=key, kid=kid, scenario=sc
                )
                self.stations.append(st)
                self._by_sid[sid] = st
            self._monitor = _Monitor(self)
            self._monitor.start()
            if added:
                # an agent re-reads its keys on a miss at most once a second: a first message
                # sooner than that after the key was added could be quarantined as unknown
                time.sleep(1.2)
            t_start = time.time_ns()
            for st in self.stations:
                self._launch(st)
            for st in self.stations:
                self._wait_ready(st, t_start)
                with st.lock:
                    st.powered = True
                    self._log(st.sid, st.scenario.start(st.rig, self.clock.elapsed()))
            self._thread = threading.Thread(target=self._run, name="fleet-scenario", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        log.info(
            "fleet: %d stations × %d slots, accel %g, workdir %s",
            self.n_stations,
            self.slots,
            self.accel,
            self.workdir,
        )
        return self

    def _launch(self, st: SimStation) -> None:
        st.proc.start()
        st.starts += 1
        st.started_mono = time.monotonic()

    def _wait_ready(self, st: SimStation, since_ns: int, timeout: float = 60.0) -> bool:
        """Until the firmware has written its boot counter (it samples right after)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in ("state.a", "state.b"):
                p = st.flash / name
                try:
                    if p.stat().st_mtime_ns >= since_ns:
                        return True
                except OSError:
                    pass
            if not st.proc.alive:
                break
            time.sleep(0.02)
        log.warning("%s: not ready after %.0f s: %s", st.sid, timeout, st.proc.output[-5:])
        return False

    # -- the scenario thread -----------------------------------------------------------
    def _run(self) -> None:
        tick = min(0.2, self.sample_ms / 4000)
        next_cpu = next_snap = 0.0
        while not self._stop.wait(tick):
            t = self.clock.elapsed()
            if time.monotonic() >= next_cpu:  # a crashed process's CPU is gone with it
                next_cpu = time.monotonic() + 2.0
                for st in self.stations:
                    st.look_cpu()
            snap = time.monotonic() >= next_snap
            if snap:
                next_snap = time.monotonic() + self.sample_ms / 2000
            for st in self.stations:
                if snap:
                    g = st.rig.ground_truth_mwh()
                    st.history.append((t, tuple(g[k] for k in sorted(g))))
                with st.lock:
                    if not st.powered or st.busy:
                        continue
                    if not st.proc.alive:
                        st.busy = True
                        threading.Thread(target=self._recover, args=(st,), daemon=True).start()
                        continue
                    try:
                        acts = st.scenario.step(st.rig, t)
                    except Exception:  # a bug in the scenario must not stop the fleet
                        log.exception("%s: scenario step failed", st.sid)
                        continue
                if acts:
                    self._log(st.sid, acts)

    def _recover(self, st: SimStation) -> None:
        """The firmware exited by itself: a `reboot` command (status 3) or a crash."""
        code = st.proc.proc.returncode if st.proc.proc is not None else None
        out = st.proc.output[-10:]
        with st.lock:
            st.ended()
            if code != 3:
                st.crashes += 1
                log.warning("%s: firmware exited with %s: %s", st.sid, code, out)
            self._log(
                st.sid, [Action(t_v=self.clock.elapsed(), what="exit", soc=None, battery=str(code))]
            )
        t = time.time_ns()
        self._launch(st)
        self._wait_ready(st, t)
        with st.lock:
            st.busy = False

    def _log(self, sid: str, acts: list[Action]) -> None:
        if not acts:
            return
        with self._actions_lock:
            for a in acts:
                self.actions.append((sid, a))
        if self.on_action is not None:
            for a in acts:
                self.on_action(sid, a)

    # -- power -----------------------------------------------------------------------------
    def station(self, sid: str) -> SimStation:
        try:
            return self._by_sid[sid]
        except KeyError:
            raise ValueError(f"no station {sid} in this fleet") from None

    def _dark(self, st: SimStation, what: str, kill: bool) -> None:
        """Cabinet off: chargers stop (batteries held out), firmware killed or stopped."""
        t = self.clock.elapsed()
        acts = []
        recent = st.energy_since(t - self.cut_window_s, st.rig.ground_truth_mwh())
        for slot in range(1, self.slots + 1):
            s = st.rig.model.sample(slot)
            if s.battery is None and recent.get(slot, 0) <= 0:
                continue
            if s.battery is not None:
                b = st.rig.remove(slot)
                if b is not None:
                    st.held[slot] = b
            acts.append(
                Action(
                    t_v=t,
                    what=what,
                    slot=slot,
                    p_w=s.p_w,
                    soc=s.battery.soc if s.battery else None,
                    battery=s.battery.serial if s.battery else None,
                    e_mwh=max(0, recent.get(slot, 0)),
                )
            )
        if not acts:
            acts.append(Action(t_v=t, what=what))
        st.look_cpu()
        if kill:
            st.proc.kill()
        else:
            st.proc.stop()
        st.ended()
        st.powered = False
        self._log(st.sid, acts)

    def _light(self, st: SimStation) -> None:
        """Power back: the firmware boots; once it samples, the batteries go back in."""
        t0 = time.time_ns()
        self._launch(st)
        self._wait_ready(st, t0)
        with st.lock:
            t = self.clock.elapsed()
            acts = []
            for slot, b in sorted(st.held.items()):
                st.rig.insert(
                    slot,
                    battery=b,
                    power_w=st.scenario.power_of(slot) or 1000.0,
                    start_delay_s=self.start_delay_s,
                    ramp_s=self.ramp_s,
                )
                acts.append(Action(t_v=t, what="restore", slot=slot, soc=b.soc, battery=b.serial))
            st.held.clear()
            st.powered = True
            st.busy = False
            self._log(st.sid, acts or [Action(t_v=t, what="restore")])

    def power_cut(self, sid: str, down_s: float = 0.0) -> None:
        """SIGKILL the firmware with the cabinet dark for `down_s` real seconds, then boot
        it again (returns once it samples and the batteries are back)."""
        st = self.station(sid)
        with st.lock:
            if not st.powered or st.busy:
                raise RuntimeError(f"{sid} is not running (offline or mid power operation)")
            st.busy = True
            self._dark(st, "cut", kill=True)
            st.cuts += 1
        if down_s > 0:
            time.sleep(down_s)
        self._light(st)

    def offline(self, sid: str) -> None:
        """Stop the station (SIGTERM) with its cabinet dark, until `online(sid)`."""
        st = self.station(sid)
        with st.lock:
            if not st.powered or st.busy:
                raise RuntimeError(f"{sid} is not running")
            st.busy = True
            self._dark(st, "offline", kill=False)

    def online(self, sid: str) -> None:
        st = self.station(sid)
        with st.lock:
            if st.powered:
                return
        self._light(st)

    # -- results ---------------------------------------------------------------------------
    def ground_truth(self) -> dict[str, dict[int, int]]:
        """Energy delivered into batteries per station and slot since this run started,
        mWh (exact, from the rig's physics); also written to workdir/ground_truth.json."""
        truth = {st.sid: st.rig.ground_truth_mwh() for st in self.stations}
        write_json_atomic(
            self.workdir / TRUTH_FILE,
            {sid: {str(k): v for k, v in m.items()} for sid, m in truth.items()},
        )
        return truth

    def grid_truth(self) -> dict[str, int]:
        """Grid energy per station since this run started (the meter's increase), mWh."""
        return {st.sid: st.rig.grid_mwh() for st in self.stations}

    def integration_bound(
        self, rel: float = 0.005, abs_mwh: int = 100
    ) -> dict[str, dict[int, int]]:
        """How far each slot's register may honestly be from the ground truth, mWh
        (see `integration_bound` below)."""
        truth = {st.sid: st.rig.ground_truth_mwh() for st in self.stations}
        with self._actions_lock:
            acts = list(self.actions)
        return integration_bound(truth, acts, self.dt_v, self.persist_every_s, rel, abs_mwh)

    # -- hands on one station (tests, the demo) ---------------------------------------------
    def insert(
        self,
        sid: str,
        slot: int,
        pack: str = "72V",
        power_w: float = 1000.0,
        capacity_wh: float = 20.0,
        soc: float = 0.2,
        *,
        start_delay_s: float | None = None,
        ramp_s: float | None = None,
    ) -> Battery:
        """Put a battery into a slot by hand (logged like the scenario's)."""
        st = self.station(sid)
        with st.lock:
            b = st.rig.insert(
                slot,
                pack=pack,
                power_w=power_w,
                capacity_wh=capacity_wh,
                soc=soc,
                start_delay_s=self.start_delay_s if start_delay_s is None else start_delay_s,
                ramp_s=self.ramp_s if ramp_s is None else ramp_s,
            )
            st.scenario.state[slot].power_w = power_w
            self._log(
                sid,
                [
                    Action(
                        t_v=self.clock.elapsed(),
                        what="insert",
                        slot=slot,
                        soc=soc,
                        battery=b.serial,
                    )
                ],
            )
        return b

    def remove(self, sid: str, slot: int) -> Battery | None:
        """Take a battery out by hand (mid-charge allowed; counts in the bound)."""
        st = self.station(sid)
        with st.lock:
            s = st.rig.model.sample(slot)
            b = st.rig.remove(slot)
            self._log(
                sid,
                [
                    Action(
                        t_v=self.clock.elapsed(),
                        what="remove",
                        slot=slot,
                        p_w=s.p_w,
                        soc=s.battery.soc if s.battery else None,
                        battery=b.serial if b else None,
                    )
                ],
            )
        return b

    def set_fault(self, sid: str, slot: int, code: int) -> None:
        st = self.station(sid)
        with st.lock:
            p = st.rig.model.sample(slot).p_w
            st.rig.set_fault(slot, code)
            self._log(sid, [Action(t_v=self.clock.elapsed(), what="fault", slot=slot, p_w=p)])

    def clear_fault(self, sid: str, slot: int) -> None:
        st = self.station(sid)
        with st.lock:
            st.rig.clear_fault(slot)
            self._log(sid, [Action(t_v=self.clock.elapsed(), what="clear", slot=slot)])

    def stats(self) -> dict[str, Any]:
        """Counters and CPU per station (firmware processes), for benches and the CLI."""
        cpu = {st.sid: round(st.cpu_s(), 3) for st in self.stations}
        kinds: dict[str, int] = {}
        with self._actions_lock:
            for _, a in self.actions:
                kinds[a.what] = kinds.get(a.what, 0) + 1
        return {
            "stations": len(self.stations),
            "powered": sum(1 for st in self.stations if st.powered),
            "starts": sum(st.starts for st in self.stations),
            "cuts": sum(st.cuts for st in self.stations),
            "crashes": sum(st.crashes for st in self.stations),
            "turned_away": sum(st.scenario.turned_away for st in self.stations),
            "actions": kinds,
            "cpu_s": cpu,
            "time_commands": self.time_commands,
            "virtual_s": round(self.clock.elapsed(), 1),
            "telemetry_seen": self._monitor.telemetry_count if self._monitor else 0,
        }

    def fault_totals(self) -> dict[str, int]:
        """Injected link faults over the whole fleet (the station counters they make)."""
        tot: dict[str, int] = {}
        for st in self.stations:
            for k, v in st.rig.fault_totals().items():
                tot[k] = tot.get(k, 0) + v
        return tot

    def write_actions(self) -> pathlib.Path:
        path = self.workdir / ACTIONS_FILE
        with self._actions_lock:
            lines = [
                json.dumps({"sid": sid, **a.__dict__}, sort_keys=True) for sid, a in self.actions
            ]
        path.write_text("".join(x + "\n" for x in lines))
        return path

    def latest(self, sid: str) -> dict[str, Any] | None:
        """The newest telemetry body seen on the broker for sid (None before any)."""
        return self._monitor.latest.get(sid) if self._monitor else None

    def settle(self, timeout: float = 120.0) -> bool:
        """End of a run: stop the riders, take every battery out, and wait until each running
        station has published telemetry made after that (its registers are then final).
        Returns False on timeout."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        marks: dict[str, tuple[int, int]] = {}
        for st in self.stations:
            with st.lock:
                if not st.powered:
                    continue
                t = self.clock.elapsed()
                acts = []
                for slot in range(1, self.slots + 1):
                    s = st.rig.model.sample(slot)
                    if s.battery is not None:
                        st.rig.remove(slot)
                        acts.append(
                            Action(
                                t_v=t,
                                what="remove",
                                slot=slot,
                                p_w=s.p_w,
                                soc=s.battery.soc,
                                battery=s.battery.serial,
                            )
                        )
                self._log(st.sid, acts)
                last = self.latest(st.sid)
                marks[st.sid] = (last["boot"], last["up"]) if last else (-1, -1)
        # a message made after the removal: later than the newest seen by more than a period
        margin = int((self.telemetry_s + 2 * self.sample_ms / 1000) * self.accel * 1000)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waiting = []
            for sid, (boot, up) in marks.items():
                b = self.latest(sid)
                if (
                    b is None
                    or (b["boot"], b["up"]) <= (boot, up + margin)
                    or any(s.get("st", "I") not in "I" for s in b.get("slots", []))
                ):
                    waiting.append(sid)
            if not waiting:
                return True
            time.sleep(0.2)
        log.warning("settle: no final telemetry from %s", waiting[:10])
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        for st in self.stations:
            with st.lock:
                st.look_cpu()
                st.proc.stop()
                st.ended()
                st.powered = False
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        if self.stations:
            try:
                self.ground_truth()
                self.write_actions()
                self._write_state()
            except OSError:
                log.exception("writing the fleet's files")
        for st in self.stations:
            st.rig.stop()
        self.host.stop()

    def _write_state(self) -> None:
        """What the next start in this folder resumes from (see __init__)."""
        meters = {
            st.sid: {"kwh": st.rig.model.meter_values()[3], "serial": st.rig.model.meter_serial}
            for st in self.stations
            if st.rig.model.has_meter
        }
        state = {"unix_ms": self.clock.unix_ms(), "meters": meters}
        write_json_atomic(self.workdir / STATE_FILE, state)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clock commands (called by the monitor) ------------------------------------------
    def time_command(self, sid: str) -> bytes:
        """A signed `time` command carrying the fleet's virtual Unix time (CONTRACT §5.4)."""
        st = self.station(sid)
        now = self.clock.unix_ms()
        # short-lived (5 s of real time): a copy queued through an outage expires
        exp = now + max(60_000, int(5000 * self.accel))
        body = {
            "v": 1,
            "sid": sid,
            "kid": st.kid,
            "cmd": "time",
            "now_ms": now,
            "exp": exp,
            "nonce": secrets.token_hex(8),
        }
        return wire.sign(json.dumps(body, separators=(",", ":")).encode(), st.key)


def integration_bound(
    truth: dict[str, dict[int, int]],
    actions: list[tuple[str, Action]],
    dt_s: float,
    persist_s: float,
    rel: float = 0.005,
    abs_mwh: int = 100,
) -> dict[str, dict[int, int]]:
    """How far a slot's credited energy may honestly be from the ground truth, mWh.

    A trapezoid over samples `dt_s` (simulated s) apart is exact to `rel` of the energy on
    smooth power (ramps last two periods); an abrupt change is not: a battery taken out or a
    charger fault is off by at most p × dt / 2 (p × dt allowed: a missed sample doubles the
    span). A power cut loses what the station integrated after its last save or telemetry
    message and what flowed after its last sample: the energy the slot took in the window
    before the cut (`Action.e_mwh`, measured by the fleet) when known, else
    p × (persist + 2 dt).
    """
    out = {sid: {s: abs_mwh + int(rel * v) for s, v in m.items()} for sid, m in truth.items()}
    for sid, a in actions:
        if a.slot == 0 or sid not in out or a.slot not in out[sid]:
            continue
        if a.what in ("take", "remove", "fault"):
            out[sid][a.slot] += math.ceil(a.p_w * dt_s / 3.6)
        elif a.what in ("cut", "offline"):
            lost = a.e_mwh if a.e_mwh else math.ceil(a.p_w * (persist_s + 2 * dt_s) / 3.6)
            out[sid][a.slot] += lost + math.ceil(a.p_w * dt_s / 3.6)
    return out


class _Monitor:
    """A paho client on the fleet's topics: sets virtual clocks on birth (accel != 1) and keeps
    each station's newest telemetry body (what `settle` and the CLI look at)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.latest: dict[str, dict[str, Any]] = {}
        self.telemetry_count = 0
        self._lock = threading.Lock()
        cid = f"fleet-monitor-{os.getpid()}-{secrets.token_hex(3)}"
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(1, 2)

    def start(self) -> None:
        if self.fleet.accounts is not None:
            self.c.username_pw_set(*self.fleet.accounts.tool)
        self.c.connect_async(self.fleet.broker_host, self.fleet.broker_port, keepalive=30)
        self.c.loop_start()

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        p = self.fleet.prefix
        c.subscribe([(f"{p}/+/status", 1), (f"{p}/+/telemetry", 0)])

    def _on_message(self, c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
        parts = m.topic.split("/")
        if len(parts) < 3:
            return
        sid, kind = parts[-2], parts[-1]
        if sid not in self.fleet._by_sid:
            return
        try:
            if kind == "telemetry":
                body = wire.decode_signed(wire.split_signed(bytes(m.payload))[0])
                with self._lock:
                    self.telemetry_count += 1
                    old = self.latest.get(sid)
                    if old is None or (body["boot"], body["up"]) > (old["boot"], old["up"]):
                        self.latest[sid] = body
            elif kind == "status" and self.fleet.accel != 1.0:
                # once per boot; a birth missed across a broker restart comes back retained.
                # Statuses retained from before this fleet launched the station are ignored.
                obj = json.loads(bytes(m.payload))
                sim = self.fleet._by_sid[sid]
                boot = obj.get("boot")
                if (
                    obj.get("state") == "online"
                    and type(boot) is int
                    and sim.starts > 0
                    and boot not in sim.clock_sent
                ):
                    sim.clock_sent.add(boot)
                    c.publish(f"{self.fleet.prefix}/{sid}/cmd", self.fleet.time_command(sid), qos=1)
                    self.fleet.time_commands += 1
        except Exception:  # a malformed message is not the monitor's business
            log.debug("monitor: %s", m.topic, exc_info=True)
