"""Rig simulator costs: physics per charging slot, exchange times on the paced lines, and
the CPU of one RigHost thread serving many rigs under a station-like polling load.
Prints figures; asserts nothing."""

from __future__ import annotations

import pathlib
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import serial  # noqa: E402

from tools.machine import thread_cpu_s  # noqa: E402
from tools.rig import Rig, RigHost, format_query, rtu  # noqa: E402
from tools.rig.battery import Battery  # noqa: E402
from tools.rig.physics import Channel, ChargeProfile  # noqa: E402


def bench_physics() -> None:
    for dt in (0.01, 0.05):
        ch = Channel(1, t=0.0, dt_s=dt)
        ch.insert(
            0.0, Battery(serial="B0000001", capacity_wh=2000, soc=0.2), ChargeProfile(power_w=1000)
        )
        t0 = time.perf_counter()
        for k in range(1, 601):
            ch.sample(float(k))
        cpu = time.perf_counter() - t0
        print(
            f"physics dt={dt * 1000:.0f} ms: {cpu / 600 * 1e6:.0f} µs CPU per simulated second "
            f"per charging slot ({cpu / (600 / dt) * 1e6:.2f} µs per step)"
        )
    ch = Channel(1, t=0.0)
    t0 = time.perf_counter()
    for k in range(1, 601):
        ch.sample(float(k))
    print(f"physics idle slot: {(time.perf_counter() - t0) / 600 * 1e6:.1f} µs per simulated s")


def bench_exchanges() -> None:
    with Rig(slots=2, seed=1) as rig:
        rig.insert(1)
        with serial.Serial(rig.bus_path, 9600, timeout=0.5) as bus:
            req = rtu.with_crc(bytes((11, 3, 0, 0, 0, 14)))
            times = []
            for _ in range(40):
                bus.reset_input_buffer()
                t0 = time.monotonic()
                bus.write(req)
                n = len(bus.read(33))
                times.append(time.monotonic() - t0)
                assert n == 33
            times.sort()
            print(
                f"BMS read (8 + 33 bytes) at 9600: median {times[20] * 1000:.1f} ms, "
                f"max {times[-1] * 1000:.1f} ms (a real line: 42.7 ms + turnaround 3.6 ms)"
            )
        with serial.Serial(rig.charger_path, 115200, timeout=0.5) as ch:
            times = []
            for _ in range(100):
                t0 = time.monotonic()
                ch.write(format_query(1))
                ch.readline()
                times.append(time.monotonic() - t0)
            times.sort()
            print(
                f"charger query at 115200: median {times[50] * 1000:.2f} ms, "
                f"max {times[-1] * 1000:.2f} ms"
            )


def bench_host(n_rigs: int, slots: int, seconds: float = 5.0) -> None:
    """n_rigs × slots charging, each rig's charger polled every slot once a second and one
    BMS + the meter read each second (a station's sampling cycle)."""
    with RigHost() as host:
        t0 = time.perf_counter()
        rigs = [Rig(slots=slots, seed=k, host=host, name=f"r{k}").start() for k in range(n_rigs)]
        start_s = time.perf_counter() - t0
        for r in rigs:
            for s in range(1, slots + 1):
                r.insert(s, capacity_wh=2000, soc=0.3)
        ports = [
            (
                serial.Serial(r.charger_path, 115200, timeout=0.5),
                serial.Serial(r.bus_path, 9600, timeout=0.5),
            )
            for r in rigs
        ]
        stop = threading.Event()
        done = [0]

        def station(ch: serial.Serial, bus: serial.Serial) -> None:
            k = 0
            while not stop.is_set():
                t = time.monotonic()
                for s in range(1, slots + 1):
                    ch.write(format_query(s))
                    ch.readline()
                bus.write(rtu.with_crc(bytes((1, 4, 0, 0x48, 0, 2))))
                bus.read(9)
                bus.write(rtu.with_crc(bytes((11 + k % slots, 3, 0, 0, 0, 14))))
                bus.read(33)
                k += 1
                done[0] += 1
                stop.wait(max(0.0, 1.0 - (time.monotonic() - t)))

        threads = [threading.Thread(target=station, args=p, daemon=True) for p in ports]
        assert host._thread is not None
        nid = host._thread.native_id
        assert nid is not None
        for th in threads:
            th.start()
        time.sleep(1.0)
        c0, w0, d0 = thread_cpu_s(nid), time.monotonic(), done[0]
        time.sleep(seconds)
        c1, w1, d1 = thread_cpu_s(nid), time.monotonic(), done[0]
        stop.set()
        for th in threads:
            th.join()
        for a, b in ports:
            a.close()
            b.close()
        for r in rigs:
            r.stop()
        util = (c1 - c0) / (w1 - w0)
        print(
            f"RigHost {n_rigs} rigs × {slots} slots charging: start {start_s * 1000 / n_rigs:.0f} ms "
            f"per rig; host thread {util * 100:.1f} % of a core "
            f"({util / n_rigs * 100:.2f} % per rig) for {(d1 - d0) / (w1 - w0):.1f} station "
            f"cycles/s ({slots} charger queries + 2 Modbus reads each)"
        )


if __name__ == "__main__":
    bench_physics()
    bench_exchanges()
    bench_host(1, 8)
    bench_host(10, 8)
