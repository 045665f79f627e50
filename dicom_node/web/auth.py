"""Sessions, roles and CSRF for the web interface (standard library only).

A session is a signed cookie: base64url(JSON {user, role, csrf, exp}) + "." + HMAC-SHA256.
The CSRF token lives inside the signed session and must come back with every POST (form
field ``csrf_token`` or header ``X-CSRF-Token``); the login form, before any session,
uses a double-submit cookie. Cookies are HttpOnly, SameSite=Strict, Secure under TLS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["LOGIN_CSRF_COOKIE", "SESSION_COOKIE", "Session", "SessionSigner", "tokens_match"]

SESSION_COOKIE = "synthmr_session"
LOGIN_CSRF_COOKIE = "synthmr_login_csrf"


@dataclass(frozen=True)
class Session:
    user: str
    role: str
    csrf: str
    expires: float

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Issue and check session cookies with an HMAC key (random when none is given)."""

    def __init__(self, secret: str = "", hours: float = 12.0) -> None:
        self._key = hashlib.sha256(secret.encode()).digest() if secret else secrets.token_bytes(32)
        self.seconds = hours * 3600.0

    def _sig(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def issue(self, user: str, role: str) -> tuple[str, Session]:
        s = Session(user, role, secrets.token_urlsafe(24), time.time() + self.seconds)
        payload = _b64(json.dumps({"u": s.user, "r": s.role, "c": s.csrf, "e": s.expires}).encode())
        return f"{payload}.{self._sig(payload)}", s

    def check(self, cookie: str | None) -> Session | None:
        if not cookie or "." not in cookie:
            return None
        payload, sig = cookie.rsplit(".", 1)
        if not hmac.compare_digest(sig, self._sig(payload)):
            return None
        try:
            d: dict[str, Any] = json.loads(_unb64(payload))
            s = Session(str(d["u"]), str(d["r"]), str(d["c"]), float(d["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return s if s.expires > time.time() else None


def tokens_match(given: str | None, expected: str | None) -> bool:
    return bool(given) and bool(expected) and hmac.compare_digest(str(given), str(expected))
