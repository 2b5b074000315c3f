"""Run a bench script of bench/mp/ on the MicroPython unix port, against the firmware as
bytecode (tools/fwbuild), the script itself compiled too so that compiling costs no heap."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools import fwbuild  # noqa: E402


def run(script: str, args: list[str], heap: str) -> None:
    """Print the script's output; exit with its status when it fails."""
    fw = fwbuild.build()
    name = Path(script).stem
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(
            [fwbuild.mpy_cross_bin(), "-o", f"{d}/{name}.mpy", str(ROOT / "bench" / "mp" / script)],
            check=True,
        )
        out = subprocess.run(
            [
                fwbuild.micropython_bin(),
                "-X",
                f"heapsize={heap}",
                "-c",
                f"import sys; sys.argv[1:] = {[*args, d]!r}; import {name}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            env={"MICROPYPATH": f"{d}:{fw}:.frozen"},
        )
    print(out.stdout, end="")
    if out.returncode:
        print(out.stderr, file=sys.stderr)
        sys.exit(out.returncode)
