"""Battery packs: specs, open-circuit voltage, and the battery as it leaves or enters a slot.

Pure data and arithmetic; the charging dynamics live in physics.py.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

SERIAL_RE = re.compile(r"^[0-9A-Za-z-]{8}$")

# Li-ion (NMC) cell open-circuit voltage against state of charge. The top point is the
# CV voltage, so the CV current tapers to zero exactly at a full pack.
_OCV_SOC = (0.0, 0.05, 0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 1.00)
_OCV_V = (3.00, 3.30, 3.45, 3.56, 3.63, 3.69, 3.75, 3.83, 3.91, 3.99, 4.08, 4.20)


def cell_ocv(soc: float) -> float:
    """Cell open-circuit voltage (V) at soc (0..1, clamped), piecewise linear."""
    if soc <= 0.0:
        return _OCV_V[0]
    if soc >= 1.0:
        return _OCV_V[-1]
    k = bisect.bisect_right(_OCV_SOC, soc) - 1
    s0 = _OCV_SOC[k]
    v0 = _OCV_V[k]
    return v0 + (_OCV_V[k + 1] - v0) * (soc - s0) / (_OCV_SOC[k + 1] - s0)


@dataclass(frozen=True, kw_only=True)
class PackSpec:
    """A pack family: `cells` Li-ion cells in series."""

    name: str
    cells: int
    nominal_v: float
    cell_cv_v: float = 4.2
    # Internal resistance, given as the IR drop at the charger's CC current over V_cv:
    # a test battery of a few Wh charged at 1 kW is far beyond any real C-rate, so the
    # resistance is scaled to the current, which keeps the CC/CV shape of a real charge
    # (CV from about 85 % state of charge, a taper of a sixth of the charge time) at any
    # test scale.
    ir_frac: float = 0.04

    @property
    def cv_v(self) -> float:
        """Charger constant-voltage setpoint (V): 67.2 for 16S, 84.0 for 20S."""
        return self.cells * self.cell_cv_v

    def ocv(self, soc: float) -> float:
        return self.cells * cell_ocv(soc)


PACKS: dict[str, PackSpec] = {
    "60V": PackSpec(name="60V", cells=16, nominal_v=60.0),
    "72V": PackSpec(name="72V", cells=20, nominal_v=72.0),
}


def pack_spec(name: str) -> PackSpec:
    try:
        return PACKS[name]
    except KeyError:
        raise ValueError(f"unknown pack {name!r} (known: {', '.join(sorted(PACKS))})") from None


@dataclass(frozen=True, kw_only=True)
class Battery:
    """A battery as it is inserted or as it comes out of a slot (remove() returns one,
    and it can be inserted again: its charge, cycles and lifetime energy carry over)."""

    serial: str
    pack: str = "72V"
    capacity_wh: float = 20.0
    soc: float = 0.2  # fraction 0..1
    soh: int = 980  # 0.1 %
    cycles: int = 0
    cycle_wh: float = 0.0  # Wh charged towards the next equivalent full cycle
    lifetime_wh: float = 0.0  # Wh ever charged into it
    temp_c: float = 25.0

    def __post_init__(self) -> None:
        if not SERIAL_RE.match(self.serial):
            raise ValueError(f"battery serial {self.serial!r} is not 8 chars of [0-9A-Za-z-]")
        pack_spec(self.pack)
        if not 0.05 <= self.capacity_wh <= 100_000:
            raise ValueError(f"capacity_wh {self.capacity_wh} out of range 0.05..100000")
        if not 0.0 <= self.soc <= 1.0:
            raise ValueError(f"soc {self.soc} must be a fraction 0..1")
        if not 0 <= self.soh <= 1000:
            raise ValueError(f"soh {self.soh} must be 0..1000 (0.1 %)")
        if not 0 <= self.cycles <= 0xFFFF:
            raise ValueError(f"cycles {self.cycles} must fit a u16")
        if self.lifetime_wh < 0 or self.cycle_wh < 0:
            raise ValueError("lifetime_wh and cycle_wh must be >= 0")

    @property
    def spec(self) -> PackSpec:
        return PACKS[self.pack]
