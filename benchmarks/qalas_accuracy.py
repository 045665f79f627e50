"""3D-QALAS accuracy figures for the issue's acceptance numbers (prints, asserts nothing).

1. Scatter vs the Cramer-Rao bound: 6000 pure WM (830/70/70) and GM (1330/90/80) voxels,
   smooth B1 0.85-1.15 known, Gaussian noise SD 1 (1 % of pure water's M0).
2. 3D phantom (MNI anatomy, 40x64x64, 3.6 mm isotropic), SNR 100, B1 0.85-1.15, receive
   field 0.7-1.3: pure WM/GM median signed errors with the exact B1 field, with a vendor
   B1-map series (the same field on a 6 mm grid tilted 25 / -10 deg, written as Siemens
   tfl_b1map / Philips DREAM DICOM, read back by dicom_node.vendors.b1map and resampled
   onto the QALAS grid by processing.b1map, as the node does), and with nominal B1.
   Real data (``--magnitude``: magnitude data, as scanners reconstruct QALAS).

    PYTHONPATH=$PWD python benchmarks/qalas_accuracy.py
"""

from __future__ import annotations

import numpy as np


def _vendor_b1(ph, vendor: str) -> np.ndarray:
    """The phantom's B1 field as a vendor B1-map series, read and resampled as the node does."""
    from dicom_node.qalas_emulator import b1_map_grid, make_b1_map_datasets
    from dicom_node.vendors.b1map import b1_series_info, read_b1_map
    from processing.b1map import resample_b1_map
    from processing.phantom import b1_field_on_grid

    aff = np.asarray(ph.acq.affine)
    shape, b1_aff = b1_map_grid(ph.acq, voxel_mm=6.0, oblique=True)
    values = b1_field_on_grid(ph.truth, aff, shape, b1_aff)
    datasets = make_b1_map_datasets(
        values, b1_aff, vendor, study={"StudyInstanceUID": "2.25.1"},
        frame_of_reference_uid="2.25.2",
    )  # fmt: skip
    series: dict[str, list] = {}
    for ds in datasets:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    (maps,) = [read_b1_map(d) for d in series.values() if b1_series_info(d).has_map]
    return resample_b1_map(maps, ph.acq.shape, aff)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--magnitude", action="store_true", help="magnitude phantom data")
    args = ap.parse_args()

    from processing.qalas import QalasProtocol, qalas_signal
    from processing.qalas_fit import crlb, fit_qalas, fit_qalas_samples
    from processing.qalas_phantom import make_qalas_phantom

    protocol = QalasProtocol()
    rng = np.random.default_rng(4)
    n = 6000
    b1 = 1.0 + 0.15 * np.sin(np.linspace(0, 3 * np.pi, n))
    for t1, t2, pd in ((830.0, 70.0, 70.0), (1330.0, 90.0, 80.0)):
        y = qalas_signal(pd, t1, t2, b1, protocol) + rng.normal(0, 1.0, (n, 5))
        par, _, ok = fit_qalas_samples(y, protocol, b1_fixed=b1, noise_sd=1.0)
        m0, t1f, t2f = par[ok, 0], 1000.0 / par[ok, 1], 1000.0 / par[ok, 2]
        bound = crlb(pd, t1, t2, b1[ok], protocol, 1.0, fix_b1=True)
        print(
            f"T1 {t1:.0f}: SD/CRLB M0 {np.std((m0 - pd) / bound[:, 0]):.3f} "
            f"T1 {np.std((t1f - t1) / bound[:, 1]):.3f} T2 {np.std((t2f - t2) / bound[:, 2]):.3f}"
            f"; median error T1 {np.median(t1f) / t1 - 1:+.4f} T2 {np.median(t2f) / t2 - 1:+.4f}"
            f" PD {np.median(m0) - pd:+.3f} pu"
        )
    ph = make_qalas_phantom((40, 64, 64), snr=100.0, seed=5, magnitude=args.magnitude)
    tr = ph.truth
    cases = [("exact B1 field", {"b1_map": tr.b1})]
    for vendor in ("siemens", "philips"):
        grid = _vendor_b1(ph, vendor)
        head = tr.head
        err = np.abs(grid[head] - tr.b1[head])
        print(
            f"{vendor} B1-map series resampled: |B1 - truth| over the head median"
            f" {np.nanmedian(err):.5f}, 99th pct {np.nanpercentile(err, 99):.5f};"
            f" {100 * np.isnan(err).mean():.2f} % of head voxels uncovered (nominal B1)"
        )
        cases.append((f"{vendor} B1-map series", {"b1_map": grid}))
    cases.append(("nominal B1", {}))
    data = "magnitude" if args.magnitude else "real"
    for label, kw in cases:
        maps = fit_qalas(ph.acq, tr.head, **kw)
        for comp in ("WM", "GM"):
            pure = tr.pure_mask(comp) & tr.head & ~maps.failed
            tp = tr.tissues[comp]
            print(
                f"phantom SNR 100 {data}, {label}, {comp}: T1 "
                f"{np.median(maps.t1_ms[pure]) / tp.t1_ms - 1:+.4f} T2 "
                f"{np.median(maps.t2_ms[pure]) / tp.t2_ms - 1:+.4f} PD "
                f"{np.median(maps.m0[pure] / tr.coil[pure]) - tp.pd_pu:+.2f} pu"
            )


if __name__ == "__main__":
    main()
