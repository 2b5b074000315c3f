"""The broker configuration the fleet needs (CONTRACT §5): mosquitto.conf.template and
stations.acl, rendered for a fleet size.

    python -m tools.flash.broker --stations 200 --out stations.conf \
        --password-file /etc/mosquitto/stations.passwd --acl-file /etc/mosquitto/stations.acl

Queue sizing: the agent's persistent session must hold a day of everything the stations
publish while the agent is away: stations × (86400 / telemetry_s) telemetry messages plus
~10 % events. Mosquitto keeps queued messages in memory: a day for 200 stations at 10 s is
~1.9 M messages, ~1.1 GB at 600 bytes each; size the host (or the day) accordingly.

This is the single-listener configuration of rigs and tests (loopback by default). A
deployment's, with TLS and stations' client ids bound to their user names so that none can
take over the agent's session, is `stationctl broker init` (tools/flash/broker_setup.py).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import string
import sys

HERE = pathlib.Path(__file__).resolve().parent
TEMPLATE = HERE / "mosquitto.conf.template"
ACL = HERE / "stations.acl"
EVENTS_SHARE = 0.10  # events on top of telemetry (sessions, alarms, boots)
MSG_BYTES = 600  # a telemetry payload with 2-4 slots and its topic, rounded up


def per_station_day(telemetry_s: int = 10) -> int:
    return int(86400 / telemetry_s * (1 + EVENTS_SHARE))


def render(
    *,
    stations: int,
    password_file: str,
    acl_file: str,
    persistence_dir: str,
    port: int = 1883,
    bind: str = "127.0.0.1",
    telemetry_s: int = 10,
    log_dest: str = "syslog",
    extra: str = "",
) -> str:
    if stations < 1 or telemetry_s < 1:
        raise ValueError("stations and telemetry_s must be positive")
    day = per_station_day(telemetry_s)
    return string.Template(TEMPLATE.read_text()).substitute(
        port=port,
        bind=bind,
        persistence_dir=persistence_dir.rstrip("/"),
        stations=stations,
        per_station_day=day,
        telemetry_s=telemetry_s,
        msg_bytes=MSG_BYTES,
        max_queued_messages=stations * day,
        max_queued_bytes=stations * day * MSG_BYTES,
        password_file=password_file,
        acl_file=acl_file,
        log_dest=log_dest,
        extra=extra,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.flash.broker", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--stations", type=int, required=True)
    p.add_argument("--telemetry-s", type=int, default=10)
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--bind", default="127.0.0.1", help="another address: see broker_setup")
    p.add_argument("--password-file", default="/etc/mosquitto/stations.passwd")
    p.add_argument("--acl-file", default="/etc/mosquitto/stations.acl")
    p.add_argument("--persistence-dir", default="/var/lib/mosquitto")
    p.add_argument("--out", help="write here (default: stdout)")
    args = p.parse_args(argv)
    try:
        text = render(
            stations=args.stations,
            password_file=args.password_file,
            acl_file=args.acl_file,
            persistence_dir=args.persistence_dir,
            port=args.port,
            bind=args.bind,
            telemetry_s=args.telemetry_s,
        )
    except ValueError as e:
        print(f"broker: {e}", file=sys.stderr)
        return 2
    if args.out:
        pathlib.Path(args.out).write_text(text)
        print(f"wrote {args.out}; the ACL to install as {args.acl_file} is {os.path.relpath(ACL)}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
