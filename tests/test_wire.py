"""agent/wire.py: verification per CONTRACT §5.5, decode, envelope ranges and §6.9 (a bad
field spoils only its source), golden vectors both ways.

Run `.venv/bin/python -m tests.test_wire` to (re)write tests/vectors/wire_agent.json (CPython-made vectors that the
firmware's verifier checks on MicroPython: tests/fw/test_wire.py, tests/test_wire_cross.py).
"""

from __future__ import annotations

import hmac
import json
import pathlib
import sys
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from agent import ranges, wire
from agent.health import now_ms
from agent.wire import Reason, StaticKeys, WireError
from tests.agent_helpers import (
    GOOD_SID,
    OTHER_SID,
    REVOKED_SID,
    T0_MS,
    Station,
    compact,
    deep,
    key_for,
    malformed_cases,
    signed,
    spoiled_cases,
)

VECTORS = pathlib.Path(__file__).parent / "vectors"


def ring() -> StaticKeys:
    return StaticKeys(
        {
            (GOOD_SID, 1): key_for(GOOD_SID),
            (OTHER_SID, 1): key_for(OTHER_SID),
            (REVOKED_SID, 1): None,
        }
    )


def verify_topic(topic: str, payload: bytes, keys: wire.KeyRing) -> wire.Verified:
    sid, kind = wire.parse_topic(topic, "stations")
    return wire.verify(kind, sid, payload, keys)


def test_good_telemetry_and_events_verify() -> None:
    st = Station(GOOD_SID, slots=3)
    st.advance()
    kind, p = st.telemetry()
    v = wire.verify(kind, GOOD_SID, p, ring())
    assert (v.sid, v.kid, v.boot, v.seq, v.kind) == (GOOD_SID, 1, 1, 0, "telemetry")
    assert v.record == p
    assert v.body["slots"][2]["e_mwh"] == st.e_mwh[2]
    assert "sig" not in v.body
    for kind, p in (
        st.boot_event(),
        st.event("session_start", slot=1, bat="B0012345", e_mwh=5, soc=100),
        st.event("session_start", slot=2, bat=None, e_mwh=5, soc=None),
        st.event(
            "session_end",
            slot=1,
            bat="B0012345",
            e0_mwh=5,
            e1_mwh=9,
            soc0=1,
            soc1=2,
            up0=1,
            up1=2,
            why="full",
            t0=1,
            t1=2,
        ),
        st.event("alarm", code="over_temp", level="crit", msg='a "q" \\ \n', slot=3),
        st.event("meter_reset", from_wh=10, to_wh=0, sn=None),
        st.event("outbox_drop", n=12),
    ):
        v = wire.verify(kind, GOOD_SID, p, ring())
        assert v.kind == "event" and v.body["ev"] in wire.EVENTS


@pytest.mark.parametrize("case", malformed_cases(), ids=lambda c: c[0])
def test_malformed_message_has_its_precise_reason(case: tuple[str, str, bytes, str]) -> None:
    name, topic, payload, reason = case
    with pytest.raises(WireError) as ei:
        verify_topic(topic, payload, ring())
    assert ei.value.reason == Reason(reason), (name, ei.value)
    assert ei.value.detail  # a human-readable line for quarantine


@pytest.mark.parametrize("case", spoiled_cases(), ids=lambda c: c[0])
def test_a_bad_field_spoils_only_its_source(
    case: tuple[str, str, bytes, tuple[tuple[str, str], ...]],
) -> None:
    # CONTRACT §6.9: verified and kept as received; metering gets the body without the
    # spoiled source, and the spoiled list names the field
    name, topic, payload, spoiled = case
    v = verify_topic(topic, payload, ring())
    assert v.record == payload
    assert v.body == wire.decode_record(payload)
    assert v.cleaned.spoiled == spoiled, name
    if name.startswith("soc"):
        slots = v.cleaned.body["slots"]
        assert "bat" not in slots[1] and slots[1]["e_mwh"] == 500  # the register stays
        assert v.cleaned.body["meter"] == v.body["meter"]


def test_ts_is_checked_against_the_receive_time() -> None:
    st = Station(GOOD_SID)
    m = json.loads(wire.split_signed(st.telemetry()[1])[0])
    day = 86_400_000
    p = signed(dict(m, ts=T0_MS + day), st.key)
    assert wire.verify("telemetry", GOOD_SID, p, ring(), recv_ms=T0_MS).seq == 0
    with pytest.raises(WireError) as ei:
        wire.verify("telemetry", GOOD_SID, p, ring(), recv_ms=T0_MS - 1)
    assert ei.value.reason is Reason.BAD_TS
    # without a receive time, the clock now
    wire.verify("telemetry", GOOD_SID, p, ring())


def test_envelope_bounds_are_inclusive() -> None:
    st = Station(GOOD_SID)
    m = json.loads(wire.split_signed(st.telemetry()[1])[0])
    over: dict[str, Any]
    for over in (
        {"boot": 2**31 - 1, "seq": 2**31 - 1},
        {"up": 320_000_000_000, "ts": 1_577_836_800_000},
        {"up": 0, "ts": None},
    ):
        wire.verify("telemetry", GOOD_SID, signed(dict(m, **over), st.key), ring())


def test_nesting_depth_four_passes_five_and_a_thousand_do_not() -> None:
    st = Station(GOOD_SID)
    m = json.loads(wire.split_signed(st.telemetry()[1])[0])
    wire.verify("telemetry", GOOD_SID, signed(dict(m, x=[[[1]]]), st.key), ring())
    for n in (4, 100, 999, 1000, 1700):
        with pytest.raises(WireError) as ei:
            wire.verify("telemetry", GOOD_SID, deep(m, n, st.key), ring())
        assert ei.value.reason is Reason.TOO_DEEP, n


def test_at_least_twenty_kinds_of_malformed_messages() -> None:
    cases = malformed_cases()
    assert len({reason for *_, reason in cases}) >= 20
    assert len(cases) >= 40


def test_nothing_after_the_signature_changes_the_meaning() -> None:
    # the signed bytes are parsed, not the payload: a second object after the sig is refused,
    # and a valid message parses to what was signed even if the JSON after sig were to differ
    st = Station(GOOD_SID)
    _, p = st.telemetry()
    with pytest.raises(WireError) as ei:
        wire.verify("telemetry", GOOD_SID, p[:-1] + b',"seq":99}', ring())
    assert ei.value.reason in (Reason.SIG_NOT_LAST, Reason.SIG_TRAILING)


def test_escaped_strings_take_the_slow_path_and_still_verify() -> None:
    # "\/" and "\u0041" are valid JSON that re-encodes differently: no false duplicate/compact
    key = key_for(GOOD_SID)
    b = (
        b'{"v":1,"sid":"KH-PNH-0001","kid":1,"boot":1,"seq":1,"up":1,"ev":"alarm",'
        b'"code":"a\\/b","level":"warn","msg":"\\u0041 \\t"}'
    )
    v = wire.verify("event", GOOD_SID, wire.sign(b, key), ring())
    assert v.body["code"] == "a/b" and v.body["msg"] == "A \t"
    # whitespace inside strings is not a separator
    b2 = b.replace(b'"msg":"\\u0041 \\t"', b'"msg":"x : , y"')
    assert wire.verify("event", GOOD_SID, wire.sign(b2, key), ring()).body["msg"] == "x : , y"


def test_big_integers_are_exact() -> None:
    st = Station(GOOD_SID, slots=1)
    st.e_mwh[0] = 2**70 + 1
    _, p = st.telemetry()
    assert wire.verify("telemetry", GOOD_SID, p, ring()).body["slots"][0]["e_mwh"] == 2**70 + 1


def test_size_limit_is_inclusive() -> None:
    st = Station(GOOD_SID)
    m = json.loads(wire.split_signed(st.telemetry()[1])[0])
    m["seq"] = 5
    base = len(signed(dict(m, pad=""), st.key))
    p = signed(dict(m, pad="x" * (4096 - base)), st.key)
    assert len(p) == 4096
    wire.verify("telemetry", GOOD_SID, p, ring())
    p = signed(dict(m, pad="x" * (4097 - base)), st.key)
    with pytest.raises(WireError, match="too_large"):
        wire.verify("telemetry", GOOD_SID, p, ring())


def test_sign_matches_contract_formula() -> None:
    import hashlib
    import hmac

    b = b'{"v":1,"sid":"KH-PNH-0001"}'
    key = bytes(range(32))
    mac = hmac.new(key, b, hashlib.sha256).hexdigest().encode()
    assert wire.sign(b, key) == b'{"v":1,"sid":"KH-PNH-0001","sig":"' + mac + b'"}'
    with pytest.raises(ValueError):
        wire.sign(b"{}", key)
    with pytest.raises(ValueError):
        wire.sign(b"[1]", key)


def test_parse_topic() -> None:
    assert wire.parse_topic("stations/KH-PNH-0001/event", "stations") == (GOOD_SID, "event")
    assert wire.parse_topic("a/b/KH-1/status", "a/b") == ("KH-1", "status")
    for bad in (
        "stations/KH-PNH-0001/cmd",
        "x/KH-PNH-0001/event",
        "stations/KH/event",
        "stations/KH-PNH-0001/event/x",
        "stations//event",
    ):
        with pytest.raises(WireError) as ei:
            wire.parse_topic(bad, "stations")
        assert ei.value.reason is Reason.BAD_TOPIC


def test_decode_record_gives_the_signed_body() -> None:
    st = Station(GOOD_SID)
    _, p = st.telemetry()
    assert wire.decode_record(p) == wire.verify("telemetry", GOOD_SID, p, ring()).body


# ---- golden vectors ------------------------------------------------------------------------


def test_firmware_vectors_verify_here() -> None:
    v = json.loads((VECTORS / "wire.json").read_text())
    key = bytes.fromhex(v["key_hex"])
    n = 0
    for t in v["vectors"]:
        sid, kid = t["wire"]["sid"], t["wire"]["kid"]
        kind = "event" if "ev" in t["object"] else "telemetry"
        got = wire.verify(kind, sid, bytes.fromhex(t["signed_hex"]), StaticKeys({(sid, kid): key}))
        assert got.body == t["object"], t["name"]
        n += 1
    assert n >= 10


# CPython-made vectors for the firmware side. `expect` is the firmware verifier's code
# (ok / unsigned / bad_sig / malformed), `reason` the agent's.
AGENT_KEY = bytes.fromhex("8f" * 8 + "00112233445566778899aabbccddeeff" + "42" * 8)
AGENT_SID = "KH-PNH-0042"


def make_agent_vectors() -> dict[str, Any]:
    st = Station(AGENT_SID, key=AGENT_KEY, boot=7, slots=2)
    st.advance(30_000, 2500)
    items: list[tuple[str, bytes, str, str]] = []

    def good(name: str, kp: tuple[str, bytes]) -> None:
        items.append((name, kp[1], "ok", "ok"))

    good("telemetry_2_slots", st.telemetry())
    st.e_mwh[1] = 2**64 + 3
    good("telemetry_big_int", st.telemetry())
    good("event_boot", st.boot_event())
    good(
        "event_session_start", st.event("session_start", slot=1, bat="B0000042", e_mwh=10, soc=120)
    )
    good(
        "event_session_end",
        st.event(
            "session_end",
            slot=1,
            bat="B0000042",
            e0_mwh=10,
            e1_mwh=99,
            soc0=120,
            soc1=1000,
            up0=5,
            up1=900,
            why="full",
        ),
    )
    good(
        "event_alarm_escapes",
        st.event(
            "alarm", code="x", level="warn", msg='quote " backslash \\ tab \t ctl \x01 slash /'
        ),
    )
    good("event_meter_reset", st.event("meter_reset", from_wh=100, to_wh=0, sn=7))
    good("event_outbox_drop", st.event("outbox_drop", n=3))
    _, p = st.telemetry()
    items.append(("tampered", p.replace(b'"boot":7', b'"boot":8'), "bad_sig", "bad_sig"))
    items.append(("uppercase_hex", p[:-66] + p[-66:-2].upper() + b'"}', "bad_sig", "sig_hex"))
    items.append(("unsigned", compact({"v": 1, "sid": AGENT_SID}), "unsigned", "sig_missing"))
    items.append(("trailing_newline", p + b"\n", "bad_sig", "sig_trailing"))
    head = b'{"v":1,"sid":"KH-PNH-0042","kid":1,"boot":7,"seq":99,'
    dup = wire.sign(head + b'"up":1,"up":1,"slots":[]}', AGENT_KEY)
    items.append(("duplicate_key", dup, "malformed", "duplicate_key"))
    flt = wire.sign(head + b'"up":1.5,"slots":[]}', AGENT_KEY)
    items.append(("float", flt, "malformed", "bad_up"))
    sp = wire.sign(head + b'"up":1, "slots":[]}', AGENT_KEY)
    items.append(("space", sp, "malformed", "not_compact"))
    out = []
    for name, payload, expect, reason in items:
        t: dict[str, Any] = {
            "name": name,
            "expect": expect,
            "reason": reason,
            "signed_hex": payload.hex(),
        }
        if expect == "ok":
            t["object"] = wire.decode_record(payload)
        out.append(t)
    return {
        "generator": "tests/test_wire.py (agent/wire.py on CPython)",
        "sid": AGENT_SID,
        "kid": 1,
        "key_hex": AGENT_KEY.hex(),
        "vectors": out,
    }


def render_vectors(v: dict[str, Any]) -> str:
    return json.dumps(v, indent=1) + "\n"


def test_agent_vectors_are_current_and_check_out_here() -> None:
    v = make_agent_vectors()
    assert (VECTORS / "wire_agent.json").read_text() == render_vectors(v), (
        "run: .venv/bin/python tests/test_wire.py"
    )
    keys = StaticKeys({(AGENT_SID, 1): AGENT_KEY})
    for t in v["vectors"]:
        p = bytes.fromhex(t["signed_hex"])
        kind = "event" if t["name"].startswith("event") else "telemetry"
        if t["expect"] == "ok":
            assert wire.verify(kind, AGENT_SID, p, keys).body == t["object"]
        else:
            with pytest.raises(WireError) as ei:
                wire.verify(kind, AGENT_SID, p, keys)
            assert ei.value.reason == Reason(t["reason"]), t["name"]


if __name__ == "__main__":
    (VECTORS / "wire_agent.json").write_text(render_vectors(make_agent_vectors()))
    print("wrote", VECTORS / "wire_agent.json", file=sys.stderr)


def test_the_depth_bounded_decode_is_the_plain_decode_and_ranges_depth() -> None:
    """decode_signed's typed decode (depth checked inside msgspec) gives what the untyped
    decode gives, the same Python types included, and refuses exactly what is nested
    deeper than 4, as too_deep (the reason the walk over the plain decode gave)."""
    import random

    rng = random.Random(11)
    scalars = [0, -1, 2**70, 1.5, -0.0, 1e300, "s", "\u00e9\\", True, False, None]

    def rnd(d: int) -> Any:
        if d > 7 or rng.random() < 0.3:
            return rng.choice(scalars)
        if rng.random() < 0.5:
            return [rnd(d + 1) for _ in range(rng.randint(0, 3))]
        return {f"k{i}": rnd(d + 1) for i in range(rng.randint(0, 3))}

    deep = 0
    for _ in range(5000):
        o = {f"k{i}": rnd(2) for i in range(rng.randint(0, 3))}
        signed = msgspec.json.encode(o)
        if ranges.depth(o) > 4:
            deep += 1
            with pytest.raises(WireError) as ei:
                wire.decode_signed(signed)
            assert ei.value.reason == Reason.TOO_DEEP, o
            continue
        got = wire.decode_signed(signed)
        want = msgspec.json.decode(signed)
        assert got == want and repr(got) == repr(want), o
    assert 500 < deep < 4500  # both sides were exercised


def _mutants(seed: int, n: int) -> list[tuple[str, dict[str, Any]]]:
    """Valid telemetry and events, each with one to three random changes: a value replaced
    (a boundary, a huge, a bool, a float, a string, null, a list, an object), a key
    dropped or added, an event name changed."""
    import copy
    import random

    rng = random.Random(seed)
    bat = {
        "id": "B1",
        "soc": 500,
        "soh": 990,
        "mv": 67000,
        "ma": -1000,
        "t": -5,
        "tmin": 2000,
        "cyc": 3,
        "flt": 0,
        "life_wh": 10**11,
    }
    tel = {
        "meter": {"e_wh": 1000, "p_w": -10, "sn": 7},
        "slots": [
            {"n": 1, "st": "C", "mv": 67200, "ma": 1000, "e_mwh": 2**53 - 1, "b_mwh": 0},
            {"n": 16, "e_mwh": 500, "bat": bat},
        ],
        "err": {"mb_to": 2**31 - 1, "x": 0},
        "hist": 1,
    }
    events = [
        {"ev": "boot", "fw": "1", "reset": "wdt", "restored": {"1": 5, "016": 0}},
        {"ev": "session_start", "slot": 1, "bat": None, "e_mwh": 5, "soc": None},
        {
            "ev": "session_end",
            "slot": 2,
            "bat": "B",
            "e0_mwh": 1,
            "e1_mwh": 2,
            "soc0": 0,
            "soc1": 1000,
            "up0": 0,
            "up1": 320_000_000_000,
            "boot0": 3,
            "t0": 1,
            "t1": 2**62,
            "why": "reboot",
        },
        {"ev": "alarm", "code": 7, "level": "crit", "msg": "m", "slot": 3},
        {"ev": "alarm", "code": "x" * 256, "level": "warn", "msg": ""},
        {"ev": "meter_reset", "from_wh": 10, "to_wh": 0, "sn": 2**32 - 1},
        {"ev": "outbox_drop", "n": 0},
        {"ev": "ota", "phase": "staged", "from": "1.0", "to": "1.1"},
    ]
    pool: list[Any] = [
        0, 1, -1, 16, 17, 1000, 1001, -1000, -1001, 2000, 2001, 2**31 - 1, 2**31, 2**32 - 1,
        2**32, 2**53 - 1, 2**53, 10**11, 10**11 + 1, 10**7, 10**7 + 1, 1_000_000, 1_000_001,
        -1_000_001, 2**62, 2**62 + 1, 320_000_000_000, 320_000_000_001, 34 * 10**40,
        -(34 * 10**40), True, False, 1.0, 0.5, "1", "", "x" * 256, "x" * 257, "I", "Q",
        "warn", "power", "full", "B1", None, [], [1], {}, {"n": 1}, "1\n", "\u00b2",
        "boot", "ota", "explode",
    ]  # fmt: skip

    def containers(o: Any, out: list[Any]) -> list[Any]:
        out.append(o)
        for v in o.values() if isinstance(o, dict) else o if isinstance(o, list) else ():
            if isinstance(v, dict | list):
                containers(v, out)
        return out

    res = []
    for _ in range(n):
        if rng.random() < 0.5:
            kind, m = "telemetry", copy.deepcopy(tel)
        else:
            kind, m = "event", copy.deepcopy(rng.choice(events))
        for _ in range(rng.randint(1, 3)):
            c = rng.choice(containers(m, []))
            if isinstance(c, dict):
                r = rng.random()
                if c and r < 0.6:
                    k = rng.choice(list(c))
                    if kind == "event" and c is m and k == "ev" and rng.random() < 0.7:
                        continue  # keep mostly known events: they are the interesting ones
                    c[k] = copy.deepcopy(rng.choice(pool))
                elif c and r < 0.8:
                    del c[rng.choice(list(c))]
                else:
                    c[rng.choice(["hist", "meter", "err", "slots", "bat", "17", "1\n", "zz"])] = (
                        copy.deepcopy(rng.choice(pool))
                    )
            elif c:
                c[rng.randrange(len(c))] = copy.deepcopy(rng.choice(pool))
        res.append((kind, m))
    return res


def test_the_fast_path_never_passes_what_ranges_clean_spoils() -> None:
    # wire._clean takes a message as clean when msgspec's strict decode accepts it; that
    # must never be a message ranges.clean would spoil anything in
    import msgspec

    env = {"v": 1, "sid": GOOD_SID, "kid": 1, "boot": 1, "seq": 1, "up": 1}
    accepted = 0
    for kind, m in _mutants(11, 30_000):
        body = {**env, **m}
        signed_bytes = msgspec.json.encode(body)
        fast = wire._clean(kind, signed_bytes, body)
        slow = ranges.clean(body)
        assert fast == slow, (kind, body, fast, slow)
        accepted += not slow.spoiled
    assert accepted > 1000  # the mutants reach both sides


def test_clean_messages_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(body: Any) -> Any:
        raise AssertionError("ranges.clean called for a clean message")

    st = Station(GOOD_SID, slots=3)
    st.advance()
    msgs = [st.telemetry(), st.boot_event(), st.event("outbox_drop", n=1)]
    msgs += [(topic.rsplit("/", 1)[1], p) for _n, topic, p, sp in spoiled_cases() if not sp]
    monkeypatch.setattr(ranges, "clean", boom)
    for kind, p in msgs:
        if b'"slots"' not in p and kind == "telemetry":
            continue
        v = wire.verify(kind, GOOD_SID, p, ring())
        assert v.cleaned.spoiled == () and v.cleaned.body == v.body


@settings(max_examples=400, deadline=None)
@given(key=hs.binary(max_size=130), data=hs.binary(max_size=3000))
def test_mac_hex_is_hmac_sha256(key: bytes, data: bytes) -> None:
    """The per-key precomputed states give RFC 2104's HMAC-SHA256, keys longer than a block
    (hashed first) and empty ones included, the first time and from the kept states."""
    want = hmac.digest(key, data, "sha256").hex().encode()
    assert wire.mac_hex(key, data) == want
    assert wire.mac_hex(key, data) == want


def test_mac_hex_keeps_a_bounded_number_of_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "_pads", {})
    monkeypatch.setattr(wire, "PADS_KEPT", 8)
    for i in range(40):
        key = i.to_bytes(2, "big") * 16
        assert wire.mac_hex(key, b"{}") == hmac.digest(key, b"{}", "sha256").hex().encode()
        assert len(wire._pads) <= 8


def _byte_mutants(seed: int, n: int) -> list[tuple[str, bytes]]:
    """(topic sid, payload): telemetry as stations send it and as they must not, changed in
    its fields (`_mutants`, the envelope too) and in its bytes (whitespace, a repeated key,
    an escape, a longer number, `sig` or `ev` inside, a wrong signature or topic)."""
    import random

    rng = random.Random(seed)
    env: dict[str, Any] = {"v": 1, "sid": GOOD_SID, "kid": 1, "boot": 3, "seq": 9, "up": 61_000}
    env_bad: list[tuple[str, Any]] = [
        ("v", 2), ("v", True), ("v", "1"), ("sid", "kh-pnh-0001"), ("sid", OTHER_SID),
        ("kid", 2), ("kid", -1), ("boot", 2**31), ("seq", 2**31 - 1), ("seq", "1"),
        ("up", 320_000_000_000), ("up", 320_000_000_001), ("up", -1), ("up", 1.0),
        ("ts", T0_MS), ("ts", T0_MS + 86_400_000), ("ts", T0_MS + 86_400_001),
        ("ts", ranges.TS_MIN - 1), ("ts", None), ("ts", True), ("hist", 0), ("ev", "alarm"),
        ("sig", "x"),
    ]  # fmt: skip
    bodies = [m for kind, m in _mutants(seed, 4 * n) if kind == "telemetry"][:n]
    out: list[tuple[str, bytes]] = []
    for m in bodies:
        body = {**env, **m}
        if rng.random() < 0.3:
            k, v = rng.choice(env_bad)
            body[k] = v
        if rng.random() < 0.3:
            body = dict(rng.sample(list(body.items()), len(body)))  # key order is free
        raw = msgspec.json.encode(body)
        r = rng.random()
        if r < 0.05:
            raw = raw.replace(b",", b", ", 1)
        elif r < 0.1:
            raw = raw.replace(b":", b" :", 1)
        elif r < 0.15:
            raw = b'{"up":61000,' + raw[1:]  # a repeated key, the same value
        elif r < 0.2:
            raw = raw[:-1] + b',"seq":9}'
        elif r < 0.25:
            raw = raw.replace(b'"e_wh"', b'"e\\u005fwh"')
        elif r < 0.3:
            raw = raw.replace(b'"b_mwh":0', b'"b_mwh":-0')
        elif r < 0.33:
            raw = raw.replace(b'"B1"', b'"B\\u0031"')
        payload = wire.sign(raw, key_for(GOOD_SID))
        r = rng.random()
        if r < 0.05:
            payload = payload[:-3] + (b"0" if payload[-3:-2] != b"0" else b"1") + b'"}'
        elif r < 0.08:
            payload = payload[:-1] + b" }"
        out.append((OTHER_SID if rng.random() < 0.03 else GOOD_SID, payload))
    return out


def admitted_as(t: wire.SignedTelemetry) -> tuple[int, int, int, Any]:
    """An admitted telemetry's envelope, and its decode as plain JSON values."""
    return t.kid, t.boot, t.seq, msgspec.to_builtins(t)


def test_admit_telemetry_admits_only_what_verify_takes_whole() -> None:
    # ingest's fast path: whatever it admits, verify accepts, with nothing spoiled, and its
    # decode is verify's body, the envelope included (what it does not admit, e.g. a key it
    # does not name, verify decides)
    keys = ring()
    admitted = left_to_verify = rejected = 0
    for topic_sid, p in _byte_mutants(5, 20_000):
        fast = wire.admit_telemetry(topic_sid, p, keys, recv_ms=T0_MS)
        try:
            v: wire.Verified | None = wire.verify("telemetry", topic_sid, p, keys, recv_ms=T0_MS)
        except WireError:
            v = None
        clean = v is not None and not v.cleaned.spoiled
        if fast is not None:
            assert v is not None and clean, (p, v)
            assert admitted_as(fast) == (v.kid, v.boot, v.seq, v.body), p
            admitted += 1
        else:
            left_to_verify += clean
            rejected += v is None
    # nested too deep, in a key the structs do not name: verify names it, nothing raises
    for depth in (5, 1000, 1900):  # (the last just within 4096 bytes)
        p = wire.sign(
            b'{"v":1,"sid":"'
            + GOOD_SID.encode()
            + b'","kid":1,"boot":3,"seq":9,"up":6,"zz":'
            + b"[" * depth
            + b"]" * depth
            + b"}",
            key_for(GOOD_SID),
        )
        assert wire.admit_telemetry(GOOD_SID, p, keys, recv_ms=T0_MS) is None
        with pytest.raises(WireError) as e:
            wire.verify("telemetry", GOOD_SID, p, keys, recv_ms=T0_MS)
        assert e.value.reason is Reason.TOO_DEEP
    # (the mutants reach every side)
    assert admitted > 500 and left_to_verify > 500 and rejected > 2000, (
        admitted,
        left_to_verify,
        rejected,
    )


def test_admit_telemetry_takes_only_the_exact_signature_framing() -> None:
    # the fast path checks the framing by its shape alone and leaves the hex to the HMAC's
    # comparison: the right signature in capitals, a byte more or less, or anything after
    # it is never admitted, and verify names each
    st = Station(GOOD_SID, slots=8)
    st.advance()
    p = st.telemetry()[1]
    assert wire.admit_telemetry(GOOD_SID, p, ring(), recv_ms=T0_MS + 3_600_000) is not None
    i = p.rfind(wire.SIG_MARK) + len(wire.SIG_MARK)
    sig = p[i : i + 64]
    bad = {
        Reason.SIG_HEX: p[:i] + sig.upper() + b'"}',
        Reason.SIG_LENGTH: p[:i] + sig[:-1] + b'"}',
        Reason.SIG_TRAILING: p + b" ",
        Reason.SIG_NOT_LAST: p[:-1] + b',"x":1}',
    }
    assert sig.upper() != sig  # (the signature has letters to raise)
    for reason, q in bad.items():
        assert wire.admit_telemetry(GOOD_SID, q, ring(), recv_ms=T0_MS + 3_600_000) is None
        with pytest.raises(WireError) as e:
            wire.verify("telemetry", GOOD_SID, q, ring(), recv_ms=T0_MS + 3_600_000)
        assert e.value.reason is reason, (reason, e.value)


def test_admit_telemetry_matches_every_station_id(monkeypatch: pytest.MonkeyPatch) -> None:
    # the ids that matched SID_RE are kept (a set lookup a message): one that does not match
    # is never admitted, however often it comes, and the bounded set forgets, never admits
    monkeypatch.setattr(wire, "SIDS_MATCHED_MAX", 3)
    monkeypatch.setattr(wire, "_SIDS_MATCHED", set())
    good = [f"KH-SET-{i:04d}" for i in range(5)]
    bad = ["kh-set-0001", "KH", "KH-SET-0001\n", "-KH-SET-0001"]
    keys = StaticKeys({(sid, 1): key_for(sid) for sid in good + bad})
    body = b',"kid":1,"boot":1,"seq":1,"up":1000,"meter":{"e_wh":1}}'
    for _ in range(2):
        for sid in good + bad:
            p = wire.sign(b'{"v":1,"sid":' + json.dumps(sid).encode() + body, key_for(sid))
            got = wire.admit_telemetry(sid, p, keys, recv_ms=T0_MS)
            assert (got is not None) == (sid in good), sid
            assert len(wire._SIDS_MATCHED) <= 3
            assert not set(bad) & wire._SIDS_MATCHED


def test_stations_telemetry_is_admitted() -> None:
    st = Station(GOOD_SID, slots=8)
    for _ in range(20):
        st.advance()
        p = st.telemetry()[1]
        v = wire.verify("telemetry", GOOD_SID, p, ring(), recv_ms=T0_MS + 3_600_000)
        got = wire.admit_telemetry(GOOD_SID, p, ring(), recv_ms=T0_MS + 3_600_000)
        assert got is not None and admitted_as(got) == (v.kid, v.boot, v.seq, v.body)
    # the firmware's own vectors (keys sorted, as it sends them)
    vec = json.loads((VECTORS / "wire.json").read_text())
    key = bytes.fromhex(vec["key_hex"])
    n = 0
    for t in vec["vectors"]:
        if "ev" in t["object"]:
            continue
        sid, kid = t["wire"]["sid"], t["wire"]["kid"]
        keys, p = StaticKeys({(sid, kid): key}), bytes.fromhex(t["signed_hex"])
        now = now_ms()
        v = wire.verify("telemetry", sid, p, keys, recv_ms=now)
        got = wire.admit_telemetry(sid, p, keys, recv_ms=now)
        if v.cleaned.spoiled:
            assert got is None, t["name"]
        else:
            assert got is not None and admitted_as(got) == (v.kid, v.boot, v.seq, v.body)
            n += 1
    assert n >= 3, n
