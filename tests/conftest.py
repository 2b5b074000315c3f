"""Fixtures shared by host-side tests."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tools.mosquitto import Mosquitto
from tools.postgres import PgCluster


@pytest.fixture
def mosquitto(tmp_path: pathlib.Path) -> Iterator[Mosquitto]:
    """A private Mosquitto on a free port, stopped at the end; `.restart()` keeps its port.
    Anonymous, on loopback: for tests of what the agent and stations do with messages.
    Tests about who may connect and publish use `locked_broker`."""
    broker = Mosquitto(tmp_path / "mosquitto", insecure=True)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def locked_broker(tmp_path: pathlib.Path) -> Iterator[Mosquitto]:
    """The deployment configuration (`stationctl broker init`: accounts, ACLs, TLS, client
    id = station id) with its loopback station listener; stations get accounts with
    `.add_station(sid)` (before they connect), clients log in with `.accounts()`."""
    broker = Mosquitto.deployment(tmp_path / "locked", stations=[], station_local=True)
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
