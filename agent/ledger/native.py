"""The metering engine compiled with mypyc (scripts/compile_ledger.py), used only when it
was compiled from the very sources beside it.

rules.py, state.py and engine.py are plain Python and stay the sources of truth. Compiled,
they take about a quarter less of the database thread's CPU per message (docs/agent.md,
"Compiled metering"). An extension module beside its source wins Python's import, so
modules compiled from older sources would run old metering: `use_compiled()`, called
first by agent/ledger/__init__.py, compares the sources' digest with the one the build
recorded and, when they differ (or AGENT_PURE_PYTHON=1), loads the sources instead, with a
warning. Only the standard library here: the build script loads this file on its own.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import pathlib
import sys
from typing import Final

log = logging.getLogger(__name__)

MODULES: Final = ("rules", "state", "engine")  # compiled together, in import order
GROUP: Final = "agent.ledger._native"  # the shared library: _native__mypyc.<suffix>
HERE: Final = pathlib.Path(__file__).resolve().parent
STAMP: Final = HERE / "_native.stamp"  # the digest of the sources last compiled

# What agent.ledger runs: "compiled", "python" (nothing compiled) or "python (why)"
state = "python"


def digest() -> str:
    h = hashlib.sha256()
    for m in MODULES:
        h.update((HERE / f"{m}.py").read_bytes())
    return h.hexdigest()


def built() -> list[pathlib.Path]:
    """The compiled files beside the sources (any Python version's)."""
    names = [*MODULES, GROUP.rsplit(".", 1)[1] + "__mypyc"]
    return [p for n in names for p in HERE.glob(f"{n}.*") if p.suffix in (".so", ".pyd")]


def _importable(m: str) -> bool:
    return any((HERE / f"{m}{s}").exists() for s in importlib.machinery.EXTENSION_SUFFIXES)


def use_compiled() -> str:
    """Decide before any of MODULES is imported; returns (and keeps in `state`) which."""
    global state
    if not all(_importable(m) for m in MODULES):
        state = "python"
        return state
    why = None
    if os.environ.get("AGENT_PURE_PYTHON") == "1":
        why = "AGENT_PURE_PYTHON=1"
    else:
        try:
            recorded = STAMP.read_text().strip()
        except OSError:
            recorded = ""
        if recorded != digest():
            why = "compiled from other sources; scripts/setup.sh compiles them again"
    if why is None:
        state = "compiled"
        return state
    package = sys.modules[__name__.rsplit(".", 1)[0]]
    for m in MODULES:
        name = f"{package.__name__}.{m}"
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, HERE / f"{m}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
        setattr(package, m, mod)
    if why != "AGENT_PURE_PYTHON=1":
        log.warning("metering runs its Python sources: the compiled modules are %s", why)
    state = f"python ({why})"
    return state
