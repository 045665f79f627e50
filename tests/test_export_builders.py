"""The export's shortcuts against highdicom's own construction, attribute by attribute.

The node builds the Parametric Maps after the first from the first one's dataset, and the
SR around its root container (dicom_node.export.parametric_map / .sr: ~10x and ~3x
cheaper). Here each is compared with what highdicom builds for the same inputs without the
shortcut: every attribute, nested, pixel data included (tests/export_canon.py; only
creation/content dates and times are left out), on the stated sources and on the emulator's
classic and Enhanced MR vendor layouts.
"""

from __future__ import annotations

import numpy as np
import pytest
from export_canon import differences
from test_export_support import flat_acquisition, make_result, make_sources

from dicom_node.export import ExportSettings, report, segmentation, settings_for
from dicom_node.export.geometry import slice_geometry
from dicom_node.export.parametric_map import iter_parametric_maps, parametric_map
from dicom_node.export.part10 import encode_part10
from dicom_node.export.uids import parameter_fingerprint


@pytest.fixture(scope="module")
def result():
    return make_result()


def _sources(layout: str, result):
    if layout == "stated":
        return make_sources()
    from dicom_node.emulator import make_datasets

    return make_datasets(flat_acquisition(result), layout, with_phase=True)


LAYOUTS = ["stated", "ge", "philips_enhanced", "siemens_xa_enhanced"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_maps_from_the_first_maps_dataset_equal_highdicoms(result, layout):
    sources = _sources(layout, result)
    settings = settings_for(result, ExportSettings())
    geometry = slice_geometry(result, sources, settings)
    fast = list(iter_parametric_maps(result, sources, settings, geometry))
    assert len(fast) == len(settings.maps) >= 2
    fp = parameter_fingerprint(result, settings)
    base = int(fast[0].SeriesNumber)
    for i, (kind, pm) in enumerate(zip(settings.maps, fast, strict=True)):
        alone = slice_geometry(result, sources, settings)
        reference = parametric_map(result, kind, alone, settings, base + i, fp)
        assert differences(pm, reference) == [], kind
    # and the maps do not share anything that one of them changes
    assert len({str(pm.SOPInstanceUID) for pm in fast}) == len(fast)
    assert len({str(pm.SeriesNumber) for pm in fast}) == len(fast)
    # their shared per-frame groups are encoded once (dicom_node.export.part10.freeze):
    # the same bytes as pydicom's own encoding of each map, twice over (cache filled, used)
    for _ in range(2):
        for pm in fast:
            assert encode_part10(pm) == _pydicom_part10(pm), pm.SeriesDescription


def _pydicom_part10(ds) -> bytes:
    from io import BytesIO

    import pydicom

    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_report_equals_highdicoms_checked_construction(result, layout, monkeypatch):
    sources = _sources(layout, result)
    settings = settings_for(result, ExportSettings())
    seg = segmentation(result, sources, settings)
    fast = report(result, sources, settings, seg=seg)
    checked = report(result, sources, settings, seg=seg, check_references=True)
    assert differences(fast, checked) == []
    assert len(fast.ContentSequence) >= 3  # the tree is there: context, procedure, groups
    # the node's Part-10 encoding is pydicom's, byte for byte, also where it writes the
    # pixel data as it is (from 4 MB on: here from any size)
    from dicom_node.export import part10

    for bulk_bytes in (part10._BULK_BYTES, 0):
        monkeypatch.setattr(part10, "_BULK_BYTES", bulk_bytes)
        for ds in (seg, fast):
            assert encode_part10(ds) == _pydicom_part10(ds)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mr_slices_from_the_first_slice_equal_full_builds(result, layout, monkeypatch):
    from dicom_node.export import map_mr_images, mr_images, synthetic_images

    sources = _sources(layout, result)
    if layout == "ge":  # one slice's reference differs in what the outputs copy
        for ds in sources:
            if (
                abs(float(ds.ImagePositionPatient[2]) - float(sources[0].ImagePositionPatient[2]))
                > 1
            ):
                ds.ReceiveCoilName = "OTHER COIL"
                break
    settings = settings_for(result, ExportSettings(maps=("T1", "B1")))
    fast = synthetic_images(result, sources, settings) + map_mr_images(result, sources, settings)
    with monkeypatch.context() as m:
        m.setattr(mr_images, "_ref_signature", lambda ref: object())  # every slice in full
        full = synthetic_images(result, sources, settings) + map_mr_images(
            result, sources, settings
        )
    assert len(fast) == len(full) == result.shape[0] * (len(result.synthetic) + 2)
    for a, b in zip(fast, full, strict=True):
        assert differences(a, b) == [], (a.SeriesDescription, a.InstanceNumber)
    assert len({str(ds.SOPInstanceUID) for ds in fast}) == len(fast)
    coils = {str(ds.get("ReceiveCoilName", "")) for ds in fast}
    assert ("OTHER COIL" in coils) == (layout == "ge")


@pytest.mark.parametrize("layout", [*LAYOUTS, "ge 3D", "ge qc"])
def test_worker_geometry_gives_the_same_synthetic_series(result, layout, monkeypatch):
    """The node sends its worker mr_geometry (reference headers cut down) and the worker
    splices each slice into the first one's bytes (dicom_node.export.part10): the encoded
    series must be byte for byte what encoding the full geometry's datasets gives (the
    clock held still; "ge": one slice's reference differs in what the outputs copy, so
    the series is spliced from two whole slices; "qc": marked QC FAIL)."""
    from io import BytesIO

    import pydicom

    from dicom_node.export import common
    from dicom_node.export.mr_images import mr_geometry, synthetic_series
    from dicom_node.series import encode_synthetic_series, mark_qc_fail

    monkeypatch.setattr(common, "now_da_tm", lambda: ("20260102", "030405"))
    sources = _sources(layout.split()[0], result)
    if layout.endswith("3D"):  # a 3D acquisition: one Enhanced MR instance per contrast
        for ds in sources:
            ds.MRAcquisitionType = "3D"
    if layout == "ge":  # every image of one slice position
        z_mid = float(sources[len(sources) // 2].ImagePositionPatient[2])
        for ds in sources:
            if abs(float(ds.ImagePositionPatient[2]) - z_mid) < 0.01:
                ds.ReceiveCoilName = "OTHER COIL"
    qc_mark = "QC fail: test" if layout.endswith("qc") else ""
    settings = settings_for(result, ExportSettings())
    geometry = slice_geometry(result, sources, settings)
    fp = parameter_fingerprint(result, settings)
    coils = set()
    for name, syn in result.synthetic.items():
        full = synthetic_series(result, syn, geometry, settings, 1100, fp)
        if qc_mark:
            mark_qc_fail(full, qc_mark)
        data, index = encode_synthetic_series(
            result, name, mr_geometry(geometry), settings, 1100, fp, qc_mark
        )
        assert len(index) == len(full) == (1 if layout.endswith("3D") else result.shape[0])
        at = 0
        for ds, (sop, _, n, _, _, study, series) in zip(full, index, strict=True):
            encoded = data[at : at + n].tobytes()
            at += n
            assert (sop, study, series) == (
                ds.SOPInstanceUID,
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
            )
            assert encoded == _pydicom_part10(ds), (name, ds.get("InstanceNumber"))
            back = pydicom.dcmread(BytesIO(encoded))
            assert differences(back, ds) == [], (name, ds.get("InstanceNumber"))
            coils.add(str(back.get("ReceiveCoilName", "")))
            assert ("QC FAIL" in back.SeriesDescription) == bool(qc_mark)
    assert ("OTHER COIL" in coils) == (layout == "ge")


def _awkward_fractions(result, empty: bool) -> None:
    """Fractions that exercise every rule of highdicom's FRACTIONAL encoding, in place."""
    fr = result.segmentation.fractions
    if empty:
        for t in fr:
            fr[t][:] = 0.0
        return
    # middle slice: only rounding noise (0.001 x 255 rounds to 0): the slice still takes a
    # value of highdicom's dimension index although none of its frames is stored
    for t in fr:
        fr[t][1] = 0.0
    fr["WM"][1, 5, 5] = 0.001
    # slice 0: NON present in a corner; out-of-range and non-finite values
    fr["NON"][0, :4, :4] = np.float32(0.3)
    fr["GM"][0, 10, 10:14] = [np.nan, np.inf, -0.2, 1.7]
    # slice 2: every k + 1/2 step (ties round to even) and values either side of them
    steps = (np.arange(256, dtype=np.float32) + np.float32(0.5)) / np.float32(255)
    fr["CSF"][2, :8, :] = np.resize(steps, (8, 32))
    fr["CSF"][2, 8:12, :] = np.resize(np.nextafter(steps, np.float32(0)), (4, 32))
    fr["CSF"][2, 12:16, :] = np.resize(np.nextafter(steps, np.float32(1)), (4, 32))


@pytest.mark.parametrize("empty", [False, True])
def test_fractional_seg_equals_highdicoms_from_floats(monkeypatch, empty):
    """SEG FRACTIONAL is built from fractions rounded to uint8 slice by slice (no float
    copy of the four fractions, no np.unique over them): the same dataset as highdicom
    makes from the float32 [z, y, x, tissue] array, pixel data and every functional group
    included, also where fractions round to zero, are out of range or not finite, and when
    all are zero (then highdicom keeps every frame)."""
    import importlib

    import highdicom as hd

    from processing.results import TISSUES

    # the package's name `segmentation` is the function; the module is this
    seg_module = importlib.import_module("dicom_node.export.segmentation")

    result = make_result(nz=3)
    _awkward_fractions(result, empty)
    sources = make_sources()
    settings = ExportSettings()
    fast = segmentation(result, sources, settings)

    def floats(res, max_value):  # the former input: float32, cleaned like the export does
        arr = np.stack([res.segmentation.fractions[t] for t in TISSUES], axis=-1)
        arr = arr.astype(np.float32)
        arr[~np.isfinite(arr)] = 0
        return np.clip(arr, 0, 1), None

    def highdicoms(*args, any_tissue, **kwargs):
        return hd.seg.Segmentation(*args, **kwargs)

    monkeypatch.setattr(seg_module, "_rounded_fractions", floats)
    monkeypatch.setattr(seg_module, "_RoundedFractionalSegmentation", highdicoms)
    reference = segmentation(result, sources, settings)
    assert differences(fast, reference) == []
    frames = int(reference.NumberOfFrames)
    assert frames == (12 if empty else 7)  # all kept / the middle slice has none, NON one
    if not empty:  # the middle slice took the middle index value: WM's frames have 1 and 3
        wm = [
            int(f.FrameContentSequence[0].DimensionIndexValues[1])
            for f in reference.PerFrameFunctionalGroupsSequence
            if f.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1
        ]
        assert wm == [1, 3]


@pytest.mark.parametrize(
    ("charset", "name", "written"),
    [
        ("", "DOE^JANE", None),  # present but empty (many scanners): the default repertoire
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        ("ISO_IR 192", "Müller^Jörg", "ISO_IR 192"),
    ],
)
def test_parametric_map_seg_and_sr_take_the_sources_character_set(result, charset, name, written):
    """Sources whose Specific Character Set is empty, or whose first value is empty (the
    default repertoire with code extensions, PS3.3 C.12.1.1.2: ``\\ISO 2022 IR 87`` from
    Japanese sites) are valid DICOM that highdicom refuses ("'' is not a valid
    SpecificCharacterSetValues": no map, SEG or SR at all); the outputs say the same
    character set and keep the patient's name."""
    from io import BytesIO

    import pydicom

    sources = make_sources()
    for ds in sources:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
    settings = settings_for(result, ExportSettings(maps=("T1",)))
    seg = segmentation(result, sources, settings)
    outputs = [*iter_parametric_maps(result, sources, settings), seg]
    outputs.append(report(result, sources, settings, seg=seg))
    for ds in outputs:
        back = pydicom.dcmread(BytesIO(encode_part10(ds)))
        assert back.get("SpecificCharacterSet") == written, back.Modality
        assert str(back.PatientName) == name, back.Modality


def test_part10_writes_items_decoded_from_a_file_as_pydicom():
    """A content tree (written by dicom_node.export.part10 itself, not by pydicom's
    write_dataset) may hold an item decoded from a file: pydicom writes such an item's
    elements as they were read (a value's trailing spaces, a private element) and so must
    the node's encoding."""
    from io import BytesIO

    import pydicom
    from pydicom.dataset import Dataset

    def part10(ds: Dataset) -> bytes:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return _pydicom_part10(ds)

    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "1", "DCM", "AB  "
    code.add_new(0x00090010, "LO", "ACME")
    code.add_new(0x00091010, "LO", "PRIVATE ")
    holder = Dataset()
    holder.SOPClassUID, holder.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.22", "1.2.3"
    holder.ConceptNameCodeSequence = [code]

    def document() -> Dataset:
        read = pydicom.dcmread(BytesIO(part10(holder)))
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.22", "1.2.3.4"
        ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 100", "Müller^Jörg"
        container = Dataset()
        container.ValueType = "CONTAINER"
        container.ConceptNameCodeSequence = read.ConceptNameCodeSequence  # as read
        ds.ContentSequence = [container]
        return ds

    assert encode_part10(document()) == part10(document())


def test_slice_encoder_refuses_other_per_instance_elements():
    """A slice whose per-instance elements are not the template's: an element the plan
    has no place for would be left out of the bytes without a word; it is refused, naming
    the elements."""
    from pydicom.dataset import Dataset

    from dicom_node.export.part10 import SliceEncoder

    def instance(sop: str, number: int) -> Dataset:
        ds = Dataset()
        ds.SOPInstanceUID, ds.InstanceNumber = sop, number
        return ds

    template = instance("1.2.3.1", 1)
    template.SOPClassUID, template.PatientName = "1.2.840.10008.5.1.4.1.1.4", "DOE^J"
    encoder = SliceEncoder(template, instance("1.2.3.1", 1))
    assert encoder.spliceable
    assert encoder.encode(instance("1.2.3.2", 2)) == encode_part10(
        _with(template, instance("1.2.3.2", 2))
    )
    extra = instance("1.2.3.3", 3)
    extra.ImageComments = "slice 3 only"
    with pytest.raises(ValueError, match=r"\(0020,4000\)"):
        encoder.encode(extra)


def _with(template, varying):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for elem in template:
        ds.add(elem)
    for elem in varying:
        ds.add(elem)
    return ds
