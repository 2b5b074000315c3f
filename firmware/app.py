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
OTA = None  # the running ota.Ota (firmware updates), when the station has an uplink


class StartError(Exception):
    pass


def open_serial(spec, parity=None, stop=1, de=None):
    if board.PLATFORM == "unix":
        return board.Serial(spec["uart"], spec["baud"], 8, parity, stop)
    return board.Serial(
        spec["uart"],
        spec["baud"],
        8,
        parity,
        stop,  # type: ignore[call-arg]
        spec.get("tx"),
        spec.get("rx"),
        de,
    )


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
    return station.Station(
        cfg, link, master, store, timebase.Uptime(), FW_VERSION, board.reset_cause()
    )


def print_trace(st):
    import json

    up = st.uptime.ms()
    for ev in st.take_events():
        print(json.dumps({"trace": "event", "boot": st.boot, "up": up, "body": ev}))
    line = {
        "trace": "telemetry",
        "boot": st.boot,
        "up": up,
        "cycles": st.cycles,
        "cycle_us": st.last_cycle_us,
        "body": st.snapshot(),
    }
    u = st.uplink
    if u is not None:
        line["link"] = u.client.counters()
        line["outbox"] = {
            "pending": len(u.outbox),
            "bytes": u.outbox.bytes_used,
            "made": u.made,
            "sent": u.sent,
            "acked": u.acked,
            "lost": u.lost,
        }
        line["link"]["connected"] = u.client.connected
        line["link"]["last_error"] = u.client.last_error
    if OTA is not None:
        line["ota"] = {"phase": OTA.phase, "chunks": OTA.chunks, "trial": OTA.trial}
    line["heap_free"] = gc.mem_free()  # type: ignore[attr-defined]
    line["task_failures"] = st.task_failures
    print(json.dumps(line))


async def trace(st, period_ms):
    """Unix port, STATION_TRACE=1: print the telemetry body and events as JSON lines, so
    rigs and tests can watch a station that has no broker."""
    while True:
        await timebase.asleep_ms(period_ms)
        print_trace(st)


class Clock:
    """Unix ms while synced (NTP, the unix port's host clock, or a `time` command), else None."""

    def __init__(self, uptime):
        self.uptime = uptime
        self.offset = None

    def now_ms(self):
        return None if self.offset is None else self.offset + self.uptime.ms()

    def set_ms(self, unix_ms):
        self.offset = unix_ms - self.uptime.ms()


async def sync_clock(clock, host):
    """NTP at start and every 6 h; a failure leaves the clock as it was (ts stays absent
    until the first success)."""
    while True:
        try:
            board.ntp_sync(host)
            clock.set_ms(board.unix_ms())
            wait = 6 * 3600 * 1000
        except Exception:  # noqa: BLE001  (network errors vary by port)
            wait = 60 * 1000
        await timebase.asleep_ms(wait)


async def watchdog(st, up, period_ms=5000):
    """Feed the hardware watchdog only while sampling, persistence and the link task all
    make progress: a hung task reboots the board instead of sampling nothing forever. The
    link progresses when the drain loop turns, a PUBACK arrives or a (re)connect is tried:
    a drain waiting out a broker outage is not hung (the client retries at least every
    backoff_max_ms, well inside the watchdog's 30 s)."""
    wdt = board.Watchdog(30000) if board.PLATFORM == "esp32" else None  # type: ignore[attr-defined]
    c = up.client
    last = (-1, -1)
    while True:
        await timebase.asleep_ms(period_ms)
        now = (st.cycles, up.beat + c.acked + c.attempts)
        if wdt is not None and now[0] != last[0] and now[1] != last[1] and st.persist_ok:
            wdt.feed()
        last = now


async def supervise(st, name, fn):
    """Run a task forever: a failure (a MemoryError on a fragmented heap, a flash error) is
    counted and raised as an alarm, and the task starts again after a second. The sampling
    loop must never lose its uplink, nor the uplink its sampling, to one bad moment."""
    while True:
        try:
            await fn()
            return
        except Exception as e:  # noqa: BLE001
            st.task_failures += 1
            gc.collect()
            try:
                st.alarm("task_failed", "crit", "%s: %s %s" % (name, type(e).__name__, e))
            except Exception:  # noqa: BLE001
                pass
        await timebase.asleep_ms(1000)


def config_hash(path="config.json"):
    import binascii
    import hashlib

    with open(path, "rb") as f:
        return binascii.hexlify(hashlib.sha256(f.read()).digest()).decode()[:12]


def build_uplink(cfg, st, clock):
    import commands
    import mqtt_client
    import outbox
    import uplink
    import wire

    b = cfg["broker"]
    status = b["prefix"] + "/" + cfg["sid"] + "/status"
    will = ('{"v":1,"sid":"%s","boot":%d,"state":"offline"}' % (cfg["sid"], st.boot)).encode()
    client = mqtt_client.MQTTClient(
        b["host"],
        b["port"],
        cfg["sid"],
        user=b["user"],
        password=b["password"] or None,
        keepalive_s=30,
        will=(status, will, 1, True),
        clean_session=False,
        window=16,
        tls=b["tls"],
        ca=cfg.pop("ca_der", None),  # parsed into the TLS context once, then let go
        connect_timeout_ms=5000,
        backoff_min_ms=250,
        backoff_max_ms=10000,
    )
    return uplink.Uplink(
        cfg,
        st,
        wire.Wire(cfg["sid"], cfg["kid"], cfg["key_bytes"], st.boot),
        outbox.Outbox(".", cfg["outbox"]["max_bytes"]),
        client,
        commands.CommandGate(cfg["sid"], cfg["kid"], cfg["key_bytes"], "."),
        clock,
        config_hash(),
        FW_VERSION,
        on_reboot=board.reboot,
    )


def start_ota(cfg, st, up):
    """Firmware updates (ota.py): the cmd topic's ota messages go to it, and its task asks for
    chunks, stages, and confirms or rolls back a trial."""
    global OTA
    import ota

    OTA = ota.Ota(cfg, st, cfg["key_bytes"], FW_VERSION, reboot=board.reboot, board=board)
    OTA.attach(up)
    return OTA.run


async def run(cfg):
    st = build(cfg)
    st.start()
    tracing = board.PLATFORM == "unix" and os.getenv("STATION_TRACE")
    # STATION_CYCLES=N (unix port): sample N cycles, print a final trace, persist, exit
    cycles = int(os.getenv("STATION_CYCLES") or 0) if board.PLATFORM == "unix" else 0
    tasks = []
    if tracing:
        tasks.append(
            asyncio.create_task(
                trace(st, int(os.getenv("STATION_TRACE_MS") or cfg["telemetry_s"] * 1000))
            )
        )
    if board.PLATFORM != "unix" or not os.getenv("STATION_NO_UPLINK"):
        clock = Clock(st.uptime)
        if cfg["ntp"] is not None:
            tasks.append(asyncio.create_task(sync_clock(clock, cfg["ntp"])))
        if board.PLATFORM == "esp32" and not board.net_up(cfg["net"]):  # type: ignore[attr-defined]
            print("station: network not up yet; the link keeps retrying")
        up = build_uplink(cfg, st, clock)
        st.uplink = up
        ota_task = start_ota(cfg, st, up)
        gc.collect()
        tasks.append(asyncio.create_task(up.client.run()))
        tasks.append(asyncio.create_task(supervise(st, "produce", up.produce)))
        tasks.append(asyncio.create_task(supervise(st, "drain", up.drain)))
        tasks.append(asyncio.create_task(watchdog(st, up)))
        tasks.append(asyncio.create_task(supervise(st, "ota", ota_task)))
    await supervise(st, "sampling", lambda: st.run(cycles or None))
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
        cfg["ca_der"] = config.tls_ca(cfg)
        cfg["broker"]["ca"] = None  # the base64 text is not needed again
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
