"""tools/flash pieces without a board: what the board's answers mean (chip, MicroPython and
mpy versions), the station config (validated by the firmware's own rules, secrets redacted),
the agent's answer (known, next kid, boot_base) and registration, the board's persisted boot
counter, batch CSV checks, reports, and the command line's usage errors."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import pytest

from agent.keys import KeyStore
from agent.store import RawRow, Store
from stationctl import flash as cmd_flash
from stationctl.cli import UsageError
from tools.flash import agentdb, bulk, plan, report
from tools.flash.board import BoardInfo, check_chip, check_version, march_for
from tools.flash.errors import BadInput, FlashError
from tools.flash.provision import Request

# a CA certificate, DER as base64 (broker.ca: required with broker.tls; tests/fw/test_config_tls.py)
CA_B64 = (
    "MIIBgTCCASegAwIBAgIUPeC0bD+pbxZjvC155gMzk0C3t2IwCgYIKoZIzj0EAwIwFTETMBEGA1UEAwwKZncgdGVz"
    "dCBDQTAgFw0yNjEyMDMyMTI5MTBaGA8yMTI2MTEwOTIxMjkxMFowFTETMBEGA1UEAwwKZncgdGVzdCBDQTBZMBMG"
    "ByqGSM49AgEGCCqGSM49AwEHA0IABDhUMlEZECAyhzCDVeCp1ep2G7UiaygWQiOW/4V8XSRfvXpPcgW2b7MsuvhY"
    "GS5uTfsNYBcOkG5NU23Ntpu0hQ+jUzBRMB0GA1UdDgQWBBQ5hJcloqpQRoUOIf4iqz3gqGHxyDAfBgNVHSMEGDAW"
    "gBQ5hJcloqpQRoUOIf4iqz3gqGHxyDAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQDhIdgKkX06"
    "vIJ4+NmLMzwAfmT2ORru+f00xuHTe6k/VgIgRtA9S3lgz4DU1mrUWFkxyZ2+8V7eqV2S2byrBTqhNIQ="
)
SITE = {
    "broker": {"host": "10.1.2.3", "port": 1883},
    "net": {"kind": "wifi", "ssid": "depot", "password": "wifi-secret"},
    "slots": 4,
}


def info(
    platform: str = "esp32",
    machine: str = "Generic ESP32 module with ESP32",
    version: tuple[int, int, int] = (1, 24, 1),
    mpy: int = 6 | (3 << 8) | (10 << 10),
) -> BoardInfo:
    return BoardInfo(
        platform=platform, machine=machine, version=version, mpy=mpy, unique_id="a4cf12"
    )


def test_board_info_chip_and_mpy() -> None:
    assert info().chip == "esp32" and info().arch == "xtensawin" and info().mpy_version == (6, 3)
    assert info(machine="ESP32S3 module with ESP32S3").chip == "esp32s3"
    assert (
        info(machine="ESP32C3 module with ESP32C3", mpy=6 | (3 << 8) | (11 << 10)).arch == "rv32imc"
    )
    unix = info("linux", "linux [GCC 14.2.1] version", (1, 29, 0), 2822)
    assert unix.chip == "unix" and unix.arch == "x64" and unix.mpy_version == (6, 3)
    check_chip(unix, "unix")
    with pytest.raises(FlashError, match="wrong chip: the board is esp32s3"):
        check_chip(info(machine="ESP32S3 module with ESP32S3"), "esp32")


def test_micropython_version_gate() -> None:
    check_version(info(), (6, 3))
    check_version(info(version=(1, 30, 0), mpy=6 | (4 << 8)), (6, 3))  # newer: plain bytecode loads
    for old in (
        info(version=(1, 22, 2), mpy=6 | (2 << 8)),
        info(version=(1, 18, 0), mpy=5),
        info(version=(1, 12, 0), mpy=0),
    ):
        with pytest.raises(FlashError, match="too old") as e:
            check_version(old, (6, 3))
        assert "need 1.23.0 or newer" in e.value.message and e.value.stage == "probe"
    # the board's own arch only when its mpy sub-version is the one mpy-cross emits
    assert march_for(info(), (6, 3)) == "xtensawin"
    assert march_for(info(version=(1, 30, 0), mpy=6 | (4 << 8) | (10 << 10)), (6, 3)) is None


def test_station_config_is_the_firmwares_config() -> None:
    key = bytes(range(32))
    cfg = plan.station_config(SITE, sid="KH-PNH-0001", kid=3, key=key, boot_base=18, password="pw")
    assert cfg["key"] == key.hex() and cfg["kid"] == 3 and cfg["boot_base"] == 18
    assert cfg["broker"]["user"] == "KH-PNH-0001" and cfg["broker"]["password"] == "pw"
    assert cfg["charger"]["uart"] == 1 and cfg["meter"] == {"unit": 1, "model": "sdm630"}
    # the firmware accepts exactly these bytes
    fwconfig = plan.firmware_module("config")
    assert fwconfig.parse(plan.config_bytes(cfg).decode())["sid"] == "KH-PNH-0001"
    red = plan.redacted(cfg)
    assert red["key"] == red["broker"]["password"] == red["net"]["password"] == plan.REDACTED
    assert key.hex() not in json.dumps(red) and cfg["key"] == key.hex()  # the original untouched


@pytest.mark.parametrize(
    "site, words",
    [
        ({k: v for k, v in SITE.items() if k != "slots"}, ["slots: missing", "--slots"]),
        ({**SITE, "slots": 17}, ["slots: must be <= 16"]),
        ({**SITE, "colour": "red"}, ["colour: unknown key"]),
        ({**SITE, "bus": {"uart": 2, "parity": "E"}}, ["bus.parity"]),
        ({**SITE, "net": {"kind": "wifi"}}, ["net.ssid: missing"]),
    ],
)
def test_bad_site_names_the_key(site: dict[str, object], words: list[str]) -> None:
    with pytest.raises(BadInput) as e:
        plan.station_config(site, sid="KH-PNH-0001", kid=1, key=bytes(32), boot_base=0, password="")
    assert e.value.code == 2 and all(w in e.value.message for w in words), e.value.message


def test_overrides() -> None:
    over = plan.parse_sets(
        [
            "slots=8",
            "meter=null",
            "net.ssid=depot 2",
            "bus.parity=0",
            'charger={"uart": "/dev/ttyS1"}',
        ]
    )
    assert over == {
        "slots": 8,
        "meter": None,
        "net": {"ssid": "depot 2"},
        "bus": {"parity": 0},
        "charger": {"uart": "/dev/ttyS1"},
    }
    merged = plan.merge(SITE, over)
    assert merged["net"] == {"kind": "wifi", "ssid": "depot 2", "password": "wifi-secret"}
    for bad in (["slots"], ["key=00"], ["broker.user=X"], ["broker.password=x"], ["a..b=1"]):
        with pytest.raises(BadInput):
            plan.parse_sets(bad)
    with pytest.raises(BadInput, match="boot_base is set by the flashing tool"):
        p = pathlib.Path(__file__).parent / "_flash_site_tmp.json"
        try:
            p.write_text(json.dumps({**SITE, "boot_base": 4}))
            plan.load_site(str(p))
        finally:
            p.unlink()
    with pytest.raises(BadInput, match="bad station id"):
        plan.check_sid("kh-lower")


def test_board_boot_reads_the_persisted_counter() -> None:
    persist = plan.firmware_module("persist")
    a = persist.encode(7, {"boot": 41, "regs": {"1": 5}})
    b = persist.encode(8, {"boot": 42, "regs": {"1": 9}})
    assert plan.board_boot([a, b]) == 42
    assert plan.board_boot([a, b[:-5]]) == 41  # a torn newer slot does not count
    assert plan.board_boot([b"junk"]) is None and plan.board_boot([]) is None


def test_agent_answers_and_registration(tmp_path: pathlib.Path) -> None:
    url = f"sqlite:///{tmp_path / 'agent.db'}"
    with pytest.raises(FlashError, match="unreachable: no such file"):
        agentdb.ask(url, "KH-A-0001")
    assert not (tmp_path / "agent.db").exists()  # asking never creates a database
    with Store(url) as st:
        st.write_batch(
            [
                RawRow("KH-A-0001", b, s, "telemetry", "t", 0, 1, b"{}")
                for b, s in ((3, 0), (17, 4), (9, 1))
            ]
        )
        KeyStore(st).add("KH-A-0001", bytes(32))
    a = agentdb.ask(url, "KH-A-0001")
    assert a.known and a.kids == [1] and a.max_boot == 17 and a.next_kid == 2 and a.boot_base == 18
    n = agentdb.ask(url, "KH-N-0001")
    assert not n.known and n.next_kid == 1 and n.boot_base == 0
    agentdb.register(url, "KH-A-0001", bytes([1] * 32), 2)
    with pytest.raises(FlashError, match="already has a key 2") as e:
        agentdb.register(url, "KH-A-0001", bytes([2] * 32), 2)  # a second technician, same kid
    assert e.value.stage == "register"
    with KeyStore(url) as ks:
        assert ks.current("KH-A-0001") == (2, bytes([1] * 32))
    (tmp_path / "junk.db").write_text("not sqlite")
    with pytest.raises(FlashError, match="unreachable"):
        agentdb.ask(f"sqlite:///{tmp_path / 'junk.db'}", "KH-A-0001")


def test_batch_csv_checks(tmp_path: pathlib.Path) -> None:
    base = Request(sid="BATCH", site=SITE, dry_run=False)
    f = tmp_path / "s.csv"

    def bad(text: str, word: str) -> None:
        f.write_text(text)
        with pytest.raises(BadInput) as e:
            bulk.read_batch(str(f), base)
        assert word in e.value.message, e.value.message

    bad("port\n/dev/x\n", "no `sid` column")
    bad("sid,port\n", "no stations")
    bad(
        "sid,port\nKH-A-0001,/dev/a\nKH-A-0001,/dev/b\n", "line 3: station KH-A-0001 again (line 2)"
    )
    bad("sid,port,kid\nKH-A-0001,/dev/a,two\n", "line 2: kid must be an integer")
    bad("sid,port\nKH-A-0001,/dev/a,extra\n", "more cells than columns")
    bad("sid,port\nKH-A-0001,\n", "no port")
    bad("sid,port,broker.user\nKH-A-0001,/dev/a,X\n", "set by the flashing tool")
    f.write_text(
        "sid,port,slots,net.ssid,esptool_port\nKH-A-0001,/dev/a,2,yard,\n"
        "KH-A-0002,/dev/b,,,socket://h:1\n"
    )
    reqs = bulk.read_batch(str(f), base)
    assert [
        (r.sid, r.port, r.site["slots"], r.site["net"]["ssid"], r.esptool_port) for r in reqs
    ] == [
        ("KH-A-0001", "/dev/a", 2, "yard", None),
        ("KH-A-0002", "/dev/b", 4, "depot", "socket://h:1"),
    ]


def test_report_text_has_the_verdict_and_no_secrets() -> None:
    cfg = plan.station_config(
        SITE, sid="KH-PNH-0001", kid=2, key=bytes([7] * 32), boot_base=5, password="brokerpw"
    )
    rep = {
        "sid": "KH-PNH-0001",
        "result": "failed",
        "stage": "selftest",
        "error": "self-test failed: x",
        "started_ms": 1764150000123,
        "elapsed_s": 3.1,
        "kid": 2,
        "boot_base": 5,
        "config": plan.redacted(cfg),
        "files": {"config.json": "ab" * 32},
        "selftest": {
            "ok": False,
            "ms": 900,
            "checks": {
                "charger": {"ok": False, "detail": "slot 2: ser_to"},
                "meter": {"ok": True, "detail": "meter 7 answers"},
            },
        },
        "rollback": ["board config.json: put back"],
    }
    text = report.text(rep)
    assert "result:    FAILED at selftest: self-test failed: x" in text
    assert "FAIL charger  slot 2: ser_to" in text and "ok   meter" in text
    assert "2025-11-26T09:40:00.123Z" in text and "rollback:  board config.json: put back" in text
    assert (
        bytes([7] * 32).hex() not in text and "brokerpw" not in text and "wifi-secret" not in text
    )


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    p = argparse.ArgumentParser(prog="stationctl")
    cmd_flash.register(p.add_subparsers(dest="cmd", required=True))
    try:
        args = p.parse_args(["flash", *argv])
        code = int(args.func(args))
    except UsageError as e:
        print(f"stationctl flash: {e}", file=sys.stderr)
        code = 2
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    site = tmp_path / "site.json"
    site.write_text(json.dumps(SITE))
    common = ["--site", str(site), "--reports", str(tmp_path / "r")]
    cases = [
        ([], "one of the arguments --station --batch is required"),
        (["--station", "KH-A-0001", "--erase", "--port", "/dev/x"], "--erase erases the flash"),
        (["--station", "bad id", "--dry-run"], "bad station id"),
        (["--station", "KH-A-0001", "--dry-run", "--set", "slots"], "want KEY=VALUE"),
        (["--station", "KH-A-0001", "--dry-run", "--set", "slots=0"], "slots: must be >= 1"),
        (["--station", "KH-A-0001"], "--port is required"),
        (["--station", "KH-A-0001", "--dry-run", "--chip", "esp33"], "unknown --chip esp33"),
        (["--station", "KH-A-0001", "--port", str(tmp_path / "tty")], "give --agent-db URL"),
        (
            ["--station", "KH-A-0001", "--dry-run", "--site", str(tmp_path / "none.json")],
            "cannot read site file",
        ),
    ]
    for argv, words in cases:
        code, _out, err = _cli(capsys, *common, *argv)
        assert code == 2, (argv, err)
        assert words in err, (argv, err)
        assert len([x for x in err.splitlines() if x.startswith("stationctl flash:")]) <= 1
    assert not (tmp_path / "r").exists()  # bad input touches nothing, not even the reports


def test_cli_dry_run_json(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    code, out, err = _cli(
        capsys,
        "--station",
        "KH-A-0001",
        "--dry-run",
        "--json",
        "--broker",
        "mq.example:8883",
        "--slots",
        "2",
        "--set",
        "net.kind=lan",
        "--set",
        "broker.tls=true",
        "--set",
        f"broker.ca={CA_B64}",
        "--reports",
        str(tmp_path / "r"),
    )
    assert code == 0, err
    rep = json.loads(out.splitlines()[0])
    assert rep["result"] == "dry-run" and rep["kid"] == 1 and rep["boot_base"] == 0
    assert rep["config"]["broker"] == {
        "host": "mq.example",
        "port": 8883,
        "tls": True,
        "ca": CA_B64,
        "prefix": "stations",
        "user": "KH-A-0001",
        "password": "",
    }
    assert rep["config"]["key"] == plan.REDACTED and rep["config"]["slots"] == 2
    assert "selftest.mpy" in rep["files"] and "main.py" in rep["files"]


def test_cli_agent_config_gives_the_database(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    url = f"sqlite:///{tmp_path / 'agent.db'}"
    with Store(url) as st:
        st.write_batch([RawRow("KH-A-0001", 6, 0, "event", "t", 0, 1, b"{}")])
        KeyStore(st).add("KH-A-0001", bytes(32))
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[db]\nurl = "{url}"\n')
    code, out, err = _cli(
        capsys,
        "--station",
        "KH-A-0001",
        "--dry-run",
        "--json",
        "--agent-config",
        str(conf),
        "--broker",
        "mq",
        "--slots",
        "1",
        "--set",
        "net.kind=lan",
    )
    assert code == 0, err
    rep = json.loads(out.splitlines()[0])
    assert (
        rep["agent"]["answered"]
        and rep["agent"]["known"]
        and rep["kid"] == 2
        and rep["boot_base"] == 7
    )
    code, _out, err = _cli(
        capsys, "--station", "KH-A-0001", "--dry-run", "--agent-config", str(tmp_path / "no.toml")
    )
    assert code == 2 and "no.toml" in err
