"""firmware/selftest.py on the MicroPython unix port (as bytecode, from a flash folder, as on
the board) against the rig and a real Mosquitto: what passes, and each check's failure with
its reason (no such charger channel, a battery whose BMS is silent, a silent bus, refused
broker credentials, an unreadable config)."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
from typing import Any

from tools import fwbuild
from tools.flash import passwd
from tools.flash.virtual import micropython_bin
from tools.mosquitto import Mosquitto
from tools.rig import FaultRates
from tools.rig.rig import Rig
from tools.station_proc import station_config

SID = "KH-SLF-0001"


def selftest(flash: pathlib.Path, cfg: dict[str, Any] | None, heap: str = "100k") -> dict[str, Any]:
    if not (flash / "main.py").exists():
        shutil.copytree(fwbuild.build(), flash, dirs_exist_ok=True)
    if cfg is not None:
        (flash / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run(
        [
            micropython_bin(),
            "-X",
            f"heapsize={heap}",
            "-c",
            "import selftest, sys\nsys.exit(0 if selftest.main()['ok'] else 1)",
        ],
        cwd=flash,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [x for x in r.stdout.splitlines() if x.startswith("SELFTEST ")]
    assert len(lines) == 1, r.stdout + r.stderr
    res = dict(json.loads(lines[0][len("SELFTEST ") :]))
    assert r.returncode == (0 if res["ok"] else 1)
    return res


def test_selftest_passes_and_fails_with_reasons(tmp_path: pathlib.Path) -> None:
    pw = tmp_path / "pw"
    passwd.set_password(pw, SID, "right")
    flash = tmp_path / "flash"
    with (
        Mosquitto(tmp_path / "m", password_file=str(pw)) as mosq,
        Rig(slots=2, seed=2, workdir=tmp_path / "rig") as rig,
    ):
        rig.insert(1, pack="60V", power_w=900, capacity_wh=20, soc=0.5)

        def cfg(slots: int = 2, password: str = "right", **over: Any) -> dict[str, Any]:
            c = station_config(
                SID,
                rig.charger_path,
                rig.bus_path,
                slots=slots,
                broker_port=mosq.port,
                ntp="host",
                **over,
            )
            c["broker"]["password"] = password
            return c

        ok = selftest(flash, cfg())
        assert ok["ok"] and ok["v"] == 1
        ch = ok["checks"]
        assert ch["charger"]["slots"] == {"1": ch["charger"]["slots"]["1"], "2": "I"}
        assert ch["charger"]["slots"]["1"] in "WCV"
        assert ch["bms"]["slots"]["2"] == "empty" and len(ch["bms"]["slots"]["1"]) == 8
        assert ch["meter"]["sn"] > 0 and ch["meter"]["e_wh"] > 0
        assert ch["broker"]["rc"] == 0 and ch["broker"]["sub"] == 1
        assert ch["clock"]["synced"] and ch["clock"]["ms"] > 1704067200000
        assert ok["heap_free"] > 8000  # fits in an ESP32-sized heap with room to spare

        # a third slot the controller does not have; no meter configured (not a failure)
        r = selftest(flash, cfg(slots=3, meter=None))
        assert (
            not r["ok"]
            and r["checks"]["charger"]["detail"] == "slot 3: no such channel on the controller"
        )
        assert r["checks"]["meter"] == {"ok": True, "detail": "no meter configured"}

        # refused credentials
        r = selftest(flash, cfg(password="wrong"))
        assert (
            not r["ok"]
            and "bad user name or password" in r["checks"]["broker"]["detail"]
            or "not authorised" in r["checks"]["broker"]["detail"]
        )
        assert r["checks"]["charger"]["ok"]

        # a broker that is not there
        mosq.stop()
        r = selftest(flash, cfg())
        assert not r["ok"] and r["checks"]["broker"]["detail"].startswith(
            f"127.0.0.1:{mosq.port}: OSError"
        )
        mosq.start()

    # a silent bus: the battery's BMS and the meter fail, the empty slot is not blamed
    with Rig(
        slots=2,
        seed=2,
        workdir=tmp_path / "rig2",
        faults=FaultRates(mb_silence=1.0, bus_timeout_s=0.15),
    ) as rig:
        rig.insert(1, pack="72V", power_w=900, capacity_wh=20, soc=0.5)
        c = station_config(SID, rig.charger_path, rig.bus_path, slots=2, broker_port=1, ntp=None)
        r = selftest(flash, c)
        assert not r["ok"]
        assert (
            r["checks"]["bms"]["detail"]
            == "battery present, BMS silent or bad: slot 1 (unit 11): Timeout"
        )
        assert r["checks"]["bms"]["slots"]["2"] == "empty"
        assert not r["checks"]["meter"]["ok"] and "Timeout" in r["checks"]["meter"]["detail"]
        assert r["checks"]["clock"]["ok"] and not r["checks"]["clock"]["synced"]

    # a config the firmware refuses: only that check, naming the key
    c = station_config(SID, "/dev/null", "/dev/null", slots=2)
    del c["kid"]
    r = selftest(flash, c)
    assert r == {
        "v": 1,
        "ok": False,
        "checks": {"config": {"ok": False, "detail": "config: kid: missing"}},
        "ms": r["ms"],
    }
