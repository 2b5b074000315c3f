"""What ingest hands metering of a telemetry: only the keys the engine reads, packed
(agent/ledger/reads.py). A clean telemetry's reads are packed from wire.admit_telemetry's
decode (wire.SignedTelemetry); one only `verify` could tell, from a decode straight from the
payload (agent/ledger/inputs.py `metering_input`, TelemetryRead). Restart, verify and
reports meter whole bodies, so each must give the very records the whole body gives."""

from __future__ import annotations

import collections
import pathlib
import random
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import ranges, wire
from agent.config import AgentConfig, DbConfig
from agent.keys import KeyStore
from agent.ledger import IncrementalMeter, RawMsg, compute, reads
from agent.ledger.inputs import MeterRead, SlotRead, TelemetryRead, metering_input, raw_msg
from agent.service import Service
from agent.sources.mqtt import Delivery
from tests.agent_helpers import key_for
from tests.test_metering_props import SETTINGS, gen_fleet

KEYS = wire.StaticKeys({(f"KH-T-{i:04d}", 1): key_for(f"KH-T-{i:04d}") for i in range(3)})
SIG = b',"sig":"' + b"0" * 64 + b'"}'
BAT = {
    "id": "B7",
    "soc": 400,
    "soh": 950,
    "mv": 67_000,
    "ma": -1500,
    "t": 250,
    "tmin": 240,
    "cyc": 88,
    "flt": 0,
    "life_wh": 1_234_567,
}


def payload(body: dict[str, Any]) -> bytes:
    """The body as a station sends it (the projection never reads the signature)."""
    return msgspec.json.encode(body)[:-1] + SIG


def with_unread_keys(rnd: random.Random, body: dict[str, Any], newer: bool) -> dict[str, Any]:
    """The body with what a real station sends beside the readings (`newer`: and a newer
    firmware's key, which only `verify` takes): none of it is metered."""
    out = dict(body)
    if "ev" not in out:
        out["err"] = {"bus": rnd.randint(0, 9)}
        if newer:
            out["fw_extra"] = {"note": "a newer firmware's key", "n": [1, 2]}
        meter = out.get("meter")
        if isinstance(meter, dict) and rnd.random() < 0.3:
            # now and then without its serial (optional in §2): left out, it reads as None
            out["meter"] = {k: v for k, v in meter.items() if k != "sn"}
        slots = out.get("slots")
        if isinstance(slots, list):
            out["slots"] = [
                {**sl, "mv": 67_200, "ma": -1500, "bat": BAT} if isinstance(sl, dict) else sl
                for sl in slots
            ]
    return out


def as_ingested(m: RawMsg, body: dict[str, Any]) -> tuple[RawMsg, RawMsg, str]:
    """(metered whole, as a restart does; metered as ingest hands it over; which way ingest
    took: "admitted", "read" (TelemetryRead) or "whole")."""
    sid = body["sid"]
    p = wire.sign(msgspec.json.encode(body), key_for(sid))
    whole = raw_msg(m.sid, m.boot, m.seq, m.recv_ms, ranges.clean(body).body)
    admitted = wire.admit_telemetry(sid, p, KEYS, recv_ms=m.recv_ms) if "ev" not in body else None
    if admitted is not None:
        given_, way = ranges.Cleaned(reads.pack(admitted), ()), "admitted"  # as Service does
    else:
        kind = "event" if "ev" in body else "telemetry"
        given_ = metering_input(kind, p, ranges.clean(body))
        way = "read" if type(given_.body) is bytes else "whole"
    return whole, raw_msg(m.sid, m.boot, m.seq, m.recv_ms, given_.body, cleaned=given_), way


def meters_alike(rnd: random.Random) -> collections.Counter[str]:
    """Meter a random fleet whole and as ingest hands it over: the same records, in one
    pass and incrementally (what the agent runs). Returns how many messages were metered
    as which type."""
    whole: list[RawMsg] = []
    read: list[RawMsg] = []
    ways: collections.Counter[str] = collections.Counter()
    for m in gen_fleet(rnd):
        # the generator's bodies are what metering reads after §6.9: put back what a station
        # sends beside the readings
        body = with_unread_keys(rnd, dict(m.body), newer=rnd.random() < 0.5)
        w, r, way = as_ingested(m, body)
        whole.append(w)
        read.append(r)
        ways[way] += 1
    assert compute(read) == compute(whole)
    a, b = IncrementalMeter(), IncrementalMeter()
    for i in range(0, len(read), 7):
        a.add(whole[i : i + 7])
        b.add(read[i : i + 7])
    for sid in {m.sid for m in whole}:
        assert a.records(sid) == b.records(sid)
    return ways


@SETTINGS
@given(st.randoms(use_true_random=False))
def test_what_ingest_hands_over_meters_as_the_whole_body(rnd: random.Random) -> None:
    meters_alike(rnd)


def test_the_fleets_compared_take_both_ways_of_packing() -> None:
    n = [meters_alike(random.Random(seed)) for seed in range(20)]
    for kind in ("admitted", "read"):
        assert sum(c[kind] for c in n) > 50 and sum(c[kind] > 0 for c in n) >= 12, (kind, n)


def test_the_projection_keeps_what_metering_reads_and_nothing_else() -> None:
    body = {
        "v": 1,
        "sid": "KH-RD-0001",
        "kid": 1,
        "boot": 3,
        "seq": 9,
        "up": 61_000,
        "ts": 1_764_150_061_000,
        "hist": 1,
        "err": {"bus": 2},
        "meter": {"e_wh": 1_000_198, "p_w": 12_000, "sn": 12_345_678},
        "slots": [
            {"n": 1, "st": "C", "mv": 67_200, "ma": 15_250, "e_mwh": 24_996, "b_mwh": 0},
            {"n": 2, "st": "I", "e_mwh": 7, "bat": BAT},
        ],
        "newer": [1, {"deep": 2}],
    }
    cleaned = ranges.clean(body)
    assert cleaned.spoiled == ()
    got = metering_input("telemetry", payload(body), cleaned)
    assert got.spoiled == ()
    assert got.body == reads.pack(
        TelemetryRead(
            up=61_000,
            ts=1_764_150_061_000,
            hist=1,
            meter=MeterRead(e_wh=1_000_198, sn=12_345_678),
            slots=[SlotRead(n=1, e_mwh=24_996, b_mwh=0), SlotRead(n=2, e_mwh=7)],
        )
    )
    # up, ts, hist, e_wh, sn, then n, e_mwh, b_mwh by slot; -1 absent
    assert reads.unpack(got.body) == (
        61_000,
        1_764_150_061_000,
        1,
        1_000_198,
        12_345_678,
        1,
        24_996,
        0,
        2,
        7,
        -1,
    )
    # a null slots list, an absent meter, ts and hist: nothing of them
    bare = {"v": 1, "up": 5, "slots": None}
    got = metering_input("telemetry", payload(bare), ranges.clean(bare))
    assert reads.unpack(got.body) == (5, -1, 0, -1, -1)
    # a meter without its serial, a null ts
    body = {"v": 1, "up": 5, "ts": None, "meter": {"e_wh": 0}, "slots": []}
    got = metering_input("telemetry", payload(body), ranges.clean(body))
    assert reads.unpack(got.body) == (5, -1, 0, 0, -1)


def test_packed_reads_take_any_slot_count() -> None:
    """A slot list longer than a station's 16 (a repeated slot number) packs and unpacks
    whole."""
    for k in (0, 1, 8, 16, 17, 40):
        t = TelemetryRead(
            up=7, meter=MeterRead(e_wh=3), slots=[SlotRead(n=i % 16 + 1, e_mwh=i) for i in range(k)]
        )
        v = reads.unpack(reads.pack(t))
        assert v[: reads.SLOTS] == (7, -1, 0, 3, -1)
        assert v[reads.SLOTS :] == tuple(x for i in range(k) for x in (i % 16 + 1, i, -1))


def test_what_is_not_a_clean_telemetry_is_handed_over_as_it_is() -> None:
    base = {"v": 1, "up": 5, "meter": {"e_wh": 10}, "slots": [{"n": 1, "e_mwh": 3}]}
    cases = [
        ("event", {"v": 1, "up": 5, "ev": "alarm", "code": "x", "level": "warn", "msg": "m"}),
        ("telemetry", {**base, "meter": {"e_wh": -1}}),  # spoiled: the meter taken out
        ("telemetry", {**base, "slots": [{"n": 1, "e_mwh": 3, "mv": -1}]}),  # slot spoiled
        ("telemetry", {**base, "ocpp": 1}),  # another path of the engine
    ]
    for kind, body in cases:
        cleaned = ranges.clean(body)
        assert metering_input(kind, payload(body), cleaned) is cleaned, body
    # a payload that does not fit the projection's types: the whole (clean) body
    cleaned = ranges.clean(base)
    odd = payload({**base, "up": "5"})
    assert metering_input("telemetry", odd, cleaned) is cleaned


def test_ingest_hands_metering_its_own_decode(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    verified: list[bytes] = []
    verify = wire.verify

    def counted(kind: str, sid: str, p: bytes, *a: Any, **kw: Any) -> wire.Verified:
        verified.append(p)
        return verify(kind, sid, p, *a, **kw)

    monkeypatch.setattr(wire, "verify", counted)
    url = f"sqlite:///{tmp_path}/a.db"
    sid = "KH-RD-0002"
    with KeyStore(url) as ks:
        ks.add(sid, key_for(sid))
    svc = Service(AgentConfig(db=DbConfig(url=url)))
    try:
        head = {"v": 1, "sid": sid, "kid": 1, "boot": 1, "up": 1000}
        slot = {"n": 1, "st": "C", "mv": 67_200, "e_mwh": 5}
        clean = {**head, "seq": 0, "slots": [slot]}
        spoiled = {**head, "seq": 1, "slots": [{**slot, "mv": -1}]}
        for body in (clean, spoiled):
            p = wire.sign(msgspec.json.encode(body), key_for(sid))
            svc._message(f"stations/{sid}/telemetry", p, Delivery(1, 1, 0))
        b = svc._batch
        assert [r.seq for r in b.rows] == [0, 1]
        # the clean one in one typed decode (wire.admit_telemetry), the other through verify
        assert verified == [b.rows[1].record]
        # metering reads admit_telemetry's decode, packed (up 1000, slot 1 at 5 mWh)
        got = b.cleaned[0].body
        assert type(got) is bytes and b.cleaned[0].spoiled == ()
        assert reads.unpack(got) == (1000, -1, 0, -1, -1, 1, 5, -1)
        # a spoiled source: §6.9's body, the slot taken out and named
        assert b.cleaned[1].body["slots"] == [] and b.cleaned[1].spoiled
    finally:
        svc.store.close()
