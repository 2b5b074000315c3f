"""Attacks on the broker configuration `stationctl broker init` writes (issue 14, CONTRACT §5),
on a real Mosquitto started from it: paho clients over TLS (verifying the generated CA) as
stations, and on the plain loopback listener as the agent. Each attack has a positive control
(the same path works for the rightful account), so a test fails if the protection is gone."""

from __future__ import annotations

import asyncio
import grp
import itertools
import os
import pathlib
import pwd
import shutil
import signal
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from stationctl.cli import main as stationctl
from tools.flash import broker_setup, passwd
from tools.mosquitto import Mosquitto, free_port

A, B = "KH-A-0001", "KH-B-0002"
AGENT_ID = "stationctl-agent"  # agent.sources.mqtt.BrokerConfig.client_id
_ids = itertools.count()
REFUSED = (4, 5, 134, 135)  # CONNACK bad credentials / not authorised (paho v2: 134, 135)


@pytest.fixture
def broker(tmp_path: pathlib.Path) -> Iterator[Mosquitto]:
    m = Mosquitto.deployment(tmp_path, stations=[A, B])
    m.start()
    try:
        yield m
    finally:
        m.stop()


def pw(m: Mosquitto, user: str) -> str:
    assert m.setup_dir is not None
    sub = "stations/" if user.isupper() else ""
    return (m.setup_dir / "passwords" / f"{sub}{user}").read_text().strip()


class Client:
    """A paho client that records its CONNACK, SUBACKs and messages."""

    def __init__(
        self,
        m: Mosquitto,
        user: str | None,
        password: str | None = None,
        *,
        tls: bool = True,
        client_id: str = "",
        clean: bool = True,
        ca: str | os.PathLike[str] | None = None,
        host: str = "localhost",
        port: int | None = None,
        cert: tuple[pathlib.Path, pathlib.Path] | None = None,
        connack_s: float = 10.0,
    ) -> None:
        """`cert`: a client certificate and its key to present (mTLS)."""
        self.rc: int | None = None
        self.session_present = False
        self.got: list[tuple[str, bytes]] = []
        self.conn_ev = threading.Event()
        self.sub_ev = threading.Event()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"t-{user}-{next(_ids)}",
            clean_session=clean,
        )
        if user is not None:
            self.c.username_pw_set(user, password)
        if tls:
            assert m.setup_dir is not None
            ctx = ssl.create_default_context(cafile=str(ca or m.setup_dir / "ca.crt"))
            if cert is not None:
                ctx.load_cert_chain(str(cert[0]), str(cert[1]))
            self.c.tls_set_context(ctx)
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda _c, _u, msg: self.got.append((msg.topic, bytes(msg.payload)))
        self.c.on_subscribe = lambda *_a: self.sub_ev.set()
        port = port or (m.tls_port if tls else m.port)
        assert port is not None
        self.c.connect(host if tls else "127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        if not self.conn_ev.wait(connack_s):
            self.close()
            raise ConnectionError("no CONNACK: the broker closed the connection")

    def _on_connect(self, _c: object, _u: object, flags: object, rc: object, _p: object) -> None:
        self.rc = int(getattr(rc, "value", rc))  # type: ignore[call-overload]
        self.session_present = bool(getattr(flags, "session_present", False))
        self.conn_ev.set()

    def subscribe(self, topic: str) -> None:
        self.sub_ev.clear()
        self.c.subscribe(topic, 1)
        assert self.sub_ev.wait(10)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.c.publish(topic, payload, 1)
        info.wait_for_publish(5)
        assert info.is_published()

    def wait_for(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def connected(m: Mosquitto, user: str, **kw: object) -> Client:
    c = Client(m, user, pw(m, user), **kw)  # type: ignore[arg-type]
    assert c.rc == 0, f"{user} refused: {c.rc}"
    return c


def agent(m: Mosquitto, **kw: object) -> Client:
    return connected(m, "agent", tls=False, **kw)


def settle() -> None:
    time.sleep(0.4)  # what would be delivered has been by now (loopback, QoS 1)


def test_generated_files_and_modes(broker: Mosquitto) -> None:
    d = broker.setup_dir
    assert d is not None
    conf = (d / "mosquitto.conf").read_text()
    assert f"listener {broker.port} 127.0.0.1\n" in conf  # plain MQTT: loopback only
    tls_block = conf.split(f"listener {broker.tls_port}\n")[1].split("\n\n")[0]
    assert "use_username_as_clientid true" in tls_block and "certfile" in tls_block
    assert "stations.passwd" in tls_block and "agents.passwd" not in tls_block
    assert "per_listener_settings true" in conf and "persistence true" in conf
    assert "\nset_tcp_nodelay true\n" in conf  # else a PUBLISH waits for the last one's ACK
    for f in ("ca.key", "server.key", "stations.passwd", "agents.passwd"):
        assert stat.S_IMODE((d / f).stat().st_mode) & 0o077 in (0, 0o040), f  # no "other"
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "passwords").stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "passwords" / "stations" / A).stat().st_mode) == 0o600
    line = passwd.entry(d / "stations.passwd", A)
    assert line is not None and passwd.check_password(pw(broker, A), line.split(":", 1)[1])
    assert passwd.entry(d / "stations.passwd", "agent") is None  # agents log in elsewhere


def test_station_cannot_publish_as_another(broker: Mosquitto) -> None:
    ag = agent(broker)
    a = connected(broker, A)
    try:
        ag.subscribe("stations/#")
        a.publish(f"stations/{B}/telemetry", b"forged")
        a.publish(f"stations/{B}/status", b"forged-status")
        a.publish(f"stations/{A}/telemetry", b"mine")  # positive control
        ag.wait_for(1)
        settle()
        assert ag.got == [(f"stations/{A}/telemetry", b"mine")]
    finally:
        a.close()
        ag.close()


def test_station_cannot_read_another_stations_commands(broker: Mosquitto) -> None:
    ag = agent(broker)
    a = connected(broker, A)
    try:
        a.subscribe(f"stations/{B}/cmd")  # Mosquitto 2.0 grants it, then delivers nothing
        a.subscribe("stations/+/cmd")
        a.subscribe("#")
        ag.publish(f"stations/{B}/cmd", b"for-b")
        ag.publish(f"stations/{A}/cmd", b"for-a")  # positive control
        a.wait_for(1)
        settle()
        assert {p for _t, p in a.got} == {b"for-a"}
    finally:
        a.close()
        ag.close()


def test_station_cannot_subscribe_to_the_fleets_telemetry(broker: Mosquitto) -> None:
    ag = agent(broker)
    a = connected(broker, A)
    b = connected(broker, B)
    try:
        ag.subscribe("stations/+/telemetry")
        a.subscribe("stations/+/telemetry")
        a.subscribe(f"stations/{B}/#")
        b.publish(f"stations/{B}/telemetry", b"b-telemetry")
        b.publish(f"stations/{B}/event", b"b-event")
        ag.wait_for(1)  # positive control: it was published and delivered to the agent
        settle()
        assert ag.got == [(f"stations/{B}/telemetry", b"b-telemetry")]
        assert a.got == []
    finally:
        for c in (a, b, ag):
            c.close()


@pytest.mark.parametrize("target", [AGENT_ID, f"{AGENT_ID}-shard-00"])
def test_station_cannot_take_over_the_agents_session(broker: Mosquitto, target: str) -> None:
    # the agent's persistent session, subscribed, then away
    ag = agent(broker, client_id=target, clean=False)
    ag.subscribe("stations/+/telemetry")
    ag.close()
    a = connected(broker, A)
    n = 20
    for i in range(n):
        a.publish(f"stations/{A}/telemetry", b"%d" % i)
    a.close()

    # with a station's credentials, every way in to the agent's client id
    attempts = []
    for clean in (True, False):
        c = Client(broker, A, pw(broker, A), client_id=target, clean=clean)
        attempts.append(c)
        assert c.rc == 0  # it connects, but as itself (use_username_as_clientid)
        c.subscribe("stations/#")
    c = Client(broker, A, pw(broker, A), tls=False, client_id=target, clean=True)
    attempts.append(c)
    assert c.rc in REFUSED  # the agent's listener knows no station account
    c = Client(broker, None, tls=False, client_id=target, clean=True)
    attempts.append(c)
    assert c.rc in REFUSED  # nor anonymous
    settle()
    for c in attempts:
        assert c.got == []  # none of the queued messages went to the attacker
        c.close()

    back = agent(broker, client_id=target, clean=False)
    try:
        back.wait_for(n)
        settle()
        assert back.session_present
        assert [p for _t, p in back.got] == [b"%d" % i for i in range(n)]
    finally:
        back.close()


def test_station_cannot_take_over_another_stations_session(broker: Mosquitto) -> None:
    b = connected(broker, B, clean=False)
    b.subscribe(f"stations/{B}/cmd")
    b.close()
    ag = agent(broker)
    ag.publish(f"stations/{B}/cmd", b"queued-for-b")
    ag.close()
    a = Client(broker, A, pw(broker, A), client_id=B, clean=True)
    assert a.rc == 0
    a.close()
    b = connected(broker, B, clean=False)
    try:
        b.wait_for(1)
        assert b.got == [(f"stations/{B}/cmd", b"queued-for-b")]
    finally:
        b.close()


def test_revoked_station_is_refused(broker: Mosquitto) -> None:
    assert broker.setup_dir is not None and broker.proc is not None
    old = pw(broker, B)
    c = Client(broker, B, old)
    assert c.rc == 0  # positive control
    c.close()
    hup = f"kill -HUP {broker.proc.pid}"
    d = str(broker.setup_dir)
    assert stationctl(["broker", "revoke-station", "--dir", d, B, "--reload", hup]) == 0
    assert not (broker.setup_dir / "passwords" / "stations" / B).exists()
    time.sleep(0.3)  # the broker re-reads its password file
    c = Client(broker, B, old)
    assert c.rc in REFUSED
    c.close()
    a = Client(broker, A, pw(broker, A))
    assert a.rc == 0  # the others are untouched
    a.close()
    assert stationctl(["broker", "revoke-station", "--dir", d, B]) == 2  # no such account
    # add-station brings it back with a new password; the old one stays refused
    assert stationctl(["broker", "add-station", "--dir", d, B, "--reload", hup]) == 0
    time.sleep(0.3)
    assert pw(broker, B) != old
    c = Client(broker, B, old)
    assert c.rc in REFUSED
    c.close()
    c = connected(broker, B)
    c.close()


def test_wrong_ca_fails_the_tls_handshake(broker: Mosquitto, tmp_path: pathlib.Path) -> None:
    other = broker_setup.init(tmp_path / "other", broker_setup.Options(stations=[A]))
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(broker, A, pw(broker, A), ca=other["ca"])
    # the right CA, under each name the certificate carries: accepted
    for host in ("localhost", "127.0.0.1"):
        c = connected(broker, A, host=host)
        c.close()


def test_anonymous_and_wrong_passwords_are_refused(broker: Mosquitto) -> None:
    for tls in (True, False):
        c = Client(broker, None, tls=tls)
        assert c.rc in REFUSED, f"anonymous on the {'TLS' if tls else 'loopback'} listener"
        c.close()
    c = Client(broker, A, "wrong")
    assert c.rc in REFUSED
    c.close()
    # the agent's account is not a station account: not on the stations' listener
    c = Client(broker, "agent", pw(broker, "agent"))
    assert c.rc in REFUSED
    c.close()


def test_operator_reads_but_cannot_command(broker: Mosquitto) -> None:
    op = connected(broker, "operator", tls=False)
    a = connected(broker, A)
    try:
        op.subscribe("stations/#")
        a.subscribe(f"stations/{A}/cmd")
        op.publish(f"stations/{A}/cmd", b"from-operator")
        a.publish(f"stations/{A}/telemetry", b"t")
        op.wait_for(1)
        settle()
        assert op.got == [(f"stations/{A}/telemetry", b"t")]
        assert a.got == []
    finally:
        op.close()
        a.close()


def test_connected_station_is_dropped_at_revoke(broker: Mosquitto) -> None:
    """Mosquitto 2.0.11 re-checks connected clients against the password file it reads
    again on SIGHUP: a revoked station is disconnected then, and its reconnects refused."""
    assert broker.setup_dir is not None and broker.proc is not None
    b = connected(broker, B)
    a = connected(broker, A)
    try:
        b.subscribe(f"stations/{B}/cmd")
        assert broker_setup.revoke_station(broker.setup_dir, B)
        os.kill(broker.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while b.c.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not b.c.is_connected()
        assert f"Client {B} disconnected." in broker.log.read_text()
        time.sleep(1.5)  # paho reconnects by itself after 1 s: refused
        assert not b.c.is_connected()
        assert a.c.is_connected()  # the others stay
        ag = agent(broker)
        ag.publish(f"stations/{B}/cmd", b"after-revoke")
        ag.close()
        settle()
        assert b.got == []
    finally:
        a.close()
        b.close()


def test_init_from_the_agent_database_and_run_as_the_broker_user(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stationctl broker init --stations-from DB`: every station with an unrevoked key gets
    an account; the files are readable by the user Mosquitto drops to (as root: user
    mosquitto) and the broker starts from them and serves a station over TLS."""
    from agent.keys import KeyStore

    db = tmp_path / "agent.db"
    with KeyStore(f"sqlite:///{db}") as ks:
        for sid in (A, B, "KH-C-0003"):
            ks.add(sid, bytes(32))
        ks.revoke("KH-C-0003")
    # a directory the broker's user can reach (pytest's tmp_path is root's alone)
    base = pathlib.Path(tempfile.mkdtemp(prefix="broker-init-"))
    try:
        os.chmod(base, 0o755)
        d = base / "conf"
        tls_port, local_port = free_port(), free_port()
        args = ["broker", "init", "--dir", str(d), "--stations-from", f"sqlite:///{db}"]
        args += ["--tls-port", str(tls_port), "--local-port", str(local_port)]
        args += ["--log-dest", f"file {base / 'mosquitto.log'}"]
        assert stationctl(args) == 0
        assert "2 station account(s)" in capsys.readouterr().out
        users = [passwd.user_of(x) for x in passwd.read_lines(d / "stations.passwd")]
        assert users == [A, B]
        assert stationctl(args) == 2  # never over an existing configuration
        if os.geteuid() == 0:
            os.chown(base, pwd.getpwnam("mosquitto").pw_uid, -1)  # its log file
            for f in ("server.key", "stations.passwd", "agents.passwd"):
                st = (d / f).stat()
                assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o640)
                assert grp.getgrgid(st.st_gid).gr_name == "mosquitto"
            assert pwd.getpwuid((d / "data").stat().st_uid).pw_name == "mosquitto"
        m = Mosquitto(base, local_port, config=d / "mosquitto.conf")
        m.tls_port, m.setup_dir = tls_port, d
        m.start()
        try:
            c = connected(m, A)
            c.close()
            c = agent(m)
            c.close()
        finally:
            m.stop()
        assert (d / "data" / "mosquitto.db").exists()  # it could write its persistence
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("over_tls", [False, True])
def test_the_agents_own_client_holds_its_shard_sessions(
    tmp_path: pathlib.Path, over_tls: bool
) -> None:
    """The agent (agent.sources.mqtt, two shard client ids as agent/cluster.py names them)
    on its loopback listener, and over the agents' TLS listener verifying the CA: connected,
    subscribed (the dropped-messages topic too) and fed by a station over TLS."""
    from agent.cluster import shard_client_id
    from agent.sources.mqtt import DROPPED_TOPIC, BrokerConfig, Delivery, MqttSource

    m = Mosquitto.deployment(tmp_path, stations=[A], agent_tls=over_tls)
    assert m.setup_dir is not None
    m.start()
    got: dict[str, list[tuple[str, bytes]]] = {}

    async def main() -> None:
        srcs = []
        for k in range(2):
            cid = shard_client_id(AGENT_ID, k)
            got[cid] = []

            def on_msg(topic: str, payload: bytes, d: Delivery, cid: str = cid) -> None:
                got[cid].append((topic, payload))
                srcs[int(cid[-2:])].ack([d])

            cfg = BrokerConfig(
                host="localhost" if over_tls else "127.0.0.1",
                port=(m.agent_tls_port or 0) if over_tls else m.port,
                user="agent",
                password=pw(m, "agent"),
                tls=over_tls,
                tls_ca=str(m.setup_dir / "ca.crt") if over_tls else None,
                client_id=cid,
            )
            srcs.append(MqttSource(cfg, on_msg))
        tasks = [asyncio.create_task(s.run()) for s in srcs]
        try:
            for s in srcs:
                await asyncio.wait_for(s.connected.wait(), 10)
                assert not s.counters.get("sys_refused")
            st = await asyncio.to_thread(connected, m, A)
            await asyncio.to_thread(st.publish, f"stations/{A}/telemetry", b"t1")
            st.close()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not all(len(g) >= 2 for g in got.values()):
                await asyncio.sleep(0.02)
        finally:
            for s in srcs:
                s.stop()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        m.stop()
    assert list(got) == [f"{AGENT_ID}-shard-00", f"{AGENT_ID}-shard-01"]
    for g in got.values():
        # the broker's dropped count (retained $SYS, read by the agent's ACL) and the station's
        assert sorted(g) == [(DROPPED_TOPIC, b"0"), (f"stations/{A}/telemetry", b"t1")]


# --- client certificates (mTLS) -----------------------------------------------------------


@pytest.fixture
def mtls_broker(tmp_path: pathlib.Path) -> Iterator[Mosquitto]:
    m = Mosquitto.deployment(tmp_path, stations=[A, B], mtls=True)
    m.start()
    try:
        yield m
    finally:
        m.stop()


def cert_client(
    m: Mosquitto, sid: str, *, cert_of: str | None = None, ca: str | None = None
) -> Client | ssl.SSLError | OSError:
    """A station on the TLS listener with the client certificate issued to `cert_of`
    (default: sid's; "" for none), claiming user name sid; the handshake error if it fails."""
    assert m.setup_dir is not None
    owner = sid if cert_of is None else cert_of
    d = pathlib.Path(ca) if ca else m.setup_dir / "clients"
    cert = (d / f"{owner}.crt", d / f"{owner}.key") if owner else None
    try:
        return Client(m, sid, cert=cert, connack_s=5)
    except (ssl.SSLError, OSError) as e:  # the handshake refused, or closed before CONNACK
        return e


def test_mtls_station_logs_in_with_its_certificate_only(mtls_broker: Mosquitto) -> None:
    m = mtls_broker
    assert m.setup_dir is not None
    mode = stat.S_IMODE((m.setup_dir / "clients" / f"{A}.key").stat().st_mode)
    assert mode == 0o600
    a = cert_client(m, A)
    assert isinstance(a, Client) and a.rc == 0
    ag = agent(m)
    try:
        ag.subscribe("stations/#")
        a.publish(f"stations/{A}/telemetry", b"mine")
        # the certificate is the identity: A's certificate claiming B's name still
        # publishes only as A (user name from the certificate, ACL %u)
        a2 = cert_client(m, B, cert_of=A)
        assert isinstance(a2, Client) and a2.rc == 0
        a2.publish(f"stations/{B}/telemetry", b"forged")
        a2.close()
        ag.wait_for(1)
        settle()
        assert ag.got == [(f"stations/{A}/telemetry", b"mine")]
    finally:
        a.close()
        ag.close()
    # no certificate: refused at the handshake, whatever the password
    none = cert_client(m, A, cert_of="")
    assert not isinstance(none, Client) or none.rc != 0


def test_mtls_certificate_from_another_ca_is_refused(
    mtls_broker: Mosquitto, tmp_path: pathlib.Path
) -> None:
    other = tmp_path / "other"
    broker_setup.init(other, broker_setup.Options(stations=[A], mtls=True))
    r = cert_client(mtls_broker, A, ca=str(other / "clients"))
    assert not isinstance(r, Client) or r.rc != 0
    ok = cert_client(mtls_broker, A)  # positive control
    assert isinstance(ok, Client) and ok.rc == 0
    ok.close()


def test_mtls_revoked_certificate_is_refused_after_reload(
    mtls_broker: Mosquitto, tmp_path: pathlib.Path
) -> None:
    m = mtls_broker
    assert m.setup_dir is not None and m.proc is not None
    keep = tmp_path / "keep"  # what a thief of the board would still hold
    keep.mkdir()
    for f in (f"{B}.crt", f"{B}.key"):
        shutil.copy(m.setup_dir / "clients" / f, keep / f)
    assert stationctl(["broker", "revoke-station", "--dir", str(m.setup_dir), B]) == 0
    assert not (m.setup_dir / "clients" / f"{B}.key").exists()
    rows = [
        ln.split("\t") for ln in (m.setup_dir / "clients" / "index.tsv").read_text().splitlines()
    ]
    assert [r[1] for r in rows[1:] if r[3]] == [B]  # below the header
    os.kill(m.proc.pid, signal.SIGHUP)
    time.sleep(1.0)
    r = cert_client(m, B, ca=str(keep))
    assert not isinstance(r, Client) or r.rc != 0
    ok = cert_client(m, A)  # the CRL names B's certificate only
    assert isinstance(ok, Client) and ok.rc == 0
    ok.close()
    # a new certificate for the re-commissioned board works
    assert stationctl(["broker", "issue-cert", "--dir", str(m.setup_dir), B]) == 0
    os.kill(m.proc.pid, signal.SIGHUP)
    time.sleep(1.0)
    again = cert_client(m, B)
    assert isinstance(again, Client) and again.rc == 0
    again.close()


def test_issue_cert_needs_an_mtls_deployment(broker: Mosquitto) -> None:
    assert broker.setup_dir is not None
    with pytest.raises(broker_setup.SetupError, match="client certificates"):
        broker_setup.issue_cert(broker.setup_dir, A)


# --- stations on loopback (demos and tests): the same rules in plain MQTT -----------------


def test_loopback_station_listener_keeps_the_station_rules(tmp_path: pathlib.Path) -> None:
    m = Mosquitto.deployment(tmp_path, stations=[A, B], station_local=True)
    m.start()
    try:
        sp = m.station_port
        assert sp is not None
        conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
        assert f"listener {sp} 127.0.0.1" in conf
        for user, password in ((None, None), ("agent", m.password("agent")), (A, "wrong")):
            c = Client(m, user, password, tls=False, port=sp)
            assert c.rc in REFUSED, user
            c.close()
        ag = agent(m)
        a = Client(m, A, m.password(A), tls=False, port=sp)
        try:
            assert a.rc == 0
            ag.subscribe("stations/#")
            a.publish(f"stations/{B}/telemetry", b"forged")
            a.publish(f"stations/{A}/telemetry", b"mine")
            ag.wait_for(1)
            settle()
            assert ag.got == [(f"stations/{A}/telemetry", b"mine")]
            # client id = user name: a second login as A, whatever id it asks for, takes
            # A's place (and only A's)
            a2 = Client(m, A, m.password(A), tls=False, port=sp, client_id=AGENT_ID)
            deadline = time.monotonic() + 5
            while a.c.is_connected() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not a.c.is_connected() and ag.c.is_connected()
            a2.close()
        finally:
            a.close()
            ag.close()
        # a deployment already there is reused, its ports read back from its configuration
        again = Mosquitto.deployment(tmp_path, stations=[])
        assert (again.port, again.tls_port, again.station_port) == (m.port, m.tls_port, sp)
    finally:
        m.stop()
