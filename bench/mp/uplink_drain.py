# Run on MicroPython: fill the flash outbox with N signed 8-slot telemetry messages (made
# while "offline"), then drain them through the station's Uplink and MQTTClient (QoS 1,
# window 16) to a broker on loopback. Prints messages/s and heap figures.
import asyncio
import gc
import sys

import mqtt_client
import outbox
import timebase
import uplink
import wire

N = int(sys.argv[1])
PORT = int(sys.argv[2])
ROOT = sys.argv[3]
ROUND = 500
SID = "KH-BENCH-0001"


class Up:
    def __init__(self):
        self._t0 = timebase.ticks_ms()

    def ms(self):
        return timebase.ticks_diff(timebase.ticks_ms(), self._t0)


class St:
    boot = 1
    uptime = Up()
    ts_offset = None

    def alarm(self, *a):
        pass


class NoClock:
    def now_ms(self):
        return None


def body(i):
    slots = []
    for n in range(1, 9):
        slots.append(
            {
                "n": n,
                "st": "C",
                "mv": 67200,
                "ma": 15250,
                "e_mwh": 987654321 + i,
                "b_mwh": 987000000,
                "bat": {
                    "id": "B0012345",
                    "soc": 532,
                    "soh": 981,
                    "mv": 67100,
                    "ma": 15200,
                    "t": 312,
                    "tmin": 295,
                    "cyc": 412,
                    "flt": 0,
                    "life_wh": 402113,
                },
            }
        )
    return {
        "meter": {"e_wh": 1234567, "p_w": 2150, "sn": 12345678},
        "slots": slots,
        "err": {
            "mb_to": 0,
            "mb_crc": 0,
            "mb_exc": 0,
            "mb_addr": 0,
            "ser_cs": 0,
            "ser_to": 0,
            "ser_bad": 0,
        },
    }


async def main():
    cfg = {"sid": SID, "telemetry_s": 10, "broker": {"prefix": "stations"}}
    w = wire.Wire(SID, 1, bytes(32), 1)
    ob = outbox.Outbox(ROOT, 1024 * 1024)  # 1 MB of flash: ~540 signed 8-slot messages
    # made at start, as in the station: its 8 KB receive buffer is allocated before the
    # heap has seen hours of small allocations
    client = mqtt_client.MQTTClient("127.0.0.1", PORT, SID, user=SID, keepalive_s=30, window=16)
    u = uplink.Uplink(cfg, St(), w, ob, client, None, NoClock())
    asyncio.create_task(client.run())
    while not client.connected:
        await asyncio.sleep_ms(10)
    client.connected = False  # hold the drain while a backlog is made
    size = fill = total_ms = done = 0
    peak = 0
    d = asyncio.create_task(u.drain())
    i = 0
    while done < N:
        batch = min(ROUND, N - done)
        t0 = timebase.ticks_ms()
        for _ in range(batch):
            p = w.telemetry(body(i), i * 10000, None, True)
            size = len(p)
            ob.append("t", p)
            i += 1
        fill += timebase.ticks_diff(timebase.ticks_ms(), t0)
        gc.collect()
        t0 = timebase.ticks_ms()
        client.connected = True
        u._more.set()
        while len(ob) and not d.done():
            await asyncio.sleep_ms(5)
            if client.inflight() >= 12:
                gc.collect()
                a = gc.mem_alloc()
                if a > peak:
                    peak = a
        total_ms += timebase.ticks_diff(timebase.ticks_ms(), t0)
        client.connected = False
        done += batch
        if d.done():
            break
    print(
        "messages",
        done,
        "bytes_each",
        size,
        "rounds_of",
        ROUND,
        "fill_us_each",
        fill * 1000 // max(done, 1),
    )
    print("drain_ms", total_ms, "msgs_per_s", done * 1000 // max(total_ms, 1))
    print("heap_full_window_peak", peak, "acked", u.acked)
    client.connected = True
    d.cancel()
    await client.disconnect()


asyncio.run(main())
