"""Compile agent/native.py's MODULES with mypyc, in place, when their sources changed since
the last build (agent/_native.stamp holds their digest). scripts/setup.sh runs it;
agent/native.py uses the result only while the digest matches, else the sources run as
they are (so does a machine with no C compiler).

    .venv/bin/python scripts/compile_native.py [--force] [--clean]
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import tempfile
import time
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _native() -> types.ModuleType:
    """agent/native.py alone: importing agent would decide about what we build."""
    spec = importlib.util.spec_from_file_location("_agent_native", ROOT / "agent/native.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    native = _native()
    want = native.digest()
    recorded = native.STAMP.read_text().strip() if native.STAMP.exists() else ""
    if "--clean" not in sys.argv and "--force" not in sys.argv:
        if native.built() and recorded == want:
            return 0  # up to date
    for p in native.built():
        p.unlink()
    native.STAMP.unlink(missing_ok=True)
    if "--clean" in sys.argv:
        return 0
    import warnings

    from mypyc.build import mypycify
    from setuptools import setup

    warnings.filterwarnings("ignore")  # setuptools' about the project's own pyproject.toml

    t0 = time.monotonic()
    print(f"compiling {', '.join(native.MODULES)} with mypyc …", flush=True)
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory(prefix="ledger-mypyc-") as tmp:
        modules = mypycify(
            [str(native.source(m).relative_to(ROOT)) for m in native.MODULES],
            opt_level="3",
            group_name=native.GROUP,
            target_dir=f"{tmp}/c",
        )
        setup(
            name="agent-ledger-native",
            ext_modules=modules,
            script_args=["-q", "build_ext", "--inplace", "--build-temp", f"{tmp}/o"],
        )
    native.STAMP.write_text(want + "\n")
    print(f"compiled in {time.monotonic() - t0:.0f} s: {len(native.built())} files", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
