# Wires the station together from config.json and the board's HAL, then runs its tasks.
import gc
import os
import sys

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore

import charger_link
import modbus_master
import persist
import station
import timebase
from hal import board

FW_VERSION = "0.1.0"


class StartError(Exception):
    pass


def open_serial(spec, parity=None, stop=1, de=None):
    if board.PLATFORM == "unix":
        return board.Serial(spec["uart"], spec["baud"], 8, parity, stop)
    return board.Serial(spec["uart"], spec["baud"], 8, parity, stop,  # type: ignore[call-arg]
                        spec.get("tx"), spec.get("rx"), de)


def build(cfg, root="."):
    """The station and its drivers, from a validated configuration."""
    ch = cfg["charger"]
    link = charger_link.ChargerLink(open_serial(ch), ch["timeout_ms"])
    master = None
    if cfg["meter"] is not None or cfg["slots"]:
        bus = cfg["bus"]
        stream = open_serial(bus, bus["parity"], bus["stop"], bus.get("de"))
        master = modbus_master.ModbusMaster(stream, bus["baud"], bus["timeout_ms"], bus["retries"])
    store = persist.ABStore(root, "state", 4096)
    return station.Station(cfg, link, master, store, timebase.Uptime(), FW_VERSION, board.reset_cause())


def print_trace(st):
    import json

    up = st.uptime.ms()
    for ev in st.take_events():
        print(json.dumps({"trace": "event", "boot": st.boot, "up": up, "body": ev}))
    print(json.dumps({"trace": "telemetry", "boot": st.boot, "up": up, "cycles": st.cycles,
                      "cycle_us": st.last_cycle_us, "body": st.snapshot()}))


async def trace(st, period_ms):
    """Unix port, STATION_TRACE=1: print the telemetry body and events as JSON lines, so
    rigs and tests can watch a station that has no broker."""
    while True:
        await timebase.asleep_ms(period_ms)
        print_trace(st)


async def run(cfg):
    st = build(cfg)
    st.start()
    tracing = board.PLATFORM == "unix" and os.getenv("STATION_TRACE")
    # STATION_CYCLES=N (unix port): sample N cycles, print a final trace, persist, exit
    cycles = int(os.getenv("STATION_CYCLES") or 0) if board.PLATFORM == "unix" else 0
    t = None
    if tracing:
        t = asyncio.create_task(trace(st, int(os.getenv("STATION_TRACE_MS") or cfg["telemetry_s"] * 1000)))
    await st.run(cycles or None)
    st.persist_now()
    if tracing:
        print_trace(st)


def load_config(path="config.json"):
    """Validate config.json, then unload the validator: its schema tables and `re` are
    needed once, and ~15 KB of heap is worth having back on an ESP32."""
    import config

    try:
        cfg = config.load(path)
        cfg["key_bytes"] = config.key_bytes(cfg)
    except config.ConfigError as e:
        raise StartError(str(e))
    finally:
        del config
        for name in ("config", "re"):
            if name in sys.modules:
                del sys.modules[name]
    gc.collect()
    return cfg


def main():
    cfg = load_config()
    asyncio.run(run(cfg))
    sys.exit(0)
