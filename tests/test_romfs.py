"""The firmware as a ROMFS image (tools/romfs.py): built deterministically from the .mpy
build with mpremote's writer, mounted on the MicroPython unix port with `vfs.VfsRom`, the
station booted from it against the rig and a Mosquitto (signed telemetry, verified as the
agent verifies it), and the heap it leaves beside the same firmware from .mpy files."""

from __future__ import annotations

import hashlib
import pathlib
import subprocess
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from agent.wire import StaticKeys, verify
from tools import fwbuild, romfs
from tools.mosquitto import Mosquitto
from tools.rig.rig import Rig
from tools.station_proc import station_config

KEY = bytes(range(32))


def test_image_is_deterministic_and_holds_the_mpy_build_but_main(tmp_path: pathlib.Path) -> None:
    a = romfs.build_image()
    b = romfs.build_image(out=tmp_path / "other-build")  # compiled again, elsewhere
    assert a.data == b.data and a.sha256 == b.sha256
    assert a.data.startswith(romfs.ROMFS_HEADER) and romfs.used_size(a.data) == a.size
    tree = fwbuild.build()
    mpy = {
        p.relative_to(tree).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in tree.rglob("*")
        if p.is_file()
    }
    # every module of the .mpy deployment, byte for byte, and nothing else: main.py, the
    # config and the station's data stay on the filesystem
    assert a.files == {k: v for k, v in mpy.items() if k != "main.py"}
    assert "hal/board.mpy" not in a.files and "hal/unix.mpy" in a.files
    assert all(p.endswith(".mpy") for p in a.files)
    # no native code in the firmware: mpy-cross writes no arch into plain bytecode, so the
    # image for an ESP32 (-march=xtensawin) is the same image
    assert romfs.build_image("xtensawin").sha256 == a.sha256


def test_used_size() -> None:
    img = romfs.build_image().data
    assert romfs.used_size(img[:16]) == len(img)
    assert romfs.used_size(b"\xff" * 16) is None  # an erased partition
    assert romfs.used_size(b"") is None
    assert romfs.used_size(romfs.ROMFS_HEADER + b"\x80\x05") == 3 + 2 + 5  # padded length


def _mp(code: str, tmp: pathlib.Path, heap: str = "1M") -> str:
    script = tmp / "t.py"
    script.write_text(code)
    r = subprocess.run(
        [fwbuild.micropython_bin(), "-X", f"heapsize={heap}", str(script)],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout


def test_unix_port_mounts_the_image_and_imports_from_it(tmp_path: pathlib.Path) -> None:
    img = tmp_path / "fw.romfs"
    img.write_bytes(romfs.build_image().data)
    out = _mp(
        romfs.unix_boot_script(
            img,
            "import os, app, wire, outbox\n"
            "print(app.__file__, wire.__file__, outbox.__file__)\n"
            "print(sorted(os.listdir('/rom/hal')))\n"
            "print(os.listdir('.'))\n",
        ),
        tmp_path,
    )
    lines = out.splitlines()
    assert lines[0] == "/rom/app.mpy /rom/wire.mpy /rom/outbox.mpy"
    assert lines[1] == "['__init__.mpy', 'esp32.mpy', 'unix.mpy']"
    assert "t.py" in lines[2]  # the working directory is still the filesystem


def test_bytecode_in_place_leaves_more_heap_than_mpy_files() -> None:
    rom = romfs.import_heap("romfs")
    mpy = romfs.import_heap("mpy")
    # the unix port (64-bit) measured 64 KB vs 114 KB: bytecode and constants stay in the
    # image; what remains is objects (functions, classes, dicts) and the qstr pool
    assert rom["imports"] < 0.7 * mpy["imports"], (rom, mpy)


class Published:
    def __init__(self, port: int, sid: str) -> None:
        self.sid = sid
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="romfs-test")
        self.c.on_message = self._on
        self.c.on_connect = lambda c, *_: c.subscribe(f"stations/{sid}/#", 1)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload)))

    def telemetry(self) -> list[dict[str, Any]]:
        with self.lock:
            got = [p for t, p in self.got if t.endswith("/telemetry")]
        keys = StaticKeys({(self.sid, 1): KEY})
        return [verify("telemetry", self.sid, p, keys).body for p in got]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_station_boots_from_romfs_and_publishes_signed_telemetry(
    tmp_path: pathlib.Path, mosquitto: Mosquitto
) -> None:
    sid = "KH-ROM-0001"
    img = tmp_path / "fw.romfs"
    img.write_bytes(romfs.build_image().data)
    pub = Published(mosquitto.port, sid)
    try:
        with Rig(slots=2, seed=23, workdir=tmp_path / "rig") as rig:
            rig.insert(1, pack="72V", power_w=1500, capacity_wh=20, soc=0.3)
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
                persist={"every_mwh": 1, "every_s": 1},
            )
            # the files run at 256k; the image's bytearray is heap on the unix port (flash
            # on a board), so it gets that much on top
            heap = f"{256 + img.stat().st_size // 1024 + 1}k"
            flash = tmp_path / "flash"
            st = romfs.RomStation(flash, cfg, heap=heap, image=img)
            st.start()
            try:
                deadline = time.monotonic() + 40
                while time.monotonic() < deadline:
                    tel = pub.telemetry()
                    if len(tel) >= 3 and tel[-1]["slots"][0]["e_mwh"] > 0:
                        break
                    assert st.alive, "\n".join(st.output[-20:])
                    time.sleep(0.2)
                else:
                    raise AssertionError("no telemetry: " + "\n".join(st.output[-20:]))
                time.sleep(1.2)  # one more persist period
            finally:
                st.stop()
    finally:
        pub.close()
    assert "romfs: app from /rom/app.mpy" in st.output
    tel = pub.telemetry()  # every one verified with the station's key
    regs = [b["slots"][0]["e_mwh"] for b in tel]
    assert regs == sorted(regs) and regs[-1] > 0
    # the station's data went to the filesystem, never anywhere near the image
    assert (flash / "state.a").exists() or (flash / "state.b").exists()
    assert not any(p.suffix in (".py", ".mpy") for p in flash.iterdir())
