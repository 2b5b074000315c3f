# The station's sampling loop: polls the charger for every configured slot, the grid meter
# every cycle and the BMS round robin, integrates energy, persists registers, tracks
# sessions and stale sources, and keeps the current state for the telemetry layer.
import gc

import energy
import modbus
import registers
import sessions
import timebase

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef,misc]
        return x


_MAX_EVENTS = const(64)
_OVER_TEMP = const(600)  # 60.0 °C at the hottest cell: warn (the BMS protects itself higher up)
_CHARGING = "CV"


class Station:
    """Holds every register and reading. `cycle()` is one sampling pass; `run()` repeats it
    every sample_ms. I/O objects are injected: a ChargerLink, a ModbusMaster (or None when the
    station has neither meter nor BMS), the A/B state store and an Uptime."""

    def __init__(self, cfg, link, master, store, uptime, fw="0", reset="unknown"):
        self.cfg = cfg
        self.link = link
        self.master = master
        self.store = store
        self.uptime = uptime
        self.fw = fw
        self.reset = reset
        n = cfg["slots"]
        self.n = n
        self.stale_ms = cfg["stale_s"] * 1000
        self.policy = energy_policy(cfg)
        saved = store.load() or {}
        regs = saved.get("regs") or []
        # registers restored from flash; a slot added by a config change starts at 0
        self.restored = [int(regs[i]) if i < len(regs) else 0 for i in range(n)]
        rems = saved.get("rems") or []
        self.slots = [
            energy.SlotEnergy(self.restored[i], self.stale_ms, int(rems[i]) if i < len(rems) else 0)
            for i in range(n)
        ]
        # boot counter: persisted before any message uses it, never below boot_base
        self.boot = max(int(saved.get("boot", -1)) + 1, cfg["boot_base"])
        self.sessions = sessions.SessionTracker(n)
        self.events = []
        self.events_dropped = 0
        self._open_sessions = saved.get("sessions") or {}
        # latest readings, by source; each with the uptime of its last good answer
        self.chg = [None] * n  # charger reply per slot
        self.chg_up = [None] * n
        self.bat = [None] * n  # BMS reading dict per slot
        self.bat_up = [None] * n
        self.meter = None
        self.meter_up = None
        # reused reading dicts (a failed read raises before writing into them)
        self._meter_buf = {}
        self._bat_buf = [{} for _ in range(n)]  # type: list
        # the meter's last serial and register; a value out of its range (a garbage float
        # that firmware before the range checks took for a register) is forgotten
        self.meter_sn = _in_range(saved.get("meter_sn"), 0, 0xFFFFFFFF)
        self.meter_wh = _in_range(saved.get("meter_wh"), 0, registers.E_WH_MAX)
        # bad readings (registers.BadReading): a reply intact on the bus whose value is out of
        # its CONTRACT §2 range; telemetry's err.mb_bad once there has been one
        self.bad_readings = 0
        self._meter_swapped = False
        self._bms_next = 0
        self._raised = {}  # alarms raised and not yet cleared: stale sources, conditions
        self.ts_offset = None  # Unix ms − uptime ms, once the clock is synced
        self.cycles = 0
        self.last_cycle_us = 0
        self.persist_ok = True
        self.task_failures = 0
        self.uplink = None  # set by the app when the station has one (for status and tracing)
        self._saved_mwh = sum(self.restored)
        self._saved_up = 0
        self._save()  # the boot counter is on flash before anything else happens

    # -- persistence -------------------------------------------------------------------
    def _save(self, up=None):
        gc.collect()  # the encoded state needs one contiguous ~1 KB block
        self.store.save(
            {
                "boot": self.boot,
                "regs": [s.mwh for s in self.slots],
                "rems": [s.rem for s in self.slots],  # below 1 mWh, carried across restarts
                "sessions": self.sessions.snapshot(),
                "meter_sn": self.meter_sn,
                "meter_wh": self.meter_wh,
            }
        )
        self._saved_mwh = self.total_mwh()
        self._saved_up = self.uptime.ms() if up is None else up

    def total_mwh(self):
        t = 0
        for s in self.slots:
            t += s.mwh
        return t

    def persist_if_due(self, up):
        if self.policy.due(self.total_mwh() - self._saved_mwh, up - self._saved_up):
            self.try_save(up)

    def try_save(self, up):
        try:
            self._save(up)
            self.persist_ok = True
        except OSError as e:
            # flash full or failing: keep sampling (the registers live on in RAM and in
            # telemetry), say so, and let the watchdog see it
            self.persist_ok = False
            self.alarm("persist_failed", "crit", "cannot save registers: %s" % e)

    def persist_now(self):
        """Before a deliberate reboot or stop."""
        self._save()

    # -- events ------------------------------------------------------------------------
    def emit(self, ev):
        """Queue an event (without common fields) for the telemetry layer; bounded."""
        if len(self.events) >= _MAX_EVENTS:
            self.events.pop(0)
            self.events_dropped += 1
        self.events.append(ev)

    def take_events(self):
        evs = self.events
        self.events = []
        return evs

    def alarm(self, code, level, msg, slot=None):
        ev = {"ev": "alarm", "code": code, "level": level, "msg": msg}
        if slot is not None:
            ev["slot"] = slot
        self.emit(ev)

    def start(self):
        """Boot event and the sessions left open by the previous boot (closed as `reboot`)."""
        restored = {}
        for i in range(self.n):
            restored[str(i + 1)] = self.restored[i]
        self.emit({"ev": "boot", "fw": self.fw, "reset": self.reset, "restored": restored})
        up = self.uptime.ms()
        for ev in self.sessions.restore(self._open_sessions, up, self.ts(up)):
            self.emit(ev)
        self._open_sessions = {}

    def ts(self, up):
        return None if self.ts_offset is None else self.ts_offset + up

    # -- sampling ----------------------------------------------------------------------
    async def poll_charger(self):
        link = self.link
        for i in range(self.n):
            slot = i + 1
            r = await link.poll(slot)
            up = self.uptime.ms()
            if r is None:
                self._check_stale_charger(i, up)
                continue
            e = self.slots[i]
            was_powered = e.powered
            gap = e.sample(up, r.mv, r.ma)
            if gap and (was_powered or e.powered):
                # an idle slot on both sides of the gap had nothing to meter: no alarm noise
                self._unmetered(i, gap)
            self.chg[i] = r
            self.chg_up[i] = up
            self._raised.pop(("chg", i), None)
            self._condition(
                "charger_fault", i, r.state == "E", "crit", "charger fault %d" % r.fault
            )

    def _unmetered(self, i, gap_ms):
        self.alarm("unmetered", "warn", "slot %d unmetered for %d ms" % (i + 1, gap_ms), i + 1)

    def _check_stale_charger(self, i, up):
        last = self.chg_up[i]
        if last is not None and up - last > self.stale_ms and ("chg", i) not in self._raised:
            self._raised[("chg", i)] = up
            self.alarm(
                "charger_stale",
                "warn",
                "slot %d charger silent for %d ms" % (i + 1, up - last),
                i + 1,
            )

    def _condition(self, code, i, active, level, msg):
        """Alarm once when a condition starts; re-armed when it clears."""
        key = (code, i)
        if not active:
            self._raised.pop(key, None)
        elif key not in self._raised:
            self._raised[key] = 1
            self.alarm(code, level, msg, i + 1)

    async def poll_meter(self):
        m = self.cfg["meter"]
        if m is None or self.master is None:
            return
        up0 = self.uptime.ms()
        try:
            if (
                self.meter_sn is None
                or self.meter_up is None
                or up0 - self.meter_up > self.stale_ms
            ):
                # at start and after every bus recovery (a swapped meter changes its serial)
                sn = await registers.read_meter_sn(self.master, m["unit"])
                if self.meter_sn is not None and sn != self.meter_sn:
                    self._meter_swapped = True  # reported with the new meter's first reading
                self.meter_sn = sn
            # into the same dict every cycle: long-lived small objects scattered by
            # replacement fragment a 100 KB heap until a 1 KB save no longer fits
            reading = await registers.read_meter(
                self.master, m["unit"], m["model"], self._meter_buf
            )
        except (modbus.ModbusError, ValueError) as e:
            up = self.uptime.ms()
            if isinstance(e, registers.BadReading):
                # the meter answered with no valid reading: counted, and omitted from now on
                # (never its previous reading as if current) until a good one
                self.bad_readings += 1
                self.meter = None
            if self.meter_up is not None and up - self.meter_up > self.stale_ms:
                self.meter = None
                if "meter" not in self._raised:
                    self._raised["meter"] = up
                    self.alarm(
                        "meter_stale",
                        "warn",
                        "no good grid meter reading for %d ms" % (up - self.meter_up),
                    )
            return
        up = self.uptime.ms()
        wh = reading["e_wh"]
        if self.meter_wh is not None and (self._meter_swapped or wh < self.meter_wh):
            # CONTRACT §6 rule 4: the agent credits up to from_wh, then a new baseline at to_wh
            self.emit(
                {"ev": "meter_reset", "from_wh": self.meter_wh, "to_wh": wh, "sn": self.meter_sn}
            )
        self._meter_swapped = False
        self.meter_wh = wh
        self.meter = reading
        self.meter_up = up
        self._raised.pop("meter", None)

    async def poll_bms(self):
        if self.master is None:
            return
        base = self.cfg["bms"]["unit_base"]
        for _ in range(min(self.cfg["bms"]["per_cycle"], self.n)):
            i = self._bms_next
            self._bms_next = (i + 1) % self.n
            r = self.chg[i]
            if r is not None and r.state in "IX":
                # no battery: its BMS does not answer, and that is not an error
                self.bat[i] = None
                continue
            try:
                b = await registers.read_bms(self.master, base + i + 1, True, self._bat_buf[i])
            except registers.BadReading:
                b = None
                self.bad_readings += 1
                self.bat[i] = None  # omitted until a good reading
            except (modbus.ModbusError, ValueError):
                b = None
            up = self.uptime.ms()
            if b is not None:
                self.bat[i] = b
                self.bat_up[i] = up
                self._condition(
                    "over_temp",
                    i,
                    b["t"] >= _OVER_TEMP,
                    "crit",
                    "slot %d battery at %d dC" % (i + 1, b["t"]),
                )
                self._condition(
                    "bms_fault",
                    i,
                    b["flt"] != 0,
                    "crit",
                    "slot %d BMS fault bits %d" % (i + 1, b["flt"]),
                )
            elif self.bat_up[i] is not None and up - self.bat_up[i] > self.stale_ms:
                self.bat[i] = None

    def expire(self, up):
        """Drop readings older than the stale window so they are never reported as current."""
        for i in range(self.n):
            if self.chg_up[i] is not None and up - self.chg_up[i] > self.stale_ms:
                self.chg[i] = None
            if self.bat_up[i] is not None and up - self.bat_up[i] > self.stale_ms:
                self.bat[i] = None
        if self.meter_up is not None and up - self.meter_up > self.stale_ms:
            self.meter = None

    def track_sessions(self, up):
        """Session events for this cycle; True when a session opened or closed."""
        ts = self.ts(up)
        changed = False
        for i in range(self.n):
            r = self.chg[i]
            if r is None:
                continue
            b = self.bat[i]
            for ev in self.sessions.update(
                i + 1,
                r.state,
                b["id"] if b else None,
                self.slots[i].mwh,
                b["soc"] if b else None,
                up,
                ts,
            ):
                self.emit(ev)
                changed = True
        return changed

    async def cycle(self):
        t0 = timebase.ticks_us()
        await self.poll_charger()
        await self.poll_meter()
        await self.poll_bms()
        up = self.uptime.ms()
        self.expire(up)
        if self.track_sessions(up):
            # an open session is persisted with the registers, so that a power cut closes it
            # as `reboot` after the restart instead of forgetting it
            self.try_save(up)
        else:
            self.persist_if_due(up)
        self.cycles += 1
        self.last_cycle_us = timebase.ticks_diff(timebase.ticks_us(), t0)

    async def run(self, cycles=None):
        period = self.cfg["sample_ms"]
        nxt = timebase.ticks_ms()
        while cycles is None or self.cycles < cycles:
            await self.cycle()
            if self.cycles % 64 == 0:
                gc.collect()
            nxt = timebase.ticks_add(nxt, period)
            wait = timebase.ticks_diff(nxt, timebase.ticks_ms())
            if wait < 0:
                nxt = timebase.ticks_ms()  # overran: restart the schedule, don't burst
                wait = 0
            await timebase.asleep_ms(wait)

    # -- state for telemetry -----------------------------------------------------------
    def errors(self):
        e = {}
        if self.master is not None:
            e.update(self.master.err)
        else:
            e.update({"mb_to": 0, "mb_crc": 0, "mb_exc": 0, "mb_addr": 0})
        e.update(self.link.err)
        if self.bad_readings:
            # only once there is one: the seven counters of CONTRACT §5.2 stay the key set of
            # a station that has never had a bad reading (absent reads as 0, as in the agent)
            e["mb_bad"] = self.bad_readings
        return e

    def snapshot(self):
        """The telemetry body (without common fields): stale sources are omitted."""
        up = self.uptime.ms()
        self.expire(up)
        body = {}  # type: dict
        if self.meter is not None:
            body["meter"] = {
                "e_wh": self.meter["e_wh"],
                "p_w": self.meter["p_w"],
                "sn": self.meter_sn,
            }
        slots = []
        for i in range(self.n):
            s = {"n": i + 1, "e_mwh": self.slots[i].mwh, "b_mwh": self.restored[i]}
            r = self.chg[i]
            if r is not None:
                s["st"] = r.state
                s["mv"] = r.mv
                s["ma"] = r.ma
            b = self.bat[i]
            if b is not None:
                s["bat"] = b
            slots.append(s)
        body["slots"] = slots
        body["err"] = self.errors()
        return body


def _in_range(v, lo, hi):
    return v if type(v) is int and lo <= v <= hi else None


def energy_policy(cfg):
    import persist

    p = cfg["persist"]
    return persist.PersistPolicy(p["every_mwh"], p["every_s"])
