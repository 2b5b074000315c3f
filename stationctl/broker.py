"""`stationctl broker init|add-station|issue-cert|revoke-station`: the deployment's Mosquitto
configuration (tools/flash/broker_setup.py): TLS for stations with their client id bound to
their user name, the agent on a listener of its own, accounts, ACLs and generated passwords.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "broker", help="Mosquitto configuration: init, add-station, issue-cert, revoke-station"
    )
    bs = p.add_subparsers(dest="broker_cmd", required=True, metavar="ACTION")
    i = bs.add_parser("init", help="write a complete broker configuration into a directory")
    i.add_argument("--dir", required=True, metavar="DIR")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--stations-from",
        metavar="DB_URL",
        help="the agent database: every station with an unrevoked key gets an account",
    )
    src.add_argument("--station", action="append", metavar="SID", help="a station (repeatable)")
    i.add_argument(
        "--host",
        action="append",
        metavar="NAME",
        help="a name or address of the broker for its certificate (repeatable; default "
        "localhost and 127.0.0.1)",
    )
    i.add_argument("--tls-port", type=int, default=8883, help="stations' TLS listener")
    i.add_argument("--local-port", type=int, default=1883, help="plain MQTT on 127.0.0.1")
    i.add_argument(
        "--agent-tls-port",
        type=int,
        default=0,
        metavar="PORT",
        help="a TLS listener for agents on other hosts (default: none)",
    )
    i.add_argument(
        "--station-local-port",
        type=int,
        default=0,
        metavar="PORT",
        help="stations' rules in plain MQTT on 127.0.0.1 too (demos, tests; default: none)",
    )
    i.add_argument(
        "--mtls",
        action="store_true",
        help="stations log in with client certificates (CN = station id) instead of "
        "passwords; one is issued per station, revoked ones go on a CRL",
    )
    i.add_argument("--fleet-size", type=int, default=0, help="queue sizing (default: stations)")
    i.add_argument("--telemetry-s", type=int, default=10)
    i.add_argument(
        "--run-as", default="mosquitto", metavar="USER", help="the user Mosquitto runs as"
    )
    i.add_argument("--log-dest", default="syslog", help="Mosquitto's log_dest (e.g. stderr)")
    for name, helptext in (
        ("add-station", "add a station account with a fresh password"),
        ("issue-cert", "issue a station a client certificate (for --mtls deployments)"),
        (
            "revoke-station",
            "remove a station account and revoke its certificates (refused at its next connect)",
        ),
    ):
        a = bs.add_parser(name, help=helptext)
        a.add_argument("--dir", required=True, metavar="DIR")
        a.add_argument("sid")
        a.add_argument(
            "--reload",
            metavar="CMD",
            help='command that makes the broker re-read its files, e.g. "systemctl reload '
            'mosquitto" (Mosquitto reads the password file again on SIGHUP)',
        )
    p.set_defaults(func=run)


def _stations_from(url: str) -> list[str]:
    from agent.keys import KeyStore
    from stationctl.dbopen import DB_ERRORS, name, open_store, reason

    try:
        store = open_store(url)
    except OSError as e:
        raise UsageError(f"database {name(url)}: {reason(url, e)}") from None
    try:
        with KeyStore(store) as ks:
            return sorted({k.sid for k in ks.list() if k.state != "revoked"})
    except DB_ERRORS as e:
        raise UsageError(f"database {name(url)}: {reason(url, e)}") from None
    finally:
        store.close()


def run(args: argparse.Namespace) -> int:
    from tools.flash import broker_setup as bs

    try:
        if args.broker_cmd == "init":
            stations = _stations_from(args.stations_from) if args.stations_from else args.station
            opts = bs.Options(
                stations=stations,
                tls_port=args.tls_port,
                local_port=args.local_port,
                station_local_port=args.station_local_port,
                mtls=args.mtls,
                agent_tls_port=args.agent_tls_port,
                fleet_size=args.fleet_size,
                telemetry_s=args.telemetry_s,
                run_as=args.run_as,
                log_dest=args.log_dest,
            )
            if args.host:
                opts.hosts = args.host
            out = bs.init(args.dir, opts)
            print(
                f"wrote {out['conf']} ({len(stations)} station account(s)); stations pin "
                f"{out['ca']}; the agent's password is in {out['agent_password']}, the "
                f"operator's in {out['operator_password']}"
                + (
                    f"; client certificates in {out['conf'].parent / bs.CLIENTS}"
                    if args.mtls
                    else ""
                )
            )
            return 0
        if args.broker_cmd == "add-station":
            f = bs.add_station(args.dir, args.sid)
            print(f"{args.sid}: account added; its password is in {f}")
        elif args.broker_cmd == "issue-cert":
            crt, key = bs.issue_cert(args.dir, args.sid)
            print(f"{args.sid}: certificate {crt}, key {key} (0600)")
        else:
            if not bs.revoke_station(args.dir, args.sid):
                raise UsageError(f"{args.sid} has no broker account")
            print(
                f"{args.sid}: account removed, certificates revoked; the broker disconnects "
                "it and refuses it once it has re-read its files (SIGHUP: --reload)"
            )
    except bs.SetupError as e:
        raise UsageError(str(e)) from None
    if args.reload:
        try:
            bs.reload(args.reload)
        except (OSError, Exception) as e:  # noqa: BLE001 - the files are written already
            print(f"stationctl broker: reload failed: {e}", file=sys.stderr)
            return 1
    return 0
