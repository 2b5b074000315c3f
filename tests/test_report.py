"""`stationctl report`: the monitoring report of a simulated month agrees with `export`.

The month: three stations of `fleet_stream` with a reading every 15 minutes for 31 days
(a reboot and a session each), a six-hour hole in one station's stream, late messages for
a locked period (rule-8 adjustments), a station whose slot jumps by 5 MWh (held), a
quarantine and a grid meter whose calibration falls due mid-month (the register's
crediting layer discounts its energy in `export`, and so in the report).
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
from collections import Counter, defaultdict
from typing import Any

import pytest

from agent.ledger import MeterParams, compute
from agent.store import QuarantineRow, Store, record_to_row
from agent.wire import decode_record
from stationctl.cli import main
from tests.agent_helpers import STATIONCTL, T0_MS, Station, key_for, stored_rows
from tests.helpers import ROOT

DAY = 86_400_000
LOCK_UNTIL = (T0_MS // DAY + 8) * DAY  # 2025-12-04: intervals before it are locked
LOCK_AT = LOCK_UNTIL + 1000  # the lock taken a second after the period ended
PERIOD = ("2025-11-26", "2025-12-28")
SIDS = ["KH-MON-0000", "KH-MON-0001", "KH-MON-0002", "KH-MON-0009"]


def month_stream() -> tuple[list[tuple[str, bytes]], list[int]]:
    """(the month's messages, their receive times)."""
    from tests.agent_helpers import fleet_stream

    stream = fleet_stream(3, 2976, sid_base="KH-MON", step_ms=900_000)
    gap = (T0_MS + 5 * DAY, T0_MS + 5 * DAY + 6 * 3_600_000)
    late = (LOCK_UNTIL - 2 * 3_600_000, LOCK_UNTIL)  # the last two hours before the lock
    out: list[tuple[str, bytes]] = []
    recv: list[int] = []
    for topic, payload in stream:
        body = decode_record(payload)
        ts = body["ts"]
        if body["sid"] == "KH-MON-0002" and gap[0] <= ts < gap[1] and "ev" not in body:
            continue  # a hole: six hours of telemetry never arrived
        out.append((topic, payload))
        late_one = body["sid"] == "KH-MON-0001" and late[0] <= ts < late[1]
        recv.append(LOCK_AT + 600_000 if late_one else ts + 500)
    # a one-slot station whose register jumps by 5 MWh in 15 minutes: held (rule 6)
    st = Station("KH-MON-0009", slots=1, meter=False, t0_ms=T0_MS + 2 * DAY)
    for i in range(40):
        st.advance(900_000, 1000)
        if i == 20:
            st.e_mwh[0] += 5_000_000_000
        kind, payload = st.telemetry()
        out.append((st.topic(kind), payload))
        recv.append(decode_record(payload)["ts"] + 500)
    return out, recv


def build_month(tmp: pathlib.Path) -> tuple[str, pathlib.Path]:
    """(database URL, agent config) of the simulated month, as an agent would leave it."""
    from agent import meters

    stream, recv = month_stream()
    rows, msgs = stored_rows(stream, recv_ms=lambda i: recv[i])
    params = MeterParams(locked_until_ms=LOCK_UNTIL, locked_at_ms=LOCK_AT)
    url = f"sqlite:///{tmp}/month.db"
    from agent.keys import KeyStore

    with Store(url) as st:
        st.write_batch(
            rows,
            quarantine=[
                QuarantineRow(
                    T0_MS + DAY,
                    "stations/KH-MON-0000/telemetry",
                    "bad_sig",
                    "x",
                    "KH-MON-0000",
                    b"{}",
                ),
                QuarantineRow(
                    T0_MS + 2 * DAY,
                    "stations/KH-MON-0001/telemetry",
                    "bad_sig",
                    "x",
                    "KH-MON-0001",
                    b"{}",
                ),
                QuarantineRow(
                    T0_MS + 3 * DAY,
                    "stations/KH-ZZZ-0001/telemetry",
                    "unknown_station",
                    "x",
                    "KH-ZZZ-0001",
                    b"{}",
                ),
                QuarantineRow(
                    T0_MS - 30 * DAY, "stations/KH-MON-0000/telemetry", "bad_json", "x", None, b"{"
                ),
            ],
        )
        st.replace_records({"": [record_to_row(r) for r in compute(msgs, params)]}, everything=True)
        ks = KeyStore(st)
        for sid in SIDS:
            ks.add(sid, key_for(sid), kid=1)
        meters.add_meter(
            st,
            serial="SN-0000",
            model="SDM630",
            accuracy_class="1",
            calibrated_on="2024-12-01",
            next_due="2025-12-10",
            certificate="CAL-2024-117",
            at_ms=T0_MS,
        )
        meters.install(
            st,
            serial="SN-0000",
            sid="KH-MON-0000",
            from_ms=T0_MS - 30 * DAY,
            by="test",
            at_ms=T0_MS,
        )
    cfg = tmp / "agent.toml"
    cfg.write_text(f"[metering]\nlocked_until_ms = {LOCK_UNTIL}\nlocked_at_ms = {LOCK_AT}\n")
    return url, cfg


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, pathlib.Path]:
    return build_month(tmp_path_factory.mktemp("month"))


@pytest.fixture(scope="module")
def report(
    month: tuple[str, pathlib.Path], tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    url, cfg = month
    out = tmp_path_factory.mktemp("report")
    argv = ["report", "--db", url, "--from", PERIOD[0], "--to", PERIOD[1], "--out", str(out)]
    assert main([*argv, "--config", str(cfg)]) == 0
    return out


def export(url: str, by: str, cfg: pathlib.Path) -> list[dict[str, Any]]:
    r = subprocess.run(
        [*STATIONCTL, "export", "--db", url, "--from", PERIOD[0], "--to", PERIOD[1]]
        + ["--by", by, "--format", "json", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=120,
    )
    return [json.loads(line) for line in r.stdout.splitlines()]


def table(out: pathlib.Path, name: str) -> list[dict[str, str]]:
    import csv

    with (out / f"{name}.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_energy_equals_export(month: tuple[str, pathlib.Path], report: pathlib.Path) -> None:
    url, cfg = month
    recs = export(url, "interval", cfg)
    want: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for r in recs:
        w = want[r["sid"]]
        w[0 if r["slot"] else 2] += r["mwh"]
        w[1 if r["slot"] else 3] += r["held_mwh"]
        w[4] += 1
    rows = {r["sid"]: r for r in table(report, "energy")}
    assert sorted(rows) == [*SIDS, "TOTAL"]
    for sid in SIDS:
        got = rows[sid]
        assert [
            int(got[c])
            for c in ("battery_mwh", "battery_held_mwh", "grid_mwh", "grid_held_mwh", "records")
        ] == want[sid], sid
    tot = [sum(w[i] for w in want.values()) for i in range(5)]
    assert int(rows["TOTAL"]["battery_mwh"]) == tot[0] > 0
    assert int(rows["TOTAL"]["grid_mwh"]) == tot[2] > 0
    assert int(rows["TOTAL"]["battery_held_mwh"]) == tot[1] >= 5_000_000_000  # the jump
    assert rows["TOTAL"]["grid_kwh"] == f"{tot[2] // 10**6}.{tot[2] % 10**6:06d}"
    # the register's layer applies: export credits KH-MON-0000's overdue meter less than
    # it metered, and the report shows the credited figure and the difference
    pol = table(report, "meter_policy")
    assert {p["sid"] for p in pol} == {"KH-MON-0000", "KH-MON-0001", "KH-MON-0002"}
    for sid in ("KH-MON-0000", "KH-MON-0001", "KH-MON-0002"):
        metered = sum(int(p["metered_mwh"]) for p in pol if p["sid"] == sid)
        credited = sum(int(p["credited_mwh"]) for p in pol if p["sid"] == sid)
        assert credited == want[sid][2]
        # only the overdue meter loses energy (discounted by its class); the stations
        # without a registered meter are flagged and credited unchanged
        assert (credited < metered) if sid == "KH-MON-0000" else (credited == metered)
    assert any(p["meter_flags"] == "meter_overdue" and p["policy"] == "discount" for p in pol)
    # the daily table sums export's day records
    days = export(url, "day", cfg)
    daily = table(report, "daily")
    assert sum(int(d["battery_mwh"]) for d in daily) == sum(r["mwh"] for r in days if r["slot"])
    assert sum(int(d["grid_mwh"]) for d in daily) == sum(r["mwh"] for r in days if not r["slot"])
    assert sum(int(d["battery_mwh"]) for d in daily) == tot[0]


def test_completeness_gaps_quarantine_signatures(
    month: tuple[str, pathlib.Path], report: pathlib.Path
) -> None:
    url, _cfg = month
    lo, hi = T0_MS // DAY * DAY, (T0_MS // DAY + 32) * DAY
    st = Store(url, create=False, readonly=True)
    try:
        have = dict(
            st.db.execute(
                "SELECT sid, COUNT(DISTINCT start_ms) FROM records WHERE kind = 'interval' "
                "AND flags NOT LIKE '%adjustment%' AND start_ms >= ? AND start_ms < ? "
                "GROUP BY sid",
                (lo, hi),
            ).fetchall()
        )
        quar = dict(
            st.db.execute(
                "SELECT reason, COUNT(*) FROM quarantine WHERE recv_ms >= ? AND recv_ms < ? "
                "GROUP BY reason",
                (lo, hi),
            ).fetchall()
        )
        raw = st.raw_count()
        n_adj, adj_mwh = st.db.execute(
            "SELECT COUNT(*), SUM(mwh) FROM records WHERE kind = 'interval' "
            "AND flags LIKE '%adjustment%'"
        ).fetchone()
    finally:
        st.close()
    readings: dict[str, set[int]] = defaultdict(set)
    for topic, payload in month_stream()[0]:
        body = decode_record(payload)
        if topic.endswith("/telemetry") and lo <= body["ts"] < hi:
            readings[body["sid"]].add(body["ts"] // 900_000)
    comp = {r["sid"]: r for r in table(report, "completeness")}
    expected = (hi - lo) // 900_000
    for sid in SIDS:
        assert int(comp[sid]["intervals_expected"]) == expected
        assert int(comp[sid]["intervals_with_records"]) == have[sid], sid
        assert int(comp[sid]["intervals_with_readings"]) == len(readings[sid]), sid
        assert int(comp[sid]["intervals_missing"]) == expected - len(readings[sid])
    # the hole has records (the energy on both sides spread over it), not readings
    assert have["KH-MON-0002"] > len(readings["KH-MON-0002"])
    # the six-hour hole is a gap of 24 intervals (and the day's heat map cell shows it)
    gaps = table(report, "gaps")
    hole = [g for g in gaps if g["sid"] == "KH-MON-0002" and g["from"] > "2025-11-27"]
    assert (
        hole
        and hole[0]["from"].startswith("2025-12-01T09:")
        and 23 <= int(hole[0]["intervals"]) <= 25
    )
    daily = {(r["sid"], r["day"]): r for r in table(report, "completeness_daily")}
    assert int(daily[("KH-MON-0002", "2025-12-01")]["intervals_with_data"]) == 96 - 24
    assert daily[("KH-MON-0002", "2025-12-03")]["intervals_with_data"] == "96"
    q = {r["reason"]: r for r in table(report, "quarantine")}
    assert {k: int(v["messages"]) for k, v in q.items() if k != "TOTAL"} == quar
    assert int(q["TOTAL"]["messages"]) == 3  # the fourth was received before the period
    sig = {r["sid"]: r for r in table(report, "signatures")}
    assert int(sig["TOTAL"]["stored"]) == int(sig["TOTAL"]["verified"]) == raw
    assert sig["TOTAL"]["failed"] == "0"
    # held energy names its flags; adjustments are the rule-8 records of the late messages
    held = table(report, "held")
    assert any(h["sid"] == "KH-MON-0009" and "held" in h["flags"].split("|") for h in held)
    adj = table(report, "adjustments")
    assert len(adj) == n_adj > 0 and sum(int(a["mwh"]) for a in adj) == adj_mwh
    assert all(a["locked_until"] == "2025-12-04T00:00:00.000Z" for a in adj)
    by_sid: Counter[str] = Counter()
    for a in adj:
        by_sid[a["sid"]] += int(a["mwh"])
    # the two late hours of KH-MON-0001 on top of the reading that straddles the lock
    assert by_sid.most_common(1)[0][0] == "KH-MON-0001"
    meters = table(report, "meters")
    assert [(m["serial"], m["sid"], m["status"]) for m in meters] == [
        ("SN-0000", "KH-MON-0000", "overdue")
    ]


def test_carbon_uses_the_parameters_and_says_not_validated(report: pathlib.Path) -> None:
    from fractions import Fraction

    from agent.ledger.carbon import load_params

    p = load_params()
    carbon = table(report, "carbon")
    energy = {r["sid"]: r for r in table(report, "energy")}
    for row in carbon:
        assert row["params_id"] == p.id and row["params_version"] == p.version
        assert row["status"] == "example parameters, not validated"
    # one station's grid-metered ER by hand: EC_grid x (BE per MWh - PE per MWh)
    v = {k: p.value(k, __import__("datetime").date(2025, 12, 1)).value for k in p.params}
    grid = Fraction(int(energy["KH-MON-0001"]["grid_mwh"]), 10**9)
    ec_batt_kwh = grid * 1000 * v["charger_efficiency"]
    be = ec_batt_kwh / v["sec"] * v["fuel_l_per_km"] * v["fuel_kgco2_per_l"] / 1000
    pe = grid * v["ef_grid"] * (1 + v["tdl"])
    row = next(r for r in carbon if r["sid"] == "KH-MON-0001" and r["point"] == "grid")
    assert abs(Fraction(row["er_tco2e"]) - (be - pe)) < Fraction(1, 10**6)
    html = (report / "report.html").read_text()
    assert "example parameters, not validated" in html
    assert html.count("tCO₂e (example parameters, not validated)") == 2  # each ER figure


def test_html_and_pdf_hold_the_totals(report: pathlib.Path) -> None:
    from pypdf import PdfReader

    tot = next(r for r in table(report, "energy") if r["sid"] == "TOTAL")
    html = (report / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?[a-z]+:|url\((?!#)|@import""", html)
    assert "<script" not in html and "<link" not in html  # self-contained
    for col in ("battery_kwh", "grid_kwh"):
        assert f"{tot[col]} kWh" in html
    pdf = (report / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    reader = PdfReader(str(report / "report.pdf"))
    text = "\n".join(page.extract_text() for page in reader.pages)
    assert f"{tot['battery_kwh']} kWh" in text and f"{tot['grid_kwh']} kWh" in text
    assert "example parameters, not validated" in text
    assert len(reader.pages) >= 3


def test_same_database_same_csv_bytes(
    month: tuple[str, pathlib.Path], report: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    url, cfg = month
    argv = ["report", "--db", url, "--from", PERIOD[0], "--to", PERIOD[1], "--no-pdf"]
    assert main([*argv, "--out", str(tmp_path), "--config", str(cfg)]) == 0
    names = sorted(p.name for p in report.glob("*.csv"))
    assert names == sorted(p.name for p in tmp_path.glob("*.csv")) and len(names) >= 15
    for n in names:
        assert (report / n).read_bytes() == (tmp_path / n).read_bytes(), n
    a = (report / "report.html").read_text().splitlines()
    b = (tmp_path / "report.html").read_text().splitlines()
    differ = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    assert all('class="generated"' in x for x, _y in differ)


def test_bad_usage_exits_2(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "r")
    assert (
        main(
            [
                "report",
                "--db",
                str(tmp_path / "absent.db"),
                "--from",
                "2025-11-01",
                "--to",
                "2025-12-01",
                "--out",
                out,
            ]
        )
        == 2
    )
    assert "absent.db" in capsys.readouterr().err
    assert (
        main(
            [
                "report",
                "--db",
                str(tmp_path / "absent.db"),
                "--from",
                "2025-12-01",
                "--to",
                "2025-11-01",
                "--out",
                out,
            ]
        )
        == 2
    )
    assert not (tmp_path / "absent.db").exists() and not (tmp_path / "r").exists()


def test_validated_parameters_carry_no_mark(
    month: tuple[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    from agent.ledger.carbon import DEFAULT_PATH

    text = DEFAULT_PATH.read_text()
    params = tmp_path / "validated.toml"
    text = "\n".join(x for x in text.splitlines() if not x.startswith("validated"))
    params.write_text("validated = true\n" + text.replace('id = "example-kh"', 'id = "proj-kh"'))
    url, cfg = month
    argv = ["report", "--db", url, "--from", PERIOD[0], "--to", PERIOD[1], "--no-pdf"]
    out = tmp_path / "r"
    assert main([*argv, "--out", str(out), "--carbon-params", str(params)]) == 0
    carbon = table(out, "carbon")
    assert carbon and all(r["status"] == "" and r["params_id"] == "proj-kh" for r in carbon)
    assert "not validated" not in (out / "report.html").read_text()
    summary = {r["key"]: r["value"] for r in table(out, "summary")}
    assert summary["carbon_params_status"] == "validated"


def test_report_on_both_engines(db_url: str, tmp_path: pathlib.Path) -> None:
    """A small fleet on SQLite and PostgreSQL: the report's totals are export's."""
    from tests.agent_helpers import fill_store, fleet_stream

    rows, msgs = stored_rows(fleet_stream(2, 200, sid_base="KH-ENG", step_ms=900_000))
    url = fill_store(db_url, rows, msgs)
    out = tmp_path / "r"
    argv = ["report", "--db", url, "--from", "2025-11-26", "--to", "2025-11-29", "--no-pdf"]
    assert main([*argv, "--out", str(out)]) == 0
    r = subprocess.run(
        [*STATIONCTL, "export", "--db", url, "--from", "2025-11-26", "--to", "2025-11-29"]
        + ["--format", "json"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=120,
    )
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    tot = next(r for r in table(out, "energy") if r["sid"] == "TOTAL")
    assert int(tot["battery_mwh"]) == sum(x["mwh"] for x in recs if x["slot"]) > 0
    assert int(tot["grid_mwh"]) == sum(x["mwh"] for x in recs if not x["slot"]) > 0
    sig = next(r for r in table(out, "signatures") if r["sid"] == "TOTAL")
    assert sig["stored"] == sig["verified"] == str(len(rows))
