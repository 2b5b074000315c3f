"""A demo started on a work folder from an earlier version: its own database is brought up
to this schema in place (an agent on another database is refused and told what to run)."""

from __future__ import annotations

import pathlib

import pytest

from agent.store import SCHEMA_VERSION, Store
from agent.store.sql import SchemaError
from tools.demo import Demo, DemoConfig


def test_the_demos_own_older_database_is_upgraded(tmp_path: pathlib.Path) -> None:
    db = tmp_path / "agent.db"
    with Store(str(db)) as st:
        st.db.execute("UPDATE meta SET v = '3' WHERE k = 'schema'")
    with pytest.raises(SchemaError, match="schema 3, this program needs"):
        Store(str(db))  # what an agent would say
    Demo(DemoConfig(stations=1, slots=1, workdir=tmp_path, port=0))._prepare()
    with Store(str(db), create=False) as st:
        assert st.schema_version() == SCHEMA_VERSION
