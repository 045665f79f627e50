"""The live series list (``/series``) and its JSON (``/api/series``), with filters."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dicom_node.registry import State
from dicom_node.web.auth import Session
from dicom_node.web.core import WebApp, series_json


def _filters(request: Request) -> dict[str, Any]:
    q = request.query_params
    states = [s for s in q.getlist("state") if s in State.__members__] or None
    since = until = None
    try:
        if q.get("from"):
            since = datetime.strptime(q["from"], "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
        if q.get("to"):
            until = datetime.strptime(q["to"], "%Y-%m-%d").replace(tzinfo=UTC).timestamp() + 86400
    except ValueError:
        pass
    return {"states": states, "since": since, "until": until}


def _rows(w: WebApp, filters: dict[str, Any]) -> list[dict[str, Any]]:
    reg = w.ctx.registry
    return [series_json(reg, s, w.ctx.spool_root) for s in reg.list_series(**filters)]


async def series_page(w: WebApp, request: Request, sess: Session) -> Response:
    f = _filters(request)
    return w.page(
        "series.html",
        request,
        sess,
        rows=_rows(w, f),
        states=[s.value for s in State],
        selected=f["states"] or [],
        date_from=request.query_params.get("from", ""),
        date_to=request.query_params.get("to", ""),
    )


async def series_api(w: WebApp, request: Request, sess: Session) -> Response:
    return JSONResponse({"series": _rows(w, _filters(request)), "now": time.time()})


def routes(w: WebApp) -> list[Route]:
    return [
        w.route("/series", series_page),
        w.route("/api/series", series_api, api=True),
    ]
