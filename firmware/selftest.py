# On-board commissioning self-test. The flashing tool (tools/flash) runs it through the raw
# REPL after a restart, before the station's key is registered at the agent:
#     import selftest; selftest.main()
# It checks, with the station's own config.json and drivers:
#   config   the firmware's validator accepts config.json
#   charger  every configured slot answers a status request (state X = no such channel fails)
#   bms      every slot the charger reports a battery in has a BMS that answers (an empty
#            slot's BMS does not answer: that is normal, CONTRACT §4.2)
#   meter    the grid meter answers its serial number and energy (when one is configured)
#   net      the network link comes up (ESP32; the unix port uses the host's)
#   broker   the broker accepts the station's user and password (CONNACK 0) and lets it
#            subscribe to its own command topic (Mosquitto 2.0 grants even a subscription its
#            ACL forbids and then delivers nothing: only a refusal, 0x80, is conclusive)
#   clock    NTP answers when configured; the board's clock in Unix ms is reported
#   storage  the flash has room for the outbox
# and prints one line `SELFTEST {json}` (ASCII, compact). Each check is bounded in time.
# Also runs as a script on the unix port: `cd FLASHDIR && micropython selftest.mpy`.
import gc
import json
import os
import socket
import sys

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore

import timebase
from hal import board

MARK = "SELFTEST "
VERSION = 1
_EMPTY = "I"  # charger state: no battery in the slot
_NO_CHANNEL = "X"  # charger state: no such channel on this controller
_MIN_UNIX_MS = 1704067200000  # 2024-01-01: a clock before this has never been set
_MQTT_TIMEOUT_S = 5


def _result(ok, detail, **extra):
    r = {"ok": ok, "detail": detail}
    for k in extra:
        r[k] = extra[k]
    return r


def _open_serial(spec, parity=None, stop=1, de=None):
    if board.PLATFORM == "unix":
        return board.Serial(spec["uart"], spec["baud"], 8, parity, stop)
    return board.Serial(
        spec["uart"],
        spec["baud"],
        8,
        parity,
        stop,  # type: ignore[call-arg]
        spec.get("tx"),
        spec.get("rx"),
        de,
    )


def _close(stream):
    if stream is not None:
        try:
            stream.close()
        except Exception:  # noqa: BLE001
            pass


async def check_charger(cfg, tries=2):
    """-> (result, {slot: state letter or None})"""
    import charger_link

    ch = cfg["charger"]
    stream = None
    states = {}  # type: dict
    try:
        stream = _open_serial(ch)
        link = charger_link.ChargerLink(stream, ch["timeout_ms"])
        slots = {}
        bad = []
        for n in range(1, cfg["slots"] + 1):
            r = None
            for _ in range(tries):
                r = await link.poll(n)
                if r is not None:
                    break
            if r is None:
                slots[str(n)] = link.last_err
                states[n] = None
                bad.append("slot %d: %s" % (n, link.last_err))
            else:
                slots[str(n)] = r.state
                states[n] = r.state
                if r.state == _NO_CHANNEL:
                    bad.append("slot %d: no such channel on the controller" % n)
        if bad:
            return _result(False, "; ".join(bad), slots=slots), states
        return _result(True, "%d slot(s) answer" % cfg["slots"], slots=slots), states
    except Exception as e:  # noqa: BLE001  (a missing UART, a device path that is absent)
        return _result(False, "cannot use the charger link: %s %s" % (type(e).__name__, e)), states
    finally:
        _close(stream)


async def check_bus(cfg, states):
    """-> (bms result, meter result): the meter and each battery the charger reports."""
    import modbus_master
    import registers

    bus = cfg["bus"]
    stream = None
    try:
        stream = _open_serial(bus, bus["parity"], bus["stop"], bus.get("de"))
        master = modbus_master.ModbusMaster(stream, bus["baud"], bus["timeout_ms"], bus["retries"])
    except Exception as e:  # noqa: BLE001
        _close(stream)
        why = "cannot use the bus: %s %s" % (type(e).__name__, e)
        return _result(False, why), _result(cfg["meter"] is None, why)
    try:
        meter = cfg["meter"]
        if meter is None:
            mres = _result(True, "no meter configured")
        else:
            try:
                sn = await registers.read_meter_sn(master, meter["unit"])
                m = await registers.read_meter(master, meter["unit"], meter["model"])
                mres = _result(True, "meter %d answers" % sn, sn=sn, e_wh=m["e_wh"], p_w=m["p_w"])
            except Exception as e:  # noqa: BLE001  (ModbusError subclasses, a bad float)
                mres = _result(False, "meter unit %d: %s %s" % (meter["unit"], type(e).__name__, e))
        base = cfg["bms"]["unit_base"]
        slots = {}
        bad = []
        for n in range(1, cfg["slots"] + 1):
            st = states.get(n)
            present = st is not None and st != _EMPTY and st != _NO_CHANNEL
            try:
                bat = await registers.read_bms(master, base + n, present)
                slots[str(n)] = bat["id"]
            except Exception as e:  # noqa: BLE001
                if present:
                    slots[str(n)] = type(e).__name__
                    bad.append("slot %d (unit %d): %s" % (n, base + n, type(e).__name__))
                else:
                    slots[str(n)] = "empty" if st == _EMPTY else "no reply"
        if bad:
            bres = _result(
                False, "battery present, BMS silent or bad: " + "; ".join(bad), slots=slots
            )
        else:
            bres = _result(True, "every battery present answers", slots=slots)
        return bres, mres
    finally:
        _close(stream)


def check_net(cfg):
    net = cfg["net"]
    if net["kind"] == "host" or not hasattr(board, "net_up"):
        return _result(True, "host network")
    try:
        up = board.net_up(net)  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001
        return _result(False, "%s link: %s %s" % (net["kind"], type(e).__name__, e))
    return _result(up, "%s link %s" % (net["kind"], "up" if up else "not up within 20 s"))


def _recv_packet(s, dec):
    while True:
        data = s.recv(64)
        if not data:
            raise OSError("connection closed by the broker")
        got = dec.feed(data)
        if got:
            return got[0]


def check_broker(cfg):
    """CONNECT with the station's user and password (a client id of its own, clean session:
    the station's persistent session is left alone), then SUBSCRIBE to its command topic."""
    import mqtt_codec

    b = cfg["broker"]
    where = "%s:%d" % (b["host"], b["port"])
    s = None
    try:
        ai = socket.getaddrinfo(b["host"], b["port"], 0, socket.SOCK_STREAM)[0]
        s = socket.socket(ai[0], ai[1], ai[2])
        s.settimeout(_MQTT_TIMEOUT_S)
        s.connect(ai[-1])
        if b["tls"]:
            import ssl

            import config

            # as the station's client does: the broker's certificate must chain to the
            # pinned CA and name the host (a refusal is a ValueError saying why)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.verify_mode = ssl.CERT_REQUIRED  # type: ignore[attr-defined]
            ctx.load_verify_locations(cadata=config.tls_ca(cfg))
            s = ctx.wrap_socket(s, server_hostname=b["host"])
        _send(
            s,
            mqtt_codec.connect(
                cfg["sid"] + "-selftest", 30, True, b["user"], b["password"] or None
            ),
        )
        dec = mqtt_codec.Decoder(512)
        p = _recv_packet(s, dec)
        if p.type != mqtt_codec.CONNACK:
            return _result(False, "%s: no CONNACK (packet type %d)" % (where, p.type))
        if p.rc:
            why = {4: "bad user name or password", 5: "not authorised"}.get(p.rc, "refused")
            return _result(
                False, "%s refused the station: %s (CONNACK %d)" % (where, why, p.rc), rc=p.rc
            )
        topic = b["prefix"] + "/" + cfg["sid"] + "/cmd"
        _send(s, mqtt_codec.subscribe(1, topic, 1))
        p = _recv_packet(s, dec)
        code = p.codes[0] if p.type == mqtt_codec.SUBACK and p.codes else -1
        _send(s, mqtt_codec.disconnect())
        if code == 0x80 or code < 0:
            return _result(
                False, "%s: subscribing to %s refused (ACL)" % (where, topic), rc=0, sub=code
            )
        return _result(True, "%s accepts %s" % (where, b["user"]), rc=0, sub=code)
    except Exception as e:  # noqa: BLE001  (DNS, refused, timeout, TLS)
        return _result(False, "%s: %s %s" % (where, type(e).__name__, e))
    finally:
        if s is not None:
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass


def _send(s, data):
    if hasattr(s, "write"):
        s.write(data)
    else:  # CPython sockets
        s.sendall(data)


def check_clock(cfg):
    host = cfg["ntp"]
    synced = False
    why = "no ntp configured: the station takes its time from `time` commands"
    if host is not None:
        try:
            board.ntp_sync(host)
            synced = True
            why = "ntp %s answers" % host
        except Exception as e:  # noqa: BLE001
            return _result(
                False,
                "ntp %s: %s %s" % (host, type(e).__name__, e),
                ms=board.unix_ms(),
                synced=False,
            )
    ms = board.unix_ms()
    if synced and ms < _MIN_UNIX_MS:
        return _result(False, "clock still before 2024 after ntp", ms=ms, synced=True)
    return _result(True, why, ms=ms, synced=synced)


def check_storage(cfg):
    need = cfg["outbox"]["max_bytes"] + 16384  # the outbox plus counters and nonces
    try:
        st = os.statvfs(board.flash_root())  # type: ignore[attr-defined]
        free = st[0] * st[3]
    except Exception:  # noqa: BLE001  (a port without statvfs)
        return _result(True, "free space unknown")
    if free < need:
        return _result(False, "%d bytes free, the outbox needs %d" % (free, need), free=free)
    return _result(True, "%d bytes free" % free, free=free)


async def run(path="config.json"):
    """All checks -> {"v", "ok", "checks": {name: {"ok", "detail", ...}}, "heap_free"}."""
    import config

    checks = {}
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        checks["config"] = _result(False, str(e))
        return {"v": VERSION, "ok": False, "checks": checks}
    checks["config"] = _result(
        True, "%s kid %d boot_base %d" % (cfg["sid"], cfg["kid"], cfg["boot_base"])
    )
    gc.collect()
    res, states = await check_charger(cfg)
    checks["charger"] = res
    gc.collect()
    checks["bms"], checks["meter"] = await check_bus(cfg, states)
    gc.collect()
    checks["net"] = check_net(cfg)
    checks["broker"] = check_broker(cfg) if checks["net"]["ok"] else _result(False, "no network")
    checks["clock"] = check_clock(cfg)
    checks["storage"] = check_storage(cfg)
    gc.collect()
    ok = True
    for name in checks:
        ok = ok and checks[name]["ok"]
    out = {"v": VERSION, "ok": ok, "checks": checks}
    if hasattr(gc, "mem_free"):
        out["heap_free"] = gc.mem_free()  # type: ignore[attr-defined]
    return out


def main(path="config.json"):
    t0 = timebase.ticks_ms()
    out = asyncio.run(run(path))
    out["ms"] = timebase.ticks_diff(timebase.ticks_ms(), t0)
    print(MARK + json.dumps(out, separators=(",", ":")))
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
