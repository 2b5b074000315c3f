"""What the report reads from the agent's store besides the records: the signature check of
the period's raw messages, the quarantine by reason, the meter register.

A raw message belongs to the period by its time: its `ts` when it carries one (the
station's synced clock), else its receive time. Quarantined messages carry no trusted
time: they belong to the period by their receive time. Signatures are verified again with
the keys in the store, as `stationctl verify --db` does (a revoked key counts as a
failure).

An OCPP charger's frames (raw kind `ocpp`, CONTRACT §11) are no signed messages: each is
checked as `verify` checks it (`check_ocpp`: still an OCPP-J frame, and its OCMF values
verified again against the charger's public key when it was stored as checked) and
counted as an OCPP frame, OCMF-verified or unsigned, never as a failed HMAC signature.
Its time is its metering body's (`frames.body_of`); it is a reading when that body
carries an energy register value. (agent.ocpp is imported only when there is an OCPP
frame: `verify --bundle` imports this module on a machine that may lack `cryptography`.)
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.report.tables import OWN, QuarantineCount, SigCount, source_label
from agent.wire import KeyRing, WireError, decode_record, verify

OCPP_KIND = "ocpp"  # agent.ocpp.frames.KIND, without importing agent.ocpp

log = logging.getLogger(__name__)

NO_REGISTER = "no meter register in this database"


def message_time(body: Mapping[str, Any], recv_ms: int) -> int:
    """A raw message's time for the period: `ts` when it has one, else its receive time."""
    ts = body.get("ts")
    return ts if type(ts) is int else recv_ms


def station_sids(store: Any) -> list[str]:
    """Every station with raw messages (archived or live)."""
    return sorted(set(store.archive().sids()) | set(store.raw_sids()))


@dataclass(frozen=True)
class OcppCheck:
    """One stored OCPP frame as `verify` sees it."""

    proto: str | None  # its protocol (None: the topic names none)
    time: int  # its time for the period: its metering body's `ts`, else its receive time
    msg: Any  # its metering input (an agent.ledger RawMsg); None when it no longer reads
    signed: bool  # stored as checked and its OCMF signatures verified again
    error: str  # why it fails its check ("" when it passes)


def check_ocpp(
    sid: str, boot: int, seq: int, kid: int, topic: str, record: bytes, recv_ms: int, key: str
) -> OcppCheck:
    """A stored OCPP frame checked (`frames.recheck` against the charger's public key
    `key`) and translated into metering input exactly as `agent_meter.decode_row` does."""
    from agent.ledger.inputs import raw_msg
    from agent.ocpp import frames, ocmf

    try:
        proto = frames.proto_of(topic)
    except frames.FrameError as e:
        return OcppCheck(None, recv_ms, None, False, str(e))
    checked = kid == frames.SIGNED_KID
    try:
        body = frames.body_of(proto, record, recv_ms, sid, boot, seq, checked=checked)
    except frames.FrameError as e:
        return OcppCheck(proto, recv_ms, None, False, str(e))
    msg = raw_msg(sid, boot, seq, recv_ms, body, cleaned=frames.cleaned(body))
    t = message_time(body, recv_ms)
    try:
        frames.recheck(kid, proto, record, key)
    except (frames.FrameError, ocmf.OcmfError) as e:
        return OcppCheck(proto, t, msg, False, str(e) or type(e).__name__)
    return OcppCheck(proto, t, msg, checked, "")


def source_of(labels: set[str]) -> str:
    """A station's source from those of its raw messages (one, but say so if mixed)."""
    return "+".join(sorted(labels)) if labels else OWN


def scan(
    store: Any, ring: KeyRing | None, start_ms: int, end_ms: int, interval_ms: int
) -> tuple[list[SigCount], dict[str, set[int]], dict[str, str]]:
    """One pass over every station's raw messages of the period: (per station, messages
    stored / signatures verified again / failed / OCPP frames, OCMF-verified or unsigned;
    per station, the starts of the intervals holding one of its telemetry messages or
    OCPP frames with an energy reading; per station, its source: OWN or an OCPP label,
    from all its raw messages). `ring` None: HMAC signatures not checked. Beside a running
    agent, a station's raw rows above the key it is metered to (in no record yet:
    docs/agent.md, "Metering held back") are left out, as `verify` and `bundle` leave them."""
    from agent.ledger.agent_meter import metered_keys

    upto = metered_keys(store)
    sigs = []
    readings: dict[str, set[int]] = {}
    sources: dict[str, str] = {}
    keys: dict[str, str] | None = None
    for sid in station_sids(store):
        n = ok = bad = ocpp = ocmf = unsigned = 0
        have: set[int] = set()
        labels: set[str] = set()
        top = upto.get(sid)
        for row in store.iter_raw_keys(sid):
            if top is not None and (row.boot, row.seq) > top:
                break  # (key order)
            if row.kind == OCPP_KIND:
                if keys is None:
                    from agent.ocpp.points import ocpp_public_keys

                    keys = ocpp_public_keys(store)
                c = check_ocpp(
                    row.sid,
                    row.boot,
                    row.seq,
                    row.kid,
                    row.topic,
                    row.record,
                    row.recv_ms,
                    keys.get(row.sid, ""),
                )
                labels.add(source_label(c.proto))
                if not start_ms <= c.time < end_ms:
                    continue
                n += 1
                ocpp += 1
                if c.error:
                    log.warning("OCPP frame %s %d:%d: %s", sid, row.boot, row.seq, c.error)
                    bad += 1
                    continue
                if c.signed:
                    ok += 1
                    ocmf += 1
                else:
                    unsigned += 1
                if c.msg.body.get("reg"):
                    have.add(c.time - c.time % interval_ms)
                continue
            labels.add(OWN)
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
                    bad += 1
                    continue
                ok += 1
            if row.kind == "telemetry":
                have.add(t - t % interval_ms)
        sources[sid] = source_of(labels)
        if n:
            unchecked = n - ok - bad - unsigned
            sigs.append(SigCount(sid, n, ok, bad, unchecked, ocpp, ocmf, unsigned))
            readings[sid] = have
    return sigs, readings, sources


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
