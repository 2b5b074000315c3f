"""`stationctl verify`: every raw message re-verified, every record recomputed and compared."""

from __future__ import annotations

import json
import pathlib
import subprocess

from agent.store import Store
from tests.agent_helpers import STATIONCTL, fill_store, fleet_stream, stored_rows
from tests.helpers import ROOT


def stationctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*STATIONCTL, *args], cwd=ROOT, capture_output=True, timeout=120, check=False
    )


def build(url: str) -> str:
    rows, msgs = stored_rows(fleet_stream(2, 80, sid_base="KH-VER", step_ms=60_000))
    return fill_store(url, rows, msgs)


def summary(url: str) -> tuple[int, dict[str, object]]:
    r = stationctl("verify", "--db", url, "--json")
    return r.returncode, json.loads(r.stdout)


def test_an_untouched_database_verifies(db_url: str) -> None:
    code, s = summary(build(db_url))
    assert code == 0 and s["ok"] is True
    assert s["bad_signatures"] == 0 and s["raw"] == s["verified"] > 100
    assert s["records_stored"] == s["records_recomputed"] > 10


def test_a_changed_record_or_raw_byte_is_found(db_url: str) -> None:
    url = build(db_url)
    st = Store(url, create=False)  # a tamperer with write access (either engine)
    st.db.execute(
        "UPDATE records SET mwh = mwh + 1 WHERE rid = (SELECT rid FROM records WHERE mwh > 0 "
        "ORDER BY rid LIMIT 1)"
    )
    code, s = summary(url)
    assert code == 1 and s["different"] == 1 and s["bad_signatures"] == 0
    # a raw message whose bytes were altered no longer verifies, and its energy goes missing
    rid, rec = st.db.execute(
        "SELECT id, record FROM raw WHERE kind = 'telemetry' ORDER BY id LIMIT 1 OFFSET 40"
    ).fetchone()
    forged = bytes(rec).replace(b'"e_mwh":', b'"e_mwh":9', 1)
    st.db.execute("UPDATE raw SET record = ? WHERE id = ?", (forged, rid))
    st.close()
    code, s = summary(url)
    assert code == 1 and s["bad_signatures"] == 1


def test_bad_usage_exits_2(tmp_path: pathlib.Path) -> None:
    r = stationctl("verify", "--db", f"sqlite:///{tmp_path}/absent.db")
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1
