"""`stationctl meter` (the grid meter register): add, calibrate, install, remove, list, check
on both engines; exit status 2 with one line for bad input; reads never create a
database."""

from __future__ import annotations

import json
import pathlib

import pytest

from agent import meters
from agent.meters import day_ms
from agent.store import Store
from stationctl.cli import main

SID = "KH-MCL-0001"
SID2 = "KH-MCL-0002"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["meter", *args])
    out, err = capsys.readouterr()
    return code, out, err


def add(capsys: pytest.CaptureFixture[str], url: str, serial: str, due: str, **kw: str) -> int:
    args = ["add", "--db", url, "--serial", serial, "--model", kw.get("model", "SDM630")]
    args += ["--class", kw.get("cls", "1.0"), "--calibrated", kw.get("calibrated", "2025-01-01")]
    args += ["--due", due, "--certificate", kw.get("certificate", f"CERT-{serial}")]
    return run(capsys, *args)[0]


@pytest.fixture
def url(db_url: str) -> str:
    Store(db_url).close()
    return db_url


def test_add_install_list_check_calibrate_remove(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert add(capsys, url, "SN-A", "2026-01-01") == 0
    assert add(capsys, url, "SN-B", "2026-03-01", cls="0.5") == 0
    code, out, _ = run(capsys, "install", "--db", url, "--serial", "SN-A", "--sid", SID,
                       "--from", "2025-06-01", "--by", "alice")  # fmt: skip
    assert code == 0 and f"SN-A installed at {SID} from 2025-06-01T00:00:00.000Z" in out
    # at 2025-12-10: SN-A due in 22 days, SN-B not installed
    code, out, _ = run(capsys, "list", "--db", url, "--at", "2025-12-10")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["serial", "model", "class"]
    assert "SN-A" in lines[1] and SID in lines[1] and lines[1].endswith("due in 22 days")
    assert "SN-B" in lines[2] and lines[2].endswith("ok") and SID not in lines[2]
    assert run(capsys, "check", "--db", url, "--at", "2025-12-10")[0] == 0
    # 2026-01-05: SN-A is overdue -> check exits 1, list says since when
    code, out, _ = run(capsys, "check", "--db", url, "--at", "2026-01-05T12:00Z")
    assert code == 1 and f"SN-A at {SID}: OVERDUE since 2026-01-01 (4 days)" in out
    code, out, _ = run(capsys, "list", "--db", url, "--at", "2026-01-05", "--json")
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["serial"] for r in rows] == ["SN-A", "SN-B"]
    assert rows[0]["status"] == "overdue" and rows[0]["overdue_days"] == 4
    assert rows[0]["installed_by"] == "alice" and rows[0]["installed_from"] == day_ms("2025-06-01")
    assert rows[1]["status"] == "ok" and rows[1]["sid"] is None and rows[1]["class"] == "0.5"
    # a new calibration: history kept, the new one in force from its day
    code, _, _ = run(capsys, "calibrate", "--db", url, "--serial", "SN-A", "--calibrated",
                     "2026-01-06", "--due", "2027-01-06", "--certificate", "CERT-A2")  # fmt: skip
    assert code == 0
    assert run(capsys, "check", "--db", url, "--at", "2026-01-07")[0] == 0
    assert run(capsys, "check", "--db", url, "--at", "2026-01-05")[0] == 1  # history kept
    # SN-B replaces SN-A at the station: SN-A's installation is closed there
    code, out, _ = run(capsys, "install", "--db", url, "--serial", "SN-B", "--sid", SID,
                       "--from", "2026-02-01T08:30Z")  # fmt: skip
    assert code == 0 and f"closed: meter SN-A at {SID}" in out
    # SN-A moves to another station
    assert run(capsys, "install", "--db", url, "--serial", "SN-A", "--sid", SID2,
               "--from", "2026-02-02")[0] == 0  # fmt: skip
    with Store(url, create=False, readonly=True) as st:
        reg = meters.load_register(st)
    assert [c.certificate for c in reg.calibrations_of("SN-A")] == ["CERT-SN-A", "CERT-A2"]
    got = [(i.serial, i.sid, i.from_ms, i.to_ms) for i in reg.installs]
    assert got == [
        ("SN-A", SID, day_ms("2025-06-01"), day_ms("2026-02-01") + 8 * 3_600_000 + 1_800_000),
        ("SN-B", SID, day_ms("2026-02-01") + 8 * 3_600_000 + 1_800_000, None),
        ("SN-A", SID2, day_ms("2026-02-02"), None),
    ]
    # SN-B past due (2026-03-01) on 2026-03-05: check fails; removed, it no longer counts
    assert run(capsys, "check", "--db", url, "--at", "2026-03-05")[0] == 1
    code, out, _ = run(capsys, "remove", "--db", url, "--serial", "SN-B", "--at", "2026-03-03")
    assert code == 0 and f"removed from {SID}" in out
    assert run(capsys, "check", "--db", url, "--at", "2026-03-05")[0] == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--serial", "SN-X", "--due", "2026-02-30"], "bad date '2026-02-30'"),
        (["--serial", "SN-X", "--due", "1.1.2026"], "not a date"),
        (["--serial", "SN-X", "--due", "2024-12-31"], "not after calibration date"),
        (["--serial", "SN-X", "--due", "2026-01-01", "--class", "abc"], "accuracy class"),
        (["--serial", "SN-X", "--due", "2026-01-01", "--class", "0"], "outside 0 < class"),
        (["--serial", "SN-X", "--due", "2026-01-01", "--class", "12.5"], "outside 0 < class"),
        (["--serial", "SN X", "--due", "2026-01-01"], "meter serial"),
        (["--serial", "SN-A", "--due", "2026-01-01"], "already registered"),
    ],
)
def test_bad_add_exits_2_with_one_line(
    url: str, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    assert add(capsys, url, "SN-A", "2026-01-01") == 0
    kw = dict(zip(args[0::2], args[1::2], strict=True))
    code, out, err = run(
        capsys, "add", "--db", url, "--serial", kw["--serial"], "--model", "M",
        "--class", kw.get("--class", "1.0"), "--calibrated", "2025-01-01",
        "--due", kw["--due"], "--certificate", "C",
    )  # fmt: skip
    assert code == 2 and needle in err and err.count("\n") == 1 and out == ""
    with Store(url, create=False, readonly=True) as st:
        assert sorted(meters.load_register(st).meters) == ["SN-A"]


def test_bad_changes_exit_2(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert add(capsys, url, "SN-A", "2026-01-01") == 0
    bad = [
        (["calibrate", "--serial", "SN-Z", "--calibrated", "2026-01-01", "--due", "2027-01-01",
          "--certificate", "C"], "no meter SN-Z"),
        (["calibrate", "--serial", "SN-A", "--calibrated", "2025-01-01", "--due", "2027-01-01",
          "--certificate", "C"], "must be later"),
        (["install", "--serial", "SN-Z", "--sid", SID, "--from", "2025-06-01"], "no meter SN-Z"),
        (["install", "--serial", "SN-A", "--sid", "kh-lower", "--from", "2025-06-01"],
         "not a station id"),
        (["install", "--serial", "SN-A", "--sid", SID, "--from", "June"], "--from"),
        (["remove", "--serial", "SN-A", "--at", "2025-07-01"], "not installed"),
    ]  # fmt: skip
    for args, needle in bad:
        code, _, err = run(capsys, args[0], "--db", url, *args[1:])
        assert code == 2 and needle in err and err.count("\n") == 1, (args, err)
    assert run(capsys, "install", "--db", url, "--serial", "SN-A", "--sid", SID,
               "--from", "2025-06-01")[0] == 0  # fmt: skip
    for args, needle in [
        (["install", "--serial", "SN-A", "--sid", SID2, "--from", "2025-05-01"], "overlaps"),
        (["remove", "--serial", "SN-A", "--at", "2025-06-01"], "remove after it"),
    ]:
        code, _, err = run(capsys, args[0], "--db", url, *args[1:])
        assert code == 2 and needle in err, (args, err)


def test_reads_and_writes_never_create_a_database(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo.db"
    for args in (["list"], ["check"], ["list", "--json"]):
        code, out, err = run(capsys, args[0], "--db", str(missing), *args[1:])
        assert code == 2 and str(missing) in err and out == ""
    assert add(capsys, f"sqlite:///{missing}", "SN-A", "2026-01-01") == 2
    assert not missing.exists() and list(tmp_path.iterdir()) == []
    # an agent database without any meter: list says so, check passes
    db = tmp_path / "agent.db"
    Store(str(db)).close()
    assert run(capsys, "check", "--db", str(db))[:2] == (0, "no meter registered\n")
    assert run(capsys, "list", "--db", str(db), "--json")[:2] == (0, "")
