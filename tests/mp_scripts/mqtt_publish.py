# Drives firmware/mqtt_client.py on MicroPython for tests/test_mqtt_client_mp.py.
#   micropython mqtt_publish.py '<json options>'
# Connects, publishes n QoS 1 messages (payload "<index 6 digits>|" padded to `size`),
# waits for every PUBACK, prints one JSON line per event on stdout:
#   {"ev":"connect","sp":0|1,"c":{counters}}   on every (re)connect
#   {"ev":"msg","topic":..,"payload":..}        a subscribed message
#   {"ev":"ping","ms":rtt}                      with "ping": true, once connected
#   {"ev":"done","acked":N,"refs":N distinct,"c":{counters}}  then exits 0
#   {"ev":"timeout",...}                        gave up after `deadline_ms`
# With "hold": true it publishes nothing and idles after connecting (will tests).
import json
import sys

here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path.insert(0, here + "/../../firmware")

import asyncio  # noqa: E402

import mqtt_client  # noqa: E402
import timebase  # noqa: E402


def out(d):
    print(json.dumps(d))


async def main(o):
    will = None
    if o.get("will"):
        w = o["will"]
        will = (w[0], w[1].encode(), w[2], w[3])
    tls = False
    if o.get("tls_ca"):  # verify the broker against this CA (DER file)
        import ssl

        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.verify_mode = ssl.CERT_REQUIRED
        with open(o["tls_ca"], "rb") as f:
            tls.load_verify_locations(cadata=f.read())
    c = mqtt_client.MQTTClient(
        o.get("host", "127.0.0.1"),
        o["port"],
        o.get("client_id", "mp-test"),
        user=o.get("user"),
        keepalive_s=o.get("keepalive", 60),
        will=will,
        clean_session=o.get("clean", False),
        window=o.get("window", 16),
        connect_timeout_ms=o.get("connect_timeout_ms", 5000),
        io_timeout_ms=o.get("io_timeout_ms", 5000),
        backoff_min_ms=o.get("backoff_min_ms", 100),
        backoff_max_ms=o.get("backoff_max_ms", 1000),
        tls=tls,
    )
    n = o.get("n", 0)
    acked = [0, 0]  # PUBACKs, distinct refs acked
    seen = bytearray(n)  # a flag per message: bounded, unlike a dict on a 100 KB heap

    def on_puback(pid, ref):
        acked[0] += 1
        if not seen[ref]:
            seen[ref] = 1
            acked[1] += 1

    def on_connect(sp):
        out({"ev": "connect", "sp": 1 if sp else 0, "c": c.counters()})

    def on_message(topic, payload, retain):
        out(
            {"ev": "msg", "topic": topic, "payload": payload.decode(), "retain": 1 if retain else 0}
        )

    c.on_puback = on_puback
    c.on_connect = on_connect
    c.on_message = on_message
    if o.get("sub"):
        await c.subscribe(o["sub"], 1)
    runner = asyncio.create_task(c.run())
    size = o.get("size", 32)
    topic = o.get("topic", "test/mp")
    t0 = timebase.ticks_ms()
    deadline = o.get("deadline_ms", 60000)

    async def publish_all():
        for i in range(n):
            p = b"%06d|" % i
            p += b"x" * (size - len(p))
            await c.publish(topic, p, 1, False, i)
            if o.get("gap_ms"):
                await timebase.asleep_ms(o["gap_ms"])

    if o.get("ping"):
        while not c.connected:
            await timebase.asleep_ms(10)
        out({"ev": "ping", "ms": await c.ping()})
    pub = asyncio.create_task(publish_all())
    while (acked[1] < n or o.get("hold")) and timebase.ticks_diff(
        timebase.ticks_ms(), t0
    ) < deadline:
        await timebase.asleep_ms(20)
    ev = "done" if acked[1] >= n else "timeout"
    pub.cancel()
    await c.disconnect()
    await runner
    out({"ev": ev, "acked": acked[0], "refs": acked[1], "c": c.counters(), "err": c.last_error})


asyncio.run(main(json.loads(sys.argv[1])))
