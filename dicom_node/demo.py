"""``synthmr demo``: the whole product on one machine, with no configuration.

Default (node round trip): a local PACS stand-in (:class:`PacsStandIn`, a pynetdicom storage
SCP writing to ``OUT/pacs``) and a :class:`dicom_node.service.Node` start on 127.0.0.1 free
ports with a fresh spool in ``OUT/spool``; an emulated scanner series (phantom -> vendor
DICOM) goes to the node by C-STORE; the outputs are shown as they land in the stand-in;
then the node's timeline and stage timings, the median T1/T2/PD per tissue read back from
the received Parametric Maps against the phantom's truth, the volumes from the received
SR, the fit QC the node reported, and a PNG montage of the received images. Everything
started is stopped at the end.

``--offline``: the same science in this process without the network (phantom -> DICOM ->
normalize -> process -> export to ``OUT/outputs``), with volumes compared to the truth.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_node import emulator, ingest, push, series
from dicom_node.config import load_settings
from dicom_node.logging import JsonFormatter
from dicom_node.metrics import STAGES
from dicom_node.registry import State, series_timings
from dicom_node.service import Node
from dicom_node.spool import safe_name
from processing import fit
from processing.montage import MAP_DISPLAY_RANGES, encode_png, tile, window
from processing.phantom import make_phantom


def _median_on(mask: np.ndarray, arr: np.ndarray) -> float:
    vals = arr[mask]
    return float(np.median(vals)) if vals.size else float("nan")


def run_demo(args: argparse.Namespace) -> int:
    """``synthmr demo``: the node round trip, or the in-process path with ``--offline``."""
    if getattr(args, "offline", False):
        return run_offline(args)
    return run_with_node(args)


def run_offline(args: argparse.Namespace) -> int:
    """Phantom -> vendor DICOM -> :func:`dicom_node.series.run_series` (the path of the node
    and of ``synthmr process``) -> ``OUT/outputs``, with the fit and volumes against truth."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    fit.warmup()
    timings["numba warm-up"] = time.perf_counter() - t

    t = time.perf_counter()
    ph = make_phantom(args.shape, seed=args.seed, snr=args.snr)
    timings["phantom"] = time.perf_counter() - t

    t = time.perf_counter()
    src_dir = out / "scanner"
    emulator.write_series(
        ph.acq, args.vendor, src_dir, with_phase=not args.magnitude_only, seed=args.seed
    )
    timings["emulate scanner DICOM"] = time.perf_counter() - t

    t = time.perf_counter()
    groups = ingest.read_paths([src_dir], progress=False)
    timings["read DICOM"] = time.perf_counter() - t
    outcome = series.run_series(
        groups[0].datasets, load_settings(None, env={}), series.folder_writer(out / "outputs")
    )
    if outcome.result is None:
        print(f"demo: the series ended {outcome.state.value}: {outcome.reason}")
        return 1
    result = outcome.result
    for k in ("normalize", "process", "export"):
        timings[k] = outcome.timings_s.get(k, float("nan"))
        if k == "process":
            for sub, v in result.timings_s.items():
                timings[f"  {sub}"] = v
    exported = f"{len(outcome.outputs)} DICOM files in {out / 'outputs'}"
    (out / "montage.png").write_bytes((out / "outputs" / "montage.png").read_bytes())

    acq = ph.acq
    print(
        f"synthmr demo: phantom {args.shape[0]}x{args.shape[1]}x{args.shape[2]}, SNR {args.snr:g},"
    )
    print(f"  vendor layout {args.vendor!r}: {outcome.summary}")
    print()
    print(f"{'stage':<28}{'seconds':>10}")
    for k, v in timings.items():
        print(f"{k:<28}{v:>10.2f}")
    print()
    _print_offline_results(ph.truth, acq, result)
    if outcome.state != State.EXPORTED:
        print(f"demo: the series ended {outcome.state.value}: {outcome.reason}")
        return 1
    print(f"outputs: {exported}; montage: {out / 'montage.png'}")
    return 0


def _print_offline_results(truth: Any, acq: Any, result: Any) -> None:
    """Fitted T1/T2/PD per tissue and volumes against the phantom's truth, DIR, QC."""
    maps = result.maps
    print(
        f"{'tissue':<8}{'T1 fit':>9}{'T1 true':>9}{'T2 fit':>9}{'T2 true':>9}"
        f"{'PD fit':>9}{'PD true':>9}{'voxels':>9}"
    )
    for tissue in ("WM", "GM", "CSF"):
        pure = (truth.fractions[tissue] >= 0.95) & maps.mask
        p = truth.tissues[tissue]
        print(
            f"{tissue:<8}{_median_on(pure, maps.t1_ms):>9.0f}{p.t1_ms:>9.0f}"
            f"{_median_on(pure, maps.t2_ms):>9.1f}{p.t2_ms:>9.1f}"
            f"{_median_on(pure, maps.pd_pu):>9.1f}{p.pd_pu:>9.1f}{int(pure.sum()):>9d}"
        )
    print()
    if result.volumes_ml:
        tv = true_volumes(truth, acq)
        print(f"{'volume':<8}{'measured':>10}{'truth':>10}")
        for k in ("WM", "GM", "CSF", "NON", "BPV", "ICV", "MYELIN"):
            if k in result.volumes_ml:
                true_s = f"{tv[k]:>10.1f}" if k in tv else f"{'-':>10}"
                print(f"{k + ' mL':<8}{result.volumes_ml[k]:>10.1f}{true_s}")
        if "BPF" in result.volumes_ml:
            print(f"{'BPF':<8}{result.volumes_ml['BPF']:>10.3f}{tv['BPV'] / tv['ICV']:>10.3f}")
        print()
    if result.dir_parameters:
        print("per-patient DIR:", ", ".join(f"{k}={v}" for k, v in result.dir_parameters.items()))
    if result.qc:
        print("QC:", ", ".join(f"{k}={v}" for k, v in result.qc.items() if not isinstance(v, dict)))
    for w in result.warnings:
        print("warning:", w)


def _meaning(item: Any) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeMeaning) if seq else ""


def true_volumes(truth: Any, acq: Any) -> dict[str, float]:
    """Phantom truth in mL under the node's names: WM, GM, CSF, NON (lesion), BPV, ICV."""
    vox_ml = acq.voxel_volume_ml
    v = {t: float(truth.fractions[t].sum() * vox_ml) for t in truth.fractions}
    tv = {"WM": v.get("WM", 0.0), "GM": v.get("GM", 0.0), "CSF": v.get("CSF", 0.0)}
    tv["NON"] = v.get("LESION", 0.0)
    tv["BPV"] = tv["WM"] + tv["GM"] + tv["NON"]
    tv["ICV"] = tv["BPV"] + tv["CSF"]
    return tv


_SR_NAMES = {"Intracranial volume": "ICV", "Brain parenchymal volume": "BPV"}


# --------------------------------------------------------------------------- PACS stand-in
@dataclass(frozen=True)
class Received:
    """One instance the stand-in stored."""

    at: float
    series_uid: str
    kind: str  # SOP class name, e.g. "Parametric Map Storage"
    description: str
    path: Path


class PacsStandIn:
    """A small storage SCP (every storage SOP class, common transfer syntaxes) writing
    each received instance to ``folder/<series uid>/<sop uid>.dcm``. 127.0.0.1 only."""

    def __init__(self, folder: Path, ae_title: str = "DEMO_PACS") -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:  # incl. Parametric Map, SEG, SR
            self._ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._server: Any = None

    def start(self) -> PacsStandIn:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._server = self._ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        series = str(ds.SeriesInstanceUID)
        path = self.folder / safe_name(series) / f"{safe_name(str(ds.SOPInstanceUID))}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        item = Received(
            time.time(),
            series,
            ds.SOPClassUID.name,
            str(ds.get("SeriesDescription", "")),
            path,
        )
        with self._lock:
            self.received.append(item)
        return 0x0000

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)


def outputs_by_series(items: list[Received]) -> dict[str, tuple[str, str, int]]:
    """Received instances grouped by series: uid -> (kind, description, count)."""
    out: dict[str, tuple[str, str, int]] = {}
    for r in items:
        kind, desc, n = out.get(r.series_uid, (r.kind, r.description, 0))
        out[r.series_uid] = (kind, desc, n + 1)
    return out


# --------------------------------------------------------------------------- reading back
def _frames_to_volume(ds: Any, acq: Any) -> np.ndarray:
    """A multi-frame map -> float32 [z, y, x] in the acquisition's slice order (frames are
    matched to slices by their position along the acquisition's slice axis)."""
    px = np.asarray(ds.pixel_array, dtype=np.float32).reshape(-1, int(ds.Rows), int(ds.Columns))
    z = acq.signal.shape[0]
    origin, sdir = acq.affine[:3, 3], acq.affine[:3, 2]
    vol = np.full((z, px.shape[1], px.shape[2]), np.nan, np.float32)
    for i, f in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pos = np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        k = round(float(np.dot(pos - origin, sdir) / np.dot(sdir, sdir)))
        if 0 <= k < z:
            vol[k] = px[i]
    return vol


def received_maps(items: list[Received], acq: Any) -> dict[str, np.ndarray]:
    """T1/T2/PD/B1 volumes from the received Parametric Maps, keyed by map kind."""
    maps: dict[str, np.ndarray] = {}
    for r in items:
        if r.kind != "Parametric Map Storage":
            continue
        words = r.description.split()
        kind = words[1] if len(words) > 1 else r.description
        maps[kind] = _frames_to_volume(pydicom.dcmread(r.path), acq)
    return maps


def sr_volumes(items: list[Received]) -> list[tuple[str, float, str]]:
    """(concept, value, unit) of every numeric SR item in mL from the received SR."""
    found: list[tuple[str, float, str]] = []

    def walk(seq: Any, group: str) -> None:
        # a measurement group names its tissue in its Tracking Identifier ("synthmr WM")
        for it in seq:
            if it.get("ValueType") == "TEXT" and _meaning(it) == "Tracking Identifier":
                group = str(it.TextValue).replace("synthmr", "").strip()
        for it in seq:
            name = _meaning(it)
            if it.get("ValueType") == "NUM" and "MeasuredValueSequence" in it:
                mv = it.MeasuredValueSequence[0]
                unit = str(mv.MeasurementUnitsCodeSequence[0].CodeValue)
                if unit.lower() == "ml":
                    found.append(
                        (group if name == "Volume" else name, float(mv.NumericValue), unit)
                    )
            elif "ContentSequence" in it:
                walk(it.ContentSequence, group)

    for r in items:
        if "SR" in r.kind or "Report" in r.kind:
            walk(pydicom.dcmread(r.path).get("ContentSequence", []), "")
    return found


def received_montage(items: list[Received], acq: Any, maps: dict[str, np.ndarray]) -> bytes:
    """Middle slice of every received map and synthetic MR series, 4 columns."""
    z = acq.signal.shape[0] // 2
    ranges = {k: MAP_DISPLAY_RANGES[k] for k in ("T1", "T2", "PD", "B1")}
    tiles = [window(np.nan_to_num(maps[k][z]), *ranges[k]) for k in ranges if k in maps]
    labels = [f"{k} MAP" for k in ranges if k in maps]
    by_series: dict[str, list[Received]] = defaultdict(list)
    for r in items:
        if r.kind == "MR Image Storage":
            by_series[r.series_uid].append(r)
    for uid in sorted(by_series, key=lambda s: by_series[s][0].description):
        dss = [pydicom.dcmread(r.path) for r in by_series[uid]]
        dss.sort(key=lambda d: int(d.get("InstanceNumber", 0) or 0))
        ds = dss[min(z, len(dss) - 1)]
        img = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(
            ds.get("RescaleIntercept", 0) or 0
        )
        c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
        if c is not None and w is not None:
            c = float(c[0] if isinstance(c, pydicom.multival.MultiValue) else c)
            w = float(w[0] if isinstance(w, pydicom.multival.MultiValue) else w)
            tiles.append(window(img, c - w / 2, c + w / 2))
        else:
            tiles.append(window(img))
        labels.append(str(ds.get("SeriesDescription", "")).replace("SYNTHETIC ", ""))
    return encode_png(tile(tiles, columns=4, labels=labels))


# --------------------------------------------------------------------------- node round trip
def _node_config(out: Path, pacs_port: int) -> Path:
    text = f"""[node]
ae_title = "SYNTHMR"
bind_address = "127.0.0.1"
port = 0
[spool]
path = "{out / "spool"}"
min_free_bytes = 0
[completion]
quiet_period_s = 2.0
[metrics]
address = "127.0.0.1"
port = 0
[retry]
base_delay_s = 1.0
[[destinations]]
name = "demo_pacs"
ae_title = "DEMO_PACS"
host = "127.0.0.1"
port = {pacs_port}
timeout_s = 30.0
"""
    path = out / "node.toml"
    path.write_text(text)
    return path


@dataclass
class _NodeRun:
    """What the node round trip measured, for the report."""

    series_uid: str
    n_inputs: int
    timeline: dict[str, float]
    stage_s: dict[str, float | None]
    qc: dict[str, float]
    qc_status: list[str]


def _node_log_to_file(path: Path) -> tuple[logging.Handler, int]:
    """The node's JSON log lines go to a file: the terminal shows the story."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(JsonFormatter())
    node_logger = logging.getLogger("synthmr")
    node_logger.addHandler(handler)
    old_level = node_logger.level
    node_logger.setLevel(logging.INFO)
    return handler, old_level


def _send_scanner_series(args: argparse.Namespace, out: Path) -> tuple[Any, list[Path]]:
    """Phantom -> vendor DICOM files -> C-STORE to the node; (phantom, files)."""
    ph = make_phantom(args.shape, seed=args.seed, snr=args.snr)
    files = emulator.write_series(
        ph.acq, args.vendor, out / "scanner", with_phase=not args.magnitude_only, seed=args.seed
    )
    z, d, e, y, x = ph.acq.signal.shape
    print(
        f"scanner: {len(files)} {args.vendor!r} instances (phantom {z}x{y}x{x}, {d} delays x "
        f"{e} echoes, SNR {args.snr:g}, "
        f"{'magnitude' if args.magnitude_only else 'magnitude+phase'})"
    )
    return ph, files


def _watch_delivery(node: Any, pacs: PacsStandIn, series_uid: str, t_sent: float, timeout: float):
    """Print outputs as they land in the stand-in until the series reaches a final state;
    return the registry row (None on timeout)."""
    shown: dict[str, int] = {}
    end = time.time() + timeout
    while True:
        row = node.registry.series(series_uid)
        state = row.state if row is not None else None
        for uid, (kind, desc, n) in outputs_by_series(pacs.snapshot()).items():
            if shown.get(uid) != n:
                shown[uid] = n
                print(f"  +{time.time() - t_sent:6.1f} s  {n:>4} x {kind:<32} {desc}")
        if state in (State.DELIVERED, State.FAILED, State.QUARANTINED, State.IGNORED, State.HELD):
            return row
        if time.time() > end:
            print(f"demo: the series is still {state} after {timeout:g} s")
            return None
        time.sleep(0.2)


def _node_figures(node: Any, series_uid: str) -> _NodeRun:
    """Timeline, stage seconds and QC of the series, from the node's registry and metrics."""
    families = list(node.metrics.registry.collect())
    return _NodeRun(
        series_uid=series_uid,
        n_inputs=len(node.registry.instance_paths(series_uid)),
        timeline=series_timings(node.registry.timeline(series_uid)),
        stage_s={
            st: node.metrics.registry.get_sample_value(
                "synthmr_stage_duration_seconds_sum", {"stage": st}
            )
            for st in STAGES
        },
        qc={
            s.labels["figure"]: s.value
            for f in families
            if f.name == "synthmr_fit_qc"
            for s in f.samples
        },
        qc_status=[
            s.labels["status"]
            for f in families
            if f.name == "synthmr_qc_status"
            for s in f.samples
            if s.name.endswith("_total") and s.value > 0
        ],
    )


def run_with_node(args: argparse.Namespace) -> int:
    """The node round trip: PACS stand-in + node, scanner series in, outputs and report."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("spool", "pacs", "scanner"):  # a fresh run: this demo's own sub-folders only
        shutil.rmtree(out / sub, ignore_errors=True)
    timeout = float(getattr(args, "timeout", 600.0))
    timings: dict[str, float] = {}
    handler, old_level = _node_log_to_file(out / "node.log")
    pacs = node = None
    try:
        t = time.perf_counter()
        pacs = PacsStandIn(out / "pacs").start()
        node = Node(load_settings(_node_config(out, pacs.port), env={})).start()
        # A scanner sends when the node is ready (/readyz): its workers have loaded their
        # numba kernels, so the series' "process" is not a compile (46 s on an empty cache).
        while not node.workers.warm and time.perf_counter() - t < timeout:
            time.sleep(0.1)
        timings["start PACS stand-in + node (warm)"] = time.perf_counter() - t
        print(
            f"synthmr demo: node SYNTHMR on 127.0.0.1:{node.port} (metrics "
            f"http://127.0.0.1:{node.metrics_port}/metrics), PACS stand-in DEMO_PACS on "
            f"127.0.0.1:{pacs.port} -> {out / 'pacs'}"
        )
        t = time.perf_counter()
        ph, files = _send_scanner_series(args, out)
        timings["phantom + scanner DICOM"] = time.perf_counter() - t
        t = time.perf_counter()
        sent = push.send_files(
            files, ae_title="SYNTHMR", host="127.0.0.1", port=node.port, calling_aet="DEMO_MR"
        )
        t_sent = time.time()
        timings["C-STORE scanner -> node"] = time.perf_counter() - t
        if sent["failed"]:
            first = next(r for r in sent["results"] if r["error"])
            print(f"demo: {sent['failed']} instances were not accepted: {first['error']}")
            return 1
        print(f"sent {sent['sent']} instances to the node; outputs arriving in the PACS:")
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        row = _watch_delivery(node, pacs, series_uid, t_sent, timeout)
        if row is None:
            print(f"see {out / 'node.log'}")
            return 1
        if row.state != State.DELIVERED:
            print(f"demo: the node ended the series {row.state}: {row.reason}")
            return 1
        figures = _node_figures(node, series_uid)
    finally:
        if node is not None:
            node.stop()
        if pacs is not None:
            pacs.stop()
        logging.getLogger("synthmr").removeHandler(handler)
        logging.getLogger("synthmr").setLevel(old_level)
        handler.close()
    _print_node_report(out, pacs.snapshot(), timings, figures, ph)
    return 0


def _print_node_report(
    out: Path, items: list[Received], timings: dict[str, float], figures: _NodeRun, ph: Any
) -> None:
    """What the PACS received, stage seconds, fitted values and volumes read back from the
    received objects against the phantom's truth, QC, and the montage."""
    acq = ph.acq
    by_kind: dict[str, int] = defaultdict(int)
    for r in items:
        by_kind[r.kind] += 1
    print()
    print(f"{'received by the PACS':<36}{'instances':>10}")
    for kind, n in sorted(by_kind.items()):
        print(f"{kind:<36}{n:>10}")
    print(f"{'total':<36}{len(items):>10}  (from {figures.n_inputs} scanner instances)")
    print()
    print(f"{'stage':<36}{'seconds':>10}")
    for k, v in timings.items():
        print(f"{k:<36}{v:>10.2f}")
    for k in ("complete", "processed", "delivered"):
        if k in figures.timeline:
            print(f"{'node: first instance -> ' + k:<36}{figures.timeline[k]:>10.2f}")
    for st, v in figures.stage_s.items():
        if v:
            print(f"{'  node stage ' + st:<36}{v:>10.2f}")
    print()
    maps = received_maps(items, acq)
    truth = ph.truth
    if {"T1", "T2", "PD"} <= set(maps):
        print("fitted values read back from the received Parametric Maps, median per tissue:")
        print(
            f"{'tissue':<8}{'T1 fit':>9}{'T1 true':>9}{'T2 fit':>9}{'T2 true':>9}"
            f"{'PD fit':>9}{'PD true':>9}{'voxels':>9}"
        )
        ok = np.isfinite(maps["T1"]) & (maps["T1"] > 0)
        for tissue in ("WM", "GM", "CSF"):
            pure = (truth.fractions[tissue] >= 0.95) & ok
            p = truth.tissues[tissue]
            print(
                f"{tissue:<8}{_median_on(pure, maps['T1']):>9.0f}{p.t1_ms:>9.0f}"
                f"{_median_on(pure, maps['T2']):>9.1f}{p.t2_ms:>9.1f}"
                f"{_median_on(pure, maps['PD']):>9.1f}{p.pd_pu:>9.1f}{int(pure.sum()):>9d}"
            )
        print()
    vols = sr_volumes(items)
    if vols:
        true_ml = true_volumes(truth, acq)
        print(f"{'volume read back from the SR':<36}{'mL':>10}{'truth':>10}")
        for name, v, _ in vols:
            key = _SR_NAMES.get(name, name)
            tv = f"{true_ml[key]:>10.1f}" if key in true_ml else f"{'-':>10}"
            print(f"{name[:36]:<36}{v:>10.1f}{tv}")
        print()
    if figures.qc or figures.qc_status:
        figs = ", ".join(f"{k}={v:.3g}" for k, v in sorted(figures.qc.items()))
        print(f"QC: status={'/'.join(figures.qc_status) or '-'}, {figs}")
    montage = out / "montage.png"
    montage.write_bytes(received_montage(items, acq, maps))
    print(f"outputs: {len(items)} DICOM files in {out / 'pacs'}; montage: {montage}")
    print(f"node log (JSON lines): {out / 'node.log'}; node spool: {out / 'spool'}")
