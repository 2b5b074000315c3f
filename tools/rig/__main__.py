"""python -m tools.rig: run one rig until SIGTERM/SIGINT (or the scenario's duration).

Writes DIR/rig.json (pty paths and settings) at start, DIR/ground_truth.json and
DIR/faults.json every --write-every seconds and on exit. Exit 0 on a clean stop, 2 on bad
usage or a bad scenario (one line on stderr), 1 on other failure.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from types import FrameType

from .faults import FaultRates
from .rig import Rig
from .scenario import Scenario, ScenarioError, load


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.rig", description=__doc__)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        help="fault probability per transaction on each link, split over the kinds",
    )
    p.add_argument("--script", help="scenario JSON (see tools/rig/scenario.py)")
    p.add_argument("--bus-baud", type=int, default=9600)
    p.add_argument("--charger-baud", type=int, default=115200)
    p.add_argument("--no-meter", action="store_true")
    p.add_argument("--no-pace", action="store_true", help="do not pace bytes at the baud rate")
    p.add_argument("--bus-timeout", type=float, default=0.5, help="the station's Modbus timeout, s")
    p.add_argument(
        "--charger-timeout", type=float, default=0.2, help="the station's charger timeout, s"
    )
    p.add_argument(
        "--retry-window",
        type=float,
        default=None,
        help="s; a repeat of a faulted read within it is its retry (0: no retries)",
    )
    p.add_argument("--write-every", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=None, help="stop after this many s")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        rates = FaultRates.uniform(
            a.fault_rate,
            bus_timeout_s=a.bus_timeout,
            charger_timeout_s=a.charger_timeout,
            **({} if a.retry_window is None else {"retry_window_s": a.retry_window}),
        )
        rig = Rig(
            slots=a.slots,
            meter=not a.no_meter,
            bus_baud=a.bus_baud,
            charger_baud=a.charger_baud,
            faults=rates,
            seed=a.seed,
            workdir=a.workdir,
            pace=not a.no_pace,
        )
        scenario = load(a.script, a.slots) if a.script else Scenario(events=())
        if a.write_every <= 0:
            raise ValueError("--write-every must be > 0")
    except (ValueError, ScenarioError) as exc:
        print(f"tools.rig: {exc}", file=sys.stderr)
        return 2
    duration = a.duration if a.duration is not None else scenario.duration_s
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rig.start()
    try:
        t0 = time.monotonic()
        pending = list(scenario.events)
        next_write = t0 + a.write_every
        while not stop.is_set():
            now = time.monotonic()
            while pending and pending[0].t <= now - t0:
                ev = pending.pop(0)
                try:
                    scenario.apply(rig, ev)
                except ValueError as exc:  # e.g. insert into an occupied slot
                    logging.getLogger(__name__).warning("event at %.3f s: %s", ev.t, exc)
            if now >= next_write:
                rig.write_files()
                next_write = now + a.write_every
            if duration is not None and now - t0 >= duration:
                break
            wake = min(
                [next_write]
                + ([t0 + pending[0].t] if pending else [])
                + ([t0 + duration] if duration is not None else [])
            )
            stop.wait(max(0.0, min(0.2, wake - time.monotonic())))
    finally:
        rig.stop()  # writes the files one last time
    return 0


if __name__ == "__main__":
    sys.exit(main())
