"""What every page of the reading room shares: the node's context (:class:`WebContext`), the
per-series log buffer, and :class:`WebApp` (templates, sessions, the guard every route but
``/login`` and ``/static`` passes: session, role, CSRF, audit)."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from dicom_node.logging import JsonFormatter
from dicom_node.registry import Registry, SeriesRow, State
from dicom_node.seriesstore import load_series
from dicom_node.web.auth import SESSION_COOKIE, Session, SessionSigner, tokens_match
from dicom_node.web.settings import WebSettings
from processing._version import __version__

__all__ = ["Handler", "SeriesLogBuffer", "WebApp", "WebContext", "fmt_time", "series_json"]

HERE = Path(__file__).parent
_UID = re.compile(r"^[0-9.]{1,64}$")


class SeriesLogBuffer(logging.Handler):
    """The last ``per_series`` log lines of the last ``max_series`` series (detail page)."""

    def __init__(self, per_series: int = 200, max_series: int = 500) -> None:
        super().__init__(logging.INFO)
        self.per_series, self.max_series = per_series, max_series
        self._lines: OrderedDict[str, deque[str]] = OrderedDict()
        self._lock2 = threading.Lock()
        self._fmt = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self._fmt.format(record)
            uid = json.loads(line).get("series_uid")
        except Exception:
            return
        if not uid:
            return
        with self._lock2:
            q = self._lines.get(uid)
            if q is None:
                q = self._lines[uid] = deque(maxlen=self.per_series)
                while len(self._lines) > self.max_series:
                    self._lines.popitem(last=False)
            q.append(line)

    def lines(self, series_uid: str) -> list[str]:
        with self._lock2:
            return list(self._lines.get(series_uid, ()))


@dataclass
class WebContext:
    """What the app needs from the node."""

    web: WebSettings
    registry: Registry
    spool_root: Path
    destinations: Callable[[], list[str]] = list
    retry: Callable[[str], int] | None = None  # re-queue a series -> job id
    wake_outbox: Callable[[], None] = lambda: None
    send_outputs: Callable[[str, list[Any]], int] | None = None  # (series, datasets) -> n
    export_settings: Any = None
    priors: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None
    logs: SeriesLogBuffer = field(default_factory=SeriesLogBuffer)


def fmt_time(t: float | None) -> str:
    if not t:
        return ""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _stage_times(reg: Registry, s: SeriesRow) -> dict[str, float | None]:
    """Seconds from the first instance to complete, processed and delivered."""
    at: dict[str, float] = {}
    for _, to, t, _reason in reg.timeline(s.series_uid):
        at.setdefault(to, t)  # first time each state was entered
        if to == State.QUEUED.value:
            at[to] = t
    t0 = s.first_received

    def since(state: str) -> float | None:
        return round(at[state] - t0, 1) if state in at else None

    return {
        "complete": since("COMPLETE"),
        "processed": since("EXPORTED"),
        "delivered": since("DELIVERED"),
    }


def series_json(reg: Registry, s: SeriesRow, spool_root: Path) -> dict[str, Any]:
    stored = load_series(spool_root, s.series_uid)
    meta = stored.meta if stored else {}
    prov = meta.get("provenance") or {}
    qc = meta.get("qc") or {}
    return {
        "series_uid": s.series_uid,
        "study_uid": s.study_uid,
        "state": s.state.value,
        "reason": s.reason,
        "instances": s.n_instances,
        "calling_ae": s.calling_ae,
        "first_received": s.first_received,
        "first_received_text": fmt_time(s.first_received),
        "state_since": s.state_since,
        "times_s": _stage_times(reg, s),
        "vendor": (meta.get("patient") or {}).get("manufacturer") or prov.get("vendor") or "",
        "qc_status": str(qc.get("status", "")).lower(),
        "description": (meta.get("patient") or {}).get("series_description", ""),
        "has_maps": stored is not None,
    }


Handler = Callable[["WebApp", Request, Session], Awaitable[Response]]
OpenHandler = Callable[["WebApp", Request], Awaitable[Response]]


class WebApp:
    """Templates, session signer and users of one app; builds its guarded routes."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"])
        )
        self.env.filters["t"] = fmt_time
        self.signer = SessionSigner(ctx.web.session_secret, ctx.web.session_hours)
        self.users = {u.name: u for u in ctx.web.users}
        self.secure = ctx.web.tls

    def session_of(self, request: Request) -> Session | None:
        return self.signer.check(request.cookies.get(SESSION_COOKIE))

    def page(self, name: str, request: Request, sess: Session | None, **kw: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(
            session=sess, csrf=sess.csrf if sess else "", version=__version__, **kw
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @staticmethod
    def remote(request: Request) -> str:
        return request.client.host if request.client else ""

    def audit(
        self, request: Request, sess: Session | None, action: str, uid: str = "", detail: str = ""
    ) -> None:
        self.ctx.registry.audit(
            sess.user if sess else "-",
            action,
            role=sess.role if sess else "",
            series_uid=uid,
            detail=detail,
            remote=self.remote(request),
        )

    def open_route(self, path: str, fn: OpenHandler, methods: list[str] | None = None) -> Route:
        """A route without a session (the login)."""

        async def endpoint(request: Request) -> Response:
            return await fn(self, request)

        return Route(path, endpoint, methods=methods)

    def route(
        self,
        path: str,
        fn: Handler,
        role: str = "viewer",
        api: bool = False,
        methods: list[str] | None = None,
    ) -> Route:
        """A route that needs a session (and role); POSTs also need the CSRF token.
        Pages without a session redirect to the login, the API and POSTs answer 401."""

        async def endpoint(request: Request) -> Response:
            sess = self.session_of(request)
            if sess is None:
                if api or request.method != "GET":
                    return JSONResponse({"error": "login required"}, status_code=401)
                nxt = quote(
                    request.url.path + ("?" + request.url.query if request.url.query else "")
                )
                return RedirectResponse(f"/login?next={nxt}", status_code=303)
            refused = await self._refusal(request, sess, role)
            if refused is not None:
                return refused
            uid = request.path_params.get("uid")
            if uid is not None and not _UID.match(uid):
                return JSONResponse({"error": "not a series UID"}, status_code=404)
            return await fn(self, request, sess)

        return Route(path, endpoint, methods=methods)

    async def _refusal(self, request: Request, sess: Session, role: str) -> Response | None:
        """403 for a POST without the session's CSRF token or a viewer on an operator route."""
        if request.method == "POST":
            token = request.headers.get("x-csrf-token")
            if token is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")
            ):
                token = (await request.form()).get("csrf_token")  # type: ignore[assignment]
            if not tokens_match(token, sess.csrf):
                self.audit(request, sess, "csrf_refused", request.path_params.get("uid", ""))
                return JSONResponse({"error": "CSRF token missing or wrong"}, 403)
        if role == "operator" and not sess.is_operator:
            uid = request.path_params.get("uid", "")
            self.audit(request, sess, "forbidden", uid, request.url.path)
            return JSONResponse({"error": "operator role required"}, status_code=403)
        return None
