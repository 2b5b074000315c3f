"""The board as the flashing tool sees it: a MicroPython raw REPL (through mpremote's serial
transport, which takes device paths and pyserial URLs such as socket://) and, for writing a
MicroPython image, the ESP32 ROM bootloader (through esptool).

One connection is held for the whole provisioning of a board (mpremote opens the port with
an exclusive lock, so no second tool can talk to it meanwhile) and it never soft-resets on
connect (mpremote's `resume`): a soft reset would end the MicroPython unix port's process
that test rigs use as a board.

Restart: on an ESP32, a soft reset inside the raw REPL (boot.py runs, main.py does not, so
the station does not start signing with a key the agent does not know yet); the final
start after commissioning is a hard reset (machine.reset(): main.py runs). The unix port
has no reset through its REPL (a soft reset is EOF: the process exits), so there a restart
drops every loaded module instead and the final start is left to whoever runs main.py.
"""

from __future__ import annotations

import ast
import errno
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import serial

from tools.flash.errors import FlashError

log = logging.getLogger(__name__)

# Oldest MicroPython the firmware supports: 1.23 (mpy v6.3: the version mpy-cross emits;
# the RTC epoch is 1970 and `ssl.SSLContext`, `json.dumps(separators=)` exist).
MIN_VERSION = (1, 23, 0)
MPY_MAJOR = 6
# sys.implementation._mpy bits 10.. -> mpy-cross -march names (py/persistentcode.h)
ARCHES = (
    "",
    "x86",
    "x64",
    "armv6",
    "armv6m",
    "armv7m",
    "armv7em",
    "armv7emsp",
    "armv7emdp",
    "xtensa",
    "xtensawin",
    "rv32imc",
    "rv64imc",
)
CHIPS = ("esp32", "esp32s2", "esp32s3", "esp32c3", "esp32c6", "unix")
# where a MicroPython image starts in flash (its bootloader's offset)
IMAGE_OFFSET = {"esp32": 0x1000, "esp32s2": 0x1000, "esp32s3": 0x0, "esp32c3": 0x0, "esp32c6": 0x0}
CHUNK = 1536  # bytes per raw-REPL write (2 KB of base64): 6x fewer round trips than mpremote's 256


@dataclass(frozen=True, kw_only=True)
class BoardInfo:
    platform: str  # sys.platform: esp32, linux, darwin
    machine: str  # sys.implementation._machine
    version: tuple[int, int, int]
    mpy: int  # sys.implementation._mpy (0 when the port does not say)
    unique_id: str | None  # machine.unique_id() as hex (the ESP32's MAC), None on the unix port

    @property
    def chip(self) -> str:
        """esp32, esp32s3, … from the machine string ("… with ESP32S3"), or unix."""
        if self.platform != "esp32":
            return "unix"
        m = re.search(r"with (ESP32\w*)", self.machine)
        return m.group(1).lower() if m else "esp32"

    @property
    def mpy_version(self) -> tuple[int, int]:
        return self.mpy & 0xFF, (self.mpy >> 8) & 3

    @property
    def arch(self) -> str | None:
        a = self.mpy >> 10
        return ARCHES[a] if 0 < a < len(ARCHES) else None

    @property
    def version_str(self) -> str:
        return ".".join(str(x) for x in self.version)

    def as_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "machine": self.machine,
            "chip": self.chip,
            "micropython": self.version_str,
            "mpy": "%d.%d" % self.mpy_version,
            "arch": self.arch,
            "unique_id": self.unique_id,
        }


def check_chip(info: BoardInfo, want: str) -> None:
    if info.chip != want:
        raise FlashError(
            "probe",
            f"wrong chip: the board is {info.chip} ({info.machine}), expected {want} (--chip)",
        )


def check_version(info: BoardInfo, emits: tuple[int, int]) -> None:
    """Refuse a MicroPython the firmware does not support or whose .mpy the compiler cannot make."""
    need = ".".join(str(x) for x in MIN_VERSION)
    if info.mpy == 0 or info.mpy_version[0] != emits[0] or info.version < MIN_VERSION:
        what = f"mpy v{info.mpy_version[0]}.{info.mpy_version[1]}" if info.mpy else "no mpy version"
        raise FlashError(
            "probe",
            f"MicroPython {info.version_str} on the board is too old "
            f"({what}): need {need} or newer (mpy v{emits[0]}); "
            "write a newer image with --image",
        )


def march_for(info: BoardInfo, emits: tuple[int, int]) -> str | None:
    """-march for mpy-cross: the board's own architecture when its mpy sub-version is the one
    mpy-cross emits (then native code would load too), else plain bytecode (loads on any
    board of the same major mpy version)."""
    return info.arch if info.mpy_version == emits else None


def mpy_cross_emits() -> tuple[int, int]:
    from tools import fwbuild

    out = subprocess.run(
        [fwbuild.mpy_cross_bin(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"mpy v(\d+)\.(\d+)", out)
    if not m:
        raise FlashError("build", f"cannot tell which mpy version mpy-cross emits: {out.strip()}")
    return int(m.group(1)), int(m.group(2))


# ---- ports ------------------------------------------------------------------------------


def check_port(port: str) -> None:
    """Fail with a clear reason when the port is absent or held by another program (pyserial's
    exclusive open takes a flock, as mpremote's does)."""
    if "://" not in port and not os.path.exists(port):
        raise FlashError("connect", f"port {port} not found (board not plugged in? wrong --port?)")
    try:
        s = serial.serial_for_url(port, do_not_open=True, baudrate=115200, exclusive=True)
        s.open()
        s.close()
    except (serial.SerialException, OSError, ValueError) as e:
        msg = str(e)
        busy = (
            "exclusively lock" in msg
            or getattr(e, "errno", None) in (errno.EBUSY, errno.EAGAIN)
            or "Errno 16" in msg
            or "Errno 11" in msg
        )
        if busy:
            raise FlashError(
                "connect",
                f"port {port} is busy: another program holds it "
                "(a serial monitor, mpremote, esptool?)",
            ) from None
        raise FlashError("connect", f"cannot open port {port}: {msg}") from None


# ---- on-board code (kept small: it is compiled by the board for every call) -------------

_PROBE = """import sys
try:
    import machine, binascii
    _u = binascii.hexlify(machine.unique_id()).decode()
except Exception:
    _u = None
_i = sys.implementation
print(repr((sys.platform, getattr(_i, '_machine', ''), tuple(_i.version[:3]), getattr(_i, '_mpy', 0), _u)))
"""

_LIST = """import os
def _w(d, o):
    for e in os.ilistdir(d or '.'):
        p = d + '/' + e[0] if d else e[0]
        if e[1] & 0x4000:
            o.append((p, 1))
            _w(p, o)
        else:
            o.append((p, 0))
_o = []
_w('', _o)
print(repr(_o))
del _o, _w
"""

_HASH = """import hashlib, binascii
def _h(p):
    h = hashlib.sha256()
    b = bytearray(512)
    m = memoryview(b)
    try:
        f = open(p, 'rb')
    except OSError:
        return None
    try:
        while True:
            n = f.readinto(b)
            if not n:
                break
            h.update(m[:n])
    except OSError:
        return None
    finally:
        f.close()
    return binascii.hexlify(h.digest()).decode()
print(repr([(p, _h(p)) for p in %r]))
del _h
"""

_REMOVE = """import os
for _p in %r:
    try:
        os.remove(_p)
    except OSError:
        pass
for _p in %r:
    try:
        os.rmdir(_p)
    except OSError:
        pass
"""

_MKDIRS = """import os
for _p in %r:
    try:
        os.mkdir(_p)
    except OSError:
        pass
"""

# the unix port's "restart": forget every module (a soft reset would end the process); a
# test rig's prelude may keep some (_BOARD_KEEP) and re-do its boot (_board_restart)
_PURGE = """import sys, gc
for _k in list(sys.modules):
    if _k not in globals().get('_BOARD_KEEP', ()):
        del sys.modules[_k]
if '_board_restart' in globals():
    _board_restart()
gc.collect()
"""

# ROMFS (MicroPython >= 1.25 built with MICROPY_VFS_ROM): the first partition as
# `mpremote romfs query` sees it (tools/mpremote/mpremote/commands.py): None without
# vfs.rom_ioctl, (0,) without a partition, else (count, size, block, is_object, first bytes).
# The ESP32 port answers with an esp32.Partition (block device + buffer protocol), other
# ports with a buffer and rom_ioctl(3..6) to write it.
_ROMFS_QUERY = """import vfs
def _q():
    if not hasattr(vfs, 'rom_ioctl'):
        return None
    n = vfs.rom_ioctl(1)
    if not isinstance(n, int) or n <= 0:
        return (0,)
    d = vfs.rom_ioctl(2, 0)
    if isinstance(d, int):
        return (0,)
    if hasattr(d, 'ioctl'):
        b = d.ioctl(5, 0)
        return (n, d.ioctl(4, 0) * b, b, True, bytes(memoryview(d)[:16]))
    b = vfs.rom_ioctl(6, 0)
    if not isinstance(b, int) or b <= 0:
        b = len(d)
    return (n, len(d), b, False, bytes(memoryview(d)[:16]))
print(repr(_q()))
del _q
"""

# sha256 of the partition's first N bytes, read in place (memory-mapped on the board)
_ROMFS_HASH = """import vfs, hashlib, binascii
print(repr(binascii.hexlify(hashlib.sha256(memoryview(vfs.rom_ioctl(2, 0))[:%d]).digest()).decode()))
"""

# before writing: nothing may run from /rom; unmount it (as mpremote romfs deploy does)
_ROMFS_OPEN = """import vfs, binascii
try:
    vfs.umount('/rom')
except OSError:
    pass
_dev = vfs.rom_ioctl(2, 0)
_d = binascii.a2b_base64
"""

_ROMFS_ERASE = """for _b in range(%d, %d):
    _dev.ioctl(6, _b)
"""

# the heap the running station starts with: its modules imported in a fresh interpreter
_HEAP = """import gc
gc.collect()
import %s
gc.collect()
print(repr((gc.mem_free(), gc.mem_alloc(), app.__file__)))
"""

# ESP32: the station's watchdog (30 s) keeps running once its main.py is interrupted; take
# it over with a long timeout and feed it between steps (a hard reset at the end clears it)
_KEEPALIVE = """import machine
try:
    _wdt
except NameError:
    _wdt = machine.WDT(timeout=300000)
_wdt.feed()
"""

SELFTEST_MARK = "SELFTEST "


@dataclass(frozen=True, kw_only=True)
class RomInfo:
    """The board's first ROMFS partition (None from Board.romfs_query: no ROMFS support)."""

    partitions: int  # 0: ROMFS support but no partition
    size: int = 0
    block: int = 0
    is_object: bool = False  # the ESP32 port's esp32.Partition (else a buffer, rom_ioctl 3..6)
    head: bytes = b""

    @property
    def image_bytes(self) -> int | None:
        """Bytes of the ROMFS image the partition holds now, None when it holds none."""
        from tools.romfs import used_size

        return used_size(self.head) if self.partitions else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "partitions": self.partitions,
            "size": self.size,
            "block": self.block,
            "image_bytes": self.image_bytes,
        }


class Board:
    """A MicroPython board on a serial port (or a pyserial URL), through its raw REPL."""

    def __init__(self, port: str, *, baud: int = 115200) -> None:
        self.port = port
        self.baud = baud
        self._t: Any = None
        self.info: BoardInfo | None = None

    # -- connection --

    def open(self) -> None:
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport

        if "://" not in self.port and not os.path.exists(self.port):
            check_port(self.port)  # raises "not found"
        try:
            # opened once (an open toggles DTR/RTS, which is the reset line on many boards)
            self._t = SerialTransport(self.port, baudrate=self.baud)
        except TransportError as e:
            check_port(self.port)  # mpremote says only "failed to access": find out why
            raise FlashError("connect", f"cannot open port {self.port}: {e}") from None
        try:
            # Ctrl-C stops whatever runs (the station's main.py) and enters the raw REPL
            # without a soft reset
            self._t.enter_raw_repl(soft_reset=False)
        except (TransportError, OSError, serial.SerialException) as e:
            self.close()
            raise FlashError("connect", f"no MicroPython REPL on {self.port}: {e}") from None

    def close(self) -> None:
        t, self._t = self._t, None
        if t is None:
            return
        try:
            if t.in_raw_repl:
                t.exit_raw_repl()
            t.close()
        except (OSError, serial.SerialException):
            pass

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw REPL --

    def exec(self, code: str, *, timeout: float = 10.0, stage: str = "board") -> str:
        """Run code on the board; its stdout. A board-side exception is a FlashError."""
        from mpremote.transport import TransportError

        if self._t is None:
            raise FlashError(stage, "not connected to the board")
        try:
            out, err = self._t.exec_raw(code, timeout=timeout)
        except (TransportError, OSError, serial.SerialException) as e:
            if "timeout" in str(e) and self._interrupt():
                raise FlashError(
                    stage, f"the board did not answer within {timeout:g} s (interrupted)"
                ) from None
            raise FlashError(stage, f"lost the board's REPL on {self.port}: {e}") from None
        if err:
            last = err.decode("utf-8", "replace").strip().splitlines()[-1:]
            raise FlashError(stage, f"the board raised: {last[0] if last else '?'}")
        return str(out.decode("utf-8", "replace"))

    def _interrupt(self) -> bool:
        """Ctrl-C whatever still runs and get the raw REPL back (so a rollback can still
        talk to the board); False when the board does not come back."""
        from mpremote.transport import TransportError

        try:
            self._t.serial.write(b"\r\x03\x03")
            time.sleep(0.2)
            self._t.enter_raw_repl(soft_reset=False)
            return True
        except (TransportError, OSError, serial.SerialException):
            return False

    def _eval(self, code: str, stage: str) -> Any:
        out = self.exec(code, stage=stage).strip()
        try:
            return ast.literal_eval(out.splitlines()[-1])
        except (ValueError, SyntaxError, IndexError):
            raise FlashError(stage, f"unexpected answer from the board: {out[-200:]!r}") from None

    def probe(self) -> BoardInfo:
        plat, mach, ver, mpy, uid = self._eval(_PROBE, "probe")
        v = tuple(int(x) for x in ver) + (0, 0, 0)
        self.info = BoardInfo(
            platform=str(plat),
            machine=str(mach),
            version=(v[0], v[1], v[2]),
            mpy=int(mpy),
            unique_id=uid,
        )
        return self.info

    def romfs_query(self) -> RomInfo | None:
        got = self._eval(_ROMFS_QUERY, "probe")
        if got is None:
            return None
        if got[0] == 0:
            return RomInfo(partitions=0)
        n, size, block, obj, head = got
        return RomInfo(
            partitions=int(n), size=int(size), block=int(block), is_object=bool(obj), head=head
        )

    def romfs_hash(self, n: int, *, stage: str = "verify") -> str:
        """sha256 of the partition's first n bytes, computed on the board."""
        return str(self._eval(_ROMFS_HASH % n, stage))

    def romfs_write(
        self, rom: RomInfo, data: bytes, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Write a ROMFS image to the first partition, as `mpremote romfs deploy` does
        (mpremote/commands.py: unmount /rom, erase/prepare, write, complete), in base64
        chunks through the raw REPL, the first chunk last: a write cut off half-way leaves
        an erased header, which the board does not mount, rather than a truncated image."""
        import base64

        if len(data) > rom.size:
            raise FlashError(
                "copy", f"the ROMFS image ({len(data)} bytes) exceeds the partition ({rom.size})"
            )
        self.exec(_ROMFS_OPEN, stage="copy")
        chunk = CHUNK
        if rom.is_object:
            blocks = -(-len(data) // rom.block)
            for i in range(0, blocks, 16):  # erasing a 4 KB block takes ~50 ms on an ESP32
                self.exec(_ROMFS_ERASE % (i, min(i + 16, blocks)), timeout=30, stage="copy")
            self.exec(
                f"def _w(o, b):\n    _dev.writeblocks(o // {rom.block}, b, o % {rom.block})",
                stage="copy",
            )
        else:
            m = self._eval(f"print(repr(vfs.rom_ioctl(3, 0, {len(data)})))", "copy")
            if not isinstance(m, int) or m < 0:
                raise FlashError("copy", f"the board refused to prepare its ROMFS partition ({m})")
            if m > 1:  # chunks of whole write units; the last padded as erased flash
                chunk = -(-CHUNK // m) * m
                data = data + b"\xff" * (-len(data) % m)
            self.exec("def _w(o, b):\n    vfs.rom_ioctl(4, 0, o, b)", stage="copy")
        offsets = list(range(0, len(data), chunk))
        done = 0
        for off in offsets[1:] + offsets[:1]:
            b64 = base64.b64encode(data[off : off + chunk]).decode()
            self.exec(f"_w({off}, _d('{b64}'))", stage="copy")
            done += len(data[off : off + chunk])
            if progress is not None:
                progress(done, len(data))
        if not rom.is_object:
            self.exec("vfs.rom_ioctl(5, 0)", stage="copy")
        self.exec("del _w, _dev, _d", stage="copy")

    def heap(self, modules: tuple[str, ...], *, stage: str = "selftest") -> tuple[int, int, str]:
        """(gc.mem_free(), gc.mem_alloc(), app.__file__) after importing `modules` (which
        must include app) and gc.collect(); call it right after a restart."""
        out = self.exec(_HEAP % ", ".join(modules), timeout=30.0, stage=stage).strip()
        try:
            free, alloc, where = ast.literal_eval(out.splitlines()[-1])
        except (ValueError, SyntaxError, IndexError, TypeError):
            raise FlashError(stage, f"unexpected answer from the board: {out[-200:]!r}") from None
        return int(free), int(alloc), str(where)

    def keepalive(self) -> None:
        if self.info is not None and self.info.platform == "esp32":
            self.exec(_KEEPALIVE, stage="board")

    # -- files (paths relative to the flash root, "/" separated) --

    def listing(self) -> tuple[list[str], list[str]]:
        """(files, directories) on the board's filesystem, recursively."""
        items = self._eval(_LIST, "list")
        files = [str(p) for p, d in items if not d]
        dirs = [str(p) for p, d in items if d]
        return files, dirs

    def hashes(self, paths: list[str], *, stage: str = "verify") -> dict[str, str | None]:
        """sha256 hex of each file, computed on the board (None: no such file)."""
        out: dict[str, str | None] = {}
        for i in range(0, len(paths), 32):  # bounded code size per exec
            got = self._eval(_HASH % (paths[i : i + 32],), stage)
            out.update({str(p): h for p, h in got})
        return out

    def read(self, path: str) -> bytes | None:
        from mpremote.transport import TransportError

        try:
            return bytes(self._t.fs_readfile(path, chunk_size=CHUNK))
        except (TransportError, OSError):
            return None

    def write(
        self, path: str, data: bytes, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Write a file through the raw REPL, base64 in chunks: 1.33 bytes on the line per
        byte, where mpremote's bytes literals average 2.3 for .mpy files."""
        import base64

        q = repr(path)
        self.exec(
            f"import binascii\n_f = open({q}, 'wb')\n_w = _f.write\n_d = binascii.a2b_base64",
            stage="copy",
        )
        try:
            for i in range(0, len(data), CHUNK):
                b64 = base64.b64encode(data[i : i + CHUNK]).decode()
                self.exec(f"_w(_d('{b64}'))", stage="copy")
                if progress is not None:
                    progress(min(i + CHUNK, len(data)), len(data))
        except FlashError as e:
            try:
                self.exec("_f.close()", stage="copy")
            except FlashError:
                pass
            raise FlashError("copy", f"writing {path} on the board failed: {e.message}") from None
        self.exec("_f.close()\ndel _f, _w, _d", stage="copy")
        if not data and progress is not None:
            progress(0, 0)

    def mkdirs(self, dirs: list[str]) -> None:
        if dirs:
            self.exec(_MKDIRS % (sorted(dirs, key=len),), stage="copy")

    def remove(self, files: list[str], dirs: list[str] | None = None) -> None:
        dirs = dirs or []
        if files or dirs:
            self.exec(_REMOVE % (list(files), sorted(dirs, key=len, reverse=True)), stage="copy")

    # -- restart, self-test, start --

    def restart(self) -> None:
        """Fresh interpreter state without starting the station (see the module doc)."""
        from mpremote.transport import TransportError

        assert self.info is not None
        if self.info.platform == "esp32":
            try:
                self._t.enter_raw_repl(soft_reset=True)
            except (TransportError, OSError, serial.SerialException) as e:
                raise FlashError(
                    "restart", f"the board did not come back after a soft reset: {e}"
                ) from None
        else:
            self.exec(_PURGE, stage="restart")

    def selftest(self, timeout: float = 90.0) -> dict[str, Any]:
        out = self.exec("import selftest\nselftest.main()\n", timeout=timeout, stage="selftest")
        for line in out.splitlines():
            if line.startswith(SELFTEST_MARK):
                try:
                    res = json.loads(line[len(SELFTEST_MARK) :])
                except ValueError:
                    break
                if isinstance(res, dict):
                    return res
        raise FlashError("selftest", f"the self-test printed no result: {out[-200:]!r}")

    def start(self) -> str:
        """Let the station run: a hard reset on an ESP32; on the unix port leave the REPL
        (main.py is started by whoever runs the process). Returns what was done."""
        assert self.info is not None
        if self.info.platform == "esp32":
            try:
                self._t.exec_raw_no_follow("import machine\nmachine.reset()\n")
            except Exception:  # noqa: BLE001  (the reset may cut the answer short)
                pass
            self._t.in_raw_repl = False
            return "hard reset: main.py starts the station"
        self.exec(_PURGE, stage="start")
        return "unix port: left at the REPL; start main.py in the flash folder"


# ---- esptool (ROM bootloader) ------------------------------------------------------------


def _esptool_cmd(name: str) -> str:
    """esptool 5 spells commands and options with dashes, 4.x with underscores."""
    import esptool

    major = int(str(getattr(esptool, "__version__", "5")).split(".")[0])
    return name if major >= 5 else name.replace("-", "_")


def _no_reset() -> list[str]:
    return ["--after", _esptool_cmd("no-reset")]


def esptool_run(args: list[str], *, stage: str = "image", timeout: float = 600.0) -> str:
    cmd = [sys.executable, "-m", "esptool", *args]
    log.debug("esptool %s", " ".join(args))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FlashError(stage, f"esptool {args[-1] if args else ''} timed out") from None
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise FlashError(stage, "esptool: " + _esptool_reason(out))
    return out


def _esptool_reason(out: str) -> str:
    for pat in (
        r"A fatal error occurred: (.+)",
        r"(Could not open port .+)",
        r"(Failed to connect.+)",
    ):
        m = re.search(pat, out)
        if m:
            return m.group(1).strip()
    lines = [x for x in out.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "failed"


@dataclass(frozen=True, kw_only=True)
class ImageResult:
    chip: str
    mac: str | None
    offset: int
    size: int
    sha256: str
    erased: bool
    seconds: float


def detect_chip(port: str) -> tuple[str, str | None]:
    """(chip as esptool's --chip names it, MAC) of the chip in its ROM bootloader."""
    out = esptool_run(["--port", port, *_no_reset(), _esptool_cmd("chip-id")], stage="image")
    m = re.search(r"Detecting chip type\.*\s*(ESP[\w-]+)", out)
    if not m:
        m = re.search(r"Chip (?:is|type:)\s*(ESP[\w-]+)", out)
    if not m:
        raise FlashError("image", "esptool did not say which chip answered")
    chip = m.group(1).lower().replace("-", "")
    mac = re.search(r"MAC:\s*([0-9a-f:]{17})", out)
    return chip, mac.group(1) if mac else None


def write_image(
    port: str,
    chip: str | None,
    image: str,
    *,
    offset: int | None = None,
    erase: bool = False,
    baud: int = 460800,
) -> ImageResult:
    """Write a MicroPython image (erasing the whole flash first when asked), then verify it
    with esptool's verify-flash. The chip must be the one asked for (None: any)."""
    import hashlib

    t0 = time.monotonic()
    if not os.path.isfile(image):
        raise FlashError("image", f"image {image} not found")
    found, mac = detect_chip(port)
    if chip is None:
        chip = found
    if found != chip:
        raise FlashError(
            "image", f"wrong chip: esptool found {found} on {port}, expected {chip} (--chip)"
        )
    if offset is None:
        offset = IMAGE_OFFSET.get(chip, 0)
    base = ["--chip", chip, "--port", port, "--baud", str(baud)]
    no_reset = _no_reset()
    if erase:
        esptool_run(base + no_reset + [_esptool_cmd("erase-flash")])
    esptool_run(base + no_reset + [_esptool_cmd("write-flash"), hex(offset), image])
    esptool_run(base + [_esptool_cmd("verify-flash"), hex(offset), image])
    with open(image, "rb") as f:
        data = f.read()
    return ImageResult(
        chip=chip,
        mac=mac,
        offset=offset,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        erased=erase,
        seconds=round(time.monotonic() - t0, 2),
    )
