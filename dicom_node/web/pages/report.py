"""The report of one series (``/series/{uid}/report``, its PDF and PNG)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from dicom_node.web import reportdata
from dicom_node.web.auth import Session
from dicom_node.web.core import WebApp


async def report_page(w: WebApp, request: Request, sess: Session) -> Response:
    uid = request.path_params["uid"]
    data = reportdata.report_data(w.ctx, uid)
    if data is None:
        return HTMLResponse("no stored results for this series", status_code=404)
    w.audit(request, sess, "view_report", uid)
    return w.page("report.html", request, sess, uid=uid, r=data)


async def report_file(w: WebApp, request: Request, sess: Session) -> Response:
    uid = request.path_params["uid"]
    fmt = request.path_params["fmt"]
    data = reportdata.report_data(w.ctx, uid)
    if data is None or fmt not in ("pdf", "png"):
        return Response(status_code=404)
    pdf, png = await asyncio.to_thread(reportdata.cached_render, w.ctx.spool_root, uid, data)
    body, mt = (pdf, "application/pdf") if fmt == "pdf" else (png, "image/png")
    return Response(body, media_type=mt)


def routes(w: WebApp) -> list[Route]:
    return [
        w.route("/series/{uid}/report", report_page),
        w.route("/series/{uid}/report.{fmt}", report_file),
    ]
