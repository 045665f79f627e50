"""Wire the web interface to a running :class:`dicom_node.service.Node` (a small hook)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicom_node.web.app import WebContext
from dicom_node.web.server import WebServer

__all__ = ["start_web"]


def start_web(node: Any) -> WebServer:
    """Start the web server of ``node`` (raises WebStartRefused for unsafe settings)."""
    from dicom_node.pipeline import encode_part10

    settings = node.settings
    registry = node.registry

    def retry(series_uid: str) -> int:
        registry.requeue_dead_outbox(series_uid)
        job = registry.retry(series_uid)
        node._jobs_wake.set()
        node.outbox.wake()
        return job

    def send_outputs(series_uid: str, datasets: list[Any]) -> int:
        paths = node.spool.store_outputs(
            series_uid, ((str(ds.SOPInstanceUID), encode_part10(ds)) for ds in datasets)
        )
        rows = [
            (d.name, str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(p))
            for ds, p in zip(datasets, paths, strict=True)
            for d in node.outbox.destinations.values()
        ]
        n = registry.queue_outputs(series_uid, rows)
        node.outbox.wake()
        return n

    def priors(identity: dict[str, Any]) -> list[dict[str, Any]]:
        from dicom_node.web.priors import pacs_priors

        return pacs_priors(identity, settings, list(node.outbox.destinations.values()))

    ctx = WebContext(
        web=settings.web,
        registry=registry,
        spool_root=Path(node.spool.root),
        destinations=lambda: list(node.outbox.destinations),
        retry=retry,
        wake_outbox=node.outbox.wake,
        send_outputs=send_outputs,
        export_settings=settings.export,
        priors=priors,
    )
    return WebServer(ctx).start()
