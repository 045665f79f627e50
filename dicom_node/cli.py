"""``synthmr`` command line: serve | status | retry | process | simulate | send | demo |
check-config."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from processing._version import __version__


def _shape(text: str) -> tuple[int, int, int]:
    try:
        z, y, x = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected Z,Y,X (e.g. 30,256,256), got {text!r}"
        ) from None
    if min(z, y, x) < 1:
        raise argparse.ArgumentTypeError(f"every dimension must be >= 1, got {text!r}")
    return (z, y, x)


def _processing_settings(config_path: str | None):
    """ProcessingSettings from the node config (defaults when no file)."""
    from processing.run import ProcessingSettings

    if not config_path:
        return ProcessingSettings(), None
    from dicom_node import config as cfg_mod

    settings = cfg_mod.load_settings(config_path)
    return settings.processing.to_processing_settings(), settings


# --------------------------------------------------------------------------- simulate
def cmd_simulate(args: argparse.Namespace) -> int:
    from dicom_node import emulator
    from processing.phantom import make_phantom

    if getattr(args, "phantom", None):
        from dicom_node.phantom_cli import cmd_simulate_phantom

        return cmd_simulate_phantom(args)

    ph = make_phantom(
        args.shape,
        seed=args.seed,
        snr=args.snr,
        magnitude=False,
        oblique=args.oblique,
        anatomy=args.anatomy,
    )
    out = Path(args.out)
    paths = emulator.write_series(
        ph.acq, args.vendor, out, with_phase=not args.magnitude_only, seed=args.seed
    )
    print(
        f"simulate: wrote {len(paths)} files ({args.vendor}, "
        f"{'magnitude only' if args.magnitude_only else 'magnitude+phase'}, "
        f"{'oblique' if args.oblique else 'axial'}, grid {ph.acq.signal.shape}) to {out}"
    )
    return 0


# --------------------------------------------------------------------------- process
def _write_fallback(result: Any, out: Path) -> list[Path]:
    """.npz of the maps + a PNG montage (used when DICOM export is unavailable)."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    m = result.maps
    arrays = {
        "t1_ms": m.t1_ms,
        "t2_ms": m.t2_ms,
        "pd_pu": m.pd_pu,
        "b1": m.b1,
        "m0": m.m0,
        "residual": m.residual,
        "mask": m.mask,
    }
    for name, syn in result.synthetic.items():
        arrays[f"synthetic_{name}"] = syn.image
    npz = out / "maps.npz"
    np.savez_compressed(npz, **arrays)
    png = out / "montage.png"
    png.write_bytes(montage_png(result))
    return [npz, png]


def montage_png(result: Any) -> bytes:
    """Middle slice of every map and contrast, 4 columns."""
    from processing.montage import encode_png, tile, window

    m = result.maps
    z = m.t1_ms.shape[0] // 2
    tiles = [
        window(m.t1_ms[z], 0, 4500),
        window(m.t2_ms[z], 0, 300),
        window(m.pd_pu[z], 0, 110),
        window(m.b1[z], 0.6, 1.4),
    ]
    labels = ["T1 0-4500 MS", "T2 0-300 MS", "PD 0-110 PU", "B1 0.6-1.4"]
    for name, syn in result.synthetic.items():
        lo = -abs(syn.window_width) / 2 + syn.window_center
        tiles.append(window(syn.image[z], lo, lo + syn.window_width))
        labels.append(f"SYNTHETIC {name}")
    if result.myelin is not None:
        tiles.append(window(result.myelin.mypv[z], 0, 40))
        labels.append("MYELIN 0-40 %")
    if result.segmentation is not None:
        for t in ("WM", "GM", "CSF"):
            tiles.append(window(result.segmentation.fractions[t][z], 0, 1))
            labels.append(f"{t} FRACTION")
    return encode_png(tile(tiles, columns=4, labels=labels))


def _export_series(result: Any, sources: list, out: Path, settings: Any) -> list[Path]:
    from dicom_node.export import export_all

    out.mkdir(parents=True, exist_ok=True)
    export_settings = settings.export_settings() if settings is not None else None
    datasets = (
        export_all(result, sources, export_settings)
        if export_settings
        else export_all(result, sources)
    )
    written: list[Path] = []
    for ds in datasets:
        modality = str(getattr(ds, "Modality", "OT"))
        series = int(getattr(ds, "SeriesNumber", 0) or 0)
        folder = out / f"{series:05d}_{modality}"
        folder.mkdir(exist_ok=True)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    (out / "montage.png").write_bytes(montage_png(result))
    return written


def cmd_process(args: argparse.Namespace) -> int:
    from dicom_node import ingest
    from processing.run import run

    proc_settings, node_settings = _processing_settings(args.config)
    rules = node_settings.vendors if node_settings is not None else None
    out_root = Path(args.out)
    groups = ingest.read_paths([Path(p) for p in args.input], progress=not args.no_progress)
    if not groups:
        print("process: no DICOM series found", file=sys.stderr)
        return 1
    failures = 0
    for group in groups:
        t0 = time.perf_counter()
        outcome = ingest.classify_and_normalize(group, rules)
        label = f"{outcome.series_uid}"
        if outcome.acquisition is None:
            kind = "not MDME" if not outcome.is_mdme else "ERROR"
            if outcome.is_mdme:
                failures += 1
            print(f"{label}: {outcome.vendor or '-'}: {kind}: {outcome.reason}")
            continue
        acq = outcome.acquisition
        try:
            from dicom_node.phantom_cli import process_phantom

            line = process_phantom(outcome, node_settings, out_root, _safe_dirname)
            if line is not None:  # a QC phantom: maps + SEG + SR + phantom_qc.json
                print(f"{label}: {outcome.vendor}: {line}")
                continue
            result = run(acq, proc_settings)
            out = out_root / _safe_dirname(outcome.series_uid)
            try:
                written = _export_series(result, outcome.datasets, out, node_settings)
                what = f"{len(written)} DICOM files"
            except ImportError:
                written = _write_fallback(result, out)
                what = "maps.npz + montage.png"
        except Exception as exc:  # one broken series must not stop the folder
            failures += 1
            print(f"{label}: {outcome.vendor}: ERROR during processing: {exc}")
            continue
        dt = time.perf_counter() - t0
        z, d, e, y, x = acq.signal.shape
        print(
            f"{label}: {outcome.vendor}: grid {z} slices x {d} delays x {e} echoes x {y}x{x}"
            f" ({'magnitude' if acq.is_magnitude else 'real'}), delays from {acq.delay_source}:"
            f" {dt:.1f} s: {what} in {out}"
        )
        for w in result.warnings:
            print(f"    warning: {w}")
    return 1 if failures else 0


def _safe_dirname(uid: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in uid)[:128] or "series"


# --------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from dicom_node.demo import run_demo

    return run_demo(args)


# --------------------------------------------------------------------------- node
def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node import config as cfg_mod
    from dicom_node import service

    settings = cfg_mod.load_settings(args.config)
    return int(service.serve(settings, config_path=args.config) or 0)


def cmd_warmup(args: argparse.Namespace) -> int:
    from dicom_node.workers import warmup_report

    r = warmup_report()
    print(
        f"synthmr warmup: {r['kernels']} numba kernels, {r['compiled']} specializations"
        f" compiled, {r['loaded_from_cache']} loaded from the cache, {r['seconds']:.1f} s;"
        f" cache: {', '.join(r['cache_dirs']) or '-'}"
    )
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from dicom_node import config as cfg_mod

    errors = cfg_mod.check_config(args.config)
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.config or '(embedded defaults)'}: OK")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from dicom_node import push

    files: list[Path] = []
    for p in args.paths:
        path = Path(p)
        files.extend(sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path])
    result = push.send_files(
        files, ae_title=args.called_aet, host=args.host, port=args.port, calling_aet=args.aet
    )
    print(json.dumps(result, default=str))
    return 0 if result.get("failed", 0) == 0 else 1


# --------------------------------------------------------------------------- status / retry
def _open_registry(config_path: str | None) -> tuple[Any, Any]:
    """(Registry, Settings) of the node's spool; SystemExit(1) naming the path if absent.

    Opening does not disturb a running node: SQLite WAL lets readers and one writer coexist.
    """
    from dicom_node import config as cfg_mod
    from dicom_node.registry import Registry

    settings = cfg_mod.load_settings(config_path)
    path = Path(settings.spool.path) / "registry.sqlite3"
    if not path.is_file():
        print(
            f"no node registry at {path}: no node has run with spool.path = "
            f"{settings.spool.path!r} (give the node's configuration with -c CONFIG)",
            file=sys.stderr,
        )
        raise SystemExit(1)
    return Registry(path), settings


def _series_label(paths: list[str]) -> str:
    """'Manufacturer / SeriesDescription' from the first spooled instance (or '-')."""
    import pydicom

    for p in paths[:1]:
        try:
            ds = pydicom.dcmread(
                p, stop_before_pixels=True, specific_tags=["Manufacturer", "SeriesDescription"]
            )
        except Exception:  # removed by retention or unreadable: the table still prints
            return "-"
        parts = [str(ds.get(k, "") or "").strip() for k in ("Manufacturer", "SeriesDescription")]
        return " / ".join(x for x in parts if x) or "-"
    return "-"


def series_timings(timeline: list[tuple[str | None, str, float, str]]) -> dict[str, float]:
    """Seconds from the first instance to the last COMPLETE, processed (job ended) and
    DELIVERED transitions of a series' ``Registry.timeline``."""
    if not timeline:
        return {}
    t0 = timeline[0][2]
    ends = {"EXPORTED", "FAILED", "IGNORED", "QUARANTINED"}
    out: dict[str, float] = {}
    for old, new, at, _ in timeline:
        if new in ("COMPLETE", "QUARANTINED") and old == "RECEIVING":
            out["complete"] = at - t0
        if old == "PROCESSING" and new in ends:
            out["processed"] = at - t0
        if new == "DELIVERED":
            out["delivered"] = at - t0
    return out


def _reason(row: Any) -> str:
    if row.missing:
        more = f" (+{len(row.missing) - 3} more)" if len(row.missing) > 3 else ""
        return f"{row.reason}; missing: {', '.join(row.missing[:3])}{more}"
    return row.reason or ""


def cmd_status(args: argparse.Namespace) -> int:
    reg, _ = _open_registry(args.config)
    try:
        rows = reg.recent_series(args.limit)
        table = []
        for r in rows:
            t = series_timings(reg.timeline(r.series_uid))
            n = f"{r.n_instances}/{r.expected_count}" if r.expected_count else f"{r.n_instances}"
            table.append(
                {
                    "series_uid": r.series_uid,
                    "description": _series_label(reg.instance_paths(r.series_uid)),
                    "state": r.state.value,
                    "instances": n,
                    "calling_ae": r.calling_ae,
                    "received": time.strftime(
                        "%Y-%m-%d %H:%M:%S", time.localtime(r.first_received)
                    ),
                    **{f"{k}_s": round(v, 2) for k, v in t.items()},
                    "dead_letters": reg.dead_outbox_count(r.series_uid),
                    "reason": _reason(r),
                }
            )
    finally:
        reg.close()
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    if not table:
        print("no series received yet")
        return 0

    def sec(row: dict[str, Any], k: str) -> str:
        return f"+{row[k]:.1f}s" if k in row else "-"

    head = (
        f"{'SERIES UID':<64} {'STATE':<11} {'N':>7} {'RECEIVED':<19} {'COMPLETE':>9} "
        f"{'PROCESSED':>9} {'DELIVERED':>9}  FROM / DESCRIPTION / REASON"
    )
    print(head)
    for row in table:
        extra = [f"{row['calling_ae'] or '?'}: {row['description']}"]
        if row["dead_letters"]:
            extra.append(f"{row['dead_letters']} dead letters (synthmr retry --dead-letter)")
        if row["reason"]:
            extra.append(row["reason"])
        print(
            f"{row['series_uid']:<64} {row['state']:<11} {row['instances']:>7} "
            f"{row['received']:<19} {sec(row, 'complete_s'):>9} {sec(row, 'processed_s'):>9} "
            f"{sec(row, 'delivered_s'):>9}  {' | '.join(extra)}"
        )
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from dicom_node import service
    from dicom_node.registry import IllegalTransition

    if not args.series_uid and not args.dead_letter:
        print("retry: give a SERIES_UID, or --dead-letter [SERIES_UID]", file=sys.stderr)
        return 2
    reg, settings = _open_registry(args.config)
    try:
        row = reg.series(args.series_uid) if args.series_uid else None
        if args.series_uid and row is None:
            print(
                f"retry: unknown series UID {args.series_uid!r}: this node's registry has no such"
                " series (`synthmr status` lists the recent ones)",
                file=sys.stderr,
            )
            return 1
        if args.dead_letter:
            n = reg.requeue_dead_outbox(args.series_uid or None)
            where = f" of series {args.series_uid}" if args.series_uid else ""
            print(
                f"retry: {n} dead-letter outbox item(s){where} re-queued; the running node sends"
                " them within its poll interval"
                if n
                else f"retry: no dead-letter outbox items{where}"
            )
            return 0
    finally:
        reg.close()
    try:
        job_id = service.retry_series(settings, args.series_uid)
    except IllegalTransition:
        print(
            f"retry: series {args.series_uid} is {row.state.value}, still in progress: only"
            " FAILED, QUARANTINED, IGNORED, EXPORTED or DELIVERED series can be re-run",
            file=sys.stderr,
        )
        return 1
    print(
        f"retry: series {args.series_uid} ({row.state.value}) re-queued as job {job_id};"
        " a running node picks it up at once (outputs keep their UIDs: PACS replaces them)"
    )
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synthmr", description="Open synthetic-MRI DICOM node.")
    p.add_argument("--version", action="version", version=f"synthmr {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the DICOM node (SCP, workers, outbox, metrics)")
    s.add_argument("--config", "-c", default=None, help="TOML configuration file")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("status", help="table of recent series: state, timings, reason")
    s.add_argument("--config", "-c", default=None, help="the node's TOML configuration")
    s.add_argument("--limit", "-n", type=int, default=20, help="how many series (default 20)")
    s.add_argument("--json", action="store_true", help="JSON instead of a table")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser(
        "retry", help="re-run a FAILED/QUARANTINED/DELIVERED series or resend dead letters"
    )
    s.add_argument("series_uid", nargs="?", default=None, metavar="SERIES_UID")
    s.add_argument(
        "--dead-letter",
        action="store_true",
        help="re-queue dead-letter outbox items (of SERIES_UID, or all) instead of re-running",
    )
    s.add_argument("--config", "-c", default=None, help="the node's TOML configuration")
    s.set_defaults(func=cmd_retry)

    s = sub.add_parser(
        "warmup",
        help="compile every numba kernel into the on-disk cache (run at install / image build)",
    )
    s.set_defaults(func=cmd_warmup)

    s = sub.add_parser("check-config", help="validate a configuration file and explain errors")
    s.add_argument("config", nargs="?", default=None)
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("process", help="process DICOM folders/files offline")
    s.add_argument("input", nargs="+", help="folders (recursive) or files")
    s.add_argument("--out", "-o", required=True, help="output folder (one sub-folder per series)")
    s.add_argument("--config", "-c", default=None, help="TOML configuration file")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_process)

    s = sub.add_parser("simulate", help="write a phantom MDME series in a vendor's DICOM style")
    s.add_argument(
        "--vendor",
        default="ge",
        help="layout: ge, siemens, siemens_xa_enhanced, philips, philips_enhanced",
    )
    s.add_argument("--out", "-o", required=True)
    s.add_argument(
        "--shape", type=_shape, default=(12, 128, 128), help="Z,Y,X (default 12,128,128)"
    )
    s.add_argument("--snr", type=float, default=50.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--magnitude-only", action="store_true")
    s.add_argument("--oblique", action="store_true")
    s.add_argument("--anatomy", default="mni", choices=["mni", "ellipsoid"])
    from dicom_node.phantom_cli import add_qc_parser, add_simulate_arguments

    add_simulate_arguments(s)
    s.set_defaults(func=cmd_simulate)
    add_qc_parser(sub)

    s = sub.add_parser("send", help="C-STORE files to a DICOM node")
    s.add_argument("paths", nargs="+")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--called-aet", default="SYNTHMR")
    s.add_argument("--aet", default="SYNTHMR_SCU")
    s.set_defaults(func=cmd_send)

    s = sub.add_parser(
        "demo",
        help="node + local PACS stand-in on 127.0.0.1: emulated scanner series in, outputs"
        " and a summary out (--offline: in process)",
    )
    s.add_argument("--out", "-o", default="demo_out")
    s.add_argument(
        "--shape", type=_shape, default=(12, 128, 128), help="Z,Y,X (default 12,128,128)"
    )
    s.add_argument("--snr", type=float, default=50.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--vendor", default="ge")
    s.add_argument("--magnitude-only", action="store_true")
    s.add_argument(
        "--offline",
        action="store_true",
        help="no node: process in this process and export to OUT/outputs",
    )
    s.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for delivery (node mode)"
    )
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dicom_node.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"synthmr {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
