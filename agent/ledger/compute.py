"""`compute()`: the whole metering function, pure and deterministic (CONTRACT §6 rule 7):
the same set of messages gives the same records whatever the order of arrival or the
duplication. What `stationctl verify` recomputes the stored records with (station by
station, `compute_station`, so that memory holds one station's records at a time).
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.ledger.inputs import DEFAULT_PARAMS, MeterParams, RawMsg
from agent.ledger.meter import IncrementalMeter
from agent.ledger.records import Record, record_sort_key


def compute(msgs: Iterable[RawMsg], params: MeterParams = DEFAULT_PARAMS) -> list[Record]:
    """Every record of every station the messages name, sorted by record_sort_key."""
    m = IncrementalMeter(params)
    m.add(msgs)
    out: list[Record] = []
    for sid in m.sids():
        out.extend(m.records(sid))
    out.sort(key=record_sort_key)
    return out
