"""The SQLite engine has every method of the store's interface (agent/store/base.py), with
the same parameters, so callers written against the interface work on it."""

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


def test_sqlite_engine_has_the_whole_interface() -> None:
    methods = interface_methods()
    assert {"write_batch", "iter_raw_keys", "record_rows", "transaction"} <= set(methods)
    for name, want in methods.items():
        got = inspect.signature(getattr(Store, name))
        assert list(got.parameters) == list(want.parameters), name
        for p, q in zip(got.parameters.values(), want.parameters.values(), strict=True):
            assert (p.kind, p.default) == (q.kind, q.default), (name, p.name)
