"""Fixtures shared by host-side tests."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tools.mosquitto import Mosquitto
from tools.postgres import PgCluster


@pytest.fixture
def mosquitto(tmp_path: pathlib.Path) -> Iterator[Mosquitto]:
    """A private Mosquitto on a free port, stopped at the end; `.restart()` keeps its port."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One private PostgreSQL cluster for the session (initdb + pg_ctl on a free port);
    each test that wants one gets a fresh database in it (`db_url`, `pg_cluster.create_db`).
    Never skipped: a machine without PostgreSQL fails here, naming what to install."""
    with PgCluster() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    """The agent database URL, once per engine: a SQLite file in tmp_path, a fresh
    PostgreSQL database in the session's private cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/agent.db"
    pg: PgCluster = request.getfixturevalue("pg_cluster")
    return pg.create_db()
