"""The incremental engine's state, per station: its boots (the messages, in seq order, and
the boot-level facts the rules need), its register streams (the rule state) and the parts
(runs of processed messages with the stream states before them, to re-run from).

Vocabulary:
- stream: one register of one station: slot 0 is the grid meter (`meter.e_wh` x 1000, in
  mWh), slots 1..16 the battery-side `slots[].e_mwh`.
- point: (key, register value) where key = (boot, seq); (boot, -1) is the value restored
  at the start of that boot (`b_mwh` / the boot event's `restored`), before any message.
- segment: one credit (or held amount, or nothing) between two points of a stream, with
  the time span it is spread over and the flags that shaped it. A segment's shares go to
  UTC-aligned intervals as `Contribution`s; an interval record is their sum.

All of it grows with the messages (a station's every message is kept, in its boot);
`IncrementalMeter.evict` drops a whole station.
"""

from __future__ import annotations

from typing import Any

from agent.ledger import rules
from agent.ledger.inputs import RawMsg

Key = tuple[int, int]  # (boot, seq); seq -1: the value restored at the boot's start
StreamSnap = tuple[Any, ...]  # Stream.snap(): the rule state, to go back to
SessionSig = tuple[Any, Any, Any]  # (slot, bat, register at the start) of a session


class Contribution:
    """One stream's contributions to one interval from one part's processing: the sum of
    its segments' shares there, their flags, and the first from-point and last to-point."""

    __slots__ = ("flags", "from_key", "from_value", "held", "mwh", "part", "to_key", "to_value")

    def __init__(
        self,
        part: int,
        mwh: int,
        held: int,
        flags: int,
        from_key: Key,
        from_value: int,
        to_key: Key,
        to_value: int,
    ) -> None:
        self.part = part
        self.mwh = mwh
        self.held = held
        self.flags = flags
        self.from_key = from_key
        self.from_value = from_value
        self.to_key = to_key
        self.to_value = to_value


class Stream:
    """Rule state of one register stream, plus its interval contributions."""

    __slots__ = (
        "boot",
        "by_interval",
        "dirty",
        "held_up",
        "held_value",
        "last_key",
        "last_pos",
        "last_t",
        "last_value",
        "locked_held",
        "locked_mwh",
        "mark",
        "mark_up",
        "serial",
        "slot",
    )

    def __init__(self, slot: int) -> None:
        self.slot = slot
        # interval index -> contributions, in part order
        self.by_interval: dict[int, list[Contribution]] = {}
        self.dirty: set[int] = set()  # intervals changed since the last materialization
        self.locked_mwh = 0  # credited / held in locked intervals (rule 8 adjustments)
        self.locked_held = 0
        self.reset()

    def reset(self) -> None:
        self.boot: int | None = None  # boot of the last point (None: no baseline yet)
        self.mark = 0  # highest value credited so far in this boot (rule 2)
        self.mark_up = 0  # uptime of the reading that set the mark (rule 6)
        self.last_t = 0  # last point: time, key, value, position in its boot's seq list
        self.last_key: Key = (0, 0)
        self.last_value = 0
        self.last_pos = 0
        self.held_value: int | None = None  # pending held reading (rule 6): value, uptime
        self.held_up = 0
        self.serial: Any = None  # meter serial number last seen (rule 4)

    def snap(self) -> StreamSnap:
        return (
            self.boot,
            self.mark,
            self.mark_up,
            self.last_t,
            self.last_key,
            self.last_value,
            self.last_pos,
            self.held_value,
            self.held_up,
            self.serial,
        )

    def restore(self, s: StreamSnap) -> None:
        (
            self.boot,
            self.mark,
            self.mark_up,
            self.last_t,
            self.last_key,
            self.last_value,
            self.last_pos,
            self.held_value,
            self.held_up,
            self.serial,
        ) = s


class Part:
    """A run of at most PART_MSGS consecutive messages of one boot, processed together:
    the stream states before it (to go back to) and what it contributed (to take back)."""

    __slots__ = ("boot", "contribs", "id", "ranges_before", "start", "streams_before")

    def __init__(
        self,
        pid: int,
        boot: int,
        start: int,
        streams_before: dict[int, StreamSnap],
        ranges_before: dict[int, tuple[int, int]],
    ) -> None:
        self.id = pid  # increasing in processing order within a station
        self.boot = boot
        self.start = start  # position of its first message in the boot
        self.streams_before = streams_before  # slot -> Stream.snap()
        self.ranges_before = ranges_before  # Boot.ranges before it: slot -> (len, hi of last)
        self.contribs: dict[int, dict[int, Contribution]] = {}  # slot -> interval -> it


class Boot:
    """One boot of one station: its messages in seq order and what the rules need of it."""

    __slots__ = (
        "b_mwh",
        "boot_event_seq",
        "clock",
        "done",
        "est_off",
        "msgs",
        "no",
        "parts",
        "r_used",
        "ranges",
        "restored",
        "seen",
        "seqs",
        "sync_off",
        "sync_seq",
    )

    def __init__(self, no: int) -> None:
        self.no = no
        self.seqs: list[int] = []
        self.msgs: list[RawMsg] = []
        self.sync_seq: int | None = None  # lowest seq carrying ts
        self.sync_off = 0  # its ts - up
        self.est_off: int | None = None  # min(recv_ms - up) over the boot's messages
        # (offset, estimated) per rule 5, kept current by update_clock(): read once per
        # message, a method call there would cost ~2 % of the in-order add()
        self.clock: tuple[int, bool] = rules.boot_offset(None, None)
        self.boot_event_seq: int | None = None  # lowest seq of a boot event
        self.restored: dict[int, int] | None = None  # its `restored`
        self.b_mwh: dict[int, tuple[int, int]] = {}  # slot -> (seq, b_mwh) lowest seq
        self.r_used: set[int] = set()  # slots whose r(b) the processing consulted
        self.done = 0  # messages processed (a prefix of msgs)
        self.parts: list[Part] = []
        # slot -> register ranges [lo, hi] credited while processing this boot, ascending
        # and disjoint (the mark only rises within a boot): the session cross-check
        self.ranges: dict[int, list[list[int]]] = {}
        self.seen: set[int] = set()  # streams with readings in this boot

    def update_clock(self) -> None:
        """Recompute `clock` after sync_seq/sync_off or est_off changed."""
        self.clock = rules.boot_offset(
            self.sync_off if self.sync_seq is not None else None, self.est_off
        )

    def r(self, slot: int) -> int | None:
        """r(b) of a slot: its restored value for this boot, if known."""
        x = self.b_mwh.get(slot)
        return rules.restored_value(
            self.restored.get(slot) if self.restored is not None else None,
            x[1] if x is not None else None,
        )


class Station:
    __slots__ = (
        "boots",
        "end_keys",
        "ends",
        "ends_by_sig",
        "last_boot",
        "next_part_id",
        "order",
        "sess_new",
        "sess_pending",
        "sess_rerun",
        "sid",
        "starts",
        "streams",
    )

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.boots: dict[int, Boot] = {}
        self.order: list[int] = []  # boot numbers, ascending
        self.streams: dict[int, Stream] = {}
        self.last_boot: int | None = None  # last boot processed (all before it are done)
        self.next_part_id = 0
        self.ends: dict[Key, RawMsg] = {}  # session_end events by key
        self.end_keys: list[Key] = []  # sorted
        self.starts: dict[SessionSig, list[Key]] = {}  # session_start keys, sorted
        self.ends_by_sig: dict[SessionSig, list[Key]] = {}
        # session records to make again: those whose end event was just processed (or
        # whose start event arrived), those a re-run may have changed (sess_rerun: from
        # this boot on; in the boot itself only above these marks, None: all), and those
        # whose check was not "ok" yet (more readings may still make it "ok")
        self.sess_new: set[Key] = set()
        self.sess_rerun: tuple[int, dict[int, int] | None] | None = None
        self.sess_pending: set[Key] = set()
