"""The agent's charging-station management endpoint: OCPP 1.6J and 2.0.1 over WebSocket
(CONTRACT §11), on the `ocpp` library's ChargePoint classes and `websockets`.

A charger connects to `ws(s)://<listen>/<identity>` with subprotocol `ocpp1.6` or
`ocpp2.0.1` and HTTP Basic auth (its identity and password: OCPP security profile 1 on
loopback, 2 — TLS — anywhere else; `[ocpp]` in the agent's config refuses plain
WebSocket off loopback). Every frame it sends is handed to `submit` and answered only
once `submit` returns: the frame is then committed in raw (or in quarantine), so an
answer the charger has seen is never for a frame the ledger lacks; a charger whose
frame could not be committed gets no answer and sends it again.

What is answered: BootNotification (Accepted), Heartbeat, StatusNotification, Authorize
(the configured id tags; "*" accepts any), StartTransaction (the transactionId is a
function of the frame's key: agent/ocpp/frames.py), StopTransaction, MeterValues,
TransactionEvent. Anything else gets the library's NotImplemented error (and is kept).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import json
import logging
import ssl
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from ocpp.routing import on as _on
from ocpp.v16 import ChargePoint as Cp16
from ocpp.v16 import call_result as r16
from ocpp.v16.enums import Action as A16
from ocpp.v16.enums import AuthorizationStatus as Auth16
from ocpp.v16.enums import RegistrationStatus as Reg16
from ocpp.v201 import ChargePoint as Cp201
from ocpp.v201 import call_result as r201
from ocpp.v201.enums import Action as A201
from ocpp.v201.enums import AuthorizationStatusEnumType as Auth201
from ocpp.v201.enums import RegistrationStatusEnumType as Reg201
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from agent.config import OcppConfig
from agent.ocpp.frames import CALL, CALLERROR, PROTOCOLS, FrameError, parse, transaction_id
from agent.ocpp.points import Point

log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])


def on(action: Any) -> Callable[[_F], _F]:
    """The library's handler decorator, typed."""
    return cast(Callable[[_F], _F], _on(action))


MAX_WS_FRAME = 4 << 20  # the socket's limit; a frame over frames.MAX_FRAME is quarantined whole
GARBAGE_CLOSE = 20  # frames in a row that are not OCPP-J: the connection is closed
LOGIN_TTL_S = 60.0  # a login checked this recently is not checked again

# (sid, proto, frame bytes, the point's OCMF key) -> the frame's (boot, seq) once committed
# in raw, None once committed in quarantine
Submit = Callable[[str, str, bytes, str], Awaitable[tuple[int, int] | None]]
Check = Callable[[str, str], Awaitable[Point | None]]


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Link:
    """What the two protocol classes share: frames go to the ledger before the library
    routes (and answers) them."""

    ep: Endpoint
    proto: str
    key: tuple[int, int] | None
    point: Point
    garbage: int

    async def route_message(self, raw: str | bytes) -> None:
        frame = raw.encode() if isinstance(raw, str) else raw
        key = await self.ep.submit(self.point.sid, self.proto, frame, self.point.public_key)
        if key is None:  # quarantined (committed there): a CALL gets a CALLERROR
            self.garbage += 1
            self.ep.counters["ocpp_quarantined"] += 1
            if self.garbage >= GARBAGE_CLOSE:
                raise ConnectionAbortedError(f"{GARBAGE_CLOSE} bad frames in a row")
            with contextlib.suppress(FrameError):
                msg = parse(frame)
                if msg[0] == CALL:  # (a signed value that does not verify)
                    err = [CALLERROR, msg[1], "SecurityError", "signed meter value refused", {}]
                    await self._send(json.dumps(err))  # type: ignore[attr-defined]
            return
        self.garbage = 0
        self.key = key
        self.ep.counters["ocpp_frames"] += 1
        await super().route_message(raw)  # type: ignore[misc]

    def accepts(self, tag: Any) -> bool:
        tags = self.ep.cfg.id_tags
        return "*" in tags or (isinstance(tag, str) and tag in tags)

    def txid(self) -> int:
        assert self.key is not None
        return transaction_id(self.point.sid, *self.key)


class Point16(_Link, Cp16):  # type: ignore[misc]
    proto = "ocpp1.6"

    def _tag(self, tag: Any) -> dict[str, str]:
        return {"status": Auth16.accepted if self.accepts(tag) else Auth16.invalid}

    @on(A16.boot_notification)
    def on_boot(self, **_: Any) -> Any:
        return r16.BootNotification(
            current_time=_now_iso(), interval=self.ep.cfg.heartbeat_s, status=Reg16.accepted
        )

    @on(A16.heartbeat)
    def on_heartbeat(self, **_: Any) -> Any:
        return r16.Heartbeat(current_time=_now_iso())

    @on(A16.status_notification)
    def on_status(self, **_: Any) -> Any:
        return r16.StatusNotification()

    @on(A16.authorize)
    def on_authorize(self, id_tag: Any = None, **_: Any) -> Any:
        return r16.Authorize(id_tag_info=self._tag(id_tag))

    @on(A16.start_transaction)
    def on_start(self, id_tag: Any = None, **_: Any) -> Any:
        return r16.StartTransaction(transaction_id=self.txid(), id_tag_info=self._tag(id_tag))

    @on(A16.stop_transaction)
    def on_stop(self, id_tag: Any = None, **_: Any) -> Any:
        return r16.StopTransaction(id_tag_info=self._tag(id_tag) if id_tag else None)

    @on(A16.meter_values)
    def on_meter_values(self, **_: Any) -> Any:
        return r16.MeterValues()


class Point201(_Link, Cp201):  # type: ignore[misc]
    proto = "ocpp2.0.1"

    def _token(self, tok: Any) -> dict[str, str]:
        tag = tok.get("id_token") if isinstance(tok, dict) else None
        return {"status": Auth201.accepted if self.accepts(tag) else Auth201.invalid}

    @on(A201.boot_notification)
    def on_boot(self, **_: Any) -> Any:
        return r201.BootNotification(
            current_time=_now_iso(), interval=self.ep.cfg.heartbeat_s, status=Reg201.accepted
        )

    @on(A201.heartbeat)
    def on_heartbeat(self, **_: Any) -> Any:
        return r201.Heartbeat(current_time=_now_iso())

    @on(A201.status_notification)
    def on_status(self, **_: Any) -> Any:
        return r201.StatusNotification()

    @on(A201.authorize)
    def on_authorize(self, id_token: Any = None, **_: Any) -> Any:
        return r201.Authorize(id_token_info=self._token(id_token))

    @on(A201.transaction_event)
    def on_transaction(self, id_token: Any = None, **_: Any) -> Any:
        return r201.TransactionEvent(id_token_info=self._token(id_token) if id_token else None)

    @on(A201.meter_values)
    def on_meter_values(self, **_: Any) -> Any:
        return r201.MeterValues()


class Endpoint:
    """`await Endpoint(cfg, submit, check).start()`; `.port` once started; `await .stop()`."""

    def __init__(self, cfg: OcppConfig, submit: Submit, check: Check) -> None:
        self.cfg = cfg
        self.submit = submit
        self.check = check
        self.counters: Counter[str] = Counter()
        self.port = 0
        self.connected: dict[str, ServerConnection] = {}
        self._server: Server | None = None
        # sid -> (sha256 of the password, point, when checked): a reconnect within LOGIN_TTL_S
        # is not hashed again; after it a revoked point or a new password takes effect
        self._logins: dict[str, tuple[bytes, Point, float]] = {}

    async def start(self) -> None:
        host, port = self.cfg.host_port()
        tls = None
        if self.cfg.tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.cfg.tls_cert, self.cfg.tls_key)
        self._server = await serve(
            self._serve,
            host,
            port,
            subprotocols=[PROTOCOLS[1], PROTOCOLS[0]],  # type: ignore[list-item]
            process_request=self._login,
            ssl=tls,
            max_size=MAX_WS_FRAME,
            ping_interval=60,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        log.info("OCPP endpoint on %s:%d (%s)", host, self.port, "TLS" if tls else "plain")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _login(self, conn: ServerConnection, req: Request) -> Response | None:
        """HTTP Basic auth: the user is the identity in the path, the password its own."""
        sid = _identity(req.path)
        user, pw = _basic(req.headers)
        if sid is None or user != sid or pw is None:
            self.counters["ocpp_refused"] += 1
            return _unauthorized(conn)
        h = hashlib.sha256(pw.encode()).digest()
        known = self._logins.get(sid)
        now = time.monotonic()
        if known is not None and known[0] == h and now - known[2] < LOGIN_TTL_S:
            return None
        point = await self.check(sid, pw)
        if point is None:
            self.counters["ocpp_refused"] += 1
            log.warning("OCPP: %s refused (unknown, revoked or wrong password)", sid)
            self._logins.pop(sid, None)
            return _unauthorized(conn)
        self._logins[sid] = (h, point, now)
        return None

    async def _serve(self, ws: ServerConnection) -> None:
        sid = _identity(ws.request.path if ws.request else "")
        login = self._logins.get(sid or "")
        if sid is None or login is None or ws.subprotocol not in PROTOCOLS:
            await ws.close(1002, "an OCPP subprotocol (ocpp1.6, ocpp2.0.1) is required")
            return
        old = self.connected.get(sid)
        if old is not None:  # the charger came back: its old socket is dead to it
            self.counters["ocpp_replaced"] += 1
            await old.close(1000, "replaced by a new connection")
        self.connected[sid] = ws
        cls = Point16 if ws.subprotocol == PROTOCOLS[0] else Point201
        cp = cls(sid, ws, response_timeout=30)
        cp.ep, cp.key, cp.point, cp.garbage = self, None, login[1], 0
        self.counters["ocpp_connects"] += 1
        log.info("OCPP: %s connected (%s)", sid, ws.subprotocol)
        try:
            await cp.start()
        except ConnectionAbortedError as e:
            log.warning("OCPP: %s closed: %s", sid, e)
            await ws.close(1008, str(e))
        except Exception as e:  # noqa: BLE001  (a closed socket, a stopping agent)
            log.info("OCPP: %s disconnected (%s)", sid, type(e).__name__)
        finally:
            if self.connected.get(sid) is ws:
                del self.connected[sid]


def _identity(path: str) -> str | None:
    last = urllib.parse.unquote(path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])
    return last if last and len(last) <= 48 else None


def _basic(headers: Headers) -> tuple[str | None, str | None]:
    h = headers.get("Authorization", "")
    if not h.startswith("Basic "):
        return None, None
    try:
        user, _, pw = base64.b64decode(h[6:], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return user, pw


def _unauthorized(conn: ServerConnection) -> Response:
    r = conn.respond(401, "unknown charge point or wrong password\n")
    r.headers["WWW-Authenticate"] = 'Basic realm="ocpp"'
    return r
