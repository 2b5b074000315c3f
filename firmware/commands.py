# Signed commands on stations/<sid>/cmd (CONTRACT 5.4): checked here, acted on by the station.
#
# A command is accepted once: signed with this station's key (kid must match), for this sid,
# not expired, with a nonce not seen before, a known name and valid arguments.
#
# Replay protection has to work before the clock is synced (right after a reboot, when a
# captured command is most tempting to replay: a replayed `reboot` would loop the station).
# So three things survive restarts in a small A/B file (root/nonce.a|b, persist.ABFile,
# written before check() returns, so a command acted on is always remembered; a failed write
# refuses the command, code "unsaved"):
#   - the nonces accepted whose exp has not passed, at most RING, each kept as [a hash of
#     the nonce and its type (16 hex), exp] so the file has a fixed worst-case size;
#   - floor_ms: a time the station knows has passed (the newest of its synced clock and a
#     `time` command's now_ms at each accepted command). A command whose exp is below it is
#     expired even while the clock is unsynced, and a `time` command never sets the clock
#     before it.
#   - forgot_ms: when the ring is full it lets go of the nonce with the earliest exp and
#     remembers that exp; a command whose exp is not after it is refused ("replay"), so a
#     nonce let go of can never come back, synced or not. An agent whose commands carry
#     one lifetime (exp = now + ttl) loses nothing to this.
# exp may be at most MAX_AHEAD_MS past the station's clock (and a `time` command's now_ms at
# most that far before its exp).
#
# Losing both copies of the file (A and B both present and neither valid: a save only ever
# writes the slot not holding the newest valid copy, so only corruption gets there) sets
# `lost`: every command is refused ("replay") until the clock is synced by something other
# than a command (NTP; a `time` command could itself be a replay), and then for a day
# (forgot_ms = now + MAX_AHEAD_MS), the longest a command accepted before may still be
# valid. Neither slot present is a first boot: the gate writes an empty record then, so the
# only slot torn with the other absent is a cut during that first save (nothing acted on).
import binascii
import hashlib
import os

import wire
from persist import ABFile

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef,misc]
        return x


RING = const(64)
MAX_AHEAD_MS = const(86400000)  # 24 h
_NONCE_MAX = const(40)  # characters (fits a UUID)
_EXP_MAX = 9007199254740991  # 2**53 - 1: exact in every JSON parser (a big int on the ESP32)
# RING entries ["<16 hex>",<exp>] are 37 bytes at most, with floor and forgot about 2.5 KB;
# 8192 also reads the former ring of raw nonces (under wire's 4096-byte buffer)
_NONCE_FILE_MAX = const(8192)

CODES = (
    "unsigned",
    "bad_sig",
    "expired",
    "replay",
    "wrong_sid",
    "malformed",
    "unknown_cmd",
    "bad_args",
    "unsaved",
)

# command name -> its argument names (beyond v, sid, kid, cmd, exp, nonce)
COMMANDS = {"time": ("now_ms",), "config": ("telemetry_s",), "reboot": ()}
_COMMON = ("v", "sid", "kid", "cmd", "exp", "nonce")


class CommandError(Exception):
    """A refused command: code is one of CODES, the message says why (one line)."""

    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code


def _int(x):
    return type(x) is int


def _nonce_ok(n):
    if _int(n):
        return 0 <= n < (1 << 63)
    if type(n) is not str or not 0 < len(n) <= _NONCE_MAX:
        return False
    for c in n:
        if not 33 <= ord(c) <= 126:
            return False
    return True


def nonce_id(n):
    """The ring's key for nonce n: 16 hex of sha256 over its type and value (5 and "5" are
    two nonces; "A" and "\\u0041" one, since both decode to the same str)."""
    b = b"i%d" % n if _int(n) else b"s" + n.encode()
    return binascii.hexlify(hashlib.sha256(b).digest()[:8]).decode()


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


class CommandGate:
    """check() turns a cmd payload into a normalised command dict or raises CommandError."""

    def __init__(self, sid, kid, key, root):
        self.sid = sid
        self.kid = kid
        self._key = key
        self._ab = ABFile(root + "/nonce", _NONCE_FILE_MAX)
        self._ring = []  # type: list  # [nonce_id, exp], at most RING
        self.floor_ms = 0
        self.forgot_ms = -1  # the latest exp of a nonce let go of (-1: none)
        self.lost = False  # both copies of the nonce file lost: see above
        self.accepted = 0
        self.refused = {}  # type: dict
        for c in CODES:
            self.refused[c] = 0
        self._load()

    def check(self, payload, now_ms=None):
        """Verify payload (bytes) against the station's key, sid, clock (now_ms: Unix ms when
        synced, else None) and nonce ring. Returns {"cmd": name, "nonce": n, <args>}, e.g.
        {"cmd": "config", "nonce": "…", "telemetry_s": 30}; the nonce is persisted before this
        returns. Raises CommandError(code, msg) and counts it in refused[code]."""
        try:
            cmd = self._check(payload, now_ms)
        except CommandError as e:
            self.refused[e.code] += 1
            raise
        self.accepted += 1
        return cmd

    def _check(self, payload, now_ms):
        try:
            obj = wire.verify(payload, self._key)
        except wire.WireError as e:
            raise CommandError(e.code, str(e))
        if obj.get("v") != 1 or not _int(obj.get("v")):
            raise CommandError("malformed", "v must be 1")
        kid = obj.get("kid")
        name = obj.get("cmd")
        exp = obj.get("exp")
        nonce = obj.get("nonce")
        if (
            not _int(kid)
            or type(obj.get("sid")) is not str
            or type(name) is not str
            or not _int(exp)
        ):
            raise CommandError(
                "malformed", "kid, sid, cmd and exp are required (int, str, str, int)"
            )
        if not 0 <= exp <= _EXP_MAX:
            raise CommandError("malformed", "exp must be in 0..2**53-1")
        if not _nonce_ok(nonce):
            raise CommandError(
                "malformed", "nonce must be 1..%d printable characters or an int" % _NONCE_MAX
            )
        if kid != self.kid:
            # the MAC matched our key, yet the command names another key version
            raise CommandError(
                "bad_sig", "kid %d is not this station's key version %d" % (kid, self.kid)
            )
        if obj["sid"] != self.sid:
            raise CommandError("wrong_sid", "command for %s" % obj["sid"])
        if self.lost:
            if now_ms is None:
                raise CommandError("replay", "nonce file lost: commands wait for a synced clock")
            self._recover(now_ms)
        if exp < self.floor_ms:
            raise CommandError(
                "expired", "exp %d is before a time already seen (%d)" % (exp, self.floor_ms)
            )
        if now_ms is not None:
            if now_ms > exp:
                raise CommandError("expired", "exp %d is %d ms ago" % (exp, now_ms - exp))
            if exp - now_ms > MAX_AHEAD_MS:
                raise CommandError("expired", "exp %d is more than a day ahead" % exp)
        nid = nonce_id(nonce)
        for r in self._ring:
            if r[0] == nid:
                raise CommandError("replay", "nonce %r already used" % (nonce,))
        if exp <= self.forgot_ms:
            raise CommandError(
                "replay", "exp %d is not after %d, a forgotten nonce's" % (exp, self.forgot_ms)
            )
        out = {"cmd": name, "nonce": nonce}
        err = None
        args = COMMANDS.get(name)
        if args is None:
            err = CommandError("unknown_cmd", "unknown command %r" % name)
        else:
            for k in obj:
                if k not in _COMMON and k not in args:
                    err = CommandError("bad_args", "%s takes no argument %r" % (name, k))
            for k in args:
                if k not in obj and err is None:
                    err = CommandError("bad_args", "%s needs %s" % (name, k))
            if err is None:
                err = self._args(name, obj, exp, out)
        # An authentic, fresh command uses up its nonce whatever its outcome, so a copy of
        # it gets "replay" later. Remember it before anything acts on the command.
        floor = self.floor_ms
        if err is None and name == "time":
            if out["now_ms"] < floor:
                out["now_ms"] = floor  # sent before a time already seen, delivered late
            floor = out["now_ms"]
        if now_ms is not None and now_ms > floor:
            floor = now_ms
        self._remember(nid, exp, floor)
        if err is not None:
            raise err
        return out

    def _args(self, name, obj, exp, out):
        if name == "time":
            t = obj["now_ms"]
            if not _int(t) or t <= 0:
                return CommandError("bad_args", "now_ms must be a positive int")
            if t > exp or exp - t > MAX_AHEAD_MS:
                return CommandError("bad_args", "now_ms must be within a day before exp")
            out["now_ms"] = t
        elif name == "config":
            s = obj["telemetry_s"]
            if not _int(s) or not 1 <= s <= 3600:
                return CommandError("bad_args", "telemetry_s must be an int in 1..3600")
            out["telemetry_s"] = s
        return None

    def _remember(self, nid, exp, floor):
        # what a floor or forgot_ms refuses anyway needs no place in the ring
        forgot = self.forgot_ms
        ring = [e for e in self._ring if e[1] >= floor and e[1] > forgot]
        ring.append([nid, exp])
        while len(ring) > RING:
            i = 0
            for j in range(1, len(ring)):
                if ring[j][1] < ring[i][1]:
                    i = j
            if ring[i][1] > forgot:
                forgot = ring[i][1]
            ring.pop(i)
        self._save(ring, floor, forgot)
        self._ring = ring
        self.floor_ms = floor
        self.forgot_ms = forgot

    def _save(self, ring, floor, forgot):
        """Write the record; a failure (a full or failing flash) refuses the command, which
        then has not acted, and leaves the gate's state as it was."""
        try:
            self._ab.save(wire.encode({"floor": floor, "forgot": forgot, "nonces": ring}))
        except (OSError, ValueError) as e:
            raise CommandError("unsaved", "nonce not saved (%r): not acted on" % (e,))

    def _recover(self, now_ms):
        # the lost nonces had exps at most a day past the clock when they were accepted
        floor = now_ms if now_ms > self.floor_ms else self.floor_ms
        self._save([], floor, now_ms + MAX_AHEAD_MS)
        self._ring = []
        self.floor_ms = floor
        self.forgot_ms = now_ms + MAX_AHEAD_MS
        self.lost = False

    def _load(self):
        data = self._ab.load()
        if data is None:
            if _exists(self._ab.paths[0]) and _exists(self._ab.paths[1]):
                self.lost = True
                return
            try:  # a first boot: from now on both slots exist once a command was accepted
                self._ab.save(wire.encode({"floor": 0, "forgot": -1, "nonces": []}))
            except (OSError, ValueError):
                pass  # the first command's save will say so
            return
        try:
            d = wire.decode(data)
            ring = d["nonces"]
            floor = d["floor"]
            forgot = d.get("forgot", -1)
        except (wire.WireError, KeyError, TypeError, AttributeError):
            ring = None
            floor = forgot = None
        if type(ring) is not list or not _int(floor) or not _int(forgot):
            self.lost = True  # an intact CRC but not ours: as good as lost
            return
        out = []
        for e in ring[-RING:]:
            if type(e) is list and len(e) == 2 and type(e[0]) is str and _int(e[1]):
                out.append(e)
            elif _nonce_ok(e):  # the former ring of raw nonces: exps unknown, a day at most
                out.append([nonce_id(e), floor + MAX_AHEAD_MS])
            else:
                self.lost = True
                return
        self._ring = out
        self.floor_ms = floor
        self.forgot_ms = forgot
