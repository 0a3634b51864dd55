"""Where to start: radial velocity by cross-correlation (or a chi2 grid) and a global label pre-search.

1. **RV, pass 1.** Cross-correlate each spectrum (pre-normalised by a Chebyshev fit per region when a
   continuum is fitted) with the emulator's spectrum at the centre of its box, on a uniform ln-lambda
   grid, by FFT; the peak (parabolic sub-pixel) anywhere in [-rv_range, rv_range] gives v0. With
   ``rv_method="grid"``: chi2 against the same template on a velocity grid instead.
2. **Labels.** chi2 of ``presearch_size`` Sobol label vectors (scrambled with ``config.seed``; the
   fraction ``presearch_scaled_solar`` of them on the scaled-solar subspace, see
   :func:`scaled_solar_points`) against
   every spectrum, shifted to the rest frame at v0, on at most ``presearch_max_pixels`` model pixels, as
   matrix products: ``chi2 = sum w d^2 - 2 (w d) F^T + w (F^2)^T``. With a fitted continuum the
   spectra are first divided by the centre template's continuum to rank all vectors, then the best
   ``presearch_candidates`` get the exact chi2 with the continuum solved linearly per region.
3. **RV, pass 2.** Cross-correlation again with each spectrum's best pre-search template (with
   ``rv_method="grid"``: a local chi2 grid); spectra whose velocity moved by more than half a pixel get
   the label search again at the new velocity, and so on (up to three rounds).

The model fluxes of the Sobol set do not depend on the data: :func:`build_presearch_grid` makes them
once and :func:`paynekit.fitting.fit` reuses them for every chunk (pass ``presearch_grid=`` to reuse them
across calls).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import fft as sp_fft
from scipy.stats import qmc

from .._kernels import interpolate_rows, numba_enabled
from ..instrument import (
    REGION_EDGE_RTOL,
    SPEED_OF_LIGHT_KMS,
    _describe_segments,
    _fractional_index,
    doppler_factor,
)
from .forward import ForwardModel, solve_continuum, to_numpy

log = logging.getLogger(__name__)

#: Model spectra evaluated per block while building the pre-search grid.
GRID_BLOCK = 512
#: Spectra per block in the exact continuum stage (bounds the (n, candidates, pixels) array).
CANDIDATE_BLOCK = 64
#: Templates per block in the label chi2 (bounds the (n, M) work arrays).
TEMPLATE_BLOCK = 8192
#: After pass 2, spectra whose velocity moved by more than this many data pixels are searched again.
RV_RETRY_PIXELS = 0.5
#: At most this many rounds of (template -> velocity -> labels) after pass 1.
RV_ROUNDS = 3


@dataclass(frozen=True, eq=False)
class PresearchGrid:
    """Model spectra of a Sobol set of label vectors, on a strided subset of the model pixels.

    ``theta`` (M, F) free scaled labels; ``x_scaled`` (M, L) full vectors; ``pixels`` model pixel
    indices; ``flux`` and ``flux_sq`` (M, P_sub) float32 (after the LSF); ``template`` the full-grid
    model at the box centre; ``prior_chi2`` (M,) the prior penalty of each vector.
    """

    theta: np.ndarray
    x_scaled: np.ndarray
    pixels: np.ndarray
    flux: np.ndarray
    flux_sq: np.ndarray
    template: np.ndarray
    prior_chi2: np.ndarray

    @property
    def size(self) -> int:
        return self.theta.shape[0]


def sobol_points(n_points: int, n_dims: int, low: float, high: float, seed: int) -> np.ndarray:
    """The first ``n_points`` of a scrambled Sobol sequence in [low, high]^n_dims (seeded)."""
    if n_dims == 0:
        return np.zeros((n_points, 0))
    m = max(math.ceil(math.log2(max(n_points, 1))), 0)
    u = qmc.Sobol(d=n_dims, scramble=True, seed=seed).random_base2(m)[:n_points]
    return low + (high - low) * u


#: Metallicity labels that [X/H] labels are tied to on the scaled-solar subspace (first one present).
METALLICITY_LABELS = ("fe_h", "m_h")


def _abundance_ties(names, metallicity):
    """Indices of labels tied to the metallicity ([X/H]) and of labels set to 0 ([X/Fe], [X/M])."""
    to_metal, to_zero = [], []
    for i, name in enumerate(names):
        low = name.lower()
        if low == metallicity:
            continue
        if low.endswith("_h"):
            to_metal.append(i)
        elif low.endswith("_fe") or (low.endswith("_m") and low != "m_h"):
            to_zero.append(i)
    return np.array(to_metal, dtype=np.int64), np.array(to_zero, dtype=np.int64)


def scaled_solar_points(fm: ForwardModel, n_points: int, low: float, high: float, seed: int) -> np.ndarray | None:
    """Sobol label vectors (n_points, n_free_labels) on the scaled-solar subspace, or None if it has none.

    The labels that are not abundances (teff, logg, v_turb, v_macro, 12C/13C, ...) and the metallicity
    ([Fe/H], else [M/H]; its frozen value when frozen) are drawn from a scrambled Sobol sequence over the
    box; every other [X/H] label is set to the metallicity and every [X/Fe] or [X/M] label (alpha_fe,
    alpha_m, ...) to 0, in physical units, then clipped to the box. Returns None when the labels have no
    metallicity label or no abundance label tied to it.
    """
    ls = fm.label_space
    names = [n.lower() for n in ls.names]
    metal = next((m for m in METALLICITY_LABELS if m in names), None)
    if metal is None or n_points <= 0:
        return None
    im = names.index(metal)
    to_metal, to_zero = _abundance_ties(names, metal)
    tied = set(to_metal.tolist()) | set(to_zero.tolist())
    free = [int(i) for i in fm.free]
    if not tied.intersection(free):
        return None
    drawn = [i for i in free if i not in tied]
    x = np.broadcast_to(fm.fixed_scaled, (n_points, fm.n_labels)).copy()
    x[:, drawn] = sobol_points(n_points, len(drawn), low, high, seed + 1)
    phys = ls.unscale(np.where(np.isfinite(x), x, 0.0))
    phys[:, to_metal] = phys[:, [im]]
    phys[:, to_zero] = 0.0
    scaled = np.clip(ls.scale(phys), low, high)
    return scaled[:, fm.free]


def presearch_label_points(fm: ForwardModel, config) -> np.ndarray:
    """The pre-search label vectors (scaled, free labels): Sobol over the box, part on the scaled-solar subspace."""
    lo, hi = config.scaled_bounds
    f = fm.n_free_labels
    n = config.presearch_size
    n_solar = int(round(config.presearch_scaled_solar * n))
    solar = scaled_solar_points(fm, n_solar, lo, hi, config.seed) if n_solar else None
    if solar is None:
        return sobol_points(n, f, lo, hi, config.seed)
    if n - n_solar == 0:
        return solar
    return np.concatenate([sobol_points(n - n_solar, f, lo, hi, config.seed), solar], axis=0)


def _lsf(fm, flux):
    if fm.lsf is None:
        return flux
    return fm.lsf.apply(flux[:, None, :])[:, 0, :]


def build_presearch_grid(fm: ForwardModel, evaluator, config) -> PresearchGrid:
    """Evaluate the Sobol pre-search set (flux only, in the evaluator's precision)."""
    lo, hi = config.scaled_bounds
    f = fm.n_free_labels
    centre_theta = np.full((1, f), 0.5 * (lo + hi))
    if config.presearch_size == 0 or f == 0:
        theta = centre_theta
    else:
        theta = presearch_label_points(fm, config)
    x_full = fm.full_scaled(
        np.concatenate([theta, np.zeros((theta.shape[0], 1))], axis=1) if fm.fit_rv else theta
    )
    wl = fm.model_wavelength
    dwl = fm.data_wavelength
    max_shift = doppler_factor(config.rv_range)
    inside = np.flatnonzero((wl * max_shift >= dwl[0]) & (wl / max_shift <= dwl[-1]))
    if inside.size == 0:
        inside = np.arange(wl.size)
    stride = max(1, math.ceil(inside.size / config.presearch_max_pixels))
    pixels = inside[::stride]
    flux = np.empty((theta.shape[0], pixels.size), dtype=np.float32)
    for start in range(0, theta.shape[0], GRID_BLOCK):
        block, _ = evaluator(x_full[start : start + GRID_BLOCK], jacobian=False)
        flux[start : start + GRID_BLOCK] = to_numpy(_lsf(fm, block))[:, pixels]
    xc = fm.full_scaled(
        np.concatenate([centre_theta, np.zeros((1, 1))], axis=1) if fm.fit_rv else centre_theta
    )
    tpl, _ = evaluator(xc, jacobian=False)
    template = to_numpy(_lsf(fm, tpl))[0].astype(np.float64)
    prior = fm.prior_terms(
        np.concatenate([theta, np.zeros((theta.shape[0], 1))], axis=1) if fm.fit_rv else theta
    )[0]
    for arr in (theta, x_full, pixels, flux, template, prior):
        arr.flags.writeable = False
    fsq = flux * flux
    fsq.flags.writeable = False
    return PresearchGrid(theta, x_full, pixels, flux, fsq, template, prior)


# ------------------------------------------------------------------------------------------------
# data in the rest frame, on a subset of model pixels
# ------------------------------------------------------------------------------------------------
def interpolate_data(data_wavelength, lam, data, weights):
    """Linear interpolation of data (n, P) and weights at wavelengths ``lam`` (n, Q), or (Q,) for all.

    Weights combine as inverse variances; they are 0 where either neighbour has weight 0, outside the
    grid, or across a gap of the data grid.
    """
    wl = np.asarray(data_wavelength, dtype=np.float64)
    lam = np.asarray(lam, dtype=np.float64)
    segments = _describe_segments(wl)
    if numba_enabled() and all(s.kind != "general" for s in segments):
        lam2 = lam if lam.ndim == 2 else lam[None, :]
        return interpolate_rows(data, weights, lam2, segments, REGION_EDGE_RTOL)
    t, _, seg_a, seg_b, inside = _fractional_index(segments, wl, lam)
    j0 = np.clip(np.floor(t).astype(np.int64), seg_a, np.maximum(seg_b - 2, seg_a))
    j1 = np.minimum(j0 + 1, seg_b - 1)
    frac = np.clip(t - j0, 0.0, 1.0)
    if lam.ndim == 1:
        d0, d1, w0, w1 = data[:, j0], data[:, j1], weights[:, j0], weights[:, j1]
    else:
        d0 = np.take_along_axis(data, j0, axis=1)
        d1 = np.take_along_axis(data, j1, axis=1)
        w0 = np.take_along_axis(weights, j0, axis=1)
        w1 = np.take_along_axis(weights, j1, axis=1)
    good = inside & (w0 > 0) & (w1 > 0)
    out_d = np.where(good, (1 - frac) * d0 + frac * d1, 0.0)
    var = (1 - frac) / np.where(w0 > 0, w0, 1.0) + frac / np.where(w1 > 0, w1, 1.0)
    out_w = np.where(good, 1.0 / var, 0.0)
    return out_d, out_w


# ------------------------------------------------------------------------------------------------
# radial velocity
# ------------------------------------------------------------------------------------------------
#: Precision of the cross-correlation FFTs: float32 FFTs were 5x faster than float64 here (7500-point rows;
#: the pre-search 0.94 -> 0.73 ms/spectrum). On the 1000 spectra of the 5-label benchmark the peak moved by
#: a median 2e-7 pixel (at most 0.02) and 3 started from another grid vector; v is refined by the fit.
CCF_DTYPE = np.float32


class CrossCorrelator:
    """FFT cross-correlation of spectra with templates on a uniform ln-lambda grid.

    The data signals (1 - normalised flux, mean-subtracted over usable pixels, 0 elsewhere) are
    transformed once; :meth:`velocities` takes one template for all or one per spectrum.
    """

    def __init__(self, fm: ForwardModel, data, weights, rv_range: float):
        dwl = fm.data_wavelength
        lnd = np.log(dwl)
        self.du = float(np.median(np.diff(lnd)))
        n_u = int(np.floor((lnd[-1] - lnd[0]) / self.du)) + 1
        self.u = lnd[0] + self.du * np.arange(n_u)
        self.kmax = math.ceil(math.log1p(rv_range / SPEED_OF_LIGHT_KMS) / self.du) + 1
        self.kmax = min(self.kmax, n_u - 1)
        self.n_fft = sp_fft.next_fast_len(n_u + self.kmax + 2, real=True)
        self.rv_range = rv_range
        self.fm = fm
        d_u, w_u = interpolate_data(dwl, np.exp(self.u), data, weights)
        self.spec_fft = self._signal_fft(d_u, w_u > 0)
        # the model grid's coverage of the u grid (rest frame)
        mwl = fm.model_wavelength
        t, _, _, _, inside = _fractional_index(fm.resampler.segments, mwl, np.exp(self.u))
        self._t_idx = t
        self._t_inside = inside

    def _template_signal(self, templates):
        templates = np.atleast_2d(templates)
        i0 = np.floor(self._t_idx).astype(np.int64)
        i1 = np.minimum(i0 + 1, templates.shape[1] - 1)
        frac = self._t_idx - i0
        tl = templates[:, i0] * (1 - frac) + templates[:, i1] * frac
        return self._signal_fft(tl, self._t_inside[None, :])

    def _signal_fft(self, flux, good):
        """rfft, zero-padded to n_fft, of the signal 1 - flux less its mean over the good pixels (0 at the
        others), for rows of flux (n, n_u). The signal is written straight into the padded array (scipy's
        own padding would copy every row once more). In float32 (:data:`CCF_DTYPE`)."""
        good = np.broadcast_to(good, flux.shape)
        s = np.where(good, 1.0 - flux, 0.0)
        mean = s.sum(axis=1, keepdims=True) / np.maximum(good.sum(axis=1, keepdims=True), 1)
        padded = np.zeros((flux.shape[0], self.n_fft), dtype=CCF_DTYPE)
        np.subtract(s, mean, out=padded[:, : flux.shape[1]], where=good, casting="same_kind")
        return sp_fft.rfft(padded, axis=1, workers=-1, overwrite_x=True)

    def velocities(self, templates, rows=None) -> np.ndarray:
        """Velocity (km/s) of the cross-correlation peak within +-rv_range for each spectrum (or ``rows``);
        ``templates`` is one model spectrum (rest frame, model grid) or one per spectrum."""
        tf = self._template_signal(templates)
        spec = self.spec_fft if rows is None else self.spec_fft[rows]
        cc = sp_fft.irfft(spec * np.conj(tf), n=self.n_fft, axis=1, workers=-1)
        lags = np.arange(-self.kmax, self.kmax + 1)
        window = cc[:, lags % self.n_fft].astype(np.float64)
        k = np.argmax(window, axis=1)
        kc = np.clip(k, 1, lags.size - 2)
        rows = np.arange(window.shape[0])
        cm, c0, cp = window[rows, kc - 1], window[rows, kc], window[rows, kc + 1]
        denom = cm - 2 * c0 + cp
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = np.where((denom < 0) & (k == kc), 0.5 * (cm - cp) / denom, 0.0)
        lag = lags[kc] + np.clip(delta, -0.5, 0.5)
        lag = np.where(k == kc, lag, lags[k])
        v = SPEED_OF_LIGHT_KMS * np.expm1(lag * self.du)
        return np.clip(v, -self.rv_range, self.rv_range)


def rv_grid_search(fm: ForwardModel, template, data, weights, rv_range: float, step: float) -> np.ndarray:
    """Velocity minimising chi2 against ``template`` (model grid, rest frame) on a grid of ``step`` km/s."""
    n_steps = math.floor(rv_range / step)
    grid = step * np.arange(-n_steps, n_steps + 1, dtype=np.float64)
    # only pixels that the model covers at every trial velocity, so that all chi2 values compare alike
    w = weights * fm.resampler.coverage(np.array([grid[0]]), np.array([grid[-1]]))[0]
    wd = w * data
    chi2 = np.empty((data.shape[0], grid.size))
    block = 64
    for start in range(0, grid.size, block):
        vb = grid[start : start + block]
        vals = np.broadcast_to(np.asarray(template, dtype=np.float64), (vb.size, 1, template.size)).copy()
        m = fm.resampler.apply(vals, vb)[:, 0, :]
        chi2[:, start : start + block] = (wd * data).sum(axis=1)[:, None] - 2.0 * wd @ m.T + w @ (m * m).T
    k = np.argmin(chi2, axis=1)
    kc = np.clip(k, 1, grid.size - 2)
    rows = np.arange(chi2.shape[0])
    cm_, c0, cp = chi2[rows, kc - 1], chi2[rows, kc], chi2[rows, kc + 1]
    denom = cm_ - 2 * c0 + cp
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.where((denom > 0) & (k == kc), 0.5 * (cm_ - cp) / denom, 0.0)
    v = grid[k] + step * np.clip(np.where(k == kc, delta, 0.0), -0.5, 0.5)
    return np.clip(v, -rv_range, rv_range)


# ------------------------------------------------------------------------------------------------
# label pre-search
# ------------------------------------------------------------------------------------------------
@dataclass
class PresearchResult:
    """Starts for the optimiser: ``theta`` (n, K, n_params) (v last when fitted) and their chi2 (n, K)."""

    theta: np.ndarray
    chi2: np.ndarray
    v: np.ndarray


def _prenormalise(fm, model, data, weights):
    """Divide data by a Chebyshev continuum fitted to data ~ model * continuum (for ranking only)."""
    if fm.continuum is None:
        return data, weights
    cont, _, _ = solve_continuum(fm.continuum, model, data, weights)
    ok = cont > 0
    safe = np.where(ok, cont, 1.0)
    return np.where(ok, data / safe, 0.0), np.where(ok, weights * safe * safe, 0.0)


def _label_chi2(grid: PresearchGrid, d_rest, w_rest):
    """chi2 (n, M) of every grid spectrum against rest-frame data (no continuum), plus the priors."""
    wd = (w_rest * d_rest).astype(np.float32)
    w32 = w_rest.astype(np.float32)
    base = (w_rest * d_rest * d_rest).sum(axis=1)
    out = np.empty((d_rest.shape[0], grid.size))
    for start in range(0, grid.size, TEMPLATE_BLOCK):
        sl = slice(start, start + TEMPLATE_BLOCK)
        cross = wd @ grid.flux[sl].T
        quad = w32 @ grid.flux_sq[sl].T
        out[:, sl] = base[:, None] - 2.0 * cross.astype(np.float64) + quad.astype(np.float64)
    return out + grid.prior_chi2[None, :]


def _exact_continuum_chi2(fm, grid, cand, d_rest, w_rest, v):
    """chi2 (n, C) with the continuum solved per region, for candidate grid indices ``cand`` (n, C)."""
    design = fm.continuum
    lam_obs = fm.model_wavelength[grid.pixels][None, :] * doppler_factor(v)[:, None]
    n, q = lam_obs.shape
    blocks = []
    in_any = np.zeros((n, q), dtype=bool)
    for (lo, hi), basis in zip(design.regions, design.bases):
        deg = basis.shape[1] - 1
        inr = (lam_obs >= lo) & (lam_obs <= hi) & ~in_any
        x = np.clip(2.0 * (lam_obs - lo) / (hi - lo) - 1.0, -1.0, 1.0)
        t = np.polynomial.chebyshev.chebvander(x, deg) * inr[..., None]
        in_any |= inr
        blocks.append(t)
    w = w_rest * in_any
    base = (w * d_rest * d_rest).sum(axis=1)
    chi2 = np.empty(cand.shape)
    for s in range(0, n, CANDIDATE_BLOCK):
        sl = slice(s, s + CANDIDATE_BLOCK)
        fc = grid.flux[cand[sl]].astype(np.float64)  # (b, C, q)
        total = np.repeat(base[sl][:, None], cand.shape[1], axis=1)
        for t in blocks:
            tb = t[sl]
            dd = tb.shape[-1]
            wtt = (w[sl][:, :, None, None] * tb[:, :, :, None] * tb[:, :, None, :]).reshape(
                tb.shape[0], q, dd * dd
            )
            gram = (fc * fc) @ wtt
            gram = gram.reshape(fc.shape[0], fc.shape[1], dd, dd)
            rhs = fc @ ((w[sl] * d_rest[sl])[:, :, None] * tb)
            tr = np.trace(gram, axis1=-2, axis2=-1) / dd
            ridge = (tr * 1e-12 + (tr == 0))[..., None, None] * np.eye(dd)
            sol = np.linalg.solve(gram + ridge, rhs[..., None])[..., 0]
            total -= np.sum(rhs * sol, axis=-1)
        chi2[sl] = total
    return chi2 + grid.prior_chi2[cand]


def _best_labels(grid, fm, data, weights, v, config, k_best):
    """Indices (n, K) and chi2 (n, K) of the best grid vectors for spectra at velocities v."""
    n = data.shape[0]
    if fm.continuum is not None:
        tpl = np.broadcast_to(grid.template, (n, 1, grid.template.size)).copy()
        m0 = fm.resampler.apply(tpl, v)[:, 0, :]
        cov = fm.resampler.coverage(v)
        norm_d, norm_w = _prenormalise(fm, m0, data, weights * cov)
    else:
        norm_d, norm_w = data, weights
    lam = fm.model_wavelength[grid.pixels][None, :] * doppler_factor(v)[:, None]
    d_rest, w_rest = interpolate_data(fm.data_wavelength, lam, norm_d, norm_w)
    chi2 = _label_chi2(grid, d_rest, w_rest)
    if fm.continuum is not None and grid.size > 1:
        n_cand = min(config.presearch_candidates, grid.size)
        if n_cand < grid.size:
            cand = np.argpartition(chi2, n_cand - 1, axis=1)[:, :n_cand]
        else:
            cand = np.broadcast_to(np.arange(grid.size), (n, grid.size)).copy()
        d_raw, w_raw = interpolate_data(fm.data_wavelength, lam, data, weights)
        exact = _exact_continuum_chi2(fm, grid, cand, d_raw, w_raw, v)
        order = np.argsort(exact, axis=1)[:, :k_best]
        return np.take_along_axis(cand, order, axis=1), np.take_along_axis(exact, order, axis=1)
    if k_best < grid.size:
        part = np.argpartition(chi2, k_best - 1, axis=1)[:, :k_best]
    else:
        part = np.broadcast_to(np.arange(grid.size), (n, grid.size)).copy()
    vals = np.take_along_axis(chi2, part, axis=1)
    order = np.argsort(vals, axis=1)
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _local_rv_grid(fm, templates, data, weights, v, step):
    """Refine v on a local chi2 grid (+-2 steps, in quarter steps) with one template per spectrum."""
    offsets = step * np.arange(-2.0, 2.01, 0.25)
    vals = templates[:, None, :]
    lo, hi = v + offsets[0], v + offsets[-1]
    w = weights * fm.resampler.coverage(lo, hi)
    chi2 = np.empty((data.shape[0], offsets.size))
    for j, dv in enumerate(offsets):
        m = fm.resampler.apply(vals, v + dv)[:, 0, :]
        chi2[:, j] = np.sum(w * (data - m) ** 2, axis=1)
    k = np.clip(np.argmin(chi2, axis=1), 1, offsets.size - 2)
    rows = np.arange(data.shape[0])
    cm, c0, cp = chi2[rows, k - 1], chi2[rows, k], chi2[rows, k + 1]
    denom = cm - 2 * c0 + cp
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.where(denom > 0, 0.5 * (cm - cp) / denom, 0.0)
    return v + offsets[k] + 0.25 * step * np.clip(delta, -1.0, 1.0)


def presearch(grid: PresearchGrid, fm: ForwardModel, evaluator, data, weights, config) -> PresearchResult:
    """Velocity and best ``config.n_starts`` label vectors for each spectrum (data, weights (n, P)).

    Pass 1 measures v against the box-centre template; the labels are searched at that v; then v is
    measured again against each spectrum's best template, and for the spectra whose v moved by more
    than :data:`RV_RETRY_PIXELS` data pixels the label search is repeated (up to :data:`RV_ROUNDS`
    times): a template far from the star can pull the pass-1 peak by several pixels.
    """
    n = data.shape[0]
    k_best = min(config.n_starts, grid.size)
    step = config.rv_grid_step or max(fm_velocity_step(fm), 1e-3)
    if fm.fit_rv:
        pre_d, pre_w = _prenormalise(fm, np.ones_like(data), data, weights)
        if config.rv_method == "ccf":
            ccf = CrossCorrelator(fm, pre_d, pre_w, config.rv_range)
            v = ccf.velocities(grid.template)
        else:
            v = rv_grid_search(fm, grid.template, pre_d, pre_w, config.rv_range, step)
    else:
        v = np.zeros(n)
    best, best_chi2 = _best_labels(grid, fm, data, weights, v, config, k_best)
    if fm.fit_rv and grid.size > 1:
        rows = np.arange(n)
        tolerance = RV_RETRY_PIXELS * fm_velocity_step(fm)
        for _ in range(RV_ROUNDS):
            th = np.concatenate([grid.theta[best[rows, 0]], np.zeros((rows.size, 1))], axis=1)
            tpl, _ = evaluator(fm.full_scaled(th), jacobian=False)
            tpl = to_numpy(_lsf(fm, tpl)).astype(np.float64)
            if config.rv_method == "ccf":
                v_new = ccf.velocities(tpl, rows)
            else:
                v_new = _local_rv_grid(fm, tpl, pre_d[rows], pre_w[rows], v[rows], step)
            v_new = np.clip(v_new, -config.rv_range, config.rv_range)
            moved = np.abs(v_new - v[rows]) > tolerance
            v[rows] = v_new
            rows = rows[moved]
            if rows.size == 0:
                break
            best[rows], best_chi2[rows] = _best_labels(
                grid, fm, data[rows], weights[rows], v[rows], config, k_best
            )
    theta_l = grid.theta[best]  # (n, K, F)
    if fm.fit_rv:
        theta = np.concatenate([theta_l, np.broadcast_to(v[:, None, None], (n, k_best, 1))], axis=2)
    else:
        theta = theta_l.copy()
    return PresearchResult(theta, best_chi2, v)


def fm_velocity_step(fm: ForwardModel) -> float:
    """Velocity step (km/s) of one data pixel (median)."""
    return float(SPEED_OF_LIGHT_KMS * np.median(np.diff(np.log(fm.data_wavelength))))


__all__ = [
    "CrossCorrelator",
    "PresearchGrid",
    "PresearchResult",
    "build_presearch_grid",
    "interpolate_data",
    "presearch",
    "rv_grid_search",
    "sobol_points",
]
