"""One fit: observed spectrum, model and residuals per chip, with zoom windows around chosen lines."""

from __future__ import annotations

import logging
import math
import textwrap
from numbers import Real

import numpy as np

from ..checks import check_increasing
from ..errors import InputError
from ..wavelength import APOGEE_CHIPS
from ._common import (
    DATA_COLOR,
    MODEL_COLOR,
    break_gaps,
    finish,
    format_label_value,
    new_figure,
    pixel_edges,
    shade_runs,
    style,
    true_runs,
    vector,
)

logger = logging.getLogger(__name__)

#: Full width (Angstrom) of a zoom window around a line.
DEFAULT_ZOOM_WIDTH = 12.0
#: Zoom panels per row.
ZOOM_COLUMNS = 4
#: Residual panels show (flux - model) / sigma within +-max(this, the 99.5th percentile of |residual|).
MIN_RESIDUAL_LIMIT = 4.0
MAX_RESIDUAL_LIMIT = 50.0
#: Reference lines on the residual panels at +-this many sigma.
RESIDUAL_GUIDE = 3.0


def fit_residuals(flux, ivar, model, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised residuals ``(flux - model) * sqrt(ivar)`` and the boolean of pixels that count.

    A pixel counts when flux, ivar and model are finite, ivar > 0 and it is not masked (mask True = bad);
    residuals are NaN elsewhere.
    """
    flux, ivar, model = (np.asarray(a, dtype=np.float64) for a in (flux, ivar, model))
    usable = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0) & np.isfinite(model)
    if mask is not None:
        usable &= ~np.asarray(mask, dtype=bool)
    with np.errstate(invalid="ignore"):
        chi = np.where(usable, (flux - model) * np.sqrt(np.where(usable, ivar, 0.0)), np.nan)
    return chi, usable


def _parse_regions(regions, wl):
    if regions is None:
        return [(wl[0], wl[-1])]
    out = []
    try:
        pairs = [(float(a), float(b)) for a, b in regions]
    except (TypeError, ValueError):
        raise InputError(f"regions must be a sequence of (start, end) wavelengths, got {regions!r}") from None
    for a, b in pairs:
        if not b > a:
            raise InputError(f"regions: each (start, end) needs end > start, got ({a}, {b})")
        if np.count_nonzero((wl >= a) & (wl <= b)) >= 2:
            out.append((a, b))
    if not out:
        logger.warning("none of the regions %s overlaps the spectrum (%.1f-%.1f A); drawing the whole range",
                       pairs, wl[0], wl[-1])
        out = [(wl[0], wl[-1])]
    return out


def _parse_lines(lines, name="zoom_lines"):
    """Sequence of wavelengths or (wavelength, name) pairs -> list of (wavelength, name)."""
    if lines is None:
        return []
    if isinstance(lines, dict):
        return [(float(w), str(k)) for k, w in lines.items()]
    out = []
    for item in lines:
        if isinstance(item, Real):
            out.append((float(item), ""))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Real):
            out.append((float(item[0]), str(item[1])))
        else:
            raise InputError(f"{name} must hold wavelengths or (wavelength, name) pairs, got {item!r}")
    return out


def _title_lines(title, labels, flags, chi, usable, width=130):
    lines = [str(title)] if title else []
    if labels:
        text = ",  ".join(format_label_value(k, v) for k, v in labels.items())
        lines.extend(textwrap.wrap(text, width))
    n = int(usable.sum())
    if n:
        chi2 = float(np.nansum(chi**2))
        lines.append(f"χ² = {chi2:.1f} over {n} pixels (χ²/N = {chi2 / n:.2f})")
    if flags:
        lines.append(f"flags: {flags}")
    return "\n".join(lines)


def _draw_panel(ax_f, ax_r, wl, flux, sigma, model, chi, usable, lines, show_legend=False):
    edges = pixel_edges(wl)
    runs = true_runs(~usable)
    shade_runs(ax_f, edges, runs, label="masked / no data")
    shade_runs(ax_r, edges, runs)
    wlb, fb, sb, mb, cb = break_gaps(wl, flux, sigma, model, chi)
    ax_f.fill_between(wlb, fb - sb, fb + sb, step="mid", color=DATA_COLOR, alpha=0.2, lw=0)
    ax_f.plot(wlb, fb, color=DATA_COLOR, lw=0.6, drawstyle="steps-mid", label="observed")
    ax_f.plot(wlb, mb, color=MODEL_COLOR, lw=0.9, label="model")
    ax_r.plot(wlb, cb, color=DATA_COLOR, lw=0.5, drawstyle="steps-mid")
    ax_r.axhline(0.0, color=MODEL_COLOR, lw=0.8)
    for s in (-RESIDUAL_GUIDE, RESIDUAL_GUIDE):
        ax_r.axhline(s, color="0.5", lw=0.6, ls=":")
    # the model sets the range (deep line cores stay visible); outliers in the data do not stretch it
    shown = np.concatenate([np.percentile(flux[usable], [0.2, 99.8]) if usable.any() else [],
                            model[np.isfinite(model)]])
    if shown.size:
        lo, hi = shown.min(), shown.max()
        pad = 0.05 * max(hi - lo, 0.05)
        ax_f.set_ylim(lo - pad, hi + pad)
    lim = np.nanpercentile(np.abs(chi), 99.5) if np.any(usable) else MIN_RESIDUAL_LIMIT
    lim = min(max(MIN_RESIDUAL_LIMIT, 1.1 * lim), MAX_RESIDUAL_LIMIT)
    ax_r.set_ylim(-lim, lim)
    ax_f.set_xlim(edges[0], edges[-1])
    for w, name in lines:
        if edges[0] <= w <= edges[-1]:
            for ax in (ax_f, ax_r):
                ax.axvline(w, color="0.4", lw=0.6, ls="--", zorder=0.5)
            if name:
                ax_f.text(w, 0.02, f" {name}", transform=ax_f.get_xaxis_transform(), fontsize=7, color="0.3")
    ax_f.tick_params(labelbottom=False)
    if show_legend:
        ax_f.legend(loc="lower left", ncol=4, frameon=True, framealpha=0.8)


def plot_fit(wavelength, flux, ivar, model, *, mask=None, regions=APOGEE_CHIPS, labels: dict | None = None,
             flags: str | None = None, title: str | None = None, zoom_lines=None,
             zoom_width: float = DEFAULT_ZOOM_WIDTH, path=None, dpi=None, figsize=None):
    """Observed spectrum, model and normalised residuals of one fit.

    One pair of panels per region (by default the three APOGEE chips; ``regions=None`` draws the whole
    spectrum): the observed flux (steps, with a ±1σ band) and the model on top, ``(flux - model) / σ``
    below with ±3σ guides. Pixels that do not count in the fit (mask True, ivar <= 0, non-finite) are
    shaded grey. The title gives ``title``, the labels (``{name: value}`` or ``{name: (value, error)}``),
    χ² over the pixels that count, and ``flags``. ``zoom_lines`` (wavelengths, or (wavelength, name)
    pairs) adds zoom windows ``zoom_width`` Angstrom wide around each line.

    Returns the :class:`matplotlib.figure.Figure`; saves it to ``path`` when given.
    """
    wl = vector(wavelength, "wavelength")
    check_increasing(wl, "wavelength")
    arrays = {"flux": vector(flux, "flux"), "ivar": vector(ivar, "ivar"), "model": vector(model, "model")}
    for name, arr in arrays.items():
        if arr.shape != wl.shape:
            raise InputError(f"{name} has shape {arr.shape} but wavelength has {wl.shape}")
    if mask is not None:
        mask = np.array(mask, dtype=bool, copy=True)
        if mask.shape != wl.shape:
            raise InputError(f"mask has shape {mask.shape} but wavelength has {wl.shape}")
    if not (np.isfinite(zoom_width) and zoom_width > 0):
        raise InputError(f"zoom_width must be a positive width in Angstrom, got {zoom_width}")
    flux, ivar, model = arrays["flux"], arrays["ivar"], arrays["model"]
    chi, usable = fit_residuals(flux, ivar, model, mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.where(usable, 1.0 / np.sqrt(np.where(usable, ivar, 1.0)), np.nan)
    flux_shown = np.where(np.isfinite(flux), flux, np.nan)

    spans = _parse_regions(regions, wl)
    lines = _parse_lines(zoom_lines)
    zooms = []
    for w, name in lines:
        sel = np.flatnonzero(np.abs(wl - w) <= 0.5 * zoom_width)
        if sel.size >= 3:
            zooms.append((w, name, sel))
        else:
            logger.warning("zoom line %.2f A lies outside the spectrum or spans < 3 pixels; not drawn", w)

    n_zoom_rows = math.ceil(len(zooms) / ZOOM_COLUMNS)
    n_zoom_cols = min(len(zooms), ZOOM_COLUMNS)
    if figsize is None:
        figsize = (11.0, 2.4 * len(spans) + 2.3 * n_zoom_rows + 0.8)
    with style():
        from matplotlib.ticker import MaxNLocator

        fig = new_figure(figsize)
        outer = fig.add_gridspec(len(spans) + n_zoom_rows, 1)
        for i, (a, b) in enumerate(spans):
            sel = np.flatnonzero((wl >= a) & (wl <= b))
            sub = outer[i].subgridspec(2, 1, height_ratios=(3.0, 1.2), hspace=0.0)
            ax_f = fig.add_subplot(sub[0])
            ax_r = fig.add_subplot(sub[1], sharex=ax_f)
            _draw_panel(ax_f, ax_r, wl[sel], flux_shown[sel], sigma[sel], model[sel], chi[sel], usable[sel],
                        lines, show_legend=(i == 0))
            ax_f.set_ylabel("flux")
            ax_r.set_ylabel("(f − m)/σ")
        if spans:
            ax_r.set_xlabel("wavelength [Å]")
        for j in range(n_zoom_rows):
            sub = outer[len(spans) + j].subgridspec(2, n_zoom_cols, height_ratios=(3.0, 1.2), hspace=0.0)
            for k, (w, name, sel) in enumerate(zooms[j * ZOOM_COLUMNS:(j + 1) * ZOOM_COLUMNS]):
                ax_f = fig.add_subplot(sub[0, k])
                ax_r = fig.add_subplot(sub[1, k], sharex=ax_f)
                _draw_panel(ax_f, ax_r, wl[sel], flux_shown[sel], sigma[sel], model[sel], chi[sel],
                            usable[sel], [(w, "")])
                ax_f.set_title(f"{name} {w:.2f} Å".strip(), fontsize=8)
                ax_r.set_xlabel("wavelength [Å]")
                ax_r.xaxis.set_major_locator(MaxNLocator(4))
                ax_r.ticklabel_format(axis="x", useOffset=False)
                if k == 0:
                    ax_f.set_ylabel("flux")
                    ax_r.set_ylabel("(f − m)/σ")
        fig.suptitle(_title_lines(title, labels, flags, chi, usable), fontsize=9)
        return finish(fig, path, dpi)


__all__ = ["DEFAULT_ZOOM_WIDTH", "fit_residuals", "plot_fit"]
