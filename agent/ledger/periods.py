"""Monitoring periods locked for MRV (CONTRACT §6.8): sequential locks, each window frozen.

Lock k covers the UTC days [from_k, to_k) (contiguous: from_k = to_{k−1}; the first also
freezes whatever came before its period) and was taken at `at_k`. What it froze is a pure function of the raw messages, so `verify` recomputes it:

    window k = compute(messages received by at_k, rules with lock k−1 in force)
               — its interval and day records starting in [from_k, to_k)

With lock k−1 in force, the first interval after it (from_k) carries the adjustment record
of everything locked before (rule 8); so window k holds, frozen, its own energy and the
revisions of the earlier windows that arrived before at_k. The open part (from the last
lock's end) is computed with the last lock in force: its first interval carries the
adjustment of all locked windows since the last lock (the revisions telescope: each
window's revisions are counted once, in the first period open when they arrived).
Sessions are never locked.

The agent meters with the last lock in force (`params_now`); the frozen windows live in
`locked_records` (Store.record_rows reads them for locked days), written once when the
lock is taken (`take_lock`), never changed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.ledger.compute import compute_station
from agent.ledger.inputs import MeterParams, RawMsg
from agent.ledger.records import DAY_MS, Record
from agent.ledger.state import Key

LOCKED_KINDS = ("interval", "day")


class PeriodError(ValueError):
    """A lock that cannot be taken (one-line reason)."""


@dataclass(frozen=True)
class Lock:
    n: int
    from_ms: int
    to_ms: int
    at_ms: int
    by: str
    note: str


def load_locks(store: Any) -> list[Lock]:
    """The locks in order ([] on a database from before schema 6)."""
    if (store.schema_version() or 0) < 6:
        return []
    rows = store.db.execute(
        "SELECT n, from_ms, to_ms, locked_at_ms, by_name, note FROM period_locks ORDER BY n"
    ).fetchall()
    return [Lock(int(r[0]), int(r[1]), int(r[2]), int(r[3]), str(r[4]), str(r[5])) for r in rows]


def with_lock(params: MeterParams, lock: Lock | None) -> MeterParams:
    """`params` with `lock` in force (None: no lock)."""
    return dataclasses.replace(
        params,
        locked_until_ms=lock.to_ms if lock else None,
        locked_at_ms=lock.at_ms if lock else None,
    )


def params_now(params: MeterParams, locks: list[Lock]) -> MeterParams:
    """What the agent meters with: the last lock in force, else `params` as configured (a
    lock set in the config, `[metering] locked_until_ms`, stays for databases without
    locks of their own)."""
    return with_lock(params, locks[-1]) if locks else params


Source = Callable[[], Iterable[RawMsg]]
RawFrom = Callable[[str, Key], Iterable[RawMsg]]
RawBoot = Callable[[str, int], Iterable[RawMsg]]


def _upto(it: Iterable[RawMsg], at: int) -> Iterator[RawMsg]:
    return (m for m in it if m.recv_ms <= at)


def window_records(
    sid: str,
    msgs: Iterable[RawMsg],
    raw_from: RawFrom,
    raw_boot: RawBoot,
    params: MeterParams,
    locks: list[Lock],
    k: int,
) -> list[Record]:
    """Lock k's frozen records of one station (k indexes `locks`), recomputed."""
    lock = locks[k]
    recs = compute_station(
        sid,
        _upto(msgs, lock.at_ms),
        lambda s, key: _upto(raw_from(s, key), lock.at_ms),
        lambda s, b: _upto(raw_boot(s, b), lock.at_ms),
        with_lock(params, locks[k - 1] if k else None),
    )
    lo, hi = bounds(locks, k)
    return [r for r in recs if r.kind in LOCKED_KINDS and lo <= r.start_ms < hi]


def bounds(locks: list[Lock], k: int) -> tuple[int, int]:
    """The records lock k froze start in [lo, hi): its days; the first lock also freezes
    every record before its period (with a lock in force nothing before it is open)."""
    return (0 if k == 0 else locks[k].from_ms), locks[k].to_ms


def open_records(recs: list[Record], locks: list[Lock]) -> list[Record]:
    """Of the records computed with the last lock in force, those the lock leaves open."""
    if not locks:
        return recs
    until = locks[-1].to_ms
    return [r for r in recs if r.kind not in LOCKED_KINDS or r.start_ms >= until]


def compute_locked(msgs: list[RawMsg], params: MeterParams, locks: list[Lock]) -> list[Record]:
    """Every record of the messages (in memory: `verify --bundle`), locked windows as they
    were frozen, the rest with the last lock in force: what Store.record_rows holds."""
    from agent.ledger.compute import compute

    recs = open_records(compute(msgs, params_now(params, locks)), locks)
    for k, lock in enumerate(locks):
        lo, hi = bounds(locks, k)
        seen = [m for m in msgs if m.recv_ms <= lock.at_ms]
        prev = with_lock(params, locks[k - 1] if k else None)
        recs += [r for r in compute(seen, prev) if r.kind in LOCKED_KINDS and lo <= r.start_ms < hi]
    return recs


def check_new(locks: list[Lock], from_ms: int, to_ms: int, now_ms: int) -> None:
    """A new lock must be whole UTC days, in the past, after the last one and adjacent."""
    if from_ms % DAY_MS or to_ms % DAY_MS:
        raise PeriodError("a monitoring period is whole UTC days (--from and --to at 00:00Z)")
    if to_ms <= from_ms:
        raise PeriodError("--to must be after --from")
    if to_ms > now_ms:
        raise PeriodError("a period can be locked only once it has ended (--to in the past)")
    if locks and from_ms != locks[-1].to_ms:
        last = locks[-1]
        raise PeriodError(
            f"periods are locked in order, each from the last one's end: lock {last.n} ends "
            f"{_iso(last.to_ms)}, so --from must be {_iso(last.to_ms)}"
        )


def take_lock(
    store: Any,
    from_ms: int,
    to_ms: int,
    *,
    params: MeterParams,
    decode: Callable[[Any], RawMsg],
    by: str,
    note: str = "",
    wait_s: float = 30.0,
    now: Callable[[], int] = lambda: int(time.time() * 1000),
) -> tuple[Lock, int]:
    """Lock [from_ms, to_ms): wait until the agent has committed what it received before
    now (its health row), then freeze every station's window, computed from raw as
    `window_records` does, in one transaction with the lock. Returns (lock, records
    frozen)."""
    from agent.store import record_to_row

    locks = load_locks(store)
    at = now()
    check_new(locks, from_ms, to_ms, at)
    _wait_for_agent(store, at, wait_s, now)
    lock = Lock(len(locks) + 1, from_ms, to_ms, at, by, note)
    every = [*locks, lock]
    frozen = []
    for sid in store.archive().sids():  # the live table's and the sealed archive's

        def raw_from(s: str, key: Key) -> Iterator[RawMsg]:
            return (decode(r) for r in store.iter_raw_keys(s, key))

        def raw_boot(s: str, b: int) -> Iterator[RawMsg]:
            return (decode(r) for r in store.iter_raw_keys(s, boot=b))

        frozen += window_records(
            sid, raw_from(sid, (-1, -1)), raw_from, raw_boot, params, every, len(locks)
        )
    rows = [record_to_row(r) for r in frozen]
    with store.transaction() as db:
        if load_locks(store) != locks:
            raise PeriodError("another lock was taken meanwhile: try again")
        db.execute(
            "INSERT INTO period_locks (n, from_ms, to_ms, locked_at_ms, by_name, note) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (lock.n, from_ms, to_ms, at, by, note),
        )
        if rows:
            cols = ", ".join(rows[0]._fields)
            marks = ", ".join("?" * (len(rows[0]._fields) + 1))
            db.executemany(
                f"INSERT INTO locked_records ({cols}, lock_n) VALUES ({marks})",
                [(*r, lock.n) for r in rows],
            )
    return lock, len(rows)


def _wait_for_agent(store: Any, at: int, wait_s: float, now: Callable[[], int]) -> None:
    """Every message received before `at` must be committed before the window is frozen:
    while a live agent (health written in the last 15 s) holds older uncommitted ones,
    wait (at most wait_s)."""
    deadline = time.monotonic() + wait_s
    while True:
        h = store.agent_health()
        if h is None or now() - h[0] > 15_000:
            return  # no agent running: everything received is committed
        state = json.loads(h[1])
        oldest = h[0] - int(float(state.get("lag_s") or 0) * 1000)
        if h[0] > at and (not state.get("pending") or oldest > at):
            return  # written after the lock, nothing older than it waiting
        if time.monotonic() > deadline:
            raise PeriodError(
                "the agent still holds messages received before the lock, uncommitted "
                f"(pending {state.get('pending')}): try again once its commits succeed"
            )
        time.sleep(0.5)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
