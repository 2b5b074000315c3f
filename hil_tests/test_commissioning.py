"""Commissioning: a provisioned station boots, announces itself and is trusted by the agent;
a replacement board for the same station continues its boot numbers with a new key."""

from __future__ import annotations

import hashlib
import re

from hil_tests.conftest import Bench
from hil_tests.harness import retained_status, wait_for


def test_commissioning(bench: Bench, make_dut) -> None:  # type: ignore[no-untyped-def]
    agent = bench.agent
    dut = make_dut()
    boot = wait_for(lambda: agent.events(dut.sid, "boot"), 60, "the boot event")[0]
    assert boot["restored"] == {str(n): 0 for n in range(1, dut.slots + 1)}  # a new station
    assert boot["fw"] and boot["reset"] in ("power", "wdt", "soft", "hard", "deep", "unknown")
    assert boot["kid"] == dut.kid and boot["seq"] == 0

    def with_meter() -> list:  # type: ignore[type-arg]
        return [m for m in agent.telemetry(dut.sid) if "meter" in m.body]

    tel = wait_for(with_meter, 60, "telemetry with the meter")[0].body
    assert [s["n"] for s in tel["slots"]] == list(range(1, dut.slots + 1))
    assert all(s.get("st") == "I" and s["e_mwh"] == 0 for s in tel["slots"])
    assert tel["meter"]["sn"] == dut.rig.model.meter_serial
    assert set(tel["err"]) == {
        "mb_to",
        "mb_crc",
        "mb_exc",
        "mb_addr",
        "ser_to",
        "ser_cs",
        "ser_bad",
    }

    st = retained_status(bench.broker.port, dut.sid)
    assert st["state"] == "online" and st["sid"] == dut.sid and st["boot"] == tel["boot"]
    assert re.fullmatch(r"[0-9a-f]{12}", st["cfg"])
    if not dut.real_board:  # the hash of the config.json the station booted from
        digest = hashlib.sha256((dut.flash / "config.json").read_bytes()).hexdigest()
        assert st["cfg"] == digest[:12]
    assert agent.quarantine(dut.sid) == []

    # a replacement board: provisioned afresh for the same station, it must never repeat a
    # (sid, boot, seq) the agent has, and signs with a new key version
    first_boot = tel["boot"]
    dut.stop()
    name = dut.sid.split("-")[1]
    new = bench.dut(name, board="b")
    try:
        b2 = wait_for(
            lambda: [e for e in agent.events(new.sid, "boot") if e["kid"] != dut.kid],
            60,
            "the replacement board's boot event",
        )[0]
        assert new.sid == dut.sid and new.kid == dut.kid + 1
        assert b2["boot"] > first_boot
        wait_for(
            lambda: [m for m in agent.telemetry(new.sid) if m.body["kid"] == new.kid],
            60,
            "telemetry signed with the new key",
        )
        assert agent.quarantine(new.sid) == []
    finally:
        new.stop()
        bench.duts.remove(new)
