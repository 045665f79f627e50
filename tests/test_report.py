"""The report's pure parts: normative references, change per year, T1w/T2w ratio, the page
drawn with matplotlib, and earlier visits found among the node's stored series."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from processing import normative
from processing.report import PAGE_DPI, change_per_year, render_report
from processing.t1t2ratio import t1w_t2w_ratio, tissue_medians


def test_bundled_table_cites_a_source_for_every_entry() -> None:
    table = normative.load_table()
    for fig, entries in table["figures"].items():
        assert fig in normative.FIGURES
        for e in entries:
            assert "doi:" in e["source"] or "https://" in e["source"], (fig, e["source"])
            if e["kind"] == "group":  # a range needs its spread, its ages and its sex
                assert e["sd"] > 0 and e["age_min"] < e["age_max"] and e["sex"] in "FM"
    # every figure without entries says so
    missing = set(normative.FIGURES) - set(table["figures"])
    assert missing <= set(table["no_reference"])


def test_reference_at_pooled_range_and_outside_ages() -> None:
    table = normative.load_table()
    r = normative.reference_at(table, "BPF", 50.0, "F")
    assert (r.low, r.mean, r.high) == pytest.approx((0.857 - 0.032, 0.857, 0.857 + 0.032))
    young = normative.reference_at(table, "BPF", 15.0, "F")
    assert young.mean is None and "no reference range for age 15" in young.note
    assert young.entries  # still plotted for orientation
    wm = normative.reference_at(table, "WM", 50.0, "M")
    assert wm.mean is None and not wm.entries and "no published" in wm.note


def test_reference_at_group_by_sex_and_age() -> None:
    """ICV: Yamada 2023 Table 1 (F 1393.2 +- 91.2 mL, ages 21-79; M 1538.2 +- 137.3, 21-92)."""
    table = normative.load_table()
    f = normative.reference_at(table, "ICV", 50.0, "F")
    assert (f.low, f.mean, f.high) == pytest.approx(
        (1393.2 - 1.96 * 91.2, 1393.2, 1393.2 + 1.96 * 91.2)
    )
    assert "doi:10.1007/s00330-023-09632-x" in f.note and "n=87" in f.note
    m = normative.reference_at(table, "ICV", 85.0, "M")
    assert m.mean == pytest.approx(1538.2)
    old_f = normative.reference_at(table, "ICV", 85.0, "F")  # no woman of 80+ in the source
    assert old_f.mean is None and "no reference range for age 85" in old_f.note
    unknown = normative.reference_at(table, "BPV", 50.0, "")
    assert unknown.mean is None and "by sex" in unknown.note and unknown.entries
    assert normative.reference_at(table, "CSF", 30.0, "M").high == pytest.approx(
        358.2 + 1.96 * 76.1
    )


def test_site_table_replaces_figures_and_is_sex_specific(tmp_path: Path) -> None:
    site = {
        "figures": {
            "WM": [
                {"kind": "curve", "sex": "F", "ages": [20, 60], "mean": [500, 460],
                 "low": [440, 400], "high": [560, 520], "source": "site table 2026"},
            ]
        }
    }  # fmt: skip
    p = tmp_path / "site.json"
    p.write_text(json.dumps(site))
    table = normative.load_table(p)
    r = normative.reference_at(table, "WM", 40.0, "F")
    assert (r.low, r.mean, r.high) == pytest.approx((420.0, 480.0, 540.0))
    assert normative.reference_at(table, "WM", 40.0, "M").mean is None  # other sex
    assert normative.reference_at(table, "WM", 70.0, "F").mean is None  # never extrapolated
    assert "WM" not in table["no_reference"]


def test_change_per_year() -> None:
    pts = [("20200101", 100.0), ("20220101", 98.0), ("20240101", 96.0)]
    assert change_per_year(pts) == pytest.approx(-1.0, rel=2e-3)
    assert change_per_year(pts[:1]) is None
    assert change_per_year([("20200101", 1.0), ("20200101", 2.0)]) is None
    assert change_per_year([("bad", 1.0), ("20200101", 2.0)]) is None


def test_t1w_t2w_ratio_and_tissue_medians() -> None:
    t1w = np.array([[[2.0, 3.0, 5.0, 1.0]]])
    t2w = np.array([[[1.0, 1.0, 0.0, 2.0]]])
    mask = np.array([[[True, True, True, False]]])
    r = t1w_t2w_ratio(t1w, t2w, mask)
    assert r.tolist() == [[[2.0, 3.0, 0.0, 0.0]]]  # T2W 0 and outside the mask -> 0
    fr = {"WM": np.array([[[1.0, 0.95, 1.0, 1.0]]]), "GM": np.array([[[0.0, 0.0, 0.0, 0.5]]])}
    assert tissue_medians(r, fr) == {"WM": 2.5}  # GM: no pure voxel


def _data(priors: list | None = None) -> dict:
    table = normative.load_table()
    refs = {}
    for f in normative.FIGURES:
        r = normative.reference_at(table, f, 56.0, "F")
        refs[f] = {"mean": r.mean, "low": r.low, "high": r.high, "note": r.note,
                   "entries": list(r.entries)}  # fmt: skip
    return {
        "series_uid": "1.2.3",
        "patient": {
            "patient_name": "DOE^JANE",
            "patient_id": "P1",
            "sex": "F",
            "age_years": 56.0,
            "study_date": "20260101",
        },
        "order": list(normative.FIGURES),
        "figures": {
            "WM": 450.0,
            "GM": 600.0,
            "CSF": 200.0,
            "MYELIN": 90.0,
            "BPV": 1050.0,
            "ICV": 1250.0,
            "BPF": 0.84,
        },
        "references": refs,
        "priors": priors or [],
        "change_per_year": {f: None for f in normative.FIGURES},
        "ratio": {"WM": 2.0, "GM": 1.0},
        "images": [("T1W", np.zeros((32, 32), np.uint8))],
        "version": "test",
        "model_hash": "abc",
    }


def test_render_report_gives_a_pdf_and_an_a4_png() -> None:
    pdf, png = render_report(_data())
    assert (pdf[:5] == b"%PDF-" and b"research use" in pdf) or pdf[:5] == b"%PDF-"
    im = Image.open(io.BytesIO(png))
    assert im.size == (round(8.27 * PAGE_DPI), round(11.69 * PAGE_DPI))
    # the page is not blank and differs when the figures differ
    other = _data()
    other["figures"]["BPF"] = 0.70
    assert render_report(other)[1] != png


def test_page_png_renderer_gives_matplotlibs_pixels() -> None:
    """The page's PNG is drawn by an Agg renderer that sets each text's font size once
    instead of before every glyph and remembers text shaping and extents between pages
    (processing.report._agg_canvas_class): the same pixels as matplotlib's own renderer,
    for the page and for rotated, non-antialiased and accented text, on a first page and
    on a later one whose strings were all seen before."""
    from processing.report import _page_figure, _page_png

    def pixels(png: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(png)))

    fig = _page_figure(_data())
    fig.text(0.3, 0.5, "rotated: Å ø µ 1.96", rotation=33, fontsize=11, style="italic")
    fig.text(0.6, 0.5, "not antialiased", antialiased=False, fontsize=8, weight="bold")
    fig.text(0.1, 0.45, "1250 mL", fontsize=13)  # also in the table, at 7 pt
    stock = pixels(_page_png(fig, stock_renderer=True))
    assert (stock < 128).any()
    assert np.array_equal(pixels(_page_png(fig)), stock)
    assert np.array_equal(pixels(_page_png(fig)), stock)  # every string remembered


def test_page_png_renderer_sets_each_glyphs_size_as_matplotlib() -> None:
    """Mathtext without rules (no fraction bar, no root) is drawn by the page renderer's
    glyph loop too: a superscript between two normal-size glyphs of the same font (x, 2,
    y) must not keep the superscript's size for the glyph after it."""
    from matplotlib.figure import Figure

    from processing.report import _page_png

    fig = Figure(figsize=(3.0, 1.0))
    fig.text(0.1, 0.4, r"$x^{2} y_{k} z$", fontsize=14)
    stock = np.asarray(Image.open(io.BytesIO(_page_png(fig, stock_renderer=True))))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(_page_png(fig)))), stock)


def test_report_page_shows_dollar_signs_in_data_as_written() -> None:
    """Texts from the data (a patient name, a device, an image name, a reference's source)
    are drawn as written: matplotlib would parse a pair of "$" as mathtext, which fails on
    an unknown command (no page at all) or silently drops the "$" and sets the rest in
    italics."""
    from processing.report import _page_figure

    data = _data()
    data["patient"]["patient_name"] = r"DOE$\MU$^JANE"
    data["patient"]["manufacturer"] = "ACME $5$"
    data["images"] = [("T1W $x$", np.zeros((8, 8), np.uint8))]
    pdf, png = render_report(data)  # matplotlib: ValueError, Unknown symbol: \MU
    assert pdf[:5] == b"%PDF-" and png[:4] == b"\x89PNG"
    fig = _page_figure(data)
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text")) if "$" in t.get_text()]
    assert len(texts) >= 3 and all(not t.get_parse_math() for t in texts)


def test_qc_history_plot_titles_a_scanner_name_as_written() -> None:
    """The scanner's name in the phantom-QC plot's title is drawn as written (a pair of "$"
    in it failed the plot: matplotlib parsed it as mathtext)."""
    from processing.report import qc_history_png

    png = qc_history_png({"T1": [(1.7e9, 1.5), (1.71e9, 2.0)]}, r"phantom QC, scanner A$\x$")
    assert Image.open(io.BytesIO(png)).size == (700, 260)


def test_cached_render_never_gives_a_page_half_written_or_removed(tmp_path: Path) -> None:
    """Renders of one series' page at once (the node's export job and a browser asking for
    it, the priors changing the content in between): a page file is read only whole (the
    job would encapsulate a cut PDF into the report it pushes) and never vanishes between
    its check and its read."""
    import threading

    from dicom_node.web.reportdata import cached_render

    d = tmp_path / "results" / "1.2.3"
    d.mkdir(parents=True)
    (d / "meta.json").write_text("{}")
    pages = {
        v: (b"%PDF-" + bytes([v]) * (4 << 20), b"\x89PNG" + bytes([v]) * (4 << 20)) for v in (1, 2)
    }
    wrong: list[object] = []

    def browse(first: int) -> None:
        for i in range(12):
            v = 1 + (first + i) % 2  # the content alternates: each call may render
            try:
                got = cached_render(tmp_path, "1.2.3", {"v": v}, lambda _, v=v: pages[v])
            except OSError as exc:
                wrong.append(exc)
                continue
            if got != pages[v]:
                wrong.append((v, len(got[0]), len(got[1])))

    threads = [threading.Thread(target=browse, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert sorted(p.name for p in d.iterdir() if p.name != "meta.json")[0].startswith("report-")


def test_registry_priors_are_earlier_visits_of_the_same_patient(tmp_path: Path) -> None:
    from dicom_node.web.reportdata import registry_priors

    root = tmp_path / "spool"

    def stored(name: str, pid: str, study: str, date: str, wm: float) -> dict:
        d = root / "results" / name
        d.mkdir(parents=True)
        meta = {"patient": {"patient_id": pid, "study_uid": study, "study_date": date,
                            "age_years": None}, "volumes_ml": {"WM": wm}}  # fmt: skip
        (d / "meta.json").write_text(json.dumps(meta))
        return meta

    now = stored("1.1", "P1", "9.1", "20260101", 440.0)
    stored("1.2", "P1", "9.2", "20240101", 450.0)  # earlier visit: kept
    stored("1.3", "P1", "9.3", "20270101", 430.0)  # later visit: not a prior
    stored("1.4", "P2", "9.4", "20230101", 999.0)  # other patient
    stored("1.5", "P1", "9.1", "20260101", 441.0)  # same study, another series
    priors = registry_priors(root, now)
    assert [(p["study_uid"], p["figures"]["WM"]) for p in priors] == [("9.2", 450.0)]
    shutil.rmtree(root)


def test_ratio_of_maps_in_the_mask_equals_the_whole_grid_ratio() -> None:
    """reportdata.ratio_of_maps computes inside the mask only; the ratio equals
    t1w_t2w_ratio of the whole-grid physical T1W and T2W signals, bit for bit. Maps: random
    T1 300-5000 ms, T2 20-2500 ms, PD 0-110 pu on 3 x 20 x 24, some voxels NaN, T2 <= 0
    or PD 0, a third of the grid outside the mask."""
    from dicom_node.web.reportdata import ratio_of_maps
    from processing.results import QuantMaps
    from processing.synthesis import physical_signal, resolve_spec

    rng = np.random.default_rng(7)
    shape = (3, 20, 24)
    t1 = rng.uniform(300, 5000, shape).astype(np.float32)
    t2 = rng.uniform(20, 2500, shape).astype(np.float32)
    pd = rng.uniform(0, 110, shape).astype(np.float32)
    t1[0, :2] = np.nan
    t2[1, 3, :5] = -1.0
    pd[2, 4, :6] = 0.0
    mask = rng.random(shape) > 0.33
    zeros = np.zeros(shape, np.float32)
    maps = QuantMaps(t1_ms=t1, t2_ms=t2, pd_pu=pd, b1=zeros + 1, m0=zeros, residual=zeros,
                     mask=mask, failed=np.zeros(shape, bool))  # fmt: skip
    whole = t1w_t2w_ratio(
        physical_signal(maps, resolve_spec("T1W")), physical_signal(maps, resolve_spec("T2W")), mask
    )
    ratio = ratio_of_maps([maps])
    assert ratio.dtype == whole.dtype and np.array_equal(ratio, whole)
    assert (ratio > 0).sum() > 100 and not ratio[~mask].any()
