"""Fuzz every external parser (issue 14 item 8): 100,000 cases per target by default, each
under a time limit; 0 unhandled exceptions and 0 hangs is a pass.

    .venv/bin/python bench/fuzz.py [--cases N] [--target NAME ...] [--seed S] [--mp-cases N]
    make fuzz ARGS="--cases 20000"

Targets (harness: what one case runs; handled: what the parser may raise for bad input)

    agent_verify  agent.wire.parse_topic + verify, then decode_record and the metering
                  input (agent.ledger.inputs.raw_msg) of what it accepted   WireError
    agent_mqtt    agent/sources/mqtt_codec.py Decoder (feed/next), and the firmware's
                  PUBLISH encoder decoded by it (fields must come back)      ProtocolError
    fw_mqtt       firmware/mqtt_codec.py Decoder, and its encoder's PUBLISH decoded back
                                                                              ProtocolError
    fw_modbus     firmware/modbus.py Response (a reply to each request kind, chunked) and
                  registers.py on the registers it returns; the request encoders
                                                   ModbusError, BadReading, ValueError (args)
    rig_modbus    tools/rig/rtu.py: the bus relay's framing of requests and replies
                                                                     (returns only)
    fw_charger    firmware/charger.py LineParser (what ChargerLink feeds it), its replies
                  re-encoded and parsed again                         (returns only)
    rig_charger   tools/rig/lines.py parse_query / parse_reply and the relay's line split
                                                                     (returns only)
    fw_wire       firmware/wire.py decode / verify (the strict JSON of commands and the
                  nonce file), decode then encode back                 WireError
    fw_config     firmware/config.py load of a config.json               ConfigError
    fw_commands   firmware/commands.py CommandGate.check: unsigned garbage and payloads
                  correctly signed with a test key (so the checks behind the signature run),
                  and the gate's loading of a corrupt nonce file        CommandError

The firmware harnesses live in bench/fuzz_fw.py (MicroPython-compatible), the host ones
here; tests/test_fuzz_findings.py and tests/test_fuzz_quick.py import both.

Generation: a seeded `random`-based, structure-aware generator per target (hypothesis is
one to two orders of magnitude too slow for 100,000 cases x 10 targets on 2 cores). Each
generator mixes valid-looking messages with mutated fields (wrong types, huge ints, NaN and
infinities, long and non-ASCII strings, deep nesting, unknown and duplicate keys), byte-level
mutations of valid frames (bit flips, truncation, insertion, splices; signed payloads
signed again after the mutation so the checks behind the signature are reached), and raw
random bytes. A finding is shrunk by a simple delta-debugging pass (deleting chunks while the
same exception at the same place recurs) and written to bench/fuzz_findings/<target>-<hash>.bin.

Every case runs under signal.setitimer: 0.5 s of CPU time by default (ITIMER_PROF, so a
loaded machine cannot fake one) and 5 s of wall-clock time; a case over either is a hang.
The firmware targets are then replayed on the MicroPython unix port: the first --mp-cases
(20,000) cases of each, the very same bytes, through the same harness in one process per
target, counting unhandled exceptions there too. Exit status 1 on any finding or hang.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

import fuzz_fw  # noqa: E402  (puts firmware/ on sys.path)
from fuzz_fw import KEY, KID, NOW_MS, SID, Bad, check  # noqa: E402

from agent import wire as agent_wire  # noqa: E402
from agent.ledger.inputs import raw_msg  # noqa: E402
from agent.sources import mqtt_codec as agent_mqtt_codec  # noqa: E402
from tools.rig import lines as rig_lines  # noqa: E402
from tools.rig import rtu as rig_rtu  # noqa: E402

FINDINGS_DIR = ROOT / "bench" / "fuzz_findings"
PREFIX = "stations"
OTHER_SID = "KH-FUZZ-0002"
KEYS = agent_wire.StaticKeys({(SID, KID): KEY, (SID, 2): None, (OTHER_SID, 1): KEY[::-1]})
RECV_MS = NOW_MS + 5_000
MP_HEAP = "2m"  # the firmware tests' heap (tests/test_fw_micropython.py)
# No input over this reaches a firmware parser on the station (an MQTT packet is at most
# 8 KB, a command 4 KB, config.json is read whole into a ~100 KB heap): the replay skips
# the larger cases (CPython ran them)
MP_MAX_CASE = 32 * 1024

fw_wire = fuzz_fw.wire
fw_mqtt_codec = fuzz_fw.mqtt_codec


# ---- host harnesses ---------------------------------------------------------------------------


def agent_case(topic: str | bytes, payload: bytes) -> bytes:
    t = topic.encode() if isinstance(topic, str) else topic
    return len(t).to_bytes(2, "big") + t + payload


def agent_verify(data: bytes) -> None:
    """data: 2-byte topic length, the topic (UTF-8), the payload; as the agent's _message."""
    if len(data) < 2:
        return
    tl = int.from_bytes(data[:2], "big")
    topic = data[2 : 2 + tl].decode("utf-8", "replace")
    payload = bytes(data[2 + tl :])
    try:
        sid, kind = agent_wire.parse_topic(topic, PREFIX)
        if kind == "status":
            return  # unsigned birth/will: agent/service.py's own few lines
        v = agent_wire.verify(kind, sid, payload, KEYS, recv_ms=RECV_MS)
    except agent_wire.WireError as e:
        check(isinstance(e.reason, agent_wire.Reason), f"reason {e.reason!r}")
        return
    check(v.sid == sid and v.record == payload, "verified fields")
    body = agent_wire.decode_record(v.record)
    check(body == v.body, "decode_record differs from the verified body")
    m = raw_msg(v.sid, v.boot, v.seq, RECV_MS, body)
    check(m.body == v.cleaned.body, "raw_msg cleans differently from verify")
    raw_msg(v.sid, v.boot, v.seq, RECV_MS, v.body, v.cleaned)


def _agent_mqtt_roundtrip(data: bytes) -> None:
    args = fuzz_fw.mqtt_publish_args(data)
    if args is None:
        return
    topic, payload, qos, retain, dup, pid = args
    try:
        pkt = fw_mqtt_codec.publish(topic, payload, qos, retain, dup, pid)
    except ValueError:
        return
    d = agent_mqtt_codec.Decoder()
    d.feed(bytes(pkt))
    try:
        p = d.next()
    except agent_mqtt_codec.ProtocolError as e:
        if qos == 2:
            return  # the agent never subscribes at QoS 2: refused by design
        raise Bad(f"agent decoder refused the firmware's PUBLISH: {e}") from None
    check(isinstance(p, agent_mqtt_codec.Publish), f"got {p!r}")
    assert isinstance(p, agent_mqtt_codec.Publish)
    check(p.topic == topic and p.payload == payload, "topic/payload")
    check((p.qos, p.pid, p.retain, p.dup) == (qos, pid if qos else 0, retain, dup), "flags")
    check(d.next() is None, "more than one packet")


def _agent_mqtt_encoders(data: bytes) -> None:
    short, long, small, u16, flags = fuzz_fw.mqtt_encoder_args(data)
    calls: list[Callable[[], bytes]] = [
        lambda: agent_mqtt_codec.connect(
            short,
            keepalive=u16,
            clean_session=bool(flags & 2),
            user=long if flags & 4 else None,
            password=short if flags & 8 else None,
        ),
        lambda: agent_mqtt_codec.subscribe(u16, [(short, small)] * (1 + flags % 3)),
        lambda: agent_mqtt_codec.puback(u16),
        lambda: agent_mqtt_codec.pubacks([u16, small]),
    ]
    for call in calls:
        try:
            pkt = call()
        except ValueError:
            continue
        if pkt[0] == 0x40 and len(pkt) > 4:  # pubacks: back to back
            for i in range(0, len(pkt), 4):
                fuzz_fw.frame_ok(pkt[i : i + 4])
        else:
            fuzz_fw.frame_ok(pkt)


def agent_mqtt(data: bytes) -> None:
    """data[0]: mode (bit 7 round trip, bit 6 the encoders, bits 0-2 max_packet), data[1]:
    chunk size; the rest the byte stream from the broker."""
    if len(data) < 2:
        return
    mode = data[0]
    if mode & 0x80:
        _agent_mqtt_roundtrip(data[1:])
        return
    if mode & 0x40:
        _agent_mqtt_encoders(data[1:])
        return
    maxp = (16, 64, 512, 8192, agent_mqtt_codec.MAX_PACKET)[(mode & 7) % 5]
    d = agent_mqtt_codec.Decoder(maxp)
    k = data[1] % 40
    stream = bytes(data[2:])
    chunks = [stream] if k == 0 else [stream[i : i + k] for i in range(0, len(stream), k)]
    try:
        for c in chunks:
            d.feed(c)
            while (p := d.next()) is not None:
                if isinstance(p, agent_mqtt_codec.Publish):
                    check(p.qos in (0, 1) and (p.qos == 0) == (p.pid == 0), "qos/pid")
                    check(isinstance(p.topic, str), "topic")
                elif isinstance(p, agent_mqtt_codec.ConnAck):
                    check(0 <= p.rc <= 5, "rc")
                elif isinstance(p, agent_mqtt_codec.PubAck | agent_mqtt_codec.SubAck):
                    check(0 < p.pid < 65536, "pid")
                else:
                    check(isinstance(p, agent_mqtt_codec.PingResp), f"got {p!r}")
        check(d.buffered >= 0, "buffered")
    except agent_mqtt_codec.ProtocolError:
        try:
            d.next()
        except agent_mqtt_codec.ProtocolError:
            pass
        else:
            raise Bad("decoder went on after failing") from None
        d.reset()


def rig_modbus(data: bytes) -> None:
    """The bus relay's framing (tools/rig/line.py BusRelay._next_request) over data, then
    reply framing at every position. At most 1024 bytes: the relay's resynchronisation
    (one byte at a time, a CRC over the rest each time) is quadratic in a burst without
    silence, and the station sends one request of at most 256 bytes per silence."""
    data = data[:1024]
    buf = bytearray(data)
    while buf:
        n = rig_rtu.request_length(buf)
        if n is None:
            break
        if n == rig_rtu.UNKNOWN:
            n = len(buf)
        check(n > 0, f"request length {n}")
        if len(buf) < n:
            break
        if rig_rtu.crc_ok(bytes(buf[:n])):
            del buf[:n]
        else:
            del buf[:1]
    for i in range(min(len(data), 64)):
        n = rig_rtu.reply_length(data[i:])
        check(n is None or n == rig_rtu.UNKNOWN or n > 0, f"reply length {n}")
        if n is not None and n > 0:
            rig_rtu.crc_ok(data[i : i + n])


def rig_charger(data: bytes) -> None:
    """The charger relay's line split (last '$' of each line) and the rig's line parsers."""
    for raw in data.split(b"\n"):
        line = raw + b"\n"
        d = line.rfind(b"$")
        if d > 0:
            line = line[d:]
        slot = rig_lines.parse_query(line)
        check(slot is None or 1 <= slot <= 16, f"slot {slot!r}")
        r = rig_lines.parse_reply(line)
        if r is not None:
            check(rig_lines.parse_reply(rig_lines.format_reply(r)) == r, "reply round trip")


HARNESSES: dict[str, Callable[[bytes], None]] = {
    "agent_verify": agent_verify,
    "agent_mqtt": agent_mqtt,
    "fw_mqtt": fuzz_fw.fw_mqtt,
    "fw_modbus": fuzz_fw.fw_modbus,
    "rig_modbus": rig_modbus,
    "fw_charger": fuzz_fw.fw_charger,
    "rig_charger": rig_charger,
    "fw_wire": fuzz_fw.fw_wire,
    "fw_config": fuzz_fw.fw_config,
    "fw_commands": fuzz_fw.fw_commands,
}
FIRMWARE_TARGETS = tuple(fuzz_fw.TARGETS)


# ---- generators ---------------------------------------------------------------------------

HUGE_INTS = [
    -1,
    0,
    1,
    2**31 - 1,
    2**31,
    2**32,
    2**53 - 1,
    2**53,
    2**63,
    -(2**63),
    2**64,
    10**11 + 1,
    320_000_000_001,
    34 * 10**40,
    -(10**40),
    10**300,
]
ODD_FLOATS = [1.5, -0.0, 1e308, float("nan"), float("inf"), float("-inf"), 1000.0]
ODD_STRS = [
    "",
    "x",
    "é",
    "\u20ac\u00ff",
    "\x00",
    "\ud800",
    "\n",
    "A" * 300,
    "B" * 5000,
    SID,
    SID.lower(),
    SID + "\n",
    "$",
    ',"sig":"',
    "\\",
    '"',
    "1",
    "-",
    "sdm630",
    "host",
]
TOKENS = [
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b'"',
    b"\\",
    b"\\u",
    b"\\ud800",
    b"\\u0000",
    b"null",
    b"true",
    b"1e5",
    b"1.5",
    b"-0",
    b"00",
    b"NaN",
    b"Infinity",
    b"-",
    b" ",
    b"\t",
    b"\r\n",
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
    b"9" * 30,
    b"9" * 4400,
    b"[" * 100,
    b"[" * 5000,
    b'{"a":' * 50,
    b'"sig"',
    b',"sig":"',
    b"$",
    b"*",
    b"*00",
    b"\x80",
]


class Gen:
    """Shared mutation tools over a seeded random.Random."""

    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def raw(self, lo: int = 0, hi: int = 300) -> bytes:
        r = self.r
        n = r.randint(lo, hi)
        if r.random() < 0.3:  # printable-ish
            return bytes(r.choice(b'{}[]",:0123456789-abcdefnulltrue$*CQ\r\n ') for _ in range(n))
        return r.randbytes(n)

    def mutate(self, b: bytes, times: int | None = None) -> bytes:
        r = self.r
        out = bytearray(b)
        for _ in range(times if times is not None else r.choice((1, 1, 1, 2, 3, 5))):
            n = len(out)
            op = r.randrange(9)
            i = r.randrange(n + 1)
            if op == 0 and n:  # bit flip
                i = min(i, n - 1)
                out[i] ^= 1 << r.randrange(8)
            elif op == 1 and n:  # byte to an interesting value
                out[min(i, n - 1)] = r.choice((0, 1, 0x7F, 0x80, 0xFF, 0x24, 0x2A, 0x2C, 0x22))
            elif op == 2:  # insert random bytes
                out[i:i] = r.randbytes(r.randint(1, 8))
            elif op == 3 and n:  # delete a range
                del out[i : i + r.randint(1, 16)]
            elif op == 4 and n:  # duplicate a range
                j = r.randrange(n)
                out[i:i] = out[j : j + r.randint(1, 32)]
            elif op == 5:  # truncate
                del out[i:]
            elif op == 6:  # splice a token
                out[i:i] = r.choice(TOKENS)
            elif op == 7 and n:  # replace a range with a token
                out[i : i + r.randint(1, 6)] = r.choice(TOKENS)
            elif op == 8 and n > 1:  # swap two bytes
                j = r.randrange(n)
                i = min(i, n - 1)
                out[i], out[j] = out[j], out[i]
        return bytes(out)

    def odd_value(self) -> Any:
        r = self.r
        k = r.randrange(8)
        if k < 3:
            return r.choice(HUGE_INTS)
        if k == 3:
            return r.choice(ODD_FLOATS)
        if k == 4:
            return r.choice(ODD_STRS)
        if k == 5:
            return r.choice((None, True, False, [], {}, [1, 2], {"a": 1}))
        if k == 6:
            v: Any = 0
            for _ in range(r.randint(1, 12)):
                v = [v] if r.random() < 0.5 else {"k": v}
            return v
        return r.randint(-(10**6), 10**12)

    def mutate_obj(self, obj: Any, times: int = 1) -> Any:
        """Mutate a JSON value in place at random paths (returns it, or its replacement)."""
        r = self.r
        for _ in range(times):
            path: list[tuple[Any, Any]] = []  # (container, key)
            cur = obj
            while isinstance(cur, dict | list) and cur and r.random() < 0.7:
                k = r.choice(list(cur)) if isinstance(cur, dict) else r.randrange(len(cur))
                path.append((cur, k))
                cur = cur[k]
            if not path:
                if isinstance(obj, dict) and r.random() < 0.5:
                    obj[r.choice(("x", "sig", "ev", "", "v", "\u00e9"))] = self.odd_value()
                    continue
                return obj if r.random() < 0.9 else self.odd_value()
            cont, k = path[-1]
            op = r.randrange(6)
            if op <= 2:
                cont[k] = self.odd_value()
            elif op == 3:
                del cont[k]
            elif op == 4 and isinstance(cont, dict):
                cont[r.choice(("x", "sig", "n", "bat", "meter", "kid", "cmd"))] = cont.pop(k)
            elif op == 4:
                cont.append(cont[k])
            else:
                v = cont[k]
                if isinstance(v, int) and not isinstance(v, bool):
                    cont[k] = v + r.choice((-1, 1, -(10**3), 10**9, 2**32))
                else:
                    cont[k] = self.odd_value()
        return obj

    def dumps(self, obj: Any, sort: bool = False) -> bytes:
        r = self.r
        try:
            s = json.dumps(
                obj,
                separators=(",", ":") if r.random() < 0.95 else (", ", ": "),
                ensure_ascii=r.random() < 0.9,
                allow_nan=True,
                sort_keys=sort,
            )
        except (ValueError, RecursionError):
            s = "{}"
        b = s.encode("utf-8", "surrogatepass")
        if r.random() < 0.05 and b.startswith(b"{"):  # a duplicate key
            b = b"{" + r.choice((b'"v":1,', b'"sid":"X",', b'"kid":2,', b'"seq":0,')) + b[1:]
        if r.random() < 0.03:  # nesting deep in bytes (json.dumps would recurse)
            d = r.choice((5, 9, 64, 1000, 100_000))
            b = b'{"deep":' + b"[" * d + b"]" * d + b"," + b[1:] if b[:1] == b"{" else b
        return b


def sign_bytes(b: bytes, key: bytes = KEY) -> bytes:
    """CONTRACT §5.5 on raw bytes: whatever b is, the verifier cuts at the mark and puts a
    `}` back, so this is what both verifiers compute a good signature over."""
    signed = b[:-1] + b"}"
    mac = hmac.new(key, signed, "sha256").hexdigest().encode()
    return b[:-1] + b',"sig":"' + mac + b'"}'


def _bat(r: random.Random) -> dict[str, Any]:
    return {
        "id": "B%07d" % r.randrange(10**7),
        "soc": r.randint(0, 1000),
        "soh": r.randint(0, 1000),
        "mv": r.randint(0, 84000),
        "ma": r.randint(-20000, 20000),
        "t": r.randint(-100, 600),
        "tmin": r.randint(-100, 600),
        "cyc": r.randint(0, 3000),
        "flt": 0,
        "life_wh": r.randint(0, 10**6),
    }


def telemetry(r: random.Random, sid: str = SID) -> dict[str, Any]:
    up = r.randint(0, 10**9)
    m: dict[str, Any] = {
        "v": 1,
        "sid": sid,
        "kid": KID,
        "boot": r.randint(0, 100),
        "seq": r.randint(0, 10**6),
        "up": up,
        "ts": NOW_MS - r.randint(0, 10**8),
        "meter": {"e_wh": r.randint(0, 10**9), "p_w": r.randint(-5000, 5000), "sn": 12345678},
        "slots": [
            {
                "n": n,
                "st": r.choice("IWCVFEX"),
                "mv": r.randint(0, 84000),
                "ma": r.randint(-20000, 20000),
                "e_mwh": r.randint(0, 10**12),
                "b_mwh": r.randint(0, 10**12),
                **({"bat": _bat(r)} if r.random() < 0.5 else {}),
            }
            for n in range(1, r.randint(1, 4) + 1)
        ],
        "err": {k: r.randint(0, 5) for k in ("mb_to", "mb_crc", "mb_exc", "ser_cs")},
    }
    if r.random() < 0.2:
        del m["ts"]
    if r.random() < 0.1:
        m["hist"] = 1
    return m


def event(r: random.Random, sid: str = SID) -> dict[str, Any]:
    m = telemetry(r, sid)
    for k in ("meter", "slots", "err"):
        m.pop(k, None)
    ev = r.choice(("boot", "session_start", "session_end", "alarm", "meter_reset"))
    ev = r.choice((ev, "outbox_drop", "ota", "nope"))
    m["ev"] = ev
    extra: dict[str, Any] = {
        "boot": {"fw": "1.0", "reset": "power", "restored": {"1": 5, "2": 0}},
        "session_start": {"slot": 1, "bat": "B0000001", "e_mwh": 5, "soc": 100},
        "session_end": {
            "slot": 2,
            "bat": "B0000001",
            "e0_mwh": 5,
            "e1_mwh": 90,
            "soc0": 100,
            "soc1": 900,
            "up0": 1,
            "up1": 2000,
            "boot0": 3,
            "t0": NOW_MS - 10**6,
            "t1": NOW_MS,
            "why": "full",
        },
        "alarm": {"code": "bus", "level": "warn", "slot": 3, "msg": "no meter"},
        "meter_reset": {"from_wh": 10, "to_wh": 0, "sn": 7},
        "outbox_drop": {"n": 4},
        "ota": {"phase": "staged", "from": "1.0", "to": "1.1"},
    }.get(ev, {"x": 1})
    m.update(extra)
    return m


def gen_agent_verify(r: random.Random) -> Iterator[bytes]:
    g = Gen(r)
    while True:
        k = r.random()
        kind = "telemetry" if r.random() < 0.6 else "event"
        sid = SID if r.random() < 0.95 else OTHER_SID
        topic = f"{PREFIX}/{sid}/{kind}"
        if r.random() < 0.05:
            topic = g.mutate(topic.encode()).decode("utf-8", "replace")
        obj = (telemetry if kind == "telemetry" else event)(r, sid)
        if r.random() < 0.03:
            obj["ev" if kind == "telemetry" else "x"] = "boot"
        if k < 0.05:  # raw bytes
            yield agent_case(topic, g.raw(0, 5000 if r.random() < 0.05 else 300))
            continue
        if k < 0.12:  # garbage, signed
            yield agent_case(topic, sign_bytes(g.raw(1, 300)))
            continue
        if k < 0.6:  # fields mutated, then signed
            obj = g.mutate_obj(obj, r.choice((1, 1, 2, 3)))
        b = g.dumps(obj, sort=r.random() < 0.5)
        if k >= 0.6 and k < 0.85:  # byte-mutated, signed again
            b = g.mutate(b)
        if k < 0.93:
            p = sign_bytes(b, KEY if r.random() < 0.97 else KEY[::-1])
        else:  # signed, then the frame mutated (the signature's framing)
            p = g.mutate(sign_bytes(b))
            if r.random() < 0.3:
                p = p + r.choice((b"x", b',"sig":"' + b"0" * 64 + b'"}', b" ", b"\n"))
        yield agent_case(topic, p)


def _mqtt_packets(r: random.Random) -> bytes:
    g = Gen(r)
    out = bytearray()
    for _ in range(r.randint(1, 4)):
        k = r.randrange(6)
        if k == 0:
            out += bytes((0x20, 2, r.choice((0, 1)), r.choice((0, 0, 1, 5, 6))))
        elif k == 1:
            out += bytes((0x40, 2, r.randrange(256), r.randrange(256)))
        elif k == 2:
            codes = bytes(r.choice((0, 1, 2, 0x80, 3)) for _ in range(r.randint(1, 3)))
            out += bytes((0x90, 2 + len(codes), 0, r.randint(0, 3))) + codes
        elif k == 3:
            out += b"\xd0\x00"
        else:
            topic = f"stations/{SID}/cmd".encode()
            if r.random() < 0.1:
                topic = g.mutate(topic)
            qos = r.choice((0, 1, 1, 2))
            payload = r.randbytes(r.randint(0, 200))
            try:
                out += fw_mqtt_codec.publish(
                    topic,
                    payload,
                    min(qos, 2),
                    r.random() < 0.3,
                    qos > 0 and r.random() < 0.2,
                    r.randint(1, 65535) if qos else 0,
                )
            except ValueError:
                out += b"\x30\x00"
    b = bytes(out)
    if r.random() < 0.5:
        b = g.mutate(b)
    if r.random() < 0.05:
        b = bytes((0x30,)) + r.choice((b"\xff\xff\xff\x7f", b"\x80\x80\x80\x80\x01", b"\xff\x7f"))
    return b


def gen_mqtt(r: random.Random) -> Iterator[bytes]:
    g = Gen(r)
    while True:
        k = r.random()
        head = bytes((r.randrange(8), r.randrange(256)))
        if k < 0.05:  # the encoders with odd arguments
            yield bytes((0x40, r.randrange(40))) + r.randbytes(r.randint(0, 60))
        elif k < 0.25:  # encode, then decode
            body = bytes((r.randrange(48), r.randrange(256), r.randrange(256), r.randrange(256)))
            yield (
                bytes((0x80,))
                + body
                + r.randbytes(r.randint(0, 64))
                + r.randbytes(r.randint(0, 300))
            )
        elif k < 0.35:
            yield head + g.raw()
        else:
            yield head + _mqtt_packets(r)


def gen_fw_modbus(r: random.Random) -> Iterator[bytes]:
    g = Gen(r)
    crc = fuzz_fw.modbus.crc16
    while True:
        unit = r.choice((r.randint(0, 255), 1, 11, 12))
        fsel = r.randrange(4)
        fn = (3, 4, 6, 16)[fsel]
        count = r.choice((1, 2, 14, r.randint(1, 125)))
        head = bytearray(
            (
                (unit - 1) % 256,
                fsel,
                (count - 1) % 256,
                r.randrange(256),
                r.randrange(256),
                r.randrange(256),
                r.randrange(256),
                r.randrange(256),
            )
        )
        k = r.random()
        if k < 0.05:
            head[1] |= 0x80  # the request encoders
            yield bytes(head)
            continue
        if r.random() < 0.3:
            head[1] |= 0x40  # the whole transaction, through ModbusMaster
        u = 1 + head[0] % 247
        c = 1 + head[2] % (125 if fn in (3, 4) else 123)
        if fn == 6:
            c = 1
        if k < 0.15:
            yield bytes(head) + g.raw()
            continue
        # a reply: ours, another unit's, an exception, with noise before it
        if r.random() < 0.15:
            frame = bytearray((u if r.random() < 0.8 else r.randrange(256), fn | 0x80))
            frame.append(r.randrange(256))
        elif fn in (3, 4):
            n = c if r.random() < 0.85 else r.randint(1, 125)
            frame = bytearray((u, fn, 2 * n))
            for _ in range(n):
                if r.random() < 0.2:  # float32 edge cases
                    hi = r.choice((0x7F80, 0xFF80, 0x7FC0, 0x8000, 0x4F00, 0x5F80, 0x4B80))
                    frame += bytes((hi >> 8, hi & 0xFF, r.randrange(256), r.randrange(256)))[:2]
                else:
                    frame += r.randbytes(2)
        elif fn == 6:
            frame = bytearray((u, 6)) + bytes(head[4:8])
            if r.random() < 0.2:
                frame[4:6] = r.randbytes(2)
        else:
            addr = ((head[4] << 8) | head[5]) % (0x10000 - c + 1)
            frame = bytearray((u, 16, addr >> 8, addr & 0xFF, 0, c))
        v = crc(frame)
        frame += bytes((v & 0xFF, v >> 8))
        b = bytes(frame)
        if r.random() < 0.3:
            b = r.randbytes(r.randint(1, 20)) + b
        if r.random() < 0.3:
            b = g.mutate(b)
        if r.random() < 0.2:
            b = b + b
        if r.random() < 0.05:
            b = b * r.randint(3, 40)  # past the 256-byte buffer
        yield bytes(head) + b


def gen_rig_modbus(r: random.Random) -> Iterator[bytes]:
    g = Gen(r)
    while True:
        if r.random() < 0.3:
            yield g.raw()
            continue
        out = b""
        for _ in range(r.randint(1, 4)):
            fc = r.choice((1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 15, 16, 17, 23, 0x83, r.randrange(256)))
            body = bytes((r.randint(0, 255), fc)) + r.randbytes(r.choice((2, 4, 5, 9, 11, 40)))
            out += rig_rtu.with_crc(body)
        yield g.mutate(out) if r.random() < 0.5 else out


def _charger_line(r: random.Random) -> bytes:
    if r.random() < 0.2:
        return fuzz_fw.charger.request(r.randint(1, 16))

    def pick(good: int, *bad: int) -> str:  # mostly in range: whole replies get through
        return str(good if r.random() < 0.85 else r.choice(bad))

    fields = [
        "C",
        pick(r.randint(1, 16), 0, 17, -1, 99),
        r.choice("IWCVFEX") if r.random() < 0.95 else r.choice("Zc "),
        pick(r.randint(0, 84000), 200000, 200001, 10**7),
        pick(r.randint(-20000, 20000), -200000, 200001, -(10**6)),
        pick(r.randint(-100, 600), -1000, 2000, -1001, 2001),
        pick(r.choice((0, 17, 65535)), 65536, 10**6),
    ]
    if r.random() < 0.2:
        fields[r.randrange(len(fields))] = r.choice(("", "-0", "007", "1 ", "9" * 30, "x"))
    body = ",".join(fields).encode()
    cs = b"%02X" % fuzz_fw.charger.checksum(body)
    if r.random() < 0.1:
        cs = cs.lower()
    return b"$" + body + b"*" + cs + r.choice((b"\r\n", b"\n", b"\r"))


def gen_charger(r: random.Random) -> Iterator[bytes]:
    g = Gen(r)
    while True:
        if r.random() < 0.1:
            yield bytes((r.randrange(256),)) + g.raw()
            continue
        b = b"".join(_charger_line(r) for _ in range(r.randint(1, 5)))
        if r.random() < 0.4:
            b = g.mutate(b)
        if r.random() < 0.2:  # noise between lines
            b = r.randbytes(r.randint(1, 30)) + b
        if r.random() < 0.05:
            b = b"$C," + b"9" * r.choice((70, 5000)) + b"\r\n"
        if r.random() < 0.25:  # a poll through ChargerLink, mostly of a slot that answers
            slot = r.randint(1, 16)
            m = re.search(rb"\$C,(\d{1,2}),", b)
            if m and r.random() < 0.8 and 1 <= int(m.group(1)) <= 16:
                slot = int(m.group(1))
            yield bytes((0xC0 | (slot - 1), r.randrange(256))) + b
            continue
        yield bytes((r.randrange(0xC0),)) + b


def command(r: random.Random) -> dict[str, Any]:
    name = r.choice(("time", "config", "reboot", "reboot", "nope"))
    exp = NOW_MS + r.choice((60_000, 3_600_000, -5, 10**9))
    m: dict[str, Any] = {"v": 1, "sid": SID, "kid": KID, "cmd": name, "exp": exp}
    m["nonce"] = r.choice((r.randrange(10**12), "n-%d" % r.randrange(10**9), "x" * 41, ""))
    if name == "time":
        m["now_ms"] = exp - r.choice((1, 1000, 10**8))
    elif name == "config":
        m["telemetry_s"] = r.choice((30, 1, 3600, 0, 3601))
    return m


def gen_fw_wire(r: random.Random) -> Iterator[bytes]:
    g = Gen(r)
    while True:
        mode = r.randrange(3)
        k = r.random()
        obj: Any = command(r) if r.random() < 0.5 else telemetry(r)
        if k < 0.1:
            b = g.raw(0, 400)
        else:
            if k < 0.6:
                obj = g.mutate_obj(obj, r.choice((1, 2, 3)))
            b = g.dumps(obj, sort=r.random() < 0.5)
            if k >= 0.6:
                b = g.mutate(b)
        if mode == 1:
            b = sign_bytes(b) if r.random() < 0.9 else g.mutate(sign_bytes(b))
        yield bytes((mode,)) + b


def gen_fw_config(r: random.Random) -> Iterator[bytes]:
    g = Gen(r)
    while True:
        k = r.random()
        cfg: Any = fuzz_fw.config.example(sid=r.choice((SID, "KH-PNH-0001")))
        if r.random() < 0.2:
            cfg["net"] = r.choice(
                (
                    {"kind": "wifi", "ssid": "s", "password": "p"},
                    {"kind": "ppp", "apn": "a"},
                    {"kind": "lan"},
                )
            )
        if k < 0.05:
            yield g.raw()
        elif k < 0.75:
            yield g.dumps(g.mutate_obj(cfg, r.choice((1, 1, 2, 3))))
        else:
            yield g.mutate(g.dumps(cfg))


def gen_fw_commands(r: random.Random) -> Iterator[bytes]:
    g = Gen(r)
    while True:
        mode = r.randrange(128)
        k = r.random()
        if k < 0.05:  # the nonce file's content
            ring = [
                ["%016x" % r.randrange(2**64), NOW_MS + r.randint(-(10**6), 10**8)]
                for _ in range(r.randint(0, 70))
            ]
            d: Any = {"floor": NOW_MS - 10**6, "forgot": -1, "nonces": ring}
            if r.random() < 0.7:
                d = g.mutate_obj(d, r.choice((1, 2)))
            b = fw_wire.encode(d) if r.random() < 0.3 and _encodable(d) else g.dumps(d, True)
            if r.random() < 0.3:
                b = g.mutate(b)
            yield bytes((0x80 | mode,)) + b
            continue
        if k < 0.1:
            yield bytes((mode,)) + g.raw()
            continue
        obj: Any = command(r)
        if k < 0.7:
            obj = g.mutate_obj(obj, r.choice((1, 1, 2)))
        b = g.dumps(obj, sort=r.random() < 0.5)
        if 0.7 <= k < 0.85:
            b = g.mutate(b)
        p = sign_bytes(b, KEY if r.random() < 0.97 else KEY[::-1])
        if r.random() < 0.05:
            p = g.mutate(p)
        yield bytes((mode,)) + p


def _encodable(d: Any) -> bool:
    try:
        fw_wire.encode(d)
    except ValueError:
        return False
    return True


GENERATORS: dict[str, Callable[[random.Random], Iterator[bytes]]] = {
    "agent_verify": gen_agent_verify,
    "agent_mqtt": gen_mqtt,
    "fw_mqtt": gen_mqtt,
    "fw_modbus": gen_fw_modbus,
    "rig_modbus": gen_rig_modbus,
    "fw_charger": gen_charger,
    "rig_charger": lambda r: (c[1:] for c in gen_charger(r)),
    "fw_wire": gen_fw_wire,
    "fw_config": gen_fw_config,
    "fw_commands": gen_fw_commands,
}
TARGETS = tuple(HARNESSES)


def cases(target: str, n: int, seed: int) -> Iterator[bytes]:
    """The first n cases of a target's stream (the same for a seed, whatever runs them)."""
    gen = GENERATORS[target](random.Random(f"{seed}:{target}"))
    for _ in range(n):
        yield next(gen)


# ---- running -------------------------------------------------------------------------------


class Hang(BaseException):
    """A case ran over the per-case time limit (BaseException: no parser's handler eats it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


def signature(e: BaseException) -> str:
    """The exception's type and the innermost frame of project code that raised it."""
    where = "?"
    for fs in traceback.extract_tb(e.__traceback__):
        p = Path(fs.filename)
        if str(ROOT) in str(p) and "fuzz" not in p.name:
            where = f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}:{fs.lineno}"
        elif "fuzz" in p.name and where == "?":
            where = f"{p.name}:{fs.lineno}"
    return f"{type(e).__name__} at {where}"


WALL_FACTOR = 10  # the wall-clock backstop: limit x 10 (a case blocked, not computing)


def run_case(h: Callable[[bytes], None], case: bytes, limit_s: float) -> BaseException | None:
    """Run one case under the time limit: None when handled, else the exception (Hang).
    The limit is CPU time (ITIMER_PROF: what the case itself spends, so that a loaded
    machine cannot make a fast case look like a hang), with a wall-clock backstop of
    WALL_FACTOR x the limit (ITIMER_REAL) for a case that blocks."""
    signal.setitimer(signal.ITIMER_PROF, limit_s)
    signal.setitimer(signal.ITIMER_REAL, limit_s * WALL_FACTOR)
    try:
        h(case)
    except (Hang, Exception) as e:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        return e
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
    return None


class _Timers:
    """The Hang handlers on SIGPROF and SIGALRM while in effect (the old ones put back)."""

    def __enter__(self) -> None:
        self._old = {s: signal.signal(s, _on_alarm) for s in (signal.SIGPROF, signal.SIGALRM)}

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def check_case(target: str, case: bytes, limit_s: float = 2.0) -> BaseException | None:
    """One case through a target's harness under the time limit (tests use this): None when
    handled, else the exception (Hang for a case over the limit)."""
    with _Timers():
        return run_case(HARNESSES[target], case, limit_s)


def minimize(h: Callable[[bytes], None], case: bytes, sig: str, limit_s: float) -> bytes:
    """Delete chunks while the same signature recurs (bounded)."""
    best = case
    chunk = max(1, len(best) // 2)
    budget = 2000
    while budget > 0:
        i = 0
        shrunk = False
        while i < len(best) and budget > 0:
            cand = best[:i] + best[i + chunk :]
            budget -= 1
            e = run_case(h, cand, limit_s)
            if e is not None and not isinstance(e, Hang) and signature(e) == sig:
                best = cand
                shrunk = True
            else:
                i += chunk
        if chunk == 1 and not shrunk:
            break
        chunk = max(1, chunk // 2) if not shrunk else chunk
    return best


@dataclass
class Result:
    target: str
    runtime: str  # "cpython" | "micropython"
    cases: int = 0
    seconds: float = 0.0
    findings: int = 0
    hangs: int = 0
    slowest_ms: float = 0.0
    examples: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # sig -> (case, msg)
    failed: list[int] = field(default_factory=list)  # MicroPython: indices of failed cases
    skipped: int = 0  # MicroPython: cases over MP_MAX_CASE
    note: str = ""


def fuzz_target(
    target: str, n: int, seed: int, limit_s: float, tmp: str, shrink: bool = True
) -> Result:
    fuzz_fw.set_tmp(tmp)
    h = HARNESSES[target]
    res = Result(target, "cpython")
    timers = _Timers()
    timers.__enter__()
    t_start = time.perf_counter()
    t_min = 0.0  # time spent shrinking findings: not counted in cases/s
    try:
        for case in cases(target, n, seed):
            t0 = time.perf_counter()
            e = run_case(h, case, limit_s)
            dt = time.perf_counter() - t0
            res.slowest_ms = max(res.slowest_ms, dt * 1000)
            res.cases += 1
            if e is None:
                continue
            if isinstance(e, Hang):
                res.hangs += 1
                sig = f"hang over {limit_s} s CPU or {limit_s * WALL_FACTOR} s"
            else:
                res.findings += 1
                sig = signature(e)
            if sig not in res.examples and len(res.examples) < 20:
                t1 = time.perf_counter()
                small = case
                if shrink and not isinstance(e, Hang):
                    small = minimize(h, case, sig, limit_s)
                res.examples[sig] = (small, f"{type(e).__name__}: {e}"[:300])
                t_min += time.perf_counter() - t1
    finally:
        timers.__exit__()
    res.seconds = time.perf_counter() - t_start - t_min  # generation and harness
    return res


def mp_replay(target: str, corpus: list[bytes] | Iterator[bytes], tmp: str, fw: Path) -> Result:
    """Cases through the target's harness (bench/fuzz_fw.py) on the MicroPython unix port,
    in one process, against the firmware as bytecode (`fw`: tools/fwbuild.build()), as on
    the board. Result.failed: the indices of the cases that raised (the first 50)."""
    from tools import fwbuild

    res = Result(target, "micropython")
    path = Path(tmp) / f"{target}.corpus"
    every = list(corpus)
    kept = [c for c in every if len(c) <= MP_MAX_CASE]
    res.skipped = len(every) - len(kept)
    with path.open("wb") as f:
        for c in kept:
            f.write(len(c).to_bytes(4, "big") + c)
    work = Path(tmp) / f"mp-{target}"
    work.mkdir(exist_ok=True)
    script = f"import fuzz_fw; fuzz_fw.replay({target!r}, {str(path)!r}, {str(work)!r})"
    t0 = time.perf_counter()
    try:
        out = subprocess.run(
            [fwbuild.micropython_bin(), "-X", f"heapsize={MP_HEAP}", "-c", script],
            capture_output=True,
            text=True,
            timeout=900,
            env={"MICROPYPATH": f"{ROOT / 'bench'}:{fw}:.frozen"},
        )
        stdout, rc, err = out.stdout, out.returncode, out.stderr
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        rc, err = -1, "timeout"
    res.seconds = time.perf_counter() - t0
    at = 0
    for line in stdout.splitlines():
        if line.startswith("FINDING "):
            _, i, typ, *msg = line.split(" ", 3)
            res.failed.append(int(i))
            res.examples.setdefault(f"{typ} (micropython)", (kept[int(i)], " ".join(msg)))
        elif line.startswith("AT "):
            at = int(line.split()[1])
        elif line.startswith("DONE "):
            _, c, fnd, slow = line.split()
            res.cases, res.findings, res.slowest_ms = int(c), int(fnd), float(slow)
    if rc != 0 or not stdout.rstrip().splitlines()[-1:] or "DONE" not in stdout:
        # the interpreter itself died or hung: that is a finding (or a hang) too
        res.hangs += 1 if err == "timeout" else 0
        res.findings += 0 if err == "timeout" else 1
        res.cases = max(res.cases, at)
        tail = (err.strip() or stdout.strip())[-300:]
        res.note = f"micropython exit {rc} after ~{at} cases: {tail}"
    return res


def _task(kind: str, target: str, n: int, seed: int, limit_s: float, fw: Path | None) -> Result:
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as tmp:
        if kind == "cpython" or fw is None:
            return fuzz_target(target, n, seed, limit_s, tmp)
        return mp_replay(target, cases(target, n, seed), tmp, fw)


def write_findings(results: list[Result]) -> list[Path]:
    paths = []
    for res in results:
        for sig, (case, msg) in res.examples.items():
            FINDINGS_DIR.mkdir(parents=True, exist_ok=True)
            tag = res.target if res.runtime == "cpython" else f"mp_{res.target}"
            p = FINDINGS_DIR / f"{tag}-{hashlib.sha256(case).hexdigest()[:12]}.bin"
            p.write_bytes(case)
            p.with_suffix(".txt").write_text(f"{sig}\n{msg}\n")
            paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=100_000, help="cases per target")
    ap.add_argument("--target", action="append", choices=TARGETS, help="repeatable")
    ap.add_argument("--seed", type=int, default=None, help="default: random, printed")
    ap.add_argument("--mp-cases", type=int, default=20_000, help="0: no MicroPython replay")
    ap.add_argument("--limit", type=float, default=0.5, help="per-case CPU time limit, s")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else random.randrange(2**32)
    targets = a.target or list(TARGETS)
    print(
        f"fuzz: seed {seed}, {a.cases} cases per target, limit {a.limit} s CPU "
        f"({a.limit * WALL_FACTOR} s wall) per case"
    )
    tasks = [("cpython", t, a.cases) for t in targets]
    if a.mp_cases:
        tasks += [("micropython", t, min(a.mp_cases, a.cases)) for t in targets]
        tasks = [t for t in tasks if t[0] == "cpython" or t[1] in FIRMWARE_TARGETS]
    fw = None
    if any(kind == "micropython" for kind, _t, _n in tasks):
        from tools import fwbuild

        fw = fwbuild.build()  # once, before the workers (they would race to build it)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        futs = [ex.submit(_task, kind, t, n, seed, a.limit, fw) for kind, t, n in tasks]
        results = [f.result() for f in futs]
    wall = time.perf_counter() - t0
    head = f"{'target':<14} {'runtime':<11} {'cases':>8} {'cases/s':>8} {'findings':>8} "
    print(head + f"{'hangs':>5} {'slowest':>9}")
    for r in results:
        rate = r.cases / r.seconds if r.seconds else 0.0
        print(
            f"{r.target:<14} {r.runtime:<11} {r.cases:>8} {rate:>8.0f} {r.findings:>8} "
            f"{r.hangs:>5} {r.slowest_ms:>7.1f}ms"
        )
        for sig, (_case, msg) in r.examples.items():
            print(f"    {sig}: {msg[:160]}")
        if r.skipped:
            print(f"    {r.skipped} cases over {MP_MAX_CASE} bytes not replayed")
        if r.note:
            print(f"    {r.note}")
    print(f"wall {wall:.0f} s")
    bad = [r for r in results if r.findings or r.hangs]
    if bad:
        for p in write_findings(results):
            print(f"finding: {p.relative_to(ROOT)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
