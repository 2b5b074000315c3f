"""Firmware updates on the unix port: firmware variants (good and broken in the ways a trial must
survive), a station process restarted whenever it exits (as a board reboots), and a charger/BMS
rig behind it. Used by tests/test_ota*.py and bench/bench_ota.py."""

from __future__ import annotations

import pathlib
import shutil
import threading
import time
from typing import Any

from tools.ota import build_version
from tools.station_proc import FIRMWARE, StationProcess, station_config

# how each broken variant breaks (a (file, old, new) edit of the firmware's sources)
VARIANTS: dict[str, list[tuple[str, str, str]]] = {
    "good": [],
    # a module missing from the version: app does not import
    "import": [("app.py", "import charger_link\n", "import charger_link\nimport no_such_module\n")],
    # runs the station a few seconds, then raises out of main(): a crash loop
    "crash": [
        (
            "app.py",
            "    asyncio.run(run(cfg))\n",
            "    asyncio.run(asyncio.wait_for(run(cfg), 3))\n",
        )
    ],
    # talks to the wrong port: never reaches the broker
    "nobroker": [("app.py", '        b["port"],\n', '        b["port"] + 7,\n')],
    # samples three cycles, then the sampling loop hangs
    "nosample": [
        (
            "station.py",
            "        await self.poll_charger()\n",
            "        if self.cycles >= 3:\n"
            "            await timebase.asleep_ms(3600000)\n"
            "        await self.poll_charger()\n",
        )
    ],
}


def variant_src(kind: str, out: pathlib.Path) -> pathlib.Path:
    """A copy of firmware/ with the variant's edits."""
    shutil.copytree(FIRMWARE, out, ignore=shutil.ignore_patterns("__pycache__"))
    for fname, old, new in VARIANTS[kind]:
        p = out / fname
        text = p.read_text()
        assert old in text, (fname, old)
        p.write_text(text.replace(old, new, 1))
    return out


def build_variant(kind: str, version: str, work: pathlib.Path) -> pathlib.Path:
    """A version folder (`stationctl ota build`) of the variant; returns it."""
    src = variant_src(kind, work / f"src-{version}")
    out = work / f"ver-{version}"
    build_version(version, out, src)
    return out


class SupervisedStation(StationProcess):
    """A station process started again whenever it exits (a board resets: after a reboot
    command, a crash, or the OTA code's reboot). Events of every boot are kept in `all_events`
    (trace lines), the exit codes in `exits`."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        user_cb = kw.pop("on_line", None)
        self.all_events: list[dict[str, Any]] = []
        self.all_lines = 0
        self.exits: list[int] = []
        self.exit_times: list[float] = []  # time.time() each exit was seen (a board's reset)
        self._want = False
        self._sup: threading.Thread | None = None
        self._ev_lock = threading.Lock()

        def on_line(item: dict[str, Any]) -> None:
            if item.get("trace") == "event":
                with self._ev_lock:
                    self.all_events.append(item)
            if user_cb is not None:
                user_cb(item)

        super().__init__(*a, on_line=on_line, **kw)

    def run_supervised(self) -> None:
        self._want = True
        self.start()
        self._sup = threading.Thread(target=self._supervise, daemon=True)
        self._sup.start()

    def _supervise(self) -> None:
        while self._want:
            p = self.proc
            if p is not None and p.poll() is not None:
                if not self._want:
                    break
                self.exits.append(p.returncode)
                self.exit_times.append(time.time())
                if self._reader is not None:
                    self._reader.join(5)
                time.sleep(0.2)
                if self._want:
                    self.start()
            time.sleep(0.05)

    def power_cut(self) -> None:
        """SIGKILL, returning once the process is gone; the supervisor starts it again."""
        p = self.proc
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def halt(self) -> None:
        self._want = False
        if self._sup is not None:
            self._sup.join(5)
        self.stop()

    def ota_events(self) -> list[dict[str, Any]]:
        with self._ev_lock:
            return [e["body"] for e in self.all_events if e["body"].get("ev") == "ota"]

    def boots(self) -> list[dict[str, Any]]:
        """The boot events, oldest first, each with its boot number."""
        with self._ev_lock:
            return [
                dict(e["body"], boot=e["boot"])
                for e in self.all_events
                if e["body"].get("ev") == "boot"
            ]

    def phases(self) -> list[str]:
        return [e["phase"] for e in self.ota_events()]


class EventWatcher:
    """Every verified event of some stations, as the broker delivers them (paho)."""

    def __init__(self, port: int, keys: dict[str, tuple[int, bytes]], prefix: str = "stations"):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from agent.wire import StaticKeys

        self.keys = StaticKeys({(sid, kid): key for sid, (kid, key) in keys.items()})
        self.events: dict[str, list[dict[str, Any]]] = {sid: [] for sid in keys}
        self.seqs: dict[str, set[tuple[int, int]]] = {sid: set() for sid in keys}
        self.last_tel: dict[str, dict[str, Any]] = {}
        self.rejected: list[tuple[str, bytes, str]] = []  # what did not verify
        self.raw: list[tuple[str, bytes]] = []  # every verified message once, as received
        self.recv_ms: dict[tuple[str, int, int], int] = {}  # (sid, boot, seq) -> first receipt
        self.lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
        ready = threading.Event()

        def on_connect(c: Any, u: Any, f: Any, rc: Any, p: Any = None) -> None:
            c.subscribe([(f"{prefix}/+/event", 1), (f"{prefix}/+/telemetry", 1)])
            ready.set()

        self.c.on_connect = on_connect
        self.c.on_message = self._msg
        self.c.connect("127.0.0.1", port, 30)
        self.c.loop_start()
        ready.wait(10)

    def _msg(self, c: Any, u: Any, msg: Any) -> None:
        from agent.wire import WireError, verify

        sid, kind = msg.topic.split("/")[-2:]
        if sid not in self.events:
            return
        try:
            v = verify(kind, sid, msg.payload, self.keys)
        except WireError as e:
            self.rejected.append((msg.topic, bytes(msg.payload), str(e)))
            return
        with self.lock:
            if (v.boot, v.seq) not in self.seqs[sid]:
                self.raw.append((msg.topic, bytes(msg.payload)))
                self.recv_ms[(sid, v.boot, v.seq)] = int(time.time() * 1000)
            self.seqs[sid].add((v.boot, v.seq))
            if kind == "telemetry":
                last = self.last_tel.get(sid)
                if last is None or (last["boot"], last["seq"]) < (v.boot, v.seq):
                    self.last_tel[sid] = v.body
                return
            # (boot, seq) names a message: a resend after a reconnect is not a second event
            seen = self.events[sid]
            if not any(e["boot"] == v.boot and e["seq"] == v.seq for e in seen):
                seen.append(v.body)

    def of(self, sid: str, ev: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            evs = sorted(self.events[sid], key=lambda e: (e["boot"], e["seq"]))
        return [e for e in evs if ev is None or e.get("ev") == ev]

    def gaps(self, sid: str) -> list[tuple[int, int]]:
        """(boot, seq) missing below the highest seq delivered of each boot."""
        with self.lock:
            got = set(self.seqs[sid])
        top: dict[int, int] = {}
        for b, q in got:
            top[b] = max(top.get(b, -1), q)
        return [(b, q) for b, t in top.items() for q in range(t + 1) if (b, q) not in got]

    def phases(self, sid: str) -> list[str]:
        return [e["phase"] for e in self.of(sid, "ota")]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def ota_config(sid: str, rig: Any, port: int, key_hex: str, **over: Any) -> dict[str, Any]:
    cfg = station_config(
        sid,
        rig.charger_path,
        rig.bus_path,
        slots=2,
        key_hex=key_hex,
        broker_port=port,
        sample_ms=250,
        telemetry_s=1,
        stale_s=3,
        persist={"every_mwh": 1000, "every_s": 1},
    )
    cfg.update(over)
    return cfg
