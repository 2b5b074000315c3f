"""OCPP frames as metering input (CONTRACT §11).

A frame a charger sends is kept as received (raw kind `ocpp`, topic `ocpp/<proto>/<sid>`,
keyed `(sid, boot, seq)`: `boot` counted by the agent at each BootNotification, `seq` the
receive order within it). `body_of` turns one stored frame into the body the ledger's
engine reads, the same function at ingest, restart and `stationctl verify`, from the
frame's bytes, its key and its receive time only:

    {"ocpp": 1, "up": t, "ts": t,             # t: the sample's time (Unix ms), else recv
     "reg": [[n, mwh], ...],                  # Energy.Active.Import.Register per connector
     "signed": 1,                             # the reading came from OCMF, checked
     "invalid": [n, ...],                     # connectors whose value was unusable (§6.9)
     "ev": "session_start" | "session_end",   # transactions, with "tx", "slot", "e_mwh"/
     ...}                                     # "e1_mwh", "why", "id_tag"

`n` is the 1.6 connectorId or the 2.0.1 EVSE id; 0 in `reg` means "the transaction's
connector" (a 1.6 StopTransaction or a 2.0.1 TransactionEvent without `evse` names only
the transaction): the engine resolves it. `up` equals `ts`, so every boot's clock offset
is 0 and a reading's time is its own timestamp.

Per frame the latest energy sample of each connector is taken (a register is cumulative:
the intermediate samples of a batched frame change where energy falls, not how much);
a signed (OCMF) value is preferred to a plain one. Connector/EVSE 0 (the charger's main
meter) is kept in raw and not metered. A frame that is not OCPP-J at all is a FrameError
(quarantined, never stored); anything else is stored, and what cannot be read from it
is simply no reading.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import zlib
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from agent import ranges
from agent.ocpp import ocmf

PROTOCOLS = ("ocpp1.6", "ocpp2.0.1")
KIND = "ocpp"
# a raw OCPP row's kid: 1 when its signed meter values were checked against the charger's
# registered public key on receipt (verify checks them again), 0 otherwise
SIGNED_KID, UNCHECKED_KID = 1, 0
ENERGY = "Energy.Active.Import.Register"
CALL, CALLRESULT, CALLERROR = 2, 3, 4
MAX_FRAME = 65_536  # bytes: a longer frame is refused (bounded work per frame)
MAX_MWH = 2**53 - 1  # CONTRACT §2's range of a register in mWh
MIN_TS = 1_577_836_800_000  # 2020-01-01, §2's lower bound of a time
DAY_MS = 86_400_000

_dec = msgspec.json.Decoder()


class FrameError(ValueError):
    """Not an OCPP-J frame (quarantined as `ocpp_frame`)."""


def topic_of(proto: str, sid: str) -> str:
    return f"ocpp/{proto}/{sid}"


def proto_of(topic: str) -> str:
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != "ocpp" or parts[1] not in PROTOCOLS:
        raise FrameError(f"not an OCPP topic: {topic[:80]!r}")
    return parts[1]


def transaction_id(sid: str, boot: int, seq: int) -> int:
    """The 1.6 transactionId the CSMS gives a StartTransaction: a function of the frame's
    key, so that recomputing from raw knows which transaction a StopTransaction ends
    (the answer itself is not kept). 1 .. 2³¹ − 1."""
    return zlib.crc32(f"{sid}/{boot}/{seq}".encode()) % 0x7FFF_FFFF + 1


def parse(frame: bytes) -> list[Any]:
    """The frame as a JSON array of a known shape (CALL, CALLRESULT, CALLERROR)."""
    if len(frame) > MAX_FRAME:
        raise FrameError(f"frame of {len(frame)} bytes (limit {MAX_FRAME})")
    try:
        msg = _dec.decode(frame)
    except (msgspec.DecodeError, RecursionError) as e:
        raise FrameError(f"not JSON: {str(e)[:80]}") from None
    if not isinstance(msg, list) or not msg or type(msg[0]) is not int:
        raise FrameError("not an OCPP-J message array")
    t = msg[0]
    ok = (
        (t == CALL and len(msg) == 4 and isinstance(msg[2], str) and isinstance(msg[3], dict))
        or (t == CALLRESULT and len(msg) == 3 and isinstance(msg[2], dict))
        or (t == CALLERROR and len(msg) in (4, 5))
    )
    if not ok or not isinstance(msg[1], str) or not 0 < len(msg[1]) <= 36:
        raise FrameError(f"message type {t} of the wrong shape")
    return msg


def action_of(frame: bytes) -> str | None:
    """The action of a CALL frame (None for answers); FrameError when it is no frame."""
    msg = parse(frame)
    return msg[2] if msg[0] == CALL else None


def time_ms(text: Any, recv_ms: int) -> int:
    """An OCPP timestamp as Unix ms; the receive time when it is missing, unreadable or
    outside CONTRACT §2's range (2020 .. the receive time + 1 day)."""
    if not isinstance(text, str) or len(text) > 40:
        return recv_ms
    try:
        d = dt.datetime.fromisoformat(text)
    except ValueError:
        return recv_ms
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    ms = int(d.timestamp() * 1000)
    return ms if MIN_TS <= ms <= recv_ms + DAY_MS else recv_ms


def _mwh(value: Any, unit: Any) -> int | None:
    """A register value (a decimal string, or a number) in mWh, floored; None if unusable."""
    if isinstance(value, bool) or not isinstance(value, str | int | float) or len(str(value)) > 40:
        return None
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    scale = {None: 1000, "Wh": 1000, "kWh": 1_000_000}.get(unit)
    if scale is None:
        return None
    v = int(d * scale)
    return v if 0 <= v <= MAX_MWH else None


class _Sample:
    __slots__ = ("mwh", "signed", "t")

    def __init__(self, mwh: int, t: int, signed: bool) -> None:
        self.mwh, self.t, self.signed = mwh, t, signed


def _signed_text(sv: dict[str, Any], proto: str) -> str | None:
    """The OCMF string of a sampled value, when it carries one."""
    if proto == "ocpp1.6":
        if sv.get("format") == "SignedData" and isinstance(sv.get("value"), str):
            return str(sv["value"])
        return None
    smv = sv.get("signedMeterValue")
    if not isinstance(smv, dict) or smv.get("encodingMethod") not in ("OCMF", None):
        return None
    data = smv.get("signedMeterData")
    if not isinstance(data, str):
        return None
    if data.startswith("OCMF|"):
        return data
    try:
        return base64.b64decode(data, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def signed_values(proto: str, frame: bytes) -> list[str]:
    """Every OCMF string in the frame's meter values (to check against the charger's
    public key at ingest and in `verify`)."""
    try:
        msg = parse(frame)
    except FrameError:
        return []
    if msg[0] != CALL:
        return []
    out: list[str] = []
    for mv in _meter_values(msg[3]):
        for sv in mv.get("sampledValue") or ():
            if isinstance(sv, dict):
                s = _signed_text(sv, proto)
                if s is not None:
                    out.append(s)
    return out


def _meter_values(payload: dict[str, Any]) -> list[dict[str, Any]]:
    for k in ("meterValue", "transactionData"):
        v = payload.get(k)
        if isinstance(v, list):
            return [x for x in v if isinstance(x, dict)]
    return []


def _energy(mv: dict[str, Any], proto: str, recv_ms: int) -> tuple[_Sample | None, bool]:
    """The meter value's total import register (signed preferred), and whether an energy
    value was there but unusable."""
    t = time_ms(mv.get("timestamp"), recv_ms)
    best: _Sample | None = None
    bad = False
    for sv in mv.get("sampledValue") or ():
        if not isinstance(sv, dict):
            continue
        if sv.get("measurand", ENERGY) != ENERGY or sv.get("phase") is not None:
            continue
        if sv.get("location", "Outlet") != "Outlet":
            continue
        text = _signed_text(sv, proto)
        if text is not None:
            try:
                r = ocmf.import_register(ocmf.parse(text))
            except ocmf.OcmfError:
                r = None
            if r is None or r.status not in ("", "G"):  # OCMF: only a good ("G") reading
                bad = True
                continue
            best = _Sample(r.mwh, t, True)  # the signed value wins
            continue
        um = sv.get("unitOfMeasure") if proto != "ocpp1.6" else None
        unit = um.get("unit", "Wh") if isinstance(um, dict) else sv.get("unit")
        mult = um.get("multiplier", 0) if isinstance(um, dict) else 0
        v = _mwh(sv.get("value"), unit)
        if v is not None and type(mult) is int and -3 <= mult <= 6 and mult:
            v = int(Decimal(v) * (Decimal(10) ** mult))
            v = v if v <= MAX_MWH else None
        if v is None:
            bad = True
        elif best is None or not best.signed:
            best = _Sample(v, t, False)
    return best, bad


def body_of(
    proto: str, frame: bytes, recv_ms: int, sid: str, boot: int, seq: int, *, checked: bool
) -> dict[str, Any]:
    """The metering body of a stored frame (see the module doc). `checked`: its OCMF
    values were verified against the charger's public key when it was received (the raw
    row's kid is 1, SIGNED_KID); otherwise a signed value is read but counts as unsigned.
    FrameError only for bytes that are no OCPP-J frame at all."""
    msg = parse(frame)
    body: dict[str, Any] = {"ocpp": 1, "up": recv_ms, "ts": recv_ms}
    if msg[0] != CALL:
        return body
    action, p = msg[2], msg[3]
    v16 = proto == "ocpp1.6"
    n = 0  # the connector the frame names (0: its transaction's)
    if action == "MeterValues":
        n = _nat(p.get("connectorId" if v16 else "evseId"))
        if n == 0:
            return body  # the main meter: kept, not metered
    elif action == "TransactionEvent" and not v16:
        evse = p.get("evse")
        n = _nat(evse.get("id")) if isinstance(evse, dict) else 0
        info = p.get("transactionInfo")
        tx = info.get("transactionId") if isinstance(info, dict) else None
        if isinstance(tx, str) and tx:
            body["tx"] = tx[:36]
        kind = p.get("eventType")
        t = time_ms(p.get("timestamp"), recv_ms)
        body["up"] = body["ts"] = t
        if "tx" in body and kind == "Started":
            body.update(ev="session_start", slot=n)
            tok = p.get("idToken")
            if isinstance(tok, dict) and isinstance(tok.get("idToken"), str):
                body["id_tag"] = tok["idToken"][:36]
        elif "tx" in body and kind == "Ended":
            why = info.get("stoppedReason") if isinstance(info, dict) else None
            body.update(ev="session_end", why=why if isinstance(why, str) else "Local")
    elif action == "StartTransaction" and v16:
        n = _nat(p.get("connectorId"))
        t = time_ms(p.get("timestamp"), recv_ms)
        body.update(up=t, ts=t, ev="session_start", slot=n, tx=str(transaction_id(sid, boot, seq)))
        tag = p.get("idTag")
        if isinstance(tag, str):
            body["id_tag"] = tag[:20]
        v = _mwh(p.get("meterStart"), "Wh") if type(p.get("meterStart")) is int else None
        if n and v is not None:
            body["reg"] = [[n, v]]
        elif n:
            body["invalid"] = [n]
        return body
    elif action == "StopTransaction" and v16:
        t = time_ms(p.get("timestamp"), recv_ms)
        tx = p.get("transactionId")
        why = p.get("reason")
        body.update(up=t, ts=t, ev="session_end", why=why if isinstance(why, str) else "Local")
        if type(tx) is int:
            body["tx"] = str(tx)
        v = _mwh(p.get("meterStop"), "Wh") if type(p.get("meterStop")) is int else None
        if v is not None:
            body["reg"] = [[0, v]]
        return body
    else:
        return body
    latest: _Sample | None = None
    bad = False
    for mv in _meter_values(p):
        s, b = _energy(mv, proto, recv_ms)
        bad = bad or b
        if s is not None and (latest is None or s.t >= latest.t):
            latest = s
    if latest is not None:
        body["reg"] = [[n, latest.mwh]]
        if latest.signed and checked:
            body["signed"] = 1
        if body.get("ev") is None:
            body["up"] = body["ts"] = latest.t
    elif bad:
        body["invalid"] = [n]
    return body


def cleaned(body: dict[str, Any]) -> ranges.Cleaned:
    """What §6.9 leaves of an OCPP body: all of it (body_of already left out what was
    unusable), with the connectors it names `invalid` as spoiled (alarmed at ingest)."""
    return ranges.Cleaned(
        body, tuple((f"slot:{n}", "meterValue") for n in body.get("invalid", ()) if n)
    )


def _nat(x: Any) -> int:
    """A connector or EVSE number: 1..16 (CONTRACT §9's slots); 0 for anything else."""
    return x if type(x) is int and 0 < x <= 16 else 0


def recheck(kid: int, proto: str, frame: bytes, public_key: str) -> None:
    """`verify` on a stored frame: it is still an OCPP-J frame and, when it was stored as
    checked (SIGNED_KID), every OCMF value in it verifies against the charger's public
    key. FrameError or ocmf.OcmfError with the reason."""
    parse(frame)
    if kid != SIGNED_KID:
        return
    signed = signed_values(proto, frame)
    if not signed:
        raise FrameError("stored as signed, but it holds no signed meter value")
    if not public_key:
        raise FrameError("stored as signed, but no public key is registered for it")
    for text in signed:
        ocmf.check(ocmf.parse(text), public_key)
