"""ChargerLink over a real pty: the firmware's unix HAL Serial on the slave end, a charger
controller stand-in answering on the master end in a thread. The same polls run in-process
on CPython and as a script on the MicroPython unix port."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from functools import reduce
from pathlib import Path
from typing import Any

from tests.helpers import FIRMWARE, micropython_bin

TIMEOUT_MS = 500  # generous: the machine is shared, a reply thread may be scheduled late


def _line(body: bytes, cs: int | None = None) -> bytes:
    c = reduce(lambda a, b: a ^ b, body, 0) if cs is None else cs
    return b"$" + body + b"*%02X\r\n" % c


# What the stand-in controller does for each polled slot, and what the poll must count.
# expect: (reading?, ser_to, ser_cs, ser_bad) cumulative after that poll.
CASES: list[tuple[int, str, tuple[bool, int, int, int]]] = [
    (1, "good reply", (True, 0, 0, 0)),
    (2, "noise, a malformed line, then the reply", (True, 0, 0, 0)),
    (3, "reply for another slot, then silence", (False, 0, 0, 1)),
    (4, "bad checksum", (False, 0, 1, 1)),
    (5, "silence", (False, 1, 1, 1)),
    (6, "partial line, then silence", (False, 2, 1, 1)),
    (7, "malformed line, then silence", (False, 2, 1, 2)),
    (8, "reply in pieces", (True, 2, 1, 2)),
]


class Controller(threading.Thread):
    """Answers requests on the pty master according to the polled slot."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.stop = threading.Event()
        self.requests: list[bytes] = []
        self.bad_requests = 0

    def answer(self, slot: int) -> None:
        w = lambda b: os.write(self.fd, b)
        if slot == 1:
            w(_line(b"C,1,C,67200,15250,312,0"))
        elif slot == 2:
            w(b"\x00\xff~~noise")
            w(_line(b"C,2,C,67200,015250,312,0"))
            w(_line(b"C,2,V,84000,1200,290,0"))
        elif slot == 3:
            w(_line(b"C,13,C,67200,15250,312,0"))
        elif slot == 4:
            w(_line(b"C,4,C,67200,15250,312,0", cs=0x00))
        elif slot == 5:
            pass
        elif slot == 6:
            w(b"$C,6,C,672")
        elif slot == 7:
            w(_line(b"C,7,C,67200,15250,312"))
        elif slot == 8:
            line = _line(b"C,8,F,84100,0,305,0")
            for i in range(0, len(line), 5):
                w(line[i : i + 5])
                time.sleep(0.01)

    def run(self) -> None:
        buf = b""
        while not self.stop.is_set():
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if not r:
                continue
            try:
                buf += os.read(self.fd, 256)
            except OSError:
                return
            while (m := re.search(rb"\$Q,(\d+)\*([0-9A-F]{2})\r\n", buf)) is not None:
                buf = buf[m.end() :]
                body = m.group(0)[1:-5]
                if reduce(lambda a, b: a ^ b, body, 0) != int(m.group(2), 16):
                    self.bad_requests += 1
                    continue
                self.requests.append(m.group(0))
                self.answer(int(m.group(1)))


def _pty() -> tuple[int, int, str]:
    master, slave = os.openpty()
    return master, slave, os.ttyname(slave)


def _check(results: list[dict[str, Any]]) -> None:
    assert [r["slot"] for r in results] == [c[0] for c in CASES]
    for r, (slot, what, (reading, to, cs, bad)) in zip(results, CASES, strict=False):
        got = (r["reply"] is not None, r["err"]["ser_to"], r["err"]["ser_cs"], r["err"]["ser_bad"])
        assert got == (reading, to, cs, bad), (slot, what, r)
        if reading:
            assert r["reply"][0] == slot, r
    assert results[0]["reply"] == [1, "C", 67200, 15250, 312, 0]
    assert results[1]["reply"] == [2, "V", 84000, 1200, 290, 0]
    assert results[-1]["reply"] == [8, "F", 84100, 0, 305, 0]
    assert results[-1]["ok"] == 3


async def test_charger_link_on_a_pty_cpython() -> None:
    sys.path.insert(0, str(FIRMWARE))
    from charger_link import ChargerLink  # type: ignore[import-not-found]
    from hal.unix import Serial  # type: ignore[import-not-found]

    master, slave, path = _pty()
    ctl = Controller(master)
    ser = Serial(path, 115200)
    ctl.start()
    try:
        link = ChargerLink(ser, timeout_ms=TIMEOUT_MS)
        results = []
        for slot, _, _ in CASES:
            r = await link.poll(slot)
            fields = None if r is None else [r.slot, r.state, r.mv, r.ma, r.t, r.fault]
            results.append({"slot": slot, "reply": fields, "err": dict(link.err), "ok": link.ok})
        _check(results)
        assert len(ctl.requests) == len(CASES) and ctl.bad_requests == 0
        assert ctl.requests[0] == b"$Q,1*4C\r\n"
    finally:
        ctl.stop.set()
        ctl.join(2)
        ser.close()
        os.close(master)
        os.close(slave)


MP_SCRIPT = """
import sys
sys.path.insert(0, %(fw)r)
import json
import asyncio
from hal.unix import Serial
from charger_link import ChargerLink

async def main():
    link = ChargerLink(Serial(%(path)r, 115200), timeout_ms=%(timeout)d)
    for slot in %(slots)r:
        r = await link.poll(slot)
        fields = None if r is None else [r.slot, r.state, r.mv, r.ma, r.t, r.fault]
        print(json.dumps({"slot": slot, "reply": fields, "err": link.err, "ok": link.ok}))

asyncio.run(main())
"""


def test_charger_link_on_a_pty_micropython(tmp_path: Path) -> None:
    master, slave, path = _pty()
    ctl = Controller(master)
    ctl.start()
    script = tmp_path / "pty_poll.py"
    script.write_text(
        MP_SCRIPT
        % {
            "fw": str(FIRMWARE),
            "path": path,
            "timeout": TIMEOUT_MS,
            "slots": [c[0] for c in CASES],
        }
    )
    try:
        proc = subprocess.run(
            [micropython_bin(), str(script)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        ctl.stop.set()
        ctl.join(2)
        os.close(master)
        os.close(slave)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    _check(results)
    assert len(ctl.requests) == len(CASES) and ctl.bad_requests == 0
