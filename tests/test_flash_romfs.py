"""`stationctl flash --deploy auto|romfs|mpy` against virtual boards with an emulated ROMFS
partition (tools/flash/virtual.py ROMFS_EMULATOR: vfs.rom_ioctl answering as MicroPython's
ESP32 port does, flash that erases to 0xff and writes by AND, kept in a file).

What this covers: the probe (mpremote's query), the decision with every answer (no ROMFS
support, support without a partition, a partition too small, one that fits), the image
written (first chunk last) and its hash read back, the stale .mpy files that would shadow it
removed, an unchanged image not rewritten, the board booting the station from /rom, the
heap and where the firmware ran from in the report, and real `mpremote romfs query/deploy`
agreeing with the emulated partition. What it cannot: an ESP32's flash, its mmap cache and
its soft reset (docs/hardware.md).
"""

from __future__ import annotations

import hashlib
import pathlib
import subprocess
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.wire import StaticKeys, verify
from tests.test_flash_board import (  # noqa: F401  (bench: a fixture)
    AGENT_PW,
    SID,
    Bench,
    bench,
    board_config,
    flash,
    last_report,
    one_line_error,
)
from tools import romfs
from tools.flash.board import Board, RomInfo
from tools.flash.errors import BadInput, FlashError
from tools.flash.provision import choose_deploy
from tools.flash.virtual import UnixBoard

PART = 128 * 1024  # partitions-4MiB-romfs.csv: romfs 0x20000


def test_choose_deploy_with_every_answer() -> None:
    part = RomInfo(partitions=1, size=PART, block=4096, is_object=True, head=b"\xff" * 16)
    none = RomInfo(partitions=0)
    assert choose_deploy("auto", part, 60_000) == ("romfs", f"ROMFS partition of {PART} bytes")
    assert choose_deploy("romfs", part, 60_000)[0] == "romfs"
    assert choose_deploy("mpy", part, 60_000) == ("mpy", "--deploy mpy")
    assert choose_deploy("auto", None, 60_000) == (
        "mpy",
        "the board's MicroPython has no ROMFS support (no vfs.rom_ioctl)",
    )
    assert (
        choose_deploy("auto", none, 60_000)[1] == "the board's MicroPython has no ROMFS partition"
    )
    assert "exceeds the partition" in choose_deploy("auto", part, PART + 1)[1]
    for rom, what in ((None, "no ROMFS support"), (none, "no ROMFS partition")):
        with pytest.raises(FlashError) as e:
            choose_deploy("romfs", rom, 60_000)
        assert what in e.value.message and "docs/hardware.md" in e.value.message
    with pytest.raises(FlashError, match="exceeds the partition"):
        choose_deploy("romfs", part, PART + 1)
    with pytest.raises(BadInput):
        choose_deploy("frozen", part, 1)


def _telemetry(b: Bench, cfg: dict[str, Any], board: UnixBoard, n: int = 2) -> list[Any]:
    """Boot the board's flash as the board would and collect n telemetry messages, each
    verified with the key the tool gave the board."""
    got: list[bytes] = []
    lock = threading.Lock()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="romfs-watch")
    c.username_pw_set("agent", AGENT_PW)

    def on_msg(_c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        if m.topic.endswith("/telemetry"):
            with lock:
                got.append(bytes(m.payload))

    c.on_message = on_msg
    c.on_connect = lambda cl, *_: cl.subscribe(f"stations/{cfg['sid']}/#", 1)
    c.connect("127.0.0.1", b.mosq.port)
    c.loop_start()
    log = open(b.dir / "station.log", "ab")
    station = subprocess.Popen(board.boot_argv("512k"), cwd=board.flash, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and len(got) < n:
            assert station.poll() is None, (b.dir / "station.log").read_text()[-2000:]
            time.sleep(0.1)
        assert len(got) >= n, (b.dir / "station.log").read_text()[-2000:]
    finally:
        station.terminate()
        station.wait(10)
        log.close()
        c.loop_stop()
        c.disconnect()
    keys = StaticKeys({(cfg["sid"], cfg["kid"]): bytes.fromhex(cfg["key"])})
    return [verify("telemetry", cfg["sid"], p, keys).body for p in got]


def test_romfs_deploy_boot_reflash_and_back_to_mpy(
    bench: Bench,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    b = bench
    board = b.board(romfs=PART, heap="512k")
    try:
        # a board that ran an older .mpy deployment: its files would shadow the image
        (board.flash / "wire.mpy").write_bytes(b"M\x06stale")
        code, out, err = flash(capsys, *b.args(board))
        assert code == 0, err
        assert "deploy romfs" in out
        rep = last_report(b)
        assert rep["deploy"] == "romfs" and rep["board"]["romfs"] == {
            "partitions": 1,
            "size": PART,
            "block": 4096,
            "image_bytes": None,  # erased
        }
        # (the image is compared with what the tool built: firmware/ may change meanwhile)
        size, sha = rep["romfs"]["size"], rep["romfs"]["sha256"]
        assert rep["romfs"]["written"] and rep["romfs"]["partition"] == PART
        assert rep["verify"]["ok"] and rep["verify"]["romfs_sha256"] == sha
        assert rep["heap"]["app_from"] == "/rom/app.mpy" and rep["heap"]["free"] > 0
        assert "wire.mpy" in rep["removed"]
        # on the filesystem: main.py and config.json, nothing else of the firmware
        assert sorted(p.name for p in board.flash.iterdir()) == ["config.json", "main.py"]
        assert set(rep["files"]) == {"config.json", "main.py"}
        part = board.romfs_file.read_bytes()
        assert len(part) == PART and hashlib.sha256(part[:size]).hexdigest() == sha
        assert romfs.used_size(part) == size and set(part[size:]) == {0xFF}
        txt = next(b.reports.glob(f"{SID}-*.txt")).read_text()
        assert f"deploy:    romfs (ROMFS partition of {PART} bytes)\n" in txt
        assert f"romfs:     image {size} bytes" in txt and "heap:      " in txt

        # real mpremote reads the partition the tool wrote
        q = subprocess.run(
            [sys.executable, "-m", "mpremote", "connect", board.port, "resume", "romfs", "query"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "ROMFS0 partition has size 131072 bytes (32 blocks of 4096 bytes each)" in q.stdout
        payload = 0  # mpremote gives the payload's length: the varuint after the header
        for v in part[3:8]:
            payload = (payload << 7) | (v & 0x7F)
            if not v & 0x80:
                break
        assert 0 < payload < size
        assert f"ROMFS image size: {payload}" in q.stdout, q.stdout + q.stderr
        board.stop()

        # the board boots the station from /rom; the telemetry verifies with its key
        cfg = board_config(board)
        bodies = _telemetry(b, cfg, board)
        assert all(x["slots"][0]["n"] == 1 for x in bodies)

        # the same station again: the image is on the board already and is not rewritten
        board.start()
        code, _out, err = flash(capsys, *b.args(board))
        assert code == 0, err
        rep = last_report(b)
        assert rep["deploy"] == "romfs" and rep["board"]["romfs"]["image_bytes"] == size
        # not rewritten (unless a colleague changed firmware/ in between)
        assert rep["romfs"]["written"] == (rep["romfs"]["sha256"] != sha)
        assert rep["heap"]["app_from"] == "/rom/app.mpy"

        # --deploy mpy on the same board: .mpy files, which come first on sys.path
        code, _out, err = flash(capsys, *b.args(board, "--deploy", "mpy"))
        assert code == 0, err
        rep = last_report(b)
        assert rep["deploy"] == "mpy" and rep["deploy_why"] == "--deploy mpy"
        assert rep["heap"]["app_from"] == "app.mpy" and "romfs" not in rep
        assert (board.flash / "wire.mpy").exists()
        for path, h in rep["files"].items():
            assert hashlib.sha256((board.flash / path).read_bytes()).hexdigest() == h
    finally:
        board.stop()


def test_no_partition_auto_is_mpy_and_romfs_is_refused(
    bench: Bench,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    b = bench
    board = b.board(romfs=0)  # ROMFS support, no partition
    small = b.board("small", romfs=16 * 1024)  # a partition the image does not fit in
    try:
        code, _out, err = flash(capsys, *b.args(board, "--deploy", "romfs"))
        assert code == 1
        line = one_line_error(err)
        assert "--deploy romfs: the board's MicroPython has no ROMFS partition" in line
        assert last_report(b)["stage"] == "plan" and b.keys() == []
        assert not (board.flash / "config.json").exists()
        code, _out, err = flash(capsys, *b.args(board))
        assert code == 0, err
        rep = last_report(b)
        assert rep["deploy"] == "mpy" and "no ROMFS partition" in rep["deploy_why"]
        assert rep["board"]["romfs"]["partitions"] == 0
        assert rep["heap"]["app_from"] == "app.mpy"

        code, _out, err = flash(capsys, *b.args(small, sid="KH-FLS-0401"))
        assert code == 0, err
        rep = last_report(b, "KH-FLS-0401")
        assert rep["deploy"] == "mpy" and "exceeds the partition (16384 bytes)" in rep["deploy_why"]
    finally:
        board.stop()
        small.stop()


def test_the_tool_accepts_an_image_mpremote_deployed(
    bench: Bench,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    tmp_path: pathlib.Path,
) -> None:
    """`mpremote romfs deploy` (mpremote's own writer and protocol) puts the image in the
    emulated partition; the tool finds exactly its bytes there and writes nothing."""
    b = bench
    board = b.board(romfs=PART, heap="512k")
    image = romfs.build_image()
    img = tmp_path / "fw.romfs"
    img.write_bytes(image.data)
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "mpremote",
                "connect",
                board.port,
                "resume",
                "romfs",
                "deploy",
                str(img),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "ROMFS image deployed" in r.stdout, r.stdout + r.stderr
        code, _out, err = flash(capsys, *b.args(board, "--deploy", "romfs"))
        assert code == 0, err
        rep = last_report(b)
        assert rep["board"]["romfs"]["image_bytes"] == image.size
        assert rep["romfs"]["written"] is False and rep["verify"]["romfs_sha256"] == image.sha256
    finally:
        board.stop()


class _Recorder(Board):
    """A Board whose raw REPL only records what it is asked to run."""

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        super().__init__("/dev/null")
        self.ran: list[str] = []
        self.answers = answers or {}

    def exec(self, code: str, *, timeout: float = 10.0, stage: str = "board") -> str:
        self.ran.append(code)
        for k, v in self.answers.items():
            if k in code:
                return repr(v) + "\n"
        return ""


def _writes(ran: list[str]) -> list[tuple[int, bytes]]:
    import base64
    import re

    out = []
    for code in ran:
        m = re.fullmatch(r"_w\((\d+), _d\('([^']*)'\)\)", code)
        if m:
            out.append((int(m.group(1)), base64.b64decode(m.group(2))))
    return out


def test_image_write_puts_the_header_last_and_covers_the_image() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: 3 blocks of 4 KB, 7 chunks
    esp = _Recorder()
    esp.romfs_write(RomInfo(partitions=1, size=PART, block=4096, is_object=True), data)
    assert any("_dev.ioctl(6, _b)" in c and "range(0, 3)" in c for c in esp.ran)  # 3 erased
    w = _writes(esp.ran)
    assert w[-1][0] == 0 and all(off > 0 for off, _ in w[:-1])  # the header goes last
    assert b"".join(d for _, d in sorted(w)) == data
    assert "vfs.umount('/rom')" in esp.ran[0]
    # a port whose partition is a buffer (rom_ioctl 3/4/5), writing in units of 256 bytes
    buf = _Recorder({"vfs.rom_ioctl(3, 0,": 256})
    buf.romfs_write(RomInfo(partitions=1, size=PART, block=4096, is_object=False), data[:1000])
    w = _writes(buf.ran)
    assert w[-1][0] == 0 and all(off % 256 == 0 and len(d) % 256 == 0 for off, d in w)
    whole = b"".join(d for _, d in sorted(w))
    assert whole[:1000] == data[:1000] and whole[1000:] == b"\xff" * 24
    assert buf.ran.count("vfs.rom_ioctl(5, 0)") == 1 and buf.ran[-2] == "vfs.rom_ioctl(5, 0)"
    with pytest.raises(FlashError, match="exceeds the partition"):
        esp.romfs_write(RomInfo(partitions=1, size=4096, block=4096, is_object=True), data)


def test_batch_csv_deploy_column(tmp_path: pathlib.Path) -> None:
    from tools.flash import bulk
    from tools.flash.provision import Request

    site = {"broker": {"host": "h", "port": 1883}, "net": {"kind": "host"}, "slots": 2}
    base = Request(sid="BATCH", site=site, deploy="auto")
    f = tmp_path / "s.csv"
    f.write_text("sid,port,deploy\nKH-A-0001,/dev/a,mpy\nKH-A-0002,/dev/b,\n")
    assert [r.deploy for r in bulk.read_batch(str(f), base)] == ["mpy", "auto"]
    f.write_text("sid,port,deploy\nKH-A-0001,/dev/a,frozen\n")
    with pytest.raises(BadInput, match="line 2: deploy must be auto, romfs or mpy"):
        bulk.read_batch(str(f), base)
