# Signed commands on stations/<sid>/cmd (CONTRACT 5.4): checked here, acted on by the station.
#
# A command is accepted once: signed with this station's key (kid must match), for this sid,
# not expired, with a nonce not seen before, a known name and valid arguments.
#
# Replay protection has to work before the clock is synced (right after a reboot, when a
# captured command is most tempting to replay: a replayed `reboot` would loop the station).
# So two things survive restarts in a small A/B file (root/nonce.a|b, persist.ABFile, written
# before the command is handed over, so a command acted on is always remembered):
#   - the last RING nonces accepted;
#   - floor_ms: a time the station knows has passed (the newest of its synced clock and a
#     `time` command's now_ms at each accepted command). A command whose exp is below it is
#     expired even while the clock is unsynced.
# exp may be at most MAX_AHEAD_MS past the station's clock (and a `time` command's now_ms at
# most that far before its exp), so an old command can only slip through if it is younger than
# a day relative to the newest accepted one and has also left the ring of RING nonces.
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
# RING nonces of _NONCE_MAX characters, each of them escaped in JSON (\" is 2), and floor
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


class CommandGate:
    """check() turns a cmd payload into a normalised command dict or raises CommandError."""

    def __init__(self, sid, kid, key, root):
        self.sid = sid
        self.kid = kid
        self._key = key
        self._ab = ABFile(root + "/nonce", _NONCE_FILE_MAX)
        self._ring = []  # type: list
        self.floor_ms = 0
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
        if exp < self.floor_ms:
            raise CommandError(
                "expired", "exp %d is before a time already seen (%d)" % (exp, self.floor_ms)
            )
        if now_ms is not None:
            if now_ms > exp:
                raise CommandError("expired", "exp %d is %d ms ago" % (exp, now_ms - exp))
            if exp - now_ms > MAX_AHEAD_MS:
                raise CommandError("expired", "exp %d is more than a day ahead" % exp)
        if nonce in self._ring:
            raise CommandError("replay", "nonce %r already used" % (nonce,))
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
        if now_ms is not None and now_ms > floor:
            floor = now_ms
        if err is None and name == "time" and out["now_ms"] > floor:
            floor = out["now_ms"]
        self._remember(nonce, floor)
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

    def _remember(self, nonce, floor):
        ring = self._ring
        ring.append(nonce)
        if len(ring) > RING:
            ring.pop(0)
        self.floor_ms = floor
        self._ab.save(wire.encode({"floor": floor, "nonces": ring}))

    def _load(self):
        data = self._ab.load()
        if not data:
            return
        try:
            d = wire.decode(data)
            ring = d["nonces"]
            floor = d["floor"]
        except (wire.WireError, KeyError, TypeError):
            return  # intact CRC but not ours: start empty rather than fail to boot
        if type(ring) is list and _int(floor):
            self._ring = ring[-RING:]
            self.floor_ms = floor
