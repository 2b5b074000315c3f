"""A rig's relays stop when cancelled, whenever the cancellation comes: also in the same
turn of the loop as the bytes they wait for (tools/rig/line.py `Rx.wait`)."""

from __future__ import annotations

import asyncio
import os

from tools.rig.line import Pty, Rx


async def _cancelled_as_bytes_come(yields: int) -> str:
    """Rx.wait(timeout) waiting; bytes arrive, `yields` turns of the loop pass, then the
    waiting task is cancelled. What the task ended with ("done before": it had returned
    before the cancellation)."""
    loop = asyncio.get_running_loop()
    pty = Pty()
    rx = Rx(loop, pty.master)
    try:
        task = asyncio.create_task(rx.wait(5.0))
        await asyncio.sleep(0.01)  # waiting
        os.write(pty.slave, b"\x01")
        deadline = loop.time() + 5.0
        while not rx.buf:  # until the reader callback ran: the event is set
            assert loop.time() < deadline, "the byte never reached the master"
            await asyncio.sleep(0)
        for _ in range(yields):
            await asyncio.sleep(0)
        if task.done():
            return "done before"
        task.cancel()
        try:
            got = await task
        except asyncio.CancelledError:
            return "cancelled"
        return f"returned {got!r}"
    finally:
        rx.close()
        pty.close()


def test_a_wait_cancelled_as_its_bytes_come_is_cancelled() -> None:
    """Python 3.11's asyncio.wait_for returns the inner result when the cancellation and
    the result come in the same turn, so the cancellation is lost: a relay's loop went
    on and the rig's stop waited for it until its 30 s timeout."""
    got = [asyncio.run(_cancelled_as_bytes_come(k)) for k in range(6)]
    assert "cancelled" in got, got  # (the turns that matter are covered)
    assert set(got) <= {"cancelled", "done before"}, got
