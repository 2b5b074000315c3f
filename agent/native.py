"""Hot modules compiled with mypyc (scripts/compile_native.py), used only when compiled
from the very sources beside them.

The modules in MODULES are plain Python and stay the sources of truth; compiled, they cost
less CPU per message (docs/agent.md, "Compiled metering"). An extension module beside its
source wins Python's import, so files compiled from older sources would run old code (old
metering): `use_compiled()`, called first by agent/__init__.py, compares the sources'
digest with the one the build recorded and, when they differ (or AGENT_PURE_PYTHON=1),
puts a finder first on sys.meta_path that imports MODULES from their sources, with a
warning for the former. Only the standard library here: the build script loads this file
on its own.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Final

log = logging.getLogger(__name__)

MODULES: Final = (
    "agent.ledger.reads",
    "agent.ledger.rules",
    "agent.ledger.state",
    "agent.ledger.engine",
)
GROUP: Final = "agent._native"  # their shared library: agent/_native__mypyc.<suffix>
HERE: Final = pathlib.Path(__file__).resolve().parent
STAMP: Final = HERE / "_native.stamp"  # the digest of the sources last compiled

# What runs: "compiled", "python" (nothing compiled) or "python (why)"
state = "python"


def source(module: str) -> pathlib.Path:
    return HERE.parent / (module.replace(".", "/") + ".py")


def digest() -> str:
    h = hashlib.sha256()
    for m in MODULES:
        h.update(m.encode() + b"\n" + source(m).read_bytes())
    return h.hexdigest()


def _stems() -> list[pathlib.Path]:
    """Each compiled module's path without its suffix, and their shared library's."""
    stems = [source(m).with_suffix("") for m in MODULES]
    return [*stems, HERE.parent / (GROUP.replace(".", "/") + "__mypyc")]


def built() -> list[pathlib.Path]:
    """The compiled files beside the sources (any Python version's)."""
    return [
        p for s in _stems() for p in s.parent.glob(s.name + ".*") if p.suffix in (".so", ".pyd")
    ]


def _importable(stem: pathlib.Path) -> bool:
    return any(
        stem.with_name(stem.name + s).exists() for s in importlib.machinery.EXTENSION_SUFFIXES
    )


class _Sources(importlib.abc.MetaPathFinder):
    """Imports MODULES from their .py files, ahead of the compiled files beside them."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname in MODULES:
            return importlib.util.spec_from_file_location(fullname, source(fullname))
        return None


def use_compiled() -> str:
    """Decide before any of MODULES is imported; returns (and keeps in `state`) which."""
    global state
    have = [_importable(s) for s in _stems()]
    if not any(have):
        state = "python"
        return state
    why = None
    if not all(have):
        why = "incomplete; scripts/setup.sh compiles them again"
    elif os.environ.get("AGENT_PURE_PYTHON") == "1":
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
    if not any(isinstance(f, _Sources) for f in sys.meta_path):
        sys.meta_path.insert(0, _Sources())
    if why != "AGENT_PURE_PYTHON=1":
        log.warning("the compiled modules are set aside for their Python sources: %s", why)
    state = f"python ({why})"
    return state
