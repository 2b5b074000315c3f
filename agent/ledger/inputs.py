"""What metering takes: verified raw messages (`RawMsg`) and its parameters (`MeterParams`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from agent import ranges
from agent.ledger import reads
from agent.ledger.records import DAY_MS

_NONE: frozenset[int] = frozenset()


class RawMsg(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One verified raw message, decoded from its signed bytes. A Struct: one is made for
    every message metered, and a frozen dataclass's __init__ took ~0.95 µs of it against
    ~0.06 (gc=False: it holds a body and a frozenset, never itself)."""

    sid: str
    boot: int
    seq: int
    recv_ms: int  # agent receive time (Unix ms)
    # telemetry, or an event when "ev" in body (an OCPP frame when "ocpp" in it); of a
    # telemetry nothing of which was spoiled, ingest hands metering only what it reads,
    # packed (agent/ledger/reads.py)
    body: Mapping[str, Any] | bytes
    # §6.9: the streams whose source was spoiled (taken out of the body): 0 the meter,
    # n slot n; their records carry `invalid`
    spoiled: frozenset[int] = _NONE


@dataclass(frozen=True, kw_only=True)
class MeterParams:
    interval_ms: int = 900_000
    max_power_w_slot: int = 3000
    max_power_w_meter: int = 50_000
    # §11: an OCPP charger's connector (rule 6; a 50 kW DC charger)
    max_power_w_ocpp: int = 50_000
    # Rule 8: interval records ending at or before this are locked.
    locked_until_ms: int | None = None
    # The moment the lock was taken: messages received (recv_ms) after it are "late" for the
    # locked period and only show as adjustment records. None = locked_until_ms.
    locked_at_ms: int | None = None
    # §6.3: the persisted-but-not-sent part r(b') − mark(b) passes rule 6 against
    # max power × this window
    cross_boot_window_ms: int = 900_000
    # rule 5: a segment over more intervals than this goes whole to its home interval
    # (bounds the cost of one reading: docs/metering.md)
    spread_max_intervals: int = 2976

    def __post_init__(self) -> None:
        if self.interval_ms <= 0 or DAY_MS % self.interval_ms:
            raise ValueError(f"interval_ms must divide a day, got {self.interval_ms}")
        if min(self.max_power_w_slot, self.max_power_w_meter, self.max_power_w_ocpp) <= 0:
            raise ValueError("max power must be positive")
        if self.cross_boot_window_ms < 0 or self.spread_max_intervals < 1:
            raise ValueError("cross_boot_window_ms must be >= 0, spread_max_intervals >= 1")


DEFAULT_PARAMS = MeterParams()  # frozen: safe as an argument default


def raw_msg(
    sid: str,
    boot: int,
    seq: int,
    recv_ms: int,
    body: Mapping[str, Any] | bytes,
    cleaned: ranges.Cleaned | None = None,
) -> RawMsg:
    """The one way a stored or arriving message becomes metering input (ingest, restart
    and verify alike): §6.9 through `agent.ranges.clean` (pass its result when the caller
    has it already; ingest's reads of a clean telemetry, packed, come with theirs),
    spoiled sources taken out and named by stream."""
    if cleaned is not None:
        if not cleaned.spoiled:  # nearly every message: in one step
            return RawMsg(sid=sid, boot=boot, seq=seq, recv_ms=recv_ms, body=cleaned.body)
        c = cleaned
    elif isinstance(body, Mapping):
        c = ranges.clean(body)
    else:
        raise TypeError("a telemetry's reads come with their §6.9 result (cleaned=)")
    spoiled: set[int] = set()
    for source, _path in c.spoiled:
        if source == "meter":
            spoiled.add(0)
        elif source.startswith("slot:"):
            try:
                spoiled.add(int(source[5:]))
            except ValueError:
                pass
    return RawMsg(
        sid=sid,
        boot=boot,
        seq=seq,
        recv_ms=recv_ms,
        body=c.body,
        spoiled=frozenset(spoiled) if spoiled else _NONE,
    )


# ---- what metering reads of a telemetry -----------------------------------------------------
#
# Of a telemetry body the engine reads only these keys (engine._apply, state.Boot.merge); the
# rest (slot states, volts and amps, batteries, error counters, a newer firmware's keys) is
# checked (§6.9) and stored in raw, never metered. Ingest hands metering these keys packed
# (agent/ledger/reads.py), not the decoded body: packed from wire.admit_telemetry's own
# decode (its SignedTelemetry has the same names), or, for a clean telemetry that only
# `verify` could tell, from TelemetryRead below, decoded by msgspec straight from the
# payload (the other keys skipped, not built). A message waiting for its commit then holds
# no decoded tree, which the database thread read and freed cold, and the loop decodes it
# once (bench/bench_ingest.py; docs/agent.md). Restart, verify and reports meter whole
# bodies: tests/test_metering_read.py holds them to the same records.


class SlotRead(msgspec.Struct, gc=False):
    n: int
    e_mwh: int
    b_mwh: Any = msgspec.UNSET


class MeterRead(msgspec.Struct, gc=False):
    e_wh: int
    sn: Any = msgspec.UNSET


class TelemetryRead(msgspec.Struct, gc=False):
    up: int
    ts: Any = msgspec.UNSET
    hist: Any = msgspec.UNSET
    meter: MeterRead | msgspec.UnsetType = msgspec.UNSET
    slots: list[SlotRead] | None | msgspec.UnsetType = msgspec.UNSET
    # either takes a body down another path of the engine: such a body is metered whole
    ev: Any = msgspec.UNSET
    ocpp: Any = msgspec.UNSET


_read_telemetry = msgspec.json.Decoder(TelemetryRead)


def read_telemetry(payload: bytes) -> TelemetryRead | None:
    """The keys metering reads (above) of a verified telemetry of which §6.9 spoiled nothing
    (`payload` the bytes received: its only unsigned part is the signature verify framed,
    a key skipped here); None when it holds a key that takes metering down another path,
    or does not decode to these types: meter the whole body."""
    try:
        t = _read_telemetry.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    if t.ev is not msgspec.UNSET or t.ocpp is not msgspec.UNSET:
        return None
    return t


def metering_input(kind: str, payload: bytes, cleaned: ranges.Cleaned) -> ranges.Cleaned:
    """What ingest hands metering of a message `verify` took (`cleaned` its §6.9 result):
    for a telemetry nothing of which was spoiled, the keys metering reads, packed; anything
    else as it is."""
    if kind != "telemetry" or cleaned.spoiled:
        return cleaned
    t = read_telemetry(payload)
    return cleaned if t is None else ranges.Cleaned(reads.pack(t), ())
