"""Cross-validation over a training set: k-fold and leave-one-out, per-label bias and scatter.

For every fold, a fresh copy of the estimator (an unfitted :class:`~paynekit.emulators.cannon.CannonModel`,
or anything with the same ``get_params``/``fit`` lifecycle that becomes an emulator) is trained on
the other folds, and the labels of the held-out stars are fitted with it. The result holds the
held-out labels next to the training labels and reports, per label, the bias (mean of fitted minus
reference), the scatter (standard deviation) and their robust versions (median, 1.4826 x MAD).

Labels are fitted by :func:`least_squares_labels`, a small self-contained per-star optimiser
(``scipy.optimize.least_squares`` on scaled labels with the emulator's analytic Jacobian and a few
seeded starts), or by any ``fitter(emulator, flux, ivar) -> labels (N, L)`` passed in (for example a
wrapper around :mod:`paynekit.fitting`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .checks import as_float_array
from .errors import InputError

log = logging.getLogger(__name__)

#: 1.4826 x MAD estimates the standard deviation of a normal distribution.
MAD_TO_SIGMA = 1.4826


# ------------------------------------------------------------------------------------------------
# a simple per-star label fitter
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelFitConfig:
    """Settings of :func:`least_squares_labels`.

    n_starts : starting points per star: the centre of the label box plus ``n_starts - 1`` seeded
        uniform draws in [-start_halfwidth, start_halfwidth] (scaled units; the box is [-0.5, 0.5]).
    bound : labels are confined to [-bound, bound] in scaled units (1.0 allows half a box-width of
        extrapolation on each side).
    ftol, xtol, gtol, max_nfev : passed to ``scipy.optimize.least_squares``.
    seed : seed of the random starts.
    """

    n_starts: int = 3
    start_halfwidth: float = 0.35
    bound: float = 1.0
    ftol: float = 1e-10
    xtol: float = 1e-10
    gtol: float = 1e-10
    max_nfev: int = 200
    seed: int = 0

    def __post_init__(self):
        if int(self.n_starts) < 1:
            raise InputError(f"LabelFitConfig.n_starts must be >= 1, got {self.n_starts}")
        if not 0 <= self.start_halfwidth < self.bound:
            raise InputError("LabelFitConfig.start_halfwidth must be in [0, bound)")
        for name in ("bound", "ftol", "xtol", "gtol", "max_nfev"):
            if not getattr(self, name) > 0:
                raise InputError(f"LabelFitConfig.{name} must be positive, got {getattr(self, name)!r}")


@dataclass(frozen=True, eq=False)
class LabelFitResult:
    """Labels (N, L) in physical units, chi2 (N,) at the optimum, and success (N,) per star."""

    labels: np.ndarray
    chi2: np.ndarray
    success: np.ndarray


def _effective_ivar(emulator, ivar):
    if hasattr(emulator, "adjusted_ivar"):
        return emulator.adjusted_ivar(ivar)  # adds the model's intrinsic variance (The Cannon's s2)
    return ivar


def least_squares_labels(emulator, flux, ivar, *, config: LabelFitConfig | None = None) -> LabelFitResult:
    """Fit the labels of N spectra one star at a time by weighted least squares.

    The residuals are ``sqrt(ivar_eff) * (model(x) - flux)`` with ``ivar_eff`` the inverse of the
    measurement variance plus the emulator's intrinsic variance (when it has one). The optimiser
    works on scaled labels with the emulator's analytic Jacobian and keeps the best of several
    starts. Stars without usable pixels get NaN labels and ``success = False``.
    """
    from scipy.optimize import least_squares

    cfg = config or LabelFitConfig()
    f = np.atleast_2d(as_float_array(flux, "flux", ndim=(1, 2)))
    iv = np.atleast_2d(as_float_array(ivar, "ivar", ndim=(1, 2)))
    if iv.shape != f.shape:
        raise InputError(f"ivar has shape {iv.shape} but flux has {f.shape}")
    if f.shape[1] != emulator.n_pixels:
        raise InputError(f"flux has {f.shape[1]} pixels but the emulator has {emulator.n_pixels}")
    good = np.isfinite(f) & np.isfinite(iv) & (iv > 0)
    iv = _effective_ivar(emulator, np.where(good, iv, 0.0))
    f = np.where(good, f, 0.0)
    n, n_lab = f.shape[0], emulator.n_labels
    rng = np.random.default_rng(cfg.seed)
    starts = np.vstack([np.zeros((1, n_lab)),
                        rng.uniform(-cfg.start_halfwidth, cfg.start_halfwidth, (int(cfg.n_starts) - 1, n_lab))])
    labels = np.full((n, n_lab), np.nan)
    chi2 = np.full(n, np.nan)
    success = np.zeros(n, dtype=bool)
    for i in range(n):
        sw = np.sqrt(iv[i])
        use = sw > 0
        if use.sum() < n_lab:
            continue
        sw_u, f_u = sw[use], f[i, use]
        cache = {}

        def evaluate(xs, sw_u=sw_u, f_u=f_u, use=use, cache=cache):
            key = xs.tobytes()
            if key not in cache:
                cache.clear()
                model, jac = emulator.predict_and_jacobian_scaled(xs[None, :])
                cache[key] = (sw_u * (model[0, use] - f_u), sw_u[:, None] * jac[0, use, :])
            return cache[key]

        best = None
        for x0 in starts:
            res = least_squares(lambda xs: evaluate(xs)[0], x0, jac=lambda xs: evaluate(xs)[1],
                                bounds=(-cfg.bound, cfg.bound), method="trf", ftol=cfg.ftol, xtol=cfg.xtol,
                                gtol=cfg.gtol, max_nfev=cfg.max_nfev)
            if best is None or res.cost < best.cost:
                best = res
        labels[i] = emulator.label_space.unscale(best.x)
        chi2[i] = 2.0 * best.cost
        success[i] = bool(best.status > 0)
    return LabelFitResult(labels, chi2, success)


# ------------------------------------------------------------------------------------------------
# folds and the cross-validation loop
# ------------------------------------------------------------------------------------------------
def kfold_assignments(n_stars: int, n_folds: int, *, seed: int) -> np.ndarray:
    """Fold index (0..n_folds-1) of every star: a seeded permutation cut into near-equal folds."""
    n_stars, n_folds = int(n_stars), int(n_folds)
    if not 2 <= n_folds <= n_stars:
        raise InputError(f"n_folds must be between 2 and the number of stars ({n_stars}), got {n_folds}")
    order = np.random.default_rng(seed).permutation(n_stars)
    fold = np.empty(n_stars, dtype=np.int64)
    for k, members in enumerate(np.array_split(order, n_folds)):
        fold[members] = k
    return fold


@dataclass(frozen=True, eq=False)
class CrossValidationResult:
    """Held-out labels next to the reference labels, with per-label summary statistics."""

    label_names: tuple[str, ...]
    true_labels: np.ndarray
    predicted_labels: np.ndarray
    fold: np.ndarray
    success: np.ndarray
    chi2: np.ndarray

    @property
    def residuals(self) -> np.ndarray:
        """Fitted minus reference labels (N, L)."""
        return self.predicted_labels - self.true_labels

    def _ok(self):
        ok = self.success & np.all(np.isfinite(self.predicted_labels), axis=1)
        if not ok.any():
            raise InputError("no star was fitted successfully; no statistics to report")
        return self.residuals[ok]

    @property
    def bias(self) -> np.ndarray:
        """Mean of fitted minus reference, per label (successful fits only)."""
        return self._ok().mean(axis=0)

    @property
    def scatter(self) -> np.ndarray:
        """Standard deviation of fitted minus reference, per label."""
        r = self._ok()
        return r.std(axis=0, ddof=1) if r.shape[0] > 1 else np.full(r.shape[1], np.nan)

    @property
    def rms(self) -> np.ndarray:
        return np.sqrt(np.mean(self._ok() ** 2, axis=0))

    @property
    def robust_bias(self) -> np.ndarray:
        return np.median(self._ok(), axis=0)

    @property
    def robust_scatter(self) -> np.ndarray:
        r = self._ok()
        return MAD_TO_SIGMA * np.median(np.abs(r - np.median(r, axis=0)), axis=0)

    def summary(self) -> str:
        """A plain-text table of bias and scatter per label."""
        n_ok = int(np.sum(self.success))
        n_folds = int(np.unique(self.fold).size)
        lines = [f"cross-validation: {self.true_labels.shape[0]} stars, {n_folds} folds, {n_ok} fitted",
                 f"{'label':>12} {'bias':>12} {'scatter':>12} {'rms':>12} {'med bias':>12} {'rob scatter':>12}"]
        for i, name in enumerate(self.label_names):
            lines.append(f"{name:>12} {self.bias[i]:12.5g} {self.scatter[i]:12.5g} {self.rms[i]:12.5g} "
                         f"{self.robust_bias[i]:12.5g} {self.robust_scatter[i]:12.5g}")
        return "\n".join(lines)


def _fresh(estimator):
    if hasattr(estimator, "get_params"):
        return type(estimator)(**estimator.get_params())
    if callable(estimator):
        return estimator()
    raise InputError("estimator must have get_params() (an unfitted model to copy) or be a callable returning "
                     f"a new unfitted model; got {type(estimator).__name__}")


def cross_validate(estimator, labels, flux, ivar, *, n_folds=5, seed: int = 0, label_names=None,
                   wavelength=None, fitter=None, fit_config: LabelFitConfig | None = None) -> CrossValidationResult:
    """k-fold cross-validation (``n_folds = "loo"`` for leave-one-out) of a trainable emulator.

    Parameters
    ----------
    estimator : unfitted model (copied with ``type(m)(**m.get_params())``) or a zero-argument factory.
        Each copy is trained with ``fit(labels, flux, ivar, label_names=..., wavelength=...)``.
    labels, flux, ivar : the training set, (N, L), (N, P), (N, P).
    n_folds : int or "loo"
    seed : seed of the fold assignment.
    fitter : ``fitter(emulator, flux, ivar) -> labels (N, L)``; default :func:`least_squares_labels`.
    fit_config : settings of the default fitter.
    """
    x = as_float_array(labels, "labels", ndim=2)
    f = as_float_array(flux, "flux", ndim=2)
    iv = as_float_array(ivar, "ivar", ndim=2)
    n = x.shape[0]
    if f.shape[0] != n or iv.shape != f.shape:
        raise InputError(f"labels {x.shape}, flux {f.shape} and ivar {iv.shape} must describe the same stars")
    names = tuple(label_names) if label_names is not None else tuple(f"label_{i}" for i in range(x.shape[1]))
    if isinstance(n_folds, str):
        if n_folds != "loo":
            raise InputError(f"n_folds must be an integer or 'loo', got {n_folds!r}")
        fold = np.arange(n)
    else:
        fold = kfold_assignments(n, n_folds, seed=seed)
    predicted = np.full_like(x, np.nan)
    success = np.zeros(n, dtype=bool)
    chi2 = np.full(n, np.nan)
    for k in np.unique(fold):
        test = fold == k
        model = _fresh(estimator).fit(x[~test], f[~test], iv[~test], label_names=names, wavelength=wavelength)
        if fitter is None:
            res = least_squares_labels(model, f[test], iv[test], config=fit_config)
            predicted[test], success[test], chi2[test] = res.labels, res.success, res.chi2
        else:
            out = np.asarray(fitter(model, f[test], iv[test]), dtype=float)
            if out.shape != (int(test.sum()), x.shape[1]):
                raise InputError(f"fitter returned shape {out.shape}; expected ({int(test.sum())}, {x.shape[1]})")
            predicted[test] = out
            success[test] = np.all(np.isfinite(out), axis=1)
        log.debug("fold %d: %d held out", k, int(test.sum()))
    return CrossValidationResult(names, x, predicted, fold, success, chi2)


def leave_one_out(estimator, labels, flux, ivar, **kwargs) -> CrossValidationResult:
    """Leave-one-out cross-validation: :func:`cross_validate` with one star per fold."""
    return cross_validate(estimator, labels, flux, ivar, n_folds="loo", **kwargs)
