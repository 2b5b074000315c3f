"""A CPython station stand-in for agent tests: builds signed messages per CONTRACT §5.5.

The serializer is `json.dumps(..., separators=(",", ":"))` (insertion order; the contract
leaves key order free), then `agent.wire.sign`. `Station` keeps boot, seq, uptime and the
energy registers so that a test can produce a realistic, reproducible stream.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

from agent.wire import sign

T0_MS = 1_764_150_000_000  # 2025-11-26T09:40:00Z, a fixed clock for reproducible streams


STATIONCTL = [sys.executable, "-m", "stationctl"]


def key_for(sid: str, kid: int = 1) -> bytes:
    """A deterministic 32-byte test key."""
    return hashlib.sha256(f"test-key/{sid}/{kid}".encode()).digest()


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()


def signed(obj: dict[str, Any], key: bytes) -> bytes:
    """Serialize `obj` (which must not hold `sig`) compactly and sign it."""
    assert "sig" not in obj
    return sign(compact(obj), key)


class Station:
    """One virtual station: `telemetry()` and `event()` return (kind, payload bytes)."""

    def __init__(
        self,
        sid: str,
        *,
        kid: int = 1,
        key: bytes | None = None,
        boot: int = 1,
        slots: int = 2,
        meter: bool = True,
        t0_ms: int = T0_MS,
        synced: bool = True,
    ) -> None:
        self.sid = sid
        self.kid = kid
        self.key = key if key is not None else key_for(sid, kid)
        self.boot = boot
        self.seq = 0
        self.up = 1000
        self.t0_ms = t0_ms
        self.synced = synced
        self.n = slots
        self.meter = meter
        self.e_mwh = [0] * slots
        self.b_mwh = [0] * slots
        self.e_wh = 1_000_000

    def common(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "v": 1,
            "sid": self.sid,
            "kid": self.kid,
            "boot": self.boot,
            "seq": self.seq,
            "up": self.up,
        }
        if self.synced:
            m["ts"] = self.t0_ms + self.up
        self.seq += 1
        return m

    def advance(self, ms: int = 10_000, w: int = 1500) -> None:
        """Charge every slot at `w` watts for `ms` milliseconds (integer mWh)."""
        self.up += ms
        for i in range(self.n):
            self.e_mwh[i] += w * ms // 3600
        self.e_wh += self.n * w * ms // 3_600_000

    def telemetry(self) -> tuple[str, bytes]:
        m = self.common()
        if self.meter:
            m["meter"] = {"e_wh": self.e_wh, "p_w": 1500 * self.n, "sn": 12345678}
        m["slots"] = [
            {
                "n": i + 1,
                "st": "C",
                "mv": 67200,
                "ma": 15250,
                "e_mwh": self.e_mwh[i],
                "b_mwh": self.b_mwh[i],
            }
            for i in range(self.n)
        ]
        m["err"] = {
            "mb_to": 0,
            "mb_crc": 0,
            "mb_exc": 0,
            "mb_addr": 0,
            "ser_cs": 0,
            "ser_to": 0,
            "ser_bad": 0,
        }
        return "telemetry", signed(m, self.key)

    def event(self, ev: str, **fields: Any) -> tuple[str, bytes]:
        m = self.common()
        m["ev"] = ev
        m.update(fields)
        return "event", signed(m, self.key)

    def boot_event(self) -> tuple[str, bytes]:
        restored = {str(i + 1): self.b_mwh[i] for i in range(self.n)}
        return self.event("boot", fw="test-1.0", reset="power", restored=restored)

    def reboot(self) -> None:
        """Restart: registers restored from 'flash' as they are now, boot + 1, seq from 0;
        the wall clock goes on (2 s for the restart) while uptime starts again."""
        self.t0_ms += self.up + 2000 - 1000
        self.boot += 1
        self.seq = 0
        self.up = 1000
        self.b_mwh = list(self.e_mwh)

    def topic(self, kind: str, prefix: str = "stations") -> str:
        return f"{prefix}/{self.sid}/{kind}"


# ---- malformed messages: (name, topic, payload, expected reason) ---------------------------

HUGE = 340_282_366_920_938_463_463_374_607_431_768_211_456  # 2**128, ~3.4e38: no SQLite int
FAR_TS = 4_102_444_800_000  # 2100-01-01
GOOD_SID = "KH-PNH-0001"
OTHER_SID = "KH-PNH-0002"  # a known station, for topic/payload mismatches
REVOKED_SID = "KH-PNH-0003"  # a station whose only key is revoked
UNKNOWN_SID = "KH-ZZZ-9999"  # no key at all


def _replace_sig(payload: bytes, new: bytes) -> bytes:
    i = payload.rfind(b',"sig":"')
    return payload[:i] + new


def deep(obj: dict[str, Any], n: int, key: bytes) -> bytes:
    """`obj` with `"x":[[…0…]]` nested `n` deep added (as bytes: json.dumps itself would
    recurse), signed."""
    b = compact(obj)
    return sign(b[:-1] + b',"x":' + b"[" * n + b"0" + b"]" * n + b"}", key)


def malformed_cases(prefix: str = "stations") -> list[tuple[str, str, bytes, str]]:
    """Every kind of bad message the agent must quarantine, each with its precise reason.
    Keys: `key_for(GOOD_SID)` and `key_for(OTHER_SID)` (kid 1) are known, REVOKED_SID's
    kid 1 is revoked, UNKNOWN_SID has none."""
    st = Station(GOOD_SID, boot=900)  # boot 900: never collides with the good stream
    key = st.key
    t = f"{prefix}/{GOOD_SID}/telemetry"
    e = f"{prefix}/{GOOD_SID}/event"

    def tel(**over: Any) -> dict[str, Any]:
        m = {
            "v": 1,
            "sid": GOOD_SID,
            "kid": 1,
            "boot": 900,
            "seq": st.seq,
            "up": 5000,
            "ts": T0_MS,
            "slots": [{"n": 1, "e_mwh": 1000, "b_mwh": 0}],
        }
        st.seq += 1
        m.update(over)
        return {k: v for k, v in m.items() if v is not ...}

    def ev(name: str, **fields: Any) -> dict[str, Any]:
        m = tel(slots=...)
        m["ev"] = name
        m.update(fields)
        return m

    good = signed(tel(), key)
    alarm = ev("alarm", code="x", level="warn", msg="caf\u00e9")
    big = tel(pad="x" * 4100)
    cases: list[tuple[str, str, bytes, str]] = [
        ("bad_json", t, sign(b'{"v":1,"sid":"KH-PNH-0001",}', key), "bad_json"),
        ("not_an_object_inside", t, sign(b'{"v":1,"sid":[1,2}', key), "bad_json"),
        ("truncated_in_body", t, good[: len(good) // 2], "sig_missing"),
        ("truncated_in_sig", t, good[:-10], "sig_length"),
        (
            "not_ascii",
            e,
            sign(json.dumps(alarm, separators=(",", ":"), ensure_ascii=False).encode(), key),
            "not_ascii",
        ),
        ("too_large", t, signed(big, key), "too_large"),
        ("duplicate_key", t, sign(compact(tel())[:-1] + b',"up":5000}', key), "duplicate_key"),
        ("sig_twice", t, sign(compact(tel(sig="00")), key), "duplicate_key"),
        ("missing_sig", t, compact(tel()), "sig_missing"),
        (
            "sig_not_last",
            t,
            _replace_sig(good, b',"sig":"' + b"a" * 64 + b'","up":1}'),
            "sig_not_last",
        ),
        ("uppercase_hex", t, good[:-66] + good[-66:-2].upper() + b'"}', "sig_hex"),
        ("non_hex_sig", t, good[:-66] + b"g" * 64 + b'"}', "sig_hex"),
        ("short_hex", t, good[:-66] + good[-65:-2] + b'"}', "sig_length"),
        ("long_hex", t, good[:-66] + good[-66:-2] + b'0"}', "sig_length"),
        ("trailing_bytes", t, signed(tel(), key) + b"\n", "sig_trailing"),
        ("bad_sig", t, signed(tel(), key_for(GOOD_SID, 2)), "bad_sig"),
        ("tampered", t, signed(tel(up=5000), key).replace(b'"up":5000', b'"up":5001'), "bad_sig"),
        ("wrong_kid", t, signed(tel(kid=7), key), "unknown_kid"),
        (
            "revoked_key",
            f"{prefix}/{REVOKED_SID}/telemetry",
            signed(tel(sid=REVOKED_SID), key_for(REVOKED_SID)),
            "revoked_key",
        ),
        (
            "unknown_station",
            f"{prefix}/{UNKNOWN_SID}/telemetry",
            signed(tel(sid=UNKNOWN_SID), key_for(UNKNOWN_SID)),
            "unknown_station",
        ),
        (
            "topic_sid_mismatch",
            f"{prefix}/{OTHER_SID}/telemetry",
            signed(tel(), key),
            "topic_mismatch",
        ),
        ("bad_topic_sid", f"{prefix}/kh-pnh-0001/telemetry", signed(tel(), key), "bad_topic"),
        ("float_integral", t, signed(tel(up=5000.0), key), "bad_up"),
        ("bool_seq", t, signed(tel(seq=True), key), "bad_header"),
        ("negative_seq", t, signed(tel(seq=-1), key), "bad_header"),
        ("v_2", t, signed(tel(v=2), key), "bad_version"),
        ("v_string", t, signed(tel(v="1"), key), "bad_version"),
        ("bad_sid", t, signed(tel(sid="kh-pnh-0001"), key), "bad_sid"),
        ("no_ev", e, signed(tel(), key), "unknown_event"),
        ("event_on_telemetry_topic", t, signed(ev("outbox_drop", n=1), key), "kind_mismatch"),
        ("missing_up", t, signed(tel(up=...), key), "bad_up"),
        ("missing_seq", t, signed(tel(seq=...), key), "bad_header"),
        # CONTRACT §2 envelope ranges (§6.9: these quarantine the whole message)
        ("huge_kid", t, signed(tel(kid=HUGE), key), "bad_header"),
        ("huge_boot", t, signed(tel(boot=HUGE), key), "bad_header"),
        ("boot_2_31", t, signed(tel(boot=2**31), key), "bad_header"),
        ("huge_seq", t, signed(tel(seq=HUGE), key), "bad_header"),
        ("huge_up", t, signed(tel(up=HUGE), key), "bad_up"),
        ("up_over_ten_years", t, signed(tel(up=320_000_000_001), key), "bad_up"),
        ("negative_up", t, signed(tel(up=-1), key), "bad_up"),
        ("huge_ts", t, signed(tel(ts=HUGE), key), "bad_ts"),
        ("far_ts", t, signed(tel(ts=FAR_TS), key), "bad_ts"),
        ("ts_before_2020", t, signed(tel(ts=1_577_836_799_999), key), "bad_ts"),
        ("ts_string", t, signed(tel(ts=str(T0_MS)), key), "bad_ts"),
        ("nested_5", t, signed(tel(x=[[[[1]]]]), key), "too_deep"),
        ("nested_1000", t, deep(tel(), 1000, key), "too_deep"),
        ("non_compact", t, sign(json.dumps(tel()).encode(), key), "not_compact"),
        (
            "space_after_colon",
            t,
            sign(compact(tel()).replace(b'"up":', b'"up": '), key),
            "not_compact",
        ),
    ]
    return cases


def good_bat() -> dict[str, Any]:
    """A `bat` object with every field in its range (CONTRACT §5.2)."""
    return {
        "id": "B0000001",
        "soc": 500,
        "soh": 990,
        "mv": 67000,
        "ma": 1000,
        "t": 250,
        "tmin": 240,
        "cyc": 3,
        "flt": 0,
        "life_wh": 1000,
    }


def spoiled_cases(
    prefix: str = "stations", boot: int = 901
) -> list[tuple[str, str, bytes, tuple[tuple[str, str], ...]]]:
    """Signed messages with a good envelope and a bad field elsewhere (CONTRACT §6.9): each is
    stored as received, and only the source of the bad field is spoiled. (name, topic,
    payload, spoiled) with spoiled as `agent.ranges.clean` names it. GOOD_SID's key, boot
    901 (never collides with `malformed_cases` or a good stream)."""
    st = Station(GOOD_SID, boot=boot)
    key = st.key
    t = f"{prefix}/{GOOD_SID}/telemetry"
    e = f"{prefix}/{GOOD_SID}/event"
    slot = {"n": 1, "e_mwh": 1000, "b_mwh": 0}
    bat = good_bat()

    def tel(**over: Any) -> dict[str, Any]:
        m = {
            "v": 1,
            "sid": GOOD_SID,
            "kid": 1,
            "boot": boot,
            "seq": st.seq,
            "up": 5000 + st.seq,
            "ts": T0_MS + st.seq,
            "meter": {"e_wh": 1000, "p_w": 10, "sn": 7},
            "slots": [dict(slot), {"n": 2, "e_mwh": 500, "b_mwh": 0, "bat": dict(bat)}],
        }
        st.seq += 1
        m.update(over)
        return {k: v for k, v in m.items() if v is not ...}

    def ev(name: str, **fields: Any) -> dict[str, Any]:
        m = tel(slots=..., meter=...)
        m["ev"] = name
        m.update(fields)
        return m

    def slots(s1: dict[str, Any] | None = None, b2: dict[str, Any] | None = None) -> Any:
        return [
            dict(slot, **(s1 or {})),
            {"n": 2, "e_mwh": 500, "b_mwh": 0, "bat": dict(bat, **(b2 or {}))},
        ]

    s2 = "slots[n=2]"
    cases: list[tuple[str, str, bytes, tuple[tuple[str, str], ...]]] = [
        ("good", t, signed(tel(), key), ()),
        (
            "soc_2000",
            t,
            signed(tel(slots=slots(b2={"soc": 2000})), key),
            (("bat:2", f"{s2}.bat.soc"),),
        ),
        (
            "soc_string",
            t,
            signed(tel(slots=slots(b2={"soc": "53"})), key),
            (("bat:2", f"{s2}.bat.soc"),),
        ),
        (
            "huge_e_mwh",
            t,
            signed(tel(slots=slots({"e_mwh": HUGE})), key),
            (("slot:1", "slots[n=1].e_mwh"),),
        ),
        (
            "float_e_mwh",
            t,
            signed(tel(slots=slots({"e_mwh": 1000.5})), key),
            (("slot:1", "slots[n=1].e_mwh"),),
        ),
        (
            "negative_e_mwh",
            t,
            signed(tel(slots=slots({"e_mwh": -5})), key),
            (("slot:1", "slots[n=1].e_mwh"),),
        ),
        (
            "string_mv",
            t,
            signed(tel(slots=slots({"mv": "67200"})), key),
            (("slot:1", "slots[n=1].mv"),),
        ),
        (
            "bool_n",
            t,
            signed(tel(slots=[{"n": True, "e_mwh": 1}]), key),
            (("slots", "slots[0].n"),),
        ),
        ("slot_17", t, signed(tel(slots=[{"n": 17, "e_mwh": 1}]), key), (("slots", "slots[0].n"),)),
        ("huge_meter", t, signed(tel(meter={"e_wh": HUGE}), key), (("meter", "meter.e_wh"),)),
        (
            "meter_over_100_gwh",
            t,
            signed(tel(meter={"e_wh": 10**11 + 1}), key),
            (("meter", "meter.e_wh"),),
        ),
        ("huge_err", t, signed(tel(err={"mb_to": HUGE}), key), (("err", "err.mb_to"),)),
        (
            "huge_bat_everywhere",
            t,
            signed(tel(slots=slots(b2={k: HUGE for k in bat if k != "id"})), key),
            (("bat:2", f"{s2}.bat.soc"),),
        ),
        ("hist_2", t, signed(tel(hist=2), key), (("hist", "hist"),)),
        ("missing_slots", t, signed(tel(slots=...), key), ()),
        ("unknown_event", e, signed(ev("explode"), key), (("event", "ev=explode"),)),
        (
            "missing_event_field",
            e,
            signed(ev("session_start", slot=1, bat="B1", soc=500), key),
            (("event", "e_mwh"),),
        ),
        (
            "bad_reset_cause",
            e,
            signed(ev("boot", fw="1", reset="cosmic", restored={}), key),
            (("event", "reset"),),
        ),
        (
            "restored_superscript_key",  # "²" is a digit to str.isdigit, not to int()
            e,
            signed(ev("boot", fw="1", reset="power", restored={"\u00b2": 1}), key),
            (("event", "restored"),),
        ),
        (
            "huge_session_energy",
            e,
            signed(ev("session_start", slot=1, bat="B1", e_mwh=HUGE, soc=1), key),
            (("event", "e_mwh"),),
        ),
        ("gwh_reading", t, signed(tel(slots=slots({"e_mwh": 10**12})), key), ()),
    ]
    return cases


# ---- publishing to a real broker -----------------------------------------------------------


class Publisher:
    """A paho publisher for tests: QoS 1, in order, each message confirmed by PUBACK.
    Survives broker restarts: whatever was not confirmed is published again once the
    connection is back (a byte-identical resend, which the agent counts as a duplicate)."""

    def __init__(
        self,
        port: int,
        client_id: str = "test-pub",
        window: int = 50,
        login: tuple[str, str] | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.window = window
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.c.reconnect_delay_set(0.05, 0.5)
        if login:
            self.c.username_pw_set(*login)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.resent = 0

    def send(
        self, items: list[tuple[str, bytes]], timeout: float = 60.0, pace_s: float = 0.0
    ) -> None:
        import collections
        import time

        deadline = time.monotonic() + timeout
        pending: collections.deque[tuple[tuple[str, bytes], Any]] = collections.deque()

        def done(info: Any) -> bool:
            try:
                return bool(info.is_published())
            except (RuntimeError, ValueError):  # published while the link was down
                return False

        def wait_first() -> None:
            info = pending[0][1]
            while True:
                if done(info):
                    pending.popleft()
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"publishing: {len(pending)} unconfirmed")
                # wait a little; if the link broke, publish the unconfirmed ones again
                t0 = time.monotonic()
                while not done(info) and time.monotonic() - t0 < 2.0:
                    time.sleep(0.005)
                if not done(info):
                    while not self.c.is_connected() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    again = [it for it, inf in pending if not done(inf)]
                    pending.clear()
                    for it in again:
                        pending.append((it, self.c.publish(it[0], it[1], qos=1)))
                        self.resent += 1
                    if not pending:
                        return
                    info = pending[0][1]

        for item in items:
            pending.append((item, self.c.publish(item[0], item[1], qos=1)))
            if pace_s:
                time.sleep(pace_s)
            while len(pending) >= self.window:
                wait_first()
        while pending:
            wait_first()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def stored_rows(
    stream: list[tuple[str, bytes]], recv_ms: Any = lambda i: 1_764_150_000_000 + i
) -> tuple[list[Any], list[Any]]:
    """A stream as the agent stores it (RawRow) and meters it (RawMsg); `recv_ms(i)`: the
    receive time of the i-th message."""
    from agent.ledger import RawMsg
    from agent.store import RawRow
    from agent.wire import decode_record

    rows, msgs = [], []
    for i, (topic, payload) in enumerate(stream):
        body = decode_record(payload)
        sid, boot, seq, recv = body["sid"], body["boot"], body["seq"], recv_ms(i)
        kind = topic.rsplit("/", 1)[1]
        rows.append(RawRow(sid, boot, seq, kind, topic, recv, body["kid"], payload))
        msgs.append(RawMsg(sid=sid, boot=boot, seq=seq, recv_ms=recv, body=body))
    return rows, msgs


def assert_days_roll_up(rows: list[Any]) -> None:
    """Each stored day record is the roll-up of its day's interval records (an adjustment
    included), as records.day_record makes it from the records alone: compute() rolls days
    up with the engine's own code, so comparing with it cannot catch a wrong roll-up."""
    from agent.ledger.records import DAY_MS, day_record
    from agent.store import row_to_record

    recs = [row_to_record(r) for r in rows]
    for d in (r for r in recs if r.kind == "day"):
        day = [
            r
            for r in recs
            if r.kind == "interval" and (r.sid, r.slot) == (d.sid, d.slot)
            and r.start_ms // DAY_MS == d.start_ms // DAY_MS
        ]  # fmt: skip
        assert day_record(d.sid, d.slot, d.start_ms // DAY_MS, day) == d, d


def fill_store(url: str, rows: list[Any], msgs: list[Any]) -> str:
    """An agent database holding `rows` as raw, the records computed from `msgs` and the
    stations' keys (kid 1), as an agent that took them would leave it; returns `url`."""
    from agent.keys import KeyStore
    from agent.ledger import compute
    from agent.store import Store, record_to_row

    with Store(url) as st:
        st.write_batch(rows)
        st.replace_records({"": [record_to_row(r) for r in compute(msgs)]}, everything=True)
        ks = KeyStore(st)
        for sid in sorted({r.sid for r in rows}):
            ks.add(sid, key_for(sid), kid=1)
    return url


def stored_and_computed(url: str) -> tuple[bytes, bytes]:
    """(the interval export of the records an agent stored, the same export of the records
    the pure computation makes from the raw messages it stored): equal when nothing was
    lost, counted twice or metered by two writers."""
    from agent.ledger.agent_meter import decode_row
    from agent.ledger.compute import compute
    from agent.ledger.export import render
    from agent.store import Store, row_to_record

    with Store(url, create=False) as st:
        stored = render([row_to_record(r) for r in st.record_rows()], "csv", by="interval")
        msgs = [decode_row(r) for page in st.iter_raw() for r in page]
    return stored, render(compute(msgs), "csv", by="interval")


def fleet_stream(
    stations: int = 6,
    per_station: int = 300,
    prefix: str = "stations",
    sid_base: str = "KH-TST",
    step_ms: int = 10_000,
) -> list[tuple[str, bytes]]:
    """A reproducible stream of a small fleet, interleaved in time: a boot event, telemetry
    every 10 s, a charging session per slot, and one reboot (with its boot event and the
    registers restored from 'flash') half-way. Stations are synced (ts), so that records
    do not depend on arrival time."""
    sts = [Station(f"{sid_base}-{i:04d}", slots=2, boot=3 + i) for i in range(stations)]
    out: list[tuple[str, bytes]] = []

    def put(st: Station, kp: tuple[str, bytes]) -> None:
        out.append((st.topic(kp[0], prefix), kp[1]))

    for st in sts:
        put(st, st.boot_event())
    for k in range(per_station):
        for j, st in enumerate(sts):
            if k == per_station // 2:
                st.advance(5000, 1200 + 100 * j)  # energy made but not sent before the restart
                st.reboot()
                put(st, st.boot_event())
            if k == per_station // 2 + 5:
                put(
                    st,
                    st.event("session_start", slot=1, bat=f"B{j:07d}", e_mwh=st.e_mwh[0], soc=200),
                )
                st.s0 = (st.e_mwh[0], st.up)  # type: ignore[attr-defined]
            st.advance(step_ms, 1200 + 100 * j)
            put(st, st.telemetry())
            if k == per_station - 20:
                e0, up0 = st.s0  # type: ignore[attr-defined]
                put(
                    st,
                    st.event(
                        "session_end",
                        slot=1,
                        bat=f"B{j:07d}",
                        e0_mwh=e0,
                        e1_mwh=st.e_mwh[0],
                        soc0=200,
                        soc1=900,
                        up0=up0,
                        up1=st.up,
                        why="full",
                    ),
                )
    return out


# ---- the agent as a process (`stationctl agent --config …`) --------------------------------


class AgentProcess:
    """`python -m stationctl agent` on a TOML of its own: its log in `log`, its
    `/healthz` and `/metrics` on `[health]` at a free port."""

    def __init__(
        self,
        tmp: Any,
        db_url: str,
        broker_port: int,
        *,
        client_id: str = "proc-agent",
        extra: str = "",
        broker_extra: str = "",
        cwd: Any = None,
        log_level: str = "info",
        records_ms: int = 50,
    ) -> None:
        import pathlib

        from tests.helpers import ROOT, free_port

        self.dir = pathlib.Path(tmp)
        self.health_port = free_port()
        self.cfg = self.dir / f"{client_id}.toml"
        self.cfg.write_text(
            f'[db]\nurl = "{db_url}"\nsynchronous = "normal"\n'
            f'[broker]\nport = {broker_port}\nclient_id = "{client_id}"\n{broker_extra}'
            f"[ingest]\nrecords_interval_ms = {records_ms}\n"
            f"[health]\nport = {self.health_port}\n" + extra
        )
        self.log = self.dir / f"{client_id}.log"
        self.log_level = log_level
        self.cwd = cwd or ROOT
        self.proc: Any = None
        self._from = 0

    def start(self) -> AgentProcess:
        import subprocess

        self._from = self.log.stat().st_size if self.log.exists() else 0  # this run's log
        self.proc = subprocess.Popen(
            [*STATIONCTL, "agent", "--config", str(self.cfg), "--log-level", self.log_level],
            cwd=self.cwd,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        return self

    def log_text(self) -> str:
        if not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            f.seek(self._from)
            return f.read().decode(errors="replace")

    def wait_log(self, needle: str, timeout: float = 30.0, count: int = 1) -> None:
        import time

        end = time.monotonic() + timeout
        while self.log_text().count(needle) < count:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > end:
                raise TimeoutError(f"no {needle!r} in the agent's log:\n{self.log_text()}")
            time.sleep(0.05)

    def get(self, path: str) -> tuple[int, bytes]:
        import urllib.error
        import urllib.request

        url = f"http://127.0.0.1:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())

    def healthz(self) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/healthz")
        return status, json.loads(body)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent)."""
        _, body = self.get("/metrics")
        want = name + (
            "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
        )
        for line in body.decode().splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, timeout: float = 15.0) -> tuple[float, int]:
        """SIGTERM; (seconds until the process is gone, exit status)."""
        import signal
        import time

        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        return time.monotonic() - t0, int(rc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
