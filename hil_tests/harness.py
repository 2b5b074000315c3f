"""The HIL suite's test bench: broker, agent, and a device under test (DUT) with its rig.

One suite, two rigs. Every case talks to a `Dut` and an `Agent` only:

- `VirtualDut`: the firmware on the MicroPython unix port with the rig on ptys (a one-station
  tools.fleet.Fleet; a power cut is SIGKILL with the cabinet dark).
- `SerialDut`: a real ESP32 provisioned by `stationctl flash`, its charger UART and RS-485
  bus wired to two USB serial adapters that the rig drives through `Bridge`s; a power cut
  is the `--reset-cmd` hook (a relay) or a pulse on the board's EN line (RTS of --port).

The agent is `stationctl agent --config` in a subprocess; what it stored is read back with
`stationctl export` and from its database (raw messages, quarantine).
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.keys import KeyStore
from agent.store import Store
from agent.wire import decode_record
from tools.fleet import Fleet, integration_bound
from tools.fleet_scenario import Action, ScenarioParams
from tools.mosquitto import Mosquitto
from tools.rig import FaultRates, Rig
from tools.rig.battery import Battery
from tools.rig.faults import _Picker

ROOT = pathlib.Path(__file__).resolve().parent.parent
IDLE = ScenarioParams(
    arrival_mean_s=1e12,
    initial_fill=0.0,
    random_removal_per_h=0.0,
    charger_fault_p=0.0,
    start_delay_s=0.5,
    ramp_s=1.5,
)


def stationctl() -> list[str]:
    exe = pathlib.Path(sys.executable).parent / "stationctl"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "stationctl"]


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll until pred() is truthy; return its value, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# ---- broker ---------------------------------------------------------------------------------


class LanMosquitto(Mosquitto):
    """A private Mosquitto that a board on the LAN can reach (listens on `bind`)."""

    def __init__(self, workdir: pathlib.Path, bind: str = "0.0.0.0") -> None:
        # anonymous: a lab bench's own broker on its own LAN, for the board under test
        super().__init__(workdir, insecure=True)
        text = self.conf.read_text().replace(
            f"listener {self.port} 127.0.0.1", f"listener {self.port} {bind}"
        )
        self.conf.write_text(text)


def retained_status(
    port: int, sid: str, host: str = "127.0.0.1", prefix: str = "stations", timeout: float = 10.0
) -> dict[str, Any]:
    """The station's retained status (birth or last will) as a new subscriber gets it."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[bytes] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hil-status-{os.getpid()}")
    c.on_connect = lambda cl, *_: cl.subscribe(f"{prefix}/{sid}/status", 1)
    c.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    c.connect(host, port)
    c.loop_start()
    try:
        wait_for(lambda: got, timeout, f"a retained status for {sid}", every=0.05)
    finally:
        c.loop_stop()
        c.disconnect()
    return dict(json.loads(got[0]))


# ---- agent ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawMsg:
    sid: str
    boot: int
    seq: int
    kind: str
    body: dict[str, Any]
    recv_ms: int = 0  # the agent's receive time (rule 5 for a boot without a clock)


class Agent:
    """`stationctl agent --config` in a subprocess, with its SQLite database."""

    def __init__(
        self,
        workdir: pathlib.Path,
        broker_port: int,
        broker_host: str = "127.0.0.1",
        prefix: str = "stations",
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.dir / "agent.db"
        self.db_url = f"sqlite:///{self.db_path}"
        self.config = self.dir / "agent.toml"
        self.config.write_text(
            f'[db]\nurl = "{self.db_url}"\nsynchronous = "normal"\n\n'
            f'[broker]\nhost = "{broker_host}"\nport = {broker_port}\nprefix = "{prefix}"\n'
            f'client_id = "hil-agent-{os.getpid()}"\n\n'
            "[ingest]\nrecords_interval_ms = 200\nkey_reload_s = 1.0\n"
        )
        self.log = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        Store(self.db_url).close()  # create the schema before anyone adds keys
        self.keys = KeyStore(self.db_url)

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*stationctl(), "agent", "--config", str(self.config), "--log-level", "info"],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.keys.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- what it stored -----------------------------------------------------------------
    def raw(self, sid: str | None = None) -> list[RawMsg]:
        """Verified messages stored by the agent, in (sid, boot, seq) order."""
        st = Store(self.db_url, readonly=True)
        try:
            out = [
                RawMsg(r.sid, r.boot, r.seq, r.kind, decode_record(r.record), r.recv_ms)
                for rows in st.iter_raw(sid)
                for r in rows
            ]
        finally:
            st.close()
        out.sort(key=lambda m: (m.sid, m.boot, m.seq))
        return out

    def telemetry(self, sid: str) -> list[RawMsg]:
        return [m for m in self.raw(sid) if m.kind == "telemetry"]

    def events(self, sid: str, ev: str | None = None) -> list[dict[str, Any]]:
        return [
            m.body
            for m in self.raw(sid)
            if m.kind == "event" and (ev is None or m.body.get("ev") == ev)
        ]

    def alarms(self, sid: str, code: str | None = None) -> list[dict[str, Any]]:
        return [b for b in self.events(sid, "alarm") if code is None or b["code"] == code]

    def quarantine(self, sid: str | None = None) -> list[Any]:
        st = Store(self.db_url, readonly=True)
        try:
            rows = st.quarantine_rows()
        finally:
            st.close()
        return [q for q in rows if sid is None or q.sid == sid]

    def export(self, by: str = "interval") -> list[dict[str, Any]]:
        """`stationctl export --by BY --format json` (what an auditor gets)."""
        r = subprocess.run(
            [*stationctl(), "export", "--db", self.db_url, "--by", by, "--format", "json"],
            check=False,
            capture_output=True,
            cwd=ROOT,
            timeout=60,
        )
        if r.returncode != 0:
            raise AssertionError(f"stationctl export failed ({r.returncode}): {r.stderr.decode()}")
        return [json.loads(x) for x in r.stdout.decode().splitlines() if x.strip()]

    def credited(self, sid: str, by: str = "interval") -> dict[int, tuple[int, int]]:
        """{slot: (credited mWh, held mWh)} for sid from the export (slot 0: grid meter)."""
        out: dict[int, tuple[int, int]] = {}
        for r in self.export(by):
            if r["sid"] == sid:
                c, h = out.get(r["slot"], (0, 0))
                out[r["slot"]] = (c + r["mwh"], h + r["held_mwh"])
        return out


# ---- devices under test ----------------------------------------------------------------------


class Dut:
    """What every case uses. `sid`, `rig`, `slots`, `dt_s` (sampling period, s), `kid` and
    `key` (the station's current key)."""

    sid: str
    kid: int
    key: bytes
    flash: pathlib.Path  # the virtual rig's flash folder
    rig: Rig
    slots: int
    dt_s: float
    telemetry_s: float
    real_board: bool = False

    def insert(
        self,
        slot: int,
        *,
        power_w: float = 1000.0,
        capacity_wh: float = 2.0,
        soc: float = 0.6,
        pack: str = "72V",
    ) -> Battery:
        raise NotImplementedError

    def remove(self, slot: int) -> Battery | None:
        raise NotImplementedError

    def set_fault(self, slot: int, code: int) -> None:
        raise NotImplementedError

    def clear_fault(self, slot: int) -> None:
        raise NotImplementedError

    def power_cut(self, down_s: float = 0.0) -> None:
        raise NotImplementedError

    def truth(self) -> dict[int, int]:
        return self.rig.ground_truth_mwh()

    def top_power_w(self, slot: int) -> float:
        """The highest charge power a battery in this slot was given."""
        return max(self._powers.get(slot, [0.0]))

    @property
    def _powers(self) -> dict[int, list[float]]:
        p = self.__dict__.setdefault("_power_log", {})
        return p  # type: ignore[no-any-return]

    def bound(self) -> dict[int, int]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    # -- links, the same on both rigs (the rig sits on the far end of either) ------------------
    def silence(self, link: str, on: bool) -> None:
        """Make the charger controller ("charger") or every unit on the bus ("bus") stop
        answering, or answer again. A bench operation: the cable is pulled."""
        relay = self.rig._charger_relay if link == "charger" else self.rig._bus_relay
        if relay is None:
            raise RuntimeError("rig not started")
        faults = relay.faults
        if on:
            faults._picker = _Picker({"silence": 1.0}, faults.rng)
        else:
            rates = self.rig.rates
            faults._picker = _Picker(
                rates.charger_rates() if link == "charger" else rates.bus_rates(), faults.rng
            )


class VirtualDut(Dut):
    """The firmware on MicroPython against the rig on ptys (a one-station Fleet)."""

    def __init__(
        self,
        name: str,
        workdir: pathlib.Path,
        agent: Agent,
        broker_port: int,
        *,
        slots: int = 2,
        fault_rate: float = 0.0,
        sample_ms: int = 500,
        telemetry_s: int = 1,
        seed: int = 7,
        persist_s: int = 60,
    ) -> None:
        self.fleet = Fleet(
            n_stations=1,
            slots=slots,
            broker_port=broker_port,
            workdir=workdir,
            keys=agent.keys,
            accel=1.0,
            fault_rate=fault_rate,
            seed=seed,
            sample_ms=sample_ms,
            telemetry_s=telemetry_s,
            sid_prefix=f"HIL-{name.upper()}-",
            scenario=IDLE,
            stale_samples=5,
            persist_s=persist_s,
        )
        self.slots = slots
        self.dt_s = sample_ms / 1000
        self.telemetry_s = telemetry_s
        self.fleet.start()
        self.st = self.fleet.stations[0]
        self.sid = self.st.sid
        self.rig = self.st.rig
        self.key = self.st.key
        self.kid = self.st.kid
        self.flash = self.st.flash

    def insert(
        self,
        slot: int,
        *,
        power_w: float = 1000.0,
        capacity_wh: float = 2.0,
        soc: float = 0.6,
        pack: str = "72V",
    ) -> Battery:
        self._powers.setdefault(slot, []).append(power_w)
        return self.fleet.insert(
            self.sid,
            slot,
            pack=pack,
            power_w=power_w,
            capacity_wh=capacity_wh,
            soc=soc,
            start_delay_s=0.5,
            ramp_s=1.5,
        )

    def remove(self, slot: int) -> Battery | None:
        return self.fleet.remove(self.sid, slot)

    def set_fault(self, slot: int, code: int) -> None:
        self.fleet.set_fault(self.sid, slot, code)

    def clear_fault(self, slot: int) -> None:
        self.fleet.clear_fault(self.sid, slot)

    def power_cut(self, down_s: float = 0.0) -> None:
        self.fleet.power_cut(self.sid, down_s)

    def bound(self) -> dict[int, int]:
        return self.fleet.integration_bound()[self.sid]

    def output(self) -> list[str]:
        return self.st.proc.output[-30:]

    def stop(self) -> None:
        self.fleet.stop()


class Bridge:
    """Copies bytes both ways between the rig's pty (the station's end) and a USB serial
    adapter wired to the board's UART / RS-485 transceiver."""

    def __init__(self, pty_path: str, device: str, baud: int) -> None:
        import serial

        self.a = os.open(pty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        import termios
        import tty

        tty.setraw(self.a, termios.TCSANOW)
        self.dev = serial.Serial(device, baud, timeout=0)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True, name=f"bridge-{device}")
        self._t.start()

    def _run(self) -> None:
        b = self.dev.fileno()
        while not self._stop.is_set():
            r, _, _ = select.select([self.a, b], [], [], 0.05)
            if self.a in r:
                try:
                    data = os.read(self.a, 4096)
                except BlockingIOError:
                    data = b""
                if data:
                    self.dev.write(data)
            if b in r:
                data = self.dev.read(4096)
                if data:
                    os.write(self.a, data)

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        self.dev.close()
        os.close(self.a)


@dataclass
class SerialOptions:
    port: str  # the board's USB (REPL, flashing, EN reset on RTS)
    charger_dev: str  # USB adapter wired to the charger UART
    bus_dev: str  # USB adapter (RS-485) wired to the bus
    host_ip: str  # the address the board reaches this machine's broker at
    site: str | None = None  # stationctl flash --site template (Wi-Fi, UART ids, pins)
    reset_cmd: str | None = None  # power-cycle hook (a relay); default: EN pulse on --port
    flash_args: list[str] = field(default_factory=list)


class SerialDut(Dut):
    """A real ESP32 provisioned by `stationctl flash`, its links driven by the rig."""

    real_board = True

    def __init__(
        self,
        name: str,
        workdir: pathlib.Path,
        agent: Agent,
        broker_port: int,
        opts: SerialOptions,
        *,
        slots: int = 2,
        fault_rate: float = 0.0,
        sample_ms: int = 1000,
        telemetry_s: int = 1,
        seed: int = 7,
        persist_s: int = 60,
    ) -> None:
        self.opts = opts
        self.agent = agent
        self.slots = slots
        self.dt_s = sample_ms / 1000
        self.telemetry_s = telemetry_s
        self.sid = f"HIL-{name.upper()}-0001"
        self.persist_s = persist_s
        self.actions: list[tuple[str, Action]] = []
        self.t0 = time.monotonic()
        rates = FaultRates.uniform(fault_rate, bus_timeout_s=0.15, charger_timeout_s=0.2)
        # the adapters pace the bytes at the real baud: the rig must not pace them again
        self.rig = Rig(
            slots=slots, faults=rates, seed=seed, workdir=workdir / "rig", pace=False, name=self.sid
        ).start()
        self.bridges = [
            Bridge(self.rig.charger_path, opts.charger_dev, 115200),
            Bridge(self.rig.bus_path, opts.bus_dev, 9600),
        ]
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            *stationctl(),
            "flash",
            "--port",
            opts.port,
            "--station",
            self.sid,
            "--agent-db",
            agent.db_url,
            "--slots",
            str(slots),
            "--broker",
            f"{opts.host_ip}:{broker_port}",
            "--set",
            f"sample_ms={sample_ms}",
            "--set",
            f"telemetry_s={telemetry_s}",
            "--set",
            f"persist.every_s={persist_s}",
            "--key-out",
            str(workdir / "station.key"),
            "--reports",
            str(workdir / "reports"),
            "--force",
        ]
        if opts.site:
            cmd += ["--site", opts.site]
        cmd += opts.flash_args
        r = subprocess.run(cmd, check=False, capture_output=True, cwd=ROOT, timeout=900)
        if r.returncode != 0:
            self.stop()
            raise AssertionError(
                f"stationctl flash failed ({r.returncode}): "
                f"{r.stderr.decode(errors='replace')[-2000:]}"
            )
        self.key = bytes.fromhex((workdir / "station.key").read_text().strip())
        self.kid = max(k.kid for k in agent.keys.list(self.sid))
        self._wait_boot(0)

    def _boots(self) -> list[int]:
        return [m.boot for m in self.agent.raw(self.sid) if m.body.get("ev") == "boot"]

    def _wait_boot(self, after: int) -> int:
        return int(
            wait_for(
                lambda: max([b for b in self._boots() if b >= after], default=None),
                120,
                f"a boot event from {self.sid} (>= {after})",
            )
        )

    def _log(self, what: str, slot: int = 0, p_w: float = 0.0) -> None:
        self.actions.append(
            (self.sid, Action(t_v=time.monotonic() - self.t0, what=what, slot=slot, p_w=p_w))
        )

    def insert(
        self,
        slot: int,
        *,
        power_w: float = 1000.0,
        capacity_wh: float = 2.0,
        soc: float = 0.6,
        pack: str = "72V",
    ) -> Battery:
        self._log("insert", slot)
        self._powers.setdefault(slot, []).append(power_w)
        return self.rig.insert(slot, pack=pack, power_w=power_w, capacity_wh=capacity_wh, soc=soc)

    def remove(self, slot: int) -> Battery | None:
        self._log("remove", slot, self.rig.model.sample(slot).p_w)
        return self.rig.remove(slot)

    def set_fault(self, slot: int, code: int) -> None:
        self._log("fault", slot, self.rig.model.sample(slot).p_w)
        self.rig.set_fault(slot, code)

    def clear_fault(self, slot: int) -> None:
        self.rig.clear_fault(slot)

    def power_cut(self, down_s: float = 0.0) -> None:
        held = {}
        for slot in range(1, self.slots + 1):
            s = self.rig.model.sample(slot)
            if s.battery is not None:
                self._log("cut", slot, s.p_w)
                b = self.rig.remove(slot)
                if b is not None:
                    held[slot] = b
        last = max(self._boots(), default=-1)
        if self.opts.reset_cmd:
            subprocess.run(shlex.split(self.opts.reset_cmd), check=True, timeout=60)
        else:
            import serial

            with serial.Serial(self.opts.port, 115200) as s:  # EN low, then released
                s.dtr = False
                s.rts = True
                time.sleep(0.2 + down_s)
                s.rts = False
        self._wait_boot(last + 1)
        for slot, b in held.items():
            self.rig.insert(slot, battery=b, start_delay_s=max(2.0, 2 * self.dt_s))

    def bound(self) -> dict[int, int]:
        return integration_bound({self.sid: self.truth()}, self.actions, self.dt_s, self.persist_s)[
            self.sid
        ]

    def stop(self) -> None:
        for b in getattr(self, "bridges", []):
            b.close()
        self.rig.stop()
