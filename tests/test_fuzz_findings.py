"""Every past finding of an external parser, kept as a case (tests/vectors/fuzz_findings.json):
each runs through its target's harness from bench/fuzz.py (the bench's own definition), on
CPython and, for the firmware targets, on the MicroPython unix port, and must be handled.

An entry still `open` (a bug in a file this suite does not fix) is a strict xfail naming
what it raises on each interpreter: it fails loudly once the parser is fixed, so the entry
gets marked fixed.
The agent's signed poison corpus is tests/test_poison.py (through a broker and the agent
process); it is not repeated here.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from bench import fuzz
from tests.helpers import ROOT

CORPUS = ROOT / "tests" / "vectors" / "fuzz_findings.json"
ENTRIES: list[dict[str, Any]] = json.loads(CORPUS.read_text())["findings"]


def case_bytes(e: dict[str, Any]) -> bytes:
    body = e["text"].encode() if "text" in e else bytes.fromhex(e["hex"])
    return bytes.fromhex(e.get("prefix_hex", "")) + body * e.get("repeat", 1)


def _param(e: dict[str, Any]) -> Any:
    marks = []
    if e["status"] == "open" and e.get("raises"):
        marks.append(pytest.mark.xfail(strict=True, reason=f"open: {e['once']}"))
    return pytest.param(e, id=e["id"], marks=marks)


def test_corpus_is_well_formed() -> None:
    ids = [e["id"] for e in ENTRIES]
    assert len(ids) == len(set(ids))
    for e in ENTRIES:
        assert e["target"] in fuzz.HARNESSES, e["id"]
        assert e["status"] in ("fixed", "open", "handled"), e["id"]
        assert e["once"] and ("text" in e) != ("hex" in e), e["id"]
        if e["status"] == "open":
            assert e.get("raises") or e.get("mp_raises"), e["id"]
            assert e.get("mp_raises") is None or e["target"] in fuzz.FIRMWARE_TARGETS


@pytest.mark.parametrize("entry", [_param(e) for e in ENTRIES])
def test_finding_is_handled(entry: dict[str, Any], tmp_path: pathlib.Path) -> None:
    fuzz.fuzz_fw.set_tmp(str(tmp_path))
    err = fuzz.check_case(entry["target"], case_bytes(entry), limit_s=5.0)
    if entry["status"] == "open" and entry.get("raises") and err is not None:
        # still open: it must still be the bug the entry names, not another one
        assert type(err).__name__ == entry["raises"], repr(err)
    assert err is None, f"{entry['id']}: {type(err).__name__}: {err}"


@pytest.mark.parametrize(
    "target", sorted({e["target"] for e in ENTRIES} & set(fuzz.FIRMWARE_TARGETS))
)
def test_findings_on_micropython(target: str, tmp_path: pathlib.Path) -> None:
    """The firmware entries on the real interpreter: only the open ones may fail, each
    with what the entry says MicroPython raises."""
    from tools import fwbuild

    entries = [e for e in ENTRIES if e["target"] == target]
    res = fuzz.mp_replay(target, [case_bytes(e) for e in entries], str(tmp_path), fwbuild.build())
    assert res.cases == len(entries), res.note
    expect = {i for i, e in enumerate(entries) if e["status"] == "open" and e.get("mp_raises")}
    failed = set(res.failed)
    assert failed == expect, (
        f"failed on MicroPython: {[entries[i]['id'] for i in sorted(failed)]}, "
        f"open there: {[entries[i]['id'] for i in sorted(expect)]}; {res.examples}"
    )
    for sig in res.examples:
        typ = sig.split(" ")[0]
        assert typ in {entries[i]["mp_raises"] for i in expect}, sig
