"""`stationctl flash`: provision and commission station boards (tools/flash, docs/flashing.md).

    stationctl flash --port PORT --station SID --agent-db URL --site SITE.json [--image BIN
        [--erase]] [--broker-dir DIR | --broker-passwd FILE [--broker-reload CMD]]
        [--deploy auto|romfs|mpy] [--dry-run] …
    stationctl flash --batch stations.csv --agent-db URL --site SITE.json …

Exit status: 0 every board commissioned (or the dry run shown), 2 bad usage or input (one
line on stderr), 1 any other failure (one line per failed board on stderr; the report says
more). The station key and broker password are never printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "flash",
        help="provision and commission station boards (technicians)",
        description="Write MicroPython (esptool), the compiled firmware and the "
        "station's config (mpremote), verify, self-test, register the key.",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--station", metavar="SID", help="the station id")
    who.add_argument("--batch", metavar="CSV", help="a CSV of stations (sid,port,… per line)")
    p.add_argument("--port", help="the board's serial port (device path or pyserial URL)")
    p.add_argument(
        "--chip",
        default="esp32",
        help="esp32 (default), esp32s2, esp32s3, esp32c3, esp32c6, or unix (the "
        "MicroPython unix port on a pty, for test rigs)",
    )
    p.add_argument("--image", metavar="BIN", help="MicroPython image to write with esptool first")
    p.add_argument(
        "--image-offset",
        metavar="N",
        type=lambda s: int(s, 0),
        help="flash offset of the image (default: 0x1000 on esp32/s2, 0 on the others)",
    )
    p.add_argument("--erase", action="store_true", help="erase the whole flash before the image")
    p.add_argument(
        "--esptool-port",
        metavar="URL",
        help="the ROM bootloader's port when it is not --port (e.g. socket://…)",
    )
    ag = p.add_mutually_exclusive_group()
    ag.add_argument(
        "--agent-db",
        metavar="URL",
        help="the agent database (a path, sqlite:///PATH or postgresql://…)",
    )
    ag.add_argument("--agent-config", metavar="FILE", help="the agent's TOML (its db.url is used)")
    p.add_argument(
        "--force",
        action="store_true",
        help="re-provision a known station without the agent's answer, or a board "
        "holding another station's config (wiped)",
    )
    p.add_argument(
        "--site",
        metavar="FILE",
        help="site template: config keys as JSON (broker, net, slots, charger, bus, …)",
    )
    p.add_argument("--slots", type=int, help="number of slots (overrides the site)")
    p.add_argument("--broker", metavar="HOST[:PORT]", help="MQTT broker (overrides the site)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, dotted (e.g. net.ssid=depot, meter=null); repeatable",
    )
    acct = p.add_mutually_exclusive_group()
    acct.add_argument(
        "--broker-dir",
        metavar="DIR",
        help="the deployment `stationctl broker init` wrote: TLS to its stations' port with "
        "its CA pinned (broker.ca), the station's account from DIR/passwords (user = sid), "
        "the host one its certificate names; the report gives the CA's SHA-256",
    )
    acct.add_argument(
        "--broker-passwd",
        metavar="FILE",
        help="Mosquitto password file: the station's credentials are added (user = sid, "
        "a fresh random password in its config)",
    )
    p.add_argument(
        "--broker-reload",
        metavar="CMD",
        help="command that makes the broker re-read the file (e.g. 'systemctl reload mosquitto')",
    )
    p.add_argument(
        "--key-out",
        metavar="FILE",
        help="without an agent database: write the key here (0600) for "
        "`stationctl keys add --key-file`",
    )
    p.add_argument("--kid", type=int, help="key version when the agent is not asked")
    p.add_argument(
        "--boot-base", type=int, metavar="N", help="lowest boot the board may use (a floor)"
    )
    p.add_argument(
        "--reports",
        default="reports",
        metavar="DIR",
        help="folder for commissioning reports (default: ./reports)",
    )
    p.add_argument(
        "--deploy",
        choices=("auto", "romfs", "mpy"),
        default="auto",
        help="the firmware as a ROMFS image (bytecode runs from flash, out of the heap; needs "
        "a MicroPython with a romfs partition, docs/hardware.md) or as .mpy files; auto "
        "(default): romfs when the board has a partition the image fits in",
    )
    p.add_argument("--baud", type=int, default=115200, help="REPL baud rate (default 115200)")
    p.add_argument("--selftest-timeout", type=float, default=90.0, metavar="S")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show what would be written (config with the key redacted, files and "
        "hashes); no board needed, nothing changed",
    )
    p.add_argument(
        "--json", action="store_true", help="print each board's report as JSON on stdout"
    )
    p.add_argument("--stop-on-error", action="store_true", help="batch: stop at the first failure")
    p.set_defaults(func=run)


def _agent_db(args: argparse.Namespace) -> str | None:
    if args.agent_db:
        return str(args.agent_db)
    if args.agent_config:
        from agent.config import ConfigError, load_config

        try:
            return str(load_config(args.agent_config).db.url)
        except ConfigError as e:
            raise UsageError(str(e)) from None
    return None


def _site(args: argparse.Namespace) -> dict[str, Any]:
    from tools.flash import plan

    site = plan.load_site(args.site)
    if args.broker_dir:
        from tools.flash import deployment

        site = plan.merge(site, deployment.site_broker(deployment.load(args.broker_dir), site))
    over: dict[str, Any] = {}
    if args.slots is not None:
        over["slots"] = args.slots
    if args.broker:
        host, sep, port = args.broker.rpartition(":")
        if not sep or not port.isdigit():
            host, port = args.broker, ""
        over["broker"] = {"host": host, **({"port": int(port)} if port else {})}
        if not port and "port" not in site.get("broker", {}) and not args.broker_dir:
            over["broker"]["port"] = 1883
    site = plan.merge(site, over)
    return plan.merge(site, plan.parse_sets(args.set))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tools.flash import bulk
    from tools.flash.errors import FlashError
    from tools.flash.provision import Request

    err = Console(stderr=True)
    try:
        base = Request(
            sid=args.station or "BATCH",
            port=args.port,
            esptool_port=args.esptool_port,
            chip=args.chip,
            image=args.image,
            image_offset=args.image_offset,
            erase=args.erase,
            agent_db=_agent_db(args),
            force=args.force,
            dry_run=args.dry_run,
            site=_site(args),
            broker_passwd=args.broker_passwd,
            broker_dir=args.broker_dir,
            broker_reload=args.broker_reload,
            key_out=args.key_out,
            kid=args.kid,
            boot_base=args.boot_base,
            reports=args.reports,
            baud=args.baud,
            selftest_timeout=args.selftest_timeout,
            deploy=args.deploy,
        )
        if args.erase and not args.image:
            raise UsageError("--erase erases the flash before writing --image: give --image")
        if args.batch:
            if args.key_out:
                raise UsageError("--key-out names one file: give key_out per line in the CSV")
            reqs = bulk.read_batch(args.batch, base)
            outs = bulk.run_batch(reqs, err, stop_on_error=args.stop_on_error)
        else:
            outs = [bulk.run_one(base, err)]
    except FlashError as e:
        raise UsageError(e.message) from None
    for o in outs:
        if args.json:
            print(json.dumps(o.report, sort_keys=True))
        elif o.report["result"] == "dry-run":
            _print_plan(o.report)
    if args.batch:
        Console().print(bulk.summary(outs))
    bad_input = [o for o in outs if not o.ok and o.code == 2]
    for o in outs:
        if not o.ok:
            where = f" (report {o.paths[1]})" if o.paths else ""
            print(f"stationctl flash: {o.sid}: {o.error}{where}", file=sys.stderr)
        elif o.report["result"] == "ok" and not args.batch and not args.json:
            r = o.report
            print(
                f"{o.sid}: commissioned, kid {r['kid']}, boot_base {r['boot_base']}, "
                f"deploy {r.get('deploy', '?')}"
                + (f", {r['heap']['free']} bytes heap free" if "free" in r.get("heap", {}) else "")
                + f"; report {o.paths[1] if o.paths else '-'}"
            )
    if bad_input and len(bad_input) == len(outs):
        return 2
    return 0 if all(o.ok for o in outs) else 1


def _print_plan(rep: dict[str, Any]) -> None:
    a = rep.get("agent", {})
    print(f"station {rep['sid']} (dry run: nothing written)")
    if a.get("answered"):
        print(
            f"agent: {'known' if a['known'] else 'new'} station, kids {a['kids'] or '-'}, "
            f"highest boot {a['max_boot']}"
        )
    else:
        print(f"agent: not asked ({a.get('why')})")
    print(
        f"kid {rep['kid']}, boot_base {rep['boot_base']} (the board may raise it from its own "
        "counter), key: a fresh 32 bytes"
    )
    b = rep.get("broker")
    if b:
        print(
            f"broker: {b['host']}:{b['port']} over TLS, CA sha256 {b['ca_sha256']}; user "
            f"{b['user']}, password from {b['password_from']}"
        )
    elif rep.get("broker_user"):
        print(
            f"broker credentials: user {rep['broker_user']}, a fresh password, in the password file"
        )
    fw = rep["firmware"]
    print(
        f"firmware {fw['version']} build {fw['build']} (bytecode for mpy-cross's default; the "
        "board's own mpy version decides on a real run)"
    )
    img = rep.get("romfs_image")
    if img:
        print(
            f"deploy: {rep.get('deploy')}: as a ROMFS image ({img['size']} bytes, sha256 "
            f"{img['sha256']}) when the board has a romfs partition it fits in, else these files"
        )
    print("files (sha256):")
    for p, h in sorted(rep["files"].items()):
        note = "  (differs on every run: the key)" if p == "config.json" else ""
        print(f"  {h}  {p}{note}")
    print("config.json:")
    print(json.dumps(rep["config"], indent=2, sort_keys=True))
