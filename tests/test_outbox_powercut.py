"""The flash outbox under SIGKILL at random moments, on the real MicroPython interpreter.

tests/mp_scripts/outbox_powercut.py appends and acks in a loop and reports each step before
and after it; it is killed at a random moment, restarted, and reports what it finds. After
each restart: every append it reported complete is still pending with the same bytes, or was
acked (an ack reported complete never comes back); at most the one append in flight at the
kill shows up unreported, and with the right bytes; pending is oldest first. In the "drop"
run the outbox is small, so telemetry is dropped: there boot records must never be lost.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import micropython_bin

SCRIPT = Path(__file__).parent / "mp_scripts" / "outbox_powercut.py"
KILLS = 24


def payload(run: int, n: int) -> bytes:
    """Same generator as the MicroPython script."""
    s = (run * 100003 + n) & 0x7FFFFFFF
    s = (s * 1103515245 + 12345) & 0x7FFFFFFF
    ln = 1 + (s >> 8) % 700
    out = bytearray(ln)
    for i in range(ln):
        s = (s * 1103515245 + 12345) & 0x7FFFFFFF
        out[i] = (s >> 16) & 0xFF
    return bytes(out)


@dataclass
class Model:
    pending: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # reported appended
    acked: set[int] = field(default_factory=set)  # ack reported complete
    maybe_acked: set[int] = field(default_factory=set)  # ack started, not reported
    inflight: tuple[str, bytes] | None = None  # append started, not reported
    appends: int = 0
    acks: int = 0
    dropped: int = 0
    torn_found: int = 0


def check_start(m: Model, found: list[tuple[int, str, int, str]], drops: bool) -> None:
    ids = [f[0] for f in found]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "pending not oldest first"
    by_id = {f[0]: f for f in found}
    for rid in m.acked:
        assert rid not in by_id, f"acked record {rid} came back"
    for rid, (kind, p) in m.pending.items():
        if rid in by_id:
            _, k, ln, digest = by_id[rid]
            assert (k, ln, digest) == (kind, len(p), hashlib.sha256(p).hexdigest()), (
                f"record {rid} changed"
            )
        else:
            assert rid in m.maybe_acked or (drops and kind != "b"), (
                f"appended {kind} record {rid} lost"
            )
    unknown = [f for f in found if f[0] not in m.pending]
    assert len(unknown) <= 1, f"records nobody appended: {unknown}"
    new: dict[int, tuple[str, bytes]] = {}
    if unknown:
        rid, k, ln, digest = unknown[0]
        assert m.inflight is not None and rid == max(ids), (
            "an unreported record that was not in flight"
        )
        assert (k, ln, digest) == (
            m.inflight[0],
            len(m.inflight[1]),
            hashlib.sha256(m.inflight[1]).hexdigest(),
        )
        new[rid] = m.inflight
        m.torn_found += 1
    # what is gone now was acked (or dropped); what is there stays expected
    m.pending = {rid: v for rid, v in m.pending.items() if rid in by_id}
    m.pending.update(new)
    m.maybe_acked.clear()
    m.inflight = None


def apply_run(m: Model, lines: list[str]) -> None:
    """Fold the lines a killed run printed after READY into the model."""
    pending_w: tuple[str, bytes] | None = None
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        tag = parts[0]
        if tag == "W" and len(parts) == 4:
            pending_w = (parts[3], payload(int(parts[1]), int(parts[2])))
        elif tag == "A" and len(parts) == 2 and pending_w is not None:
            if parts[1] != "None":  # dropped on arrival (drop run only)
                rid = int(parts[1])
                m.pending[rid] = pending_w
                m.acked.discard(rid)
            pending_w = None
            m.appends += 1
        elif tag == "D" and len(parts) == 2:
            m.dropped += int(parts[1])
        elif tag == "K?" and len(parts) == 2:
            m.maybe_acked.add(int(parts[1]))
        elif tag == "K" and len(parts) == 2:
            rid = int(parts[1])
            m.maybe_acked.discard(rid)
            m.pending.pop(rid, None)
            m.acked.add(rid)
            m.acks += 1
        # a line cut by the kill is ignored: its step counts as unreported
    m.inflight = pending_w


def start(
    root: Path, run: int, max_bytes: int, seg_bytes: int, err: Path
) -> tuple[subprocess.Popen[str], list[tuple[int, str, int, str]]]:
    # stderr to a file: communicate() on two pipes would bypass what readline() buffered
    with err.open("w") as ef:
        proc = subprocess.Popen(
            [
                micropython_bin(),
                str(SCRIPT),
                str(root),
                str(run),
                str(run * 7919 + 1),
                str(max_bytes),
                str(seg_bytes),
            ],
            stdout=subprocess.PIPE,
            stderr=ef,
            text=True,
        )
    assert proc.stdout is not None
    found = []
    deadline = time.monotonic() + 30
    while True:
        line = proc.stdout.readline()
        assert line, f"script ended before READY: {err.read_text()}"
        if line.startswith("READY"):
            break
        _, rid, kind, ln, digest = line.split()
        found.append((int(rid), kind, int(ln), digest))
        assert time.monotonic() < deadline
    return proc, found


@pytest.mark.parametrize(
    ("mode", "max_bytes", "seg_bytes"), [("keep", 4_000_000, 4096), ("drop", 12_000, 1500)]
)
def test_outbox_survives_sigkill(tmp_path: Path, mode: str, max_bytes: int, seg_bytes: int) -> None:
    rng = random.Random(1234 if mode == "keep" else 5678)
    root = tmp_path / "outbox"
    m = Model()
    for run in range(KILLS + 1):
        proc, found = start(root, run, max_bytes, seg_bytes, tmp_path / "stderr")
        check_start(m, found, drops=mode == "drop")
        if run == KILLS:
            proc.kill()
            proc.wait()
            break
        time.sleep(rng.uniform(0.005, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.stdout is not None
        out = proc.stdout.read()
        assert proc.wait(timeout=30) == -signal.SIGKILL, (tmp_path / "stderr").read_text()
        apply_run(m, out.splitlines())
    assert m.appends > 200 and m.acks > 100, (m.appends, m.acks)
    if mode == "keep":
        assert len(m.pending) > 0 and m.dropped == 0
    else:
        assert m.dropped > 0
