"""The live picture of a fleet, built from rows of the agent's store.

Pure: rows go in (`add_raw`, `set_status`, `add_quarantine`, `add_agent_alarm`,
`set_records`), JSON-ready views come out (`fleet`, `station`, `alarms`, `power`, `energy`,
`daily`); the clock is an argument (`now` in Unix ms). agent/dashboard/reader.py feeds it
from the database and agent/dashboard/live.py serves it.

Units are the contract's (CONTRACT §2): W, mV, mA, mWh, 0.1 % and 0.1 °C integers; the
browser formats them. Power of a slot is the charger's output, mV × mA / 10⁶ W.

Two clocks: the live view (last seen, silence, power history, alarm times) runs on the
agent's clock (receive times), so a station with a wrong clock still shows up live; what
comes from records (today's kWh and CO2e, energy per interval and per day, sessions) runs
on station time, as metering does (CONTRACT §6.5). A station's clock offset is the `ts −
receive time` of its newest live reading; "today" for a station is the UTC day of its own
clock, and the fleet's charts use the median offset (a simulated fleet runs days ahead).

Alarms come in two kinds:
- *active*: conditions true now, derived from each station's newest telemetry and status
  (offline, over-temperature, BMS fault bits, charger fault, stale charger / BMS / meter)
  and from recent rejections (signature failures, quarantined messages, conflicts within
  `recent_s`). Each has a stable id (`sid:code[:slot]`) and the time it was first seen;
  it clears by itself when the condition ends.
- *events*: what stations and the agent reported once (station `alarm` events,
  `outbox_drop`, `meter_reset`, quarantine rows, agent alarms), plus every raise and clear
  of an active alarm, newest first, bounded.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final

from agent.ledger import Record, carbon

log = logging.getLogger(__name__)

DAY_MS: Final = 86_400_000
OVER_TEMP_DC: Final = 600  # 60.0 °C at the hottest cell (the firmware's over_temp threshold)
# quarantine reasons that mean "the signature or the key did not check out"
SIG_REASONS: Final = frozenset(
    {
        "bad_sig",
        "unknown_kid",
        "revoked_key",
        "unknown_station",
        "sig_missing",
        "sig_length",
        "sig_hex",
        "sig_not_last",
        "sig_trailing",
    }
)
STATE_NAMES: Final = {
    "I": "empty",
    "W": "waiting",
    "C": "charging CC",
    "V": "charging CV",
    "F": "full",
    "E": "fault",
    "X": "no channel",
}
CHARGING: Final = frozenset("CV")
# conditions that are normal for a moment (a BMS is read a few slots per cycle, so a new
# battery shows without BMS data for a cycle or two): active only once they last
DEBOUNCED: Final = frozenset({"bms_stale", "charger_stale", "meter_stale"})
BATTERY_IN: Final = frozenset("WCVFE")
# OCPP sources (CONTRACT §11): a connector's status (1.6 StatusNotification, 2.0.1
# connectorStatus, or a 2.0.1 transaction's chargingState) as a slot state: (code, name)
OCPP_STATES: Final = {
    "Available": ("I", "available"),
    "Preparing": ("W", "preparing"),
    "Charging": ("C", "charging"),
    "SuspendedEV": ("F", "suspended by the EV"),
    "SuspendedEVSE": ("W", "suspended by the charger"),
    "Finishing": ("F", "finishing"),
    "Reserved": ("I", "reserved"),
    "Unavailable": ("X", "unavailable"),
    "Faulted": ("E", "fault"),
    "Occupied": ("W", "occupied"),  # 2.0.1 connectorStatus
    "EVConnected": ("W", "EV connected"),  # 2.0.1 chargingState
    "Idle": ("I", "idle"),
}
OCPP_MARKS: Final = {"ocpp1.6": "OCPP 1.6", "ocpp2.0.1": "OCPP 2.0.1"}
POWER: Final = "Power.Active.Import"
# OCPP actions whose body carries the charger's own sample time (its clock offset)
_TIMED: Final = frozenset(
    {"MeterValues", "StartTransaction", "StopTransaction", "TransactionEvent"}
)


@dataclass(frozen=True, kw_only=True)
class ViewConfig:
    history_s: int = 3600  # power history kept in memory (and read back at start)
    bucket_s: int = 5  # power history resolution
    offline_after_s: float = 60.0  # silence (>= 3 telemetry periods too) that means offline
    debounce_s: float = 15.0  # a stale source must stay stale this long to raise an alarm
    recent_s: int = 3600  # rejections within this window raise an active alarm
    events_kept: int = 300
    history_kept: int = 2000  # alarm occurrences (raised, cleared) kept for the history
    energy_hours: int = 12  # interval records shown
    days: int = 14  # day records shown
    backfill_rows: int = 200_000  # most raw rows read back at start
    # an OCPP charger's heartbeat period until two of its Heartbeats were seen (the
    # agent's [ocpp] heartbeat_s default): it is silent after 3 of them without a frame
    ocpp_heartbeat_s: int = 300
    ocpp_tail_rows: int = 500  # an OCPP station's newest frames read back at start

    def __post_init__(self) -> None:
        if self.bucket_s < 1 or self.history_s < self.bucket_s:
            raise ValueError("history_s must be >= bucket_s >= 1")
        if self.offline_after_s <= 0 or self.recent_s <= 0 or self.debounce_s < 0:
            raise ValueError("offline_after_s and recent_s must be > 0, debounce_s >= 0")


def _int(x: Any) -> int | None:
    return x if type(x) is int else None


def _key(body: Mapping[str, Any]) -> tuple[int, int]:
    return (int(body.get("boot", 0)), int(body.get("seq", 0)))


class Station:
    """What the dashboard knows of one station."""

    __slots__ = (
        "boot_ev",
        "ocpp",
        "err",
        "events",
        "had_meter",
        "hist",
        "last_live_ms",
        "last_ms",
        "offset_ms",
        "ota",
        "period_ms",
        "sess_key",
        "sessions",
        "sid",
        "source",
        "status",
        "status_ms",
        "tel",
        "tel_key",
        "tel_ms",
        "tel_recv_ms",
        "version",
    )

    def __init__(self, sid: str, hist_len: int) -> None:
        self.sid = sid
        self.status: dict[str, Any] | None = None  # last birth / will
        self.status_ms = 0
        self.tel: dict[str, Any] | None = None  # newest telemetry body by (boot, seq)
        self.tel_key = (-1, -1)
        self.tel_ms = 0  # its time (station ts, else agent receive time)
        self.tel_recv_ms = 0
        self.last_ms = 0  # newest receive time of any signed message
        self.period_ms: int | None = None  # telemetry period seen (between live arrivals)
        self.last_live_ms = 0  # receive time of the newest live (not hist) telemetry
        self.offset_ms: int | None = None  # station clock - agent clock (None: never synced)
        self.boot_ev: dict[str, Any] | None = None  # newest boot event
        self.ota: dict[str, Any] | None = None  # newest `ota` event (CONTRACT §5.3)
        self.sessions: dict[int, dict[str, Any]] = {}  # slot -> open session
        self.sess_key: dict[int, tuple[int, int]] = {}  # slot -> key of its newest session event
        self.had_meter = False
        self.err: dict[str, int] = {}
        # [bucket start ms, slots W, meter W or None], oldest first
        self.hist: deque[list[Any]] = deque(maxlen=hist_len)
        self.events = 0
        self.version = 0  # bumped by every change of this station's data
        self.source = "own"  # "own", or an OCPP charger's protocol (ocpp1.6, ocpp2.0.1, ocpp)
        self.ocpp: Ocpp | None = None  # what its OCPP frames said


class Conn:
    """One connector (1.6) or EVSE (2.0.1) of an OCPP charger: a slot."""

    __slots__ = ("e_key", "e_mwh", "e_t", "error", "p_w", "signed", "state", "status", "status_key")

    def __init__(self) -> None:
        self.status: str | None = None  # newest StatusNotification status
        self.status_key = (-1, -1)
        self.state: str | None = None  # 2.0.1: the open transaction's chargingState
        self.error: str | None = None  # 1.6 errorCode other than NoError
        self.e_mwh: int | None = None  # newest Energy.Active.Import.Register, mWh
        self.e_key = (-1, -1)
        self.e_t = 0  # its sample time (the charger's clock)
        self.p_w: int | None = None  # Power.Active.Import, else from the last two registers
        self.signed = False  # the newest register came from OCMF, checked


class Ocpp:
    """What an OCPP charger's frames say (CONTRACT §11): not signed telemetry, a picture
    put together frame by frame, each value kept with the key of the frame that set it."""

    __slots__ = ("boot", "boot_key", "conns", "cp_status", "hb_ms", "hb_period_ms", "key", "tx")

    def __init__(self) -> None:
        self.boot: dict[str, Any] = {}  # fw, vendor, model of the newest BootNotification
        self.boot_key = (-1, -1)
        self.conns: dict[int, Conn] = {}
        self.cp_status: str | None = None  # 1.6 connector 0: the charger as a whole
        self.hb_ms = 0  # receive time of the newest Heartbeat
        self.hb_period_ms: int | None = None
        self.key = (-1, -1)  # the newest frame's
        self.tx: dict[str, int] = {}  # transaction id -> connector


# agent alarms that stand for a condition (agent/meters.py: a grid meter past or near its
# calibration due date), raised once a day while it lasts: shown with their own code and
# level until a day and a bit passes without one, not folded into "agent alarms in N min"
STANDING_CODES = frozenset({"meter_overdue", "meter_due_soon"})
STANDING_MS = 26 * 3600 * 1000


class FleetState:
    """The whole picture; not thread-safe (the caller holds a lock)."""

    def __init__(
        self, cfg: ViewConfig | None = None, params: carbon.CarbonParams | None = None
    ) -> None:
        self.cfg = cfg or ViewConfig()
        self.params = params
        self.stations: dict[str, Station] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=self.cfg.events_kept)
        # (ms, sid, kind, reason, quarantine id or -1), oldest first
        self._rejects: deque[tuple[int, str | None, str, str, int]] = deque()
        self.quarantine_total: Counter[str] = Counter()  # reason -> count since start
        # agent alarms about a standing condition, which the agent raises again every day
        # while it lasts (the meter register): (sid, code) -> (ms, level, detail)
        self._standing: dict[tuple[str | None, str], tuple[int, str, str]] = {}
        self._active: dict[str, dict[str, Any]] = {}
        self._since: dict[str, int] = {}
        self._pending: dict[str, int] = {}  # debounced candidates: id -> first seen
        # every occurrence of an active alarm since the dashboard started, newest first:
        # {id, sid, slot, code, level, msg, since_ms, raised_ms, cleared_ms}
        self.occurrences: deque[dict[str, Any]] = deque(maxlen=self.cfg.history_kept)
        self._occ: dict[str, dict[str, Any]] = {}  # active id -> its occurrence
        # records: sid -> {start_ms: [battery mWh, grid mWh]}
        self.days: dict[str, dict[int, list[int]]] = {}
        self.intervals: dict[str, dict[int, list[int]]] = {}
        self.co2e: dict[str, tuple[Fraction, str]] = {}  # sid -> (tCO2e today, point)
        self.co2e_error: str | None = None
        self.rows = 0  # raw rows applied
        # change counters: live updates go out when what a page shows has changed
        self.version = 0  # anything
        self.alarm_version = 0  # active alarms or the event log

    # ---- input ----------------------------------------------------------------------------

    def _st(self, sid: str) -> Station:
        st = self.stations.get(sid)
        if st is None:
            n = self.cfg.history_s // self.cfg.bucket_s
            st = self.stations[sid] = Station(sid, n)
        return st

    def add_raw(self, sid: str, kind: str, recv_ms: int, body: Mapping[str, Any]) -> None:
        """One stored raw message (a verified telemetry or event body)."""
        self.rows += 1
        self.version += 1
        st = self._st(sid)
        st.version += 1
        st.last_ms = max(st.last_ms, recv_ms)
        if kind == "telemetry":
            self._telemetry(st, recv_ms, body)
        else:
            self._event(st, recv_ms, body)

    def add_ocpp(
        self,
        sid: str,
        proto: str,
        recv_ms: int,
        key: tuple[int, int],
        msg: list[Any],
        body: Mapping[str, Any],
    ) -> None:
        """One stored OCPP frame (CONTRACT §11): `msg` the OCPP-J array as received
        (agent.ocpp.frames.parse), `body` its metering body (frames.body_of). Not signed
        telemetry: the picture (connectors, their status, registers and power, firmware)
        is put together from the frames, each value by the key of the frame that set it,
        so a late or repeated frame never moves it backwards."""
        self.rows += 1
        self.version += 1
        st = self._st(sid)
        st.version += 1
        st.source = proto
        st.last_ms = max(st.last_ms, recv_ms)
        oc = st.ocpp = st.ocpp or Ocpp()
        newest = key > oc.key
        oc.key = max(oc.key, key)
        if msg[0] == 2 and isinstance(msg[3], dict):
            self._ocpp_call(st, oc, proto, recv_ms, key, str(msg[2]), msg[3], body, newest)
        # the heartbeat (seen, else the agent's default) is the charger's period
        st.period_ms = oc.hb_period_ms or self.cfg.ocpp_heartbeat_s * 1000
        self._ocpp_tel(st, oc, key, recv_ms)
        w = sum(c.p_w or 0 for c in oc.conns.values())
        self._point(st, recv_ms, w, None)

    def _ocpp_call(
        self,
        st: Station,
        oc: Ocpp,
        proto: str,
        recv_ms: int,
        key: tuple[int, int],
        action: str,
        p: dict[str, Any],
        body: Mapping[str, Any],
        newest: bool,
    ) -> None:
        v16 = proto == "ocpp1.6"
        if action == "BootNotification":
            if key > oc.boot_key:
                cs = p if v16 else p.get("chargingStation")
                cs = cs if isinstance(cs, dict) else {}
                oc.boot_key = key
                oc.boot = {
                    "fw": _str(cs.get("firmwareVersion")),
                    "vendor": _str(cs.get("chargePointVendor" if v16 else "vendorName")),
                    "model": _str(cs.get("chargePointModel" if v16 else "model")),
                }
            return
        if action == "Heartbeat":
            if oc.hb_ms and recv_ms > oc.hb_ms:
                oc.hb_period_ms = recv_ms - oc.hb_ms
            oc.hb_ms = max(oc.hb_ms, recv_ms)
            return
        if action == "StatusNotification":
            n = _nat(p.get("connectorId" if v16 else "evseId"))
            status = _str(p.get("status" if v16 else "connectorStatus"))
            if n == 0:
                if newest and v16:
                    oc.cp_status = status
                return
            c = oc.conns.setdefault(n, Conn())
            if key > c.status_key:
                c.status_key = key
                c.status = status
                err = p.get("errorCode")
                c.error = err if isinstance(err, str) and err != "NoError" else None
                if OCPP_STATES.get(status or "", ("",))[0] not in CHARGING:
                    c.p_w = 0
            return
        if action in _TIMED and newest:
            st.offset_ms = int(body.get("ts", recv_ms)) - recv_ms
        tx = body.get("tx")
        ev = body.get("ev")
        n = _int(body.get("slot")) or 0
        if action == "TransactionEvent":
            evse = p.get("evse")
            n = _nat(evse.get("id")) if isinstance(evse, dict) else 0
        elif action == "MeterValues":
            n = _nat(p.get("connectorId" if v16 else "evseId"))
        if not n and isinstance(tx, str):
            n = oc.tx.get(tx, 0)
        if not n:
            return
        if ev == "session_start" and isinstance(tx, str):
            if len(oc.tx) >= 1000:  # transactions long over: the oldest go
                for old in list(oc.tx)[:500]:
                    del oc.tx[old]
            oc.tx[tx] = n
        c = oc.conns.setdefault(n, Conn())
        for rn, mwh in body.get("reg") or ():
            if (rn or n) == n and type(mwh) is int and key > c.e_key:
                t = int(body.get("ts", recv_ms))
                if c.e_mwh is not None and c.e_key[0] == key[0] and t > c.e_t and mwh >= c.e_mwh:
                    c.p_w = (mwh - c.e_mwh) * 3600 // (t - c.e_t)  # mWh per ms -> W
                c.e_mwh, c.e_t, c.e_key = mwh, t, key
                c.signed = bool(body.get("signed"))
        pw = _ocpp_power(p, v16)
        if pw is not None:
            c.p_w = pw
        info = p.get("transactionInfo")
        cs = info.get("chargingState") if isinstance(info, dict) else None
        if isinstance(cs, str):
            c.state = cs
        if ev == "session_start":
            if key > st.sess_key.get(n, (-1, -1)):
                st.sess_key[n] = key
                st.sessions[n] = {
                    "bat": None,
                    "id_tag": body.get("id_tag"),
                    "tx": tx,
                    "e0_mwh": c.e_mwh if body.get("reg") else None,
                    "soc0": None,
                    "since_ms": _int(body.get("ts")),
                    "up0": None,
                    "boot": key[0],
                    "seq": key[1],
                }
                if pw is None:
                    c.p_w = 0
        elif ev == "session_end":
            if key > st.sess_key.get(n, (-1, -1)):
                st.sess_key[n] = key
                st.sessions.pop(n, None)
            c.state = None
            c.p_w = 0

    def _ocpp_tel(self, st: Station, oc: Ocpp, key: tuple[int, int], recv_ms: int) -> None:
        """The charger's connectors as the telemetry of a station (the slots the views and
        alarms read): state code, register, power."""
        slots = []
        for n in sorted(oc.conns):
            c = oc.conns[n]
            status = c.state or c.status
            if status == "Occupied" and (c.p_w or 0) > 0:  # 2.0.1: drawing power
                code, name = "C", "charging"
            elif status in OCPP_STATES:
                code, name = OCPP_STATES[status]
            elif c.status is None and c.state is None:  # no StatusNotification yet
                busy = n in st.sessions or (c.p_w or 0) > 0
                code, name = ("C", "charging") if busy else ("I", "idle")
                status = None
            else:
                code, name = "X", "unknown"
            slots.append(
                {
                    "n": n,
                    "st": code,
                    "name": name,
                    "ocpp_status": status,
                    "error": c.error,
                    "e_mwh": c.e_mwh,
                    "p_w": c.p_w,  # 0 once a status says it stopped or its session ended
                    "signed": c.signed,
                }
            )
        st.tel = {"boot": oc.key[0], "seq": oc.key[1], "slots": slots}
        if key >= st.tel_key:
            st.tel_key = oc.key
            st.tel_ms = recv_ms
            st.tel_recv_ms = recv_ms
        st.last_live_ms = max(st.last_live_ms, recv_ms)

    def _point(self, st: Station, recv_ms: int, w: int, mw: int | None) -> None:
        """The power history on the agent's clock: one point per bucket (its newest)."""
        b = recv_ms - recv_ms % (self.cfg.bucket_s * 1000)
        h = st.hist
        if h and h[-1][0] == b:
            h[-1][1] = w
            h[-1][2] = mw
        elif not h or h[-1][0] < b:
            h.append([b, w, mw])
        # an older point (a backlog arriving late) is not drawn: the live line moved on

    def set_points(self, points: Iterable[tuple[str, int | None]]) -> None:
        """The registered OCPP charge points (ocpp_points): one not revoked shows in the
        fleet (source OCPP) before its first frame."""
        for sid, revoked in points:
            if revoked is None and sid not in self.stations:
                st = self._st(sid)
                st.source = "ocpp"
                st.version += 1
                self.version += 1

    def _telemetry(self, st: Station, recv_ms: int, body: Mapping[str, Any]) -> None:
        key = _key(body)
        ts = _int(body.get("ts"))
        slots = body.get("slots")
        if not isinstance(slots, list):
            return
        live = not body.get("hist")
        if key > st.tel_key:
            if live and ts is not None:
                st.offset_ms = ts - recv_ms
            st.tel = dict(body)
            st.tel_key = key
            st.tel_ms = ts if ts is not None else recv_ms
            st.tel_recv_ms = recv_ms
            if isinstance(body.get("meter"), dict):
                st.had_meter = True
            err = body.get("err")
            st.err = (
                {k: v for k, v in err.items() if type(v) is int} if isinstance(err, dict) else {}
            )
        if not live:
            return  # a backlog from the outbox: in the records, not in the live line
        if st.last_live_ms and recv_ms > st.last_live_ms:
            st.period_ms = recv_ms - st.last_live_ms
        st.last_live_ms = max(st.last_live_ms, recv_ms)
        # power history on the agent's clock: one point per bucket (the newest reading in it)
        w = 0
        for s in slots:
            if isinstance(s, dict) and s.get("st") is not None:
                w += _power(s) or 0
        meter = body.get("meter")
        mw = _int(meter.get("p_w")) if isinstance(meter, dict) else None
        self._point(st, recv_ms, w, mw)

    def _event(self, st: Station, recv_ms: int, body: Mapping[str, Any]) -> None:
        ev = body.get("ev")
        key = _key(body)
        t = recv_ms
        st.events += 1
        if ev == "boot":
            if st.boot_ev is None or key > _key(st.boot_ev):
                st.boot_ev = dict(body)
        elif ev in ("session_start", "session_end"):
            slot = _int(body.get("slot"))
            if slot is None or key <= st.sess_key.get(slot, (-1, -1)):
                return
            st.sess_key[slot] = key
            if ev == "session_start":
                # since_ms: station time (absent before its clock is set)
                st.sessions[slot] = {
                    "bat": body.get("bat"),
                    "e0_mwh": body.get("e_mwh"),
                    "soc0": body.get("soc"),
                    "since_ms": _int(body.get("ts")),
                    "up0": _int(body.get("up")),
                    "boot": key[0],
                    "seq": key[1],
                }
            else:
                st.sessions.pop(slot, None)
        elif ev == "alarm":
            self._log(
                t,
                st.sid,
                "station",
                str(body.get("code")),
                str(body.get("level", "warn")),
                str(body.get("msg", "")),
                _int(body.get("slot")),
            )
        elif ev == "outbox_drop":
            self._log(
                t,
                st.sid,
                "station",
                "outbox_drop",
                "warn",
                f"{body.get('n')} messages dropped from a full outbox",
                None,
            )
        elif ev == "ota":
            if st.ota is None or key > _key(st.ota):
                st.ota = dict(body)
            phase = str(body.get("phase"))
            why = f" ({body.get('why')})" if body.get("why") else ""
            self._log(
                t,
                st.sid,
                "station",
                f"ota_{phase}",
                "warn" if phase in ("rolled_back", "refused") else "info",
                f"update {body.get('from')} -> {body.get('to')}: {phase}{why}",
                None,
            )
        elif ev == "meter_reset":
            self._log(
                t,
                st.sid,
                "station",
                "meter_reset",
                "info",
                f"meter register {body.get('from_wh')} Wh -> {body.get('to_wh')} Wh"
                f" (serial {body.get('sn')})",
                None,
            )

    def set_status(self, sid: str, recv_ms: int, obj: Mapping[str, Any]) -> None:
        st = self._st(sid)
        if recv_ms >= st.status_ms:
            st.status = dict(obj)
            st.status_ms = recv_ms
            st.version += 1
            self.version += 1

    def add_quarantine(
        self,
        recv_ms: int,
        sid: str | None,
        reason: str,
        detail: str,
        topic: str,
        qid: int = -1,
        resolved_to: str | None = None,
    ) -> None:
        """A quarantine row. One the agent has resolved (ingested once its key arrived)
        is logged, not alarmed."""
        self.quarantine_total[reason] += 1
        kind = "signature" if reason in SIG_REASONS else "quarantine"
        if resolved_to is None:
            self._rejects.append((recv_ms, sid, kind, reason, qid))
        self._log(
            recv_ms,
            sid,
            "agent",
            f"quarantine:{reason}",
            "info" if resolved_to else "crit" if kind == "signature" else "warn",
            (f"{topic}: {detail}" + (f" (resolved: {resolved_to})" if resolved_to else ""))[:300],
            None,
        )

    def first_reject_id(self) -> int | None:
        """The lowest quarantine id still counted in an alarm (None: none)."""
        ids = [r[4] for r in self._rejects if r[4] >= 0]
        return min(ids) if ids else None

    def resolve(self, resolved: Iterable[tuple[int, str]]) -> None:
        """Quarantine rows the agent has since ingested: they no longer count as rejections."""
        done = dict(resolved)
        if not done:
            return
        keep = deque(r for r in self._rejects if r[4] not in done)
        if len(keep) != len(self._rejects):
            for r in self._rejects:
                if r[4] in done:
                    self._log(
                        r[0],
                        r[1],
                        "agent",
                        f"resolved:{r[3]}",
                        "info",
                        f"quarantined message ingested after all ({done[r[4]]})",
                        None,
                    )
            self._rejects = keep
            self.version += 1

    def add_agent_alarm(
        self, ts_ms: int, sid: str | None, code: str, level: str, detail: str
    ) -> None:
        if code in STANDING_CODES:
            old = self._standing.get((sid, code))
            if old is None or ts_ms >= old[0]:
                self._standing[(sid, code)] = (ts_ms, level, detail[:300])
        else:
            self._rejects.append((ts_ms, sid, "agent_alarm", code, -1))
        self._log(ts_ms, sid, "agent", code, level, detail[:300], None)

    def set_records(
        self, days: Iterable[Record], intervals: Iterable[tuple[str, int, int, int]], now: int
    ) -> None:
        """Day records (in full: CO2e needs them) and interval records as
        (sid, slot, start_ms, mwh), of the windows `records_since` names."""
        days = list(days)
        self.version += 1
        self.days = _by_start((r.sid, r.slot, r.start_ms, r.mwh) for r in days)
        self.intervals = _by_start(intervals)
        self._carbon(days, now)

    def offset(self, sid: str | None = None) -> int:
        """Station clock minus agent clock (ms): the station's, or the fleet's median."""
        if sid is not None:
            st = self.stations.get(sid)
            return st.offset_ms or 0 if st is not None else 0
        offs = sorted(st.offset_ms for st in self.stations.values() if st.offset_ms is not None)
        return offs[len(offs) // 2] if offs else 0

    def records_since(self, now: int) -> tuple[int, int]:
        """(first day start, first interval start) worth reading from the records table."""
        offs = [st.offset_ms for st in self.stations.values() if st.offset_ms is not None]
        ref = now + (min(offs) if offs else 0)
        return (
            ref - ref % DAY_MS - (self.cfg.days - 1) * DAY_MS,
            ref - self.cfg.energy_hours * 3_600_000,
        )

    def _carbon(self, days: Iterable[Record], now: int) -> None:
        """CO2e avoided today per station (CONTRACT §7), from the grid meter's records when
        the station has them (the certified source), else from the slots' (battery side)."""
        self.co2e = {}
        self.co2e_error = None
        if self.params is None:
            return
        by_sid: dict[str, list[Record]] = {}
        for r in days:
            t = now + self.offset(r.sid)
            if r.start_ms == t - t % DAY_MS:
                by_sid.setdefault(r.sid, []).append(r)
        for sid, recs in by_sid.items():
            grid = [r for r in recs if r.slot == 0]
            use, point = (grid, "grid") if grid else (recs, "battery")
            try:
                er = sum((carbon.reduction(r, self.params).er for r in use), Fraction(0))
            except ValueError as e:
                self.co2e_error = str(e)
                continue
            self.co2e[sid] = (er, point)

    def _log(
        self,
        t: int,
        sid: str | None,
        source: str,
        code: str,
        level: str,
        msg: str,
        slot: int | None,
    ) -> None:
        self.version += 1
        self.alarm_version += 1
        self.events.appendleft(
            {
                "t": t,
                "sid": sid,
                "source": source,
                "code": code,
                "level": level,
                "msg": msg,
                "slot": slot,
            }
        )

    # ---- derived --------------------------------------------------------------------------

    def conn(self, st: Station, now: int) -> str:
        """online | offline (last will) | silent (no message for too long) | unknown."""
        if st.status is not None and st.status.get("state") == "offline":
            return "offline"
        seen = max(st.last_ms, st.status_ms if st.status is not None else 0)
        if seen == 0:
            return "unknown"
        limit = self.cfg.offline_after_s * 1000
        if st.period_ms is not None:
            limit = max(limit, 3 * st.period_ms)
        return "silent" if now - seen > limit else "online"

    def tick(self, now: int) -> bool:
        """Recompute the active alarms; log raises and clears. True when the set changed."""
        cut = now - self.cfg.recent_s * 1000
        while self._rejects and self._rejects[0][0] < cut:
            self._rejects.popleft()
        active: dict[str, dict[str, Any]] = {}

        def add(
            sid: str | None,
            code: str,
            level: str,
            msg: str,
            slot: int | None = None,
            since: int | None = None,
        ) -> None:
            aid = f"{sid or '-'}:{code}" + (f":{slot}" if slot is not None else "")
            active[aid] = {
                "id": aid,
                "sid": sid,
                "slot": slot,
                "code": code,
                "level": level,
                "msg": msg,
                "since": since,
            }

        for sid in sorted(self.stations):
            st = self.stations[sid]
            c = self.conn(st, now)
            if c == "offline":
                add(
                    sid,
                    "offline",
                    "crit",
                    "offline (the broker published its last will)",
                    since=st.status_ms,
                )
            elif c == "silent":
                seen = max(st.last_ms, st.status_ms)
                add(sid, "offline", "crit", f"no message for {(now - seen) // 1000} s", since=seen)
            tel = st.tel
            if tel is None or c != "online":
                continue
            if st.had_meter and not isinstance(tel.get("meter"), dict):
                add(sid, "meter_stale", "warn", "grid meter not answering")
            for s in tel.get("slots") or ():
                if not isinstance(s, dict):
                    continue
                n = _int(s.get("n"))
                code = s.get("st")
                bat = s.get("bat")
                if code is None:
                    add(sid, "charger_stale", "warn", f"slot {n}: charger not answering", n)
                    continue
                if code == "E":
                    add(sid, "charger_fault", "crit", f"slot {n}: charger fault", n)
                if code in BATTERY_IN and not isinstance(bat, dict) and st.source == "own":
                    add(sid, "bms_stale", "warn", f"slot {n}: battery BMS not answering", n)
                if isinstance(bat, dict):
                    t = _int(bat.get("t"))
                    if t is not None and t >= OVER_TEMP_DC:
                        add(sid, "over_temp", "crit", f"slot {n}: battery at {t / 10:.1f} °C", n)
                    flt = _int(bat.get("flt"))
                    if flt:
                        add(sid, "bms_fault", "crit", f"slot {n}: BMS fault bits {flt:#06x}", n)
        for (ssid, code), (t, level, detail) in sorted(
            self._standing.items(), key=lambda x: (x[0][0] or "", x[0][1])
        ):
            if now - t <= STANDING_MS:  # raised again daily while it lasts
                add(ssid, code, level if level in ("warn", "crit") else "warn", detail, since=t)
        rej: dict[tuple[str | None, str], Counter[str]] = {}
        for _t, rsid, kind, reason, _q in self._rejects:
            rej.setdefault((rsid, kind), Counter())[reason] += 1
        for (rsid, kind), reasons in sorted(rej.items(), key=lambda x: (x[0][0] or "", x[0][1])):
            what = ", ".join(f"{r} ×{k}" for r, k in sorted(reasons.items()))
            mins = self.cfg.recent_s // 60
            if kind == "signature":
                add(rsid, "signature", "crit", f"signature/key failures in {mins} min: {what}")
            elif kind == "quarantine":
                add(rsid, "quarantine", "warn", f"quarantined in {mins} min: {what}")
            else:
                add(rsid, "agent_alarm", "crit", f"agent alarms in {mins} min: {what}")
        pending = {}
        for aid, a in list(active.items()):
            if a["code"] in DEBOUNCED and aid not in self._active:
                first = pending[aid] = self._pending.get(aid, now)
                if now - first < self.cfg.debounce_s * 1000:
                    del active[aid]
        self._pending = pending
        changed = active.keys() != self._active.keys()
        if changed:
            self.version += 1
            self.alarm_version += 1
        for aid, a in active.items():
            if aid not in self._since:
                self._since[aid] = a.pop("since") or now
                occ = {
                    "id": aid,
                    "sid": a["sid"],
                    "slot": a["slot"],
                    "code": a["code"],
                    "level": a["level"],
                    "msg": a["msg"],
                    "since_ms": self._since[aid],
                    "raised_ms": now,
                    "cleared_ms": None,
                }
                self._occ[aid] = occ
                self.occurrences.appendleft(occ)
                self._log(
                    now,
                    a["sid"],
                    "dashboard",
                    "raised:" + a["code"],
                    a["level"],
                    a["msg"],
                    a["slot"],
                )
            a.pop("since", None)
            a["since_ms"] = self._since[aid]
        for aid in self._active.keys() - active.keys():
            a = self._active[aid]
            self._since.pop(aid, None)
            gone = self._occ.pop(aid, None)
            if gone is not None:
                gone["cleared_ms"] = now
            self._log(
                now, a["sid"], "dashboard", "cleared:" + a["code"], "info", a["msg"], a["slot"]
            )
        self._active = active
        return changed

    # ---- views (JSON-ready) --------------------------------------------------------------

    def active(self, sid: str | None = None) -> list[dict[str, Any]]:
        out = [a for a in self._active.values() if sid is None or a["sid"] == sid]
        return sorted(out, key=lambda a: (a["level"] != "crit", a["sid"] or "", a["id"]))

    def _today(self, sid: str, now: int) -> tuple[int, int]:
        t = now + self.offset(sid)
        day = t - t % DAY_MS
        v = self.days.get(sid, {}).get(day)
        return (v[0], v[1]) if v else (0, 0)

    def _summary(self, st: Station, now: int) -> dict[str, Any]:
        tel = st.tel or {}
        slots = [s for s in tel.get("slots") or () if isinstance(s, dict)]
        power = sum(_power(s) or 0 for s in slots if s.get("st") is not None)
        meter = tel.get("meter") if isinstance(tel.get("meter"), dict) else None
        bat_mwh, grid_mwh = self._today(st.sid, now)
        co2 = self.co2e.get(st.sid)
        alarms = self.active(st.sid)
        status = st.status or {}
        conn = self.conn(st, now)
        live = conn == "online" and st.tel is not None  # else the figures are the last known
        oc = st.ocpp.boot if st.ocpp is not None else {}
        return {
            "sid": st.sid,
            # "own" (the project's stations, signed telemetry) or "ocpp" (CONTRACT §11);
            # protocol ocpp1.6 / ocpp2.0.1 (None: own, or a point not connected yet)
            "source": "own" if st.source == "own" else "ocpp",
            "protocol": st.source if st.source in OCPP_MARKS else None,
            "mark": None if st.source == "own" else OCPP_MARKS.get(st.source, "OCPP"),
            "state": conn,
            "last_seen_ms": max(st.last_ms, st.status_ms) or None,
            "boot": status.get("boot", st.tel_key[0] if st.tel else None),
            "fw": status.get("fw") or (st.boot_ev or {}).get("fw") or oc.get("fw"),
            # the newest update step: staged, trial, confirmed, rolled_back or refused
            "ota": {k: st.ota.get(k) for k in ("phase", "from", "to", "why", "ts")}
            if st.ota
            else None,
            "slots": len(slots),
            "charging": sum(1 for s in slots if s.get("st") in CHARGING) if live else 0,
            "occupied": sum(1 for s in slots if s.get("st") in BATTERY_IN) if live else 0,
            "power_w": power if live else None,
            "meter_w": _int(meter.get("p_w")) if meter and live else None,
            "today_mwh": bat_mwh,
            "today_grid_mwh": grid_mwh,
            "co2e_today_kg": carbon.fmt(co2[0] * 1000, 3) if co2 else None,
            "co2e_point": co2[1] if co2 else None,
            "alarms": {
                "crit": sum(a["level"] == "crit" for a in alarms),
                "warn": sum(a["level"] == "warn" for a in alarms),
            },
        }

    def fleet(self, now: int) -> dict[str, Any]:
        rows = [self._summary(self.stations[sid], now) for sid in sorted(self.stations)]
        online = [r for r in rows if r["state"] == "online"]
        co2 = sum((self.co2e[s][0] for s in self.co2e), Fraction(0))
        return {
            "now": now,
            "stations": rows,
            "totals": {
                "stations": len(rows),
                "online": len(online),
                # firmware versions across the fleet (an update rolling out shows here)
                # (an OCPP charger's under its mark: another maker's numbering)
                "versions": dict(
                    sorted(
                        Counter(
                            (f"{r['mark']} " if r["mark"] else "") + str(r["fw"] or "?")
                            for r in rows
                        ).items()
                    )
                ),
                "power_w": sum(r["power_w"] or 0 for r in online),
                "meter_w": sum(r["meter_w"] or 0 for r in online),
                "slots": sum(r["slots"] for r in rows),
                "charging": sum(r["charging"] for r in online),
                "today_mwh": sum(r["today_mwh"] for r in rows),
                "today_grid_mwh": sum(r["today_grid_mwh"] for r in rows),
                "co2e_today_kg": carbon.fmt(co2 * 1000, 3),
            },
            "alarms": self.active(),
            "carbon": self._carbon_info(),
            "point": self._fleet_point(now),
        }

    def history(self, sid: str | None, from_ms: int, to_ms: int) -> list[dict[str, Any]]:
        """The occurrences of active alarms (copies) that were raised or still active in
        [from_ms, to_ms), newest first."""
        return [
            dict(o)
            for o in self.occurrences
            if (sid is None or o["sid"] == sid)
            and o["since_ms"] < to_ms
            and (o["cleared_ms"] is None or o["cleared_ms"] >= from_ms)
        ]

    def carbon_info(self) -> dict[str, Any] | None:
        """The parameter set behind every CO2e figure: id, version, validated (False:
        the figures come with "example parameters, not validated")."""
        return self._carbon_info()

    def _carbon_info(self) -> dict[str, Any] | None:
        p = self.params
        if p is None:
            return None
        return {
            "id": p.id,
            "version": p.version,
            "validated": p.validated,
            "notice": p.notice,
            "error": self.co2e_error,
            "placeholders": sorted(
                k for k, vs in p.params.items() if any(v.placeholder for v in vs)
            ),
        }

    def station(self, sid: str, now: int) -> dict[str, Any] | None:
        st = self.stations.get(sid)
        if st is None:
            return None
        tel = st.tel or {}
        slots = []
        for s in tel.get("slots") or ():
            if not isinstance(s, dict):
                continue
            n = _int(s.get("n")) or 0
            code = s.get("st")
            bat = s.get("bat") if isinstance(s.get("bat"), dict) else None
            sess = st.sessions.get(n)
            e = _int(s.get("e_mwh"))
            if sess is not None:
                e0 = _int(sess.get("e0_mwh"))
                sess = {**sess, "mwh": e - e0 if e is not None and e0 is not None else None}
            slot = {
                "n": n,
                "st": code,
                "state": s.get("name") or (STATE_NAMES.get(code, "unknown") if code else "stale"),
                "mv": _int(s.get("mv")),
                "ma": _int(s.get("ma")),
                "power_w": _power(s) if code is not None else None,
                "e_mwh": e,
                "bat": bat,
                "session": sess,
            }
            if st.source != "own":  # the connector's own words, and whether it signs
                slot.update(
                    ocpp_status=s.get("ocpp_status"), error=s.get("error"), signed=s.get("signed")
                )
            slots.append(slot)
        meter = tel.get("meter") if isinstance(tel.get("meter"), dict) else None
        return {
            "now": now,
            **self._summary(st, now),
            "status": st.status,
            "telemetry": {
                "boot": st.tel_key[0],
                "seq": st.tel_key[1],
                "t_ms": st.tel_ms,
                "recv_ms": st.tel_recv_ms,
                "period_ms": st.period_ms,
                "hist": bool(tel.get("hist")),
            }
            if st.tel
            else None,
            "clock_ms": now + st.offset_ms if st.offset_ms is not None else None,
            "boot_event": {k: st.boot_ev.get(k) for k in ("boot", "fw", "reset", "ts")}
            if st.boot_ev
            else None,
            "meter": meter,
            "ocpp": {
                **(st.ocpp.boot if st.ocpp else {}),
                "status": st.ocpp.cp_status if st.ocpp else None,
                "heartbeat_ms": (st.ocpp.hb_period_ms if st.ocpp else None),
            }
            if st.source != "own"
            else None,
            "err": st.err,
            "slot_list": slots,
            "alarm_list": self.active(sid),
            "events": [e for e in self.events if e["sid"] == sid][:30],
            "point": list(st.hist[-1]) if st.hist else None,
            "carbon": self._carbon_info(),
        }

    def alarms(self, now: int) -> dict[str, Any]:
        return {
            "now": now,
            "active": self.active(),
            "events": list(self.events)[:200],
            "quarantine_total": dict(sorted(self.quarantine_total.items())),
        }

    # ---- series ---------------------------------------------------------------------------

    def power(self, sid: str | None, now: int, minutes: int) -> list[list[Any]]:
        """[[t_ms, slots W, meter W or None], …] over the last `minutes`, one per bucket.
        For the fleet, each station's last reading is carried into the buckets that follow
        it for up to 3 periods (stations report at their own pace)."""
        start = now - minutes * 60_000
        if sid is not None:
            st = self.stations.get(sid)
            return [list(p) for p in st.hist if p[0] >= start] if st else []
        bms = self.cfg.bucket_s * 1000
        first = start - start % bms
        nb = (now - first) // bms + 1
        slots_w = [0] * nb
        meter_w = [0] * nb
        seen = [False] * nb
        has_meter = [False] * nb
        for st in self.stations.values():
            # ms as an int: offline_after_s is a float (60.0) and the buckets index lists
            carry = max(int(self.cfg.offline_after_s * 1000), 3 * (st.period_ms or 0))
            pts = list(st.hist)
            for i, p in enumerate(pts):
                t_end = pts[i + 1][0] if i + 1 < len(pts) else now + 1
                t_end = min(t_end, p[0] + carry + 1)
                if t_end <= first:
                    continue
                k0 = max(0, (p[0] - first) // bms)
                k1 = min(nb, (t_end - 1 - first) // bms + 1)
                for k in range(k0, k1):
                    slots_w[k] += p[1]
                    seen[k] = True
                    if p[2] is not None:
                        meter_w[k] += p[2]
                        has_meter[k] = True
        return [
            [first + k * bms, slots_w[k], meter_w[k] if has_meter[k] else None]
            for k in range(nb)
            if seen[k]
        ]

    def _fleet_point(self, now: int) -> list[Any] | None:
        if not self.stations:
            return None
        w = 0
        mw: int | None = None
        any_ = False
        for st in self.stations.values():
            if self.conn(st, now) != "online" or not st.hist:
                continue
            any_ = True
            w += st.hist[-1][1]
            if st.hist[-1][2] is not None:
                mw = (mw or 0) + st.hist[-1][2]
        if not any_:
            return None
        bms = self.cfg.bucket_s * 1000
        return [now - now % bms, w, mw]

    def energy(self, sid: str | None, now: int, hours: int) -> list[list[int]]:
        """[[interval start ms, battery-side mWh, grid mWh], …] over the last `hours` of
        station time."""
        return _series(self.intervals, sid, now + self.offset(sid) - hours * 3_600_000)

    def daily(self, sid: str | None, now: int, days: int) -> list[list[int]]:
        """[[UTC day start ms, battery-side mWh, grid mWh], …] for the last `days` days of
        station time."""
        t = now + self.offset(sid)
        return _series(self.days, sid, t - t % DAY_MS - (days - 1) * DAY_MS)


def _str(x: Any) -> str | None:
    return x[:64] if isinstance(x, str) else None


def _nat(x: Any) -> int:
    """An OCPP connector or EVSE number: 1..16 (CONTRACT §9's slots); 0 for anything else."""
    return x if type(x) is int and 0 < x <= 16 else 0


def _ocpp_power(p: Mapping[str, Any], v16: bool) -> int | None:
    """The newest Power.Active.Import (total, not a phase) of a frame's meter values, W."""
    mvs = p.get("meterValue") or p.get("transactionData")
    best: tuple[str, int] | None = None
    for mv in mvs if isinstance(mvs, list) else ():
        if not isinstance(mv, dict):
            continue
        for sv in mv.get("sampledValue") or ():
            if not isinstance(sv, dict) or sv.get("measurand") != POWER or sv.get("phase"):
                continue
            um = sv.get("unitOfMeasure") if not v16 else None
            unit = um.get("unit", "W") if isinstance(um, dict) else sv.get("unit", "W")
            mult = um.get("multiplier", 0) if isinstance(um, dict) else 0
            try:
                w = float(str(sv.get("value"))[:40])
            except ValueError:
                continue
            scale = {"W": 1.0, "kW": 1000.0}.get(unit)
            if scale is None or type(mult) is not int or not -3 <= mult <= 6:
                continue
            if not math.isfinite(w) or not 0 <= w * scale * 10**mult < 1e9:
                continue
            t = str(mv.get("timestamp", ""))
            if best is None or t >= best[0]:
                best = (t, round(w * scale * 10**mult))
    return best[1] if best is not None else None


def _power(s: Mapping[str, Any]) -> int | None:
    if "p_w" in s:  # an OCPP connector's (measured, else from its registers)
        return _int(s["p_w"])
    mv, ma = _int(s.get("mv")), _int(s.get("ma"))
    if mv is None or ma is None:
        return None
    return mv * ma // 1_000_000


def _by_start(rows: Iterable[tuple[str, int, int, int]]) -> dict[str, dict[int, list[int]]]:
    out: dict[str, dict[int, list[int]]] = {}
    for sid, slot, start, mwh in rows:
        v = out.setdefault(sid, {}).setdefault(start, [0, 0])
        v[1 if slot == 0 else 0] += mwh
    return out


def _series(data: dict[str, dict[int, list[int]]], sid: str | None, start: int) -> list[list[int]]:
    acc: dict[int, list[int]] = {}
    for s, by in data.items():
        if sid is not None and s != sid:
            continue
        for t, (b, g) in by.items():
            if t >= start:
                v = acc.setdefault(t, [0, 0])
                v[0] += b
                v[1] += g
    return [[t, *acc[t]] for t in sorted(acc)]
