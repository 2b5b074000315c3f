import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt

from tools.machine import proc_state
from tools.mosquitto import Mosquitto, dies_with_parent

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_private_broker_keeps_port_and_retained_message_across_restart(
    mosquitto: Mosquitto,
) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t1")
    c.connect("127.0.0.1", mosquitto.port)
    c.loop_start()
    c.publish("stations/T-1/status", b"online", qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()
    mosquitto.restart()
    got: list[bytes] = []
    s = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t2")
    s.on_message = lambda _c, _u, m: got.append(m.payload)
    s.connect("127.0.0.1", mosquitto.port)
    s.subscribe("stations/+/status", qos=1)
    s.loop_start()
    for _ in range(50):
        if got:
            break
        time.sleep(0.1)
    s.loop_stop()
    assert got == [b"online"]


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for init to reap it counts as gone)."""
    return proc_state(pid) in (None, "Z")


def test_a_broker_dies_with_the_process_that_started_it(tmp_path: pathlib.Path) -> None:
    # a bench killed by SIGKILL (or a segfault) never reaches its `finally`; its broker must
    # not live on, saving a backlog to disk every second under every later measurement
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tools.mosquitto import Mosquitto\n"
            f"m = Mosquitto({str(tmp_path / 'mq')!r}, insecure=True); m.start()\n"
            "print(m.proc.pid, flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None
    broker_pid = int(starter.stdout.readline())
    try:
        assert not _gone(broker_pid)
        starter.kill()
        starter.wait()
        deadline = time.monotonic() + 10
        while not _gone(broker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(broker_pid), "the broker outlived the process that started it"
    finally:
        if not _gone(broker_pid):
            os.kill(broker_pid, signal.SIGKILL)


def test_only_the_main_thread_binds_a_child_to_itself() -> None:
    cmd = ["mosquitto", "-c", "x.conf"]
    bound = dies_with_parent(cmd)
    assert bound[-3:] == cmd and "--pdeathsig" in bound
    # from a worker thread the child is left alone: the thread may end before the broker
    got: list[list[str]] = []
    t = threading.Thread(target=lambda: got.append(dies_with_parent(cmd)))
    t.start()
    t.join()
    assert got == [cmd]
