# Drives firmware/mqtt_client.py with tls=True and a pinned CA, on MicroPython or CPython,
# for tests/test_firmware_tls.py:
#   micropython tls_client.py '<json options>'   or   micropython tls_client.py @options.json
# (a file: the PyPI unix-port wrapper dies on an argument of 256 characters or more)
# Options: host, port, ca (a DER file), user, password, n (QoS 1 messages to publish on
# `topic`), deadline_ms, backoff_min_ms, backoff_max_ms. Prints JSON lines:
#   {"ev":"cert","msg":..}      on_cert_error (the first refusal of a streak)
#   {"ev":"connect","c":{..}}   every (re)connect
#   {"ev":"done"|"timeout","refs":N,"c":{counters},"err":last_error,"fds0":open descriptors
#    before the client, "fds": after it stopped}
import json
import os
import sys

here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path.insert(0, here + "/../../firmware")

import asyncio  # noqa: E402

import mqtt_client  # noqa: E402
import timebase  # noqa: E402


def out(d):
    print(json.dumps(d))


def fds():
    try:
        return len(os.listdir("/proc/self/fd"))
    except Exception:
        return -1


async def main(o):
    fds0 = fds()
    with open(o["ca"], "rb") as f:
        ca = f.read()
    c = mqtt_client.MQTTClient(
        o.get("host", "127.0.0.1"),
        o["port"],
        o["user"],
        user=o["user"],
        password=o.get("password"),
        keepalive_s=30,
        tls=True,
        ca=ca,
        connect_timeout_ms=3000,
        io_timeout_ms=3000,
        backoff_min_ms=o.get("backoff_min_ms", 100),
        backoff_max_ms=o.get("backoff_max_ms", 300),
    )
    ca = None
    n = o.get("n", 1)
    acked = bytearray(n)

    def on_puback(pid, ref):
        acked[ref] = 1

    c.on_puback = on_puback
    c.on_connect = lambda sp: out({"ev": "connect", "c": c.counters()})
    c.on_cert_error = lambda msg: out({"ev": "cert", "msg": msg})
    runner = asyncio.create_task(c.run())

    async def publish_all():
        for i in range(n):
            await c.publish(o["topic"], b"%06d" % i, 1, False, i)

    pub = asyncio.create_task(publish_all())
    t0 = timebase.ticks_ms()
    while sum(acked) < n and timebase.ticks_diff(timebase.ticks_ms(), t0) < o["deadline_ms"]:
        await timebase.asleep_ms(20)
    pub.cancel()
    await c.disconnect()
    await runner
    out(
        {
            "ev": "done" if sum(acked) == n else "timeout",
            "refs": sum(acked),
            "c": c.counters(),
            "err": c.last_error,
            "fds0": fds0,
            "fds": fds(),
        }
    )


arg = sys.argv[1]
if arg.startswith("@"):
    with open(arg[1:]) as f:
        arg = f.read()
asyncio.run(main(json.loads(arg)))
