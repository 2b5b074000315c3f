"""A batch of boards, one after another: a CSV of stations, a progress bar per board (rich)
and a summary table.

CSV: a header line, then one station per line. Columns `sid` and `port` (port may be empty
with --dry-run); optional `esptool_port`, `image`, `chip`, `kid`, `boot_base`, `key_out`;
every other column is a dotted config key (`slots`, `broker.host`, `net.ssid`,
`charger.uart`, …) whose cell overrides the site template for that station (empty cells
override nothing; values are JSON when they parse: `8`, `null`, `true`). Every line is
checked before the first board is touched: a bad line is bad input (exit 2) naming it.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from tools.flash import plan
from tools.flash.errors import BadInput, FlashError
from tools.flash.provision import Outcome, Request, provision

REQUEST_COLUMNS = {
    "sid",
    "port",
    "esptool_port",
    "image",
    "chip",
    "kid",
    "boot_base",
    "key_out",
    "deploy",
}
INT_COLUMNS = {"kid", "boot_base"}
# share of a board's bar per stage; the copy stage moves with the bytes written
WEIGHTS = {
    "check": 2,
    "image": 15,
    "connect": 3,
    "probe": 2,
    "plan": 6,
    "copy": 40,
    "verify": 8,
    "broker": 2,
    "restart": 2,
    "selftest": 14,
    "register": 3,
    "start": 3,
}


def read_batch(path: str, base: Request) -> list[Request]:
    """One Request per CSV line: `base` with the line's columns applied."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise BadInput("check", f"cannot read {path}: {e.strerror}") from None
    except csv.Error as e:
        raise BadInput("check", f"{path}: {e}") from None
    if not rows:
        raise BadInput("check", f"{path}: no stations (want a header line with sid,port then rows)")
    cols = set(rows[0].keys())
    if "sid" not in cols:
        raise BadInput("check", f"{path}: no `sid` column")
    out: list[Request] = []
    seen: dict[str, int] = {}
    for n, row in enumerate(rows, start=2):
        where = f"{path} line {n}"
        try:
            req = _row_request(row, base, where)
        except FlashError as e:
            raise BadInput("check", f"{where}: {e.message}") from None
        if req.sid in seen:
            raise BadInput("check", f"{where}: station {req.sid} again (line {seen[req.sid]})")
        seen[req.sid] = n
        out.append(req)
    return out


def _row_request(row: dict[str, Any], base: Request, where: str) -> Request:
    if None in row:
        raise BadInput("check", "more cells than columns")
    over: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for col, cell in row.items():
        col = (col or "").strip()
        cell = (cell or "").strip()
        if not cell:
            continue
        if col in REQUEST_COLUMNS:
            if col in INT_COLUMNS:
                try:
                    fields[col] = int(cell)
                except ValueError:
                    raise BadInput("check", f"{col} must be an integer, not {cell!r}") from None
            else:
                fields[col] = cell
        else:
            plan.set_dotted(over, col, plan.parse_value(cell))
    if "sid" not in fields:
        raise BadInput("check", "empty sid")
    if not base.dry_run and "port" not in fields and not base.port:
        raise BadInput("check", "no port")
    req = dataclasses.replace(base, site=plan.merge(base.site, over), **fields)
    plan.check_sid(req.sid)
    if req.deploy not in ("auto", "romfs", "mpy"):
        raise BadInput("check", f"deploy must be auto, romfs or mpy, not {req.deploy!r}")
    # the station's config must be valid before any board is touched
    plan.station_config(req.site, sid=req.sid, kid=1, key=bytes(32), boot_base=0, password="x")
    return req


class BoardBar:
    """One board's bar: stages move it, the copy stage moves it with the bytes."""

    def __init__(self, progress: Progress, sid: str) -> None:
        self.p = progress
        self.sid = sid
        self.task: TaskID = progress.add_task(f"{sid} check", total=sum(WEIGHTS.values()))
        self.offset = {}
        acc = 0
        for name, w in WEIGHTS.items():
            self.offset[name] = acc
            acc += w
        self.cur = "check"

    def stage(self, name: str, detail: str = "") -> None:
        self.cur = name
        self.p.update(
            self.task, completed=self.offset.get(name, 0), description=f"{self.sid} {name}"
        )

    def bytes(self, done: int, total: int) -> None:
        if total:
            w = WEIGHTS["copy"] * done / total
            self.p.update(
                self.task,
                completed=self.offset["copy"] + w,
                description=f"{self.sid} copy {done // 1024}/{total // 1024} KiB",
            )

    def end(self, out: Outcome) -> None:
        word = "done" if out.ok else f"FAILED at {out.stage}"
        self.p.update(
            self.task,
            completed=sum(WEIGHTS.values()) if out.ok else None,
            description=f"{self.sid} {word}",
        )


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<32}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def run_one(req: Request, console: Console) -> Outcome:
    with make_progress(console) as progress:
        bar = BoardBar(progress, req.sid)
        out = provision(req, bar)
        bar.end(out)
    return out


def run_batch(
    reqs: list[Request],
    console: Console,
    *,
    prompt: bool | None = None,
    stop_on_error: bool = False,
) -> list[Outcome]:
    """Provision each board in turn. When two stations share a port (one cable, boards swapped
    in turn) and stdin is a terminal, wait for Enter before each next board."""
    if prompt is None:
        prompt = sys.stdin.isatty()
    outs: list[Outcome] = []
    ports_used: set[str] = set()
    with make_progress(console) as progress:
        for req in reqs:
            if prompt and req.port in ports_used and not req.dry_run:
                progress.stop()
                console.input(
                    f"connect the board for [bold]{req.sid}[/] on {req.port} and press Enter "
                )
                progress.start()
            if req.port:
                ports_used.add(req.port)
            bar = BoardBar(progress, req.sid)
            out = provision(req, bar)
            bar.end(out)
            outs.append(out)
            if stop_on_error and not out.ok:
                break
    return outs


def summary(outs: list[Outcome]) -> Table:
    t = Table(title="stationctl flash: summary")
    for col in ("station", "port", "result", "kid", "boot_base", "seconds", "report / reason"):
        t.add_column(col)
    for o in outs:
        r = o.report
        res = (
            "[green]ok[/]"
            if o.ok and r["result"] == "ok"
            else (r["result"] if o.ok else f"[red]failed[/] ({o.stage})")
        )
        tail = str(o.paths[1]) if o.ok and o.paths else (o.error or "")
        t.add_row(
            o.sid,
            str(r.get("port") or "-"),
            res,
            str(r.get("kid", "-")),
            str(r.get("boot_base", "-")),
            str(r.get("elapsed_s", "-")),
            tail,
        )
    return t
