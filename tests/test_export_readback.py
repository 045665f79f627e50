"""Outputs read back with highdicom (and dcmqi) equal the SeriesResult they came from.

Two inputs:
- the stated hand-built model of tests/test_export_support.py (3 x 32 x 32, known tissues);
- the real pipeline: ``make_phantom((3, 40, 40), anatomy="ellipsoid", snr=50, seed=3)`` ->
  scanner emulator (GE classic / Philips Enhanced MR) -> ``vendors.normalize`` ->
  ``processing.run.run`` (default settings: QC dicts with lists, DIR parameters with
  strings, FLAIR_AI from the shipped ONNX model, myelin/EPW volumes) -> ``export_all``.
Every comparison is against the SeriesResult the export was given, never a constant.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import require_tool
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, ParametricMapStorage, SegmentationStorage
from test_export_support import dcmqi_to_nifti, make_result, make_sources

from dicom_node.export import ExportSettings, MapKind, export_all
from dicom_node.export.common import MAP_INFO, map_array
from dicom_node.export.settings import PRIVATE_CREATOR
from dicom_node.export.sr import GLOBAL_CODES, YES, flatten_qc, qc_concept
from dicom_node.export.uids import _jsonable
from processing._version import __version__
from processing.results import TISSUES, SeriesResult

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Exported:
    result: SeriesResult
    sources: list[Dataset]
    outputs: list[Dataset]  # decoded from the encoded bytes, as PACS would receive them
    files: list[Path]


def _export(result: SeriesResult, sources: list[Dataset], out: Path) -> Exported:
    datasets = export_all(result, sources, ExportSettings(maps_as_mr_images=True))
    out.mkdir(parents=True, exist_ok=True)
    files, decoded = [], []
    for i, ds in enumerate(datasets):
        p = out / f"{i:03d}_{ds.Modality}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
        decoded.append(pydicom.dcmread(p))
    return Exported(result, sources, decoded, files)


@pytest.fixture(scope="module")
def stated(tmp_path_factory) -> Exported:
    return _export(make_result(), make_sources(), tmp_path_factory.mktemp("stated"))


@pytest.fixture(scope="module", params=["ge", "philips_enhanced"])
def real(request, tmp_path_factory) -> Exported:
    from dicom_node.emulator import make_datasets
    from dicom_node.vendors import normalize
    from processing.phantom import make_phantom
    from processing.run import run

    ph = make_phantom((3, 40, 40), anatomy="ellipsoid", snr=50, seed=3)
    sources = make_datasets(ph.acq, request.param, patient={"PatientName": "Doe^Jane"})
    result = run(normalize(sources))
    return _export(result, sources, tmp_path_factory.mktemp(request.param))


def by_class(ex: Exported, uid: str) -> list[tuple[Dataset, Path]]:
    return [(ds, p) for ds, p in zip(ex.outputs, ex.files, strict=True) if ds.SOPClassUID == uid]


def result_geometry(result: SeriesResult) -> hd.VolumeGeometry:
    """The result grid as a highdicom geometry: index order (z, y, x) -> affine columns."""
    aff = np.asarray(result.affine, dtype=float)[:, [2, 1, 0, 3]]
    return hd.VolumeGeometry(aff, tuple(result.shape), coordinate_system="PATIENT")


# --- read-back checks, shared by both inputs ------------------------------------------------


def check_parametric_maps(ex: Exported) -> None:
    """highdicom.imread + real-world value mapping gives map_array(result) bit for bit."""
    pms = by_class(ex, ParametricMapStorage)
    kinds = [k for k in MapKind if k is not MapKind.MYPV or ex.result.myelin is not None]
    assert len(pms) == len(kinds)
    geom = result_geometry(ex.result)
    for (_, path), kind in zip(pms, kinds, strict=True):
        img = hd.imread(str(path))
        rwvm = img.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == MAP_INFO[kind].unit.value
        vol = img.get_volume(dtype=np.float32, apply_real_world_transform=True)
        vol = vol.match_geometry(geom)  # raises if the geometry is not the result grid
        assert vol.array.dtype == np.float32
        assert np.array_equal(vol.array, map_array(ex.result, kind)), kind


def check_segmentation(ex: Exported) -> float:
    """highdicom.seg.segread fractions within 1/255 of the result; returns the max error."""
    ((_, path),) = by_class(ex, SegmentationStorage)
    seg = hd.seg.segread(str(path))
    assert seg.SegmentationType == "FRACTIONAL"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(TISSUES)
    vol = seg.get_volume(combine_segments=False, rescale_fractional=True, dtype=np.float32)
    vol = vol.match_geometry(result_geometry(ex.result))
    worst = 0.0
    for i, t in enumerate(TISSUES):
        err = float(np.abs(vol.array[..., i] - ex.result.segmentation.fractions[t]).max())
        assert err <= 1 / 255, (t, err)
        worst = max(worst, err)
    return worst


def check_report(ex: Exported) -> None:
    """highdicom.sr.srread: every volume, BPF, tissue mean and QC figure equals the result."""
    ((sr_ds, path),) = by_class(ex, COMPREHENSIVE_3D_SR)
    ((seg_ds, _),) = by_class(ex, SegmentationStorage)
    sr = hd.sr.srread(str(path))
    report = sr.content
    res = ex.result
    reported: set[str] = set()
    tissues = report.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in tissues] == [
        f"synthmr {t}" for t in TISSUES if t in res.volumes_ml or t in res.tissue_stats
    ]
    for group in tissues:
        t = group.tracking_identifier.split()[-1]
        ref = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg_ds.SOPInstanceUID
        assert int(ref.ReferencedSegmentNumber) == TISSUES.index(t) + 1
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values["118565006"] == res.volumes_ml[t]  # FloatingPointValue: exact
        reported.add(t)
        for key, code in (("t1_ms", "113063"), ("t2_ms", "113065"), ("pd_pu", "113058")):
            if t in res.tissue_stats:
                assert values[code] == res.tissue_stats[t][key], (t, key)
    (whole,) = report.get_image_measurement_groups()
    assert whole.tracking_identifier == "synthmr whole brain"
    values = {m.name.value: m.value for m in whole.get_measurements()}
    for key, (concept, _) in GLOBAL_CODES.items():
        if key in res.volumes_ml:
            assert values[concept.value] == res.volumes_ml[key], key
            reported.add(key)
    assert reported == set(res.volumes_ml), "a volume of the result is missing from the SR"
    evals = {e.name.value: e.value for e in whole.get_qualitative_evaluations()}
    n_qc = 0
    for key, value in flatten_qc(res.qc):
        code = qc_concept(key).value
        if isinstance(value, (bool, np.bool_)):
            assert (evals[code].value == YES.value) == bool(value), key
        elif isinstance(value, str):
            assert evals[code].meaning == value[:64], key
        elif math.isfinite(float(value)):
            assert values[code] == float(value), key
        else:
            assert code not in values  # NaN cannot be a NUM: left out
            continue
        n_qc += 1
    assert n_qc >= 3
    # provenance: software version, parameter hash, model hash
    assert __version__ in str(sr_ds.SoftwareVersions)
    evidence = {
        s.SeriesInstanceUID
        for s in sr_ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    }
    assert evidence == {str(ex.sources[0].SeriesInstanceUID), seg_ds.SeriesInstanceUID}


def test_stated_parametric_maps_read_back_exactly(stated):
    check_parametric_maps(stated)


def test_stated_segmentation_reads_back_within_one_step(stated):
    check_segmentation(stated)


def test_stated_report_reads_back_equal(stated):
    check_report(stated)


def test_report_flattens_nested_qc_with_unique_codes(stated):
    import dataclasses

    qc = {
        "delay_outlier_ratio": 1.04,
        "delay_outlier_index": -1,  # same first 16 characters as the key above
        "per_delay": [1.1, 1.2],
        "tissues": {"WM": {"t1_ms": 610.0, "in_range": True}},
        "status": "pass",
        "missing": float("nan"),
    }
    res = dataclasses.replace(stated.result, qc=qc)
    ex = _export(res, stated.sources, Path(stated.files[0].parent.parent / "qc"))
    check_report(ex)
    keys = [k for k, _ in flatten_qc(qc)]
    assert "tissues.WM.t1_ms" in keys and "per_delay[1]" in keys
    codes = {qc_concept(k).value for k in keys}
    assert len(codes) == len(keys)


# --- the real pipeline ----------------------------------------------------------------------


def test_real_result_has_the_parts_that_must_export(real):
    res = real.result
    assert any(isinstance(v, list) for v in res.qc.values())
    assert any(isinstance(v, dict) for v in res.qc.values())
    assert any(isinstance(v, str) for v in res.dir_parameters.values())
    assert res.synthetic["FLAIR_AI"].ai_enhanced
    assert {"MYELIN", "EPW", "BPF"} <= set(res.volumes_ml)
    assert len(str(res.provenance["model_sha256"])) == 64
    assert not res.warnings


def dciodvfy_errors(path: Path) -> list[str]:
    r = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120
    )
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "Error" in line]
    if r.returncode != 0 and not errors:
        errors = [f"exit {r.returncode}"]
    return errors


def test_real_pipeline_every_output_passes_dciodvfy(real):
    first: dict[str, Path] = {}
    for ds, p in zip(real.outputs, real.files, strict=True):
        first.setdefault(ds.SeriesInstanceUID, p)
    n_syn = len(real.result.synthetic)
    # 8 PM + 8 maps as MR + synthetic contrasts + SEG + SR
    assert len(first) == 8 + 8 + n_syn + 2
    bad = {p.name: e[:3] for p in first.values() if (e := dciodvfy_errors(p))}
    assert not bad


def test_real_pipeline_reads_back_with_highdicom(real):
    check_parametric_maps(real)
    check_segmentation(real)
    check_report(real)


def nifti_zyx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj).transpose(2, 1, 0), img.affine


def test_real_pipeline_dcmqi_reads_maps_and_seg(real, tmp_path):
    pm_exe = require_tool("paramap2itkimage")
    seg_exe = require_tool("segimage2itkimage")
    pms = dict(zip(MapKind, by_class(real, ParametricMapStorage), strict=True))
    for kind in (MapKind.T1, MapKind.PD, MapKind.MYPV):
        out = tmp_path / kind.value
        out.mkdir()
        path = pms[kind][1]
        dcmqi_to_nifti(pm_exe, path, out)
        data, affine = nifti_zyx(out / "pmap.nii.gz")
        assert np.array_equal(data.astype(np.float32), map_array(real.result, kind)), kind
        np.testing.assert_allclose(affine, LPS_TO_RAS @ real.result.affine, atol=1e-3)
    ((_, seg_path),) = by_class(real, SegmentationStorage)
    out = tmp_path / "seg"
    out.mkdir()
    dcmqi_to_nifti(seg_exe, seg_path, out)
    meta = json.loads((out / "meta.json").read_text())
    assert [s[0]["SegmentLabel"] for s in meta["segmentAttributes"]] == list(TISSUES)
    for i, t in enumerate(TISSUES):
        data, _ = nifti_zyx(out / f"{i + 1}.nii.gz")
        err = np.abs(data / 255.0 - real.result.segmentation.fractions[t]).max()
        assert err <= 1 / 255, (t, err)


def test_real_pipeline_outputs_carry_provenance_and_say_synthetic(real):
    res = real.result
    sha = str(res.provenance["model_sha256"])
    settings = _jsonable(res.provenance["settings"])
    for ds in real.outputs:
        assert f"synthmr {__version__}" in str(ds.SoftwareVersions)
        block = ds.private_block(0x0011, PRIVATE_CREATOR)
        assert block[0x01].value == f"synthmr {__version__}"
        assert block[0x02].value == sha
        params = json.loads(block[0x03].value)
        assert params["software_version"] == __version__
        assert params["provenance"]["settings"] == settings
        assert params["provenance"]["model_sha256"] == sha
        assert ds.SeriesDescription.upper().startswith(("SYNTHETIC", "SYNTHMR"))
        assert ds.StudyInstanceUID == real.sources[0].StudyInstanceUID
        if ds.SOPClassUID != COMPREHENSIVE_3D_SR:
            assert ds.ImageType[0] == "DERIVED"
    mrs = [ds for ds, _ in by_class(real, MRImageStorage) if ds.ImageType[1] == "SECONDARY"]
    assert {ds.ImageType[3] for ds in mrs} == set(res.synthetic)
    for ds in mrs:
        assert ds.ImageType[2] == "SYNTHETIC"
        if ds.ImageType[3] == "FLAIR_AI":
            assert "AI_ENHANCED" in list(ds.ImageType)
            assert f"sha256 {sha}" in ds.DerivationDescription
        if ds.ImageType[3] == "DIR":  # the per-patient timing, not the preset
            ti = float(ds.InversionTime)
            assert ti == pytest.approx(res.synthetic["DIR"].ti_ms, abs=0.5)
    ((sr, _),) = by_class(real, COMPREHENSIVE_3D_SR)
    text_values = [e.value for e in sr.iterall() if e.keyword == "TextValue"]
    assert f"onnx_model_sha256={sha}" in text_values
