"""A private Mosquitto broker on a free loopback port, for tests, benches and the demo.

It can be stopped and restarted on the same port with its persistence file kept, which is
how tests simulate a broker outage. Configuration follows CONTRACT §5: persistence on and
queues sized for a day of backlog.

`Mosquitto.deployment(...)` runs the configuration `stationctl broker init` writes (accounts,
ACLs, TLS, client id bound to the station's name): the demo's broker and every test about
the link. `Mosquitto(...)` writes a minimal one-listener configuration: with a password
file, or anonymous only when asked with `insecure=True` (tests and benches of the agent's
logic on loopback, where the broker's rules are not what is tested).
"""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


def find_mosquitto() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and os.path.exists(cand):
            return cand
    raise RuntimeError("mosquitto is not installed: run `make setup` (Debian package mosquitto)")


def _ephemeral_low() -> int:
    try:
        return int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the kernel's ephemeral range. A port the kernel
    hands out (bind to 0) comes from that range, which every outgoing connection's local
    end draws from too: a broker stopped for an outage test and started again on its port
    found it taken ("Address already in use") by some other test's client meanwhile."""
    lo = _ephemeral_low()
    if lo > 21_000:
        rng = random.SystemRandom()
        for _ in range(100):
            port = rng.randrange(20_000, lo)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, log: pathlib.Path, what: str, timeout: float
) -> None:
    """Until a broker process accepts connections on its port; its log tail if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def dies_with_parent(cmd: list[str]) -> list[str]:
    """`cmd`, run so that the kernel kills it when the process that starts it dies
    (PR_SET_PDEATHSIG, set by util-linux's setpriv before it execs `cmd`). A test or bench
    that dies by SIGKILL or a segfault never reaches its `finally`: its broker lived on,
    saving a backlog's persistence file every second and taking disk and CPU from every
    later run on the machine. Only from the main thread: the signal follows the thread that
    started the child, and a worker thread can end before the broker should."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return cmd
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd]


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Ask a broker to stop (it saves its persistence), killing it after 10 s."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Accounts:
    """How clients log in to a locked-down deployment broker: stations with their own
    account on `station_port`; a fleet tool (the rig's monitor: reads the fleet, sends
    commands) with the agent-side account `tool` on the broker's agent port."""

    station_port: int
    station_password: Callable[[str], str]
    tool: tuple[str, str]


class Mosquitto:
    """Start with `start()`, stop with `stop()` (SIGTERM, persistence saved) or `kill()`."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        *,
        password_file: str | None = None,
        acl_file: str | None = None,
        max_queued: int = 1_000_000,
        config: str | os.PathLike[str] | None = None,
        insecure: bool = False,
    ) -> None:
        """`config`: start from this configuration file instead of writing one; `port` is
        then the port it listens on that `start()` waits for (required). Without a config
        or a password file, anonymous access must be asked for (`insecure`)."""
        self.dir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="mosq-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls_port: int | None = None
        self.agent_tls_port: int | None = None
        self.station_port: int | None = None  # a deployment's plain loopback station listener
        self.setup_dir: pathlib.Path | None = None
        if config is not None:
            if port is None:
                raise ValueError("a configuration file needs the port it listens on")
            self.port = port
            self.conf = pathlib.Path(config)
            return
        if not (password_file or insecure):
            raise ValueError("an anonymous broker needs insecure=True (or a password file)")
        self.port = port or free_port()
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            f"max_queued_messages {max_queued}",
            "max_queued_bytes 0",
            "max_inflight_messages 100",
            "set_tcp_nodelay true",  # as a deployment's (tools/flash/broker_setup.py)
            "message_size_limit 0",
            "persistent_client_expiration 7d",
            "sys_interval 1",  # $SYS/broker/publish/messages/dropped, which the agent watches
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to user mosquitto, who can't write here
        if password_file:
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if acl_file:
            lines.append(f"acl_file {acl_file}")
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    @classmethod
    def deployment(
        cls,
        workdir: str | os.PathLike[str] | None = None,
        *,
        stations: list[str],
        agent_tls: bool = False,
        station_local: bool = False,
        mtls: bool = False,
        fleet_size: int = 0,
    ) -> "Mosquitto":
        """A broker from `stationctl broker init`'s configuration (tools/flash/broker_setup):
        TLS for the stations on `tls_port`, the agent's plain loopback listener on `port`,
        accounts and passwords in `setup_dir` (passwords/…), free ports, logging to stderr;
        with `agent_tls`, the agents' TLS listener too (`agent_tls_port`); with
        `station_local`, the stations' rules in plain MQTT on loopback (`station_port`);
        with `mtls`, stations log in with client certificates (clients/<sid>.crt).
        An existing deployment in `workdir`/broker is reused (ports as it has them)."""
        from tools.flash import broker_setup

        base = pathlib.Path(workdir or tempfile.mkdtemp(prefix="mosq-"))
        setup = base / "broker"
        if (setup / broker_setup.CONF).exists():
            return cls._reuse(base, setup)
        tls_port, local_port = free_port(), free_port()
        opts = broker_setup.Options(
            stations=list(stations),
            tls_port=tls_port,
            local_port=local_port,
            agent_tls_port=free_port() if agent_tls else 0,
            station_local_port=free_port() if station_local else 0,
            mtls=mtls,
            fleet_size=fleet_size,
            # as root it drops to user mosquitto, who cannot reach a private temp dir
            run_as="root" if os.geteuid() == 0 else "mosquitto",
            log_dest="stderr",
        )
        out = broker_setup.init(setup, opts)
        m = cls(base, local_port, config=out["conf"])
        m.tls_port = tls_port
        m.agent_tls_port = opts.agent_tls_port or None
        m.station_port = opts.station_local_port or None
        m.setup_dir = setup
        return m

    @classmethod
    def _reuse(cls, base: pathlib.Path, setup: pathlib.Path) -> "Mosquitto":
        """The deployment already in `setup`: its listeners read back from its config (the
        agents' loopback one is the last plain listener on 127.0.0.1, as render_conf
        writes them)."""
        from tools.flash import broker_setup

        conf = setup / broker_setup.CONF
        listeners: list[tuple[int, str, list[str]]] = []
        for ln in conf.read_text().splitlines():
            w = ln.split()
            if w[:1] == ["listener"]:
                listeners.append((int(w[1]), w[2] if len(w) > 2 else "", []))
            elif listeners and w:
                listeners[-1][2].append(w[0])
        plain = [(p, opts) for p, host, opts in listeners if host and "certfile" not in opts]
        m = cls(base, plain[-1][0], config=conf)
        m.tls_port = listeners[0][0]
        stations = [p for p, opts in plain if "use_username_as_clientid" in opts]
        m.station_port = stations[0] if stations else None
        tls_agents = [p for p, _h, opts in listeners[1:] if "certfile" in opts]
        m.agent_tls_port = tls_agents[0] if tls_agents else None
        m.setup_dir = setup
        return m

    def password(self, user: str) -> str:
        """A deployment account's generated password (station ids are upper case)."""
        if self.setup_dir is None:
            raise ValueError("not a deployment broker: it has no accounts")
        sub = "stations/" if user.isupper() else ""
        return (self.setup_dir / "passwords" / f"{sub}{user}").read_text().strip()

    def accounts(self) -> Accounts:
        """Logins for a fleet on this deployment (made with `station_local`)."""
        if self.station_port is None:
            raise ValueError("no loopback station listener (deployment(station_local=True))")
        return Accounts(self.station_port, self.station_login, ("agent", self.password("agent")))

    def station_login(self, sid: str) -> str:
        """sid's password, its account added first when it has none."""
        try:
            return self.password(sid)
        except FileNotFoundError:
            return self.add_station(sid)

    def add_station(self, sid: str) -> str:
        """A station account (a fresh password, returned), live: the broker re-reads its
        password file (SIGHUP) when it is running."""
        from tools.flash import broker_setup

        if self.setup_dir is None:
            raise ValueError("not a deployment broker: it has no accounts")
        f = broker_setup.add_station(self.setup_dir, sid)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
        return f.read_text().strip()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            return
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            dies_with_parent([find_mosquitto(), "-c", str(self.conf)]),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        wait_listening(self.proc, self.port, self.log, "mosquitto", timeout)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "Mosquitto":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
