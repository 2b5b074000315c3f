# Backlog drain for bench/bench_mqtt_drain.py, on MicroPython:
#   micropython -X heapsize=100k mqtt_drain.py '{"port":..,"n":5000,"size":600,"window":16}'
# Publishes n signed-telemetry-sized QoS 1 messages as fast as the window allows, waits for
# every PUBACK, and prints one JSON line: msg/s, heap in use (gc.mem_alloc() after
# gc.collect()) idle-connected and with a full in-flight window.
import gc
import json
import sys

here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path.insert(0, here + "/../../firmware")

import asyncio  # noqa: E402

import mqtt_client  # noqa: E402
import timebase  # noqa: E402

# A telemetry-shaped payload (CONTRACT 5.2) with the seq filled in per message.
_HEAD = b'{"v":1,"sid":"KH-PNH-0001","kid":1,"boot":17,"seq":'
_TAIL = (
    b',"up":5025000,"ts":1764150000123,"meter":{"e_wh":1234567,"p_w":2150,"sn":12345678},'
    b'"slots":[{"n":1,"st":"C","mv":67200,"ma":15250,"e_mwh":987654321,"b_mwh":987000000,'
    b'"bat":{"id":"B0012345","soc":532,"soh":981,"mv":67100,"ma":15200,"t":312,"tmin":295,'
    b'"cyc":412,"flt":0,"life_wh":402113}}],"err":{"mb_to":3,"mb_crc":0,"mb_exc":0,'
    b'"mb_addr":0,"ser_cs":1,"ser_to":0,"ser_bad":0},"sig":"'
)


def payload(seq, size):
    p = _HEAD + str(seq).encode() + _TAIL
    return p + b"0" * (size - len(p) - 2) + b'"}'


async def fill(c, base, k, size):
    for i in range(k):
        await c.publish(
            "stations/KH-PNH-0001/telemetry", payload(base + i, size), 1, False, base + i
        )


async def main(o):
    n = o.get("n", 5000)
    size = o.get("size", 600)
    window = o.get("window", 16)
    gc.collect()
    base = gc.mem_alloc()  # type: ignore[attr-defined]
    c = mqtt_client.MQTTClient(
        "127.0.0.1",
        o["port"],
        "bench-drain",
        user="KH-PNH-0001",
        window=window,
        clean_session=False,
    )
    done = [0]

    def on_puback(pid, ref):
        done[0] += 1

    c.on_puback = on_puback
    runner = asyncio.create_task(c.run())
    while not c.connected:
        await timebase.asleep_ms(10)
    gc.collect()
    idle = gc.mem_alloc()  # type: ignore[attr-defined]
    t0 = timebase.ticks_ms()
    for i in range(n):
        await c.publish("stations/KH-PNH-0001/telemetry", payload(i, size), 1, False, i)
    while done[0] < n and timebase.ticks_diff(timebase.ticks_ms(), t0) < 120000:
        await timebase.asleep_ms(1)
    ms = timebase.ticks_diff(timebase.ticks_ms(), t0)
    # Full window: the bench freezes the broker (SIGSTOP) and says so on stdin; we publish
    # until window messages wait for their PUBACK, then take the heap.
    print(json.dumps({"phase": "drained"}))
    sys.stdin.readline()
    filler = asyncio.create_task(fill(c, n, window + 1, size))
    t1 = timebase.ticks_ms()
    while c.inflight() < window and timebase.ticks_diff(timebase.ticks_ms(), t1) < 10000:
        await timebase.asleep_ms(5)
    gc.collect()
    full = gc.mem_alloc()  # type: ignore[attr-defined]
    inflight = c.inflight()
    print(json.dumps({"phase": "full"}))
    sys.stdin.readline()  # the broker runs again
    while done[0] < n + window + 1 and timebase.ticks_diff(timebase.ticks_ms(), t1) < 60000:
        await timebase.asleep_ms(5)
    await filler
    c0 = c.counters()
    await c.disconnect()
    await runner
    print(
        json.dumps(
            {
                "n": n,
                "acked": done[0],
                "ms": ms,
                "msg_s": n * 1000 // max(ms, 1),
                "heap_modules": base,
                "heap_idle": idle,
                "heap_full_window": full,
                "inflight_at_sample": inflight,
                "window": window,
                "size": len(payload(0, size)),
                "counters": c0,
            }
        )
    )


asyncio.run(main(json.loads(sys.argv[1])))
