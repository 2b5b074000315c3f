"""Firmware updates over MQTT (CONTRACT §10, firmware/ota.py): version folders, the
manifest signed per station, chunks with their MACs, the pusher that serves a wave of
stations, and rollouts in waves. `stationctl ota` (stationctl/ota.py) is its command line.

A version folder (`build_version`) holds the firmware as it goes onto a board
(tools/fwbuild.py: every module as .mpy; main.py, the boot wrapper, is never part of an
update) under DIR/files/ and DIR/manifest.json: {"ver", "files": [[path, size, sha256 hex],
…]}. Stations verify no asymmetric signature (MicroPython has neither Ed25519 nor ECDSA
verification), so the manifest is signed at push time for each station with its own key, as
the command `{"v":1,"sid","kid","cmd":"ota","ver","iat","exp","confirm_s","trial_s","boots",
"files","sig"}` on stations/<sid>/cmd. The station asks for chunks on stations/<sid>/ota and
the pusher answers on its cmd topic, each chunk with its own MAC.
"""

from __future__ import annotations

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


class OtaError(ValueError):
    """Bad input: a version, a version folder, a share of stations (the command's exit 2)."""


PROTECTED = ("main.py",)  # the boot wrapper: never updated over the air
CHUNK = 4096


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
        raise OtaError(f"bad version {version!r}: 1..32 of A-Za-z0-9._+-")
    if out.exists() and any(out.iterdir()):
        raise OtaError(f"{out} exists and is not empty")
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
        raise OtaError(f"{vdir}/manifest.json: {e}") from None
    blobs: dict[str, bytes] = {}
    for path, size, sha in man["files"]:
        data = (vdir / "files" / path).read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise OtaError(f"{vdir}/files/{path} does not match the manifest")
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
        raise OtaError(f"bad share {spec!r}: N or P%") from None
    if k < 1:
        raise OtaError(f"bad share {spec!r}: at least one station")
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
