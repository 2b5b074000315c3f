# Runs the firmware's wire module on MicroPython for tests/test_wire_cross.py:
#   micropython wire_check.py verify FILE   one line per vector: name, then "ok <object as JSON>"
#                                           or the WireError code
#   micropython wire_check.py encode FILE   FILE holds a JSON list; one line per item: hex of
#                                           wire.encode(item), or "ValueError"
import sys

here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path.insert(0, here + "/../../firmware")

import binascii
import json

import wire


def verify(path):
    with open(path) as f:
        v = json.load(f)
    key = binascii.unhexlify(v["key_hex"])
    for t in v["vectors"]:
        try:
            obj = wire.verify(binascii.unhexlify(t["signed_hex"]), key)
            print(t["name"], "ok", json.dumps(obj))
        except wire.WireError as e:
            print(t["name"], e.code)


def encode(path):
    with open(path) as f:
        items = json.load(f)
    for o in items:
        try:
            print(binascii.hexlify(wire.encode(o)).decode())
        except ValueError:
            print("ValueError")


{"verify": verify, "encode": encode}[sys.argv[1]](sys.argv[2])
