"""The station firmware on MicroPython (heap capped at an ESP32's budget) against the rig
simulators over ptys: energy against ground truth, injected faults against error counters,
and power cuts (SIGKILL) against the persisted registers and boot counter."""

from __future__ import annotations

import json
import pathlib
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.wire import StaticKeys, verify
from tools.mosquitto import Mosquitto
from tools.rig.faults import FaultRates
from tools.rig.rig import Rig
from tools.station_proc import FIRMWARE, StationProcess, station_config

sys.path.insert(0, str(FIRMWARE))
import persist  # noqa: E402  (the firmware's own store, read on CPython)

SID = "KH-TST-0001"
TOLERANCE = 0.005  # 0.5 % of the slot's delivered energy (see energy.SlotEnergy's bound)


def slot_regs(tel: dict[str, Any]) -> dict[int, int]:
    return {s["n"]: s["e_mwh"] for s in tel["body"]["slots"]}


def test_charge_of_several_batteries_matches_ground_truth(tmp_path: pathlib.Path) -> None:
    with Rig(slots=4, seed=11, workdir=tmp_path / "rig") as rig:
        cfg = station_config(
            SID,
            rig.charger_path,
            rig.bus_path,
            slots=4,
            sample_ms=500,
            stale_s=3,
            bms={"per_cycle": 2},
        )
        st = StationProcess(tmp_path / "flash", cfg, heap="100k", trace_ms=500, uplink=False)
        st.start()
        try:
            st.wait_for(lambda: bool(st.telemetry()), 20, "first telemetry")
            rig.insert(1, pack="72V", power_w=1200, capacity_wh=3, soc=0.5)
            rig.insert(2, pack="60V", power_w=600, capacity_wh=2, soc=0.6)
            time.sleep(2)
            rig.insert(4, pack="72V", power_w=1500, capacity_wh=4, soc=0.5)
            time.sleep(4)
            rig.remove(2)  # taken out mid-charge
            st.wait_for(
                lambda: (
                    (t := st.last_telemetry()) is not None
                    and [s.get("st") for s in t["body"]["slots"]] == ["F", "I", "I", "F"]
                ),
                90,
                "batteries full",
            )
            time.sleep(1.5)
            tel = st.last_telemetry()
            truth = rig.ground_truth_mwh()
        finally:
            st.stop()
    regs = slot_regs(tel)
    assert truth[1] > 1000 and truth[2] > 100 and truth[4] > 1000
    # charged to full (soft start, CC, CV taper): power is continuous, 0.5 % holds
    for n in (1, 4):
        assert abs(regs[n] - truth[n]) <= TOLERANCE * truth[n], (n, regs[n], truth[n])
    # pulled out mid-charge: a step of power P between two samples adds up to h * P / 2
    step_mwh = 0.5 * 600 / 2 / 3.6
    assert abs(regs[2] - truth[2]) <= TOLERANCE * truth[2] + step_mwh, (regs[2], truth[2])
    assert regs[3] == 0 and truth[3] == 0
    # the meter is read every cycle and its register only grows
    e_wh = [t["body"]["meter"]["e_wh"] for t in st.telemetry() if "meter" in t["body"]]
    assert e_wh and e_wh == sorted(e_wh)
    # sessions: slots 1 and 4 end full, slot 2 ends removed
    ends = {e["body"]["slot"]: e["body"] for e in st.events() if e["body"]["ev"] == "session_end"}
    assert ends[1]["why"] == "full" and ends[4]["why"] == "full" and ends[2]["why"] == "removed"
    # a session spans C/V only: the soft start before the charger reports C and the trickle
    # after F fall outside it, so its energy sits just below the register's delta
    for n in (1, 4):
        assert 0 <= ends[n]["e0_mwh"] <= ends[n]["e1_mwh"] <= regs[n]
        assert ends[n]["e1_mwh"] - ends[n]["e0_mwh"] == pytest.approx(truth[n], rel=0.02)
    err = tel["body"]["err"]
    assert sum(err.values()) == 0, err


def test_injected_faults_equal_error_counters(tmp_path: pathlib.Path) -> None:
    rates = FaultRates.uniform(0.05, bus_timeout_s=0.15, charger_timeout_s=0.2)
    with Rig(slots=3, seed=5, faults=rates, workdir=tmp_path / "rig") as rig:
        cfg = station_config(
            SID,
            rig.charger_path,
            rig.bus_path,
            slots=3,
            sample_ms=300,
            stale_s=3,
            bus={"retries": 0, "timeout_ms": 150},
            bms={"per_cycle": 3},
        )
        bats = [
            rig.insert(1, pack="72V", power_w=1000, capacity_wh=20, soc=0.3),
            rig.insert(2, pack="60V", power_w=800, capacity_wh=20, soc=0.3),
            rig.insert(3, pack="72V", power_w=1500, capacity_wh=20, soc=0.3),
        ]
        ids = {b.serial for b in bats}
        st = StationProcess(
            tmp_path / "flash",
            cfg,
            heap="100k",
            trace_ms=1000,
            env={"STATION_CYCLES": "80"},
            uplink=False,
        )
        st.start()
        assert st.proc is not None
        st.proc.wait(120)
        time.sleep(0.5)  # the relays log a fault when its transaction's window closes
        faults = rig.fault_totals()
        truth = rig.ground_truth_mwh()
    tel = st.last_telemetry()
    assert tel is not None, st.output[-20:]
    err = tel["body"]["err"]
    assert sum(faults.values()) >= 10, faults  # 5 % of ~800 transactions
    assert sum(1 for t in st.telemetry() for s in t["body"]["slots"] if "bat" in s) > 0
    for k in ("mb_to", "mb_crc", "mb_exc", "mb_addr", "ser_to", "ser_cs", "ser_bad"):
        assert err[k] == faults.get(k, 0), (k, err, faults)
    # no reading is fabricated: every battery id reported is a real one, every reported
    # charger state is a letter of §3, registers never go down between telemetry lines
    prev: dict[int, int] = {}
    for t in st.telemetry():
        for s in t["body"]["slots"]:
            assert s["e_mwh"] >= prev.get(s["n"], 0)
            prev[s["n"]] = s["e_mwh"]
            if "st" in s:
                assert s["st"] in "IWCVFEX"
            if "bat" in s:
                assert s["bat"]["id"] in ids
    # bridged samples keep the energy close to the truth despite 5 % lost readings
    regs = slot_regs(tel)
    for n in (1, 2, 3):
        assert regs[n] <= truth[n] * (1 + TOLERANCE) + 50, (n, regs[n], truth[n])


def test_power_cuts_never_lower_a_register_and_boot_grows(tmp_path: pathlib.Path) -> None:
    rnd = random.Random(7)
    flash = tmp_path / "flash"
    with Rig(slots=2, seed=3, workdir=tmp_path / "rig") as rig:
        cfg = station_config(
            SID,
            rig.charger_path,
            rig.bus_path,
            slots=2,
            sample_ms=200,
            stale_s=3,
            persist={"every_mwh": 20, "every_s": 1},
            boot_base=40,
        )
        rig.insert(1, pack="72V", power_w=1500, capacity_wh=60, soc=0.2)
        rig.insert(2, pack="60V", power_w=1000, capacity_wh=60, soc=0.2)
        st = StationProcess(flash, cfg, heap="100k", trace_ms=200, uplink=False)
        last_boot = -1
        persisted: list[int] = [0, 0]
        kills = 0
        store = persist.ABStore(str(flash), "state", 4096)
        while kills < 22:
            st.start()
            st.wait_for(lambda: bool(st.telemetry()), 20, "telemetry after restart")
            boot = st.telemetry()[0]["boot"]
            assert boot > last_boot and boot >= 40
            regs = slot_regs(st.telemetry()[0])
            assert regs[1] >= persisted[0] and regs[2] >= persisted[1], (regs, persisted)
            last_boot = boot
            time.sleep(rnd.uniform(0.1, 1.5))
            st.kill()
            kills += 1
            saved = store.load()
            assert saved is not None, "no readable state after a power cut"
            assert saved["boot"] == boot
            assert saved["regs"][0] >= persisted[0] and saved["regs"][1] >= persisted[1]
            persisted = list(saved["regs"])
            # each of the two slot files is either a valid copy or the one being replaced
            readable = [persist.decode(p.read_bytes()) for p in sorted(flash.glob("state.*"))]
            assert any(r is not None for r in readable)
    assert kills >= 20
    assert persisted[0] > 0 and persisted[1] > 0
    boots = json.loads(json.dumps(last_boot))
    assert boots >= 40 + kills - 1


# ---- a meter answering with floats that are not readings, through MQTT ----------------------

KEY = bytes(range(32))
E_WH_MAX = 10**11  # CONTRACT §2 meter.e_wh; §4.1: 10^8 kWh
P_W_MAX = 10**7


class Published:
    """Every signed telemetry message the station publishes, verified as the agent would."""

    def __init__(self, port: int, sid: str) -> None:
        self.sid = sid
        self.keys = StaticKeys({(sid, 1): KEY})
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="published")
        self.c.on_message = self._on
        self.c.on_connect = lambda c, *_: c.subscribe(f"stations/{sid}/#", 1)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload)))

    def bodies(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            got = [p for t, p in self.got if t.endswith("/" + kind)]
        # verify() raises on a bad signature or anything out of the agent's schema
        return [verify(kind, self.sid, p, self.keys).body for p in got]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def test_meter_floats_out_of_range_are_counted_and_omitted(
    tmp_path: pathlib.Path, mosquitto: Mosquitto
) -> None:
    """The rig's meter answers (intact on the wire) NaN, ±inf, negative, 1e30, the largest
    float32 and 1.5e8 kWh, then a 1e30 W power: the station publishes telemetry without
    `meter` for as long as that lasts, with every slot register, never a value outside
    CONTRACT §2, and counts each such read in err.mb_bad; no meter_reset comes of it."""
    sid = "KH-TST-0003"
    pub = Published(mosquitto.port, sid)
    faults = [(k, "energy") for k in ("nan", "inf", "-inf", "negative", "huge", "max")]
    faults += [("above_range", "energy"), ("huge", "power"), ("nan", "power")]
    try:
        with Rig(slots=2, seed=17, workdir=tmp_path / "rig") as rig:
            rig.insert(1, pack="72V", power_w=1200, capacity_wh=20, soc=0.3)
            rig.insert(2, pack="60V", power_w=800, capacity_wh=20, soc=0.3)
            cfg = station_config(
                sid,
                rig.charger_path,
                rig.bus_path,
                slots=2,
                key_hex=KEY.hex(),
                broker_port=mosquitto.port,
                sample_ms=300,
                stale_s=3,
                telemetry_s=1,
                ntp="host",
            )
            st = StationProcess(tmp_path / "flash", cfg, heap="256k")
            st.start()
            try:
                tel = lambda: pub.bodies("telemetry")  # noqa: E731

                def bad_now() -> int:
                    t = tel()
                    return int(t[-1]["err"].get("mb_bad", 0)) if t else 0

                _wait(lambda: sum(1 for b in tel() if "meter" in b) >= 2, 60, "the meter")
                start_ms = time.time() * 1000
                for kind, register in faults:
                    before = bad_now()
                    rig.set_meter_fault(kind, register)
                    _wait(lambda b=before: bad_now() > b, 20, f"a bad reading ({kind})")
                    time.sleep(1.5)  # more telemetry while it lasts
                clear_ms = time.time() * 1000
                rig.set_meter_fault(None)
                _wait(
                    lambda: any("meter" in b and b["ts"] > clear_ms + 1500 for b in tel()),
                    20,
                    "the meter back",
                )
                time.sleep(1.5)
                reads = rig.model.meter_fault_reads
            finally:
                st.stop()
    finally:
        pub.close()
    bodies = pub.bodies("telemetry")
    events = pub.bodies("event")
    assert sorted(bodies[-1]["err"]) == sorted(
        ["mb_to", "mb_crc", "mb_exc", "mb_addr", "ser_to", "ser_cs", "ser_bad", "mb_bad"]
    )
    # one count per read answered with a bad float, nothing else moved
    err = bodies[-1]["err"]
    assert err["mb_bad"] == reads and reads >= len(faults), (err, reads)
    assert err["mb_to"] == err["mb_crc"] == err["mb_exc"] == err["mb_addr"] == 0, err
    # telemetry made while the faults lasted has no meter, every slot register, and more of it
    during = [b for b in bodies if start_ms + 1500 < b["ts"] < clear_ms]
    assert len(during) >= len(faults), len(during)
    assert all("meter" not in b for b in during), [b.get("meter") for b in during]
    for n in (1, 2):
        regs = [s["e_mwh"] for b in during for s in b["slots"] if s["n"] == n]
        assert len(regs) == len(during) and regs[-1] > regs[0], (n, regs[:3], regs[-3:])
    # never a value outside §2, never a register going down, never a meter_reset
    prev: dict[int, int] = {}
    wh = []
    for b in bodies:
        assert [s["n"] for s in b["slots"]] == [1, 2]
        for s in b["slots"]:
            assert s["e_mwh"] >= prev.get(s["n"], 0)
            prev[s["n"]] = s["e_mwh"]
        m = b.get("meter")
        if m is not None:
            assert 0 <= m["e_wh"] <= E_WH_MAX and -P_W_MAX <= m["p_w"] <= P_W_MAX, m
            wh.append(m["e_wh"])
    assert wh == sorted(wh) and len(wh) >= 4
    assert any(b["ts"] < start_ms and "meter" in b for b in bodies)
    assert any(b["ts"] > clear_ms + 1500 and "meter" in b for b in bodies)
    assert [e for e in events if e["ev"] == "meter_reset"] == []
