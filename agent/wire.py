"""Signed wire format (CONTRACT §5.1–5.5, §2, §6.9), v2: verify and decode, sans I/O.

`verify(kind, topic_sid, payload, keys, recv_ms=…)` takes the exact bytes from MQTT and
returns a `Verified` or raises `WireError(reason, detail)`. Only what makes the whole
message unusable quarantines it, each with one precise reason, in a fixed order:

    size → ASCII → signature framing → JSON of the signed bytes (nesting depth, duplicate
    keys, compact separators) → envelope v, sid, kid, boot, seq → topic sid → key → HMAC
    → envelope up, ts (ts against the receive time) → topic kind (telemetry / event)

Everything else is CONTRACT §6.9's business, `agent.ranges.clean`: a field missing, of the
wrong type or out of its §2 range spoils only its source (the meter, one slot, one battery,
the err counters, an event's content); the message is still stored as received, and
`Verified.cleaned` holds the body metering may use and the list of what was spoiled.

`admit_telemetry(topic_sid, payload, keys, recv_ms=…)` is ingest's fast path: for a clean
telemetry it gives what `verify` would, in one typed decode; for anything else, None, and
`verify` decides.

Only the signed bytes (everything before the last `,"sig":"`, with the `}` put back) are
ever parsed: nothing after the signature can change the meaning. The nesting depth is
bounded by the decode itself (a type that admits four levels), before anything recursive
runs; input it refuses is measured iteratively to name the fault (msgspec's decoder
refuses input nested ~1000 deep: that is `too_deep` too, never a RecursionError).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, Protocol

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from agent import ranges

MAX_BYTES: Final = 4096
SIG_MARK: Final = b',"sig":"'
_SIG_TAIL_LEN: Final = len(SIG_MARK) + 64 + 2  # ,"sig":" + 64 hex + "}
# The station id (CONTRACT §1): the one pattern of the host side. The firmware checks the
# same in firmware/config.py (it cannot import the host); tests/test_sid.py holds both to it.
SID_PATTERN: Final = "[A-Z0-9][A-Z0-9-]{2,31}"
SID_RE: Final = re.compile(SID_PATTERN)
_LOWER_HEX: Final = frozenset(b"0123456789abcdef")
_SIG_TAIL: Final = re.compile(rb'[0-9a-f]{64}"\}')
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
KINDS: Final = ("telemetry", "event")


class Reason(enum.StrEnum):
    """Why a message was rejected; the value is what quarantine rows and counters carry."""

    TOO_LARGE = "too_large"  # more than 4096 bytes
    NOT_ASCII = "not_ascii"
    SIG_MISSING = "sig_missing"  # no ,"sig":" at all
    SIG_LENGTH = "sig_length"  # not exactly 64 hex digits
    SIG_HEX = "sig_hex"  # uppercase or non-hex digits
    SIG_NOT_LAST = "sig_not_last"  # more keys after sig
    SIG_TRAILING = "sig_trailing"  # bytes after the closing "}
    BAD_JSON = "bad_json"  # the signed bytes are not a JSON object
    DUPLICATE_KEY = "duplicate_key"
    NOT_COMPACT = "not_compact"  # whitespace between tokens
    BAD_VERSION = "bad_version"  # v missing or not the integer 1
    BAD_SID = "bad_sid"  # sid missing or not matching the station id pattern
    BAD_HEADER = "bad_header"  # kid/boot/seq missing, not an int, or not in 0..2^31-1
    BAD_UP = "bad_up"  # up missing, not an int, or not in 0..3.2e11
    BAD_TS = "bad_ts"  # ts not an int, before 2020-01-01 or over a day past the receive time
    TOO_DEEP = "too_deep"  # nesting deeper than 4 (CONTRACT §5.1)
    KIND_MISMATCH = "kind_mismatch"  # an event on a telemetry topic
    BAD_TOPIC = "bad_topic"  # topic not <prefix>/<sid>/<kind> with a valid sid
    TOPIC_MISMATCH = "topic_mismatch"  # topic sid != payload sid
    UNKNOWN_STATION = "unknown_station"  # no key at all for this sid
    UNKNOWN_KID = "unknown_kid"  # station known, this kid not
    REVOKED_KEY = "revoked_key"
    BAD_SIG = "bad_sig"  # HMAC does not match
    UNKNOWN_EVENT = "unknown_event"  # ev missing or not a string on an event topic
    # v1 only (kept: old quarantine rows carry it). v2 stores such a message and spoils
    # only the source of the bad field (CONTRACT §6.9, agent.ranges.clean).
    SCHEMA = "schema"
    INTERNAL = "internal"  # the agent failed on it (a bug): kept with the exception's class
    CONFLICT = "conflict"  # same (sid, boot, seq) as a stored message, other bytes
    BAD_STATUS = "bad_status"  # a status (birth/will) payload that is not a JSON object


class WireError(Exception):
    """A rejected message: `reason` is a `Reason`, `detail` one human-readable line."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


class KeyRing(Protocol):
    """Where `verify` gets a station's key: raise WireError(UNKNOWN_STATION | UNKNOWN_KID |
    REVOKED_KEY) when there is no usable key."""

    def key(self, sid: str, kid: int) -> bytes: ...


class StaticKeys:
    """A KeyRing over a dict {(sid, kid): key}; a value of None marks a revoked key."""

    def __init__(self, keys: Mapping[tuple[str, int], bytes | None]) -> None:
        self._keys = dict(keys)
        self._sids = {sid for sid, _ in self._keys}

    def key(self, sid: str, kid: int) -> bytes:
        try:
            k = self._keys[(sid, kid)]
        except KeyError:
            if sid in self._sids:
                raise WireError(Reason.UNKNOWN_KID, f"{sid} has no key {kid}") from None
            raise WireError(Reason.UNKNOWN_STATION, sid) from None
        if k is None:
            raise WireError(Reason.REVOKED_KEY, f"{sid} key {kid} is revoked")
        return k


EVENTS: Final = tuple(ranges.EVENTS)  # the contract's event names (CONTRACT §5.3)


# ---- the fast path of §6.9 -----------------------------------------------------------------
#
# `ranges.clean` walks the body in Python (~9 us for a 2-slot telemetry: a third of verify).
# Nearly every message is clean, so first a typed msgspec decode of the signed bytes
# (~2-3 us) that is at least as strict as `ranges.clean`: whatever it accepts, `clean`
# would spoil nothing in (tests/test_wire.py holds the two together on mutated messages).
# Anything it refuses goes to `ranges.clean`, which alone decides what is spoiled.


_Text = Annotated[str, Meta(max_length=256)]
_Slot = Annotated[int, Meta(ge=1, le=16)]
_Pm = Annotated[int, Meta(ge=0, le=1000)]
_MWh = Annotated[int, Meta(ge=0, le=ranges.U53)]
_Wh = Annotated[int, Meta(ge=0, le=ranges.WH_MAX)]
_U31 = Annotated[int, Meta(ge=0, le=ranges.U31)]
_U32 = Annotated[int, Meta(ge=0, le=ranges.U32)]
_Mv = Annotated[int, Meta(ge=0, le=ranges.MV_MAX)]
_Ma = Annotated[int, Meta(ge=-ranges.MA_MAX, le=ranges.MA_MAX)]
_Pw = Annotated[int, Meta(ge=-ranges.PW_MAX, le=ranges.PW_MAX)]
_T = Annotated[int, Meta(ge=ranges.T_MIN, le=ranges.T_MAX)]
_Up = Annotated[int, Meta(ge=0, le=ranges.UP_MAX)]
_T62 = Annotated[int, Meta(ge=0, le=ranges.STATION_TIME_MAX)]
# \Z, not $: "$" also matches before a final newline, and "1\n" is no slot to ranges.clean
_SlotKey = Annotated[str, Meta(pattern="^0*([1-9]|1[0-6])\\Z")]
_Hist = Literal[1] | None | UnsetType  # absent, null or 1


# (UNSET defaults and gc=False: these also serve `admit_telemetry`, which re-encodes what it
# decoded; a decoded message is a tree, never a cycle)


class _Meter(Struct, kw_only=True, gc=False):
    e_wh: _Wh
    p_w: _Pw | None | UnsetType = UNSET
    sn: _U32 | None | UnsetType = UNSET


class _Bat(Struct, kw_only=True, gc=False):
    id: _Text
    soc: _Pm
    soh: _Pm
    mv: _Mv
    ma: _Ma
    t: _T
    tmin: _T
    cyc: _U32
    flt: _U32
    life_wh: _Wh


class _SlotReading(Struct, kw_only=True, gc=False):
    n: _Slot
    e_mwh: _MWh
    b_mwh: _MWh | None | UnsetType = UNSET
    st: Literal["I", "W", "C", "V", "F", "E", "X"] | None | UnsetType = UNSET
    mv: _Mv | None | UnsetType = UNSET
    ma: _Ma | None | UnsetType = UNSET
    bat: _Bat | None | UnsetType = UNSET


class _Telemetry(Struct, kw_only=True, gc=False):
    meter: _Meter | UnsetType = UNSET  # present: an object (null spoils it)
    err: dict[str, _U31] | UnsetType = UNSET
    slots: list[_SlotReading] | None | UnsetType = UNSET
    hist: _Hist = UNSET


class SignedTelemetry(_Telemetry, kw_only=True, gc=False):
    """A whole telemetry, envelope included (`admit_telemetry`; ingest hands metering its
    reads packed: agent/ledger/reads.py)."""

    v: Literal[1]
    sid: _Text
    kid: _U31
    boot: _U31
    seq: _U31
    up: _Up
    ts: int | None | UnsetType = UNSET  # bounded by the receive time, in admit_telemetry


class _Ev(Struct, kw_only=True, tag_field="ev"):
    hist: _Hist = UNSET


class _BootEv(_Ev, kw_only=True, tag="boot"):
    fw: _Text
    reset: Literal["power", "wdt", "soft", "hard", "deep", "unknown"]
    restored: dict[_SlotKey, _MWh]


class _SessionStartEv(_Ev, kw_only=True, tag="session_start"):
    slot: _Slot
    e_mwh: _MWh
    bat: _Text | None = None
    soc: _Pm | None = None


class _SessionEndEv(_Ev, kw_only=True, tag="session_end"):
    slot: _Slot
    e0_mwh: _MWh
    e1_mwh: _MWh
    up0: _Up
    up1: _Up
    why: Literal["full", "removed", "fault", "stopped", "reboot"]
    bat: _Text | None = None
    soc0: _Pm | None = None
    soc1: _Pm | None = None
    boot0: _U31 | None = None
    t0: _T62 | None = None
    t1: _T62 | None = None


class _AlarmEv(_Ev, kw_only=True, tag="alarm"):
    code: _Text | _U31
    level: Literal["warn", "crit"]
    msg: _Text
    slot: _Slot | None = None


class _MeterResetEv(_Ev, kw_only=True, tag="meter_reset"):
    from_wh: _Wh
    to_wh: _Wh
    sn: _U32 | None = None


class _OutboxDropEv(_Ev, kw_only=True, tag="outbox_drop"):
    n: _U31


class _OtaEv(_Ev, kw_only=True, tag="ota"):
    phase: _Text
    from_: _Text | None = msgspec.field(default=None, name="from")  # a Python keyword
    to: _Text | None = None
    why: _Text | None = None


_strict_telemetry = msgspec.json.Decoder(_Telemetry)
_signed_telemetry = msgspec.json.Decoder(SignedTelemetry)
_strict_event = msgspec.json.Decoder(
    _BootEv | _SessionStartEv | _SessionEndEv | _AlarmEv | _MeterResetEv | _OutboxDropEv | _OtaEv
)


def _clean(kind: str, signed: bytes, body: dict[str, Any]) -> ranges.Cleaned:
    """`ranges.clean(body)`, through the fast path when the strict decode takes it."""
    try:
        (_strict_telemetry if kind == "telemetry" else _strict_event).decode(signed)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return ranges.clean(body)
    return ranges.Cleaned(dict(body), ())


_generic = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode

# The same plain dicts, lists and scalars as `_generic`, but nothing nested deeper than
# ranges.MAX_DEPTH (the top object is depth 1): the depth check happens inside msgspec's
# own pass, and the decode is faster than the untyped one (measured 4.7 against 5.7 µs for
# an 8-slot telemetry, which then needed 3.3 µs more for the walk in Python). A message it
# refuses is decoded again by `_generic` to name the fault.
_Scalar = int | float | str | bool | None
_D1 = _Scalar | list[_Scalar] | dict[str, _Scalar]
_D2 = _Scalar | list[_D1] | dict[str, _D1]
_D3 = _Scalar | list[_D2] | dict[str, _D2]
_within_depth = msgspec.json.Decoder(dict[str, _D3])
assert ranges.MAX_DEPTH == 4  # the four levels above


# ---- results ------------------------------------------------------------------------------


class Verified(Struct, frozen=True, kw_only=True):
    """A message to store. `record` is the exact payload received (what the raw table
    stores); `body` the decoded object of the signed bytes; `cleaned` what CONTRACT §6.9
    leaves of it for metering (`cleaned.body`) and what it spoiled (`cleaned.spoiled`:
    (source, path of its first bad field), e.g. ("bat:2", "slots[n=2].bat.soc"))."""

    kind: str  # "telemetry" | "event"
    sid: str
    kid: int
    boot: int
    seq: int
    record: bytes
    body: dict[str, Any]
    cleaned: ranges.Cleaned


# ---- signing and verification ------------------------------------------------------------


# HMAC-SHA256 (RFC 2104) from each key's inner and outer SHA-256 states, set up once per
# key: hmac.digest sets both up for every message, half of its cost (1.1 against 2.1 µs for
# an 8-slot telemetry). The states are only ever copied, never updated. Bounded: a fleet's
# keys, then set up afresh.
PADS_KEPT: Final = 16_384
_pads: dict[bytes, tuple[Any, Any]] = {}


def mac_hex(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of `data` under `key`, as lowercase hex (CONTRACT §5.5)."""
    pads = _pads.get(key)
    if pads is None:
        k = (hashlib.sha256(key).digest() if len(key) > 64 else bytes(key)).ljust(64, b"\0")
        pads = (
            hashlib.sha256(bytes(x ^ 0x36 for x in k)),
            hashlib.sha256(bytes(x ^ 0x5C for x in k)),
        )
        if len(_pads) >= PADS_KEPT:
            _pads.clear()
        _pads[bytes(key)] = pads
    inner = pads[0].copy()
    inner.update(data)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.hexdigest().encode()


def sign(obj_bytes: bytes, key: bytes) -> bytes:
    """CONTRACT §5.5: `obj_bytes` is the serialized object without `sig` (ending in `}`)."""
    if len(obj_bytes) < 3 or obj_bytes[:1] != b"{" or obj_bytes[-1:] != b"}":
        raise ValueError("sign: need a serialized non-empty JSON object")
    return obj_bytes[:-1] + SIG_MARK + mac_hex(key, obj_bytes) + b'"}'


def split_signed(payload: bytes) -> tuple[bytes, bytes]:
    """Check the signature framing; return (signed bytes with `}` put back, hex sig)."""
    i = payload.rfind(SIG_MARK)
    if i < 0:
        raise WireError(Reason.SIG_MISSING, 'no ,"sig":" in the payload')
    j = i + len(SIG_MARK)
    if _SIG_TAIL.fullmatch(payload, j):  # the usual case, in one C call
        return payload[:i] + b"}", payload[j : j + 64]
    tail = payload[j:]
    # The slow path only to name the failure precisely.
    q = tail.find(b'"')
    digits = tail if q < 0 else tail[:q]
    if q < 0:
        raise WireError(Reason.SIG_LENGTH, "sig is not closed by a quote")
    if not _HEX.issuperset(digits):
        raise WireError(Reason.SIG_HEX, "sig has non-hex characters")
    if len(digits) != 64:
        raise WireError(Reason.SIG_LENGTH, f"sig has {len(digits)} hex digits, not 64")
    if not _LOWER_HEX.issuperset(digits):
        raise WireError(Reason.SIG_HEX, "sig hex is not lowercase")
    rest = tail[q + 1 :]
    if rest[:1] == b",":
        raise WireError(Reason.SIG_NOT_LAST, "keys follow sig")
    raise WireError(Reason.SIG_TRAILING, f"{len(rest) - 1} bytes after the closing }}")


_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')
_WS = frozenset(b" \t\r\n")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise WireError(Reason.DUPLICATE_KEY, f"key {k!r} repeated")
        d[k] = v
    return d


def _decode_faulty(signed: bytes) -> dict[str, Any]:
    """The signed bytes that `_within_depth` refused: the precise reason, or (a number
    range msgspec refuses only in a typed decode, none known) the object after all."""
    try:
        obj = _generic.decode(signed)
    except msgspec.DecodeError as e:
        raise WireError(Reason.BAD_JSON, str(e)) from None
    except RecursionError:  # msgspec refuses input nested ~1000 deep
        raise WireError(
            Reason.TOO_DEEP, f"nested too deep to decode (limit {ranges.MAX_DEPTH})"
        ) from None
    if not isinstance(obj, dict):
        raise WireError(Reason.BAD_JSON, "not a JSON object")
    # before anything recursive (the re-encoding, json's slow path, metering)
    d = ranges.depth(obj, limit=64)
    if d > ranges.MAX_DEPTH:
        raise WireError(
            Reason.TOO_DEEP,
            f"nesting depth {d if d <= 64 else 'over 64'} > {ranges.MAX_DEPTH}",
        )
    return obj


def decode_signed(signed: bytes) -> dict[str, Any]:
    """Parse the signed bytes into a dict, rejecting bad JSON, nesting over 4 deep,
    duplicate keys and whitespace between tokens."""
    try:
        obj: dict[str, Any] = _within_depth.decode(signed)
    except msgspec.DecodeError:  # not JSON, not an object, or nested too deep: which
        obj = _decode_faulty(signed)
    # Fast path: re-encoding the decoded object gives back the very same bytes only when
    # the input had no duplicate key (a dict cannot hold one) and no whitespace.
    if _encode(obj) == signed:
        return obj
    # Slow path (a different but valid escaping also lands here): find the real fault.
    if _WS.intersection(_STRING_RE.sub(b"", signed)):
        raise WireError(Reason.NOT_COMPACT, "whitespace between tokens")
    try:
        checked = json.loads(signed, object_pairs_hook=_reject_duplicates)
    except ValueError as e:  # a JSON form msgspec accepted and json did not
        raise WireError(Reason.BAD_JSON, str(e)) from None
    if not isinstance(checked, dict):  # pragma: no cover - msgspec said it was an object
        raise WireError(Reason.BAD_JSON, "not a JSON object")
    return obj


def _framed(payload: bytes) -> tuple[bytes, bytes]:
    """The first checks of a payload (size, ASCII, signature framing): split_signed's."""
    if len(payload) > MAX_BYTES:
        raise WireError(Reason.TOO_LARGE, f"{len(payload)} bytes > {MAX_BYTES}")
    if not payload.isascii():
        raise WireError(Reason.NOT_ASCII, "payload has non-ASCII bytes")
    return split_signed(payload)


def _header_int(body: Mapping[str, Any], name: str) -> int:
    x = body.get(name)
    if type(x) is not int or not 0 <= x <= ranges.U31:
        raise WireError(Reason.BAD_HEADER, f"{name} must be an integer 0..2^31-1, got {x!r}"[:200])
    return x


def verify(
    kind: str, topic_sid: str, payload: bytes, keys: KeyRing, *, recv_ms: int | None = None
) -> Verified:
    """Verify one telemetry or event payload received on `<prefix>/<topic_sid>/<kind>` at
    `recv_ms` (Unix ms; now when None): the `ts` bound is the receiver's clock + 1 day."""
    signed, sig = _framed(payload)
    body = decode_signed(signed)
    if "sig" in body:  # the full payload has sig twice
        raise WireError(Reason.DUPLICATE_KEY, "sig inside the signed bytes")
    v = body.get("v")
    if type(v) is not int or v != 1:
        raise WireError(Reason.BAD_VERSION, f"v must be 1, got {v!r}"[:200])
    sid = body.get("sid")
    if type(sid) is not str or not SID_RE.fullmatch(sid):
        raise WireError(Reason.BAD_SID, f"bad sid {sid!r}"[:200])
    kid = _header_int(body, "kid")
    boot = _header_int(body, "boot")
    seq = _header_int(body, "seq")
    if sid != topic_sid:
        raise WireError(Reason.TOPIC_MISMATCH, f"topic sid {topic_sid} != payload sid {sid}")
    key = keys.key(sid, kid)
    if not hmac.compare_digest(mac_hex(key, signed), sig):
        raise WireError(Reason.BAD_SIG, f"{sid} kid {kid}: HMAC mismatch")
    up = body.get("up")
    if type(up) is not int or not 0 <= up <= ranges.UP_MAX:
        raise WireError(Reason.BAD_UP, f"up must be an integer 0..3.2e11, got {up!r}"[:200])
    ts = body.get("ts")
    if ts is not None:
        now = time.time_ns() // 1_000_000 if recv_ms is None else recv_ms
        if not ranges.ts_believed(ts, now):
            raise WireError(
                Reason.BAD_TS,
                f"ts must be an integer from 2020-01-01 to a day past the receive time "
                f"{now}, got {ts!r}"[:200],
            )
    ev = body.get("ev")
    if kind == "telemetry":
        if "ev" in body:
            raise WireError(Reason.KIND_MISMATCH, "an event on a telemetry topic")
    elif type(ev) is not str:
        raise WireError(Reason.UNKNOWN_EVENT, f"ev must be an event name, got {ev!r}"[:200])
    return Verified(
        kind=kind,
        sid=sid,
        kid=kid,
        boot=boot,
        seq=seq,
        record=payload,
        body=body,
        cleaned=_clean(kind, signed, body),
    )


# ---- ingest's fast path ------------------------------------------------------------------
#
# Nearly every message is a clean telemetry. `verify` spends three msgspec passes on one (a
# decode to dicts, its re-encoding to prove the bytes compact and free of repeated keys,
# §6.9's strict decode); this takes one decode to typed structs and one re-encoding of them,
# and answers only "yes, as verify would" or "ask verify".


# Station ids admit_telemetry has matched against SID_RE (bounded: cleared when full)
SIDS_MATCHED_MAX: Final = 65_536
_SIDS_MATCHED: set[str] = set()


def admit_telemetry(
    topic_sid: str, payload: bytes, keys: KeyRing, *, recv_ms: int
) -> SignedTelemetry | None:
    """A telemetry payload received on `<prefix>/<topic_sid>/telemetry` that `verify`
    accepts and of which CONTRACT §6.9 spoils nothing, decoded; None when it is not one, or
    not one this can tell (then `verify` decides, and names any fault)."""
    if len(payload) > MAX_BYTES or not payload.isascii():
        return None
    # The framing split_signed checks, less its test that the 64 characters before `"}` are
    # lowercase hex: only the lowercase hex of the right HMAC passes the comparison below.
    i = payload.rfind(SIG_MARK)
    j = i + len(SIG_MARK)
    if i < 0 or len(payload) != j + 66 or payload[-2:] != b'"}':
        return None
    signed = payload[:i] + b"}"
    try:
        t = _signed_telemetry.decode(signed)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None  # (RecursionError: input nested ~1000 deep)
    # Each key and value was decoded, the last of a repeated key kept, and msgspec writes
    # each value in its shortest form. So the re-encoding is no longer than the input, and
    # as long only when the input had no whitespace, no repeated key, no key the structs do
    # not name and no longer form of a value (an escape, "-0"): each of those adds bytes.
    # That input is what decode_signed and §6.9 accept whole (their order of keys aside).
    if len(_encode(t)) != len(signed):
        return None
    if t.ts is not None and t.ts is not UNSET and not ranges.ts_believed(t.ts, recv_ms):
        return None
    sid = t.sid
    if sid != topic_sid:
        return None
    if sid not in _SIDS_MATCHED:  # a set lookup, not SID_RE (~0.3 µs), for every message
        if not SID_RE.fullmatch(sid):
            return None
        if len(_SIDS_MATCHED) >= SIDS_MATCHED_MAX:
            _SIDS_MATCHED.clear()
        _SIDS_MATCHED.add(sid)
    try:
        key = keys.key(sid, t.kid)
    except WireError:
        return None
    if not hmac.compare_digest(mac_hex(key, signed), payload[j:-2]):
        return None
    return t


def check_sid(sid: str) -> str:
    """`sid` if it is a station id, else ValueError with a one-line reason."""
    if not isinstance(sid, str) or not SID_RE.fullmatch(sid):
        raise ValueError(f"bad station id {sid!r} (want ^{SID_PATTERN}$)")
    return sid


def parse_topic(topic: str, prefix: str) -> tuple[str, str]:
    """`<prefix>/<sid>/<kind>` → (sid, kind), kind in telemetry|event|status."""
    parts = topic.split("/")
    pre = prefix.split("/")
    if len(parts) != len(pre) + 2 or parts[: len(pre)] != pre:
        raise WireError(Reason.BAD_TOPIC, topic[:200])
    sid, kind = parts[-2], parts[-1]
    if kind not in ("telemetry", "event", "status") or not SID_RE.fullmatch(sid):
        raise WireError(Reason.BAD_TOPIC, topic[:200])
    return sid, kind


def decode_record(record: bytes) -> dict[str, Any]:
    """The body of a stored raw record (already verified when it was stored)."""
    i = record.rfind(SIG_MARK)
    obj = _generic.decode(record[:i] + b"}")
    assert isinstance(obj, dict)
    return obj
