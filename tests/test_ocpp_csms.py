"""OCPP chargers feed the same ledger (CONTRACT §11): simulated charge points
(tools/ocpp_sim.py, on the `ocpp` library's own ChargePoint classes) over a real WebSocket
to the agent's endpoint, 1.6J and 2.0.1; credited energy checked exactly against the
simulated registers, and each pitfall CSMS projects met as its own test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from decimal import Decimal
from typing import Any

import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric import ec

from agent.ocpp import ocmf
from agent.store import Store
from tests.ocpp_helpers import PASSWORD, OcppAgent, register
from tools.ocpp_sim import SimChargePoint, SimClock

VERSIONS = ["1.6", "2.0.1"]
DAY_S = 6 * 3600  # a short charging day: 6 simulated hours


def _t0() -> int:
    """The simulated day starts two days ago (OCPP times past the receive time + 1 day are
    not believed: CONTRACT §2)."""
    return (int(time.time() * 1000) // 86_400_000 - 2) * 86_400_000


def _sim(port: int, sid: str, version: str, **kw: Any) -> SimChargePoint:
    clock = kw.pop("clock", None) or SimClock(_t0(), manual=True)
    return SimChargePoint(
        f"ws://127.0.0.1:{port}", sid, PASSWORD, version=version, clock=clock, **kw
    )


def _records(url: str, sid: str, kind: str) -> list[Any]:
    with Store(url, create=False) as s:
        return [r for r in s.record_rows(kind=kind, sid=sid)]


def _credited(url: str, sid: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in _records(url, sid, "interval"):
        out[r.slot] = out.get(r.slot, 0) + r.mwh
    return out


def _held(url: str, sid: str) -> int:
    return sum(r.held_mwh for r in _records(url, sid, "interval"))


def _verify(db: str) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "stationctl", "verify", "--db", db],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def _tx_energy(gt: dict[str, Any], connector: int) -> int:
    """mWh the charger's register (in whole Wh) rose over its transactions on a connector."""
    return sum(
        t["energy_wh"] * 1000
        for t in gt["transactions"]
        if t["connector"] == connector and t["energy_wh"] is not None
    )


@pytest.fixture
def db(tmp_path: Any) -> str:
    return str(tmp_path / "agent.db")


# ---- a charging day, exact --------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("unit", ["Wh", "kWh"])
async def test_charging_day_exact(db: str, version: str, unit: str) -> None:
    """Every connector's credited energy equals what its register rose, to the mWh; one
    session record per transaction with the transaction's energy; verify reproduces all."""
    sid = "OCPP-DAY"
    async with OcppAgent(db, {sid: PASSWORD}) as ag:
        cp = _sim(
            ag.port,
            sid,
            version,
            connectors=2,
            unit=unit,
            extra_measurands=True,
            initial_mwh={1: 12_345_678, 2: 0},
        )
        await cp.connect()
        await cp.boot()
        gt = await cp.charging_day(
            sessions=3, sample_s=300, day_s=DAY_S, clock_aligned_s=900, seed=7
        )
        await cp.close()
    credited = _credited(db, sid)
    for c in (1, 2):
        assert credited[c] == _tx_energy(gt, c) > 0
    sessions = _records(db, sid, "session")
    assert len(sessions) == len(gt["transactions"]) == 6
    by_tx = {json.loads(r.extra)["tx"]: r for r in sessions}
    for t in gt["transactions"]:
        r = (
            by_tx[str(t["tx_id"])]
            if version == "2.0.1"
            else next(
                r
                for r in sessions
                if r.e_from == t["meter_start_wh"] * 1000 and r.slot == t["connector"]
            )
        )
        assert r.mwh == t["energy_wh"] * 1000
        assert json.loads(r.extra)["reg_check"] == "ok"
        assert "ocpp" in r.flags.split("|") and "unsigned" in r.flags.split("|")
    assert all("ocpp" in r.flags for r in _records(db, sid, "interval"))
    assert _held(db, sid) == 0
    out = _verify(db)
    assert "OK" in out


async def test_charging_day_on_both_engines(db_url: str) -> None:
    """The same day on SQLite and PostgreSQL: exact, and verify agrees."""
    sid = "OCPP-PG"
    async with OcppAgent(db_url, {sid: PASSWORD}) as ag:
        cp = _sim(ag.port, sid, "1.6", connectors=1)
        await cp.connect()
        await cp.boot()
        gt = await cp.charging_day(sessions=2, sample_s=600, day_s=DAY_S, seed=3)
        await cp.close()
    assert _credited(db_url, sid)[1] == _tx_energy(gt, 1) > 0
    _verify(db_url)


# ---- the pitfalls -------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_zero_register_at_boot_is_not_credited(db: str, version: str) -> None:
    """CitrineOS #1060: a register that reads 0 at boot or in a transaction's first sample
    must not credit the whole register at the next sample."""
    sid = "OCPP-ZERO"
    big = 40_000_000_000  # 40 MWh on the register already
    async with OcppAgent(db, {sid: PASSWORD}) as ag:
        cp = _sim(ag.port, sid, version, connectors=1, zero_at_boot=True, initial_mwh=big)
        await cp.connect()
        await cp.boot()
        gt = await cp.charging_day(sessions=2, sample_s=300, day_s=DAY_S, seed=11)
        await cp.close()
    credited = _credited(db, sid).get(1, 0)
    assert credited <= _tx_energy(gt, 1)  # never the register's 40 MWh
    assert credited < big // 1000
    held = _held(db, sid)
    if version == "2.0.1":  # the Begin value itself read 0: the jump back up is held, flagged
        assert held >= big - 1_000_000
    _verify(db)


@pytest.mark.parametrize("version", VERSIONS)
async def test_retried_stop_is_one_session(db: str, version: str) -> None:
    """CitrineOS #880: a StopTransaction / Ended sent twice is one session, its energy once."""
    sid = "OCPP-RETRY"
    async with OcppAgent(db, {sid: PASSWORD}) as ag:
        cp = _sim(ag.port, sid, version, connectors=1, retry_stop=True)
        await cp.connect()
        await cp.boot()
        gt = await cp.charging_day(sessions=2, sample_s=600, day_s=DAY_S, seed=5)
        await cp.close()
    stops = [f for f in cp.sent if "StopTransaction" in f or '"Ended"' in f]
    assert len(stops) == 4  # two transactions, each stop sent twice
    sessions = _records(db, sid, "session")
    assert len(sessions) == 2
    assert sum(r.mwh for r in sessions) == _tx_energy(gt, 1)
    assert _credited(db, sid)[1] == _tx_energy(gt, 1)
    _verify(db)


@pytest.mark.parametrize("version", VERSIONS)
async def test_missing_final_meter_value(db: str, version: str) -> None:
    """A transaction ending without a final meter value: its session ends at the
    connector's latest reading (2.0.1), or at meterStop (1.6, mandatory there)."""
    sid = "OCPP-NOFINAL"
    async with OcppAgent(db, {sid: PASSWORD}) as ag:
        cp = _sim(ag.port, sid, version, connectors=1, no_final_value=True)
        await cp.connect()
        await cp.boot()
        await cp.charging_day(sessions=1, sample_s=600, day_s=DAY_S, seed=9)
        await cp.close()
    gt = cp.ground_truth()
    (s,) = _records(db, sid, "session")
    t = gt["transactions"][0]
    if version == "1.6":
        assert s.mwh == t["energy_wh"] * 1000
    else:  # no Ended value: the last periodic sample (at most one sample period short)
        assert 0 < s.mwh <= t["energy_wh"] * 1000
        assert s.e_to == max(r.e_to for r in _records(db, sid, "interval"))
    _verify(db)


@pytest.mark.parametrize("version", VERSIONS)
async def test_register_reset_at_reboot(db: str, version: str) -> None:
    """The charger's register resets to 0 across a reboot: nothing is credited for the drop,
    and what it counts from 0 after the reboot is credited."""
    sid = "OCPP-RESET"
    clock = SimClock(_t0(), manual=True)
    async with OcppAgent(db, {sid: PASSWORD}) as ag:
        cp = _sim(ag.port, sid, version, connectors=1, clock=clock, initial_mwh=5_000_000)
        await cp.connect()
        await cp.boot()
        await cp.charging_day(sessions=1, sample_s=600, day_s=3 * 3600, seed=1)
        before = _tx_energy(cp.ground_truth(), 1)
        await cp.reboot(reset_registers=True)
        await cp.charging_day(sessions=1, sample_s=600, day_s=3 * 3600, seed=2)
        await cp.close()
    gt = cp.ground_truth()
    assert gt["connectors"]["1"]["resets"] == 1
    assert _credited(db, sid)[1] == _tx_energy(gt, 1) > before
    with Store(db, create=False) as s:
        boots = {r[0] for r in s.db.execute("SELECT DISTINCT boot FROM raw WHERE sid = ?", (sid,))}
    assert boots == {1, 2}  # a boot per BootNotification (CONTRACT §11)
    _verify(db)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("order", ["in_order", "shuffled"])
async def test_offline_queue_late_out_of_order_twice(db: str, version: str, order: str) -> None:
    """Frames queued while offline and delivered late, out of order and twice: nothing
    credited twice, nothing lost."""
    sid = "OCPP-OFFLINE"
    clock = SimClock(_t0(), manual=True)
    async with OcppAgent(db, {sid: PASSWORD}) as ag:
        cp = _sim(ag.port, sid, version, connectors=2, clock=clock)
        await cp.connect()
        await cp.boot()
        await cp.charging_day(sessions=1, sample_s=600, day_s=2 * 3600, seed=21, statuses=False)
        await cp.go_offline()
        await cp.charging_day(sessions=2, sample_s=600, day_s=4 * 3600, seed=22, statuses=False)
        assert cp.queue  # the offline day's transaction frames wait
        await cp.come_online(order=order, duplicate=True, seed=4)  # type: ignore[arg-type]
        await cp.charging_day(sessions=1, sample_s=600, day_s=2 * 3600, seed=23, statuses=False)
        await cp.close()
    gt = cp.ground_truth()
    credited = _credited(db, sid)
    for c in (1, 2):
        assert credited[c] <= _tx_energy(gt, c)  # never twice
        if order == "in_order":
            assert credited[c] == _tx_energy(gt, c)  # and nothing lost
    sessions = _records(db, sid, "session")
    assert sum(r.mwh for r in sessions) <= sum(_tx_energy(gt, c) for c in (1, 2))
    _verify(db)


@pytest.mark.parametrize("version", VERSIONS)
async def test_reconnect_mid_transaction(db: str, version: str) -> None:
    """The socket drops in the middle of a transaction (no reboot): the same boot goes on,
    the transaction ends normally, the energy is exact."""
    sid = "OCPP-RECONNECT"
    async with OcppAgent(db, {sid: PASSWORD}) as ag:
        cp = _sim(ag.port, sid, version, connectors=1, initial_mwh=1_000_000)
        await cp.connect()
        await cp.boot()
        await cp.start(1, power_w=3000)
        for _ in range(3):
            cp.clock.advance(300_000)
            await cp.sample(1)
        await cp._drop_connection()  # the link drops; the charger keeps charging
        cp.clock.advance(300_000)
        await cp.sample(1)  # queued while down
        await cp.connect()
        await cp.flush()
        cp.clock.advance(300_000)
        await cp.sample(1)
        await cp.stop(1)
        await cp.close()
    gt = cp.ground_truth()
    assert _credited(db, sid)[1] == _tx_energy(gt, 1) == 5 * 250_000
    (s,) = _records(db, sid, "session")
    assert s.mwh == 1_250_000
    with Store(db, create=False) as st:
        assert {r[0] for r in st.db.execute("SELECT boot FROM raw WHERE sid = ?", (sid,))} == {1}
    assert ag.counters["ocpp_connects"] == 2
    _verify(db)


# ---- who may connect, and what is refused -------------------------------------------------


async def test_wrong_password_unknown_and_revoked_refused(db: str) -> None:
    async with OcppAgent(db, {"OCPP-A": PASSWORD, "OCPP-B": PASSWORD}) as ag:
        bad = _sim(ag.port, "OCPP-A", "1.6")
        bad.password = "not-the-password-at-all"
        with pytest.raises(websockets.InvalidStatus) as e:
            await bad.connect()
        assert e.value.response.status_code == 401
        stranger = _sim(ag.port, "OCPP-Z", "1.6")
        with pytest.raises(websockets.InvalidStatus):
            await stranger.connect()
        other = _sim(ag.port, "OCPP-A", "1.6")
        other.identity = "OCPP-B"  # B's path with A's name in the header
        other.password = PASSWORD
        other.auth_header = lambda: (
            "Basic " + base64.b64encode(f"OCPP-A:{PASSWORD}".encode()).decode()
        )  # type: ignore[method-assign]
        with pytest.raises(websockets.InvalidStatus):
            await other.connect()
        ok = _sim(ag.port, "OCPP-A", "1.6")
        await ok.connect()
        await ok.boot()
        await ok.close()
        assert ag.counters["ocpp_refused"] == 3
    with Store(db, create=False) as s:
        assert s.db.execute("SELECT COUNT(*) FROM raw").fetchone()[0] == 1  # A's boot only
    # revoked: refused at the next connection
    subprocess.run(
        [sys.executable, "-m", "stationctl", "ocpp", "revoke", "--db", db, "OCPP-A"],
        check=True,
        capture_output=True,
    )
    async with OcppAgent(db, {}) as ag:
        with pytest.raises(websockets.InvalidStatus):
            await _sim(ag.port, "OCPP-A", "1.6").connect()


async def test_garbage_frames_quarantined_others_go_on(db: str) -> None:
    """A charger sending garbage: each frame quarantined (`ocpp_frame`) and counted, kept
    for inspection; another charger's day is credited exactly meanwhile."""
    async with OcppAgent(db, {"OCPP-BAD": PASSWORD, "OCPP-GOOD": PASSWORD}) as ag:
        good = _sim(ag.port, "OCPP-GOOD", "2.0.1", connectors=1)
        bad = _sim(ag.port, "OCPP-BAD", "1.6", connectors=1)
        await good.connect()
        await good.boot()
        await bad.connect()
        await bad.boot()

        async def spam() -> int:
            n = 0
            for i in range(2):
                n += await bad.garbage(14, seed=i)
                await bad.connect()
            return n

        sent, gt = await asyncio.gather(
            spam(), good.charging_day(sessions=2, sample_s=600, day_s=DAY_S, seed=8)
        )
        await good.close()
        await bad.close()
        counters = ag.counters
    assert _credited(db, "OCPP-GOOD")[1] == _tx_energy(gt, 1) > 0
    with Store(db, create=False) as s:
        q = s.db.execute(
            "SELECT reason, sid, length(record) FROM quarantine WHERE sid = 'OCPP-BAD'"
        ).fetchall()
    assert len(q) >= 6 and {r[0] for r in q} == {"ocpp_frame"}
    assert counters["q.ocpp_frame"] == len(q)
    assert max(r[2] for r in q) > 1_000_000  # the 2 MiB frame is kept whole
    _verify(db)


# ---- OCMF signed meter values ---------------------------------------------------------------


def _signer(key: ec.EllipticCurvePrivateKey) -> Any:
    def sign(mwh: int, t_ms: int, stage: str) -> str:
        rv = Decimal(mwh // 1000) / 1000  # the register in kWh, 3 decimals, exact
        payload = {
            "FV": "1.0",
            "GI": "SIM",
            "MS": "SIM-0001",
            "PG": "T1",
            "RD": [
                {
                    "TM": _ocmf_time(t_ms),
                    "TX": stage,
                    "RV": rv,
                    "RI": "1-b:1.8.0",
                    "RU": "kWh",
                    "ST": "G",
                }
            ],
        }
        return ocmf.sign(payload, key)

    return sign


def _ocmf_time(ms: int) -> str:
    import datetime as dt

    d = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S,") + f"{ms % 1000:03d}+0000 S"


@pytest.mark.parametrize("version", VERSIONS)
async def test_ocmf_signed_values_drop_unsigned(db: str, version: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    sid = "OCPP-OCMF"
    register(db, {sid: PASSWORD}, {sid: ocmf.public_key_text(key)})
    async with OcppAgent(db, {sid: PASSWORD}) as ag:
        cp = _sim(ag.port, sid, version, connectors=1, signer=_signer(key))
        await cp.connect()
        await cp.boot()
        gt = await cp.charging_day(sessions=1, sample_s=600, day_s=DAY_S, seed=2)
        await cp.close()
    iv = _records(db, sid, "interval")
    assert sum(r.mwh for r in iv) == _tx_energy(gt, 1) > 0
    signed = [r for r in iv if r.mwh and "unsigned" not in r.flags.split("|")]
    assert signed, [r.flags for r in iv]
    out = _verify(db)
    assert "OK" in out


async def test_ocmf_bad_signature_quarantined(db: str) -> None:
    """A signed value that does not verify against the registered key is quarantined like a
    bad HMAC (`bad_sig`): never stored, never credited."""
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    sid = "OCPP-FORGED"
    register(db, {sid: PASSWORD}, {sid: ocmf.public_key_text(key)})
    async with OcppAgent(db, {sid: PASSWORD}) as ag:
        cp = _sim(ag.port, sid, "1.6", connectors=1, signer=_signer(other), response_timeout=5)
        await cp.connect()
        await cp.boot()
        await cp.start(1, power_w=2000)  # meterStart: not a signed value
        cp.clock.advance(600_000)
        await cp.sample(1)  # answered with a CALLERROR (SecurityError)
        await cp.close()
    errors = [f for f in cp.sent if f.startswith("[4")]  # (the charger's own frames only)
    assert not errors
    with Store(db, create=False) as s:
        q = s.db.execute("SELECT reason, detail FROM quarantine").fetchall()
        n_raw = s.db.execute("SELECT COUNT(*) FROM raw").fetchone()[0]
    assert q and q[0][0] == "bad_sig" and "OCMF" in q[0][1]
    assert n_raw == 2  # the BootNotification and the StartTransaction
    assert sum(_credited(db, sid).values()) == 0  # the meterStart baseline only
