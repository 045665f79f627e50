"""Digest of every export output, apart from the clock (not a test; diff two checkouts).

    PYTHONPATH=/work/main python benchmarks/export_equivalence.py > a.txt
    PYTHONPATH=$PWD python benchmarks/export_equivalence.py > b.txt && diff a.txt b.txt

Cases: the stated model of tests/test_export_support.py (3 x 32 x 32) with the stated
sources and with the scanner emulator's GE, Siemens, Philips Enhanced and Siemens XA
Enhanced layouts, and GE marked 3D (Enhanced MR synthetic series); every output kind (8 Parametric Maps, maps as MR, synthetic contrasts,
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
from test_export_support import flat_acquisition, make_result, make_sources

from dicom_node.export import ExportSettings, export_all, report, segmentation


def main() -> None:
    from dicom_node.emulator import make_datasets

    result = make_result()
    cases = {"stated": make_sources()}
    for layout in ("ge", "siemens", "philips_enhanced", "siemens_xa_enhanced"):
        cases[layout] = make_datasets(flat_acquisition(result), layout, with_phase=True)
    # a 3D acquisition: the synthetic contrasts as one Enhanced MR instance each
    cases["ge 3D"] = make_datasets(flat_acquisition(result), "ge", with_phase=True)
    for ds in cases["ge 3D"]:
        ds.MRAcquisitionType = "3D"
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
