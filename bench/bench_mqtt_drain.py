"""MicroPython MQTT client draining a backlog through QoS 1 to a private Mosquitto.

Runs tests/mp_scripts/mqtt_drain.py on the MicroPython unix port with a 128 KB heap: about
what an ESP32 without PSRAM leaves to Python is 100 KB, but here the modules are compiled
from source on that heap (a station maps them from ROMFS), and the client's 8 KB packet
buffer no longer found room in 100 KB after that. 5,000 telemetry-sized (600 byte)
messages, window 16. Prints messages/s (target >= 500) and the heap in use
(gc.mem_alloc() after gc.collect()) with the modules loaded, connected and idle, and with
a full in-flight window (the broker is frozen with SIGSTOP so that nothing is acked).
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import micropython_bin  # noqa: E402
from tools.mosquitto import Mosquitto  # noqa: E402

SCRIPT = ROOT / "tests" / "mp_scripts" / "mqtt_drain.py"


def run_once(n: int, size: int, window: int, heap: str) -> dict[str, object]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        Mosquitto(pathlib.Path(tmp) / "mosq", insecure=True) as broker,
    ):
        opts = json.dumps({"port": broker.port, "n": n, "size": size, "window": window})
        proc = subprocess.Popen(
            [micropython_bin(), "-X", f"heapsize={heap}", str(SCRIPT), opts],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin and proc.stdout and broker.proc
        try:
            assert json.loads(proc.stdout.readline())["phase"] == "drained"
            broker.proc.send_signal(signal.SIGSTOP)  # nothing gets acked from here
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert json.loads(proc.stdout.readline())["phase"] == "full"
            broker.proc.send_signal(signal.SIGCONT)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result: dict[str, object] = json.loads(proc.stdout.readline())
            proc.wait(60)
        finally:
            broker.proc.send_signal(signal.SIGCONT)
            if proc.poll() is None:
                proc.kill()
        return result


def main() -> None:
    n, size, window, heap = 5000, 600, 16, "128k"
    runs = [run_once(n, size, window, heap) for _ in range(3)]
    rates = sorted(int(r["msg_s"]) for r in runs)  # type: ignore[call-overload]
    r = runs[0]
    print(
        f"MicroPython {heap} heap, {n} x {r['size']} B QoS 1, window {window}, loopback Mosquitto"
    )
    print(f"  drain: median {rates[1]} msg/s (runs: {', '.join(map(str, rates))}; target >= 500)")
    for k in ("acked",):
        assert all(int(x[k]) == n + window + 1 for x in runs), runs  # type: ignore[call-overload]
    print(f"  heap, modules loaded:         {r['heap_modules']} B")
    print(f"  heap, connected and idle:     {r['heap_idle']} B")
    print(
        f"  heap, full window ({r['inflight_at_sample']} in flight): {r['heap_full_window']} B"
        f"  (+{int(r['heap_full_window']) - int(r['heap_idle'])} B over idle)"  # type: ignore[call-overload]
    )
    print(f"  counters: {r['counters']}")


if __name__ == "__main__":
    main()
