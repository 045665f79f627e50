"""3D-QALAS with a B1-map series of the same study through ``synthmr serve``: dcmtk
``storescu`` sends a QALAS series, and *after* it (the node must wait for it) the study's
Siemens ``tfl_b1map`` series (anatomical + flip-angle map, 6 mm, tilted 25 / -10 deg, from
the same smooth B1 field the QALAS signal used); a second QALAS series of the same
phantom in another study has no B1 map. Every output goes to a real Orthanc; the T1 maps
are read back from Orthanc and compared with the phantom's truth.

Phantom: MNI anatomy 40 x 64 x 64 (3.6 mm isotropic), seed 5, SNR 200, magnitude (QALAS is
reconstructed as magnitude; at SNR 100 the magnitude bias alone moves pure GM's median T1
by -1.1 % even with the exact B1, processing/QALAS.md), B1 field 0.85-1.15, receive field
0.7-1.3. Goal (issue 16): pure WM and GM median T1 within 1 %, and closer to the truth
than without the B1 map; the B1 series used is named in the SR and the stored warnings.
"""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.emulator import write_datasets
from dicom_node.qalas_emulator import b1_map_grid, make_b1_map_datasets, make_qalas_datasets
from dicom_node.seriesstore import load_series
from processing.phantom import b1_field_on_grid
from tests.conftest import registry_rows
from tests.test_node_vendors_e2e import delivered_into_orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROCESSING = (
    '[processing]\ncontrasts = ["T1W"]\nsegmentation = true\n'
    "myelin = false\nenhance = false\nb1_smoothing = false\n"
)
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


def _orthanc_file(orth, iid: str) -> pydicom.Dataset:
    url = f"http://127.0.0.1:{orth.http_port}/instances/{iid}/file"
    with urllib.request.urlopen(url, timeout=20) as r:
        return pydicom.dcmread(io.BytesIO(r.read()))


def _outputs_in_orthanc(orth, spool: Path, series_uid: str) -> list[pydicom.Dataset]:
    """The node's outputs of ``series_uid`` as Orthanc stores them."""
    sops = {
        r[0]
        for r in registry_rows(
            spool, "SELECT sop_uid FROM outbox WHERE series_uid=?", (series_uid,)
        )
    }
    out = []
    for iid in orth.instances():
        tags = orth.rest(f"/instances/{iid}/simplified-tags")
        if str(tags["SOPInstanceUID"]) in sops and str(tags["SOPClassUID"]) in (
            PARAMETRIC_MAP,
            COMPREHENSIVE_3D_SR,
        ):
            out.append(_orthanc_file(orth, iid))
    return out


def _t1_volume(outputs: list[pydicom.Dataset], acq) -> np.ndarray:
    (pm,) = [
        ds
        for ds in outputs
        if ds.SOPClassUID == PARAMETRIC_MAP
        and str(ds.get("ContentDescription", "")) == "synthmr T1 relaxation time"
    ]
    img = hd.pm.ParametricMap.from_dataset(pm)
    aff = np.asarray(acq.affine, dtype=float)[:, [2, 1, 0, 3]]
    geom = hd.VolumeGeometry(aff, tuple(acq.shape), coordinate_system="PATIENT")
    vol = img.get_volume(dtype=np.float32, apply_real_world_transform=True)
    return vol.match_geometry(geom).array


def _sr_parameters(outputs: list[pydicom.Dataset]) -> str:
    (sr,) = [ds for ds in outputs if ds.SOPClassUID == COMPREHENSIVE_3D_SR]
    # the algorithm parameters are TEXT content items
    return "\n".join(str(e.value) for e in sr.iterall() if e.keyword == "TextValue")


def test_qalas_uses_the_studys_b1_map_series_through_serve(tmp_path: Path) -> None:
    from processing.qalas_phantom import make_qalas_phantom

    ph = make_qalas_phantom((40, 64, 64), seed=5, snr=200.0, magnitude=True)
    with_b1 = make_qalas_datasets(ph.acq, "siemens", seed=5)
    without_b1 = make_qalas_datasets(
        ph.acq, "ge", seed=6, study={"StudyInstanceUID": "2.25.606060"}
    )
    ref = with_b1[0]
    shape, affine = b1_map_grid(ph.acq, voxel_mm=6.0, oblique=True)
    values = b1_field_on_grid(ph.truth, np.asarray(ph.acq.affine), shape, affine)
    b1_series = make_b1_map_datasets(
        values,
        affine,
        "siemens",
        study={"StudyInstanceUID": str(ref.StudyInstanceUID)},
        frame_of_reference_uid=str(ref.FrameOfReferenceUID),
        seed=5,
    )
    fa_map_uid = {
        str(ds.SeriesInstanceUID) for ds in b1_series if "FLIP ANGLE MAP" in list(ds.ImageType)
    }.pop()
    files_a = write_datasets(with_b1, tmp_path / "in" / "qalas_a")
    files_b = write_datasets(without_b1, tmp_path / "in" / "qalas_b")
    files_b1 = write_datasets(b1_series, tmp_path / "in" / "b1")
    uid_a, uid_b = str(with_b1[0].SeriesInstanceUID), str(without_b1[0].SeriesInstanceUID)

    series = {"qalas_a": files_a, "b1": files_b1, "qalas_b": files_b}  # B1 after its QALAS
    completion = "quiet_period_s = 2\nb1_map_wait_s = 6\n"
    with delivered_into_orthanc(
        tmp_path, series, PROCESSING, completion=completion, not_delivered={"b1"}
    ) as run:
        spool, orth = run.spool, run.orthanc
        # the B1-map series are kept, not processed, not quarantined
        for b1_uid in {str(ds.SeriesInstanceUID) for ds in b1_series}:
            state, reason = registry_rows(
                spool, "SELECT state, reason FROM series WHERE series_uid=?", (b1_uid,)
            )[0]
            assert state == "IGNORED" and reason.startswith("B1 map"), (state, reason)
        # series A waited for the B1 map (it completed first), then used it
        waits = registry_rows(
            spool,
            "SELECT reason FROM transitions WHERE series_uid=? AND reason LIKE '%B1-map%'",
            (uid_a,),
        )
        assert waits, "the QALAS series did not wait for the B1-map series"
        stored_a = load_series(spool, uid_a).meta["warnings"]
        stored_b = load_series(spool, uid_b).meta["warnings"]
        assert any(f"B1 map series {fa_map_uid}" in w for w in stored_a), stored_a
        assert any("no B1-map series of this study" in w for w in stored_b), stored_b

        out_a = _outputs_in_orthanc(orth, spool, uid_a)
        out_b = _outputs_in_orthanc(orth, spool, uid_b)
        assert f"b1_map_series_uid={fa_map_uid}" in _sr_parameters(out_a)
        assert "b1_map=none" in _sr_parameters(out_b)
        t1_a, t1_b = _t1_volume(out_a, ph.acq), _t1_volume(out_b, ph.acq)
        tr = ph.truth
        for comp in ("WM", "GM"):
            pure = tr.pure_mask(comp) & tr.head & (t1_a > 0) & (t1_b > 0)
            truth = tr.tissues[comp].t1_ms
            err_a = float(np.median(t1_a[pure])) / truth - 1
            err_b = float(np.median(t1_b[pure])) / truth - 1
            assert abs(err_a) <= 0.01, (comp, err_a, err_b)
            assert abs(err_a) < abs(err_b), (comp, err_a, err_b)
