# HAL for the ESP32: UARTs (with the RS-485 driver-enable pin), watchdog, reset cause,
# RTC and the network link. The only firmware file that imports machine and network.
import time

import machine

try:
    from typing import Any  # noqa: F401
except ImportError:  # MicroPython: annotations only
    pass

PLATFORM = "esp32"

_PARITY = {None: None, 0: 0, 1: 1}


class Serial:
    """machine.UART with the non-blocking interface the drivers expect. With a `de` pin the
    line is RS-485 half duplex: DE is raised for the request and dropped as soon as the last
    stop bit has left, so the reply that follows is not talked over."""

    def __init__(self, uart_id, baud=9600, bits=8, parity=None, stop=1, tx=None, rx=None, de=None):
        kw = {
            "baudrate": baud,
            "bits": bits,
            "parity": _PARITY[parity],
            "stop": stop,
            "timeout": 0,
            "rxbuf": 512,
        }
        if tx is not None:
            kw["tx"] = tx
        if rx is not None:
            kw["rx"] = rx
        self._uart = machine.UART(uart_id, **kw)
        self.baud = baud
        self.char_bits = 1 + bits + (0 if parity is None else 1) + stop
        self._de = machine.Pin(de, machine.Pin.OUT, value=0) if de is not None else None

    def write(self, data):
        de = self._de
        if de is not None:
            de.value(1)
        n = self._uart.write(data) or 0
        if de is not None:
            # wait for the shift register to empty (bounded: the frame's own length on the wire)
            us = (len(data) * self.char_bits * 1000000) // self.baud + 200
            t0 = time.ticks_us()
            while not self._uart.txdone() and time.ticks_diff(time.ticks_us(), t0) < us:
                pass
            de.value(0)
        return n

    def readinto(self, buf):
        if not self._uart.any():
            return 0
        return self._uart.readinto(buf) or 0

    def any(self):
        return self._uart.any()

    def close(self):
        self._uart.deinit()


class Watchdog:
    def __init__(self, timeout_ms=30000):
        self._wdt = machine.WDT(timeout=timeout_ms)

    def feed(self):
        self._wdt.feed()


def reset_cause():
    c = machine.reset_cause()
    return {
        machine.PWRON_RESET: "power",
        machine.HARD_RESET: "hard",
        machine.WDT_RESET: "wdt",
        machine.DEEPSLEEP_RESET: "deep",
        machine.SOFT_RESET: "soft",
    }.get(c, "unknown")


def reboot():
    machine.reset()


def set_time_ms(unix_ms):
    """Set the RTC from Unix ms (the ESP32 epoch is 2000-01-01 on older ports, 1970 on 1.22+)."""
    secs = unix_ms // 1000
    tm = time.gmtime(secs)
    machine.RTC().datetime(
        (tm[0], tm[1], tm[2], tm[6] + 1, tm[3], tm[4], tm[5], (unix_ms % 1000) * 1000)
    )


def unix_ms():
    """Unix time in ms from the RTC (older ports count from 2000-01-01)."""
    ms = time.time_ns() // 1000000
    if time.gmtime(0)[0] == 2000:
        ms += 946684800000
    return ms


def ntp_sync(host):
    import ntptime

    ntptime.host = host
    ntptime.settime()


def net_up(net, timeout_ms=20000):
    """Bring the link up per config net.kind; returns True once connected (bounded wait)."""
    import network

    kind = net["kind"]
    link = None  # type: Any
    if kind == "wifi":
        wlan = network.WLAN(network.STA_IF)
        wlan.active(True)
        if not wlan.isconnected():
            wlan.connect(net["ssid"], net.get("password", ""))
        link = wlan
    elif kind == "lan":
        link = network.LAN()  # type: ignore[call-arg]  # board defaults (PHY pins set in the board build)
        link.active(True)
    elif kind == "ppp":
        ppp = network.PPP(machine.UART(net.get("uart", 1), baudrate=net.get("baud", 115200)))  # type: ignore[attr-defined]
        ppp.active(True)
        ppp.connect()
        link = ppp
    else:
        return True
    t0 = time.ticks_ms()
    while not link.isconnected():
        if time.ticks_diff(time.ticks_ms(), t0) > timeout_ms:
            return False
        time.sleep_ms(100)
    return True


def flash_root():
    return "/"
