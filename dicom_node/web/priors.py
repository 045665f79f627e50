"""Earlier synthmr results of a patient from PACS: C-FIND the patient's studies, C-FIND
their SR series whose description is synthmr's, C-GET those SRs and read the volumes
back from the TID 1500 content tree (the codes of dicom_node.export.sr)."""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.logging import log_event

__all__ = ["SR_DESCRIPTION_PREFIX", "pacs_priors", "sr_figures"]

log = logging.getLogger("synthmr.priors")
SR_DESCRIPTION_PREFIX = "synthmr volumes"
_WHOLE = {"ICV": "ICV", "BPV": "BPV", "BPF": "BPF", "MYV": "MYELIN"}
_VOLUME = "118565006"


def sr_figures(sr: Dataset) -> dict[str, float]:
    """Volumes (mL) and BPF from a synthmr TID 1500 SR."""
    out: dict[str, float] = {}

    def walk(items: Any) -> None:
        tissue = None
        for it in items:
            if it.get("ValueType") == "TEXT" and str(it.get("TextValue", "")).startswith(
                "synthmr "
            ):
                tissue = str(it.TextValue).split(" ", 1)[1]
        for it in items:
            vt = it.get("ValueType")
            if vt == "NUM" and "MeasuredValueSequence" in it and it.MeasuredValueSequence:
                code = str(it.ConceptNameCodeSequence[0].CodeValue)
                value = float(it.MeasuredValueSequence[0].NumericValue)
                if code in _WHOLE:
                    out[_WHOLE[code]] = value
                elif code == _VOLUME and tissue:
                    out[tissue] = value
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(sr.get("ContentSequence", []))
    return out


def pacs_priors(
    identity: dict[str, Any], settings: Any, destinations: list[Any]
) -> list[dict[str, Any]]:
    """Earlier synthmr SR results of ``identity['patient_id']`` in each destination."""
    pid = identity.get("patient_id")
    if not pid:
        return []
    out: list[dict[str, Any]] = []
    for d in destinations:
        for study_uid, study_date, sr in _fetch_srs(pid, settings.node.ae_title, d):
            figures = sr_figures(sr)
            if figures:
                out.append(
                    {
                        "source": f"PACS {d.name}",
                        "study_uid": study_uid,
                        "study_date": study_date,
                        "age_years": None,
                        "figures": figures,
                    }
                )
    return out


def _fetch_srs(pid: str, calling: str, dest: Any) -> list[tuple[str, str, Dataset]]:
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import (
        Comprehensive3DSRStorage,
        ComprehensiveSRStorage,
        EnhancedSRStorage,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
    )

    sr_classes = (Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage)
    received: list[Dataset] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = float(dest.timeout_s)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for cls in sr_classes:
        ae.add_requested_context(cls)
    roles = [build_role(cls, scp_role=True) for cls in sr_classes]
    assoc = ae.associate(
        dest.host, dest.port, ae_title=dest.ae_title, ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )  # fmt: skip
    if not assoc.is_established:
        raise ConnectionError(f"{dest.name}: association for C-FIND/C-GET refused or failed")
    out: list[tuple[str, str, Dataset]] = []
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.PatientID = pid
        q.StudyInstanceUID = ""
        q.StudyDate = ""
        studies = _find(assoc, q, StudyRootQueryRetrieveInformationModelFind)
        for st in studies:
            s = Dataset()
            s.QueryRetrieveLevel = "SERIES"
            s.StudyInstanceUID = st.StudyInstanceUID
            s.SeriesInstanceUID = ""
            s.Modality = "SR"
            s.SeriesDescription = ""
            for se in _find(assoc, s, StudyRootQueryRetrieveInformationModelFind):
                if not str(se.get("SeriesDescription", "")).startswith(SR_DESCRIPTION_PREFIX):
                    continue
                g = Dataset()
                g.QueryRetrieveLevel = "SERIES"
                g.StudyInstanceUID = st.StudyInstanceUID
                g.SeriesInstanceUID = se.SeriesInstanceUID
                received.clear()
                for _status, _ in assoc.send_c_get(g, StudyRootQueryRetrieveInformationModelGet):
                    pass
                for sr in received:
                    out.append((str(st.StudyInstanceUID), str(st.get("StudyDate", "")), sr))
    finally:
        assoc.release()
    log_event(log, "pacs_priors", destination=dest.name, studies_with_sr=len(out))
    return out


def _find(assoc: Any, query: Dataset, model: Any) -> list[Dataset]:
    out = []
    for status, ident in assoc.send_c_find(query, model):
        if status is not None and status.get("Status") in (0xFF00, 0xFF01) and ident is not None:
            out.append(ident)
    return out
