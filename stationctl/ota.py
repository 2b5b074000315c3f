"""`stationctl ota`: firmware updates over MQTT (CONTRACT §10, firmware/ota.py).

    stationctl ota build --version V --out DIR [--key-file F --sid SID [--kid N]]
    stationctl ota push --version-dir DIR (--station SID … | --fleet) --db URL
        --broker HOST[:PORT] [--canary N|P% [--rest N|P%|all]] [--timeout S] …
    stationctl ota status --db URL

A version folder (`build`) holds the firmware as it goes onto a board (tools/fwbuild.py: every
module as .mpy; main.py, the boot wrapper, is never part of an update) under DIR/files/ and
DIR/manifest.json: {"ver", "files": [[path, size, sha256 hex], …]}. Stations verify no
asymmetric signature (MicroPython has neither Ed25519 nor ECDSA verification), so the manifest
is signed at push time for each station with its own key from the agent database, as the
command `{"v":1,"sid","kid","cmd":"ota","ver","iat","exp","confirm_s","trial_s","boots",
"files","sig"}` on stations/<sid>/cmd. The station asks for chunks on stations/<sid>/ota and
the pusher answers on its cmd topic, each chunk with its own MAC (see firmware/ota.py).

Exit status: 0 every station confirmed, 2 bad usage or input, 1 a station refused, rolled
back or timed out (named on stderr; later waves are not started).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import pathlib
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from stationctl.errors import UsageError

PROTECTED = ("main.py",)  # the boot wrapper: never updated over the air
CHUNK = 4096


def register(sub: Any) -> None:
    p = sub.add_parser("ota", help="firmware updates over MQTT: build, push in waves, status")
    osub = p.add_subparsers(dest="ota_cmd", required=True, metavar="ACTION")
    b = osub.add_parser("build", help="a version folder: the firmware's files and its manifest")
    b.add_argument("--version", required=True, help="the version name (A-Za-z0-9._+-, ≤ 32)")
    b.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new)")
    b.add_argument("--src", metavar="DIR", help=argparse.SUPPRESS)  # a firmware tree (tests)
    b.add_argument("--key-file", metavar="F", help="also sign the manifest for one station")
    b.add_argument("--sid", help="the station --key-file belongs to")
    b.add_argument("--kid", type=int, default=1, help="its key version (default 1)")
    b.set_defaults(func=run_build)

    q = osub.add_parser("push", help="push a version to stations, canaries first")
    q.add_argument("--version-dir", required=True, metavar="DIR", help="written by `ota build`")
    who = q.add_mutually_exclusive_group(required=True)
    who.add_argument("--station", action="append", metavar="SID", help="a station (repeat)")
    who.add_argument("--fleet", action="store_true", help="every station with an active key")
    q.add_argument("--db", required=True, metavar="URL", help="the agent database (keys)")
    q.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST[:PORT]")
    q.add_argument("--user", help="the operator's broker account")
    q.add_argument("--password-file", metavar="F", help="its password, in a file")
    q.add_argument("--cafile", metavar="F", help="the broker's CA (PEM): TLS")
    q.add_argument("--prefix", default="stations")
    q.add_argument("--canary", metavar="N|P%", help="the first wave: N stations or P %%")
    q.add_argument("--rest", default="all", metavar="N|P%|all", help="later waves' size")
    q.add_argument("--confirm-s", type=int, default=60, help="healthy window before confirming")
    q.add_argument("--trial-s", type=int, default=300, help="trial deadline (rolls back)")
    q.add_argument("--boots", type=int, default=3, help="trial boots before rolling back")
    q.add_argument("--timeout", type=float, default=900.0, help="seconds per wave")
    q.set_defaults(func=run_push)

    s = osub.add_parser("status", help="each station's version and its last ota event")
    s.add_argument("--db", required=True, metavar="URL", help="the agent database")
    s.add_argument("--json", action="store_true", help="one JSON object per station")
    s.set_defaults(func=run_status)


# ---- build --------------------------------------------------------------------------------


def version_ok(v: str) -> bool:
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+")
    return 0 < len(v) <= 32 and set(v) <= ok


def build_version(
    version: str, out: pathlib.Path, src: pathlib.Path | None = None
) -> dict[str, Any]:
    """Compile the firmware (tools/fwbuild.py, as for flashing) into out/files/ and write
    out/manifest.json; returns the manifest."""
    from tools import fwbuild

    if not version_ok(version):
        raise UsageError(f"bad version {version!r}: 1..32 of A-Za-z0-9._+-")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty")
    with tempfile.TemporaryDirectory() as tmp:
        built = fwbuild.build(pathlib.Path(tmp) / "fw", src=src or fwbuild.FIRMWARE)
        files_dir = out / "files"
        entries = []
        for p in sorted(built.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(built).as_posix()
            if rel in PROTECTED:
                continue
            data = p.read_bytes()
            (files_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, files_dir / rel)
            entries.append([rel, len(data), hashlib.sha256(data).hexdigest()])
    man = {"ver": version, "files": entries}
    (out / "manifest.json").write_text(json.dumps(man, indent=1) + "\n")
    return man


def load_version(vdir: pathlib.Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the files' bytes, every file checked against its hash."""
    try:
        man = json.loads((vdir / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{vdir}/manifest.json: {e}") from None
    blobs: dict[str, bytes] = {}
    for path, size, sha in man["files"]:
        data = (vdir / "files" / path).read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise UsageError(f"{vdir}/files/{path} does not match the manifest")
        blobs[path] = data
    return man, blobs


def sign_obj(obj: dict[str, Any], key: bytes) -> bytes:
    """CONTRACT §5.5 over compact JSON (sorted keys, as the firmware's wire module writes)."""
    from agent.wire import sign

    return sign(json.dumps(obj, separators=(",", ":"), sort_keys=True).encode(), key)


def signed_manifest(
    man: dict[str, Any],
    sid: str,
    kid: int,
    key: bytes,
    *,
    iat: int | None = None,
    confirm_s: int = 60,
    trial_s: int = 300,
    boots: int = 3,
) -> bytes:
    iat = int(time.time() * 1000) if iat is None else iat
    obj = {
        "v": 1,
        "sid": sid,
        "kid": kid,
        "cmd": "ota",
        "ver": man["ver"],
        "iat": iat,
        "exp": iat + 86400000,
        "nonce": f"ota-{iat}",
        "confirm_s": confirm_s,
        "trial_s": trial_s,
        "boots": boots,
        "files": man["files"],
    }
    return sign_obj(obj, key)


def chunk(key: bytes, iat: int, f: int, off: int, sha: str, data: bytes) -> bytes:
    head = b"OTA1 %d %d %d %s" % (iat, f, off, sha.encode())
    mac = hmac.new(key, head + b"\n" + data, "sha256").hexdigest().encode()
    return head + b" " + mac + b"\n" + data


def run_build(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out)
    man = build_version(args.version, out, pathlib.Path(args.src) if args.src else None)
    total = sum(e[1] for e in man["files"])
    if args.key_file:
        if not args.sid:
            raise UsageError("--key-file needs --sid")
        from stationctl.keys import _read_key

        key = _read_key(args.key_file)
        (out / f"manifest.{args.sid}.signed").write_bytes(
            signed_manifest(man, args.sid, args.kid, key)
        )
    print(f"{args.version}: {len(man['files'])} files, {total} bytes in {out}")
    return 0


# ---- push ---------------------------------------------------------------------------------


@dataclass
class Target:
    sid: str
    kid: int
    key: bytes
    iat: int = 0
    phases: list[str] = field(default_factory=list)
    outcome: str | None = None  # confirmed | rolled_back | refused | timeout
    why: str | None = None
    chunks: int = 0
    t0: float = 0.0
    t_end: float = 0.0
    t_last_chunk: float = 0.0  # when the last chunk was handed to the broker
    # (boot, seq) the station was at when it first asked for chunks: an outcome made before
    # it is an earlier update's (events are emitted at least once: a cut repeats one)
    mark: tuple[int, int] | None = None


class Pusher:
    """One MQTT connection that pushes a version to stations and watches their ota events."""

    def __init__(
        self,
        version_dir: pathlib.Path,
        keys: dict[str, tuple[int, bytes]],
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        prefix: str = "stations",
        user: str | None = None,
        password: str | None = None,
        cafile: str | None = None,
        confirm_s: int = 60,
        trial_s: int = 300,
        boots: int = 3,
        log: Any = None,
        chunk_delay: float = 0.0,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.man, self.blobs = load_version(version_dir)
        self.ver = self.man["ver"]
        self.keys = keys
        self.prefix = prefix
        self.confirm_s, self.trial_s, self.boots = confirm_s, trial_s, boots
        self.targets: dict[str, Target] = {}
        self.errors: list[str] = []  # what a callback raised (a bad request or event)
        self.lock = threading.Condition()
        self.log = log
        self.chunk_delay = chunk_delay  # seconds between chunks (tests: a slower download)
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"ota-push-{int(time.time() * 1000) % 10**9}",
            clean_session=True,
        )
        self.c.max_inflight_messages_set(64)
        if user:
            self.c.username_pw_set(user, password)
        if cafile:
            self.c.tls_set(ca_certs=cafile)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect
        self._connected = threading.Event()
        self.c.connect(host, port, 30)
        self.c.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise OSError(f"cannot connect to the broker at {host}:{port}")

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        c.subscribe([(f"{self.prefix}/+/ota", 1), (f"{self.prefix}/+/event", 1)])
        self._connected.set()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.errors.append(f"disconnected: {rc}")

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 3:
            return
        sid, kind = parts[-2], parts[-1]
        with self.lock:
            t = self.targets.get(sid)
        if t is None or t.outcome is not None:
            return
        try:
            if kind == "ota":
                self._serve(t, json.loads(msg.payload))
            elif kind == "event":
                self._event(t, msg.payload)
        except Exception as e:  # noqa: BLE001  (a callback must never end paho's loop)
            self.errors.append(f"{sid} {kind}: {type(e).__name__}: {e}")

    def _serve(self, t: Target, req: dict[str, Any]) -> None:
        if req.get("iat") != t.iat or req.get("ver") != self.ver:
            return
        if t.mark is None and "boot" in req:
            t.mark = (int(req["boot"]), int(req["seq"]))
        f, off, n = int(req["f"]), int(req["off"]), min(int(req.get("n", 8)), 32)
        files = self.man["files"]
        while n > 0 and f < len(files):
            path, size, sha = files[f]
            if off >= size:
                f, off = f + 1, 0
                continue
            data = self.blobs[path][off : off + CHUNK]
            self.c.publish(
                f"{self.prefix}/{t.sid}/cmd", chunk(t.key, t.iat, f, off, sha, data), qos=1
            )
            t.chunks += 1
            t.t_last_chunk = time.monotonic()
            off += len(data)
            if self.chunk_delay:
                time.sleep(self.chunk_delay)
            n -= 1

    def _event(self, t: Target, payload: bytes) -> None:
        from agent.wire import StaticKeys, WireError, verify

        try:
            v = verify("event", t.sid, payload, StaticKeys({(t.sid, t.kid): t.key}))
        except WireError:
            return
        b = v.body
        if b.get("ev") != "ota":
            return
        phase, frm, to, why = b.get("phase"), b.get("from"), b.get("to"), b.get("why")
        outcome = None
        if phase != "refused" and (t.mark is None or (v.boot, v.seq) <= t.mark):
            return  # made before this push's download began
        if phase == "confirmed" and to == self.ver:
            outcome = "confirmed"
        elif phase == "rolled_back" and frm == self.ver:
            outcome = "rolled_back"
        elif phase == "refused" and to in (self.ver, "?"):
            outcome = "confirmed" if why == "same" else "refused"
        elif to != self.ver:
            return
        with self.lock:
            t.phases.append(str(phase) if not why else f"{phase}({why})")
            if self.log:
                self.log(f"{t.sid}: {phase}" + (f" ({why})" if why else ""))
            if outcome is not None:
                t.outcome, t.why, t.t_end = outcome, why, time.monotonic()
                self.lock.notify_all()

    def push(self, sids: list[str], timeout: float) -> dict[str, Target]:
        """Send the manifest to each station and wait until each confirmed, refused, rolled
        back, or the timeout passed."""
        now = int(time.time() * 1000)
        wave: dict[str, Target] = {}
        for i, sid in enumerate(sids):
            kid, key = self.keys[sid]
            t = Target(sid, kid, key, iat=now + i, t0=time.monotonic())
            wave[sid] = t
            with self.lock:
                self.targets[sid] = t
            m = signed_manifest(
                self.man,
                sid,
                kid,
                key,
                iat=t.iat,
                confirm_s=self.confirm_s,
                trial_s=self.trial_s,
                boots=self.boots,
            )
            self.c.publish(f"{self.prefix}/{sid}/cmd", m, qos=1)
        deadline = time.monotonic() + timeout
        with self.lock:
            while any(t.outcome is None for t in wave.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.lock.wait(min(left, 0.5))
            for t in wave.values():
                if t.outcome is None:
                    t.outcome, t.t_end = "timeout", time.monotonic()
        return wave


def share(spec: str, n: int) -> int:
    """N or P% of n stations (at least 1)."""
    s = spec.strip()
    try:
        k = math.ceil(n * float(s[:-1]) / 100) if s.endswith("%") else int(s)
    except ValueError:
        raise UsageError(f"bad share {spec!r}: N or P%") from None
    if k < 1:
        raise UsageError(f"bad share {spec!r}: at least one station")
    return min(k, n)


def waves(sids: list[str], canary: str | None, rest: str) -> list[list[str]]:
    if canary is None:
        return [sids]
    k = share(canary, len(sids))
    out = [sids[:k]]
    left = sids[k:]
    size = len(left) if rest == "all" else share(rest, len(left)) if left else 0
    while left:
        out.append(left[:size])
        left = left[size:]
    return out


def rollout(
    pusher: Pusher, sids: list[str], canary: str | None, rest: str, timeout: float, out: Any = None
) -> tuple[int, list[str]]:
    """Push wave after wave; stop at the first wave where a station did not confirm.
    Returns (exit status, the stations that failed)."""
    out = out or sys.stdout
    for i, wave in enumerate(waves(sids, canary, rest)):
        name = "canary" if canary is not None and i == 0 else f"wave {i + 1}"
        print(f"{name}: {', '.join(wave)}", file=out, flush=True)
        res = pusher.push(wave, timeout)
        failed = []
        for t in res.values():
            took = t.t_end - t.t0
            print(
                f"  {t.sid}: {t.outcome}"
                + (f" ({t.why})" if t.why else "")
                + f" after {took:.1f} s, {t.chunks} chunks served",
                file=out,
                flush=True,
            )
            if t.outcome != "confirmed":
                failed.append(t.sid)
        if failed:
            return 1, failed
    return 0, []


def _broker(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    if not host:
        return spec, 1883
    try:
        return host, int(port)
    except ValueError:
        raise UsageError(f"bad --broker {spec!r}: HOST[:PORT]") from None


def _keys(db: str, sids: list[str] | None) -> dict[str, tuple[int, bytes]]:
    from agent.keys import KeyStore
    from stationctl.dbopen import open_store

    store = open_store(db, readonly=True)
    out: dict[str, tuple[int, bytes]] = {}
    with KeyStore(store) as ks:
        if sids is None:
            sids = sorted({k.sid for k in ks.list() if k.state == "active"})
        for sid in sids:
            cur = ks.current(sid)
            if cur is None:
                raise UsageError(f"{sid}: no active key in {db}")
            out[sid] = cur
    store.close()
    return out


def run_push(args: argparse.Namespace) -> int:
    keys = _keys(args.db, None if args.fleet else list(dict.fromkeys(args.station)))
    if not keys:
        raise UsageError("no stations to push to")
    host, port = _broker(args.broker)
    password = None
    if args.password_file:
        password = pathlib.Path(args.password_file).read_text().strip()
    try:
        p = Pusher(
            pathlib.Path(args.version_dir),
            keys,
            host,
            port,
            prefix=args.prefix,
            user=args.user,
            password=password,
            cafile=args.cafile,
            confirm_s=args.confirm_s,
            trial_s=args.trial_s,
            boots=args.boots,
            log=lambda s: print("  " + s, flush=True),
        )
    except OSError as e:
        print(f"stationctl ota push: {e}", file=sys.stderr)
        return 1
    try:
        code, failed = rollout(p, list(keys), args.canary, args.rest, args.timeout)
    finally:
        p.close()
    if failed:
        print(
            f"stationctl ota push: {p.ver} failed on {', '.join(failed)}; later waves not started",
            file=sys.stderr,
        )
    return code


# ---- status -------------------------------------------------------------------------------


def fleet_status(db: str) -> list[dict[str, Any]]:
    """Per station: the firmware of its newest boot event and its newest ota event."""
    from agent.wire import decode_record
    from stationctl.dbopen import open_store

    store = open_store(db, readonly=True)
    try:
        q = store.db.execute
        tops = q("SELECT sid, MAX(boot) FROM raw GROUP BY sid ORDER BY sid").fetchall()
        out = []
        for sid, top in tops:
            rows = q(
                "SELECT boot, seq, record FROM raw WHERE sid = ? AND kind = 'event' AND boot >= ? "
                "ORDER BY boot, seq",
                (sid, int(top) - 50),
            ).fetchall()
            fw = boot = ota = None
            for b, _s, rec in rows:
                body = decode_record(bytes(rec))
                if body.get("ev") == "boot":
                    fw, boot = body.get("fw"), int(b)
                elif body.get("ev") == "ota":
                    ota = {k: body.get(k) for k in ("phase", "from", "to", "why")}
                    ota["boot"] = int(b)
            out.append({"sid": sid, "fw": fw, "boot": boot, "ota": ota})
        return out
    finally:
        store.close()


def run_status(args: argparse.Namespace) -> int:
    rows = fleet_status(args.db)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"{'station':<16} {'firmware':<14} {'boot':>6}  last ota event")
    for r in rows:
        o = r["ota"]
        ev = "-"
        if o:
            ev = f"{o['phase']} {o['from']} -> {o['to']}" + (f" ({o['why']})" if o["why"] else "")
        print(
            f"{r['sid']:<16} {r['fw'] or '?':<14} {r['boot'] if r['boot'] is not None else '-':>6}  {ev}"
        )
    return 0
