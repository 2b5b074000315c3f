"""`stationctl export` (CONTRACT §8): stdout bytes, filters, determinism, exit status, on
both engines (`db_url`: SQLite, PostgreSQL)."""

from __future__ import annotations

import functools
import json
import pathlib
import sqlite3
import subprocess

import psycopg
import pytest

from agent.ledger import Record, compute
from agent.ledger.export import render
from agent.store import RawRow, Store, record_to_row
from tests.agent_helpers import STATIONCTL, fleet_stream, stored_rows
from tests.helpers import ROOT
from tools.mosquitto import free_port
from tools.postgres import PgCluster


def stationctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*STATIONCTL, *args], cwd=ROOT, capture_output=True, timeout=60, check=False
    )


@functools.cache
def fleet() -> tuple[list[RawRow], list[Record]]:
    """A small fleet's raw messages and their records (computed once)."""
    rows, msgs = stored_rows(fleet_stream(3, 120, sid_base="KH-EXP", step_ms=60_000))
    return rows, compute(msgs)


@pytest.fixture
def db(db_url: str) -> tuple[str, list]:  # type: ignore[type-arg]
    """A database holding the fleet's raw messages and their records."""
    rows, records = fleet()
    with Store(db_url) as st:
        st.write_batch(rows)
        st.replace_records({"": [record_to_row(r) for r in records]}, everything=True)
    return db_url, records


@pytest.mark.parametrize("by", ["interval", "session", "day"])
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_export_is_render_of_the_stored_records(
    db: tuple[str, list],
    by: str,  # type: ignore[type-arg]
    fmt: str,
) -> None:
    url, records = db
    r = stationctl("export", "--db", url, "--by", by, "--format", fmt)
    assert r.returncode == 0, r.stderr
    assert r.stdout == render(records, fmt, None, None, by)
    assert r.stdout.count(b"\n") > 2
    assert stationctl("export", "--db", url, "--by", by, "--format", fmt).stdout == r.stdout


def test_sid_limits_the_export_to_stations(db: tuple[str, list]) -> None:  # type: ignore[type-arg]
    url, records = db
    sids = sorted({r.sid for r in records})
    assert len(sids) == 3
    pick = [sids[2], sids[0]]
    r = stationctl("export", "--db", url, "--format", "csv", "--sid", pick[0], "--sid", pick[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout == render([x for x in records if x.sid in pick], "csv", None, None, "interval")
    assert sids[1].encode() not in r.stdout and pick[0].encode() in r.stdout
    r = stationctl("export", "--db", url, "--format", "csv", "--sid", "KH-TYPO-0001")
    assert r.returncode == 2 and b"KH-TYPO-0001" in r.stderr and r.stdout == b""


def test_default_is_interval_and_json_lines_shape(db: tuple[str, list]) -> None:  # type: ignore[type-arg]
    url, _ = db
    r = stationctl("export", "--db", url, "--format", "json")
    lines = r.stdout.decode().splitlines()
    objs = [json.loads(x) for x in lines]
    assert all(o["start"].endswith("Z") and len(o["start"]) == 24 for o in objs)
    keys = list(objs[0])
    assert keys[:10] == [
        "sid",
        "slot",
        "start",
        "end",
        "mwh",
        "held_mwh",
        "flags",
        "from",
        "to",
        "e_from",
    ]
    order = [(o["sid"], o["slot"], o["start"]) for o in objs]
    assert order == sorted(order)
    assert {o["slot"] for o in objs} == {0, 1, 2}
    assert sum(o["mwh"] for o in objs if o["slot"] == 1) > 0


def test_from_inclusive_to_exclusive(db: tuple[str, list]) -> None:  # type: ignore[type-arg]
    url, records = db
    starts = sorted({r.start_ms for r in records if r.kind == "interval"})
    a, b = starts[2], starts[5]
    from agent.ledger.export import iso_ms

    r = stationctl(
        "export", "--db", url, "--from", iso_ms(a), "--to", iso_ms(b), "--format", "json"
    )
    assert r.returncode == 0, r.stderr
    got = {json.loads(x)["start"] for x in r.stdout.decode().splitlines()}
    assert got == {iso_ms(s) for s in starts[2:5]}
    # a date means midnight UTC; an offset is honoured
    day = iso_ms(a)[:10]
    r1 = stationctl("export", "--db", url, "--from", day, "--format", "csv")
    r2 = stationctl("export", "--db", url, "--from", day + "T07:00:00+07:00", "--format", "csv")
    assert r1.returncode == 0 and r1.stdout == r2.stdout
    empty = stationctl("export", "--db", url, "--from", "2100-01-01", "--format", "csv")
    assert empty.returncode == 0 and empty.stdout.count(b"\n") == 1  # the header only


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--format", "xml"], b"invalid choice"),
        (["--by", "week", "--format", "csv"], b"invalid choice"),
        (["--format", "csv", "--from", "yesterday"], b"--from"),
        (["--format", "csv", "--from", "2025-02-30"], b"--from"),
        (["--format", "csv", "--from", "2025-02-02", "--to", "2025-02-01"], b"before"),
        ([], b"--format"),
    ],
)
def test_bad_usage_exits_2(db: tuple[str, list], args: list[str], needle: bytes) -> None:  # type: ignore[type-arg]
    url, _ = db
    r = stationctl("export", "--db", url, *args)
    assert r.returncode == 2 and r.stdout == b""
    assert needle in r.stderr


def test_bad_database_exits_2_sqlite(tmp_path: pathlib.Path) -> None:
    """SQLite only: files (one that is not there must not be created, one that is not
    SQLite at all); the PostgreSQL cases are in the next test."""
    r = stationctl("export", "--db", f"sqlite:///{tmp_path}/none.db", "--format", "csv")
    assert r.returncode == 2 and b"no database" in r.stderr
    assert not (tmp_path / "none.db").exists()  # an export never creates a database
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    r = stationctl("export", "--db", str(junk), "--format", "csv")
    assert r.returncode == 2 and b"not a database" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    r = stationctl("export", "--db", f"sqlite:///{other}", "--format", "json")
    assert r.returncode == 2 and b"no agent database" in r.stderr
    r = stationctl("export", "--db", "mysql://x/y", "--format", "csv")
    assert r.returncode == 2 and b"'mysql'" in r.stderr


def test_bad_database_exits_2_postgresql(pg_cluster: PgCluster) -> None:
    """A server that is not there, a database that does not exist, one without the agent's
    tables (not created by a read): exit 2, one line naming it, never its password (the
    test cluster's trust authentication ignores the one given)."""
    gone = f"postgresql://agent:s3cret@127.0.0.1:{free_port()}/agent"
    empty = pg_cluster.create_db().replace("postgres@", "postgres:s3cret@")
    missing = empty.rsplit("/", 1)[0] + "/nope"
    for url, needle in (
        (gone, b"agent:***@127.0.0.1:"),
        (missing, b"postgres:***@127.0.0.1:%d/nope" % pg_cluster.port),
        (empty, b"no agent database at " + empty.replace("s3cret", "***").encode()),
    ):
        r = stationctl("export", "--db", url, "--format", "csv")
        assert r.returncode == 2 and r.stdout == b"", r.stderr
        assert needle in r.stderr and b"s3cret" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    with psycopg.connect(empty) as c:  # an export never creates a table
        assert c.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone() == (0,)
