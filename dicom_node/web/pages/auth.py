"""Login, logout, the root redirect and the audit log page."""

from __future__ import annotations

import secrets
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from dicom_node.web.auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE, Session, tokens_match
from dicom_node.web.core import WebApp
from dicom_node.web.settings import verify_password


async def login_get(w: WebApp, request: Request) -> Response:
    token = secrets.token_urlsafe(24)
    resp = w.page(
        "login.html",
        request,
        None,
        login_csrf=token,
        next=request.query_params.get("next", "/series"),
        error=request.query_params.get("error", ""),
    )
    resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=w.secure)
    return resp


async def login_post(w: WebApp, request: Request) -> Response:
    form = await request.form()
    if not tokens_match(form.get("csrf_token"), request.cookies.get(LOGIN_CSRF_COOKIE)):  # type: ignore[arg-type]
        return JSONResponse({"error": "CSRF token missing or wrong"}, status_code=403)
    name, pw = str(form.get("username", "")), str(form.get("password", ""))
    user = w.users.get(name)
    nxt = str(form.get("next", "/series"))
    if not nxt.startswith("/") or nxt.startswith("//"):
        nxt = "/series"
    if user is None or not verify_password(pw, user.password_hash):
        w.ctx.registry.audit(name or "-", "login_failed", remote=w.remote(request))
        return RedirectResponse(f"/login?error=1&next={quote(nxt)}", status_code=303)
    cookie, sess = w.signer.issue(user.name, user.role)
    w.audit(request, sess, "login")
    resp = RedirectResponse(nxt, status_code=303)
    resp.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(w.signer.seconds),
        httponly=True,
        samesite="strict",
        secure=w.secure,
    )
    resp.delete_cookie(LOGIN_CSRF_COOKIE)
    return resp


async def logout(w: WebApp, request: Request, sess: Session) -> Response:
    w.audit(request, sess, "logout")
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE)
    return resp


async def root(w: WebApp, request: Request, sess: Session) -> Response:
    return RedirectResponse("/series", status_code=303)


async def audit_page(w: WebApp, request: Request, sess: Session) -> Response:
    return w.page("audit.html", request, sess, lines=w.ctx.registry.audit_log(None, 500))


def routes(w: WebApp) -> list[Route]:
    return [
        w.open_route("/login", login_get, methods=["GET"]),
        w.open_route("/login", login_post, methods=["POST"]),
        w.route("/logout", logout, methods=["POST"]),
        w.route("/", root),
        w.route("/audit", audit_page, role="operator"),
    ]
