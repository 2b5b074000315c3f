"""Charger controller line protocol (CONTRACT §3), written independently of firmware/.

    request:  $Q,<slot>*<cs>\\r\\n
    reply:    $C,<slot>,<state>,<mv>,<ma>,<t>,<fault>*<cs>\\r\\n

`<cs>` is two uppercase hex digits: the XOR of every byte strictly between `$` and `*`.
"""

from __future__ import annotations

from dataclasses import dataclass

STATES = "IWCVFEX"


def checksum(body: bytes) -> int:
    cs = 0
    for c in body:
        cs ^= c
    return cs


def frame(body: str) -> bytes:
    """`$<body>*<CS>\\r\\n` for an ASCII body."""
    raw = body.encode("ascii")
    return b"$" + raw + b"*%02X\r\n" % checksum(raw)


@dataclass(frozen=True, kw_only=True)
class ChargerReading:
    slot: int
    state: str
    mv: int
    ma: int
    t: int  # 0.1 °C
    fault: int

    def __post_init__(self) -> None:
        if not 1 <= self.slot <= 16:
            raise ValueError(f"slot {self.slot} must be 1..16")
        if len(self.state) != 1 or self.state not in STATES:
            raise ValueError(f"state {self.state!r} not one of {STATES}")
        if self.mv < 0 or not 0 <= self.fault <= 0xFFFF:
            raise ValueError("mv must be >= 0 and fault 0..65535")


def format_reply(r: ChargerReading) -> bytes:
    return frame(f"C,{r.slot},{r.state},{r.mv},{r.ma},{r.t},{r.fault}")


def format_query(slot: int) -> bytes:
    if not 1 <= slot <= 16:
        raise ValueError(f"slot {slot} must be 1..16")
    return frame(f"Q,{slot}")


def _body(line: bytes) -> bytes | None:
    """The checked body of one line (with or without its CR LF), or None."""
    line = line.rstrip(b"\r\n")
    if len(line) < 4 or line[:1] != b"$" or line[-3:-2] != b"*":
        return None
    body = line[1:-3]
    try:
        cs = int(line[-2:], 16)
    except ValueError:
        return None
    if b"$" in body or b"*" in body or checksum(body) != cs:
        return None
    return body


def _dec(field: bytes, signed: bool = False) -> int | None:
    """A decimal field per §3: digits only, no leading zeros, '-' only where signed."""
    neg = signed and field[:1] == b"-"
    digits = field[1:] if neg else field
    if not digits or not digits.isdigit() or (len(digits) > 1 and digits[:1] == b"0"):
        return None
    if neg and digits == b"0":
        return None
    try:
        v = int(digits)
    except ValueError:  # over 4300 digits (sys.get_int_max_str_digits)
        return None
    return -v if neg else v


def parse_query(line: bytes) -> int | None:
    """The slot of a well-formed `$Q,<slot>*<cs>` line (1..16), else None."""
    body = _body(line)
    if body is None or body[:2] != b"Q,":
        return None
    slot = _dec(body[2:])
    return slot if slot is not None and 1 <= slot <= 16 else None


def parse_reply(line: bytes) -> ChargerReading | None:
    """A well-formed reply line, else None (used by tests and tools, not by the sim)."""
    body = _body(line)
    if body is None:
        return None
    parts = body.split(b",")
    if len(parts) != 7 or parts[0] != b"C" or len(parts[2]) != 1:
        return None
    state = parts[2].decode("ascii", "replace")
    if state not in STATES:
        return None
    nums = [
        _dec(parts[1]),
        _dec(parts[3]),
        _dec(parts[4], True),
        _dec(parts[5], True),
        _dec(parts[6]),
    ]
    slot, mv, ma, t, fault = nums
    if slot is None or mv is None or ma is None or t is None or fault is None:
        return None
    try:
        return ChargerReading(slot=slot, state=state, mv=mv, ma=ma, t=t, fault=fault)
    except ValueError:
        return None
