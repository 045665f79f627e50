"""``[web]`` settings and their validation (imported by :mod:`dicom_node.config`).

Users live in the configuration with a password hash made by ``synthmr hash-password``
(``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``, hashlib.scrypt: no extra dependency).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ROLES",
    "WebSettings",
    "WebUser",
    "hash_password",
    "is_loopback",
    "verify_password",
    "web_errors",
]

#: viewer: read every page; operator: also retry, resend dead letters, send tuned contrasts.
ROLES: tuple[str, ...] = ("viewer", "operator")

# scrypt cost: n=2**14, r=8, p=1 (16 MiB, ~50 ms): the RFC 7914 interactive-login figures.
_N, _R, _P = 1 << 14, 8, 1


@dataclass(frozen=True)
class WebUser:
    name: str
    role: str = "viewer"
    password_hash: str = ""


@dataclass(frozen=True)
class WebSettings:
    """The web interface. Bound to loopback by default; any other address needs TLS
    (``tls_cert_file``/``tls_key_file``) and at least one user, or the node refuses to start."""

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 8080
    users: tuple[WebUser, ...] = ()
    #: HMAC key of the session cookies; empty = random per start (sessions end at restart).
    session_secret: str = ""
    session_hours: float = 12.0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: A site's own normative reference table (JSON like processing/data/normative_brain.json).
    reference_table: str = ""
    #: Query these destinations (names in [[destinations]]) by C-FIND for earlier SRs.
    prior_sources: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` for the configuration file."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a :func:`hash_password` string."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(want),
            maxmem=1 << 26,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names resolving only to them (``localhost``)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def web_errors(web: WebSettings) -> list[str]:
    """Every problem of a ``[web]`` table (empty = fine)."""
    errors: list[str] = []
    if not (0 <= web.port <= 65535):
        errors.append(f"web.port: port {web.port} out of range 0..65535")
    names: set[str] = set()
    for i, u in enumerate(web.users):
        where = f"web.users[{i}]"
        if not u.name or u.name in names:
            errors.append(f"{where}.name: empty or duplicate user name {u.name!r}")
        names.add(u.name)
        if u.role not in ROLES:
            errors.append(f"{where}.role: {u.role!r} is not one of {', '.join(ROLES)}")
        if not u.password_hash.startswith("scrypt$") or u.password_hash.count("$") != 5:
            errors.append(
                f"{where}.password_hash: not a scrypt hash (make one with `synthmr hash-password`)"
            )
    for key in ("tls_cert_file", "tls_key_file", "reference_table"):
        path = getattr(web, key)
        if path and not Path(path).is_file():
            errors.append(f"web.{key}: file not found: {path}")
    if bool(web.tls_cert_file) != bool(web.tls_key_file):
        errors.append("web: tls_cert_file and tls_key_file go together")
    if web.session_hours <= 0:
        errors.append("web.session_hours: must be > 0")
    if web.enabled:
        if not web.users:
            errors.append(
                "web: no [[web.users]]: every page needs a login, so the web interface "
                "refuses to start without users"
            )
        if not is_loopback(web.address) and not web.tls:
            errors.append(
                f"web.address: {web.address} is not a loopback address: patient data "
                "leaves the machine, so tls_cert_file and tls_key_file are required"
            )
    return errors
