"""`stationctl ocpp add|password|key|revoke|list` (CONTRACT §8 exit codes, §11)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from cryptography.hazmat.primitives.asymmetric import ec

from agent.ocpp import ocmf
from agent.ocpp.points import Points
from agent.store import Store

RUN = [sys.executable, "-m", "stationctl", "ocpp"]


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=60, check=False)


def test_register_list_change_revoke(tmp_path: pathlib.Path) -> None:
    db = str(tmp_path / "agent.db")
    # a command never creates a database
    r = sh("list", "--db", db)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    Store(db, create=True).close()
    r = sh("add", "--db", db, "KH-OCPP-0001", "--note", "site A")
    assert r.returncode == 0, r.stderr
    password = r.stdout.split("password ", 1)[1].strip()
    assert 16 <= len(password) <= 40
    with Points(Store(db, create=False)) as p:
        assert p.check("KH-OCPP-0001", password) is not None  # what was printed works
        assert p.check("KH-OCPP-0001", password + "x") is None
        secret = p.store.db.execute("SELECT secret FROM ocpp_points").fetchone()[0]
    assert password not in secret  # kept as a hash only
    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "meter.pem"
    pem.write_text(ocmf.public_key_text(key))
    assert sh("key", "--db", db, "KH-OCPP-0001", "--public-key-file", str(pem)).returncode == 0
    pw = tmp_path / "pw"
    pw.write_text("another-password-123456\n")
    r = sh("password", "--db", db, "KH-OCPP-0001", "--password-file", str(pw))
    assert r.returncode == 0 and "another" not in r.stdout  # a given password is not echoed
    (row,) = [json.loads(x) for x in sh("list", "--db", db, "--json").stdout.splitlines()]
    assert row["sid"] == "KH-OCPP-0001" and row["signed"] and row["revoked_ms"] is None
    assert sh("revoke", "--db", db, "KH-OCPP-0001").returncode == 0
    (row,) = [json.loads(x) for x in sh("list", "--db", db, "--json").stdout.splitlines()]
    assert row["revoked_ms"] is not None
    with Points(Store(db, create=False)) as p:
        assert p.check("KH-OCPP-0001", "another-password-123456") is None  # revoked


def test_bad_input_is_exit_2_with_one_line(tmp_path: pathlib.Path) -> None:
    db = str(tmp_path / "agent.db")
    Store(db, create=True).close()
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("not a key")
    short = tmp_path / "short"
    short.write_text("too-short")
    for args in (
        ["add", "--db", db, "bad id with spaces"],
        ["add", "--db", db, "KH-OCPP-0002", "--public-key-file", str(bad_key)],
        ["add", "--db", db, "KH-OCPP-0003", "--password-file", str(short)],
        ["revoke", "--db", db, "KH-NOBODY"],
        ["add", "--db", db, "KH-OCPP-0004", "--password-file", str(tmp_path / "missing")],
    ):
        r = sh(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sh("add", "--db", db, "KH-OCPP-0005").returncode == 0
    assert sh("add", "--db", db, "KH-OCPP-0005").returncode == 2  # exists already
