"""Phantom-QC history per scanner (``/scanners``, dicom_node.qc_history): latest figures and
a plot of the array errors over time."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dicom_node.web.auth import Session
from dicom_node.web.core import WebApp, fmt_time


def _qc_history(w: WebApp) -> Any:
    from dicom_node.qc_history import QCHistory

    return QCHistory(Path(w.ctx.registry.path))


async def scanners_page(w: WebApp, request: Request, sess: Session) -> Response:
    from dicom_node.qc_history import array_errors

    hist = _qc_history(w)
    try:
        latest = hist.latest()
        counts: dict[str, int] = {}
        for r in hist.reports():
            counts[str(r.get("scanner") or "unknown")] = (
                counts.get(str(r.get("scanner") or "unknown"), 0) + 1
            )
    finally:
        hist.close()
    scanners = [
        {"scanner": sc, "acquired": fmt_time(ts), "n": counts.get(sc, 0),
         "errors": array_errors(rep), "phantom": rep.get("phantom", ""),
         "series_uid": rep.get("series_uid", "")}
        for sc, ts, rep in sorted(latest)
    ]  # fmt: skip
    return w.page("scanners.html", request, sess, scanners=scanners)


async def scanner_plot(w: WebApp, request: Request, sess: Session) -> Response:
    from dicom_node.qc_history import _ts, array_errors
    from processing.report import qc_history_png

    scanner = unquote(request.path_params["scanner"])
    hist = _qc_history(w)
    try:
        reports = hist.reports(scanner)
    finally:
        hist.close()
    if not reports:
        return Response(status_code=404)
    series: dict[str, list[tuple[float, float]]] = {}
    for rep in reports:
        t = _ts(str(rep.get("acquired") or ""), 0.0)
        for array, err in array_errors(rep).items():
            series.setdefault(array, []).append((t, err))
    png = await asyncio.to_thread(qc_history_png, series, f"phantom QC, scanner {scanner}")
    return Response(png, media_type="image/png")


def routes(w: WebApp) -> list[Route]:
    return [
        w.route("/scanners", scanners_page),
        w.route("/scanners/{scanner}.png", scanner_plot),
    ]
