"""The one-page report as DICOM: Encapsulated PDF and a Secondary Capture of the same page.

Every PACS viewer shows at least one of the two. Patient and study come from the source
series; UIDs derive from the source series, the software version and the processing
parameters (a re-run replaces). Both say "synthetic MRI, research use" in the page, the
series description and the document title; the page carries the patient's name, so
BurnedInAnnotation is YES.
"""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    EncapsulatedPDFStorage,
    SecondaryCaptureImageStorage,
)

from processing._version import __version__

from .common import new_instance, series_number_base, set_equipment
from .settings import ExportSettings
from .uids import derive_uid

__all__ = ["REPORT_SERIES_OFFSET", "report_documents"]

#: Report series numbers: source + export offset + 202 (PDF) and + 203 (Secondary Capture).
REPORT_SERIES_OFFSET = 202
TITLE = "synthmr brain report (synthetic MRI, research use)"


def _common(ref: Dataset, settings: ExportSettings, sop_class: str, sop_uid: str) -> Dataset:
    ds = new_instance(ref, sop_class, sop_uid)
    da, tm = str(ds.InstanceCreationDate), str(ds.InstanceCreationTime)
    ds.ContentDate, ds.ContentTime = da, tm
    ds.SeriesDate, ds.SeriesTime = da, tm
    set_equipment(ds, settings)
    ds.ConversionType = "WSD"  # workstation
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    return ds


def report_documents(
    pdf: bytes,
    png: bytes,
    ref: Dataset,
    settings: ExportSettings,
    fingerprint: str,
) -> list[Dataset]:
    """``[Encapsulated PDF, Secondary Capture]`` of one report page (``ref``: a source
    header of the series: patient, study and series number)."""
    from PIL import Image

    src = str(ref.SeriesInstanceUID)
    base = series_number_base(ref, settings) + REPORT_SERIES_OFFSET

    uid = derive_uid(settings, src, fingerprint, "REPORT", "PDF", "sop")
    doc = _common(ref, settings, EncapsulatedPDFStorage, uid)
    doc.Modality = "DOC"
    doc.SeriesInstanceUID = derive_uid(settings, src, fingerprint, "REPORT", "PDF", "series")
    doc.SeriesNumber = base
    doc.SeriesDescription = "SYNTHETIC synthmr report (research use)"
    doc.AcquisitionDateTime = ""
    doc.DocumentTitle = TITLE
    doc.ConceptNameCodeSequence = []
    doc.MIMETypeOfEncapsulatedDocument = "application/pdf"
    body = pdf + (b"\0" if len(pdf) % 2 else b"")
    doc.EncapsulatedDocument = body
    doc.EncapsulatedDocumentLength = len(pdf)

    uid = derive_uid(settings, src, fingerprint, "REPORT", "SC", "sop")
    sc = _common(ref, settings, SecondaryCaptureImageStorage, uid)
    sc.Modality = "OT"
    sc.SeriesInstanceUID = derive_uid(settings, src, fingerprint, "REPORT", "SC", "series")
    sc.SeriesNumber = base + 1
    sc.SeriesDescription = "SYNTHETIC synthmr report page (research use)"
    sc.PatientOrientation = ""
    # Laterality (General Series, Type 2C): as in the MR outputs - copied, absent for a
    # known unpaired body part, else empty (dciodvfy flags the other choices)
    if "Laterality" in ref:
        sc.Laterality = ref.Laterality
    elif not ref.get("BodyPartExamined"):
        sc.Laterality = ""
    for kw in ("BodyPartExamined",):
        if kw in ref:
            setattr(sc, kw, ref[kw].value)
    sc.ImageType = ["DERIVED", "SECONDARY", "SYNTHETIC", "REPORT"]
    sc.DerivationDescription = f"{TITLE}, synthmr {__version__}"
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.uint8)
    sc.SamplesPerPixel = 3
    sc.PhotometricInterpretation = "RGB"
    sc.PlanarConfiguration = 0
    sc.Rows, sc.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    sc.BitsAllocated, sc.BitsStored, sc.HighBit = 8, 8, 7
    sc.PixelRepresentation = 0
    sc.LossyImageCompression = "00"
    sc.PixelData = np.ascontiguousarray(rgb).tobytes()
    sc["PixelData"].VR = "OB"
    return [doc, sc]
