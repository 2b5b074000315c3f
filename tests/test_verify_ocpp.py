"""`stationctl verify --db` with OCPP chargers beside own stations: honest counts.

OCPP frames carry no HMAC signature: they are counted as OCPP frames, of which those with
OCMF signatures verified again against the charger's public key, and the unsigned ones;
"signatures verified" counts only signatures (HMAC and OCMF). A frame altered in the
database (`UPDATE raw SET record = …`) fails the run, named.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from agent.ocpp.frames import SIGNED_KID
from agent.store import Store
from tests.agent_helpers import STATIONCTL
from tests.helpers import ROOT
from tests.test_report_ocpp import OCPP_SIDS, OWN_SIDS, SIGNED_SID, fill_both, raw_rows


def verify(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STATIONCTL, "verify", "--db", url, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def summary(url: str) -> tuple[int, dict[str, Any]]:
    r = verify(url, "--json")
    return r.returncode, json.loads(r.stdout)


def alter(url: str, sid: str, pick: bytes, change: Any) -> str:
    """Change the first OCPP frame of `sid` holding `pick` in the database (a tamperer
    with write access); returns its key as verify names it, "SID BOOT:SEQ"."""
    st = Store(url, create=False)
    try:
        rows = st.db.execute(
            "SELECT id, boot, seq, record FROM raw WHERE sid = ? AND kind = 'ocpp' "
            "ORDER BY boot, seq",
            (sid,),
        ).fetchall()
        rid, boot, seq, rec = next(r for r in rows if pick in bytes(r[3]))
        new = change(bytes(rec))
        assert new != bytes(rec)
        st.db.execute("UPDATE raw SET record = ? WHERE id = ?", (new, rid))
    finally:
        st.close()
    return f"{sid} {boot}:{seq}"


def test_verify_db_counts_ocpp_frames_apart(db_url: str) -> None:
    url, _want, _key = fill_both(db_url)
    rows = raw_rows(url)
    n_ocpp = sum(1 for r in rows if r.kind == "ocpp")
    n_signed = sum(1 for r in rows if r.kind == "ocpp" and r.kid == SIGNED_KID)
    n_own = len(rows) - n_ocpp
    assert {r.sid for r in rows} == {*OWN_SIDS, *OCPP_SIDS} and n_signed == 3 and n_own == 50
    code, s = summary(url)
    assert code == 0 and s["ok"]
    assert s["raw"] == len(rows) and s["bad_signatures"] == 0
    assert s["ocpp_frames"] == n_ocpp and s["ocpp_ocmf_verified"] == n_signed
    assert s["ocpp_unsigned"] == n_ocpp - n_signed and s["ocpp_failed"] == 0
    assert s["verified"] == n_own + n_signed  # signatures: HMAC and OCMF, no unsigned frame
    assert s["different"] == s["missing"] == s["extra"] == 0 and s["records_stored"] > 0
    r = verify(url)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0] == f"raw messages {len(rows)}, signatures verified {n_own + n_signed}, failed 0"
    assert lines[1] == (
        f"OCPP frames {n_ocpp} (no HMAC signature): OCMF-signed and verified {n_signed}, "
        f"unsigned {n_ocpp - n_signed} (only the CSMS's receipt), failed 0"
    )
    assert lines[2].startswith("records stored ")
    assert lines[-1].startswith("OK: every record is reproduced from signed raw messages")
    # one OCPP station alone
    code, s = summary_sid(url, "OCPP-201")
    assert code == 0 and s["raw"] == s["ocpp_frames"] == s["ocpp_unsigned"] > 0
    assert s["verified"] == 0


def summary_sid(url: str, sid: str) -> tuple[int, dict[str, Any]]:
    r = verify(url, "--sid", sid, "--json")
    return r.returncode, json.loads(r.stdout)


def test_an_altered_ocpp_frame_fails_verify(db_url: str) -> None:
    url, _want, _key = fill_both(db_url)
    # a frame that no longer reads (its first byte changed): named, exit 1
    name = alter(url, "OCPP-16", b'"StopTransaction"', lambda b: b"{" + b[1:])
    r = verify(url)
    assert r.returncode == 1, r.stdout
    assert f"  bad frame: {name}: OCPP frame (ocpp/ocpp1.6/OCPP-16): not" in r.stdout
    assert r.stdout.splitlines()[-1] == "FAILED"
    code, s = summary(url)
    assert code == 1 and s["ocpp_failed"] == 1 and s["bad_signatures"] == 1
    assert s["different"] + s["missing"] + s["extra"] > 0  # its energy is gone too


def test_an_altered_reading_fails_verify(db_url: str) -> None:
    url, _want, _key = fill_both(db_url)
    # an unsigned frame's reading changed, still a frame: the records differ
    alter(
        url,
        "OCPP-201",
        b'"Ended"',
        lambda b: b.replace(b"21500", b"21900", 1),
    )
    code, s = summary(url)
    assert code == 1 and s["ocpp_failed"] == 0 and s["different"] > 0, s
    # a signed frame's OCMF reading changed: its signature fails, named
    rv = b'\\"RV\\":30.4'  # the second signed reading, 30.4 kWh
    name = alter(url, SIGNED_SID, rv, lambda b: b.replace(rv, b'\\"RV\\":39.4', 1))
    r = verify(url)
    assert r.returncode == 1 and f"  bad frame: {name}: OCPP frame" in r.stdout, r.stdout
    assert "signature does not verify" in r.stdout
    code, s = summary(url)
    assert s["ocpp_failed"] == 1 and s["ocpp_ocmf_verified"] == 2
