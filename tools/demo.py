"""`stationctl demo`: a private broker, a fleet of virtual stations running the real firmware
on MicroPython against the rig simulators, the agent on SQLite and the dashboard, in one
process tree; Ctrl-C stops it all and leaves the database consistent.

    demo = Demo(DemoConfig(stations=3, slots=4, workdir=tmp, port=0))
    demo.start()          # returns when the dashboard answers; demo.url, demo.db_url
    demo.fleet.offline(sid); demo.fleet.online(sid); demo.fleet.station(sid).rig.remove(1)
    demo.stop()           # stations, agent (flushes, closes), dashboard, broker

Threads: one asyncio loop runs the agent (agent/service.py) and the dashboard (uvicorn in
the same loop, as inside `stationctl agent`); the fleet (tools/fleet.py) runs each station
as a MicroPython process against its own rig (one RigHost thread for all), riders swapping
batteries, and restarts a firmware that exits.

Time acceleration is the fleet's: the rigs' physics and the stations' uptime run `accel`
times faster, and the fleet sets each station's clock to the simulated time, so records,
"today" and the energy charts follow the simulated days (accel 60: a day in 24 minutes)
while the live view follows the real clock.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import pathlib
import secrets
import shutil
import sqlite3
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

from agent.config import AgentConfig, DbConfig, IngestConfig, OcppConfig
from agent.dashboard import DashboardServer, Live, make_app
from agent.dashboard.auth import Auth, ensure_users_db
from agent.dashboard.users import UserStore
from agent.keys import KeyStore
from agent.service import Service
from agent.sources.mqtt import BrokerConfig
from tools import embedded_broker
from tools.embedded_broker import EmbeddedBroker
from tools.fleet import Fleet
from tools.mosquitto import Accounts, Mosquitto, find_mosquitto
from tools.ocpp_fleet import OCPP_STATE_FILE, OcppFleet

log = logging.getLogger(__name__)


LOCK_FILE = "demo.lock"
ADMIN_PASSWORD_FILE = "dashboard-admin.password"


class DemoError(Exception):
    """The demo cannot start: a one-line reason for the user."""


class DemoFolderError(DemoError):
    """The workdir cannot be used as asked (another layout, another demo in it): bad usage."""


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    stations: int = 8
    slots: int = 8
    accel: float = 60.0
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port (also taken when this one is busy)
    workdir: pathlib.Path = pathlib.Path("var/demo")
    broker: str | None = None  # mqtt://host:port of a broker to use instead of our own
    telemetry_s: int = 1
    seed: int = 1
    fault_rate: float = 0.0  # per link transaction, spread over the rig's fault kinds
    fresh: bool = False  # wipe the workdir first
    sid_prefix: str = "KH-DEMO"
    insecure: bool = False  # an anonymous broker without ACLs (said in the banner)
    ocpp: int = 2  # simulated OCPP chargers beside the stations (CONTRACT §11)

    def __post_init__(self) -> None:
        if not 1 <= self.stations <= 500:
            raise ValueError("stations must be 1..500")
        if not 1 <= self.slots <= 16:
            raise ValueError("slots must be 1..16 (CONTRACT §1)")
        if not 1 <= self.accel <= 10_000:
            raise ValueError("accel must be 1..10000")
        if not 1 <= self.telemetry_s <= 3600:
            raise ValueError("telemetry_s must be 1..3600")
        if not 0 <= self.fault_rate < 1:
            raise ValueError("fault_rate must be in [0, 1)")
        if not 0 <= self.port <= 65535:
            raise ValueError("bad port")
        if not 0 <= self.ocpp <= 100:
            raise ValueError("ocpp must be 0..100")


def parse_broker(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url if "://" in url else "mqtt://" + url)
    if u.scheme not in ("mqtt", "tcp") or not u.hostname:
        raise ValueError(f"broker URL must be mqtt://HOST[:PORT], not {url!r}")
    return u.hostname, u.port or 1883


def _read_json(p: pathlib.Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# ---- the whole demo -------------------------------------------------------------------------


class Demo:
    """Broker, fleet, agent and dashboard. `start()` blocks until all run; `stop()` too."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.workdir = cfg.workdir.resolve()
        self.db_path = self.workdir / "agent.db"
        self.db_url = "sqlite:///" + str(self.db_path)
        self.url = ""
        self.broker_url = ""
        self.broker_note = ""
        self.fleet: Fleet | None = None
        self._keys: KeyStore | None = None
        self.service: Service | None = None
        self.summary: dict[str, Any] = {}
        self._mosq: Mosquitto | EmbeddedBroker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_ev: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port_note = ""
        self._lock_fd: int | None = None  # held while this demo owns its workdir
        self.ocpp_fleet: OcppFleet | None = None
        self.ocpp_url = ""

    # ---- control (any thread) -------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> None:
        self._lock()
        try:
            self._prepare()
        except BaseException:
            self._unlock()
            raise
        self._thread = threading.Thread(target=self._thread_main, name="demo-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise DemoError(f"the demo did not start within {timeout:.0f} s")
        if self._error is not None:
            self._thread.join(60)
            self._unlock()
            err = self._error
            raise err if isinstance(err, DemoError) else DemoError(f"{type(err).__name__}: {err}")

    def stop(self) -> None:
        """Stop everything (idempotent). The fleet first, so its last words are stored."""
        self.halt()
        loop, ev = self._loop, self._stop_ev
        if loop is not None and ev is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(120)
            self._thread = None
        self._unlock()

    def _lock(self) -> None:
        """One demo per workdir: a second one would run the same stations (same ids,
        flash and boot counters) twice against one database."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DemoFolderError(
                f"another demo is running in {self.workdir} (pid {pid}): stop it, or use "
                "another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the kernel drops the lock, even after a SIGKILL
            self._lock_fd = None

    def halt(self) -> None:
        """No more riders and no more restarts, at once (safe from a signal handler).
        Ctrl-C in a terminal reaches the stations too (they share our process group):
        the fleet must not restart them while the demo stops."""
        stop = getattr(self.fleet, "_stop", None)  # tools/fleet.py's scenario/supervisor flag
        if isinstance(stop, threading.Event):
            stop.set()

    # ---- set-up ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        c = self.cfg
        if c.fresh:  # everything but the lock this demo holds
            for p in self.workdir.iterdir():
                if p.name == LOCK_FILE:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        layout = {"stations": c.stations, "slots": c.slots, "sid_prefix": c.sid_prefix}
        meta = self.workdir / "demo.json"
        old = _read_json(meta)
        if old is not None and old.get("layout") != layout:
            raise DemoFolderError(
                f"{self.workdir} holds a demo of {old.get('layout')}; use --fresh to start "
                f"over or another --workdir"
            )
        if self.db_path.exists():
            for f in (self.db_path, *self.workdir.glob("agent.db-*")):
                f.chmod(0o600)  # its own, made before databases were created private
            # the demo's own database, from an earlier version of the program: brought up to
            # this schema in place (an agent on a database of its own is told to run
            # `stationctl db upgrade` instead)
            from agent.store import Store
            from agent.store.sql import SchemaError

            try:
                Store(str(self.db_path), create=False, upgrade=True).close()
            except (SchemaError, FileNotFoundError) as e:
                raise DemoError(f"{self.db_path}: {e}; use --fresh to start over") from None
        meta.write_text(
            json.dumps(
                {"layout": layout, "config": asdict(c) | {"workdir": str(self.workdir)}},
                indent=1,
                default=str,
            )
            + "\n"
        )

    def _broker(self) -> tuple[str, int]:
        if self.cfg.broker:
            host, port = parse_broker(self.cfg.broker)
            self.broker_note = "given"
            return host, port
        try:
            if os.environ.get("STATIONCTL_NO_MOSQUITTO"):  # tests of the fallback
                raise RuntimeError("told not to use Mosquitto")
            find_mosquitto()
        except RuntimeError:
            if not embedded_broker.available():
                raise DemoError(
                    "mosquitto is not installed: run `make setup` (Debian package mosquitto), "
                    "or pass --broker mqtt://HOST:PORT"
                ) from None
            # only where Mosquitto cannot be had, and said out loud
            log.warning(
                "Mosquitto not found: falling back to the embedded pure-Python broker "
                "(amqtt; slow, and it has lost QoS 0 backlogs). Run `make setup` for Mosquitto."
            )
            self._mosq = embedded_broker.EmbeddedBroker(self.workdir / "amqtt")
            self._mosq.start()
            self.broker_note = (
                "embedded amqtt fallback: Mosquitto not found, install it with `make setup`"
            )
            return "127.0.0.1", self._mosq.port
        if self.cfg.insecure:
            self._mosq = Mosquitto(self.workdir / "mosquitto", insecure=True)
            self._mosq.start()
            self.broker_note = "private Mosquitto, INSECURE: anonymous, no ACL (--insecure)"
            return "127.0.0.1", self._mosq.port
        # the deployment's configuration (stationctl broker init): an account per station,
        # the ACL, client id = station id, the agent on a listener of its own; the stations
        # reach it in plain MQTT on loopback (TLS 8883 is there for boards)
        self._mosq = Mosquitto.deployment(
            self.workdir / "mosquitto",
            stations=self._sids(),
            station_local=True,
            fleet_size=self.cfg.stations,
        )
        for sid in self._sids():  # a demo restarted with more stations
            self._mosq.station_login(sid)
        self._mosq.start()
        self.broker_note = (
            f"private Mosquitto: an account per station, ACL; config {self._mosq.conf}"
        )
        return "127.0.0.1", self._mosq.port

    def _auth(self) -> Auth:
        """Login for anyone not on this host (`login = "remote"`): the demo's own admin
        account, its password kept in the workdir (0600) and shown in the banner."""
        pw_file = self.workdir / ADMIN_PASSWORD_FILE
        if not pw_file.exists():
            fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(12) + "\n")
        users = self.workdir / "users.db"
        ensure_users_db(users, pw_file.read_text().strip())
        return Auth(UserStore.open(users), mode="remote", local_role="operator")

    def _sids(self) -> list[str]:
        return [f"{self.cfg.sid_prefix}-{i + 1:04d}" for i in range(self.cfg.stations)]

    def _logins(self) -> tuple[Accounts | None, tuple[str, str] | None]:
        """(the fleet's accounts, the agent's login) on our own locked-down broker."""
        m = self._mosq
        if isinstance(m, Mosquitto) and m.setup_dir is not None:
            return m.accounts(), ("agent", m.password("agent"))
        return None, None

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported to start() or logged
            if not self._ready.is_set():
                self._error = e
            else:
                log.exception("demo loop failed")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_ev = asyncio.Event()
        c = self.cfg
        server: DashboardServer | None = None
        svc_task: asyncio.Task[None] | None = None
        svc_stop = asyncio.Event()
        try:
            host, port = await loop.run_in_executor(None, self._broker)
            self.broker_url = f"mqtt://{host}:{port}"
            accounts, login = self._logins()
            user, password = login or (None, None)
            acfg = AgentConfig(
                db=DbConfig(url=self.db_url, synchronous="normal"),
                broker=BrokerConfig(
                    host=host,
                    port=port,
                    user=user,
                    password=password,
                    client_id=f"stationctl-demo-{secrets.token_hex(3)}"
                    if c.broker
                    else "stationctl-demo",
                ),
                ingest=IngestConfig(stats_interval_s=600.0),
                ocpp=OcppConfig(listen="127.0.0.1:0") if c.ocpp else None,
            )
            live = Live(self.db_url)
            self.service = svc = Service(acfg, on_commit=lambda rows: live.nudge())
            svc_task = asyncio.create_task(svc.run(svc_stop))
            server = await self._serve(make_app(self.db_url, live=live, auth=self._auth()))
            self.url = server.url
            self._keys = KeyStore(self.db_url)
            self.fleet = Fleet(
                c.stations,
                c.slots,
                host,
                port,
                self.workdir / "fleet",
                keys=self._keys,
                accel=c.accel,
                fault_rate=c.fault_rate,
                seed=c.seed,
                telemetry_s=c.telemetry_s,
                sid_prefix=c.sid_prefix + "-",
                accounts=accounts,
            )
            await loop.run_in_executor(None, self.fleet.start)
            if c.ocpp:
                await self._ocpp_fleet(svc)
            self._ready.set()
            done, _ = await asyncio.wait(
                [asyncio.create_task(self._stop_ev.wait()), svc_task],
                return_when=asyncio.FIRST_COMPLETED,
            )
            if svc_task in done:
                svc_task.result()
        finally:
            await self._shutdown(server, svc_task, svc_stop)

    async def _ocpp_fleet(self, svc: Service) -> None:
        """The simulated OCPP chargers, once the agent's endpoint listens."""
        for _ in range(400):
            if svc.ocpp is not None and svc.ocpp.port:
                break
            await asyncio.sleep(0.05)
        if svc.ocpp is None:
            raise DemoError("the agent's OCPP endpoint did not start")
        self.ocpp_url = f"ws://127.0.0.1:{svc.ocpp.port}"
        fleet = OcppFleet(
            self.cfg.ocpp,
            self.ocpp_url,
            db=self.db_url,
            accel=self.cfg.accel,
            seed=self.cfg.seed,
            sid_prefix=self.cfg.sid_prefix + "-OCPP-",
            truth_path=self.workdir / "ocpp_ground_truth.json",
            # the chargers carry on across restarts, on the stations' simulated clock
            state_path=self.workdir / OCPP_STATE_FILE,
            clock_ms=self.fleet.clock.unix_ms() if self.fleet is not None else None,
        )
        await asyncio.get_running_loop().run_in_executor(None, fleet.start)
        self.ocpp_fleet = fleet

    async def _serve(self, app: Any) -> DashboardServer:
        server = DashboardServer(app, self.cfg.host, self.cfg.port)
        try:
            await server.start()
        except OSError as e:
            if self.cfg.port == 0:
                raise DemoError(f"cannot listen on {self.cfg.host}: {e}") from None
            self.port_note = f"port {self.cfg.port} is busy ({e.strerror}); took a free one"
            server = DashboardServer(app, self.cfg.host, 0)
            await server.start()
        return server

    async def _shutdown(
        self,
        server: DashboardServer | None,
        svc_task: asyncio.Task[None] | None,
        svc_stop: asyncio.Event,
    ) -> None:
        loop = asyncio.get_running_loop()
        if self.ocpp_fleet is not None:
            await loop.run_in_executor(None, self.ocpp_fleet.stop)
        if self.fleet is not None:
            await loop.run_in_executor(None, self.fleet.stop)
            await asyncio.sleep(0.5)  # the last wills and messages reach the agent
            await loop.run_in_executor(None, self._sweep)
        if self._keys is not None:
            self._keys.close()
        if server is not None:
            await server.stop()
        if svc_task is not None:
            svc_stop.set()
            try:
                await asyncio.wait_for(svc_task, 60)  # commits, acknowledges, closes
            except Exception:
                log.exception("agent stopped with an error")
        if self._mosq is not None:
            await loop.run_in_executor(None, self._mosq.stop)
        self.summary = await loop.run_in_executor(None, self._check_db)

    def _sweep(self) -> None:
        """A firmware the fleet relaunched in the last instant (a restart already under
        way when the stop came) is stopped too: nothing outlives the demo."""
        if self.fleet is None:
            return
        for _ in range(2):
            for st in self.fleet.stations:
                if st.proc.alive:
                    log.warning("%s: stopping a firmware started during shutdown", st.sid)
                    st.proc.stop()
            time.sleep(0.5)

    def _check_db(self) -> dict[str, Any]:
        if not self.db_path.exists():
            return {}
        db = sqlite3.connect(self.db_path)
        try:
            ok = db.execute("PRAGMA integrity_check").fetchone()[0]
            n = {
                t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("raw", "records", "quarantine", "status")
            }
        finally:
            db.close()
        return {"integrity": ok, **n}

    def banner(self) -> str:
        c = self.cfg
        day_min = 24 * 60 / c.accel
        lines = [
            (
                f"stationctl demo: {c.stations} stations × {c.slots} slots running the real "
                f"firmware on MicroPython (accel ×{c.accel:g}: a day of charging in "
                f"{day_min:.0f} min)"
            ),
            f"  dashboard  {self.url} (from another address: log in as admin, password "
            f"in {self.workdir / ADMIN_PASSWORD_FILE})",
            f"  broker     {self.broker_url} ({self.broker_note})",
            f"  database   {self.db_url}",
            *(
                [f"  OCPP       {c.ocpp} chargers (1.6J and 2.0.1) on {self.ocpp_url}"]
                if self.ocpp_url
                else []
            ),
            f"  terminal   stationctl watch --db {self.db_url}",
            f"  workdir    {self.workdir}",
        ]
        if self.port_note:
            lines.insert(1, f"  note       {self.port_note}")
        lines.append("Ctrl-C stops everything.")
        return "\n".join(lines)


def demo_env_ok() -> str | None:
    """Why the demo cannot run here, or None."""
    from tools.fwbuild import micropython_bin

    try:
        micropython_bin()
    except RuntimeError as e:
        return str(e)
    if not os.path.exists("/dev/ptmx"):
        return "no pseudo-terminals (/dev/ptmx) for the rig's serial links"
    return None
