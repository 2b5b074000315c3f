"""A complete Mosquitto 2.0 configuration for one deployment (CONTRACT §5, issue 14).

`init(DIR, stations, hosts)` writes into DIR:

    mosquitto.conf       the broker configuration (0644)
    ca.crt, ca.key       the deployment's CA (the station config pins ca.crt); ca.key 0600
    server.crt           the broker's certificate (SANs: the hosts), signed by the CA
    server.key           0640 root:<broker group> as root, else 0600
    stations.passwd      station accounts (user = station id), `$7$` PBKDF2-SHA512
    agents.passwd        the agent's and the operator's accounts
    stations.acl         pattern write stations/%u/#, pattern read stations/%u/cmd
    agents.acl           agent: read the fleet, write stations/+/cmd; operator: read only
    passwords/           each generated password in a file of its own (0600, dir 0700)
    data/                the broker's persistence (owned by the broker's user)

With `mtls` (client certificates, CONTRACT §5's option for large fleets), also:

    crl.pem              the revocation list the station listener checks (signed by the CA)
    clients/             one certificate and key per station (`issue_cert`), and
                         index.tsv: serial, station, expiry, revoked-at of each one issued

Two kinds of listener, so that no station account can reach the agent's sessions:

- stations: TLS on 8883, all interfaces, `use_username_as_clientid true` and only
  stations.passwd. A station's client id is its station id whatever it sends, so it can
  neither take over another client's session nor the agent's (`stationctl-agent`,
  `<id>-shard-NN`: lower case, which no station id is).
- agents: plain MQTT on 127.0.0.1 (the agent on the broker's host), optionally TLS on a
  second port for an agent on another host, without `use_username_as_clientid` (the agent
  chooses its client ids: one per shard session) and with only agents.passwd: a station's
  credentials are refused there.

Client ids are one namespace across listeners in Mosquitto, which is why the station
listener must force them; the agent listener may not, and a station cannot log in there.

For demos and tests on one host, `station_local_port` adds a third listener: the stations'
rules (accounts, ACL, client id = user name) in plain MQTT on 127.0.0.1 only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
import pwd
import re
import shlex
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

from tools.flash import broker, passwd

SID_RE = re.compile(r"^[A-Z0-9][A-Z0-9-]{2,31}$")
ACCOUNT_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")  # lower case: never a station id
DEFAULT_HOSTS = ("localhost", "127.0.0.1")

CONF = "mosquitto.conf"
CA_CRT, CA_KEY = "ca.crt", "ca.key"
SERVER_CRT, SERVER_KEY = "server.crt", "server.key"
STATIONS_PASSWD, AGENTS_PASSWD = "stations.passwd", "agents.passwd"
STATIONS_ACL, AGENTS_ACL = "stations.acl", "agents.acl"
PASSWORDS = "passwords"
DATA = "data"
CRL = "crl.pem"
CLIENTS = "clients"
INDEX = "index.tsv"


class SetupError(ValueError):
    """Bad input or a directory that cannot be used (the command's exit 2)."""


@dataclass
class Options:
    stations: list[str]
    hosts: list[str] = field(default_factory=lambda: list(DEFAULT_HOSTS))
    tls_port: int = 8883
    local_port: int = 1883  # plain MQTT, 127.0.0.1 only
    station_local_port: int = 0  # 0: none; else plain MQTT for stations on 127.0.0.1
    mtls: bool = False  # stations prove themselves with a client certificate (CN = sid)
    agent_tls_port: int = 0  # 0: no TLS listener for agents on other hosts
    agent_user: str = "agent"
    operator_user: str = "operator"
    fleet_size: int = 0  # queue sizing; 0: the number of stations (at least 1)
    telemetry_s: int = 10
    run_as: str = "mosquitto"  # the user Mosquitto drops to when started as root
    log_dest: str = "syslog"
    cert_days: int = 825


def check_sid(sid: str) -> str:
    if not SID_RE.match(sid):
        raise SetupError(f"bad station id {sid!r} (CONTRACT §1: ^[A-Z0-9][A-Z0-9-]{{2,31}}$)")
    return sid


# --- files and owners -------------------------------------------------------------------


def _owner(run_as: str) -> tuple[int, int] | None:
    """(uid, gid) of the broker's user when we are root and it exists, else None (leave
    ownership as it is: a broker started by this user reads its own files)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(run_as)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _write(path: pathlib.Path, data: bytes, mode: int) -> None:
    """A new file created with `mode` from the start (never briefly readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _secret_for_broker(path: pathlib.Path, owner: tuple[int, int] | None) -> None:
    """A file the broker must read and nobody else: 0640 root:<broker group> as root,
    else 0600 (the broker runs as the user that owns it)."""
    if owner is None:
        os.chmod(path, 0o600)
    else:
        os.chown(path, 0, owner[1])
        os.chmod(path, 0o640)


# --- certificates -----------------------------------------------------------------------


def _certs(opts: Options) -> tuple[bytes, bytes, bytes, bytes]:
    """(CA cert, CA key, server cert, server key) as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stations broker CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in opts.hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, opts.hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=opts.cert_days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    return (
        ca.public_bytes(pem),
        ca_key.private_bytes(pem, pkcs8, none),
        cert.public_bytes(pem),
        key.private_bytes(pem, pkcs8, none),
    )


# --- configuration ----------------------------------------------------------------------


def _load_ca(root: pathlib.Path) -> tuple[object, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = x509.load_pem_x509_certificate((root / CA_CRT).read_bytes())
    try:
        key = serialization.load_pem_private_key((root / CA_KEY).read_bytes(), None)
    except FileNotFoundError:
        raise SetupError(f"{root / CA_KEY} is needed to sign (kept by root alone)") from None
    return ca, key


def _index(root: pathlib.Path) -> list[list[str]]:
    """clients/index.tsv rows: serial (hex), sid, not-after (ISO), revoked-at ('' if not)."""
    p = root / CLIENTS / INDEX
    if not p.exists():
        return []
    return [ln.split("\t") for ln in p.read_text().splitlines() if ln and not ln.startswith("#")]


def _write_index(root: pathlib.Path, rows: list[list[str]]) -> None:
    head = "# serial\tstation\tnot_after\trevoked_at\n"
    tmp = root / CLIENTS / (INDEX + ".tmp")
    _write(tmp, (head + "".join("\t".join(r) + "\n" for r in rows)).encode(), 0o644)
    os.replace(tmp, root / CLIENTS / INDEX)


def _write_crl(root: pathlib.Path, rows: list[list[str]]) -> None:
    """crl.pem from the index: every revoked certificate, signed by the CA; valid for a
    year (re-written at every revocation; `stationctl broker crl` renews it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca, key = _load_ca(root)
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)  # type: ignore[attr-defined]
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=365))
    )
    for serial, _sid, _until, revoked in rows:
        if revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial, 16))
                .revocation_date(datetime.datetime.fromisoformat(revoked))
                .build()
            )
    crl = b.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    tmp = root / (CRL + ".tmp")
    _write(tmp, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    os.replace(tmp, root / CRL)


def issue_cert(
    d: str | os.PathLike[str], sid: str, days: int = 825
) -> tuple[pathlib.Path, pathlib.Path]:
    """A client certificate for station `sid` (CN = sid, the user name the broker takes
    from it), signed by the deployment's CA: (cert, key) under clients/, the key 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root = _dir(d)
    check_sid(sid)
    if not (root / CRL).exists():
        raise SetupError(f"{root} does not use client certificates (`broker init --mtls`)")
    ca, ca_key = _load_ca(root)
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    until = now + datetime.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sid)]))
        .issuer_name(ca.subject)  # type: ignore[attr-defined]
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out = root / CLIENTS
    out.mkdir(mode=0o700, exist_ok=True)
    crt_p, key_p = out / f"{sid}.crt", out / f"{sid}.key"
    pkcs8 = serialization.PrivateFormat.PKCS8
    _write(
        key_p,
        key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()),
        0o600,
    )
    _write(crt_p, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    rows = _index(root) + [[f"{serial:x}", sid, until.isoformat(), ""]]
    _write_index(root, rows)
    return crt_p, key_p


def revoke_certs(root: pathlib.Path, sid: str) -> int:
    """Put every unrevoked certificate issued to `sid` on the CRL; how many."""
    rows = _index(root)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    n = 0
    for r in rows:
        if r[1] == sid and not r[3]:
            r[3] = now
            n += 1
    if n:
        _write_index(root, rows)
        _write_crl(root, rows)
        f = root / CLIENTS / f"{sid}.key"
        if f.exists():
            f.unlink()
    return n


def render_conf(d: pathlib.Path, opts: Options) -> str:
    fleet = max(1, opts.fleet_size or len(opts.stations))
    day = broker.per_station_day(opts.telemetry_s)
    q = fleet * day

    def auth(pw: str, acl: str) -> list[str]:
        return ["allow_anonymous false", f"password_file {d / pw}", f"acl_file {d / acl}"]

    tls = [
        f"certfile {d / SERVER_CRT}",
        f"keyfile {d / SERVER_KEY}",
        "tls_version tlsv1.2",  # the oldest allowed; 1.3 is negotiated where both have it
    ]
    lines = [
        "# Mosquitto 2.0 configuration written by `stationctl broker init` (CONTRACT §5).",
        "# Regenerate rather than edit: add and revoke stations with",
        "# `stationctl broker add-station|revoke-station` (then SIGHUP the broker).",
        "",
        "# Each listener has its own accounts, ACL and client-id rule. Stations connect only",
        "# to the TLS listener, where use_username_as_clientid makes a station's client id its",
        "# station id whatever it asks for: it cannot take over the agent's session",
        "# (`stationctl-agent`, `<id>-shard-NN`) nor another station's. The agent needs",
        "# client ids of its own (one per shard session), so it has a listener without that",
        "# rule, on loopback (and optionally TLS on a second port) whose password file holds",
        "# only agent and operator accounts: a station's credentials are refused there.",
        "per_listener_settings true",
        "",
        "# stations: TLS on every interface",
        f"listener {opts.tls_port}",
        *tls,
        "use_username_as_clientid true",
    ]
    if opts.mtls:
        lines += [
            "# a station proves itself with its client certificate (CN = station id = user",
            "# name); no password. Revoked certificates are in the CRL (`revoke-station`).",
            f"cafile {d / CA_CRT}",
            "require_certificate true",
            "use_identity_as_username true",
            f"crlfile {d / CRL}",
            "allow_anonymous false",
            f"acl_file {d / STATIONS_ACL}",
        ]
    else:
        lines += auth(STATIONS_PASSWD, STATIONS_ACL)
    if opts.station_local_port:
        lines += [
            "",
            "# stations on this host (demos, tests): their rules, plain MQTT on loopback only",
            f"listener {opts.station_local_port} 127.0.0.1",
            "use_username_as_clientid true",
            *auth(STATIONS_PASSWD, STATIONS_ACL),
        ]
    lines += [
        "",
        "# agent and operator on this host: plain MQTT on loopback only",
        f"listener {opts.local_port} 127.0.0.1",
        *auth(AGENTS_PASSWD, AGENTS_ACL),
    ]
    if opts.agent_tls_port:
        lines += [
            "",
            "# agent and operator on other hosts: TLS, their accounts only",
            f"listener {opts.agent_tls_port}",
            *tls,
            *auth(AGENTS_PASSWD, AGENTS_ACL),
        ]
    lines += [
        "",
        "# Stations and the agent connect with clean_session=false: what a station publishes",
        "# while the agent is away waits in the agent's session(s). autosave every second: a",
        "# broker that crashes loses at most the last second of queued messages.",
        "persistence true",
        f"persistence_location {d / DATA}/",
        "autosave_interval 1",
        "persistent_client_expiration 14d",
        "# $SYS every 10 s: the agent alarms when broker/publish/messages/dropped grows",
        "sys_interval 10",
        "",
        f"# A day of backlog per agent session: {fleet} stations x {day} messages (telemetry",
        f"# every {opts.telemetry_s} s plus events), ~{broker.MSG_BYTES} bytes each. Each shard",
        "# session of a cluster of agents holds its own queue (agent/cluster.py).",
        f"max_queued_messages {q}",
        f"max_queued_bytes {q * broker.MSG_BYTES}",
        "max_inflight_messages 100",
        "# each message on its way at once: with Nagle's algorithm a small PUBLISH waited for",
        "# the TCP acknowledgement of the one before (p50 21 ms to the agent at 5,000 msg/s)",
        "set_tcp_nodelay true",
        "# a station payload is at most 4096 bytes (CONTRACT §5.1): room for topic and headers",
        "max_packet_size 8192",
        "",
        f"user {opts.run_as}",
        f"log_dest {opts.log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
    ]
    return "\n".join(lines) + "\n"


def stations_acl() -> str:
    return (
        "# Stations (TLS listener; user name = station id = client id). Each publishes only\n"
        "# under its own id (telemetry, event, status and its last will) and reads only its\n"
        "# own commands: not another station's, not the fleet's telemetry.\n"
        "pattern write stations/%u/#\n"
        "pattern read stations/%u/cmd\n"
    )


def agents_acl(agent: str, operator: str) -> str:
    return (
        "# The agent reads the fleet and the broker's dropped-message count, and may send\n"
        "# stations commands (signed: CONTRACT §5.4).\n"
        f"user {agent}\n"
        "topic read stations/#\n"
        "topic write stations/+/cmd\n"
        "topic read $SYS/broker/publish/messages/dropped\n"
        "\n"
        "# The operator reads the fleet and writes nothing.\n"
        f"user {operator}\n"
        "topic read stations/#\n"
        "topic read $SYS/#\n"
    )


def _hash_lines(pairs: Iterable[tuple[str, str]]) -> bytes:
    return "".join(f"{u}:{passwd.hash_password(p)}\n" for u, p in pairs).encode()


def _save_password(d: pathlib.Path, user: str, password: str, station: bool) -> pathlib.Path:
    sub = d / PASSWORDS / ("stations" if station else "")
    sub.mkdir(mode=0o700, parents=True, exist_ok=True)
    p = sub / user
    _write(p, (password + "\n").encode(), 0o600)
    return p


def init(d: str | os.PathLike[str], opts: Options) -> dict[str, pathlib.Path]:
    """Write the whole configuration into `d` (which must not hold one yet)."""
    root = pathlib.Path(d).resolve()
    stations = [check_sid(s) for s in opts.stations]
    if len(set(stations)) != len(stations):
        raise SetupError("a station id is given twice")
    for u in (opts.agent_user, opts.operator_user):
        if not ACCOUNT_RE.match(u):
            raise SetupError(f"bad account name {u!r} (lower case, never a station id)")
    if opts.agent_user == opts.operator_user:
        raise SetupError("the agent and operator accounts must differ")
    if not opts.hosts:
        raise SetupError("no host name for the server certificate")
    if (root / CONF).exists():
        raise SetupError(f"{root / CONF} exists: use another directory (or remove it)")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    owner = _owner(opts.run_as)

    ca, ca_key, crt, key = _certs(opts)
    _write(root / CA_CRT, ca, 0o644)
    _write(root / CA_KEY, ca_key, 0o600)  # the broker never needs it: root's alone
    _write(root / SERVER_CRT, crt, 0o644)
    _write(root / SERVER_KEY, key, 0o600)
    _secret_for_broker(root / SERVER_KEY, owner)

    agent_pw, operator_pw = passwd.new_password(), passwd.new_password()
    station_pws = [(s, passwd.new_password()) for s in stations]
    _write(
        root / AGENTS_PASSWD,
        _hash_lines([(opts.agent_user, agent_pw), (opts.operator_user, operator_pw)]),
        0o600,
    )
    _write(root / STATIONS_PASSWD, _hash_lines(station_pws), 0o600)
    for f in (AGENTS_PASSWD, STATIONS_PASSWD):
        _secret_for_broker(root / f, owner)
    _write(root / STATIONS_ACL, stations_acl().encode(), 0o644)
    _write(root / AGENTS_ACL, agents_acl(opts.agent_user, opts.operator_user).encode(), 0o644)

    out = {
        "conf": root / CONF,
        "ca": root / CA_CRT,
        "agent_password": _save_password(root, opts.agent_user, agent_pw, False),
        "operator_password": _save_password(root, opts.operator_user, operator_pw, False),
    }
    os.chmod(root / PASSWORDS, 0o700)
    for s, p in station_pws:
        _save_password(root, s, p, True)

    if opts.mtls:
        (root / CLIENTS).mkdir(mode=0o700, exist_ok=True)
        _write_index(root, [])
        _write_crl(root, [])  # Mosquitto needs the file from the start
        for s in stations:
            issue_cert(root, s, opts.cert_days)

    data = root / DATA
    data.mkdir(mode=0o700, exist_ok=True)
    if owner is not None:
        os.chown(data, *owner)  # the broker writes its persistence here
    _write(root / CONF, render_conf(root, opts).encode(), 0o644)
    return out


def _dir(d: str | os.PathLike[str]) -> pathlib.Path:
    root = pathlib.Path(d).resolve()
    if not (root / STATIONS_PASSWD).exists():
        raise SetupError(f"{root} holds no broker configuration (run `stationctl broker init`)")
    return root


def add_station(d: str | os.PathLike[str], sid: str) -> pathlib.Path:
    """A station account with a fresh password (its file returned). An existing account's
    password is replaced (the station must be re-flashed with the new one)."""
    root = _dir(d)
    password = passwd.new_password()
    passwd.set_password(root / STATIONS_PASSWD, check_sid(sid), password)
    return _save_password(root, sid, password, True)


def revoke_station(d: str | os.PathLike[str], sid: str) -> bool:
    """Remove the station's account and put its client certificates on the CRL (False
    when it had neither). Mosquitto 2.0 reads the password file again on SIGHUP and then
    disconnects a connected client whose account is gone (2.0.11,
    tests/test_broker_attacks.py); its reconnects are refused. It reads the CRL again on
    SIGHUP too: a revoked certificate's next handshake fails. Without a reload nothing
    changes for the broker."""
    root = _dir(d)
    old = passwd.set_line(root / STATIONS_PASSWD, check_sid(sid), None)
    f = root / PASSWORDS / "stations" / sid
    if f.exists():
        f.unlink()
    certs = revoke_certs(root, sid) if (root / CRL).exists() else 0
    return old is not None or certs > 0


def reload(cmd: str) -> None:
    """Run the deployment's reload command (e.g. `systemctl reload mosquitto`)."""
    subprocess.run(shlex.split(cmd), check=True, timeout=30)
