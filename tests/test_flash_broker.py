"""Broker credentials and configuration from tools/flash: Mosquitto password-file hashes
cross-checked with mosquitto_passwd and accepted by a real Mosquitto 2.0, atomic updates
that keep other users' lines, and the shipped config + ACL enforced by a real broker."""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import subprocess
import threading

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import free_port
from tools.flash import broker, passwd
from tools.mosquitto import find_mosquitto

MOSQ_PASSWD = shutil.which("mosquitto_passwd")


@pytest.mark.skipif(MOSQ_PASSWD is None, reason="mosquitto_passwd not installed")
def test_hash_matches_mosquitto_passwd(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "pw"
    subprocess.run([str(MOSQ_PASSWD), "-c", "-b", str(f), "KH-A-0001", "s3cret"], check=True)
    line = f.read_text().strip()
    user, hashed = line.split(":", 1)
    assert user == "KH-A-0001" and hashed.startswith("$7$101$")
    # same salt and iterations -> the same bytes as mosquitto_passwd wrote
    salt = __import__("base64").b64decode(hashed.split("$")[3])
    assert passwd.hash_password("s3cret", salt=salt) == hashed
    assert passwd.check_password("s3cret", hashed)
    assert not passwd.check_password("s3cres", hashed)
    # and ours has its shape: $7$101$<16 b64 chars: 12 bytes>$<88 b64 chars: 64 bytes>
    ours = passwd.hash_password("x").split("$")
    assert ours[1:3] == ["7", "101"] and len(ours[3]) == 16 and len(ours[4]) == 88


def test_set_password_keeps_other_lines_and_rolls_back(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "pw"
    f.write_text("# fleet\nagent:$6$abc$def\nKH-B-0002:$7$101$x$y\n")
    os.chmod(f, 0o640)
    before = f.read_bytes()
    assert passwd.set_password(f, "KH-A-0001", "p1") is None  # appended
    prev = passwd.set_password(f, "KH-B-0002", "p2")  # replaced in place
    assert prev == "KH-B-0002:$7$101$x$y"
    lines = f.read_text().splitlines()
    assert lines[:2] == ["# fleet", "agent:$6$abc$def"]
    assert lines[2].startswith("KH-B-0002:$7$") and passwd.check_password(
        "p2", lines[2].split(":", 1)[1]
    )
    assert lines[3].startswith("KH-A-0001:$7$") and len(lines) == 4
    assert stat.S_IMODE(f.stat().st_mode) == 0o640  # the broker's user must still read it
    # rollback: put back what each call returned
    passwd.set_line(f, "KH-B-0002", prev)
    passwd.set_line(f, "KH-A-0001", None)
    assert f.read_bytes() == before
    with pytest.raises(ValueError):
        passwd.set_password(f, "bad:user", "x")


def test_new_file_is_private(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "sub" / "pw"
    passwd.set_password(f, "KH-A-0001", "p")
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert passwd.entry(f, "KH-A-0001") is not None and passwd.entry(f, "KH-Z-0001") is None


class _Client:
    def __init__(self, port: int, user: str, password: str) -> None:
        self.rc: int | None = None
        self.got: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self.ev = threading.Event()
        self.sub_ev = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{free_port()}")
        self.c.username_pw_set(user, password)
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c.on_subscribe = self._on_subscribe
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.ev.wait(10)

    def _on_connect(
        self, _c: object, _u: object, _f: object, rc: object, _p: object = None
    ) -> None:
        self.rc = int(getattr(rc, "value", rc))  # type: ignore[call-overload]
        self.ev.set()

    def _on_subscribe(
        self, _c: object, _u: object, _mid: object, codes: list[object], _p: object
    ) -> None:
        self.granted = [int(getattr(x, "value", x)) for x in codes]  # type: ignore[call-overload]
        self.sub_ev.set()

    def subscribe(self, topic: str) -> int:
        self.sub_ev.clear()
        self.c.subscribe(topic, 1)
        assert self.sub_ev.wait(10)
        return self.granted[0]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_shipped_config_and_acl_on_a_real_broker(tmp_path: pathlib.Path) -> None:
    pw = tmp_path / "stations.passwd"
    passwd.set_password(pw, "agent", "agent-pw")
    passwd.set_password(pw, "KH-A-0001", "a-pw")
    passwd.set_password(pw, "KH-B-0002", "b-pw")
    port = free_port()
    (tmp_path / "data").mkdir()
    conf = tmp_path / "stations.conf"
    conf.write_text(
        broker.render(
            stations=50,
            password_file=str(pw),
            acl_file=str(broker.ACL),
            persistence_dir=str(tmp_path / "data"),
            port=port,
            bind="127.0.0.1",
            log_dest=f"file {tmp_path / 'mosq.log'}",
            extra="user root" if os.geteuid() == 0 else "",
        )
    )
    text = conf.read_text()
    assert (
        "persistence true" in text
        and f"max_queued_messages {50 * broker.per_station_day()}" in text
        # Nagle off: with bunched arrivals a soak's p50 publish → agent was 21 ms with it
        and "\nset_tcp_nodelay true\n" in text
    )
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    clients: list[_Client] = []
    try:
        import socket
        import time

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "mosq.log").read_text()
                assert time.monotonic() < deadline
                time.sleep(0.05)
        bad = _Client(port, "KH-A-0001", "wrong")
        clients.append(bad)
        assert bad.rc in (4, 5, 134, 135)  # refused (CONNACK 5; paho v2 reports it as 135)
        a = _Client(port, "KH-A-0001", "a-pw")
        b = _Client(port, "KH-B-0002", "b-pw")
        agent = _Client(port, "agent", "agent-pw")
        clients += [a, b, agent]
        assert a.rc == 0 and b.rc == 0 and agent.rc == 0
        assert a.subscribe("stations/KH-A-0001/cmd") == 1  # its own commands
        # Mosquitto 2.0 grants a subscription the ACL forbids, then delivers nothing on it
        a.subscribe("stations/KH-B-0002/cmd")
        assert agent.subscribe("stations/#") == 1
        # a station publishes under its own id; under another's it is dropped by the broker
        a.c.publish("stations/KH-A-0001/telemetry", b"mine", 1).wait_for_publish(5)
        a.c.publish("stations/KH-B-0002/telemetry", b"forged", 1).wait_for_publish(5)
        agent.c.publish("stations/KH-B-0002/cmd", b"for-b", 1).wait_for_publish(5)
        agent.c.publish("stations/KH-A-0001/cmd", b"cmd", 1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (agent.got and a.got):
            time.sleep(0.05)
        time.sleep(0.3)
        assert ("stations/KH-A-0001/telemetry", b"mine") in agent.got
        assert all(p != b"forged" for _t, p in agent.got)
        assert a.got == [("stations/KH-A-0001/cmd", b"cmd")]  # not B's command
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(10)
