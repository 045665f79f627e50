"""Phantom QC on simulated ISMRM/NIST phantoms in every vendor layout (not a test).

Per layout and slab, a phantom is simulated (SNR 50, B1 0.8-1.2, receive field 0.7-1.3)
at a random pose (seeded): off-centre up to 20 mm along each axis, rotated up to 15 deg about
each axis away from the manual's placement (plates coronal); the 80 mm slab (parallel to the
plates) covers the T1 + T2 arrays ("low") or the PD + T2 arrays ("high"), always cutting
some spheres. With ``--built-differently`` the simulated phantom is not the definition the
analysis uses: ring spheres on a ring 3 mm wider (odd rows) or narrower (even rows), fluid
radius 11 or 7 mm instead of 9, four spheres moved by 2.5-3 mm. The series goes through the
emulator's DICOM writer, the vendor adapter and the node's phantom path
(dicom_node.phantom_node.try_phantom). Printed:

- detection time (pose search) and the whole phantom path's time;
- spheres inside the slab found / expected, largest centre error (mm);
- ROI voxels touching the TRUE sphere wall (box not inside the true fluid sphere): must be 0;
- largest per-sphere error over in-range spheres: T1 %, T2 %, PD pu; R^2 of T1 and T2;
- spheres counted ("in": reference in the measurable range and median precise enough) and
  flagged, measured but not counted ("flag"), of which "impr." have their reference in range
  but a median standard error above tolerance / 2 (processing.phantom_qc PRECISION_Z).

With ``--compare``: 3 simulated scanners x 3 repeats (scanner A: 20 C, B1 0.8-1.2, SNR 50;
B: 17 C, B1 0.9-1.1, SNR 40; C: 24 C, B1 0.85-1.25, SNR 60; random poses; slab over the T1
and T2 arrays) through the analysis, then the ``synthmr qc compare`` table, and the
between-scanner CV the truth implies (temperature coefficient 1 %/C).

    python benchmarks/phantom_qc.py [--layouts ge,siemens] [--seed 0] [--compare]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dicom_node import emulator, ingest
from dicom_node.config import PhantomQCSettings
from dicom_node.phantom_node import try_phantom
from dicom_node.series import classify
from processing import phantom_qc as pq
from processing.phantoms import load_definition


def _wall_touches(scan: pq.PhantomScan, labels: np.ndarray) -> int:
    """ROI voxels (the analysis' label map) whose box leaves the TRUE fluid sphere."""
    aff = scan.acq.affine
    vox = np.linalg.norm(aff[:3, :3], axis=0)
    inv = np.linalg.inv(aff[:3, :3])
    bad = 0
    flat = labels.ravel()
    for k in range(len(scan.definition.spheres)):
        voxels = np.flatnonzero(flat == k + 1)
        if not voxels.size:
            continue
        z, y, x = np.unravel_index(voxels, scan.acq.shape)
        c = inv @ (scan.sphere_centres_lps[k] - aff[:3, 3])
        off = np.stack([(x - c[0]) * vox[0], (y - c[1]) * vox[1], (z - c[2]) * vox[2]])
        far = np.sqrt(((np.abs(off) + vox[:, None] / 2) ** 2).sum(0))
        bad += int((far > scan.definition.spheres[k].radius_mm).sum())
    return bad


def _inside(scan: pq.PhantomScan, erosion_mm: float = 1.0, band_mm: float = 0.75) -> set[str]:
    """Spheres whose eroded ROI ball the slab holds with ``band_mm`` to spare (true
    geometry): these must be found and measured (tests/test_phantom_qc.py _truth_cut)."""
    aff = scan.acq.affine
    inv = np.linalg.inv(aff[:3, :3])
    nz, dz = scan.acq.shape[0], scan.acq.voxel_size_mm[0]
    out = set()
    for s, c in zip(scan.definition.spheres, scan.sphere_centres_lps, strict=True):
        k = (inv @ (c - aff[:3, 3]))[2]
        edge = min((k + 0.5) * dz, (nz - 0.5 - k) * dz)
        if s.radius_mm - edge <= erosion_mm - band_mm:
            out.add(s.label)
    return out


def built_differently(defn, odd: bool):
    """The definition's phantom with another maker's tolerances (module doc)."""
    moves = {"T1-03": (0, 2.5, 0), "T2-12": (2, -2, 0), "T1-05": (0, 0, 2.5), "T2-06": (-2.5, 0, 1)}
    c = defn.centres_mm().copy()
    for i, s in enumerate(defn.spheres):
        if s.index <= 10:
            r = np.linalg.norm(c[i, :2])
            c[i, :2] *= (r + (3.0 if odd else -3.0)) / r
        c[i] += moves.get(s.label, (0.0, 0.0, 0.0))
    return defn.with_geometry(c, 11.0 if odd else 7.0)


def run_one(layout: str, slab: str, seed: int, tmp: Path, different: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    defn = load_definition("nist")
    pose = pq.placed(defn, rng.uniform(-15, 15, 3), rng.uniform(-20, 20, 3))
    true = built_differently(defn, seed % 2 == 1) if different else defn
    scan = pq.simulate_phantom(
        true, pose=pose, slab_offset_mm=(-36.5 if slab == "low" else 3.5), seed=seed
    )
    folder = tmp / f"{layout}_{slab}"
    folder.mkdir()
    for i, ds in enumerate(
        emulator.make_datasets(
            scan.acq, layout, seed=seed, patient={"PatientName": "QC^PHANTOM"}, study={}
        )
    ):
        ds.save_as(folder / f"IM_{i:05d}.dcm", enforce_file_format=True)
    (group,) = ingest.read_paths([folder], progress=False)
    acq = classify(group.datasets).acquisition
    t0 = time.perf_counter()
    ph = try_phantom(acq, group.datasets, PhantomQCSettings(), lambda f, *a, **k: f(*a, **k))
    total = time.perf_counter() - t0
    if ph is None or ph.result is None:
        return {"layout": layout, "slab": slab, "error": ph.reason if ph else "rule"}
    rep = ph.report
    labels = ph.result.phantom_rois
    rows = {r["label"]: r for r in rep["spheres"]}
    inside = _inside(scan)
    found = [lab for lab in inside if rows[lab]["measured"]]
    cerr = max(
        float(np.linalg.norm(np.array(rows[s.label]["centre_mm"]) - c))
        for s, c in zip(scan.definition.spheres, scan.sphere_centres_lps, strict=True)
        if s.label in inside
    )
    errs = {"t1_ms": 0.0, "t2_ms": 0.0, "pd_pu": 0.0}
    flagged = imprecise = admitted = 0
    for s in scan.definition.spheres:
        r = rows[s.label]
        if not r["measured"]:
            continue
        if not r["in_range"]:
            flagged += 1
            imprecise += bool(r["reference_in_range"])
            continue
        admitted += 1
        truth = scan.truth[s.label][s.quantity]
        e = abs(r[s.quantity] - truth)
        errs[s.quantity] = max(errs[s.quantity], e if s.quantity == "pd_pu" else 100 * e / truth)
    lin = rep["linearity"]
    return {
        "layout": layout,
        "slab": slab,
        "detect_s": rep["pose"]["seconds"],
        "refined": rep["pose"]["spheres_refined"],
        "refine_s": rep["pose"]["refine_seconds"],
        "total_s": total,
        "found": f"{len(found)}/{len(inside)}",
        "centre_err_mm": cerr,
        "wall_voxels": _wall_touches(scan, labels),
        "t1_pct": errs["t1_ms"],
        "t2_pct": errs["t2_ms"],
        "pd_pu": errs["pd_pu"],
        "r2_t1": lin["T1"]["r2"],
        "r2_t2": lin["T2"]["r2"],
        "flagged": flagged,
        "imprecise": imprecise,
        "admitted": admitted,
    }


def compare() -> None:
    import statistics

    from dicom_node.qc_history import format_compare
    from processing.fit import fit_mdme

    defn = load_definition("nist")
    scanners = {
        "A": (20.0, (0.8, 1.2), 50.0),
        "B": (17.0, (0.9, 1.1), 40.0),
        "C": (24.0, (0.85, 1.25), 60.0),
    }
    reports = []
    for si, (name, (temp, b1, snr)) in enumerate(scanners.items()):
        for k in range(3):
            rng = np.random.default_rng(100 + 10 * si + k)
            pose = pq.placed(defn, rng.uniform(-15, 15, 3), rng.uniform(-20, 20, 3))
            scan = pq.simulate_phantom(
                defn,
                pose=pose,
                snr=snr,
                b1_range=b1,
                temperature_c=temp,
                seed=100 + 10 * si + k,
            )
            maps = fit_mdme(scan.acq, b1_smoothing=False)
            rep = pq.analyze(maps, scan.acq.affine, defn, pq.protocol_of(scan.acq), acq=scan.acq)
            rep.pop("roi_labels")
            rep.pop("pd_map")
            rep["scanner"] = name
            reports.append(rep)
    table = pq.compare_reports(reports)
    print(format_compare(table))
    print("truth: CV within 0 %; CV between from the certified values at 20 / 17 / 24 C:")
    for row in table["spheres"]:
        sphere = next(s for s in defn.spheres if s.label == row["label"])
        v = [defn.value_at(sphere, row["quantity"], t)[0] for t, _, _ in scanners.values()]
        cv = statistics.stdev(v) / statistics.mean(v)
        got = row["cv_between"]
        print(
            f"  {row['label']:6} truth {100 * cv:5.2f} %  measured"
            f" {'-' if got is None else format(100 * got, '5.2f')} %"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default=",".join(emulator.VENDOR_LAYOUTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", action="store_true", help="3 scanners x 3 repeats table")
    ap.add_argument(
        "--built-differently",
        action="store_true",
        help="simulate phantoms whose geometry differs from the definition (module doc)",
    )
    args = ap.parse_args()
    if args.compare:
        compare()
        return
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for i, layout in enumerate(args.layouts.split(",")):
            for j, slab in enumerate(("low", "high")):
                seed = args.seed + 10 * i + j
                rows.append(run_one(layout, slab, seed, Path(d), args.built_differently))
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores, shared)")
    hdr = (
        f"{'layout':20} {'slab':4} {'detect s':>8} {'refine s':>8} {'refined':>7} {'total s':>7}"
        f" {'found':>6}"
        f" {'c.err mm':>8}"
        f" {'wall':>4} {'T1 %':>6} {'T2 %':>6} {'PD pu':>6} {'R2 T1':>8} {'R2 T2':>8} {'in':>3} {'flag':>4}"
        f" {'impr.':>5}"
    )
    print(hdr)

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        if "error" in r:
            print(f"{r['layout']:20} {r['slab']:4} NOT RECOGNISED: {r['error']}")
            continue
        print(
            f"{r['layout']:20} {r['slab']:4} {r['detect_s']:8.2f} {r['refine_s']:8.2f}"
            f" {r['refined']:7d}"
            f" {r['total_s']:7.2f}"
            f" {r['found']:>6} {r['centre_err_mm']:8.3f} {r['wall_voxels']:4d}"
            f" {r['t1_pct']:6.2f} {r['t2_pct']:6.2f} {r['pd_pu']:6.2f}"
            f" {f(r['r2_t1'], '8.5f'):>8} {f(r['r2_t2'], '8.5f'):>8} {r['admitted']:3d}"
            f" {r['flagged']:4d} {r['imprecise']:5d}"
        )
    ok = [r for r in rows if "error" not in r]
    if ok:
        print(
            f"worst: centre {max(r['centre_err_mm'] for r in ok):.3f} mm, wall voxels"
            f" {sum(r['wall_voxels'] for r in ok)}, T1 {max(r['t1_pct'] for r in ok):.2f} %,"
            f" T2 {max(r['t2_pct'] for r in ok):.2f} %, PD {max(r['pd_pu'] for r in ok):.2f} pu,"
            f" R2 T1 {min(r['r2_t1'] for r in ok if r['r2_t1'] is not None):.5f},"
            f" R2 T2 {min(r['r2_t2'] for r in ok if r['r2_t2'] is not None):.5f},"
            f" detection {max(r['detect_s'] for r in ok):.2f} s"
        )


if __name__ == "__main__":
    main()
