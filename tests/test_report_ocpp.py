"""`stationctl report` with OCPP chargers beside the project's own stations (CONTRACT §11).

The database: two own stations (HMAC-signed telemetry, `fill_store`), the two OCPP
chargers of `fill_ocpp_db` (unsigned 1.6 and 2.0.1 sessions) and one 1.6 charger whose
meter values are OCMF-signed with its registered public key. The report's numbers are
export's; OCPP frames are counted as OCPP frames (OCMF-verified or unsigned), never as
failed signatures; their energy readings count for completeness; the station tables name
each station's source and the unsigned energy.
"""

from __future__ import annotations

import asyncio
import csv
import json
import pathlib
import subprocess
from collections import defaultdict
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from ocpp.v16 import call as call16

from agent.ledger.agent_meter import decode_row
from agent.ocpp import ocmf
from agent.ocpp.frames import ENERGY, SIGNED_KID
from agent.store import Store
from agent.wire import decode_record
from tests.agent_helpers import STATIONCTL, Station, fill_store, stored_rows
from tests.helpers import ROOT
from tests.ocpp_helpers import PASSWORD, T0_MS, OcppAgent, boot16, connect, fill_ocpp_db, iso

PERIOD = ("2026-12-04", "2026-12-05")
LO_MS, HI_MS = T0_MS, T0_MS + 86_400_000
OWN_SIDS = ["KH-OWN-0000", "KH-OWN-0001"]
SIGNED_SID = "OCPP-SIG"
OCPP_SIDS = ["OCPP-16", "OCPP-201", SIGNED_SID]
SOURCES = {
    "KH-OWN-0000": "own",
    "KH-OWN-0001": "own",
    "OCPP-16": "OCPP 1.6",
    "OCPP-201": "OCPP 2.0.1",
    SIGNED_SID: "OCPP 1.6",
}
SIGNED_WH = [30_000, 30_400, 31_000]  # the signed charger's register readings


def own_stream() -> list[tuple[str, bytes]]:
    """Two own stations on the OCPP helpers' day: a boot, then telemetry every 15 min."""
    out = []
    for j, sid in enumerate(OWN_SIDS):
        st = Station(sid, slots=2, t0_ms=T0_MS + 1_800_000)
        out.append((st.topic("event"), st.boot_event()[1]))
        for _ in range(24):
            st.advance(900_000, 1200 + 100 * j)
            kind, payload = st.telemetry()
            out.append((st.topic(kind), payload))
    return out


def ocmf_text(wh: int, ts_ms: int, key: ec.EllipticCurvePrivateKey) -> str:
    tm = iso(ts_ms).replace(".", ",").replace("Z", "+0000") + " S"
    reading = {"TM": tm, "TX": "T", "RV": wh / 1000, "RI": "1-b:1.8.0", "RU": "kWh", "ST": "G"}
    payload = {"FV": "1.0", "GI": "SIM", "GS": "1", "GV": "1", "PG": "T1", "MS": "MTR-1"}
    return ocmf.sign(payload | {"RD": [reading]}, key)


async def _signed(url: str, key: ec.EllipticCurvePrivateKey) -> None:
    pub = ocmf.public_key_text(key)
    async with OcppAgent(url, {SIGNED_SID: PASSWORD}, {SIGNED_SID: pub}) as ag:
        async with connect(ag.port, SIGNED_SID, "ocpp1.6") as cp:
            await boot16(cp)
            for i, wh in enumerate(SIGNED_WH):
                ts = T0_MS + 10_800_000 + i * 600_000
                sv = {
                    "value": ocmf_text(wh, ts, key),
                    "format": "SignedData",
                    "measurand": ENERGY,
                    "context": "Sample.Periodic",
                }
                await cp.call(
                    call16.MeterValues(
                        connector_id=1, meter_value=[{"timestamp": iso(ts), "sampledValue": [sv]}]
                    )
                )


def fill_both(url: str) -> tuple[str, dict[str, int], ec.EllipticCurvePrivateKey]:
    """Own stations, then the OCPP chargers, into one database: (url, credited mWh per
    `sid/connector` of the OCPP chargers, the signed charger's private key)."""
    stream = own_stream()
    rows, msgs = stored_rows(stream, recv_ms=lambda i: decode_record(stream[i][1])["ts"] + 500)
    fill_store(url, rows, msgs)
    want = fill_ocpp_db(url)
    key = ec.generate_private_key(ec.SECP256R1())
    asyncio.run(_signed(url, key))
    want[f"{SIGNED_SID}/1"] = (SIGNED_WH[-1] - SIGNED_WH[0]) * 1000  # the first: baseline
    return url, want, key


def raw_rows(url: str) -> list[Any]:
    with Store(url, create=False, readonly=True) as st:
        return [r for sid in st.raw_sids() for r in st.iter_raw_keys(sid)]


def in_period(row: Any) -> bool:
    """A raw row's time for the period, as the report takes it (its body's ts)."""
    ts = decode_row(row).body.get("ts")
    t = ts if type(ts) is int else row.recv_ms
    return LO_MS <= t < HI_MS


def run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*STATIONCTL, *argv], cwd=ROOT, capture_output=True, timeout=300, check=False
    )


def table(out: pathlib.Path, name: str) -> dict[str, dict[str, str]]:
    with (out / f"{name}.csv").open(newline="") as f:
        return {r["sid"]: r for r in csv.DictReader(f)}


def test_report_with_ocpp_stations_equals_export(db_url: str, tmp_path: pathlib.Path) -> None:
    url, want, _key = fill_both(db_url)
    out = tmp_path / "r"
    r = run("report", "--db", url, "--from", PERIOD[0], "--to", PERIOD[1], "--out", str(out))
    assert r.returncode == 0, r.stderr.decode()
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")
    r = run("export", "--db", url, "--from", PERIOD[0], "--to", PERIOD[1], "--format", "json")
    assert r.returncode == 0, r.stderr.decode()
    recs = [json.loads(line) for line in r.stdout.splitlines()]

    # energy: export's, per station and side; unsigned energy = records flagged unsigned
    exp: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for x in recs:
        e = exp[x["sid"]]
        e[0 if x["slot"] else 1] += x["mwh"]
        e[2] += 1
        e[3] += x["mwh"] if "unsigned" in x["flags"] else 0
    energy = table(out, "energy")
    assert sorted(energy) == sorted([*OWN_SIDS, *OCPP_SIDS, "TOTAL"])
    for sid in [*OWN_SIDS, *OCPP_SIDS]:
        got = energy[sid]
        assert got["source"] == SOURCES[sid], sid
        cols = ("battery_mwh", "grid_mwh", "records", "unsigned_mwh")
        assert [int(got[c]) for c in cols] == exp[sid], sid
    for sid in OCPP_SIDS:  # what the chargers metered is what export credits
        assert int(energy[sid]["battery_mwh"]) == sum(
            v for k, v in want.items() if k.startswith(sid + "/")
        )
    for sid in OWN_SIDS:
        assert energy[sid]["unsigned_mwh"] == "0" and int(energy[sid]["grid_mwh"]) > 0
    # the unsigned chargers' energy is all unsigned; the OCMF-signed one's is not
    for sid in ("OCPP-16", "OCPP-201"):
        assert energy[sid]["unsigned_mwh"] == energy[sid]["battery_mwh"] != "0"
    assert energy[SIGNED_SID]["unsigned_mwh"] == "0"
    assert int(energy[SIGNED_SID]["battery_mwh"]) == want[f"{SIGNED_SID}/1"] > 0
    tot = energy["TOTAL"]
    assert int(tot["unsigned_mwh"]) == sum(e[3] for e in exp.values()) == 4_500_000
    assert tot["unsigned_kwh"] == "4.500000"
    by_slot = list(csv.DictReader((out / "energy_by_slot.csv").open(newline="")))
    assert {(b["sid"], b["source"]) for b in by_slot} == {
        (s, SOURCES[s]) for s in [*OWN_SIDS, *OCPP_SIDS]
    }

    # signature coverage: OCPP frames apart, never failed signatures
    rows = raw_rows(url)
    sig = table(out, "signatures")
    for sid in [*OWN_SIDS, *OCPP_SIDS]:
        mine = [r for r in rows if r.sid == sid and in_period(r)]
        s = sig[sid]
        assert s["source"] == SOURCES[sid] and int(s["stored"]) == len(mine) > 0, sid
        assert s["failed"] == s["unchecked"] == "0", sid
        if sid in OWN_SIDS:
            assert s["verified"] == s["stored"] and s["ocpp_frames"] == "0"
            assert s["percent"] == "100.00"
            continue
        signed = sum(1 for r in mine if r.kid == SIGNED_KID)
        assert int(s["ocpp_frames"]) == len(mine)
        assert int(s["ocmf_verified"]) == int(s["verified"]) == signed
        assert int(s["unsigned"]) == len(mine) - signed
        assert (signed > 0) == (sid == SIGNED_SID)
    assert sig["OCPP-16"]["percent"] == "0.00"  # no signature at all: 0 % coverage
    t = sig["TOTAL"]
    assert int(t["stored"]) == sum(1 for r in rows if in_period(r))
    assert int(t["stored"]) == int(t["verified"]) + int(t["unsigned"]) > int(t["verified"])

    # completeness: an OCPP frame with an energy reading is a reading
    comp = table(out, "completeness")
    for sid in OCPP_SIDS:
        have = set()
        for r in rows:
            if r.sid == sid and in_period(r):
                body = decode_row(r).body
                if body.get("reg"):
                    have.add(body["ts"] // 900_000)
        assert comp[sid]["source"] == SOURCES[sid]
        assert int(comp[sid]["intervals_with_readings"]) == len(have) > 0, sid
    assert int(comp["KH-OWN-0000"]["intervals_with_readings"]) == 24

    summary = {r["key"]: r["value"] for r in csv.DictReader((out / "summary.csv").open())}
    assert summary["ocpp_stations"] == "3" and summary["unsigned_kwh"] == "4.500000"
    assert summary["ocpp_frames"] == str(sum(int(sig[s]["ocpp_frames"]) for s in OCPP_SIDS))
    html = (out / "report.html").read_text()
    assert "OCPP 2.0.1" in html and "Unsigned energy (OCPP)" in html


def test_check_ocpp_is_decode_row(db_url: str) -> None:
    """The report's and the bundle verifier's translation of a frame is the agent's."""
    from agent.report.collect import check_ocpp

    url, _want, key = fill_both(db_url)
    n = 0
    for r in raw_rows(url):
        if r.kind != "ocpp":
            continue
        pub = ocmf.public_key_text(key) if r.sid == SIGNED_SID else ""
        c = check_ocpp(r.sid, r.boot, r.seq, r.kid, r.topic, r.record, r.recv_ms, pub)
        assert c.error == "" and c.msg == decode_row(r)
        assert c.signed == (r.kid == SIGNED_KID)
        n += 1
    assert n > 10
