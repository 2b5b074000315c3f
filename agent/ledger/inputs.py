"""What metering takes: verified raw messages (`RawMsg`) and its parameters (`MeterParams`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.ledger.records import DAY_MS


@dataclass(frozen=True, kw_only=True)
class RawMsg:
    """One verified raw message, decoded from its signed bytes."""

    sid: str
    boot: int
    seq: int
    recv_ms: int  # agent receive time (Unix ms)
    body: Mapping[str, Any]  # telemetry, or an event when "ev" in body


@dataclass(frozen=True, kw_only=True)
class MeterParams:
    interval_ms: int = 900_000
    max_power_w_slot: int = 3000
    max_power_w_meter: int = 50_000
    # Rule 8: interval records ending at or before this are locked.
    locked_until_ms: int | None = None
    # The moment the lock was taken: messages received (recv_ms) after it are "late" for the
    # locked period and only show as adjustment records. None = locked_until_ms.
    locked_at_ms: int | None = None

    def __post_init__(self) -> None:
        if self.interval_ms <= 0 or DAY_MS % self.interval_ms:
            raise ValueError(f"interval_ms must divide a day, got {self.interval_ms}")
        if self.max_power_w_slot <= 0 or self.max_power_w_meter <= 0:
            raise ValueError("max power must be positive")


DEFAULT_PARAMS = MeterParams()  # frozen: safe as an argument default
