"""Folder reading: find DICOM files and group them by series.

::

    groups = read_paths([Path("in/")], progress=True)          # list[SeriesGroup]
    for g in groups:
        series.run_series(g.datasets, settings, series.folder_writer(out))  # or classify

Files that are not DICOM are skipped with a reason (``skipped=`` collects them). Gzip'd
files (``.gz`` or gzip magic) are read transparently. Pixel data of files on disk is read
lazily (pydicom ``defer_size``) so a big folder does not sit in memory twice.
"""

from __future__ import annotations

import gzip
import io
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

__all__ = [
    "SeriesGroup",
    "SkippedFile",
    "read_file",
    "read_paths",
]

_DICOMDIR = "1.2.840.10008.1.3.10"
_DEFER = 16 * 1024  # bytes: larger elements (pixel data) are read on first access


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass
class SeriesGroup:
    """The instances of one SeriesInstanceUID, in the order they were found."""

    series_uid: str
    datasets: list[Dataset] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    @property
    def description(self) -> str:
        ds = self.datasets[0] if self.datasets else None
        return str(ds.get("SeriesDescription", "")) if ds is not None else ""

    def __len__(self) -> int:
        return len(self.datasets)


def _iter_files(paths: Sequence[Path], skipped: list[SkippedFile]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files.extend(Path(root) / n for n in sorted(names))
        elif p.is_file():
            files.append(p)
        else:
            skipped.append(SkippedFile(p, "does not exist"))
    return files


def read_file(path: Path) -> Dataset:
    """Read one DICOM file (gzip'd or not). Raises InvalidDicomError/OSError with a reason."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[:2] == b"\x1f\x8b":
        data = gzip.decompress(path.read_bytes())
        try:
            return dcmread(io.BytesIO(data))
        except InvalidDicomError:
            ds = dcmread(io.BytesIO(data), force=True)
            if "SOPClassUID" not in ds:
                raise InvalidDicomError("gzip'd file is not DICOM") from None
            return ds
    if head[128:132] == b"DICM":
        return dcmread(path, defer_size=_DEFER)
    # no preamble: accept only if it parses into something with a SOP Class
    ds = dcmread(path, force=True, defer_size=_DEFER)
    if "SOPClassUID" not in ds:
        raise InvalidDicomError("not DICOM (no DICM preamble and no SOP Class UID)")
    return ds


def _progress(i: int, n: int, t0: float, final: bool = False) -> None:
    rate = i / max(time.perf_counter() - t0, 1e-9)
    sys.stderr.write(f"\rreading {i}/{n} files ({rate:.0f}/s)" + ("\n" if final else ""))
    sys.stderr.flush()


def read_paths(
    paths: Sequence[Path | str],
    progress: bool = False,
    *,
    skipped: list[SkippedFile] | None = None,
) -> list[SeriesGroup]:
    """Read files and folders (recursively), grouped by SeriesInstanceUID.

    Non-DICOM files, DICOMDIRs and files without a SeriesInstanceUID are skipped; pass a
    list as ``skipped`` to receive them with their reasons. ``progress`` writes a one-line
    counter to stderr.
    """
    skip = skipped if skipped is not None else []
    files = _iter_files([Path(p) for p in paths], skip)
    groups: dict[str, SeriesGroup] = {}
    t0 = time.perf_counter()
    n = len(files)
    for i, path in enumerate(files):
        if progress and (i % 50 == 0):
            _progress(i, n, t0)
        try:
            ds = read_file(path)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            skip.append(SkippedFile(path, f"not readable as DICOM: {exc}"))
            continue
        except Exception as exc:  # a corrupt file must never stop the folder
            skip.append(SkippedFile(path, f"unreadable: {type(exc).__name__}: {exc}"))
            continue
        meta = getattr(ds, "file_meta", None)
        if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR:
            skip.append(SkippedFile(path, "DICOMDIR (a media index, not an image)"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            skip.append(SkippedFile(path, "no SeriesInstanceUID"))
            continue
        g = groups.setdefault(uid, SeriesGroup(uid))
        g.datasets.append(ds)
        g.paths.append(path)
    if progress:
        _progress(n, n, t0, final=True)
    return list(groups.values())
