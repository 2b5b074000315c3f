"""The dashboard's HTTP JSON API (documented in docs/dashboard.md): GET only, but for
`POST /api/alarms/ack` when the app has a users database (agent/dashboard/auth.py).

Handlers are plain functions: Starlette runs them in its thread pool, so a view that takes
the state lock never stalls the event loop the agent ingests on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from agent.wire import SID_RE

from . import history as h
from .auth import Auth, me, principal
from .history import BadRequest
from .live import Live
from .reader import DB_ERRORS, one_line
from .state import DAY_MS, FleetState
from .users import UserStore

_encode = msgspec.json.Encoder().encode
_HEADERS = {"Cache-Control": "no-store"}


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


def _users(request: Request) -> UserStore | None:
    auth: Auth | None = request.app.state.auth
    return None if auth is None else auth.store


def health(request: Request) -> Response:
    h = _live(request).health()
    auth: Auth | None = request.app.state.auth
    if auth is not None:
        h["auth"] = {"login": auth.mode, **auth.counters}
    return json_response(h)


def csv_response(body: bytes, name: str) -> Response:
    return Response(
        body,
        media_type="text/csv; charset=utf-8",
        headers={**_HEADERS, "Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


def fleet(request: Request) -> Response:
    """The fleet; with `q`, `state`, `source`, `sort`, `dir` its stations as the page filters and
    sorts them; `format=csv`: those rows as CSV."""
    q = request.query_params
    try:
        csv = h.want_csv(q)
        view = _live(request).fleet()
        if csv or any(k in q for k in ("q", "state", "source", "sort", "dir")):
            view["stations"] = h.filter_stations(view["stations"], q)
    except BadRequest as e:
        return error(400, str(e))
    if csv:
        day = h.day_of(view["now"]).isoformat()
        return csv_response(
            h.to_csv(h.stations_csv(view["carbon"]), view["stations"]), f"stations_{day}"
        )
    return json_response(view)


def _today(state: FleetState, now: int, sid: str | None = None) -> int:
    """The start of today on the station's clock (the fleet's median clock for None)."""
    t = now + state.offset(sid)
    return t - t % DAY_MS


def _unreadable(e: Exception) -> Response:
    return error(503, one_line(e))


def sessions(request: Request) -> Response:
    """Completed charging sessions (session records) that started in the range, newest
    first, a page at a time."""
    q = request.query_params
    live = _live(request)
    try:
        sid = _sid_param(request)
        limit = _int_param(request, "limit", 100, 1, 1000)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        csv = h.want_csv(q)
        today = live.view(lambda s, now: _today(s, now, sid))
        rng = h.parse_range(q, today)
    except BadRequest as e:
        return error(400, str(e))
    try:
        total, recs = live.read(
            lambda r: r.session_records(rng.from_ms, rng.to_ms, sid, limit, offset)
        )
    except (RuntimeError, *DB_ERRORS) as e:
        return _unreadable(e)
    rows = [h.session_row(x) for x in recs]
    if csv:
        return csv_response(h.to_csv(h.SESSION_CSV, rows), f"sessions_{rng.label}")
    return json_response(
        {
            **rng.as_json(),
            "today": h.day_of(today).isoformat(),
            "sid": sid,
            "total": total,
            "limit": limit,
            "offset": offset,
            "sessions": rows,
        }
    )


def energy_daily(request: Request) -> Response:
    """kWh per station and UTC day (station clock) with each day's completeness."""
    q = request.query_params
    live = _live(request)

    def clocks(s: FleetState, now: int) -> tuple[int, dict[str, int], Any, Any]:
        return _today(s, now), {x: _today(s, now, x) for x in s.stations}, s.params, s.carbon_info()

    try:
        sid = _sid_param(request)
        csv = h.want_csv(q)
        fleet_today, todays, params, info = live.view(clocks)
        today = todays.get(sid, fleet_today) if sid else fleet_today
        rng = h.parse_range(q, today)
    except BadRequest as e:
        return error(400, str(e))
    try:
        days, cover = live.read(
            lambda r: (
                r.day_records_between(rng.from_ms, rng.to_ms, sid),
                r.interval_coverage(rng.from_ms, rng.to_ms, sid),
            )
        )
    except (RuntimeError, *DB_ERRORS) as e:
        return _unreadable(e)
    rows = h.daily_rows(days, cover, rng, lambda x: todays.get(x, fleet_today), params, sid)
    if csv:
        return csv_response(h.to_csv(h.daily_csv(info), rows), f"energy-daily_{rng.label}")
    return json_response(
        {
            **rng.as_json(),
            "today": h.day_of(today).isoformat(),
            "sid": sid,
            "rows": rows,
            "totals": {
                "mwh": sum(x["mwh"] for x in rows),
                "grid_mwh": sum(x["grid_mwh"] for x in rows),
                "incomplete": sum(not x["complete"] for x in rows),
            },
            "carbon": info,
        }
    )


def alarm_history(request: Request) -> Response:
    """Alarms raised in the range (agent clock), newest first, a page at a time: who
    acknowledged each and when."""
    q = request.query_params
    live = _live(request)
    try:
        sid = _sid_param(request)
        limit = _int_param(request, "limit", 100, 1, 1000)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        csv = h.want_csv(q)
        now = live.clock()
        rng = h.parse_range(q, now)
    except BadRequest as e:
        return error(400, str(e))
    occ = live.view(lambda s, _now: s.history(sid, rng.from_ms, rng.to_ms))
    try:
        agent_rows = live.read(lambda r: r.alarms_between(rng.from_ms, rng.to_ms, sid))
    except (RuntimeError, *DB_ERRORS) as e:
        return _unreadable(e)
    store = _users(request)
    acks: list[Any] = []
    if store is not None:
        acks = [*store.acks([(o["id"], o["since_ms"]) for o in occ]).values()]
        acks += store.acks_between(rng.from_ms, rng.to_ms)
    items = h.alarm_history(occ, agent_rows, acks, sid)
    page = items[offset : offset + limit]
    if csv:
        return csv_response(h.to_csv(h.ALARM_CSV, page), f"alarms_{rng.label}")
    return json_response(
        {
            **rng.as_json(),
            "today": h.day_of(now).isoformat(),
            "sid": sid,
            "total": len(items),
            "limit": limit,
            "offset": offset,
            "items": page,
        }
    )


def with_acks(store: UserStore | None, view: dict[str, Any]) -> dict[str, Any]:
    """The alarms view with `acked_by` and `acked_at` (null when not acknowledged) on each
    active alarm, from the users database."""
    if store is None:
        return view
    found = store.acks([(a["id"], a["since_ms"]) for a in view["active"]])
    for a in view["active"]:
        ack = found.get((a["id"], a["since_ms"]))
        a["acked_by"] = ack.user if ack else None
        a["acked_at"] = ack.at_ms if ack else None
    return view


def alarms(request: Request) -> Response:
    view = _live(request).view(lambda s, now: s.alarms(now))
    return json_response(with_acks(_users(request), view))


async def ack(request: Request) -> Response:
    """Acknowledge an active alarm: `{"id": "SID:code[:slot]", "since_ms": …}` (since_ms
    optional: it pins the alarm's occurrence, so an acknowledgement meant for one that has
    since cleared and come back is refused with 409). Role operator or above."""
    store = _users(request)
    p = principal(request)
    assert store is not None and p is not None  # routed only with a users db and the middleware
    if not p.may("operator"):
        return error(403, f"acknowledging alarms needs role operator (you are {p.role})")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return error(415, "send JSON")
    try:
        body = msgspec.json.decode(await request.body())
        aid, since = body.get("id"), body.get("since_ms")
        if not isinstance(aid, str) or not (since is None or type(since) is int):
            raise TypeError
    except (msgspec.DecodeError, AttributeError, TypeError):
        return error(400, 'send {"id": "<alarm id>", "since_ms": <its since_ms>}')
    live = _live(request)
    active = await run_in_threadpool(
        live.view, lambda s, now: {a["id"]: a["since_ms"] for a in s.active()}
    )
    if aid not in active:
        return error(404, f"no active alarm {aid}")
    if since is not None and since != active[aid]:
        return error(409, f"alarm {aid} has cleared and been raised again since")
    a = await run_in_threadpool(store.ack, aid, active[aid], p.name)
    return json_response(
        {"id": a.alarm_id, "since_ms": a.since_ms, "acked_by": a.user, "acked_at": a.at_ms}
    )


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
    stream = live.hub.stream(topic, first)
    store = _users(request)
    if topic == "alarms" and store is not None:
        stream = _acked(store, stream)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={**_HEADERS, "X-Accel-Buffering": "no"},
    )


async def _acked(store: UserStore, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The alarms topic's messages with their acknowledgements (the hub's payload is the
    same for every client; acknowledgements live in the users database)."""

    def add(chunk: bytes) -> bytes:
        lines = chunk.split(b"\n")
        for i, line in enumerate(lines):
            if line.startswith(b"data: "):
                view = with_acks(store, msgspec.json.decode(line[6:]))
                lines[i] = b"data: " + _encode(view)
        return b"\n".join(lines)

    async for chunk in stream:
        yield await run_in_threadpool(add, chunk) if b"data: " in chunk else chunk


def ack_routes() -> list[Route]:
    return [Route("/api/alarms/ack", ack, methods=["POST"])]


def routes() -> list[Route]:
    return [
        Route("/api/health", health, methods=["GET"]),
        Route("/api/me", me, methods=["GET"]),
        Route("/api/fleet", fleet, methods=["GET"]),
        Route("/api/alarms", alarms, methods=["GET"]),
        Route("/api/alarms/history", alarm_history, methods=["GET"]),
        Route("/api/sessions", sessions, methods=["GET"]),
        Route("/api/energy/daily", energy_daily, methods=["GET"]),
        Route("/api/stations/{sid}", station, methods=["GET"]),
        Route("/api/stations/{sid}/power", power, methods=["GET"]),
        Route("/api/stations/{sid}/energy", energy, methods=["GET"]),
        Route("/api/stations/{sid}/daily", daily, methods=["GET"]),
        Route("/api/power", power, methods=["GET"]),
        Route("/api/energy", energy, methods=["GET"]),
        Route("/api/daily", daily, methods=["GET"]),
        Route("/api/live", live_stream, methods=["GET"]),
    ]
