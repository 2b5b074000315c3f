"""OCMF signed meter values: parse, verify and (for simulators) sign.

The Open Charge Metering Format (S.A.F.E. e.V., github.com/SAFE-eV/OCMF-Open-Charge-Metering-Format)
is what a certified meter in a third-party charger signs: ``OCMF|{payload}|{signature}``. The
agent's OCPP endpoint uses this module to turn such a string into an exact mWh register reading it
can credit, once the signature has been checked against the meter's public key.

Exactness rules: the signed bytes are the payload text exactly as received (never re-serialised),
and RV is read from its JSON number text with ``Decimal`` so 0.1 kWh is 100000 mWh, not a float.
Parsing is bounded (MAX_LEN) and raises nothing but OcmfError, whatever the input.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "MAX_LEN",
    "Ocmf",
    "OcmfError",
    "OcmfReading",
    "check",
    "import_register",
    "load_public_key",
    "parse",
    "public_key_text",
    "sign",
]

MAX_LEN = 16384  # longer input is an OcmfError (bounded work per frame)
DEFAULT_ALGORITHM = "ECDSA-secp256r1-SHA256"  # the spec's default when SA is absent
MAX_MWH = 10**17  # 10^11 kWh: far above any real register, low enough to bound the arithmetic

# OCMF table 22 curves, by the spelling the spec uses (brainpool256r1) and the usual one
# (brainpoolP256r1). Not supported: secp192k1 (ECDSA-secp192k1-SHA256), which the
# `cryptography` package does not implement; such records fail check() with OcmfError.
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
    "secp256k1": ec.SECP256K1,
    "secp192r1": ec.SECP192R1,
    "brainpool256r1": ec.BrainpoolP256R1,
    "brainpoolP256r1": ec.BrainpoolP256R1,
    "brainpool384r1": ec.BrainpoolP384R1,
    "brainpoolP384r1": ec.BrainpoolP384R1,
}
# The spec names SHA256 for every curve; SHA384 is accepted where a vendor names it.
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"SHA256": hashes.SHA256, "SHA384": hashes.SHA384}

_ENERGY_SCALE = {"wh": 1000, "kwh": 1_000_000}  # mWh per unit
# Fields a reading inherits from the one before it (OCMF: identical values are omitted).
_INHERITED = ("RI", "RU", "RT", "TX", "ST", "EF")

_TM = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:[,.](\d{1,9}))?"
    r"(Z|[+-]\d{2}:?\d{2})(?: [A-Za-z])?",
    re.ASCII,
)
# OBIS A-B:C.D.E*F in the decimal (1-0:1.8.0*255), hex (01-00:01.08.00*FF) and
# placeholder (1-b:1.8.0) forms; A-B and F optional.
_OBIS = re.compile(
    r"(?:([0-9A-Fa-f]{1,3})-[0-9A-Za-z]{1,3}:)?"
    r"([0-9A-Fa-f]{1,3})\.([0-9A-Fa-f]{1,3})\.([0-9A-Fa-f]{1,3})(?:\*[0-9A-Fa-f]{1,3})?",
    re.ASCII,
)
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+", re.ASCII)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class OcmfError(ValueError):
    """Malformed OCMF, unknown algorithm, bad key, or bad signature (one-line message)."""


@dataclass(frozen=True)
class OcmfReading:
    mwh: int  # exact, floored; never a float
    time_ms: int | None  # TM as Unix ms UTC; None if unparsable
    obis: str  # RI ("" when absent)
    status: str  # ST ("" when absent)
    tx: str  # TX ("" when absent)


@dataclass(frozen=True)
class Ocmf:
    payload_text: str  # the signed text, exactly
    payload: dict[str, Any] = field(hash=False)  # decoded; numbers as Decimal
    algorithm: str  # SA (the spec's default when absent)
    signature: bytes  # SD decoded per SE
    readings: tuple[OcmfReading, ...]  # the energy (Wh/kWh) readings of RD, in order
    meter_serial: str  # MS ("" when absent)


# --- parsing -----------------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise OcmfError(f"JSON constant {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two RVs in one object would let a signer and a verifier read different values.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise OcmfError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


_DECODER = json.JSONDecoder(
    parse_float=Decimal,
    parse_int=Decimal,
    parse_constant=_no_constant,
    object_pairs_hook=_no_duplicates,
)


def _as_text(text: str | bytes) -> str:
    if isinstance(text, bytes | bytearray):
        if len(text) > MAX_LEN:
            raise OcmfError(f"OCMF longer than {MAX_LEN} bytes")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise OcmfError("OCMF is not valid UTF-8") from None
    if not isinstance(text, str):
        raise OcmfError("OCMF must be str or bytes")
    if len(text) > MAX_LEN:
        raise OcmfError(f"OCMF longer than {MAX_LEN} characters")
    try:
        text.encode("utf-8")  # lone surrogates: the signed bytes would not exist
    except UnicodeEncodeError:
        raise OcmfError("OCMF is not valid Unicode") from None
    return text.strip()


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _object_at(text: str, i: int, what: str) -> tuple[dict[str, Any], int]:
    """The JSON object starting at text[i] (after whitespace) and the index just past it."""
    try:
        value, end = _DECODER.raw_decode(text, _skip_ws(text, i))
    except OcmfError:
        raise
    except (ValueError, ArithmeticError, RecursionError):
        # RecursionError: deep nesting; ArithmeticError: Decimal limits on absurd exponents
        raise OcmfError(f"{what} section is not valid JSON") from None
    if not isinstance(value, dict):
        raise OcmfError(f"{what} section is not a JSON object")
    return value, end


def _split(text: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(payload text, payload, signature) of ``OCMF|{...}|{...}``; '|' may occur in strings."""
    if not text.startswith("OCMF|"):
        raise OcmfError("OCMF must start with 'OCMF|'")
    payload, end = _object_at(text, 5, "payload")
    bar = _skip_ws(text, end)
    if bar >= len(text) or text[bar] != "|":
        raise OcmfError("expected '|' after the payload section")
    signature, end = _object_at(text, bar + 1, "signature")
    if end != len(text):
        raise OcmfError("unexpected text after the signature section")
    return text[5:bar], payload, signature


def _str_field(obj: dict[str, Any], key: str, default: str = "") -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise OcmfError(f"{key} must be a string")
    return value


def _signature_bytes(sig: dict[str, Any]) -> bytes:
    mime = _str_field(sig, "SM", "application/x-der")
    if mime != "application/x-der":  # the only form OCMF defines: a DER ECDSA-Sig-Value
        raise OcmfError(f"unsupported signature mime type SM={mime[:64]!r}")
    data = _str_field(sig, "SD")
    encoding = _str_field(sig, "SE", "hex").lower()
    if encoding == "hex":
        if not _HEX.fullmatch(data):
            raise OcmfError("SD is not hex")
        return bytes.fromhex(data)
    if encoding == "base64":
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise OcmfError("SD is not base64") from None
        if not decoded:
            raise OcmfError("SD is empty")
        return decoded
    raise OcmfError(f"unknown signature encoding SE={encoding!r}")


def _value_mwh(rv: Any, unit: str) -> int | None:
    """RV in mWh (floored) for energy units, None for other units; checks sign and size."""
    if not isinstance(rv, Decimal):
        raise OcmfError("RV must be a number")
    if rv < 0:
        raise OcmfError("RV is negative")
    scale = _ENERGY_SCALE.get(unit.lower())
    if rv > MAX_MWH // (scale or 1_000_000):  # compared before any arithmetic: 1e999999 is fine
        raise OcmfError("RV is out of range")
    if scale is None:
        return None
    # Integer arithmetic on the exact digits: Decimal multiplication would round at 28 digits.
    _, digits, exponent = rv.as_tuple()
    assert isinstance(exponent, int)  # finite: NaN/Infinity are rejected by the decoder
    coefficient = int("".join(map(str, digits)) or "0")
    if coefficient == 0:
        return 0  # 0e999999999 must not cost 10**999999999
    if exponent >= 0:  # bounded by the range check above
        return coefficient * scale * int(10**exponent)
    if -exponent > len(digits) + 6:
        return 0  # below 1 mWh; 1e-999999999 must not cost 10**999999999 either
    return coefficient * scale // int(10**-exponent)


def _time_ms(tm: Any) -> int | None:
    if not isinstance(tm, str):
        return None
    m = _TM.fullmatch(tm)
    if m is None:
        return None
    year, month, day, hour, minute, second, frac, zone = m.groups()
    try:
        offset = timedelta(0)
        if zone != "Z":
            hh, mm = int(zone[1:3]), int(zone[-2:])
            if mm >= 60:
                return None
            offset = timedelta(hours=hh, minutes=mm) * (-1 if zone[0] == "-" else 1)
        dt = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second),
            tzinfo=timezone(offset),
        )  # fmt: skip
    except ValueError:  # 2019-02-30, 25:00, offsets of a day or more
        return None
    delta = dt - _EPOCH
    ms = (delta.days * 86_400 + delta.seconds) * 1000
    return ms + int((frac or "0")[:3].ljust(3, "0"))


def _raw_readings(payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """RD entries with the omitted-because-unchanged fields filled in from the previous one."""
    rd = payload.get("RD")
    if not isinstance(rd, list):
        raise OcmfError("RD must be a list")
    carried: dict[str, Any] = {}
    for entry in rd:
        if not isinstance(entry, dict):
            raise OcmfError("RD entries must be objects")
        for key in _INHERITED:
            if key in entry:
                carried[key] = entry[key]
        yield {**entry, **carried}


def _readings(payload: dict[str, Any]) -> tuple[OcmfReading, ...]:
    out = []
    for entry in _raw_readings(payload):
        obis, unit = _str_field(entry, "RI"), _str_field(entry, "RU")
        status, tx = _str_field(entry, "ST"), _str_field(entry, "TX")
        if "RV" not in entry:
            continue  # an event (error) entry: OCMF omits RV/RI/RU/RT for those
        mwh = _value_mwh(entry["RV"], unit)
        if mwh is None:
            continue  # not an energy quantity (no Wh/kWh unit)
        out.append(OcmfReading(mwh, _time_ms(entry.get("TM")), obis, status, tx))
    return tuple(out)


def parse(text: str | bytes) -> Ocmf:
    """The structure of an OCMF string, without checking its signature; raises OcmfError."""
    payload_text, payload, sig = _split(_as_text(text))
    return Ocmf(
        payload_text=payload_text,
        payload=payload,
        algorithm=_str_field(sig, "SA", DEFAULT_ALGORITHM),
        signature=_signature_bytes(sig),
        readings=_readings(payload),
        meter_serial=_str_field(payload, "MS"),
    )


# --- readings ----------------------------------------------------------------------------------


def _is_import_obis(ri: str) -> bool:
    """1.8.0 (total active import energy) of electricity, in any of the notations OCMF meets."""
    m = _OBIS.fullmatch(ri)
    if m is None:
        return False
    # Leading zeros aside, 1/8/0 read the same in decimal and hex, so one base suffices.
    medium, *cde = (None if g is None else int(g, 16) for g in m.groups())
    return medium in (None, 1) and cde == [1, 8, 0]


def import_register(o: Ocmf) -> OcmfReading | None:
    """The last active-import-energy reading (or one without RI) in Wh/kWh; None if none."""
    for reading in reversed(o.readings):
        if not reading.obis or _is_import_obis(reading.obis):
            return reading
    return None


# --- keys and signatures -----------------------------------------------------------------------


def _algorithm(name: str) -> tuple[type[ec.EllipticCurve], hashes.HashAlgorithm]:
    parts = name.split("-")
    if len(parts) != 3 or parts[0] != "ECDSA" or parts[1] not in _CURVES or parts[2] not in _HASHES:
        raise OcmfError(f"unsupported signature algorithm {name[:64]!r}")
    return _CURVES[parts[1]], _HASHES[parts[2]]()


def _decode_key_text(text: str) -> list[bytes]:
    """Candidate DER encodings of a key given as text: hex first, then base64."""
    text = "".join(text.split())
    candidates = []
    if _HEX.fullmatch(text):
        candidates.append(bytes.fromhex(text))
    try:
        candidates.append(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        pass
    return candidates


def load_public_key(text: str | bytes) -> ec.EllipticCurvePublicKey:
    """An EC public key from hex DER, base64 DER or PEM (str or bytes), or raw DER bytes."""
    if isinstance(text, bytes | bytearray):
        raw = bytes(text)
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            return _load_der(raw)
    if not isinstance(text, str):
        raise OcmfError("public key must be str or bytes")
    if len(text) > MAX_LEN:
        raise OcmfError("public key text too long")
    if "-----BEGIN" in text:
        try:
            key = serialization.load_pem_public_key(text.strip().encode("ascii"))
        except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError):
            raise OcmfError("public key PEM does not load") from None
        return _ec_only(key)
    error = OcmfError("public key is not hex DER, base64 DER or PEM")
    for der in _decode_key_text(text):
        try:
            return _load_der(der)
        except OcmfError as exc:
            if "elliptic" in str(exc):  # it was a key, just not an EC one: say so
                error = exc
    raise error


def _load_der(der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        raise OcmfError("public key DER does not load") from None
    return _ec_only(key)


def _ec_only(key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise OcmfError("public key is not an elliptic-curve key")
    return key


def public_key_text(private_key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    """The public key as hex of DER SubjectPublicKeyInfo (OCPP 2.0.1 publicKey, chargers' form)."""
    public = (
        private_key.public_key()
        if isinstance(private_key, ec.EllipticCurvePrivateKey)
        else private_key
    )
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der.hex()


def check(o: Ocmf, public_key: str | bytes | ec.EllipticCurvePublicKey) -> None:
    """Raise OcmfError unless o's signature verifies under public_key with o's algorithm."""
    curve, digest = _algorithm(o.algorithm)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        key = public_key
    else:
        key = load_public_key(public_key)
    if not isinstance(key.curve, curve):
        raise OcmfError(f"public key is on {key.curve.name}, not the curve of {o.algorithm}")
    try:
        key.verify(o.signature, o.payload_text.encode("utf-8"), ec.ECDSA(digest))
    except (InvalidSignature, ValueError):
        raise OcmfError("signature does not verify") from None


# --- signing (simulators and tests) ------------------------------------------------------------


def _dumps(value: Any) -> str:
    """Compact JSON like json.dumps(separators=(",", ":")), writing Decimal as its own text."""
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise OcmfError("payload keys must be strings")
        return "{" + ",".join(json.dumps(k) + ":" + _dumps(v) for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise OcmfError("payload numbers must be finite")
        return str(value)
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise OcmfError(f"payload is not JSON-serialisable: {exc}") from None


def sign(
    payload: dict[str, Any],
    private_key: ec.EllipticCurvePrivateKey,
    algorithm: str = DEFAULT_ALGORITHM,
) -> str:
    """An OCMF string for payload, signed by private_key (DER signature, hex, in SD)."""
    curve, digest = _algorithm(algorithm)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
        private_key.curve, curve
    ):
        raise OcmfError(f"private key does not match {algorithm}")
    payload_text = _dumps(payload)
    der = private_key.sign(payload_text.encode("utf-8"), ec.ECDSA(digest))
    signature = json.dumps({"SA": algorithm, "SD": der.hex().upper()}, separators=(",", ":"))
    return f"OCMF|{payload_text}|{signature}"
