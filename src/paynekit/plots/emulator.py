"""An emulator: gradient spectra, emulation error per pixel, training and validation curves."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping

import numpy as np

from ..checks import check_increasing
from ..emulators.base import Emulator
from ..errors import InputError
from ._common import (
    ACCENT_COLOR,
    DATA_COLOR,
    MODEL_COLOR,
    break_gaps,
    finish,
    format_label_value,
    label_text,
    new_figure,
    style,
    vector,
)
from .fit import _parse_lines

logger = logging.getLogger(__name__)

#: "Typical" label steps by which gradient spectra are scaled (d flux / d label * step): about the size
#: of a precise survey uncertainty, so that panels for different labels are comparable.
TYPICAL_STEPS = {"teff": 100.0, "logg": 0.2, "v_turb": 0.2, "v_micro": 0.2, "vmicro": 0.2, "v_macro": 1.0,
                 "vmacro": 1.0, "v_rel": 1.0, "vsini": 1.0, "v_sini": 1.0, "c12_c13": 5.0}
#: Abundance-like labels (``*_h``, ``*_fe``, ``*_m``, [M/H]) use this step (dex).
ABUNDANCE_STEP = 0.1
#: Any other label uses this fraction of its training range.
FALLBACK_STEP_FRACTION = 0.05

_ABUNDANCE = re.compile(r"^[a-z0-9]+_(h|fe|m)$")
_MAIN_LABELS = ("teff", "logg", "fe_h", "m_h", "mh", "feh")


def typical_step(name: str, span: float) -> float:
    """The step by which the gradient spectrum of label ``name`` is scaled (see :data:`TYPICAL_STEPS`)."""
    key = name.lower()
    if key in TYPICAL_STEPS:
        return TYPICAL_STEPS[key]
    if _ABUNDANCE.match(key) or key in ("mh", "feh"):
        return ABUNDANCE_STEP
    return FALLBACK_STEP_FRACTION * float(span)


def reference_vector(emulator: Emulator, reference_labels) -> np.ndarray:
    """The full label vector of a reference star from a vector (L,) or a dict of some labels.

    Labels missing from a dict take the centre of the training box, except ``<x>_h`` abundances, which
    follow ``fe_h`` when it is given (a scaled-solar star).
    """
    space = emulator.label_space
    if isinstance(reference_labels, Mapping):
        unknown = [k for k in reference_labels if k not in space.names]
        if unknown:
            raise InputError(f"reference_labels has labels {unknown} that the emulator does not have; "
                             f"it has {list(space.names)}")
        x = space.center().copy()
        fe = reference_labels.get("fe_h")
        filled = []
        for i, name in enumerate(space.names):
            if name in reference_labels:
                x[i] = float(reference_labels[name])
            elif fe is not None and name.endswith("_h") and name != "c12_c13":
                x[i] = float(fe)
                filled.append(f"{name}=[Fe/H]")
            else:
                filled.append(f"{name}=centre")
        if filled:
            logger.info("reference star: filled %s", ", ".join(filled))
        return x
    x = vector(reference_labels, "reference_labels")
    if x.shape != (emulator.n_labels,):
        raise InputError(f"reference_labels has shape {x.shape}; the emulator has {emulator.n_labels} labels "
                         f"{list(space.names)}")
    return x


def gradient_spectra(emulator: Emulator, reference_labels, labels=None, steps: dict | None = None):
    """d flux / d label at a reference star, times a typical step per label.

    Returns ``(reference, {label: (step, gradient * step)})`` with arrays of the emulator's pixels, from
    the emulator's analytic Jacobian (:meth:`Emulator.jacobian`).
    """
    if not isinstance(emulator, Emulator):
        raise InputError(f"emulator must be a paynekit Emulator, got {type(emulator).__name__}")
    x = reference_vector(emulator, reference_labels)
    names = list(emulator.label_names if labels is None else labels)
    idx = [emulator.label_space.index(n) for n in names]
    steps = dict(steps or {})
    unknown = [k for k in steps if k not in emulator.label_names]
    if unknown:
        raise InputError(f"steps has labels {unknown} that the emulator does not have")
    jac = np.asarray(emulator.jacobian(x), dtype=np.float64)  # (P, L)
    out = {}
    for name, i in zip(names, idx):
        step = float(steps.get(name, typical_step(name, emulator.label_space.span[i])))
        out[name] = (step, jac[:, i] * step)
    return x, out


def _symmetric_limit(values) -> tuple[float, float]:
    """+-limit that shows the strongest features but is not set by one spike (a single bad pixel)."""
    a = np.abs(values[np.isfinite(values)])
    if a.size == 0 or a.max() == 0:
        return -1e-3, 1e-3
    lim = min(a.max(), 1.5 * np.percentile(a, 99.9)) * 1.1
    return -lim, lim


def _step_text(name, step):
    key = name.lower()
    unit = {"teff": "K", "v_turb": "km/s", "v_micro": "km/s", "vmicro": "km/s", "v_macro": "km/s",
            "vmacro": "km/s", "v_rel": "km/s"}.get(key, "dex" if (_ABUNDANCE.match(key) or key == "logg") else "")
    return f"+{step:g} {unit}".rstrip()


def plot_gradient_spectra(emulator: Emulator, reference_labels, labels=None, line_positions=None, *,
                          steps: dict | None = None, wavelength_range=None, path=None, dpi=None, figsize=None):
    """Gradient spectra (Ting et al. 2019): d flux / d label at a reference star, one panel per label.

    Each panel shows the change of the normalised flux for a typical step of that label (100 K in Teff,
    0.2 dex in log g, 0.1 dex in abundances, ...; ``steps`` overrides), from the emulator's analytic
    Jacobian. ``line_positions`` marks lines: wavelengths (or (wavelength, name) pairs) for every panel,
    or a dict {label: wavelengths} per panel. ``wavelength_range`` (start, end) zooms in.
    """
    x, grads = gradient_spectra(emulator, reference_labels, labels, steps)
    if emulator.wavelength is None:
        wl, xlabel = np.arange(emulator.n_pixels, dtype=np.float64), "pixel"
    else:
        wl, xlabel = np.asarray(emulator.wavelength, dtype=np.float64), f"{emulator.wavelength_medium} wavelength [Å]"
    sel = np.ones(wl.size, dtype=bool)
    if wavelength_range is not None:
        a, b = (float(v) for v in wavelength_range)
        sel = (wl >= a) & (wl <= b)
        if np.count_nonzero(sel) < 2:
            raise InputError(f"wavelength_range {wavelength_range} holds fewer than 2 of the emulator's pixels "
                             f"({wl[0]:.1f}-{wl[-1]:.1f})")
    if isinstance(line_positions, Mapping) and all(k in emulator.label_names for k in line_positions):
        per_label = {k: _parse_lines(v, "line_positions") for k, v in line_positions.items()}
        common = []
    else:
        per_label, common = {}, _parse_lines(line_positions, "line_positions")
    names = list(grads)
    if figsize is None:
        figsize = (11.0, 1.15 * len(names) + 1.0)
    main = [n for n in _MAIN_LABELS if n in emulator.label_names] or list(emulator.label_names[:3])
    title = "Gradient spectra at " + ", ".join(format_label_value(n, x[emulator.label_space.index(n)]) for n in main)
    with style():
        fig = new_figure(figsize)
        axes = fig.subplots(len(names), 1, sharex=True, squeeze=False).ravel()
        for ax, name in zip(axes, names):
            step, g = grads[name]
            wlb, gb = break_gaps(wl[sel], g[sel])
            ax.plot(wlb, gb, color=DATA_COLOR, lw=0.6)
            ax.axhline(0.0, color="0.6", lw=0.5)
            for w, lname in common + per_label.get(name, []):
                if wl[sel][0] <= w <= wl[sel][-1]:
                    ax.axvline(w, color=MODEL_COLOR, lw=0.6, ls="--", alpha=0.8, zorder=0)
                    if lname:
                        ax.text(w, 0.04, f" {lname}", transform=ax.get_xaxis_transform(), fontsize=6,
                                color=MODEL_COLOR)
            ax.text(0.005, 0.92, f"{label_text(name, units=False)}  {_step_text(name, step)}",
                    transform=ax.transAxes, va="top", fontsize=8, color=ACCENT_COLOR,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})
            ax.set_ylim(_symmetric_limit(g[sel]))
        axes[-1].set_xlabel(xlabel)
        axes[-1].set_xlim(wl[sel][0], wl[sel][-1])
        fig.supylabel("Δ normalised flux per step")
        fig.suptitle(title)
        return finish(fig, path, dpi)


def as_record(value):
    """A mapping view of a dict, a dataclass instance, or an object with ``to_dict()``/``as_dict()``;
    anything else is returned unchanged."""
    if isinstance(value, Mapping):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    for method in ("to_dict", "as_dict"):
        if callable(getattr(value, method, None)):
            return getattr(value, method)()
    return value


def _per_pixel_curves(per_pixel_error):
    """{name: per-pixel array}, {name: overall scalar}, wavelength or None from a dict or an array."""
    scalars, curves, wl = {}, {}, None
    per_pixel_error = as_record(per_pixel_error)
    if isinstance(per_pixel_error, Mapping) and isinstance(per_pixel_error.get("per_pixel"), Mapping):
        # the report of paynekit.validation.emulation_error: overall scalars + a nested per_pixel dict
        nested = dict(per_pixel_error["per_pixel"])
        for key in ("median", "p95", "p99"):
            if np.ndim(per_pixel_error.get(key)) == 0 and per_pixel_error.get(key) is not None:
                nested.setdefault(f"overall_{key}", per_pixel_error[key])
        if per_pixel_error.get("wavelength") is not None:
            nested["wavelength"] = per_pixel_error["wavelength"]
        per_pixel_error = nested
    if isinstance(per_pixel_error, Mapping):
        for key, value in per_pixel_error.items():
            try:
                arr = np.asarray(value)
            except ValueError:  # ragged nested values
                continue
            if arr.dtype.kind not in "fiu":
                continue
            if key in ("wavelength", "wavelength_A"):
                wl = arr.astype(np.float64)
            elif arr.ndim == 0:
                scalars[str(key)] = float(arr)
            elif arr.ndim == 1 and arr.size > 1:
                curves[str(key)] = arr.astype(np.float64)
            elif arr.ndim == 2:
                curves.update(_from_residuals(arr, str(key)))
        if not curves:
            raise InputError("per_pixel_error dict holds no per-pixel array (1-D array of one value per pixel)")
    else:
        arr = np.asarray(per_pixel_error, dtype=np.float64)
        if arr.ndim == 1:
            curves["error"] = arr
        elif arr.ndim == 2:
            curves.update(_from_residuals(arr, "residual"))
            flat = np.abs(arr[np.isfinite(arr)])
            if flat.size:
                scalars.update(dict(zip(("median", "p95", "p99"), np.percentile(flat, [50, 95, 99]).tolist())))
        else:
            raise InputError(f"per_pixel_error must be a dict, a per-pixel array (P,) or residuals (N, P); "
                             f"got shape {arr.shape}")
    sizes = {v.size for v in curves.values()}
    if len(sizes) != 1:
        raise InputError(f"per-pixel arrays of per_pixel_error have different lengths {sorted(sizes)}")
    return curves, scalars, wl


def _from_residuals(arr, name):
    a = np.abs(arr)
    with np.errstate(all="ignore"):
        return {f"median |{name}|": np.nanmedian(a, axis=0), f"95th percentile |{name}|": np.nanpercentile(a, 95,
                                                                                                         axis=0)}


def plot_emulation_error(per_pixel_error, wavelength=None, *, title: str | None = None, path=None, dpi=None,
                         figsize=(11.0, 5.5)):
    """Emulation error per pixel (against wavelength) and its cumulative distribution over pixels.

    ``per_pixel_error`` is the result of :func:`paynekit.validation.emulation_error` (a dict, or a
    dataclass / object with ``to_dict()``: its 1-D per-pixel arrays are drawn, overall scalars such as
    median/p95/p99 are printed, other entries ignored), a per-pixel array (P,), or the
    residuals (N, P) of N validation spectra (then the per-pixel median and 95th percentile of
    |residual| are drawn). The cumulative distribution is of the first per-pixel curve.
    """
    curves, scalars, wl_dict = _per_pixel_curves(per_pixel_error)
    n_pix = next(iter(curves.values())).size
    if wavelength is None:
        wavelength = wl_dict
    if wavelength is None:
        wl, xlabel = np.arange(n_pix, dtype=np.float64), "pixel"
    else:
        wl = vector(wavelength, "wavelength")
        check_increasing(wl, "wavelength")
        if wl.size != n_pix:
            raise InputError(f"wavelength has {wl.size} pixels but the per-pixel error has {n_pix}")
        xlabel = "wavelength [Å]"
    primary = next((k for k in curves if "median" in k.lower()), next(iter(curves)))
    positive = all(np.nanmin(v) > 0 for v in curves.values() if np.any(np.isfinite(v)))
    colors = [DATA_COLOR, MODEL_COLOR, ACCENT_COLOR, "#009E73", "#E69F00"]
    with style():
        fig = new_figure(figsize)
        gs = fig.add_gridspec(2, 2, height_ratios=(1.0, 1.0), width_ratios=(2.0, 1.0))
        ax = fig.add_subplot(gs[0, :])
        for k, (name, v) in enumerate(curves.items()):
            wlb, vb = break_gaps(wl, v)
            ax.plot(wlb, vb, lw=0.5, color=colors[k % len(colors)], label=name, alpha=0.9)
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("emulation error (flux)")
        ax.set_xlim(wl[0], wl[-1])
        ax.legend(loc="upper right")
        axc = fig.add_subplot(gs[1, 0])
        v = curves[primary]
        v = np.sort(v[np.isfinite(v)])
        frac = np.arange(1, v.size + 1) / max(v.size, 1)
        axc.plot(v, frac, color=DATA_COLOR, lw=1.2, drawstyle="steps-post")
        if positive and v.size:
            axc.set_xscale("log")
        if v.size:
            for q, ls in ((50, "--"), (95, ":")):
                val = np.percentile(v, q)
                axc.axvline(val, color=MODEL_COLOR, lw=0.8, ls=ls, label=f"{q}% of pixels below {val:.2g}")
            axc.legend(loc="lower right")
        axc.set_xlabel(f"{primary} per pixel")
        axc.set_ylabel("fraction of pixels below")
        axc.set_ylim(0, 1.0)
        axt = fig.add_subplot(gs[1, 1])
        axt.axis("off")
        rows = [f"{k}: {v:.3g}" for k, v in scalars.items()] or ["(no overall values given)"]
        axt.text(0.0, 1.0, "overall\n" + "\n".join(rows), va="top", transform=axt.transAxes, family="monospace",
                 fontsize=8)
        fig.suptitle(title or f"Emulation error ({n_pix} pixels)")
        return finish(fig, path, dpi)


def plot_training_curves(history, *, x_key: str = "epoch", log_y: bool | None = None, path=None, dpi=None,
                         figsize=(6.5, 4.0)):
    """Training and validation loss against epoch from ``history`` ({name: list of values per epoch}).

    Curves whose name contains "loss" are drawn (all numeric ones if none does); ``x_key`` (default
    "epoch") gives the x values when present. The epoch of the lowest validation loss is marked.
    Log y when all values are positive and span more than a factor of 10 (unless ``log_y`` says).
    """
    history = as_record(history)
    if not isinstance(history, Mapping):
        raise InputError(f"history must be a dict of lists (name -> value per epoch), got {type(history).__name__}")
    series = {}
    for key, value in history.items():
        arr = np.asarray(value)
        if key != x_key and arr.ndim == 1 and arr.size and arr.dtype.kind in "fiu":
            series[str(key)] = arr.astype(np.float64)
    losses = {k: v for k, v in series.items() if "loss" in k.lower()} or series
    if not losses:
        raise InputError(f"history holds no numeric per-epoch lists; keys: {list(history)}")
    xs = np.asarray(history[x_key], dtype=np.float64) if x_key in history else None
    finite = np.concatenate([v[np.isfinite(v)] for v in losses.values()])
    if log_y is None:
        log_y = finite.size > 0 and finite.min() > 0 and finite.max() / finite.min() > 10
    colors = [ACCENT_COLOR, MODEL_COLOR, DATA_COLOR, "#009E73", "#E69F00"]
    with style():
        fig = new_figure(figsize)
        ax = fig.add_subplot()
        for k, (name, v) in enumerate(losses.items()):
            x = xs if xs is not None and xs.size == v.size else np.arange(1, v.size + 1, dtype=np.float64)
            ax.plot(x, v, color=colors[k % len(colors)], lw=1.2, label=name)
            if re.search(r"val", name.lower()) and np.any(np.isfinite(v)):
                best = int(np.nanargmin(v))
                ax.plot(x[best], v[best], "o", color=colors[k % len(colors)], ms=5,
                        label=f"best {name}: {v[best]:.3g} at {x[best]:g}")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(x_key if xs is not None else "epoch")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right")
        ax.set_title("Training history")
        return finish(fig, path, dpi)


__all__ = [
    "TYPICAL_STEPS",
    "gradient_spectra",
    "plot_emulation_error",
    "plot_gradient_spectra",
    "plot_training_curves",
    "reference_vector",
    "typical_step",
]
