"""The agent's hot modules compiled with mypyc (agent/native.py, scripts/compile_native.py):
what make test runs is compiled (the rest of the suite tests it); files compiled from other
sources are set aside for the sources; and the sources, run as Python, still meet the
metering's independent reference (the property tests, once more, uncompiled)."""

from __future__ import annotations

import importlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from agent import native
from tests.helpers import ROOT

IN_CI = os.environ.get("CI") == "true"


def _need_compiled() -> None:
    if native.state != "compiled":
        if IN_CI:  # setup must have built it: CI tests what production runs
            pytest.fail(f"the agent is not compiled in CI: {native.state}")
        pytest.skip(f"the agent is not compiled here ({native.state}): scripts/setup.sh")


def test_the_suite_runs_the_compiled_modules() -> None:
    _need_compiled()
    for m in native.MODULES:
        f = importlib.import_module(m).__file__
        assert f is not None and pathlib.Path(f).suffix == ".so", f


def _which(tree: pathlib.Path, **env: str) -> tuple[str, str, str]:
    code = (
        "import agent, agent.ledger.engine as e, agent.ledger.state as s;"
        "print(agent.native.state); print(e.__file__); print(s.__file__)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    state, engine, state_py = r.stdout.splitlines()
    assert pathlib.Path(engine).is_relative_to(tree)  # the copy, not the checkout
    return state, pathlib.Path(engine).name + " " + pathlib.Path(state_py).name, r.stderr


def test_modules_compiled_from_other_sources_are_set_aside(tmp_path: pathlib.Path) -> None:
    _need_compiled()
    shutil.copytree(
        ROOT / "agent", tmp_path / "agent", ignore=shutil.ignore_patterns("__pycache__")
    )
    state, files, err = _which(tmp_path)
    assert state == "compiled" and files.endswith(".so") and ".so " in files
    assert "set aside" not in err
    # asked for: the sources, quietly
    state, files, err = _which(tmp_path, AGENT_PURE_PYTHON="1")
    assert (state, files) == ("python (AGENT_PURE_PYTHON=1)", "engine.py state.py")
    # an edited source: every module runs from source, with a warning (never old metering)
    engine = tmp_path / "agent/ledger/engine.py"
    engine.write_text(engine.read_text() + "\n# edited after compiling\n")
    state, files, err = _which(tmp_path)
    assert state.startswith("python (compiled from other sources") and files == "engine.py state.py"
    assert "compiled modules are set aside for their Python sources" in err
    # no stamp at all: the same
    engine.write_text(engine.read_text().replace("\n# edited after compiling\n", ""))
    assert _which(tmp_path)[0] == "compiled"
    (tmp_path / "agent/_native.stamp").unlink()
    assert _which(tmp_path)[1] == "engine.py state.py"
    # a build cut short: the modules' shared library missing
    (tmp_path / "agent/_native.stamp").write_text(native.digest() + "\n")
    assert _which(tmp_path)[0] == "compiled"
    for p in (tmp_path / "agent").glob("_native__mypyc.*"):
        p.unlink()
    state, files, err = _which(tmp_path)
    assert state.startswith("python (incomplete") and files == "engine.py state.py"


def test_the_python_sources_meet_the_reference_too() -> None:
    """The property tests against tests/metering_reference.py, run on the sources (the
    suite runs them compiled); a difference between the two would fail one of the runs."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "tests/test_metering_props.py",
        ],
        cwd=ROOT,
        env={**os.environ, "AGENT_PURE_PYTHON": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
