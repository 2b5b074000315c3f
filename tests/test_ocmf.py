"""OCMF signed meter values (agent/ocpp/ocmf.py): exact readings, real ECDSA keys, hostile input."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.ocpp import ocmf
from agent.ocpp.ocmf import OcmfError

# Published vector: SAFE-eV/transparenzsoftware, src/test/resources/xml/test_ocmf_keba_kcp30.xml
# (a KEBA KCP30 wallbox record, no SA: the secp256r1 default).
KEBA_OCMF = (
    'OCMF|{"FV":"1.0","GI":"KEBA_KCP30","GS":"17619300","GV":"2.8.5","PG":"T32","IS":false,'
    '"IL":"NONE","IF":["RFID_NONE","OCPP_NONE","ISO15118_NONE","PLMN_NONE"],"IT":"NONE","ID":"",'
    '"RD":[{"TM":"2019-08-13T10:03:15,000+0000 I","TX":"B","EF":"","ST":"G","RV":0.2596,'
    '"RI":"1-b:1.8.0","RU":"kWh"},{"TM":"2019-08-13T10:03:36,000+0000 R","TX":"E","EF":"",'
    '"ST":"G","RV":0.2597,"RI":"1-b:1.8.0","RU":"kWh"}]}|'
    '{"SD":"304502200E2F107C987A300AC1695CA89EA149A8CDFA16188AF0A33EE64B67964AA943F9'
    '022100889A72B6D65364BEA8562E7F6A0253157ACFF84FE4929A93B5964D23C4265699"}'
)
KEBA_KEY = (
    "3059301306072A8648CE3D020106082A8648CE3D030107034200043AEEB45C392357820A58FDFB0857BD77"
    "ADA31585C61C430531DFA53B440AFBFDD95AC887C658EA55260F808F55CA948DF235C2108A0D6DC7D4AB1A5E"
    "1A7955BE"
)

CURVES = [
    ("ECDSA-secp256r1-SHA256", ec.SECP256R1()),
    ("ECDSA-secp384r1-SHA256", ec.SECP384R1()),
    ("ECDSA-secp256k1-SHA256", ec.SECP256K1()),
    ("ECDSA-secp192r1-SHA256", ec.SECP192R1()),
    ("ECDSA-brainpool256r1-SHA256", ec.BrainpoolP256R1()),  # the spec's spelling
    ("ECDSA-brainpool384r1-SHA256", ec.BrainpoolP384R1()),
    ("ECDSA-brainpoolP256r1-SHA256", ec.BrainpoolP256R1()),  # the usual spelling
    ("ECDSA-secp384r1-SHA384", ec.SECP384R1()),
]

T_BEGIN = "2018-07-24T13:22:04,000+0200 S"
MS_BEGIN = int(datetime(2018, 7, 24, 11, 22, 4, tzinfo=timezone.utc).timestamp()) * 1000


def reading(rv: Any, **kw: Any) -> dict[str, Any]:
    return {"TM": T_BEGIN, "TX": "B", "RV": rv, "RI": "1-b:1.8.0", "RU": "kWh", "ST": "G"} | kw


def payload(*readings: dict[str, Any], **kw: Any) -> dict[str, Any]:
    base = {"FV": "1.0", "GI": "SIM", "GS": "1", "GV": "1", "PG": "T1", "MS": "MTR-1"}
    return base | kw | {"RD": list(readings)}


def frame(*readings: str) -> str:
    """An OCMF string (signature not meant to verify) whose RD text is exactly as written."""
    rd = ",".join(readings)
    return 'OCMF|{"MS":"M","RD":[' + rd + ']}|{"SD":"3006020101020101"}'


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "curve"), CURVES, ids=[a for a, _ in CURVES])
def test_sign_parse_check_round_trip(algorithm: str, curve: ec.EllipticCurve) -> None:
    private = ec.generate_private_key(curve)
    text = ocmf.sign(payload(reading(2935.6), reading(2965.1, TX="E")), private, algorithm)
    o = ocmf.parse(text)
    assert o.algorithm == algorithm
    assert o.meter_serial == "MTR-1"
    ocmf.check(o, ocmf.public_key_text(private))
    reg = ocmf.import_register(o)
    assert reg == ocmf.OcmfReading(2_965_100_000, MS_BEGIN, "1-b:1.8.0", "G", "E")
    assert o.payload_text == text.split("|")[1]


def test_published_keba_vector_verifies() -> None:
    o = ocmf.parse(KEBA_OCMF)
    assert o.algorithm == "ECDSA-secp256r1-SHA256"  # SA absent: the default
    ocmf.check(o, KEBA_KEY)
    ocmf.check(o, KEBA_KEY.lower())
    reg = ocmf.import_register(o)
    assert reg is not None
    assert (reg.mwh, reg.tx) == (259_700, "E")  # 0.2597 kWh exactly
    assert reg.time_ms == 1_565_690_616_000  # 2019-08-13T10:03:36Z
    with pytest.raises(OcmfError, match="does not verify"):
        ocmf.check(ocmf.parse(KEBA_OCMF.replace("0.2597", "0.2598")), KEBA_KEY)


def test_signature_encodings_and_default_algorithm(key: ec.EllipticCurvePrivateKey) -> None:
    text = ocmf.sign(payload(reading(1)), key)
    body, sig = text.split("|")[1], json.loads(text.split("|")[2])
    der = bytes.fromhex(sig["SD"])
    b64 = base64.b64encode(der).decode()
    for signature in (
        {"SD": der.hex()},
        {"SE": "base64", "SD": b64},
        {"SM": "application/x-der", "SD": der.hex()},
    ):
        o = ocmf.parse(f"OCMF|{body}|{json.dumps(signature)}")
        assert o.signature == der
        ocmf.check(o, ocmf.public_key_text(key))


def test_whitespace_in_signed_text_is_kept(key: ec.EllipticCurvePrivateKey) -> None:
    # The signed text is whatever sits between the separators, spaces and '|' in strings included.
    body = '{ "TT": "a|b", "RD": [ {"RV": 1.50, "RU": "kWh"} ] }'
    der = key.sign(body.encode(), ec.ECDSA(hashes.SHA256()))
    o = ocmf.parse(f'  OCMF|{body}|{{"SD":"{der.hex()}"}}\n')
    assert o.payload_text == body
    ocmf.check(o, ocmf.public_key_text(key))
    assert o.readings[0].mwh == 1_500_000


# --- failures in check -------------------------------------------------------------------------


def test_flipped_payload_character_fails(key: ec.EllipticCurvePrivateKey) -> None:
    text = ocmf.sign(payload(reading(12.5)), key)
    with pytest.raises(OcmfError, match="does not verify"):
        ocmf.check(ocmf.parse(text.replace('"RV":12.5', '"RV":12.6')), ocmf.public_key_text(key))
    with pytest.raises(OcmfError, match="does not verify"):
        ocmf.check(ocmf.parse(text.replace('"PG":"T1"', '"PG":"T2"')), ocmf.public_key_text(key))


def test_flipped_signature_character_fails(key: ec.EllipticCurvePrivateKey) -> None:
    text = ocmf.sign(payload(reading(12.5)), key)
    head, sd = text.rsplit('"SD":"', 1)
    for i in (0, 10, len(sd) - 4):  # DER header, r, s
        flipped = sd[:i] + ("1" if sd[i] != "1" else "2") + sd[i + 1 :]
        with pytest.raises(OcmfError):
            ocmf.check(ocmf.parse(head + '"SD":"' + flipped), ocmf.public_key_text(key))


def test_signature_from_another_key_fails(key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    o = ocmf.parse(ocmf.sign(payload(reading(1)), other))
    with pytest.raises(OcmfError, match="does not verify"):
        ocmf.check(o, ocmf.public_key_text(key))


@pytest.mark.parametrize(
    "algorithm",
    ["ECDSA-secp384r1-SHA256", "ECDSA-secp256r1-SHA512", "RSA-2048", "ECDSA-secp192k1-SHA256", ""],
)
def test_wrong_or_unsupported_algorithm_fails(
    key: ec.EllipticCurvePrivateKey, algorithm: str
) -> None:
    text = ocmf.sign(payload(reading(1)), key)
    o = ocmf.parse(text.replace("ECDSA-secp256r1-SHA256", algorithm))
    with pytest.raises(OcmfError):
        ocmf.check(o, ocmf.public_key_text(key))


def test_sign_refuses_a_key_of_another_curve(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(OcmfError, match="does not match"):
        ocmf.sign(payload(reading(1)), key, "ECDSA-secp384r1-SHA256")
    with pytest.raises(OcmfError, match="unsupported"):
        ocmf.sign(payload(reading(1)), key, "ECDSA-secp256r1-MD5")


# --- public keys -------------------------------------------------------------------------------


def test_public_key_forms_all_load(key: ec.EllipticCurvePrivateKey) -> None:
    public = key.public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert ocmf.public_key_text(key) == der.hex()
    assert ocmf.public_key_text(public) == der.hex()
    forms: list[str | bytes] = [
        der.hex(),
        der.hex().upper(),
        base64.b64encode(der).decode(),
        pem.decode(),
        pem,
        der.hex().encode(),
        der,
    ]
    o = ocmf.parse(ocmf.sign(payload(reading(1)), key))
    for form in forms:
        assert ocmf.load_public_key(form).public_numbers() == public.public_numbers()
        ocmf.check(o, form)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "zz",
        "3059",
        "not a key",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
        b"\xff\x00",
        "é",
    ],
)
def test_garbage_public_key_is_an_ocmf_error(garbage: str | bytes) -> None:
    with pytest.raises(OcmfError):
        ocmf.load_public_key(garbage)


def test_non_ec_public_key_is_refused() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(OcmfError, match="elliptic"):
        ocmf.load_public_key(der.hex())


# --- readings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rv", "unit", "mwh"),
    [
        ("0.1", "kWh", 100_000),
        ("1234.567", "kWh", 1_234_567_000),
        ("2935.600", "kWh", 2_935_600_000),
        ("12", "Wh", 12_000),
        ("12.3456", "Wh", 12_345),  # floored below 1 mWh
        ("0.0000009", "kWh", 0),
        ("1E+3", "kWh", 1_000_000_000),
        ("0.9999999999999999999999999999999999", "kWh", 999_999),  # no 28-digit rounding up
        ("100000000000", "kWh", 10**17),  # the ceiling itself
        ("0", "KWH", 0),
    ],
)
def test_units_are_exact(rv: str, unit: str, mwh: int) -> None:
    o = ocmf.parse(frame('{"TM":"%s","RV":%s,"RU":"%s"}' % (T_BEGIN, rv, unit)))
    assert [r.mwh for r in o.readings] == [mwh]
    assert isinstance(o.readings[0].mwh, int)


@pytest.mark.parametrize(
    "rv", ["-0.1", "-1", "100000000000.001", "1e999999999", '"12"', "true", "null"]
)
def test_bad_reading_values_are_errors(rv: str) -> None:
    with pytest.raises(OcmfError):
        ocmf.parse(frame('{"RV":%s,"RU":"kWh"}' % rv))


@pytest.mark.parametrize(
    "ri",
    [
        "1-b:1.8.0",
        "1-0:1.8.0",
        "01-00:01.08.00*FF",
        "1-0:1.8.0*255",
        "01-0B:01.08.00*FF",
        "1.8.0",
        "",
    ],
)
def test_import_obis_forms(ri: str, key: ec.EllipticCurvePrivateKey) -> None:
    r = reading(5, RI=ri) if ri else {k: v for k, v in reading(5).items() if k != "RI"}
    reg = ocmf.import_register(ocmf.parse(ocmf.sign(payload(r), key)))
    assert reg is not None and reg.mwh == 5_000_000 and reg.obis == ri


@pytest.mark.parametrize(
    "ri",
    [
        "1-0:2.8.0",
        "1-0:1.8.1",
        "1-0:1.7.0",
        "01-0B:B1.08.00*FF",
        "01-0B:B3.08.00*FF",
        "7-0:1.8.0",
        "x",
    ],
)
def test_other_obis_codes_are_ignored(ri: str, key: ec.EllipticCurvePrivateKey) -> None:
    assert ocmf.import_register(ocmf.parse(ocmf.sign(payload(reading(5, RI=ri)), key))) is None


def test_last_import_reading_is_chosen(key: ec.EllipticCurvePrivateKey) -> None:
    # The shape of the spec's 1.4 example: register, device energy, transaction energy.
    rd = [
        reading(2935.6, RI="01-0B:01.08.00*FF"),
        reading(2965.1, RI="01-0B:01.08.00*FF", TX="E", TM="2018-07-24T13:26:04,000+0200 S"),
        reading(2905.6, RI="01-0B:B1.08.00*FF"),
        reading(2934.6, RI="01-0B:B1.08.00*FF", TX="E"),
        reading(0, RI="01-0B:B3.08.00*FF"),
        reading(29, RI="01-0B:B3.08.00*FF", TX="E"),
        reading(3, RI="1-0:1.8.0", RU="mOhm"),  # not energy: not a reading at all
    ]
    o = ocmf.parse(ocmf.sign(payload(*rd), key))
    assert len(o.readings) == 6
    reg = ocmf.import_register(o)
    assert reg is not None
    assert (reg.mwh, reg.tx, reg.time_ms) == (2_965_100_000, "E", MS_BEGIN + 240_000)


def test_omitted_fields_carry_over_from_the_previous_reading() -> None:
    o = ocmf.parse(
        frame(
            '{"TM":"%s","TX":"B","RV":1.5,"RI":"1-0:1.8.0","RU":"kWh","ST":"G"}' % T_BEGIN,
            '{"TM":"%s","TX":"C","RV":1.7}' % T_BEGIN,
            '{"TM":"%s","ST":"E"}' % T_BEGIN,  # an event: no value, not a reading
            '{"TM":"%s","TX":"E","RV":1.9}' % T_BEGIN,
        )
    )
    assert [(r.mwh, r.tx, r.obis, r.status) for r in o.readings] == [
        (1_500_000, "B", "1-0:1.8.0", "G"),
        (1_700_000, "C", "1-0:1.8.0", "G"),
        (1_900_000, "E", "1-0:1.8.0", "E"),
    ]


def test_no_import_reading_is_none() -> None:
    assert ocmf.import_register(ocmf.parse(frame())) is None
    assert ocmf.import_register(ocmf.parse(frame('{"RV":1,"RU":"kWh","RI":"1-0:2.8.0"}'))) is None


@pytest.mark.parametrize(
    ("tm", "ms"),
    [
        (T_BEGIN, MS_BEGIN),
        ("2018-07-24T13:22:04.123+0200 S", MS_BEGIN + 123),
        ("2018-07-24T11:22:04,5Z", MS_BEGIN + 500),
        ("2018-07-24T13:22:04,000+0200", MS_BEGIN),
        ("2018-07-24T08:52:04,000-02:30 U", MS_BEGIN),
        ("2018-02-30T13:22:04,000+0200 S", None),
        ("2018-07-24 13:22:04", None),
        ("", None),
        (5, None),
    ],
)
def test_times(tm: Any, ms: int | None) -> None:
    o = ocmf.parse(frame(json.dumps({"TM": tm, "RV": 1, "RU": "Wh"})))
    assert o.readings[0].time_ms == ms


# --- hostile input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        b"\xff\xfe",
        'OCMF|{"RD":[],"TT":"\ud800"}|{"SD":"00"}',  # a lone surrogate in a str
        bytearray(b"OCMF|{}|{}"),
        "",
        "OCMF",
        "OCMF|{}",
        "OCMF|{}|",
        'OCMF|{"RD":[]}|{"SD":"00"}|{}',
        'OCMF|[]|{"SD":"00"}',
        'OCMF|{"RD":{}}|{"SD":"00"}',
        'OCMF|{"RD":[1]}|{"SD":"00"}',
        'OCMF|{"RD":[]}|{"SD":"0"}',
        'OCMF|{"RD":[]}|{"SD":"xyz!","SE":"base64"}',
        'OCMF|{"RD":[]}|{"SD":"00","SE":"rot13"}',
        'OCMF|{"RD":[]}|{"SD":"00","SM":"application/raw"}',
        'OCMF|{"RD":[]}|{}',
        'OCMF|{"RD":[],"MS":5}|{"SD":"00"}',
        'OCMF|{"RD":[],"RD":[]}|{"SD":"00"}',
        'OCMF|{"RD":[{"RV":NaN,"RU":"kWh"}]}|{"SD":"00"}',
        'OCMF|{"RD":[{"RV":Infinity,"RU":"kWh"}]}|{"SD":"00"}',
        'OCMF|{"RD":[{"RV":1,"RU":"kWh","RI":7}]}|{"SD":"00"}',
        "OCMF|" + "[" * 5000 + "|{}",
        'OCMF|{"a":' + '{"a":' * 5000 + "1" + "}" * 5001 + '|{"SD":"00"}',
        'OCMF|{"RD":[{"RV":' + "9" * 5000 + ',"RU":"kWh"}]}|{"SD":"00"}',
        "OCMF|" + " " * ocmf.MAX_LEN + '{"RD":[]}|{"SD":"00"}',
    ],
)
def test_malformed_input_is_an_ocmf_error(text: str | bytes) -> None:
    with pytest.raises(OcmfError):
        ocmf.parse(text)


def test_error_messages_are_one_line() -> None:
    for text in ("x", "OCMF|{|}", 'OCMF|{"RD":[]}|{"SD":"0"}'):
        with pytest.raises(OcmfError) as info:
            ocmf.parse(text)
        assert "\n" not in str(info.value)


def _valid_ocmf() -> str:
    private = ec.derive_private_key(123456789, ec.SECP256R1())
    return ocmf.sign(payload(reading(2935.6), reading(2965.1, TX="E")), private)


VALID = _valid_ocmf()
VALID_KEY = ocmf.public_key_text(ec.derive_private_key(123456789, ec.SECP256R1()))


def _parse_and_check(text: str | bytes) -> None:
    try:
        o = ocmf.parse(text)
    except OcmfError:
        return
    ocmf.import_register(o)
    try:
        ocmf.check(o, VALID_KEY)
    except OcmfError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), st.binary(), st.text().map(lambda s: "OCMF|" + s)))
def test_parse_raises_only_ocmf_error_on_anything(text: str | bytes) -> None:
    _parse_and_check(text)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(VALID)),
            st.integers(0, 4),
            st.sampled_from(
                [
                    '"',
                    "|",
                    "{",
                    "}",
                    "[",
                    "]",
                    ",",
                    ":",
                    "-",
                    "1",
                    "e",
                    "9" * 40,
                    "\\",
                    "é",
                    "\x00",
                    "",
                ]
            ),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutations_of_a_valid_string_raise_only_ocmf_error(
    edits: list[tuple[int, int, str]],
) -> None:
    text = VALID
    for at, cut, insert in edits:
        text = text[:at] + insert + text[at + cut :]
    _parse_and_check(text)
    _parse_and_check(text.encode("utf-8", "surrogatepass"))
