"""Bus and charger-line errors: every injected fault is counted once, in the right counter
(CONTRACT §3, §4), and none of them moves the energy (a missed sample is bridged)."""

from __future__ import annotations

from hil_tests.checks import check_energy, settle
from hil_tests.conftest import Bench
from hil_tests.harness import wait_for

BUS = ("mb_to", "mb_crc", "mb_exc", "mb_addr")
CHARGER = ("ser_to", "ser_cs", "ser_bad")


def test_bus_errors_counted_and_energy_kept(bench: Bench, make_dut) -> None:  # type: ignore[no-untyped-def]
    agent = bench.agent
    # a sampling period longer than the rig's retry window: a retry is never a new fault
    dut = make_dut(fault_rate=0.1, sample_ms=1000)
    wait_for(lambda: agent.telemetry(dut.sid), 60, "first telemetry")
    dut.insert(1, power_w=1000, capacity_wh=20.0, soc=0.3)
    dut.insert(2, power_w=700, capacity_wh=20.0, soc=0.5)
    boot = agent.telemetry(dut.sid)[-1].boot

    def counters_agree() -> dict[str, int] | None:
        # the newest telemetry counts exactly what the rig injected, if no fault came since
        before = dut.rig.fault_totals()
        tel = [m for m in agent.telemetry(dut.sid) if m.boot == boot]
        after = dut.rig.fault_totals()
        if not tel or before != after:
            return None
        err = tel[-1].body["err"]
        return err if {k: err[k] for k in before} == before and sum(before.values()) >= 10 else None

    err = wait_for(
        counters_agree, 90, "the station's error counters to equal the injected faults", every=0.3
    )
    assert sum(err[k] for k in BUS) > 0 and sum(err[k] for k in CHARGER) > 0
    settle(dut, agent)
    check_energy(dut, agent)
