"""Continuum normalisation: Chebyshev polynomials fitted per region to continuum pixels, as The Payne does.

The Payne (and The Cannon before it) divides each APOGEE spectrum by a degree-4 Chebyshev polynomial
fitted, separately on each of the three detectors, to a fixed list of "continuum pixels", weighting
each pixel by its inverse variance. :class:`ChebyshevContinuum` does this for any grid:

* ``regions``: wavelength intervals fitted separately (default the APOGEE chips
  15100-15793, 15880-16417 and 16499-17000 A; ``None`` fits the whole spectrum as one region).
  Pixels outside every region get no continuum: their normalised ivar is 0.
* ``continuum_pixels``: a boolean array on the spectrum's grid, **True = continuum pixel** (used
  in the fit); load one from a file with :func:`load_continuum_pixels` (same convention: True / 1
  means continuum) or derive one from a trained model with :func:`continuum_pixels_from_emulator`.
* weights: the fit minimises sum ivar * (flux - continuum)^2 over usable continuum pixels
  (numpy's ``Chebyshev.fit(w=1/err)``, which The Payne uses, is the same least-squares problem).
* optional iterative sigma clipping (``sigma_clip=(lower, upper)`` in units of each pixel's error;
  make ``upper`` generous, e.g. (2, 5): a first fit pulled down by absorption sits below the true
  continuum, and symmetric clipping would then reject the good pixels above it).
* normalised flux = flux / continuum, normalised ivar = ivar * continuum^2. Where the continuum is
  undefined or not positive (region without enough continuum pixels) the pixel gets ivar 0,
  flux 0 and mask True, like every unusable pixel in paynekit.

The Chebyshev argument of a region is linear in log(wavelength), from -1 at the region's first pixel to
+1 at its last; on a log-linear grid (APOGEE, BOSS, LAMOST) that is the pixel index, as in The Payne.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import as_float_array, check_increasing
from .errors import FileFormatError, InputError
from .spectra import Spectrum, SpectrumBatch
from .wavelength import APOGEE_CHIPS

log = logging.getLogger(__name__)

#: In continuum-pixel arrays and files, this value marks a continuum pixel.
CONTINUUM = True

_MASK_KEYS = ("continuum", "continuum_pixels", "continuum_mask", "pixels_cannon", "cont_pixels")


@dataclass(frozen=True)
class ChebyshevContinuum:
    """Chebyshev continuum fitted separately per wavelength region to continuum pixels.

    Parameters
    ----------
    degree : int
        Polynomial degree in each region (The Payne: 4).
    regions : tuple of (low, high) Angstrom, or None
        Regions fitted separately (default the three APOGEE chips); None = one region, the whole grid.
    sigma_clip : (lower, upper) or None
        Iteratively drop continuum pixels more than ``lower`` sigma below or ``upper`` sigma above the
        fit (None: no clipping, as in The Payne).
    max_iterations : int
        Most clipping iterations.
    min_pixels : int or None
        Fewest usable continuum pixels a region needs (default 2 * (degree + 1)); below that its
        continuum is undefined and its pixels are masked.
    """

    degree: int = 4
    regions: tuple | None = APOGEE_CHIPS
    sigma_clip: tuple | None = None
    max_iterations: int = 5
    min_pixels: int | None = None

    def __post_init__(self):
        if not isinstance(self.degree, (int, np.integer)) or isinstance(self.degree, bool) or self.degree < 0:
            raise InputError(f"degree must be a non-negative integer, got {self.degree!r}")
        if self.regions is not None:
            try:
                regions = tuple((float(lo), float(hi)) for lo, hi in self.regions)
            except (TypeError, ValueError):
                raise InputError(f"regions must be (low, high) pairs in Angstrom, got {self.regions!r}") from None
            if not regions or any(not hi > lo for lo, hi in regions):
                raise InputError(f"regions must be non-empty (low, high) pairs with high > low, got {regions}")
            object.__setattr__(self, "regions", regions)
        if self.sigma_clip is not None:
            try:
                low, high = (float(v) for v in self.sigma_clip)
            except (TypeError, ValueError):
                raise InputError(f"sigma_clip must be (lower, upper) or None, got {self.sigma_clip!r}") from None
            if not (low > 0 and high > 0):
                raise InputError(f"sigma_clip values must be positive, got {self.sigma_clip!r}")
            object.__setattr__(self, "sigma_clip", (low, high))
        if not isinstance(self.max_iterations, (int, np.integer)) or self.max_iterations < 1:
            raise InputError(f"max_iterations must be a positive integer, got {self.max_iterations!r}")
        min_pixels = 2 * (self.degree + 1) if self.min_pixels is None else self.min_pixels
        if not isinstance(min_pixels, (int, np.integer)) or min_pixels < self.degree + 1:
            raise InputError(f"min_pixels must be an integer >= degree + 1 = {self.degree + 1}, got {self.min_pixels!r}")
        object.__setattr__(self, "min_pixels", int(min_pixels))

    # -- arrays ------------------------------------------------------------------------------------
    def fit(self, wavelength, flux, ivar, continuum_pixels, mask=None) -> np.ndarray:
        """The continuum (same shape as ``flux``: (P,) or (N, P)); NaN where it is undefined."""
        return fit_continuum(wavelength, flux, ivar, continuum_pixels, mask=mask, degree=self.degree,
                             regions=self.regions, sigma_clip=self.sigma_clip, max_iterations=self.max_iterations,
                             min_pixels=self.min_pixels)

    # -- records -----------------------------------------------------------------------------------
    def normalize(self, spectra, continuum_pixels):
        """A new Spectrum / SpectrumBatch divided by its continuum, ivar scaled by continuum^2.

        ``continuum_pixels`` is a boolean array on the spectra's grid (True = continuum) or a path
        for :func:`load_continuum_pixels`. The result's meta has ``normalized`` True and
        ``continuum_failed_regions`` (regions whose continuum could not be fitted, usually empty).
        """
        single = isinstance(spectra, Spectrum)
        if not single and not isinstance(spectra, SpectrumBatch):
            raise InputError(f"spectra must be a Spectrum or SpectrumBatch, got {type(spectra).__name__}")
        wl = spectra.wavelength
        if isinstance(continuum_pixels, (str, Path)):
            continuum_pixels = load_continuum_pixels(continuum_pixels, wl)
        usable = spectra.usable_ivar()
        flux = np.where(usable > 0, spectra.flux, 0.0)
        cont = self.fit(wl, flux, usable, continuum_pixels)
        norm_flux, norm_ivar, mask = apply_continuum(flux, usable, cont)
        cont2 = np.atleast_2d(cont)
        metas = [spectra.meta] if single else spectra.meta
        new_meta = []
        for i, m in enumerate(metas):
            failed = [r for r in self._region_list(wl) if _region_failed(wl, cont2[i], r)]
            new_meta.append(dict(m, normalized=True, continuum_failed_regions=failed,
                                 continuum_model=f"chebyshev degree {self.degree} per region"))
            if failed:
                log.warning("%s: no continuum in region(s) %s (fewer than %d usable continuum pixels)",
                            m.get("id", f"spectrum {i}"), failed, self.min_pixels)
        if single:
            return Spectrum(wl, norm_flux, norm_ivar, mask, new_meta[0])
        return SpectrumBatch(wl, norm_flux, norm_ivar, mask, list(spectra.ids), new_meta)

    def _region_list(self, wavelength):
        if self.regions is None:
            return [(float(wavelength[0]), float(wavelength[-1]))]
        return [r for r in self.regions if np.any((wavelength >= r[0]) & (wavelength <= r[1]))]


def _region_failed(wavelength, cont, region) -> bool:
    inside = (wavelength >= region[0]) & (wavelength <= region[1])
    return bool(np.any(inside) and not np.all(np.isfinite(cont[inside])))


def _solve(gram, rhs):
    """Batched solve of (n, k, k) x = (n, k); singular systems give NaN."""
    out = np.full(rhs.shape, np.nan)
    try:
        return np.linalg.solve(gram, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        for i in range(gram.shape[0]):
            try:
                out[i] = np.linalg.solve(gram[i], rhs[i])
            except np.linalg.LinAlgError:
                pass
        return out


def fit_continuum(wavelength, flux, ivar, continuum_pixels, *, mask=None, degree: int = 4, regions=APOGEE_CHIPS,
                  sigma_clip=None, max_iterations: int = 5, min_pixels: int | None = None) -> np.ndarray:
    """Chebyshev continuum of one (P,) or many (N, P) spectra; see :class:`ChebyshevContinuum`.

    Pure array function: returns a new array, NaN where no region covers a pixel or a region has
    fewer than ``min_pixels`` usable continuum pixels (those with ivar > 0, finite flux, not masked).
    """
    if not isinstance(continuum_pixels, np.ndarray) or continuum_pixels.dtype != bool:
        cp = np.asarray(continuum_pixels)
        if cp.dtype.kind in "iu" and set(np.unique(cp)) <= {0, 1}:
            cp = cp.astype(bool)
        if cp.dtype != bool:
            raise InputError("continuum_pixels must be a boolean array on the spectrum's grid (True = continuum); "
                             f"got dtype {cp.dtype}")
        continuum_pixels = cp
    config = ChebyshevContinuum(degree=degree, regions=regions, sigma_clip=sigma_clip,
                                max_iterations=max_iterations, min_pixels=min_pixels)
    wl = as_float_array(wavelength, "wavelength", ndim=1)
    check_increasing(wl)
    f = as_float_array(flux, "flux", ndim=(1, 2))
    single = f.ndim == 1
    f = np.atleast_2d(f)
    iv = np.atleast_2d(as_float_array(ivar, "ivar", ndim=(1, 2)))
    if f.shape[1] != wl.size or iv.shape != f.shape:
        raise InputError(f"flux {f.shape} and ivar {iv.shape} must have {wl.size} pixels per spectrum, like wavelength")
    if continuum_pixels.shape != wl.shape:
        raise InputError(f"continuum_pixels has shape {continuum_pixels.shape} but wavelength has {wl.shape}")
    good = np.isfinite(f) & np.isfinite(iv) & (iv > 0)
    if mask is not None:
        m = np.atleast_2d(np.asarray(mask, dtype=bool))
        if m.shape[1] != wl.size:
            raise InputError(f"mask has shape {np.shape(mask)} but wavelength has {wl.shape}")
        good &= ~m
    weights0 = np.where(good & continuum_pixels[None, :], iv, 0.0)
    f = np.where(good, f, 0.0)
    cont = np.full(f.shape, np.nan)
    for lo, hi in config._region_list(wl):
        idx = np.flatnonzero((wl >= lo) & (wl <= hi))
        x = np.log(wl[idx])
        span = x[-1] - x[0]
        t = 2.0 * (x - x[0]) / span - 1.0 if span > 0 else np.zeros_like(x)
        basis = np.polynomial.chebyshev.chebvander(t, config.degree)  # (P_r, K)
        fr = f[:, idx]
        w0 = weights0[:, idx]
        w = w0
        for _ in range(config.max_iterations):
            enough = np.count_nonzero(w > 0, axis=1) >= config.min_pixels
            coef = np.full((f.shape[0], basis.shape[1]), np.nan)
            if np.any(enough):
                gram = np.einsum("pk,np,pl->nkl", basis, w[enough], basis, optimize=True)
                rhs = np.einsum("pk,np->nk", basis, w[enough] * fr[enough], optimize=True)
                coef[enough] = _solve(gram, rhs)
            model = coef @ basis.T  # (N, P_r)
            if config.sigma_clip is None:
                break
            low, high = config.sigma_clip
            z = (fr - model) * np.sqrt(w0)
            keep = (w0 > 0) & (z > -low) & (z < high)
            w_new = np.where(keep, w0, 0.0)
            # a spectrum that clipping would leave with too few pixels keeps its previous pixels
            starved = np.count_nonzero(w_new > 0, axis=1) < config.min_pixels
            w_new[starved] = w[starved]
            if np.array_equal(w_new > 0, w > 0):
                break
            w = w_new
        cont[:, idx] = model
    return cont[0] if single else cont


def apply_continuum(flux, ivar, continuum):
    """(flux / continuum, ivar * continuum^2, mask): pixels with no positive finite continuum are masked."""
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    cont = np.asarray(continuum, dtype=np.float64)
    ok = np.isfinite(cont) & (cont > 0) & np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    safe = np.where(ok, cont, 1.0)
    return np.where(ok, flux / safe, 0.0), np.where(ok, ivar * safe**2, 0.0), ~ok


def normalize(spectra, continuum_pixels, model: ChebyshevContinuum | None = None):
    """Continuum-normalise a Spectrum or SpectrumBatch (default model: The Payne's APOGEE setup)."""
    return (model or ChebyshevContinuum()).normalize(spectra, continuum_pixels)


# ------------------------------------------------------------------------------------------------
# continuum pixels
# ------------------------------------------------------------------------------------------------
def _as_flags(values, path) -> np.ndarray:
    v = np.asarray(values)
    if v.dtype == bool:
        return v.ravel()
    if v.dtype.kind in "iuf" and np.all(np.isin(v, (0, 1))):
        return v.astype(bool).ravel()
    raise FileFormatError(f"{path}: continuum flags must be booleans or 0/1 per pixel (True/1 = continuum); "
                          f"found values like {np.unique(v)[:5]}")


def load_continuum_pixels(path, wavelength=None, *, key: str | None = None) -> np.ndarray:
    """Continuum pixels from a file: a boolean array, **True (or 1) = continuum pixel**.

    Accepted files: ``.npz`` (array ``key``, else one of continuum, continuum_pixels, continuum_mask,
    pixels_cannon, cont_pixels, else its only boolean array; an optional ``wavelength`` array gives
    its grid), ``.npy``, or text with one 0/1 per line or two columns (wavelength, 0/1).
    A file without wavelengths of 7214, 7514 or 8575 pixels is on The Payne's, the DR13+ ASPCAP or
    the apStar grid.

    If ``wavelength`` (the grid of your spectra) is given and differs from the file's grid, each
    pixel takes the flag of the nearest file pixel, and is a continuum pixel only if that file pixel
    lies within half a file step of it.
    """
    from .io.arrays import known_grid

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such continuum-pixel file")
    file_wl = None
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                names = list(data.files)
                if key is not None:
                    if key not in names:
                        raise FileFormatError(f"{path}: no array {key!r}; arrays: {names}")
                    chosen = key
                else:
                    chosen = next((k for k in _MASK_KEYS if k in names), None)
                    if chosen is None:
                        bools = [k for k in names if data[k].dtype == bool]
                        if len(bools) != 1:
                            raise FileFormatError(f"{path}: cannot tell which array holds the continuum flags "
                                                  f"(arrays: {names}); pass key=")
                        chosen = bools[0]
                flags = _as_flags(data[chosen], path)
                if "wavelength" in names:
                    file_wl = np.asarray(data["wavelength"], dtype=np.float64).ravel()
        elif suffix == ".npy":
            flags = _as_flags(np.load(path, allow_pickle=False), path)
        else:
            table = np.loadtxt(path, ndmin=2)
            if table.shape[1] == 1:
                flags = _as_flags(table[:, 0], path)
            elif table.shape[1] == 2:
                file_wl, flags = table[:, 0].astype(np.float64), _as_flags(table[:, 1], path)
            else:
                raise FileFormatError(f"{path}: text continuum files have 1 column (0/1) or 2 (wavelength, 0/1); "
                                      f"this has {table.shape[1]}")
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileFormatError):
            raise
        raise FileFormatError(f"{path}: unreadable continuum-pixel file ({exc})") from None
    if file_wl is None:
        grid = known_grid(flags.size)
        file_wl = grid[0] if grid is not None else None
    elif file_wl.size != flags.size:
        raise FileFormatError(f"{path}: {file_wl.size} wavelengths for {flags.size} flags")
    if wavelength is None:
        return flags
    wl = as_float_array(wavelength, "wavelength", ndim=1)
    if file_wl is None:
        if flags.size != wl.size:
            raise InputError(f"{path}: {flags.size} continuum flags without wavelengths, but the grid has {wl.size} "
                             "pixels")
        return flags
    if file_wl.size == wl.size and np.allclose(file_wl, wl, rtol=0, atol=1e-6 * wl[0]):
        return flags
    j = np.clip(np.searchsorted(file_wl, wl), 1, file_wl.size - 1)
    nearest = np.where(np.abs(file_wl[j - 1] - wl) <= np.abs(file_wl[j] - wl), j - 1, j)
    step = np.gradient(file_wl)[nearest]
    return flags[nearest] & (np.abs(file_wl[nearest] - wl) <= 0.5 * np.abs(step))


#: Default share of pixels chosen as continuum from a model: about that of The Cannon's APOGEE
#: continuum pixels (529 of 7214 = 7.3%).
DEFAULT_CONTINUUM_FRACTION = 0.07


def continuum_score(emulator, *, labels=None, n_samples: int = 256, seed: int = 0) -> np.ndarray:
    """Worst-case deviation from 1 of each model pixel, max over labels of |flux - 1| (P,).

    The model is evaluated at ``labels`` (physical, (N, L)) or at ``n_samples`` label vectors drawn
    uniformly (seeded) in its training box. A small score means the pixel's flux is near 1 and
    depends little on the labels: a continuum pixel in the sense of The Cannon.
    """
    if labels is None:
        if not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
            raise InputError(f"n_samples must be an integer >= 2, got {n_samples!r}")
        rng = np.random.default_rng(seed)
        x_scaled = rng.uniform(-0.5, 0.5, size=(n_samples, emulator.n_labels))
    else:
        x = as_float_array(labels, "labels", ndim=2)
        if x.shape[1] != emulator.n_labels or x.shape[0] < 2:
            raise InputError(f"labels must be (N >= 2, {emulator.n_labels}), got {x.shape}")
        x_scaled = emulator.label_space.scale(x)
    score = np.zeros(emulator.n_pixels)
    for start in range(0, x_scaled.shape[0], 64):
        flux = np.asarray(emulator.predict_scaled(x_scaled[start:start + 64]), dtype=np.float64)
        score = np.maximum(score, np.max(np.abs(flux - 1.0), axis=0))
    return score


def continuum_pixels_from_emulator(emulator, *, fraction: float = DEFAULT_CONTINUUM_FRACTION,
                                   max_deviation: float | None = None, regions=None, labels=None,
                                   n_samples: int = 256, seed: int = 0) -> np.ndarray:
    """Continuum pixels of a trained model: flux near 1 that depends least on the labels (The Cannon's idea).

    Each pixel is scored by :func:`continuum_score` (max over labels of |flux - 1|). With
    ``max_deviation``, the pixels scoring below it are chosen; otherwise the best ``fraction`` of the
    pixels of each region (``regions``: (low, high) Angstrom pairs, e.g. the APOGEE chips, so that
    every region fitted separately gets continuum pixels; None = the whole grid).

    Returns a boolean array (P,) on the model's grid, **True = continuum**.
    """
    score = continuum_score(emulator, labels=labels, n_samples=n_samples, seed=seed)
    if max_deviation is not None:
        if not max_deviation > 0:
            raise InputError(f"max_deviation must be positive, got {max_deviation!r}")
        return score < max_deviation
    if not 0 < fraction <= 1:
        raise InputError(f"fraction must be in (0, 1], got {fraction!r}")
    wl = emulator.wavelength
    if regions is None or wl is None:
        groups = [np.arange(emulator.n_pixels)]
    else:
        config = ChebyshevContinuum(regions=regions)
        groups = [np.flatnonzero((wl >= lo) & (wl <= hi)) for lo, hi in config._region_list(np.asarray(wl))]
    chosen = np.zeros(emulator.n_pixels, bool)
    for idx in groups:
        n = int(np.ceil(fraction * idx.size))
        chosen[idx[np.argsort(score[idx], kind="stable")[:n]]] = True
    return chosen
