"""Fixtures shared by host-side tests."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tools.mosquitto import Mosquitto


@pytest.fixture
def mosquitto(tmp_path: pathlib.Path) -> Iterator[Mosquitto]:
    """A private Mosquitto on a free port, stopped at the end; `.restart()` keeps its port."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()
