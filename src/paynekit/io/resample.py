"""Resampling spectra onto a model's wavelength grid, with inverse variances propagated.

Every method here is a sparse linear map ``flux_out = W @ flux_in`` whose rows sum to one, so the
variances follow exactly as ``var_out = (W**2) @ var_in`` (input pixels independent; the covariance
this creates between neighbouring output pixels is not tracked: the usual approximation).

Methods
-------
``"linear"`` (default)
    linear interpolation between the two input pixels around each output wavelength. Right when the
    model grid samples the data at about the data's own pixel size (APOGEE apStar -> The Payne's
    7214-pixel grid is then an exact pixel selection). Upsampling with it overstates the information
    of the output pixels (their errors are correlated).
``"flux_conserving"``
    each pixel is a bin (edges half way to its neighbours); an output bin's flux is the overlap-weighted
    mean of the input bins it covers, so integrated flux is conserved. Right when the model grid is
    coarser than the data (e.g. BOSS or LAMOST onto a 20 A grid).

Coverage and masking
--------------------
An output pixel gets ivar = 0 (and mask True) if it lies outside the data's wavelength range or in a
gap of the data (a step longer than ``gap_factor`` times the typical neighbouring step: chip gaps,
the MRS arm gap), or if any input pixel with a non-negligible weight is unusable. A spectrum with no
usable pixel on the grid raises :class:`~paynekit.errors.InputError` naming its file and id.

Air and vacuum
--------------
Readers return vacuum wavelengths (``meta["wavelength_medium"]``). If the target grid is in air (a
model trained on air wavelengths says so in ``wavelength_medium``), the data wavelengths are converted
with :func:`paynekit.wavelength.vacuum_to_air` before resampling, and the other way round; the
result carries the grid's medium.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import sparse
from scipy.ndimage import median_filter

from ..checks import as_float_array, check_increasing
from ..errors import InputError
from ..spectra import Spectrum, SpectrumBatch
from ..wavelength import air_to_vacuum, vacuum_to_air

log = logging.getLogger(__name__)

RESAMPLE_METHODS = ("linear", "flux_conserving")
#: A step longer than this many times the typical neighbouring step is a gap in the data.
DEFAULT_GAP_FACTOR = 3.0
#: Weights below this fraction are treated as zero (so grids that coincide give an exact copy).
WEIGHT_EPS = 1e-6


def _check_method(method):
    if method not in RESAMPLE_METHODS:
        raise InputError(f"method must be one of {RESAMPLE_METHODS}, got {method!r}")


def _check_medium(medium, name="medium"):
    if medium not in ("vacuum", "air"):
        raise InputError(f"{name} must be 'vacuum' or 'air', got {medium!r}")


def find_gaps(wavelength, gap_factor: float = DEFAULT_GAP_FACTOR) -> np.ndarray:
    """Boolean (P-1,): True where the step from pixel i to i+1 is a gap in the coverage."""
    wl = np.asarray(wavelength, dtype=np.float64)
    step = np.diff(wl)
    if step.size < 3:
        return np.zeros(step.shape, bool)
    typical = median_filter(step, size=5, mode="nearest")
    return step > gap_factor * typical


def pixel_edges(wavelength, gap_factor: float = DEFAULT_GAP_FACTOR) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bin edges of each pixel: half way to each neighbour, mirrored at ends and gaps."""
    wl = np.asarray(wavelength, dtype=np.float64)
    step = np.diff(wl)
    gaps = find_gaps(wl, gap_factor)
    half = 0.5 * step
    lo = np.empty_like(wl)
    hi = np.empty_like(wl)
    # inner half-widths on each side; at an end or a gap, mirror the other side
    left = np.concatenate([[np.nan], np.where(gaps, np.nan, half)])
    right = np.concatenate([np.where(gaps, np.nan, half), [np.nan]])
    left = np.where(np.isnan(left), right, left)
    right = np.where(np.isnan(right), left, right)
    if np.any(np.isnan(left)):  # a single pixel between two gaps (or alone): half the typical step
        typical = 0.5 * float(np.median(step)) if step.size else 0.5
        left = np.where(np.isnan(left), typical, left)
        right = np.where(np.isnan(right), typical, right)
    lo[:] = wl - left
    hi[:] = wl + right
    return lo, hi


def resampling_matrix(wl_in, wl_out, method: str = "linear", gap_factor: float = DEFAULT_GAP_FACTOR):
    """The sparse map W (P_out, P_in) and the covered output pixels (bool P_out) from one grid to another.

    Rows of covered pixels sum to one; rows of uncovered pixels are empty.
    """
    _check_method(method)
    wl_in = np.asarray(wl_in, dtype=np.float64)
    wl_out = np.asarray(wl_out, dtype=np.float64)
    n_in, n_out = wl_in.size, wl_out.size
    if method == "linear":
        j = np.clip(np.searchsorted(wl_in, wl_out, side="right") - 1, 0, n_in - 2)
        t = (wl_out - wl_in[j]) / (wl_in[j + 1] - wl_in[j])
        covered = (wl_out >= wl_in[0]) & (wl_out <= wl_in[-1]) & ~find_gaps(wl_in, gap_factor)[j]
        t = np.clip(t, 0.0, 1.0)
        t = np.where(t < WEIGHT_EPS, 0.0, np.where(t > 1 - WEIGHT_EPS, 1.0, t))
        rows = np.concatenate([np.arange(n_out), np.arange(n_out)])
        cols = np.concatenate([j, j + 1])
        vals = np.concatenate([1.0 - t, t]) * np.concatenate([covered, covered])
    else:
        lo_in, hi_in = pixel_edges(wl_in, gap_factor)
        lo_out, hi_out = pixel_edges(wl_out, gap_factor)
        start = np.searchsorted(hi_in, lo_out, side="right")
        stop = np.searchsorted(lo_in, hi_out, side="left")
        count = np.maximum(stop - start, 0)
        rows_l, cols_l, vals_l = [], [], []
        for k in range(int(count.max()) if count.size else 0):
            sel = np.flatnonzero(count > k)
            jj = start[sel] + k
            overlap = np.minimum(hi_in[jj], hi_out[sel]) - np.maximum(lo_in[jj], lo_out[sel])
            keep = overlap > 0
            rows_l.append(sel[keep])
            cols_l.append(jj[keep])
            vals_l.append(overlap[keep])
        rows = np.concatenate(rows_l) if rows_l else np.zeros(0, int)
        cols = np.concatenate(cols_l) if cols_l else np.zeros(0, int)
        vals = np.concatenate(vals_l) if vals_l else np.zeros(0)
        total = np.bincount(rows, weights=vals, minlength=n_out)
        covered = total >= (1.0 - 1e-6) * (hi_out - lo_out)
        vals = np.where(covered[rows], vals / np.where(total[rows] > 0, total[rows], 1.0), 0.0)
        vals = np.where(vals < WEIGHT_EPS, 0.0, vals)
    w = sparse.csr_matrix((vals, (rows, cols)), shape=(n_out, n_in))
    w.eliminate_zeros()
    sums = np.asarray(w.sum(axis=1)).ravel()
    scale = np.where(sums > 0, 1.0 / np.where(sums > 0, sums, 1.0), 0.0)
    w = sparse.diags(scale) @ w  # renormalise after dropping negligible weights
    return w.tocsr(), covered & (sums > 0)


def apply_resampling(w, covered, flux, ivar, mask=None):
    """Apply a map from :func:`resampling_matrix` to flux/ivar/mask arrays (P_in,) or (N, P_in)."""
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    single = flux.ndim == 1
    f = np.atleast_2d(flux)
    iv = np.atleast_2d(ivar)
    good = np.isfinite(f) & np.isfinite(iv) & (iv > 0)
    if mask is not None:
        good &= ~np.atleast_2d(np.asarray(mask, dtype=bool))
    f0 = np.where(good, f, 0.0)
    var = np.where(good, 1.0 / np.where(good, iv, 1.0), 0.0)
    w2 = w.multiply(w).tocsr()
    touched = w.copy()
    touched.data = np.ones_like(touched.data)
    flux_out = np.asarray(w @ f0.T).T
    var_out = np.asarray(w2 @ var.T).T
    bad_out = np.asarray(touched @ (~good).astype(np.float64).T).T > 0
    usable = covered[None, :] & ~bad_out & (var_out > 0)
    ivar_out = np.where(usable, 1.0 / np.where(usable, var_out, 1.0), 0.0)
    flux_out = np.where(usable, flux_out, 0.0)
    mask_out = ~usable
    if single:
        return flux_out[0], ivar_out[0], mask_out[0]
    return flux_out, ivar_out, mask_out


def _grid_of(target, medium):
    """(wavelength, medium) of a model (anything with ``wavelength``/``wavelength_medium``) or an array."""
    if hasattr(target, "wavelength") and not isinstance(target, np.ndarray):
        wl = target.wavelength
        if wl is None:
            raise InputError(f"{type(target).__name__} has no wavelength grid to resample onto")
        return as_float_array(wl, "wavelength", ndim=1), getattr(target, "wavelength_medium", "vacuum")
    wl = as_float_array(target, "wavelength", ndim=1)
    return wl, medium


def _native(spectrum: Spectrum, medium: str) -> np.ndarray:
    own = spectrum.meta.get("wavelength_medium", "vacuum")
    _check_medium(own, "spectrum meta['wavelength_medium']")
    if own == medium:
        return spectrum.wavelength
    return vacuum_to_air(spectrum.wavelength) if medium == "air" else air_to_vacuum(spectrum.wavelength)


def _where(spectrum: Spectrum) -> str:
    file = spectrum.meta.get("file")
    sid = spectrum.id
    if file and sid:
        return f"{file}: spectrum {sid}"
    return f"{file}" if file else f"spectrum {sid or '(no id)'}"


def _resampled_meta(spectrum, wl_native, medium, method):
    n_native = spectrum.wavelength.size
    meta = {k: v for k, v in spectrum.meta.items() if not (isinstance(v, np.ndarray) and v.shape == (n_native,))}
    meta.update(wavelength_medium=medium, resample_method=method,
                native_range=(float(wl_native[0]), float(wl_native[-1])), native_pixels=n_native)
    return meta


def _check_result(spectrum, wl_native, wavelength, medium, covered, ivar_out):
    if not np.any(covered):
        raise InputError(f"{_where(spectrum)} covers {wl_native[0]:.1f}-{wl_native[-1]:.1f} A ({medium}) but the "
                         f"model grid covers {wavelength[0]:.1f}-{wavelength[-1]:.1f} A: no overlap")
    if not np.any(ivar_out > 0):
        raise InputError(f"{_where(spectrum)} has no usable pixel on the model grid "
                         f"({wavelength[0]:.1f}-{wavelength[-1]:.1f} A): all overlapping pixels are masked")


def resample(spectrum: Spectrum, wavelength, *, medium: str = "vacuum", method: str = "linear",
             gap_factor: float = DEFAULT_GAP_FACTOR) -> Spectrum:
    """Resample one spectrum onto a grid.

    Parameters
    ----------
    spectrum : Spectrum
        Its ``meta["wavelength_medium"]`` (default vacuum) gives the medium of its wavelengths.
    wavelength : array (P,) or a model
        The target grid in Angstrom, or an object with ``wavelength`` and ``wavelength_medium``
        (an :class:`~paynekit.emulators.base.Emulator`), whose medium then overrides ``medium``.
    medium : {"vacuum", "air"}
        Medium of a ``wavelength`` array.
    method : {"linear", "flux_conserving"}
        See the module docstring.
    gap_factor : float
        Steps longer than this times the typical step are gaps (no coverage).

    Returns
    -------
    Spectrum on the grid, meta copied (per-pixel meta arrays of the native grid dropped) with
    ``wavelength_medium``, ``resample_method``, ``native_range`` and ``native_pixels`` added.
    """
    if not isinstance(spectrum, Spectrum):
        raise InputError(f"spectrum must be a Spectrum, got {type(spectrum).__name__}")
    _check_method(method)
    wl_out, medium = _grid_of(wavelength, medium)
    _check_medium(medium)
    check_increasing(wl_out, "wavelength")
    wl_native = _native(spectrum, medium)
    w, covered = resampling_matrix(wl_native, wl_out, method, gap_factor)
    flux, ivar, mask = apply_resampling(w, covered, spectrum.flux, spectrum.ivar, spectrum.mask)
    _check_result(spectrum, wl_native, wl_out, medium, covered, ivar)
    return Spectrum(wl_out, flux, ivar, mask, _resampled_meta(spectrum, wl_native, medium, method))


def resample_batch(spectra, wavelength, *, medium: str = "vacuum", method: str = "linear",
                   gap_factor: float = DEFAULT_GAP_FACTOR) -> SpectrumBatch:
    """Resample many spectra onto one grid and stack them (the map is built once per native grid).

    Raises InputError (naming the file and id) for the first spectrum that does not overlap the grid;
    use :func:`paynekit.io.read_spectra` with ``resample_to=`` to turn those into failure records.
    """
    spectra = list(spectra)
    if not spectra:
        raise InputError("spectra is empty")
    _check_method(method)
    wl_out, medium = _grid_of(wavelength, medium)
    _check_medium(medium)
    check_increasing(wl_out, "wavelength")
    cache = {}
    n = len(spectra)
    flux = np.empty((n, wl_out.size))
    ivar = np.empty((n, wl_out.size))
    mask = np.empty((n, wl_out.size), bool)
    metas = []
    for i, s in enumerate(spectra):
        if not isinstance(s, Spectrum):
            raise InputError(f"spectra[{i}] must be a Spectrum, got {type(s).__name__}")
        wl_native = _native(s, medium)
        key = (wl_native.size, float(wl_native[0]), float(wl_native[-1]), hash(wl_native.tobytes()))
        if key not in cache:
            cache[key] = resampling_matrix(wl_native, wl_out, method, gap_factor)
        w, covered = cache[key]
        flux[i], ivar[i], mask[i] = apply_resampling(w, covered, s.flux, s.ivar, s.mask)
        _check_result(s, wl_native, wl_out, medium, covered, ivar[i])
        metas.append(_resampled_meta(s, wl_native, medium, method))
    ids = [s.id or str(i) for i, s in enumerate(spectra)]
    return SpectrumBatch(wl_out, flux, ivar, mask, ids, metas)
