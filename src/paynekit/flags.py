"""Result flags: every bit in one place.

Bits 0-4 are those SDSS Astra defines for The Payne (fitting failure; Teff, logg and [Fe/H] outside the
ranges where The Payne's APOGEE model is trusted; S/N below 70). The rest are paynekit's. The thresholds
live in :class:`paynekit.fitting.FitConfig` (``flag_*`` fields); the defaults match Astra.

``result_flags`` holds the bits; ``flag_warn`` is True when any bit is set, ``flag_bad`` when the fit
failed or the input was unusable (:data:`BAD_FLAGS`); ``flag_reason`` says why, in words.
"""

from __future__ import annotations

from enum import IntFlag

import numpy as np

from .errors import InputError


class ResultFlag(IntFlag):
    """Bits of the ``result_flags`` column."""

    FIT_FAILURE = 1 << 0  # the optimiser failed (non-finite model, singular curvature, exception)
    TEFF_OUT_OF_RANGE = 1 << 1  # Astra: teff outside 3100-7900 K
    LOGG_OUT_OF_RANGE = 1 << 2  # Astra: logg outside 0.1-5.2
    FE_H_OUT_OF_RANGE = 1 << 3  # Astra: fe_h outside -1.4..0.4
    LOW_SNR = 1 << 4  # Astra: S/N < 70
    LABEL_AT_BOUND = 1 << 5  # a fitted label ended at an edge of the emulator's training box
    RV_AT_BOUND = 1 << 6  # the radial velocity ended at an edge of the range it was allowed to explore
    HIGH_REDUCED_CHI2 = 1 << 7  # reduced chi2 above the threshold
    FEW_GOOD_PIXELS = 1 << 8  # fewer usable pixels than the threshold fraction
    PRESEARCH_DISAGREES = 1 << 9  # the optimiser ended far from the pre-search's best point
    BAD_INPUT = 1 << 10  # all flux non-finite, no pixel with ivar > 0, wrong length, too few pixels to fit


#: Bits that make a row unusable (``flag_bad``).
BAD_FLAGS = ResultFlag.FIT_FAILURE | ResultFlag.BAD_INPUT

FLAG_DESCRIPTIONS = {
    ResultFlag.FIT_FAILURE: "fitting failure",
    ResultFlag.TEFF_OUT_OF_RANGE: "teff outside the trusted range",
    ResultFlag.LOGG_OUT_OF_RANGE: "logg outside the trusted range",
    ResultFlag.FE_H_OUT_OF_RANGE: "fe_h outside the trusted range",
    ResultFlag.LOW_SNR: "S/N below threshold",
    ResultFlag.LABEL_AT_BOUND: "label at the edge of the training box",
    ResultFlag.RV_AT_BOUND: "radial velocity at the edge of its search range",
    ResultFlag.HIGH_REDUCED_CHI2: "reduced chi2 above threshold",
    ResultFlag.FEW_GOOD_PIXELS: "too few good pixels",
    ResultFlag.PRESEARCH_DISAGREES: "pre-search and final solution far apart",
    ResultFlag.BAD_INPUT: "bad input spectrum",
}

#: Names under which the Astra-range labels may appear in an emulator (compared in lower case).
TEFF_NAMES = ("teff", "t_eff")
LOGG_NAMES = ("logg", "log_g")
FE_H_NAMES = ("fe_h", "feh", "m_h", "mh")


def decode_flags(value) -> list[str]:
    """Names of the bits set in one ``result_flags`` value."""
    v = int(value)
    if v < 0:
        raise InputError(f"flag value must be non-negative, got {v}")
    return [f.name for f in ResultFlag if v & int(f)]


def flag_value(*names: str) -> int:
    """The integer with the named bits set (``flag_value("LOW_SNR", "BAD_INPUT")``)."""
    out = 0
    for name in names:
        try:
            out |= int(ResultFlag[name])
        except KeyError:
            raise InputError(f"unknown flag {name!r}; the flags are {[f.name for f in ResultFlag]}") from None
    return out


def has_flag(flags, name: str) -> np.ndarray:
    """Boolean array: is bit ``name`` set in each of ``flags``."""
    return (np.asarray(flags, dtype=np.int64) & flag_value(name)) != 0


def _find(names_lower, candidates):
    for c in candidates:
        if c in names_lower:
            return names_lower.index(c)
    return None


def compute_flags(
    *,
    label_names,
    labels,
    config,
    snr,
    reduced_chi2,
    n_pixels,
    n_pixels_total,
    at_bound_labels,
    rv_at_bound,
    presearch_shift,
    failure_reasons,
    bad_input_reasons,
):
    """Flags (int64, n) and reasons (list of n str) for a batch of results.

    Parameters
    ----------
    label_names : sequence of str
    labels : (n, L) physical labels (NaN for rows that were not fitted)
    config : FitConfig (its ``flag_*`` thresholds)
    snr, reduced_chi2 : (n,)
    n_pixels : (n,) used pixels; n_pixels_total : number of pixels in a spectrum
    at_bound_labels : list of n lists of label names at a bound
    rv_at_bound : (n,) bool
    presearch_shift : (n,) largest |scaled label change| between pre-search and final solution (NaN if none)
    failure_reasons, bad_input_reasons : list of n str ("" when none)
    """
    n = len(failure_reasons)
    flags = np.zeros(n, dtype=np.int64)
    reasons: list[list[str]] = [[] for _ in range(n)]
    lower = [s.lower() for s in label_names]

    def add(i, bit, text):
        flags[i] |= int(bit)
        reasons[i].append(text)

    for i in range(n):
        if bad_input_reasons[i]:
            add(i, ResultFlag.BAD_INPUT, bad_input_reasons[i])
        if failure_reasons[i]:
            add(i, ResultFlag.FIT_FAILURE, failure_reasons[i])
    fitted = np.array([not (b or f) for b, f in zip(bad_input_reasons, failure_reasons)], dtype=bool)
    checks = (
        (TEFF_NAMES, config.flag_teff_range, ResultFlag.TEFF_OUT_OF_RANGE, "K"),
        (LOGG_NAMES, config.flag_logg_range, ResultFlag.LOGG_OUT_OF_RANGE, ""),
        (FE_H_NAMES, config.flag_fe_h_range, ResultFlag.FE_H_OUT_OF_RANGE, ""),
    )
    labels = np.asarray(labels, dtype=np.float64)
    for cands, (lo, hi), bit, unit in checks:
        j = _find(lower, cands)
        if j is None:
            continue
        x = labels[:, j]
        for i in np.flatnonzero(fitted & ((x < lo) | (x > hi))):
            add(i, bit, f"{label_names[j]} {x[i]:.4g} outside {lo:g}..{hi:g}{' ' + unit if unit else ''}")
    snr = np.asarray(snr, dtype=np.float64)
    for i in np.flatnonzero(~np.isnan(snr) & (snr < config.flag_min_snr)):
        add(i, ResultFlag.LOW_SNR, f"S/N {snr[i]:.3g} < {config.flag_min_snr:g}")
    for i in np.flatnonzero(fitted):
        if at_bound_labels[i]:
            add(i, ResultFlag.LABEL_AT_BOUND, "at the training-box edge: " + ", ".join(at_bound_labels[i]))
    for i in np.flatnonzero(fitted & np.asarray(rv_at_bound, dtype=bool)):
        add(i, ResultFlag.RV_AT_BOUND, "v_rel at the edge of its allowed range")
    rchi2 = np.asarray(reduced_chi2, dtype=np.float64)
    for i in np.flatnonzero(fitted & (rchi2 > config.flag_max_reduced_chi2)):
        add(
            i, ResultFlag.HIGH_REDUCED_CHI2, f"reduced chi2 {rchi2[i]:.3g} > {config.flag_max_reduced_chi2:g}"
        )
    min_pix = config.flag_min_good_pixel_fraction * n_pixels_total
    npix = np.asarray(n_pixels, dtype=np.float64)
    for i in np.flatnonzero(~np.asarray(bad_input_reasons, dtype=bool) & (npix < min_pix)):
        add(
            i,
            ResultFlag.FEW_GOOD_PIXELS,
            f"{int(npix[i])} of {n_pixels_total} pixels usable (< {config.flag_min_good_pixel_fraction:.0%})",
        )
    shift = np.asarray(presearch_shift, dtype=np.float64)
    for i in np.flatnonzero(fitted & (shift > config.flag_presearch_shift)):
        add(
            i,
            ResultFlag.PRESEARCH_DISAGREES,
            f"final labels moved {shift[i]:.2f} (scaled) from the pre-search start "
            f"(> {config.flag_presearch_shift:g})",
        )
    return flags, ["; ".join(r) for r in reasons]
