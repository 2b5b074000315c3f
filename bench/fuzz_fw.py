# Fuzz harnesses of the firmware's external parsers, shared by bench/fuzz.py (CPython), its
# MicroPython replay (this file run by the unix port, `replay()` below) and the tests
# (tests/test_fuzz_findings.py, tests/test_fuzz_quick.py): one definition everywhere.
#
# Each harness takes one case as bytes (a few leading bytes choose the parameters, the rest
# is what crosses the wire) and returns normally when the parser handled it: it returned a
# value or raised its documented error type, which the harness catches. Anything else that
# escapes (another exception, or Bad: a check on what the parser returned) is a finding.
#
# MicroPython-compatible: no typing, no f-strings, only what the unix port has.
import sys

if sys.implementation.name != "micropython":  # CPython: the firmware's top-level modules
    import os as _os

    _fw = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "..", "firmware")
    _fw = _os.path.normpath(_fw)
    if _fw not in sys.path:
        sys.path.insert(0, _fw)

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore

import charger  # noqa: E402
import charger_link  # noqa: E402
import commands  # noqa: E402
import config  # noqa: E402
import modbus  # noqa: E402
import modbus_master  # noqa: E402
import mqtt_codec  # noqa: E402
import persist  # noqa: E402
import registers  # noqa: E402
import wire  # noqa: E402

KEY = bytes(range(32))  # the fuzz station's key (a test key, never a real one)
SID = "KH-FUZZ-0001"
KID = 1
NOW_MS = 1764150000000  # 2025-11-26: the clock of every synced case


class Bad(Exception):
    """A parser returned something it must not (a check of the harness failed)."""


def check(cond, what):
    if not cond:
        raise Bad(what)


def _chunks(data, k):
    """data whole (k == 0) or in chunks of k bytes."""
    if k == 0:
        return [data]
    return [data[i : i + k] for i in range(0, len(data), k)]


# ---- charger lines (CONTRACT §3): charger.LineParser ----------------------------------------


def _charger_link(data):
    """One poll of charger_link.ChargerLink (its clock a _Clock, put back after): the
    reading of the polled slot, or None with exactly one error counted."""
    if len(data) < 2:
        return
    slot = 1 + data[0] % 16
    k = 1 + data[1] % 32
    cut = 0 if data[1] & 0x80 else data[1] % 40  # stale bytes before the request
    stream = bytes(data[2:])
    line = _Line(_chunks(stream[:cut], k) if cut else [], _chunks(stream[cut:], k))
    saved = charger_link.timebase
    charger_link.timebase = _Clock()
    try:
        link = charger_link.ChargerLink(line, 200, 2)
        r = asyncio.run(link.poll(slot))
    finally:
        charger_link.timebase = saved
    n = 0
    for v in link.err.values():
        n += v
    if r is None:
        check(n == 1 and link.ok == 0 and link.err[link.last_err] == 1, "counted %r" % link.err)
    else:
        check(isinstance(r, charger.Reply) and r.slot == slot, "poll(%d) gave %r" % (slot, r))
        check(n == 0 and link.ok == 1 and link.last_err is None, "counted %r" % link.err)


def fw_charger(data):
    """data[0]: chunk size (0 whole), or from 0xC0 a poll through ChargerLink (data[0] % 16:
    the slot); the rest: what the UART gives."""
    if not data:
        return
    if data[0] >= 0xC0:
        _charger_link(data)
        return
    p = charger.LineParser()
    for chunk in _chunks(data[1:], data[0] % 40):
        for r in p.feed(chunk):
            if r == charger.CS or r == charger.BAD:
                continue
            check(isinstance(r, charger.Reply), "LineParser gave %r" % (r,))
            check(1 <= r.slot <= 16, "slot %r" % (r.slot,))
            check(r.state in "IWCVFEX" and len(r.state) == 1, "state %r" % (r.state,))
            check(0 <= r.mv <= 200000 and -200000 <= r.ma <= 200000, "mv/ma out of range")
            check(-1000 <= r.t <= 2000 and 0 <= r.fault <= 65535, "t/fault out of range")
            # the reply it stands for parses back to the same reading
            line = charger.reply_line(r.slot, r.state, r.mv, r.ma, r.t, r.fault)
            again = list(charger.LineParser().feed(line))
            check(again == [r], "reply_line(%r) parses as %r" % (r, again))
    p.pending()
    p.reset()


# ---- MQTT (firmware/mqtt_codec.py) ---------------------------------------------------------

_MQTT_TYPES = (mqtt_codec.CONNACK, mqtt_codec.PUBLISH, mqtt_codec.PUBACK, mqtt_codec.SUBACK)


def _mqtt_check(pk, max_packet):
    t = pk.type
    check(t in _MQTT_TYPES or t == mqtt_codec.PINGRESP, "packet type %r" % (t,))
    if t == mqtt_codec.PUBLISH:
        check(isinstance(pk.topic, str) and pk.topic, "empty topic")
        check(pk.qos in (0, 1, 2) and (pk.qos == 0) == (pk.pid == 0), "qos/pid")
        check(len(pk.payload) <= max_packet, "payload over max_packet")
    elif t == mqtt_codec.CONNACK:
        check(0 <= pk.rc <= 5, "CONNACK rc %r" % (pk.rc,))
    elif t != mqtt_codec.PINGRESP:
        check(0 < pk.pid < 65536, "pid %r" % (pk.pid,))


def mqtt_publish_args(data):
    """(topic, payload, qos, retain, dup, pid) for a PUBLISH built from data, or None."""
    if len(data) < 5:
        return None
    tl = data[0] % 48
    flags = data[1]
    pid = (data[2] << 8) | data[3]
    raw = bytes(data[4 : 4 + tl])
    try:
        topic = raw.decode()
    except UnicodeError:
        topic = "stations/" + SID + "/cmd"
    return (topic, bytes(data[4 + tl :]), flags % 3, bool(flags & 4), bool(flags & 8), pid)


def _mqtt_roundtrip(data):
    """The firmware's PUBLISH encoder, then its decoder: the same fields back."""
    args = mqtt_publish_args(data)
    if args is None:
        return
    topic, payload, qos, retain, dup, pid = args
    try:
        pkt = mqtt_codec.publish(topic, payload, qos, retain, dup, pid)
    except ValueError:
        return  # a bad argument: the documented refusal
    if qos and len(data) > 4 and data[4] & 1:
        pid = 1 + (pid * 7 + 3) % 65535
        mqtt_codec.set_pid(pkt, pid)
    d = mqtt_codec.Decoder(max(16, len(pkt)))
    try:
        got = d.feed(pkt)
    except mqtt_codec.ProtocolError as e:
        if "+" in topic or "#" in topic or "\x00" in topic:
            return  # not reached: the encoder refuses these
        raise Bad("decoder refused the encoder's PUBLISH: %s" % e)  # noqa: B904 (MicroPython)
    check(len(got) == 1, "%d packets from one PUBLISH" % len(got))
    p = got[0]
    check(p.type == mqtt_codec.PUBLISH and p.topic == topic, "topic")
    check(p.payload == payload, "payload")
    check(p.qos == qos and p.retain == retain and p.dup == dup, "flags")
    check(p.pid == (pid if qos else 0), "pid")


def frame_ok(pkt):
    """An encoded packet's remaining length is what follows it."""
    rl = 0
    i = 1
    while True:
        b = pkt[i]
        rl |= (b & 0x7F) << (7 * (i - 1))
        i += 1
        if not b & 0x80:
            break
        check(i < 5, "remaining length over 4 bytes")
    check(len(pkt) == i + rl, "remaining length %d, %d bytes follow" % (rl, len(pkt) - i))


def _text(b):
    try:
        return bytes(b).decode()
    except UnicodeError:
        return "x" * len(b)


def mqtt_encoder_args(data):
    """(a short text, a long text, a small int, a 16-bit int, flags) from data."""
    n = data[0] % 32 if data else 0
    short = _text(data[1 : 1 + n])
    rest = bytes(data[1 + n :])
    long = (
        _text(rest[4:]) if len(rest) > 4 and rest[0] & 1 else "y" * (rest[0] * 300 if rest else 0)
    )
    small = (rest[1] % 5) - 1 if len(rest) > 1 else 0
    u16 = ((rest[2] << 9) | rest[3]) - 1000 if len(rest) > 3 else 1
    return short, long, small, u16, rest[0] if rest else 0


def _mqtt_encoders(data):
    """The firmware's encoders with arguments from data: ValueError is their refusal, and
    what they encode is framed right."""
    short, long, small, u16, flags = mqtt_encoder_args(data)
    calls = (
        lambda: mqtt_codec.connect(
            short,
            u16,
            bool(flags & 2),
            long if flags & 4 else None,
            short if flags & 8 else None,
            short if flags & 16 else None,
            long.encode(),
            small,
            bool(flags & 32),
        ),
        lambda: mqtt_codec.subscribe(u16, short, small),
        lambda: mqtt_codec.puback(u16),
        lambda: mqtt_codec.publish(short, long.encode(), small, bool(flags & 2), False, u16),
    )
    for call in calls:
        try:
            pkt = call()
        except ValueError:
            continue
        frame_ok(pkt)


def fw_mqtt(data):
    """data[0]: mode (bit 7: encode/decode round trip; bit 6: the encoders; bits 0-1:
    max_packet); data[1]: chunk size; the rest: the byte stream from the broker."""
    if len(data) < 2:
        return
    mode = data[0]
    if mode & 0x80:
        _mqtt_roundtrip(data[1:])
        return
    if mode & 0x40:
        _mqtt_encoders(data[1:])
        return
    maxp = (16, 64, 512, 8192)[mode & 3]
    d = mqtt_codec.Decoder(maxp)
    try:
        for chunk in _chunks(bytes(data[2:]), data[1] % 40):
            for pk in d.feed(chunk):
                _mqtt_check(pk, maxp)
    except mqtt_codec.ProtocolError:
        try:
            d.feed(b"\xd0\x00")
        except mqtt_codec.ProtocolError:
            pass
        else:
            raise Bad("the decoder took bytes after failing")
        d.reset()
        check(len(d.feed(b"\xd0\x00")) == 1, "no PINGRESP after reset()")


# ---- Modbus RTU replies (firmware/modbus.py) and their registers (registers.py) -------------

_resp = None


def _registers(regs):
    """What the station does with a read's registers (meter floats, the BMS block)."""
    for i in range(len(regs) - 1):
        hi = regs[i]
        lo = regs[i + 1]
        for fn in (registers._energy_wh, registers._power_w):
            try:
                v = fn(hi, lo)
                check(type(v) is int, "register value %r" % (v,))
            except registers.BadReading:
                pass
        for fn in (registers.f32_kwh_to_wh, registers.f32_to_int):
            v = fn(hi, lo)
            check(v is None or type(v) is int, "f32 %r" % (v,))
    if len(regs) == registers.BMS_REGS:
        try:
            registers.check_bms(regs)
        except registers.BadReading:
            pass
        bat = registers.decode_bms(regs)
        check(bat is None or len(bat["id"]) == 8, "bms %r" % (bat,))


def _modbus_requests(data):
    """The request encoders with raw arguments: ValueError is their refusal."""
    buf = bytearray(260)
    unit = data[0] - 4
    fn = data[2] % 8
    addr = ((data[4] << 8) | data[5]) - 8
    count = data[6] - 4
    try:
        n = modbus.pack_read(buf, unit, fn, addr, count)
        check(n == 8 and modbus.crc16(buf[:n]) == 0, "pack_read")
    except ValueError:
        pass
    try:
        n = modbus.pack_write_single(buf, unit, addr, count * 300)
        check(n == 8 and modbus.crc16(buf[:n]) == 0, "pack_write_single")
    except ValueError:
        pass
    try:
        vals = [(data[7] * k) & 0x1FFFF for k in range(max(0, count))]
        n = modbus.pack_write_multiple(buf, unit, addr, vals)
        check(modbus.crc16(buf[:n]) == 0, "pack_write_multiple")
    except ValueError:
        pass


class _Clock:
    """A clock for ModbusMaster that moves 1 ms per reading and never sleeps: a transaction,
    timeouts and retries included, runs in microseconds."""

    def __init__(self):
        self.t = 0

    def ticks_ms(self):
        self.t += 1
        return self.t

    def ticks_diff(self, a, b):
        return a - b

    def ticks_add(self, a, d):
        return a + d

    async def asleep_ms(self, ms):
        self.t += ms


class _Line:
    """The bus: stale bytes before the request, then the rest once it is written."""

    char_bits = 10

    def __init__(self, stale, chunks):
        self.chunks = stale
        self.after = chunks
        self.writes = 0

    def write(self, b):
        self.writes += 1
        if self.writes == 1:
            self.chunks = self.after
        return len(b)

    def readinto(self, buf):
        if not self.chunks:
            return 0
        c = self.chunks.pop(0)
        n = min(len(buf), len(c))
        buf[:n] = c[:n]
        if n < len(c):
            self.chunks.insert(0, c[n:])
        return n


def _modbus_master(data, unit, fn, count, addr):
    """One transaction of modbus_master.ModbusMaster over data: a result, or one ModbusError
    counted exactly once (after the retries)."""
    k = data[3] % 40
    cut = data[7] % 8 if data[7] & 0x40 else 0  # stale bytes before the request
    stream = bytes(data[8:])
    line = _Line(_chunks(stream[:cut], k) if cut else [], _chunks(stream[cut:], k))
    baud = (9600, 19200, 115200)[data[7] % 3]
    m = modbus_master.ModbusMaster(line, baud, 50, (data[7] >> 4) % 3, _Clock())
    if fn == 3:
        call = m.read_holding(unit, addr % (0x10000 - count + 1), count, bool(data[7] & 8))
    elif fn == 4:
        call = m.read_input(unit, addr % (0x10000 - count + 1), count)
    elif fn == 6:
        call = m.write_single(unit, addr, (data[6] << 8) | data[7])
    else:
        call = m.write_multiple(unit, addr % (0x10000 - count + 1), [data[6]] * count)
    try:
        r = asyncio.run(call)
    except modbus.ModbusError as e:
        n = 0
        for v in m.err.values():
            n += v
        quiet = isinstance(e, modbus.Timeout) and fn == 3 and not data[7] & 8
        check(n == (0 if quiet else 1) and m.ok == 0, "counted %r for %r" % (m.err, e))
        return
    check(m.ok == 1, "ok %d" % m.ok)
    for v in m.err.values():
        check(v == 0, "an error counted on success: %r" % (m.err,))
    if fn == 3 or fn == 4:
        check(type(r) is list and len(r) == count, "registers %r" % (r,))
        _registers(r)
    else:
        check(r is None, "write result %r" % (r,))


def fw_modbus(data):
    """data[0]: unit, data[1]: function (bits 0-1; bit 7: the request encoders instead; bit 6:
    through modbus_master.ModbusMaster), data[2]: count, data[3]: chunk size, data[4:8]:
    address and value of a write (data[7] also the master's baud, retries, stale bytes);
    the rest: the bytes on the bus after the request."""
    global _resp
    if len(data) < 8:
        return
    if data[1] & 0x80:
        _modbus_requests(data)
        return
    unit = 1 + data[0] % 247
    fn = (3, 4, 6, 16)[data[1] & 3]
    addr = (data[4] << 8) | data[5]
    echo = None
    if fn == 3 or fn == 4:
        count = 1 + data[2] % 125
    elif fn == 6:
        count = 1
        echo = modbus.write_single_request(unit, addr, (data[6] << 8) | data[7])
    else:
        count = 1 + data[2] % 123
        addr = addr % (0x10000 - count + 1)
        echo = modbus.write_multiple_request(unit, addr, [data[6]] * count)
    if data[1] & 0x40:
        _modbus_master(data, unit, fn, count, addr)
        return
    if _resp is None:
        _resp = modbus.Response()
    resp = _resp  # reused across transactions, as ModbusMaster does
    resp.reset(unit, fn, count, echo)
    r = None
    try:
        for chunk in _chunks(bytes(data[8:]), data[3] % 40):
            r = resp.feed(chunk)
            if r is not None:
                break
    except modbus.ModbusError as e:
        check(e.key in ("mb_crc", "mb_addr", "mb_exc"), "error key %r" % (e.key,))
        return
    if r is None:
        e = resp.expired()
        check(isinstance(e, (modbus.CrcError, modbus.Timeout)), "expired() %r" % (e,))
        return
    if fn == 3 or fn == 4:
        check(type(r) is list and len(r) == count, "registers %r" % (r,))
        for v in r:
            check(type(v) is int and 0 <= v <= 0xFFFF, "register %r" % (v,))
        _registers(r)
    else:
        check(r is True, "write reply %r" % (r,))


# ---- the strict JSON of signed payloads (firmware/wire.py) ----------------------------------


def fw_wire(data):
    """data[0] % 3: 0 decode, 1 verify with the fuzz key, 2 decode then encode back."""
    if not data:
        return
    mode = data[0] % 3
    b = bytes(data[1:])
    try:
        if mode == 1:
            obj = wire.verify(b, KEY)
            check(type(obj) is dict and "sig" not in obj, "verify gave %r" % (obj,))
            return
        obj = wire.decode(b)
    except wire.WireError as e:
        check(e.code in ("unsigned", "bad_sig", "malformed"), "code %r" % (e.code,))
        return
    if mode == 2:
        try:
            again = wire.encode(obj)
        except ValueError:
            return  # non-ASCII text from a \\u escape, over 4096 bytes: refused
        check(wire.decode(again) == obj, "encode/decode round trip")


# ---- station config (firmware/config.py, CONTRACT §9) ---------------------------------------

_CONFIG_PATH = "/tmp/fuzz-config.json"


def set_tmp(root):
    """Where the harnesses that need files keep them (config.json, the nonce ring)."""
    global _CONFIG_PATH, _ROOT, _gate
    _CONFIG_PATH = root + "/config.json"
    _ROOT = root
    _gate = None


def fw_config(data):
    """data: the bytes of config.json, read by config.load as at start."""
    with open(_CONFIG_PATH, "wb") as f:
        f.write(bytes(data))
    try:
        cfg = config.load(_CONFIG_PATH)
    except config.ConfigError as e:
        check(isinstance(e.key, str), "ConfigError key %r" % (e.key,))
        return
    check(len(config.key_bytes(cfg)) == 32, "key_bytes")
    check(1 <= cfg["slots"] <= 16, "slots %r" % (cfg["slots"],))


# ---- signed commands (firmware/commands.py, CONTRACT §5.4) ----------------------------------

_ROOT = "/tmp"
_gate = None


def _fresh_gate():
    global _gate
    if _gate is None:
        _gate = commands.CommandGate(SID, KID, KEY, _ROOT)
    g = _gate  # one gate (file I/O once); its state put back so that every case is alone
    g._ring = []
    g.floor_ms = 0
    g.forgot_ms = -1
    g.lost = False
    return g


def _rm(path):
    try:
        import os

        os.remove(path)
    except OSError:
        pass


def fw_commands(data):
    """data[0]: bit 0 unsynced clock, bits 1-3 the clock's offset in hours, bit 7 the rest is
    the nonce file's content (then a good command is checked against the gate it loads);
    otherwise the rest is a cmd payload."""
    global _gate
    if not data:
        return
    mode = data[0]
    now = None if mode & 1 else NOW_MS + ((mode >> 1) & 7) * 3600000
    if mode & 0x80:
        _gate = None
        base = _ROOT + "/nonce"
        _rm(base + ".a")
        _rm(base + ".b")
        try:
            persist.ABFile(base, 8192).save(bytes(data[1:]))
        except ValueError:
            return  # over the file's size limit: the gate would not read it
        g = commands.CommandGate(SID, KID, KEY, _ROOT)
        check(type(g._ring) is list and len(g._ring) <= commands.RING, "ring")
        cmd = {"v": 1, "sid": SID, "kid": KID, "cmd": "reboot", "exp": NOW_MS + 60000}
        cmd["nonce"] = "fuzz-nonce"
        try:
            g.check(wire.sign(cmd, KEY), NOW_MS)
        except commands.CommandError as e:
            check(e.code in commands.CODES, "code %r" % (e.code,))
        _rm(base + ".a")
        _rm(base + ".b")
        return
    g = _fresh_gate()
    try:
        out = g.check(bytes(data[1:]), now)
    except commands.CommandError as e:
        check(e.code in commands.CODES, "code %r" % (e.code,))
        return
    check(out["cmd"] in commands.COMMANDS, "accepted %r" % (out,))


TARGETS = {
    "fw_charger": fw_charger,
    "fw_mqtt": fw_mqtt,
    "fw_modbus": fw_modbus,
    "fw_wire": fw_wire,
    "fw_config": fw_config,
    "fw_commands": fw_commands,
}


# ---- replay on the MicroPython unix port ---------------------------------------------------


def replay(target, corpus, tmp):
    """Run every case of the corpus file (records: 4-byte big-endian length, then the case)
    through one harness; print a FINDING line per unhandled case (at most 50: its index,
    the exception's type and message) and a DONE line: cases, findings, the slowest case
    in ms."""
    import time

    set_tmp(tmp)
    h = TARGETS[target]
    n = found = slowest = 0
    with open(corpus, "rb") as f:
        while True:
            head = f.read(4)
            if len(head) < 4:
                break
            size = (head[0] << 24) | (head[1] << 16) | (head[2] << 8) | head[3]
            case = f.read(size)
            t0 = time.ticks_ms()  # type: ignore[attr-defined]
            try:
                h(case)
            except Exception as e:  # a finding: report it and go on
                found += 1
                if found <= 50:
                    print("FINDING %d %s %s" % (n, type(e).__name__, str(e)[:200]))
            dt = time.ticks_diff(time.ticks_ms(), t0)  # type: ignore[attr-defined]
            if dt > slowest:
                slowest = dt
            n += 1
            if n % 1000 == 0:
                print("AT %d" % n)
    print("DONE %d %d %d" % (n, found, slowest))
