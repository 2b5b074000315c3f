"""`stationctl bundle` and `verify --bundle` with OCPP chargers beside own stations.

The bundle carries the OCPP frames as stored (kind, topic, kid, recv time, exact bytes) and
the chargers' OCMF public keys (public: they verify, they cannot sign); the HMAC keys stay
in their own file. `verify --bundle` re-reads every frame (`frames.recheck`, OCMF against
the bundled key) and recomputes the records from it: a byte changed in a frame, a frame's
kid changed, another public key, or an OCPP record changed: exit 1, named. On a clean
machine the OCPP check needs `cryptography` (OCMF): without it the verifier says so (exit
2); with it, the bundle verifies.
"""

from __future__ import annotations

import base64
import json
import pathlib
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.ocpp import ocmf
from tests.agent_helpers import STATIONCTL, key_for
from tests.helpers import ROOT
from tests.test_bundle import clean_env, members, tampered, wheel_from_installed
from tests.test_report_ocpp import OCPP_SIDS, OWN_SIDS, PERIOD, SIGNED_SID, fill_both, raw_rows


def run(*argv: str, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*STATIONCTL, *argv], cwd=cwd, capture_output=True, timeout=300, check=False
    )


def make_bundle(url: str, tmp: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    out, keys = tmp / "period.zip", tmp / "period.keys"
    r = run("bundle", "--db", url, "--from", PERIOD[0], "--to", PERIOD[1])
    assert r.returncode == 2  # --out is required
    r = run(
        "bundle", "--db", url, "--from", PERIOD[0], "--to", PERIOD[1],
        "--out", str(out), "--keys-out", str(keys),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    assert b"OCPP: 3 charge point(s) in the bundle, 1 with an OCMF public key" in r.stdout
    return out, keys


def verify(path: pathlib.Path, keys: pathlib.Path) -> tuple[int, dict[str, Any], str]:
    """(exit status, the --json summary, the text output) of `verify --bundle`."""
    j = run("verify", "--bundle", str(path), "--keys", str(keys), "--json")
    t = run("verify", "--bundle", str(path), "--keys", str(keys))
    assert j.returncode == t.returncode, t.stdout.decode()
    return j.returncode, json.loads(j.stdout), t.stdout.decode()


def change_frame(
    sid: str, pick: Callable[[bytes], bool], change: Callable[[dict[str, Any], bytes], bytes]
) -> Callable[[bytes], bytes]:
    """A raw.jsonl changer: the first OCPP frame of `sid` that `pick` chooses, changed
    (`change(line, frame)` returns the new frame; it may change the line's fields)."""

    def f(data: bytes) -> bytes:
        lines = data.splitlines()
        for i, line in enumerate(lines):
            o = json.loads(line)
            frame = base64.b64decode(o["b64"])
            if o["sid"] == sid and o["kind"] == "ocpp" and pick(frame):
                o["b64"] = base64.b64encode(change(o, frame)).decode()
                lines[i] = json.dumps(o, separators=(",", ":")).encode()
                return b"\n".join(lines) + b"\n"
        raise AssertionError(f"no frame of {sid} to change")

    return f


def flip(frame: bytes, at: int) -> bytes:
    """The frame with one bit of one byte flipped."""
    b = bytearray(frame)
    b[at] ^= 0x01
    return bytes(b)


def key_of(o: dict[str, Any]) -> str:
    return f"{o['sid']} {o['boot']}:{o['seq']}"


def test_bundle_holds_ocpp_frames_and_public_keys(db_url: str, tmp_path: pathlib.Path) -> None:
    url, _want, key = fill_both(db_url)
    out, keys = make_bundle(url, tmp_path)
    m = members(out)
    man = json.loads(m["manifest.json"])
    assert man["stations"] == sorted([*OWN_SIDS, *OCPP_SIDS])
    assert man["ocpp_stations"] == {
        "OCPP-16": "ocpp1.6",
        "OCPP-201": "ocpp2.0.1",
        SIGNED_SID: "ocpp1.6",
    }
    # every raw row, the OCPP frames with their kind, topic, kid, recv time and exact bytes
    lines = [json.loads(x) for x in m["raw.jsonl"].splitlines()]
    rows = raw_rows(url)
    assert len(lines) == len(rows) == man["raw_messages"]
    by_key = {(r.sid, r.boot, r.seq): r for r in rows}
    n_ocpp = 0
    for o in lines:
        r = by_key[(o["sid"], o["boot"], o["seq"])]
        assert (o["kind"], o["topic"], o["kid"], o["recv_ms"]) == (
            r.kind,
            r.topic,
            r.kid,
            r.recv_ms,
        )
        assert base64.b64decode(o["b64"]) == bytes(r.record)
        n_ocpp += o["kind"] == "ocpp"
    assert n_ocpp == sum(1 for r in rows if r.kind == "ocpp") > 10
    assert {o["kid"] for o in lines if o["sid"] == SIGNED_SID} == {0, 1}  # boot: 0
    # the OCMF public keys are in the bundle (public); the HMAC keys only in their file
    pub = json.loads(m["ocpp/public_keys.json"])
    assert pub["points"] == {
        "OCPP-16": "",
        "OCPP-201": "",
        SIGNED_SID: ocmf.public_key_text(key),
    }
    doc = json.loads(keys.read_bytes())
    assert [(k["sid"], k["kid"]) for k in doc["keys"]] == [(s, 1) for s in OWN_SIDS]
    blob = b"".join(m.values())
    assert all(key_for(s).hex().encode() not in blob for s in OWN_SIDS)

    code, s, text = verify(out, keys)
    assert code == 0 and s["ok"], text
    assert s["ocpp_frames"] == n_ocpp and s["ocpp_failed"] == 0
    signed = sum(1 for o in lines if o["kind"] == "ocpp" and o["kid"] == 1)
    assert s["ocpp_ocmf_verified"] == signed == 3
    assert s["ocpp_unsigned"] == n_ocpp - signed
    assert s["verified"] == len(lines) - s["ocpp_unsigned"]  # HMAC + OCMF, not unsigned
    assert s["record_differences"] == s["report_differences"] == 0
    assert f"OCPP frames {n_ocpp} " in text and "unsigned" in text


def test_verify_bundle_finds_ocpp_tampering(db_url: str, tmp_path: pathlib.Path) -> None:
    url, _want, _key = fill_both(db_url)
    out, keys = make_bundle(url, tmp_path)
    lines = [json.loads(x) for x in members(out)["raw.jsonl"].splitlines()]

    def stop(frame: bytes) -> bool:
        return b'"StopTransaction"' in frame

    def first(sid: str, pick: Callable[[bytes], bool]) -> dict[str, Any]:
        return next(o for o in lines if o["sid"] == sid and pick(base64.b64decode(o["b64"])))

    # 1. a flipped byte that leaves no JSON: the frame check names it
    bad = tampered(
        out, tmp_path / "a.zip", "raw.jsonl", change_frame("OCPP-16", stop, lambda o, f: flip(f, 0))
    )
    code, s, text = verify(bad, keys)
    assert code == 1 and s["ocpp_failed"] == 1 and s["bad_signatures"] == 0, text
    assert f"ocpp: {key_of(first('OCPP-16', stop))}: OCPP frame (ocpp/ocpp1.6/OCPP-16)" in text
    assert "FAILED" in text

    # 2. a flipped byte in the meter reading, still JSON: the records recomputed differ
    def meter_stop(o: dict[str, Any], f: bytes) -> bytes:
        i = f.index(b'"meterStop":') + len(b'"meterStop":') + 1
        return flip(f, i)  # 12000 -> 13000

    bad = tampered(out, tmp_path / "b.zip", "raw.jsonl", change_frame("OCPP-16", stop, meter_stop))
    code, s, text = verify(bad, keys)
    assert code == 1 and s["ocpp_failed"] == 0 and s["record_differences"] > 0, text
    assert "OCPP-16 slot 1" in text

    # 3. a flipped byte in an OCMF-signed reading: its signature no longer verifies
    def signed(f: bytes) -> bool:
        return b"SignedData" in f

    def rv(o: dict[str, Any], f: bytes) -> bytes:
        return flip(f, f.index(b'\\"RV\\":') + len(b'\\"RV\\":') + 1)  # 30.4 -> 31.4

    bad = tampered(out, tmp_path / "c.zip", "raw.jsonl", change_frame(SIGNED_SID, signed, rv))
    code, s, text = verify(bad, keys)
    assert code == 1 and s["ocpp_failed"] == 1 and s["ocpp_ocmf_verified"] == 2, text
    assert f"ocpp: {key_of(first(SIGNED_SID, signed))}: OCPP frame" in text
    assert "signature does not verify" in text

    # 4. an unsigned frame claimed as OCMF-checked (kid 0 -> 1): nothing signed in it
    def kid1(o: dict[str, Any], f: bytes) -> bytes:
        o["kid"] = 1
        return f

    bad = tampered(out, tmp_path / "d.zip", "raw.jsonl", change_frame("OCPP-201", bool, kid1))
    code, s, text = verify(bad, keys)
    assert code == 1 and s["ocpp_failed"] == 1 and "holds no signed meter value" in text, text

    # 5. a signed frame claimed as unchecked (kid 1 -> 0): its records lose no flag silently
    def kid0(o: dict[str, Any], f: bytes) -> bytes:
        o["kid"] = 0
        return f

    bad = tampered(out, tmp_path / "e.zip", "raw.jsonl", change_frame(SIGNED_SID, signed, kid0))
    code, s, text = verify(bad, keys)
    assert code == 1 and s["ocpp_failed"] == 0 and s["record_differences"] > 0, text

    # 6. another public key for the signed charger: none of its signed frames verifies
    other = ocmf.public_key_text(ec.generate_private_key(ec.SECP256R1()))

    def swap_key(data: bytes) -> bytes:
        doc = json.loads(data)
        doc["points"][SIGNED_SID] = other
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    bad = tampered(out, tmp_path / "f.zip", "ocpp/public_keys.json", swap_key)
    code, s, text = verify(bad, keys)
    assert code == 1 and s["ocpp_failed"] == 3 and s["ocpp_ocmf_verified"] == 0, text

    # 7. an OCPP charger's credited record changed: recomputation differs, named
    def bump_ocpp(data: bytes) -> bytes:
        out_lines = data.splitlines()
        i = next(
            i
            for i, x in enumerate(out_lines)
            if json.loads(x)["sid"] == "OCPP-201" and json.loads(x)["mwh"] > 0
        )
        o = json.loads(out_lines[i])
        o["mwh"] += 1
        out_lines[i] = json.dumps(o, separators=(",", ":")).encode()
        return b"\n".join(out_lines) + b"\n"

    bad = tampered(out, tmp_path / "g.zip", "records/interval.jsonl", bump_ocpp)
    code, s, text = verify(bad, keys)
    assert code == 1 and s["record_differences"] == 1 and s["ocpp_failed"] == 0, text
    assert "metering: interval OCPP-201 slot 1" in text  # (no meter register: no layer)


def test_ocpp_bundle_on_a_clean_machine(tmp_path: pathlib.Path) -> None:
    """The clean machine of tests/test_bundle.py (the project's wheel and msgspec only):
    a bundle with OCPP frames asks for `cryptography` (its OCMF check) and verifies once
    it is there; an own-stations-only bundle never needs it (test_bundle.py)."""
    url, _want, _key = fill_both(f"sqlite:///{tmp_path}/agent.db")
    out, keys = make_bundle(url, tmp_path)
    t0 = time.monotonic()
    py = clean_env(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8"}

    def verify_clean(path: pathlib.Path) -> subprocess.CompletedProcess[bytes]:
        exe = py.parent / "stationctl"
        return subprocess.run(
            [str(exe), "verify", "--bundle", str(path), "--keys", str(keys)],
            cwd=work,
            env=env,
            capture_output=True,
            timeout=300,
            check=False,
        )

    r = verify_clean(out)
    assert r.returncode == 2 and b"cryptography" in r.stderr, r.stdout + r.stderr
    assert r.stderr.count(b"\n") == 1
    wheels = tmp_path / "crypto-wheels"
    wheels.mkdir()
    for dist in ("cryptography", "cffi", "pycparser"):
        wheel_from_installed(dist, wheels)
    pip = [str(ROOT / ".venv/bin/python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "--python", str(py), "install", "--no-index", "--no-deps"]
        + [str(w) for w in sorted(wheels.glob("*.whl"))],
        check=True,
        capture_output=True,
        timeout=300,
    )
    good = verify_clean(out)
    assert good.returncode == 0, good.stdout.decode() + good.stderr.decode()
    assert b"OK: every record and tonne is reproduced" in good.stdout
    assert b"OCMF-signed and verified 3" in good.stdout

    def flip_stop(data: bytes) -> bytes:
        return change_frame(
            "OCPP-16",
            lambda f: b'"StopTransaction"' in f,
            lambda o, f: flip(f, f.index(b'"meterStop":') + len(b'"meterStop":') + 1),
        )(data)

    bad = verify_clean(tampered(out, tmp_path / "x.zip", "raw.jsonl", flip_stop))
    assert bad.returncode == 1 and b"FAILED" in bad.stdout, bad.stdout.decode()
    print(f"clean machine with cryptography: {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("what", ["own-only"])
def test_own_only_bundle_has_no_ocpp_member(what: str, tmp_path: pathlib.Path) -> None:
    """A bundle without OCPP stations is as before: no public keys member."""
    from tests.agent_helpers import fill_store, stored_rows
    from tests.test_report_ocpp import own_stream

    stream = own_stream()
    rows, msgs = stored_rows(stream)
    url = fill_store(f"sqlite:///{tmp_path}/own.db", rows, msgs)
    out = tmp_path / "own.zip"
    r = run("bundle", "--db", url, "--from", PERIOD[0], "--to", PERIOD[1], "--out", str(out))
    assert r.returncode == 0, r.stderr.decode()
    m = members(out)
    assert (
        "ocpp/public_keys.json" not in m and json.loads(m["manifest.json"])["ocpp_stations"] == {}
    )
