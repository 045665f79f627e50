"""IHE IOCM rejection note: a Key Object Selection document titled (113001, DCM,
"Rejected for Quality Reasons") that lists instances a PACS should hide.

The node sends one when a re-run with changed inputs superseded outputs a destination
already holds: the new version has new UIDs, and the note retires the old ones.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from processing._version import __version__

from .settings import ExportSettings

__all__ = ["KEY_OBJECT_SELECTION", "REJECTED_FOR_QUALITY", "rejection_note"]

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
#: (code value, coding scheme, meaning) of the document title, PS3.16 CID 7011
REJECTED_FOR_QUALITY = ("113001", "DCM", "Rejected for Quality Reasons")

_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_COMPOSITE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
}


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _sop_ref(cls: str, sop: str) -> Dataset:
    r = Dataset()
    r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = cls, sop
    return r


def rejection_note(
    instances: Sequence[tuple[str, str, str, str]],
    source: Dataset,
    settings: ExportSettings,
    reason: str = "superseded by a re-run with changed inputs",
) -> Dataset:
    """The note rejecting ``instances`` ``(sop_uid, sop_class_uid, study_uid, series_uid)``.

    Patient and study attributes come from ``source`` (an instance of the source series);
    the note's UIDs derive from the rejected SOP UIDs (the same set gives the same note).
    """
    if not instances:
        raise ValueError("rejection_note: no instances to reject")
    sops = sorted(i[0] for i in instances)
    uid = generate_uid(prefix=settings.uid_root, entropy_srcs=["IOCM", __version__, *sops])
    series_uid = generate_uid(prefix=settings.uid_root, entropy_srcs=["IOCM-series", *sops])
    now = datetime.datetime.now(datetime.UTC)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = KEY_OBJECT_SELECTION, uid
    for kw in _PATIENT_STUDY:
        ds.setdefault(kw, source.get(kw, ""))
    ds.StudyInstanceUID = instances[0][2]
    ds.Modality = "KO"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 9900
    ds.SeriesDescription = "synthmr rejection note (IOCM)"
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.Manufacturer = settings.manufacturer
    ds.SoftwareVersions = f"synthmr {__version__}"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    by_study: dict[str, dict[str, list[Dataset]]] = defaultdict(lambda: defaultdict(list))
    for sop, cls, study, series in instances:
        by_study[study][series].append(_sop_ref(cls, sop))
    evidence = []
    for study, series_map in sorted(by_study.items()):
        st = Dataset()
        st.StudyInstanceUID = study
        st.ReferencedSeriesSequence = DicomSequence()
        for series, refs in sorted(series_map.items()):
            se = Dataset()
            se.SeriesInstanceUID = series
            se.ReferencedSOPSequence = DicomSequence(refs)
            st.ReferencedSeriesSequence.append(se)
        evidence.append(st)
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence(evidence)
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code(*REJECTED_FOR_QUALITY)])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = DicomSequence([template])
    items = []
    text = Dataset()
    text.RelationshipType, text.ValueType, text.TextValue = "CONTAINS", "TEXT", reason[:1024]
    text.ConceptNameCodeSequence = DicomSequence([_code("113012", "DCM", "Key Object Description")])
    items.append(text)
    for sop, cls, _study, _series in sorted(instances):
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "COMPOSITE" if cls in _COMPOSITE_CLASSES or ".88." in cls else "IMAGE"
        item.ReferencedSOPSequence = DicomSequence([_sop_ref(cls, sop)])
        items.append(item)
    ds.ContentSequence = DicomSequence(items)
    return ds
