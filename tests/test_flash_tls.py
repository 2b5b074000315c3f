"""`stationctl flash --broker-dir DIR` (issue 14 item 2): the station's config pins the
deployment's CA and uses the account `stationctl broker init` made, on a virtual board (the
unix port's REPL on a pty) whose on-board self-test then logs into a real Mosquitto started
from that deployment over TLS, verifying its certificate. The report gives the CA's
fingerprint and never the password; bad input (no account, a host the certificate does not
name, an mTLS deployment) is refused before any board is touched."""

from __future__ import annotations

import argparse
import base64
import json
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from agent.store import Store
from stationctl import flash as cmd_flash
from stationctl.cli import UsageError
from tools.flash import broker_setup
from tools.flash.virtual import UnixBoard
from tools.mosquitto import Mosquitto
from tools.rig.rig import Rig

SID = "KH-TLS-0001"


def flash(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
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


def ca_facts(setup: pathlib.Path) -> tuple[str, str]:
    """(DER as base64, SHA-256 fingerprint AA:BB:…) of the deployment's CA, computed here."""
    ca = x509.load_pem_x509_certificate((setup / "ca.crt").read_bytes())
    fp = ca.fingerprint(hashes.SHA256()).hex().upper()
    return base64.b64encode(ca.public_bytes(Encoding.DER)).decode(), ":".join(
        fp[i : i + 2] for i in range(0, len(fp), 2)
    )


@pytest.fixture
def deployment(tmp_path: pathlib.Path) -> Iterator[Mosquitto]:
    m = Mosquitto.deployment(tmp_path / "mosq", stations=[SID])
    m.start()
    try:
        yield m
    finally:
        m.stop()


def site(tmp_path: pathlib.Path, **over: Any) -> pathlib.Path:
    p = tmp_path / "site.json"
    p.write_text(json.dumps({"net": {"kind": "host"}, "slots": 2, "ntp": None, **over}))
    return p


def test_flash_writes_ca_and_account_and_the_board_verifies_the_broker(
    tmp_path: pathlib.Path, deployment: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    m = deployment
    assert m.setup_dir is not None and m.tls_port is not None
    password = (m.setup_dir / "passwords" / "stations" / SID).read_text().strip()
    ca_b64, fp = ca_facts(m.setup_dir)
    db = f"sqlite:///{tmp_path / 'agent.db'}"
    Store(db).close()
    reports = tmp_path / "reports"
    with Rig(slots=2, seed=3, workdir=tmp_path / "rig") as rig:
        rig.insert(1, pack="72V", power_w=1200, capacity_wh=50, soc=0.4)
        s = site(
            tmp_path,
            sample_ms=500,
            stale_s=3,
            charger={"uart": rig.charger_path},
            bus={"uart": rig.bus_path, "timeout_ms": 150},
        )
        with UnixBoard(tmp_path / "flash") as board:
            code, out, err = flash(
                capsys,
                "--station",
                SID,
                "--chip",
                "unix",
                "--port",
                board.port,
                "--site",
                str(s),
                "--broker-dir",
                str(m.setup_dir),
                "--agent-db",
                db,
                "--reports",
                str(reports),
            )
            assert code == 0, err
            cfg = json.loads((board.flash / "config.json").read_text())
    # the station's config: TLS to the deployment's stations' port, its CA pinned, the
    # account broker init made (user = sid), a host the server certificate names
    assert cfg["broker"] == {
        "host": "localhost",
        "port": m.tls_port,
        "tls": True,
        "ca": ca_b64,
        "user": SID,
        "password": password,
        "prefix": "stations",
    }
    rep = json.loads(next(reports.glob(f"{SID}-*.json")).read_text())
    assert rep["result"] == "ok", rep.get("error")
    # the board's own self-test logged in over TLS, checking the certificate against the CA
    assert rep["selftest"]["checks"]["broker"]["ok"], rep["selftest"]["checks"]["broker"]
    assert rep["broker"]["ca_sha256"] == fp and rep["broker"]["user"] == SID
    text = next(reports.glob(f"{SID}-*.txt")).read_text()
    assert f"sha256 {fp}" in text
    for t in (text, json.dumps(rep), out, err):
        assert password not in t and cfg["key"] not in t


def test_the_board_refuses_a_broker_of_another_deployment(
    tmp_path: pathlib.Path, deployment: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same board flashed with another deployment's CA and account (the broker it is
    sent to is not that deployment's): its self-test refuses the broker's certificate,
    the flash fails at the self-test and nothing is registered."""
    m = deployment
    other = tmp_path / "other"
    broker_setup.init(other, broker_setup.Options(stations=[SID], tls_port=m.tls_port or 0))
    db = f"sqlite:///{tmp_path / 'agent.db'}"
    Store(db).close()
    with Rig(slots=1, seed=4, workdir=tmp_path / "rig") as rig:
        s = site(
            tmp_path,
            slots=1,
            charger={"uart": rig.charger_path},
            bus={"uart": rig.bus_path, "timeout_ms": 150},
        )
        with UnixBoard(tmp_path / "flash") as board:
            code, _out, err = flash(
                capsys,
                "--station",
                SID,
                "--chip",
                "unix",
                "--port",
                board.port,
                "--site",
                str(s),
                "--broker-dir",
                str(other),
                "--agent-db",
                db,
                "--reports",
                str(tmp_path / "reports"),
            )
    assert code == 1, err
    rep = json.loads(next((tmp_path / "reports").glob(f"{SID}-*.json")).read_text())
    broker = rep["selftest"]["checks"]["broker"]
    assert rep["stage"] == "selftest" and not broker["ok"]
    assert "not correctly signed by the trusted CA" in broker["detail"], broker


def test_bad_input_is_refused_before_any_board(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = tmp_path / "broker"
    broker_setup.init(setup, broker_setup.Options(stations=[SID], hosts=["mq.example", "10.0.0.5"]))
    common = ["--dry-run", "--site", str(site(tmp_path)), "--broker-dir", str(setup)]
    # a station without an account: how to add it
    code, _o, err = flash(capsys, "--station", "KH-TLS-0002", *common)
    assert code == 2 and "stationctl broker add-station --dir" in err, err
    assert "KH-TLS-0002" in err
    # a host the broker's certificate is not issued for: the station would refuse it
    code, _o, err = flash(capsys, "--station", SID, *common, "--broker", "10.9.9.9")
    assert code == 2 and "not a name the broker's certificate is issued for" in err, err
    # a directory that is no deployment
    code, _o, err = flash(capsys, "--station", SID, *common[:-1], str(tmp_path))
    assert code == 2 and "stationctl broker init" in err, err
    # both ways of giving the account
    with pytest.raises(SystemExit) as ex:
        flash(capsys, "--station", SID, *common, "--broker-passwd", str(tmp_path / "p"))
    assert ex.value.code == 2 and "not allowed with" in capsys.readouterr().err
    # the dry run: the deployment's port and first host, its CA, the fingerprint shown
    code, out, err = flash(capsys, "--station", SID, *common)
    assert code == 0, err
    ca_b64, fp = ca_facts(setup)
    assert f"mq.example:8883 over TLS, CA sha256 {fp}" in out, out
    assert ca_b64 in out  # the config shown, CA included (public); the password is not
    password = (setup / "passwords" / "stations" / SID).read_text().strip()
    assert password not in out + err
    # an explicit host (one the certificate names) and port win over the deployment's
    code, out, err = flash(
        capsys, "--station", SID, *common, "--broker", "10.0.0.5:18883", "--json"
    )
    assert code == 0, err
    rep = json.loads(out.splitlines()[0])
    b = rep["config"]["broker"]
    assert (b["host"], b["port"], b["tls"], b["ca"]) == ("10.0.0.5", 18883, True, ca_b64)
    assert rep["broker"]["ca_sha256"] == fp and password not in out


def test_an_mtls_deployment_is_refused(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = tmp_path / "broker"
    broker_setup.init(setup, broker_setup.Options(stations=[SID], mtls=True))
    code, _o, err = flash(
        capsys,
        "--station",
        SID,
        "--dry-run",
        "--site",
        str(site(tmp_path)),
        "--broker-dir",
        str(setup),
    )
    assert code == 2 and "client certificates" in err, err
