"""Emulation error: how far an emulator's spectra are from the spectra of a grid it did not train on.

:func:`emulation_error` predicts the grid's spectra from their labels and summarises
``|model - grid|``: the median, 95th and 99th percentile over all pixels of all spectra, the same per
pixel (which wavelengths are hard to emulate), per spectrum, and the worst spectra. For observed
spectra (a grid with ivar), pixels with ivar = 0 are left out. :func:`write_validation_json` writes
the report as a small JSON file and :func:`format_validation_table` as a markdown table.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np

from .checks import as_float_array
from .errors import InputError

log = logging.getLogger(__name__)

#: Percentiles reported everywhere (median, 95th, 99th).
PERCENTILES = (50.0, 95.0, 99.0)
_NAMES = ("median", "p95", "p99")
#: Spectra predicted per chunk (bounds the memory of the prediction).
_PREDICT_CHUNK = 2048
#: Relative tolerance when comparing the wavelengths of the emulator and the grid.
WAVELENGTH_RTOL = 1e-7


def _unpack(grid_or_arrays):
    from .grids import TrainingGrid

    if isinstance(grid_or_arrays, TrainingGrid):
        g = grid_or_arrays
        return g.labels, g.flux, g.ivar, g.label_names, g.wavelength
    if isinstance(grid_or_arrays, (tuple, list)) and len(grid_or_arrays) in (2, 3):
        labels = as_float_array(grid_or_arrays[0], "labels", ndim=2)
        flux = as_float_array(grid_or_arrays[1], "flux", ndim=2)
        ivar = as_float_array(grid_or_arrays[2], "ivar", ndim=2) if len(grid_or_arrays) == 3 else None
        return labels, flux, ivar, None, None
    raise InputError("grid_or_arrays must be a TrainingGrid or a tuple (labels, flux) or (labels, flux, ivar), "
                     f"got {type(grid_or_arrays).__name__}")


def _align_labels(emulator, labels, names):
    """Reorder grid label columns to the emulator's order when the grid names them."""
    if names is None or tuple(names) == tuple(emulator.label_names):
        if labels.shape[1] != emulator.n_labels:
            raise InputError(f"labels has {labels.shape[1]} columns but the emulator takes {emulator.n_labels} "
                             f"({list(emulator.label_names)})")
        return labels
    missing = [n for n in emulator.label_names if n not in names]
    if missing:
        raise InputError(f"the grid's labels {list(names)} lack the emulator's {missing}")
    return labels[:, [list(names).index(n) for n in emulator.label_names]]


def emulation_error(emulator, grid_or_arrays, *, n_worst: int = 10) -> dict:
    """Summary of ``|emulator.predict(labels) - flux|`` over a grid.

    Parameters
    ----------
    emulator : Emulator
    grid_or_arrays : TrainingGrid or tuple (labels, flux) or (labels, flux, ivar)
        Spectra with known labels (columns reordered by name when the grid names them). With ivar,
        pixels where it is 0 are excluded.
    n_worst : int
        How many of the worst spectra (largest maximum error) to list.

    Returns
    -------
    dict with
        ``n_spectra``, ``n_pixels``, ``median``, ``p95``, ``p99``, ``mean``, ``max`` (over every used
        pixel of every spectrum); ``per_pixel``: dict of (P,) arrays ``median``, ``p95``, ``p99``;
        ``per_spectrum``: dict of (N,) arrays ``median``, ``max``; ``worst_spectra``: list of dicts
        (``index``, ``max_abs_error``, ``median_abs_error``, ``labels``); ``wavelength`` (P,) or None;
        ``label_names``.
    """
    labels, flux, ivar, names, grid_wl = _unpack(grid_or_arrays)
    if flux.shape[0] != labels.shape[0]:
        raise InputError(f"flux has {flux.shape[0]} spectra but labels has {labels.shape[0]} rows")
    if flux.shape[1] != emulator.n_pixels:
        raise InputError(f"flux has {flux.shape[1]} pixels but the emulator predicts {emulator.n_pixels}")
    if ivar is not None and ivar.shape != flux.shape:
        raise InputError(f"ivar has shape {ivar.shape} but flux has {flux.shape}")
    if flux.shape[0] == 0:
        raise InputError("the grid has no spectra")
    wl = emulator.wavelength if emulator.wavelength is not None else grid_wl
    if grid_wl is not None and emulator.wavelength is not None and not np.allclose(
            grid_wl, emulator.wavelength, rtol=WAVELENGTH_RTOL, atol=0):
        raise InputError("the grid's wavelength grid differs from the emulator's (same pixel count, other "
                         "wavelengths); resample the grid first")
    x = _align_labels(emulator, labels, names)
    n, p = flux.shape
    err = np.empty((n, p), dtype=np.float32)
    for i in range(0, n, _PREDICT_CHUNK):
        sl = slice(i, i + _PREDICT_CHUNK)
        err[sl] = np.abs(emulator.predict(x[sl]) - flux[sl])
    if ivar is not None:
        used = ivar > 0
        if not used.any():
            raise InputError("ivar is 0 everywhere: no pixel to validate on")
        err[~used] = np.nan
        pct, reduce_max, reduce_mean = np.nanpercentile, np.nanmax, np.nanmean
    else:
        pct, reduce_max, reduce_mean = np.percentile, np.max, np.mean
    flat = err[np.isfinite(err)] if ivar is not None else err.ravel()
    overall = np.percentile(flat, PERCENTILES)
    with warnings.catch_warnings():  # all-NaN pixels or spectra (no data) give NaN, on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        per_pixel = pct(err, PERCENTILES, axis=0)
        spec_median = pct(err, 50.0, axis=1)
        spec_max = reduce_max(err, axis=1)
    order = np.argsort(np.where(np.isfinite(spec_max), spec_max, -np.inf))[::-1][:n_worst]
    label_names = tuple(emulator.label_names)
    worst = [{"index": int(i), "max_abs_error": float(spec_max[i]), "median_abs_error": float(spec_median[i]),
              "labels": {k: float(v) for k, v in zip(label_names, x[i])}} for i in order]
    report = {
        "n_spectra": int(n),
        "n_pixels": int(p),
        **{k: float(v) for k, v in zip(_NAMES, overall)},
        "mean": float(reduce_mean(flat)),
        "max": float(flat.max()),
        "per_pixel": {k: per_pixel[j].astype(np.float64) for j, k in enumerate(_NAMES)},
        "per_spectrum": {"median": spec_median.astype(np.float64), "max": spec_max.astype(np.float64)},
        "worst_spectra": worst,
        "wavelength": None if wl is None else np.asarray(wl, dtype=np.float64),
        "label_names": list(label_names),
    }
    log.info("emulation error over %d spectra: median %.3g, p95 %.3g, p99 %.3g", n, *overall)
    return report


def _summary(values: np.ndarray) -> dict:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {"min": None, "median": None, "p95": None, "max": None}
    q = np.percentile(v, [0, 50, 95, 100])
    return {"min": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "max": float(q[3])}


def report_to_jsonable(report: dict, *, per_pixel: str = "summary", n_worst_pixels: int = 20) -> dict:
    """The report with arrays turned into JSON values.

    ``per_pixel="summary"`` (default) keeps the JSON small: the distribution over pixels of each
    per-pixel statistic, plus the ``n_worst_pixels`` pixels with the largest 99th percentile (index,
    wavelength, median, p95, p99). ``"full"`` writes every pixel as lists.
    """
    if per_pixel not in ("summary", "full"):
        raise InputError(f"per_pixel must be 'summary' or 'full', got {per_pixel!r}")
    out = {k: v for k, v in report.items() if k not in ("per_pixel", "per_spectrum", "wavelength")}
    pp, wl = report["per_pixel"], report.get("wavelength")
    if per_pixel == "full":
        out["per_pixel"] = {k: [None if not np.isfinite(x) else float(x) for x in v] for k, v in pp.items()}
        out["wavelength"] = None if wl is None else [float(x) for x in wl]
        out["per_spectrum"] = {k: [None if not np.isfinite(x) else float(x) for x in v]
                               for k, v in report["per_spectrum"].items()}
    else:
        out["per_pixel_summary"] = {k: _summary(v) for k, v in pp.items()}
        p99 = np.where(np.isfinite(pp["p99"]), pp["p99"], -np.inf)
        idx = np.argsort(p99)[::-1][:n_worst_pixels]
        out["worst_pixels"] = [{"index": int(i), "wavelength": None if wl is None else float(wl[i]),
                                **{k: float(pp[k][i]) for k in _NAMES}} for i in idx if np.isfinite(p99[i])]
        out["per_spectrum_summary"] = {k: _summary(v) for k, v in report["per_spectrum"].items()}
    return out


def write_validation_json(report: dict, path, *, per_pixel: str = "summary") -> Path:
    """Write an :func:`emulation_error` report as JSON (see :func:`report_to_jsonable`). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"paynekit_report": "emulation_error", "format_version": 1,
           **report_to_jsonable(report, per_pixel=per_pixel)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
    tmp.replace(path)
    return path


def format_validation_table(report: dict) -> str:
    """Markdown tables of the overall error and of the spread of the per-pixel errors."""
    pp = report["per_pixel"]
    lines = ["| abs(model - grid) | median | p95 | p99 |", "|---|---|---|---|",
             "| all pixels of all spectra | " + " | ".join(f"{report[k]:.3g}" for k in _NAMES) + " |", "",
             "| per-pixel statistic | typical pixel | 95% of pixels below | worst pixel |", "|---|---|---|---|"]
    for k in _NAMES:
        finite = pp[k][np.isfinite(pp[k])]
        if finite.size:
            q = np.percentile(finite, [50, 95, 100])
            lines.append(f"| {k} | {q[0]:.3g} | {q[1]:.3g} | {q[2]:.3g} |")
    lines.append("")
    lines.append(f"{report['n_spectra']} spectra x {report['n_pixels']} pixels")
    if report["worst_spectra"]:
        w = report["worst_spectra"][0]
        lines[-1] += f"; worst spectrum #{w['index']} (max {w['max_abs_error']:.3g}, median {w['median_abs_error']:.3g})"
    return "\n".join(lines)
