# Driven by tests/test_outbox_powercut.py on MicroPython and SIGKILLed at random moments:
#   micropython outbox_powercut.py ROOT RUN SEED MAX_BYTES SEG_BYTES
# Prints the pending records it finds at start ("P id kind len sha256"), then "READY", then
# forever: "W run n kind" before an append and "A id" once it returned; "K? id" before an
# ack and "K id" once it returned; "D n" when records were dropped to make room. Payloads are a pure function of (run, n), so the harness
# can check every byte of whatever it finds on the next start.
import sys

here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path.insert(0, here + "/../../firmware")

import binascii
import hashlib

import outbox


def payload(run, n):
    s = (run * 100003 + n) & 0x7FFFFFFF
    s = (s * 1103515245 + 12345) & 0x7FFFFFFF
    ln = 1 + (s >> 8) % 700
    out = bytearray(ln)
    for i in range(ln):
        s = (s * 1103515245 + 12345) & 0x7FFFFFFF
        out[i] = (s >> 16) & 0xFF
    return bytes(out)


def main(root, run, seed, max_bytes, seg_bytes):
    ob = outbox.Outbox(root, max_bytes, seg_bytes=seg_bytes, max_acked=6)
    for rid, kind, p in ob.pending(100000):
        print("P", rid, kind, len(p), binascii.hexlify(hashlib.sha256(p).digest()).decode())
    print("READY")
    s = seed
    n = 0
    while True:
        s = (s * 1103515245 + 12345) & 0x7FFFFFFF
        r = (s >> 8) % 100
        if r < 52:
            kind = "t" if r < 40 else ("e" if r < 49 else "b")
            print("W", run, n, kind)
            rid = ob.append(kind, payload(run, n))
            print("A", rid)
            d = ob.take_dropped()
            if d:
                print("D", d)
            n += 1
        else:
            got = ob.pending(4)
            if got:
                rid = got[(s >> 4) % len(got) if r > 90 else 0][0]  # mostly the oldest
                print("K?", rid)
                ob.ack(rid)
                print("K", rid)


main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
