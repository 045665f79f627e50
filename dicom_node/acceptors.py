"""Acceptor processes: the node's port served by more than one Python process.

pynetdicom runs every association in Python threads, so one process decodes, validates and
stores the C-STOREs of all parallel senders under one GIL (~2 ms of CPU each on the 2-core
machine: one core's worth). With ``[node] acceptor_processes = N`` the node process starts
N - 1 helpers (new Python processes running ``dicom_node.acceptors.main``) that run the same
:class:`~dicom_node.scp.StoreSCP` handlers. The node process accepts every connection and
hands it (its socket, over a Unix socket: ``SCM_RIGHTS``) to the process with the fewest
connections, itself included: 4 parallel senders on 2 processes are served 2 and 2 (when
both processes accepted on a shared socket, whichever was free first, splits of 3 to 1 were
common and the busier process's GIL set the pace). The helpers differ in these ways:

* each writes received files into the shared spool with the same durability: its own
  ingest journal (``journal/ingest-p<k>.<seq>.log``, group-committed within the process)
  answers success only once the instance is on disk; the node process replays every
  process's logs at start-up, before helpers exist, and asks them to checkpoint before it
  removes a series (:attr:`dicom_node.spool.Spool.peer_checkpoints`);
* everything that decides the series' state goes to the node process over a pipe, as one
  call per instance that the C-STORE answer waits for: ``Registry.add_instance`` (a SOP
  Instance UID known in another series is refused whichever process got it), the
  completion hook, ``mark_released``; so do the admission counts (per host, and
  ``max_associations`` across all processes) and the metrics;
* TLS is served by the node process alone (a TLS session cannot be handed over).

A helper exits as soon as the node process is gone (its control pipe closes), and the node
starts a new one if a helper dies while it runs. kill -9 of the node during a burst loses
no acknowledged instance: the helper's answer waited for its journal's fdatasync.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from dicom_node.registry import InstanceMovedError
from dicom_node.scp import StoreSCP
from dicom_node.spool import InstanceHeader
from dicom_node.transport import GuardedAssociationServer

if TYPE_CHECKING:
    from dicom_node.config import Settings

__all__ = ["AcceptorPool"]

log = logging.getLogger("synthmr.acceptors")

#: metrics a helper may update in the node process (by name, through _RemoteMetrics)
_REMOTE_METRICS = frozenset(("stage", "associations", "connections_refused", "instances"))


# ====================================================================== helper process side
class _Link:
    """A helper's pipe to the node process: calls (answered; the caller waits) and notes.

    One call at a time per helper: the node process answers in order. Deferred notes
    (:meth:`defer`) travel with the next call: the per-instance timing rides on the next
    instance's ``add_instance`` instead of waking the node process once more."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._deferred: list[tuple[str, tuple[Any, ...]]] = []

    def call(self, op: str, *args: Any) -> Any:
        with self._lock:
            if self._deferred:
                self._conn.send(("notes", (self._deferred,), False))
                self._deferred = []
            self._conn.send((op, args, True))
            kind, value = self._conn.recv()
        if kind == "ok":
            return value
        if kind == "moved":
            raise InstanceMovedError(value)
        raise RuntimeError(f"node process: {value}")

    def note(self, op: str, *args: Any) -> None:
        with self._lock:
            self._conn.send((op, args, False))

    def defer(self, op: str, *args: Any) -> None:
        """A note sent with the next call (order kept)."""
        with self._lock:
            self._deferred.append((op, args))


class _RemoteRegistry:
    """The two registry writes of the receive path, done by the node process."""

    def __init__(self, link: _Link) -> None:
        self._link = link

    def add_instance(self, **fields: Any) -> tuple[int, int | None]:
        count, expected = self._link.call("add_instance", fields)
        return int(count), expected

    def mark_released(self, series_uids: list[str]) -> None:
        self._link.call("mark_released", list(series_uids))


class _RemoteMetric:
    def __init__(self, link: _Link, name: str, labels: tuple[str, ...] = ()) -> None:
        self._link, self._name, self._labels = link, name, labels

    def labels(self, *labels: str) -> _RemoteMetric:
        return _RemoteMetric(self._link, self._name, tuple(str(x) for x in labels))

    def _send(self, method: str, *args: float) -> None:
        # counts are updated before the helper goes on (a test or a scrape that follows
        # the answer sees them); the per-instance timing travels with the next call
        send = self._link.defer if self._name == "stage" else self._link.call
        send("metric", self._name, self._labels, method, args)

    def inc(self, amount: float = 1.0) -> None:
        self._send("inc", amount)

    def observe(self, value: float) -> None:
        self._send("observe", value)

    def set(self, value: float) -> None:
        self._send("set", value)


class _RemoteMetrics:
    """The NodeMetrics surface StoreSCP uses, updated in the node process."""

    def __init__(self, link: _Link) -> None:
        self._link = link

    def instance_received(self, calling_ae: str, result: str) -> None:
        if result != "stored":  # a stored one was counted with its add_instance call
            self._link.call("instance_received", calling_ae, result)

    def set_allowed_callers(self, ae_titles: Any) -> None:
        pass  # the node process labels the callers (same allow-list)

    def __getattr__(self, name: str) -> _RemoteMetric:
        return _RemoteMetric(self._link, name)


class _HandedOver(OSError):
    """get_request's way to tell socketserver that there is nothing to serve here (the
    connection went to another process): socketserver skips a request on OSError."""


class _HelperServer(GuardedAssociationServer):
    """The association server of a helper: its connections come from the node process
    (:class:`DispatchingServer`) over ``channel``; the admission counts live in the node
    process."""

    def __init__(
        self,
        *args: Any,
        link: _Link,
        channel: socket.socket,
        address: tuple[str, int],
        **kwargs: Any,
    ) -> None:
        self._link = link
        self._channel = channel
        self._address = address
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        self.socket.close()
        self.socket = self._channel  # serve_forever waits until it is readable
        self.server_address = self._address

    def server_activate(self) -> None:
        pass  # the node process listens

    def get_request(self) -> tuple[socket.socket, Any]:
        """A connection the node process accepted and handed over."""
        msg, fds, _, _ = socket.recv_fds(self._channel, 1024, 1)
        if not fds:
            raise _HandedOver("the node process closed the channel")
        host, _, port = msg.decode("utf-8").rpartition(" ")
        return socket.socket(fileno=fds[0]), (host, int(port))

    def count_connection(self, host: str) -> tuple[str, str] | None:
        refusal = self._link.call("count_connection", host)
        return None if refusal is None else (str(refusal[0]), str(refusal[1]))

    def count_setup_done(self, host: str) -> None:
        self._link.call("count_setup_done", host)

    def count_closed(self, host: str, pending: bool, assoc_key: Any) -> None:
        self._link.call("count_closed", host, pending, assoc_key)

    def count_association(self, assoc_key: Any) -> str | None:
        reason = self._link.call("count_association", assoc_key)
        return None if reason is None else str(reason)

    @staticmethod
    def assoc_key(assoc: Any) -> Any:
        return f"{os.getpid()}:{id(assoc)}"


class _HelperSCP(StoreSCP):
    """The node's SCP in a helper: the vendor rule (which needs the processing imports,
    seconds of start-up) runs in the node process, once per series and helper."""

    link: _Link

    def _expected_uncached(self, header: InstanceHeader, data: bytes) -> int | None:
        return self.link.call("expected_count", data)  # type: ignore[no-any-return]


def _light_settings(settings: Any) -> SimpleNamespace:
    """What a helper reads of the settings, as plain objects: unpickling the Settings
    themselves would import dicom_node.config and, through it, the processing stack."""
    sec = settings.security
    return SimpleNamespace(
        node=SimpleNamespace(**dataclasses.asdict(settings.node)),
        spool=SimpleNamespace(**dataclasses.asdict(settings.spool)),
        security=SimpleNamespace(
            require_known_callers=sec.require_known_callers,
            allowed_callers=tuple(
                SimpleNamespace(ae_title=c.ae_title, hosts=tuple(c.hosts))
                for c in sec.allowed_callers
            ),
            tls=SimpleNamespace(**dataclasses.asdict(sec.tls)),
        ),
    )


def _helper_main(index: int, channel_fd: int, conn_fd: int, ctl_fd: int) -> None:
    """A helper process: serve associations until told to stop or the node is gone."""
    ctl = Connection(ctl_fd)
    init = ctl.recv()
    from dicom_node.logging import configure_logging

    if init["log_level"]:
        configure_logging(init["log_level"], init["json_lines"])
    settings = init["settings"]
    link = _Link(Connection(conn_fd))
    channel = socket.socket(fileno=channel_fd)

    from dicom_node.spool import Spool

    spool = Spool(
        settings.spool.path,
        settings.spool.min_free_bytes,
        journal_owner=f"p{index}.",
        replay=False,
    )
    scp = _HelperSCP(
        settings,
        spool,
        _RemoteRegistry(link),  # type: ignore[arg-type]
        _RemoteMetrics(link),  # type: ignore[arg-type]
        expected_count=(lambda ds: None) if init["vendor_rule"] else None,
    )
    scp.link = link
    scp.server_class = functools.partial(
        _HelperServer, link=link, channel=channel, address=tuple(init["address"])
    )
    scp.start()
    link.note("ready", os.getpid(), time.process_time())
    while True:
        try:
            op, arg = ctl.recv()
        except (EOFError, OSError):
            os._exit(0)  # the node process is gone: so is this one, at once
        if op == "checkpoint":
            spool.journal.checkpoint()
        elif op == "reload":
            scp.reload(arg)
        elif op == "stop":
            scp.stop()
            spool.close()
            ctl.send(("done", time.process_time(), spool.journal.syncs))
            return
        ctl.send("done")


# ====================================================================== node process side
class DispatchingServer(GuardedAssociationServer):
    """The node process's association server with acceptor processes: it accepts every
    connection and serves it or hands it to a helper (:meth:`AcceptorPool.hand_over`),
    whichever process has the fewest connections."""

    pool: AcceptorPool | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._local_lock = threading.Lock()
        self.local_connections = 0  # connections this process serves now
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        pool = self.pool
        with self._local_lock:
            local = self.local_connections
        if pool is not None and pool.hand_over(sock, address, local):
            sock.close()  # the helper holds its own copy
            raise _HandedOver("served by an acceptor process")
        with self._local_lock:
            self.local_connections += 1
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if super().verify_request(request, client_address):
            return True
        self._local_done()
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._local_done()

    def _local_done(self) -> None:
        with self._local_lock:
            self.local_connections -= 1


@dataclass
class _Helper:
    index: int
    proc: subprocess.Popen[bytes]
    conn: Connection
    ctl: Connection
    channel: socket.socket  # connections handed over (SCM_RIGHTS)
    connections: int = 0  # handed over and not yet closed or refused
    ctl_lock: threading.Lock = field(default_factory=threading.Lock)
    pid: int = 0
    cpu_at_ready_s: float = 0.0  # its CPU time when it began to accept (start-up done)
    active: int = 0  # its open associations (the associations_active gauge sums them)
    pending: Counter[str] = field(default_factory=Counter)
    open: Counter[str] = field(default_factory=Counter)
    assocs: set[Any] = field(default_factory=set)
    #: series it stored instances of and has not released since (its associations')
    unreleased: set[str] = field(default_factory=set)
    associations: int = 0  # negotiated so far (tests)


class AcceptorPool:
    """The node process's side: starts the helpers and serves their calls."""

    #: a helper that died is restarted, but not more often than this
    RESTART_MIN_INTERVAL_S = 5.0

    def __init__(self, scp: StoreSCP, server: GuardedAssociationServer, processes: int) -> None:
        self.scp = scp
        self.server = server
        self.processes = processes
        self._helpers: dict[int, _Helper] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._started_at: dict[int, float] = {}
        #: CPU seconds the helpers spent from accepting to stopping (start-up and imports
        #: left out) (benchmarks)
        self.helper_cpu_s = 0.0
        #: fdatasyncs of the helpers' ingest journals, known after stop (benchmarks)
        self.helper_journal_syncs = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if isinstance(self.server, DispatchingServer):
            self.server.pool = self
        for index in range(1, self.processes):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        conn_here, conn_there = socket.socketpair()
        ctl_here, ctl_there = socket.socketpair()
        channel_here, channel_there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = (channel_there.fileno(), conn_there.fileno(), ctl_there.fileno())
        # the node's own code first, ahead of the working directory (which ``-m`` would
        # put first: a checkout there would give the helper other code than the node's)
        boot = (
            f"import sys; sys.path.insert(0, {_package_root()!r}); "
            "from dicom_node.acceptors import main; main(sys.argv[1:])"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", boot, str(index), *map(str, fds)],
            pass_fds=fds,
            env=dict(os.environ, PYTHONPATH=_import_path()),
        )
        conn_there.close()
        ctl_there.close()
        channel_there.close()
        helper = _Helper(
            index,
            proc,
            Connection(conn_here.detach()),
            Connection(ctl_here.detach()),
            channel_here,
        )
        root = logging.getLogger()
        from dicom_node.logging import JsonFormatter

        helper.ctl.send(
            {
                "settings": _light_settings(self.scp.settings),
                "address": list(self.server.server_address[:2]),
                "vendor_rule": self.scp.expected_count is not None,
                "log_level": logging.getLevelName(root.level) if root.handlers else "",
                "json_lines": any(isinstance(h.formatter, JsonFormatter) for h in root.handlers),
            }
        )
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self._helpers[index] = helper
                self._started_at[index] = time.monotonic()
        if stopping:  # a restart racing with stop(), which has taken its list already
            proc.kill()
            proc.wait()
            helper.ctl.close()
            helper.conn.close()
            helper.channel.close()
            return
        threading.Thread(
            target=self._serve, args=(helper,), name=f"acceptor-{index}", daemon=True
        ).start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            helpers = list(self._helpers.values())
        for h in helpers:
            done = self._control(h, "stop", timeout_s=15.0)
            if isinstance(done, tuple) and h.pid:
                self.helper_cpu_s += float(done[1]) - h.cpu_at_ready_s
                self.helper_journal_syncs += int(done[2])
        for h in helpers:
            try:
                h.proc.wait(10)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                h.proc.wait()
            h.ctl.close()
            h.channel.close()

    def hand_over(self, sock: socket.socket, address: Any, local: int) -> bool:
        """Give a connection just accepted to the ready helper with the fewest connections
        if it has fewer than this process (``local``); False: serve it here."""
        with self._lock:
            ready = [h for h in self._helpers.values() if h.pid and not self._stopping]
            helper = min(ready, key=lambda h: (h.connections, h.index), default=None)
            if helper is None or helper.connections >= local:
                return False
            helper.connections += 1
        try:
            socket.send_fds(
                helper.channel, [f"{address[0]} {address[1]}".encode()], [sock.fileno()]
            )
        except OSError:  # the helper is gone: serve it here
            with self._lock:
                helper.connections -= 1
            return False
        return True

    # ------------------------------------------------------------------ control
    def _control(self, helper: _Helper, op: str, arg: Any = None, timeout_s: float = 30.0) -> Any:
        """Send ``op`` to a helper and return its answer (None if it is gone or silent)."""
        with helper.ctl_lock:
            try:
                helper.ctl.send((op, arg))
                if helper.ctl.poll(timeout_s):
                    return helper.ctl.recv()
                else:
                    log.error(
                        "acceptor %d did not answer %s in %.0f s", helper.index, op, timeout_s
                    )
            except (EOFError, OSError):
                pass  # gone: nothing of it is left to checkpoint or stop
        return None

    def checkpoint_all(self) -> None:
        """Every helper's journal checkpointed (no record of theirs outlives a removal)."""
        with self._lock:
            helpers = list(self._helpers.values())
        for h in helpers:
            if self._control(h, "checkpoint") is None and h.proc.poll() is not None:
                with self._lock:  # dead, and _gone has not checkpointed for it yet
                    if self._helpers.get(h.index) is h:
                        self._checkpoint_for(h.index)

    def _checkpoint_for(self, index: int) -> None:
        """Checkpoint the journal of helper ``index``, which is dead (it appends no more):
        the files it renamed into place are in the page cache, which a process's death
        does not lose, so one syncfs makes them durable and its logs can go. Else a
        series removed before its successor runs would come back at the next start."""
        from dicom_node.journal import IngestJournal

        try:
            IngestJournal(self.scp.spool.root, f"p{index}.").checkpoint()
        except OSError as exc:  # its logs stay: the next start replays them
            log.error("journal of dead acceptor %d not checkpointed: %s", index, exc)

    def reload(self, settings: Settings) -> None:
        with self._lock:
            helpers = list(self._helpers.values())
        for h in helpers:
            self._control(h, "reload", _light_settings(settings))

    def ready(self) -> bool:
        """Every helper is accepting."""
        with self._lock:
            helpers = list(self._helpers.values())
        return len(helpers) == self.processes - 1 and all(h.pid for h in helpers)

    def helper_associations(self) -> int:
        """Associations the helpers negotiated so far."""
        with self._lock:
            return sum(h.associations for h in self._helpers.values())

    def remote_active(self) -> int:
        with self._lock:
            return sum(h.active for h in self._helpers.values())

    # ------------------------------------------------------------------ calls
    def _serve(self, helper: _Helper) -> None:
        while True:
            try:
                op, args, answer = helper.conn.recv()
            except (EOFError, OSError):
                break
            try:
                reply: tuple[str, Any] = ("ok", self._handle(helper, op, args))
            except InstanceMovedError as exc:
                reply = ("moved", str(exc))
            except Exception as exc:  # the helper answers the C-STORE with a failure
                log.exception("acceptor %d: %s failed", helper.index, op)
                reply = ("error", f"{type(exc).__name__}: {exc}")
            if answer:
                try:
                    helper.conn.send(reply)
                except OSError:
                    break
        self._gone(helper)

    def _handle(self, helper: _Helper, op: str, args: tuple[Any, ...]) -> Any:
        scp, server = self.scp, self.server
        if op == "notes":
            for note_op, note_args in args[0]:
                self._handle(helper, note_op, note_args)
            return None
        if op == "add_instance":
            fields = args[0]
            count, expected = scp.registry.add_instance(**fields)
            helper.unreleased.add(fields["series_uid"])
            scp.metrics.instance_received(fields.get("calling_ae", ""), "stored")
            if scp.on_instance is not None:
                scp.on_instance(fields["series_uid"], count, expected)
            return count, expected
        if op == "mark_released":
            helper.unreleased.difference_update(args[0])
            scp.registry.mark_released(args[0])
            if scp.on_release is not None:
                scp.on_release(args[0])
            return None
        if op == "metric":
            name, labels, method, values = args
            if name == "associations_active":
                helper.active = int(values[0])
                scp.publish_active()
            elif name in _REMOTE_METRICS and method in ("inc", "observe"):
                metric = getattr(scp.metrics, name)
                getattr(metric.labels(*labels) if labels else metric, method)(*values)
            return None
        if op == "instance_received":
            scp.metrics.instance_received(*args)
            return None
        if op == "count_connection":
            refusal = server.count_connection(args[0])
            if refusal is None:
                helper.open[args[0]] += 1
                helper.pending[args[0]] += 1
            else:
                self._connection_done(helper)
            return refusal
        if op == "count_setup_done":
            server.count_setup_done(args[0])
            helper.pending[args[0]] -= 1
            return None
        if op == "count_closed":
            host, pending, key = args
            server.count_closed(host, pending, key)
            helper.open[host] -= 1
            helper.pending[host] -= int(pending)
            helper.assocs.discard(key)
            self._connection_done(helper)
            return None
        if op == "count_association":
            reason = server.count_association(args[0])
            if reason is None:
                helper.assocs.add(args[0])
                helper.associations += 1
            return reason
        if op == "expected_count":
            if scp.expected_count is None:
                return None
            import pydicom

            dataset = pydicom.dcmread(io.BytesIO(args[0]), force=True)
            return scp.expected_count(dataset)
        if op == "ready":
            helper.pid, helper.cpu_at_ready_s = int(args[0]), float(args[1])
            log.info("acceptor process %d (pid %d) accepting", helper.index, helper.pid)
            return None
        raise ValueError(f"unknown call {op!r}")

    def _connection_done(self, helper: _Helper) -> None:
        with self._lock:
            helper.connections = max(0, helper.connections - 1)

    def _gone(self, helper: _Helper) -> None:
        """A helper's pipe closed: give back what it held; restart it unless stopping."""
        with self._lock:
            stopping = self._stopping
        if helper.unreleased and not stopping:
            # its associations ended with it, as an abort: the series they carried start
            # their quiet period (completion), as after an abort in this process
            series = sorted(helper.unreleased)
            helper.unreleased.clear()
            try:
                self._handle(helper, "mark_released", (series,))
            except Exception:
                log.exception("acceptor %d: releasing %s failed", helper.index, series)
        for host in list(helper.open):
            for i in range(helper.open[host]):
                self.server.count_closed(host, i < helper.pending[host], None)
        for key in helper.assocs:
            self.server.count_closed_association(key)
        helper.active = 0
        with self._lock:
            helper.pid = 0  # hand_over passes it by
            helper.connections = 0
        helper.channel.close()
        self.scp.publish_active()
        code = helper.proc.wait()
        with self._lock:
            if self._stopping or self._helpers.get(helper.index) is not helper:
                return
            self._checkpoint_for(helper.index)  # before it is forgotten (checkpoint_all)
            del self._helpers[helper.index]
            wait = self._started_at[helper.index] + self.RESTART_MIN_INTERVAL_S - time.monotonic()
        log.error("acceptor process %d exited (code %s): restarting it", helper.index, code)
        if wait > 0:
            time.sleep(wait)
        with self._lock:
            if self._stopping:
                return
        self._spawn(helper.index)


def _package_root() -> str:
    """The directory that holds this ``dicom_node`` package."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_path() -> str:
    """PYTHONPATH for a helper: this package's root first (the node's own code)."""
    rest = os.environ.get("PYTHONPATH", "")
    return _package_root() + (os.pathsep + rest if rest else "")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="synthmr acceptor process (started by the node)")
    ap.add_argument("index", type=int)
    ap.add_argument("channel_fd", type=int)
    ap.add_argument("conn_fd", type=int)
    ap.add_argument("ctl_fd", type=int)
    a = ap.parse_args(argv)
    _helper_main(a.index, a.channel_fd, a.conn_fd, a.ctl_fd)


if __name__ == "__main__":
    main()
