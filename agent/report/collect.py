"""What the report reads from the agent's store besides the records: the signature check of
the period's raw messages, the quarantine by reason, the meter register.

A raw message belongs to the period by its time: its `ts` when it carries one (the
station's synced clock), else its receive time. Quarantined messages carry no trusted
time: they belong to the period by their receive time. Signatures are verified again with
the keys in the store, as `stationctl verify --db` does (a revoked key counts as a
failure).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

from agent.report.tables import QuarantineCount, SigCount
from agent.wire import KeyRing, WireError, decode_record, verify

log = logging.getLogger(__name__)

NO_REGISTER = "no meter register in this database"


def message_time(body: Mapping[str, Any], recv_ms: int) -> int:
    """A raw message's time for the period: `ts` when it has one, else its receive time."""
    ts = body.get("ts")
    return ts if type(ts) is int else recv_ms


def station_sids(store: Any) -> list[str]:
    """Every station with raw messages (archived or live)."""
    return sorted(set(store.archive().sids()) | set(store.raw_sids()))


def scan(
    store: Any, ring: KeyRing | None, start_ms: int, end_ms: int, interval_ms: int
) -> tuple[list[SigCount], dict[str, set[int]]]:
    """One pass over every station's raw messages of the period: (per station, messages
    stored / signatures verified again / failed; per station, the starts of the intervals
    holding one of its telemetry messages). `ring` None: signatures not checked."""
    sigs = []
    readings: dict[str, set[int]] = {}
    for sid in station_sids(store):
        n = ok = 0
        have: set[int] = set()
        for row in store.iter_raw_keys(sid):
            try:
                t = message_time(decode_record(row.record), row.recv_ms)
            except Exception:  # bytes that no longer decode: by their receive time
                t = row.recv_ms
            if not start_ms <= t < end_ms:
                continue
            n += 1
            if ring is not None:
                try:
                    verify(row.kind, row.sid, row.record, ring)
                except WireError as e:
                    log.warning("signature of %s %d:%d: %s", sid, row.boot, row.seq, e)
                    continue
                ok += 1
            if row.kind == "telemetry":
                have.add(t - t % interval_ms)
        if n:
            unchecked = n if ring is None else 0
            sigs.append(SigCount(sid, n, ok, n - ok - unchecked, unchecked))
            readings[sid] = have
    return sigs, readings


def quarantine(store: Any, start_ms: int, end_ms: int) -> list[QuarantineCount]:
    """Quarantined messages received in the period, per reason, and how many of them were
    resolved (ingested once their station's key was known)."""
    every = Counter(
        q.reason
        for q in store.quarantine_rows(include_resolved=True)
        if start_ms <= q.recv_ms < end_ms
    )
    still = Counter(q.reason for q in store.quarantine_rows() if start_ms <= q.recv_ms < end_ms)
    return [QuarantineCount(r, every[r], every[r] - still[r]) for r in sorted(every)]


def register(store: Any, at_ms: int) -> tuple[list[dict[str, Any]] | None, str]:
    """The meter register and calibration status at `at_ms`
    (`agent.meters.register_status`), or (None, why) when there is none."""
    try:
        from agent.meters import register_status  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None, NO_REGISTER
    try:
        rows = [dict(m) for m in register_status(store, at_ms)]
    except Exception as e:  # a database from before the register's tables
        log.info("meter register: %s", e)
        return None, NO_REGISTER
    if not rows:
        return None, NO_REGISTER
    return rows, ""
