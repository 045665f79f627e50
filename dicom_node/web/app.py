"""The reading room's ASGI app (Starlette, Jinja2 templates, static files in the package).

Pages: ``/series`` (live list, filters), ``/series/{uid}`` (detail: thumbnails, volumes, QC,
outbox per destination, log lines, operator buttons), ``/series/{uid}/tuner`` (contrast
tuner: the browser synthesizes from the stored maps), ``/series/{uid}/report``, ``/audit``.
JSON under ``/api``. Every route but ``/login`` and ``/static`` needs a session: pages
redirect to the login, the API answers 401. Every POST needs the session's CSRF token;
operator actions (retry, resend, send to PACS) need the operator role and are audited.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dicom_node.logging import JsonFormatter, log_event
from dicom_node.registry import FINAL_STATES, IllegalTransition, Registry, SeriesRow, State
from dicom_node.seriesstore import load_series
from dicom_node.web.auth import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    Session,
    SessionSigner,
    tokens_match,
)
from dicom_node.web.settings import WebSettings, verify_password
from processing._version import __version__

__all__ = ["SeriesLogBuffer", "WebContext", "create_app"]

log = logging.getLogger("synthmr.web")
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


def _fmt_time(t: float | None) -> str:
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


def _series_json(reg: Registry, s: SeriesRow, spool_root: Path) -> dict[str, Any]:
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
        "first_received_text": _fmt_time(s.first_received),
        "state_since": s.state_since,
        "times_s": _stage_times(reg, s),
        "vendor": (meta.get("patient") or {}).get("manufacturer") or prov.get("vendor") or "",
        "qc_status": str(qc.get("status", "")).lower(),
        "description": (meta.get("patient") or {}).get("series_description", ""),
        "has_maps": stored is not None,
    }


def create_app(ctx: WebContext) -> Starlette:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"])
    )
    env.filters["t"] = _fmt_time
    signer = SessionSigner(ctx.web.session_secret, ctx.web.session_hours)
    users = {u.name: u for u in ctx.web.users}
    secure = ctx.web.tls

    def session_of(request: Request) -> Session | None:
        return signer.check(request.cookies.get(SESSION_COOKIE))

    def page(name: str, request: Request, sess: Session | None, **kw: Any) -> HTMLResponse:
        html = env.get_template(name).render(
            session=sess, csrf=sess.csrf if sess else "", version=__version__, **kw
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    Handler = Callable[[Request, Session], Awaitable[Response]]

    def guarded(role: str = "viewer", api: bool = False) -> Callable[[Handler], Any]:
        """Session (and role) required; POSTs also need the CSRF token; 401/redirect/403."""

        def deco(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                sess = session_of(request)
                if sess is None:
                    if api or request.method != "GET":
                        return JSONResponse({"error": "login required"}, status_code=401)
                    nxt = quote(
                        request.url.path + ("?" + request.url.query if request.url.query else "")
                    )
                    return RedirectResponse(f"/login?next={nxt}", status_code=303)
                if request.method == "POST":
                    token = request.headers.get("x-csrf-token")
                    if token is None and request.headers.get("content-type", "").startswith(
                        ("application/x-www-form-urlencoded", "multipart/form-data")
                    ):
                        token = (await request.form()).get("csrf_token")  # type: ignore[assignment]
                    if not tokens_match(token, sess.csrf):
                        _audit(request, sess, "csrf_refused", request.path_params.get("uid", ""))
                        return JSONResponse({"error": "CSRF token missing or wrong"}, 403)
                if role == "operator" and not sess.is_operator:
                    _audit(
                        request,
                        sess,
                        "forbidden",
                        request.path_params.get("uid", ""),
                        request.url.path,
                    )
                    return JSONResponse({"error": "operator role required"}, status_code=403)
                uid = request.path_params.get("uid")
                if uid is not None and not _UID.match(uid):
                    return JSONResponse({"error": "not a series UID"}, status_code=404)
                return await fn(request, sess)

            return endpoint

        return deco

    def _audit(
        request: Request, sess: Session | None, action: str, uid: str = "", detail: str = ""
    ) -> None:
        remote = request.client.host if request.client else ""
        ctx.registry.audit(
            sess.user if sess else "-",
            action,
            role=sess.role if sess else "",
            series_uid=uid,
            detail=detail,
            remote=remote,
        )

    # ------------------------------------------------------------------ login
    async def login_get(request: Request) -> Response:
        token = secrets.token_urlsafe(24)
        resp = page(
            "login.html",
            request,
            None,
            login_csrf=token,
            next=request.query_params.get("next", "/series"),
            error=request.query_params.get("error", ""),
        )
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure)
        return resp

    async def login_post(request: Request) -> Response:
        form = await request.form()
        if not tokens_match(form.get("csrf_token"), request.cookies.get(LOGIN_CSRF_COOKIE)):  # type: ignore[arg-type]
            return JSONResponse({"error": "CSRF token missing or wrong"}, status_code=403)
        name, pw = str(form.get("username", "")), str(form.get("password", ""))
        user = users.get(name)
        nxt = str(form.get("next", "/series"))
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/series"
        if user is None or not verify_password(pw, user.password_hash):
            ctx.registry.audit(name or "-", "login_failed", remote=_remote(request))
            return RedirectResponse(f"/login?error=1&next={quote(nxt)}", status_code=303)
        cookie, sess = signer.issue(user.name, user.role)
        _audit(request, sess, "login")
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(
            SESSION_COOKIE,
            cookie,
            max_age=int(signer.seconds),
            httponly=True,
            samesite="strict",
            secure=secure,
        )
        resp.delete_cookie(LOGIN_CSRF_COOKIE)
        return resp

    def _remote(request: Request) -> str:
        return request.client.host if request.client else ""

    @guarded()
    async def logout(request: Request, sess: Session) -> Response:
        _audit(request, sess, "logout")
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    # ------------------------------------------------------------------ series list
    def _filters(request: Request) -> dict[str, Any]:
        q = request.query_params
        states = [s for s in q.getlist("state") if s in State.__members__] or None
        since = until = None
        try:
            if q.get("from"):
                since = datetime.strptime(q["from"], "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
            if q.get("to"):
                until = (
                    datetime.strptime(q["to"], "%Y-%m-%d").replace(tzinfo=UTC).timestamp() + 86400
                )
        except ValueError:
            pass
        return {"states": states, "since": since, "until": until}

    @guarded()
    async def root(request: Request, sess: Session) -> Response:
        return RedirectResponse("/series", status_code=303)

    @guarded()
    async def series_page(request: Request, sess: Session) -> Response:
        f = _filters(request)
        rows = [
            _series_json(ctx.registry, s, ctx.spool_root) for s in ctx.registry.list_series(**f)
        ]
        return page(
            "series.html",
            request,
            sess,
            rows=rows,
            states=[s.value for s in State],
            selected=f["states"] or [],
            date_from=request.query_params.get("from", ""),
            date_to=request.query_params.get("to", ""),
        )

    @guarded(api=True)
    async def series_api(request: Request, sess: Session) -> Response:
        rows = [
            _series_json(ctx.registry, s, ctx.spool_root)
            for s in ctx.registry.list_series(**_filters(request))
        ]
        return JSONResponse({"series": rows, "now": time.time()})

    # ------------------------------------------------------------------ detail
    def _detail(uid: str) -> dict[str, Any] | None:
        row = ctx.registry.series(uid)
        if row is None:
            return None
        stored = load_series(ctx.spool_root, uid)
        meta = stored.meta if stored else {}
        return {
            "series": _series_json(ctx.registry, row, ctx.spool_root),
            "timeline": [
                {"from": a, "to": b, "at": _fmt_time(t), "reason": r}
                for a, b, t, r in ctx.registry.timeline(uid)
            ],
            "outbox": ctx.registry.outbox_of(uid),
            "dead": ctx.registry.dead_outbox_count(uid),
            "volumes_ml": meta.get("volumes_ml") or {},
            "qc": {
                k: v for k, v in (meta.get("qc") or {}).items() if not isinstance(v, dict | list)
            },
            "synthetic": meta.get("synthetic") or {},
            "map_thumbs": meta.get("map_thumbs") or [],
            "dir_parameters": meta.get("dir_parameters") or {},
            "warnings": meta.get("warnings") or [],
            "logs": ctx.logs.lines(uid),
            "audit": ctx.registry.audit_log(uid, 50),
            "missing": row.missing,
            "retryable": row.state in FINAL_STATES or row.state == State.EXPORTED,
        }

    @guarded()
    async def detail_page(request: Request, sess: Session) -> Response:
        uid = request.path_params["uid"]
        d = _detail(uid)
        if d is None:
            return HTMLResponse("unknown series", status_code=404)
        return page(
            "detail.html", request, sess, d=d, uid=uid, message=request.query_params.get("msg", "")
        )

    @guarded(api=True)
    async def detail_api(request: Request, sess: Session) -> Response:
        d = _detail(request.path_params["uid"])
        if d is None:
            return JSONResponse({"error": "unknown series"}, status_code=404)
        return JSONResponse(d)

    @guarded()
    async def thumb(request: Request, sess: Session) -> Response:
        stored = load_series(ctx.spool_root, request.path_params["uid"])
        name = request.path_params["name"]
        p = stored.thumb(name) if stored and re.fullmatch(r"[A-Za-z0-9_]{1,32}", name) else None
        if p is None:
            return Response(status_code=404)
        return FileResponse(
            p, media_type="image/png", headers={"Cache-Control": "private, max-age=60"}
        )

    # ------------------------------------------------------------------ operator actions
    @guarded(role="operator")
    async def retry(request: Request, sess: Session) -> Response:
        uid = request.path_params["uid"]
        try:
            if ctx.retry is None:
                raise RuntimeError("retry is not available on this node")
            job = ctx.retry(uid)
            msg = f"series re-queued (job {job})"
        except (KeyError, IllegalTransition, RuntimeError) as exc:
            msg = f"retry refused: {exc}"
        _audit(request, sess, "retry", uid, msg)
        log_event(log, "web_retry", series_uid=uid, user=sess.user, result=msg)
        return _after_action(request, uid, msg)

    @guarded(role="operator")
    async def resend(request: Request, sess: Session) -> Response:
        uid = request.path_params["uid"]
        n = ctx.registry.requeue_dead_outbox(uid)
        ctx.wake_outbox()
        msg = f"{n} dead letters queued again"
        _audit(request, sess, "resend_dead_letters", uid, msg)
        log_event(log, "web_resend", series_uid=uid, user=sess.user, items=n)
        return _after_action(request, uid, msg)

    def _after_action(request: Request, uid: str, msg: str) -> Response:
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"message": msg})
        return RedirectResponse(f"/series/{uid}?msg={quote(msg)}", status_code=303)

    # ------------------------------------------------------------------ tuner
    @guarded()
    async def tuner_page(request: Request, sess: Session) -> Response:
        uid = request.path_params["uid"]
        stored = load_series(ctx.spool_root, uid)
        if stored is None:
            return HTMLResponse("no stored maps for this series", status_code=404)
        from processing.synthesis import EQUATIONS, PRESETS

        presets = {}
        for name, spec in PRESETS.items():
            r = spec.resolved()
            presets[name] = {
                "kind": r.kind.value, "tr_ms": r.tr_ms, "te_ms": r.te_ms,
                "ti_ms": r.ti_ms, "ti2_ms": r.ti2_ms,
            }  # fmt: skip
        for name, s in (stored.meta.get("synthetic") or {}).items():
            plain = not s.get("ai_enhanced") and not name.endswith("_MIX")
            if s.get("kind") in ("SE", "IR", "PSIR", "DIR") and plain:
                presets[f"{name} (this series)"] = {
                    k: s.get(k) for k in ("kind", "tr_ms", "te_ms", "ti_ms", "ti2_ms")
                }
        return page(
            "tuner.html",
            request,
            sess,
            uid=uid,
            meta=stored.meta,
            presets=presets,
            equations={k.value: v for k, v in EQUATIONS.items()},
        )

    @guarded(api=True)
    async def maps_bin(request: Request, sess: Session) -> Response:
        """T1, T2, PD inside the mask (float32, C order) and the mask (uint8), for the tuner:
        header ``<u4 nz, ny, nx, n_mask``, then t1[n], t2[n], pd[n], mask[nz*ny*nx]."""
        stored = load_series(ctx.spool_root, request.path_params["uid"])
        if stored is None:
            return JSONResponse({"error": "no stored maps"}, status_code=404)
        a = stored.arrays()
        mask = a["mask"].astype(bool)
        nz, ny, nx = mask.shape
        parts = [struct.pack("<4I", nz, ny, nx, int(mask.sum()))]
        for k in ("t1_ms", "t2_ms", "pd_pu"):
            parts.append(np.ascontiguousarray(a[k][mask], "<f4").tobytes())
        parts.append(mask.astype(np.uint8).tobytes())
        return Response(
            b"".join(parts),
            media_type="application/octet-stream",
            headers={"Cache-Control": "private, max-age=300"},
        )

    @guarded(role="operator", api=True)
    async def send_tuned(request: Request, sess: Session) -> Response:
        uid = request.path_params["uid"]
        from dicom_node.web.tuned import spec_from_request, tuned_series
        from processing.synthesis import SynthesisError

        stored = load_series(ctx.spool_root, uid)
        if stored is None:
            return JSONResponse({"error": "no stored maps"}, status_code=404)
        try:
            body = await request.json()
            spec = spec_from_request(body if isinstance(body, dict) else {})
        except (SynthesisError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if ctx.send_outputs is None:
            return JSONResponse({"error": "no outbox on this node"}, status_code=503)
        import asyncio

        datasets = await asyncio.to_thread(tuned_series, stored, spec, ctx.export_settings)
        n = await asyncio.to_thread(ctx.send_outputs, uid, datasets)
        desc = spec.description
        _audit(request, sess, "send_tuned", uid, f"{desc}; {n} outbox items")
        log_event(log, "web_send_tuned", series_uid=uid, user=sess.user, contrast=desc, items=n)
        return JSONResponse(
            {
                "message": f"{desc}: {len(datasets)} images queued to {n // max(len(datasets), 1)} destination(s)",
                "series_instance_uid": str(datasets[0].SeriesInstanceUID) if datasets else "",
                "description": desc,
                "instances": len(datasets),
            }
        )

    # ------------------------------------------------------------------ report
    @guarded()
    async def report_page(request: Request, sess: Session) -> Response:
        uid = request.path_params["uid"]
        from dicom_node.web import reportdata

        data = reportdata.report_data(ctx, uid)
        if data is None:
            return HTMLResponse("no stored results for this series", status_code=404)
        _audit(request, sess, "view_report", uid)
        return page("report.html", request, sess, uid=uid, r=data)

    @guarded()
    async def report_file(request: Request, sess: Session) -> Response:
        uid = request.path_params["uid"]
        fmt = request.path_params["fmt"]
        from dicom_node.web import reportdata

        data = reportdata.report_data(ctx, uid)
        if data is None or fmt not in ("pdf", "png"):
            return Response(status_code=404)
        import asyncio

        from dicom_node.web.reportdata import cached_render

        pdf, png = await asyncio.to_thread(cached_render, ctx.spool_root, uid, data)
        body, mt = (pdf, "application/pdf") if fmt == "pdf" else (png, "image/png")
        return Response(body, media_type=mt)

    def _qc_history() -> Any:
        from dicom_node.qc_history import QCHistory

        return QCHistory(Path(ctx.registry.path))

    @guarded()
    async def scanners_page(request: Request, sess: Session) -> Response:
        """Phantom-QC history per scanner (dicom_node.qc_history): latest figures + a plot."""
        from dicom_node.qc_history import array_errors

        hist = _qc_history()
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
            {"scanner": sc, "acquired": _fmt_time(ts), "n": counts.get(sc, 0),
             "errors": array_errors(rep), "phantom": rep.get("phantom", ""),
             "series_uid": rep.get("series_uid", "")}
            for sc, ts, rep in sorted(latest)
        ]  # fmt: skip
        return page("scanners.html", request, sess, scanners=scanners)

    @guarded()
    async def scanner_plot(request: Request, sess: Session) -> Response:
        from urllib.parse import unquote

        from dicom_node.qc_history import _ts, array_errors
        from processing.report import qc_history_png

        scanner = unquote(request.path_params["scanner"])
        hist = _qc_history()
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
        import asyncio

        png = await asyncio.to_thread(qc_history_png, series, f"phantom QC, scanner {scanner}")
        return Response(png, media_type="image/png")

    @guarded(role="operator")
    async def audit_page(request: Request, sess: Session) -> Response:
        return page("audit.html", request, sess, lines=ctx.registry.audit_log(None, 500))

    routes = [
        Route("/login", login_get, methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", root),
        Route("/series", series_page),
        Route("/api/series", series_api),
        Route("/series/{uid}", detail_page),
        Route("/api/series/{uid}", detail_api),
        Route("/series/{uid}/thumb/{name}.png", thumb),
        Route("/series/{uid}/retry", retry, methods=["POST"]),
        Route("/series/{uid}/resend", resend, methods=["POST"]),
        Route("/series/{uid}/tuner", tuner_page),
        Route("/api/series/{uid}/maps.bin", maps_bin),
        Route("/api/series/{uid}/send", send_tuned, methods=["POST"]),
        Route("/series/{uid}/report", report_page),
        Route("/series/{uid}/report.{fmt}", report_file),
        Route("/audit", audit_page),
        Route("/scanners", scanners_page),
        Route("/scanners/{scanner}.png", scanner_plot),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes)
