"""Everything the report shows, assembled from the stored series, the normative table and
the patient's earlier results (this node's stored series, and PACS SRs when configured)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.seriesstore import StoredSeries, load_series
from processing import normative
from processing._version import __version__
from processing.report import change_per_year, years_between
from processing.results import QuantMaps

__all__ = ["KEY_IMAGES", "build_report_data", "registry_priors", "report_data"]

#: key images, first available of each group
KEY_IMAGES = (("FLAIR_AI", "FLAIR"), ("T1W",), ("T2W",), ("DIR_MIX", "DIR"))


def registry_priors(spool_root: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Earlier studies of the same patient (PatientID) processed by this node."""
    me = meta.get("patient") or {}
    pid, study, when = me.get("patient_id"), me.get("study_uid"), me.get("study_date") or ""
    out = []
    if not pid:
        return out
    for p in (Path(spool_root) / "results").glob("*/meta.json"):
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        them = m.get("patient") or {}
        if them.get("patient_id") != pid or them.get("study_uid") == study:
            continue
        if when and (them.get("study_date") or "") >= when:
            continue  # only earlier visits
        out.append(
            {
                "source": "this node",
                "study_uid": them.get("study_uid"),
                "study_date": them.get("study_date") or "",
                "age_years": them.get("age_years"),
                "figures": {k: v for k, v in (m.get("volumes_ml") or {}).items()},
            }
        )
    return out


#: the last ratio volume computed, by (maps file, its mtime): the report's medians and its
#: ratio Parametric Map of one series both need it (~0.4 s each at 30x256x256)
_last_ratio: dict[tuple[str, int], np.ndarray] = {}
_last_ratio_lock = threading.Lock()


def ratio_volume(stored: StoredSeries) -> np.ndarray:
    """T1w/T2w ratio ``[z, y, x]`` of the preset T1W and T2W synthesized from the stored maps
    (physical signals, so the display scale of either image does not enter). Read-only:
    the array is shared with the next caller for the same stored maps."""
    key = _ratio_key(stored.path / "maps.npz")
    with _last_ratio_lock:
        if key is not None and key in _last_ratio:
            return _last_ratio[key]
    ratio = ratio_of_maps([stored.quant_maps()])
    if key is not None:
        _keep_ratio(key, ratio)
    return ratio


def _ratio_key(maps_file: Path) -> tuple[str, int] | None:
    """The cache key of the stored ``maps_file`` as it is now (None: not there)."""
    try:
        return (str(maps_file), maps_file.stat().st_mtime_ns)
    except OSError:
        return None


def _keep_ratio(key: tuple[str, int], ratio: np.ndarray) -> None:
    with _last_ratio_lock:
        _last_ratio.clear()
        _last_ratio[key] = ratio


def ratio_of_maps(held: list[QuantMaps]) -> np.ndarray:
    """T1w/T2w ratio (read-only) of the maps in ``held`` (as the store keeps them:
    float32, 0 outside the mask); the list is emptied: the maps go before the ratio's
    temporaries come (the node's export peak)."""
    from processing.synthesis import physical_signals_in_mask, resolve_spec
    from processing.t1t2ratio import t1w_t2w_ratio_in_mask

    maps = held.pop()
    # inside the mask only (the whole-grid float64 signals were ~370 MB at 40 x 512 x 512)
    mask, (t1w, t2w) = physical_signals_in_mask(maps, (resolve_spec("T1W"), resolve_spec("T2W")))
    del maps
    ratio = t1w_t2w_ratio_in_mask(t1w, t2w, mask)
    ratio.flags.writeable = False
    return ratio


def remember_ratio(maps_file: Path, ratio: np.ndarray) -> None:
    """Keep ``ratio`` as :func:`ratio_volume`'s answer for the stored ``maps_file`` as it
    is now (the node's job computed it from the maps before they were stored)."""
    key = _ratio_key(maps_file)
    if key is not None:
        _keep_ratio(key, ratio)


def early_ratio(maps: QuantMaps) -> np.ndarray:
    """The T1w/T2w ratio volume of the maps as soon as they exist (the node's job, while
    its worker segments): what :func:`ratio_volume` makes of the same maps once stored
    (computed from the float32 values the store keeps), for :func:`remember_ratio` and
    :func:`early_ratio_medians`."""
    from dicom_node.seriesstore import masked_f32

    mask = np.asarray(maps.mask, bool)
    t1 = masked_f32(maps.t1_ms, mask)
    zeros = np.zeros_like(t1)  # as StoredSeries.quant_maps gives them
    held = [
        QuantMaps(
            t1_ms=t1,
            t2_ms=masked_f32(maps.t2_ms, mask),
            pd_pu=masked_f32(maps.pd_pu, mask),
            b1=masked_f32(maps.b1, mask),
            m0=zeros,
            residual=zeros,
            mask=mask,
            failed=np.asarray(maps.failed, bool),
        )
    ]
    del t1
    return ratio_of_maps(held)


def early_ratio_medians(ratio: np.ndarray, fractions: dict[str, np.ndarray], folder: Path) -> None:
    """The report's T1w/T2w tissue medians of :func:`early_ratio`'s ratio, cached as
    ``folder/t1w_t2w.json`` (``folder``: the series' store being written,
    :class:`dicom_node.seriesstore.PendingSeries`), as :func:`_ratio` would make them from
    the stored maps and fractions (the same uint8 fraction values)."""
    from dicom_node.seriesstore import fraction_u8
    from processing.t1t2ratio import tissue_medians

    fr = {
        t: fraction_u8(fractions[t]).astype(np.float32) / 255.0
        for t in ("WM", "GM")
        if t in fractions
    }
    if fr:
        (folder / "t1w_t2w.json").write_text(json.dumps(tissue_medians(ratio, fr)))


def cached_render(
    spool_root: Path,
    series_uid: str,
    data: dict[str, Any],
    render: Callable[[dict[str, Any]], tuple[bytes, bytes]] | None = None,
) -> tuple[bytes, bytes]:
    """(PDF, PNG) of the report, rendered once per distinct content (priors may change it).

    ``render``: :func:`processing.report.render_report`, or a stand-in that returns what it
    would (the node's job renders in its worker while it exports)."""
    import hashlib

    from processing.report import render_report

    stored = load_series(spool_root, series_uid)
    key = hashlib.sha256(
        json.dumps(
            {k: v for k, v in data.items() if k != "images"}, sort_keys=True, default=str
        ).encode()
    ).hexdigest()[:20]
    if stored is not None:
        pdf_p, png_p = stored.path / f"report-{key}.pdf", stored.path / f"report-{key}.png"
        try:
            return pdf_p.read_bytes(), png_p.read_bytes()
        except OSError:
            pass  # not rendered yet, or another content's page replaced it meanwhile
    pdf, png = (render or render_report)(data)
    if stored is not None:
        for old in stored.path.glob("report-*"):
            if old not in (pdf_p, png_p):
                old.unlink(missing_ok=True)
        # whole files only: another thread (the export job, a browser) may read them now
        for path, content in ((pdf_p, pdf), (png_p, png)):
            part = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            part.write_bytes(content)
            os.replace(part, path)
    return pdf, png


def _ratio(stored: StoredSeries) -> dict[str, float]:
    from processing.t1t2ratio import tissue_medians

    cache = stored.path / "t1w_t2w.json"
    try:
        return {str(k): float(v) for k, v in json.loads(cache.read_text()).items()}
    except (OSError, ValueError):
        pass
    # only the two fractions, read after the ratio volume: not every stored array at once
    names = [f"frac_{t}" for t in ("WM", "GM")]
    with np.load(stored.path / "maps.npz") as z:
        if not any(n in z.files for n in names):
            return {}
    ratio = ratio_volume(stored)
    a = stored.arrays(names)
    fr = {
        t: a.pop(f"frac_{t}").astype(np.float32) / 255.0 for t in ("WM", "GM") if f"frac_{t}" in a
    }
    medians = tissue_medians(ratio, fr)
    cache.write_text(json.dumps(medians))
    return medians


def _key_images(stored: StoredSeries) -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    out = []
    for group in KEY_IMAGES:
        for name in group:
            p = stored.thumb(name)
            if p is not None:
                out.append((name, np.asarray(Image.open(p).convert("L"))))
                break
    return out


def build_report_data(
    spool_root: Path,
    series_uid: str,
    reference_table: str = "",
    pacs_priors: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None,
) -> dict[str, Any] | None:
    stored = load_series(spool_root, series_uid)
    if stored is None:
        return None
    meta = stored.meta
    patient = dict(meta.get("patient") or {})
    vols = meta.get("volumes_ml") or {}
    table = normative.load_table(reference_table or None)
    age, sex = patient.get("age_years"), patient.get("sex")
    refs: dict[str, Any] = {}
    for f in normative.FIGURES:
        r = normative.reference_at(table, f, age, sex)
        refs[f] = {"mean": r.mean, "low": r.low, "high": r.high, "note": r.note,
                   "entries": list(r.entries)}  # fmt: skip
    priors = registry_priors(spool_root, meta)
    pacs_errors = ""
    if pacs_priors is not None:
        try:
            known = {p["study_uid"] for p in priors}
            for p in pacs_priors(patient):
                if p.get("study_uid") not in known and p.get("study_uid") != patient.get(
                    "study_uid"
                ):
                    if (p.get("study_date") or "") < (patient.get("study_date") or "99999999"):
                        priors.append(p)
                        known.add(p.get("study_uid"))
        except Exception as exc:  # PACS down: the report still comes, saying so
            pacs_errors = f"PACS query failed: {type(exc).__name__}: {exc}"
    for p in priors:
        if p.get("age_years") is None and age is not None:
            dt = years_between(p.get("study_date", ""), patient.get("study_date", ""))
            p["age_years"] = None if dt is None else age - dt
    priors.sort(key=lambda p: p.get("study_date") or "")
    cpy = {
        f: change_per_year(
            [(p.get("study_date", ""), p["figures"].get(f)) for p in priors]
            + [(patient.get("study_date", ""), vols.get(f))]
        )
        for f in normative.FIGURES
    }
    prov = meta.get("provenance") or {}
    mh = (
        prov.get("model_sha256") or (prov.get("enhance") or {}).get("model_sha256", "")
        if isinstance(prov.get("enhance"), dict)
        else prov.get("model_sha256", "")
    )
    return {
        "series_uid": series_uid,
        "patient": patient,
        "order": list(normative.FIGURES),
        "figures": {f: vols.get(f) for f in normative.FIGURES},
        "references": refs,
        "priors": priors,
        "pacs_errors": pacs_errors,
        "change_per_year": cpy,
        "ratio": _ratio(stored),
        "images": _key_images(stored),
        "version": __version__,
        "model_hash": mh or "",
    }


def report_data(ctx: Any, series_uid: str) -> dict[str, Any] | None:
    """For the web app (WebContext)."""
    return build_report_data(
        ctx.spool_root,
        series_uid,
        ctx.web.reference_table,
        ctx.priors if ctx.web.prior_sources else None,
    )


def series_report_documents(
    spool_root: Path, series_uid: str, sources: list[Any], settings: Any
) -> list[Any]:
    """The report of a just-processed series as DICOM (pipeline hook): earlier visits from
    this node and, when ``[web] prior_sources`` names destinations, from PACS by C-FIND."""
    return start_series_report(spool_root, series_uid, sources, settings)()


def start_series_report(
    spool_root: Path,
    series_uid: str,
    sources: list[Any],
    settings: Any,
    submit: Callable[..., Any] | None = None,
) -> Callable[[], list[Any]]:
    """:func:`series_report_documents` in two steps: gather the report's data now and
    start rendering the page with ``submit`` (the node's worker pool: matplotlib runs there
    while the node encodes the other outputs); the returned function waits for the page
    and builds the documents."""
    from dicom_node.export import reference_images
    from dicom_node.export.report_page import report_documents
    from dicom_node.export.uids import parameter_fingerprint
    from dicom_node.web.priors import pacs_priors
    from dicom_node.web.tuned import stored_result

    web = settings.web
    dests = [d for d in settings.destinations if d.name in web.prior_sources]

    def from_pacs(identity: dict[str, Any]) -> list[dict[str, Any]]:
        return pacs_priors(identity, settings, dests)

    data = build_report_data(
        spool_root, series_uid, web.reference_table, from_pacs if dests else None
    )
    if data is None:
        return lambda: []  # no stored series: no report
    rendering = None
    if submit is not None:
        from processing.report import render_report

        rendering = submit(render_report, data)
    # the ratio map while the page renders
    xs = settings.export
    stored = load_series(spool_root, series_uid)
    result = stored_result(stored, mask_only=True)  # type: ignore[arg-type]
    fp = parameter_fingerprint(result, xs)
    ratio_map = ratio_parametric_map(stored, result, sources, xs, fp)  # type: ignore[arg-type]
    del stored, result

    def finish() -> list[Any]:
        def rendered(_: dict[str, Any]) -> tuple[bytes, bytes]:
            return rendering.result()  # type: ignore[union-attr]

        render = rendered if rendering is not None else None
        pdf, png = cached_render(spool_root, series_uid, data, render)
        docs = report_documents(pdf, png, reference_images(sources)[0], xs, fp)
        return [*docs, ratio_map]

    return finish


#: The T1w/T2w ratio's coded meaning (no DCM/SCT code exists for it).
RATIO_INFO_ARGS = ("T1w_T2w_ratio", "T1w/T2w ratio of synthetic T1W and T2W (presets)")


def ratio_parametric_map(
    stored: StoredSeries, result: Any, sources: list[Any], xs: Any, fingerprint: str
) -> Any:
    """The T1w/T2w ratio as a Parametric Map (series number: report + 2)."""
    from pydicom.sr.coding import Code

    from dicom_node.export.common import SCHEME, UCUM_RATIO, MapInfo, MapKind, series_number_base
    from dicom_node.export.geometry import slice_geometry
    from dicom_node.export.parametric_map import parametric_map
    from dicom_node.export.report_page import REPORT_SERIES_OFFSET

    info = MapInfo(
        *RATIO_INFO_ARGS, Code("T1WT2W", SCHEME, "T1w/T2w ratio"), UCUM_RATIO, "T1WT2WMAP"
    )
    geometry = slice_geometry(result, sources, xs)
    number = series_number_base(geometry.refs[0], xs) + REPORT_SERIES_OFFSET + 2
    return parametric_map(
        result, MapKind.T1, geometry, xs, number, fingerprint,
        data=ratio_volume(stored), info=info, name="T1WT2W",
    )  # fmt: skip
