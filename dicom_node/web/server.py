"""uvicorn in a thread of the node, on its own socket (``[web] address``/``port``)."""

from __future__ import annotations

import logging
import socket
import threading

from dicom_node.logging import log_event
from dicom_node.web.app import WebContext, create_app
from dicom_node.web.settings import web_errors

__all__ = ["WebServer", "WebStartRefused"]

log = logging.getLogger("synthmr.web")


class WebStartRefused(RuntimeError):
    """The [web] settings are unsafe or wrong (the message lists why)."""


def _warm_imports() -> None:
    try:
        import processing.synthesis  # noqa: F401
    except Exception:  # the page that needs it reports the problem
        log.exception("web_warm_import_failed")


class WebServer:
    def __init__(self, ctx: WebContext) -> None:
        problems = web_errors(ctx.web)
        if problems:  # checked again here: a Node built from hand-made Settings
            raise WebStartRefused("web interface not started: " + "; ".join(problems))
        self.ctx = ctx
        self._server = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> WebServer:
        import uvicorn

        web = self.ctx.web
        family = socket.AF_INET6 if ":" in web.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((web.address, web.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.ctx),
            log_config=None,
            access_log=False,  # URLs are audited per action; no access log of patient pages
            ssl_certfile=web.tls_cert_file or None,
            ssl_keyfile=web.tls_key_file or None,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="web", daemon=True
        )
        self._thread.start()
        # The tuner and report pages import processing.synthesis (~1-2 s with numba on a
        # busy machine): import it now, beside the server, not on a user's first click.
        threading.Thread(target=_warm_imports, name="web-warm", daemon=True).start()
        logging.getLogger().addHandler(self.ctx.logs)
        log_event(log, "web_started", address=web.address, port=self.port, tls=web.tls)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        logging.getLogger().removeHandler(self.ctx.logs)
