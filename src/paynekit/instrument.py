"""The instrument between a model spectrum and an observation: Doppler shift, line-spread function, continuum.

Conventions
-----------
* Doppler shift is classical, as in The Payne and SDSS Astra: ``lambda_obs = lambda_rest * (1 + v / c)``
  (v in km/s, positive = receding). At |v| <= 500 km/s the relativistic factor differs by < 1e-6.
* A model (emulator) spectrum lives on its own rest-frame grid. :class:`DopplerResampler` maps it onto the
  data grid for a velocity v with a cubic convolution (Catmull-Rom, Keys a = -1/2) interpolant in the model's
  pixel index, which is continuous with a continuous first derivative, so that d flux / d v exists everywhere
  and Gauss-Newton steps in v behave. Its derivative with respect to v is exact for that interpolant.
* A line-spread function (LSF) is a :class:`BandedOperator` on a wavelength grid: ``y_i = sum_k W[i, k]
  x[i + k - h]``. :class:`GaussianLSF` builds it for a resolving power R (FWHM = lambda / R, sigma =
  FWHM / (2 sqrt(2 ln 2)) = FWHM / 2.3548, taps to ``n_sigma`` = 4 sigma by default); on a log-uniform grid
  every row is the same kernel, on any other grid each row is its own Gaussian (a sparse band matrix, see
  :meth:`BandedOperator.to_sparse`). :class:`PixelKernelLSF` takes per-pixel kernels.
  The fitter applies the LSF to the model in its rest frame, before the Doppler shift: for a Gaussian of
  constant R this is exact (the shift scales wavelength and width by the same factor), for a per-pixel
  kernel the error is of order v/c of the kernel width (< 0.2 % at 500 km/s).
* A continuum strategy gives the linear design of a multiplicative "residual response":
  :class:`NoContinuum` (the observed spectrum is already normalised, as for The Payne / Astra) or
  :class:`ChebyshevContinuum` (a Chebyshev series per wavelength region, as Zeta-Payne fits; APOGEE chips
  by default). The coefficients enter linearly and the fitter solves them exactly at each step.

Grids may have gaps (the APOGEE chip gaps): a step larger than :data:`GRID_GAP_FACTOR` times its
neighbours splits a grid into segments, and interpolation never reaches across a gap.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ._kernels import doppler_rows, numba_enabled
from .checks import as_float_array, check_increasing
from .errors import InputError
from .wavelength import APOGEE_CHIPS

#: Speed of light in km/s.
SPEED_OF_LIGHT_KMS = 299_792.458
#: FWHM of a Gaussian in units of its sigma, 2 sqrt(2 ln 2) (the "2.355" of the literature).
GAUSSIAN_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Default half-width of a Gaussian LSF kernel, in sigma.
DEFAULT_LSF_N_SIGMA = 4.0
#: A wavelength step this many times larger than both neighbouring steps is a gap between segments.
GRID_GAP_FACTOR = 2.5
#: Relative spread of steps below which a segment counts as uniform in log or linear wavelength.
UNIFORM_STEP_RTOL = 1e-6
#: Tolerance for calling two wavelength grids the same (relative).
SAME_GRID_RTOL = 1e-9
#: Wavelength tolerance (relative) for a pixel to sit on a region edge.
REGION_EDGE_RTOL = 1e-9
#: Bytes of model values (rows x channels x pixels) the numpy Doppler shift handles at a time (cache-sized).
DOPPLER_BLOCK_BYTES = 1 << 21


def doppler_factor(v_kms) -> np.ndarray:
    """``lambda_obs / lambda_rest = 1 + v / c`` (classical Doppler shift)."""
    return 1.0 + np.asarray(v_kms, dtype=np.float64) / SPEED_OF_LIGHT_KMS


def velocity_per_pixel(wavelength) -> float:
    """Median velocity step of a grid in km/s (``c * median(d ln lambda)``)."""
    wl = np.asarray(wavelength, dtype=np.float64)
    return float(SPEED_OF_LIGHT_KMS * np.median(np.diff(np.log(wl))))


# ------------------------------------------------------------------------------------------------
# grids: segments between gaps, and the fractional pixel index of a wavelength
# ------------------------------------------------------------------------------------------------
def grid_segments(wavelength) -> list[tuple[int, int]]:
    """Half-open pixel ranges [a, b) of a grid between gaps (a step > GRID_GAP_FACTOR x its neighbours)."""
    wl = np.asarray(wavelength, dtype=np.float64)
    d = np.diff(np.log(wl))
    if d.size < 3:
        return [(0, wl.size)]
    left = np.concatenate([[d[1]], d[:-1]])
    right = np.concatenate([d[1:], [d[-2]]])
    gap = d > GRID_GAP_FACTOR * np.maximum(left, right)
    cuts = np.flatnonzero(gap) + 1
    edges = np.concatenate([[0], cuts, [wl.size]])
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


@dataclass(frozen=True)
class _Segment:
    start: int
    stop: int
    kind: str  # "log", "linear", "general"
    origin: float  # ln(lambda_start) for log, lambda_start for linear
    step: float  # d ln(lambda) or d lambda per pixel
    wl_lo: float
    wl_hi: float


def _describe_segments(wavelength) -> list[_Segment]:
    wl = np.asarray(wavelength, dtype=np.float64)
    out = []
    for a, b in grid_segments(wl):
        seg = wl[a:b]
        kind, origin, step = "general", 0.0, 0.0
        if seg.size >= 2:
            dln = np.diff(np.log(seg))
            dl = np.diff(seg)
            if np.ptp(dln) <= UNIFORM_STEP_RTOL * dln.mean():
                kind, origin, step = (
                    "log",
                    float(np.log(seg[0])),
                    float((np.log(seg[-1]) - np.log(seg[0])) / (seg.size - 1)),
                )
            elif np.ptp(dl) <= UNIFORM_STEP_RTOL * dl.mean():
                kind, origin, step = "linear", float(seg[0]), float((seg[-1] - seg[0]) / (seg.size - 1))
        out.append(_Segment(a, b, kind, origin, step, float(seg[0]), float(seg[-1])))
    return out


def _fractional_index(segments, wavelength, lam):
    """Fractional index t of wavelengths ``lam`` in a segmented grid, with dt/dlambda and segment bounds.

    Returns (t, dt_dlam, seg_start, seg_stop, inside); outside every segment ``inside`` is False and the
    other values are those of the nearest segment (finite, clamped).
    """
    lam = np.asarray(lam, dtype=np.float64)
    starts = np.array([s.wl_lo for s in segments])
    k = np.clip(np.searchsorted(starts, lam, side="right") - 1, 0, len(segments) - 1)
    t = np.empty_like(lam)
    slope = np.empty_like(lam)
    a_out = np.empty(lam.shape, dtype=np.int64)
    b_out = np.empty(lam.shape, dtype=np.int64)
    inside = np.zeros(lam.shape, dtype=bool)
    for j, s in enumerate(segments):
        sel = k == j
        if not np.any(sel):
            continue
        x = lam[sel]
        if s.kind == "log":
            t[sel] = s.start + (np.log(x) - s.origin) / s.step
            slope[sel] = 1.0 / (s.step * x)
        elif s.kind == "linear":
            t[sel] = s.start + (x - s.origin) / s.step
            slope[sel] = 1.0 / s.step
        else:
            seg_wl = wavelength[s.start : s.stop]
            idx = np.arange(s.start, s.stop, dtype=np.float64)
            t[sel] = np.interp(x, seg_wl, idx)
            i = np.clip(np.searchsorted(seg_wl, x) - 1, 0, max(seg_wl.size - 2, 0))
            dw = np.diff(seg_wl) if seg_wl.size > 1 else np.array([1.0])
            slope[sel] = 1.0 / dw[i]
        tol = REGION_EDGE_RTOL * s.wl_hi
        inside[sel] = (x >= s.wl_lo - tol) & (x <= s.wl_hi + tol)
        a_out[sel] = s.start
        b_out[sel] = s.stop
    t = np.clip(t, a_out, b_out - 1)
    return t, slope, a_out, b_out, inside


# ------------------------------------------------------------------------------------------------
# cubic convolution interpolation weights (Keys 1981, a = -1/2: Catmull-Rom)
# ------------------------------------------------------------------------------------------------
def cubic_weights(frac, derivative: bool = False):
    """Weights (..., 4) of the taps at offsets -1, 0, 1, 2 for fractional positions ``frac`` in [0, 1).

    With ``derivative`` also the derivatives of the weights with respect to ``frac``.
    """
    t = np.asarray(frac, dtype=np.float64)[..., None]
    t2, t3 = t * t, t * t * t
    w = np.concatenate(
        [(-t3 + 2 * t2 - t) / 2, (3 * t3 - 5 * t2 + 2) / 2, (-3 * t3 + 4 * t2 + t) / 2, (t3 - t2) / 2],
        axis=-1,
    )
    if not derivative:
        return w, None
    dw = np.concatenate(
        [(-3 * t2 + 4 * t - 1) / 2, (9 * t2 - 10 * t) / 2, (-9 * t2 + 8 * t + 1) / 2, (3 * t2 - 2 * t) / 2],
        axis=-1,
    )
    return w, dw


# ------------------------------------------------------------------------------------------------
# array helpers that work on numpy arrays and torch tensors alike
# ------------------------------------------------------------------------------------------------
def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _zeros(shape, like):
    if _is_torch(like):
        return like.new_zeros(shape)
    return np.zeros(shape, dtype=like.dtype)


def _const(arr, like):
    """A numpy array as a constant of the same kind, dtype and device as ``like``."""
    if _is_torch(like):
        import torch

        return torch.tensor(
            np.array(arr), dtype=like.dtype, device=like.device
        )  # a copy: arr may be read-only
    return np.asarray(arr, dtype=like.dtype)


def _index(idx, like):
    if _is_torch(like):
        import torch

        return torch.as_tensor(idx, dtype=torch.long, device=like.device)
    return idx


def _axpy(acc, w, x, tmp):
    """``acc += w * x`` in place; numpy goes through the preallocated ``tmp`` (no large temporaries)."""
    if tmp is None:
        acc.add_(x * w)
        return
    t = tmp[..., : x.shape[-1]]
    np.multiply(x, w, out=t)
    acc += t


def _gather_last(values, idx):
    """``values[n, c, idx[n, p]]`` for values (n, C, P_in) and idx (n, P_out) -> (n, C, P_out)."""
    if _is_torch(values):
        import torch

        ti = torch.as_tensor(idx, dtype=torch.long, device=values.device)
        return torch.gather(values, 2, ti[:, None, :].expand(-1, values.shape[1], -1))
    n, c, p_in = values.shape
    flat = values.reshape(n * c, p_in)
    rows = np.arange(n * c).reshape(n, c, 1) * p_in
    return np.take(flat, rows + idx[:, None, :])


# ------------------------------------------------------------------------------------------------
# Doppler shift + interpolation onto the data grid
# ------------------------------------------------------------------------------------------------
class DopplerResampler:
    """Maps values on a rest-frame model grid to a data grid for radial velocities v (km/s).

    ``apply(values, v)`` with values (n, C, P_model) (flux and any derivative channels) returns
    (n, C, P_data); with ``derivative=True`` one extra channel holds d values[:, 0] / d v.
    Data pixels whose rest wavelength falls outside the model grid, or in one of its gaps, are not
    covered (:meth:`coverage`); they receive finite but meaningless values and must get zero weight.
    """

    def __init__(self, model_wavelength, data_wavelength):
        self.model_wavelength = as_float_array(model_wavelength, "model_wavelength", ndim=1)
        self.data_wavelength = as_float_array(data_wavelength, "data_wavelength", ndim=1)
        check_increasing(self.model_wavelength, "model_wavelength")
        check_increasing(self.data_wavelength, "data_wavelength")
        self.segments = _describe_segments(self.model_wavelength)
        self.same_grid = self.model_wavelength.shape == self.data_wavelength.shape and bool(
            np.allclose(self.model_wavelength, self.data_wavelength, rtol=SAME_GRID_RTOL, atol=0.0)
        )
        steps = {round(s.step, 15) for s in self.segments}
        self.fast = self.same_grid and all(s.kind == "log" for s in self.segments) and len(steps) == 1
        self.log_step = self.segments[0].step if self.fast else None
        self._seg_starts = np.array([seg.start for seg in self.segments], dtype=np.int64)
        self._seg_stops = np.array([seg.stop for seg in self.segments], dtype=np.int64)

    @property
    def n_model(self) -> int:
        return self.model_wavelength.size

    @property
    def n_data(self) -> int:
        return self.data_wavelength.size

    def is_identity(self, v) -> bool:
        return self.same_grid and bool(np.all(np.asarray(v) == 0.0))

    def _positions(self, v):
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        lam_rest = self.data_wavelength[None, :] / doppler_factor(v)[:, None]
        t, slope, a, b, inside = _fractional_index(self.segments, self.model_wavelength, lam_rest)
        # d t / d v = dt/dlam * dlam_rest/dv, lam_rest = lam / (1 + v/c)
        dt_dv = slope * (-lam_rest / (SPEED_OF_LIGHT_KMS + v[:, None]))
        return t, dt_dv, a, b, inside

    def coverage(self, v_low, v_high=None) -> np.ndarray:
        """(n, P_data) True where the model covers the pixel for every velocity in [v_low, v_high]."""
        v_low = np.atleast_1d(np.asarray(v_low, dtype=np.float64))
        v_high = v_low if v_high is None else np.atleast_1d(np.asarray(v_high, dtype=np.float64))
        if self.fast:  # the fast path reads each pixel's own segment: the rest position must stay in it
            covered = np.ones((v_low.size, self.n_data), dtype=bool)
            i = np.arange(self.n_data, dtype=np.float64)
            for vv in (v_low, v_high):
                t = i[None, :] - (np.log1p(vv / SPEED_OF_LIGHT_KMS) / self.log_step)[:, None]
                for seg in self.segments:
                    sl = slice(seg.start, seg.stop)
                    covered[:, sl] &= (t[:, sl] >= seg.start - 1e-9) & (t[:, sl] <= seg.stop - 1 + 1e-9)
            return covered
        _, _, a1, _, in1 = self._positions(v_low)
        _, _, a2, _, in2 = self._positions(v_high)
        return in1 & in2 & (a1 == a2)

    def apply(self, values, v, derivative: bool = False):
        """Shift model values (n, C, P_model) to the data grid at velocities v (n,)."""
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        n, _c, p = values.shape
        if p != self.n_model:
            raise InputError(f"values have {p} pixels but the model grid has {self.n_model}")
        if v.size != n:
            raise InputError(f"v has {v.size} entries but values hold {n} spectra")
        if self.fast:
            return self._apply_fast(values, v, derivative)
        return self._apply_general(values, v, derivative)

    def _apply_fast(self, values, v, derivative):
        # same piecewise log-uniform grid: one shift delta (pixels) per spectrum for all pixels. With
        # s = round(delta) the cubic taps lie at offsets -2..2 from s (one of them zero), so spectra that
        # share s (e.g. all near v = 0) are one slice operation; taps beyond a segment edge read the edge.
        n, c, p = values.shape
        if not _is_torch(values) and numba_enabled():
            return self._apply_compiled(values, v, derivative)
        delta = -np.log1p(v / SPEED_OF_LIGHT_KMS) / self.log_step
        s = np.rint(delta).astype(np.int64)
        frac = delta - s
        neg = frac < 0
        w4, dw4 = cubic_weights(np.where(neg, frac + 1.0, frac), derivative)
        w = np.zeros((n, 5))
        w[~neg, 1:] = w4[~neg]
        w[neg, :4] = w4[neg]
        if derivative:
            dw = np.zeros((n, 5))
            dw[~neg, 1:] = dw4[~neg]
            dw[neg, :4] = dw4[neg]
            dw *= (-1.0 / ((SPEED_OF_LIGHT_KMS + v) * self.log_step))[:, None]
        extra = 1 if derivative else 0
        out = _zeros((n, c + extra, p), values)
        # numpy: work on blocks of rows small enough to stay in a core's cache; the taps re-read the
        # same memory five times, and on (n, C, P) arrays of tens of MB each pass otherwise goes to RAM
        torch_mode = _is_torch(values)
        block = n if torch_mode else max(1, DOPPLER_BLOCK_BYTES // max(1, c * p * values.itemsize))
        tmp = None if torch_mode else np.empty((min(block, n), c, p), dtype=values.dtype)
        for s_u in np.unique(s):
            rows_all = np.flatnonzero(s == s_u)
            for b0 in range(0, rows_all.size, block):
                rows = rows_all[b0 : b0 + block]
                self._shift_rows(values, out, rows, int(s_u), w, dw if derivative else None, tmp)
        return out

    def _apply_compiled(self, values, v, derivative):
        """The fast path as one compiled pass per star (see :mod:`paynekit._kernels`); same numbers."""
        n, c, p = values.shape
        vals = np.ascontiguousarray(values)
        out = np.empty((n, c + (1 if derivative else 0), p), dtype=vals.dtype)
        doppler_rows(vals, v, self.log_step, SPEED_OF_LIGHT_KMS, self._seg_starts, self._seg_stops, out)
        return out

    def _shift_rows(self, values, out, rows, s_u, w, dw, tmp):
        """``out[rows]`` = values[rows] shifted by the integer ``s_u`` and interpolated with weights w."""
        _, c, p = values.shape
        derivative = dw is not None
        contiguous = rows.size == rows[-1] - rows[0] + 1
        if contiguous:  # views: no copies in and out
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            src, acc = values[r0:r1], out[r0:r1]
        else:
            ri = _index(rows, values)
            src, acc = values[ri], _zeros((rows.size, out.shape[1], p), values)
        wk_np = w[rows]
        wk = _const(wk_np, values)
        dwk = _const(dw[rows], values) if derivative else None
        t = None if tmp is None else tmp[: rows.size]
        for k in range(5):
            if not np.any(wk_np[:, k]):
                continue
            o = s_u + k - 2
            wcol = wk[:, k, None, None]
            for seg in self.segments:
                a, b = seg.start, seg.stop
                lo, hi = min(a + max(0, -o), b), max(b - max(0, o), a)
                if hi > lo:
                    piece = src[:, :, lo + o : hi + o]
                    _axpy(acc[:, :c, lo:hi], wcol, piece, t)
                    if derivative:
                        acc[:, c, lo:hi] += dwk[:, k, None] * piece[:, 0, :]
                for e0, e1, edge in ((a, lo, a), (hi, b, b - 1)):
                    if e1 > e0:
                        piece = src[:, :, edge : edge + 1]
                        acc[:, :c, e0:e1] += wcol * piece
                        if derivative:
                            acc[:, c, e0:e1] += dwk[:, k, None] * piece[:, 0, :]
        if not contiguous:
            out[ri] = acc

    def _apply_general(self, values, v, derivative):
        n, c, _p = values.shape
        t, dt_dv, a, b, _ = self._positions(v)
        i0 = np.floor(t).astype(np.int64)
        frac = t - i0
        w, dw = cubic_weights(frac, derivative)
        out = _zeros((n, c + (1 if derivative else 0), self.n_data), values)
        wt = _const(w, values)
        if derivative:
            dwt = _const(dw * dt_dv[..., None], values)
        for k in range(4):
            idx = np.clip(i0 + (k - 1), a, b - 1)
            piece = _gather_last(values, idx)
            out[:, :c] += wt[:, None, :, k] * piece
            if derivative:
                out[:, c] += dwt[:, :, k] * piece[:, 0]
        return out


# ------------------------------------------------------------------------------------------------
# line-spread functions
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BandedOperator:
    """A band matrix in diagonal form: ``y[..., i] = sum_k weights[i, k] * x[..., i + k - half_width]``.

    Taps outside the grid have zero weight. ``fixed_kernel`` is True when every row away from the edges
    is the same kernel (a convolution), as on a log-uniform grid at constant resolving power.
    """

    weights: np.ndarray  # (P, 2 * half_width + 1)
    half_width: int
    fixed_kernel: bool = False

    @property
    def n_pixels(self) -> int:
        return self.weights.shape[0]

    def apply(self, x):
        """Apply along the last axis of a numpy array or torch tensor (..., P).

        numpy arrays go through a scipy.sparse product (one pass, no temporaries); torch tensors through
        one shifted multiply-add per tap (fast on a GPU).
        """
        p = x.shape[-1]
        if p != self.n_pixels:
            raise InputError(f"the LSF was built for {self.n_pixels} pixels but got arrays with {p}")
        h = self.half_width
        if h == 0:
            return x * _const(self.weights[:, 0], x)
        if not _is_torch(x):
            flat = np.ascontiguousarray(x).reshape(-1, p)
            return np.asarray(flat @ self._sparse_transposed(flat.dtype)).reshape(x.shape)
        import torch

        wt = _const(self.weights, x)
        pad = x.new_zeros(x.shape[:-1] + (h,))
        xp = torch.cat([pad, x, pad], dim=-1)
        out = wt[:, 0] * xp[..., 0:p]
        for k in range(1, 2 * h + 1):
            out += wt[:, k] * xp[..., k : k + p]
        return out

    def _sparse_transposed(self, dtype):
        key = np.dtype(dtype).str
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = self.to_sparse().T.tocsr().astype(dtype)
        return cache[key]

    def to_sparse(self):
        """The operator as a scipy.sparse CSR matrix (P, P)."""
        from scipy import sparse

        p, kk = self.weights.shape
        rows = np.repeat(np.arange(p), kk)
        cols = (np.arange(p)[:, None] + np.arange(kk)[None, :] - self.half_width).ravel()
        vals = self.weights.ravel()
        keep = (cols >= 0) & (cols < p) & (vals != 0)
        return sparse.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(p, p))


def _gaussian_band(wavelength, sigma, n_sigma) -> BandedOperator:
    wl = np.asarray(wavelength, dtype=np.float64)
    p = wl.size
    edges = np.concatenate(
        [[wl[0] - 0.5 * (wl[1] - wl[0])], 0.5 * (wl[1:] + wl[:-1]), [wl[-1] + 0.5 * (wl[-1] - wl[-2])]]
    )
    width = np.diff(edges)  # the quadrature weight of each pixel
    step = np.minimum(np.concatenate([[np.inf], np.diff(wl)]), np.concatenate([np.diff(wl), [np.inf]]))
    h = int(np.ceil(np.max(n_sigma * sigma / step)))
    h = max(min(h, p - 1), 0)
    offs = np.arange(-h, h + 1)
    j = np.arange(p)[:, None] + offs[None, :]
    valid = (j >= 0) & (j < p)
    jc = np.clip(j, 0, p - 1)
    u = (wl[jc] - wl[:, None]) / sigma[:, None]
    wts = np.where(valid & (np.abs(u) <= n_sigma), np.exp(-0.5 * u * u) * width[jc], 0.0)
    wts /= wts.sum(axis=1, keepdims=True)
    interior = wts[h : p - h] if p > 2 * h else wts
    fixed = bool(interior.shape[0] > 0 and np.allclose(interior, interior[:1], rtol=1e-6, atol=1e-12))
    wts.flags.writeable = False
    return BandedOperator(wts, h, fixed)


@dataclass(frozen=True)
class GaussianLSF:
    """A Gaussian line-spread function of resolving power R: FWHM = lambda / R, sigma = FWHM / 2.3548.

    ``resolution`` is a number or an array with one R per pixel of the grid the LSF is built for.
    ``n_sigma`` is the half-width of the kernel in sigma (default 4).
    """

    resolution: float | np.ndarray
    n_sigma: float = DEFAULT_LSF_N_SIGMA

    def __post_init__(self):
        r = np.asarray(self.resolution, dtype=np.float64)
        if not np.all(np.isfinite(r)) or np.any(r <= 0):
            raise InputError(f"resolution must be positive and finite, got {self.resolution!r}")
        if not self.n_sigma >= 1.0:
            raise InputError(f"n_sigma must be >= 1, got {self.n_sigma}")

    def sigma(self, wavelength) -> np.ndarray:
        wl = np.asarray(wavelength, dtype=np.float64)
        r = np.asarray(self.resolution, dtype=np.float64)
        if r.ndim == 1 and r.shape != wl.shape:
            raise InputError(f"resolution has {r.size} values but the grid has {wl.size} pixels")
        return wl / r / GAUSSIAN_FWHM_PER_SIGMA

    def operator(self, wavelength) -> BandedOperator:
        wl = as_float_array(wavelength, "wavelength", ndim=1)
        check_increasing(wl)
        return _gaussian_band(wl, self.sigma(wl), float(self.n_sigma))

    def convolve(self, wavelength, flux) -> np.ndarray:
        """Convolve spectra (..., P) on ``wavelength`` with this LSF (a convenience for making data)."""
        return self.operator(wavelength).apply(np.asarray(flux, dtype=np.float64))


@dataclass(frozen=True, eq=False)
class PixelKernelLSF:
    """Per-pixel LSF kernels: ``kernels[i]`` (odd length K) weights pixels i - K//2 .. i + K//2.

    Rows are normalised to unit sum after dropping taps beyond the grid edges. The kernels are given on
    the grid the LSF is applied to (the emulator's grid; the fitter applies the LSF in the model's frame).
    """

    kernels: np.ndarray

    def __post_init__(self):
        k = as_float_array(self.kernels, "kernels", ndim=2)
        if k.shape[1] % 2 != 1:
            raise InputError(f"kernels must have an odd number of taps per pixel, got shape {k.shape}")
        if not np.all(np.isfinite(k)) or np.any(k < 0) or np.any(k.sum(axis=1) <= 0):
            raise InputError("kernels must be finite, non-negative, with a positive sum in every row")
        k.flags.writeable = False
        object.__setattr__(self, "kernels", k)

    def operator(self, wavelength) -> BandedOperator:
        wl = np.asarray(wavelength)
        p, kk = self.kernels.shape
        if wl.shape != (p,):
            raise InputError(f"kernels are given for {p} pixels but the grid has {wl.size}")
        h = kk // 2
        j = np.arange(p)[:, None] + np.arange(-h, h + 1)[None, :]
        w = np.where((j >= 0) & (j < p), self.kernels, 0.0)
        w = w / w.sum(axis=1, keepdims=True)
        w.flags.writeable = False
        return BandedOperator(w, h, False)


# ------------------------------------------------------------------------------------------------
# continuum ("residual response") models
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ContinuumDesign:
    """The linear design of a continuum on a data grid: one Chebyshev block per region.

    ``slices[r]`` selects the pixels of region r, ``bases[r]`` is (P_r, degree + 1) with T_j(x) at
    those pixels, x mapping the region's wavelength interval to [-1, 1]. Pixels in no region have
    ``in_region`` False; the fitter gives them zero weight.
    """

    slices: tuple
    bases: tuple
    in_region: np.ndarray
    regions: tuple

    @property
    def n_coefficients(self) -> int:
        return sum(b.shape[1] for b in self.bases)

    def evaluate(self, coefficients) -> np.ndarray:
        """Continuum (n, P) for coefficients (n, n_coefficients) (zero outside every region)."""
        coef = np.atleast_2d(coefficients)
        out = np.zeros((coef.shape[0], self.in_region.size))
        k = 0
        for sl, basis in zip(self.slices, self.bases):
            d = basis.shape[1]
            out[:, sl] = coef[:, k : k + d] @ basis.T
            k += d
        return out


@dataclass(frozen=True)
class NoContinuum:
    """The observed spectra are already continuum-normalised (The Payne, SDSS Astra)."""

    def design(self, wavelength) -> None:
        return None

    @property
    def n_coefficients_per_region(self) -> int:
        return 0


def default_continuum_regions(wavelength) -> tuple[tuple[float, float], ...]:
    """APOGEE's three chips for an APOGEE grid, otherwise one region per gap-free segment of the grid."""
    wl = np.asarray(wavelength, dtype=np.float64)
    lo, hi = APOGEE_CHIPS[0][0], APOGEE_CHIPS[-1][1]
    if wl[0] >= lo - 100.0 and wl[-1] <= hi + 100.0:
        return tuple((float(a), float(b)) for a, b in APOGEE_CHIPS)
    return tuple((float(wl[a]), float(wl[b - 1])) for a, b in grid_segments(wl))


@dataclass(frozen=True)
class ChebyshevContinuum:
    """A Chebyshev series of ``degree`` per wavelength region multiplies the model (Zeta-Payne style).

    ``regions`` are (start, end) wavelength intervals in Angstrom; None means
    :func:`default_continuum_regions` (the APOGEE chips on APOGEE grids).
    """

    degree: int = 2
    regions: tuple | None = None

    def __post_init__(self):
        if not isinstance(self.degree, (int, np.integer)) or isinstance(self.degree, bool) or self.degree < 0:
            raise InputError(f"degree must be a non-negative integer, got {self.degree!r}")
        if self.regions is not None:
            regs = tuple((float(a), float(b)) for a, b in self.regions)
            if not regs or any(not b > a for a, b in regs):
                raise InputError(f"regions must be (start, end) pairs with end > start, got {self.regions!r}")
            object.__setattr__(self, "regions", regs)

    @property
    def n_coefficients_per_region(self) -> int:
        return int(self.degree) + 1

    def design(self, wavelength) -> ContinuumDesign:
        wl = as_float_array(wavelength, "wavelength", ndim=1)
        regions = self.regions if self.regions is not None else default_continuum_regions(wl)
        slices, bases, kept = [], [], []
        in_region = np.zeros(wl.size, dtype=bool)
        for lo, hi in regions:
            tol = REGION_EDGE_RTOL * hi
            idx = np.flatnonzero((wl >= lo - tol) & (wl <= hi + tol) & ~in_region)
            if idx.size == 0:
                continue
            sl = slice(int(idx[0]), int(idx[-1]) + 1)
            x = np.clip(2.0 * (wl[sl] - lo) / (hi - lo) - 1.0, -1.0, 1.0)
            basis = np.polynomial.chebyshev.chebvander(x, int(self.degree))
            basis.flags.writeable = False
            in_region[sl] = True
            slices.append(sl)
            bases.append(basis)
            kept.append((lo, hi))
        if not slices:
            raise InputError(
                f"no pixel of the grid ({wl[0]:.1f}-{wl[-1]:.1f} A) lies in the continuum regions {regions}"
            )
        in_region.flags.writeable = False
        return ContinuumDesign(tuple(slices), tuple(bases), in_region, tuple(kept))
