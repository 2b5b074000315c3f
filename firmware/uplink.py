# The station's way out: signs telemetry and events, appends them to the flash outbox
# before anything is sent, drains the outbox oldest first through MQTT QoS 1 (removing a
# message only on its PUBACK), publishes the retained birth, and obeys signed commands.
try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore

import commands
import timebase


class Uplink:
    """Tasks: `produce()` (telemetry every telemetry_s, events as they happen) and
    `drain()` (outbox → broker). `client` is an MQTTClient, `wire` a Wire for this boot,
    `clock` has `now_ms()` (Unix ms or None when unsynced) and `set_ms(unix_ms)`."""

    def __init__(
        self, cfg, st, wire, outbox, client, gate, clock, cfg_hash="", fw="0", on_reboot=None
    ):
        self.cfg = cfg
        self.st = st
        self.wire = wire
        self.outbox = outbox
        self.client = client
        self.gate = gate
        self.clock = clock
        self.telemetry_ms = cfg["telemetry_s"] * 1000
        prefix = cfg["broker"]["prefix"] + "/" + cfg["sid"] + "/"
        self.t_topic = prefix + "telemetry"
        self.e_topic = prefix + "event"
        self.s_topic = prefix + "status"
        self.c_topic = prefix + "cmd"
        self.birth = (
            '{"v":1,"sid":"%s","boot":%d,"state":"online","fw":"%s","cfg":"%s"}'
            % (cfg["sid"], st.boot, fw, cfg_hash)
        ).encode()
        self.on_reboot = on_reboot
        self._more = asyncio.Event()  # set when something was appended
        self.made = 0  # messages signed and appended
        self.sent = 0
        self.acked = 0
        self.lost = 0  # telemetry that did not fit the outbox at all (counted, never silent)
        self.beat = 0  # drain loop progress, for the watchdog
        client.on_puback = self._acked
        client.on_connect = self._connected
        client.on_message = self._message
        client.on_cert_error = self._cert_refused

    # -- making messages ------------------------------------------------------------------
    def _times(self):
        up = self.st.uptime.ms()
        now = self.clock.now_ms()
        if now is not None:
            self.st.ts_offset = now - up
        return up, (None if now is None else now)

    def _append(self, kind, payload):
        if self.outbox.append(kind, payload) is None:
            self.lost += 1
        else:
            self.made += 1
        self._more.set()

    def emit_events(self):
        hist = not self.client.connected
        for ev in self.st.take_events():
            up, ts = self._times()
            name = ev.pop("ev")
            kind = "b" if name == "boot" else "e"
            self._append(kind, self.wire.event(name, ev, up, ts, hist))
        n = self.outbox.take_dropped()
        if n:
            up, ts = self._times()
            self._append("e", self.wire.event("outbox_drop", {"n": n}, up, ts, hist))

    def emit_telemetry(self):
        up, ts = self._times()
        body = self.st.snapshot()
        try:
            payload = self.wire.telemetry(body, up, ts, not self.client.connected)
        except ValueError:
            # over 4096 bytes (16 slots with huge registers): the battery details go first,
            # the registers never
            for s in body["slots"]:
                s.pop("bat", None)
            payload = self.wire.telemetry(body, up, ts, not self.client.connected)
        self._append("t", payload)

    async def produce(self):
        nxt = timebase.ticks_add(timebase.ticks_ms(), self.telemetry_ms)
        while True:
            self.emit_events()
            now = timebase.ticks_ms()
            if timebase.ticks_diff(now, nxt) >= 0:
                self.emit_telemetry()
                nxt = timebase.ticks_add(nxt, self.telemetry_ms)
                if timebase.ticks_diff(now, nxt) >= 0:  # a whole period behind: no burst
                    nxt = timebase.ticks_add(now, self.telemetry_ms)
            await timebase.asleep_ms(200)

    # -- draining ---------------------------------------------------------------------------
    def _topic(self, kind):
        return self.t_topic if kind == "t" else self.e_topic

    async def drain(self):
        """Oldest first. A message once handed to the client is the client's to resend (same
        packet id, same bytes) until its PUBACK; after a reboot every pending message goes
        again and the agent dedups on (sid, boot, seq). Only as many payloads are read from
        flash as the in-flight window has room for."""
        client = self.client
        window = client._window
        last = -1  # highest outbox id handed to the client
        while True:
            self.beat += 1
            room = window - client.inflight()
            batch = self.outbox.pending(room, last) if room > 0 and client.connected else ()
            fresh = 0
            for oid, kind, payload in batch:
                await client.publish(self._topic(kind), payload, 1, False, oid)
                last = oid
                self.sent += 1
                fresh += 1
            batch = None
            if not fresh:
                self._more.clear()
                try:
                    # woken by an append or an ack (a freed slot may uncover more backlog)
                    await asyncio.wait_for(self._more.wait(), 1)
                except asyncio.TimeoutError:
                    pass

    def _acked(self, pid, ref):
        if ref is not None and self.outbox.ack(ref):
            self.acked += 1
        self._more.set()

    def _connected(self, session_present):
        asyncio.create_task(self._birth())

    async def _birth(self):
        await self.client.subscribe(self.c_topic, 1)
        await self.client.publish(self.s_topic, self.birth, 1, True)

    def _cert_refused(self, msg):
        """The broker's certificate failed the check against the pinned CA or host name:
        someone else answers on its address, or the broker's certificate changed. The client
        calls this once per streak of refusals and keeps retrying with its backoff; the
        alarm waits in the outbox with everything else until a broker we trust takes it."""
        self.st.alarm("tls_cert", "crit", msg)

    # -- commands ---------------------------------------------------------------------------
    def _message(self, topic, payload, retain):
        if topic != self.c_topic:
            return
        try:
            cmd = self.gate.check(bytes(payload), self.clock.now_ms())
        except commands.CommandError as e:
            self.st.alarm("cmd_" + e.code, "warn", "command refused: %s" % e)
            return
        name = cmd["cmd"]
        if name == "time":
            self.clock.set_ms(cmd["now_ms"])
            self.st.alarm("clock_set", "warn", "clock set by command")
        elif name == "config":
            self.telemetry_ms = cmd["telemetry_s"] * 1000
            self.st.alarm("config_set", "warn", "telemetry period now %d s" % cmd["telemetry_s"])
        elif name == "reboot":
            self.st.persist_now()  # registers and open sessions first
            if self.on_reboot:
                self.on_reboot()
