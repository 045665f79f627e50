"""Digest of every export output, apart from the clock (not a test; diff two checkouts).

    PYTHONPATH=/work/main python benchmarks/export_equivalence.py > a.txt
    PYTHONPATH=$PWD python benchmarks/export_equivalence.py > b.txt && diff a.txt b.txt

Cases: the stated model of tests/test_export_support.py (3 x 32 x 32) with the stated
sources and with the scanner emulator's GE, Siemens, Philips Enhanced and Siemens XA
Enhanced layouts; every output kind (8 Parametric Maps, maps as MR, synthetic contrasts,
SEG FRACTIONAL and BINARY, SR with and without SEG). One line per output: SOP class,
series number, instance number and tests/export_canon.py's digest (every attribute, nested,
pixel data included; creation/content/series dates and times and the file meta's
implementation identity left out).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from export_canon import digest
from test_export_support import make_result, make_sources

from dicom_node.export import ExportSettings, export_all, report, segmentation


def _flat_acquisition(result):  # as tests/test_export_tools.py
    import numpy as np

    from processing.acquisition import Acquisition

    nz, ny, nx = result.shape
    return Acquisition(
        signal=np.full((nz, 2, 2, ny, nx), 100.0, dtype=np.float32),
        delays_ms=np.array([150.0, 1500.0]),
        echo_times_ms=np.array([20.0, 100.0]),
        tr_ms=4000.0,
        saturation_deg=120.0,
        excitation_deg=90.0,
        voxel_size_mm=tuple(result.voxel_size_mm),
        affine=result.affine,
        is_magnitude=False,
    )


def main() -> None:
    from dicom_node.emulator import make_datasets

    result = make_result()
    cases = {"stated": make_sources()}
    for layout in ("ge", "siemens", "philips_enhanced", "siemens_xa_enhanced"):
        cases[layout] = make_datasets(_flat_acquisition(result), layout, with_phase=True)
    for name, sources in cases.items():
        outs = export_all(result, sources, ExportSettings(maps_as_mr_images=True))
        outs.append(segmentation(result, sources, ExportSettings(seg_type="BINARY")))
        outs.append(report(result, sources, ExportSettings()))
        for ds in outs:
            print(
                f"{name:20s} {ds.SOPClassUID.name[:34]:34s} {int(ds.SeriesNumber):5d}"
                f" {int(ds.get('InstanceNumber', 0) or 0):3d} {digest(ds)}"
            )


if __name__ == "__main__":
    main()
