"""The agent's configuration (TOML), on its own: read, checked, typed.

`load_config(path)` reads the file with `tomllib` and decodes it with msgspec into the
frozen dataclasses below (and the sections' own: `BrokerConfig` of the MQTT source,
`MeterParams` of the ledger). An unknown, missing or mistyped key stops the start with
its dotted name (`ConfigError`). Commands that only need the database URL or the metering
parameters import this module, not the service. See agent/config.example.toml.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

import msgspec

from agent.cluster import ClusterConfig
from agent.ledger import MeterParams
from agent.sources.mqtt import BrokerConfig

__all__ = [
    "AgentConfig",
    "BrokerConfig",
    "ClusterConfig",
    "ConfigError",
    "DashboardConfig",
    "DbConfig",
    "HealthConfig",
    "IngestConfig",
    "MeterParams",
    "MetersConfig",
    "load_config",
]


class ConfigError(ValueError):
    """A bad agent configuration: the message names the key."""


@dataclass(frozen=True, kw_only=True)
class DbConfig:
    url: str = "sqlite:///agent.db"
    synchronous: str = "full"  # sqlite: full (survives power loss) | normal (survives crashes)
    # the raw archive's segments (agent/archive; `stationctl archive seal`): beside a SQLite
    # file by default (<db>.archive/); a PostgreSQL database needs it once anything is sealed
    archive_dir: str | None = None

    def __post_init__(self) -> None:
        if self.synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be full or normal, not {self.synchronous!r}")


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    batch_max: int = 5000  # most messages in one commit (batches form by themselves)
    max_pending: int = 50_000  # stop reading the socket beyond this many uncommitted
    records_interval_ms: int = 500  # how often changed records are written
    records_sids_per_commit: int = 64  # stations whose records ride along one commit
    key_reload_s: float = 2.0  # how soon a revocation takes effect
    stats_interval_s: float = 60.0  # counters to the log
    # Python's full (oldest-generation) garbage collection walks every object, and the
    # metering state is large: left automatic it stalls the loop ~0.1 s at unpredictable
    # times. The agent runs it itself every gc_full_s instead (0: leave it automatic).
    gc_full_s: float = 300.0
    checkpoint_s: float = 1.0  # WAL checkpoints, off the commit path
    # Python's GIL switch interval while the agent runs: the loop (verify) and the database
    # thread (metering) trade the GIL at every SQLite call; Python's 5 ms default makes them
    # preempt each other mid-work. 50 ms measured 20-30 % more msg/s and a lower p99 on one
    # core (bench/bench_ingest.py, docs/agent.md)
    switch_interval_s: float = 0.05


@dataclass(frozen=True, kw_only=True)
class DashboardConfig:
    """[dashboard]: serve the operator dashboard (agent/dashboard) from the agent's loop.
    `login` (docs/dashboard.md, Login): "off" (loopback hosts only), "on" (everyone logs
    in) or "remote" (loopback clients are let in as `local_role`, others log in).
    `users_db`: accounts and acknowledgements (default: users.db beside a SQLite agent
    database; required with PostgreSQL once login is on)."""

    host: str = "127.0.0.1"
    port: int = 8080
    login: str = "off"
    local_role: str = "operator"
    users_db: str | None = None

    def __post_init__(self) -> None:
        if self.login not in ("off", "on", "remote"):
            raise ValueError(f"login must be off, on or remote, not {self.login!r}")
        if self.local_role not in ("viewer", "operator", "admin"):
            raise ValueError(
                f"local_role must be viewer, operator or admin, not {self.local_role!r}"
            )
        if self.login == "off" and not is_loopback(self.host):
            raise ValueError(
                f'login = "off" needs a loopback host, not {self.host!r}: '
                'set login = "on" (or "remote") to serve other machines'
            )


def is_loopback(host: str) -> bool:
    """An address (or "localhost") that only this machine can reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class HealthConfig:
    """[health]: `/healthz` and `/metrics` (agent/health.py) on a listener of their own, for
    an agent without `[dashboard]` (with one, they are served on the dashboard's port)."""

    host: str = "127.0.0.1"
    port: int = 9108


@dataclass(frozen=True, kw_only=True)
class CarbonConfig:
    """[carbon]: the parameter file of agent/ledger/carbon.py (None: its shipped example)."""

    params: str | None = None


@dataclass(frozen=True, kw_only=True)
class MetersConfig:
    """[meters]: the grid meter register's policy (agent/meters.py; docs/metering.md,
    "Meter register") for energy metered while a meter is past its calibration's due
    date: "discount" (credited less its accuracy class), "exclude" (not credited) or
    "none" (flagged only). The agent states it in its meter_overdue alarms; `stationctl
    export --config` applies it."""

    overdue_policy: str = "discount"

    def __post_init__(self) -> None:
        from agent.meters import POLICIES

        if self.overdue_policy not in POLICIES:
            raise ValueError(
                f"overdue_policy must be one of {', '.join(POLICIES)}, not {self.overdue_policy!r}"
            )


@dataclass(frozen=True, kw_only=True)
class OcppConfig:
    """[ocpp]: the endpoint for OCPP chargers (agent/ocpp/csms.py; CONTRACT §11)."""

    listen: str = "127.0.0.1:9000"  # host:port (port 0: any free one)
    tls_cert: str | None = None  # PEM; required off loopback (security profile 2)
    tls_key: str | None = None
    id_tags: tuple[str, ...] = ("*",)  # Authorize accepts these ("*": any)
    heartbeat_s: int = 300

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"ocpp.listen {self.listen!r} is not host:port")
        return host.strip("[]"), int(port)

    def loopback(self) -> bool:
        return self.host_port()[0] in ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    db: DbConfig = field(default_factory=DbConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    metering: MeterParams = field(default_factory=MeterParams)
    carbon_params: str | None = None  # path of the carbon parameters file
    dashboard: DashboardConfig | None = None  # None: no dashboard
    health: HealthConfig | None = None  # None: /healthz, /metrics only on the dashboard's port
    cluster: ClusterConfig | None = None  # None: the only agent on its database
    meters: MetersConfig = field(default_factory=MetersConfig)
    ocpp: OcppConfig | None = None  # None: no OCPP endpoint


# The file's shape: one table per section. `broker.password_file` and `carbon.params` are
# keys of the file only (read into broker.password and AgentConfig.carbon_params).
_SECTIONS: dict[str, type[Any]] = {
    "db": DbConfig,
    "broker": BrokerConfig,
    "ingest": IngestConfig,
    "metering": MeterParams,
    "carbon": CarbonConfig,
    "dashboard": DashboardConfig,
    "health": HealthConfig,
    "cluster": ClusterConfig,
    "meters": MetersConfig,
    "ocpp": OcppConfig,
}
_FILE_ONLY = {"broker": {"password_file"}}
_PATHS = {
    "broker": ("tls_ca", "tls_cert", "tls_key"),
    "carbon": ("params",),
    "db": ("archive_dir",),
    "dashboard": ("users_db",),
    "ocpp": ("tls_cert", "tls_key"),
}


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read the agent's TOML file. Relative paths in it (sqlite database, TLS files,
    password file, carbon parameters) are taken from the file's folder."""
    p = pathlib.Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: {e}") from None
    base = p.resolve().parent
    _check_keys(data)
    sections = {k: dict(v) for k, v in data.items()}
    broker = sections.get("broker", {})
    pw_file = broker.pop("password_file", None)
    if pw_file is not None:
        if "password" in broker:
            raise ConfigError("broker.password and broker.password_file are exclusive")
        if not isinstance(pw_file, str):
            raise ConfigError("broker.password_file must be str")
        try:
            broker["password"] = (base / pw_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"broker.password_file {base / pw_file}: {e.strerror}") from None
    for name, keys in _PATHS.items():
        t = sections.get(name, {})
        for k in keys:
            v = t.get(k)
            if isinstance(v, str) and v and not os.path.isabs(v):
                t[k] = str(base / v)
    dec = {k: _decode(k, v) for k, v in sections.items()}
    db: DbConfig = dec.get("db", DbConfig())
    db = dataclasses.replace(db, url=_db_url(db.url, base))
    b: BrokerConfig = dec.get("broker", BrokerConfig())
    if not b.prefix or "+" in b.prefix or "#" in b.prefix:
        raise ConfigError(f"broker.prefix {b.prefix!r} is not a topic prefix")
    carbon: CarbonConfig = dec.get("carbon", CarbonConfig())
    if carbon.params is not None and not os.path.exists(carbon.params):
        raise ConfigError(f"carbon.params: no file {carbon.params}")
    cluster: ClusterConfig | None = dec.get("cluster")
    if cluster is not None and not db.url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("[cluster] needs a PostgreSQL database (db.url = postgresql://…)")
    ocpp: OcppConfig | None = dec.get("ocpp")
    if ocpp is not None:
        _check_ocpp(ocpp, cluster)
    return AgentConfig(
        ocpp=ocpp,
        cluster=cluster,
        db=db,
        broker=b,
        ingest=dec.get("ingest", IngestConfig()),
        metering=dec.get("metering", MeterParams()),
        carbon_params=carbon.params,
        dashboard=dec.get("dashboard"),
        health=dec.get("health"),
        meters=dec.get("meters", MetersConfig()),
    )


def _check_ocpp(o: OcppConfig, cluster: ClusterConfig | None) -> None:
    try:
        o.host_port()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if bool(o.tls_cert) != bool(o.tls_key):
        raise ConfigError("ocpp.tls_cert and ocpp.tls_key go together")
    if not o.loopback() and not o.tls_cert:
        raise ConfigError(
            f"ocpp.listen {o.listen} is not loopback: OCPP security profile 2 needs TLS "
            "(ocpp.tls_cert, ocpp.tls_key)"
        )
    if cluster is not None:
        raise ConfigError(
            "[ocpp] runs on a single agent: several agents ([cluster]) do not share OCPP "
            "chargers yet (docs/ocpp.md)"
        )
    if o.heartbeat_s < 10:
        raise ConfigError("ocpp.heartbeat_s must be at least 10")


def _db_url(url: str, base: pathlib.Path) -> str:
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + str(base / url[len("sqlite:///") :])
    if "://" not in url and not os.path.isabs(url):
        return str(base / url)
    return url


def _check_keys(data: dict[str, Any]) -> None:
    """Every key of the file is one the sections know (msgspec ignores unknown fields of
    dataclasses, and a misspelt key must not pass as a default)."""
    for name, table in data.items():
        cls = _SECTIONS.get(name)
        if cls is None:
            raise ConfigError(f"unknown section or key {name!r}")
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table")
        known = {f.name for f in dataclasses.fields(cls)} | _FILE_ONLY.get(name, set())
        for k in table:
            if k not in known:
                raise ConfigError(f"unknown key {name}.{k}")


_AT = re.compile(r"^(.*) - at `\$\.?([^`]*)`$")
_EXPECTED = re.compile(r"^Expected `([^`]+)`, got `([^`]+)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`$")


def _decode(name: str, table: dict[str, Any]) -> Any:
    """One section into its dataclass; msgspec's error turned into one that names the key."""
    cls = _SECTIONS[name]
    try:
        return msgspec.convert(table, cls, strict=True)
    except msgspec.ValidationError as e:
        msg, where = str(e), ""
        m = _AT.match(msg)
        if m:
            msg, where = m.group(1), m.group(2)
        key = f"{name}.{where}" if where else name
        m = _EXPECTED.match(msg)
        if m:
            want = m.group(1).replace(" | null", "")
            raise ConfigError(f"{key} must be {want}, got {m.group(2)}") from None
        m = _MISSING.match(msg)
        if m:
            raise ConfigError(f"{key}.{m.group(1)} is missing") from None
        raise ConfigError(f"[{key}]: {msg}") from None
