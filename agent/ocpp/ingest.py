"""OCPP frames into the agent's batches (CONTRACT §11): numbering, checks, quarantine.

Each frame a connected charger sends gets its key here: `boot` goes up by one at each
BootNotification (the first one of a new charger is boot 1; frames before any are boot
0), `seq` counts the frames of the boot in the order they were received, on from the
highest key stored (live or archived) when the agent first hears of the charger. The frame
then joins the batch being filled like an MQTT message (Service.enqueue) and the charger
gets its answer once the batch is committed.

Quarantined, not stored, and never numbered: bytes that are no OCPP-J frame
(`ocpp_frame`), and a frame whose OCMF signed meter value does not verify against the
charger's registered public key (`bad_sig`, as a bad HMAC).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import TYPE_CHECKING

from agent.ocpp import frames, ocmf
from agent.ocpp.points import Point, Points
from agent.store import QuarantineRow, RawRow, Store, now_ms

if TYPE_CHECKING:
    from agent.service import Service

log = logging.getLogger(__name__)

BAD_FRAME = "ocpp_frame"
BAD_SIG = "bad_sig"


class OcppIngest:
    def __init__(self, service: Service) -> None:
        self.svc = service
        # its own connection and thread: logins and key numbering never wait on a commit
        self._store = Store(service.cfg.db.url, create=False, app="agent-ocpp")
        self._ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agent-ocpp")
        self._last: dict[str, list[int]] = {}  # sid -> [boot, seq] of its last frame numbered
        self._locks: dict[str, asyncio.Lock] = {}

    def close(self) -> None:
        self._ex.shutdown(wait=True)
        self._store.close()

    async def check(self, sid: str, password: str) -> Point | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._ex, Points(self._store).check, sid, password)

    async def submit(
        self, sid: str, proto: str, frame: bytes, public_key: str
    ) -> tuple[int, int] | None:
        """Store the frame (in raw, or in quarantine) and return once it is committed: its
        (boot, seq), or None when it was quarantined."""
        recv = now_ms()
        topic = frames.topic_of(proto, sid)
        kid = frames.UNCHECKED_KID
        try:
            action = frames.action_of(frame)
            signed = frames.signed_values(proto, frame)
            if signed and public_key:
                for text in signed:
                    ocmf.check(ocmf.parse(text), public_key)
                kid = frames.SIGNED_KID
        except frames.FrameError as e:
            await self._quarantine(recv, topic, BAD_FRAME, str(e), sid, frame)
            return None
        except ocmf.OcmfError as e:
            await self._quarantine(recv, topic, BAD_SIG, f"OCMF: {e}", sid, frame)
            return None
        key = await self._number(sid, action == "BootNotification")
        row = RawRow(sid, key[0], key[1], frames.KIND, topic, recv, kid, frame)
        body = frames.body_of(
            proto, frame, recv, sid, key[0], key[1], checked=kid == frames.SIGNED_KID
        )
        await self.svc.enqueue(row, frames.cleaned(body), None)
        return key

    async def _quarantine(
        self, recv: int, topic: str, reason: str, detail: str, sid: str, frame: bytes
    ) -> None:
        log.warning("OCPP %s: frame quarantined (%s): %s", sid, reason, detail)
        await self.svc.enqueue(None, None, QuarantineRow(recv, topic, reason, detail, sid, frame))

    async def _number(self, sid: str, boot: bool) -> tuple[int, int]:
        last = self._last.get(sid)
        if last is None:
            lock = self._locks.setdefault(sid, asyncio.Lock())
            async with lock:
                last = self._last.get(sid)
                if last is None:
                    loop = asyncio.get_running_loop()
                    top = await loop.run_in_executor(self._ex, self._store.top_key, sid)
                    last = self._last[sid] = list(top) if top is not None else [0, -1]
        if boot:
            last[0] += 1
            last[1] = 0
        else:
            last[1] += 1
        return last[0], last[1]
