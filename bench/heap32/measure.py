# Run on MicroPython (the WebAssembly port under node, 32-bit, through run.mjs; or the unix
# port, 64-bit): the station firmware's heap in use after a full collection, bytecode apart
# from data. bench/bench_heap32.py runs it and prints the table; its docstring says what is
# and is not measured.
#
# Phases, each figure gc.mem_alloc() after a full collection:
#   import   the firmware's runtime modules imported one by one from the folder or ROMFS
#            image the driver put on sys.path (.py, .mpy, or .mpy in place from ROMFS)
#   build    the station as app.py builds it (app.load_config, app.build, app.build_uplink)
#            with in-memory fakes for the charger UART, the Modbus bus and the MQTT socket
#   steady   sampling cycles (telemetry every 10th, as 1 s sampling and telemetry_s 10),
#            every message acknowledged; measured with the outbox and the window empty
#   window   the broker holds its PUBACKs: the client's in-flight window full (16)
#   drain    link down while telemetry fills the outbox to its bound, then link up and the
#            backlog drained oldest first while sampling goes on
import asyncio
import gc
import json
import os
import sys

WASM = sys.platform == "webassembly"
if WASM:
    import heap32  # the driver's JavaScript module: heap() and turn()

SID = "KH-HEAP-0001"
WINDOW = 16  # app.build_uplink's in-flight window
# what a running station imports, in dependency order (config is loaded and unloaded by
# app.load_config; selftest and main are not part of the running station)
MODULES = (
    "timebase",
    "hmac_sha256",
    "wire",
    "persist",
    "energy",
    "modbus",
    "registers",
    "sessions",
    "charger",
    "charger_link",
    "modbus_master",
    "station",
    "outbox",
    "commands",
    "mqtt_codec",
    "mqtt_client",
    "uplink",
    "hal",
    "app",
)


async def heap():
    """Bytes in use after a full collection."""
    if WASM:
        # This port collects only once control is back in JavaScript (its heap grows on
        # demand): the driver collects there and reads gc.mem_alloc() before any Python
        # runs again (run.mjs says why it runs V8's collector first).
        heap32.request()
        while heap32.busy():
            await asyncio.sleep_ms(1)
        return heap32.value()
    gc.collect()
    return gc.mem_alloc()


async def turn():
    """Let the other tasks run (on the wasm port without returning to JavaScript: each
    return there hands Python objects to JavaScript, see run.mjs)."""
    await asyncio.sleep_ms(0)


# ---- fakes: the charger UART and the Modbus bus (as bench/mp/station_cycle.py) ----------


class Answering:
    """Hands the prepared answer to the next readinto(), once."""

    out = None

    def readinto(self, buf):
        o = self.out
        if not o:
            return 0
        n = len(o)
        buf[:n] = o
        self.out = None
        return n


class ChargerStream(Answering):
    """Answers each $Q poll with a charging reply for that slot."""

    def __init__(self, charger):
        self.replies = [None] + [
            charger.reply_line(s, "C", 67200, 15250, 312, 0) for s in range(1, 17)
        ]

    def write(self, data):
        self.out = self.replies[int(bytes(data[3 : data.index(b"*")]))]
        return len(data)


class BusStream(Answering):
    """A meter on unit 1 and a BMS on every unit 11..26, from fixed register images."""

    char_bits = 10

    def __init__(self, modbus):
        self.crc16 = modbus.crc16
        bms = [532, 981, 6710, 1520, 312, 295, 412, 0, 0x4230, 0x3031, 0x3233, 0x3435, 0, 40211]
        self.bms = bytes([3, 28]) + b"".join(bytes((r >> 8, r & 0xFF)) for r in bms)

    def write(self, data):
        unit, fn, addr, count = data[0], data[1], (data[2] << 8) | data[3], (data[4] << 8) | data[5]
        if fn == 3 and addr == 0xFC00:
            body = bytes([unit, 3, 4, 0x01, 0x02, 0x03, 0x04])
        elif fn == 3:
            body = bytes([unit]) + self.bms
        else:  # meter input registers: 1234.5 (0x449A5000) everywhere
            body = bytes([unit, 4, 2 * count]) + bytes((0x44, 0x9A, 0x50, 0x00)) * (count // 2)
        crc = self.crc16(body)
        self.out = body + bytes((crc & 0xFF, crc >> 8))
        return len(data)


class FastClock:
    """ModbusMaster's clock (its `clock` parameter): every reading of it is 1 ms later, so
    the 3.5-character silence before each frame passes at once instead of in real sleeps."""

    def __init__(self):
        self.t = 0

    def ticks_ms(self):
        self.t += 1
        return self.t

    def ticks_diff(self, a, b):
        return a - b

    def ticks_add(self, a, b):
        return a + b

    async def asleep_ms(self, ms):
        pass


# ---- fake: the MQTT socket and a broker behind it ----------------------------------------


class MemLink:
    """One connection as the client sees it (the asyncio stream interface MQTTClient uses):
    write() takes whole packets (the client writes one per call) and hands them to the
    broker; readinto() waits for the broker's bytes; 0 once closed."""

    def __init__(self, broker):
        self.broker = broker
        self.rx = bytearray()
        self.ev = asyncio.Event()
        self.closed = False

    def write(self, pkt):
        if self.closed:
            raise OSError(32)  # EPIPE
        self.broker.packet(self, pkt)

    async def drain(self):
        pass

    async def readinto(self, buf):
        while not self.rx:
            if self.closed:
                return 0
            self.ev.clear()
            await self.ev.wait()
        n = min(len(buf), len(self.rx))
        buf[:n] = self.rx[:n]
        self.rx = self.rx[n:]
        return n

    def push(self, data):
        if not self.closed:
            self.rx.extend(data)
            self.ev.set()

    def close(self):
        self.closed = True
        self.ev.set()

    async def wait_closed(self):
        pass


class MemBroker:
    """Answers CONNECT, SUBSCRIBE and PINGREQ; acknowledges each QoS 1 PUBLISH unless
    `acking` is off (then the packet ids are held until ack_all()). `up` False refuses
    connections (a broker or network outage)."""

    def __init__(self):
        self.up = True
        self.acking = True
        self.link = None
        self.held = []
        self.publishes = 0
        self.last_len = 0  # payload bytes of the last QoS 1 PUBLISH (see steady())

    def connect(self):
        if not self.up:
            raise OSError(111)  # ECONNREFUSED
        self.link = MemLink(self)
        return self.link

    def down(self):
        self.up = False
        self.held = []
        if self.link is not None:
            self.link.close()
            self.link = None

    def ack(self, k):
        """Acknowledge the k oldest held PUBLISHes (a broker slower than the station)."""
        for pid in self.held[:k]:
            self.link.push(b"\x40\x02" + pid)
        self.held = self.held[k:]

    def ack_all(self):
        self.acking = True
        self.ack(len(self.held))

    def packet(self, link, pkt):
        t = pkt[0] & 0xF0
        i = 1
        while pkt[i] & 0x80:
            i += 1
        i += 1  # past the remaining length
        if t == 0x10:  # CONNECT -> CONNACK, no session, accepted
            link.push(b"\x20\x02\x00\x00")
        elif t == 0x30:
            self.publishes += 1
            if pkt[0] & 0x06:
                i += 2 + ((pkt[i] << 8) | pkt[i + 1])
                pid = bytes(pkt[i : i + 2])
                self.last_len = len(pkt) - i - 2
                if self.acking:
                    link.push(b"\x40\x02" + pid)
                else:
                    self.held.append(pid)
        elif t == 0x80:  # SUBSCRIBE (one filter) -> SUBACK granted QoS 1
            link.push(b"\x90\x03" + bytes(pkt[i : i + 2]) + b"\x01")
        elif t == 0xC0:
            link.push(b"\xd0\x00")
        elif t == 0xE0:
            link.close()


def mem_client(mqtt_client, broker):
    """The station's MQTTClient with its socket replaced by a MemLink from `broker`: the
    MicroPython branch of _handshake opens a socket (which the wasm port lacks) and wraps it
    in asyncio.StreamWriter; the rest of it is repeated here unchanged, and every other
    method is the client's own."""

    class MemClient(mqtt_client.MQTTClient):
        async def _handshake(self):
            self._r = self._w = broker.connect()
            self._tasks.append(asyncio.create_task(self._reader()))
            if not await self._send(self._connect_pkt, True):
                raise self._cause or OSError("CONNECT not sent")
            while self._rc < 0 and not self._down:
                await self._ev.wait()
            if self._down:
                raise self._cause or OSError("connection lost before CONNACK")
            self._ev.clear()
            if self._rc:
                raise mqtt_client.MQTTError(self._rc)
            return self._sp

    return MemClient


# ---- the run -------------------------------------------------------------------------------


class Run:
    def __init__(self, st, up):
        self.st = st
        self.up = up
        self.n = 0

    async def cycles(self, k, every=10):
        """k sampling cycles; telemetry after every `every`-th; events as they come (what
        Station.run and Uplink.produce do, on a cycle count instead of the clock)."""
        st = self.st
        up = self.up
        for _ in range(k):
            await st.cycle()
            up.emit_events()
            self.n += 1
            if self.n % every == 0:
                up.emit_telemetry()
            await turn()
            if WASM and self.n % 100 == 0:
                await heap()  # see prime(): keeps the port's bookkeeping within its capacity

    async def until(self, cond, what, limit_ms=30000):
        t = 0
        while not cond():
            if t >= limit_ms:
                raise RuntimeError("timed out waiting for " + what)
            await asyncio.sleep_ms(20)
            t += 20
            if WASM and t % 1000 == 0:
                heap32.jsgc()  # see run.mjs: frees the references of past timer callbacks

    def drained(self):
        up = self.up
        return up.client.connected and not len(up.outbox) and not up.client.inflight()


def _mkdir(path):
    try:
        os.mkdir(path)
    except OSError:
        pass


async def steady(args, code):
    import app
    import charger
    import modbus
    import modbus_master
    import mqtt_client

    n = args["slots"]
    flash = args["flash"]
    _mkdir(flash)
    os.chdir(flash)
    import config

    ex = config.example(SID, "mem:charger", "mem:bus", n)
    with open("config.json", "w") as f:
        f.write(json.dumps(ex))
    ex = config = None
    del sys.modules["config"]
    marks = []  # (step, bytes in use after it)
    t0 = await heap()
    marks.append(("config.json written", t0))

    ch = ChargerStream(charger)
    bus = BusStream(modbus)
    clk = FastClock()
    broker = MemBroker()
    client_cls = mem_client(mqtt_client, broker)
    t1 = await heap()
    fakes = t1 - t0
    marks.append(("fakes (charger, bus, broker, client subclass)", t1))

    cfg = app.load_config()
    marks.append(("app.load_config()", await heap()))

    def open_serial(spec, parity=None, stop=1, de=None):
        return ch if spec is cfg["charger"] else bus

    app.open_serial = open_serial
    st = app.build(cfg, ".")
    b = cfg["bus"]
    # the same master, on the fake clock (the bus answers at once; nothing to wait for)
    st.master = modbus_master.ModbusMaster(bus, b["baud"], b["timeout_ms"], b["retries"], clk)
    marks.append(("app.build(): station, charger link, Modbus master, state store", await heap()))
    st.start()
    mqtt_client.MQTTClient = client_cls
    up = app.build_uplink(cfg, st, app.Clock(st.uptime))
    st.uplink = up
    marks.append(("app.build_uplink(): MQTT client, wire, outbox, command gate", await heap()))
    tasks = [
        asyncio.create_task(up.client.run()),
        asyncio.create_task(app.supervise(st, "drain", up.drain)),
    ]
    r = Run(st, up)
    await r.until(lambda: up.client.connected, "the first connection")
    await r.cycles(50)  # every BMS read once, a few messages sent
    await r.until(r.drained, "the first messages acknowledged")
    start = await heap()
    marks.append(("connected, 50 cycles, all acknowledged", start))

    # steady state, every message acknowledged. The lists of figures are made whole before
    # the first: a list grown by append doubles its capacity (4, 8, 16 ... items), which
    # the figures took for the firmware's growth (issue 15). With each figure, the payload
    # size of the last message sent: the drain task keeps it (its `payload`, and a dead
    # slot of its frame that the collector scans), one message replaced by the next, whose
    # size follows the digits of its numbers (seq, up, e_mwh ...): bench_heap32.py takes
    # that out of the growth.
    total = args["cycles"]
    every = args["sample_every"]
    count = (total + every - 1) // every
    samples = [0] * count
    held = [0] * count
    done = 0
    k = 0
    while done < total:
        await r.cycles(min(every, total - done))
        done = min(done + every, total)
        await r.until(r.drained, "acknowledgements")
        samples[k] = await heap()
        held[k] = broker.last_len
        k += 1
    steady_res = {
        "cycles": total,
        "sample_every": every,
        "samples": samples,
        "first": samples[0],
        "last": samples[-1],
        "max": max(samples),
        "growth": samples[-1] - samples[0],
        "held_len": held,
    }

    # the in-flight window full: the broker holds its PUBACKs
    broker.acking = False
    await r.cycles(WINDOW * 10 + 20)
    if up.client.inflight() != WINDOW:
        raise RuntimeError("window not full: %d in flight" % up.client.inflight())
    wsamples = []
    for _ in range(5):
        await r.cycles(20)
        wsamples.append(await heap())
    window = {
        "inflight": up.client.inflight(),
        "pending": len(up.outbox),
        "samples": wsamples,
        "max": max(wsamples),
    }
    broker.ack_all()
    await r.until(r.drained, "the held window acknowledged")

    # outbox drain: link down while telemetry (one message a cycle) fills the outbox to its
    # bound, then the backlog goes out while sampling goes on
    broker.down()
    await r.until(lambda: not up.client.connected, "the link to drop")
    made0 = up.made
    while not up.outbox.dropped and up.made - made0 < 3000:
        await r.cycles(1, 1)
    backlog = {
        "messages_made": up.made - made0,
        "pending": len(up.outbox),
        "outbox_bytes": up.outbox.bytes_used,
        "record_bytes": up.outbox.bytes_used // max(1, len(up.outbox)),
        "dropped": up.outbox.dropped,
        "link_down": await heap(),
    }
    # the drain, paced by the broker: 4 PUBACKs per sample, 5 sampling cycles between, so
    # the window stays full while the backlog is read from flash behind it
    broker.acking = False
    broker.up = True
    await r.until(lambda: up.client.inflight() == WINDOW, "the reconnection and a full window")
    dsamples = []
    peak_inflight = 0
    while len(up.outbox) > WINDOW:
        broker.ack(4)
        await r.cycles(5)
        await r.until(
            lambda: up.client.inflight() == WINDOW or len(up.outbox) <= WINDOW, "the window"
        )
        peak_inflight = max(peak_inflight, up.client.inflight())
        dsamples.append(await heap())
        if len(dsamples) > 2000:
            raise RuntimeError("the outbox does not drain")
    broker.ack_all()
    await r.until(r.drained, "the backlog acknowledged")
    backlog.update(
        {
            "samples": len(dsamples),
            "draining_max": max(dsamples) if dsamples else None,
            "draining_first": dsamples[0] if dsamples else None,
            "peak_inflight": peak_inflight,
            "after": await heap(),
        }
    )
    c = up.client
    counters = {
        "cycles": r.n,
        "made": up.made,
        "acked": up.acked,
        "lost": up.lost,
        "outbox_dropped": up.outbox.dropped,
        "broker_publishes": broker.publishes,
        "retransmits": c.retransmits,
        "io_errors": c.io_errors,
        "proto_errors": c.proto_errors,
        "internal_errors": c.internal_errors,
        "cb_errors": c.cb_errors,
        "task_failures": st.task_failures,
        "persist_ok": st.persist_ok,
    }
    errors = st.errors()
    for t in tasks:
        t.cancel()
    await asyncio.sleep_ms(10)
    tasks = t = None  # a cancelled task keeps its coroutine, and that its objects
    # What some leaves of it hold: let go of one at a time (only objects no stale slot of
    # a coroutine frame still points at can go: the collector scans those conservatively,
    # so the station, the client and the uplink as a whole cannot be measured this way;
    # their sizes at build time are in `marks`)
    import wire

    c = up.client
    parts = []
    h = await heap()
    end = h
    steps = (
        ("MQTT decoder buffer (max_packet 8192)", lambda: setattr(c._dec, "_buf", None)),
        ("MQTT read buffer", lambda: setattr(c, "_rbuf", None)),
        ("wire's encode buffer (4096)", lambda: setattr(wire, "_mv", None)),
        ("outbox: RAM state and copy buffers", lambda: setattr(up, "outbox", None)),
        ("command gate: nonce ring", lambda: setattr(up, "gate", None)),
        ("charger link", lambda: setattr(st, "link", None)),
        ("Modbus master", lambda: setattr(st, "master", None)),
    )
    for name, drop in steps:
        drop()
        now = await heap()
        parts.append((name, h - now))
        h = now
    return {
        "code": code,
        "fakes": fakes,
        "marks": marks,
        "start": start,
        "steady": steady_res,
        "window": window,
        "drain": backlog,
        "counters": counters,
        "errors": errors,
        "end": end,
        "parts": parts,
    }


async def prime(n):
    """The wasm port's own bookkeeping (JavaScript's references to Python objects, see
    run.mjs) grows by ~14 bytes per task switch between two returns to JavaScript with V8's
    collector, and keeps that capacity. Grow it here, before the baseline, beyond what any
    stretch of the run needs (the run returns to JavaScript every 100 cycles), so that it
    counts in the baseline and not in the firmware's figures."""
    for _ in range(n):
        await asyncio.sleep_ms(0)
    return await heap()


async def main(args):
    """args: mode (label), slots (0: imports only), cycles, sample_every, flash (a folder)."""
    if WASM:
        import socket  # noqa: F401  the driver's empty stand-in: the wasm port has no socket
    primed = await heap()
    base = await prime(args.get("prime", 0)) if WASM else primed
    per = []
    prev = base
    for name in MODULES:
        __import__(name)
        now = await heap()
        per.append((name, now - prev))
        prev = now
    res = {
        "interp": "wasm32" if WASM else "unix64",
        "empty": args.get("empty"),  # the interpreter alone, and asyncio (from the driver)
        "asyncio": args.get("asyncio"),
        "port_bookkeeping": base - primed,  # wasm: what prime() grew
        "version": sys.version,
        "platform": sys.platform,
        "bits": 32 if sys.maxsize < 2**32 else 64,
        "mode": args["mode"],
        "slots": args["slots"],
        "base": base,
        "code": prev,
        "import": prev - base,
        "modules": per,
    }
    if args["slots"]:
        res.update(await steady(args, prev))
    print("HEAP32 " + json.dumps(res))
