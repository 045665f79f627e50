"""The one-page brain report, drawn with matplotlib: PDF (vector) and PNG (the same page).

``render_report(data) -> (pdf_bytes, png_bytes)``. ``data`` is plain Python (assembled by
dicom_node.web.reportdata): patient identity, the figures (mL; BPF a fraction), their
normative references (processing.normative), earlier results of the patient, key images
(uint8 ``[rows, cols]``), the T1w/T2w ratio medians, software version and model hash.
Every page says "synthetic MRI, research use".
"""

from __future__ import annotations

import functools
import io
import math
import textwrap
from datetime import date
from typing import Any

import numpy as np

__all__ = ["PAGE_DPI", "change_per_year", "render_report", "years_between"]

PAGE_DPI = 100  # PNG of an A4 page: 827 x 1169 pixels
UNITS = {"BPF": ""}
#: Axes titles sit at this fixed height (axes fraction) plus matplotlib's usual pad. Giving
#: ``y`` turns off matplotlib's title auto-placement, which measures every tick label of the
#: axes on each draw (about a fifth of the page's CPU, twice: PDF and PNG); our axes have no
#: top ticks, so the auto-placement would put the title here anyway.
_TITLE_Y = 1.0
#: Texts that carry data (a patient name, a device, a reference's source) are drawn as
#: written: matplotlib would parse a pair of "$" in them as mathtext (an unknown command
#: fails the whole page; a known one drops the "$" and changes the text).
_AS_WRITTEN: dict[str, Any] = {"parse_math": False}
BANNER = "SYNTHETIC MRI - RESEARCH USE ONLY - not a medical device, not for diagnosis"


def _date(text: str) -> date | None:
    """A DICOM date (DA, ``YYYYMMDD``) as a date; None if it is not a valid one."""
    text = (text or "").strip()
    if len(text) == 8 and text.isdigit():
        try:
            return date(int(text[:4]), int(text[4:6]), int(text[6:]))
        except ValueError:
            return None
    return None


def years_between(a: str, b: str) -> float | None:
    """Years (of 365.25 days) from date ``a`` to date ``b`` (DA, ``YYYYMMDD``; negative
    when ``b`` is earlier); None if either is not a valid date."""
    da, db = _date(a), _date(b)
    return None if da is None or db is None else (db - da).days / 365.25


def change_per_year(points: list[tuple[str, float]]) -> float | None:
    """Least-squares slope (value per year) of ``(YYYYMMDD, value)`` points; None if < 2
    dated points or all on one day."""
    pts = [(_date(d), v) for d, v in points if _date(d) is not None and v is not None]
    if len(pts) < 2:
        return None
    t0 = min(p[0] for p in pts)
    x = np.array([(p[0] - t0).days / 365.25 for p in pts])
    y = np.array([float(p[1]) for p in pts])
    if np.ptp(x) <= 0:
        return None
    return float(np.polyfit(x, y, 1)[0])


def _fmt(fig: str, v: float | None) -> str:
    """Figure ``fig``'s value as the page shows it: BPF a fraction, the others in mL."""
    if v is None:
        return "-"
    return f"{v:.3f}" if fig == "BPF" else f"{v:.0f} mL"


def _plot_figure(ax: Any, fig: str, d: dict[str, Any]) -> None:
    """Figure ``fig`` (its name, e.g. "WM") against age in years on ``ax``: the reference
    entries, the patient's earlier visits and this one."""
    ref = d["references"].get(fig) or {}
    age = d["patient"].get("age_years")
    value = d["figures"].get(fig)
    for e in ref.get("entries", []):
        if e.get("kind") == "studies":
            ages = [p["age"] for p in e["points"]]
            means = [p["mean"] for p in e["points"]]
            ax.errorbar(
                ages, means, yerr=[p.get("ci95", 0) for p in e["points"]],
                xerr=[p.get("age_sd", 0) for p in e["points"]], fmt="s", ms=3, color="0.55",
                elinewidth=0.6, label="published study means",
            )  # fmt: skip
        elif e.get("kind") == "pooled":
            lo, hi = e["median"] - e["iqr"] / 2, e["median"] + e["iqr"] / 2
            ax.fill_between([e["age_min"], e["age_max"]], lo, hi, color="#9ecae1", alpha=0.5,
                            label="pooled median+-IQR/2")  # fmt: skip
            ax.plot([e["age_min"], e["age_max"]], [e["median"]] * 2, color="#3182bd", lw=0.8)
        elif e.get("kind") == "group":
            lo, hi = e["mean"] - 1.96 * e["sd"], e["mean"] + 1.96 * e["sd"]
            color = {"F": "#c994c7", "M": "#74c476"}.get(str(e.get("sex")), "#bdbdbd")
            ax.fill_between([e["age_min"], e["age_max"]], lo, hi, color=color, alpha=0.35,
                            label=f"group mean+-1.96 SD ({e.get('sex', 'any')})")  # fmt: skip
            ax.plot([e["age_min"], e["age_max"]], [e["mean"]] * 2, color=color, lw=0.8)
        elif e.get("kind") == "curve":
            ax.fill_between(e["ages"], e["low"], e["high"], color="#9ecae1", alpha=0.5)
            ax.plot(e["ages"], e["mean"], color="#3182bd", lw=1.0, label="reference")
    # earlier visits of this patient, then this one
    trend = [(p["age_years"], p["figures"].get(fig)) for p in d.get("priors", [])]
    trend = [(a, v) for a, v in trend if a is not None and v is not None]
    if age is not None and value is not None:
        if trend:
            xs, ys = zip(*sorted([*trend, (age, value)]), strict=True)
            ax.plot(xs, ys, "-o", color="#d95f0e", ms=3, lw=1, label="this patient")
        ax.plot([age], [value], "o", color="#e6550d", ms=6, mec="k", mew=0.6)
    elif value is not None:
        ax.axhline(value, color="#e6550d", lw=1)
    ax.margins(y=0.12)  # the patient's point is never cut by the frame
    ax.set_title(f"{fig}: {_fmt(fig, value)}", fontsize=8, y=_TITLE_Y, **_AS_WRITTEN)
    ax.tick_params(labelsize=6)
    ax.set_xlabel("age (years)", fontsize=6)
    if not ref.get("entries"):  # the first clause only: the full note is on the web page
        short = ref.get("note", "no reference").split(":")[0].split(". ")[0]
        ax.text(0.5, 0.96, "\n".join(textwrap.wrap(short, 30)),
                transform=ax.transAxes, ha="center", va="top", fontsize=5, color="0.35",
                **_AS_WRITTEN)  # fmt: skip


def render_report(data: dict[str, Any]) -> tuple[bytes, bytes]:
    """The report page as (PDF bytes, PNG bytes at PAGE_DPI): one figure, drawn twice."""
    fig = _page_figure(data)
    pdf = io.BytesIO()
    fig.savefig(pdf, format="pdf", metadata={"Title": "synthmr brain report (synthetic MRI, research use)",
                                             "Creator": f"synthmr {data.get('version', '')}"})  # fmt: skip
    return pdf.getvalue(), _page_png(fig)


def _page_figure(data: dict[str, Any]) -> Any:
    """The report page as a matplotlib Figure (A4)."""
    from matplotlib.figure import Figure

    d = data
    fig = Figure(figsize=(8.27, 11.69))
    fig.patch.set_facecolor("white")
    p = d["patient"]
    fig.text(0.5, 0.975, BANNER, ha="center", va="top", fontsize=9, weight="bold",
             color="#7a4d00", bbox={"facecolor": "#fff1c2", "edgecolor": "#e0b400"})  # fmt: skip
    fig.text(0.05, 0.945, "synthmr brain report", fontsize=14, weight="bold", va="top")
    age = p.get("age_years")
    fig.text(
        0.05, 0.918,
        f"Patient {p.get('patient_name') or '-'}  ID {p.get('patient_id') or '-'}  "
        f"sex {p.get('sex') or '-'}  age {'-' if age is None else f'{age:.0f} y'}  "
        f"study {p.get('study_date') or '-'}",
        fontsize=8, va="top", **_AS_WRITTEN,
    )  # fmt: skip
    fig.text(
        0.05, 0.903,
        f"Series {d.get('series_uid', '')}  ·  {p.get('manufacturer', '')} {p.get('model', '')}",
        fontsize=6, va="top", color="0.3", **_AS_WRITTEN,
    )  # fmt: skip
    # key images
    imgs = d.get("images", [])[:4]
    for i, (name, gray) in enumerate(imgs):
        ax = fig.add_axes((0.05 + i * 0.228, 0.70, 0.21, 0.19))
        ax.imshow(gray, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(name, fontsize=7, y=_TITLE_Y, **_AS_WRITTEN)
        ax.set_axis_off()
    # figures table
    rows = []
    for f in d["order"]:
        ref = d["references"].get(f) or {}
        rng = (
            f"{_fmt(f, ref['low'])} - {_fmt(f, ref['high'])}"
            if ref.get("low") is not None
            else ("none bundled" if not ref.get("entries") else "none for this age")
        )
        prior = d.get("priors", [])[-1]["figures"].get(f) if d.get("priors") else None
        cpy = d.get("change_per_year", {}).get(f)
        rows.append([
            f, _fmt(f, d["figures"].get(f)), rng, _fmt(f, prior),
            "-" if cpy is None else (f"{cpy:+.4f}/y" if f == "BPF" else f"{cpy:+.1f} mL/y"),
        ])  # fmt: skip
    _draw_table(
        fig, [["figure", "this visit", "reference (age, sex)", "last visit", "change"], *rows]
    )
    # plots against age
    for i, f in enumerate(d["order"]):
        r, c = divmod(i, 4)
        ax = fig.add_axes((0.07 + c * 0.235, 0.305 - r * 0.165, 0.18, 0.11))
        _plot_figure(ax, f, d)
    fig.text(
        0.05, 0.48,
        textwrap.fill(
            "Bands: reference ranges of healthy groups at the ages they cover (pink women, green "
            "men, blue both sexes; mean +- 1.96 SD, or median +- IQR/2). Grey squares: published "
            "study means (bars: age SD, 95 % CI). Orange: this patient (line: earlier visits).",
            150,
        ),
        fontsize=6, va="top", color="0.25",
    )  # fmt: skip
    # T1w/T2w beside myelin
    ratio = d.get("ratio") or {}
    txt = ["T1w/T2w ratio, median", "(Glasser & Van Essen 2011):"]
    txt += [f"  {t}: {v:.3f}" for t, v in ratio.items()] or ["  not available"]
    txt += [f"Myelin volume: {_fmt('MYELIN', d['figures'].get('MYELIN'))}"]
    fig.text(0.77, 0.24, "\n".join(txt), fontsize=6.5, va="top", **_AS_WRITTEN)
    # sources and provenance
    cites = sorted(
        {e.get("source", "") for r in d["references"].values() for e in r.get("entries", [])}
    )
    foot = [
        "References: " + (" | ".join(c for c in cites if c) or "none bundled"),
        f"synthmr {d.get('version', '')}  ·  FLAIR model sha256 {d.get('model_hash') or 'none (not run)'}  ·  "
        "volumes from the partial-volume segmentation of synthetic-MRI maps; "
        "reference values come from other methods and populations.",
        BANNER,
    ]
    fig.text(0.05, 0.015, "\n".join(textwrap.fill(t, 190) for t in foot), fontsize=5, va="bottom",
             color="0.25", **_AS_WRITTEN)  # fmt: skip
    return fig


def _page_png(fig: Any, stock_renderer: bool = False) -> bytes:
    """PNG of ``fig`` at PAGE_DPI; drawn with :func:`_agg_canvas_class`'s renderer unless
    ``stock_renderer`` (matplotlib's own, for the test that compares the two)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas_class = FigureCanvasAgg if stock_renderer else _agg_canvas_class()
    canvas_class(fig)
    png = io.BytesIO()
    # zlib level 1: the page is mostly flat white, so the PNG barely grows while its
    # encoding costs a fraction of the default level's
    fig.savefig(png, format="png", dpi=PAGE_DPI, pil_kwargs={"compress_level": 1})
    return png.getvalue()


#: The figures table: left, top, width, row height (figure fractions), as matplotlib's
#: table placed it on the page.
_TABLE = (0.05, 0.666, 0.9, 0.0164)


def _draw_table(fig: Any, cells: list[list[str]]) -> None:
    """A ruled table of text (first row: the header), drawn as plain texts and one set of
    lines: matplotlib's Table measures and positions every cell on each draw (about a
    tenth of the page's CPU); here the geometry is fixed, as the table's was."""
    from matplotlib.collections import LineCollection

    left, top, width, row_h = _TABLE
    col_w = width / len(cells[0])
    for i, row in enumerate(cells):
        for j, text in enumerate(row):
            fig.text(left + (j + 0.1) * col_w, top - (i + 0.5) * row_h, text, fontsize=7,
                     va="center", ha="left", **_AS_WRITTEN)  # fmt: skip
    bottom = top - len(cells) * row_h
    rules = [
        [(left, top - i * row_h), (left + width, top - i * row_h)] for i in range(len(cells) + 1)
    ]
    rules += [
        [(left + j * col_w, top), (left + j * col_w, bottom)] for j in range(len(cells[0]) + 1)
    ]
    fig.add_artist(LineCollection(rules, colors="k", linewidths=1.0, transform=fig.transFigure))


#: :func:`_agg_canvas_class`'s remembered text shaping and extents (see there); emptied
#: when it reaches _TEXT_MEMO_LIMIT entries (a page adds ~230, ~2 KB each: at most ~8 MB).
_TEXT_MEMO: dict[tuple[Any, ...], Any] = {}
_TEXT_MEMO_LIMIT = 4000


def _remember(key: tuple[Any, ...], value: Any) -> None:
    """Put one shaping or extent in the memo (emptied first when it is full)."""
    if len(_TEXT_MEMO) >= _TEXT_MEMO_LIMIT:
        _TEXT_MEMO.clear()
    _TEXT_MEMO[key] = value


@functools.cache
def _agg_canvas_class() -> type:
    """matplotlib's Agg canvas for the page, drawing the same pixels with less CPU:

    - text is drawn glyph by glyph as matplotlib >= 3.11 does, but the font size is set
      once per text instead of before every glyph (FreeType drops its hinting data on each
      size change, which made text about a third of the PNG's CPU);
    - a text's shaping (glyphs and positions) and its measured extent are remembered
      between pages, keyed by everything they depend on (the font object, which carries
      its files, fallbacks and hinting/kerning factors; the size; the dpi; the hinting
      flags; features and language; the string): most of a page's strings (headings,
      tick labels, the banner and the references) are the same on every page.

    tests/test_report.py compares the pixels with matplotlib's own renderer, also for a
    page drawn after another. Older matplotlib (no per-glyph text drawing in Python) keeps
    its own canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg, get_hinting_flag
    from matplotlib.ft2font import RenderMode

    if not hasattr(RendererAgg, "_draw_text_glyphs_and_boxes"):
        return FigureCanvasAgg

    class PageRendererAgg(RendererAgg):
        def get_text_width_height_descent(self, s, prop, ismath):  # type: ignore[no-untyped-def]
            if ismath:
                return super().get_text_width_height_descent(s, prop, ismath)
            font = self._prepare_font(prop)
            flags = get_hinting_flag()
            key = ("extent", font, prop.get_size_in_points(), self.dpi, flags, s)
            extent = _TEXT_MEMO.get(key)
            if extent is None:  # matplotlib's computation
                font.set_text(s, 0.0, flags=flags)
                w, h = font.get_width_height()  # width and height of unrotated string
                extent = (w / 64.0, h / 64.0, font.get_descent() / 64.0)
                _remember(key, extent)
            return extent

        def draw_text(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):  # type: ignore[no-untyped-def]
            if ismath:
                return super().draw_text(gc, x, y, s, prop, angle, ismath, mtext)
            font = self._prepare_font(prop)
            flags = get_hinting_flag()
            features = mtext.get_fontfeatures() if mtext is not None else None
            language = mtext.get_language() if mtext is not None else None
            size = prop.get_size_in_points()
            key = ("layout", font, size, self.dpi, flags, features, language, s)
            items = _TEXT_MEMO.get(key)
            if items is None:  # matplotlib's computation
                items = [
                    (item.ft_object, item.glyph_index, item.x, item.y)
                    for item in font._layout(s, flags=flags, features=features, language=language)
                ]
                _remember(key, items)
            self._draw_text_glyphs_and_boxes(
                gc, x, y, angle, ((f, size, g, 0, 1, gx, gy) for f, g, gx, gy in items), []
            )
            return None

        def _draw_text_glyphs_and_boxes(  # type: ignore[no-untyped-def]
            self, gc, x, y, angle, glyphs, boxes
        ):
            if boxes:  # mathtext (rules, several sizes): matplotlib's own
                return super()._draw_text_glyphs_and_boxes(gc, x, y, angle, glyphs, boxes)
            # y is downwards; matplotlib's computation, with the per-glyph invariants
            # (size, rotation matrix) set once
            cos = math.cos(math.radians(angle))
            sin = math.sin(math.radians(angle))
            load_flags = get_hinting_flag()
            antialiased = gc.get_antialiased()
            mode = RenderMode.NORMAL if antialiased else RenderMode.MONO
            # the size is set again only where it changes from the glyph before: mathtext
            # mixes sizes of one font (x^2 y), and a font's set_size also sets its fallbacks'
            sized: tuple[int, float] | None = None
            matrices: dict[tuple[float, float], Any] = {}
            for font, size, glyph_index, slant, extend, dx, dy in glyphs:  # dy is upwards
                if sized != (id(font), size):
                    font.set_size(size, self.dpi)
                    sized = (id(font), size)
                matrix = matrices.get((slant, extend))
                if matrix is None:
                    matrix = matrices[(slant, extend)] = (
                        (0x10000 * np.array([[cos, -sin], [sin, cos]])
                         @ [[extend, extend * slant], [0, 1]]).round().astype(int)
                    )  # fmt: skip
                font._set_transform(
                    matrix,
                    [round(0x40 * (x + dx * cos - dy * sin)),
                     # FreeType's y is upwards
                     round(0x40 * (self.height - y + dx * sin + dy * cos))],
                )  # fmt: skip
                bitmap = font._render_glyph(glyph_index, load_flags, mode)
                buffer = bitmap.buffer
                if not antialiased:
                    buffer *= 0xFF
                # draw_text_image's y is downwards & the bitmap bottom side
                self._renderer.draw_text_image(
                    buffer, bitmap.left, int(self.height) - bitmap.top + buffer.shape[0], 0, gc
                )
            return None

    class PageCanvasAgg(FigureCanvasAgg):
        def get_renderer(self):  # type: ignore[no-untyped-def]
            w, h = self.get_width_height(physical=True)
            key = w, h, self.figure.dpi
            if self._lastKey != key:
                self.renderer = PageRendererAgg(w, h, self.figure.dpi)
                self._lastKey = key
            return self.renderer

    return PageCanvasAgg


def qc_history_png(series: dict[str, list[tuple[float, float]]], title: str) -> bytes:
    """A phantom-QC history plot: per array (T1, T2, PD) the largest |error| of each phantom
    against its acquisition time (unix seconds). PNG bytes."""
    from datetime import UTC, datetime

    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 2.6))
    ax = fig.add_axes((0.09, 0.2, 0.7, 0.68))
    for array, pts in sorted(series.items()):
        if not pts:
            continue
        pts = sorted(pts)
        ax.plot(
            [datetime.fromtimestamp(t, UTC) for t, _ in pts], [v for _, v in pts], "-o", ms=3,
            label=f"{array} ({'pu' if array.upper().startswith('PD') else '%'})",
        )  # fmt: skip
    ax.set_title(title, fontsize=9, **_AS_WRITTEN)  # names a scanner
    ax.set_ylabel("largest |error|", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.autofmt_xdate()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
