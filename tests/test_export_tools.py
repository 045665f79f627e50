"""Export outputs against the real peers: dciodvfy, dcmqi, Orthanc (via dcmtk storescu).

Inputs: the stated model of tests/test_export_support.py (3 slices, 32x32) and the
scanner emulator's vendor layouts. Everything runs on 127.0.0.1 in temp dirs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import OrthancServer, require_tool
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, ParametricMapStorage, SegmentationStorage
from test_export_support import (
    PATIENT_NAME,
    STUDY_UID,
    dcmqi_to_nifti,
    flat_acquisition,
    make_result,
    make_sources,
)

from dicom_node.export import ExportSettings, MapKind, export_all
from dicom_node.export.common import map_array
from processing.results import TISSUES

pytestmark = pytest.mark.integration

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def dcmtk_storescu(files: list[Path], port: int) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu with -R (SEG/PM need it). pynetdicom also installs a `storescu`
    script earlier on PATH without -R, so prefer the Debian binary."""
    exe = "/usr/bin/storescu" if Path("/usr/bin/storescu").exists() else require_tool("storescu")
    cmd = [exe, "-R", "-aet", "SYNTHMR", "-aec", "ORTHANC", "127.0.0.1", str(port)]
    return subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=120)


def write_all(outputs: list[Dataset], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(outputs):
        p = out / f"{i:03d}_{ds.Modality}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def result():
    return make_result()


@pytest.fixture(scope="module")
def files(tmp_path_factory, result) -> list[Path]:
    outs = export_all(result, make_sources(), ExportSettings(maps_as_mr_images=True))
    binary = export_all(
        result, make_sources(), ExportSettings(seg_type="BINARY", maps=("T1",), export_report=False)
    )
    seg_b = [ds for ds in binary if ds.SOPClassUID == SegmentationStorage]
    return write_all(outs + seg_b, tmp_path_factory.mktemp("export"))


def one_per_series(files: list[Path]) -> list[Path]:
    import pydicom

    seen, out = set(), []
    for p in files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if ds.SeriesInstanceUID not in seen:
            seen.add(ds.SeriesInstanceUID)
            out.append(p)
    return out


def test_dciodvfy_no_errors_on_every_output_kind(files):
    exe = require_tool("dciodvfy")
    checked = one_per_series(files)
    kinds = set()
    for p in checked:
        r = subprocess.run([exe, str(p)], capture_output=True, text=True, timeout=120)
        log = r.stdout + r.stderr
        errors = [line for line in log.splitlines() if "Error" in line]
        assert r.returncode == 0 and not errors, f"{p.name}: {errors[:5]}"
        kinds.add(p.name.split("_", 1)[1])
    # PM (OT), MR (synthetic + maps), SEG (fractional + binary), SR
    assert kinds == {"OT.dcm", "MR.dcm", "SEG.dcm", "SR.dcm"}
    assert len(checked) == 8 + 8 + 3 + 2 + 1


def nifti_zyx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj).transpose(2, 1, 0), img.affine


def test_dcmqi_reads_parametric_maps_exactly(files, result, tmp_path):
    exe = require_tool("paramap2itkimage")
    pms = [p for p in files if p.name.endswith("_OT.dcm")]
    assert len(pms) == len(MapKind)
    for p, kind in zip(pms, MapKind, strict=True):
        out = tmp_path / kind.value
        out.mkdir()
        dcmqi_to_nifti(exe, p, out)
        data, affine = nifti_zyx(out / "pmap.nii.gz")
        assert data.dtype == np.float32
        assert np.array_equal(data, map_array(result, kind)), kind
        np.testing.assert_allclose(affine, LPS_TO_RAS @ result.affine, atol=1e-3)


def test_dcmqi_reads_fractional_seg_within_one_step(files, result, tmp_path):
    exe = require_tool("segimage2itkimage")
    import pydicom

    segs = [p for p in files if p.name.endswith("_SEG.dcm")]
    frac = next(p for p in segs if pydicom.dcmread(p).SegmentationType == "FRACTIONAL")
    dcmqi_to_nifti(exe, frac, tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    labels = [seg[0]["SegmentLabel"] for seg in meta["segmentAttributes"]]
    assert labels == list(TISSUES)
    for i, t in enumerate(TISSUES):
        data, affine = nifti_zyx(tmp_path / f"{i + 1}.nii.gz")
        err = np.abs(data / 255.0 - result.segmentation.fractions[t]).max()
        assert err <= 1 / 255, (t, err)
        np.testing.assert_allclose(affine, LPS_TO_RAS @ result.affine, atol=1e-3)


def test_orthanc_files_every_output_under_the_source_study(files, orthanc: OrthancServer):
    r = dcmtk_storescu(files, orthanc.dicom_port)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(orthanc.instances()) == len(files)
    studies = orthanc.rest("/studies")
    assert len(studies) == 1
    study = orthanc.rest(f"/studies/{studies[0]}")
    assert study["MainDicomTags"]["StudyInstanceUID"] == STUDY_UID
    assert study["PatientMainDicomTags"]["PatientName"] == PATIENT_NAME
    classes = set()
    for sid in study["Series"]:
        series = orthanc.rest(f"/series/{sid}")
        for iid in series["Instances"]:
            tags = orthanc.rest(f"/instances/{iid}/simplified-tags")
            classes.add(tags["SOPClassUID"])
    assert {MRImageStorage, ParametricMapStorage, SegmentationStorage} <= classes
    assert "1.2.840.10008.5.1.4.1.1.88.34" in classes
    # a re-run (same inputs -> same UIDs) replaces instead of duplicating
    r = dcmtk_storescu(files, orthanc.dicom_port)
    assert r.returncode == 0
    assert len(orthanc.instances()) == len(files)


@pytest.mark.parametrize("layout", ["ge", "siemens", "philips"])
def test_emulator_vendor_sources(layout, result):
    from dicom_node.emulator import make_datasets

    nz = result.shape[0]
    acq = flat_acquisition(result)
    sources = make_datasets(acq, layout, with_phase=True, patient={"PatientName": "Müller^Jürgen"})
    outs = export_all(result, sources, ExportSettings(maps=("T1",)))
    src_uids = {ds.SOPInstanceUID for ds in sources}
    mr = [ds for ds in outs if ds.SOPClassUID == MRImageStorage]
    assert len(mr) == 3 * nz
    for ds in mr:
        ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in src_uids
        src = next(s for s in sources if s.SOPInstanceUID == ref)
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient],
            [float(v) for v in src.ImagePositionPatient],
            atol=1e-3,
        )
        assert str(ds.PatientName) == "Müller^Jürgen"
        assert ds.SpecificCharacterSet == sources[0].SpecificCharacterSet


@pytest.mark.parametrize("layout", ["philips_enhanced", "siemens_xa_enhanced"])
def test_emulator_enhanced_sources(layout, result, tmp_path):
    from dicom_node.emulator import make_datasets

    nz = result.shape[0]
    acq = flat_acquisition(result)
    sources = make_datasets(acq, layout, with_phase=True)
    outs = export_all(result, sources, ExportSettings(maps=("T1",)))
    mr = [ds for ds in outs if ds.SOPClassUID == MRImageStorage]
    assert len(mr) == 3 * nz
    by_uid = {s.SOPInstanceUID: s for s in sources}
    for ds in mr:
        item = ds.SourceImageSequence[0]
        src = by_uid[item.ReferencedSOPInstanceUID]
        frame = src.PerFrameFunctionalGroupsSequence[int(item.ReferencedFrameNumber) - 1]
        assert frame.MRImageFrameTypeSequence[0].ComplexImageComponent == "MAGNITUDE"
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient],
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            atol=1e-3,
        )
    # every output kind still validates
    exe = require_tool("dciodvfy")
    for p in one_per_series(write_all(outs, tmp_path)):
        r = subprocess.run([exe, str(p)], capture_output=True, text=True, timeout=120)
        errors = [line for line in (r.stdout + r.stderr).splitlines() if "Error" in line]
        assert r.returncode == 0 and not errors, f"{p.name}: {errors[:5]}"
