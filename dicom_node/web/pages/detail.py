"""One series (``/series/{uid}``): thumbnails, volumes, QC, outbox, logs, and the operator
buttons (retry, resend dead letters, release a HELD series), each audited."""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route

from dicom_node.logging import log_event
from dicom_node.registry import FINAL_STATES, IllegalTransition, State
from dicom_node.seriesstore import load_series
from dicom_node.web.auth import Session
from dicom_node.web.core import WebApp, fmt_time, series_json

log = logging.getLogger("synthmr.web")


def _detail(w: WebApp, uid: str) -> dict[str, Any] | None:
    reg = w.ctx.registry
    row = reg.series(uid)
    if row is None:
        return None
    stored = load_series(w.ctx.spool_root, uid)
    meta = stored.meta if stored else {}
    return {
        "series": series_json(reg, row, w.ctx.spool_root),
        "timeline": [
            {"from": a, "to": b, "at": fmt_time(t), "reason": r} for a, b, t, r in reg.timeline(uid)
        ],
        "outbox": reg.outbox_of(uid),
        "dead": reg.dead_outbox_count(uid),
        "volumes_ml": meta.get("volumes_ml") or {},
        "qc": {k: v for k, v in (meta.get("qc") or {}).items() if not isinstance(v, dict | list)},
        "synthetic": meta.get("synthetic") or {},
        "map_thumbs": meta.get("map_thumbs") or [],
        "dir_parameters": meta.get("dir_parameters") or {},
        "warnings": meta.get("warnings") or [],
        "logs": w.ctx.logs.lines(uid),
        "audit": reg.audit_log(uid, 50),
        "missing": row.missing,
        "retryable": row.state in FINAL_STATES or row.state == State.EXPORTED,
        "releasable": row.state == State.HELD,
    }


async def detail_page(w: WebApp, request: Request, sess: Session) -> Response:
    uid = request.path_params["uid"]
    d = _detail(w, uid)
    if d is None:
        return HTMLResponse("unknown series", status_code=404)
    msg = request.query_params.get("msg", "")
    return w.page("detail.html", request, sess, d=d, uid=uid, message=msg)


async def detail_api(w: WebApp, request: Request, sess: Session) -> Response:
    d = _detail(w, request.path_params["uid"])
    if d is None:
        return JSONResponse({"error": "unknown series"}, status_code=404)
    return JSONResponse(d)


async def thumb(w: WebApp, request: Request, sess: Session) -> Response:
    stored = load_series(w.ctx.spool_root, request.path_params["uid"])
    name = request.path_params["name"]
    p = stored.thumb(name) if stored and re.fullmatch(r"[A-Za-z0-9_]{1,32}", name) else None
    if p is None:
        return Response(status_code=404)
    return FileResponse(p, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


async def retry(w: WebApp, request: Request, sess: Session) -> Response:
    uid = request.path_params["uid"]
    try:
        if w.ctx.retry is None:
            raise RuntimeError("retry is not available on this node")
        job = w.ctx.retry(uid)
        msg = f"series re-queued (job {job})"
    except (KeyError, IllegalTransition, RuntimeError) as exc:
        msg = f"retry refused: {exc}"
    w.audit(request, sess, "retry", uid, msg)
    log_event(log, "web_retry", series_uid=uid, user=sess.user, result=msg)
    return _after_action(request, uid, msg)


async def resend(w: WebApp, request: Request, sess: Session) -> Response:
    uid = request.path_params["uid"]
    n = w.ctx.registry.requeue_dead_outbox(uid)
    w.ctx.wake_outbox()
    msg = f"{n} dead letters queued again"
    w.audit(request, sess, "resend_dead_letters", uid, msg)
    log_event(log, "web_resend", series_uid=uid, user=sess.user, items=n)
    return _after_action(request, uid, msg)


async def release(w: WebApp, request: Request, sess: Session) -> Response:
    """What ``synthmr retry --release`` does: a HELD (QC-failed) series' outputs are sent as
    they are (HELD -> EXPORTED, its HELD outbox rows PENDING)."""
    uid = request.path_params["uid"]
    try:
        n = w.ctx.registry.release_held(uid)
        w.ctx.wake_outbox()
        msg = f"series released: {n} held outbox item(s) queued"
    except (KeyError, IllegalTransition) as exc:
        msg = f"release refused: {exc}"
    w.audit(request, sess, "release", uid, msg)
    log_event(log, "web_release", series_uid=uid, user=sess.user, result=msg)
    return _after_action(request, uid, msg)


def _after_action(request: Request, uid: str, msg: str) -> Response:
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"message": msg})
    return RedirectResponse(f"/series/{uid}?msg={quote(msg)}", status_code=303)


def routes(w: WebApp) -> list[Route]:
    return [
        w.route("/series/{uid}", detail_page),
        w.route("/api/series/{uid}", detail_api, api=True),
        w.route("/series/{uid}/thumb/{name}.png", thumb),
        w.route("/series/{uid}/retry", retry, role="operator", methods=["POST"]),
        w.route("/series/{uid}/resend", resend, role="operator", methods=["POST"]),
        w.route("/series/{uid}/release", release, role="operator", methods=["POST"]),
    ]
