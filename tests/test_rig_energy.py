"""End to end over the ptys, as a station sees it: a short charge goes C → V → F, the rig's
ground truth equals an independent trapezoid of the polled charger power, and the grid
meter's register grows by battery energy / efficiency + idle load."""

from __future__ import annotations

import itertools
import struct
import time

import serial
from pymodbus.client import ModbusSerialClient

from tools.rig import Rig, format_query, parse_reply


def meter_kwh(c: ModbusSerialClient) -> float:
    regs = c.read_input_registers(0x48, count=2, device_id=1).registers
    return float(struct.unpack(">f", struct.pack(">HH", regs[0], regs[1]))[0])


def test_charge_cycle_truth_and_meter() -> None:
    eff, idle = 0.9, 12.0
    with Rig(slots=2, seed=11, efficiency=eff, idle_w=idle, meter_start_kwh=1.0) as rig:
        bus = ModbusSerialClient(rig.bus_path, baudrate=9600, timeout=0.5, retries=0)
        assert bus.connect()
        port = serial.Serial(rig.charger_path, 115200, timeout=0.5)
        try:
            t_m0 = time.monotonic()
            kwh0 = meter_kwh(bus)
            truth0 = rig.ground_truth_mwh()
            assert truth0 == {1: 0, 2: 0}
            # poll both slots as fast as the line allows, from before insertion to after F
            polls: dict[int, list[tuple[float, int, int, str]]] = {1: [], 2: []}
            t_start = time.monotonic()
            inserted = removed = False
            while time.monotonic() - t_start < 30:
                el = time.monotonic() - t_start
                if not inserted and el > 0.2:
                    rig.insert(1, pack="72V", power_w=1000, capacity_wh=2.0, soc=0.5)
                    rig.insert(2, pack="60V", power_w=1200, capacity_wh=5.0, soc=0.3)
                    inserted = True
                if inserted and not removed and el > 3.5:
                    rig.remove(2)  # mid-charge
                    removed = True
                for slot in (1, 2):
                    tw = time.monotonic()
                    port.write(format_query(slot))
                    line = bytes(port.readline())
                    tr = time.monotonic()
                    r = parse_reply(line)
                    assert r is not None and r.slot == slot
                    polls[slot].append(((tw + tr) / 2, r.mv, r.ma, r.state))
                time.sleep(0.02)
                if removed and len(polls[1]) > 5 and all(p[3] == "F" for p in polls[1][-5:]):
                    break
            truth = rig.ground_truth_mwh()
            kwh1 = meter_kwh(bus)
            t_m1 = time.monotonic()
        finally:
            port.close()
            bus.close()

    # 1: the phases, in order
    states = [p[3] for p in polls[1]]
    seq = [s for k, s in enumerate(states) if k == 0 or states[k - 1] != s]
    assert seq == ["I", "W", "C", "V", "F"]
    cc = [p[2] for p in polls[1] if p[3] == "C"][-6:-1]  # the last may straddle C → V
    assert len(cc) == 5 and all(ma == round(1000 / 84.0 * 1000) for ma in cc)  # constant
    cv = [p for p in polls[1] if p[3] == "V"]
    assert all(83900 <= p[1] <= 84000 for p in cv[: len(cv) // 2])  # constant voltage
    assert cv[0][2] > 4 * cv[-1][2]  # ... with the current tapering
    assert polls[2][-1][3] == "I"

    # 2: ground truth against the station-side trapezoid of mV × mA over the same polls
    for slot in (1, 2):
        pts = polls[slot]
        trap_mwh = (
            sum(
                (a[1] * a[2] + b[1] * b[2]) / 2e6 * (b[0] - a[0])
                for a, b in itertools.pairwise(pts)
            )
            / 3.6
        )
        assert truth[slot] > 300
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(pts)]
        p_max = max(p[1] * p[2] for p in pts) / 1e6
        # polling jitter, plus, for the slot removed mid-charge, the step between two polls
        bound = 0.02 * truth[slot] + (p_max * max(gaps) / 2 / 3.6 if slot == 2 else 2.0)
        assert abs(trap_mwh - truth[slot]) <= bound, (slot, trap_mwh, truth[slot], bound)

    # 3: the meter: batteries / efficiency + idle, within a few mWh (float32 at 1 kWh)
    grid_mwh = (kwh1 - kwh0) * 1e6
    expect = sum(truth.values()) / eff + idle * (t_m1 - t_m0) / 3.6
    assert abs(grid_mwh - expect) <= 0.002 * expect + idle * 0.1 / 3.6
