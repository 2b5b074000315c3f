"""The ledger: CONTRACT §6 metering (raw messages in, kWh records out), carbon, export.

Modules, in the order the data flows:
- inputs.py   what metering takes: RawMsg (a verified message), MeterParams
- rules.py    the §6 rules as small pure functions, one per rule
- state.py    the engine's per-station state: boots, streams, parts, contributions
- engine.py   the incremental engine: inserting messages, processing them in (boot, seq)
              order through the rules, re-running after late arrivals
- sessions.py session records (matching, timing, register cross-check)
- meter.py    IncrementalMeter: interval, adjustment, day and session records, and changes
- compute.py  compute(): the whole function, as `stationctl verify` recomputes it
- records.py  Record, its flags, sort order and id
- carbon.py, export.py: what is made of the records

The public names of metering are importable from here.
"""

from agent.ledger.compute import compute
from agent.ledger.inputs import MeterParams, RawMsg
from agent.ledger.meter import IncrementalMeter
from agent.ledger.records import (
    DAY_MS,
    FLAG_NAMES,
    PROCESSING_VERSION,
    Record,
    flag_bits,
    flag_names,
    make_record_id,
    record_id,
    record_sort_key,
)

__all__ = [
    "DAY_MS",
    "FLAG_NAMES",
    "PROCESSING_VERSION",
    "IncrementalMeter",
    "MeterParams",
    "RawMsg",
    "Record",
    "compute",
    "flag_bits",
    "flag_names",
    "make_record_id",
    "record_id",
    "record_sort_key",
]
