"""The kept trace gives the kept exports, byte for byte (tests/golden_trace.py).

Made before the layout change: a move or a refactoring that changes any record fails here,
with the first differing line."""

from __future__ import annotations

import pytest

from tests.golden_trace import BYS, EXPORTS, FMTS, exports, read_trace


@pytest.fixture(scope="module")
def made() -> dict[str, bytes]:
    return exports(read_trace())


@pytest.mark.parametrize("name", [f"{by}.{fmt}" for by in BYS for fmt in FMTS])
def test_export_equals_the_kept_bytes(made: dict[str, bytes], name: str) -> None:
    want = (EXPORTS / name).read_bytes()
    got = made[name]
    if got != want:
        for i, (a, b) in enumerate(zip(got.splitlines(), want.splitlines(), strict=False)):
            assert a == b, f"{name} line {i + 1} differs"
    assert got == want
    assert got.count(b"\n") >= 3
