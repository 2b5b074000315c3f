"""Fault injection: what can go wrong on each link, how often, and the exact log of it.

One decision per transaction, from a seeded RNG per link, so a run is reproducible for
the same sequence of requests.

Modbus bus (a transaction = one request frame and its reply):

| kind         | what the relay does                                        | station counter |
|--------------|------------------------------------------------------------|-----------------|
| `crc`        | flips one bit of the reply after its header (payload/CRC)  | `mb_crc`        |
| `silence`    | the request is dropped: no reply at all                    | `mb_to`         |
| `garbage`    | reply bytes after the header are random, CRC always wrong  | `mb_crc`        |
| `slow`       | the real reply, sent `slow_factor` × `bus_timeout_s` late  | `mb_to`         |
| `exception`  | exception reply (function | 0x80, code 0x06 busy), valid CRC | `mb_exc`      |
| `wrong_unit` | the real reply with another unit id, valid CRC             | `mb_addr`       |

`garbage` keeps the header (unit, function, byte count) and the length of the real reply so
that the expected counter does not depend on how a master frames replies (by byte count or
by silence): it can only be a CRC error. A late (`slow`) reply is not sent if the station
starts another request first (RS-485 is half duplex; the master has given up by then), and
if it is sent to an idle master the station must discard it: stale bytes before a request
are the master's to flush.

Charger line (a transaction = one `$Q` query and its reply):

| kind         | what the controller sends                                  | station counter |
|--------------|------------------------------------------------------------|-----------------|
| `checksum`   | the real reply with a wrong checksum                       | `ser_cs`        |
| `silence`    | nothing                                                    | `ser_to`        |
| `garbage`    | a `$`-framed line with a valid checksum and malformed body | `ser_bad`       |
| `other_slot` | a well-formed reply for another slot                       | `ser_bad`       |
| `slow`       | the real reply, `slow_factor` × `charger_timeout_s` late   | `ser_to`        |

Retries (Modbus reads only; the charger is not retried): with `retry_window_s` > 0 a
request identical to a faulted one that arrives within `retry_window_s` of the previous
attempt is taken as its retry and fails the same way; the log keeps one entry for the
transaction (its `attempts` grows). So the log has exactly one entry per failed
transaction as the station counts them, whatever its `retries`, as long as its retries
come within the window and its next poll of the same register comes later. With
`retry_window_s` = 0 every request is its own transaction: use it with a station that
has `retries` = 0. Requests to a unit that is not on the bus (an empty slot's BMS) get no
reply and are never faults.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, fields

from . import rtu

BUS_KINDS = ("crc", "silence", "garbage", "slow", "exception", "wrong_unit")
CHARGER_KINDS = ("checksum", "silence", "garbage", "other_slot", "slow")
COUNTERS = ("mb_to", "mb_crc", "mb_exc", "mb_addr", "ser_to", "ser_cs", "ser_bad")

BUS_COUNTER = {
    "crc": "mb_crc",
    "silence": "mb_to",
    "garbage": "mb_crc",
    "slow": "mb_to",
    "exception": "mb_exc",
    "wrong_unit": "mb_addr",
}
CHARGER_COUNTER = {
    "checksum": "ser_cs",
    "silence": "ser_to",
    "garbage": "ser_bad",
    "other_slot": "ser_bad",
    "slow": "ser_to",
}


@dataclass(frozen=True, kw_only=True)
class FaultRates:
    """Probability of each fault per transaction (0..1; each link's sum at most 1)."""

    # Modbus bus
    mb_crc: float = 0.0
    mb_silence: float = 0.0
    mb_garbage: float = 0.0
    mb_slow: float = 0.0
    mb_exception: float = 0.0
    mb_wrong_unit: float = 0.0
    # charger line
    ser_checksum: float = 0.0
    ser_silence: float = 0.0
    ser_garbage: float = 0.0
    ser_other_slot: float = 0.0
    ser_slow: float = 0.0
    # the station's timeouts: a slow reply comes slow_factor × these after the request
    bus_timeout_s: float = 0.5
    charger_timeout_s: float = 0.2
    slow_factor: float = 2.0
    # see the module doc; None: bus_timeout_s + 0.25 s
    retry_window_s: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.startswith(("mb_", "ser_")):
                v = getattr(self, f.name)
                if not 0.0 <= v <= 1.0:
                    raise ValueError(f"fault rate {f.name}={v} must be within 0..1")
        if sum(self.bus_rates().values()) > 1.0 + 1e-9:
            raise ValueError("Modbus fault rates add up to more than 1")
        if sum(self.charger_rates().values()) > 1.0 + 1e-9:
            raise ValueError("charger fault rates add up to more than 1")
        if self.bus_timeout_s <= 0 or self.charger_timeout_s <= 0 or self.slow_factor <= 1.0:
            raise ValueError("timeouts must be > 0 and slow_factor > 1")
        if self.retry_window_s is not None and self.retry_window_s < 0:
            raise ValueError("retry_window_s must be >= 0")

    @classmethod
    def uniform(cls, rate: float, **kw: float) -> FaultRates:
        """`rate` per transaction on each link, split evenly over that link's kinds."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate {rate} must be within 0..1")
        rates: dict[str, float] = {f"mb_{k}": rate / len(BUS_KINDS) for k in BUS_KINDS}
        rates.update({f"ser_{k}": rate / len(CHARGER_KINDS) for k in CHARGER_KINDS})
        rates.update(kw)
        return cls(**rates)

    def bus_rates(self) -> dict[str, float]:
        return {k: float(getattr(self, f"mb_{k}")) for k in BUS_KINDS}

    def charger_rates(self) -> dict[str, float]:
        return {k: float(getattr(self, f"ser_{k}")) for k in CHARGER_KINDS}

    @property
    def retry_window(self) -> float:
        return self.bus_timeout_s + 0.25 if self.retry_window_s is None else self.retry_window_s


@dataclass(kw_only=True)
class FaultEntry:
    seq: int
    t: float  # seconds since the rig started
    mono: float  # time.monotonic() of the (first) faulted request
    link: str  # "bus" or "charger"
    kind: str
    counter: str  # the station error counter this transaction must increment
    unit: int  # Modbus unit, or charger slot
    attempts: int = 1


class FaultLog:
    """Thread-safe log of injected faults; totals are exact, the entry list is capped."""

    def __init__(self, *, t0: float | None = None, max_entries: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._t0 = time.monotonic() if t0 is None else t0
        self._entries: list[FaultEntry] = []
        self._max = max_entries
        self._dropped = 0
        self._totals = dict.fromkeys(COUNTERS, 0)
        self._kinds: dict[str, int] = {}
        self._seq = 0

    def add(self, *, link: str, kind: str, counter: str, unit: int, mono: float) -> FaultEntry:
        with self._lock:
            e = FaultEntry(
                seq=self._seq,
                t=round(mono - self._t0, 6),
                mono=mono,
                link=link,
                kind=kind,
                counter=counter,
                unit=unit,
            )
            self._seq += 1
            self._totals[counter] += 1
            key = f"{link}.{kind}"
            self._kinds[key] = self._kinds.get(key, 0) + 1
            if len(self._entries) < self._max:
                self._entries.append(e)
            else:
                self._dropped += 1
            return e

    def retry(self, e: FaultEntry) -> None:
        with self._lock:
            e.attempts += 1

    def entries(self) -> list[dict[str, object]]:
        with self._lock:
            return [asdict(e) for e in self._entries]

    def totals(self) -> dict[str, int]:
        with self._lock:
            return dict(self._totals)

    def kinds(self) -> dict[str, int]:
        with self._lock:
            return dict(self._kinds)

    def to_json(self) -> dict[str, object]:
        with self._lock:
            return {
                "totals": dict(self._totals),
                "kinds": dict(self._kinds),
                "dropped_entries": self._dropped,
                "log": [asdict(e) for e in self._entries],
            }


class _Picker:
    def __init__(self, rates: dict[str, float], rng: random.Random) -> None:
        self._rates = [(k, r) for k, r in rates.items() if r > 0]
        self._rng = rng

    def pick(self) -> str | None:
        if not self._rates:
            return None
        u = self._rng.random()
        acc = 0.0
        for kind, r in self._rates:
            acc += r
            if u < acc:
                return kind
        return None


class BusFaults:
    """Per-bus fault decisions and reply mangling (pure apart from the log)."""

    def __init__(self, rates: FaultRates, log: FaultLog, seed: int | str) -> None:
        self.rates = rates
        self.log = log
        self.rng = random.Random(f"{seed}:bus")
        self._picker = _Picker(rates.bus_rates(), self.rng)
        self._last: tuple[bytes, str, FaultEntry, float] | None = None

    def decide(self, request: bytes, now: float) -> str | None:
        """The fault for this request (None: none), logging new failed transactions."""
        last = self._last
        if last is not None and last[0] == request and now - last[3] <= self.rates.retry_window:
            self._last = (request, last[1], last[2], now)
            self.log.retry(last[2])
            return last[1]
        kind = self._picker.pick()
        if kind is None:
            self._last = None
            return None
        e = self.log.add(
            link="bus", kind=kind, counter=BUS_COUNTER[kind], unit=request[0], mono=now
        )
        self._last = (request, kind, e, now)
        return kind

    def slow_delay(self) -> float:
        return self.rates.slow_factor * self.rates.bus_timeout_s

    def mangle(self, kind: str | None, request: bytes, reply: bytes) -> bytes:
        """The bytes to send instead of `reply` (silence and slow are timing, not bytes)."""
        rng = self.rng
        if kind == "crc":
            out = bytearray(reply)
            idx = rng.randrange(min(3, len(out) - 2), len(out))
            out[idx] ^= 1 << rng.randrange(8)
            return bytes(out)
        if kind == "garbage":
            keep = min(3, len(reply) - 2)
            out = bytearray(reply[:keep]) + bytearray(rng.randbytes(len(reply) - keep))
            if rtu.crc_ok(out):
                out[-1] ^= 0x01
            return bytes(out)
        if kind == "exception":
            return rtu.with_crc(bytes((request[0], (request[1] | 0x80) & 0xFF, 0x06)))
        if kind == "wrong_unit":
            unit = request[0]
            other = unit + 1 if unit < 247 else unit - 1
            return rtu.with_crc(bytes((other,)) + reply[1:-2])
        return reply


class ChargerFaults:
    def __init__(self, rates: FaultRates, log: FaultLog, seed: int | str) -> None:
        self.rates = rates
        self.log = log
        self.rng = random.Random(f"{seed}:charger")
        self._picker = _Picker(rates.charger_rates(), self.rng)

    def decide(self, slot: int, now: float) -> str | None:
        kind = self._picker.pick()
        if kind is not None:
            self.log.add(
                link="charger", kind=kind, counter=CHARGER_COUNTER[kind], unit=slot, mono=now
            )
        return kind

    def slow_delay(self) -> float:
        return self.rates.slow_factor * self.rates.charger_timeout_s

    def bad_checksum(self, line: bytes) -> bytes:
        """The same line with its checksum changed (still two uppercase hex digits)."""
        star = line.rindex(b"*")
        cs = int(line[star + 1 : star + 3], 16) ^ self.rng.randrange(1, 256)
        return line[: star + 1] + b"%02X\r\n" % cs

    def garbage_line(self, slot: int) -> bytes:
        """A checksummed line whose body is not a reply: it can only be `ser_bad`."""
        from .lines import frame

        alphabet = "ABDGHJKLMNPRSTUYZ#%&!?0123456789"
        junk = "".join(self.rng.choice(alphabet) for _ in range(self.rng.randrange(4, 24)))
        return frame(f"C,{slot},{junk}")

    def other_slot(self, slot: int, channels: int) -> int:
        """Another slot number: a real channel when there is one, else the next (X)."""
        if channels >= 2:
            other = self.rng.randrange(1, channels)
            return other + 1 if other >= slot else other
        return slot + 1 if slot < 16 else slot - 1
