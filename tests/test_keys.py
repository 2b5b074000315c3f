"""agent/keys.py: station keys in the agent database (add, rotate, revoke, lookups), on
both engines (`db_url`: SQLite, PostgreSQL)."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess

import pytest

from agent.keys import KeyStore
from agent.store import RawRow, Store
from agent.wire import Reason, StaticKeys, WireError, verify
from tests.agent_helpers import STATIONCTL, Station, key_for
from tests.helpers import ROOT
from tools.mosquitto import free_port

SID = "KH-PNH-0001"


def test_add_rotate_revoke_and_lookup(db_url: str) -> None:
    ks = KeyStore(db_url)
    k1 = key_for(SID)
    assert ks.add(SID, k1) == 1
    assert ks.get(SID, 1) == k1
    assert ks.current(SID) == (1, k1)
    kid2, k2 = ks.rotate(SID)
    assert kid2 == 2 and len(k2) == 32 and k2 != k1
    # the old key still verifies what it signed until revoked
    assert ks.get(SID, 1) == k1 and ks.get(SID, 2) == k2
    assert ks.current(SID) == (2, k2)
    assert [(i.kid, i.state) for i in ks.list(SID)] == [(1, "retired"), (2, "active")]
    assert ks.revoke(SID, 1) == 1
    assert ks.get(SID, 1) is None and ks.get(SID, 2) == k2
    assert ks.revoke(SID, 1) == 0  # already revoked
    assert ks.revoke(SID) == 1  # the rest
    assert ks.get(SID, 2) is None and ks.current(SID) is None
    info = ks.list()
    assert [(i.sid, i.kid, i.state) for i in info] == [(SID, 1, "revoked"), (SID, 2, "revoked")]
    assert all(i.revoked_ms is not None and i.created_ms > 0 for i in info)
    ks.close()


def test_add_rejects_bad_input(db_url: str) -> None:
    with KeyStore(db_url) as ks:
        with pytest.raises(ValueError):
            ks.add("bad sid", key_for(SID))
        with pytest.raises(ValueError):
            ks.add(SID, b"short")
        ks.add(SID, key_for(SID), kid=5)
        with pytest.raises(ValueError):
            ks.add(SID, key_for(SID, 2), kid=5)
        assert ks.add(SID, key_for(SID, 6)) == 6  # next after the highest
        # an older kid added later (import of an old key) does not become active
        assert ks.add(SID, key_for(SID, 3), kid=3) == 3
        assert ks.current(SID) == (6, key_for(SID, 6))
        assert {i.kid: i.state for i in ks.list(SID)} == {3: "retired", 5: "retired", 6: "active"}


def test_max_boot_comes_from_raw(db_url: str) -> None:
    url = db_url
    with KeyStore(url) as ks:
        assert ks.max_boot(SID) is None
        with Store(url) as st:
            st.write_batch(
                [RawRow(SID, b, 0, "telemetry", "t", 1, 1, b"x%d" % b) for b in (3, 9, 4)]
            )
        assert ks.max_boot(SID) == 9
        assert ks.max_boot("KH-PNH-0002") is None


def test_cached_ring_sees_changes_from_another_connection(db_url: str) -> None:
    url = db_url
    agent = KeyStore(url)
    ring = agent.ring(min_reload_s=0.0)
    st = Station(SID)
    kind, p = st.telemetry()
    with pytest.raises(WireError) as ei:
        verify(kind, SID, p, ring)
    assert ei.value.reason is Reason.UNKNOWN_STATION
    tool = KeyStore(url)  # e.g. the flashing tool in another process
    tool.add(SID, st.key)
    assert verify(kind, SID, p, ring).seq == 0  # reloaded on the miss
    tool.revoke(SID, 1)
    ring.reload()  # the service reloads every few seconds
    with pytest.raises(WireError) as ei:
        verify(kind, SID, p, ring)
    assert ei.value.reason is Reason.REVOKED_KEY
    st2 = Station(SID, kid=2)
    with pytest.raises(WireError) as ei:
        verify("telemetry", SID, st2.telemetry()[1], ring)
    assert ei.value.reason is Reason.UNKNOWN_KID
    assert "key" not in repr(ring).replace("keys", "")
    tool.close()
    agent.close()


def test_keys_never_reach_logs(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    k = key_for(SID)
    with KeyStore(db_url) as ks:
        ks.add(SID, k)
        _, k2 = ks.rotate(SID)
        ks.revoke(SID, 1)
        text = caplog.text + repr(ks.list())
    for key in (k, k2):
        assert key.hex() not in text and repr(key) not in text


def test_static_keys_reasons() -> None:
    ring = StaticKeys({(SID, 1): None})
    with pytest.raises(WireError) as ei:
        ring.key(SID, 1)
    assert ei.value.reason is Reason.REVOKED_KEY


# ---- stationctl keys ------------------------------------------------------------------------


def keys_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STATIONCTL, "keys", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_keys_cli_never_prints_a_key(tmp_path: pathlib.Path, db_url: str) -> None:
    db = db_url
    kf = tmp_path / "k1.hex"
    kf.write_text(key_for(SID).hex() + "\n")
    r = keys_cli("add", "--db", db, SID, "--key-file", str(kf), "--create")
    assert r.returncode == 0 and "kid 1 added" in r.stdout
    r = keys_cli("rotate", "--db", db, SID, "--key-out", str(tmp_path / "k2.hex"))
    assert r.returncode == 0 and "kid 2" in r.stdout
    k2 = bytes.fromhex((tmp_path / "k2.hex").read_text())
    assert os.stat(tmp_path / "k2.hex").st_mode & 0o777 == 0o600
    r = keys_cli("add", "--db", db, "KH-PNH-0002", "--generate", str(tmp_path / "k3.hex"))
    assert r.returncode == 0
    k3 = bytes.fromhex((tmp_path / "k3.hex").read_text())
    with KeyStore(db) as ks:
        assert ks.get(SID, 2) == k2 and ks.get("KH-PNH-0002", 1) == k3
    r = keys_cli("revoke", "--db", db, SID, "--kid", "1")
    assert r.returncode == 0 and "1 key(s) revoked" in r.stdout
    r = keys_cli("list", "--db", db)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split("\t")[:3] == ["sid", "kid", "state"]
    assert [tuple(x.split("\t")[:3]) for x in lines[1:]] == [
        (SID, "1", "revoked"),
        (SID, "2", "active"),
        ("KH-PNH-0002", "1", "active"),
    ]
    out = "".join(keys_cli(*a).stdout + keys_cli(*a).stderr for a in (("list", "--db", db),))
    for k in (key_for(SID), k2, k3):
        assert k.hex() not in out + r.stdout + r.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["add", SID, "--key-file", "/nonexistent"], "cannot read key file"),
        (["add", "bad sid", "--generate", "NEWFILE"], "bad station id"),
        (["revoke", "KH-PNH-0009"], "no unrevoked"),
        (["rotate", SID, "--key-out", "EXISTING"], "cannot create key file"),
    ],
)
def test_keys_cli_bad_input_exits_2(
    tmp_path: pathlib.Path, db_url: str, args: list[str], needle: str
) -> None:
    db = db_url
    KeyStore(db).close()  # the database exists: the refusal is about the input
    (tmp_path / "EXISTING").write_text("x")
    args = [str(tmp_path / a) if a in ("NEWFILE", "EXISTING") else a for a in args]
    r = keys_cli(args[0], "--db", db, *args[1:])
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert not (tmp_path / "NEWFILE").exists()  # no key file for a refused key
    assert (tmp_path / "EXISTING").read_text() == "x"


@pytest.mark.parametrize(
    "args",
    [["list"], ["add", SID, "--generate", "NEWFILE"], ["rotate", SID, "--key-out", "NEWFILE"]],
)
def test_keys_cli_never_creates_a_database_unasked(tmp_path: pathlib.Path, args: list[str]) -> None:
    """A mistyped --db was a new empty database (list said nothing, add put the key there);
    now exit 2 naming it, and only `add --create` makes one."""
    db = tmp_path / "TYPO.db"
    args = [str(tmp_path / a) if a == "NEWFILE" else a for a in args]
    r = keys_cli(args[0], "--db", str(db), *args[1:])
    assert r.returncode == 2 and "TYPO.db" in r.stderr, r.stderr
    assert not db.exists() and not (tmp_path / "NEWFILE").exists()
    if args[0] == "add":
        assert "--create" in r.stderr
        r = keys_cli(*args, "--db", str(db), "--create")
        assert r.returncode == 0 and db.exists(), r.stderr


def test_keys_cli_a_database_it_cannot_open_exits_2(tmp_path: pathlib.Path) -> None:
    """One line naming the database, never its password: a directory that is not there
    (SQLite), a PostgreSQL server that is not there."""
    r = keys_cli("list", "--db", f"sqlite:///{tmp_path}/no/such/dir/a.db")
    assert r.returncode == 2 and "no/such/dir/a.db" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    url = f"postgresql://agent:s3cret@127.0.0.1:{free_port()}/agent"
    r = keys_cli("list", "--db", url)
    assert r.returncode == 2 and "agent:***@127.0.0.1" in r.stderr, r.stderr
    assert "s3cret" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_concurrent_adds_leave_one_active_key(db_url: str) -> None:
    """Two flashing tools adding keys of one station at once (PostgreSQL has no database
    write lock: the adds of a station are serialized by the key store)."""
    import threading

    KeyStore(db_url).close()  # the schema, once
    kids: list[int] = []
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            with KeyStore(db_url) as ks:
                for j in range(5):
                    kids.append(ks.add(SID, key_for(SID, 10 * i + j)))
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(kids) == list(range(1, 21))
    with KeyStore(db_url) as ks:
        states = {i.kid: i.state for i in ks.list(SID)}
    assert [k for k, v in states.items() if v == "active"] == [20], states
