# HAL for the MicroPython unix port (and CPython, where firmware tests also run):
# serial links are pty/tty device paths driven through termios, the flash filesystem is
# the working directory, and the watchdog is a no-op.
import select
import sys

try:
    import termios
except ImportError:  # pragma: no cover
    termios = None  # type: ignore

PLATFORM = "unix"

_BAUD = {9600: "B9600", 57600: "B57600", 115200: "B115200", 230400: "B230400"}


class Serial:
    """A byte stream on a tty or pty path: write() blocks for the short frames we send,
    readinto() never blocks (returns 0 when nothing is waiting)."""

    def __init__(self, path, baud=9600, bits=8, parity=None, stop=1):
        self.path = path
        self.baud = baud
        # bits per character on the wire: start + data + parity + stop (for silence timing)
        self.char_bits = 1 + bits + (0 if parity is None else 1) + stop
        self._f = (
            open(path, "r+b", buffering=0)
            if sys.implementation.name != "micropython"
            else open(path, "r+b")
        )
        fd = self._f.fileno()
        if termios is not None:
            if hasattr(termios, "setraw"):
                termios.setraw(fd)  # MicroPython's termios has it
            else:
                import tty

                tty.setraw(fd)
            name = _BAUD.get(baud)
            if name and hasattr(termios, name):
                attr = termios.tcgetattr(fd)
                speed = getattr(termios, name)
                attr[4] = speed
                attr[5] = speed
                termios.tcsetattr(fd, termios.TCSANOW, attr)
        self._poll = select.poll()
        self._poll.register(self._f, select.POLLIN)
        # MicroPython's file readinto() blocks until the buffer is full, so on that port
        # bytes are taken one at a time while poll() says more are waiting.
        self._mp = sys.implementation.name == "micropython"
        self._one = bytearray(1)

    def write(self, data):
        n = self._f.write(data)
        return len(data) if n is None else n

    def readinto(self, buf):
        """Read what is waiting into buf (bytearray or memoryview); 0 when nothing is."""
        if not self._poll.poll(0):
            return 0
        if not self._mp:
            return self._f.readinto(buf) or 0
        one = self._one
        n = 0
        size = len(buf)
        while n < size:
            if not self._f.readinto(one):
                break
            buf[n] = one[0]
            n += 1
            if not self._poll.poll(0):
                break
        return n

    def any(self):
        return 1 if self._poll.poll(0) else 0

    def close(self):
        try:
            self._f.close()
        except OSError:
            pass


class NoWatchdog:
    def __init__(self, timeout_ms=0):
        self.timeout_ms = timeout_ms

    def feed(self):
        pass


def reset_cause():
    """The unix port has no reset register: a process start is reported as a power-on."""
    return "power"


def flash_root():
    return "."


def unix_ms():
    """Unix time in ms from the host clock (which the host keeps synced)."""
    import time

    if hasattr(time, "time_ns"):
        return time.time_ns() // 1000000
    return int(time.time() * 1000)  # pragma: no cover


def ntp_sync(host):
    """The host keeps its own clock: nothing to do (the station trusts it when ntp is set)."""
    return True


def reboot():
    """A deliberate reboot on the unix port: exit with status 3 so a supervisor restarts it."""
    import sys

    sys.exit(3)
