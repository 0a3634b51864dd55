"""The forward model of an observed spectrum, as array functions.

    emulator(labels) --LSF (rest frame, model grid)--> --Doppler shift + interpolation--> data grid
                     --times a continuum (linear coefficients, solved exactly)--> model

:class:`ForwardModel` holds what does not change during a fit (grids, the LSF operator, the resampler,
the continuum design, which labels are free, priors). :func:`model_spectra` evaluates the emulator and
carries flux and its derivatives through the instrument; :func:`normal_equations` solves the continuum
coefficients for the current labels (variable projection) and returns chi2, the curvature
``H = J^T W J`` and gradient ``g = J^T W r`` of the free non-linear parameters with the continuum
profiled out (Schur complement; Kaufman's variable-projection Jacobian). Both work on numpy arrays or
torch tensors (CPU or CUDA); the small matrices come back as float64 numpy arrays.

Parameter vector of a star: ``theta = [free labels in scaled units ..., v (km/s) if RV is fitted]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .._kernels import gram_rows, numba_enabled
from ..errors import InputError
from ..instrument import ContinuumDesign, DopplerResampler, _is_torch
from ..wavelength import air_to_vacuum, vacuum_to_air

log = logging.getLogger(__name__)

#: Relative ridge added to the continuum normal matrices so that an empty region stays solvable.
CONTINUUM_RIDGE = 1e-12


# ------------------------------------------------------------------------------------------------
# emulator evaluation in a chosen precision and backend
# ------------------------------------------------------------------------------------------------
class EmulatorEvaluator:
    """Evaluates an emulator on scaled labels; returns flux (n, P) and d flux/d x_scaled as (n, L, P).

    ``backend="torch"`` uses the emulator's ``torch_evaluator(device, dtype)`` when it has one (The
    Payne MLP); any other emulator is evaluated with numpy and moved to the device.
    """

    def __init__(self, emulator, dtype="float32", backend="numpy", device="cpu"):
        self.backend = backend
        self.device = device
        self.np_dtype = np.dtype(dtype)
        emu = emulator
        if hasattr(emu, "astype") and np.dtype(emu.dtype) != self.np_dtype:
            emu = emu.astype(self.np_dtype)
        self.emulator = emu
        self._torch_fn = None
        if backend == "torch":
            import torch

            self.torch_dtype = torch.float32 if self.np_dtype == np.float32 else torch.float64
            if hasattr(emulator, "torch_evaluator"):
                self._torch_fn = emulator.torch_evaluator(device=device, dtype=self.torch_dtype)

    def __call__(self, x_scaled: np.ndarray, jacobian: bool = True):
        if self._torch_fn is not None:
            import torch

            x = torch.as_tensor(np.asarray(x_scaled), dtype=self.torch_dtype, device=self.device)
            with torch.no_grad():
                flux, jac = self._torch_fn(x, jacobian=jacobian)
            return flux, (jac.transpose(1, 2) if jac is not None else None)
        x = np.asarray(x_scaled, dtype=self.np_dtype)
        if jacobian:
            flux, jac = self.emulator.predict_and_jacobian_scaled(x)
            jac = np.swapaxes(jac, 1, 2)
        else:
            flux, jac = self.emulator.predict_scaled(x), None
        if self.backend == "torch":
            import torch

            flux = torch.as_tensor(np.ascontiguousarray(flux), device=self.device)
            jac = torch.as_tensor(np.ascontiguousarray(jac), device=self.device) if jac is not None else None
        return flux, jac

    def jacobian_cache(self, n_rows: int):
        """A :class:`~paynekit.emulators.payne.JacobianCache` for ``n_rows`` stars when this evaluator can
        use one (numpy, a leaky-ReLU PayneMLP with two hidden layers), else None."""
        from ..emulators.payne import JacobianCache

        if self.backend != "numpy" or not JacobianCache.supports(self.emulator):
            return None
        return JacobianCache(self.emulator, n_rows)

    def to_backend(self, array, dtype=None):
        """A numpy array as an array of this backend (float64 unless ``dtype``)."""
        if self.backend == "torch":
            import torch

            tdt = {None: torch.float64, np.float64: torch.float64, np.float32: torch.float32}[dtype]
            return torch.tensor(np.array(array), dtype=tdt, device=self.device)
        return np.asarray(array, dtype=dtype or np.float64)


def to_numpy(x) -> np.ndarray:
    if _is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------------------------
# the fixed part of a fit
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ForwardModel:
    """Everything about a fit that does not depend on the star: grids, instrument, free labels, priors."""

    label_space: object
    model_wavelength: np.ndarray  # in the medium of the data
    data_wavelength: np.ndarray
    resampler: DopplerResampler
    lsf: object | None  # BandedOperator on the model grid, or None
    continuum: ContinuumDesign | None
    free: np.ndarray  # indices of the free labels
    fixed_scaled: np.ndarray  # (L,) scaled values of frozen labels (NaN for free ones)
    fit_rv: bool
    prior_index: np.ndarray  # positions in theta with a Gaussian prior
    prior_mean: np.ndarray  # in scaled units
    prior_sigma: np.ndarray  # in scaled units

    @property
    def n_labels(self) -> int:
        return len(self.label_space)

    @property
    def n_free_labels(self) -> int:
        return self.free.size

    @property
    def n_params(self) -> int:
        """Non-linear parameters per star (free labels + v)."""
        return self.free.size + (1 if self.fit_rv else 0)

    @property
    def n_continuum(self) -> int:
        return 0 if self.continuum is None else self.continuum.n_coefficients

    @property
    def free_names(self) -> list[str]:
        return [self.label_space.names[i] for i in self.free]

    def full_scaled(self, theta) -> np.ndarray:
        """Full (n, L) scaled label vectors from parameter vectors (n, n_params)."""
        theta = np.atleast_2d(theta)
        x = np.broadcast_to(self.fixed_scaled, (theta.shape[0], self.n_labels)).copy()
        x[:, self.free] = theta[:, : self.free.size]
        return x

    def velocities(self, theta) -> np.ndarray:
        theta = np.atleast_2d(theta)
        return theta[:, -1].copy() if self.fit_rv else np.zeros(theta.shape[0])

    def prior_terms(self, theta):
        """chi2 contribution, curvature diagonal and gradient of the Gaussian priors (numpy)."""
        n = theta.shape[0]
        h = np.zeros((n, self.n_params))
        g = np.zeros((n, self.n_params))
        if self.prior_index.size == 0:
            return np.zeros(n), h, g
        z = (theta[:, self.prior_index] - self.prior_mean) / self.prior_sigma
        h[:, self.prior_index] = 1.0 / self.prior_sigma**2
        g[:, self.prior_index] = -z / self.prior_sigma
        return np.sum(z * z, axis=1), h, g


def build_forward_model(emulator, data_wavelength, config, data_medium: str = "vacuum") -> ForwardModel:
    """The :class:`ForwardModel` for data on ``data_wavelength`` fitted with ``emulator`` under ``config``."""
    ls = emulator.label_space
    names = list(ls.names)
    for what, mapping in (("frozen", config.frozen), ("priors", config.priors)):
        unknown = sorted(set(mapping) - set(names))
        if unknown:
            raise InputError(
                f"config.{what} names labels {unknown} that the emulator does not have (labels: {names})"
            )
    if emulator.wavelength is None:
        raise InputError("the emulator has no wavelength grid; the fitter needs one")
    model_wl = np.array(emulator.wavelength, dtype=np.float64)
    medium = getattr(emulator, "wavelength_medium", "vacuum")
    if medium != data_medium:
        model_wl = air_to_vacuum(model_wl) if data_medium == "vacuum" else vacuum_to_air(model_wl)
        log.info("emulator wavelengths converted from %s to %s to match the data", medium, data_medium)
    lsf_obj = config.effective_lsf
    lsf_op = lsf_obj.operator(model_wl) if lsf_obj is not None else None
    resampler = DopplerResampler(model_wl, data_wavelength)
    design = config.continuum.design(resampler.data_wavelength)
    lo, hi = config.scaled_bounds
    fixed = np.full(len(names), np.nan)
    for k, val in config.frozen.items():
        j = ls.index(k)
        s = (val - ls.x_min[j]) / ls.span[j] - 0.5
        if not lo - 1e-12 <= s <= hi + 1e-12:
            log.warning(
                "frozen %s = %g lies outside the emulator's box [%g, %g]; the emulator extrapolates",
                k,
                val,
                ls.x_min[j],
                ls.x_max[j],
            )
        fixed[j] = s
    free = np.array([i for i in range(len(names)) if names[i] not in config.frozen], dtype=np.int64)
    if free.size == 0 and not config.fit_rv:
        raise InputError("every label is frozen and RV is off: there is nothing to fit")
    pidx, pmu, psig = [], [], []
    for k, (mu, sigma) in config.priors.items():
        j = ls.index(k)
        pos = int(np.flatnonzero(free == j)[0])
        pidx.append(pos)
        pmu.append((mu - ls.x_min[j]) / ls.span[j] - 0.5)
        psig.append(sigma / ls.span[j])
    fixed.flags.writeable = False
    return ForwardModel(
        ls,
        model_wl,
        resampler.data_wavelength,
        resampler,
        lsf_op,
        design,
        free,
        fixed,
        bool(config.fit_rv),
        np.array(pidx, dtype=np.int64),
        np.array(pmu),
        np.array(psig),
    )


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def _emulate(fm: ForwardModel, evaluator: EmulatorEvaluator, theta: np.ndarray, jacobian: bool, cache=None,
             rows=None):
    """Emulator flux (n, P_model) and d flux / d free label (n, F_labels, P_model) (None without jacobian);
    with a Jacobian ``cache`` (:meth:`EmulatorEvaluator.jacobian_cache`) the stars are its ``rows``."""
    if cache is not None and jacobian:
        flux, jac = cache(fm.full_scaled(theta), rows)  # a CachedRows view: gathered block by block
        if not fm.free.size:
            return flux, None
        return flux, (jac if fm.free.size == fm.n_labels else jac.select_labels(fm.free))
    flux, jac = evaluator(fm.full_scaled(theta), jacobian=jacobian)
    if not (jacobian and fm.free.size):
        return flux, None
    return flux, (jac if fm.free.size == fm.n_labels else jac[:, fm.free, :])


def _instrument(fm: ForwardModel, flux, jfree, v, want_dv: bool):
    """Stack flux and Jacobian rows into channels, apply the LSF and the Doppler shift (see model_spectra)."""
    if jfree is not None:
        if _is_torch(flux):
            import torch

            values = torch.cat([flux[:, None, :], jfree], dim=1)
        else:
            values = np.concatenate([flux[:, None, :], np.asarray(jfree)], axis=1)
    else:
        values = flux[:, None, :]
    if fm.lsf is not None:
        values = fm.lsf.apply(values)
    if fm.resampler.is_identity(v) and not want_dv:
        return values
    return fm.resampler.apply(values, v, derivative=want_dv)


def model_spectra(fm: ForwardModel, evaluator: EmulatorEvaluator, theta: np.ndarray, jacobian: bool = True):
    """Model on the data grid, before the continuum, with derivatives.

    Returns an array (n, C, P_data): channel 0 the flux, then (if ``jacobian``) d flux / d theta for each
    free label (scaled units) and, when RV is fitted, d flux / d v (per km/s) last.
    """
    flux, jfree = _emulate(fm, evaluator, theta, jacobian)
    return _instrument(fm, flux, jfree, fm.velocities(theta), jacobian and fm.fit_rv)


#: Bytes of instrument-side model values (stars x channels x pixels) that :func:`fit_equations` carries
#: from the Doppler shift into the normal equations at a time (numpy): small enough to stay in a core's
#: cache, so the shifted Jacobian never goes out to memory (on a busy 2-core machine its round trips
#: through RAM were most of a fit's time).
FIT_BLOCK_BYTES = 1 << 21
#: ... but at least this many stars per block: with many labels (25 labels x 8575 APOGEE pixels, ~0.9 MB
#: per star) a 2 MB block held two stars, and the per-call overhead of the continuum solve and the small
#: per-block numpy calls outweighed what the cache saved (demo fit, three interleaved runs each: median
#: 80 ms/spectrum with blocks of 2 stars, 72 with 8; a noisy machine).
FIT_BLOCK_MIN_STARS = 8


def fit_equations(
    fm: ForwardModel, evaluator: EmulatorEvaluator, theta, data, weights, jacobian: bool = True, cache=None,
    rows=None,
):
    """:func:`model_spectra` then :func:`normal_equations` for stars ``theta`` (n, F) and their data.

    The emulator runs once for all stars (one large matrix product); with numpy the instrument and the
    normal equations then go through blocks of stars of about :data:`FIT_BLOCK_BYTES`. Same numbers as
    the two calls in a row. ``cache``, ``rows``: a Jacobian cache and the stars' rows in it (see
    :func:`_emulate`).
    """
    flux, jfree = _emulate(fm, evaluator, theta, jacobian, cache, rows)
    v = fm.velocities(theta)
    want_dv = jacobian and fm.fit_rv
    n = flux.shape[0]
    channels = 1 + (0 if jfree is None else jfree.shape[1]) + (1 if want_dv else 0)
    per_star = channels * max(fm.data_wavelength.size, flux.shape[1]) * flux.dtype.itemsize
    block = n if _is_torch(flux) else max(FIT_BLOCK_MIN_STARS, FIT_BLOCK_BYTES // max(per_star, 1))
    if block >= n:
        values = _instrument(fm, flux, jfree, v, want_dv)
        return normal_equations(fm, values, data, weights, jacobian=jacobian)
    parts = []
    for b0 in range(0, n, block):
        sl = slice(b0, b0 + block)
        vals = _instrument(fm, flux[sl], None if jfree is None else jfree[sl], v[sl], want_dv)
        parts.append(normal_equations(fm, vals, data[sl], weights[sl], jacobian=jacobian))
    return NormalEquations.concatenate(parts)


def model_flux(fm: ForwardModel, evaluator: EmulatorEvaluator, theta: np.ndarray):
    """Flux only (n, P_data), before the continuum."""
    return model_spectra(fm, evaluator, theta, jacobian=False)[:, 0, :]


@dataclass
class NormalEquations:
    """chi2 (n,), curvature H (n, F, F) and gradient g (n, F) (numpy float64, continuum profiled out),
    the model (n, P) and continuum (n, P) as backend arrays, and the continuum coefficients (n, K)."""

    chi2: np.ndarray
    H: np.ndarray | None
    g: np.ndarray | None
    model: object
    continuum: object
    coefficients: np.ndarray | None

    @classmethod
    def concatenate(cls, parts) -> NormalEquations:
        """One NormalEquations from several for consecutive blocks of stars (numpy)."""

        def cat(name):
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays)

        return cls(*(cat(name) for name in ("chi2", "H", "g", "model", "continuum", "coefficients")))


def _solve(a, b):
    if _is_torch(a):
        import torch

        return torch.linalg.solve(a, b)
    return np.linalg.solve(a, b)


def _ridge(g):
    """A tiny multiple of the identity for normal matrices (n, K, K); 1 where a matrix is all zero."""
    d = g.shape[-1]
    tr = g.diagonal(dim1=-2, dim2=-1).sum(-1) if _is_torch(g) else np.trace(g, axis1=-2, axis2=-1)
    scale = tr / d
    scale = scale * CONTINUUM_RIDGE + (scale == 0) * 1.0
    if _is_torch(g):
        import torch

        return scale[:, None, None] * torch.eye(d, dtype=g.dtype, device=g.device)
    return scale[:, None, None] * np.eye(d)


def solve_continuum(design: ContinuumDesign, flux, data, weights):
    """Weighted least-squares continuum coefficients for model ``flux`` (n, P): data ~ flux * continuum.

    Returns (continuum (n, P), coefficients (n, K), per-region normal matrices [G_r (n, D, D)]).
    """
    n, p = flux.shape
    f = flux.double() if _is_torch(flux) else flux.astype(np.float64, copy=False)
    wf = weights * f
    cont = f.new_zeros((n, p)) if _is_torch(f) else np.zeros((n, p))
    coefs, grams = [], []
    for sl, basis in zip(design.slices, design.bases):
        t = _to_like(basis, f)
        d1 = basis.shape[1]
        tt = (t[:, :, None] * t[:, None, :]).reshape(-1, d1 * d1)
        gram = ((wf[:, sl] * f[:, sl]) @ tt).reshape(n, d1, d1)
        rhs = (wf[:, sl] * data[:, sl]) @ t
        a = _solve(gram + _ridge(gram), rhs[..., None])[..., 0]
        cont[:, sl] = a @ t.T
        coefs.append(a)
        grams.append(gram)
    if _is_torch(f):
        import torch

        coef = torch.cat(coefs, dim=1)
    else:
        coef = np.concatenate(coefs, axis=1)
    return cont, coef, grams


#: Largest M*N*K of one matrix product in the normal equations. Products are split over pixels so
#: that each stays below the size at which OpenBLAS starts threads: threads gain nothing on these thin
#: products and, on a busy machine, their spin-waits made a 23 x 23 x 6000 product ~1000x slower.
GRAM_BLOCK_MNK = 65536 * 4

#: Up to this many parameters per star the numpy normal equations use the compiled ``_kernels.gram_rows``
#: (6 parameters x 7214 pixels: 31 against 72 us per star with numpy's stacked matmul, one thread); with
#: more, BLAS is faster (27 x 8575: 405 against 577 us).
GRAM_KERNEL_MAX_PARAMS = 12

#: Bytes of Jacobian (rows x parameters x pixels) the numpy normal equations handle at a time (cache-sized).
NORMAL_BLOCK_BYTES = 1 << 21


def _matmul_blocked(a, b):
    """``a @ b`` for (..., M, K) @ (..., K, N), summed over blocks of K (see GRAM_BLOCK_MNK)."""
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    block = max(64, GRAM_BLOCK_MNK // max(m * n, 1))
    if _is_torch(a) or k <= block:
        return a @ b
    out = a[..., :block] @ b[..., :block, :]
    for s in range(block, k, block):
        out += a[..., s : s + block] @ b[..., s : s + block, :]
    return out


def _to_like(arr, like, dtype=None):
    if _is_torch(like):
        import torch

        return torch.tensor(np.array(arr), dtype=dtype or like.dtype, device=like.device)
    return np.asarray(arr, dtype=dtype or like.dtype)


def normal_equations(fm: ForwardModel, values, data, weights, jacobian: bool = True) -> NormalEquations:
    """chi2, profiled curvature and gradient for model ``values`` (n, C, P) from :func:`model_spectra`.

    ``data`` and ``weights`` (n, P) are float64 arrays of the same backend; weights are 0 on every pixel
    that must not count (masked, uncovered, outside continuum regions).
    """
    torch_mode = _is_torch(values)
    flux = values[:, 0, :]
    design = fm.continuum
    if design is not None:
        cont, coef, grams = solve_continuum(design, flux, data, weights)
        model = flux * cont
    else:
        cont, coef, grams = None, None, None
        model = flux
    resid = data - model  # float64 (promoted)
    chi2 = (weights * resid * resid).sum(-1)
    if not jacobian:
        return NormalEquations(
            to_numpy(chi2), None, None, model, cont, None if coef is None else to_numpy(coef)
        )
    # H = J^T W J and g = J^T W r with J = jacobian x continuum, through js = J sqrt(W): one pass over the
    # (n, F, P) Jacobian, done on blocks of rows that stay in cache (numpy) or at once (torch)
    jac = values[:, 1:, :]
    n, f, p = jac.shape
    sw = weights.sqrt() if torch_mode else np.sqrt(weights)
    scale = sw * cont if design is not None else sw
    scale = scale.to(jac.dtype) if torch_mode else scale.astype(jac.dtype)
    r_lo = sw * resid
    r_lo = r_lo.to(jac.dtype) if torch_mode else r_lo.astype(jac.dtype)
    if design is not None:
        f64 = flux.double() if torch_mode else flux.astype(np.float64, copy=False)
        swf = sw * f64
        swf = swf.to(jac.dtype) if torch_mode else swf.astype(jac.dtype)
        bases = [_to_like(basis, swf) for basis in design.bases]
    block = n if torch_mode else max(1, NORMAL_BLOCK_BYTES // max(1, f * p * jac.itemsize))
    hs, gs = [], []
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        js = jac[b0:b1] * scale[b0:b1, None, :]
        if not torch_mode and f <= GRAM_KERNEL_MAX_PARAMS and numba_enabled():
            h_b, g_b = gram_rows(js, r_lo[b0:b1])
        else:
            h_b = _matmul_blocked(js, js.mT)
            g_b = _matmul_blocked(js, r_lo[b0:b1, :, None])[..., 0]
            h_b = h_b.double() if torch_mode else h_b.astype(np.float64)
            g_b = g_b.double() if torch_mode else g_b.astype(np.float64)
        if design is not None:
            for sl, t, gram in zip(design.slices, bases, grams):
                a_blk = swf[b0:b1, sl, None] * t[None, :, :]  # sqrt(W) d model / d coefficients (b, P_r, D)
                cross = _matmul_blocked(js[:, :, sl], a_blk)  # (b, F, D)
                cross = cross.double() if torch_mode else cross.astype(np.float64)
                h_b = h_b - cross @ _solve(gram[b0:b1] + _ridge(gram[b0:b1]), cross.mT)
        hs.append(h_b)
        gs.append(g_b)
    if torch_mode:
        import torch

        h, g = torch.cat(hs), torch.cat(gs)
    else:
        h, g = np.concatenate(hs), np.concatenate(gs)
    return NormalEquations(
        to_numpy(chi2).astype(np.float64),
        to_numpy(h),
        to_numpy(g),
        model,
        cont,
        None if coef is None else to_numpy(coef),
    )
