"""`stationctl verify`: every raw message re-verified, every record recomputed and compared."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import threading
import time

from agent.keys import KeyStore
from agent.store import Store
from tests.agent_helpers import (
    STATIONCTL,
    AgentProcess,
    Publisher,
    fill_store,
    fleet_stream,
    key_for,
    stored_rows,
)
from tests.helpers import ROOT
from tools.mosquitto import Mosquitto


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


def test_verify_beside_a_running_agent_agrees(
    tmp_path: pathlib.Path, db_url: str, mosquitto: Mosquitto
) -> None:
    """`verify` while an agent ingests said FAILED (it read raw and records at different
    moments); it reads one snapshot and agrees, run after run (CONTRACT §8), the messages
    the agent holds for their station's next metering step counted apart (`held`)."""
    items = fleet_stream(3, 400, sid_base="KH-RUN", step_ms=10_000)
    sids = sorted({topic.split("/")[1] for topic, _p in items})
    with KeyStore(db_url) as ks:
        for sid in sids:
            ks.add(sid, key_for(sid))
    agent = AgentProcess(tmp_path, db_url, mosquitto.port, records_ms=500).start()
    pub = Publisher(mosquitto.port)
    sender = threading.Thread(
        target=pub.send,
        args=(items,),
        kwargs={"pace_s": 0.004},
    )
    results = []
    try:
        agent.wait_log("subscribed", 30)
        sender.start()
        time.sleep(1.0)
        while sender.is_alive() and len(results) < 8:
            r = stationctl("verify", "--db", db_url, "--json")
            results.append((r.returncode, r.stdout, r.stderr))
        sender.join(120)
    finally:
        agent.proc.send_signal(signal.SIGTERM)
        agent.proc.wait(30)
        pub.c.loop_stop()
    assert len(results) >= 2, "the stream ended before verify ran twice"
    raws = []
    held = []
    for code, out, err in results:
        assert code == 0, (out, err)
        s = json.loads(out)
        assert s["ok"] and s["records_stored"] == s["records_recomputed"] > 0
        raws.append(s["raw"])
        held.append(s["held"])
    assert raws[-1] > raws[0]  # it did run while messages came in
    assert max(held) > 0, held  # and found messages not metered yet
    code, s = summary(db_url)
    assert code == 0 and s["raw"] == len(items) and s["held"] == 0


def test_unknown_station_and_empty_range_exit_2(db_url: str) -> None:
    url = build(db_url)
    r = stationctl("verify", "--db", url, "--sid", "KH-TYPO-0001")
    assert r.returncode == 2 and b"unknown station KH-TYPO-0001" in r.stderr
    r = stationctl("verify", "--db", url, "--from", "2031-01-01", "--to", "2031-02-01")
    assert r.returncode == 2 and b"nothing to verify" in r.stderr
    r = stationctl("verify", "--db", url, "--from", "2031-01-01", "--to", "2030-01-01")
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1
    # a range that holds records: checked, and only those
    code_all, s_all = summary(url)
    r = stationctl("verify", "--db", url, "--json", "--from", "2025-11-26T10:00:00Z")
    s = json.loads(r.stdout)
    assert r.returncode == 0 and 0 < s["records_stored"] < s_all["records_stored"]


def test_an_empty_database_is_not_a_pass(tmp_path: pathlib.Path) -> None:
    url = f"sqlite:///{tmp_path}/empty.db"
    Store(url).close()
    r = stationctl("verify", "--db", url)
    assert r.returncode == 2 and b"nothing to verify" in r.stderr
