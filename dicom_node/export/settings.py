"""Export settings (the ``[export]`` TOML table, typed) and the enums they use.

Light on purpose: :mod:`dicom_node.config` types ``[export]`` with these classes at load.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

from pydicom.uid import PYDICOM_ROOT_UID

__all__ = [
    "ALL_MAPS",
    "PRIVATE_CREATOR",
    "PRIVATE_GROUP",
    "SCHEME",
    "ExportError",
    "ExportSettings",
    "MapKind",
    "SegType",
]

#: Coding scheme for the few concepts that have no DCM/SCT/UCUM code.
SCHEME = "99SYNTHMR"
#: Private creator of the (0011,10xx) provenance block written on every output.
PRIVATE_CREATOR = "SYNTHMR 1"
PRIVATE_GROUP = 0x0011


class ExportError(ValueError):
    """The inputs cannot be exported; the message names the problem."""


class SegType(enum.Enum):
    """Segmentation encoding: tissue fractions (OCCUPANCY) or one label per voxel."""

    FRACTIONAL = "FRACTIONAL"
    BINARY = "BINARY"


class MapKind(enum.Enum):
    """Quantitative maps that can be exported (value = short name used in labels)."""

    T1 = "T1"
    T2 = "T2"
    PD = "PD"
    R1 = "R1"
    R2 = "R2"
    B1 = "B1"
    MYPV = "MYPV"
    RESIDUAL = "RESIDUAL"


ALL_MAPS: tuple[MapKind, ...] = tuple(MapKind)


@dataclass(frozen=True)
class ExportSettings:
    """How :func:`dicom_node.export.export_all` packages a result.

    series_number_offset: added to the source SeriesNumber (then + index per output series).
    contrasts: synthetic contrast names to export; None = every one in ``result.synthetic``.
    maps: quantitative maps to export. maps_as_parametric_map / maps_as_mr_images: the
    encodings (Parametric Map IOD, float; classic MR, uint16 + rescale). seg_type:
    FRACTIONAL (OCCUPANCY, 0..255) or BINARY; binary_method: ``"argmax"`` (each
    intracranial voxel gets its dominant tissue) or ``"threshold"`` (fraction >= 0.5).
    uid_root: prefix of every generated UID (must end with a dot).
    qc_fail: what happens to a series whose QC verdict is "fail": ``"hold"`` (outputs are
    written but not sent; the series is HELD until ``synthmr retry --release``) or
    ``"send_marked"`` (sent, with "[QC FAIL]" ending every series description and the
    reason in the images' ImageComments). Delivery only: not part of the UID fingerprint.
    multiframe_3d: synthetic contrasts of a 3D acquisition (MRAcquisitionType 3D, 3D-QALAS)
    as one multi-frame Enhanced MR instance per contrast (True) or as classic MR, one
    instance per slice (False: for a destination that does not accept Enhanced MR Image
    Storage). 2D series are always classic. Packaging only: not part of the UID fingerprint.
    """

    series_number_offset: int = 1000
    contrasts: tuple[str, ...] | None = None
    maps: tuple[MapKind, ...] = ALL_MAPS
    maps_as_parametric_map: bool = True
    maps_as_mr_images: bool = False
    export_segmentation: bool = True
    export_report: bool = True
    seg_type: SegType = SegType.FRACTIONAL
    binary_method: str = "argmax"
    institution_name: str = ""
    manufacturer: str = "synthmr"
    manufacturer_model_name: str = "synthmr"
    device_serial_number: str = "0"
    uid_root: str = PYDICOM_ROOT_UID
    orientation_tolerance: float = 1e-4  # snap slice orientations that differ by less (GE)
    position_tolerance_mm: float = 0.5  # result affine vs source geometry
    qc_fail: str = "hold"
    multiframe_3d: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.seg_type, SegType):
            try:
                object.__setattr__(self, "seg_type", SegType(str(self.seg_type).upper()))
            except ValueError:
                raise ExportError(
                    f"seg_type: expected FRACTIONAL or BINARY, got {self.seg_type!r}"
                ) from None
        maps = []
        for m in self.maps:
            try:
                maps.append(m if isinstance(m, MapKind) else MapKind(str(m).upper()))
            except ValueError:
                raise ExportError(
                    f"maps: unknown map {m!r}; known: {[k.value for k in MapKind]}"
                ) from None
        object.__setattr__(self, "maps", tuple(maps))
        if self.contrasts is not None:
            object.__setattr__(self, "contrasts", tuple(self.contrasts))
        if self.binary_method not in ("argmax", "threshold"):
            raise ExportError(
                f"binary_method: expected 'argmax' or 'threshold', got {self.binary_method!r}"
            )
        root = self.uid_root
        if not root.endswith("."):
            root += "."
            object.__setattr__(self, "uid_root", root)
        if len(root) > 40 or not all(p.isdigit() for p in root[:-1].split(".")):
            raise ExportError(
                f"uid_root: must be dotted digits of at most 40 characters, got {self.uid_root!r}"
            )
        if self.qc_fail not in ("hold", "send_marked"):
            raise ExportError(f"qc_fail: expected 'hold' or 'send_marked', got {self.qc_fail!r}")
        if not 0 <= self.series_number_offset < 2**31 - 1000:
            raise ExportError(f"series_number_offset: out of range: {self.series_number_offset}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (enums as strings), for provenance and UID entropy."""
        d = asdict(self)
        d["maps"] = [m.value for m in self.maps]
        d["seg_type"] = self.seg_type.value
        if self.multiframe_3d:
            # the default is left out, so existing configurations' outputs (whose private
            # provenance block carries this dict) stay byte-identical
            del d["multiframe_3d"]
        return d
