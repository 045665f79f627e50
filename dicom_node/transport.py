"""The node's network plumbing: TLS contexts and socket options of the SCP and the push, and
the association server that admits connections.

pynetdicom's own server runs the TLS handshake in its single accept thread with no timeout
and counts a connection that never speaks as an association: one silent TCP connection then
blocks every TLS association, and ``max_associations`` silent ones lock every scanner out
for ``acse_timeout``. :class:`GuardedAssociationServer` instead

* accepts only (no handshake) in the accept thread, and refuses a host over its limits of
  pending (not yet associated) and open connections;
* runs the TLS handshake and waits for the A-ASSOCIATE-RQ in the connection's own thread,
  both within ``setup_timeout_s``;
* counts only negotiated associations against ``max_associations``;
* reports every refusal (``on_refused(reason, host, detail)``): the caller logs and counts it.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

__all__ = [
    "AdmissionLimits",
    "GuardedAssociationServer",
    "make_client_ssl_context",
    "make_server_ssl_context",
    "set_tcp_nodelay",
]


def make_server_ssl_context(
    cert: str, key: str, ca: str = "", require_client_cert: bool = False
) -> ssl.SSLContext:
    """TLS server context (TLS 1.2+); CERT_REQUIRED with ``ca`` for mutual TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return ctx


def make_client_ssl_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """TLS client context (TLS 1.2+) verifying the server against ``ca`` (system CAs if
    empty), presenting ``cert``/``key`` when given (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


def set_tcp_nodelay(assoc: Any) -> None:
    """Disable Nagle on an association's socket (pynetdicom leaves it on).

    A C-STORE goes out as several P-DATA PDUs; with Nagle the last short one waits for the
    peer's delayed ACK (~40 ms on Linux), which capped pushes to Orthanc at ~14 instances/s.
    """
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not a TCP socket: nothing to tune
        pass


@dataclass(frozen=True)
class AdmissionLimits:
    """Limits on connections before and after association.

    ``setup_timeout_s`` bounds the TLS handshake plus the arrival of the A-ASSOCIATE-RQ;
    ``max_pending_per_host`` the connections of one host still in that phase;
    ``max_connections_per_host`` all open connections of one host; ``max_associations``
    the negotiated associations of all hosts together.
    """

    setup_timeout_s: float = 10.0
    max_pending_per_host: int = 4
    max_connections_per_host: int = 10
    max_associations: int = 10


RefusalHook = Callable[[str, str, str], None]


class GuardedAssociationServer(ThreadedAssociationServer):
    """A threaded association server with admission control (see the module doc).

    Build it with ``ae.make_server(..., server_class=partial(GuardedAssociationServer,
    limits=..., on_refused=...))`` (any request handler) and run ``serve_forever`` in a
    thread; call :meth:`admit` from the EVT_REQUESTED handler.
    """

    daemon_threads = True
    block_on_close = False  # connection threads end with their association

    def __init__(
        self,
        *args: Any,
        limits: AdmissionLimits | None = None,
        on_refused: RefusalHook | None = None,
        **kwargs: Any,
    ) -> None:
        self.limits = limits or AdmissionLimits()
        self.on_refused = on_refused
        self._admission = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._open: Counter[str] = Counter()
        self._negotiated: set[int] = set()
        self._local = threading.local()
        super().__init__(*args, **kwargs)
        # the request handler triggers EVT_CONN_OPEN in the connection's thread, before the
        # association's threads start: the hook that hands us the new association
        self.bind(evt.EVT_CONN_OPEN, self._started)
        # pynetdicom counts every acceptor thread (pending ones too) against this limit;
        # ours (admit) counts negotiated associations only, so keep pynetdicom's out of reach.
        self.ae.maximum_associations = self.limits.max_associations + 10_000

    # ------------------------------------------------------------------ accept thread
    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only: the TLS handshake runs in the connection's thread."""
        return self.socket.accept()  # type: ignore[union-attr]

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        refusal = self.count_connection(host)
        if refusal is None:
            return True
        self._refused(refusal[0], host, refusal[1])
        return False  # socketserver closes the socket

    # ------------------------------------------------------------------ the counts
    # (one place, so that acceptor processes can keep them in the node process:
    # dicom_node.acceptors overrides these four with calls to it)
    def count_connection(self, host: str) -> tuple[str, str] | None:
        """A new connection of ``host``: counted (None), or (kind, reason) refused."""
        lim = self.limits
        with self._admission:
            if self._pending[host] >= lim.max_pending_per_host:
                return (
                    "pending_limit",
                    f"{self._pending[host]} connections of this host not yet associated",
                )
            if self._open[host] >= lim.max_connections_per_host:
                return "host_limit", f"{self._open[host]} connections of this host open"
            self._pending[host] += 1
            self._open[host] += 1
            return None

    def count_setup_done(self, host: str) -> None:
        """A connection of ``host`` is associated (or given up): no longer pending."""
        with self._admission:
            self._pending[host] -= 1

    def count_closed(self, host: str, pending: bool, assoc_key: Any) -> None:
        """A connection of ``host`` ended (``pending``: before its setup was done)."""
        with self._admission:
            self._pending[host] -= int(pending)
            self._open[host] -= 1
            if assoc_key is not None:
                self._negotiated.discard(assoc_key)
            for count in (self._pending, self._open):
                if count[host] <= 0:
                    del count[host]

    def count_closed_association(self, assoc_key: Any) -> None:
        """Forget a negotiated association (its acceptor process is gone)."""
        with self._admission:
            self._negotiated.discard(assoc_key)

    def count_association(self, assoc_key: Any) -> str | None:
        """A negotiated association: counted (None), or why it is refused."""
        with self._admission:
            if len(self._negotiated) >= self.limits.max_associations:
                return f"{len(self._negotiated)} associations open (max_associations)"
            self._negotiated.add(assoc_key)
        return None

    # ------------------------------------------------------------------ connection thread
    def process_request_thread(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0])
        deadline = time.monotonic() + self.limits.setup_timeout_s
        pending, assoc = True, None
        try:
            sock = self._handshake(request, host, deadline)
            if sock is None or not self._first_byte(sock, host, deadline):
                return
            requested = self._local.requested = threading.Event()
            self.finish_request(sock, client_address)  # -> EVT_CONN_OPEN -> _started
            assoc = self._local.assoc
            while not requested.is_set() and assoc.is_alive() and time.monotonic() < deadline:
                requested.wait(0.05)  # also ends when pynetdicom drops the association
            if not requested.is_set() and assoc.is_alive():
                self._refused("setup_timeout", host, "no complete A-ASSOCIATE-RQ in time")
                assoc.kill()
                self._close(sock)
            self.count_setup_done(host)
            pending = False
            assoc.join()
        except Exception as exc:  # a broken peer must never take the server down
            self._refused("error", host, f"{type(exc).__name__}: {exc}")
            self._close(request)
        finally:
            self.count_closed(host, pending, None if assoc is None else self.assoc_key(assoc))

    def _handshake(self, raw: socket.socket, host: str, deadline: float) -> socket.socket | None:
        if self.ssl_context is None:
            return raw
        raw.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            sock = self.ssl_context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            why = "handshake timed out" if isinstance(exc, TimeoutError) else str(exc)
            self._refused("tls", host, why[:200])
            self._close(raw)
            return None
        sock.settimeout(None)  # pynetdicom reads with select() and its own timers
        return sock

    def _first_byte(self, sock: socket.socket, host: str, deadline: float) -> bool:
        """Wait (bounded) for the peer to speak before an association thread exists."""
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if pending:
            return True
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            return True
        self._refused("setup_timeout", host, "silent connection: no A-ASSOCIATE-RQ")
        self._close(sock)
        return False

    def _started(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN, in this connection's thread."""
        event.assoc._synthmr_requested = self._local.requested
        self._local.assoc = event.assoc

    # ------------------------------------------------------------------ association
    def admit(self, assoc: Any) -> str | None:
        """Called on A-ASSOCIATE-RQ (EVT_REQUESTED): None to go on, else why to reject."""
        flag = getattr(assoc, "_synthmr_requested", None)
        if flag is not None:
            flag.set()
        return self.count_association(self.assoc_key(assoc))

    @staticmethod
    def assoc_key(assoc: Any) -> Any:
        """The association's key in the count of negotiated associations."""
        return id(assoc)

    def _refused(self, reason: str, host: str, detail: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(reason, host, detail)
            except Exception:  # logging must not break admission
                pass

    @staticmethod
    def _close(sock: Any) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass

    def connections(self) -> dict[str, tuple[int, int]]:
        """``host -> (pending, open)`` right now (status, tests)."""
        with self._admission:
            return {h: (self._pending[h], self._open[h]) for h in self._open}
