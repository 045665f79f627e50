"""What the node keeps of every processed series for the web interface and the report.

``<spool>/results/<series>/``:

- ``maps.npz``: T1 (ms), T2 (ms), PD (pu), B1 as float32 ``[z, y, x]`` (0 outside the
  mask), mask and failed voxels, tissue fractions WM/GM/CSF/NON as uint8 (fraction x 255),
  myelin partial volume (%, float16) when modelled. Compressed: a 30 x 256 x 256 series takes
  ~15 MB. The contrast tuner and "send to PACS" synthesize from these maps.
- ``meta.json``: shape, voxel size, affine, volumes, tissue statistics, QC figures, the
  contrasts sent with their timing and window, the per-patient DIR, provenance (software
  version, parameters, model hash), patient/study identity (for the report, never logged).
- ``refs/<z>.dcm``: the reference source header of each slice, without pixels (geometry
  and patient/study modules of outputs made later from the maps; for Enhanced MR sources
  the frame each stands for is ``meta["ref_frames"]``).
- ``thumbs/<name>.png``: the middle slice of every map and contrast, windowed.
- caches the web interface fills: ``t1w_t2w.json`` (ratio medians), ``report-<key>.pdf``/
  ``.png`` (the rendered report), ``tuner_maps.bin`` (the tuner's maps).

Written once per processed series by the pipeline; a re-run overwrites it.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.spool import safe_name
from processing.display import grey8, percentile_window
from processing.results import TISSUES, QuantMaps, SeriesResult

__all__ = [
    "PendingSeries",
    "StoredSeries",
    "load_series",
    "patient_identity",
    "save_series",
    "series_dir",
]

MAP_THUMBS = ("T1", "T2", "PD", "B1", "MYPV")


def series_dir(spool_root: str | Path, series_uid: str) -> Path:
    return Path(spool_root) / "results" / safe_name(series_uid)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 64 else f"array{obj.shape}"
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _age_years(ds: Dataset) -> float | None:
    """PatientAge (``045Y``) or StudyDate - PatientBirthDate, in years."""
    age = str(ds.get("PatientAge", "") or "")
    if len(age) == 4 and age[:3].isdigit():
        unit = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}.get(age[3].upper())
        if unit:
            return int(age[:3]) * unit
    born, when = str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
    if len(born) == 8 and len(when) == 8 and born.isdigit() and when.isdigit():
        from datetime import date

        b = date(int(born[:4]), int(born[4:6]), int(born[6:]))
        w = date(int(when[:4]), int(when[4:6]), int(when[6:]))
        return (w - b).days / 365.25
    return None


def patient_identity(ds: Dataset) -> dict[str, Any]:
    """Patient and study identity of a source header (for pages and the report only)."""
    return {
        "patient_id": str(ds.get("PatientID", "") or ""),
        "patient_name": str(ds.get("PatientName", "") or ""),
        "birth_date": str(ds.get("PatientBirthDate", "") or ""),
        "sex": str(ds.get("PatientSex", "") or "").upper(),
        "age_years": _age_years(ds),
        "study_date": str(ds.get("StudyDate", "") or ""),
        "study_time": str(ds.get("StudyTime", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "series_description": str(ds.get("SeriesDescription", "") or ""),
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
        "model": str(ds.get("ManufacturerModelName", "") or ""),
        "field_strength": float(ds.get("MagneticFieldStrength", 0) or 0) or None,
    }


def _png(gray: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(gray)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _map_volume(result: SeriesResult, name: str) -> np.ndarray | None:
    m = result.maps
    if name == "MYPV":
        return None if result.myelin is None else np.asarray(result.myelin.mypv)
    return {"T1": m.t1_ms, "T2": m.t2_ms, "PD": m.pd_pu, "B1": m.b1}[name]


def _write_npz(
    path: Path,
    arrays: Iterable[tuple[str, Callable[[], np.ndarray]]],
    mode: Literal["w", "a"] = "w",
) -> None:
    """``np.savez_compressed`` of ``{name: make()}``, one array in memory at a time
    (``mode="a"``: added to the arrays already there)."""
    with zipfile.ZipFile(path, mode=mode, compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for name, make in arrays:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(make()), allow_pickle=False)


def save_series(
    spool_root: str | Path,
    series_uid: str,
    result: SeriesResult,
    sources: Sequence[Dataset],
    *,
    reference_images: Sequence[Dataset] | None = None,
) -> Path:
    """Keep the maps, figures, reference headers and thumbnails of a processed series."""
    pending = PendingSeries(spool_root, series_uid, sources, reference_images=reference_images)
    pending.add_maps(result)
    pending.add_segmentation(result)
    return pending.finish(result)


class PendingSeries:
    """:func:`save_series` in steps, as the parts of a result come (the node's job stores
    the maps while its worker segments): :meth:`add_maps` (maps, their thumbnails, the
    reference headers), :meth:`add_segmentation` (fractions, intracranial mask), then
    :meth:`finish` (myelin, the contrasts' thumbnails, meta.json). Everything is written
    into ``<series>.tmp`` and renamed into place by :meth:`finish`: readers never see a
    part (a job that fails leaves the ``.tmp`` folder, which the next run replaces)."""

    def __init__(
        self,
        spool_root: str | Path,
        series_uid: str,
        sources: Sequence[Dataset],
        *,
        reference_images: Sequence[Dataset] | None = None,
    ) -> None:
        self.series_uid, self.sources = series_uid, sources
        self.reference_images = reference_images
        self.final = series_dir(spool_root, series_uid)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.map_thumbs: list[str] = []
        self._mask: np.ndarray | None = None
        self._segmented = False

    def add_maps(self, result: SeriesResult) -> None:
        """Start the folder: the maps, their thumbnails (but MYPV) and the references."""
        tmp = self.tmp
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "refs").mkdir(parents=True)
        (tmp / "thumbs").mkdir()
        maps = result.maps
        mask = self._mask = np.asarray(maps.mask, bool)

        def f32(a: np.ndarray) -> np.ndarray:
            return masked_f32(a, mask)

        # each array is made just before it is written (not all at once: ~250 MB at
        # 40x512x512)
        arrays: list[tuple[str, Callable[[], np.ndarray]]] = [
            ("t1_ms", lambda: f32(maps.t1_ms)),
            ("t2_ms", lambda: f32(maps.t2_ms)),
            ("pd_pu", lambda: f32(maps.pd_pu)),
            ("b1", lambda: f32(maps.b1)),
            ("mask", lambda: mask),
            ("failed", lambda: np.asarray(maps.failed, bool)),
        ]
        _write_npz(tmp / "maps.npz", arrays)
        z = int(result.shape[0]) // 2
        for name in MAP_THUMBS:
            if name != "MYPV":
                self._map_thumb(result, name, z)
        reference_images = self.reference_images
        if reference_images is None:
            from dicom_node.export import reference_images as _refs

            reference_images = self.reference_images = _refs(self.sources)
        for i, ref in enumerate(reference_images):
            hdr = Dataset()
            for elem in ref:
                if elem.tag.group != 0x7FE0:
                    hdr.add(elem)
            # A header without pixels, always explicit VR little endian: the source's
            # transfer syntax may be a compressed one, and an Enhanced MR frame header has
            # no file meta.
            meta_info = FileMetaDataset()
            meta_info.TransferSyntaxUID = ExplicitVRLittleEndian
            meta_info.MediaStorageSOPClassUID = hdr.get("SOPClassUID", "")
            meta_info.MediaStorageSOPInstanceUID = hdr.get("SOPInstanceUID", "")
            hdr.file_meta = meta_info
            pydicom.dcmwrite(tmp / "refs" / f"{i:04d}.dcm", hdr, enforce_file_format=False)

    def add_segmentation(self, result: SeriesResult) -> None:
        """The tissue fractions (uint8, fraction x 255) and the intracranial mask."""
        self._segmented = True
        seg = result.segmentation
        if seg is None:
            return
        arrays: list[tuple[str, Callable[[], np.ndarray]]] = [
            (f"frac_{t}", functools.partial(fraction_u8, seg.fractions[t])) for t in TISSUES
        ]
        arrays.append(("icmask", lambda: np.asarray(seg.icmask, bool)))
        _write_npz(self.tmp / "maps.npz", arrays, mode="a")

    def finish(self, result: SeriesResult) -> Path:
        """The myelin partial volume, the contrasts' thumbnails and meta.json; then the
        folder goes into place (replacing an earlier run's) and its path is returned."""
        if not self._segmented:
            self.add_segmentation(result)
        tmp, maps = self.tmp, result.maps
        if result.myelin is not None:
            mypv = result.myelin.mypv
            _write_npz(tmp / "maps.npz", [("mypv", lambda: np.asarray(mypv, np.float16))], mode="a")
        z = int(result.shape[0]) // 2
        if "MYPV" in MAP_THUMBS:
            self._map_thumb(result, "MYPV", z)
        thumbs = [n for n in MAP_THUMBS if n in self.map_thumbs]
        synthetic: dict[str, Any] = {}
        for name, syn in result.synthetic.items():
            img = np.asarray(syn.image)
            (tmp / "thumbs" / f"{name}.png").write_bytes(
                _png(grey8(img[z], syn.window_center, syn.window_width))
            )
            synthetic[name] = {
                "kind": syn.kind,
                "tr_ms": syn.tr_ms,
                "te_ms": syn.te_ms,
                "ti_ms": syn.ti_ms,
                "ti2_ms": syn.ti2_ms,
                "description": syn.description,
                "window_center": syn.window_center,
                "window_width": syn.window_width,
                "ai_enhanced": syn.ai_enhanced,
            }
        sources, reference_images = self.sources, self.reference_images or []
        ident = patient_identity(sources[0]) if sources else {}
        from dicom_node.export.geometry import frame_number

        meta = {
            "series_uid": self.series_uid,
            # Enhanced MR sources: the frame each refs/<z>.dcm stands for
            # (ReferencedFrameNumber of outputs made later from the maps); None per slice
            # for single-frame sources
            "ref_frames": [frame_number(r) for r in reference_images],
            "shape": list(result.shape),
            "voxel_size_mm": list(result.voxel_size_mm),
            "affine": np.asarray(result.affine, float).tolist(),
            "volumes_ml": _jsonable(result.volumes_ml),
            "tissue_stats": _jsonable(result.tissue_stats),
            "qc": _jsonable(result.qc),
            "dir_parameters": _jsonable(result.dir_parameters),
            "provenance": _jsonable(result.provenance),
            "warnings": list(result.warnings),
            "synthetic": synthetic,
            "map_thumbs": thumbs,
            "thumb_slice": z,
            "patient": ident,
            "noise_sd": _jsonable(float(maps.noise_sd)),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(self.final, ignore_errors=True)
        tmp.rename(self.final)
        return self.final

    def _map_thumb(self, result: SeriesResult, name: str, z: int) -> None:
        vol = _map_volume(result, name)
        if vol is None or self._mask is None:
            return
        c, w = percentile_window(vol, self._mask)
        (self.tmp / "thumbs" / f"{name}.png").write_bytes(_png(grey8(vol[z], c, w)))
        self.map_thumbs.append(name)


def masked_f32(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A map as the store keeps it: float32, NaN -> 0, 0 outside ``mask``."""
    # one copy, zeroed in place (np.where(...).astype(...) made three of the volume)
    out = np.nan_to_num(np.asarray(a, np.float32), copy=True)
    out[~mask] = 0
    return out


def fraction_u8(fraction: np.ndarray) -> np.ndarray:
    """A tissue fraction as the store keeps it: uint8, fraction x 255."""
    frac = np.asarray(fraction, np.float32)
    return np.rint(np.clip(frac, 0, 1) * 255).astype(np.uint8)


@dataclass
class StoredSeries:
    """A stored series: ``meta`` (dict of meta.json) and lazy arrays."""

    path: Path
    meta: dict[str, Any]

    def arrays(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The stored arrays, or only those of ``names`` that exist (each one is inflated
        from the npz: at 40x512x512 all of them are ~260 MB)."""
        with np.load(self.path / "maps.npz") as z:
            return {k: z[k] for k in z.files if names is None or k in names}

    def quant_maps(self) -> QuantMaps:
        a = self.arrays(("t1_ms", "t2_ms", "pd_pu", "b1", "mask", "failed"))
        zeros = np.zeros_like(a["t1_ms"])
        return QuantMaps(
            t1_ms=a["t1_ms"],
            t2_ms=a["t2_ms"],
            pd_pu=a["pd_pu"],
            b1=a["b1"],
            m0=zeros,
            residual=zeros,
            mask=a["mask"],
            failed=a["failed"],
        )

    def references(self) -> list[Dataset]:
        """The reference header of each slice, with its source frame number (Enhanced MR)."""
        from dicom_node.export.geometry import with_frame_number

        refs = [pydicom.dcmread(p, force=True) for p in sorted((self.path / "refs").glob("*.dcm"))]
        frames = self.meta.get("ref_frames") or [None] * len(refs)
        return [with_frame_number(r, n) for r, n in zip(refs, frames, strict=False)]

    def thumb(self, name: str) -> Path | None:
        p = self.path / "thumbs" / f"{name}.png"
        return p if p.is_file() and p.parent == self.path / "thumbs" else None


def load_series(spool_root: str | Path, series_uid: str) -> StoredSeries | None:
    d = series_dir(spool_root, series_uid)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return StoredSeries(d, meta)
