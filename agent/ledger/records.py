"""What metering produces (CONTRACT §6): the `Record`, its flags, its sort order and its id.

Three kinds of record, all with the same fields:
- `interval`: one register stream's credit in one UTC-aligned interval (rule 5), or a rule-8
  adjustment record (flag `adjustment`) in the first open interval after a lock;
- `day`: the roll-up of a stream's interval records over one UTC day;
- `session`: one charging session, from its `session_end` event.

A record's id (`record_id`) is what the store upserts by; it is made in one place,
`make_record_id`, which the incremental meter's change tracking uses too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PROCESSING_VERSION = "m2"

DAY_MS = 86_400_000

# Flags as bits inside the engine (cheap to OR in the per-reading path), names on the records.
F_BASELINE = 1
F_ANOMALY_DOWN = 2
F_REBOOT = 4
F_NO_RESTORE = 8
F_METER_RESET = 16
F_HELD = 32
F_TIME_EST = 64
F_GAP = 128
F_HIST = 256
F_ADJUSTMENT = 512  # not in §6's list: marks rule-8 adjustment records (see docs)
F_INVALID = 1024  # §6.9: a spoiled source was omitted
F_OCPP = 2048  # §11: from an OCPP charger's frames
F_UNSIGNED = 4096  # §11: an OCPP reading not signed (OCMF) by the charger's meter

FLAG_BITS: tuple[tuple[int, str], ...] = (
    (F_BASELINE, "baseline"),
    (F_ANOMALY_DOWN, "anomaly_down"),
    (F_REBOOT, "reboot"),
    (F_NO_RESTORE, "no_restore"),
    (F_METER_RESET, "meter_reset"),
    (F_HELD, "held"),
    (F_TIME_EST, "time_est"),
    (F_GAP, "gap"),
    (F_HIST, "hist"),
    (F_ADJUSTMENT, "adjustment"),
    (F_INVALID, "invalid"),
    (F_OCPP, "ocpp"),
    (F_UNSIGNED, "unsigned"),
)
FLAG_NAMES: tuple[str, ...] = tuple(sorted(name for _, name in FLAG_BITS))
_BIT_OF = {name: bit for bit, name in FLAG_BITS}
_flag_cache: dict[int, tuple[str, ...]] = {}


def flag_names(bits: int) -> tuple[str, ...]:
    """The sorted flag names of a bit set."""
    t = _flag_cache.get(bits)
    if t is None:
        t = tuple(sorted(name for bit, name in FLAG_BITS if bits & bit))
        _flag_cache[bits] = t
    return t


def flag_bits(names: Iterable[str]) -> int:
    """The bit set of flag names (KeyError for a name that is not a flag)."""
    bits = 0
    for n in names:
        bits |= _BIT_OF[n]
    return bits


@dataclass(frozen=True, kw_only=True)
class Record:
    kind: str  # "interval" | "session" | "day"
    sid: str
    slot: int  # 0 = grid meter (its Wh x 1000 as mWh)
    start_ms: int
    end_ms: int
    mwh: int
    held_mwh: int
    flags: tuple[str, ...]  # sorted
    from_key: tuple[int, int]  # (boot, seq); seq -1 = value restored at that boot's start
    to_key: tuple[int, int]
    e_from: int  # register values at both ends (mWh)
    e_to: int
    version: str
    extra: Mapping[str, Any] = field(default_factory=dict)


_new = object.__new__


def make_record(
    kind: str,
    sid: str,
    slot: int,
    start_ms: int,
    end_ms: int,
    mwh: int,
    held_mwh: int,
    flags: tuple[str, ...],
    from_key: tuple[int, int],
    to_key: tuple[int, int],
    e_from: int,
    e_to: int,
) -> Record:
    """Record(...) of this processing version with no extra, without the frozen dataclass
    __init__ (field by field object.__setattr__): 2.5x cheaper, and materializing records
    is most of the per-message cost. The result is an ordinary, equal Record."""
    r: Record = _new(Record)
    r.__dict__.update(
        kind=kind,
        sid=sid,
        slot=slot,
        start_ms=start_ms,
        end_ms=end_ms,
        mwh=mwh,
        held_mwh=held_mwh,
        flags=flags,
        from_key=from_key,
        to_key=to_key,
        e_from=e_from,
        e_to=e_to,
        version=PROCESSING_VERSION,
        extra={},
    )
    return r


def record_sort_key(r: Record) -> tuple[Any, ...]:
    return (r.kind, r.sid, r.slot, r.start_ms, r.end_ms, r.from_key, r.to_key, r.flags)


def make_record_id(
    kind: str,
    sid: str,
    slot: int,
    *,
    start_ms: int = 0,
    end_key: tuple[int, int] = (0, 0),
    adjustment: bool = False,
) -> str:
    """The one place a record id is made: a stable identity for upserts, one id per record
    whatever its contents. A session is named by its `session_end` event's key (`end_key`);
    an interval or a day by its start, with `/adj` for a rule-8 adjustment record."""
    if kind == "session":
        return f"session/{sid}/{slot}/{end_key[0]}:{end_key[1]}"
    if adjustment and kind == "interval":  # a day rolling up an adjustment is still the day
        return f"interval/{sid}/{slot}/{start_ms}/adj"
    return f"{kind}/{sid}/{slot}/{start_ms}"


def record_id(r: Record) -> str:
    """The id of a record (see make_record_id)."""
    return make_record_id(
        r.kind,
        r.sid,
        r.slot,
        start_ms=r.start_ms,
        end_key=r.to_key,
        adjustment="adjustment" in r.flags,
    )


def day_record(sid: str, slot: int, day: int, intervals: Iterable[Record]) -> Record | None:
    """The day record of a stream: its interval records of one UTC day (adjustments
    included) rolled up: sums, flags united, from the first (by start, an adjustment after
    the ordinary record of its start) to the last."""
    rs = sorted(intervals, key=lambda r: (r.start_ms, "adjustment" in r.flags))
    if not rs:
        return None
    flags: set[str] = set()
    for r in rs:
        flags.update(r.flags)
    return make_record(
        "day",
        sid,
        slot,
        day * DAY_MS,
        day * DAY_MS + DAY_MS,
        sum(r.mwh for r in rs),
        sum(r.held_mwh for r in rs),
        tuple(sorted(flags)),
        rs[0].from_key,
        rs[-1].to_key,
        rs[0].e_from,
        rs[-1].e_to,
    )
