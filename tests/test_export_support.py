"""Inputs for the export tests: a tiny classic MR MDME series and a matching SeriesResult.

Built with code (no files): sources via pydicom, the result from a stated tissue model
(WM/GM/CSF discs with fixed T1/T2/PD), so every exported value has a known truth.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from processing.acquisition import Acquisition
from processing.results import (
    MyelinMaps,
    QuantMaps,
    SeriesResult,
    SyntheticImage,
    TissueFractions,
)

STUDY_UID = "1.2.826.0.1.3680043.8.498.777.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.777.2"
FOR_UID = "1.2.826.0.1.3680043.8.498.777.3"
PATIENT_NAME = "Müller^Jürgen"

# Tissue truth used by make_result (T1 ms, T2 ms, PD pu).
TRUTH = {"WM": (800.0, 70.0, 70.0), "GM": (1300.0, 90.0, 82.0), "CSF": (4000.0, 1500.0, 100.0)}


def geometry(
    nz: int, ny: int, nx: int
) -> tuple[np.ndarray, np.ndarray, float, tuple[float, float]]:
    """Slightly oblique orientation, origin, slice spacing, pixel spacing."""
    a = np.deg2rad(10.0)
    row = np.array([1.0, 0.0, 0.0])  # direction of increasing column index (x)
    col = np.array([0.0, np.cos(a), -np.sin(a)])  # direction of increasing row index (y)
    origin = np.array([-0.5 * nx * 0.9, -0.5 * ny * 1.1, -10.0])
    return np.concatenate([row, col]), origin, 5.0, (1.1, 0.9)


def make_sources(
    nz: int = 3,
    ny: int = 32,
    nx: int = 32,
    n_delay: int = 2,
    n_echo: int = 2,
    charset: str = "ISO_IR 192",
    patient_name: str = PATIENT_NAME,
    series_number: int = 7,
    seed: int = 0,
) -> list[Dataset]:
    """Classic MR images (all delays/echoes/slices), shuffled like a real C-STORE arrival."""
    iop, origin, dz, (psr, psc) = geometry(nz, ny, nx)
    normal = np.cross(iop[:3], iop[3:])
    out = []
    rng = np.random.default_rng(seed)
    n = 0
    for z in range(nz):
        for d in range(n_delay):
            for e in range(n_echo):
                n += 1
                ds = Dataset()
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
                sop = generate_uid(entropy_srcs=[SERIES_UID, str(z), str(d), str(e)])
                ds.file_meta.MediaStorageSOPInstanceUID = sop
                ds.SpecificCharacterSet = charset
                ds.SOPClassUID = MRImageStorage
                ds.SOPInstanceUID = sop
                ds.PatientName = patient_name
                ds.PatientID = "P0001"
                ds.PatientBirthDate = "19700101"
                ds.PatientSex = "M"
                ds.StudyInstanceUID = STUDY_UID
                ds.StudyDate = "20260101"
                ds.StudyTime = "120000"
                ds.StudyID = "1"
                ds.AccessionNumber = "ACC1"
                ds.ReferringPhysicianName = ""
                ds.StudyDescription = "Brain"
                ds.Modality = "MR"
                ds.Manufacturer = "TestVendor"
                ds.SeriesInstanceUID = SERIES_UID
                ds.SeriesNumber = series_number
                ds.SeriesDescription = "MDME"
                ds.FrameOfReferenceUID = FOR_UID
                ds.PositionReferenceIndicator = ""
                ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
                ds.InstanceNumber = n
                ds.ScanningSequence = "SE"
                ds.SequenceVariant = "NONE"
                ds.ScanOptions = ""
                ds.MRAcquisitionType = "2D"
                ds.RepetitionTime = 4000.0
                ds.EchoTime = [20.0, 100.0][e]
                ds.InversionTime = [150.0, 1500.0][d]
                ds.EchoTrainLength = 1
                ds.MagneticFieldStrength = 3.0
                ds.SliceThickness = 4.0
                ds.SpacingBetweenSlices = dz
                ds.PixelSpacing = [psr, psc]
                ds.ImageOrientationPatient = [float(v) for v in iop]
                pos = origin + normal * dz * z
                ds.ImagePositionPatient = [float(v) for v in pos]
                ds.SliceLocation = float(np.dot(pos, normal))
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.Rows = ny
                ds.Columns = nx
                ds.BitsAllocated = 16
                ds.BitsStored = 16
                ds.HighBit = 15
                ds.PixelRepresentation = 0
                ds.PixelData = rng.integers(0, 1000, (ny, nx), dtype=np.uint16).tobytes()
                out.append(ds)
    random.Random(seed).shuffle(out)
    return out


def make_result(nz: int = 3, ny: int = 32, nx: int = 32, seed: int = 1) -> SeriesResult:
    """A SeriesResult on the make_sources grid with known tissue values.

    Concentric tissue: CSF core, GM ring, WM ring inside a circular intracranial mask,
    smooth partial volumes between them; maps are fraction-weighted truths + small noise.
    """
    iop, origin, dz, (psr, psc) = geometry(nz, ny, nx)
    normal = np.cross(iop[:3], iop[3:])
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * psc
    affine[:3, 1] = iop[3:] * psr
    affine[:3, 2] = normal * dz
    affine[:3, 3] = origin
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    r = np.hypot(yy - ny / 2 + 0.5, xx - nx / 2 + 0.5) / (min(ny, nx) / 2)
    r = r * (1 + 0.05 * zz)  # slices differ
    ic = r < 0.95
    csf = np.clip((0.35 - r) / 0.1 + 0.5, 0, 1)
    wm = np.clip((0.7 - r) / 0.1 + 0.5, 0, 1) - csf
    gm = 1 - csf - wm
    non = np.zeros_like(gm)
    non[:, : ny // 4, : nx // 4] = 0.0
    fr = {"WM": wm, "GM": gm, "CSF": csf, "NON": non}
    for k in fr:
        fr[k] = np.where(ic, fr[k], 0).astype(np.float32)
    t1 = sum(fr[k] * TRUTH[k][0] for k in ("WM", "GM", "CSF"))
    t2 = sum(fr[k] * TRUTH[k][1] for k in ("WM", "GM", "CSF"))
    pd = sum(fr[k] * TRUTH[k][2] for k in ("WM", "GM", "CSF"))
    noise = rng.normal(1, 0.01, (nz, ny, nx))
    t1 = np.where(ic, t1 * noise, 0).astype(np.float32)
    t2 = np.where(ic, t2 * noise, 0).astype(np.float32)
    pd = np.where(ic, pd * noise, 0).astype(np.float32)
    b1 = np.where(ic, 0.95 + 0.1 * (xx / nx), 0).astype(np.float32)
    maps = QuantMaps(
        t1_ms=t1,
        t2_ms=t2,
        pd_pu=pd,
        b1=b1,
        m0=(pd * 10).astype(np.float32),
        residual=np.where(ic, rng.uniform(0, 3, (nz, ny, nx)), 0).astype(np.float32),
        mask=ic,
        failed=np.zeros_like(ic),
    )
    mypv = np.where(ic, 15.0 * wm + 3.0 * gm, 0).astype(np.float32)
    voxel_ml = psr * psc * dz / 1000.0
    vol = {k: float(fr[k].sum() * voxel_ml) for k in fr}
    vol["BPV"] = vol["WM"] + vol["GM"] + vol["NON"]
    vol["ICV"] = float(ic.sum() * voxel_ml)
    vol["MYELIN"] = float(mypv.sum() / 100 * voxel_ml)
    vol["BPF"] = vol["BPV"] / vol["ICV"]
    flair = np.clip(np.where(ic, 3000 * (1 - csf), 0), 0, 65535).astype(np.float32)
    psir = np.clip(np.where(ic, 20000 * (wm - csf), 0), -32768, 32767).astype(np.float32)
    synthetic = {
        "FLAIR": SyntheticImage(
            name="FLAIR",
            kind="IR",
            image=flair,
            tr_ms=15000.0,
            te_ms=100.0,
            ti_ms=2850.0,
            scale=30.0,
            equation="S = PD (1 - 2 exp(-TI/T1) + exp(-TR/T1)) exp(-TE/T2)",
            window_center=1500.0,
            window_width=3000.0,
            description="SYNTHETIC FLAIR TR15000 TE100 TI2850",
        ),
        "FLAIR_AI": SyntheticImage(
            name="FLAIR_AI",
            kind="IR",
            image=flair,
            tr_ms=15000.0,
            te_ms=100.0,
            ti_ms=2850.0,
            equation="S = PD (1 - 2 exp(-TI/T1) + exp(-TR/T1)) exp(-TE/T2)",
            window_center=1500.0,
            window_width=3000.0,
            ai_enhanced=True,
            description="SYNTHETIC FLAIR AI TR15000 TE100 TI2850",
        ),
        "PSIR": SyntheticImage(
            name="PSIR",
            kind="PSIR",
            image=psir,
            tr_ms=4000.0,
            te_ms=10.0,
            ti_ms=400.0,
            equation="S = PD (1 - 2 exp(-TI/T1) + exp(-TR/T1)) exp(-TE/T2), signed",
            window_center=0.0,
            window_width=40000.0,
            signed=True,
            description="SYNTHETIC PSIR TR4000 TE10 TI400",
        ),
    }
    return SeriesResult(
        shape=(nz, ny, nx),
        voxel_size_mm=(dz, psr, psc),
        affine=affine,
        maps=maps,
        synthetic=synthetic,
        segmentation=TissueFractions(fractions=fr, icmask=ic),
        myelin=MyelinMaps(
            mypv=mypv, epw=np.zeros_like(mypv), myelin_volume_ml=vol["MYELIN"], epw_volume_ml=0.0
        ),
        volumes_ml=vol,
        tissue_stats={
            k: dict(zip(("t1_ms", "t2_ms", "pd_pu"), TRUTH[k], strict=True)) for k in TRUTH
        },
        qc={"median_residual": 1.5, "failed_fraction": 0.0, "flag": "ok"},
        provenance={
            "software_version": "0.1.0",
            "model_sha256": "ab" * 32,
            "delay_source": "InversionTime",
            "fit": {"max_iter": 50},
        },
    )


def flat_acquisition(result: SeriesResult) -> Acquisition:
    """A 2-delay x 2-echo complex acquisition of constant signal on the result's grid (the
    source series an emulator layout writes for the export tests)."""
    nz, ny, nx = result.shape
    return Acquisition(
        signal=np.full((nz, 2, 2, ny, nx), 100.0, dtype=np.float32),
        delays_ms=np.array([150.0, 1500.0]),
        echo_times_ms=np.array([20.0, 100.0]),
        tr_ms=4000.0,
        saturation_deg=120.0,
        excitation_deg=90.0,
        voxel_size_mm=tuple(result.voxel_size_mm),
        affine=result.affine,
        is_magnitude=False,
    )


def dcmqi_to_nifti(exe: str, dicom: Path, out: Path) -> None:
    """Convert one DICOM object with a dcmqi tool (paramap2itkimage, segimage2itkimage) into
    NIfTI files in ``out``; the test fails with the tool's output if it fails."""
    r = subprocess.run(
        [exe, "--inputDICOM", str(dicom), "--outputDirectory", str(out), "-t", "nifti"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
