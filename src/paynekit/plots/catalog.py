"""A catalog of results: Kiel diagram, label histograms, [X/Fe] trends, fit quality and flags."""

from __future__ import annotations

import logging
import math
import re

import numpy as np

from ..errors import InputError
from ._common import (
    ACCENT_COLOR,
    BAD_COLOR,
    abundance_columns,
    as_table,
    bool_column,
    element_symbol,
    finish,
    float_column,
    good_rows,
    is_numeric_column,
    label_columns,
    label_tex,
    log_axis,
    new_figure,
    require_columns,
    robust_limits,
    robust_stats,
    string_column,
    style,
)

logger = logging.getLogger(__name__)

#: Scatter plots with more points than this are rasterised inside vector outputs.
RASTERIZE_ABOVE = 2000
#: Width (dex) of the [Fe/H] bins of the running median in abundance trends; bins need this many stars.
TREND_BIN_WIDTH = 0.1
TREND_MIN_COUNT = 5
#: Number of bits in ``result_flags``.
N_FLAG_BITS = 64
#: How many distinct ``flag_reason`` entries the flags summary lists.
MAX_REASONS = 12


def _marker_size(n: int) -> float:
    return float(np.clip(4000.0 / max(n, 1), 1.0, 25.0))


def _empty(ax, text="no stars to show"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _num(value) -> str:
    """Short number for panel annotations: 4821 K rather than 4.82e+03."""
    return f"{value:.0f}" if np.isfinite(value) and abs(value) >= 100 else f"{value:.3g}"


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(n, ncols))
    return math.ceil(n / ncols), ncols


def running_median(x, y, width: float = TREND_BIN_WIDTH, min_count: int = TREND_MIN_COUNT):
    """Median of ``y`` in bins of ``x`` of the given width (bins with >= min_count finite points)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size == 0:
        return np.empty(0), np.empty(0)
    edges = np.arange(np.floor(x.min() / width) * width, x.max() + width, width)
    if edges.size < 2:
        edges = np.array([x.min(), x.min() + width])
    idx = np.clip(np.digitize(x, edges) - 1, 0, edges.size - 2)
    centers, medians = [], []
    for k in range(edges.size - 1):
        sel = idx == k
        if np.count_nonzero(sel) >= min_count:
            centers.append(0.5 * (edges[k] + edges[k + 1]))
            medians.append(np.median(y[sel]))
    return np.array(centers), np.array(medians)


def plot_kiel(table, *, teff: str = "teff", logg: str = "logg", color: str | None = "fe_h",
              exclude_bad: bool = True, cmap: str = "viridis", path=None, dpi=None, figsize=(5.5, 4.6)):
    """Kiel diagram: Teff against log g, coloured by ``color`` (default [Fe/H]).

    Both axes run the astronomers' way: Teff decreases to the right and log g increases downwards.
    Rows with ``flag_bad`` are left out when ``exclude_bad`` (their number is given in the title).
    """
    table = as_table(table)
    require_columns(table, [teff, logg])
    show = good_rows(table, exclude_bad)
    t, g = float_column(table, teff), float_column(table, logg)
    show &= np.isfinite(t) & np.isfinite(g)
    n_bad = int(np.count_nonzero(~good_rows(table, exclude_bad)))
    with style():
        fig = new_figure(figsize)
        ax = fig.add_subplot()
        n = int(show.sum())
        kwargs = {"s": _marker_size(n), "rasterized": n > RASTERIZE_ABOVE, "linewidths": 0}
        if color is not None and color in table.colnames:
            c = float_column(table, color)[show]
            lim = robust_limits(c, 1, 99, pad=0.0, min_span=0.1) or (-1.0, 1.0)
            sc = ax.scatter(t[show], g[show], c=c, cmap=cmap, vmin=lim[0], vmax=lim[1], **kwargs)
            fig.colorbar(sc, ax=ax, label=label_tex(color))
        else:
            ax.scatter(t[show], g[show], color=ACCENT_COLOR, **kwargs)
        if n == 0:
            _empty(ax)
        for axis, values in ((ax.set_xlim, t[show]), (ax.set_ylim, g[show])):
            lim = robust_limits(values, 0.1, 99.9, min_span=1e-3)
            if lim is not None:
                axis(lim[1], lim[0])  # inverted: Teff decreasing to the right, log g increasing downwards
        if n == 0:
            ax.invert_xaxis()
            ax.invert_yaxis()
        ax.set_xlabel(label_tex(teff))
        ax.set_ylabel(label_tex(logg))
        title = f"{n} stars"
        if exclude_bad and n_bad:
            title += f" ({n_bad} flagged bad not shown)"
        ax.set_title(title)
        return finish(fig, path, dpi)


def plot_label_histograms(table, labels=None, *, bins: int = 30, exclude_bad: bool = True, ncols: int = 5,
                          path=None, dpi=None, figsize=None):
    """One histogram per label (default: every column ``x`` with an ``e_x`` column).

    Stars flagged bad are left out of the filled histogram and drawn as an outline when ``exclude_bad``.
    Each panel gives the median, the robust scatter (1.4826 MAD) and the median uncertainty ``e_x``.
    """
    table = as_table(table)
    labels = list(label_columns(table) if labels is None else labels)
    if not labels:
        raise InputError("table has no label columns (a column x with an uncertainty column e_x)")
    require_columns(table, labels)
    show = good_rows(table, exclude_bad)
    nrows, ncols = _grid(len(labels), ncols)
    if figsize is None:
        figsize = (2.3 * ncols + 0.4, 1.9 * nrows + 0.4)
    with style():
        fig = new_figure(figsize)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, name in zip(axes, labels):
            v = float_column(table, name)
            lim = robust_limits(v[show], 0.5, 99.5, pad=0.02, min_span=1e-6)
            if lim is None:
                _empty(ax, "no finite values")
                ax.set_xlabel(label_tex(name))
                continue
            edges = np.linspace(lim[0], lim[1], bins + 1)
            ax.hist(v[show & np.isfinite(v)], bins=edges, color=ACCENT_COLOR, alpha=0.75)
            bad = ~show & np.isfinite(v)
            if exclude_bad and bad.any():
                ax.hist(np.clip(v[bad], lim[0], lim[1]), bins=edges, histtype="step", color=BAD_COLOR,
                        label="flagged bad")
            med, sig = robust_stats(v[show])
            text = f"median {_num(med)}\nσ {_num(sig)}"
            if f"e_{name}" in table.colnames:
                text += f"\nmedian e {_num(np.nanmedian(float_column(table, f'e_{name}')[show]))}"
            ax.text(0.97, 0.95, text, ha="right", va="top", transform=ax.transAxes, fontsize=7,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 1})
            ax.set_xlabel(label_tex(name))
        for ax in axes[len(labels):]:
            ax.set_visible(False)
        fig.suptitle(f"{int(show.sum())} stars" + (" (flagged bad stars in outline)" if exclude_bad else ""))
        return finish(fig, path, dpi)


def _xfe_label(column: str) -> str:
    return f"[{element_symbol(column[:-2])}/Fe]"


def _trend_columns(table, fe_column):
    """(column, y values, axis label) per [X/Fe] panel: x_h - fe_h, or an x_fe column as it is."""
    fe = float_column(table, fe_column)
    out = [(c, float_column(table, c) - fe, _xfe_label(c)) for c in abundance_columns(table, fe_column)]
    have = {c[:-2].lower() for c, _, _ in out}
    for c in table.colnames:
        m = re.match(r"^([a-z0-9]+)_fe$", c.lower())
        if m and m.group(1) not in have and m.group(1) != "m" and is_numeric_column(table, c):
            out.append((c, float_column(table, c), label_tex(c)))
    return out


def plot_abundance_trends(table, elements=None, *, fe_column: str = "fe_h", exclude_bad: bool = True,
                          ncols: int = 4, path=None, dpi=None, figsize=None):
    """[X/Fe] = x_h - fe_h against [Fe/H], one panel per element, with a running median.

    ``elements`` selects ``<x>_h`` columns (default: all but [Fe/H] and [M/H]); catalogs that store
    ``<x>_fe`` columns directly are drawn as they are.
    """
    table = as_table(table)
    require_columns(table, [fe_column])
    panels = _trend_columns(table, fe_column)
    if elements is not None:
        require_columns(table, list(elements))
        fe = float_column(table, fe_column)
        panels = [(c, float_column(table, c) - fe, _xfe_label(c)) for c in elements]
    if not panels:
        raise InputError(f"table has no [X/H] columns besides {fe_column!r} to draw [X/Fe] from")
    show = good_rows(table, exclude_bad)
    fe = float_column(table, fe_column)
    nrows, ncols = _grid(len(panels), ncols)
    if figsize is None:
        figsize = (2.6 * ncols + 0.4, 2.1 * nrows + 0.4)
    with style():
        fig = new_figure(figsize)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True).ravel()
        xlim = robust_limits(fe[show], 0.5, 99.5, min_span=0.1)
        for ax, (name, y, ylabel) in zip(axes, panels):
            ok = show & np.isfinite(y) & np.isfinite(fe)
            n = int(ok.sum())
            ax.scatter(fe[ok], y[ok], s=_marker_size(n) * 0.6, color="0.45", linewidths=0,
                       rasterized=n > RASTERIZE_ABOVE)
            xc, ym = running_median(fe[ok], y[ok])
            if xc.size:
                ax.plot(xc, ym, color=ACCENT_COLOR, lw=1.5)
            ax.axhline(0.0, color="0.6", lw=0.6, ls=":")
            ylim = robust_limits(y[ok], 1, 99, min_span=0.2)
            if ylim is not None:
                ax.set_ylim(ylim)
            if xlim is not None:
                ax.set_xlim(xlim)
            if n == 0:
                _empty(ax)
            ax.set_ylabel(ylabel)
        for ax in axes[:len(panels)]:
            ax.tick_params(labelbottom=True)
            ax.set_xlabel(label_tex(fe_column))
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"[X/Fe] against {label_tex(fe_column)} ({int(show.sum())} stars; line: running median)")
        return finish(fig, path, dpi)


def _log_bins(values, n=30):
    v = values[np.isfinite(values) & (values > 0)]
    if v.size == 0:
        return None
    lo, hi = np.percentile(v, [0.5, 99.5])
    lo, hi = lo / 1.2, hi * 1.2
    return np.geomspace(lo, hi, n + 1)


def plot_fit_quality(table, *, exclude_bad: bool = False, path=None, dpi=None, figsize=None):
    """Distributions of reduced χ² (or χ²) and S/N, and reduced χ² against S/N (bad fits highlighted)."""
    table = as_table(table)
    chi_col = next((c for c in ("reduced_chi2", "chi2") if c in table.colnames), None)
    snr_col = "snr" if "snr" in table.colnames else None
    if chi_col is None and snr_col is None:
        raise InputError(f"table needs a 'reduced_chi2', 'chi2' or 'snr' column; it has {list(table.colnames)}")
    show = good_rows(table, exclude_bad)
    bad = bool_column(table, "flag_bad") if "flag_bad" in table.colnames else np.zeros(len(table), bool)
    panels = [c for c in (chi_col, snr_col) if c] + (["scatter"] if chi_col and snr_col else [])
    if figsize is None:
        figsize = (3.6 * len(panels) + 0.4, 3.2)
    names = {"reduced_chi2": r"reduced $\chi^2$", "chi2": r"$\chi^2$", "snr": "S/N"}
    with style():
        fig = new_figure(figsize)
        axes = fig.subplots(1, len(panels), squeeze=False).ravel()
        for ax, what in zip(axes, panels):
            if what == "scatter":
                x, y = float_column(table, snr_col), float_column(table, chi_col)
                ok = show & np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
                n = int(ok.sum())
                ax.scatter(x[ok & ~bad], y[ok & ~bad], s=_marker_size(n), color=ACCENT_COLOR, linewidths=0,
                           rasterized=n > RASTERIZE_ABOVE, label="good")
                if (ok & bad).any():
                    ax.scatter(x[ok & bad], y[ok & bad], s=_marker_size(n) * 1.5, color=BAD_COLOR, marker="x",
                               linewidths=0.8, label="flagged bad")
                    ax.legend(loc="upper left")
                if n == 0:
                    _empty(ax)
                else:
                    log_axis(ax, "x")
                    log_axis(ax, "y")
                if chi_col == "reduced_chi2":
                    ax.axhline(1.0, color="0.5", lw=0.6, ls=":")
                ax.set_xlabel(names[snr_col])
                ax.set_ylabel(names[chi_col])
                continue
            v = float_column(table, what)
            med, _ = robust_stats(v[show])
            edges = _log_bins(v[show])
            if edges is None:
                _empty(ax, "no positive values")
            else:
                ax.hist(np.clip(v[show & np.isfinite(v)], edges[0], edges[-1]), bins=edges, color=ACCENT_COLOR,
                        alpha=0.75, label="all stars" if not exclude_bad else "not flagged bad")
                if not exclude_bad and (show & bad).any():
                    ax.hist(np.clip(v[show & bad & np.isfinite(v)], edges[0], edges[-1]), bins=edges,
                            histtype="step", color=BAD_COLOR, label="flagged bad")
                    ax.legend(loc="upper right")
                log_axis(ax, "x")
                ax.axvline(med, color="0.2", lw=0.8, ls="--")
                ax.text(0.03, 0.95, f"median {med:.3g}", transform=ax.transAxes, va="top", fontsize=8)
            ax.set_xlabel(names[what])
            ax.set_ylabel("stars")
        fig.suptitle(f"Fit quality ({int(show.sum())} stars)")
        return finish(fig, path, dpi)


def _default_bit_names() -> dict[int, str]:
    """{bit: name} from :func:`paynekit.flags.decode_flags` (empty if that module is not there)."""
    try:
        from ..flags import decode_flags
    except ImportError:  # pragma: no cover - paynekit.flags is part of the package
        return {}
    names = {}
    for b in range(N_FLAG_BITS):
        decoded = decode_flags(1 << b)
        if decoded:
            names[b] = decoded[0]
    return names


_NUMBER = re.compile(r"(?<![A-Za-z_\d])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?%?")


def reason_category(reason: str) -> str:
    """A flag reason with its numbers replaced by '#', so that "S/N 23.4 < 70" and "S/N 41 < 70" count
    as one reason."""
    return " ".join(_NUMBER.sub("#", reason).split())


def flag_counts(table, bit_names: dict | None = None) -> dict:
    """Counts of stars per flag.

    Returns ``{"n_stars", "n_warn", "n_bad", "bits": [(bit, name, count), ...], "reasons": [(reason, count)]}``;
    ``bits`` lists every named bit (also with count 0) and any unnamed bit that is set. Bit names come
    from ``bit_names`` ({bit: name}) or else from :func:`paynekit.flags.decode_flags`. ``reasons``
    counts the entries of ``flag_reason`` (split at ";", numbers replaced by "#"), commonest first.
    """
    table = as_table(table)
    names = dict(_default_bit_names() if bit_names is None else bit_names)
    out = {"n_stars": len(table), "n_warn": None, "n_bad": None, "bits": [], "reasons": []}
    for key, col in (("n_warn", "flag_warn"), ("n_bad", "flag_bad")):
        if col in table.colnames:
            out[key] = int(bool_column(table, col).sum())
    if "result_flags" in table.colnames:
        raw = np.ma.filled(np.ma.asarray(table["result_flags"]), 0)
        if raw.dtype.kind not in "iu":
            raise InputError(f"result_flags must be an integer bit mask column, got dtype {raw.dtype}")
        bits = raw.astype(np.int64).view(np.uint64)
        counts = [int(np.count_nonzero((bits >> np.uint64(b)) & np.uint64(1))) for b in range(N_FLAG_BITS)]
        for b in range(N_FLAG_BITS):
            if b in names or counts[b]:
                out["bits"].append((b, str(names.get(b, f"bit {b}")), counts[b]))
    if "flag_reason" in table.colnames:
        tally: dict[str, int] = {}
        for text in string_column(table, "flag_reason"):
            for part in {reason_category(p) for p in text.split(";") if p.strip()}:
                tally[part] = tally.get(part, 0) + 1
        out["reasons"] = sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))
    return out


def plot_flags_summary(table, bit_names: dict | None = None, *, path=None, dpi=None, figsize=None):
    """Stars per flag bit (``result_flags``), good/warn/bad totals, and the commonest ``flag_reason``s."""
    table = as_table(table)
    if not any(c in table.colnames for c in ("result_flags", "flag_warn", "flag_bad", "flag_reason")):
        raise InputError("table has none of the flag columns result_flags, flag_warn, flag_bad, flag_reason")
    counts = flag_counts(table, bit_names)
    panels = []
    if counts["bits"]:
        panels.append("bits")
    if counts["n_warn"] is not None or counts["n_bad"] is not None:
        panels.append("totals")
    if counts["reasons"]:
        panels.append("reasons")
    if not panels:
        panels = ["totals"]
    n_rows = max([len(counts["bits"]), min(len(counts["reasons"]), MAX_REASONS), 3])
    if figsize is None:
        figsize = (3.8 * len(panels) + 0.6, 0.25 * n_rows + 1.6)
    with style():
        fig = new_figure(figsize)
        axes = fig.subplots(1, len(panels), squeeze=False).ravel()
        for ax, what in zip(axes, panels):
            if what == "bits":
                names = [f"{name} ({b})" for b, name, _ in counts["bits"]]
                vals = [c for _, _, c in counts["bits"]]
                title = "result_flags bits"
            elif what == "totals":
                n, nw, nb = counts["n_stars"], counts["n_warn"] or 0, counts["n_bad"] or 0
                names, vals = ["all", "warn", "bad"], [n, nw, nb]
                title = "stars"
            else:
                top = counts["reasons"][:MAX_REASONS]
                names, vals = [r for r, _ in top], [c for _, c in top]
                title = "flag_reason"
            y = np.arange(len(names))
            colors = [BAD_COLOR if (what == "totals" and name == "bad") else ACCENT_COLOR for name in names]
            ax.barh(y, vals, color=colors)
            ax.set_yticks(y, names, fontsize=7)
            ax.tick_params(axis="y", right=False, length=0)
            ax.invert_yaxis()
            top = max(vals) if vals else 1
            for yi, v in zip(y, vals):
                ax.text(v + 0.01 * max(top, 1), yi, str(v), va="center", fontsize=7)
            ax.set_xlim(0, 1.15 * max(top, 1))
            ax.set_xlabel("stars")
            ax.set_title(title)
        fig.suptitle(f"Flags ({counts['n_stars']} stars)")
        return finish(fig, path, dpi)


__all__ = [
    "flag_counts",
    "plot_abundance_trends",
    "plot_fit_quality",
    "plot_flags_summary",
    "plot_kiel",
    "plot_label_histograms",
    "running_median",
]
