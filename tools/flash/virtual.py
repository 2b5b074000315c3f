"""Virtual boards for rigs and tests: no hardware, the real tools.

- `UnixBoard(flash_dir)`: the MicroPython unix port's REPL on a pty through socat, started
  in `flash_dir` so that the unix port's filesystem is the board's flash. mpremote (and so
  `stationctl flash --chip unix --port board.port`) drives it like a board over USB.
- `MockBootloader(chip)`: `esp32-mock-bootloader` (PyPI) serving the ESP32 ROM bootloader
  protocol on socket://, enough for esptool's chip-id, erase-flash, write-flash and
  verify-flash.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

from tools.fwbuild import micropython_bin


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    try:
        text = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _end(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Terminate a process we started and the children it started (by their ids)."""
    if proc.poll() is not None:
        return
    kids = _children(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for k in kids:
        try:
            os.kill(k, signal.SIGKILL)
        except ProcessLookupError:
            pass


class UnixBoard:
    """`with UnixBoard(flash_dir) as b: … b.port …`; `prelude` runs before the REPL starts
    (a script path: `micropython -i prelude`)."""

    def __init__(
        self,
        flash_dir: str | os.PathLike[str],
        *,
        heap: str = "256k",
        prelude: str | os.PathLike[str] | None = None,
        link: str | os.PathLike[str] | None = None,
    ) -> None:
        self.flash = pathlib.Path(flash_dir)
        self.flash.mkdir(parents=True, exist_ok=True)
        self.port = str(link or self.flash.parent / f"tty-{self.flash.name}")
        self.heap = heap
        self.prelude = prelude
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.flash.parent / f"socat-{self.flash.name}.log"

    def start(self, timeout: float = 10.0) -> UnixBoard:
        if shutil.which("socat") is None:
            raise RuntimeError("socat is not installed (Debian package socat)")
        mp = [micropython_bin(), "-X", f"heapsize={self.heap}"]
        if self.prelude is not None:
            mp += ["-i", str(self.prelude)]
        # socat's EXEC splits its command on spaces itself: quote nothing, avoid spaces
        cmd = ["socat", f"PTY,link={self.port},rawer", f"EXEC:{shlex.join(mp)},pty,rawer"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.flash, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"socat did not make {self.port}: {self.log.read_text()[-500:]}")
            time.sleep(0.02)
        time.sleep(0.2)  # the interpreter's banner; bytes sent before it reads may be lost
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _end(self.proc)
            self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> UnixBoard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MockBootloader:
    """`with MockBootloader("esp32") as m: … m.url …` (socket://127.0.0.1:PORT)."""

    def __init__(self, chip: str = "esp32", port: int | None = None) -> None:
        self.chip = chip
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> MockBootloader:
        exe = pathlib.Path(sys.executable).parent / "esp32-mock-bootloader"
        cmd = [
            str(exe) if exe.exists() else "esp32-mock-bootloader",
            "run",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--chip",
            self.chip,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("esp32-mock-bootloader did not listen") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            _end(self.proc)
            self.proc = None

    def __enter__(self) -> MockBootloader:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
