"""``synthmr`` command line: serve | status | retry | process | simulate | send | demo |
check-config."""

from __future__ import annotations

import argparse
import json
import os
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


# --------------------------------------------------------------------------- simulate
def cmd_simulate(args: argparse.Namespace) -> int:
    from dicom_node import emulator
    from processing.phantom import make_phantom

    if getattr(args, "sequence", "mdme") == "qalas":
        return _simulate_qalas(args)
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


def _simulate_qalas(args: argparse.Namespace) -> int:
    from dicom_node.qalas_emulator import QALAS_LAYOUTS, write_qalas_series
    from processing.qalas_phantom import make_qalas_phantom

    if args.vendor not in QALAS_LAYOUTS:
        print(
            f"simulate: unknown QALAS layout {args.vendor!r}; choose one of "
            f"{', '.join(QALAS_LAYOUTS)}",
            file=sys.stderr,
        )
        return 2
    ph = make_qalas_phantom(
        args.shape, seed=args.seed, snr=args.snr, magnitude=True, oblique=args.oblique,
        anatomy=args.anatomy,
    )  # fmt: skip
    out = Path(args.out)
    if getattr(args, "b1_map", None) and args.b1_map_voxel <= 0:
        print("simulate: --b1-map-voxel must be > 0", file=sys.stderr)
        return 2
    paths = write_qalas_series(ph.acq, args.vendor, out, seed=args.seed)
    print(
        f"simulate: wrote {len(paths)} files (3D-QALAS, {args.vendor}, magnitude, "
        f"grid {ph.acq.signal.shape}, voxel {ph.acq.voxel_size_mm} mm) to {out}"
    )
    b1_vendor = getattr(args, "b1_map", None)
    if b1_vendor:
        _simulate_b1_map(ph, args, b1_vendor, paths[0], out / "b1map")
    return 0


def _simulate_b1_map(ph: Any, args: argparse.Namespace, vendor: str, qalas_file: Path,
                     out: Path) -> None:  # fmt: skip
    """The B1-map series of the QALAS phantom's study, on a coarse oblique grid."""
    import pydicom

    from dicom_node.qalas_emulator import (
        b1_map_grid,
        make_b1_map_datasets,
        write_b1_map_series,
    )
    from processing.phantom import b1_field_on_grid

    if vendor == "auto":
        vendor = {"ge": "ge", "siemens": "siemens"}.get(args.vendor, "philips")
    import numpy as np

    ref = pydicom.dcmread(qalas_file, stop_before_pixels=True)
    shape, affine = b1_map_grid(ph.acq, voxel_mm=args.b1_map_voxel)
    values = b1_field_on_grid(ph.truth, np.asarray(ph.acq.affine), shape, affine)
    datasets = make_b1_map_datasets(
        values, affine, vendor,
        study={"StudyInstanceUID": str(ref.StudyInstanceUID)},
        frame_of_reference_uid=str(ref.FrameOfReferenceUID), seed=args.seed,
    )  # fmt: skip
    paths = write_b1_map_series(datasets, out)
    print(
        f"simulate: wrote {len(paths)} files (B1 map, {vendor} convention, grid {shape},"
        f" {args.b1_map_voxel:g} mm oblique) to {out}"
    )


# --------------------------------------------------------------------------- process
def _process_line(uid: str, outcome: Any, seconds: float, out: Path) -> str:
    """One line per series: what it was, what became of it, where its outputs are."""
    from dicom_node.registry import State

    head = f"{uid}: {outcome.vendor or '-'}"
    if outcome.state == State.IGNORED:
        return f"{head}: not MDME (IGNORED): {outcome.reason}"
    if outcome.state in (State.QUARANTINED, State.FAILED):
        return f"{head}: ERROR ({outcome.state.value}): {outcome.reason}"
    what = f"{len(outcome.outputs)} DICOM files in {out}"
    if outcome.state == State.HELD:
        return (
            f"{head}: {outcome.summary}: {seconds:.1f} s: HELD: {outcome.reason.split('; ')[0]}"
            f"; {what}: not for delivery"
        )
    return f"{head}: {outcome.summary}: {seconds:.1f} s: {what}"


def cmd_process(args: argparse.Namespace) -> int:
    """Every series under the inputs through :func:`dicom_node.series.run_series`.

    Exit status 1 when any MDME series was quarantined, failed or held (QC fail)."""
    from dicom_node import config as cfg_mod
    from dicom_node import ingest, series
    from dicom_node.registry import State

    settings = cfg_mod.load_settings(args.config)
    out_root = Path(args.out)
    groups = ingest.read_paths([Path(p) for p in args.input], progress=not args.no_progress)
    if not groups:
        print("process: no DICOM series found", file=sys.stderr)
        return 1
    failures = 0
    for group in groups:
        t0 = time.perf_counter()
        out = out_root / _safe_dirname(group.series_uid)
        outcome = series.run_series(
            group.datasets, settings, series.folder_writer(out), series_uid=group.series_uid
        )
        if outcome.state not in (State.IGNORED, State.EXPORTED):
            failures += 1
        print(_process_line(group.series_uid, outcome, time.perf_counter() - t0, out))
        if outcome.phantom_qc is not None:  # a QC phantom: its numbers beside the outputs
            from dicom_node.phantom_node import write_phantom_json

            print(
                f"    phantom QC: {write_phantom_json(out / 'phantom_qc.json', outcome.phantom_qc)}"
            )
        if outcome.state == State.EXPORTED and outcome.qc_status == "fail":
            print(f"    {outcome.reason}")
        for w in outcome.warnings:
            print(f"    warning: {w}")
    return 1 if failures else 0


def _safe_dirname(uid: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in uid)[:128] or "series"


# --------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from dicom_node.demo import run_demo

    return run_demo(args)


# --------------------------------------------------------------------------- node
def _no_numpy_hugepages() -> None:
    """Stop numpy asking for transparent huge pages (madvise) on every array >= 4 MB, in the
    node and in the workers it spawns (the environment variable is read at numpy's import).

    With THP in ``madvise`` mode and a page cache that fragments memory (a node that spools
    files), each first touch of such an array can wait for the kernel to compact memory:
    measured here, the first fill of normalization's 2 x 63 MB grid took 0.5-1.0 s CPU
    instead of 0.06 s, and a worker's 30 x 256 x 256 job 0.3-0.9 s of system time instead
    of < 0.2 s (user time unchanged). ``NUMPY_MADVISE_HUGEPAGE=1`` in the environment keeps
    numpy's default."""
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    if os.environ["NUMPY_MADVISE_HUGEPAGE"] == "0" and "numpy" in sys.modules:
        np = sys.modules["numpy"]
        (getattr(np, "_core", None) or np.core).multiarray._set_madvise_hugepage(False)


def cmd_serve(args: argparse.Namespace) -> int:
    _no_numpy_hugepages()
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


def cmd_hash_password(args: argparse.Namespace) -> int:
    """A scrypt hash for ``[[web.users]] password_hash`` (password from stdin, not argv)."""
    import getpass

    from dicom_node.web.settings import hash_password

    if sys.stdin.isatty():
        pw = getpass.getpass("password: ")
        if pw != getpass.getpass("again: "):
            print("error: the two passwords differ", file=sys.stderr)
            return 1
    else:
        pw = sys.stdin.readline().rstrip("\n")
    if len(pw) < 8:
        print("error: use at least 8 characters", file=sys.stderr)
        return 1
    print(hash_password(pw))
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


def _reason(row: Any) -> str:
    if row.missing:
        more = f" (+{len(row.missing) - 3} more)" if len(row.missing) > 3 else ""
        return f"{row.reason}; missing: {', '.join(row.missing[:3])}{more}"
    return row.reason or ""


def cmd_status(args: argparse.Namespace) -> int:
    from dicom_node.registry import series_timings

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
    if args.release and not args.series_uid:
        print("retry: --release needs the SERIES_UID of a HELD series", file=sys.stderr)
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
        if args.release:
            return _release(reg, row)
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
            " FAILED, QUARANTINED, IGNORED, HELD, EXPORTED or DELIVERED series can be re-run",
            file=sys.stderr,
        )
        return 1
    print(
        f"retry: series {args.series_uid} ({row.state.value}) re-queued as job {job_id};"
        " a running node picks it up at once (outputs keep their UIDs: PACS replaces them)"
    )
    return 0


def _release(reg: Any, row: Any) -> int:
    """``synthmr retry --release``: send the held outputs of a QC-failed series as they are."""
    from dicom_node.registry import IllegalTransition

    try:
        n = reg.release_held(row.series_uid)
    except IllegalTransition:
        print(
            f"retry: series {row.series_uid} is {row.state.value}, not HELD: nothing to release",
            file=sys.stderr,
        )
        return 1
    print(
        f"retry: series {row.series_uid} released: {n} held outbox item(s) queued; the running"
        " node sends them within its poll interval"
    )
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synthmr", description="Open synthetic-MRI DICOM node.")
    p.add_argument("--version", action="version", version=f"synthmr {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_node_commands(sub)
    _add_offline_commands(sub)
    return p


def _add_node_commands(sub: Any) -> None:
    """serve, status, retry, warmup, hash-password, check-config: running and operating a node."""
    s = sub.add_parser("serve", help="run the DICOM node (SCP, workers, outbox, metrics)")
    s.add_argument("--config", "-c", default=None, help="TOML configuration file")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("status", help="table of recent series: state, timings, reason")
    s.add_argument("--config", "-c", default=None, help="the node's TOML configuration")
    s.add_argument("--limit", "-n", type=int, default=20, help="how many series (default 20)")
    s.add_argument("--json", action="store_true", help="JSON instead of a table")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser(
        "retry",
        help="re-run a FAILED/QUARANTINED/HELD/DELIVERED series, release a HELD one, or resend"
        " dead letters",
    )
    s.add_argument("series_uid", nargs="?", default=None, metavar="SERIES_UID")
    s.add_argument(
        "--dead-letter",
        action="store_true",
        help="re-queue dead-letter outbox items (of SERIES_UID, or all) instead of re-running",
    )
    s.add_argument(
        "--release",
        action="store_true",
        help="send the held outputs of a HELD (QC fail) series as they are, instead of re-running",
    )
    s.add_argument("--config", "-c", default=None, help="the node's TOML configuration")
    s.set_defaults(func=cmd_retry)

    s = sub.add_parser(
        "warmup",
        help="compile every numba kernel into the on-disk cache (run at install / image build)",
    )
    s.set_defaults(func=cmd_warmup)

    s = sub.add_parser(
        "hash-password", help="scrypt hash of a web user's password (read from stdin)"
    )
    s.set_defaults(func=cmd_hash_password)

    s = sub.add_parser("check-config", help="validate a configuration file and explain errors")
    s.add_argument("config", nargs="?", default=None)
    s.set_defaults(func=cmd_check_config)


def _add_offline_commands(sub: Any) -> None:
    """process, simulate, qc, send, demo: work without a running node."""
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
    s.add_argument(
        "--sequence",
        default="mdme",
        choices=["mdme", "qalas"],
        help="mdme (2D MAGiC/QRAPMASTER) or qalas (3D-QALAS; vendors ge, siemens, "
        "philips, philips_enhanced)",
    )
    s.add_argument(
        "--b1-map",
        nargs="?",
        const="auto",
        default=None,
        choices=["auto", "siemens", "philips", "ge", "unknown"],
        help="qalas: also write the study's B1-map series (in OUT/b1map) in a vendor's "
        "convention (default: the QALAS vendor's; 'unknown': a unit the node must refuse)",
    )
    s.add_argument(
        "--b1-map-voxel", type=float, default=6.0, help="B1-map voxel size, mm (default 6)"
    )
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
