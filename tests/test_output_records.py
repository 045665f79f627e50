"""The registry's record of a job's outputs comes from what the writer wrote, not from
reading the 300 written files back; it must be what reading them back gives."""

from __future__ import annotations

from test_export_support import make_result, make_sources

from dicom_node.export import ExportSettings, export_all
from dicom_node.pipeline import output_records, spool_writer
from dicom_node.series import EncodedInstance, encode_part10
from dicom_node.spool import Spool


def test_records_of_written_outputs_equal_the_files_headers(tmp_path):
    result = make_result()
    outs = export_all(result, make_sources(), ExportSettings(maps=("T1",)))
    mr = next(ds for ds in outs if ds.Modality == "MR")
    worker_built = EncodedInstance(
        str(mr.SOPInstanceUID),
        str(mr.SOPClassUID),
        encode_part10(mr),
        int(mr.SeriesNumber),
        "MR",
        str(mr.StudyInstanceUID),
        str(mr.SeriesInstanceUID),
    )
    rest = [ds for ds in outs if ds is not mr]
    uids: dict[str, tuple[str, str]] = {}
    write = spool_writer(Spool(tmp_path / "spool"), "1.2.3", uids)
    rows = write([worker_built], result) + write(rest, result)
    assert len(uids) == len(rows) == len(outs)
    known = output_records(rows, uids)
    read_back = output_records(rows)
    assert known == read_back
    assert {r[3] for r in known} == {str(ds.SeriesInstanceUID) for ds in outs}
