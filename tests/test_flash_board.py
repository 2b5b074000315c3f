"""`stationctl flash` against virtual boards, no hardware: the MicroPython unix port's REPL on
a pty (socat) driven by mpremote, esptool against esp32-mock-bootloader over socket://, the
rig's charger/BMS/meter on ptys, a private Mosquitto with the shipped ACL and per-station
passwords, and the agent's SQLite key store (and a running `stationctl agent`).

Acceptance: a provisioned board boots from what was copied and its telemetry verifies at the
agent with the registered key; a replacement board continues the boot numbers. Then every
error case: port absent or busy, wrong chip (esptool and REPL), MicroPython too old,
verification mismatch, self-test failure, known station without the agent, another
station's board, each leaving nothing registered as good.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import re
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import serial

from agent.keys import KeyStore
from agent.store import Store
from agent.wire import verify
from stationctl import flash as cmd_flash
from stationctl.cli import UsageError
from tools.flash import broker, passwd
from tools.flash.virtual import MockBootloader, UnixBoard, micropython_bin
from tools.mosquitto import Mosquitto
from tools.rig.rig import Rig

SID = "KH-FLS-0001"
AGENT_PW = "agent-secret-pw"
ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclass
class Bench:
    dir: pathlib.Path
    mosq: Mosquitto
    pw: pathlib.Path
    rig: Rig
    db: str
    site: pathlib.Path
    reports: pathlib.Path

    def args(
        self, board: UnixBoard | None, *extra: str, sid: str = SID, agent: bool = True
    ) -> list[str]:
        a = [
            "--station",
            sid,
            "--chip",
            "unix",
            "--site",
            str(self.site),
            "--broker-passwd",
            str(self.pw),
            "--broker-reload",
            f"kill -HUP {self.mosq.proc.pid}",
            "--reports",
            str(self.reports),
        ]
        if board is not None:
            a += ["--port", board.port]
        if agent:
            a += ["--agent-db", self.db]
        return a + list(extra)

    def board(self, name: str = "flash", **kw: Any) -> UnixBoard:
        return UnixBoard(self.dir / name, **kw).start()

    def keys(self, sid: str = SID) -> list[tuple[int, str]]:
        with KeyStore(Store(self.db, create=False)) as ks:
            return [(i.kid, i.state) for i in ks.list(sid)]

    def key(self, sid: str = SID) -> tuple[int, bytes] | None:
        with KeyStore(Store(self.db, create=False)) as ks:
            return ks.current(sid)


@pytest.fixture
def bench(tmp_path: pathlib.Path) -> Iterator[Bench]:
    pw = tmp_path / "stations.passwd"
    passwd.set_password(pw, "agent", AGENT_PW)
    mosq = Mosquitto(tmp_path / "mosq", password_file=str(pw), acl_file=str(broker.ACL))
    mosq.start()
    db = f"sqlite:///{tmp_path / 'agent.db'}"
    Store(db).close()
    with Rig(slots=2, seed=5, workdir=tmp_path / "rig") as rig:
        rig.insert(1, pack="72V", power_w=1200, capacity_wh=50, soc=0.4)
        site = tmp_path / "site.json"
        site.write_text(
            json.dumps(
                {
                    "broker": {"host": "127.0.0.1", "port": mosq.port},
                    "net": {"kind": "host"},
                    "slots": 2,
                    "ntp": "host",
                    "sample_ms": 500,
                    "telemetry_s": 1,
                    "stale_s": 3,
                    "charger": {"uart": rig.charger_path},
                    "bus": {"uart": rig.bus_path, "timeout_ms": 150},
                }
            )
        )
        try:
            yield Bench(tmp_path, mosq, pw, rig, db, site, tmp_path / "reports")
        finally:
            mosq.stop()


def flash(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`stationctl flash ARGV` in this process (only the flash subcommand registered)."""
    p = argparse.ArgumentParser(prog="stationctl")
    cmd_flash.register(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(["flash", *argv])
    try:
        code = int(args.func(args))
    except UsageError as e:
        print(f"stationctl flash: {e}", file=sys.stderr)
        code = 2
    out, err = capsys.readouterr()
    return code, out, err


def board_config(board: UnixBoard) -> dict[str, Any]:
    return dict(json.loads((board.flash / "config.json").read_text()))


def last_report(b: Bench, sid: str = SID) -> dict[str, Any]:
    reps = sorted(b.reports.glob(f"{sid}-*.json"), key=lambda p: p.stat().st_mtime_ns)
    assert reps, "no report written"
    return dict(json.loads(reps[-1].read_text()))


def secrets_absent(cfg: dict[str, Any], *texts: str) -> None:
    for t in texts:
        assert cfg["key"] not in t
        if cfg["broker"]["password"]:
            assert cfg["broker"]["password"] not in t


def all_reports_text(b: Bench) -> str:
    return "".join(p.read_text() for p in b.reports.glob("*"))


def one_line_error(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("stationctl flash:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- acceptance ---------------------------------------------------------------------------


# The agent re-reads keys every key_reload_s (0.5 here) and on a miss at most once a second;
# a message signed with a key it has not loaded yet is quarantined for good (unknown_station /
# unknown_kid), so the station starts that long after the registration (a real board takes
# longer than this to boot and join the network).
KEY_RELOAD_WAIT = 1.5


def _agent(b: Bench) -> subprocess.Popen[bytes]:
    passwd_file = b.dir / "agent.pass"
    passwd_file.write_text(AGENT_PW + "\n")
    conf = b.dir / "agent.toml"
    conf.write_text(
        f'[db]\nurl = "{b.db}"\n\n[broker]\nhost = "127.0.0.1"\nport = {b.mosq.port}\n'
        f'user = "agent"\npassword_file = "{passwd_file}"\nclient_id = "agent-test"\n\n'
        "[ingest]\nkey_reload_s = 0.5\n"
    )
    log = open(b.dir / "agent.log", "ab")
    return subprocess.Popen(
        [str(pathlib.Path(sys.executable).parent / "stationctl"), "agent", "--config", str(conf)],
        stdout=log,
        stderr=log,
    )


def _run_station(flash_dir: pathlib.Path, log: pathlib.Path) -> subprocess.Popen[bytes]:
    """The copied main.py on MicroPython, in its flash folder: what the board boots."""
    f = open(log, "ab")
    return subprocess.Popen(
        [micropython_bin(), "-X", "heapsize=256k", "main.py"], cwd=flash_dir, stdout=f, stderr=f
    )


def _raw(b: Bench, sid: str = SID) -> list[tuple[int, int, int, bytes, str]]:
    db = sqlite3.connect(b.db.removeprefix("sqlite:///"))
    try:
        return [
            (int(r[0]), int(r[1]), int(r[2]), bytes(r[3]), str(r[4]))
            for r in db.execute(
                "SELECT boot, seq, kid, record, kind FROM raw WHERE sid = ? ORDER BY boot, seq",
                (sid,),
            )
        ]
    finally:
        db.close()


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_acceptance_image_provision_boot_and_replacement(bench: Bench) -> None:
    b = bench
    image = b.dir / "micropython.bin"
    image.write_bytes(os.urandom(48 * 1024))
    board = b.board()
    agent = _agent(b)
    station = None
    try:
        with MockBootloader("esp32") as boot_rom:
            r = subprocess.run(
                [
                    str(pathlib.Path(sys.executable).parent / "stationctl"),
                    "flash",
                    *b.args(
                        board, "--image", str(image), "--erase", "--esptool-port", boot_rom.url
                    ),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=b.dir,
            )
        assert r.returncode == 0, r.stderr
        assert f"{SID}: commissioned, kid 1, boot_base 0" in r.stdout
        cfg = board_config(board)
        rep = last_report(b)
        assert rep["result"] == "ok" and rep["selftest"]["ok"] and rep["verify"]["ok"]
        assert rep["image"]["erased"] and rep["image"]["chip"] == "esp32"
        assert rep["image"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
        assert {"charger", "bms", "meter", "broker", "clock"} <= set(rep["selftest"]["checks"])
        bms = rep["selftest"]["checks"]["bms"]["slots"]
        assert bms["2"] == "empty" and re.fullmatch(r"[0-9A-Za-z-]{8}", bms["1"])  # a battery id
        # every file the report lists is on the board's flash with that hash, config included
        for path, h in rep["files"].items():
            assert hashlib.sha256((board.flash / path).read_bytes()).hexdigest() == h
        # identity: the registered key is the board's key; credentials are the board's
        assert (
            b.key() == (1, bytes.fromhex(cfg["key"])) and cfg["kid"] == 1 and cfg["boot_base"] == 0
        )
        line = passwd.entry(b.pw, SID)
        assert line is not None and passwd.check_password(
            cfg["broker"]["password"], line.split(":", 1)[1]
        )
        assert cfg["broker"]["user"] == SID
        secrets_absent(cfg, r.stdout, r.stderr, all_reports_text(b))
        board.stop()

        # the station boots from the copied files; the agent verifies it with the registered key
        time.sleep(KEY_RELOAD_WAIT)
        station = _run_station(board.flash, b.dir / "station1.log")
        _wait(
            lambda: sum(1 for x in _raw(b) if x[4] == "telemetry") >= 2,
            40,
            "telemetry stored by the agent",
        )
        _stop(station)
        rows = _raw(b)
        assert rows[0][:2] == (0, 0) and all(x[2] == 1 for x in rows)  # boot 0 (boot_base), kid 1
        key = bytes.fromhex(cfg["key"])
        from agent.wire import StaticKeys

        for _boot, _seq, _kid, rec, kind in rows:  # and independently of the agent
            verify(kind, SID, rec, StaticKeys({(SID, 1): key}))
        top = max(x[0] for x in rows)

        # a replacement board for the same station: next kid, boot_base above the agent's top
        board2 = b.board("flash2")
        code = subprocess.run(
            [str(pathlib.Path(sys.executable).parent / "stationctl"), "flash", *b.args(board2)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=b.dir,
        )
        assert code.returncode == 0, code.stderr
        cfg2 = board_config(board2)
        assert cfg2["kid"] == 2 and cfg2["boot_base"] == top + 1
        assert b.keys() == [(1, "retired"), (2, "active")]  # kid 1 still verifies its backlog
        board2.stop()
        time.sleep(KEY_RELOAD_WAIT)
        station = _run_station(board2.flash, b.dir / "station2.log")
        _wait(lambda: any(x[2] == 2 for x in _raw(b)), 40, "telemetry of the replacement board")
        _stop(station)
        new = [x for x in _raw(b) if x[2] == 2]
        assert min(x[0] for x in new) == top + 1  # (sid, boot, seq) never repeats
        db = sqlite3.connect(b.db.removeprefix("sqlite:///"))
        assert (
            db.execute("SELECT COUNT(*) FROM quarantine WHERE sid = ?", (SID,)).fetchone()[0] == 0
        )
        db.close()
    finally:
        if station is not None:
            _stop(station)
        _stop(agent)
        board.stop()


def test_batch_two_boards_with_summary(bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    b = bench
    b1, b2 = b.board("f1"), b.board("f2")
    try:
        csv = b.dir / "stations.csv"
        csv.write_text(
            f"sid,port,telemetry_s,bms.per_cycle\nKH-FLS-0101,{b1.port},5,\n"
            f"KH-FLS-0102,{b2.port},,1\n"
        )
        code, out, err = flash(capsys, "--batch", str(csv), *b.args(None)[2:])
        assert code == 0, err
        assert (
            "summary" in out
            and out.count("ok") >= 2
            and "KH-FLS-0101" in out
            and "KH-FLS-0102" in out
        )
        c1, c2 = board_config(b1), board_config(b2)
        assert (c1["sid"], c1["telemetry_s"], c1["bms"]["per_cycle"]) == ("KH-FLS-0101", 5, 2)
        assert (c2["sid"], c2["telemetry_s"], c2["bms"]["per_cycle"]) == ("KH-FLS-0102", 1, 1)
        assert b.key("KH-FLS-0101") == (1, bytes.fromhex(c1["key"]))
        assert b.key("KH-FLS-0102") == (1, bytes.fromhex(c2["key"]))
        secrets_absent(c1, out, err)
        secrets_absent(c2, out, err)
    finally:
        b1.stop()
        b2.stop()


def test_batch_bad_line_is_bad_input_before_any_board(
    bench: Bench, capsys: pytest.CaptureFixture[str]
) -> None:
    b = bench
    csv = b.dir / "stations.csv"
    csv.write_text("sid,port,slots\nKH-FLS-0201,/dev/null,2\nKH-FLS-0202,/dev/null,99\n")
    code, _out, err = flash(capsys, "--batch", str(csv), *b.args(None)[2:])
    assert code == 2
    assert "line 3" in err and "slots" in err
    assert b.keys("KH-FLS-0201") == []


# ---- errors: each a one-line reason, a non-zero exit, nothing registered as good ----------


def _nothing_done(b: Bench, board: UnixBoard | None, sid: str = SID) -> None:
    assert b.keys(sid) == []
    assert passwd.entry(b.pw, sid) is None
    if board is not None:
        assert not (board.flash / "config.json").exists()


def test_port_absent(bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = flash(capsys, *bench.args(None, "--port", str(bench.dir / "ttyNOPE")))
    assert code == 1
    assert "not found" in one_line_error(err)
    _nothing_done(bench, None)
    assert last_report(bench)["result"] == "failed"


def test_port_busy(bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    board = bench.board()
    try:
        with serial.Serial(board.port, exclusive=True):  # a serial monitor holds it
            code, _out, err = flash(capsys, *bench.args(board))
        assert code == 1
        assert "busy" in one_line_error(err)
        _nothing_done(bench, board)
    finally:
        board.stop()


def test_wrong_chip_esptool(bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    image = bench.dir / "mp.bin"
    image.write_bytes(b"\xe9" + os.urandom(4095))
    with MockBootloader("esp32s3") as rom:
        code, _out, err = flash(
            capsys,
            "--station",
            SID,
            "--chip",
            "esp32",
            "--port",
            rom.url,
            "--image",
            str(image),
            "--agent-db",
            bench.db,
            "--site",
            str(bench.site),
            "--reports",
            str(bench.reports),
        )
    assert code == 1
    line = one_line_error(err)
    assert "wrong chip" in line and "esp32s3" in line
    assert last_report(bench)["stage"] == "image"
    _nothing_done(bench, None)


def test_wrong_chip_repl(bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    board = bench.board()
    try:
        args = bench.args(board)
        args[args.index("--chip") + 1] = "esp32"
        code, _out, err = flash(capsys, *args)
        assert code == 1
        assert "wrong chip: the board is unix" in one_line_error(err)
        _nothing_done(bench, board)
        assert os.listdir(board.flash) == []  # nothing copied
    finally:
        board.stop()


OLD_MICROPYTHON = """\
import sys
_real_sys = sys
class _Impl:
    name = 'micropython'
    version = (1, 20, 0, '')
    _machine = 'linux [GCC 14.2.1] version'
    _mpy = 6 | (1 << 8) | (2 << 10)
class _OldSys:
    implementation = _Impl()
    platform = 'linux'
    def __getattr__(self, n):
        return getattr(_real_sys, n)
_real_sys.modules['sys'] = _OldSys()
"""


def test_micropython_too_old(bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    prelude = bench.dir / "old.py"
    prelude.write_text(OLD_MICROPYTHON)
    board = bench.board(prelude=prelude)
    try:
        code, _out, err = flash(capsys, *bench.args(board))
        assert code == 1
        line = one_line_error(err)
        assert "MicroPython 1.20.0 on the board is too old" in line and "1.23" in line
        _nothing_done(bench, board)
        assert last_report(bench)["board"]["micropython"] == "1.20.0"
    finally:
        board.stop()


# a flash that flips the first byte of every write to one file: reads back wrong every time
BAD_FLASH = """\
_real_open = open
class _Flaky:
    def __init__(self, f):
        self._f = f
    def write(self, b):
        b = bytes(b)
        if b:
            b = bytes([b[0] ^ 0x55]) + b[1:]
        return self._f.write(b)
    def close(self):
        return self._f.close()
def open(p, mode='r', *a):
    f = _real_open(p, mode, *a)
    if p == 'wire.mpy' and 'w' in mode:
        return _Flaky(f)
    return f
"""


def test_verification_mismatch(bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    prelude = bench.dir / "bad.py"
    prelude.write_text(BAD_FLASH)
    board = bench.board(prelude=prelude)
    try:
        code, _out, err = flash(capsys, *bench.args(board))
        assert code == 1
        line = one_line_error(err)
        assert "verification failed: 1 file(s) differ" in line and "wire.mpy" in line
        rep = last_report(bench)
        assert rep["stage"] == "verify" and rep["verify"]["mismatch"] == ["wire.mpy"]
        _nothing_done(bench, board)  # no key, no credentials, no config.json on the board
        assert (board.flash / "wire.mpy").exists()
    finally:
        board.stop()


def test_selftest_failure_rolls_back_a_reprovisioning(
    bench: Bench, capsys: pytest.CaptureFixture[str]
) -> None:
    b = bench
    board = b.board()
    try:
        code, _out, err = flash(capsys, *b.args(board))
        assert code == 0, err
        cfg_before = (board.flash / "config.json").read_bytes()
        pw_before = b.pw.read_bytes()
        keys_before = b.keys()
        # the same station again, but its charger link is dead: the self-test fails
        code, _out, err = flash(
            capsys, *b.args(board, "--set", "charger.uart=/dev/nonexistent-tty")
        )
        assert code == 1
        line = one_line_error(err)
        assert "self-test failed: charger: cannot use the charger link" in line
        rep = last_report(b)
        assert rep["result"] == "failed" and rep["stage"] == "selftest"
        assert (
            not rep["selftest"]["checks"]["charger"]["ok"]
            and rep["selftest"]["checks"]["broker"]["ok"]
        )
        assert any("put back" in x for x in rep["rollback"])
        # everything as it was: the old key stays the active one, the board has its old config
        # (so it still runs as before), the broker file has the old credentials
        assert b.keys() == keys_before == [(1, "active")]
        assert (board.flash / "config.json").read_bytes() == cfg_before
        assert b.pw.read_bytes() == pw_before
    finally:
        board.stop()


def test_known_station_without_agent_is_refused_unless_forced(
    bench: Bench, capsys: pytest.CaptureFixture[str]
) -> None:
    b = bench
    board = b.board()
    try:
        assert flash(capsys, *b.args(board))[0] == 0
        key_file = b.dir / "KH.key"
        code, _out, err = flash(capsys, *b.args(board, "--key-out", str(key_file), agent=False))
        assert code == 1
        line = one_line_error(err)
        assert "known station" in line and "no --agent-db given" in line and "--force" in line
        assert not key_file.exists() and b.keys() == [(1, "active")]
        # without an agent and without somewhere to put the key: bad usage
        code, _out, err = flash(capsys, *b.args(board, agent=False))
        assert code == 2 and "--key-out" in err
        # forced: kid from the board's config + 1, the key in a 0600 file, the agent untouched
        code, out, err = flash(
            capsys,
            *b.args(board, "--key-out", str(key_file), "--force", "--boot-base", "40", agent=False),
        )
        assert code == 0, err
        cfg = board_config(board)
        assert cfg["kid"] == 2 and cfg["boot_base"] == 40
        assert key_file.read_text().strip() == cfg["key"]
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert b.keys() == [(1, "active")]
        rep = last_report(b)
        assert "NOT registered" in rep["key_registered"] and "--kid 2" in rep["key_registered"]
        secrets_absent(cfg, out, err, all_reports_text(b))
    finally:
        board.stop()


def test_board_of_another_station(bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    b = bench
    board = b.board()
    try:
        assert flash(capsys, *b.args(board, sid="KH-FLS-0301"))[0] == 0
        (board.flash / "state.a").write_text("AB1 1\n{}\n00000000\n")  # that station's data
        code, _out, err = flash(capsys, *b.args(board, sid="KH-FLS-0302"))
        assert code == 1
        assert "holds station KH-FLS-0301's config" in one_line_error(err)
        assert board_config(board)["sid"] == "KH-FLS-0301"
        assert b.keys("KH-FLS-0302") == []
        code, _out, err = flash(capsys, *b.args(board, "--force", sid="KH-FLS-0302"))
        assert code == 0, err
        assert board_config(board)["sid"] == "KH-FLS-0302"
        assert not (board.flash / "state.a").exists()  # the other station's data is gone
        assert "state.a" in last_report(b, "KH-FLS-0302")["removed"]
    finally:
        board.stop()


def test_reflash_same_station_keeps_data_and_skips_unchanged(
    bench: Bench, capsys: pytest.CaptureFixture[str]
) -> None:
    b = bench
    board = b.board()
    try:
        assert flash(capsys, *b.args(board))[0] == 0
        (board.flash / "old_module.py").write_text("x = 1\n")  # a stale firmware file
        (board.flash / "outbox.0").write_bytes(b"pending")  # the station's own data
        # an OTA update's version and state: what is flashed now is the factory version
        (board.flash / "fw" / "b").mkdir(parents=True)
        (board.flash / "fw" / "b" / "app.mpy").write_bytes(b"M\x06")
        (board.flash / "ota.a").write_bytes(b"state")
        code, _out, err = flash(capsys, *b.args(board))
        assert code == 0, err
        rep = last_report(b)
        assert (
            rep["firmware"]["written"] == 0
            and rep["firmware"]["unchanged"] == len(rep["files"]) - 1
        )
        assert rep["removed"] == ["fw/b/app.mpy", "old_module.py", "ota.a"]
        assert not (board.flash / "old_module.py").exists()
        assert not (board.flash / "fw").exists() and not (board.flash / "ota.a").exists()
        assert (board.flash / "outbox.0").read_bytes() == b"pending"
        assert board_config(board)["kid"] == 2
    finally:
        board.stop()


def test_dry_run_needs_no_board(bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = flash(capsys, *bench.args(None, "--dry-run"))
    assert code == 0, err
    assert "dry run: nothing written" in out and '"key": "<redacted>"' in out
    assert '"password": "<redacted>"' in out
    assert re.search(r"[0-9a-f]{64}  wire\.mpy", out)
    assert not re.search(r'"key": "[0-9a-f]{64}"', out)
    _nothing_done(bench, None)
    assert not bench.reports.exists()


def test_selftest_that_hangs_times_out_and_rolls_back(
    bench: Bench, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broker that accepts the connection and never answers: the self-test outlives
    --selftest-timeout, the tool gets the REPL back and still rolls back."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # the kernel completes the handshake; nobody ever answers
    board = bench.board()
    try:
        code, _out, err = flash(
            capsys,
            *bench.args(
                board, "--selftest-timeout", "2", "--set", f"broker.port={silent.getsockname()[1]}"
            ),
        )
        assert code == 1
        assert "did not answer within 2 s" in one_line_error(err)
        rep = last_report(bench)
        assert rep["stage"] == "selftest" and rep["rollback"] == [
            f"broker credentials in {bench.pw}: put back",
            "board config.json: put back",
        ]
        _nothing_done(bench, board)
    finally:
        board.stop()
        silent.close()
