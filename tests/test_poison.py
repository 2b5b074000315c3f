"""A poison corpus through Mosquitto into a running agent (`stationctl agent`, a process):
every message validly signed, each made to break something — a very large integer in
every integer field, a huge `up`, a far `ts`, nesting 1000 deep, an out-of-range `soc`,
strings where numbers belong, 1 GWh readings — interleaved with a good station's traffic.

Each poison message is quarantined with its precise reason (an envelope field, depth) or
stored as received with only its source spoiled (CONTRACT §6.9); the good station's export
is byte for byte that of a run without the poison; the agent then stops on SIGTERM within
5 s.
"""

from __future__ import annotations

import json
import pathlib
import sqlite3
import subprocess
import time
from collections import Counter
from typing import Any

from agent import ranges, wire
from agent.keys import KeyStore
from tests.agent_helpers import (
    STATIONCTL,
    T0_MS,
    AgentProcess,
    Publisher,
    Station,
    deep,
    fleet_stream,
    good_bat,
    key_for,
    signed,
)
from tests.helpers import ROOT
from tools.mosquitto import Mosquitto

HUGE = 34 * 10**40  # 3.4e41: the integer that stopped the fleet (SQLite cannot hold it)
GOOD = "KH-GOOD"  # fleet_stream's stations are KH-GOOD-0000, KH-GOOD-0001
BAD = "KH-BAD-0001"  # the poison station
GWH = "KH-BAD-0002"  # a station whose readings claim a gigawatt-hour

Expect = str | tuple[str, ...]  # a quarantine reason, or the spoiled source kinds


def poison_corpus() -> list[tuple[str, str, bytes, Expect]]:
    """(name, topic, payload, expected outcome), all signed with BAD's (or GWH's) key."""
    key = key_for(BAD)
    seq = iter(range(10_000))
    t = f"stations/{BAD}/telemetry"
    e = f"stations/{BAD}/event"
    out: list[tuple[str, str, bytes, Expect]] = []

    def tel() -> dict[str, Any]:
        s = next(seq)
        up = 10_000 + 1000 * s
        return {
            "v": 1,
            "sid": BAD,
            "kid": 1,
            "boot": 5,
            "seq": s,
            "up": up,
            "ts": T0_MS + up,
            "meter": {"e_wh": 1000, "p_w": 10, "sn": 7},
            "slots": [
                {"n": 1, "st": "C", "mv": 67200, "ma": 1000, "e_mwh": 1000 + s, "b_mwh": 0},
                {"n": 2, "e_mwh": 500, "b_mwh": 0, "bat": good_bat()},
            ],
            "err": {
                k: 0
                for k in ("mb_to", "mb_crc", "mb_exc", "mb_addr", "ser_cs", "ser_to", "ser_bad")
            },
        }

    def ev(name: str, **fields: Any) -> dict[str, Any]:
        m = tel()
        del m["meter"], m["slots"], m["err"]
        m["ev"] = name
        m.update(fields)
        return m

    def add(name: str, topic: str, m: dict[str, Any] | bytes, expect: Expect) -> None:
        out.append((name, topic, m if isinstance(m, bytes) else signed(m, key), expect))

    # a very large integer in every integer field
    for f, reason in (
        ("kid", "bad_header"),
        ("boot", "bad_header"),
        ("seq", "bad_header"),
        ("up", "bad_up"),
        ("ts", "bad_ts"),
    ):
        add(f"huge_{f}", t, {**tel(), f: HUGE}, reason)
    add("huge_v", t, {**tel(), "v": HUGE}, "bad_version")
    add("huge_hist", t, {**tel(), "hist": HUGE}, ("hist",))
    for f in ("e_wh", "p_w", "sn"):
        m = tel()
        m["meter"][f] = HUGE
        add(f"huge_meter_{f}", t, m, ("meter",))
    m = tel()
    m["slots"][0]["n"] = HUGE
    add("huge_slot_n", t, m, ("slots",))
    for f in ("e_mwh", "b_mwh", "mv", "ma"):
        m = tel()
        m["slots"][0][f] = HUGE
        add(f"huge_slot_{f}", t, m, ("slot",))
    for f in ("soc", "soh", "mv", "ma", "t", "tmin", "cyc", "flt", "life_wh"):
        m = tel()
        m["slots"][1]["bat"][f] = HUGE
        add(f"huge_bat_{f}", t, m, ("bat",))
    for f in ("mb_to", "mb_crc", "mb_exc", "mb_addr", "ser_cs", "ser_to", "ser_bad"):
        m = tel()
        m["err"][f] = HUGE
        add(f"huge_err_{f}", t, m, ("err",))
    add("huge_restored", e, ev("boot", fw="x", reset="power", restored={"1": HUGE}), ("event",))
    add(
        "huge_restored_slot",
        e,
        ev("boot", fw="x", reset="power", restored={str(HUGE): 1}),
        ("event",),
    )
    start = {"slot": 1, "bat": "B1", "e_mwh": 5, "soc": 100}
    for f in ("slot", "e_mwh", "soc"):
        add(f"huge_session_start_{f}", e, ev("session_start", **{**start, f: HUGE}), ("event",))
    end = {
        "slot": 1,
        "bat": "B1",
        "e0_mwh": 5,
        "e1_mwh": 9,
        "soc0": 100,
        "soc1": 200,
        "up0": 1,
        "up1": 2,
        "boot0": 5,
        "t0": T0_MS,
        "t1": T0_MS + 1,
        "why": "full",
    }
    for f in ("slot", "e0_mwh", "e1_mwh", "soc0", "soc1", "up0", "up1", "boot0", "t0", "t1"):
        add(f"huge_session_end_{f}", e, ev("session_end", **{**end, f: HUGE}), ("event",))
    add("huge_alarm_slot", e, ev("alarm", code="x", level="warn", msg="m", slot=HUGE), ("event",))
    add("huge_alarm_code", e, ev("alarm", code=HUGE, level="warn", msg="m"), ("event",))
    for f in ("from_wh", "to_wh", "sn"):
        reset = {"from_wh": 10, "to_wh": 0, "sn": 7, f: HUGE}
        add(f"huge_meter_reset_{f}", e, ev("meter_reset", **reset), ("event",))
    add("huge_outbox_drop", e, ev("outbox_drop", n=HUGE), ("event",))
    # the other poisons of the brief
    add("up_past_ten_years", t, {**tel(), "up": 320_000_000_001}, "bad_up")
    add("ts_in_2100", t, {**tel(), "ts": 4_102_444_800_000}, "bad_ts")
    add("ts_before_2020", t, {**tel(), "ts": 1_500_000_000_000}, "bad_ts")
    add("nested_1000", t, deep(tel(), 1000, key), "too_deep")
    add("nested_5", t, {**tel(), "x": [[[[0]]]]}, "too_deep")
    m = tel()
    m["slots"][1]["bat"]["soc"] = 1001
    add("soc_1001", t, m, ("bat",))
    m = tel()
    m["slots"][1]["bat"]["soc"] = -1
    add("soc_negative", t, m, ("bat",))
    m = tel()
    m["slots"][1]["bat"]["soc"] = "53"
    add("soc_string", t, m, ("bat",))
    m = tel()
    m["slots"][0]["e_mwh"] = "1000"
    add("e_mwh_string", t, m, ("slot",))
    m = tel()
    m["meter"]["e_wh"] = "1000"
    add("e_wh_string", t, m, ("meter",))
    m = tel()
    m["slots"][0]["e_mwh"] = 1000.0
    add("e_mwh_float", t, m, ("slot",))
    add("boot_string", t, {**tel(), "boot": "5"}, "bad_header")
    add("up_string", t, {**tel(), "up": "5"}, "bad_up")
    add("ts_float", t, {**tel(), "ts": float(T0_MS)}, "bad_ts")
    add("meter_not_an_object", t, {**tel(), "meter": [1, 2]}, ("meter",))
    add("slots_not_a_list", t, {**tel(), "slots": {"n": 1}}, ("slots",))
    # a gigawatt-hour: a first reading, then a jump across a reboot (metering's rule 0 / 3
    # holds them; here: ingest goes on and they are stored)
    g = Station(GWH, slots=1, boot=1)
    g.e_mwh[0] = 10**12
    g.advance(10_000, 100)
    for name, kp in (("gwh_first_reading", g.telemetry()),):
        out.append((name, g.topic(kp[0]), kp[1], ()))
    g.advance(10_000, 100)
    out.append(("gwh_second_reading", g.topic("telemetry"), g.telemetry()[1], ()))
    g.reboot()
    out.append(("gwh_boot", g.topic("event"), g.boot_event()[1], ()))
    g.e_mwh[0] += 10**12
    g.advance(10_000, 100)
    out.append(("gwh_jump_across_reboot", g.topic("telemetry"), g.telemetry()[1], ()))
    return out


def _interleave(
    good: list[tuple[str, bytes]], bad: list[tuple[str, bytes]]
) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    step = max(1, len(good) // (len(bad) + 1))
    it = iter(bad)
    for i, item in enumerate(good):
        out.append(item)
        if i % step == step - 1:
            out.extend(x for x in [next(it, None)] if x is not None)
    out.extend(it)
    return out


def _counts(db: pathlib.Path) -> tuple[int, int]:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        raw = c.execute("SELECT COUNT(*) FROM raw").fetchone()[0]
        q = c.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
        return int(raw), int(q)
    finally:
        c.close()


def _wait_counts(
    agent: AgentProcess, db: pathlib.Path, raw: int, q: int, timeout: float = 60
) -> None:
    end = time.monotonic() + timeout
    while True:
        got = _counts(db)
        if got == (raw, q):
            return
        if time.monotonic() > end:
            raise TimeoutError(
                f"raw, quarantine = {got}, want {(raw, q)}\n{agent.log_text()[-3000:]}"
            )
        if agent.proc.poll() is not None:
            raise RuntimeError(f"agent exited {agent.proc.returncode}\n{agent.log_text()}")
        time.sleep(0.1)


def _export(db: pathlib.Path, by: str) -> list[str]:
    out = subprocess.run(
        [*STATIONCTL, "export", "--db", f"sqlite:///{db}", "--format", "json", "--by", by],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if f'"sid":"{GOOD}-' in line]


def _run(
    tmp: pathlib.Path, port: int, name: str, items: list[tuple[str, bytes]], raw: int, q: int
) -> tuple[AgentProcess, pathlib.Path, float, int]:
    db = tmp / f"{name}.db"
    with KeyStore(f"sqlite:///{db}") as ks:
        for sid in (f"{GOOD}-0000", f"{GOOD}-0001", BAD, GWH):
            ks.add(sid, key_for(sid))
    agent = AgentProcess(tmp, f"sqlite:///{db}", port, client_id=name).start()
    try:
        agent.wait_log("subscribed to")
        pub = Publisher(port, client_id=f"{name}-pub")
        pub.send(items, timeout=120)
        pub.close()
        _wait_counts(agent, db, raw, q)
        status, h = agent.healthz()
        assert status == 200 and h["status"] == "ok" and h["pending"] == 0, h
        took, rc = agent.stop()
    finally:
        agent.kill()
    return agent, db, took, rc


def test_poison_corpus_stops_nothing(mosquitto: Mosquitto, tmp_path: pathlib.Path) -> None:
    good = fleet_stream(stations=2, per_station=120, sid_base=GOOD)
    corpus = poison_corpus()
    names = Counter(n for n, *_ in corpus)
    assert max(names.values()) == 1
    stored = [c for c in corpus if isinstance(c[3], tuple)]
    quarantined = [c for c in corpus if isinstance(c[3], str)]

    # a clean run: the good stations alone
    _, clean_db, took0, rc0 = _run(tmp_path, mosquitto.port, "clean", good, len(good), 0)
    assert rc0 == 0 and took0 < 5.0

    # the poisoned run, checked while the agent still runs
    items = _interleave(good, [(t, p) for _, t, p, _ in corpus])
    db = tmp_path / "poison.db"
    with KeyStore(f"sqlite:///{db}") as ks:
        for sid in (f"{GOOD}-0000", f"{GOOD}-0001", BAD, GWH):
            ks.add(sid, key_for(sid))
    agent = AgentProcess(tmp_path, f"sqlite:///{db}", mosquitto.port, client_id="poison").start()
    try:
        agent.wait_log("subscribed to")
        pub = Publisher(mosquitto.port, client_id="poison-pub")
        pub.send(items, timeout=120)
        pub.close()
        _wait_counts(agent, db, len(good) + len(stored), len(quarantined))
        status, h = agent.healthz()
        assert status == 200 and h["status"] == "ok", h
        assert h["messages"]["stored"] == len(good) + len(stored)
        assert h["messages"]["quarantined"] == len(quarantined)
        assert h["messages"]["spoiled"] == sum(1 for c in stored if c[3])
        want_q = Counter(c[3] for c in quarantined)
        for reason, n in want_q.items():
            assert agent.metric("stationctl_agent_quarantine_total", reason=str(reason)) == n
        want_s = Counter(k for c in stored for k in c[3])
        for kind, n in want_s.items():
            assert agent.metric("stationctl_agent_spoiled_sources_total", source=kind) == n
        assert agent.metric("stationctl_agent_quarantine_total", reason="internal") == 0
        took, rc = agent.stop()
    finally:
        agent.kill()
    assert rc == 0 and took < 5.0, (took, rc)

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    raw = {bytes(r[0]) for r in con.execute("SELECT record FROM raw")}
    quar = {bytes(r[1]): r[0] for r in con.execute("SELECT reason, record FROM quarantine")}
    alarms = con.execute("SELECT sid, code, detail FROM alarms").fetchall()
    con.close()
    for name, _topic, payload, expect in corpus:
        if isinstance(expect, str):
            assert quar.get(payload) == expect, name
            assert payload not in raw, name
        else:
            assert payload in raw and payload not in quar, name
            sp = ranges.clean(wire.decode_record(payload)).spoiled
            assert tuple(src.split(":")[0] for src, _ in sp) == expect, (name, sp)
    # every good message stored, and each spoiled field alarmed for the poison station only
    assert {p for _, p in good} <= raw
    bad_fields = {d.split(":", 1)[0] for sid, code, d in alarms if code == "bad_field"}
    assert bad_fields == {
        path for c in stored for _, path in ranges.clean(wire.decode_record(c[2])).spoiled
    }
    assert {sid for sid, code, _ in alarms if code == "bad_field"} == {BAD}
    assert not [a for a in alarms if a[1] in ("internal", "agent_db")]

    # what the agent metered from the spoiled messages is what `stationctl verify`
    # recomputes from their stored bytes (the same §6.9 cleaning at ingest and after)
    r = subprocess.run(
        [*STATIONCTL, "verify", "--db", f"sqlite:///{db}", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr

    # the good stations' records: byte for byte those of the clean run
    for by in ("interval", "session", "day"):
        clean = _export(clean_db, by)
        assert clean, by
        assert _export(db, by) == clean, by
    print(json.dumps({"sigterm_s": {"clean": round(took0, 3), "poison": round(took, 3)}}))
