"""Rig simulators: the station's charger controller, BMS ×N and grid meter on ptys.

See rig.py for the Rig API, faults.py for the fault kinds and the counters they must
produce, physics.py for the charging model, line.py for pacing.
"""

from .battery import PACKS, Battery, PackSpec
from .faults import BUS_COUNTER, CHARGER_COUNTER, COUNTERS, FaultRates
from .lines import ChargerReading, format_query, format_reply, parse_query, parse_reply
from .physics import ChargeProfile
from .rig import FAULTS_JSON, RIG_JSON, TRUTH_JSON, Rig, RigHost

__all__ = [
    "BUS_COUNTER",
    "CHARGER_COUNTER",
    "COUNTERS",
    "FAULTS_JSON",
    "PACKS",
    "RIG_JSON",
    "TRUTH_JSON",
    "Battery",
    "ChargeProfile",
    "ChargerReading",
    "FaultRates",
    "PackSpec",
    "Rig",
    "RigHost",
    "format_query",
    "format_reply",
    "parse_query",
    "parse_reply",
]
