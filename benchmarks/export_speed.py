"""Time every export kind on a clinical-size grid (not a test; prints measured numbers).

    python benchmarks/export_speed.py [--nz 30] [--ny 256] [--nx 256] [--repeat 1] [--cpu]

Prints one total line (``export_all`` with every output: 8 Parametric Maps, the 8 maps
as MR images, the synthetic contrasts, SEG FRACTIONAL and the SR), then seconds per
output kind (plus SEG BINARY) and the encoded size, for the stated grid.

``--cpu``: instead, the CPU time (this process, all threads) per output kind and step, of
the node's default outputs of one series (the 9 contrasts the default pipeline makes):
building the datasets, their Part-10 encoding, the worker's encoded synthetic series
(build + encode, :func:`dicom_node.series.encode_synthetic_series`) and storing the files
in a spool's outbox (write + fsync, :meth:`dicom_node.spool.Spool.store_outputs`), per
output and per instance, best of ``--repeat``, with the load average.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_export_support import make_result, make_sources

from dicom_node.export import (
    ExportSettings,
    export_all,
    map_mr_images,
    parametric_maps,
    report,
    segmentation,
    synthetic_images,
)


def size_mb(datasets) -> float:
    total = 0
    for ds in datasets:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        total += buf.tell()
    return total / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nz", type=int, default=30)
    ap.add_argument("--ny", type=int, default=256)
    ap.add_argument("--nx", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cpu", action="store_true", help="CPU per output kind and step")
    a = ap.parse_args()
    result = make_result(a.nz, a.ny, a.nx)
    # the default pipeline makes 9 contrasts: add the 6 the stated model lacks (same cost)
    flair = result.synthetic["FLAIR"]
    for name in ("T1W", "T2W", "PDW", "T1FLAIR", "STIR", "DIR"):
        result.synthetic[name] = replace(
            flair, name=name, description=f"SYNTHETIC {name} TR{flair.tr_ms:.0f}"
        )
    sources = make_sources(a.nz, a.ny, a.nx, n_delay=1, n_echo=1)
    if a.cpu:
        cpu_per_step(result, sources, a)
        return
    s = ExportSettings()
    per_kind = {
        "parametric maps (8)": lambda: parametric_maps(result, sources, s),
        "maps as MR (8 series)": lambda: map_mr_images(result, sources, s),
        f"synthetic MR ({len(result.synthetic)} contrasts)": lambda: synthetic_images(
            result, sources, s
        ),
        "SEG FRACTIONAL": lambda: [segmentation(result, sources, s)],
        "SEG BINARY": lambda: [segmentation(result, sources, ExportSettings(seg_type="BINARY"))],
        "SR": lambda: [report(result, sources, s)],
    }
    print(f"grid z,y,x = {a.nz},{a.ny},{a.nx}; repeat {a.repeat}")
    everything = ExportSettings(maps_as_mr_images=True)
    cases = {"TOTAL export_all (all outputs)": lambda: export_all(result, sources, everything)}
    cases.update(per_kind)
    for name, fn in cases.items():
        best = float("inf")
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        print(f"{name:32s} {best:7.2f} s  {len(out):4d} instances  {size_mb(out):8.1f} MB")


def cpu_per_step(result, sources, a) -> None:
    """The ``--cpu`` table."""
    import os
    import tempfile

    from dicom_node.export import settings_for
    from dicom_node.export.geometry import slice_geometry
    from dicom_node.export.mr_images import mr_geometry
    from dicom_node.export.uids import parameter_fingerprint
    from dicom_node.series import encode_part10, encode_synthetic_series
    from dicom_node.spool import Spool

    settings = settings_for(result, ExportSettings())
    geometry = slice_geometry(result, sources, settings)
    fp = parameter_fingerprint(result, settings)
    light = mr_geometry(geometry)
    names = list(result.synthetic)
    seg = segmentation(result, sources, settings, geometry)

    def best(fn):
        out, cpu = None, float("inf")
        for _ in range(a.repeat):
            t0 = time.process_time()
            out = fn()
            cpu = min(cpu, time.process_time() - t0)
        return out, cpu

    kinds = {
        "parametric maps": lambda: parametric_maps(result, sources, settings, geometry),
        "synthetic MR (datasets)": lambda: synthetic_images(result, sources, settings, geometry),
        "SEG FRACTIONAL": lambda: [segmentation(result, sources, settings, geometry)],
        "SR": lambda: [report(result, sources, settings, seg=seg, geometry=geometry)],
    }
    print(f"grid z,y,x = {a.nz},{a.ny},{a.nx}; {len(names)} contrasts; best of {a.repeat}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        f"{'output kind':28s} {'n':>4s} {'build':>9s} {'encode':>9s} {'store':>9s}"
        f" {'per instance':>13s}  (CPU ms)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(tmp)

        def store(blobs):
            return lambda: spool.store_outputs("1.2.3", ((str(i), b) for i, b in blobs))

        for name, fn in kinds.items():
            datasets, build = best(fn)
            blobs, encode = best(lambda: [encode_part10(ds) for ds in datasets])  # noqa: B023
            _, stored = best(store(list(enumerate(blobs))))
            spool.remove_series("1.2.3", "outbox")
            n = len(datasets)
            print(
                f"{name:28s} {n:4d} {build * 1e3:9.1f} {encode * 1e3:9.1f} {stored * 1e3:9.1f}"
                f" {(build + encode + stored) * 1e3 / n:13.2f}"
            )
        args = [(result, nm, light, settings, 1100 + i, fp) for i, nm in enumerate(names)]
        series, both = best(lambda: [encode_synthetic_series(*x) for x in args])
        blobs = [
            (f"{k}.{j}", data[at : at + entry[2]])
            for k, (data, index) in enumerate(series)
            for j, (at, entry) in enumerate(zip(_offsets(index), index, strict=True))
        ]
        _, stored = best(store(blobs))
        n = len(blobs)
        print(
            f"{'synthetic MR (worker)':28s} {n:4d} {both * 1e3:9.1f} {'(in build)':>9s}"
            f" {stored * 1e3:9.1f} {(both + stored) * 1e3 / n:13.2f}"
        )
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def _offsets(index) -> list[int]:
    at, out = 0, []
    for entry in index:
        out.append(at)
        at += entry[2]
    return out


if __name__ == "__main__":
    main()
