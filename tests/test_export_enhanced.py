"""3D synthetic contrasts as multi-frame Enhanced MR (dicom_node.export.enhanced_mr).

Phantom: 3D-QALAS, 8 x 32 x 32 ellipsoid anatomy (7.2 mm isotropic), seed 12, SNR 60,
magnitude; processed once by processing.run (segmentation on: the tissue-mixture contrast
is exported too). Sources: the emulated GE classic layout (5 x 8 instances) and the
Siemens layout (five multi-frame Enhanced MR instances).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.export import ExportSettings, export_all
from dicom_node.export.enhanced_mr import ENHANCED_MR_IMAGE_STORAGE
from dicom_node.qalas_emulator import write_qalas_series
from tests.test_export_readback import dciodvfy_errors

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def qalas(tmp_path_factory):
    from processing.qalas_phantom import make_qalas_phantom
    from processing.run import run

    ph = make_qalas_phantom((8, 32, 32), seed=12, snr=60.0, magnitude=True, anatomy="ellipsoid")
    tmp = tmp_path_factory.mktemp("qalas_enhanced")
    sources = {}
    for layout in ("ge", "siemens"):
        files = write_qalas_series(ph.acq, layout, tmp / layout, seed=12)
        sources[layout] = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return run(ph.acq), sources, tmp


@pytest.mark.parametrize("layout", ["ge", "siemens"])
def test_each_3d_contrast_is_one_valid_enhanced_mr_with_the_classic_pixels(qalas, layout):
    """Each synthetic contrast is one Enhanced MR instance whose frames (ascending along the
    slice normal) hold exactly the pixels of the classic instances (multiframe_3d off),
    slice by slice, at the same positions; dciodvfy reports no error."""
    result, sources, tmp = qalas
    enhanced = export_all(result, sources[layout], ExportSettings())
    classic = export_all(result, sources[layout], ExportSettings(multiframe_3d=False))
    multi = [ds for ds in enhanced if ds.SOPClassUID == ENHANCED_MR_IMAGE_STORAGE]
    assert len(multi) == len(result.synthetic)
    assert len(classic) - len(enhanced) == len(result.synthetic) * (8 - 1)
    for ds in multi:
        path = tmp / f"{layout}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path)
        assert int(back.NumberOfFrames) == 8
        slices = sorted(
            (c for c in classic if c.SeriesInstanceUID == back.SeriesInstanceUID),
            key=lambda c: int(c.InstanceNumber),
        )
        assert len(slices) == 8, back.SeriesDescription
        for z, (frame, c) in enumerate(
            zip(back.PerFrameFunctionalGroupsSequence, slices, strict=True)
        ):
            pos = frame.PlanePositionSequence[0].ImagePositionPatient
            assert np.allclose([float(v) for v in pos], [float(v) for v in c.ImagePositionPatient])
            assert np.array_equal(back.pixel_array[z], c.pixel_array), (back.SeriesDescription, z)
        assert back.SeriesDescription.startswith("SYNTHETIC")
        assert back.ImageType[0] == "DERIVED"
        assert "synthmr" in str(back.SoftwareVersions)
        assert dciodvfy_errors(path) == [], back.SeriesDescription


def test_2d_acquisitions_stay_classic():
    """An MDME (2D) result exports classic MR instances whatever multiframe_3d says, and
    its (fitted, varying) B1 map as a Parametric Map."""
    from tests.test_export_support import make_result, make_sources

    result = make_result()
    sources = make_sources()
    out = export_all(result, sources, ExportSettings())
    assert not any(ds.SOPClassUID == ENHANCED_MR_IMAGE_STORAGE for ds in out)
    assert any("B1 map" in str(ds.get("SeriesDescription", "")) for ds in out)


def test_an_assumed_constant_b1_map_is_not_exported(qalas):
    """QALAS without a B1 map series fits with B1 = 1 everywhere: no B1 Parametric Map
    (the other maps are there)."""
    result, sources, _ = qalas
    descriptions = [str(ds.SeriesDescription) for ds in export_all(result, sources["ge"])]
    assert not any("B1 map" in d for d in descriptions)
    assert any("T1 map" in d for d in descriptions)


def test_default_keeps_the_export_settings_dict_unchanged():
    """The default multiframe_3d is left out of as_dict (the private provenance block of
    existing outputs stays byte-identical); the other value is recorded."""
    assert "multiframe_3d" not in ExportSettings().as_dict()
    assert ExportSettings(multiframe_3d=False).as_dict()["multiframe_3d"] is False


def test_config_turns_multiframe_off(tmp_path: Path):
    """[export] multiframe_3d = false in the node's TOML reaches ExportSettings."""
    from dicom_node.config import load_settings

    cfg = tmp_path / "c.toml"
    cfg.write_text("[export]\nmultiframe_3d = false\n")
    assert load_settings(cfg, env={}).export.multiframe_3d is False
