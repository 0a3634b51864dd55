"""Shared helpers for the figures: lazy matplotlib, local style, label names, catalog columns.

Figures are built as :class:`matplotlib.figure.Figure` objects directly, never through ``pyplot``: no
backend is selected, no global figure registry grows, nothing is shown, and PNGs are rendered with Agg.
Style settings apply only inside :func:`style` (``matplotlib.rc_context``); global rcParams are never
changed.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..checks import as_float_array
from ..errors import InputError

logger = logging.getLogger(__name__)

#: Resolution of saved PNGs unless a function is given ``dpi``.
DEFAULT_DPI = 100

#: Local style, applied with ``matplotlib.rc_context`` while a figure is built and saved.
STYLE = {
    "font.size": 9.0,
    "axes.titlesize": 9.0,
    "axes.labelsize": 9.0,
    "legend.fontsize": 8.0,
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
    "xtick.direction": "in",
    "ytick.direction": "in",
    "xtick.top": True,
    "ytick.right": True,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "axes.facecolor": "white",
}

#: Colours used throughout (colour-blind safe: Okabe & Ito).
DATA_COLOR = "0.15"
MODEL_COLOR = "#D55E00"
MASK_COLOR = "0.85"
ACCENT_COLOR = "#0072B2"
BAD_COLOR = "#CC79A7"

#: Column-name prefixes that mark uncertainties, covariances and flags rather than labels.
_NON_LABEL_PREFIXES = ("e_", "raw_e_", "rho_", "flag_")

_UNITS = {"teff": "K", "v_turb": "km/s", "v_micro": "km/s", "vmicro": "km/s", "v_macro": "km/s",
          "vmacro": "km/s", "v_rel": "km/s", "vsini": "km/s", "v_sini": "km/s"}
_PLAIN_NAMES = {"teff": "Teff", "logg": "log g", "v_turb": "v_micro", "v_micro": "v_micro", "vmicro": "v_micro",
                "v_macro": "v_macro", "vmacro": "v_macro", "v_rel": "v_rel", "vsini": "v sin i",
                "v_sini": "v sin i", "c12_c13": "12C/13C", "mh": "[M/H]", "feh": "[Fe/H]"}
_TEX_NAMES = {"teff": r"$T_\mathrm{eff}$", "logg": r"$\log g$", "v_turb": r"$v_\mathrm{micro}$",
              "v_micro": r"$v_\mathrm{micro}$", "vmicro": r"$v_\mathrm{micro}$", "v_macro": r"$v_\mathrm{macro}$",
              "vmacro": r"$v_\mathrm{macro}$", "v_rel": r"$v_\mathrm{rel}$", "vsini": r"$v\sin i$",
              "v_sini": r"$v\sin i$", "c12_c13": r"$^{12}$C/$^{13}$C"}
_RATIO = re.compile(r"^([a-z0-9]+)_(h|fe|m)$")


def matplotlib():
    """Import matplotlib on first use, with a clear error when the ``plot`` extra is missing."""
    try:
        import matplotlib as mpl
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("paynekit.plots needs matplotlib: pip install 'paynekit[plot]'") from None
    return mpl


def new_figure(figsize):
    """A pyplot-free Figure with constrained layout (rendered by Agg when saved as PNG)."""
    matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


@contextlib.contextmanager
def style():
    """Apply :data:`STYLE` while building and saving one figure; restores rcParams afterwards."""
    mpl = matplotlib()
    with mpl.rc_context(STYLE):
        yield


def finish(fig, path, dpi):
    """Save ``fig`` to ``path`` (format from the suffix, PNG by default) when a path is given."""
    if path is not None:
        path = Path(path)
        if not path.parent.is_dir():
            raise InputError(f"path {str(path)!r}: folder {str(path.parent)!r} does not exist")
        fig.savefig(path, dpi=DEFAULT_DPI if dpi is None else dpi)
        logger.debug("wrote %s", path)
    return fig


# -- label names ----------------------------------------------------------------------------------
def element_symbol(symbol: str) -> str:
    return "α" if symbol == "alpha" else symbol.capitalize()


def label_text(name: str, units: bool = True) -> str:
    """Plain-text name of a label for HTML and titles: ``fe_h`` -> ``[Fe/H]``, ``teff`` -> ``Teff [K]``."""
    key = name.lower()
    match = _RATIO.match(key)
    if key in _PLAIN_NAMES:
        text = _PLAIN_NAMES[key]
    elif match and key != "c12_c13":
        text = f"[{element_symbol(match.group(1))}/{match.group(2).capitalize()}]"
    else:
        text = name
    unit = _UNITS.get(key)
    return f"{text} [{unit}]" if units and unit else text


def label_tex(name: str, units: bool = True) -> str:
    """Axis label of a label in mathtext: ``teff`` -> ``$T_\\mathrm{eff}$ [K]``, ``mg_h`` -> ``[Mg/H]``."""
    key = name.lower()
    if key not in _TEX_NAMES:
        return label_text(name, units)
    unit = _UNITS.get(key)
    return f"{_TEX_NAMES[key]} [{unit}]" if units and unit else _TEX_NAMES[key]


def format_label_value(name: str, value) -> str:
    """``teff``, 4858.47 -> ``Teff = 4858 K``; a (value, error) pair gets ``± error``."""
    err = None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        value, err = value
    key = name.lower()
    digits = 0 if key in ("teff", "c12_c13") else 2
    unit = _UNITS.get(key)
    text = f"{label_text(name, units=False)} = {float(value):.{digits}f}"
    if err is not None and np.isfinite(float(err)):
        text += f" ± {float(err):.{digits}f}"
    return f"{text} {unit}" if unit else text


# -- catalog tables -------------------------------------------------------------------------------
def as_table(table, name: str = "table"):
    """An astropy Table from a Table, a mapping of column arrays or a pandas DataFrame (not copied)."""
    from astropy.table import Table

    if isinstance(table, Table):
        return table
    if hasattr(table, "to_numpy") and hasattr(table, "columns"):
        return Table.from_pandas(table)
    if isinstance(table, Mapping):
        return Table({k: np.asarray(v) for k, v in table.items()})
    raise InputError(f"{name} must be an astropy Table, a mapping of columns or a DataFrame, "
                     f"got {type(table).__name__}")


def require_columns(table, columns, name: str = "table") -> None:
    missing = [c for c in columns if c not in table.colnames]
    if missing:
        raise InputError(f"{name} has no column(s) {missing}; it has {list(table.colnames)}")


def float_column(table, column: str) -> np.ndarray:
    """A column as a new float64 array; masked entries become NaN."""
    col = table[column]
    values = np.ma.getdata(col).astype(np.float64, copy=True)
    mask = np.ma.getmaskarray(col)
    if mask.ndim > 1:
        mask = mask.any(axis=tuple(range(1, mask.ndim)))
    if mask.any():
        values[mask] = np.nan
    return values


def bool_column(table, column: str) -> np.ndarray:
    """A boolean column (masked entries -> False)."""
    col = table[column]
    return np.ma.filled(np.ma.asarray(col).astype(bool), False)


def string_column(table, column: str) -> np.ndarray:
    col = table[column]
    values = np.ma.getdata(col)
    out = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    mask = np.ma.getmaskarray(col)
    out[mask] = ""
    return out


def good_rows(table, exclude_bad: bool) -> np.ndarray:
    """True for rows to draw: all rows, or those without ``flag_bad`` when ``exclude_bad``."""
    n = len(table)
    if exclude_bad and "flag_bad" in table.colnames:
        return ~bool_column(table, "flag_bad")
    return np.ones(n, dtype=bool)


def is_numeric_column(table, column: str) -> bool:
    kind = np.asarray(np.ma.getdata(table[column])).dtype.kind
    return kind in "fiu" and table[column].ndim == 1


def label_columns(table) -> list[str]:
    """The label columns of a catalog: numeric columns ``x`` with an uncertainty column ``e_x``.

    Falls back to the known names (teff, logg, ``*_h``, ``*_fe``) when no ``e_`` columns exist.
    """
    names = [c for c in table.colnames
             if not c.startswith(_NON_LABEL_PREFIXES) and f"e_{c}" in table.colnames and is_numeric_column(table, c)]
    if names:
        return names
    return [c for c in table.colnames
            if not c.startswith(_NON_LABEL_PREFIXES) and is_numeric_column(table, c)
            and (c in ("teff", "logg") or (_RATIO.match(c.lower()) and c.lower() != "c12_c13"))]


def abundance_columns(table, fe_column: str = "fe_h") -> list[str]:
    """``<x>_h`` columns other than [Fe/H] and [M/H] (from which [X/Fe] = x_h - fe_h is formed)."""
    out = []
    for c in table.colnames:
        m = _RATIO.match(c.lower())
        if (m and m.group(2) == "h" and c != fe_column and m.group(1) not in ("m", "fe")
                and not c.startswith(_NON_LABEL_PREFIXES) and is_numeric_column(table, c)):
            out.append(c)
    return out


def robust_stats(values) -> tuple[float, float]:
    """Median and 1.4826 * median absolute deviation of the finite values (NaN when none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.nan, np.nan
    med = float(np.median(v))
    return med, float(1.4826 * np.median(np.abs(v - med)))


def robust_limits(values, lo: float = 0.5, hi: float = 99.5, pad: float = 0.05, min_span: float = 0.0):
    """Axis limits from percentiles of the finite values, padded; None when there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    a, b = np.percentile(v, [lo, hi])
    span = max(b - a, min_span, 1e-12 * max(abs(a), abs(b), 1.0))
    mid = 0.5 * (a + b)
    a, b = min(a, mid - span / 2), max(b, mid + span / 2)
    return a - pad * span, b + pad * span


def log_axis(ax, which: str = "x") -> None:
    """Log scale with plain-number tick labels at 1, 2, 5 x 10^k and no minor labels (no clutter on
    axes that span less than a decade, such as S/N from 20 to 300)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def pixel_edges(wavelength: np.ndarray) -> np.ndarray:
    """P+1 pixel boundaries: midpoints between neighbours, extrapolated by half a pixel at the ends."""
    wl = wavelength
    mid = 0.5 * (wl[1:] + wl[:-1])
    return np.concatenate([[wl[0] - (mid[0] - wl[0])], mid, [wl[-1] + (wl[-1] - mid[-1])]])


def true_runs(flags: np.ndarray) -> np.ndarray:
    """(K, 2) start and stop (exclusive) indices of the runs of True in a 1-D boolean array."""
    padded = np.concatenate([[False], np.asarray(flags, dtype=bool), [False]])
    change = np.flatnonzero(padded[1:] != padded[:-1])
    return change.reshape(-1, 2)


def break_gaps(wavelength: np.ndarray, *arrays, factor: float = 5.0):
    """Insert NaN where the wavelength step exceeds ``factor`` times the median step (chip gaps),
    so that lines are not drawn across gaps. Returns the new wavelength and arrays."""
    if wavelength.size < 3:
        return (wavelength, *arrays)
    step = np.diff(wavelength)
    gaps = np.flatnonzero(step > factor * np.median(step)) + 1
    if gaps.size == 0:
        return (wavelength, *arrays)
    wl = np.insert(wavelength, gaps, np.nan)
    return (wl, *(np.insert(np.asarray(a, dtype=np.float64), gaps, np.nan) for a in arrays))


def shade_runs(ax, edges: np.ndarray, runs: np.ndarray, color=MASK_COLOR, label=None):
    """Shade the pixel ranges ``runs`` (from :func:`true_runs`) over the full height of ``ax``."""
    from matplotlib.collections import PolyCollection

    if len(runs) == 0:
        return None
    verts = [[(edges[a], 0.0), (edges[a], 1.0), (edges[b], 1.0), (edges[b], 0.0)] for a, b in runs]
    coll = PolyCollection(verts, facecolors=color, edgecolors="none", transform=ax.get_xaxis_transform(),
                          zorder=0, label=label)
    ax.add_collection(coll, autolim=False)
    return coll


def vector(value, name: str) -> np.ndarray:
    return as_float_array(value, name, ndim=1)
