"""Rig physics and model, on a fake clock: charge phases, continuity, exact ground truth,
determinism, removal, batteries carried between slots, meter energy, BMS registers."""

from __future__ import annotations

import itertools
import random
import struct

import pytest

from tools.rig.battery import PACKS, Battery, cell_ocv
from tools.rig.model import RigModel
from tools.rig.physics import Channel, ChargeProfile, segment_j


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def bat(**kw: object) -> Battery:
    args: dict[str, object] = {"serial": "B0000001", "pack": "72V", "capacity_wh": 5.0, "soc": 0.5}
    args.update(kw)
    return Battery(**args)  # type: ignore[arg-type]


def run(
    ch: Channel, t0: float, t1: float, step: float
) -> list[tuple[float, str, float, float, float]]:
    out = []
    n = round((t1 - t0) / step)
    for k in range(n + 1):
        t = t0 + k * step
        s = ch.sample(t)
        out.append((t, s.state, s.v, s.i, s.p_w))
    return out


def test_pack_cv_voltages_and_ocv() -> None:
    assert PACKS["60V"].cv_v == pytest.approx(67.2)
    assert PACKS["72V"].cv_v == pytest.approx(84.0)
    assert cell_ocv(1.0) == pytest.approx(4.2)  # the taper ends at full
    vals = [cell_ocv(k / 100) for k in range(101)]
    assert all(b > a for a, b in itertools.pairwise(vals))


def test_battery_validation() -> None:
    with pytest.raises(ValueError, match="serial"):
        bat(serial="B00001")
    with pytest.raises(ValueError, match="serial"):
        bat(serial="B000000_")
    with pytest.raises(ValueError, match="soc"):
        bat(soc=1.5)
    with pytest.raises(ValueError, match="pack"):
        bat(pack="48V")
    with pytest.raises(ValueError, match="power_w"):
        ChargeProfile(power_w=0)


@pytest.mark.parametrize("pack", ["60V", "72V"])
def test_full_charge_goes_w_c_v_f(pack: str) -> None:
    ch = Channel(1, t=0.0)
    assert ch.sample(0.5).state == "I"
    ch.insert(1.0, bat(pack=pack, soc=0.3), ChargeProfile(power_w=1000))
    samples = run(ch, 1.0, 40.0, 0.01)
    states = [s[1] for s in samples]
    seq = [st for k, st in enumerate(states) if k == 0 or states[k - 1] != st]
    assert seq == ["W", "C", "V", "F"]
    cv = PACKS[pack].cv_v
    icc = 1000 / cv
    c_after_ramp = [s for s in samples if s[1] == "C" and s[0] > 3.2]
    assert c_after_ramp and all(abs(s[3] - icc) < 1e-9 for s in c_after_ramp)  # constant current
    assert max(s[2] for s in c_after_ramp) <= cv
    v_phase = [s for s in samples if s[1] == "V"]
    assert all(abs(s[2] - cv) < 0.05 for s in v_phase[:-60])  # constant voltage (then stop ramp)
    currents = [s[3] for s in v_phase]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(currents))  # tapers
    assert max(s[4] for s in samples) <= 1000.0 + 1e-6
    f = [s for s in samples if s[1] == "F"]
    assert f and all(s[3] == 0.0 for s in f)
    view = ch.sample(40.0).battery
    assert view is not None and view.soc == 1.0


def test_soft_start_ramp_and_power_continuity() -> None:
    ch = Channel(1, t=0.0)
    ch.insert(0.0, bat(soc=0.4, capacity_wh=3.0), ChargeProfile(power_w=1500, ramp_s=1.5))
    samples = run(ch, 0.0, 30.0, 0.001)
    p = [s[4] for s in samples]
    jumps = [abs(b - a) for a, b in itertools.pairwise(p)]
    assert max(jumps) < 5.0  # W per ms at 1.5 kW: no step anywhere, ramps only
    # the raised-cosine ramp lasts 1.5 s: a quarter of the CC current after 0.5 s
    k = next(k for k, s in enumerate(samples) if s[1] == "C")
    assert 0.2 < samples[k + 500][3] / (1500 / 84.0) < 0.3
    assert samples[k + 1600][3] == pytest.approx(1500 / 84.0)


def test_ground_truth_is_the_exact_integral_of_the_sampled_curve() -> None:
    ch = Channel(1, t=0.0, dt_s=0.01)
    ch.insert(0.2, bat(soc=0.6, capacity_wh=2.0), ChargeProfile(power_w=800))
    fine = run(ch, 0.0, 15.0, 0.0005)
    trap = sum((a[4] + b[4]) / 2 * 0.0005 for a, b in itertools.pairwise(fine))
    truth = ch.energy_j(15.0)
    assert truth > 1000.0
    assert abs(trap - truth) < 1e-4 * truth


def test_one_hertz_sampler_error_is_small() -> None:
    """A station sampling at 1 Hz, at any phase, over a 45 s charge: within 0.3 %."""
    for phase in (0.0, 0.37, 0.81):
        ch = Channel(1, t=0.0, dt_s=0.01)
        ch.insert(0.2, bat(soc=0.3, capacity_wh=10.0), ChargeProfile(power_w=1000))
        pts = [ch.sample(phase + k) for k in range(60)]
        assert pts[-1].state == "F"
        e = sum((a.p_w + b.p_w) / 2 * (b.t - a.t) for a, b in itertools.pairwise(pts))
        truth = ch.energy_j(phase + 59)
        assert abs(e - truth) < 0.003 * truth


def test_segment_integral_closed_form() -> None:
    # v, i linear: compare with a fine midpoint sum
    v0, i0, v1, i1, span = 70.0, 2.0, 71.0, 10.0, 0.01
    n = 10000
    mid = (
        sum((v0 + (v1 - v0) * (k + 0.5) / n) * (i0 + (i1 - i0) * (k + 0.5) / n) for k in range(n))
        * span
        / n
    )
    assert segment_j(v0, i0, v1, i1, span, span) == pytest.approx(mid, rel=1e-9)
    assert segment_j(v0, i0, v1, i1, span, span / 2) < segment_j(v0, i0, v1, i1, span, span)


def test_deterministic_whatever_the_sampling() -> None:
    rnd = random.Random(5)
    a = Channel(1, t=0.0)
    b = Channel(1, t=0.0)
    for ch in (a, b):
        ch.insert(0.3, bat(soc=0.5), ChargeProfile(power_w=1200))
    t = 0.3
    while True:  # a: sampled at random times; b: not at all (times only move forward)
        t += rnd.uniform(0.0001, 0.3)
        if t >= 12.0:
            break
        a.sample(t)
    for ch in (a, b):
        ch.set_fault(12.0, 17)
        ch.clear_fault(14.0)
    assert a.energy_j(25.0) == b.energy_j(25.0)
    sa, sb = a.sample(25.0), b.sample(25.0)
    assert (sa.state, sa.v, sa.i) == (sb.state, sb.v, sb.i)


def test_fault_ramps_down_then_clear_restarts() -> None:
    ch = Channel(1, t=0.0)
    ch.insert(0.0, bat(soc=0.3, capacity_wh=20.0), ChargeProfile(power_w=1000))
    assert ch.sample(5.0).state == "C"
    ch.set_fault(5.0, 17)
    s = ch.sample(5.2)
    assert s.state == "E" and s.fault == 17 and 0 < s.i < 1000 / 84.0
    s = ch.sample(6.0)
    assert s.state == "E" and s.i == 0.0 and s.fault == 17
    e = ch.energy_j(6.0)
    assert ch.energy_j(9.0) == e
    ch.clear_fault(9.0)
    assert ch.sample(9.2).state == "W"
    assert ch.sample(12.0).state == "C" and ch.sample(12.0).fault == 0


def test_removal_mid_charge_and_reinsertion_carry_the_battery() -> None:
    ch = Channel(1, t=0.0)
    b0 = bat(soc=0.2, capacity_wh=2.0, cycles=7, cycle_wh=1.5, lifetime_wh=100.0)
    ch.insert(0.0, b0, ChargeProfile(power_w=1000))
    before = ch.sample(4.0)
    assert before.state == "C" and before.p_w > 500
    out = ch.remove(4.0)
    assert out is not None
    e = ch.energy_j(4.0)
    assert ch.energy_j(20.0) == e  # nothing after removal
    assert ch.sample(4.0001).state == "I" and ch.sample(4.0001).p_w == 0.0
    wh = e / 3600
    assert out.soc > b0.soc
    assert out.lifetime_wh == pytest.approx(100.0 + wh)
    assert out.cycles == 7 + int((1.5 + wh) // 2.0)
    assert ch.remove(5.0) is None
    ch2 = Channel(2, t=0.0)
    ch2.insert(10.0, out, ChargeProfile())
    v = ch2.sample(10.1).battery
    assert v is not None and v.soc == pytest.approx(out.soc) and v.serial == "B0000001"


def test_insert_into_occupied_slot_is_refused() -> None:
    ch = Channel(1, t=0.0)
    ch.insert(0.0, bat(), ChargeProfile())
    with pytest.raises(ValueError, match="already holds"):
        ch.insert(1.0, bat(serial="B0000002"), ChargeProfile())


def test_temperature_rises_with_current() -> None:
    ch = Channel(1, t=0.0)
    ch.insert(0.0, bat(soc=0.1, capacity_wh=50.0, temp_c=25.0), ChargeProfile(power_w=1500))
    s0 = ch.sample(0.1)
    s1 = ch.sample(40.0)
    assert s1.state == "C"
    assert s0.battery is not None and s1.battery is not None
    assert s1.battery.t_hi > s0.battery.t_hi + 5
    assert s1.charger_t > s0.charger_t + 3


def test_model_registers_meter_and_truth() -> None:
    clk = Clock()
    m = RigModel(
        slots=3,
        seed=4,
        clock=clk,
        efficiency=0.9,
        idle_w=20.0,
        meter_start_kwh=10.0,
        meter_serial=12345678,
    )
    assert m.bms_registers(1) is None and not m.unit_present(11)
    assert m.unit_present(1) and not m.unit_present(2) and not m.unit_present(14)
    m.insert(1, pack="60V", power_w=1000, capacity_wh=3.0, soc=0.4, serial="AB-12xyz")
    assert m.unit_present(11)
    clk.t += 4.0
    regs = m.bms_registers(1)
    assert regs is not None and len(regs) == 14
    s = m.sample(1)
    assert s.battery is not None
    assert regs[0] == round(s.battery.soc * 1000)
    assert regs[2] == round(s.battery.v * 100) and regs[3] == round(s.i * 100)
    assert b"".join(r.to_bytes(2, "big") for r in regs[8:12]) == b"AB-12xyz"
    assert m.charger_reading(1).state == "C"
    assert m.charger_reading(3).state == "I"
    assert m.charger_reading(4).state == "X"
    truth = m.ground_truth_mwh()
    assert set(truth) == {1, 2, 3} and truth[1] > 0 and truth[2] == 0
    grid = m.grid_mwh()
    assert grid == pytest.approx(truth[1] / 0.9 + 20.0 * 4.0 / 3.6, abs=2)
    regs_in = m.meter_input_registers()
    kwh = struct.unpack(">f", struct.pack(">HH", regs_in[0x48], regs_in[0x49]))[0]
    assert kwh == pytest.approx(10.0 + grid / 1e6, abs=1e-6)
    w = struct.unpack(">f", struct.pack(">HH", regs_in[0x34], regs_in[0x35]))[0]
    assert w == pytest.approx(20.0 + s.p_w / 0.9, rel=1e-5)
    assert m.meter_holding_registers() == [12345678 >> 16, 12345678 & 0xFFFF]
    out = m.remove(1)
    assert out is not None and out.serial == "AB-12xyz"
    clk.t += 10
    assert m.ground_truth_mwh()[1] == truth[1] or m.ground_truth_mwh()[1] > truth[1]
    frozen = m.ground_truth_mwh()[1]
    clk.t += 10
    assert m.ground_truth_mwh()[1] == frozen


def test_model_serials_are_seeded_and_valid() -> None:
    a = RigModel(slots=2, seed=9, clock=Clock())
    b = RigModel(slots=2, seed=9, clock=Clock())
    sa = [a.new_serial() for _ in range(3)]
    assert sa == [b.new_serial() for _ in range(3)]
    assert all(len(s) == 8 and s[0] == "B" and s[1:].isdigit() for s in sa)
    assert len(set(sa)) == 3
    assert RigModel(slots=2, seed=10, clock=Clock()).new_serial() != sa[0]
