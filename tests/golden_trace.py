"""A fixed trace of signed messages that exercises the metering rules, and its exports.

The trace (tests/vectors/golden_trace.jsonl: topic, receive time, payload) is made once by
`python -m tests.golden_trace --write` and kept; its exports (every `--by` in both formats)
are kept beside it. test_golden_trace.py checks that today's code turns the kept trace into
the kept exports, byte for byte: a refactoring that changes a record shows up there. A
deliberate change of the rules regenerates the exports (`--write-exports`) in the same
commit, and says why.

What the trace holds: a small synced fleet (boot events, telemetry, a reboot with energy
persisted but not sent, a charging session), and one station with the rare cases: a seq
gap, a glitch down and back up, a spike that is held, a confirmed level shift, a meter
reset event, a meter swap (serial change), a boot that never syncs its clock (time_est),
messages from the outbox (hist), a reboot without b_mwh (no_restore), a duplicate and
the arrival of part of the stream out of order.
"""

from __future__ import annotations

import base64
import json
import pathlib
import sys
from typing import Any

from tests.agent_helpers import T0_MS, Station, fleet_stream, signed

HERE = pathlib.Path(__file__).parent / "vectors"
TRACE = HERE / "golden_trace.jsonl"
EXPORTS = HERE / "golden_exports"
BYS = ("interval", "session", "day")
FMTS = ("csv", "json")


def _odd_station() -> list[tuple[str, bytes]]:
    st = Station("KH-ODD-0001", slots=2, boot=7)
    out: list[tuple[str, bytes]] = []

    def put(kp: tuple[str, bytes]) -> None:
        out.append((st.topic(kp[0]), kp[1]))

    def tel(hist: bool = False, drop_b: bool = False, **over: Any) -> tuple[str, bytes]:
        kind, payload = st.telemetry()
        if not (hist or drop_b or over):
            return kind, payload
        body = json.loads(payload[: payload.rfind(b',"sig":"')] + b"}")
        if hist:
            body["hist"] = 1
        if drop_b:
            for sl in body["slots"]:
                sl.pop("b_mwh", None)
        for k, v in over.items():
            if k == "e1":
                body["slots"][0]["e_mwh"] = v
            elif k == "wh":
                body["meter"]["e_wh"] = v
            elif k == "sn":
                body["meter"]["sn"] = v
        return kind, signed(body, st.key)

    put(st.boot_event())
    for _ in range(30):
        st.advance(10_000, 2000)
        put(tel())
    st.seq += 3  # three messages never arrive: a gap
    for _ in range(5):
        st.advance(10_000, 2000)
        put(tel())
    st.advance(10_000, 2000)
    put(tel(e1=st.e_mwh[0] - 20_000))  # a glitch down (anomaly) and back up
    for _ in range(5):
        st.advance(10_000, 2000)
        put(tel())
    st.advance(10_000, 2000)
    put(tel(e1=st.e_mwh[0] + 50_000_000))  # a spike: held
    for _ in range(5):
        st.advance(10_000, 2000)
        put(tel())
    st.advance(10_000, 2000)
    st.e_mwh[0] += 30_000_000  # a level shift, confirmed by the next reading
    put(tel())
    for _ in range(5):
        st.advance(10_000, 2000)
        put(tel())
    put(st.event("meter_reset", from_wh=st.e_wh, to_wh=10, sn=12345678))
    st.e_wh = 10
    for _ in range(5):
        st.advance(10_000, 2000)
        put(tel())
    st.e_wh = 500  # a swapped meter, no event: a new baseline, nothing credited across
    for _ in range(5):
        st.advance(10_000, 2000)
        put(tel(sn=87654321))
    for _ in range(10):  # messages made while the link was down
        st.advance(10_000, 2000)
        put(tel(hist=True, sn=87654321))
    # a reboot whose clock never syncs, and whose telemetry has no b_mwh
    st.advance(5000, 2000)
    st.reboot()
    st.synced = False
    for _ in range(20):
        st.advance(10_000, 2000)
        put(tel(drop_b=True, sn=87654321))
    st.advance(5000, 2000)
    st.reboot()
    st.synced = True
    put(st.boot_event())
    for _ in range(20):
        st.advance(10_000, 2000)
        put(tel(sn=87654321))
    return out


def make_trace() -> list[tuple[str, int, bytes]]:
    """(topic, receive ms, payload): a duplicate and a reordered run included."""
    msgs = fleet_stream(3, 120, sid_base="KH-GLD", step_ms=60_000) + _odd_station()
    rows = [(t, T0_MS + 5000 + 10_000 * i, p) for i, (t, p) in enumerate(msgs)]
    # the odd station's unsynced boot arrives late and backwards; one message twice
    odd = [r for r in rows if "KH-ODD" in r[0]]
    rest = [r for r in rows if "KH-ODD" not in r[0]]
    late = odd[100:120]
    odd = odd[:100] + odd[120:] + late[::-1]
    return rest + odd + [odd[40]]


def read_trace() -> list[tuple[str, int, bytes]]:
    out = []
    for line in TRACE.read_text().splitlines():
        o = json.loads(line)
        out.append((o["topic"], o["recv_ms"], base64.b64decode(o["payload"])))
    return out


def exports(trace: list[tuple[str, int, bytes]]) -> dict[str, bytes]:
    """Every export of the trace's records, by file name."""
    from agent import wire
    from agent.ledger import compute
    from agent.ledger.export import render
    from agent.ledger.inputs import raw_msg

    msgs = []
    for _topic, recv, payload in trace:
        body = wire.decode_record(payload)
        # as the agent meters it (§6.9's clean included)
        msgs.append(raw_msg(body["sid"], body["boot"], body["seq"], recv, body))
    records = compute(msgs)
    return {f"{by}.{fmt}": render(records, fmt, None, None, by) for by in BYS for fmt in FMTS}


def main(argv: list[str]) -> int:
    if "--write" in argv:
        HERE.mkdir(exist_ok=True)
        with TRACE.open("w") as f:
            for topic, recv, payload in make_trace():
                f.write(
                    json.dumps(
                        {
                            "topic": topic,
                            "recv_ms": recv,
                            "payload": base64.b64encode(payload).decode(),
                        }
                    )
                    + "\n"
                )
    if "--write" in argv or "--write-exports" in argv:
        EXPORTS.mkdir(exist_ok=True)
        for name, data in exports(read_trace()).items():
            (EXPORTS / name).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
