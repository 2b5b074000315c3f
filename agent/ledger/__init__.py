"""The ledger: CONTRACT §6 metering (raw messages in, kWh records out), carbon, export.

Modules, in the order the data flows:
- inputs.py   what metering takes: RawMsg (a verified message; raw_msg() makes one
              through §6.9's agent.ranges.clean), MeterParams
- rules.py    the §6 rules as small pure functions, one per rule
- state.py    the engine's per-station state: small and bounded (never the messages)
- engine.py   the engine: each station's messages in (boot, seq) order through the rules,
              checkpoints, and recomputing a station's span after a late message
- backend.py  what the engine reads and writes besides its state (raw, checkpoints,
              records): the Backend protocol and MemoryBackend
- sessions.py session records (matching, timing, register cross-check)
- meter.py    Ledger (the engines of one backend, adjustments, day roll-ups) and
              IncrementalMeter (in memory: records and changes)
- compute.py  compute(), and compute_station() as `stationctl verify` streams it
- agent_meter.py  StoreMeter: the agent's metering on its store, in each batch's
              transaction (not imported here: it imports agent.store)
- records.py  Record, its flags, sort order and id
- carbon.py, export.py: what is made of the records

The public names of metering are importable from here. rules, state and engine run
compiled with mypyc where they were built from these sources (agent/native.py).
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
