"""`compute()`: the whole metering function, pure and deterministic (CONTRACT §6 rule 7):
the same set of messages gives the same records whatever the order of arrival or the
duplication. What `stationctl verify` recomputes the stored records with (station by
station, `compute_station`, so that memory holds one station's records at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from agent.ledger.backend import MemoryBackend
from agent.ledger.inputs import DEFAULT_PARAMS, MeterParams, RawMsg
from agent.ledger.meter import IncrementalMeter, Ledger
from agent.ledger.records import Record, record_sort_key
from agent.ledger.state import Key


def compute(msgs: Iterable[RawMsg], params: MeterParams = DEFAULT_PARAMS) -> list[Record]:
    """Every record of every station the messages name, sorted by record_sort_key."""
    m = IncrementalMeter(params)
    m.add(msgs)
    out: list[Record] = []
    for sid in m.sids():
        out.extend(m.records(sid))
    out.sort(key=record_sort_key)
    return out


class _SourcedBackend(MemoryBackend):
    """Records and checkpoints in memory, raw messages from elsewhere (the store)."""

    def __init__(
        self,
        raw_from: Callable[[str, Key], Iterable[RawMsg]],
        raw_boot: Callable[[str, int], Iterable[RawMsg]],
    ) -> None:
        super().__init__()
        self._raw_from = raw_from
        self._raw_boot = raw_boot

    def raw_from(self, sid: str, start: Key) -> Iterator[RawMsg]:
        yield from self._raw_from(sid, start)

    def raw_boot(self, sid: str, boot: int) -> Iterator[RawMsg]:
        yield from self._raw_boot(sid, boot)


def compute_station(
    sid: str,
    msgs: Iterable[RawMsg],
    raw_from: Callable[[str, Key], Iterable[RawMsg]],
    raw_boot: Callable[[str, int], Iterable[RawMsg]],
    params: MeterParams = DEFAULT_PARAMS,
    page: int = 1000,
) -> list[Record]:
    """compute() of one station whose messages come in (boot, seq) order, each key once
    (the raw table read by key): streamed in pages, memory bounded by the station's
    records; `raw_from`/`raw_boot` read the same messages again when a span is re-applied
    (a boot whose facts change after its first readings)."""
    be = _SourcedBackend(raw_from, raw_boot)
    ledger = Ledger(params, be)
    buf: list[RawMsg] = []
    for m in msgs:
        buf.append(m)
        if len(buf) >= page:
            ledger.process(sid, buf)
            buf = []
    if buf:
        ledger.process(sid, buf)
    ledger.finish(sid)
    return sorted(be.records.get(sid, {}).values(), key=record_sort_key)
