"""Unit tests of dicom_node.export on a tiny stated model (tests/test_export_support.py)."""

from __future__ import annotations

import dataclasses
from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    MRImageStorage,
    ParametricMapStorage,
    SegmentationStorage,
)
from test_export_support import (
    PATIENT_NAME,
    SERIES_UID,
    STUDY_UID,
    make_result,
    make_sources,
)

from dicom_node.export import (
    ExportError,
    ExportSettings,
    MapKind,
    export_all,
    map_mr_images,
    parametric_maps,
    reference_images,
    report,
    segmentation,
    synthetic_images,
)
from dicom_node.export.common import map_array
from dicom_node.export.segmentation import binary_labels
from dicom_node.export.sr import qc_concept
from processing._version import __version__
from processing.results import TISSUES

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def roundtrip(ds: Dataset) -> Dataset:
    """Encode to bytes (as sent) and decode again."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buf.getvalue()))


@pytest.fixture(scope="module")
def sources() -> list[Dataset]:
    return make_sources()


@pytest.fixture(scope="module")
def result():
    return make_result()


@pytest.fixture(scope="module")
def outputs(result, sources) -> list[Dataset]:
    return [roundtrip(ds) for ds in export_all(result, sources, ExportSettings())]


def by_class(outputs: list[Dataset], uid: str) -> list[Dataset]:
    return [ds for ds in outputs if ds.SOPClassUID == uid]


def frame_positions(ds: Dataset) -> np.ndarray:
    return np.array(
        [
            [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
            for f in ds.PerFrameFunctionalGroupsSequence
        ]
    )


def source_positions(sources: list[Dataset]) -> np.ndarray:
    return np.array(
        [[float(v) for v in ds.ImagePositionPatient] for ds in reference_images(sources)]
    )


# --- reference images and geometry ----------------------------------------------------


def test_reference_images_one_per_slice_sorted_first_echo_delay(sources):
    refs = reference_images(sources)
    assert len(refs) == 3
    iop = np.asarray(refs[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    loc = [float(np.dot(np.asarray(r.ImagePositionPatient, dtype=float), normal)) for r in refs]
    assert loc == sorted(loc) and len(set(np.round(loc, 3))) == 3
    assert all(float(r.EchoTime) == 20.0 and float(r.InversionTime) == 150.0 for r in refs)


def test_reference_images_prefers_magnitude_over_phase():
    src = make_sources(nz=2, n_delay=1, n_echo=1)
    phase = []
    for ds in list(src):
        p = pydicom.dcmread(BytesIO(_bytes(ds)))
        p.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[ds.SOPInstanceUID, "phase"])
        p.ImageType = ["ORIGINAL", "PRIMARY", "P", "NONE"]
        p.EchoTime = 1.0  # would win on TE if phase were not ranked last
        phase.append(p)
    refs = reference_images(phase + src)
    assert {r.SOPInstanceUID for r in refs} == {ds.SOPInstanceUID for ds in src}
    assert all(list(r.ImageType)[2] == "M" for r in refs)


def _bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_slice_count_mismatch_is_a_clear_error(result):
    with pytest.raises(ExportError, match="3 slices"):
        export_all(result, make_sources(nz=2), ExportSettings())


def test_matrix_mismatch_is_a_clear_error(result):
    with pytest.raises(ExportError, match="rows x columns"):
        export_all(result, make_sources(ny=16), ExportSettings())


def test_reversed_z_order_is_detected(sources):
    res = make_result()
    aff = res.affine.copy()
    aff[:3, 3] = aff[:3, 3] + aff[:3, 2] * 2  # voxel 0 at the top slice
    aff[:3, 2] = -aff[:3, 2]
    res = dataclasses.replace(res, affine=aff)
    with pytest.raises(ExportError, match="z order"):
        export_all(res, sources, ExportSettings())


def test_mixed_series_sources_rejected(result, sources):
    other = make_sources()
    for ds in other:
        ds.SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(ExportError, match="2 series"):
        reference_images(sources + other)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seg_type": "LABELMAP"}, "seg_type"),
        ({"uid_root": "1.2.abc."}, "uid_root"),
        ({"maps": ("T1", "T9")}, "T9"),
        ({"binary_method": "median"}, "binary_method"),
        ({"series_number_offset": -1}, "series_number_offset"),
    ],
)
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ExportError, match=match):
        ExportSettings(**kwargs)


def test_unknown_contrast_is_a_clear_error(result, sources):
    with pytest.raises(ExportError, match="T2W"):
        synthetic_images(result, sources, ExportSettings(contrasts=("T2W",)))


# --- general rules: patient/study, UIDs, series numbers, flags -------------------------


def test_every_output_copies_patient_and_study_with_charset(outputs):
    assert len(outputs) == 8 + 3 * 3 + 2  # 8 maps, 3 contrasts x 3 slices, SEG, SR
    for ds in outputs:
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == PATIENT_NAME
        assert ds.PatientID == "P0001"
        assert ds.StudyInstanceUID == STUDY_UID
        assert ds.AccessionNumber == "ACC1"
        assert ds.SeriesInstanceUID != SERIES_UID


def test_non_ascii_name_survives_latin1_charset(result):
    src = make_sources(charset="ISO_IR 100", patient_name="Ågren^Zoë")
    for ds in export_all(result, src, ExportSettings(maps=("T1",))):
        back = roundtrip(ds)
        assert back.SpecificCharacterSet == "ISO_IR 100"
        assert str(back.PatientName) == "Ågren^Zoë"


def test_uids_deterministic_unique_and_parameter_dependent(result, sources, outputs):
    again = export_all(result, sources, ExportSettings())
    uids = [ds.SOPInstanceUID for ds in outputs]
    assert uids == [ds.SOPInstanceUID for ds in again]
    assert len(set(uids)) == len(uids)
    assert all(len(u) <= 64 and u.startswith(pydicom.uid.PYDICOM_ROOT_UID) for u in uids)
    changed = dataclasses.replace(result, provenance={**result.provenance, "fit": {"max_iter": 9}})
    other = export_all(changed, sources, ExportSettings())
    assert not set(uids) & {ds.SOPInstanceUID for ds in other}
    rooted = export_all(result, sources, ExportSettings(uid_root="1.2.999", maps=("T1",)))
    assert all(ds.SOPInstanceUID.startswith("1.2.999.") for ds in rooted)


def _every_uid(ds: Dataset) -> list[tuple[str, str]]:
    """(keyword, value) of every UI element, nested sequences included, in dataset order."""
    return [(e.keyword, str(e.value)) for e in ds.iterall() if e.VR == "UI"]


def test_two_exports_give_identical_uids_including_dimension_organization(result, sources):
    """DESIGN promise 4: output UIDs deterministic, also the DimensionOrganizationUID that
    highdicom draws at random unless the exporter pins it."""
    first = export_all(result, sources, ExportSettings())
    second = export_all(result, sources, ExportSettings())
    assert [_every_uid(ds) for ds in first] == [_every_uid(ds) for ds in second]
    dims = {
        ds.SOPInstanceUID: ds.DimensionOrganizationSequence[0].DimensionOrganizationUID
        for ds in first
        if ds.SOPClassUID in (ParametricMapStorage, SegmentationStorage)
    }
    assert len(dims) == 9 and len(set(dims.values())) == 9  # 8 maps + SEG, one each
    for ds in first:
        if ds.SOPInstanceUID in dims:
            index_uids = {item.DimensionOrganizationUID for item in ds.DimensionIndexSequence}
            assert index_uids == {dims[ds.SOPInstanceUID]}
            assert dims[ds.SOPInstanceUID].startswith(pydicom.uid.PYDICOM_ROOT_UID)


def test_selection_change_keeps_existing_uids(result, sources, outputs):
    flair = {
        ds.SOPInstanceUID for ds in outputs if ds.SeriesDescription.startswith("SYNTHETIC FLAIR TR")
    }
    only = synthetic_images(result, sources, ExportSettings(contrasts=("FLAIR",), maps=("T1",)))
    assert {ds.SOPInstanceUID for ds in only} == flair and len(flair) == 3


def test_series_numbers_offset_and_distinct(outputs):
    src_number = 7
    pms = by_class(outputs, ParametricMapStorage)
    assert [int(ds.SeriesNumber) for ds in pms] == [src_number + 1000 + i for i in range(8)]
    mr_numbers = sorted({int(ds.SeriesNumber) for ds in by_class(outputs, MRImageStorage)})
    assert mr_numbers == [1107, 1108, 1109]
    assert int(by_class(outputs, SegmentationStorage)[0].SeriesNumber) == 1207
    assert int(by_class(outputs, COMPREHENSIVE_3D_SR)[0].SeriesNumber) == 1208
    series = {}
    for ds in outputs:
        series.setdefault(ds.SeriesInstanceUID, set()).add(int(ds.SeriesNumber))
    assert len(series) == 8 + 3 + 2 and all(len(v) == 1 for v in series.values())


def test_every_output_says_synthetic_and_carries_version_and_model_hash(outputs, result):
    for ds in outputs:
        assert __version__ in str(ds.SoftwareVersions)
        block = ds.private_block(0x0011, "SYNTHMR 1")
        assert block[0x02].value == result.provenance["model_sha256"]
        assert '"max_iter": 50' in block[0x03].value
        desc = ds.SeriesDescription.upper()
        assert desc.startswith(("SYNTHETIC", "SYNTHMR"))
        if ds.SOPClassUID != COMPREHENSIVE_3D_SR:
            assert ds.ImageType[0] == "DERIVED"


# --- parametric maps --------------------------------------------------------------------


def test_parametric_maps_values_units_geometry(outputs, result, sources):
    pms = by_class(outputs, ParametricMapStorage)
    expected = {
        "T1": ("113063", "ms"),
        "T2": ("113065", "ms"),
        "PD": ("113058", "%"),
        "R1": ("126393", "/s"),
        "R2": ("126394", "/s"),
        "B1": ("B1RATIO", "{ratio}"),
        "MYPV": ("MYPV", "%"),
        "RESIDUAL": ("FITRESID", "1"),
    }
    src_pos = source_positions(sources)
    for pm, kind in zip(pms, MapKind, strict=True):
        assert pm.ContentLabel == f"{kind.value}MAP"
        np.testing.assert_allclose(frame_positions(pm), src_pos, atol=1e-6)
        assert np.array_equal(pm.pixel_array.astype(np.float32), map_array(result, kind))
        rwvm = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        code, unit = expected[kind.value]
        assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == unit
        assert rwvm.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == code
        assert float(rwvm.RealWorldValueSlope) == 1.0
        anat = pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
        assert anat.FrameLaterality == "U"
        assert anat.AnatomicRegionSequence[0].CodeValue == "12738006"
        assert "Laterality" not in pm
    # PD inside the CSF core equals the stated truth (100 pu) within the 1% noise
    pd = pms[2].pixel_array
    core = result.segmentation.fractions["CSF"] > 0.999
    assert abs(float(np.median(pd[core])) - 100.0) < 2.0


def test_missing_myelin_skips_mypv(result, sources):
    res = dataclasses.replace(result, myelin=None)
    outs = export_all(res, sources, ExportSettings())
    labels = [ds.ContentLabel for ds in by_class(outs, ParametricMapStorage)]
    assert "MYPVMAP" not in labels and len(labels) == 7
    with pytest.raises(ExportError, match="MYPV"):
        parametric_maps(res, sources, ExportSettings(maps=("MYPV",)))


def test_maps_as_mr_images_rescale(result, sources):
    mrs = [roundtrip(ds) for ds in map_mr_images(result, sources, ExportSettings())]
    assert len(mrs) == 8 * 3
    for kind in MapKind:
        series = [
            ds
            for ds in mrs
            if ds.ImageType[2]
            == {"MYPV": "MYELINMAP", "RESIDUAL": "RESIDUALMAP"}.get(kind.value, f"{kind.value}MAP")
        ]
        assert len(series) == 3
        truth = map_array(result, kind)
        for z, ds in enumerate(sorted(series, key=lambda d: int(d.InstanceNumber))):
            assert list(ds.ImageType[:2]) == ["DERIVED", "PRIMARY"]
            slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            real = ds.pixel_array.astype(np.float64) * slope + icpt
            assert np.max(np.abs(real - truth[z])) <= slope / 2 + 1e-6 * np.abs(truth[z]).max()


# --- synthetic MR series ----------------------------------------------------------------


def test_synthetic_series_headers_and_pixels(outputs, result, sources):
    mrs = by_class(outputs, MRImageStorage)
    refs = reference_images(sources)
    src_pos = source_positions(sources)
    for name, syn in result.synthetic.items():
        series = sorted(
            (ds for ds in mrs if ds.SeriesDescription == syn.description),
            key=lambda d: int(d.InstanceNumber),
        )
        assert len(series) == 3, name
        for z, ds in enumerate(series):
            assert list(ds.ImageType[:3]) == ["DERIVED", "SECONDARY", "SYNTHETIC"]
            assert ds.ImageType[3] == name
            assert float(ds.RepetitionTime) == syn.tr_ms
            assert float(ds.EchoTime) == syn.te_ms
            assert float(ds.InversionTime) == syn.ti_ms
            assert float(ds.WindowCenter) == syn.window_center
            assert float(ds.WindowWidth) == syn.window_width
            assert syn.equation in ds.DerivationDescription
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == refs[z].SOPInstanceUID
            assert ds.FrameOfReferenceUID == refs[z].FrameOfReferenceUID
            np.testing.assert_allclose(
                [float(v) for v in ds.ImagePositionPatient], src_pos[z], atol=1e-4
            )
            assert ds.PixelRepresentation == (1 if syn.signed else 0)
            assert np.array_equal(ds.pixel_array.astype(np.float64), np.rint(syn.image[z]))
            if syn.ai_enhanced:
                assert "AI-enhanced (ONNX model sha256 " + "ab" * 32 in ds.DerivationDescription
                assert "AI_ENHANCED" in list(ds.ImageType)
            else:
                assert "AI-enhanced" not in ds.DerivationDescription


def test_psir_is_signed_and_keeps_negative_values(outputs, result):
    psir = [ds for ds in by_class(outputs, MRImageStorage) if ds.ImageType[3] == "PSIR"]
    assert psir and all(ds.PixelRepresentation == 1 for ds in psir)
    values = np.concatenate([ds.pixel_array.ravel() for ds in psir])
    assert values.min() < 0 < values.max()
    assert values.min() == np.rint(result.synthetic["PSIR"].image).min()


# --- segmentation ---------------------------------------------------------------------


def seg_volume(seg: Dataset, positions: np.ndarray) -> np.ndarray:
    """SEG frames back to [z, y, x, segment] floats (fractional: / 255)."""
    n_seg = len(seg.SegmentSequence)
    out = np.zeros((len(positions), int(seg.Rows), int(seg.Columns), n_seg))
    px = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    scale = float(seg.get("MaximumFractionalValue", 1))
    for i, f in enumerate(seg.PerFrameFunctionalGroupsSequence):
        pos = np.array([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient])
        z = int(np.argmin(np.linalg.norm(positions - pos, axis=1)))
        s = int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) - 1
        out[z, :, :, s] = px[i] / scale
    return out


def test_seg_fractional_within_one_step(outputs, result, sources):
    seg = by_class(outputs, SegmentationStorage)[0]
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "OCCUPANCY"
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == list(TISSUES)
    codes = [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence]
    assert codes[:3] == ["389080008", "389081007", "65216001"]
    vol = seg_volume(seg, source_positions(sources))
    for i, t in enumerate(TISSUES):
        err = np.abs(vol[..., i] - result.segmentation.fractions[t]).max()
        assert err <= 0.5 / 255 + 1e-6, t


@pytest.mark.parametrize("method", ["argmax", "threshold"])
def test_seg_binary(sources, method):
    result = make_result()
    # a three-way mixture (0.4/0.3/0.3) in the middle slice: no tissue reaches 0.5
    mix = (1, slice(14, 18), slice(4, 8))
    for t, f in zip(TISSUES, (0.4, 0.3, 0.3, 0.0), strict=True):
        result.segmentation.fractions[t][mix] = f
    seg = roundtrip(
        segmentation(result, sources, ExportSettings(seg_type="BINARY", binary_method=method))
    )
    assert seg.SegmentationType == "BINARY"
    vol = seg_volume(seg, source_positions(sources))
    labels = binary_labels(result, method)
    fr = np.stack([result.segmentation.fractions[t] for t in TISSUES], axis=-1)
    for i in range(len(TISSUES)):
        assert np.array_equal(vol[..., i] > 0, labels == i + 1)
    inside = result.segmentation.icmask
    if method == "argmax":
        assert np.all((labels > 0) == inside)  # every intracranial voxel gets a tissue
    else:
        assert np.all((labels > 0) == (fr.max(axis=-1) >= 0.5))
        assert (labels > 0).sum() < inside.sum()  # partial-volume rims left out


# --- structured report ------------------------------------------------------------------


def walk(items, path=()):
    for it in items:
        name = it.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in it else ""
        yield path, it
        if "ContentSequence" in it:
            yield from walk(it.ContentSequence, (*path, name))


def sr_numbers(sr: Dataset) -> dict[tuple[str, str], float]:
    """(tracking identifier, concept code) -> value for every NUM item."""
    out = {}
    for group in sr.ContentSequence:
        if "ContentSequence" not in group:
            continue
        for grp in group.ContentSequence if group.ValueType == "CONTAINER" else []:
            if "ContentSequence" not in grp:
                continue
            tid = ""
            for _, it in walk(grp.ContentSequence):
                if it.ValueType == "TEXT" and it.ConceptNameCodeSequence[0].CodeValue == "112039":
                    tid = it.TextValue
                if it.ValueType == "NUM":
                    code = it.ConceptNameCodeSequence[0].CodeValue
                    out[(tid, code)] = float(it.MeasuredValueSequence[0].NumericValue)
    return out


def test_sr_volumes_means_and_references(outputs, result, sources):
    sr = by_class(outputs, COMPREHENSIVE_3D_SR)[0]
    seg = by_class(outputs, SegmentationStorage)[0]
    nums = sr_numbers(sr)
    for t in TISSUES:
        assert nums[(f"synthmr {t}", "118565006")] == pytest.approx(
            result.volumes_ml[t], rel=1e-9, abs=1e-12
        )
    for t in ("WM", "GM", "CSF"):
        assert nums[(f"synthmr {t}", "113063")] == pytest.approx(result.tissue_stats[t]["t1_ms"])
        assert nums[(f"synthmr {t}", "113065")] == pytest.approx(result.tissue_stats[t]["t2_ms"])
        assert nums[(f"synthmr {t}", "113058")] == pytest.approx(result.tissue_stats[t]["pd_pu"])
    for key, code in (("ICV", "ICV"), ("BPV", "BPV"), ("BPF", "BPF"), ("MYELIN", "MYV")):
        assert nums[("synthmr whole brain", code)] == pytest.approx(
            result.volumes_ml[key], rel=1e-9
        )
    assert nums[("synthmr whole brain", qc_concept("median_residual").value)] == 1.5
    assert nums[("synthmr whole brain", qc_concept("failed_fraction").value)] == 0.0
    # references: SEG segments, source images, and provenance in algorithm parameters
    items = [it for _, it in walk(sr.ContentSequence)]
    ref_sops = {
        r.ReferencedSOPInstanceUID
        for it in items
        if "ReferencedSOPSequence" in it
        for r in it.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in ref_sops
    assert {r.SOPInstanceUID for r in reference_images(sources)} <= ref_sops
    texts = " ".join(it.TextValue for it in items if it.ValueType == "TEXT")
    assert "onnx_model_sha256=" + "ab" * 32 in texts
    evidence = {
        s.SeriesInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    }
    assert evidence == {SERIES_UID, seg.SeriesInstanceUID}


def test_sr_without_seg_still_reports(result, sources):
    sr = roundtrip(report(result, sources, ExportSettings(), seg=None))
    assert sr_numbers(sr)[("synthmr WM", "118565006")] == pytest.approx(result.volumes_ml["WM"])


def test_orientation_jitter_is_snapped_but_real_tilt_rejected(result):
    src = make_sources()
    for ds in src:
        if float(ds.ImagePositionPatient[2]) > -5:  # top slice: GE-like 1e-8 jitter
            ds.ImageOrientationPatient = [float(v) + 1e-8 for v in ds.ImageOrientationPatient]
    pm = parametric_maps(result, src, ExportSettings(maps=("T1",)))[0]
    assert pm.NumberOfFrames == 3
    for ds in src:
        if float(ds.ImagePositionPatient[2]) > -5:
            ds.ImageOrientationPatient = [float(v) + 1e-2 for v in ds.ImageOrientationPatient]
    with pytest.raises(ExportError, match="orientation"):
        parametric_maps(result, src, ExportSettings(maps=("T1",)))
