"""tools/fleet.py and `stationctl sim`: virtual stations running the real firmware against
rigs on an accelerated clock, the riders' scenario, power cuts, keys, ground truth."""

from __future__ import annotations

import json
import pathlib
import random
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.keys import KeyStore
from agent.wire import StaticKeys, verify
from tests.metering_reference import reference_totals
from tools.fleet import Fleet, VirtualClock, integration_bound
from tools.fleet_scenario import Action, ScenarioParams, StationScenario
from tools.mosquitto import Mosquitto, free_port
from tools.rig import Rig

STATIONCTL = [sys.executable, "-m", "stationctl"]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Collector:
    """Every signed message the stations publish (persistent session, QoS 1)."""

    def __init__(self, port: int, login: tuple[str, str] | None = None) -> None:
        self.got: list[tuple[str, bytes, int]] = []  # topic, payload, receive ms
        self.lock = threading.Lock()
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="fleet-test", clean_session=False
        )
        self.c.on_connect = lambda c, *_: c.subscribe(
            [("stations/+/telemetry", 1), ("stations/+/event", 1)]
        )
        self.c.on_message = self._on
        if login:
            self.c.username_pw_set(*login)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload), int(time.time() * 1000)))

    def verified(self, keys: StaticKeys) -> list[Any]:
        with self.lock:
            got = list(self.got)
        out = []
        for topic, payload, recv_ms in got:
            _, sid, kind = topic.split("/")
            v = verify(kind, sid, payload, keys, recv_ms=recv_ms)
            out.append(
                SimpleNamespace(sid=sid, boot=v.boot, seq=v.seq, recv_ms=recv_ms, body=v.body)
            )
        return out

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def run_scenario(
    seed: int, hours: float = 12.0, **kw: float
) -> tuple[list[Action], StationScenario]:
    clock = FakeClock()
    rig = Rig(slots=8, seed=seed, clock=clock, dt_s=0.5)  # the model only: no ptys needed
    params = ScenarioParams(**{"arrival_mean_s": 1800.0, **kw})  # type: ignore[arg-type]
    sc = StationScenario(8, random.Random(seed), params, start_delay_s=5.0, ramp_s=60.0)
    acts = sc.start(rig, 0.0)
    t = 0.0
    while t < hours * 3600:
        t += 30.0
        clock.t = 1000.0 + t
        acts += sc.step(rig, t)
    return acts, sc


def test_scenario_riders_swap_batteries() -> None:
    acts, sc = run_scenario(3, arrival_mean_s=1200.0)
    kinds = [a.what for a in acts]
    assert kinds.count("insert") > 10 and kinds.count("take") > 5
    takes = [a for a in acts if a.what == "take"]
    assert all(a.soc is not None and a.soc >= 0.6 for a in takes)  # nobody leaves with a flat one
    full = [a for a in takes if a.p_w == 0.0]  # a full battery draws no power when taken
    assert full and len(full) < len(takes)  # mostly full ones, some mid-charge
    assert sc.turned_away == kinds.count("leave")
    inserted = [a for a in acts if a.what == "insert" and a.t_v > 0]
    assert all(0.05 <= (a.soc or 0) <= 0.35 for a in inserted)  # riders arrive depleted


def test_scenario_is_reproducible_and_faults_recover() -> None:
    a1, _ = run_scenario(5, hours=4, charger_fault_p=0.5)
    a2, _ = run_scenario(5, hours=4, charger_fault_p=0.5)
    a3, _ = run_scenario(6, hours=4, charger_fault_p=0.5)
    assert a1 == a2 and a1 != a3
    faults = [a for a in a1 if a.what == "fault"]
    assert faults and all(a.p_w > 0 for a in faults)  # only a charge in progress faults
    assert len([a for a in a1 if a.what == "clear"]) >= len(faults) - 4


def test_integration_bound_counts_abrupt_changes() -> None:
    truth = {"S-1": {1: 100_000, 2: 0}}
    acts = [
        ("S-1", Action(t_v=1.0, what="take", slot=1, p_w=1000.0)),
        ("S-1", Action(t_v=2.0, what="cut", slot=1, p_w=360.0)),
        ("S-1", Action(t_v=3.0, what="insert", slot=2, p_w=0.0)),
        ("S-1", Action(t_v=4.0, what="take", slot=2, p_w=0.0)),
    ]
    b = integration_bound(truth, acts, dt_s=60.0, persist_s=60.0, rel=0.01, abs_mwh=10)
    # 10 + 1 % of 100 Wh + 1000 W × 60 s + 360 W × (60 + 120) s + 360 W × 60 s
    assert b == {"S-1": {1: 10 + 1000 + 16_667 + 18_000 + 6000, 2: 10}}
    # a cut with the energy measured in the window before it: that energy, not the estimate
    acts[1] = ("S-1", Action(t_v=2.0, what="cut", slot=1, p_w=0.0, e_mwh=777))
    b = integration_bound(truth, acts, dt_s=60.0, persist_s=60.0, rel=0.01, abs_mwh=10)
    assert b["S-1"][1] == 10 + 1000 + 16_667 + 777


def test_virtual_clock() -> None:
    c = VirtualClock(100.0)
    t0, u0 = c.now(), c.unix_ms()
    time.sleep(0.05)
    assert 4.0 <= c.now() - t0 <= 30.0 and 4000 <= c.unix_ms() - u0 <= 30000
    with pytest.raises(ValueError):
        VirtualClock(0)
    with pytest.raises(ValueError):
        Fleet(n_stations=1, accel=1000, sample_ms=1000)  # stale window beyond an hour


def test_fleet_end_to_end(tmp_path: pathlib.Path, locked_broker: Mosquitto) -> None:
    """On the deployment's broker rules: each station with its own account (client id =
    station id, ACL), the rig's monitor and the collector with agent-side accounts."""
    mosquitto = locked_broker
    keys = KeyStore(f"sqlite:///{tmp_path / 'agent.db'}")
    accel = 30.0
    params = ScenarioParams(
        arrival_mean_s=240.0,
        capacity_wh=(60.0, 120.0),
        power_w=(800.0, 1200.0),
        charger_fault_p=0.0,
    )
    fleet = Fleet(
        n_stations=2,
        slots=3,
        broker_port=mosquitto.port,
        workdir=tmp_path / "sim",
        keys=keys,
        accel=accel,
        fault_rate=0.02,
        seed=4,
        telemetry_s=1,
        sid_prefix="KH-TFL-",
        scenario=params,
        accounts=mosquitto.accounts(),
    )
    col = Collector(mosquitto.port, ("operator", mosquitto.password("operator")))
    t_real = time.monotonic()
    fleet.start()
    try:
        s1, s2 = (st.sid for st in fleet.stations)
        assert [k.sid for k in keys.list()] == [s1, s2]
        assert keys.get(s1, fleet.stations[0].kid) == fleet.stations[0].key
        time.sleep(8)
        fleet.power_cut(s1)
        fleet.offline(s2)
        assert not fleet.stations[1].powered and fleet.stations[1].held  # batteries held out
        time.sleep(1)
        fleet.online(s2)
        time.sleep(6)
        assert fleet.settle(60)
        truth = fleet.ground_truth()
        bound = fleet.integration_bound()
        ring = StaticKeys({(st.sid, st.kid): st.key for st in fleet.stations})
        time.sleep(1)
        # what an agent would credit (CONTRACT §6, the independent reference) against the
        # rig's exact energy: the accelerated clocks of firmware and rig agree
        credited = reference_totals(col.verified(ring))
        for st in fleet.stations:
            for n in range(1, 4):
                c, held = credited[(st.sid, n)]
                assert held == 0 and abs(c - truth[st.sid][n]) <= bound[st.sid][n], (
                    st.sid,
                    n,
                    c,
                    truth[st.sid][n],
                    bound[st.sid][n],
                    [a for sid, a in fleet.actions if sid == st.sid and a.slot == n],
                )
            body = fleet.latest(st.sid)
            assert body is not None and body["boot"] == 1  # one restart each
            # the uptime runs on the accelerated clock, and the time command set a virtual ts
            real = time.monotonic() - t_real
            assert body["up"] > 0.5 * accel * 1000 * (real - 12)
            assert "ts" in body and body["ts"] - fleet.clock.unix0_ms > 0.5 * accel * 1000 * 6
        assert sum(sum(m.values()) for m in truth.values()) > 50_000  # it did charge
        stats = fleet.stats()
        assert stats["cuts"] == 1 and stats["starts"] == 4 and stats["crashes"] == 0
        assert stats["time_commands"] >= 4 and all(v > 0 for v in stats["cpu_s"].values())
        assert stats["actions"]["insert"] >= 2
    finally:
        col.close()
        fleet.stop()
        keys.close()
    saved = json.loads((tmp_path / "sim" / "ground_truth.json").read_text())
    assert set(saved) == {s1, s2} and set(saved[s1]) == {"1", "2", "3"}
    lines = (tmp_path / "sim" / "actions.jsonl").read_text().splitlines()
    assert any(json.loads(x)["what"] == "cut" for x in lines)


def test_stationctl_sim(tmp_path: pathlib.Path, mosquitto: Mosquitto) -> None:
    db = f"sqlite:///{tmp_path / 'agent.db'}"
    r = subprocess.run(
        [
            *STATIONCTL,
            "sim",
            "--stations",
            "1",
            "--slots",
            "2",
            "--broker",
            f"mqtt://127.0.0.1:{mosquitto.port}",
            "--accel",
            "20",
            "--duration",
            "6",
            "--workdir",
            str(tmp_path / "sim"),
            "--agent-db",
            db,
            "--sid-prefix",
            "KH-CLI-",
            "--status-every",
            "2",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "simulated" in r.stdout and "ground truth" in r.stdout
    truth = json.loads((tmp_path / "sim" / "ground_truth.json").read_text())
    assert list(truth) == ["KH-CLI-0001"]
    with KeyStore(db) as ks:
        assert [k.sid for k in ks.list()] == ["KH-CLI-0001"]


def test_stationctl_sim_bad_usage(tmp_path: pathlib.Path) -> None:
    r = subprocess.run(
        [*STATIONCTL, "sim", "--broker", "http://x"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "mqtt://" in r.stderr
    r = subprocess.run(
        [
            *STATIONCTL,
            "sim",
            "--broker",
            f"mqtt://127.0.0.1:{free_port()}",
            "--workdir",
            str(tmp_path),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "cannot reach the broker" in r.stderr
