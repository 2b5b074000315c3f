"""A station's broker settings from the deployment directory `stationctl broker init` wrote
(tools/flash/broker_setup.py), for `stationctl flash --broker-dir DIR`:

- `broker.ca`: DIR/ca.crt, the deployment's CA, as the firmware pins it (DER as base64:
  the unix port's mbedTLS before MicroPython 1.29 parses no PEM, DER loads everywhere);
- `broker.tls` true and `broker.port` the stations' TLS listener in DIR/mosquitto.conf;
- `broker.host`, unless given: the first name the broker's certificate (DIR/server.crt) is
  issued for; a host it is not issued for is refused (the station would refuse the broker);
- `broker.user` the station id and `broker.password` from DIR/passwords/stations/<sid>,
  the account `broker init` or `broker add-station` made (never printed or reported).

The report carries the CA's SHA-256 fingerprint, which anyone can compare with
`openssl x509 -in DIR/ca.crt -noout -fingerprint -sha256`.
"""

from __future__ import annotations

import base64
import hashlib
import pathlib
import shlex
from dataclasses import dataclass
from typing import Any

from tools.flash.errors import BadInput

CONF, CA_CRT, SERVER_CRT = "mosquitto.conf", "ca.crt", "server.crt"


@dataclass(frozen=True)
class Deployment:
    dir: pathlib.Path
    ca_b64: str  # the CA certificate, DER as base64 (config.json's broker.ca)
    ca_sha256: str  # its fingerprint, AA:BB:… (as openssl prints it)
    tls_port: int  # the stations' TLS listener
    hosts: tuple[str, ...]  # the names and addresses the broker's certificate is issued for


def fingerprint(der: bytes) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def _station_listener(conf: str) -> tuple[int, list[str]]:
    """(port, settings) of the stations' TLS listener: the one with a certificate and
    use_username_as_clientid (broker_setup.render_conf)."""
    blocks: list[tuple[int, list[str]]] = []
    for line in conf.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "listener" and len(words) >= 2 and words[1].isdigit():
            blocks.append((int(words[1]), []))
        elif blocks:
            blocks[-1][1].append(" ".join(words))
    for port, settings in blocks:
        if any(s.startswith("certfile ") for s in settings) and (
            "use_username_as_clientid true" in settings
        ):
            return port, settings
    raise ValueError("no stations' TLS listener (certfile and use_username_as_clientid)")


def load(d: str | pathlib.Path) -> Deployment:
    """The deployment's CA, TLS port and certificate names; BadInput naming what is wrong."""
    from cryptography import x509

    root = pathlib.Path(d)
    if not (root / CONF).is_file() or not (root / CA_CRT).is_file():
        raise BadInput(
            "check",
            f"--broker-dir {root}: no {CONF} and {CA_CRT} there (a directory written by "
            "`stationctl broker init`)",
        )
    try:
        ca = x509.load_pem_x509_certificate((root / CA_CRT).read_bytes())
        server = x509.load_pem_x509_certificate((root / SERVER_CRT).read_bytes())
        port, settings = _station_listener((root / CONF).read_text())
    except (OSError, ValueError) as e:
        raise BadInput("check", f"--broker-dir {root}: {e}") from None
    if "require_certificate true" in settings:
        raise BadInput(
            "check",
            f"--broker-dir {root}: its stations log in with client certificates (--mtls), "
            "which the firmware does not present yet; use a password deployment",
        )
    from cryptography.hazmat.primitives.serialization import Encoding

    der = ca.public_bytes(Encoding.DER)
    try:
        san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = tuple(
            [str(n) for n in san.get_values_for_type(x509.DNSName)]
            + [str(a) for a in san.get_values_for_type(x509.IPAddress)]
        )
    except x509.ExtensionNotFound:
        hosts = ()
    if not hosts:
        raise BadInput("check", f"--broker-dir {root}: {SERVER_CRT} names no host (no SAN)")
    return Deployment(
        dir=root,
        ca_b64=base64.b64encode(der).decode(),
        ca_sha256=fingerprint(der),
        tls_port=port,
        hosts=hosts,
    )


def site_broker(dep: Deployment, site: dict[str, Any]) -> dict[str, Any]:
    """What the deployment sets in the site's broker section: tls, ca and the TLS port
    (over the site file's), the host when the site names none. Command-line overrides
    (--broker, --set) are merged after this."""
    b = site.get("broker") if isinstance(site.get("broker"), dict) else {}
    out: dict[str, Any] = {"tls": True, "ca": dep.ca_b64, "port": dep.tls_port}
    if not (b or {}).get("host"):
        out["host"] = dep.hosts[0]
    return {"broker": out}


def password(dep: Deployment, sid: str) -> str:
    """The station's broker password, from the account `broker init`/`add-station` made."""
    p = dep.dir / "passwords" / "stations" / sid
    try:
        pw = p.read_text().strip()
    except FileNotFoundError:
        d = shlex.quote(str(dep.dir))
        raise BadInput(
            "check",
            f"{sid} has no broker account in {dep.dir}: add it with `stationctl broker "
            f"add-station --dir {d} {sid}` (and reload the broker), then flash again",
        ) from None
    except OSError as e:
        raise BadInput("check", f"cannot read {p}: {e.strerror}") from None
    if not pw:
        raise BadInput("check", f"{p} is empty")
    return pw


def check_config(dep: Deployment, broker: dict[str, Any]) -> None:
    """The station's final broker settings agree with the deployment: TLS, its CA, a host
    its certificate is issued for (else the station would refuse the broker it is given)."""
    if broker.get("tls") is not True:
        raise BadInput("check", "--broker-dir: broker.tls must stay true")
    if broker.get("ca") != dep.ca_b64:
        raise BadInput("check", f"--broker-dir: broker.ca differs from {dep.dir / CA_CRT}")
    host = broker.get("host")
    if not isinstance(host, str) or host.lower() not in [h.lower() for h in dep.hosts]:
        raise BadInput(
            "check",
            f"broker.host {host} is not a name the broker's certificate is issued for "
            f"({', '.join(dep.hosts)}): the station would refuse that broker; give one of "
            "them (--broker HOST)",
        )
