"""Fitted labels against reference labels (survey values, or the truth of mock data), joined by id."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ._common import (
    ACCENT_COLOR,
    MODEL_COLOR,
    as_table,
    finish,
    float_column,
    good_rows,
    label_columns,
    label_tex,
    label_text,
    log_axis,
    new_figure,
    require_columns,
    robust_limits,
    robust_stats,
    string_column,
    style,
)
from .catalog import RASTERIZE_ABOVE, _marker_size, running_median

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelComparison:
    """Fitted minus reference values of one label over the matched stars.

    ``bias`` and ``scatter`` are the mean and standard deviation of the differences; ``median`` and
    ``robust_scatter`` (1.4826 MAD) are their outlier-resistant counterparts.
    """

    label: str
    reference_column: str
    n: int
    bias: float
    scatter: float
    median: float
    robust_scatter: float


def match_ids(table, reference, id_column: str = "id") -> tuple[np.ndarray, np.ndarray]:
    """Row indices (into table, into reference) of the stars whose ``id_column`` values agree.

    Ids are compared as strings; duplicate ids in either table are an error.
    """
    table, reference = as_table(table, "table"), as_table(reference, "reference")
    require_columns(table, [id_column], "table")
    require_columns(reference, [id_column], "reference")
    a, b = string_column(table, id_column).astype(str), string_column(reference, id_column).astype(str)
    for name, ids in (("table", a), ("reference", b)):
        uniq, counts = np.unique(ids, return_counts=True)
        if np.any(counts > 1):
            raise InputError(f"{name} has duplicate values in column {id_column!r}, e.g. {uniq[counts > 1][:3]}")
    _, ia, ib = np.intersect1d(a, b, assume_unique=True, return_indices=True)
    order = np.argsort(ia)
    return ia[order], ib[order]


def _reference_column(reference, label, reference_columns, required):
    if reference_columns and label in reference_columns:
        col = reference_columns[label]
        require_columns(reference, [col], "reference")
        return col
    if label in reference.colnames:
        return label
    lower = {c.lower(): c for c in reference.colnames}
    if label.lower() in lower:
        return lower[label.lower()]
    if required:
        raise InputError(f"reference has no column for label {label!r} (give reference_columns={{{label!r}: ...}}); "
                         f"it has {list(reference.colnames)}")
    return None


def _resolve(table, reference, labels, reference_columns):
    if labels is None:
        pairs = [(lab, _reference_column(reference, lab, reference_columns, False)) for lab in label_columns(table)]
        pairs = [(lab, col) for lab, col in pairs if col is not None]
        if not pairs:
            raise InputError("table and reference share no label columns; pass labels=[...] and reference_columns")
        return pairs
    labels = list(labels)
    require_columns(table, labels, "table")
    return [(lab, _reference_column(reference, lab, reference_columns, True)) for lab in labels]


def compare_labels(table, reference, labels=None, id_column: str = "id", *, reference_columns: dict | None = None,
                   exclude_bad: bool = True) -> dict[str, LabelComparison]:
    """Bias and scatter of fitted minus reference labels over the stars matched by ``id_column``.

    ``labels`` defaults to the catalog's label columns that the reference also has (same name, or same
    name in another case); ``reference_columns`` maps a label to a differently named reference column.
    Stars with ``flag_bad`` are left out when ``exclude_bad``.
    """
    table, reference = as_table(table, "table"), as_table(reference, "reference")
    ia, ib = match_ids(table, reference, id_column)
    keep = good_rows(table, exclude_bad)[ia]
    ia, ib = ia[keep], ib[keep]
    out = {}
    for label, col in _resolve(table, reference, labels, reference_columns):
        d = float_column(table, label)[ia] - float_column(reference, col)[ib]
        d = d[np.isfinite(d)]
        med, rob = robust_stats(d)
        out[label] = LabelComparison(label, col, int(d.size), float(np.mean(d)) if d.size else np.nan,
                                     float(np.std(d)) if d.size else np.nan, med, rob)
    return out


def _fmt(value, label, signed=False):
    digits = 0 if label.lower() == "teff" else 3
    return f"{value:{'+' if signed else ''}.{digits}f}" if np.isfinite(value) else "nan"


def plot_compare(table, reference, labels=None, id_column: str = "id", *, reference_columns: dict | None = None,
                 snr_column: str = "snr", exclude_bad: bool = True, ncols: int = 4, path=None, dpi=None,
                 figsize=None):
    """One-to-one panels (fitted against reference) with bias and scatter, and residuals against S/N.

    For each label the upper panel shows fitted against reference values with the 1:1 line and the
    bias (mean difference), scatter (standard deviation), robust scatter and number of stars; the lower
    panel shows fitted minus reference against S/N (``snr_column`` of the catalog, else of the
    reference) with a running median, or a histogram of the differences when neither has S/N.
    """
    table, reference = as_table(table, "table"), as_table(reference, "reference")
    stats = compare_labels(table, reference, labels, id_column, reference_columns=reference_columns,
                           exclude_bad=exclude_bad)
    ia, ib = match_ids(table, reference, id_column)
    keep = good_rows(table, exclude_bad)[ia]
    ia, ib = ia[keep], ib[keep]
    if snr_column in table.colnames:
        snr = float_column(table, snr_column)[ia]
    elif snr_column in reference.colnames:
        snr = float_column(reference, snr_column)[ib]
    else:
        snr = None
    n = len(stats)
    ncols = max(1, min(n, ncols))
    nrows = math.ceil(n / ncols)
    if figsize is None:
        figsize = (3.0 * ncols + 0.4, 4.3 * nrows + 0.5)
    with style():
        from matplotlib.ticker import MaxNLocator

        fig = new_figure(figsize)
        outer = fig.add_gridspec(nrows, 1)
        subs = [outer[r].subgridspec(2, ncols, height_ratios=(2.2, 1.0)) for r in range(nrows)]
        for k, (label, st) in enumerate(stats.items()):
            sub = subs[k // ncols]
            ax1 = fig.add_subplot(sub[0, k % ncols])
            ax2 = fig.add_subplot(sub[1, k % ncols])
            x = float_column(reference, st.reference_column)[ib]
            y = float_column(table, label)[ia]
            ok = np.isfinite(x) & np.isfinite(y)
            m = int(ok.sum())
            kw = {"s": _marker_size(m), "color": ACCENT_COLOR, "linewidths": 0, "rasterized": m > RASTERIZE_ABOVE}
            ax1.scatter(x[ok], y[ok], **kw)
            lim = robust_limits(np.concatenate([x[ok], y[ok]]), 0.5, 99.5, min_span=1e-6)
            if lim is not None:
                ax1.plot(lim, lim, color="0.3", lw=0.8, ls="--")
                ax1.set_xlim(lim)
                ax1.set_ylim(lim)
            ax1.set_aspect("equal", adjustable="box")
            ax1.xaxis.set_major_locator(MaxNLocator(5))
            ax1.yaxis.set_major_locator(MaxNLocator(5))
            ax1.set_xlabel(f"reference {label_tex(label)}")
            ax1.set_ylabel(f"fitted {label_tex(label)}")
            ax1.text(0.04, 0.96, f"bias {_fmt(st.bias, label, True)}\nσ {_fmt(st.scatter, label)}"
                     f" (robust {_fmt(st.robust_scatter, label)})\nN = {st.n}",
                     transform=ax1.transAxes, va="top", fontsize=7)
            d = y - x
            dlim = robust_limits(d[ok], 1, 99, min_span=1e-6)
            if snr is not None and np.any(ok & np.isfinite(snr) & (snr > 0)):
                okk = ok & np.isfinite(snr) & (snr > 0)
                ax2.scatter(snr[okk], d[okk], **kw)
                xc, ym = running_median(np.log10(snr[okk]), d[okk], width=0.1)
                if xc.size:
                    ax2.plot(10**xc, ym, color=MODEL_COLOR, lw=1.2)
                log_axis(ax2, "x")
                ax2.axhline(0.0, color="0.3", lw=0.8, ls="--")
                ax2.set_xlabel("S/N")
                if dlim is not None:
                    ax2.set_ylim(dlim)
                ax2.set_ylabel(f"Δ{label_text(label, units=False)}")
            else:
                if dlim is not None:
                    ax2.hist(np.clip(d[ok], *dlim), bins=30, range=dlim, color=ACCENT_COLOR)
                ax2.axvline(0.0, color="0.3", lw=0.8, ls="--")
                ax2.set_xlabel(f"Δ{label_text(label, units=False)} (fitted − reference)")
                ax2.set_ylabel("stars")
        n_matched = len(ia)
        fig.suptitle(f"Fitted against reference labels ({n_matched} matched stars by {id_column!r})")
        return finish(fig, path, dpi)


__all__ = ["LabelComparison", "compare_labels", "match_ids", "plot_compare"]
