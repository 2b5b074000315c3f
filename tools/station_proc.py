"""Run the real station firmware on the MicroPython unix port, as a rig or a test sees it.

The flash root is a folder holding config.json; the firmware keeps its counters and outbox
there, exactly as on the board. With `trace=True` the firmware prints its telemetry body and
events as JSON lines (STATION_TRACE), which this class collects in a background thread.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from tools import fwbuild
from tools.fwbuild import micropython_bin

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"


def station_config(
    sid: str,
    charger_path: str,
    bus_path: str,
    *,
    slots: int,
    key_hex: str = "00" * 32,
    kid: int = 1,
    broker_port: int = 1883,
    **over: Any,
) -> dict[str, Any]:
    """A CONTRACT §9 configuration for the unix port (the firmware's own example), with
    the station's key and broker port; keyword arguments override top-level keys (a dict
    value merges into the section)."""
    cfg: dict[str, Any] = fwbuild.firmware_module("config").example(
        sid, charger_path, bus_path, slots
    )
    cfg.update({"kid": kid, "key": key_hex})
    cfg["broker"]["port"] = broker_port
    cfg["bus"]["timeout_ms"] = 150
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


class StationProcess:
    """One firmware process. `start()`, `kill()` (SIGKILL: a power cut), `stop()`."""

    def __init__(
        self,
        flash: str | os.PathLike[str],
        config: dict[str, Any] | None = None,
        *,
        heap: str = "100k",
        trace_ms: int | None = None,
        env: dict[str, str] | None = None,
        on_line: Callable[[dict[str, Any]], None] | None = None,
        uplink: bool = True,
    ) -> None:
        self.flash = pathlib.Path(flash)
        self.flash.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (self.flash / "config.json").write_text(json.dumps(config))
        self.heap = heap
        self.trace_ms = trace_ms
        self.env = env or {}
        self.on_line = on_line
        self.uplink = uplink  # False: sampling only (part 1's rig runs), no MQTT stack loaded
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[dict[str, Any]] = []  # parsed trace lines of the current process
        self.output: list[str] = []  # everything else it printed
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if self.trace_ms is not None:
            env["STATION_TRACE"] = "1"
            env["STATION_TRACE_MS"] = str(self.trace_ms)
        if not self.uplink:
            env["STATION_NO_UPLINK"] = "1"
        env.update(self.env)
        with self._lock:
            self.lines = []
            self.output = []
        self.proc = subprocess.Popen(
            [micropython_bin(), "-X", f"heapsize={self.heap}", str(self._script())],
            # not a session leader: opening a pty must not make it our controlling terminal
            cwd=self.flash,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()

    def _script(self) -> pathlib.Path:
        """What the interpreter runs: the built main.py (bytecode modules beside it, as on
        the board: compiling source would eat the heap)."""
        return fwbuild.build() / "main.py"

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            item: Any = None
            if text.startswith("{"):
                try:
                    item = json.loads(text)
                except ValueError:
                    item = None
            with self._lock:
                if isinstance(item, dict) and "trace" in item:
                    self.lines.append(item)
                else:
                    self.output.append(text)
            if isinstance(item, dict) and self.on_line is not None:
                self.on_line(item)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def telemetry(self) -> list[dict[str, Any]]:
        with self._lock:
            return [x for x in self.lines if x["trace"] == "telemetry"]

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [x for x in self.lines if x["trace"] == "event"]

    def last_telemetry(self) -> dict[str, Any] | None:
        t = self.telemetry()
        return t[-1] if t else None

    def wait_for(self, pred: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"station exited ({self.proc.returncode}) waiting for {what}: "
                    + "\n".join(self.output[-30:])
                )
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {what}: " + "\n".join(self.output[-30:]))

    def kill(self) -> None:
        """A power cut: SIGKILL, no chance to persist."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)

    def __enter__(self) -> StationProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
