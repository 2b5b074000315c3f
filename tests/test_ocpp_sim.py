"""tools/ocpp_sim.py against a minimal central system made of the `ocpp` library's own
server-side ChargePoint classes under `websockets.serve` on loopback (no network mocks).
The CSMS records every frame it receives as raw text and answers (1.6 StartTransaction
hands out transactionIds 1, 2, ...). Simulated time is stepped, never slept."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint as Cp16
from ocpp.v16 import call_result as r16
from ocpp.v201 import ChargePoint as Cp201
from ocpp.v201 import call_result as r201
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tools.ocpp_sim import ENERGY, PointSpec, SimChargePoint, SimClock, run_points

T0 = 1_700_000_000_000  # simulated start, Unix ms
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
VERSIONS = ["1.6", "2.0.1"]


@dataclass
class Frame:
    identity: str
    conn: int  # connection number of that identity, from 1
    raw: str
    msg: Any = None  # parsed (floats as Decimal), None if not JSON

    @property
    def action(self) -> str | None:
        m = self.msg
        if isinstance(m, list) and len(m) == 4 and m[0] == 2 and isinstance(m[2], str):
            return m[2]
        return None

    @property
    def payload(self) -> dict[str, Any]:
        return self.msg[3]  # type: ignore[no-any-return]


@dataclass
class Rec:
    url: str = ""
    frames: list[Frame] = field(default_factory=list)
    auth: dict[str, str | None] = field(default_factory=dict)
    protocols: dict[str, str | None] = field(default_factory=dict)
    conns: Counter[str] = field(default_factory=Counter)
    next_tx: int = 1
    tx_connector: dict[tuple[str, int], int] = field(default_factory=dict)

    def calls(self, identity: str, action: str | None = None) -> list[Frame]:
        return [
            f
            for f in self.frames
            if f.identity == identity and f.action and (action is None or f.action == action)
        ]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S") + "Z"


class _Recording:
    rec: Rec
    conn_no: int
    id: str

    async def route_message(self, raw_msg: str) -> None:
        try:
            msg = json.loads(raw_msg, parse_float=Decimal)
        except ValueError:
            msg = None
        self.rec.frames.append(Frame(self.id, self.conn_no, raw_msg, msg))
        await super().route_message(raw_msg)  # type: ignore[misc]


class Csms16(_Recording, Cp16):  # type: ignore[misc]
    @on("BootNotification")
    def on_boot16(self, **kw: Any) -> Any:
        return r16.BootNotification(current_time=_now(), interval=300, status="Accepted")

    @on("Heartbeat")
    def on_hb16(self, **kw: Any) -> Any:
        return r16.Heartbeat(current_time=_now())

    @on("StatusNotification")
    def on_status16(self, **kw: Any) -> Any:
        return r16.StatusNotification()

    @on("Authorize")
    def on_auth16(self, **kw: Any) -> Any:
        return r16.Authorize(id_tag_info={"status": "Accepted"})

    @on("StartTransaction")
    def on_start16(self, connector_id: int, **kw: Any) -> Any:
        tid = self.rec.next_tx
        self.rec.next_tx += 1
        self.rec.tx_connector[(self.id, tid)] = connector_id
        return r16.StartTransaction(transaction_id=tid, id_tag_info={"status": "Accepted"})

    @on("StopTransaction")
    def on_stop16(self, **kw: Any) -> Any:
        return r16.StopTransaction(id_tag_info={"status": "Accepted"})

    @on("MeterValues")
    def on_mv16(self, **kw: Any) -> Any:
        return r16.MeterValues()


class Csms201(_Recording, Cp201):  # type: ignore[misc]
    @on("BootNotification")
    def on_boot201(self, **kw: Any) -> Any:
        return r201.BootNotification(current_time=_now(), interval=300, status="Accepted")

    @on("Heartbeat")
    def on_hb201(self, **kw: Any) -> Any:
        return r201.Heartbeat(current_time=_now())

    @on("StatusNotification")
    def on_status201(self, **kw: Any) -> Any:
        return r201.StatusNotification()

    @on("Authorize")
    def on_auth201(self, **kw: Any) -> Any:
        return r201.Authorize(id_token_info={"status": "Accepted"})

    @on("TransactionEvent")
    def on_tx201(self, **kw: Any) -> Any:
        return r201.TransactionEvent()

    @on("MeterValues")
    def on_mv201(self, **kw: Any) -> Any:
        return r201.MeterValues()


async def _serve(rec: Rec, port: int = 0) -> Any:
    async def handler(ws: Any) -> None:
        identity = ws.request.path.rstrip("/").rsplit("/", 1)[-1]
        rec.auth[identity] = ws.request.headers.get("Authorization")
        rec.protocols[identity] = ws.subprotocol
        rec.conns[identity] += 1
        cls = Csms16 if ws.subprotocol == "ocpp1.6" else Csms201
        cp = cls(identity, ws)
        cp.rec, cp.conn_no = rec, rec.conns[identity]
        try:
            await cp.start()
        except ConnectionClosed:
            pass

    return await websockets.serve(
        handler,
        "127.0.0.1",
        port,
        subprotocols=[Subprotocol("ocpp1.6"), Subprotocol("ocpp2.0.1")],
    )


@pytest.fixture
async def csms() -> AsyncIterator[Rec]:
    rec = Rec()
    server = await _serve(rec)
    port = server.sockets[0].getsockname()[1]
    rec.url = f"ws://127.0.0.1:{port}/ocpp"
    yield rec
    server.close()
    await server.wait_closed()


def make(rec: Rec, version: str, identity: str = "CP1", **kw: Any) -> SimChargePoint:
    kw.setdefault("clock", SimClock(T0, manual=True))
    kw.setdefault("heartbeat_s", 0)
    return SimChargePoint(rec.url, identity, "s3cret", version=version, **kw)  # type: ignore[arg-type]


async def booted(rec: Rec, version: str, identity: str = "CP1", **kw: Any) -> SimChargePoint:
    cp = make(rec, version, identity, **kw)
    await cp.connect()
    assert await cp.boot() is not None
    return cp


def energy_readings(rec: Rec, identity: str) -> list[tuple[int, str | None, Decimal, str]]:
    """(connector, context, Wh, timestamp) of every total energy register value received,
    in arrival order; per-phase, signed and other measurands skipped."""
    out = []
    for f in rec.calls(identity):
        p = f.payload
        if f.action == "MeterValues":
            conn = p.get("connectorId", p.get("evseId"))
            mvs = p["meterValue"]
        elif f.action == "StopTransaction":
            conn = rec.tx_connector[(identity, p["transactionId"])]
            mvs = p.get("transactionData", [])
        elif f.action == "TransactionEvent":
            conn = p["evse"]["id"]
            mvs = p.get("meterValue", [])
        else:
            continue
        for mv in mvs:
            for sv in mv["sampledValue"]:
                if sv.get("measurand", ENERGY) != ENERGY or "phase" in sv:
                    continue
                if sv.get("format") == "SignedData":
                    continue
                unit = sv.get("unit") or sv.get("unitOfMeasure", {}).get("unit", "Wh")
                v = Decimal(sv["value"]) if isinstance(sv["value"], str) else Decimal(sv["value"])
                out.append(
                    (conn, sv.get("context"), v * 1000 if unit == "kWh" else v, mv["timestamp"])
                )
    return out


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("version", VERSIONS)
async def test_charging_day_exact_and_units(csms: Rec, version: str) -> None:
    """A day on 2 connectors in Wh and (same seed) in kWh: sampled registers monotonic, the
    last one equals the ground truth exactly, kWh == Wh exactly, contexts mixed, timestamps
    ISO with ms and Z, extra measurands present."""
    truths = {}
    for unit in ("Wh", "kWh"):
        cp = await booted(
            csms,
            version,
            f"CP-{unit}",
            unit=unit,
            initial_mwh={1: 123_456_789, 2: 0},
            extra_measurands=True,
        )
        truths[unit] = await cp.charging_day(
            sessions=2, power_w=(1000, 7000), sample_s=900, clock_aligned_s=3600, seed=7
        )
        await cp.close()
    gt = truths["Wh"]
    assert truths["kWh"]["connectors"] == gt["connectors"]

    def no_ids(txs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in t.items() if k != "tx_id"} for t in txs]

    assert no_ids(truths["kWh"]["transactions"]) == no_ids(gt["transactions"])
    wh = energy_readings(csms, "CP-Wh")
    kwh = energy_readings(csms, "CP-kWh")
    assert len(wh) > 40
    assert [(c, ctx, v, t) for c, ctx, v, t in wh] == kwh  # exact equality of Decimals
    for c, truth in gt["connectors"].items():
        vals = [v for conn, _, v, _ in wh if conn == int(c)]
        assert vals == sorted(vals), "register went backwards"
        assert vals[-1] == truth["end_wh"] == truth["end_mwh"] // 1000
        assert truth["advanced_mwh"] == truth["end_mwh"] - truth["start_mwh"] > 0
    txs = gt["transactions"]
    assert len(txs) == 4
    # the session energies a CSMS must find, exactly
    for tx in txs:
        assert tx["energy_wh"] == tx["meter_stop_wh"] - tx["meter_start_wh"]
        assert abs(tx["energy_mwh"] - 1000 * tx["energy_wh"]) < 1000
    contexts = {ctx for _, ctx, _, _ in wh}
    assert {"Sample.Periodic", "Sample.Clock", "Transaction.End"} <= contexts
    assert all(ISO.match(t) for _, _, _, t in wh)
    raw_kwh = [f.raw for f in csms.calls("CP-kWh")]
    assert any('"Power.Active.Import"' in r and '"L3-N"' in r for r in raw_kwh)
    if version == "1.6":
        starts = [f.payload for f in csms.calls("CP-Wh", "StartTransaction")]
        assert [s["meterStart"] for s in starts] == [t["meter_start_wh"] for t in txs]
        stops = [f.payload for f in csms.calls("CP-Wh", "StopTransaction")]
        assert sorted(s["meterStop"] for s in stops) == sorted(t["meter_stop_wh"] for t in txs)
        assert sorted(s["transactionId"] for s in stops) == [1, 2, 3, 4]
        assert {t["tx_id"] for t in txs} == {1, 2, 3, 4}
        # kWh values are decimal strings with exactly 3 decimals
        kwh_vals = [
            sv["value"]
            for f in csms.calls("CP-kWh", "MeterValues")
            for mv in f.payload["meterValue"]
            for sv in mv["sampledValue"]
            if sv.get("unit") == "kWh"
        ]
        assert kwh_vals and all(re.fullmatch(r"\d+\.\d{3}", v) for v in kwh_vals)
    else:
        assert "Transaction.Begin" in contexts
        events = [f.payload for f in csms.calls("CP-Wh", "TransactionEvent")]
        by_tx: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            by_tx.setdefault(e["transactionInfo"]["transactionId"], []).append(e)
        assert len(by_tx) == 4
        for evs in by_tx.values():
            assert [e["seqNo"] for e in evs] == list(range(len(evs)))
            assert evs[0]["eventType"] == "Started" and evs[-1]["eventType"] == "Ended"
            assert evs[0]["evse"]["connectorId"] == 1
            assert {e["eventType"] for e in evs[1:-1]} == {"Updated"}


@pytest.mark.parametrize("version", VERSIONS)
async def test_basic_auth_and_subprotocol(csms: Rec, version: str) -> None:
    cp = await booted(csms, version, "CP-auth")
    await cp.close()
    expected = "Basic " + base64.b64encode(b"CP-auth:s3cret").decode()
    assert csms.auth["CP-auth"] == expected == cp.auth_header()
    assert csms.protocols["CP-auth"] == ("ocpp1.6" if version == "1.6" else "ocpp2.0.1")


@pytest.mark.parametrize("version", VERSIONS)
async def test_zero_at_boot(csms: Rec, version: str) -> None:
    cp = await booted(csms, version, initial_mwh=5_000_000, zero_at_boot=True)
    await cp.start(1, power_w=3600)
    cp.clock.advance(600_000)
    await cp.sample(1)
    cp.clock.advance(600_000)
    await cp.sample(1)
    await cp.stop(1)
    await cp.close()
    vals = [v for _, _, v, _ in energy_readings(csms, "CP1")]
    # first value of the transaction reads 0, then the true register (5000 Wh + 600 Wh ...)
    if version == "1.6":
        assert csms.calls("CP1", "StartTransaction")[0].payload["meterStart"] == 5000
        assert vals == [0, 6200, 6200]  # first MeterValues of the transaction, then the truth
    else:
        assert vals == [0, 5600, 6200, 6200]
    gt = cp.ground_truth()
    assert gt["transactions"][0]["energy_wh"] == 1200


@pytest.mark.parametrize("version", VERSIONS)
async def test_retry_stop_sends_same_stop_twice(csms: Rec, version: str) -> None:
    cp = await booted(csms, version, retry_stop=True)
    await cp.start(2, power_w=7000)
    cp.clock.advance(3_600_000)
    await cp.stop(2, "Local")
    await cp.close()
    if version == "1.6":
        stops = csms.calls("CP1", "StopTransaction")
        assert stops[0].payload["meterStop"] == 7000
        assert stops[0].payload["transactionId"] == 1
    else:
        stops = [
            f for f in csms.calls("CP1", "TransactionEvent") if f.payload["eventType"] == "Ended"
        ]
    assert len(stops) == 2
    assert stops[0].payload == stops[1].payload
    assert stops[0].msg[1] != stops[1].msg[1]  # a new message id for the retry


@pytest.mark.parametrize("version", VERSIONS)
async def test_no_final_value(csms: Rec, version: str) -> None:
    cp = await booted(csms, version, no_final_value=True)
    await cp.start(1, power_w=2000)
    cp.clock.advance(1_800_000)
    await cp.stop(1)
    await cp.close()
    if version == "1.6":
        stop = csms.calls("CP1", "StopTransaction")[0].payload
        assert stop["meterStop"] == 1000 and "transactionData" not in stop
    else:
        ended = csms.calls("CP1", "TransactionEvent")[-1].payload
        assert ended["eventType"] == "Ended" and "meterValue" not in ended


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("order", "duplicate"), [("in_order", False), ("shuffled", True)])
async def test_offline_queue(csms: Rec, version: str, order: str, duplicate: bool) -> None:
    cp = await booted(csms, version)
    await cp.start(1, power_w=6000)
    cp.clock.advance(60_000)
    await cp.sample(1)
    await cp.go_offline()
    online_frames = len(csms.calls("CP1"))
    for _ in range(3):
        cp.clock.advance(60_000)
        await cp.sample(1)
        await cp.status(1, "Charging")  # not queued: dropped
    await cp.stop(1)
    cp.clock.advance(60_000)
    await cp.start(2, power_w=1000)  # a whole transaction while offline
    cp.clock.advance(60_000)
    await cp.sample(2)
    await cp.stop(2)
    queued = list(cp.queue)
    assert len(queued) == 7
    # original timestamps of the queued messages (1.6 StartTransaction / Stop / MeterValues)
    expected = [p.payload.timestamp if hasattr(p.payload, "timestamp") else None for p in queued]
    expected = [
        t if t is not None else p.payload.meter_value[0].timestamp
        for t, p in zip(expected, queued, strict=True)
    ]
    assert len(csms.calls("CP1")) == online_frames
    cp.clock.advance(600_000)  # back online ten minutes later
    sent = await cp.come_online(order=order, duplicate=duplicate, seed=3)  # type: ignore[arg-type]
    await cp.close()
    assert sent == 7 * (2 if duplicate else 1)
    late = [f for f in csms.calls("CP1") if f.conn == 2]
    assert len(late) == sent
    assert all(f.action != "StatusNotification" for f in late)

    def ts(f: Frame) -> str:
        p = f.payload
        return p["timestamp"] if "timestamp" in p else p["meterValue"][0]["timestamp"]

    got = [ts(f) for f in late]
    assert Counter(got) == Counter(t for t in expected for _ in range(2 if duplicate else 1))
    assert max(got) < cp.clock.iso()  # all older than the reconnection
    if order == "in_order":
        assert got == expected
    else:
        assert got != sorted(got), "shuffled delivery came in order"
    if version == "1.6":
        # the offline StartTransaction got its transactionId on delivery; later messages use it
        kinds = [f.action for f in late]
        first_tx2 = min(i for i, f in enumerate(late) if f.payload.get("transactionId") == 2)
        assert "StartTransaction" in kinds[:first_tx2]
        if order == "shuffled":
            assert kinds[0] == "StartTransaction"
        ids = {f.payload.get("transactionId") for f in late if f.action != "StartTransaction"}
        assert ids <= {1, 2}
        stops = [f.payload for f in late if f.action == "StopTransaction"]
        assert {s["transactionId"] for s in stops} == {1, 2}
    else:
        assert all(f.payload.get("offline") is True for f in late)
        if duplicate:
            payloads = Counter(json.dumps(f.payload, sort_keys=True, default=str) for f in late)
            assert set(payloads.values()) == {2}


@pytest.mark.parametrize("version", VERSIONS)
async def test_signed_values(csms: Rec, version: str) -> None:
    def signer(mwh: int, time_ms: int, stage: str) -> str:
        return f'OCMF|{{"RD":[{{"TM":"{time_ms}","TX":"{stage}","RV":{mwh / 1e6:.3f}}}]}}|{{}}'

    cp = await booted(csms, version, signer=signer, unit="kWh")
    await cp.start(1, power_w=3000)
    cp.clock.advance(1_200_000)
    await cp.sample(1)
    await cp.stop(1)
    await cp.close()
    svs = [
        sv
        for f in csms.calls("CP1")
        if f.action in ("MeterValues", "TransactionEvent", "StopTransaction")
        for mv in f.payload.get("meterValue", f.payload.get("transactionData", []))
        for sv in mv["sampledValue"]
    ]
    if version == "1.6":
        signed = [sv for sv in svs if sv.get("format") == "SignedData"]
        raw = [sv for sv in svs if sv.get("format") == "Raw"]
        assert len(signed) == len(raw) == 2  # the periodic sample and Transaction.End
        assert signed[0]["value"].startswith("OCMF|") and '"TX":"T"' in signed[0]["value"]
        assert raw[0]["value"] == "1.000"
    else:
        signed = [sv["signedMeterValue"] for sv in svs if "signedMeterValue" in sv]
        assert len(signed) == 3  # Begin, periodic, End
        assert {s["encodingMethod"] for s in signed} == {"OCMF"}
        texts = [base64.b64decode(s["signedMeterData"]).decode() for s in signed]
        assert ['"TX":"B"' in texts[0], '"TX":"T"' in texts[1], '"TX":"E"' in texts[2]] == [
            True
        ] * 3
        assert '"RV":1.000' in texts[1]  # 3 kW x 20 min


@pytest.mark.parametrize("version", VERSIONS)
async def test_reset_register_and_reboot(csms: Rec, version: str) -> None:
    cp = await booted(csms, version, initial_mwh=9_000_000)
    await cp.start(1, power_w=1000)
    cp.clock.advance(3_600_000)
    await cp.reboot(reset_registers=True)  # stops the transaction (Reboot), new boot
    assert len(csms.calls("CP1", "BootNotification")) == 2
    await cp.start(1, power_w=1000)
    cp.clock.advance(3_600_000)
    await cp.stop(1)
    await cp.close()
    gt = cp.ground_truth()
    c1 = gt["connectors"]["1"]
    assert c1["advanced_mwh"] == 2_000_000 and c1["resets"] == 1 and c1["end_wh"] == 1000
    assert [t["energy_wh"] for t in gt["transactions"]] == [1000, 1000]
    assert [t["reason"] for t in gt["transactions"]] == ["Reboot", "Local"]
    vals = [v for _, _, v, _ in energy_readings(csms, "CP1")]
    assert vals[-1] == 1000
    if version == "1.6":
        starts = [f.payload["meterStart"] for f in csms.calls("CP1", "StartTransaction")]
        assert starts == [9000, 0]


@pytest.mark.parametrize("version", VERSIONS)
async def test_garbage_does_not_crash(csms: Rec, version: str) -> None:
    cp = await booted(csms, version)
    await cp.start(1, power_w=2000)
    n = await cp.garbage(14, seed=1)
    assert n >= 7  # at least one of each kind before the huge frame closed it
    for _ in range(50):  # the server closes after the 2 MiB frame
        if not cp.connected:
            break
        await asyncio.sleep(0.02)
    assert not cp.connected
    cp.clock.advance(1_800_000)
    await cp.sample(1)  # queued, not lost
    assert len(cp.queue) == 1
    await cp.connect()
    await cp.boot()
    await cp.flush()
    await cp.stop(1)
    await cp.close()
    assert energy_readings(csms, "CP1")[-1][2] == 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_fleet_reconnects_and_keeps_ground_truth() -> None:
    """Fleet started before the CSMS is up (backoff), then runs 1 h simulated per real
    second; every transaction's meterStop / Ended value matches its ground truth."""
    rec = Rec()
    port = _free_port()
    rec.url = f"ws://127.0.0.1:{port}/ocpp"
    stop = asyncio.Event()
    points = [
        PointSpec("F1", "pw1", "1.6", 2, {"heartbeat_s": 600}),
        PointSpec("F2", "pw2", "2.0.1", 2, {"heartbeat_s": 600}),
    ]
    fleet = asyncio.create_task(run_points(rec.url, points, accel=3600, stop=stop, seed=5))
    await asyncio.sleep(0.6)
    server = await _serve(rec, port)
    await asyncio.sleep(3.0)
    stop.set()
    truth = await asyncio.wait_for(fleet, 20)
    server.close()
    await server.wait_closed()
    json.dumps(truth)
    assert set(truth) == {"F1", "F2"}
    assert rec.auth["F1"] == "Basic " + base64.b64encode(b"F1:pw1").decode()
    for ident, gt in truth.items():
        assert gt["transactions"], ident
        assert all(t["stop"] is not None for t in gt["transactions"])
        readings = energy_readings(rec, ident)
        for c, conn in gt["connectors"].items():  # power is 0 between sessions: exact sums
            txs = [t for t in gt["transactions"] if t["connector"] == int(c)]
            assert sum(t["energy_mwh"] for t in txs) == conn["advanced_mwh"]
        for c, conn in gt["connectors"].items():
            vals = [v for k, _, v, _ in readings if k == int(c)]
            if vals:
                assert vals == sorted(vals)
                assert vals[-1] == conn["end_wh"]
        if gt["version"] == "1.6":
            stops = [f.payload["meterStop"] for f in rec.calls(ident, "StopTransaction")]
            assert sorted(stops) == sorted(t["meter_stop_wh"] for t in gt["transactions"])
        else:
            ended = [
                f.payload
                for f in rec.calls(ident, "TransactionEvent")
                if f.payload["eventType"] == "Ended"
            ]
            assert {e["transactionInfo"]["transactionId"] for e in ended} == {
                t["tx_id"] for t in gt["transactions"]
            }


async def test_fleet_restarted_with_its_state_carries_on(csms: Rec, tmp_path: Any) -> None:
    """A restarted demo's chargers (tools/ocpp_fleet.py with `state_path`): the second run's
    registers start where the first ended, and its clock after the first's last reading."""
    from tools.ocpp_fleet import OcppFleet

    state = tmp_path / "ocpp_state.json"
    loop = asyncio.get_running_loop()
    runs = []
    for _ in range(2):
        fleet = OcppFleet(
            2,
            csms.url,
            passwords={"R-01": "pw1", "R-02": "pw2"},
            accel=7200,
            sample_s=60,
            seed=len(runs) + 3,
            sid_prefix="R-",
            clock_ms=T0,  # as a restarted station fleet would pass: behind the saved clock
            state_path=state,
        )
        await loop.run_in_executor(None, fleet.start)
        await asyncio.sleep(2.5)
        truth = await loop.run_in_executor(None, fleet.stop)
        runs.append(truth)
    first, second = runs
    for sid in ("R-01", "R-02"):
        for c, conn in second[sid]["connectors"].items():
            assert conn["start_mwh"] == first[sid]["connectors"][c]["end_mwh"], (sid, c)
        assert any(t for t in first[sid]["transactions"]), sid  # it charged in the first run
        ends = [t["stop"] for t in first[sid]["transactions"] if t["stop"]]
        starts = [t["start"] for t in second[sid]["transactions"]]
        assert not starts or min(starts) > max(ends), sid  # ISO times of the same form
        readings = energy_readings(csms, sid)
        for c in (1, 2):
            vals = [v for k, _, v, _ in readings if k == c]
            assert vals == sorted(vals), (sid, c)  # no register read lower after the restart
