"""Signed wire format (CONTRACT §5.1–5.5): verify and decode, sans I/O.

`verify(kind, topic_sid, payload, keys)` takes the exact bytes from MQTT and returns a
`Verified` (the decoded body, for metering) or raises `WireError(reason, detail)`.
The order of checks is fixed so that every rejection has one precise reason:

    size → ASCII → signature framing → JSON of the signed bytes (duplicate keys,
    compact separators) → header (v, sid, kid, boot, seq) → topic sid → key → HMAC →
    schema of the telemetry or event kind

Only the signed bytes (everything before the last `,"sig":"`, with the `}` put back) are
ever parsed: nothing after the signature can change the meaning. Numbers must be JSON
integers (a float or a bool where an int belongs is a schema error). Keys the contract
does not name are accepted and kept in the raw bytes (a newer firmware may add
diagnostics); every key the contract names is checked for presence, type and range.
"""

from __future__ import annotations

import enum
import hmac
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, Protocol

import msgspec
from msgspec import Meta, Struct

MAX_BYTES: Final = 4096
SIG_MARK: Final = b',"sig":"'
_SIG_TAIL_LEN: Final = len(SIG_MARK) + 64 + 2  # ,"sig":" + 64 hex + "}
# The station id (CONTRACT §1): the one pattern of the host side. The firmware checks the
# same in firmware/config.py (it cannot import the host); tests/test_sid.py holds both to it.
SID_PATTERN: Final = "[A-Z0-9][A-Z0-9-]{2,31}"
SID_RE: Final = re.compile(SID_PATTERN)
_LOWER_HEX: Final = frozenset(b"0123456789abcdef")
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
    BAD_HEADER = "bad_header"  # kid/boot/seq missing, not an int, or negative
    BAD_TOPIC = "bad_topic"  # topic not <prefix>/<sid>/<kind> with a valid sid
    TOPIC_MISMATCH = "topic_mismatch"  # topic sid != payload sid
    UNKNOWN_STATION = "unknown_station"  # no key at all for this sid
    UNKNOWN_KID = "unknown_kid"  # station known, this kid not
    REVOKED_KEY = "revoked_key"
    BAD_SIG = "bad_sig"  # HMAC does not match
    UNKNOWN_EVENT = "unknown_event"  # ev missing or not a contract event
    SCHEMA = "schema"  # a field missing, of the wrong type or out of range
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


# ---- schema (CONTRACT §5.2, §5.3) -------------------------------------------------------

U = Annotated[int, Meta(ge=0)]
Slot = Annotated[int, Meta(ge=1, le=16)]
Permille = Annotated[int, Meta(ge=0, le=1000)]
SlotKey = Annotated[str, Meta(pattern=r"^([1-9]|1[0-6])$")]


class _Common(Struct, kw_only=True):
    v: int
    sid: str
    kid: U
    boot: U
    seq: U
    up: U
    ts: U | None = None
    hist: Literal[1] | None = None


class Meter(Struct, kw_only=True):
    e_wh: U
    p_w: int | None = None
    sn: U | None = None


class Bat(Struct, kw_only=True):
    id: str
    soc: Permille
    soh: Permille
    mv: U
    ma: int
    t: int
    tmin: int
    cyc: U
    flt: U
    life_wh: U


class SlotReading(Struct, kw_only=True):
    n: Slot
    e_mwh: U
    b_mwh: U | None = None  # older firmware may not send it (CONTRACT §6.3 no_restore)
    st: Literal["I", "W", "C", "V", "F", "E", "X"] | None = None
    mv: U | None = None
    ma: int | None = None
    bat: Bat | None = None


class Err(Struct, kw_only=True):
    mb_to: U = 0
    mb_crc: U = 0
    mb_exc: U = 0
    mb_addr: U = 0
    ser_cs: U = 0
    ser_to: U = 0
    ser_bad: U = 0


class Telemetry(_Common, kw_only=True):
    slots: list[SlotReading]
    meter: Meter | None = None
    err: Err | None = None


class _Event(_Common, kw_only=True, tag_field="ev"):
    pass


class BootEv(_Event, kw_only=True, tag="boot"):
    fw: str
    reset: Literal["power", "wdt", "soft", "hard", "deep", "unknown"]
    restored: dict[SlotKey, U]


class SessionStartEv(_Event, kw_only=True, tag="session_start"):
    slot: Slot
    bat: str | None  # null when the BMS has not answered (firmware/station.py sends that)
    e_mwh: U
    soc: Permille | None


class SessionEndEv(_Event, kw_only=True, tag="session_end"):
    slot: Slot
    bat: str | None
    e0_mwh: U
    e1_mwh: U
    soc0: Permille | None
    soc1: Permille | None
    up0: U
    up1: U
    why: Literal["full", "removed", "fault", "stopped", "reboot"]
    t0: U | None = None
    t1: U | None = None


class AlarmEv(_Event, kw_only=True, tag="alarm"):
    code: str | int
    level: Literal["warn", "crit"]
    msg: str
    slot: Slot | None = None


class MeterResetEv(_Event, kw_only=True, tag="meter_reset"):
    from_wh: U
    to_wh: U
    sn: U | None = None


class OutboxDropEv(_Event, kw_only=True, tag="outbox_drop"):
    n: U


Event = BootEv | SessionStartEv | SessionEndEv | AlarmEv | MeterResetEv | OutboxDropEv
EVENTS: Final = ("boot", "session_start", "session_end", "alarm", "meter_reset", "outbox_drop")

_generic = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode
_telemetry = msgspec.json.Decoder(Telemetry)
_event = msgspec.json.Decoder(Event)


# ---- results ------------------------------------------------------------------------------


class Verified(Struct, frozen=True, kw_only=True):
    """A message that passed every check. `record` is the exact payload received (what the
    raw table stores); `body` the decoded object of the signed bytes (what metering reads)."""

    kind: str  # "telemetry" | "event"
    sid: str
    kid: int
    boot: int
    seq: int
    record: bytes
    body: dict[str, Any]


# ---- signing and verification ------------------------------------------------------------


def sign(obj_bytes: bytes, key: bytes) -> bytes:
    """CONTRACT §5.5: `obj_bytes` is the serialized object without `sig` (ending in `}`)."""
    if len(obj_bytes) < 3 or obj_bytes[:1] != b"{" or obj_bytes[-1:] != b"}":
        raise ValueError("sign: need a serialized non-empty JSON object")
    mac = hmac.digest(key, obj_bytes, "sha256").hex().encode()
    return obj_bytes[:-1] + SIG_MARK + mac + b'"}'


def split_signed(payload: bytes) -> tuple[bytes, bytes]:
    """Check the signature framing; return (signed bytes with `}` put back, hex sig)."""
    i = payload.rfind(SIG_MARK)
    if i < 0:
        raise WireError(Reason.SIG_MISSING, 'no ,"sig":" in the payload')
    tail = payload[i + len(SIG_MARK) :]
    if len(tail) == 66 and tail[64:] == b'"}' and _LOWER_HEX.issuperset(tail[:64]):
        return payload[:i] + b"}", tail[:64]
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


def decode_signed(signed: bytes) -> dict[str, Any]:
    """Parse the signed bytes into a dict, rejecting bad JSON, duplicate keys and
    whitespace between tokens."""
    try:
        obj = _generic.decode(signed)
    except msgspec.DecodeError as e:
        raise WireError(Reason.BAD_JSON, str(e)) from None
    if not isinstance(obj, dict):
        raise WireError(Reason.BAD_JSON, "not a JSON object")
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


def _header_int(body: Mapping[str, Any], name: str) -> int:
    x = body.get(name)
    if type(x) is not int or x < 0:
        raise WireError(
            Reason.BAD_HEADER, f"{name} must be a non-negative integer, got {x!r}"[:200]
        )
    return x


def verify(kind: str, topic_sid: str, payload: bytes, keys: KeyRing) -> Verified:
    """Verify one telemetry or event payload received on `<prefix>/<topic_sid>/<kind>`."""
    if len(payload) > MAX_BYTES:
        raise WireError(Reason.TOO_LARGE, f"{len(payload)} bytes > {MAX_BYTES}")
    if not payload.isascii():
        raise WireError(Reason.NOT_ASCII, "payload has non-ASCII bytes")
    signed, sig = split_signed(payload)
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
    if not hmac.compare_digest(hmac.digest(key, signed, "sha256").hex().encode(), sig):
        raise WireError(Reason.BAD_SIG, f"{sid} kid {kid}: HMAC mismatch")
    try:
        if kind == "telemetry":
            if "ev" in body:
                raise WireError(Reason.SCHEMA, "an event on a telemetry topic")
            _telemetry.decode(signed)
        else:
            ev = body.get("ev")
            if type(ev) is not str or ev not in EVENTS:
                raise WireError(Reason.UNKNOWN_EVENT, f"ev {ev!r}"[:200])
            _event.decode(signed)
    except msgspec.ValidationError as e:
        raise WireError(Reason.SCHEMA, str(e)) from None
    return Verified(kind=kind, sid=sid, kid=kid, boot=boot, seq=seq, record=payload, body=body)


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
