"""`stationctl watch`: the dashboard's live picture in a terminal (rich).

stationctl watch --db sqlite:///agent.db            # read the agent's database
stationctl watch --db postgresql://host/agent        # (or a PostgreSQL one)
stationctl watch --api http://127.0.0.1:8080/        # or ask a running dashboard
stationctl watch --db … --station KH-PNH-0001        # one station, slot by slot
stationctl watch --db … --once                       # one frame, then exit
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import Any

from agent.wire import SID_RE
from stationctl.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("watch", help="live fleet view in the terminal (stations, slots, alarms)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--db", metavar="URL", help="agent database (a path, sqlite:///PATH or postgresql://…)"
    )
    src.add_argument(
        "--api", metavar="URL", help="a running dashboard, e.g. http://127.0.0.1:8080/"
    )
    p.add_argument("--station", metavar="SID", help="show one station's slots")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--carbon-params", metavar="FILE", help="carbon parameter file (--db only)")
    p.set_defaults(func=run_watch)


# ---- data sources ----------------------------------------------------------------------------

Source = Callable[[], tuple[dict[str, Any], dict[str, Any] | None]]


def db_source(url: str, sid: str | None, carbon_params: str | None) -> Source:
    from agent.dashboard.live import Live
    from stationctl.dbopen import name

    n = name(url)
    live = Live(url, carbon_params=carbon_params)
    if not live.poll_once():
        raise UsageError(f"cannot read an agent database at {n}: {live.reader.error}")

    def get() -> tuple[dict[str, Any], dict[str, Any] | None]:
        live.poll_once()
        fleet = live.fleet()
        st = live.view(lambda s, now: s.station(sid, now)) if sid else None
        return fleet, st

    return get


def api_source(base: str, sid: str | None) -> Source:
    if not base.startswith(("http://", "https://")):
        raise UsageError(f"--api wants an http:// URL, not {base!r}")
    base = base.rstrip("/") + "/"

    def fetch(path: str) -> Any:
        with urllib.request.urlopen(urllib.parse.urljoin(base, path), timeout=5) as r:
            return json.load(r)

    def get() -> tuple[dict[str, Any], dict[str, Any] | None]:
        fleet = fetch("api/fleet")
        st = None
        if sid:
            try:
                st = fetch(f"api/stations/{sid}")
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise
        return fleet, st

    return get


# ---- rendering -----------------------------------------------------------------------------


def _w(w: int | None) -> str:
    if w is None:
        return "–"
    return f"{w / 1000:.2f} kW" if abs(w) >= 1000 else f"{w} W"


def _kwh(mwh: int | None) -> str:
    return "–" if mwh is None else f"{mwh / 1e6:.2f} kWh"


def _ago(ms: int | None, now: int) -> str:
    if not ms:
        return "never"
    s = max(0, (now - ms) // 1000)
    return f"{s} s ago" if s < 60 else f"{s // 60} min ago" if s < 3600 else f"{s // 3600} h ago"


def _clock(ms: int | None) -> str:
    return "–" if not ms else datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S")


_STATE_STYLE = {"online": "green", "offline": "bold red", "silent": "red", "unknown": "dim"}


def render(fleet: dict[str, Any], st: dict[str, Any] | None, sid: str | None) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = int(fleet["now"])
    t = fleet["totals"]
    c = fleet.get("carbon")  # CO2e from parameters no one validated: say so (issue 16)
    mark = (
        f" (example parameters, not validated: {c['id']} {c['version']})"
        if c and not c.get("validated")
        else ""
    )
    head = Text.assemble(
        ("stationctl watch  ", "bold"),
        f"{t['online']}/{t['stations']} online · charging {_w(t['power_w'])} · "
        f"{t['charging']}/{t['slots']} slots · today {_kwh(t['today_mwh'])} · "
        f"CO2e avoided today {t['co2e_today_kg']} kg{mark} · {_clock(now)}",
    )
    parts: list[Any] = [head]
    versions = t.get("versions") or {}
    updating = [
        f"{s['sid']} {s['ota']['phase']}"
        for s in fleet["stations"]
        if s.get("ota") and s["ota"].get("phase") != "confirmed"
    ]
    if versions:  # an update rolling out (stationctl ota push) shows here
        line = "firmware " + " · ".join(f"{v} ×{n}" for v, n in versions.items())
        parts.append(Text(line + (" · updating: " + ", ".join(updating) if updating else "")))
    banner = (fleet.get("agent") or {}).get("banner")
    if banner:  # the agent failing or silent (agent/health.py)
        parts.append(Text(banner, style="bold white on red"))
    # station ids are the one thing never cut: an operator types them into other commands
    # an OCPP charger's mark ("OCPP 1.6", "OCPP 2.0.1") goes under its id
    sid_w = max(
        [max(len(s["sid"]), len(s.get("mark") or "")) for s in fleet["stations"]]
        + [len(sid or ""), 7]
    )
    if sid is None:
        tab = Table(expand=True, header_style="bold")
        tab.add_column("Station", no_wrap=True, min_width=sid_w)
        for col, just in (
            ("State", "left"),
            ("Last seen", "left"),
            ("Power", "right"),
            ("Charging", "right"),
            ("Today", "right"),
            ("CO2e kg", "right"),
            ("Alarms", "right"),
        ):
            tab.add_column(col, justify=just)  # type: ignore[arg-type]
        for s in fleet["stations"]:
            a = s["alarms"]
            mark = s.get("mark")
            tab.add_row(
                Text.assemble(s["sid"], ("\n" + mark, "cyan")) if mark else s["sid"],
                Text(s["state"], style=_STATE_STYLE.get(s["state"], "")),
                _ago(s["last_seen_ms"], now),
                _w(s["power_w"]),
                f"{s['charging']}/{s['slots']}",
                _kwh(s["today_mwh"]),
                s["co2e_today_kg"] or "–",
                Text(f"{a['crit']} crit", style="red")
                if a["crit"]
                else (Text(f"{a['warn']} warn", style="yellow") if a["warn"] else ""),
            )
        parts.append(tab)
        alarms = fleet["alarms"]
    elif st is None:
        parts.append(Text(f"no station {sid} in this database (yet)", style="yellow"))
        alarms = []
    else:
        parts.append(
            Text(
                f"{sid}{' (' + st['mark'] + ')' if st.get('mark') else ''}: "
                f"{st['state']} · last seen {_ago(st['last_seen_ms'], now)} · "
                f"slots {_w(st['power_w'])} · meter {_w(st['meter_w'])} · "
                f"today {_kwh(st['today_mwh'])}",
                style=_STATE_STYLE.get(st["state"], ""),
            )
        )
        tab = Table(expand=True, header_style="bold")
        for col in ("Slot", "State", "Power", "V", "A", "SoC", "Temp", "Battery", "Session"):
            tab.add_column(
                col, justify="right" if col in ("Power", "V", "A", "SoC", "Temp") else "left"
            )
        for s in st["slot_list"]:
            b = s["bat"] or {}
            ses = s["session"]
            ocpp = s.get("ocpp_status")
            tab.add_row(
                str(s["n"]),
                s["state"] + (f" ({ocpp})" if ocpp else ""),
                _w(s["power_w"]),
                "–" if s["mv"] is None else f"{s['mv'] / 1000:.1f}",
                "–" if s["ma"] is None else f"{s['ma'] / 1000:.1f}",
                f"{b['soc'] / 10:.1f} %" if b else "–",
                f"{b['t'] / 10:.1f} °C" if b else "–",
                b.get("id", "–"),
                f"since {_clock(ses['since_ms'])}, {_kwh(ses['mwh'])}" if ses else "",
            )
        parts.append(tab)
        alarms = st["alarm_list"]
    at = Table(title="Active alarms", expand=True, header_style="bold", title_justify="left")
    for col in ("Level", "Station", "Slot", "Alarm", "Since"):
        if col == "Station":
            at.add_column(col, no_wrap=True, min_width=sid_w)
        else:
            at.add_column(col)
    for a in alarms:
        at.add_row(
            Text(a["level"], style="red" if a["level"] == "crit" else "yellow"),
            a["sid"] or "-",
            str(a["slot"] or ""),
            f"{a['code']}: {a['msg']}",
            _clock(a["since_ms"]),
        )
    if not alarms:
        at.add_row(Text("none", style="green"), "", "", "", "")
    parts.append(at)
    return Group(*parts)


def run_watch(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live as RichLive

    sid = args.station
    if sid is not None and not SID_RE.fullmatch(sid):
        raise UsageError(f"bad station id {sid!r}")
    if args.interval <= 0:
        raise UsageError("--interval must be > 0")
    from stationctl.dbopen import DB_ERRORS, name, reason

    get = db_source(args.db, sid, args.carbon_params) if args.db else api_source(args.api, sid)
    what = args.api or name(args.db)
    # an unreachable dashboard, a bad answer; the database gone (SQLite, PostgreSQL)
    errors = (OSError, ValueError, *DB_ERRORS)
    console = Console()

    def frame() -> Any:
        try:
            fleet, st = get()
        except errors as e:
            from rich.text import Text

            return Text(f"cannot read {what}: {reason(args.db or '', e)}", style="red")
        return render(fleet, st, sid)

    if args.once:
        try:
            fleet, st = get()
        except errors as e:
            print(
                f"stationctl watch: cannot read {what}: {reason(args.db or '', e)}",
                file=sys.stderr,
            )
            return 1
        console.print(render(fleet, st, sid))
        return 0
    try:
        with RichLive(frame(), console=console, refresh_per_second=4) as lv:
            while True:
                time.sleep(args.interval)
                lv.update(frame())
    except KeyboardInterrupt:
        return 0
