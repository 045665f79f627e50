"""Synthetic contrasts of a 3D acquisition as one multi-frame Enhanced MR instance each.

A 1 mm 3D-QALAS series has ~176 slices: as classic MR that is 176 instances per contrast,
~1,800 for the default contrasts, and the destination's per-instance cost (an association
round trip, a database insert) dominates the node's end-to-end time. One Enhanced MR
Image instance per contrast carries the same pixels and geometry in a handful of objects.

The dataset is built directly (no highdicom): the shared functional groups once, one small
per-frame item (plane position, frame content, frame type, source reference) per slice,
and the pixel data as one buffer, so building is linear in the number of frames.

Image Type is DERIVED, so the acquisition macros (MR Timing, FOV, Echo, ...) that the
Enhanced MR IOD requires for ORIGINAL frames are left out; the synthetic TR/TE/TI are in
the Derivation Description, as for the classic outputs.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from processing.results import SeriesResult, SyntheticImage

from .common import decimal_string, new_instance, set_equipment, set_mr_series, set_pixel_module_16
from .geometry import SliceGeometry, frame_number
from .settings import SCHEME, ExportError, ExportSettings
from .uids import add_private_provenance, derive_uid

__all__ = ["ENHANCED_MR_IMAGE_STORAGE", "enhanced_synthetic_series", "is_3d"]

ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def is_3d(geometry: SliceGeometry, result: SeriesResult) -> bool:
    """A 3D acquisition: the reference image says MRAcquisitionType 3D, or the result was
    fitted from a 3D-QALAS sequence."""
    ref_type = str(geometry.refs[0].get("MRAcquisitionType", "") or "").upper()
    sequence = str(result.provenance.get("acquisition", {}).get("sequence", "")).upper()
    return ref_type == "3D" or sequence == "QALAS"


# Acquisition Contrast (MR Image Description macro) per contrast name; others UNKNOWN.
_CONTRAST = {
    "T1W": "T1",
    "MPRAGE": "T1",
    "T1FLAIR": "T1",
    "T2W": "T2",
    "PDW": "PROTON_DENSITY",
    "FLAIR": "FLUID_ATTENUATED",
    "FLAIR_MIX": "FLUID_ATTENUATED",
    "STIR": "STIR",
}


def _contrast(syn: SyntheticImage) -> str:
    return _CONTRAST.get(syn.name.upper(), "UNKNOWN")


_ds = decimal_string


def _item(**kw: object) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _shared_groups(geometry: SliceGeometry, syn: SyntheticImage, frame_type: list[str]) -> Dataset:
    """Functional groups every frame shares: pixel measures, orientation, anatomy, frame
    type, VOI window and the identity pixel value transformation."""
    return _item(
        PixelMeasuresSequence=DicomSequence(
            [
                _item(
                    PixelSpacing=[_ds(v) for v in geometry.pixel_spacing],
                    SliceThickness=_ds(geometry.slice_thickness),
                    SpacingBetweenSlices=_ds(geometry.spacing_between_slices),
                )
            ]
        ),
        PlaneOrientationSequence=DicomSequence(
            [_item(ImageOrientationPatient=[_ds(v) for v in geometry.orientation])]
        ),
        FrameAnatomySequence=DicomSequence(
            [
                _item(
                    AnatomicRegionSequence=DicomSequence([_code("12738006", "SCT", "Brain")]),
                    FrameLaterality="U",
                )
            ]
        ),
        MRImageFrameTypeSequence=DicomSequence(
            [
                _item(
                    FrameType=frame_type,
                    PixelPresentation="MONOCHROME",
                    VolumetricProperties="VOLUME",
                    VolumeBasedCalculationTechnique="NONE",
                    ComplexImageComponent="MAGNITUDE" if not syn.signed else "REAL",
                    AcquisitionContrast=_contrast(syn),
                )
            ]
        ),
        FrameVOILUTSequence=DicomSequence(
            [
                _item(
                    WindowCenter=_ds(syn.window_center),
                    WindowWidth=_ds(max(float(syn.window_width), 1.0)),
                )
            ]
        ),
        PixelValueTransformationSequence=DicomSequence(
            [_item(RescaleIntercept="0", RescaleSlope="1", RescaleType="US")]
        ),
    )


def _per_frame(geometry: SliceGeometry, z: int, derivation: Dataset) -> Dataset:
    ref = geometry.refs[z]
    src = _item(ReferencedSOPClassUID=ref.SOPClassUID, ReferencedSOPInstanceUID=ref.SOPInstanceUID)
    if frame_number(ref) is not None:
        src.ReferencedFrameNumber = frame_number(ref)
    src.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code("121322", "DCM", "Source image for image processing operation")]
    )
    return _item(
        PlanePositionSequence=DicomSequence(
            [_item(ImagePositionPatient=[_ds(v) for v in geometry.positions[z]])]
        ),
        FrameContentSequence=DicomSequence(
            [_item(StackID="1", InStackPositionNumber=z + 1, DimensionIndexValues=[1, z + 1])]
        ),
        DerivationImageSequence=DicomSequence(
            [
                _item(
                    DerivationCodeSequence=DicomSequence([derivation]),
                    SourceImageSequence=DicomSequence([src]),
                )
            ]
        ),
    )


_PER_FRAME_KEY = "enhanced_mr_per_frame"


def _per_frame_items(geometry: SliceGeometry) -> list[Dataset]:
    """The per-frame functional groups of every slice, built once per export and shared
    by every contrast's instance (they depend on the geometry only; the items are only
    read when the instances are encoded)."""
    items = geometry.extra.get(_PER_FRAME_KEY)
    if items is None:
        derivation = _code("SYNTHETIC_MR", SCHEME, "Synthetic MR from quantitative maps")
        items = [_per_frame(geometry, z, derivation) for z in range(len(geometry.refs))]
        geometry.extra[_PER_FRAME_KEY] = items
    return items


def _referenced_series(geometry: SliceGeometry) -> DicomSequence:
    """Common Instance Reference: every source instance the frames reference."""
    seen: dict[str, str] = {}
    for ref in geometry.refs:
        seen.setdefault(str(ref.SOPInstanceUID), str(ref.SOPClassUID))
    return DicomSequence(
        [
            _item(
                SeriesInstanceUID=geometry.refs[0].SeriesInstanceUID,
                ReferencedInstanceSequence=DicomSequence(
                    [
                        _item(ReferencedSOPClassUID=cls, ReferencedSOPInstanceUID=sop)
                        for sop, cls in seen.items()
                    ]
                ),
            )
        ]
    )


def enhanced_synthetic_series(
    result: SeriesResult,
    syn: SyntheticImage,
    geometry: SliceGeometry,
    settings: ExportSettings,
    series_number: int,
    fingerprint: str,
    *,
    description: str,
    image_type: list[str],
    derivation_text: str,
) -> Dataset:
    """One synthetic contrast ``[z, y, x]`` as one Enhanced MR Image instance (a frame per
    slice, ascending along the slice normal as ``geometry``). 16-bit pixels: unsigned, or
    signed for PSIR, values as the classic outputs."""
    img = np.asarray(syn.image)
    if img.shape != tuple(result.shape):
        raise ExportError(
            f"synthetic {syn.name}: image shape {img.shape} != result shape {result.shape}"
        )
    ref0 = geometry.refs[0]
    src_series = str(ref0.SeriesInstanceUID)
    series_uid = derive_uid(settings, src_series, fingerprint, "MR", syn.name, "series")
    sop_uid = derive_uid(settings, src_series, fingerprint, "MR", syn.name, "enhanced")
    dim_uid = derive_uid(settings, src_series, fingerprint, "MR", syn.name, "dimensions")
    ds = new_instance(ref0, ENHANCED_MR_IMAGE_STORAGE, sop_uid)
    set_mr_series(ds, ref0, series_uid, series_number, description)
    if "Laterality" in ref0:
        ds.Laterality = ref0.Laterality
    set_equipment(ds, settings)
    # Enhanced MR Image module (DERIVED: the acquisition attributes are not required)
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    if ref0.get("AcquisitionDateTime"):
        ds.AcquisitionDateTime = ref0.AcquisitionDateTime
    # Enhanced MR Image Type has exactly 4 values and value 2 is PRIMARY (the classic
    # outputs say SECONDARY); a 5th classic value (AI_ENHANCED, TISSUE_MIXTURE) becomes
    # value 3 (the image flavour) in place of SYNTHETIC, which the description also says.
    flavour = image_type[4] if len(image_type) > 4 else image_type[2]
    image_type = [image_type[0], "PRIMARY", flavour, image_type[3]]
    ds.ImageType = image_type
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE" if not syn.signed else "REAL"
    ds.AcquisitionContrast = _contrast(syn)
    ds.ContentQualification = "RESEARCH"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.ImageComments = f"Synthetic image (not acquired); {derivation_text}"[:10240]
    ds.DerivationDescription = derivation_text
    ds.AcquisitionContextSequence = DicomSequence([])
    # Multi-frame functional groups and dimensions: one stack, in-stack position = slice
    ds.SharedFunctionalGroupsSequence = DicomSequence([_shared_groups(geometry, syn, image_type)])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(_per_frame_items(geometry))
    ds.NumberOfFrames = img.shape[0]
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=pointer,
                FunctionalGroupPointer=0x00209111,  # Frame Content Sequence
                DimensionDescriptionLabel=label,
            )
            for pointer, label in ((0x00209056, "Stack ID"), (0x00209057, "In-Stack Position"))
        ]
    )
    ds.ReferencedSeriesSequence = _referenced_series(geometry)
    ds.SourceImageEvidenceSequence = DicomSequence(
        [
            _item(
                StudyInstanceUID=ref0.StudyInstanceUID,
                ReferencedSeriesSequence=DicomSequence(
                    [
                        _item(
                            SeriesInstanceUID=ref0.SeriesInstanceUID,
                            ReferencedSOPSequence=DicomSequence(
                                [
                                    _item(
                                        ReferencedSOPClassUID=i.ReferencedSOPClassUID,
                                        ReferencedSOPInstanceUID=i.ReferencedSOPInstanceUID,
                                    )
                                    for i in ds.ReferencedSeriesSequence[
                                        0
                                    ].ReferencedInstanceSequence
                                ]
                            ),
                        )
                    ]
                ),
            )
        ]
    )
    set_pixel_module_16(ds, img.shape[1], img.shape[2], syn.signed)
    lo, hi = (-32768, 32767) if syn.signed else (0, 65535)
    pixels = np.clip(np.rint(np.where(np.isfinite(img), img, 0)), lo, hi)
    ds.PixelData = pixels.astype("<i2" if syn.signed else "<u2").tobytes()
    ds["PixelData"].VR = "OW"
    add_private_provenance(ds, result, settings)
    return ds
