"""Provision and commission one station's board, start to finish.

    check → [image] → connect → probe → plan → copy → verify → restart → self-test →
    register → start → report

The firmware goes onto the board as a ROMFS image (tools/romfs.py; bytecode executed in
place from flash, out of the heap) when its MicroPython has a ROMFS partition the image
fits in, else as .mpy files (`--deploy auto`, the default; `romfs` or `mpy` to insist).
main.py, config.json and the station's data are files on the filesystem either way.

Nothing is registered as good before the self-test passes: the key is added to the agent's
key store only then (with the kid the board already holds), the broker credentials and the
board's config.json are put back as they were when a later step fails, and every attempt
leaves a report (ok or failed, the stage, the reason). The key and the broker password
exist in this process's memory, on the board and in the agent's database (or a 0600 key
file); they are never printed, logged or put in a report.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import pathlib
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tools import romfs
from tools.flash import agentdb, deployment, passwd, plan
from tools.flash import report as reports
from tools.flash.board import (
    Board,
    RomInfo,
    check_chip,
    check_version,
    march_for,
    mpy_cross_emits,
    write_image,
)
from tools.flash.errors import BadInput, FlashError

log = logging.getLogger(__name__)

TOOL = "stationctl flash 1"
CONFIG = "config.json"
STATE_FILES = ("state.a", "state.b")  # the firmware's persisted counters (persist.ABStore)
STAGES = (
    "check",
    "image",
    "connect",
    "probe",
    "plan",
    "copy",
    "verify",
    "broker",
    "restart",
    "selftest",
    "register",
    "start",
)


@dataclass(frozen=True, kw_only=True)
class Request:
    sid: str
    port: str | None = None  # the board's REPL (device path or pyserial URL)
    esptool_port: str | None = None  # the ROM bootloader, when not the same as port
    chip: str = "esp32"  # esp32, esp32s3, … or unix (the MicroPython unix port on a pty)
    image: str | None = None
    image_offset: int | None = None
    erase: bool = False
    agent_db: str | None = None
    force: bool = False
    dry_run: bool = False
    site: dict[str, Any] = field(default_factory=dict)  # §9 keys (not the identity)
    broker_passwd: str | None = None  # Mosquitto password file to add the station to
    broker_reload: str | None = None  # command run after the password file changed
    # `stationctl broker init`'s directory: the station's account (its password) and the CA
    # (site must already hold what deployment.site_broker sets: tls, ca, port, host)
    broker_dir: str | None = None
    key_out: str | None = None  # without an agent: where the key goes (0600, 64 hex)
    kid: int | None = None  # without an agent: the key version
    boot_base: int | None = None  # a floor for boot_base
    reports: str = "reports"
    baud: int = 115200
    selftest_timeout: float = 90.0
    # the firmware as a ROMFS image (romfs), .mpy files (mpy), or romfs when the board's
    # MicroPython has a ROMFS partition the image fits in (auto)
    deploy: str = "auto"


DEPLOYS = ("auto", "romfs", "mpy")
HARDWARE_DOC = "docs/hardware.md"


def choose_deploy(want: str, rom: RomInfo | None, image_size: int) -> tuple[str, str]:
    """(romfs | mpy, why) from --deploy and what the board said about ROMFS. A forced
    romfs that the board cannot take is a FlashError naming what is missing."""
    if want not in DEPLOYS:
        raise BadInput("check", f"--deploy {want}: want one of {', '.join(DEPLOYS)}")
    if want == "mpy":
        return "mpy", "--deploy mpy"
    if rom is None:
        why = "the board's MicroPython has no ROMFS support (no vfs.rom_ioctl)"
    elif rom.partitions == 0:
        why = "the board's MicroPython has no ROMFS partition"
    elif image_size > rom.size:
        why = f"the ROMFS image ({image_size} bytes) exceeds the partition ({rom.size} bytes)"
    else:
        return "romfs", f"ROMFS partition of {rom.size} bytes"
    if want == "romfs":
        raise FlashError(
            "plan",
            f"--deploy romfs: {why}; write a MicroPython image with a romfs partition "
            f"({HARDWARE_DOC}), or --deploy mpy",
        )
    return "mpy", why


class Progress(Protocol):
    def stage(self, name: str, detail: str = "") -> None: ...

    def bytes(self, done: int, total: int) -> None: ...


class NoProgress:
    def stage(self, name: str, detail: str = "") -> None:
        log.info("stage %s %s", name, detail)

    def bytes(self, done: int, total: int) -> None:
        pass


@dataclass(kw_only=True)
class Outcome:
    sid: str
    ok: bool
    code: int  # exit status: 0, 1 or 2
    stage: str
    error: str | None
    report: dict[str, Any]
    paths: tuple[pathlib.Path, pathlib.Path] | None = None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def local_evidence(req: Request) -> list[str]:
    """Why this laptop believes the station exists, when the agent cannot say."""
    why = []
    d = pathlib.Path(req.reports)
    if d.is_dir():
        for p in sorted(d.glob(f"{req.sid}-*.json")):
            try:
                if json.loads(p.read_text()).get("result") == "ok":
                    why.append(f"commissioned before ({p.name})")
                    break
            except (OSError, ValueError):
                continue
    if req.broker_passwd and passwd.entry(req.broker_passwd, req.sid) is not None:
        why.append(f"it has broker credentials in {req.broker_passwd}")
    return why


def _reload_broker(req: Request) -> None:
    if not req.broker_reload:
        return
    try:
        r = subprocess.run(
            shlex.split(req.broker_reload), capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FlashError("broker", f"--broker-reload failed: {e}") from None
    if r.returncode != 0:
        raise FlashError(
            "broker",
            f"--broker-reload exited {r.returncode}: {(r.stderr or r.stdout).strip()[-200:]}",
        )
    time.sleep(0.3)  # the broker re-reads its files after the signal, not during it


def _write_key_file(path: str, key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")


def _selftest_failures(res: dict[str, Any]) -> str:
    bad = [
        f"{name}: {c.get('detail', '')}"
        for name, c in sorted(res.get("checks", {}).items())
        if not c.get("ok")
    ]
    return "; ".join(bad) or "no check passed"


class _Run:
    """One provisioning attempt: its report, its undo steps, its board."""

    def __init__(self, req: Request, ui: Progress) -> None:
        self.req = req
        self.ui = ui
        self.board: Board | None = None
        self.undo: list[tuple[str, Callable[[], None]]] = []
        self.t0 = time.monotonic()
        self.rep: dict[str, Any] = {
            "v": reports.REPORT_VERSION,
            "sid": req.sid,
            "result": "running",
            "stage": "check",
            "started_ms": _now_ms(),
            "tool": TOOL,
            "operator": _operator(),
            "port": req.port,
            "chip": req.chip,
            "dry_run": req.dry_run,
            "stages": {},
        }
        self._stage_t = time.monotonic()

    def stage(self, name: str, detail: str = "") -> None:
        prev = self.rep["stage"]
        self.rep["stages"][prev] = round(time.monotonic() - self._stage_t, 3)
        self._stage_t = time.monotonic()
        self.rep["stage"] = name
        self.ui.stage(name, detail)

    # -- the steps --

    def run(self) -> Outcome:
        req = self.req
        try:
            self._check()
            if req.dry_run:
                self.stage("plan")
                self._refuse_unknown_history()
                self._identity(None, None)
                self._build(None)
                return self._finish(ok=True, result="dry-run")
            self._image()
            self._connect()
            self._plan()
            self._copy()
            self._verify()
            self._broker()
            self._selftest()
            self._register()
            self._start()
            return self._finish(ok=True, result="ok")
        except FlashError as e:
            self.rep["error"] = e.message
            self._rollback()
            return self._finish(ok=False, result="failed", code=e.code, error=e.message)
        finally:
            if self.board is not None:
                self.board.close()

    def _check(self) -> None:
        req = self.req
        self.stage("check")
        plan.check_sid(req.sid)
        if not req.dry_run and not req.port:
            raise BadInput("check", "--port is required (or --dry-run)")
        if req.chip != "unix" and req.chip not in plan_chips():
            raise BadInput("check", f"unknown --chip {req.chip}")
        if req.deploy not in DEPLOYS:
            raise BadInput("check", f"--deploy {req.deploy}: want one of {', '.join(DEPLOYS)}")
        # the site alone must make a valid config (a placeholder identity), before any board
        cfg = plan.station_config(
            req.site, sid=req.sid, kid=1, key=bytes(32), boot_base=0, password="x"
        )
        self.deployment: deployment.Deployment | None = None
        self.broker_password = ""
        if req.broker_dir:
            if req.broker_passwd:
                raise BadInput("check", "--broker-dir and --broker-passwd: give one")
            dep = deployment.load(req.broker_dir)
            deployment.check_config(dep, cfg["broker"])
            self.broker_password = deployment.password(dep, req.sid)
            self.deployment = dep
            self.rep["broker"] = {
                "dir": str(dep.dir),
                "host": cfg["broker"]["host"],
                "port": cfg["broker"]["port"],
                "tls": True,
                "ca_sha256": dep.ca_sha256,
                "user": req.sid,
                "password_from": str(pathlib.Path("passwords", "stations", req.sid)),
            }
        self.agent: agentdb.AgentAnswer | None = None
        self.agent_why = "no --agent-db given"
        if req.agent_db:
            try:
                self.agent = agentdb.ask(req.agent_db, req.sid)
            except FlashError as e:
                self.agent_why = e.message
        if self.agent is not None:
            self.rep["agent"] = {"answered": True, **self.agent.as_dict()}
        else:
            self.rep["agent"] = {"answered": False, "why": self.agent_why}
            if not req.dry_run and not req.key_out:
                code = BadInput if not req.agent_db else FlashError
                raise code(
                    "check",
                    f"the key cannot be registered: {self.agent_why}; give "
                    "--agent-db URL (or --key-out FILE to carry the key to the agent)",
                )
        if req.key_out and os.path.exists(req.key_out):
            raise BadInput(
                "check", f"--key-out {req.key_out} exists (a key file is never overwritten)"
            )
        self.evidence = [] if self.agent is not None else local_evidence(req)

    def _image(self) -> None:
        req = self.req
        if not req.image:
            return
        self.stage("image", req.image)
        port = req.esptool_port or req.port
        assert port is not None
        # a unix-port board is a test rig: its image goes to whatever chip answers on the
        # esptool port (esp32-mock-bootloader), unchecked against the REPL board
        chip = None if req.chip == "unix" else req.chip
        res = write_image(port, chip, req.image, offset=req.image_offset, erase=req.erase)
        self.rep["image"] = {
            "chip": res.chip,
            "mac": res.mac,
            "offset": res.offset,
            "size": res.size,
            "sha256": res.sha256,
            "erased": res.erased,
            "seconds": res.seconds,
        }

    def _connect(self) -> None:
        req = self.req
        assert req.port is not None
        self.stage("connect", req.port)
        self.board = Board(req.port, baud=req.baud)
        self.board.open()
        self.stage("probe")
        info = self.board.probe()
        self.rep["board"] = info.as_dict()
        check_chip(info, req.chip)
        self.emits = mpy_cross_emits()
        check_version(info, self.emits)
        self.board.keepalive()
        self.rom = self.board.romfs_query()
        self.rep["board"]["romfs"] = self.rom.as_dict() if self.rom is not None else None

    def _plan(self) -> None:
        req = self.req
        board = self.board
        assert board is not None and board.info is not None
        self.stage("plan")
        files, dirs = board.listing()
        self.board_files, self.board_dirs = files, dirs
        self.old_config: bytes | None = board.read(CONFIG) if CONFIG in files else None
        prev_sid = prev_kid = None
        if self.old_config is not None:
            try:
                prev = json.loads(self.old_config)
                prev_sid, prev_kid = prev.get("sid"), prev.get("kid")
            except (ValueError, AttributeError):
                prev_sid = "?"  # unreadable: treat as another station's
        self.same = prev_sid == req.sid
        self.rep["previous"] = {"sid": prev_sid, "kid": prev_kid}
        # a board of another station (or with leftovers but no readable config): wipe it
        others = [f for f in files if f not in (CONFIG,) and not f.endswith((".py", ".mpy"))]
        self.wipe = (self.old_config is not None and not self.same) or (
            self.old_config is None and bool(others)
        )
        if self.old_config is not None and not self.same and not req.force:
            raise FlashError(
                "plan",
                f"the board holds station {prev_sid}'s config and data; "
                "--force wipes it for this station",
            )
        board_boot = None
        if self.same:
            board_boot = plan.board_boot(
                [d for d in (board.read(p) for p in STATE_FILES if p in files) if d is not None]
            )
            if self.agent is None:
                self.evidence.append("the board holds this station's config")
        self.rep["board_boot"] = board_boot
        self._refuse_unknown_history()
        self._identity(prev_kid if self.same else None, board_boot)
        march = march_for(board.info, self.emits)
        self.image: romfs.Image | None = romfs.build_image(march)
        self.deploy, why = choose_deploy(req.deploy, self.rom, self.image.size)
        if self.deploy != "romfs":
            self.image = None
        self._build(march)
        self.rep["deploy"] = self.deploy
        self.rep["deploy_why"] = why

    def _refuse_unknown_history(self) -> None:
        req = self.req
        if self.agent is None and self.evidence and not req.force:
            why = (
                f"{req.sid} is a known station ({'; '.join(self.evidence)}) and the agent did not "
                f"answer ({self.agent_why}): its highest boot is unknown, so boot_base could "
                "repeat a (sid, boot, seq); give --agent-db, or --force with --boot-base N"
            )
            if req.dry_run:
                self.rep["warning"] = "a real run would be refused: " + why
            else:
                raise FlashError("plan", why)

    def _identity(self, prev_kid: Any, board_boot: int | None) -> None:
        """kid and boot_base: the agent's answer, else the board's and the command line's."""
        req = self.req
        if self.agent is not None:
            kid = self.agent.next_kid
            base = self.agent.boot_base
        else:
            kid = req.kid or (int(prev_kid) + 1 if type(prev_kid) is int else 1)
            base = 0
        if board_boot is not None:  # the board's own counter (undelivered messages included)
            base = max(base, board_boot + 1)
        if req.boot_base is not None:
            base = max(base, req.boot_base)
        self.kid, self.boot_base = kid, base

    def _build(self, march: str | None) -> None:
        req = self.req
        self.key = secrets.token_bytes(32)
        if self.deployment is not None:  # the account the deployment already has
            self.password = self.broker_password
        else:
            self.password = passwd.new_password() if req.broker_passwd else ""
        cfg = plan.station_config(
            req.site,
            sid=req.sid,
            kid=self.kid,
            key=self.key,
            boot_base=self.boot_base,
            password=self.password,
        )
        self.files = plan.firmware_files(march)
        image = getattr(self, "image", None)
        if image is not None:  # the modules are in the image: main.py stays a file
            self.files = {p: d for p, d in self.files.items() if p not in image.files}
        self.files[CONFIG] = plan.config_bytes(cfg)
        self.rep.update(
            {
                "kid": self.kid,
                "boot_base": self.boot_base,
                "config": plan.redacted(cfg),
                "broker_user": req.sid if req.broker_passwd or req.broker_dir else None,
                "files": {p: plan.sha256(d) for p, d in sorted(self.files.items())},
                "firmware": {
                    "version": plan.fw_version(),
                    "build": plan_build_id(),
                    "march": march,
                    "bytes": sum(len(d) for p, d in self.files.items() if p != CONFIG)
                    + (image.size if image is not None else 0),
                },
            }
        )
        if image is not None:
            self.rep["romfs"] = {
                "size": image.size,
                "sha256": image.sha256,
                "files": dict(sorted(image.files.items())),
                "partition": self.rom.size if self.rom is not None else None,
            }
        if req.dry_run and req.deploy == "mpy":
            self.rep["deploy"] = "mpy"
        elif req.dry_run:
            img = romfs.build_image(march)
            self.rep["deploy"] = f"{req.deploy} (decided on the board)"
            self.rep["romfs_image"] = {"size": img.size, "sha256": img.sha256}

    def _copy(self) -> None:
        board = self.board
        assert board is not None
        self.stage("copy")
        files = self.files
        # config.json goes first and comes back last: a board cut off half-way has no config
        # and does not start, rather than starting with new files and an old identity
        board.remove([CONFIG])
        old, same = self.old_config, self.same
        self.undo.append(("board config.json", lambda: self._restore_config(old if same else None)))
        if self.wipe:
            stale = [f for f in self.board_files if f != CONFIG]
            stale_dirs = list(self.board_dirs)
        else:
            # what is flashed is the factory version: an earlier OTA update's versions and
            # state go too, else the board would boot on into them (firmware/ota.py)
            stale = [
                f
                for f in self.board_files
                if (f.endswith((".py", ".mpy")) and f not in files) or _ota_file(f)
            ]
            stale_dirs = [d for d in self.board_dirs if _ota_file(d)]
        board.remove(stale, stale_dirs)
        self.rep["removed"] = sorted(stale)
        need_dirs = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
        board.mkdirs(need_dirs)
        board.keepalive()
        present = [p for p in files if p != CONFIG and p in self.board_files and p not in stale]
        have = board.hashes(present, stage="copy") if present else {}
        todo = [p for p in sorted(files) if p != CONFIG and have.get(p) != plan.sha256(files[p])]
        todo.append(CONFIG)
        total = sum(len(files[p]) for p in todo)
        done = 0
        if self.image is not None:
            done = self._copy_image()
            total += done
        for p in todo:
            board.write(p, files[p], self._bytes_from(done, total))
            done += len(files[p])
            self.ui.bytes(done, total)
        self.rep["firmware"]["written"] = len(todo) - 1
        self.rep["firmware"]["unchanged"] = len(files) - len(todo)

    def _copy_image(self) -> int:
        """The ROMFS image into the partition unless it holds these bytes already; the
        bytes written."""
        board, rom, image = self.board, self.rom, self.image
        assert board is not None and rom is not None and image is not None
        same = rom.image_bytes == image.size and board.romfs_hash(image.size) == image.sha256
        self.rep["romfs"]["written"] = not same
        if same:
            return 0
        if rom.image_bytes is not None:  # nothing may run from /rom while it is rewritten
            board.restart()
            board.keepalive()
        board.romfs_write(rom, image.data, lambda d, n: self.ui.bytes(d, n))
        board.keepalive()
        return image.size

    def _bytes_from(self, base: int, total: int) -> Callable[[int, int], None]:
        def cb(done: int, _size: int) -> None:
            self.ui.bytes(base + done, total)

        return cb

    def _restore_config(self, old: bytes | None) -> None:
        assert self.board is not None
        self.board.remove([CONFIG])
        if old is not None:
            self.board.write(CONFIG, old)

    def _verify(self) -> None:
        board = self.board
        assert board is not None
        self.stage("verify")
        want = {p: plan.sha256(d) for p, d in self.files.items()}
        bad = self._mismatch(want)
        img = self.image
        if img is not None and self.rom is not None and board.romfs_hash(img.size) != img.sha256:
            bad.append(ROMFS_NAME)
        if bad:  # one more write of what differs: a glitch on the line is not a bad flash
            log.warning("rewriting %d file(s) that did not verify: %s", len(bad), ", ".join(bad))
            for p in bad:
                if p == ROMFS_NAME:
                    assert img is not None and self.rom is not None
                    board.romfs_write(self.rom, img.data)
                else:
                    board.write(p, self.files[p])
            bad = self._mismatch(want)
            if img is not None and board.romfs_hash(img.size) != img.sha256:
                bad.append(ROMFS_NAME)
        self.rep["verify"] = {"ok": not bad, "files": len(want), "mismatch": bad}
        if img is not None:
            self.rep["verify"]["romfs_sha256"] = img.sha256 if ROMFS_NAME not in bad else None
        if bad:
            raise FlashError(
                "verify",
                f"verification failed: {len(bad)} file(s) differ on the board "
                f"after a rewrite ({', '.join(bad[:4])}{' …' if len(bad) > 4 else ''})",
            )

    def _mismatch(self, want: dict[str, str]) -> list[str]:
        assert self.board is not None
        got = self.board.hashes(sorted(want))
        return [p for p in sorted(want) if got.get(p) != want[p]]

    def _broker(self) -> None:
        req = self.req
        if not req.broker_passwd:
            return
        self.stage("broker")
        path = req.broker_passwd
        try:
            prev = passwd.set_password(path, req.sid, self.password)
        except OSError as e:
            raise FlashError("broker", f"cannot write {path}: {e.strerror}") from None

        def undo() -> None:
            passwd.set_line(path, req.sid, prev)
            _reload_broker(req)

        self.undo.append((f"broker credentials in {path}", undo))
        self.rep["broker_passwd"] = {"file": path, "action": "updated" if prev else "added"}
        _reload_broker(req)

    def _selftest(self) -> None:
        board = self.board
        assert board is not None
        self.stage("restart")
        board.restart()
        board.keepalive()
        self.stage("selftest")
        res = board.selftest(self.req.selftest_timeout)
        host_ms = _now_ms()
        self.rep["selftest"] = res
        clock = res.get("checks", {}).get("clock", {})
        if isinstance(clock.get("ms"), int):
            self.rep["clock_skew_ms"] = clock["ms"] - host_ms
        if not res.get("ok"):
            raise FlashError("selftest", "self-test failed: " + _selftest_failures(res))
        self._heap()

    def _heap(self) -> None:
        """The heap the station starts with: a fresh interpreter, the running station's
        modules imported (from where they were deployed), gc.collect(). A firmware that
        does not fit (MemoryError) or that runs from elsewhere fails the self-test."""
        board = self.board
        assert board is not None
        board.restart()
        board.keepalive()
        try:
            free, alloc, where = board.heap(romfs.STATION_MODULES)
        except FlashError as e:
            self.rep["heap"] = {"error": e.message}
            hint = " (an ESP32 without PSRAM needs --deploy romfs: docs/hardware.md)"
            raise FlashError(
                "selftest",
                f"the firmware does not import on the board: {e.message}"
                + (hint if "MemoryError" in e.message and self.deploy == "mpy" else ""),
            ) from None
        self.rep["heap"] = {
            "free": free,
            "alloc": alloc,
            "modules": list(romfs.STATION_MODULES),
            "app_from": where,
        }
        if (self.deploy == "romfs") != where.startswith("/rom/"):
            raise FlashError(
                "selftest",
                f"the firmware runs from {where}, not from the {self.deploy} deployment "
                "(a file on the filesystem shadows the ROMFS image, or /rom is not mounted)",
            )

    def _register(self) -> None:
        req = self.req
        self.stage("register")
        if self.agent is not None:
            assert req.agent_db is not None
            agentdb.register(req.agent_db, req.sid, self.key, self.kid)
            self.rep["key_registered"] = f"registered at the agent as kid {self.kid}"
        else:
            assert req.key_out is not None
            try:
                _write_key_file(req.key_out, self.key)
            except OSError as e:
                raise FlashError(
                    "register", f"cannot write --key-out {req.key_out}: {e.strerror}"
                ) from None
            self.rep["key_registered"] = (
                f"NOT registered: written to {req.key_out}; at the agent run "
                f"`stationctl keys add {req.sid} --key-file {req.key_out} --kid {self.kid}`"
            )
        self.undo.clear()  # committed: the station is good

    def _start(self) -> None:
        assert self.board is not None
        self.stage("start")
        try:
            self.rep["start"] = self.board.start()
        except FlashError as e:  # the station is provisioned; say so and move on
            self.rep["start"] = f"could not start the board: {e.message} (power-cycle it)"

    def _rollback(self) -> None:
        done = []
        for name, fn in reversed(self.undo):
            try:
                fn()
                done.append(f"{name}: put back")
            except (FlashError, OSError) as e:
                msg = e.message if isinstance(e, FlashError) else str(e)
                done.append(f"{name}: NOT put back ({msg})")
                log.error("rollback of %s failed: %s", name, msg)
        self.undo.clear()
        if done:
            self.rep["rollback"] = done

    def _finish(self, *, ok: bool, result: str, code: int = 0, error: str | None = None) -> Outcome:
        self.rep["stages"][self.rep["stage"]] = round(time.monotonic() - self._stage_t, 3)
        self.rep["result"] = result
        self.rep["elapsed_s"] = round(time.monotonic() - self.t0, 2)
        paths = None
        if not self.req.dry_run and code != 2:  # bad input touched nothing: nothing to report
            try:
                paths = reports.write(self.req.reports, self.rep)
            except OSError as e:
                log.error("cannot write the report in %s: %s", self.req.reports, e)
        return Outcome(
            sid=self.req.sid,
            ok=ok,
            code=code,
            stage=self.rep["stage"],
            error=error,
            report=self.rep,
            paths=paths,
        )


ROMFS_NAME = "<romfs partition>"


def _ota_file(path: str) -> bool:
    """An OTA update's version folders (fw/…) and state (ota.a, ota.b)."""
    return path in ("fw", "ota.a", "ota.b") or path.startswith("fw/")


def plan_chips() -> tuple[str, ...]:
    from tools.flash.board import CHIPS

    return CHIPS


def plan_build_id() -> str:
    from tools import fwbuild

    return fwbuild.digest()


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"


def provision(req: Request, ui: Progress | None = None) -> Outcome:
    """Provision one board; never raises FlashError (the outcome says what happened)."""
    return _Run(req, ui or NoProgress()).run()
