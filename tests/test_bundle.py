"""`stationctl bundle` and `stationctl verify --bundle`, down to a clean machine.

The simulated month of tests/test_report.py is bundled; the bundle's manifest hashes every
member, the keys go to their own 0600 file. `verify --bundle` recomputes every record and
tonne from the bundle alone: in this process (fast cases), and in a fresh virtual
environment that holds only the project and msgspec (no agent, no database, no psycopg,
no matplotlib), from a working directory outside the repository.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from typing import Any

import pytest

from stationctl.cli import main
from tests.agent_helpers import key_for
from tests.helpers import ROOT
from tests.test_report import PERIOD, SIDS, build_month

Bundle = tuple[pathlib.Path, pathlib.Path]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    tmp = tmp_path_factory.mktemp("bundle")
    url, cfg = build_month(tmp)
    out, keys = tmp / "period.zip", tmp / "period.keys"
    argv = ["bundle", "--db", url, "--from", PERIOD[0], "--to", PERIOD[1], "--out", str(out)]
    assert main([*argv, "--keys-out", str(keys), "--config", str(cfg)]) == 0
    return out, keys


def members(path: pathlib.Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def tampered(
    src: pathlib.Path, dst: pathlib.Path, name: str, change: Callable[[bytes], bytes]
) -> pathlib.Path:
    """A copy of the bundle with one member changed and, as a careful forger would, the
    manifest's hash of it recomputed."""
    m = members(src)
    new = change(m[name])
    assert new != m[name]
    m[name] = new
    man = json.loads(m["manifest.json"])
    man["files"][name] = {"sha256": hashlib.sha256(new).hexdigest(), "bytes": len(new)}
    m["manifest.json"] = json.dumps(man, indent=1, sort_keys=True).encode()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
        for n in sorted(m):
            z.writestr(n, m[n])
    return dst


def bump_record(data: bytes) -> bytes:
    """One interval record's credited mWh + 1."""
    lines = data.splitlines()
    i = next(i for i, line in enumerate(lines) if json.loads(line)["mwh"] > 0)
    o = json.loads(lines[i])
    o["mwh"] += 1
    lines[i] = json.dumps(o, separators=(",", ":")).encode()
    return b"\n".join(lines) + b"\n"


def forge_raw(data: bytes) -> bytes:
    """One telemetry message's first e_mwh with a digit more, its signature left as it was."""
    lines = data.splitlines()
    for i, line in enumerate(lines):
        o = json.loads(line)
        payload = base64.b64decode(o["b64"])
        if o["kind"] == "telemetry" and i > 100 and b'"e_mwh":' in payload:
            o["b64"] = base64.b64encode(payload.replace(b'"e_mwh":', b'"e_mwh":9', 1)).decode()
            lines[i] = json.dumps(o, separators=(",", ":")).encode()
            return b"\n".join(lines) + b"\n"
    raise AssertionError("no telemetry to forge")


def test_manifest_hashes_every_member_and_keys_are_apart(bundle: Bundle) -> None:
    out, keys = bundle
    m = members(out)
    man = json.loads(m.pop("manifest.json"))
    assert man["format"] == "stationctl-bundle/1" and man["stations"] == SIDS
    assert set(man["files"]) == set(m)
    for name, meta in man["files"].items():
        assert hashlib.sha256(m[name]).hexdigest() == meta["sha256"] and meta["bytes"] == len(
            m[name]
        )
    for name in (
        "raw.jsonl",
        "records/interval.jsonl",
        "records/day.jsonl",
        "records/session.jsonl",
        "records/stored/interval.jsonl",  # the register's layer changed grid-side records
        "metering.json",
        "carbon_params.toml",
        "meters/register.json",
        "report/report.html",
        "report/energy.csv",
        "report/carbon.csv",
    ):
        assert name in m, name
    raw = [json.loads(line) for line in m["raw.jsonl"].splitlines()]
    assert man["raw_messages"] == len(raw) > 8000 and {r["sid"] for r in raw} == set(SIDS)
    # the records are what export gives; the register is the store's
    reg = json.loads(m["meters/register.json"])
    assert [x["serial"] for x in reg["register"]["meters"]] == ["SN-0000"]
    assert json.loads(m["metering.json"])["metering"]["locked_until_ms"] is not None
    # the keys: a file of their own, 0600, only the bundle's stations; none in the bundle
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    doc = json.loads(keys.read_bytes())
    assert [(k["sid"], k["kid"]) for k in doc["keys"]] == [(s, 1) for s in SIDS]
    blob = b"".join(m.values())
    for sid in SIDS:
        assert doc["keys"][SIDS.index(sid)]["key"] == key_for(sid).hex()
        assert key_for(sid).hex().encode() not in blob


def test_verify_bundle_in_process(
    bundle: Bundle, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, keys = bundle

    def verify(path: pathlib.Path, *extra: str) -> tuple[int, dict[str, Any]]:
        code = main(["verify", "--bundle", str(path), "--json", *extra])
        return code, json.loads(capsys.readouterr().out)

    code, s = verify(out, "--keys", str(keys))
    assert code == 0 and s["ok"] and s["verified"] == s["raw"] > 8000
    assert s["record_differences"] == s["report_differences"] == 0
    # without the keys: not a pass, unless the verifier says so
    code, s = verify(out)
    assert code == 1 and not s["signatures_checked"] and s["record_differences"] == 0
    assert verify(out, "--no-signatures")[0] == 0
    # a stored (metering) record changed: recomputation differs
    bad = tampered(out, tmp_path / "stored.zip", "records/stored/interval.jsonl", bump_record)
    code, s = verify(bad, "--keys", str(keys))
    assert code == 1 and s["record_differences"] == 1 and s["bad_signatures"] == 0
    # a tonne changed in the report: its carbon table no longer matches the records
    bad = tampered(
        out,
        tmp_path / "carbon.zip",
        "report/carbon.csv",
        lambda b: b.replace(b",example-kh,", b",example-kh ,", 1),
    )
    code, s = verify(bad, "--keys", str(keys))
    assert code == 1 and s["report_differences"] == 1 and s["record_differences"] == 0
    # a member changed without its hash: the manifest says so
    m = members(out)
    with zipfile.ZipFile(tmp_path / "nohash.zip", "w") as z:
        for n in sorted(m):
            z.writestr(n, m[n] + (b"x" if n == "carbon_params.toml" else b""))
    code, s = verify(tmp_path / "nohash.zip", "--keys", str(keys))
    assert code == 1 and s["manifest_problems"] == 1
    # bad usage
    assert main(["verify", "--bundle", str(tmp_path / "absent.zip")]) == 2
    assert main(["verify", "--bundle", str(out), "--db", "x.db"]) == 2
    assert main(["verify", "--bundle", str(keys)]) == 2  # not a zip
    assert main(["verify"]) == 2


# ---- the clean machine --------------------------------------------------------------------


def wheel_from_installed(dist: str, out: pathlib.Path) -> pathlib.Path:
    """A wheel of an installed distribution, made from its installed files (RECORD): the
    runtime dependency goes into the fresh environment without the package index."""
    d = importlib.metadata.distribution(dist)
    tag = next(
        line.split(":", 1)[1].strip()
        for line in (d.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag:")
    )
    path = out / f"{d.metadata['Name'].replace('-', '_')}-{d.version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in d.files or ():
            src = pathlib.Path(str(d.locate_file(f)))
            if f.parts[0] == ".." or "__pycache__" in f.parts or not src.is_file():
                continue
            z.write(src, str(f))
    return path


def clean_env(tmp: pathlib.Path) -> pathlib.Path:
    """A fresh virtual environment with the project (built from this work tree) and its one
    runtime dependency for `verify --bundle`, msgspec; nothing else. Returns its python."""
    wheels = tmp / "wheels"
    wheels.mkdir()
    src = tmp / "src"
    src.mkdir()
    for d in ("stationctl", "agent", "tools", "firmware"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]

    def sh(cmd: list[str]) -> None:
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)

    sh([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels)]
       + [str(src)])  # fmt: skip
    wheel_from_installed("msgspec", wheels)
    sh([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")])
    py = tmp / "venv" / "bin" / "python"
    sh([*pip, "--python", str(py), "install", "--no-index", "--no-deps"]
       + [str(w) for w in sorted(wheels.glob("*.whl"))])  # fmt: skip
    return py


def test_verify_bundle_on_a_clean_machine(bundle: Bundle, tmp_path: pathlib.Path) -> None:
    out, keys = bundle
    t0 = time.monotonic()
    py = clean_env(tmp_path)
    made = time.monotonic() - t0
    work = tmp_path / "elsewhere"  # not the repository: nothing importable from there
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8"}
    probe = subprocess.run(
        [str(py), "-c", "import psycopg"], cwd=work, env=env, capture_output=True, check=False
    )
    assert probe.returncode != 0  # the agent's database driver is not there

    def verify(path: pathlib.Path) -> subprocess.CompletedProcess[bytes]:
        exe = py.parent / "stationctl"
        return subprocess.run(
            [str(exe), "verify", "--bundle", str(path), "--keys", str(keys)],
            cwd=work,
            env=env,
            capture_output=True,
            timeout=300,
            check=False,
        )

    good = verify(out)
    assert good.returncode == 0, good.stdout.decode() + good.stderr.decode()
    assert b"OK: every record and tonne is reproduced" in good.stdout
    bad = verify(tampered(out, tmp_path / "record.zip", "records/interval.jsonl", bump_record))
    assert bad.returncode == 1 and b"credited: interval" in bad.stdout, bad.stdout.decode()
    bad = verify(tampered(out, tmp_path / "raw.zip", "raw.jsonl", forge_raw))
    assert bad.returncode == 1 and b"failed 1" in bad.stdout, bad.stdout.decode()
    assert b"bad_sig" in bad.stdout
    print(f"clean environment made in {made:.1f} s, {time.monotonic() - t0:.1f} s in all")
    assert not os.path.exists(work / "month.db")


def test_bundle_on_both_engines(
    db_url: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.agent_helpers import fill_store, fleet_stream, stored_rows

    rows, msgs = stored_rows(fleet_stream(2, 200, sid_base="KH-ENG", step_ms=900_000))
    url = fill_store(db_url, rows, msgs)
    out, keys = tmp_path / "b.zip", tmp_path / "b.keys"
    argv = ["bundle", "--db", url, "--from", "2025-11-27", "--to", "2025-11-28"]
    assert main([*argv, "--out", str(out), "--keys-out", str(keys)]) == 0
    capsys.readouterr()
    assert main(["verify", "--bundle", str(out), "--keys", str(keys), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    # the whole streams, though the period is one day of the two
    assert s["ok"] and s["raw"] == s["verified"] == len(rows) and 0 < s["records"]
    assert "records/stored/interval.jsonl" not in members(out)  # no register: no layer
