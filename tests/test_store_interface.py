"""Each engine's store has every method of the store's interface (agent/store/base.py),
with the same parameters, so callers written against the interface work on it; checked on
an open store of each engine (`db_url`: SQLite, PostgreSQL)."""

from __future__ import annotations

import inspect

from agent.store.base import LedgerStore
from agent.store.sql import Store


def interface_methods() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(f)
        for name, f in vars(LedgerStore).items()
        if callable(f) and not name.startswith("_")
    }


def test_each_engine_has_the_whole_interface(db_url: str) -> None:
    methods = interface_methods()
    assert {"write_batch", "iter_raw_keys", "record_rows", "transaction"} <= set(methods)
    with Store(db_url) as st:
        assert st.engine == db_url.split(":", 1)[0]
        for name, want in methods.items():
            got = inspect.signature(getattr(st, name))
            # a bound method: the interface's parameters without `self`
            params = [p for p in want.parameters.values() if p.name != "self"]
            assert list(got.parameters) == [p.name for p in params], name
            for p, q in zip(got.parameters.values(), params, strict=True):
                assert (p.kind, p.default) == (q.kind, q.default), (name, p.name)
        # and they answer: an empty database of either engine
        assert st.raw_count() == 0 and st.record_rows() == [] and st.raw_sids() == []
        assert list(st.iter_raw_keys("KH-PNH-0001")) == [] and st.max_boot("KH-PNH-0001") is None
