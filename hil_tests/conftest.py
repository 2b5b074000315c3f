"""HIL options and fixtures: one suite, two rigs (see README.md).

    python -m pytest hil_tests                      # --rig virtual (default; CI)
    python -m pytest hil_tests --rig serial --port /dev/ttyUSB0 \\
        --rig-port /dev/ttyUSB1,/dev/ttyUSB2 --host-ip 192.168.1.20 --site site.json
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hil_tests.harness import Agent, Dut, LanMosquitto, SerialDut, SerialOptions, VirtualDut
from tools.mosquitto import Mosquitto


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hil", "hardware in the loop")
    g.addoption(
        "--rig",
        choices=["virtual", "serial"],
        default="virtual",
        help="virtual: firmware on MicroPython, rig on ptys (default); "
        "serial: a real ESP32 whose links the rig drives through USB adapters",
    )
    g.addoption("--port", default=None, help="serial rig: the board's USB port (REPL, flashing)")
    g.addoption(
        "--rig-port",
        default=None,
        metavar="CHARGER,BUS",
        help="serial rig: the USB adapters wired to the charger UART and to RS-485",
    )
    g.addoption(
        "--host-ip",
        default=None,
        help="serial rig: this machine's address as the board sees it (broker)",
    )
    g.addoption("--site", default=None, help="serial rig: stationctl flash --site template")
    g.addoption(
        "--reset-cmd",
        default=None,
        help="serial rig: command that power-cycles the board (a relay); "
        "default: pulse EN through RTS on --port",
    )
    g.addoption(
        "--flash-arg",
        action="append",
        default=[],
        help="serial rig: extra argument for stationctl flash (repeatable)",
    )


class Bench:
    """The session's broker and agent, and the factory of devices under test."""

    def __init__(self, config: pytest.Config, workdir: pathlib.Path) -> None:
        self.rig_kind: str = config.getoption("--rig")
        self.workdir = workdir
        self.serial: SerialOptions | None = None
        if self.rig_kind == "serial":
            self.serial = _serial_options(config)
            self.broker: Mosquitto = LanMosquitto(workdir / "broker")
        else:
            self.broker = Mosquitto(workdir / "broker", insecure=True)  # loopback only
        self.broker.start()
        self.agent = Agent(workdir / "agent", self.broker.port)
        self.agent.start()
        self.duts: list[Dut] = []

    def dut(self, name: str, board: str = "a", **kw: Any) -> Dut:
        """A device under test called `name` (its sid derives from it); another `board`
        under the same name is a replacement board for the same station (fresh flash)."""
        d: Dut
        where = self.workdir / "dut" / name / board
        if self.serial is not None:
            d = SerialDut(name, where, self.agent, self.broker.port, self.serial, **kw)
        else:
            d = VirtualDut(name, where, self.agent, self.broker.port, **kw)
        self.duts.append(d)
        return d

    def close(self) -> None:
        for d in self.duts:
            try:
                d.stop()
            except Exception:  # one bad teardown must not hide the rest
                logging.getLogger(__name__).exception("stopping %s", d.sid)
        self.agent.stop()
        self.broker.stop()


def _serial_options(config: pytest.Config) -> SerialOptions:
    port = config.getoption("--port")
    rig_port = config.getoption("--rig-port")
    host_ip = config.getoption("--host-ip")
    if not port or not os.path.exists(port):
        pytest.skip(
            f"--rig serial: no board attached (--port {port or 'not given'} does not exist)"
        )
    parts = (rig_port or "").split(",")
    if len(parts) != 2 or not all(os.path.exists(p) for p in parts):
        pytest.skip(f"--rig serial: --rig-port CHARGER,BUS adapters not attached ({rig_port!r})")
    if not host_ip:
        pytest.skip("--rig serial: --host-ip (this machine's address for the board) not given")
    return SerialOptions(
        port=port,
        charger_dev=parts[0],
        bus_dev=parts[1],
        host_ip=host_ip,
        site=config.getoption("--site"),
        reset_cmd=config.getoption("--reset-cmd"),
        flash_args=list(config.getoption("--flash-arg")),
    )


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config) -> Iterator[Bench]:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="hil-"))
    b = Bench(pytestconfig, workdir)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def make_dut(bench: Bench, request: pytest.FixtureRequest) -> Iterator[Callable[..., Dut]]:
    """make_dut(**kw) -> a started device under test named after the test; stopped after."""
    made: list[Dut] = []

    def make(suffix: str = "", **kw: Any) -> Dut:
        base = re.sub(r"[^A-Z0-9]", "", request.node.name.upper().replace("TEST_", ""))[:10]
        d = bench.dut(base + suffix, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()
        if d in bench.duts:
            bench.duts.remove(d)
