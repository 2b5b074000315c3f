# Firmware updates (CONTRACT §10): a signed manifest, its files fetched over MQTT in
# resumable chunks, staged in the inactive version folder, booted on trial, confirmed after a
# healthy window or rolled back by the station itself. See docs/firmware.md "Updates (OTA)".
#
# Two version folders stand in for partitions: <root>/fw/a and <root>/fw/b. The files beside
# main.py (the image flashed at commissioning, "factory") are the version when neither is
# active. main.py (the boot wrapper) is never updated by OTA: it calls boot() before any
# other firmware module is imported, picks the folder, and falls back by itself.
#
# State, one power-safe A/B record (persist.ABStore "ota": ota.a / ota.b, CRC32 + sequence):
#   act   "a" | "b" | None   the confirmed version's folder (None: factory)
#   ver   its version (None: factory, whose app.FW_VERSION names it)
#   try   "a" | "b" | None   a version staged and on trial (booted until confirmed)
#   tver  its version; boots: trial boots so far; crash: trial crashes seen by main.py
#   max   trial boots allowed; cfm, tms: confirm window and trial deadline (ms)
#   dl    None | {"s": folder, "ver", "iat", "f": file index, "off": bytes done}
#   iat   the newest manifest accepted (issue time, ms): an older one is a replay
#   pend  ota events still to emit ([phase, from, to, why]): emitted at least once
# The energy registers, the boot counter, config.json, keys, nonces and the outbox live in
# other files at the root and are never written here.
#
# Wire (all QoS 1): the manifest on stations/<sid>/cmd, a signed command
#   {"v":1,"sid","kid","cmd":"ota","ver","iat","exp","confirm_s","trial_s","boots",
#    "files":[[path,size,sha256 hex],...],"sig"}
# the station's requests on stations/<sid>/ota (the station's write ACL covers it, the agent
# does not subscribe to it): {"sid","ver","iat","f","off","n"}; the chunks on stations/<sid>/cmd:
#   b"OTA1 <iat> <f> <off> <file sha256 hex> <mac hex>\n" + data
# mac = HMAC-SHA256(station key, b"OTA1 <iat> <f> <off> <sha>\n" + data). A chunk for another
# place than the one the station is at is ignored (duplicates, stale windows); one with a bad
# mac is refused and not written; a file whose bytes do not hash to the manifest's sha256
# refuses the whole update (the staging folder is wiped, nothing else changes).
import binascii
import gc
import hashlib
import os
import sys

import persist
import timebase

# wire and hmac_sha256 are imported by the running station's side only: main.py imports this
# module to pick the version, then lets go of it (the sampling-only firmware has no heap to spare)

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef,misc]
        return x


IMAGE = "@image"  # a manifest entry for the MicroPython image itself (hal ImageWriter)
MAX_BOOTS = const(3)  # trial boots without a confirmation before rolling back
CHUNK = const(4096)  # bytes of data per chunk (the MQTT client takes packets up to 8 KB)
WINDOW = const(8)  # chunks asked for at a time
_REQ_MS = const(3000)  # ask again when nothing arrived for this long
_PEND_MAX = const(8)
_FILES_MAX = const(64)
_NAME_OK = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
# never part of an update, whatever a manifest says
_PROTECTED = ("main.py", "config.json", "fw", "outbox")
PHASES = ("staged", "trial", "confirmed", "rolled_back", "refused")

try:
    from typing import Any  # noqa: F401
except ImportError:  # MicroPython: annotations only
    pass


def _empty():
    return {
        "act": None,
        "ver": None,
        "try": None,
        "tver": None,
        "boots": 0,
        "crash": 0,
        "max": MAX_BOOTS,
        "cfm": 60000,
        "tms": 300000,
        "dl": None,
        "iat": 0,
        "pend": [],
    }


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _isdir(path):
    try:
        return os.stat(path)[0] & 0x4000 != 0
    except OSError:
        return False


def rmtree(path):
    """Remove a folder and everything in it (bounded by the folder's size; no recursion
    deeper than the firmware's own layout, hal/)."""
    if not _exists(path):
        return
    if not _isdir(path):
        os.remove(path)
        return
    for name in os.listdir(path):
        rmtree(path + "/" + name)
    os.rmdir(path)


def makedirs(path):
    cur = ""
    for part in path.split("/"):
        if not part:
            if not cur:
                cur = "/"
            continue
        cur = cur + part if cur in ("", "/") else cur + "/" + part
        if part != "." and not _exists(cur):
            os.mkdir(cur)


def version_ok(v):
    if type(v) is not str or not 0 < len(v) <= 32:
        return False
    for c in v.encode():
        if c not in _NAME_OK and c != 43:  # '+'
            return False
    return True


def path_ok(p):
    """A relative path of the firmware's layout: names of [A-Za-z0-9._-], no '..', at most one
    folder deep, not a protected name (config, keys, counters, outbox, the boot wrapper)."""
    if p == IMAGE:
        return True
    if type(p) is not str or not 0 < len(p) <= 64:
        return False
    parts = p.split("/")
    if len(parts) > 2:
        return False
    for part in parts:
        if not part or part[0] == ".":
            return False
        for c in part.encode():
            if c not in _NAME_OK:
                return False
    top = parts[0]
    if top in _PROTECTED:
        return False
    return not (len(parts) == 1 and top[-2:] in (".a", ".b"))  # the A/B records


def sha256_file(path, size=None, h=None):
    """sha256 object over the first `size` bytes of a file (all when None), read 1 KB at a time."""
    if h is None:
        h = hashlib.sha256()
    buf = bytearray(1024)
    mv = memoryview(buf)
    left = size
    with open(path, "rb") as f:
        while left is None or left > 0:
            n = f.readinto(buf)
            if not n:
                break
            if left is not None and n > left:
                n = left
            h.update(mv[:n])
            if left is not None:
                left -= n
    return h


def _equal(a, b):
    from hmac_sha256 import equal

    return equal(a, b)


def _hex(h):
    return binascii.hexlify(h.digest()).decode()


class State:
    """The OTA record (see the top of this file) in <root>/ota.a|b."""

    def __init__(self, root="."):
        self.root = root
        self.store = persist.ABStore(root, "ota", 4096)
        d = None
        try:
            d = self.store.load()
        except (OSError, ValueError):
            d = None
        base = _empty()
        if type(d) is dict:
            for k in base:
                if k in d:
                    base[k] = d[k]
        self.d = base

    def save(self):
        self.store.save(self.d)

    def folder(self, slot):
        return self.root + "/fw/" + slot

    def pend(self, phase, frm, to, why=None):
        p = self.d["pend"]
        p.append([phase, frm, to, why])
        while len(p) > _PEND_MAX:
            p.pop(0)


# ---- boot (called by main.py before anything else) ------------------------------------------


def Boot(path, ver, trial):  # noqa: N802
    """What main.py boots: (path, ver, trial, sys.path as it was): path a version folder, or
    None for the factory files beside main.py; ver None for the factory's; trial when booting
    a version on trial. A plain tuple: nothing of this module stays alive in main.py."""
    return (path, ver, trial, list(sys.path))


def forget():
    """Let go of every module imported since main.py started (the frozen asyncio stays)."""
    for name in list(sys.modules):
        if name != "__main__" and not name.startswith("asyncio"):
            del sys.modules[name]
    gc.collect()


def enter(sel):
    """sys.path for the version sel names: its folder first and alone (the factory files
    beside main.py are no fallback for a module missing from a version), then what the port
    adds (frozen modules, lib); the modules imported so far are let go of."""
    path0 = sel[3]
    if sel[0] is not None:
        here = path0[0] if path0 else ""
        sys.path.clear()
        sys.path.append(sel[0])
        for p in path0:
            if p not in (here, "", "."):
                sys.path.append(p)
    forget()


def fallback(sel, e):
    """The version sel names did not import: a trial is rolled back for good (why=import); a
    confirmed version gone bad (flash damage) gives way to the factory files for this boot.
    Returns the new selection, already entered."""
    print("station: version %s does not import (%r): falling back" % (sel[1], e))
    new = fail_now("import") if sel[2] else Boot(None, None, False)
    new = (new[0], new[1], new[2], sel[3])
    enter(new)
    return new


def reset(code):
    """Reboot: the board resets; the unix port exits (its supervisor starts it again)."""
    if sys.platform == "esp32":
        from hal import esp32  # the only layer that touches machine (hal/__init__.py)

        esp32.reboot()
    sys.exit(code)


def _rollback(s, why):
    d = s.d
    s.pend("rolled_back", d["tver"], d["ver"], why)
    d["try"] = None
    d["tver"] = None
    d["boots"] = 0
    d["crash"] = 0


def boot(root="."):
    """Pick the version to boot. A trial boot is counted on flash first; past `max` trial
    boots without a confirmation the trial is abandoned (rolled_back, why crash or
    unconfirmed) and the confirmed version boots. A flash that cannot record the count boots
    the confirmed version (a trial that cannot be counted could loop forever)."""
    s = State(root)
    d = s.d
    if d["try"] is not None:
        d["boots"] += 1
        if d["boots"] > d["max"]:
            _rollback(s, "crash" if d["crash"] else "unconfirmed")
        elif d["boots"] == 1:
            s.pend("trial", d["ver"], d["tver"])
        try:
            s.save()
        except (OSError, ValueError):
            return Boot(_active(s), d["ver"], False)
        if d["try"] is not None:
            if _isdir(s.folder(d["try"])):
                return Boot(s.folder(d["try"]), d["tver"], True)
            return fail_now("missing", root)
    return Boot(_active(s), d["ver"], False)


def _active(s):
    a = s.d["act"]
    if a is None or not _isdir(s.folder(a)):
        return None
    return s.folder(a)


def fail_now(why, root="."):
    """The trial failed in a way that will not get better by booting it again (its modules do
    not import, it refuses the configuration): roll back now. Returns the Boot to use."""
    s = State(root)
    if s.d["try"] is not None:
        _rollback(s, why)
        try:
            s.save()
        except (OSError, ValueError):
            pass
    return Boot(_active(s), s.d["ver"], False)


def crashed(root="."):
    """main.py saw the running trial raise: counted, so a rollback says why=crash."""
    s = State(root)
    if s.d["try"] is not None:
        s.d["crash"] += 1
        try:
            s.save()
        except (OSError, ValueError):
            pass


# ---- the running station's side ------------------------------------------------------------


class OtaError(Exception):
    def __init__(self, why, msg=""):
        super().__init__(msg or why)
        self.why = why


def parse_manifest(payload, key, sid, kid):
    """Verify and check a manifest command; returns its object. Raises OtaError(why)."""
    import wire

    try:
        m = wire.verify(payload, key)
    except wire.WireError as e:
        raise OtaError("bad_sig" if e.code in ("bad_sig", "unsigned") else "malformed", str(e))
    if m.get("cmd") != "ota" or m.get("v") != 1:
        raise OtaError("malformed", "not an ota command")
    if m.get("sid") != sid:
        raise OtaError("wrong_sid", "manifest for %s" % m.get("sid"))
    if m.get("kid") != kid:
        raise OtaError("bad_sig", "kid is not this station's key version")
    if not version_ok(m.get("ver")):
        raise OtaError("malformed", "bad version")
    for k in ("iat", "exp", "confirm_s", "trial_s", "boots"):
        v = m.get(k)
        if type(v) is not int or v < 0:
            raise OtaError("malformed", "%s must be a non-negative int" % k)
    if not 1 <= m["boots"] <= 10 or not 1 <= m["confirm_s"] <= m["trial_s"] <= 86400:
        raise OtaError("malformed", "boots 1..10, 1 <= confirm_s <= trial_s <= 86400")
    files = m.get("files")
    if type(files) is not list or not 0 < len(files) <= _FILES_MAX:
        raise OtaError("malformed", "files")
    seen = []
    for ent in files:
        if (
            type(ent) is not list
            or len(ent) != 3
            or not path_ok(ent[0])
            or type(ent[1]) is not int
            or not 0 <= ent[1] <= 4000000
            or type(ent[2]) is not str
            or len(ent[2]) != 64
        ):
            raise OtaError("malformed", "file entry %r" % (ent,))
        if ent[0] in seen:
            raise OtaError("malformed", "file %s twice" % ent[0])
        seen.append(ent[0])
    if "app.mpy" not in seen and "app.py" not in seen:
        raise OtaError("malformed", "no app module")
    return m


class Ota:
    """The running version's OTA task. attach(uplink) routes the ota messages of the cmd
    topic here (everything else goes on to the uplink); run() asks for chunks, stages, and
    watches a trial until it confirms or rolls it back."""

    def __init__(self, cfg, st, key, running, root=".", reboot=None, board=None):
        from hmac_sha256 import Hmac

        self.cfg = cfg
        self.st = st
        self.root = root
        self.key = key
        self.mac = Hmac(key)
        self.sid = cfg["sid"]
        self.kid = cfg["kid"]
        self.running = running
        self.reboot = reboot
        self.board = board
        self.s = State(root)
        self.trial = self.s.d["try"] is not None
        self.up = None
        self.req_topic = cfg["broker"]["prefix"] + "/" + self.sid + "/ota"
        self.cmd_topic = cfg["broker"]["prefix"] + "/" + self.sid + "/cmd"
        self.files = None  # type: Any  # the download's manifest file list
        self._man = None  # type: Any
        self._h = None  # type: Any  # sha256 of the current file's bytes so far
        self._hpos = (-1, -1)  # (file, offset) _h is at
        self._got = 0  # chunks since the last request
        self._req_at = None  # ticks of the last request
        self._complete = False  # every byte is on flash: verify and mark trial
        self._refused_chunk = False  # one refused event per download for bad chunks
        self._emitted = False
        self._t_id = None  # outbox id of the first telemetry of a trial after its window
        self._img = None  # type: Any  # the board's ImageWriter, for an "@image" entry
        self.refused = 0
        self.chunks = 0
        self.phase = None  # last phase emitted (for tracing)
        self._t0 = st.uptime.ms()  # the trial's clock (a restarted task keeps it)
        self._last_cycles = st.cycles
        self._last_adv = self._t0
        self._npend = 0  # entries of pend already emitted in this boot
        dl = self.s.d["dl"]
        if dl is not None:
            try:
                self._load_download()
            except (OSError, ValueError, OtaError):
                self._abandon()

    # -- messages ---------------------------------------------------------------------------
    def attach(self, up):
        """Take the cmd topic's messages before the uplink does (the station reads only its
        cmd topic: the broker's ACL)."""
        self.up = up
        fwd = up.client.on_message
        own = self

        def on_message(topic, payload, retain):
            if topic == own.cmd_topic:
                head = bytes(payload[:5])
                if head == b"OTA1 ":
                    own.on_chunk(payload)
                    return
                if head[:1] == b"{" and bytes(payload).find(b'"cmd":"ota"') >= 0:
                    own.on_manifest(bytes(payload))
                    return
            fwd(topic, payload, retain)

        up.client.on_message = on_message
        # the first telemetry of a trial after its confirm window: what the broker must ack
        make = up.emit_telemetry

        def emit_telemetry():
            make()
            if own.trial and own._t_id is None and own._elapsed() >= own.s.d["cfm"]:
                own._t_id = up.outbox._next - 1

        up.emit_telemetry = emit_telemetry

    def event(self, phase, frm, to, why=None):
        ev = {"ev": "ota", "phase": phase, "from": frm or self.running, "to": to or self.running}
        if why:
            ev["why"] = why
        self.st.emit(ev)
        self.phase = phase

    def _refuse(self, why, ver, msg=""):
        self.refused += 1
        self.event("refused", self.running, ver if version_ok(ver) else "?", why)
        print("ota: refused (%s) %s" % (why, msg))

    def on_manifest(self, payload):
        ver = None
        try:
            m = parse_manifest(payload, self.key, self.sid, self.kid)
            ver = m["ver"]
            d = self.s.d
            dl = d["dl"]
            if dl is not None and dl["iat"] == m["iat"] and dl["ver"] == ver:
                self._req_at = None  # the same push again: carry on where we are
                return
            if (
                dl is not None
                and dl["ver"] == ver
                and m["files"] == self.files
                and m["iat"] > d["iat"]
            ):
                self._renew(m, payload)  # a pusher started again: keep the bytes we have
                return
            if m["iat"] <= d["iat"]:
                raise OtaError("replay", "issued %d, not after %d" % (m["iat"], d["iat"]))
            now = self.up.clock.now_ms() if self.up is not None else None
            if now is not None and now > m["exp"]:
                raise OtaError("expired", "exp %d" % m["exp"])
            if d["try"] is not None:
                raise OtaError("busy", "a trial is running")
            if ver == self.running:
                raise OtaError("same", "already running %s" % ver)
            total = 0
            for e in m["files"]:
                if e[0] == IMAGE:
                    if not hasattr(self.board, "ImageWriter"):
                        raise OtaError("no_image", "this board takes no image")
                    continue  # into its partition, not the filesystem
                total += e[1]
            self._check_space(total)
            self._start(m, payload)
        except OtaError as e:
            self._refuse(e.why, ver, str(e))
        except (OSError, ValueError) as e:
            self._refuse("flash", ver, repr(e))

    def _check_space(self, total):
        try:
            v = os.statvfs(self.root)
            free = v[0] * v[4]
        except (OSError, AttributeError):
            return
        if free < total + 16384:
            raise OtaError("no_space", "%d bytes free, %d needed" % (free, total))

    def _slot_for_download(self):
        d = self.s.d
        for slot in ("a", "b"):
            if slot != d["act"] and slot != d["try"]:
                return slot
        raise OtaError("busy", "no free folder")

    def _start(self, m, payload):
        d = self.s.d
        slot = self._slot_for_download()
        folder = self.s.folder(slot)
        # events of an earlier update emitted in this boot are not emitted again after a cut
        # from now on: a pusher must not take an old rollback for this update's
        d["pend"] = d["pend"][self._npend :]
        self._npend = 0
        # the download is forgotten before its folder is wiped, so a cut in between leaves
        # no record pointing at a half-wiped folder
        d["dl"] = None
        self.s.save()
        rmtree(folder)
        makedirs(folder)
        self._write_man(slot, payload)
        d["iat"] = m["iat"]
        d["dl"] = {"s": slot, "ver": m["ver"], "iat": m["iat"], "f": 0, "off": 0}
        self.s.save()
        self.files = m["files"]
        self._man = m
        self._h = None
        self._hpos = (-1, -1)
        self._req_at = None
        self._refused_chunk = False
        self._skip_empty()

    def _write_man(self, slot, payload):
        """The manifest beside its folder, whole or not at all (rename is atomic)."""
        p = self.root + "/fw/" + slot + ".man"
        with open(p + ".tmp", "wb") as f:
            f.write(payload)
        os.rename(p + ".tmp", p)

    def _renew(self, m, payload):
        d = self.s.d
        self._write_man(d["dl"]["s"], payload)
        d["iat"] = m["iat"]
        d["dl"]["iat"] = m["iat"]
        self.s.save()
        self._man = m
        self._req_at = None

    def _load_download(self):
        dl = self.s.d["dl"]
        with open(self.root + "/fw/" + dl["s"] + ".man", "rb") as f:
            payload = f.read()
        m = parse_manifest(payload, self.key, self.sid, self.kid)
        if m["iat"] < dl["iat"] or m["ver"] != dl["ver"]:
            raise OtaError("malformed", "manifest does not match the download")
        dl["iat"] = m["iat"]  # a renewal cut before its state was saved
        if m["iat"] > self.s.d["iat"]:
            self.s.d["iat"] = m["iat"]
        self.files = m["files"]
        self._man = m
        self._skip_empty()

    def _abandon(self):
        d = self.s.d
        dl = d["dl"]
        d["dl"] = None
        self.s.save()
        if dl is not None:
            rmtree(self.s.folder(dl["s"]))
        self.files = None
        self._complete = False

    def _image(self, entry):
        if self._img is None:
            self._img = self.board.ImageWriter(entry[1])
        return self._img

    def _fpath(self, i):
        return self.s.folder(self.s.d["dl"]["s"]) + "/" + self.files[i][0]

    def _skip_empty(self):
        """Advance past finished files (zero-length ones are created here)."""
        dl = self.s.d["dl"]
        files = self.files
        while dl["f"] < len(files) and dl["off"] >= files[dl["f"]][1]:
            p = self._fpath(dl["f"])
            if files[dl["f"]][1] == 0:
                if "/" in files[dl["f"]][0]:
                    makedirs(p[: p.rfind("/")])
                open(p, "wb").close()
            dl["f"] += 1
            dl["off"] = 0
        if dl["f"] >= len(files):
            self._complete = True

    def on_chunk(self, payload):
        """One chunk (a memoryview of the client's buffer: used before returning)."""
        dl = self.s.d["dl"]
        if dl is None or self.files is None or self._complete:
            return
        nl = -1
        for i in range(min(len(payload), 256)):
            if payload[i] == 10:
                nl = i
                break
        if nl < 0:
            return
        head = bytes(payload[:nl])
        parts = head.split(b" ")
        if len(parts) != 6:
            return
        try:
            iat = int(parts[1])
            fi = int(parts[2])
            off = int(parts[3])
        except ValueError:
            return
        if iat != dl["iat"] or fi != dl["f"] or off != dl["off"]:
            return  # a duplicate or a stale window: not where we are
        data = payload[nl + 1 :]
        entry = self.files[fi]
        signed = head[: head.rfind(b" ")] + b"\n"
        if not _equal(self.mac.hexdigest(signed, data), parts[5]):
            if not self._refused_chunk:
                self._refused_chunk = True
                self._refuse("chunk_sig", dl["ver"], "chunk %d@%d" % (fi, off))
            return
        if parts[4] != entry[2].encode() or len(data) == 0 or off + len(data) > entry[1]:
            if not self._refused_chunk:
                self._refused_chunk = True
                self._refuse("chunk", dl["ver"], "chunk %d@%d: not the manifest's" % (fi, off))
            return
        path = self._fpath(fi)
        img = self._image(entry) if entry[0] == IMAGE else None
        if self._hpos != (fi, off):
            # after a restart: hash the bytes already on flash (they were counted as written)
            if off:
                if img is not None:
                    self._h = img.rehash(hashlib.sha256(), off)
                else:
                    self._h = sha256_file(path, off)
            else:
                self._h = hashlib.sha256()
        try:
            if img is not None:
                img.write(off, data)
            elif off == 0:
                if "/" in entry[0]:
                    makedirs(path[: path.rfind("/")])
                f = open(path, "wb")
            else:
                f = open(path, "r+b")
                f.seek(off)
            try:
                n = f.write(data)
                if n is not None and n != len(data):
                    raise OSError(28)
            finally:
                f.close()
            if hasattr(os, "sync"):
                os.sync()  # type: ignore[attr-defined]
        except OSError as e:
            self._hpos = (-1, -1)
            self.st.alarm("ota_flash", "warn", "ota: write failed: %r" % (e,))
            return
        h = self._h
        h.update(data)
        off += len(data)
        self.chunks += 1
        self._got += 1
        if off >= entry[1]:
            if _hex(h) != entry[2]:
                self._refuse("hash", dl["ver"], "%s does not match the manifest" % entry[0])
                self._abandon()
                return
            dl["f"] = fi + 1
            dl["off"] = 0
            self._h = None
            self._hpos = (-1, -1)
            self._skip_empty()
        else:
            dl["off"] = off
            self._hpos = (fi, off)
        try:
            self.s.save()  # progress: a power cut resumes from here
        except (OSError, ValueError):
            self._hpos = (-1, -1)

    # -- the task ---------------------------------------------------------------------------
    def _elapsed(self):
        return self.st.uptime.ms() - self._t0

    async def run(self):
        emitted_at = self._t0
        while True:
            d = self.s.d
            now = self.st.uptime.ms()
            if self._npend < len(d["pend"]):
                for p in d["pend"][self._npend :]:
                    self.event(p[0], p[1], p[2], p[3])
                self._npend = len(d["pend"])
                emitted_at = now
            elif self._npend and now - emitted_at >= 2000:
                # the events are in the outbox by now (produce() turns every 200 ms); a power
                # cut before this save emits them again at the next boot: at least once
                d["pend"] = d["pend"][self._npend :]
                self._npend = 0
                try:
                    self.s.save()
                except (OSError, ValueError):
                    pass
            if self._complete and d["dl"] is not None:
                await self._stage()
            elif d["dl"] is not None:
                await self._ask()
            if self.trial:
                self._watch(now)
            await timebase.asleep_ms(250)

    async def _ask(self):
        up = self.up
        if up is None or not up.client.connected:
            return
        t = timebase.ticks_ms()
        if (
            self._req_at is not None
            and self._got < WINDOW
            and timebase.ticks_diff(t, self._req_at) < _REQ_MS
        ):
            return
        import wire

        dl = self.s.d["dl"]
        req = wire.encode(
            {
                "sid": self.sid,
                "ver": dl["ver"],
                "iat": dl["iat"],
                "f": dl["f"],
                "off": dl["off"],
                "n": WINDOW,
                "boot": self.st.boot,
                "seq": up.wire.seq,  # the pusher counts only outcomes made after this
            }
        )
        self._req_at = t
        self._got = 0
        await up.client.publish(self.req_topic, req, 1, False)

    async def _stage(self):
        """Every byte is on flash: read every file back against its hash, then mark the
        version for trial (one atomic save) and reboot into it."""
        d = self.s.d
        dl = d["dl"]
        folder = self.s.folder(dl["s"])
        image = False
        for e in self.files:
            await timebase.asleep_ms(0)
            try:
                if e[0] == IMAGE:
                    image = True
                    ok = _hex(self._image(e).rehash(hashlib.sha256(), e[1])) == e[2]
                else:
                    ok = _hex(sha256_file(folder + "/" + e[0])) == e[2]
            except OSError:
                ok = False
            if not ok:
                self._refuse("hash", dl["ver"], "%s changed on flash" % e[0])
                self._abandon()
                return
        gc.collect()
        m = self._man
        if d["ver"] is None:
            d["ver"] = self.running  # names the factory files from now on
        d["try"] = dl["s"]
        d["tver"] = dl["ver"]
        d["boots"] = 0
        d["crash"] = 0
        d["max"] = m["boots"]
        d["cfm"] = m["confirm_s"] * 1000
        d["tms"] = m["trial_s"] * 1000
        d["dl"] = None
        self.s.pend("staged", self.running, dl["ver"])
        self.s.save()
        if image:
            # the bootloader boots it next, on trial: unless ota_confirm() marks it valid
            # during that boot, the following reset returns to the running image
            self._img.activate()
        self._complete = False
        print("ota: %s staged in %s, rebooting on trial" % (dl["ver"], folder))
        self.st.persist_now()
        await timebase.asleep_ms(200)
        if self.reboot is not None:
            self.reboot()

    def _watch(self, now):
        """A trial: confirm once it has sampled, persisted and had telemetry acknowledged for
        its window; roll back when sampling stops or the deadline passes without that."""
        d = self.s.d
        st = self.st
        if st.cycles != self._last_cycles:
            self._last_cycles = st.cycles
            self._last_adv = now
        stall = max(5 * self.cfg["sample_ms"], 3000)
        el = now - self._t0
        if now - self._last_adv > stall:
            return self._fail("no_sampling")
        if el >= d["cfm"] and self._healthy():
            st.persist_now()
            if st.persist_ok:
                return self._confirm()
        if el >= d["tms"]:
            up = self.up
            if up is None or up.acked == 0:
                why = "no_broker"
            elif not st.persist_ok:
                why = "no_persist"
            else:
                why = "unconfirmed"
            return self._fail(why)

    def _healthy(self):
        up = self.up
        if up is None or self._t_id is None or not self.st.persist_ok:
            return False
        if self.st.cycles < 2:
            return False
        p = up.outbox.pending(1)
        return not p or p[0][0] > self._t_id

    def _confirm(self):
        d = self.s.d
        frm = d["ver"]
        d["act"] = d["try"]
        d["ver"] = d["tver"]
        d["try"] = None
        d["tver"] = None
        d["boots"] = 0
        d["crash"] = 0
        self.s.pend("confirmed", frm, d["ver"])
        try:
            self.s.save()
        except (OSError, ValueError):
            return  # not confirmed: the deadline or the next boot decides
        self.trial = False
        if self.board is not None and hasattr(self.board, "ota_confirm"):
            self.board.ota_confirm()
        print("ota: %s confirmed" % d["ver"])

    def _fail(self, why):
        s = self.s
        _rollback(s, why)
        try:
            s.save()
        except (OSError, ValueError):
            pass  # the trial boot count still ends it
        self.trial = False
        print("ota: trial failed (%s): rolling back" % why)
        self.st.persist_now()
        if self.reboot is not None:
            self.reboot()
        else:  # pragma: no cover
            sys.exit(3)
