"""The agent over TLS with a user name and password file, against a real Mosquitto."""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import ssl
import subprocess

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import load_config
from agent.keys import KeyStore
from agent.service import Service
from tests.agent_helpers import Station
from tools.mosquitto import Mosquitto


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def make_certs(d: pathlib.Path) -> None:
    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    run(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        str(d / "server.key"),
        "-out",
        str(d / "server.csr"),
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        str(d / "server.csr"),
        "-CA",
        str(d / "ca.pem"),
        "-CAkey",
        str(d / "ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(d / "ext.cnf"),
        "-out",
        str(d / "server.pem"),
    )


@pytest.mark.skipif(
    not shutil.which("openssl") or not shutil.which("mosquitto_passwd"),
    reason="needs openssl and mosquitto_passwd",
)
async def test_tls_and_password(tmp_path: pathlib.Path) -> None:
    make_certs(tmp_path)
    pw = tmp_path / "passwd"
    run("mosquitto_passwd", "-b", "-c", str(pw), "agent", "s3cret")
    run("mosquitto_passwd", "-b", str(pw), "pub", "pubpw")
    broker = Mosquitto(tmp_path / "mq", password_file=str(pw))
    broker.conf.write_text(
        broker.conf.read_text().replace(
            f"listener {broker.port} 127.0.0.1",
            f"listener {broker.port} 127.0.0.1\ncafile {tmp_path}/ca.pem\n"
            f"certfile {tmp_path}/server.pem\nkeyfile {tmp_path}/server.key",
        )
    )
    broker.start()
    try:
        (tmp_path / "agent.pass").write_text("s3cret\n")
        cfg_path = tmp_path / "agent.toml"
        cfg_path.write_text(
            f'[db]\nurl = "sqlite:///agent.db"\nsynchronous = "normal"\n'
            f'[broker]\nport = {broker.port}\nuser = "agent"\npassword_file = "agent.pass"\n'
            f'tls = true\ntls_ca = "ca.pem"\nclient_id = "tls-agent"\n'
        )
        cfg = load_config(cfg_path)
        st = Station("KH-TLS-0001")
        with KeyStore(cfg.db.url) as ks:
            ks.add(st.sid, st.key)
        svc = Service(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(svc.run(stop))
        await asyncio.wait_for(svc.ready.wait(), 20)

        def publish() -> None:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tls-pub")
            c.username_pw_set("pub", "pubpw")
            c.tls_set(ca_certs=str(tmp_path / "ca.pem"), cert_reqs=ssl.CERT_REQUIRED)
            c.connect("127.0.0.1", broker.port)
            c.loop_start()
            for _ in range(30):
                st.advance()
                kind, p = st.telemetry()
                c.publish(st.topic(kind), p, qos=1).wait_for_publish(10)
            c.disconnect()
            c.loop_stop()

        await asyncio.to_thread(publish)
        end = asyncio.get_running_loop().time() + 20
        while svc.counters["stored"] < 30 and asyncio.get_running_loop().time() < end:
            await asyncio.sleep(0.05)
        stop.set()
        await task
        assert svc.counters["stored"] == 30 and svc.counters["quarantined"] == 0
    finally:
        broker.stop()


async def test_wrong_password_is_retried_not_fatal(tmp_path: pathlib.Path) -> None:
    pw = tmp_path / "passwd"
    run("mosquitto_passwd", "-b", "-c", str(pw), "agent", "right")
    broker = Mosquitto(tmp_path / "mq", password_file=str(pw))
    broker.start()
    try:
        (tmp_path / "agent.toml").write_text(
            f'[db]\nurl = "sqlite:///agent.db"\n[broker]\nport = {broker.port}\n'
            f'user = "agent"\npassword = "wrong"\nclient_id = "pw-agent"\n'
        )
        svc = Service(load_config(tmp_path / "agent.toml"))
        stop = asyncio.Event()
        task = asyncio.create_task(svc.run(stop))
        await asyncio.sleep(1.5)
        assert not svc.ready.is_set() and not task.done()  # refused, retrying with backoff
        stop.set()
        await asyncio.wait_for(task, 20)
    finally:
        broker.stop()
