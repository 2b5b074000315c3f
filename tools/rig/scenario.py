"""Scenario files for `python -m tools.rig --script`: insertions, removals and charger
faults at given times (seconds after the rig starts).

    {"duration_s": 60,
     "events": [
       {"t": 0.5, "insert": 1, "pack": "72V", "power_w": 1000, "capacity_wh": 10, "soc": 0.3},
       {"t": 5, "fault": 2, "code": 17},
       {"t": 8, "clear": 2},
       {"t": 20, "remove": 1}]}

`insert` takes the optional keys of Rig.insert (pack, power_w, capacity_wh, soc, serial,
charge, start_delay_s, ramp_s). `duration_s` is optional (run until a signal).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Any

from .rig import Rig

_INSERT_KEYS: dict[str, type | tuple[type, ...]] = {
    "pack": str,
    "power_w": (int, float),
    "capacity_wh": (int, float),
    "soc": (int, float),
    "serial": str,
    "charge": bool,
    "start_delay_s": (int, float),
    "ramp_s": (int, float),
}


class ScenarioError(ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class Event:
    t: float
    action: str  # insert, remove, fault, clear
    slot: int
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Scenario:
    events: tuple[Event, ...]
    duration_s: float | None = None

    def apply(self, rig: Rig, ev: Event) -> None:
        if ev.action == "insert":
            rig.insert(ev.slot, **ev.args)
        elif ev.action == "remove":
            rig.remove(ev.slot)
        elif ev.action == "fault":
            rig.set_fault(ev.slot, int(ev.args["code"]))
        else:
            rig.clear_fault(ev.slot)


def _num(d: dict[str, Any], key: str, where: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ScenarioError(f"{where}: {key!r} must be a number >= 0")
    return float(v)


def parse(obj: object, slots: int) -> Scenario:
    if not isinstance(obj, dict):
        raise ScenarioError("scenario must be a JSON object")
    unknown = set(obj) - {"events", "duration_s"}
    if unknown:
        raise ScenarioError(f"unknown scenario key {min(unknown)!r}")
    duration = _num(obj, "duration_s", "scenario") if "duration_s" in obj else None
    raw = obj.get("events", [])
    if not isinstance(raw, list):
        raise ScenarioError("'events' must be a list")
    events = []
    for n, e in enumerate(raw):
        where = f"event {n}"
        if not isinstance(e, dict):
            raise ScenarioError(f"{where}: not an object")
        t = _num(e, "t", where)
        actions = [a for a in ("insert", "remove", "fault", "clear") if a in e]
        if len(actions) != 1:
            raise ScenarioError(f"{where}: needs exactly one of insert, remove, fault, clear")
        action = actions[0]
        slot = e[action]
        if isinstance(slot, bool) or not isinstance(slot, int) or not 1 <= slot <= slots:
            raise ScenarioError(f"{where}: slot must be an integer 1..{slots}")
        args: dict[str, Any] = {}
        allowed = {"t", action} | (set(_INSERT_KEYS) if action == "insert" else set())
        if action == "fault":
            allowed.add("code")
            code = e.get("code")
            if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 0xFFFF:
                raise ScenarioError(f"{where}: 'code' must be an integer 1..65535")
            args["code"] = code
        extra = set(e) - allowed
        if extra:
            raise ScenarioError(f"{where}: unknown key {min(extra)!r}")
        if action == "insert":
            for k, typ in _INSERT_KEYS.items():
                if k in e:
                    v = e[k]
                    if not isinstance(v, typ) or (typ is not bool and isinstance(v, bool)):
                        raise ScenarioError(f"{where}: {k!r} has the wrong type")
                    args[k] = v
        events.append(Event(t=t, action=action, slot=slot, args=args))
    events.sort(key=lambda ev: ev.t)
    return Scenario(events=tuple(events), duration_s=duration)


def load(path: str | pathlib.Path, slots: int) -> Scenario:
    try:
        obj = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from exc
    return parse(obj, slots)
