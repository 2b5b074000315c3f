"""Cross-checks of the signed wire format between the firmware (made and run on MicroPython)
and independent CPython code (hmac + json), in both directions (CONTRACT 5.1, 5.5).

- tests/vectors/wire.json is made on MicroPython by tests/mp_scripts/wire_gen.py: verified
  here with CPython's hmac and json only, and regenerated to prove the checked-in file is current.
- tests/vectors/wire_cpython.json is made here (``.venv/bin/python -m tests.test_wire_cross`` rewrites it)
  and verified by the firmware's wire.verify on MicroPython.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pathlib
import random
import re
import subprocess
import sys
from typing import Any

import pytest

from tests.helpers import micropython_bin

ROOT = pathlib.Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
MP_SCRIPTS = ROOT / "tests" / "mp_scripts"
TAIL = re.compile(rb',"sig":"([0-9a-f]{64})"\}\Z')


def _no_dups(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _no_float(s: str) -> int:
    raise ValueError(f"float {s}")


def cpython_verify(payload: bytes, key: bytes) -> dict[str, Any]:
    """An independent verifier per 5.5, written from the contract with the standard library."""
    i = payload.rfind(b',"sig":"')
    m = TAIL.match(payload, i) if i >= 0 else None
    if m is None:
        raise ValueError("no valid sig tail")
    signed = payload[:i] + b"}"
    if not hmac.compare_digest(
        hmac.new(key, signed, hashlib.sha256).hexdigest().encode(), m.group(1)
    ):
        raise ValueError("bad sig")
    obj = json.loads(signed.decode("ascii"), object_pairs_hook=_no_dups, parse_float=_no_float)
    assert isinstance(obj, dict)
    return obj


def cpython_sign(obj: dict[str, Any], key: bytes, **dumps: Any) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), **dumps).encode("ascii")
    return (
        body[:-1] + b',"sig":"' + hmac.new(key, body, hashlib.sha256).hexdigest().encode() + b'"}'
    )


def _signed_raw(body: bytes, key: bytes) -> bytes:
    return (
        body[:-1] + b',"sig":"' + hmac.new(key, body, hashlib.sha256).hexdigest().encode() + b'"}'
    )


def make_cpython_vectors() -> dict[str, Any]:
    """Deterministic CPython-made payloads (insertion key order, not sorted) with expected outcome."""
    key = hashlib.sha256(b"wire_cpython.json test key").digest()
    other = hashlib.sha256(b"another key").digest()
    sid = "KH-PNH-0001"
    ok: list[tuple[str, dict[str, Any]]] = [
        (
            "cmd_config",
            {
                "v": 1,
                "sid": sid,
                "kid": 1,
                "cmd": "config",
                "telemetry_s": 30,
                "exp": 1764150060000,
                "nonce": "a1b2c3d4e5f60718",
            },
        ),
        (
            "cmd_time",
            {
                "v": 1,
                "sid": sid,
                "kid": 1,
                "cmd": "time",
                "now_ms": 1764150000123,
                "exp": 1764150060000,
                "nonce": "n-0002",
            },
        ),
        (
            "cmd_reboot",
            {
                "nonce": "n-0003",
                "exp": 1764150060000,
                "cmd": "reboot",
                "kid": 1,
                "sid": sid,
                "v": 1,
            },
        ),
        (
            "escapes_and_nesting",
            {
                "v": 1,
                "s": 'caf\u00e9 "q" \\ \n\t\x01\x7f',
                "a": [1, -2, [], {}, None, True, False],
                "big": 2**70,
                "neg": -(2**40),
            },
        ),
    ]
    vectors: list[dict[str, Any]] = []
    for name, obj in ok:
        vectors.append(
            {
                "name": name,
                "expect": "ok",
                "object": obj,
                "signed_hex": cpython_sign(obj, key).hex(),
            }
        )
    good = cpython_sign(ok[0][1], key)
    bad: list[tuple[str, str, bytes]] = [
        ("unsigned", "unsigned", json.dumps(ok[0][1], separators=(",", ":")).encode()),
        ("wrong_key", "bad_sig", cpython_sign(ok[0][1], other)),
        ("tampered_body", "bad_sig", good.replace(b'"telemetry_s":30', b'"telemetry_s":31')),
        ("uppercase_hex", "bad_sig", good[:-66] + good[-66:-2].upper() + b'"}'),
        ("trailing_space", "bad_sig", good + b" "),
        ("duplicate_key", "malformed", _signed_raw(b'{"v":1,"cmd":"reboot","cmd":"config"}', key)),
        ("float", "malformed", cpython_sign({"v": 1, "x": 1.5}, key)),
        ("spaces", "malformed", _signed_raw(json.dumps({"v": 1, "cmd": "reboot"}).encode(), key)),
        ("sig_inside", "malformed", _signed_raw(b'{"sig":"00","v":1}', key)),
        ("raw_utf8", "malformed", _signed_raw('{"v":1,"s":"caf\u00e9"}'.encode(), key)),
    ]
    for name, expect, payload in bad:
        vectors.append({"name": name, "expect": expect, "signed_hex": payload.hex()})
    return {
        "generator": "tests/test_wire_cross.py on CPython",
        "key_hex": key.hex(),
        "vectors": vectors,
    }


def render(v: dict[str, Any]) -> str:
    head = {k: v[k] for k in v if k != "vectors"}
    lines = ",\n".join("  " + json.dumps(t, separators=(",", ":")) for t in v["vectors"])
    return json.dumps(head)[:-1] + ',\n "vectors": [\n' + lines + "\n ]}\n"


def _mp(*args: str) -> str:
    proc = subprocess.run(
        [micropython_bin(), *args], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_micropython_vectors_verify_with_cpython_hmac_and_json() -> None:
    v = json.loads((VECTORS / "wire.json").read_text())
    assert "micropython" in v["generator"]
    key = bytes.fromhex(v["key_hex"])
    names = set()
    for t in v["vectors"]:
        payload = bytes.fromhex(t["signed_hex"])
        assert len(payload) <= 4096 and payload.isascii()
        obj = cpython_verify(payload, key)
        assert obj == t["object"], t["name"]
        assert list(obj)[-1] != "sig"
        # the firmware's bytes are exactly CPython's canonical compact form of the object
        i = payload.rfind(b',"sig":"')
        assert payload[:i] + b"}" == json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
        # common fields of 5.1
        assert (
            obj["v"] == 1 and obj["sid"] == "KH-PNH-0001" and obj["kid"] == 1 and obj["boot"] == 17
        )
        assert ("hist" in obj) == bool(t["call"]["hist"]) and ("ts" in obj) == (
            t["call"]["ts"] is not None
        )
        names.add(t["name"])
    seqs = [t["object"]["seq"] for t in v["vectors"]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one seq over telemetry and events
    assert {
        "telemetry_1_slot",
        "telemetry_16_slots",
        "telemetry_hist",
        "telemetry_no_meter_no_bat_no_ts",
    } <= names


def test_micropython_vectors_are_current() -> None:
    out = subprocess.run(
        [micropython_bin(), str(MP_SCRIPTS / "wire_gen.py"), "/dev/stdout"],
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == (VECTORS / "wire.json").read_bytes()


def test_cpython_vectors_are_current() -> None:
    assert (VECTORS / "wire_cpython.json").read_text() == render(make_cpython_vectors())


def test_firmware_on_micropython_verifies_cpython_vectors() -> None:
    v = make_cpython_vectors()
    lines = _mp(
        str(MP_SCRIPTS / "wire_check.py"), "verify", str(VECTORS / "wire_cpython.json")
    ).splitlines()
    assert len(lines) == len(v["vectors"])
    for t, line in zip(v["vectors"], lines, strict=False):
        name, result, *rest = line.split(" ", 2)
        assert name == t["name"] and result == t["expect"], line
        if result == "ok":
            assert json.loads(rest[0]) == t["object"]


def test_firmware_on_micropython_verifies_agent_vectors() -> None:
    path = VECTORS / "wire_agent.json"
    if not path.exists():
        pytest.skip("tests/vectors/wire_agent.json not made yet (agent side)")
    v = json.loads(path.read_text())
    lines = _mp(str(MP_SCRIPTS / "wire_check.py"), "verify", str(path)).splitlines()
    assert len(lines) == len(v["vectors"]) > 0
    for t, line in zip(v["vectors"], lines, strict=False):
        name, result, *rest = line.split(" ", 2)
        assert name == t["name"] and result == t["expect"], line
        if result == "ok":
            assert json.loads(rest[0]) == t["object"]


def _random_value(rng: random.Random, depth: int) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.4:
        kind = rng.randrange(6)
        if kind == 0:
            return rng.choice([0, 1, -1, 2**30 - 1, 2**30, -(2**31), 10**12 + 7, 2**64 + 3])
        if kind == 1:
            return rng.randrange(-(10**6), 10**6)
        if kind == 2:
            return "".join(chr(rng.randrange(0, 128)) for _ in range(rng.randrange(0, 12)))
        if kind == 3:
            return rng.choice([True, False, None])
        if kind == 4:
            return rng.choice([1.5, "caf\u00e9", 0.0])  # must be refused
        return ""
    if r < 0.7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {
        "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 6))): _random_value(
            rng, depth + 1
        )
        for _ in range(rng.randrange(0, 5))
    }


def _expected(o: Any) -> bytes | None:
    """CPython's canonical compact bytes, or None where the wire must refuse (float, non-ASCII)."""
    if _has_float(o) or not json.dumps(o, ensure_ascii=False).isascii():
        return None
    return json.dumps(o, separators=(",", ":"), sort_keys=True).encode()


def _has_float(o: Any) -> bool:
    if isinstance(o, float):
        return True
    if isinstance(o, list):
        return any(_has_float(x) for x in o)
    if isinstance(o, dict):
        return any(_has_float(x) for x in o.values())
    return False


def test_encoder_on_micropython_matches_cpython_json(tmp_path: pathlib.Path) -> None:
    rng = random.Random(20240601)
    items = [_random_value(rng, 0) for _ in range(400)]
    path = tmp_path / "items.json"
    path.write_text(json.dumps(items))
    lines = _mp(str(MP_SCRIPTS / "wire_check.py"), "encode", str(path)).splitlines()
    assert len(lines) == len(items)
    refused = 0
    for o, line in zip(items, lines, strict=False):
        want = _expected(o)
        if want is None:
            assert line == "ValueError", (o, line)
            refused += 1
        else:
            assert bytes.fromhex(line) == want, o
    assert 0 < refused < len(items)


if __name__ == "__main__":
    (VECTORS / "wire_cpython.json").write_text(render(make_cpython_vectors()))
    print("wrote", VECTORS / "wire_cpython.json", file=sys.stderr)
