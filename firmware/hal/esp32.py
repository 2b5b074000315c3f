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


# ---- firmware updates (ota.py): the MicroPython image itself, through the OTA partitions ----
# Not runnable off a board: type-checked against the stubs only (docs/firmware.md, OTA).


def ota_confirm():
    """The running version is confirmed: cancel the bootloader's rollback of the image
    (a no-op, OSError, when the bootloader was built without rollback or the image was not
    booted on trial)."""
    import esp32

    try:
        esp32.Partition.mark_app_valid_cancel_rollback()
    except OSError:
        pass


class ImageWriter:
    """A MicroPython image (a manifest entry "@image") written block by block into the OTA
    app partition that is not running. write(off, data) takes data at byte offset off, in
    order, in 4096-byte pieces (the last may be shorter: padded with 0xFF); resumable at any
    4096-byte boundary after a power cut. rehash(h, size) feeds h the first size bytes back
    from flash. activate() makes it the image the next reset boots (on trial: the bootloader
    returns to the running one unless ota_confirm() is called after that boot)."""

    BLOCK = 4096

    def __init__(self, size):
        import esp32

        # the stubs type the id as a label (str); the port takes Partition.RUNNING too
        running = esp32.Partition(esp32.Partition.RUNNING)  # type: ignore[arg-type]
        self.part = running.get_next_update()
        info = self.part.info()  # (type, subtype, addr, size, label, encrypted)
        if size > info[3]:
            raise ValueError("image of %d bytes > partition of %d" % (size, info[3]))
        self.size = size
        self._buf = bytearray(self.BLOCK)

    def write(self, off, data):
        if off % self.BLOCK or len(data) > self.BLOCK:
            raise ValueError("image chunks are whole 4096-byte blocks")
        buf = self._buf
        n = len(data)
        buf[:n] = data
        for i in range(n, self.BLOCK):
            buf[i] = 0xFF
        self.part.writeblocks(off // self.BLOCK, buf)  # erases the block first

    def rehash(self, h, size):
        buf = self._buf
        mv = memoryview(buf)
        done = 0
        while done < size:
            self.part.readblocks(done // self.BLOCK, buf)
            n = min(self.BLOCK, size - done)
            h.update(mv[:n])
            done += n
        return h

    def activate(self):
        self.part.set_boot()
