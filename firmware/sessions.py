# Charging sessions per slot, from the charger state, the BMS battery id and the slot's energy
# register (CONTRACT §5.3 session_start / session_end). Pure logic: the caller adds the
# common fields (v, sid, boot, seq, up, ts, ...) and persists snapshot() with the registers.
#
# Rules
# - A session starts when the slot is charging (state C or V) and the battery id is known.
#   If charging is seen before the BMS has given an id, the start is held pending with the
#   register, uptime and time of that first charging sample; when the id arrives while still
#   charging, session_start is emitted with those values (the energy between the two counts
#   in the session). If charging stops before any id is known, no session is recorded (the
#   energy is still in the register and the telemetry).
# - An open session ends with why =
#     full     state F
#     fault    state E (or X: the channel vanished from the controller)
#     stopped  state W (battery present, not charging)
#     removed  state I, or a known battery id that differs from the session's (a swap the
#              charger did not show as I: the new battery then starts its own session at
#              once when it is charging, and e1_mwh of the old one may include a sample or
#              two of the new battery's energy)
#     reboot   restore() after a restart, for every session persisted open
# - bat_id None means the BMS is stale or has not answered: it neither ends nor changes an
#   open session; it only delays a start (above). state None means no charger reading this
#   cycle: nothing changes.
# - soc / soc0 / soc1 are omitted when no BMS reading was ever had for them; t0 / t1 are
#   present only when the station clock was synced (ts not None) at that moment.
_CHARGING = ("C", "V")
_ENDS = {"F": "full", "E": "fault", "X": "fault", "W": "stopped", "I": "removed"}


class SessionTracker:
    def __init__(self, n_slots):
        if not 1 <= n_slots <= 16:
            raise ValueError("n_slots must be 1..16")
        self.n_slots = n_slots
        self._open = {}  # slot -> {bat, e0, soc0, up0, t0, e, soc, up, ts}: last seen alive
        self._pending = {}  # slot -> {e0, up0, t0}: charging, battery id not yet known

    def active(self, slot):
        """The battery id of the slot's open session, or None."""
        s = self._open.get(slot)
        return None if s is None else s["bat"]

    def update(self, slot, state, bat_id, e_mwh, soc, up, ts=None):
        """One sampling cycle of one slot. Returns a list of events (dicts with 'ev' and the
        event's own fields), usually empty; a swap gives [session_end, session_start]."""
        if not 1 <= slot <= self.n_slots:
            raise ValueError("slot out of range")
        if state is None:
            return []
        events = []  # type: list
        s = self._open.get(slot)
        if s is not None:
            why = None
            if bat_id is not None and bat_id != s["bat"]:
                why = "removed"
            else:
                why = _ENDS.get(state)
            if why is None:
                s["e"] = e_mwh
                s["up"] = up
                s["ts"] = ts
                if soc is not None:
                    s["soc"] = soc
                return events
            events.append(_end(slot, s, why, e_mwh, soc if soc is not None else s["soc"], up, ts))
            del self._open[slot]
        if state not in _CHARGING:
            self._pending.pop(slot, None)
            return events
        if bat_id is None:
            if slot not in self._pending:
                self._pending[slot] = {"e0": e_mwh, "up0": up, "t0": ts}
            return events
        p = self._pending.pop(slot, None)
        if p is None or events:  # after a swap the new battery starts now
            p = {"e0": e_mwh, "up0": up, "t0": ts}
        self._open[slot] = {
            "bat": bat_id,
            "e0": p["e0"],
            "soc0": soc,
            "up0": p["up0"],
            "t0": p["t0"],
            "e": e_mwh,
            "soc": soc,
            "up": up,
            "ts": ts,
        }
        ev = {"ev": "session_start", "slot": slot, "bat": bat_id, "e_mwh": p["e0"]}
        if soc is not None:
            ev["soc"] = soc
        events.append(ev)
        return events

    def snapshot(self):
        """Open sessions as JSON-able data, to persist with the registers."""
        out = {}
        for slot, s in self._open.items():
            out[str(slot)] = dict(s)
        return out

    def restore(self, snapshot, up=None, ts=None):
        """After a restart: a session_end with why='reboot' for every session in snapshot
        (sorted by slot); the tracker starts with none open. e1_mwh, soc1, up1 and t1 are the
        last values seen before the restart (the ones persisted with the registers), so that
        up1 is on the same clock as up0. up and ts, this boot's uptime and time, are not
        needed: the event's common fields carry them. Malformed entries are skipped."""
        self._open = {}
        self._pending = {}
        events = []  # type: list
        if not isinstance(snapshot, dict):
            return events
        valid = {}
        for key in snapshot:
            try:
                slot = int(key)
            except (TypeError, ValueError):
                continue
            s = snapshot[key]
            if (
                1 <= slot <= self.n_slots
                and isinstance(s, dict)
                and isinstance(s.get("bat"), str)
                and isinstance(s.get("e0"), int)
                and isinstance(s.get("up0"), int)
            ):
                valid[slot] = s
        for slot in sorted(valid):
            s = valid[slot]
            c = {"bat": s["bat"], "e0": s["e0"], "up0": s["up0"]}
            c["soc0"] = _int(s.get("soc0"), None)
            c["t0"] = _int(s.get("t0"), None)
            e1 = _int(s.get("e"), s["e0"])
            up1 = _int(s.get("up"), s["up0"])
            events.append(
                _end(slot, c, "reboot", e1, _int(s.get("soc"), None), up1, _int(s.get("ts"), None))
            )
        return events


def _int(v, default):
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _end(slot, s, why, e1, soc1, up1, t1):
    ev = {
        "ev": "session_end",
        "slot": slot,
        "bat": s["bat"],
        "e0_mwh": s["e0"],
        "e1_mwh": e1,
        "up0": s["up0"],
        "up1": up1,
        "why": why,
    }
    if s.get("soc0") is not None:
        ev["soc0"] = s["soc0"]
    if soc1 is not None:
        ev["soc1"] = soc1
    if s.get("t0") is not None:
        ev["t0"] = s["t0"]
    if t1 is not None:
        ev["t1"] = t1
    return ev
