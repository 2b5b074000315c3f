"""The dashboard's HTTP JSON API: read-only, GET only (documented in docs/dashboard.md).

Handlers are plain functions: Starlette runs them in its thread pool, so a view that takes
the state lock never stalls the event loop the agent ingests on.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from agent.wire import SID_RE

from .live import Live

_encode = msgspec.json.Encoder().encode
_HEADERS = {"Cache-Control": "no-store"}


class BadRequest(Exception):
    pass


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(
        _encode(obj), status_code=status, media_type="application/json", headers=_HEADERS
    )


def error(status: int, msg: str) -> Response:
    return json_response({"error": msg}, status)


def _live(request: Request) -> Live:
    live: Live = request.app.state.live
    return live


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= v <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}, got {v}")
    return v


def _sid_param(request: Request, name: str = "sid", required: bool = False) -> str | None:
    sid = request.path_params.get(name) or request.query_params.get(name)
    if sid is None:
        if required:
            raise BadRequest(f"{name} is required")
        return None
    if not SID_RE.fullmatch(sid):
        raise BadRequest(f"bad station id {sid!r}")
    return str(sid)


def _known(live: Live, sid: str | None) -> bool:
    return sid is None or live.view(lambda s, now: sid in s.stations)


def health(request: Request) -> Response:
    return json_response(_live(request).health())


def fleet(request: Request) -> Response:
    return json_response(_live(request).fleet())


def alarms(request: Request) -> Response:
    return json_response(_live(request).view(lambda s, now: s.alarms(now)))


def station(request: Request) -> Response:
    try:
        sid = _sid_param(request, required=True)
    except BadRequest as e:
        return error(400, str(e))
    assert sid is not None
    v = _live(request).view(lambda s, now: s.station(sid, now))
    return error(404, f"no station {sid}") if v is None else json_response(v)


def power(request: Request) -> Response:
    live = _live(request)
    try:
        sid = _sid_param(request)
        minutes = _int_param(request, "minutes", 60, 1, live.cfg.history_s // 60 or 1)
    except BadRequest as e:
        return error(400, str(e))
    if not _known(live, sid):
        return error(404, f"no station {sid}")
    pts = live.view(lambda s, now: s.power(sid, now, minutes))
    return json_response({"sid": sid, "bucket_s": live.cfg.bucket_s, "points": pts})


def energy(request: Request) -> Response:
    live = _live(request)
    try:
        sid = _sid_param(request)
        hours = _int_param(request, "hours", live.cfg.energy_hours, 1, live.cfg.energy_hours)
    except BadRequest as e:
        return error(400, str(e))
    if not _known(live, sid):
        return error(404, f"no station {sid}")
    pts = live.view(lambda s, now: s.energy(sid, now, hours))
    return json_response({"sid": sid, "points": pts})


def daily(request: Request) -> Response:
    live = _live(request)
    try:
        sid = _sid_param(request)
        days = _int_param(request, "days", live.cfg.days, 1, live.cfg.days)
    except BadRequest as e:
        return error(400, str(e))
    if not _known(live, sid):
        return error(404, f"no station {sid}")
    pts = live.view(lambda s, now: s.daily(sid, now, days))
    return json_response({"sid": sid, "points": pts})


async def live_stream(request: Request) -> Response:
    live = _live(request)
    topic = request.query_params.get("topic", "fleet")
    if topic not in ("fleet", "alarms") and not (
        topic.startswith("station:") and SID_RE.fullmatch(topic[8:])
    ):
        return error(400, "topic must be fleet, alarms or station:<SID>")
    if live.hub.closed:
        return error(503, "shutting down")
    first = await run_in_threadpool(live.payload, topic)
    if first is None:
        return error(404, f"no station {topic[8:]}")
    return StreamingResponse(
        live.hub.stream(topic, first),
        media_type="text/event-stream",
        headers={**_HEADERS, "X-Accel-Buffering": "no"},
    )


def routes() -> list[Route]:
    return [
        Route("/api/health", health, methods=["GET"]),
        Route("/api/fleet", fleet, methods=["GET"]),
        Route("/api/alarms", alarms, methods=["GET"]),
        Route("/api/stations/{sid}", station, methods=["GET"]),
        Route("/api/stations/{sid}/power", power, methods=["GET"]),
        Route("/api/stations/{sid}/energy", energy, methods=["GET"]),
        Route("/api/stations/{sid}/daily", daily, methods=["GET"]),
        Route("/api/power", power, methods=["GET"]),
        Route("/api/energy", energy, methods=["GET"]),
        Route("/api/daily", daily, methods=["GET"]),
        Route("/api/live", live_stream, methods=["GET"]),
    ]
