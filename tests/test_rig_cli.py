"""`python -m tools.rig`: rig.json at start, a scenario run, ground truth and fault log
written periodically and on SIGTERM; bad usage exits 2 with one line."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import serial

from tests.helpers import ROOT
from tools.rig import format_query


def wait_for(path: pathlib.Path, timeout: float = 20.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return dict(json.loads(path.read_text()))
            except ValueError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_cli_runs_a_scenario_and_writes_its_files(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "scenario.json"
    script.write_text(
        json.dumps(
            {
                "events": [
                    {
                        "t": 0.0,
                        "insert": 1,
                        "pack": "60V",
                        "power_w": 900,
                        "capacity_wh": 5,
                        "soc": 0.4,
                        "serial": "CLI-0001",
                        "start_delay_s": 0.1,
                        "ramp_s": 0.3,
                    },
                    {"t": 2.0, "remove": 1},
                ]
            }
        )
    )
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.rig",
            "--slots",
            "2",
            "--workdir",
            str(work),
            "--seed",
            "4",
            "--fault-rate",
            "1.0",
            "--script",
            str(script),
            "--write-every",
            "0.3",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        info = wait_for(work / "rig.json")
        assert info["slots"] == 2 and info["bus_baud"] == 9600 and info["seed"] == 4
        # every charger query is faulted (rate 1.0): each is one logged transaction
        with serial.Serial(str(info["charger"]), 115200, timeout=0.5) as port:
            for _ in range(5):
                port.reset_input_buffer()
                port.write(format_query(2))
                port.readline()
                time.sleep(0.5)  # let a slow reply land before the next query
        time.sleep(2.0)
        truth_live = wait_for(work / "ground_truth.json")
        assert truth_live["states"] == {"1": "I", "2": "I"}  # removed at 2 s
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    truth = json.loads((work / "ground_truth.json").read_text())
    faults = json.loads((work / "faults.json").read_text())
    assert truth["slots_mwh"]["1"] > 100 and truth["slots_mwh"]["2"] == 0
    assert truth["slots_mwh"] == truth_live["slots_mwh"]  # nothing charged after removal
    assert truth["grid_mwh"] > truth["slots_mwh"]["1"]
    totals = faults["totals"]
    assert sum(totals[k] for k in ("ser_to", "ser_cs", "ser_bad")) == 5
    assert len(faults["log"]) == 5 and all(e["link"] == "charger" for e in faults["log"])
    assert faults["stats"]["ChargerRelay"]["requests"] == 5


def test_cli_bad_scenario_exits_2(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "bad.json"
    script.write_text(json.dumps({"events": [{"t": 0, "insert": 9}]}))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.rig",
            "--slots",
            "2",
            "--workdir",
            str(tmp_path / "w"),
            "--script",
            str(script),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "slot must be an integer 1..2" in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.rig",
            "--slots",
            "2",
            "--workdir",
            str(tmp_path / "w"),
            "--fault-rate",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 2 and "within 0..1" in r.stderr
