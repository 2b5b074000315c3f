# Signed wire format on MicroPython: time to make (encode + sign) an 8-slot and a 16-slot
# telemetry message, heap allocated per message, and verify time for a command; with
# json.dumps + HMAC as a reference. Also an outbox append+ack round (a tmpfs/disk, not flash)
# and the heap each module keeps once imported.
#   .venv/bin/python bench/bench_wire.py
# builds the firmware as it goes onto a board (tools/fwbuild.py: every module as .mpy) and
# re-runs itself on .venv/bin/micropython -X heapsize=128k: the modules (~32 KB) sit on this
# heap, where the station maps them from ROMFS, and with 100k the nonce ring's save ran out
# of memory. Prints figures; asserts nothing about speed (tests/test_bench_wire.py: it runs).
import sys

if sys.implementation.name != "micropython":
    import pathlib
    import subprocess

    here = pathlib.Path(__file__).resolve()
    sys.path.insert(0, str(here.parent.parent))
    from tools import fwbuild

    build = fwbuild.build()
    print(
        "MicroPython unix port, -X heapsize=128k, modules as .mpy "
        "(a desktop core: an ESP32 at 240 MHz is some 20-50x slower)"
    )
    r = subprocess.run(
        [fwbuild.micropython_bin(), "-X", "heapsize=128k", str(here), str(build)], check=False
    )
    sys.exit(r.returncode)

import gc  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, sys.argv[1])
_kept = []
for _name in ("hmac_sha256", "wire", "persist", "outbox", "commands"):
    gc.collect()
    _a = gc.mem_alloc()
    __import__(_name)
    gc.collect()
    _kept.append("%s %d B" % (_name, gc.mem_alloc() - _a))
print("  heap kept by each import: " + ", ".join(_kept))

import commands  # noqa: E402
import hmac_sha256  # noqa: E402
import outbox  # noqa: E402
import wire  # noqa: E402

KEY = hashlib.sha256(b"bench").digest()


def body(n):
    slots = []
    for i in range(1, n + 1):
        slots.append(
            {
                "n": i,
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
            "mb_to": 3,
            "mb_crc": 0,
            "mb_exc": 0,
            "mb_addr": 0,
            "ser_cs": 1,
            "ser_to": 0,
            "ser_bad": 0,
        },
    }


def measure(label, fn, rounds):
    fn()  # warm up (the shared 4 KB buffer is made on first use)
    gc.collect()
    gc.disable()
    a0 = gc.mem_alloc()
    out = fn()
    alloc = gc.mem_alloc() - a0
    gc.enable()
    gc.collect()
    t0 = time.ticks_us()  # type: ignore[attr-defined]
    for _ in range(rounds):
        fn()
    us = time.ticks_diff(time.ticks_us(), t0) // rounds  # type: ignore[attr-defined]
    size = len(out) if out is not None else 0
    print("  %-44s %6d us  %6d B heap/msg  %5d B" % (label, us, alloc, size))


def main():
    w = wire.Wire("KH-PNH-0001", 1, KEY, 17)
    b8 = body(8)
    b16 = body(16)
    mac = hmac_sha256.Hmac(KEY)
    measure(
        "Wire.telemetry, 8 slots (encode + sign)",
        lambda: w.telemetry(b8, 5025000, 1764150000123),
        200,
    )
    measure("Wire.telemetry, 16 slots", lambda: w.telemetry(b16, 5025000, 1764150000123), 100)
    measure("wire.encode only, 8 slots", lambda: wire.encode(b8), 200)

    def ref():
        s = json.dumps(b8, separators=(",", ":")).encode()
        return s[:-1] + b',"sig":"' + mac.hexdigest(s) + b'"}'

    measure("reference: json.dumps + HMAC, 8 slots", ref, 200)
    data = b"x" * 1900
    measure("HMAC-SHA256 of 1.9 KB", lambda: mac.digest(data), 200)
    root = "/tmp/bench_wire_%d" % time.ticks_ms()  # type: ignore[attr-defined]
    os.mkdir(root)
    g = commands.CommandGate("KH-PNH-0001", 1, KEY, root)
    n = [0]

    def check():
        n[0] += 1
        p = wire.sign(
            {
                "v": 1,
                "sid": "KH-PNH-0001",
                "kid": 1,
                "cmd": "config",
                "telemetry_s": 30,
                "exp": 1764150060000,
                "nonce": "n%d" % n[0],
            },
            KEY,
        )
        return g.check(p, 1764150000000) and p

    measure("sign + CommandGate.check (nonce file write)", check, 50)
    ob = outbox.Outbox(root + "/ob", 262144)
    msg = w.telemetry(b8, 1, 2)

    def round_trip():
        rid = ob.append("t", msg)
        ob.pending(1)
        ob.ack(rid)
        return msg

    measure("Outbox append + pending(1) + ack, 8 slots", round_trip, 200)
    print("  gc.mem_free after: %d B" % gc.mem_free())


main()
