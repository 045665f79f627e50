"""Command-line pieces of phantom QC, hooked into :mod:`dicom_node.cli`:

- ``synthmr simulate --phantom nist``: the phantom as an MDME series in a vendor layout, with
  a chosen pose, slab, temperature, B1 field and noise;
- ``synthmr qc history [--scanner S]`` and ``synthmr qc compare FILE...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_qc_parser", "add_simulate_arguments", "cmd_simulate_phantom"]


def _floats(n: int):
    def parse(text: str) -> tuple[float, ...]:
        try:
            vals = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {n} comma-separated numbers, got {text!r}"
            ) from None
        if len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
        return vals

    return parse


def add_simulate_arguments(s: argparse.ArgumentParser) -> None:
    """The phantom options of ``synthmr simulate``."""
    g = s.add_argument_group("quantitative phantom (--phantom)")
    g.add_argument("--phantom", default=None, help="simulate a QC phantom instead of a brain: nist")
    g.add_argument("--phantom-version", default=None, help="definition version (nist: v1, v2)")
    g.add_argument(
        "--pose",
        type=_floats(6),
        default=(0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        help="RX,RY,RZ (deg, about the patient's x then y then z, away from the placement"
        " the phantom's manual gives: NIST plates coronal),TX,TY,TZ (mm, phantom centre, LPS)",
    )
    g.add_argument(
        "--slab-centre",
        type=_floats(3),
        default=None,
        help="slab centre LPS mm (default: midway between the T1 and T2 plates)",
    )
    g.add_argument(
        "--slab-tilt",
        type=_floats(3),
        default=None,
        help="slab axes rotation RX,RY,RZ deg (default: parallel to the plates)",
    )
    g.add_argument("--voxel", type=_floats(3), default=(4.0, 1.5, 1.5), help="Z,Y,X mm")
    g.add_argument("--temperature", type=float, default=None, help="phantom temperature, C")
    g.add_argument("--b1-range", type=_floats(2), default=(0.8, 1.2), help="MIN,MAX flip ratio")
    g.add_argument("--scanner", default="", help="DeviceSerialNumber written (scanner identity)")
    g.add_argument("--station", default="", help="StationName written")
    g.add_argument("--acquired", default="", help="acquisition date-time YYYYmmddHHMMSS")


def cmd_simulate_phantom(args: argparse.Namespace) -> int:
    from dicom_node import emulator
    from processing.phantom_qc import placed, simulate_phantom
    from processing.phantoms import load_definition

    defn = load_definition(args.phantom, args.phantom_version)
    shape = args.shape if tuple(args.shape) != (12, 128, 128) else (20, 160, 160)
    scan = simulate_phantom(
        defn,
        shape=shape,
        voxel_size_mm=args.voxel,
        pose=placed(defn, args.pose[:3], args.pose[3:]),
        slab_centre_mm=args.slab_centre,
        tilt_deg=args.slab_tilt,
        snr=args.snr,
        b1_range=tuple(args.b1_range),
        temperature_c=args.temperature,
        magnitude=False,
        seed=args.seed,
    )
    study = {"StudyDescription": "PHANTOM QC " + defn.title[:40]}
    if args.acquired:
        study.update(StudyDate=args.acquired[:8], StudyTime=(args.acquired[8:] or "090000"))
    datasets = emulator.make_datasets(
        scan.acq,
        args.vendor,
        with_phase=not args.magnitude_only,
        seed=args.seed,
        patient={"PatientName": "QC^NIST PHANTOM", "PatientID": "PHANTOM-QC"},
        study=study,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets):
        ds.BodyPartExamined = "PHANTOM"
        if args.scanner:
            ds.DeviceSerialNumber = args.scanner
        if args.station:
            ds.StationName = args.station
        if args.acquired:
            ds.SeriesDate = ds.ContentDate = args.acquired[:8]
            ds.AcquisitionDate = args.acquired[:8]
            ds.AcquisitionTime = args.acquired[8:] or "090000"
        ds.save_as(out / f"IM_{i + 1:05d}.dcm", enforce_file_format=True)
    truth = {
        "phantom": defn.name,
        "version": defn.version,
        "pose": scan.pose.as_dict(),
        "temperature_c": scan.temperature_c,
        "snr": args.snr,
        "b1_range": list(args.b1_range),
        "sphere_centres_lps": {
            s.label: [round(float(v), 3) for v in c]
            for s, c in zip(defn.spheres, scan.sphere_centres_lps, strict=True)
        },
        "truth": scan.truth,
    }
    (out / "phantom_truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    print(
        f"simulate: wrote {len(datasets)} files ({args.vendor}, phantom {defn.name} {defn.version},"
        f" pose {scan.pose.as_dict()}, grid {scan.acq.signal.shape}) to {out};"
        f" truth in {out / 'phantom_truth.json'}"
    )
    return 0


def add_qc_parser(sub: Any) -> None:
    q = sub.add_parser("qc", help="phantom QC: history per scanner, compare phantom_qc.json files")
    qs = q.add_subparsers(dest="qc_command", required=True)
    h = qs.add_parser("history", help="trend per scanner and array from the node's registry")
    h.add_argument("--scanner", default=None, help="only this scanner (serial or station)")
    h.add_argument("--config", "-c", default=None, help="the node's TOML configuration")
    h.add_argument("--json", action="store_true", help="the stored reports as JSON")
    h.set_defaults(func=cmd_qc_history)
    c = qs.add_parser("compare", help="R^2 per array and CV within/between scanners per sphere")
    c.add_argument("files", nargs="+", help="phantom_qc.json files (or folders holding them)")
    c.add_argument("--json", action="store_true", help="the table as JSON")
    c.set_defaults(func=cmd_qc_compare)


def cmd_qc_history(args: argparse.Namespace) -> int:
    from dicom_node import config as cfg_mod
    from dicom_node.qc_history import QCHistory, format_history

    settings = cfg_mod.load_settings(args.config)
    path = Path(settings.spool.path) / "registry.sqlite3"
    if not path.is_file():
        print(
            f"no node registry at {path} (give the node's configuration with -c)", file=sys.stderr
        )
        return 1
    h = QCHistory(path)
    try:
        reports = h.reports(args.scanner)
    finally:
        h.close()
    if not reports:
        print("no phantom QC recorded" + (f" for scanner {args.scanner}" if args.scanner else ""))
        return 0
    print(json.dumps(reports, indent=1) if args.json else format_history(reports))
    return 0


def cmd_qc_compare(args: argparse.Namespace) -> int:
    from dicom_node.qc_history import format_compare
    from processing.phantom_qc import compare_reports

    files: list[Path] = []
    for f in args.files:
        p = Path(f)
        files += sorted(p.rglob("phantom_qc.json")) if p.is_dir() else [p]
    reports = []
    for p in files:
        try:
            reports.append(json.loads(p.read_text("utf-8")))
        except (OSError, ValueError) as exc:
            print(f"qc compare: {p}: not a phantom_qc.json: {exc}", file=sys.stderr)
            return 1
    if not reports:
        print("qc compare: no phantom_qc.json files", file=sys.stderr)
        return 1
    table = compare_reports(reports)
    print(json.dumps(table, indent=1) if args.json else format_compare(table))
    return 0
