"""Everything the report shows, assembled from the stored series, the normative table and
the patient's earlier results (this node's stored series, and PACS SRs when configured)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.seriesstore import StoredSeries, load_series
from processing import normative
from processing._version import __version__
from processing.report import change_per_year, years_between

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


def _ratio(stored: StoredSeries) -> dict[str, float]:
    from processing.synthesis import synthesize
    from processing.t1t2ratio import t1w_t2w_ratio, tissue_medians

    maps = stored.quant_maps()
    a = stored.arrays()
    fr = {t: a[f"frac_{t}"].astype(np.float32) / 255.0 for t in ("WM", "GM") if f"frac_{t}" in a}
    if not fr:
        return {}
    t1w, t2w = synthesize(maps, "T1W"), synthesize(maps, "T2W")
    # physical signal (image / scale): the ratio must not depend on the display scale
    ratio = t1w_t2w_ratio(t1w.image / t1w.scale, t2w.image / t2w.scale, maps.mask)
    return tissue_medians(ratio, fr)


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
    from dicom_node.export import reference_images
    from dicom_node.export.common import parameter_fingerprint
    from dicom_node.export.report_page import report_documents
    from dicom_node.pipeline import export_settings
    from dicom_node.web.priors import pacs_priors
    from dicom_node.web.tuned import stored_result
    from processing.report import render_report

    web = settings.web
    dests = [d for d in settings.destinations if d.name in web.prior_sources]

    def from_pacs(identity: dict[str, Any]) -> list[dict[str, Any]]:
        return pacs_priors(identity, settings, dests)

    data = build_report_data(
        spool_root, series_uid, web.reference_table, from_pacs if dests else None
    )
    if data is None:
        return []
    pdf, png = render_report(data)
    xs = export_settings(settings.export)
    stored = load_series(spool_root, series_uid)
    fp = parameter_fingerprint(stored_result(stored), xs)  # type: ignore[arg-type]
    return report_documents(pdf, png, reference_images(sources)[0], xs, fp)
