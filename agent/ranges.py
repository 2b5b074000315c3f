"""CONTRACT §2 ranges and §6.9: a bad field spoils only its source.

A verified message (good signature, good envelope) is always stored. `clean(body)` then
checks every other field against its type and range and returns the body metering may use:
a source with a bad field is taken out as if the station had omitted it — the `meter`
object, one slot's reading (with its battery), one `bat`, the `err` counters, or a whole
event — and the list of what was spoiled names each bad field. Pure and deterministic:
the same signed bytes give the same result at ingest, at a restart and in `verify`.

Spoiled sources are named `meter`, `slot:N`, `bat:N`, `err`, `slots` (the list itself),
`event` and `hist` (the flag); each comes with the dotted path of its first bad field, e.g.
("slot:3", "slots[n=3].e_mwh").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

U31: Final = (1 << 31) - 1
U32: Final = (1 << 32) - 1
U53: Final = (1 << 53) - 1
WH_MAX: Final = 10**11  # meter registers: a 100 GWh meter
UP_MAX: Final = 320_000_000_000  # ten years of ms
TS_MIN: Final = 1_577_836_800_000  # 2020-01-01T00:00:00Z
TS_AHEAD_MS: Final = 86_400_000  # a ts more than a day ahead of the receiver is not believed
MV_MAX: Final = 1_000_000  # mV
MA_MAX: Final = 1_000_000  # ± mA
PW_MAX: Final = 10**7  # ± W
T_MIN: Final = -1000  # 0.1 °C
T_MAX: Final = 2000
STATION_TIME_MAX: Final = 1 << 62  # t0/t1 of a session (ms)
MAX_DEPTH: Final = 4  # §5.1: nesting at most 4 deep (the top object is depth 1)

STATES: Final = frozenset("IWCVFEX")
RESETS: Final = frozenset(("power", "wdt", "soft", "hard", "deep", "unknown"))
WHYS: Final = frozenset(("full", "removed", "fault", "stopped", "reboot"))
LEVELS: Final = frozenset(("warn", "crit"))
ENVELOPE: Final = ("v", "sid", "kid", "boot", "seq", "up", "ts", "hist")

Check = Callable[[Any], bool]


def rng(lo: int, hi: int) -> Check:
    """An integer (not a bool, not a float) within [lo, hi]."""
    return lambda x: type(x) is int and lo <= x <= hi


def one_of(values: frozenset[str]) -> Check:
    return lambda x: type(x) is str and x in values


def text(x: Any) -> bool:
    return type(x) is str and len(x) <= 256


def opt(check: Check) -> Check:
    """Absent or null, or passes `check` (fields the station may omit)."""
    return lambda x: x is None or check(x)


NONNEG: Final = rng(0, U31)
SLOT: Final = rng(1, 16)
PERMILLE: Final = rng(0, 1000)
MWH: Final = rng(0, U53)
WH: Final = rng(0, WH_MAX)
UP: Final = rng(0, UP_MAX)

# field -> check; a key the contract does not name is kept and not checked (diagnostics of
# a newer firmware), a named key is checked for type and range
METER: Final[Mapping[str, Check]] = {
    "e_wh": WH,
    "p_w": opt(rng(-PW_MAX, PW_MAX)),
    "sn": opt(rng(0, U32)),
}
SLOT_READING: Final[Mapping[str, Check]] = {
    "n": SLOT,
    "e_mwh": MWH,
    "b_mwh": opt(MWH),
    "st": opt(one_of(STATES)),
    "mv": opt(rng(0, MV_MAX)),
    "ma": opt(rng(-MA_MAX, MA_MAX)),
}
BAT: Final[Mapping[str, Check]] = {
    "id": text,
    "soc": PERMILLE,
    "soh": PERMILLE,
    "mv": rng(0, MV_MAX),
    "ma": rng(-MA_MAX, MA_MAX),
    "t": rng(T_MIN, T_MAX),
    "tmin": rng(T_MIN, T_MAX),
    "cyc": rng(0, U32),
    "flt": rng(0, U32),
    "life_wh": WH,
}
EVENTS: Final[Mapping[str, Mapping[str, Check]]] = {
    "boot": {"fw": text, "reset": one_of(RESETS)},  # `restored` checked on its own
    "session_start": {"slot": SLOT, "bat": opt(text), "e_mwh": MWH, "soc": opt(PERMILLE)},
    "session_end": {
        "slot": SLOT,
        "bat": opt(text),
        "e0_mwh": MWH,
        "e1_mwh": MWH,
        "soc0": opt(PERMILLE),
        "soc1": opt(PERMILLE),
        "up0": UP,
        "up1": UP,
        "boot0": opt(NONNEG),
        "t0": opt(rng(0, STATION_TIME_MAX)),
        "t1": opt(rng(0, STATION_TIME_MAX)),
        "why": one_of(WHYS),
    },
    "alarm": {
        "code": lambda x: text(x) or NONNEG(x),
        "level": one_of(LEVELS),
        "msg": text,
        "slot": opt(SLOT),
    },
    "meter_reset": {"from_wh": WH, "to_wh": WH, "sn": opt(rng(0, U32))},
    "outbox_drop": {"n": NONNEG},
    "ota": {"phase": text, "from": opt(text), "to": opt(text), "why": opt(text)},
}


def ts_believed(ts: Any, now_ms: int) -> bool:
    """A station's `ts` (Unix ms): an integer from 2020 to a day past the receiver's clock."""
    return type(ts) is int and TS_MIN <= ts <= now_ms + TS_AHEAD_MS


class Cleaned(NamedTuple):
    # what metering reads: spoiled sources taken out (of a clean telemetry, ingest gives
    # only the keys metering reads, packed: agent/ledger/reads.py)
    body: dict[str, Any] | bytes
    spoiled: tuple[tuple[str, str], ...]  # (source, path of its first bad field)


def depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of decoded JSON (an object or array counts one level), counting at
    most to `limit` + 1: iterative, so any input is safe (no recursion)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            items: Any = x.values()
        elif isinstance(x, list):
            items = x
        else:
            continue
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        stack.extend((y, d + 1) for y in items)
    return deepest


def bad_field(obj: Any, fields: Mapping[str, Check]) -> str | None:
    """The first field of `obj` (a dict) that is missing or fails its check, else None."""
    if not isinstance(obj, dict):
        return ""
    for k, check in fields.items():
        if k not in obj:
            if check(None):  # absent is fine where null is
                continue
            return k
        if not check(obj[k]):
            return k
    return None


def clean(body: Mapping[str, Any]) -> Cleaned:
    """The body metering may use and what was spoiled (see the module doc). The envelope is
    not checked here: `agent.wire.verify` quarantines a message whose envelope is bad.
    `hist`, a flag outside the envelope list of §6.9, is taken out when it is not 1
    (spoiled as `hist`): metering then reads the message as live, not from the outbox."""
    hist = body.get("hist")
    if hist is not None and not (type(hist) is int and hist == 1):
        c = clean({k: v for k, v in body.items() if k != "hist"})
        return Cleaned(c.body, (("hist", "hist"), *c.spoiled))
    if "ev" in body:
        return _clean_event(body)
    out = dict(body)
    spoiled: list[tuple[str, str]] = []
    if "meter" in out:
        f = bad_field(out["meter"], METER)
        if f is not None:
            del out["meter"]
            spoiled.append(("meter", _path("meter", f)))
    if "err" in out:
        err = out["err"]
        bad = (
            ""
            if not isinstance(err, dict)
            else next((k for k, v in err.items() if not NONNEG(v)), None)
        )
        if bad is not None:
            del out["err"]
            spoiled.append(("err", _path("err", bad)))
    slots = out.get("slots")
    if slots is not None:
        if not isinstance(slots, list):
            del out["slots"]
            spoiled.append(("slots", "slots"))
        else:
            kept: list[Any] = []
            changed = False
            for i, sl in enumerate(slots):
                n = sl.get("n") if isinstance(sl, dict) else None
                where = f"slots[n={n}]" if SLOT(n) else f"slots[{i}]"
                f = bad_field(sl, SLOT_READING)
                if f is not None:
                    spoiled.append((f"slot:{n}" if SLOT(n) else "slots", _path(where, f)))
                    changed = True
                    continue
                if "bat" in sl and sl["bat"] is not None:
                    fb = bad_field(sl["bat"], BAT)
                    if fb is not None:
                        sl = {k: v for k, v in sl.items() if k != "bat"}
                        spoiled.append((f"bat:{n}", _path(where + ".bat", fb)))
                        changed = True
                kept.append(sl)
            if changed:
                out["slots"] = kept
    return Cleaned(out, tuple(spoiled))


def _clean_event(body: Mapping[str, Any]) -> Cleaned:
    ev = body.get("ev")
    fields = EVENTS.get(ev) if type(ev) is str else None
    if fields is None:
        return Cleaned(_envelope(body, "invalid"), (("event", f"ev={str(ev)[:40]}"),))
    f = bad_field(body, fields)
    if f is not None:
        return Cleaned(_envelope(body, "invalid"), (("event", f),))
    if ev == "boot":
        rest = body.get("restored")
        ok = isinstance(rest, dict) and all(
            # isascii: "²" is a digit to str.isdigit and not to int()
            type(k) is str and k.isascii() and k.isdigit() and SLOT(int(k)) and MWH(v)
            for k, v in rest.items()
        )
        if not ok:
            out = dict(body)
            out.pop("restored", None)
            return Cleaned(out, (("event", "restored"),))
    return Cleaned(dict(body), ())


def _envelope(body: Mapping[str, Any], ev: str) -> dict[str, Any]:
    """An event metering must not read: its place in the sequence stays (no false gap)."""
    out = {k: body[k] for k in ENVELOPE if k in body}
    out["ev"] = ev
    return out


def _path(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if field else prefix
