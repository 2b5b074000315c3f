"""Modbus RTU framing helpers for the relay: CRC-16/MODBUS and frame lengths.

The relay must see transaction boundaries without pymodbus' help: it frames each request
from the station and each reply from the server by function code.
"""

from __future__ import annotations


def _table() -> list[int]:
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
        out.append(c)
    return out


_T = _table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _T[(crc ^ b) & 0xFF]
    return crc


def with_crc(body: bytes | bytearray) -> bytes:
    c = crc16(body)
    return bytes(body) + bytes((c & 0xFF, c >> 8))


def crc_ok(frame: bytes | bytearray) -> bool:
    return len(frame) >= 4 and crc16(frame[:-2]) == frame[-2] | (frame[-1] << 8)


UNKNOWN = -1  # function code whose length the relay cannot tell: frame by silence


def request_length(buf: bytes | bytearray) -> int | None:
    """Length of the request starting buf[0], None while too short to tell, UNKNOWN."""
    if len(buf) < 2:
        return None
    fc = buf[1]
    if fc in (1, 2, 3, 4, 5, 6, 8):
        return 8
    if fc in (7, 11, 12, 17):
        return 4
    if fc in (15, 16):
        return 9 + buf[6] if len(buf) >= 7 else None
    if fc == 23:
        return 13 + buf[10] if len(buf) >= 11 else None
    return UNKNOWN


def reply_length(buf: bytes | bytearray) -> int | None:
    """Length of the reply starting buf[0] (None: need more bytes; UNKNOWN)."""
    if len(buf) < 2:
        return None
    fc = buf[1]
    if fc & 0x80:
        return 5
    if fc in (1, 2, 3, 4, 23, 17, 12):
        return 5 + buf[2] if len(buf) >= 3 else None
    if fc in (5, 6, 8, 11, 15, 16):
        return 8
    if fc == 7:
        return 5
    return UNKNOWN
