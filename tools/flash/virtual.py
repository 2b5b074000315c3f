"""Virtual boards for rigs and tests: no hardware, the real tools.

- `UnixBoard(flash_dir)`: the MicroPython unix port's REPL on a pty through socat, started
  in `flash_dir` so that the unix port's filesystem is the board's flash. mpremote (and so
  `stationctl flash --chip unix --port board.port`) drives it like a board over USB.
- `UnixBoard(flash_dir, romfs=SIZE)`: the same with a ROMFS partition of SIZE bytes, emulated
  (ROMFS_EMULATOR): `vfs.rom_ioctl` answering as MicroPython's ESP32 port does
  (ports/esp32/esp32_partition.c: one partition object with the block-device protocol and
  the buffer protocol), flash that erases to 0xff in 4 KB blocks and writes by AND, kept in
  a file beside the flash folder (`romfs_file`) so it outlives the process; at start and at
  the tool's "restart" the partition is mounted at /rom and `/rom`, `/rom/lib` appended to
  sys.path when it holds a ROMFS, as the port's mp_init does. `romfs=0`: ROMFS support but
  no partition. `boot_argv()` runs the board's main.py as the board would boot it.
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


ROMFS_EMULATOR = """# a ROMFS partition on the unix port, answering as MicroPython's ESP32 port does
# (tools/flash/virtual.py ROMFS_EMULATOR)
import sys
import vfs as _vfs_real
_ROM_FILE = %(file)r
_ROM_SIZE = %(size)d
_ROM_BLOCK = 4096
class _RomPart(bytearray):
    def ioctl(self, op, arg):
        if op == 4:
            return _ROM_SIZE // _ROM_BLOCK
        if op == 5:
            return _ROM_BLOCK
        if op == 6:
            s = arg * _ROM_BLOCK
            self[s:s + _ROM_BLOCK] = b'\\xff' * _ROM_BLOCK
            _rom_save(s, _ROM_BLOCK)
            return 0
        return None
    def writeblocks(self, block, buf, offset=None):
        if offset is None:
            raise OSError(22)
        s = block * _ROM_BLOCK + offset
        for i in range(len(buf)):
            self[s + i] &= buf[i]
        _rom_save(s, len(buf))
    def readblocks(self, block, buf, offset=0):
        s = block * _ROM_BLOCK + offset
        buf[:] = self[s:s + len(buf)]
def _rom_save(s, n):
    f = open(_ROM_FILE, 'r+b')
    f.seek(s)
    f.write(memoryview(_rom)[s:s + n])
    f.close()
_rom = _RomPart(_ROM_SIZE)
try:
    _f = open(_ROM_FILE, 'rb')
    _f.readinto(_rom)
    _f.close()
except OSError:
    _rom[:] = b'\\xff' * _ROM_SIZE
    _f = open(_ROM_FILE, 'wb')
    _f.write(_rom)
    _f.close()
del _f
class _VfsWithRom:
    def __getattr__(self, n):
        return getattr(_vfs_real, n)
    def rom_ioctl(self, op, *a):
        if op == 1:
            return 1 if _ROM_SIZE else 0
        if op == 2 and _ROM_SIZE:
            return _rom
        return -22
sys.modules['vfs'] = _VfsWithRom()
def _board_boot():
    try:
        _vfs_real.umount('/rom')
    except OSError:
        pass
    for p in ('/rom', '/rom/lib'):
        while p in sys.path:
            sys.path.remove(p)
    if not _ROM_SIZE:
        return
    try:
        _vfs_real.mount(_vfs_real.VfsRom(_rom), '/rom')
    except OSError:
        return
    sys.path.append('/rom')
    sys.path.append('/rom/lib')
_BOARD_KEEP = ('vfs',)
_board_restart = _board_boot
sys.path[0] = ''
_board_boot()
"""


class UnixBoard:
    """`with UnixBoard(flash_dir) as b: … b.port …`; `prelude` runs before the REPL starts
    (a script path: `micropython -i prelude`); `romfs`: a ROMFS partition of that many
    bytes (see the module doc)."""

    def __init__(
        self,
        flash_dir: str | os.PathLike[str],
        *,
        heap: str = "256k",
        prelude: str | os.PathLike[str] | None = None,
        link: str | os.PathLike[str] | None = None,
        romfs: int | None = None,
    ) -> None:
        self.flash = pathlib.Path(flash_dir)
        self.flash.mkdir(parents=True, exist_ok=True)
        self.port = str(link or self.flash.parent / f"tty-{self.flash.name}")
        self.heap = heap
        self.prelude = prelude
        self.romfs = romfs
        self.romfs_file = self.flash.parent / f"romfs-{self.flash.name}.bin"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.flash.parent / f"socat-{self.flash.name}.log"

    def _prelude(self) -> pathlib.Path | None:
        """The script run before the REPL: the ROMFS emulator, then `prelude`."""
        if self.romfs is None:
            return pathlib.Path(self.prelude) if self.prelude is not None else None
        code = ROMFS_EMULATOR % {"file": str(self.romfs_file), "size": self.romfs}
        if self.prelude is not None:
            code += pathlib.Path(self.prelude).read_text()
        path = self.flash.parent / f"prelude-{self.flash.name}.py"  # not on the "flash"
        path.write_text(code)
        return path

    def boot_argv(self, heap: str = "256k") -> list[str]:
        """The command that boots this board's flash as the board would (cwd = the flash
        folder): main.py, with the ROMFS partition mounted first when there is one."""
        if self.romfs is None:
            return [micropython_bin(), "-X", f"heapsize={heap}", "main.py"]
        boot = self.flash.parent / f"boot-{self.flash.name}.py"
        boot.write_text(
            ROMFS_EMULATOR % {"file": str(self.romfs_file), "size": self.romfs}
            + "exec(open('main.py').read(), {'__name__': '__main__'})\n"
        )
        return [micropython_bin(), "-X", f"heapsize={heap}", str(boot)]

    def start(self, timeout: float = 10.0) -> UnixBoard:
        if self.alive:  # `with UnixBoard(...).start() as b` must not start a second one
            return self
        if shutil.which("socat") is None:
            raise RuntimeError("socat is not installed (Debian package socat)")
        mp = [micropython_bin(), "-X", f"heapsize={self.heap}"]
        prelude = self._prelude()
        if prelude is not None:
            mp += ["-i", str(prelude)]
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
