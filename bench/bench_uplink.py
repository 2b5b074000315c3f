"""How fast the station firmware drains a backlog from its flash outbox through MQTT QoS 1.

A day of 10-s telemetry (8,640 signed 8-slot messages of ~1.9 KB, made while offline) goes
through the outbox on MicroPython in rounds of 500 (a 1 MB outbox holds ~540: a whole day,
16 MB, is more than a 4 MB flash can keep, so the outbox drops oldest telemetry beyond its
bound), each round drained through the firmware's own Uplink and MQTTClient (window 16) to a
private Mosquitto on loopback. Target (issue 3): at least 500 messages/s. Also prints the
heap in use (code included) with a full in-flight window.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools import fwbuild  # noqa: E402
from tools.mosquitto import Mosquitto  # noqa: E402
from tools.station_proc import micropython_bin  # noqa: E402


def main() -> None:
    n = sys.argv[1] if len(sys.argv) > 1 else "8640"  # a day of 10-s telemetry, in rounds of 500
    fw = fwbuild.build()
    with tempfile.TemporaryDirectory() as d, Mosquitto(Path(d) / "mq") as mq:
        subprocess.run([fwbuild.mpy_cross_bin(), "-o", f"{d}/uplink_drain.mpy",
                        str(ROOT / "bench" / "mp" / "uplink_drain.py")], check=True)
        flash = Path(d) / "flash"
        flash.mkdir()
        out = subprocess.run(
            [micropython_bin(), "-X", "heapsize=256k", "-c",
             f"import sys; sys.argv[1:] = [{n!r}, {str(mq.port)!r}, {str(flash)!r}]; import uplink_drain"],
            capture_output=True, text=True, timeout=900, env={"MICROPYPATH": f"{d}:{fw}:.frozen"},
        )
    print(out.stdout, end="")
    if out.returncode:
        print(out.stderr, file=sys.stderr)
        sys.exit(out.returncode)


if __name__ == "__main__":
    main()
