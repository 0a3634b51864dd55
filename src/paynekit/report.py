"""An HTML report of a run: the figures of :mod:`paynekit.plots` as PNGs and summary tables in index.html.

The page is self-contained apart from relative links to the PNGs written next to it (no scripts, no
external resources), so the folder can be copied, zipped or served as it is. Figures that the inputs do
not allow (no reference table, no [X/H] columns, no emulator, ...) are listed with the reason instead.
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import plots
from .errors import InputError
from .plots import _common as common
from .plots.catalog import flag_counts
from .plots.compare import compare_labels, match_ids
from .plots.emulator import _per_pixel_curves, as_record
from .wavelength import APOGEE_CHIPS

logger = logging.getLogger(__name__)

#: Name of the page written into the output folder.
INDEX_NAME = "index.html"
#: Resolution of the PNGs.
REPORT_DPI = 100
#: Fields of one fit record, in the order of a tuple record.
FIT_FIELDS = ("id", "wavelength", "flux", "ivar", "model", "mask", "labels")

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
p.meta { color: #666; margin-top: 0; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.6em 0 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
figure { margin: 1em 0 2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; max-width: 900px; }
ul.skipped li { color: #666; }
"""


@dataclass(frozen=True)
class ReportFigure:
    """One figure of the report: its section, PNG file name (relative), title and caption."""

    section: str
    file: str
    title: str
    caption: str


@dataclass
class _Report:
    out_dir: Path
    dpi: int
    figures: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def draw(self, section, name, heading, caption, plot, /, *args, **kwargs):
        """Draw ``plot(*args, **kwargs)`` into ``<name>.png`` and list it under ``section``."""
        path = self.out_dir / f"{name}.png"
        plot(*args, path=path, dpi=self.dpi, **kwargs)
        self.figures.append(ReportFigure(section, path.name, heading, caption))

    def skip(self, section, title, reason):
        logger.info("report: %s not drawn: %s", title, reason)
        self.skipped.append((section, title, reason))


# -- inputs -----------------------------------------------------------------------------------------
def _read_table(value, name):
    if isinstance(value, (str, Path)):
        from astropy.table import Table

        path = Path(value)
        if not path.is_file():
            raise InputError(f"{name} file {str(path)!r} does not exist")
        return Table.read(path)
    return common.as_table(value, name)


def _read_emulator(value):
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        from .emulators.formats import load_emulator

        return load_emulator(value)
    from .emulators.base import Emulator

    if not isinstance(value, Emulator):
        raise InputError(f"emulator must be a paynekit Emulator or a model file path, got {type(value).__name__}")
    return value


def _read_json(value, name):
    """A path to a JSON file -> its content (lists become arrays where drawn); anything else unchanged."""
    if isinstance(value, (str, Path)):
        import json

        path = Path(value)
        if not path.is_file():
            raise InputError(f"{name} file {str(path)!r} does not exist")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{name} file {str(path)!r} is not valid JSON: {exc}") from None
    return value


def _fit_records(fits):
    if fits is None:
        return []
    if isinstance(fits, Mapping):
        fits = [fits]
    out = []
    for k, rec in enumerate(fits):
        if isinstance(rec, Mapping):
            missing = [f for f in FIT_FIELDS if f not in rec and f not in ("mask", "labels")]
            if missing:
                raise InputError(f"fits[{k}] lacks {missing}; a fit record has {FIT_FIELDS}")
            out.append(dict(rec))
        elif isinstance(rec, Sequence) and len(rec) == len(FIT_FIELDS):
            out.append(dict(zip(FIT_FIELDS, rec)))
        else:
            raise InputError(f"fits[{k}] must be a mapping or a tuple {FIT_FIELDS}, got {type(rec).__name__}")
    return out


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")[:60] or "star"


# -- summary tables ---------------------------------------------------------------------------------
def _fmt(value, digits=3) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if not np.isfinite(value):
        return "–"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _html_table(header, rows, text_columns=(0,)) -> str:
    def cell(tag, k, v):
        cls = ' class="text"' if k in text_columns else ""
        return f"<{tag}{cls}>{html.escape(str(v))}</{tag}>"

    head = "".join(cell("th", k, h) for k, h in enumerate(header))
    body = "\n".join("<tr>" + "".join(cell("td", k, v) for k, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def catalog_summary(catalog, bit_names: dict | None = None) -> dict:
    """Numbers for the report's summary: star counts, flag counts, S/N and χ², and per-label statistics."""
    table = common.as_table(catalog, "catalog")
    counts = flag_counts(table, bit_names)
    n = len(table)
    warn = common.bool_column(table, "flag_warn") if "flag_warn" in table.colnames else np.zeros(n, bool)
    bad = common.bool_column(table, "flag_bad") if "flag_bad" in table.colnames else np.zeros(n, bool)
    good = ~bad
    out = {"n_stars": n, "n_warn": counts["n_warn"], "n_bad": counts["n_bad"],
           "n_clean": int(np.count_nonzero(~warn & ~bad)), "bits": counts["bits"], "reasons": counts["reasons"]}
    for col in ("snr", "reduced_chi2", "chi2"):
        if col in table.colnames:
            v = common.float_column(table, col)[good]
            out[f"median_{col}"] = float(np.nanmedian(v)) if np.any(np.isfinite(v)) else np.nan
    labels = []
    for name in common.label_columns(table):
        v = common.float_column(table, name)[good]
        fin = v[np.isfinite(v)]
        e = None
        if f"e_{name}" in table.colnames:
            ev = common.float_column(table, f"e_{name}")[good]
            e = float(np.nanmedian(ev)) if np.any(np.isfinite(ev)) else np.nan
        p16, p50, p84 = np.percentile(fin, [16, 50, 84]) if fin.size else (np.nan,) * 3
        labels.append({"label": name, "n": int(fin.size), "median": float(p50), "p16": float(p16),
                       "p84": float(p84), "median_error": e})
    out["labels"] = labels
    return out


def _summary_html(summary) -> str:
    rows = [("stars", summary["n_stars"]),
            ("without warn or bad flags", summary["n_clean"]),
            ("flag_warn", _fmt(summary["n_warn"])),
            ("flag_bad", _fmt(summary["n_bad"]))]
    for col, name in (("snr", "median S/N"), ("reduced_chi2", "median reduced χ²"), ("chi2", "median χ²")):
        if f"median_{col}" in summary:
            rows.append((f"{name} (not flagged bad)", _fmt(summary[f"median_{col}"])))
    parts = [_html_table(("", "value"), rows)]
    if summary["bits"]:
        parts.append("<h3>Flag bits (result_flags)</h3>")
        parts.append(_html_table(("flag", "bit", "stars"), [(nm, b, c) for b, nm, c in summary["bits"]]))
    if summary["reasons"]:
        parts.append("<h3>Flag reasons</h3>")
        parts.append(_html_table(("reason", "stars"), summary["reasons"]))
    if summary["labels"]:
        parts.append("<h3>Labels (stars not flagged bad)</h3>")
        parts.append(_html_table(
            ("label", "N", "median", "16th pct", "84th pct", "median uncertainty"),
            [(common.label_text(r["label"]), r["n"], _fmt(r["median"], 4), _fmt(r["p16"], 4), _fmt(r["p84"], 4),
              _fmt(r["median_error"])) for r in summary["labels"]]))
    return "\n".join(parts)


def _comparison_html(stats, n_matched, id_column) -> str:
    rows = [(common.label_text(s.label), s.reference_column, s.n, _fmt(s.bias), _fmt(s.scatter), _fmt(s.median),
             _fmt(s.robust_scatter)) for s in stats.values()]
    return (f"<p>{n_matched} stars matched by column <code>{html.escape(id_column)}</code>; differences are "
            "fitted − reference over stars not flagged bad.</p>\n"
            + _html_table(("label", "reference column", "N", "bias (mean)", "scatter (std)", "median",
                           "robust scatter (1.4826 MAD)"), rows, text_columns=(0, 1)))


def _emulator_html(emulator) -> str:
    wl = emulator.wavelength
    rows = [("kind", type(emulator).__name__), ("labels", emulator.n_labels), ("pixels", emulator.n_pixels)]
    if wl is not None:
        rows.append(("wavelength", f"{wl[0]:.2f}–{wl[-1]:.2f} Å ({emulator.wavelength_medium})"))
    for key in ("source_file", "training_set_hash", "written_by"):
        if emulator.meta.get(key):
            rows.append((key.replace("_", " "), str(emulator.meta[key])))
    space = emulator.label_space
    box = [(common.label_text(n), _fmt(lo, 5), _fmt(hi, 5)) for n, lo, hi in zip(space.names, space.x_min,
                                                                                space.x_max)]
    return ("<h3>Model</h3>\n" + _html_table(("", "value"), rows, text_columns=(0, 1)) + "\n<h3>Training box</h3>\n"
            + _html_table(("label", "min", "max"), box))


def _validation_html(validation) -> str:
    if not isinstance(validation, Mapping):
        return ""
    rows = []
    for k, v in validation.items():
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            rows.append((str(k), _fmt(float(v))))
    return "<h3>Emulation error</h3>\n" + _html_table(("statistic", "value"), rows) if rows else ""


def _history_html(history) -> str:
    rows = []
    for k, v in history.items():
        try:
            arr = np.asarray(v)
        except ValueError:
            continue
        if arr.ndim == 1 and arr.size and arr.dtype.kind in "fiu" and "loss" in str(k).lower():
            rows.append((str(k), arr.size, _fmt(arr[-1]), _fmt(np.nanmin(arr)), int(np.nanargmin(arr)) + 1))
    if not rows:
        return ""
    return "<h3>Training</h3>\n" + _html_table(("curve", "epochs", "last", "lowest", "epoch of lowest"), rows)


# -- the report -------------------------------------------------------------------------------------
def _gradient_reference(catalog, emulator):
    """The catalog's median star (not flagged bad) in the emulator's labels, inside its training box."""
    ref = {}
    good = common.good_rows(catalog, True)
    space = emulator.label_space
    for i, name in enumerate(space.names):
        if name in catalog.colnames and common.is_numeric_column(catalog, name):
            v = common.float_column(catalog, name)[good]
            if np.any(np.isfinite(v)):
                ref[name] = float(np.clip(np.nanmedian(v), space.x_min[i], space.x_max[i]))
    return ref


def write_report(catalog, out_dir, *, reference=None, emulator=None, validation=None, history=None, fits=None,
                 title: str = "paynekit report", id_column: str = "id", reference_labels=None,
                 reference_columns: dict | None = None, gradient_reference=None, gradient_labels=None,
                 line_positions=None, bit_names: dict | None = None, dpi: int = REPORT_DPI) -> Path:
    """Write PNG figures and an index.html that shows them with summary tables; return the index path.

    Parameters
    ----------
    catalog : astropy Table, mapping of columns, or path to a table file
        Results, one row per star (columns ``id``, labels with ``e_<label>``, ``snr``, ``chi2``,
        ``reduced_chi2``, ``result_flags``, ``flag_warn``, ``flag_bad``, ``flag_reason``; what is
        missing is skipped).
    out_dir : path
        Folder for index.html and the PNGs (created if needed; files of the same names are replaced).
    reference : table or path, optional
        Reference labels joined on ``id_column`` (survey values, or the truth of mock data);
        ``reference_labels`` picks labels, ``reference_columns`` maps a label to a reference column.
    emulator : Emulator or model path, optional
        Adds gradient spectra at ``gradient_reference`` (default: the catalog's median star) for
        ``gradient_labels`` (default all), with ``line_positions`` marked, and a summary of the model.
    validation : dict, array or JSON path, optional
        Emulation error (the result of :func:`paynekit.validation.emulation_error`, a per-pixel array,
        or residuals (N, P)); drawn on the emulator's wavelengths when they match.
    history : dict of lists or JSON path, optional
        Training and validation loss per epoch (default: ``emulator.meta["history"]`` when present).
    fits : sequence of records, optional
        A few fits to draw: tuples ``(id, wavelength, flux, ivar, model, mask, labels)`` or mappings
        with those keys (plus optional ``flags``, ``zoom_lines``, ``regions``, ``title``).
    """
    catalog = _read_table(catalog, "catalog")
    reference = None if reference is None else _read_table(reference, "reference")
    emulator = _read_emulator(emulator)
    records = _fit_records(fits)
    validation = as_record(_read_json(validation, "validation"))
    history = as_record(_read_json(history, "history"))
    if history is None and emulator is not None:
        history = emulator.meta.get("history") or emulator.meta.get("training_history")
    if history is not None and not isinstance(history, Mapping):
        raise InputError(f"history must be a dict of lists, got {type(history).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"out_dir {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    rep = _Report(out, int(dpi))
    summary = catalog_summary(catalog, bit_names)
    cols = catalog.colnames

    # catalog figures
    sec = "catalog"
    if "teff" in cols and "logg" in cols:
        rep.draw(sec, "kiel", "Kiel diagram",
                 "Effective temperature against surface gravity for the stars not flagged bad, coloured by "
                 "[Fe/H]; Teff decreases to the right and log g increases downwards, so giants lie at the top "
                 "right and dwarfs at the bottom left.", plots.plot_kiel, catalog,
                 color="fe_h" if "fe_h" in cols else None)
    else:
        rep.skip(sec, "Kiel diagram", "the catalog has no teff and logg columns")
    if common.label_columns(catalog):
        rep.draw(sec, "label_histograms", "Label distributions",
                 "Histogram of each fitted label over the stars not flagged bad (flagged bad stars as an "
                 "outline), with the median, the robust scatter and the median uncertainty.",
                 plots.plot_label_histograms, catalog)
    else:
        rep.skip(sec, "Label distributions", "the catalog has no label columns")
    if "fe_h" in cols and common.abundance_columns(catalog):
        rep.draw(sec, "abundance_trends", "Abundance trends",
                 "[X/Fe] = [X/H] − [Fe/H] against [Fe/H] for every element, with the running median in "
                 "0.1 dex bins of [Fe/H].", plots.plot_abundance_trends, catalog)
    else:
        rep.skip(sec, "Abundance trends", "the catalog has no fe_h and other [X/H] columns")
    if any(c in cols for c in ("reduced_chi2", "chi2", "snr")):
        rep.draw(sec, "fit_quality", "Fit quality",
                 "Distributions of reduced χ² and S/N, and reduced χ² against S/N; at high S/N the "
                 "emulator's own error makes reduced χ² grow above 1.", plots.plot_fit_quality, catalog)
    else:
        rep.skip(sec, "Fit quality", "the catalog has no chi2, reduced_chi2 or snr column")
    if any(c in cols for c in ("result_flags", "flag_warn", "flag_bad", "flag_reason")):
        rep.draw(sec, "flags", "Flags", "Stars per flag bit, the totals of warn and bad flags, and the "
                 "commonest reasons.", plots.plot_flags_summary, catalog, bit_names)
    else:
        rep.skip(sec, "Flags", "the catalog has no flag columns")

    # against reference labels
    comparison_html = ""
    if reference is not None:
        ia, _ = match_ids(catalog, reference, id_column)
        if ia.size == 0:
            rep.skip("reference", "Comparison with reference labels", f"no ids in common ({id_column!r})")
        else:
            stats = compare_labels(catalog, reference, reference_labels, id_column,
                                   reference_columns=reference_columns)
            comparison_html = _comparison_html(stats, ia.size, id_column)
            rep.draw("reference", "compare", "Fitted against reference labels",
                     "Top: fitted against reference value per label with the 1:1 line, bias (mean difference) "
                     "and scatter (standard deviation). Bottom: fitted − reference against S/N with the running "
                     "median.", plots.plot_compare, catalog, reference, reference_labels, id_column,
                     reference_columns=reference_columns)

    # emulator
    sec = "emulator"
    if emulator is not None:
        grad_ref = _gradient_reference(catalog, emulator) if gradient_reference is None else gradient_reference
        rep.draw(sec, "gradient_spectra", "Gradient spectra",
                 "Change of the normalised model flux for a typical step in each label (∂flux/∂label × step, "
                 "from the emulator's analytic Jacobian) at the reference star named in the title, as in "
                 "Ting et al. (2019); lines that respond to a label show where its information comes from.",
                 plots.plot_gradient_spectra, emulator, grad_ref, gradient_labels, line_positions)
    if validation is not None:
        wl = None
        if emulator is not None and emulator.wavelength is not None:
            curves, _, wl_dict = _per_pixel_curves(validation)
            if wl_dict is None and next(iter(curves.values())).size == emulator.n_pixels:
                wl = emulator.wavelength
        rep.draw(sec, "emulation_error", "Emulation error",
                 "Emulation error (emulator − reference spectrum) per pixel, and the cumulative distribution "
                 "of the per-pixel error over pixels.", plots.plot_emulation_error, validation, wl)
    if history is not None:
        rep.draw(sec, "training_curves", "Training history",
                 "Training and validation loss per epoch; the dot marks the lowest validation loss.",
                 plots.plot_training_curves, history)
    if emulator is None and validation is None and history is None:
        rep.skip(sec, "Emulator diagnostics", "no emulator, validation or training history given")

    # a few fits
    flag_text = {}
    if "flag_reason" in cols and id_column in cols:
        flag_text = dict(zip(common.string_column(catalog, id_column).astype(str),
                             common.string_column(catalog, "flag_reason")))
    for k, rec in enumerate(records):
        sid = str(rec["id"])
        wl = np.asarray(rec["wavelength"], dtype=np.float64)
        on_apogee = wl.size > 0 and wl.min() < APOGEE_CHIPS[-1][1] and wl.max() > APOGEE_CHIPS[0][0]
        rep.draw("fits", f"spectrum_{k:02d}_{_safe_name(sid)}", f"Fit of {sid}",
                 "Observed spectrum (black, ±1σ band) and best-fit model (orange) per chip, with "
                 "(flux − model)/σ below; grey: pixels not used in the fit.", plots.plot_fit,
                 wl, rec["flux"], rec["ivar"], rec["model"], mask=rec.get("mask"),
                 regions=rec.get("regions", APOGEE_CHIPS if on_apogee else None), labels=rec.get("labels"),
                 flags=rec.get("flags", flag_text.get(sid) or None), title=rec.get("title", sid),
                 zoom_lines=rec.get("zoom_lines"))

    html_text = _page(title, summary, comparison_html, emulator, validation, history, rep)
    index = out / INDEX_NAME
    index.write_text(html_text, encoding="utf-8")
    logger.info("wrote %s with %d figures", index, len(rep.figures))
    return index


_SECTIONS = (("catalog", "Catalog"), ("reference", "Against reference labels"), ("emulator", "Emulator"),
             ("fits", "Example fits"))


def _figure_html(fig: ReportFigure) -> str:
    from urllib.parse import quote

    return (f'<figure id="fig-{html.escape(Path(fig.file).stem)}">\n'
            f'<img src="{html.escape(quote(fig.file))}" alt="{html.escape(fig.title)}">\n'
            f"<figcaption><b>{html.escape(fig.title)}.</b> {html.escape(fig.caption)}</figcaption>\n</figure>")


def _page(title, summary, comparison_html, emulator, validation, history, rep) -> str:
    from . import __version__

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="meta">paynekit {html.escape(__version__)} · {stamp} · {summary["n_stars"]} stars</p>']
    present = [(key, name) for key, name in _SECTIONS if any(f.section == key for f in rep.figures)
               or (key == "reference" and comparison_html)]
    nav = ['<a href="#summary">Summary</a>'] + [f'<a href="#{k}">{html.escape(n)}</a>' for k, n in present]
    body.append("<nav>" + " ".join(nav) + "</nav>")
    body.append('<section id="summary"><h2>Summary</h2>')
    body.append(_summary_html(summary))
    body.append("</section>")
    for key, name in present:
        body.append(f'<section id="{key}"><h2>{html.escape(name)}</h2>')
        if key == "reference":
            body.append(comparison_html)
        if key == "emulator":
            if emulator is not None:
                body.append(_emulator_html(emulator))
            if validation is not None:
                body.append(_validation_html(validation))
            if history is not None:
                body.append(_history_html(history))
        body.extend(_figure_html(f) for f in rep.figures if f.section == key)
        body.append("</section>")
    if rep.skipped:
        body.append('<section id="skipped"><h2>Not drawn</h2><ul class="skipped">')
        body.extend(f"<li>{html.escape(t)}: {html.escape(r)}</li>" for _, t, r in rep.skipped)
        body.append("</ul></section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


__all__ = ["INDEX_NAME", "ReportFigure", "catalog_summary", "write_report"]
