"""The demo's fallback broker: amqtt, a pure-Python MQTT 3.1.1 broker, on a free loopback
port, for a machine where Mosquitto cannot be had. It is slow (~2k msg/s at QoS 1 here)
and has lost QoS 0 backlogs, so it is only ever a fallback, and the demo says so."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

from tools.mosquitto import dies_with_parent, free_port, stop_process, wait_listening


def available() -> bool:
    try:
        import amqtt  # noqa: F401
    except ImportError:
        return False
    return True


class EmbeddedBroker:
    """`start()`, `stop()`, `.port`; persistent sessions for named clients, anonymous access."""

    def __init__(self, workdir: str | os.PathLike[str], port: int | None = None) -> None:
        self.dir = pathlib.Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = self.dir / "amqtt.yaml"
        self.conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        self.log = self.dir / "amqtt.log"

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                dies_with_parent(
                    [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(self.conf)]
                ),
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_listening(self.proc, self.port, self.log, "amqtt", timeout)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)  # amqtt shuts down on KeyboardInterrupt
        self.proc = None
