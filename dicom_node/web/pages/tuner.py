"""The contrast tuner (``/series/{uid}/tuner``): the browser synthesizes from the stored maps
(``maps.bin``); an operator sends the tuned contrast to the outbox."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from dicom_node.logging import log_event
from dicom_node.seriesstore import load_series
from dicom_node.web.auth import Session
from dicom_node.web.core import WebApp

log = logging.getLogger("synthmr.web")


def _presets(stored_meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The built-in presets, then this series' own plain contrasts."""
    from processing.synthesis import PRESETS

    presets = {}
    for name, spec in PRESETS.items():
        r = spec.resolved()
        presets[name] = {
            "kind": r.kind.value, "tr_ms": r.tr_ms, "te_ms": r.te_ms,
            "ti_ms": r.ti_ms, "ti2_ms": r.ti2_ms,
        }  # fmt: skip
    for name, s in (stored_meta.get("synthetic") or {}).items():
        plain = not s.get("ai_enhanced") and not name.endswith("_MIX")
        if s.get("kind") in ("SE", "IR", "PSIR", "DIR") and plain:
            presets[f"{name} (this series)"] = {
                k: s.get(k) for k in ("kind", "tr_ms", "te_ms", "ti_ms", "ti2_ms")
            }
    return presets


async def tuner_page(w: WebApp, request: Request, sess: Session) -> Response:
    uid = request.path_params["uid"]
    stored = load_series(w.ctx.spool_root, uid)
    if stored is None:
        return HTMLResponse("no stored maps for this series", status_code=404)
    from processing.synthesis import EQUATIONS

    return w.page(
        "tuner.html",
        request,
        sess,
        uid=uid,
        meta=stored.meta,
        presets=_presets(stored.meta),
        equations={k.value: v for k, v in EQUATIONS.items()},
    )


#: the tuner's binary of a stored series, written on first request beside maps.npz
TUNER_MAPS = "tuner_maps.bin"


def tuner_maps_file(path: Path) -> Path:
    """``<results>/<series>/tuner_maps.bin``, made once from maps.npz: header
    ``<u4 nz, ny, nx, n_mask``, then T1, T2, PD inside the mask (float32, C order) and the
    mask (uint8, nz*ny*nx). Written to a temporary name, then renamed (a concurrent request
    never reads half a file)."""
    out = path / TUNER_MAPS
    if out.is_file():
        return out
    with np.load(path / "maps.npz") as z:  # only the arrays the tuner needs
        mask = z["mask"].astype(bool)
        nz, ny, nx = mask.shape
        parts = [struct.pack("<4I", nz, ny, nx, int(mask.sum()))]
        for k in ("t1_ms", "t2_ms", "pd_pu"):
            parts.append(np.ascontiguousarray(z[k][mask], "<f4").tobytes())
    parts.append(mask.astype(np.uint8).tobytes())
    tmp = out.with_name(f".{TUNER_MAPS}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(b"".join(parts))
    os.replace(tmp, out)
    return out


async def maps_bin(w: WebApp, request: Request, sess: Session) -> Response:
    """The series' maps for the tuner (:func:`tuner_maps_file`)."""
    stored = load_series(w.ctx.spool_root, request.path_params["uid"])
    if stored is None:
        return JSONResponse({"error": "no stored maps"}, status_code=404)
    path = await asyncio.to_thread(tuner_maps_file, stored.path)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        headers={"Cache-Control": "private, max-age=300"},
    )


async def send_tuned(w: WebApp, request: Request, sess: Session) -> Response:
    uid = request.path_params["uid"]
    from dicom_node.web.tuned import spec_from_request, tuned_series
    from processing.synthesis import SynthesisError

    stored = load_series(w.ctx.spool_root, uid)
    if stored is None:
        return JSONResponse({"error": "no stored maps"}, status_code=404)
    try:
        body = await request.json()
        spec = spec_from_request(body if isinstance(body, dict) else {})
    except (SynthesisError, ValueError) as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    if w.ctx.send_outputs is None:
        return JSONResponse({"error": "no outbox on this node"}, status_code=503)
    datasets = await asyncio.to_thread(tuned_series, stored, spec, w.ctx.export_settings)
    n = await asyncio.to_thread(w.ctx.send_outputs, uid, datasets)
    desc = spec.description
    w.audit(request, sess, "send_tuned", uid, f"{desc}; {n} outbox items")
    log_event(log, "web_send_tuned", series_uid=uid, user=sess.user, contrast=desc, items=n)
    n_dest = n // max(len(datasets), 1)
    return JSONResponse(
        {
            "message": f"{desc}: {len(datasets)} images queued to {n_dest} destination(s)",
            "series_instance_uid": str(datasets[0].SeriesInstanceUID) if datasets else "",
            "description": desc,
            "instances": len(datasets),
        }
    )


def routes(w: WebApp) -> list[Route]:
    return [
        w.route("/series/{uid}/tuner", tuner_page),
        w.route("/api/series/{uid}/maps.bin", maps_bin, api=True),
        w.route("/api/series/{uid}/send", send_tuned, role="operator", api=True, methods=["POST"]),
    ]
