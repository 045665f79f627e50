"""The reading room's ASGI app (Starlette, Jinja2 templates, static files in the package).

Pages: ``/series`` (live list, filters), ``/series/{uid}`` (detail: thumbnails, volumes, QC,
outbox per destination, log lines, operator buttons), ``/series/{uid}/tuner`` (contrast
tuner: the browser synthesizes from the stored maps), ``/series/{uid}/report``, ``/audit``,
``/scanners``. JSON under ``/api``. Every route but ``/login`` and ``/static`` needs a session:
pages redirect to the login, the API answers 401. Every POST needs the session's CSRF token;
operator actions (retry, resend, send to PACS) need the operator role and are audited.
The routes live in :mod:`dicom_node.web.pages`, one module per page; the guard in
:class:`dicom_node.web.core.WebApp`.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from dicom_node.web.core import HERE, SeriesLogBuffer, WebApp, WebContext
from dicom_node.web.pages import auth, detail, report, scanners, series, tuner

__all__ = ["SeriesLogBuffer", "WebContext", "create_app"]


def create_app(ctx: WebContext) -> Starlette:
    w = WebApp(ctx)
    routes = [
        *auth.routes(w),
        *series.routes(w),
        *detail.routes(w),
        *tuner.routes(w),
        *report.routes(w),
        *scanners.routes(w),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes)
