"""How fast the station firmware drains a backlog from its flash outbox through MQTT QoS 1.

A day of 10-s telemetry (8,640 signed 8-slot messages of ~1.9 KB, made while offline) goes
through the outbox on MicroPython in rounds of 500 (a 1 MB outbox holds ~540: a whole day,
16 MB, is more than a 4 MB flash can keep, so the outbox drops oldest telemetry beyond its
bound), each round drained through the firmware's own Uplink and MQTTClient (window 16) to a
private Mosquitto on loopback. Target (issue 3): at least 500 messages/s. Also prints the
heap in use (code included) with a full in-flight window.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from mp_runner import ROOT, run

sys.path.insert(0, str(ROOT))
from tools.mosquitto import Mosquitto  # noqa: E402


def main() -> None:
    n = sys.argv[1] if len(sys.argv) > 1 else "8640"  # a day of 10-s telemetry, in rounds of 500
    with tempfile.TemporaryDirectory() as d, Mosquitto(Path(d) / "mq", insecure=True) as mq:
        run("uplink_drain.py", [n, str(mq.port)], "256k")  # last argument: the flash folder


if __name__ == "__main__":
    main()
