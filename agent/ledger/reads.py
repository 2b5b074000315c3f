"""What metering reads of a clean telemetry, packed into one `bytes` while the message is
fresh (agent/ledger/inputs.py says which keys, and why ingest hands over only those).

Ingest decodes a telemetry on its event loop and meters it on the database thread up to
a batch later (thousands of messages): by then each of the decoded tree's objects (a
struct per slot, a boxed integer per value) is out of the caches, and reading and then
freeing them there cost ~5 µs of an 8-slot message (perf over bench/bench_ingest.py's
drain). Packed on the loop, where the tree is hot and is freed, the database thread
touches one small object instead (docs/agent.md, "Measured").

The layout, signed 64-bit integers (compiled with the engine; never stored, never sent):
`up, ts, hist, e_wh, sn`, then `n, e_mwh, b_mwh` per slot in the message's order. -1
stands for absent (or null): §2 makes each of these values non-negative. `hist` is 1 or 0.
"""

from __future__ import annotations

import struct
from typing import Any, Final

UP: Final = 0
TS: Final = 1
HIST: Final = 2
E_WH: Final = 3  # the grid meter's register; -1: no meter in the message
SN: Final = 4
SLOTS: Final = 5  # n, e_mwh, b_mwh of the first slot, then the next …

_HEAD: Final = 5
# by slot count (a telemetry has up to 16 slots; a longer list gets its format made)
_FORMATS: Final = [struct.Struct(f"<{_HEAD + 3 * k}q") for k in range(17)]


def _fmt(values: int) -> struct.Struct:
    k = (values - _HEAD) // 3
    return _FORMATS[k] if k < len(_FORMATS) else struct.Struct(f"<{values}q")


def _or_absent(x: Any) -> int:
    return x if type(x) is int else -1


def pack(t: Any) -> bytes:
    """A clean telemetry's reads, `t` a Struct with the names metering reads
    (wire.SignedTelemetry or inputs.TelemetryRead), packed."""
    meter = t.meter
    e_wh = sn = -1
    if meter:  # present (UNSET is false)
        e_wh = meter.e_wh
        sn = _or_absent(meter.sn)
    values: list[int] = [t.up, _or_absent(t.ts), 1 if t.hist == 1 else 0, e_wh, sn]
    slots = t.slots
    if slots:
        for sl in slots:
            values.append(sl.n)
            values.append(sl.e_mwh)
            values.append(_or_absent(sl.b_mwh))
    return _fmt(len(values)).pack(*values)


def unpack(b: bytes) -> tuple[int, ...]:
    """The values `pack` packed, in its layout."""
    return _fmt(len(b) >> 3).unpack(b)
