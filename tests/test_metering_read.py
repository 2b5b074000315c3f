"""What ingest hands metering of a telemetry (agent/ledger/inputs.py `metering_input`): the
keys the engine reads, decoded straight from the payload. Restart, verify and reports meter
whole bodies, so the projection must give the very records the whole body gives."""

from __future__ import annotations

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
from agent.ledger import IncrementalMeter, RawMsg, compute
from agent.ledger.inputs import metering_input, raw_msg
from agent.service import Service
from agent.sources.mqtt import Delivery
from tests.agent_helpers import key_for
from tests.test_metering_props import SETTINGS, gen_fleet

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


def with_unread_keys(rnd: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    """The body with what a real station sends beside the readings: none of it is metered."""
    out = dict(body)
    if "ev" not in out:
        out["err"] = {"bus": rnd.randint(0, 9)}
        out["fw_extra"] = {"note": "a newer firmware's key", "n": [1, 2]}
        slots = out.get("slots")
        if isinstance(slots, list):
            out["slots"] = [
                {**sl, "mv": 67_200, "ma": -1500, "bat": BAT} if isinstance(sl, dict) else sl
                for sl in slots
            ]
    return out


def as_ingested(m: RawMsg, body: dict[str, Any]) -> tuple[RawMsg, RawMsg]:
    """(metered whole, as a restart does; metered as ingest hands it over)."""
    kind = "event" if "ev" in body else "telemetry"
    cleaned = ranges.clean(body)
    given_ = metering_input(kind, payload(body), cleaned)
    whole = raw_msg(m.sid, m.boot, m.seq, m.recv_ms, cleaned.body, cleaned=cleaned)
    read = raw_msg(m.sid, m.boot, m.seq, m.recv_ms, given_.body, cleaned=given_)
    return whole, read


def meters_alike(rnd: random.Random) -> int:
    """Meter a random fleet whole and as ingest hands it over: the same records, in one
    pass and incrementally (what the agent runs). Returns how many messages were projected."""
    whole: list[RawMsg] = []
    read: list[RawMsg] = []
    for m in gen_fleet(rnd):
        # the generator's bodies are what metering reads after §6.9: put back what a station
        # sends beside the readings
        w, r = as_ingested(m, with_unread_keys(rnd, dict(m.body)))
        whole.append(w)
        read.append(r)
    assert compute(read) == compute(whole)
    a, b = IncrementalMeter(), IncrementalMeter()
    for i in range(0, len(read), 7):
        a.add(whole[i : i + 7])
        b.add(read[i : i + 7])
    for sid in {m.sid for m in whole}:
        assert a.records(sid) == b.records(sid)
    return sum("err" not in r.body and "ev" not in r.body for r in read)


@SETTINGS
@given(st.randoms(use_true_random=False))
def test_the_projection_meters_as_the_whole_body(rnd: random.Random) -> None:
    meters_alike(rnd)


def test_the_fleets_compared_are_mostly_projected() -> None:
    n = [meters_alike(random.Random(seed)) for seed in range(20)]
    assert sum(n) > 100 and sum(x > 0 for x in n) >= 15, n


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
    assert got.body == {
        "up": 61_000,
        "ts": 1_764_150_061_000,
        "hist": 1,
        "meter": {"e_wh": 1_000_198, "sn": 12_345_678},
        "slots": [{"n": 1, "e_mwh": 24_996, "b_mwh": 0}, {"n": 2, "e_mwh": 7}],
    }
    # a null slots list stays null, an absent meter absent
    bare = {"v": 1, "up": 5, "slots": None}
    assert metering_input("telemetry", payload(bare), ranges.clean(bare)).body == {
        "up": 5,
        "slots": None,
    }


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


def test_ingest_hands_metering_the_projection(
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
        assert b.cleaned[0].body == {"up": 1000, "slots": [{"n": 1, "e_mwh": 5}]}
        # a spoiled source: §6.9's body, the slot taken out and named
        assert b.cleaned[1].body["slots"] == [] and b.cleaned[1].spoiled
    finally:
        svc.store.close()
