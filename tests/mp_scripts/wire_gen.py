# Generates tests/vectors/wire.json ON MICROPYTHON with the firmware's own Wire/sign:
#   .venv/bin/micropython tests/mp_scripts/wire_gen.py tests/vectors/wire.json
# Each vector: the Wire state and call that made it, the object that was signed (without
# "sig") and the exact signed bytes as hex. tests/test_wire_cross.py checks them with
# CPython's hmac and json; tests/fw/test_wire.py re-makes them on both interpreters.
import sys

here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path.insert(0, here + "/../../firmware")

import binascii
import hashlib
import json

import wire

KEY = hashlib.sha256(b"wire.json test key").digest()
SID = "KH-PNH-0001"


def bat(i):
    return {
        "id": "B00123%02d" % i,
        "soc": 500 + i,
        "soh": 981,
        "mv": 67100 + i,
        "ma": 15200 - i,
        "t": 312,
        "tmin": 295,
        "cyc": 412,
        "flt": 0,
        "life_wh": 402113 + i,
    }


def slot(i, with_bat=True):
    s = {
        "n": i,
        "st": "CVFWIE"[i % 6],
        "mv": 67200 + i,
        "ma": 15250 - 100 * i,
        "e_mwh": 987654321 + i,
        "b_mwh": 987000000 + i,
    }
    if with_bat:
        s["bat"] = bat(i)
    return s


ERR = {"mb_to": 3, "mb_crc": 0, "mb_exc": 0, "mb_addr": 0, "ser_cs": 1, "ser_to": 0, "ser_bad": 0}
METER = {"e_wh": 1234567, "p_w": 2150, "sn": 12345678}

# (name, method, ev, body, up, ts, hist)
CALLS = [
    (
        "telemetry_1_slot",
        "telemetry",
        None,
        {"meter": METER, "slots": [slot(1)], "err": ERR},
        5025000,
        1764150000123,
        False,
    ),
    (
        "telemetry_16_slots",
        "telemetry",
        None,
        {"meter": METER, "slots": [slot(i) for i in range(1, 17)], "err": ERR},
        5035000,
        1764150010123,
        False,
    ),
    (
        "telemetry_no_meter_no_bat_no_ts",
        "telemetry",
        None,
        {"slots": [slot(1, False), slot(2, False)], "err": ERR},
        12000,
        None,
        False,
    ),
    (
        "telemetry_hist",
        "telemetry",
        None,
        {"meter": METER, "slots": [slot(3)], "err": ERR},
        5045000,
        1764150020123,
        True,
    ),
    (
        "event_boot",
        "event",
        "boot",
        {"fw": "0.1.0", "reset": "power", "restored": {"1": 987654321, "2": 0, "16": 5}},
        40,
        None,
        False,
    ),
    (
        "event_session_start",
        "event",
        "session_start",
        {"slot": 1, "bat": "B0012345", "e_mwh": 987654321, "soc": 120},
        60000,
        1764150030123,
        False,
    ),
    (
        "event_session_end",
        "event",
        "session_end",
        {
            "slot": 1,
            "bat": "B0012345",
            "e0_mwh": 987654321,
            "e1_mwh": 988654321,
            "soc0": 120,
            "soc1": 1000,
            "up0": 60000,
            "up1": 3660000,
            "t0": 1764150030123,
            "t1": 1764153630123,
            "why": "full",
        },
        3660000,
        1764153630123,
        False,
    ),
    (
        "event_session_end_reboot_unsynced",
        "event",
        "session_end",
        {
            "slot": 2,
            "bat": "B0012346",
            "e0_mwh": 5,
            "e1_mwh": 900,
            "soc0": 300,
            "soc1": 310,
            "up0": 100,
            "up1": 200,
            "why": "reboot",
        },
        300,
        None,
        True,
    ),
    (
        "event_alarm",
        "event",
        "alarm",
        {"code": "slot_stale", "level": "warn", "slot": 4, "msg": "slot 4 unmetered for 12000 ms"},
        3670000,
        1764153640123,
        False,
    ),
    (
        "event_alarm_no_slot_escapes",
        "event",
        "alarm",
        {"code": "cmd_refused", "level": "crit", "msg": 'bad "sig"\\ on cmd\n\ttab \x01 \x7f'},
        3680000,
        1764153650123,
        False,
    ),
    (
        "event_meter_reset",
        "event",
        "meter_reset",
        {"from_wh": 1234567, "to_wh": 0, "sn": 12345679},
        3690000,
        1764153660123,
        False,
    ),
    ("event_outbox_drop", "event", "outbox_drop", {"n": 42}, 3700000, None, True),
    (
        "event_ota",
        "event",
        "ota",
        {"phase": "rolled_back", "from": "0.2.0", "to": "0.1.0", "why": "crash"},
        3710000,
        1764153710123,
        False,
    ),
]


def main(path):
    w = wire.Wire(SID, 1, KEY, 17, seq=1234)
    out = []
    for name, method, ev, body, up, ts, hist in CALLS:
        seq = w.seq
        if method == "telemetry":
            b = w.telemetry(body, up, ts, hist)
        else:
            b = w.event(ev, body, up, ts, hist)
        obj = {"v": 1, "sid": SID, "kid": 1, "boot": 17, "seq": seq, "up": up}
        if ts is not None:
            obj["ts"] = ts
        if hist:
            obj["hist"] = 1
        if ev is not None:
            obj["ev"] = ev
        for k in body:
            obj[k] = body[k]
        assert b == wire.sign(obj, KEY), name
        out.append(
            {
                "name": name,
                "wire": {"sid": SID, "kid": 1, "boot": 17, "seq": seq},
                "call": {
                    "method": method,
                    "ev": ev,
                    "body": body,
                    "up": up,
                    "ts": ts,
                    "hist": hist,
                },
                "object": obj,
                "signed_hex": binascii.hexlify(b).decode(),
                "len": len(b),
            }
        )
    # one vector per line; MicroPython's json.dumps has no indent
    with open(path, "w") as f:
        f.write(
            '{"generator": "tests/mp_scripts/wire_gen.py on %s %s",\n'
            % (sys.implementation.name, ".".join(str(x) for x in sys.implementation.version[:3]))
        )
        f.write(' "key_hex": "%s",\n "vectors": [\n' % binascii.hexlify(KEY).decode())
        f.write(",\n".join("  " + json.dumps(v, separators=(",", ":")) for v in out))
        f.write("\n ]}\n")


main(sys.argv[1])
