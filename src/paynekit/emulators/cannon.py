"""The Cannon: a polynomial in the labels for every pixel, with intrinsic scatter (Ness et al. 2015).

For pixel p and a star with labels x, the normalised flux is modelled as

    f_p(x) = theta_p . v(z),    z = (x - pivots) / scales,
    f_p observed ~ Normal(f_p(x), sigma_p^2 + s2_p),

where ``v(z)`` is the vector of polynomial terms (the constant first, then the terms of the
vectorizer), ``sigma_p`` the measurement error and ``s2_p`` the intrinsic variance of the pixel.
Training maximises the likelihood of the training set over (theta_p, s2_p) for every pixel, with an
optional L1 penalty on the non-constant coefficients (Casey et al. 2016) and optional censoring (a
label may be barred from affecting chosen pixels). The per-pixel objective (``-2 ln L`` up to a
constant, as in thecannon) is

    sum_n [ r_np^2 w_np - ln w_np ] + Lambda_p * sum_{t >= 1} |theta_pt|,
    w_np = ivar_np / (1 + ivar_np s2_p),  r_np = flux_np - theta_p . v(z_n).

Training is vectorised across pixels: it alternates a batched weighted least-squares step for
theta given s2 (one BLAS product builds all P normal-equation matrices, then ``np.linalg.solve``
on the (P, T, T) stack; with L1, coordinate descent on those matrices, vectorised over pixels) and
a vectorised safeguarded Newton step for s2 given theta. Each step lowers the objective, so the
alternation converges to a (local) joint maximum of the likelihood.

:class:`CannonModel` follows the scikit-learn lifecycle and satisfies the emulator contract
(:class:`~paynekit.emulators.base.Emulator`) with an analytic Jacobian, so the same fitter finds
labels with it. Its intrinsic variance is exposed for the fitter as :meth:`CannonModel.variance_floor`
and :meth:`CannonModel.adjusted_ivar`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, fields
from itertools import combinations_with_replacement

import numpy as np

from ..checks import as_float_array, check_increasing
from ..errors import FileFormatError, InputError, NotFittedError
from ..labels import LabelSpace
from .base import Emulator

log = logging.getLogger(__name__)

#: thecannon's default label scale: the range between these percentiles of the training labels.
THECANNON_SCALE_PERCENTILES = (2.5, 97.5)


# ------------------------------------------------------------------------------------------------
# the polynomial vectorizer
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PolynomialVectorizer:
    """The polynomial terms of a Cannon model as an exponent matrix.

    ``exponents[t, l]`` is the power of label ``l`` in term ``t``; row 0 is the constant term (all
    zeros) and is always present. Term values are ``v_t(z) = prod_l z_l ** exponents[t, l]``.
    """

    exponents: np.ndarray

    def __post_init__(self):
        e = np.array(self.exponents, copy=True)
        if e.ndim != 2 or e.shape[0] < 2 or e.shape[1] < 1:
            raise InputError(f"exponents must have shape (T >= 2, L >= 1), got {e.shape}")
        if not np.issubdtype(e.dtype, np.integer):
            if not np.all(np.isfinite(e)) or not np.all(e == np.round(e)):
                raise InputError("term powers must be non-negative integers")
            e = np.round(e)
        e = e.astype(np.int64)
        if np.any(e < 0):
            raise InputError("term powers must be non-negative integers")
        if np.any(e[0] != 0) or np.any(e[1:].sum(axis=1) == 0):
            raise InputError("the first term must be the constant and it must be the only constant term")
        if len({tuple(row) for row in e}) != e.shape[0]:
            raise InputError("the vectorizer has duplicate terms")
        e.flags.writeable = False
        object.__setattr__(self, "exponents", e)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_order(cls, n_labels: int, order: int, cross_term_order: int | None = None) -> PolynomialVectorizer:
        """All terms up to ``order``, in thecannon's order (its ``terminator``).

        Terms are enumerated by total degree 1..order and, within a degree, as
        ``combinations_with_replacement`` of the labels in their given order; a cross term is kept
        when its largest power is at most ``cross_term_order`` (default ``order - 1``, thecannon's
        default), a single-label term when its power is at most ``order``.
        """
        order = int(order)
        if order < 1:
            raise InputError(f"vectorizer order must be >= 1, got {order}")
        cross = order - 1 if cross_term_order is None or cross_term_order < 0 else int(cross_term_order)
        rows = [np.zeros(n_labels, dtype=np.int64)]
        for degree in range(1, 1 + max(order, 1 + cross)):
            for combo in combinations_with_replacement(range(n_labels), degree):
                row = np.bincount(combo, minlength=n_labels)
                used = row[row > 0]
                if (used.size == 1 and used[0] <= order) or (used.size > 1 and used.max() <= cross):
                    rows.append(row)
        return cls(np.array(rows))

    @classmethod
    def from_terms(cls, terms, label_names) -> PolynomialVectorizer:
        """From a term list without the constant, e.g. thecannon's ``[[[0, 1]], [[1, 1], [0, 1]], ...]``
        (label indices) or the AnniesLasso form ``[[["TEFF", 4]], [["TEFF", 1], ["LOGG", 1]], ...]``
        (label names), or a JSON string of either."""
        names = tuple(label_names)
        if isinstance(terms, str):
            try:
                terms = json.loads(terms)
            except json.JSONDecodeError as exc:
                raise InputError(f"vectorizer term list is not valid JSON: {exc}") from None
        if not isinstance(terms, (list, tuple)) or len(terms) == 0:
            raise InputError("vectorizer term list must be a non-empty list of terms")
        rows = [np.zeros(len(names), dtype=np.int64)]
        for t, term in enumerate(terms):
            if not isinstance(term, (list, tuple)) or len(term) == 0:
                raise InputError(f"vectorizer term {t} is {term!r}; expected a list of [label, power] pairs "
                                 "(the constant term is implicit)")
            row = np.zeros(len(names), dtype=np.int64)
            for factor in term:
                if not isinstance(factor, (list, tuple)) or len(factor) != 2:
                    raise InputError(f"vectorizer term {t}: factor {factor!r} is not a [label, power] pair")
                label, power = factor
                if isinstance(label, str):
                    if label not in names:
                        raise InputError(f"vectorizer term {t} uses label {label!r}; the labels are {list(names)}")
                    index = names.index(label)
                elif isinstance(label, (int, np.integer)) and 0 <= int(label) < len(names):
                    index = int(label)
                else:
                    raise InputError(f"vectorizer term {t}: label {label!r} is neither a name nor an index "
                                     f"below {len(names)}")
                if float(power) != round(float(power)) or float(power) < 0:
                    raise InputError(f"vectorizer term {t}: power {power!r} is not a non-negative integer")
                row[index] += round(float(power))
            if row.sum() == 0:
                raise InputError(f"vectorizer term {t} is constant; the constant term is implicit")
            rows.append(row)
        return cls(np.array(rows))

    # -- description ----------------------------------------------------------------------------
    @property
    def n_terms(self) -> int:
        """Number of terms, the constant included (the length of each pixel's theta)."""
        return self.exponents.shape[0]

    @property
    def n_labels(self) -> int:
        return self.exponents.shape[1]

    @property
    def max_power(self) -> int:
        return int(self.exponents.max())

    def terms(self, label_names=None) -> list:
        """The term list without the constant, thecannon style (``[[index, power], ...]`` per term),
        or with label names when ``label_names`` is given."""
        out = []
        for row in self.exponents[1:]:
            idx = np.flatnonzero(row)
            out.append([[label_names[i] if label_names is not None else int(i), int(row[i])] for i in idx])
        return out

    def human_readable(self, label_names) -> str:
        parts = ["1"]
        for term in self.terms(label_names):
            parts.append("*".join(f"{n}^{p}" if p > 1 else f"{n}" for n, p in term))
        return " + ".join(parts)

    def uses_label(self) -> np.ndarray:
        """(T, L) bool: whether term t involves label l."""
        return self.exponents > 0

    # -- evaluation -----------------------------------------------------------------------------
    def design_matrix(self, z: np.ndarray, derivative: bool = False):
        """Term values (N, T) at labels ``z`` (N, L) and, with ``derivative``, d v_t / d z_l (N, T, L)."""
        e = self.exponents
        n, n_lab = z.shape
        pw = np.empty((n, n_lab, self.max_power + 1), dtype=z.dtype)
        pw[:, :, 0] = 1
        for k in range(1, self.max_power + 1):
            pw[:, :, k] = pw[:, :, k - 1] * z
        lab = np.arange(n_lab)[None, :]
        factors = pw[:, lab, e]  # (N, T, L): z_l ** e_tl
        v = np.prod(factors, axis=2)
        if not derivative:
            return v, None
        # d/dz_l prod_m z_m^e_tm = e_tl z_l^(e_tl - 1) prod_{m != l} z_m^e_tm, the product over the other
        # labels from exclusive prefix and suffix products (no division, so z = 0 is fine)
        dfac = e.astype(z.dtype) * pw[:, lab, np.maximum(e - 1, 0)]
        left = np.ones_like(factors)
        right = np.ones_like(factors)
        if n_lab > 1:
            left[:, :, 1:] = np.cumprod(factors[:, :, :-1], axis=2)
            right[:, :, :-1] = np.cumprod(factors[:, :, :0:-1], axis=2)[:, :, ::-1]
        return v, dfac * left * right


def _resolve_vectorizer(spec, label_names) -> PolynomialVectorizer:
    if isinstance(spec, PolynomialVectorizer):
        if spec.n_labels != len(label_names):
            raise InputError(f"vectorizer is for {spec.n_labels} labels but there are {len(label_names)}")
        return spec
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return PolynomialVectorizer.from_order(len(label_names), int(spec))
    if isinstance(spec, (str, list, tuple)):
        return PolynomialVectorizer.from_terms(spec, label_names)
    raise InputError(f"vectorizer must be a polynomial order (int), a term list or a PolynomialVectorizer, "
                     f"got {type(spec).__name__}")


# ------------------------------------------------------------------------------------------------
# training: pure array functions
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CannonTrainConfig:
    """Numerical settings of :meth:`CannonModel.fit`.

    max_iter : alternations of the theta step and the s2 step.
    tol : a pixel has converged when its s2 changes by less than ``tol`` times its total variance
        (s2 plus the median measurement variance of the pixel).
    s2_max_iter, s2_rtol : safeguarded Newton iterations for s2 and their relative tolerance.
    l1_max_sweeps, l1_tol : coordinate-descent sweeps of the L1 step; stop when no coefficient
        changes the model by more than ``l1_tol`` in units of the pixel's noise (sqrt of Q_tt).
    chunk_bytes : memory bound for the per-pixel temporaries (pixels are processed in chunks).
    """

    max_iter: int = 100
    tol: float = 1e-6
    s2_max_iter: int = 100
    s2_rtol: float = 1e-10
    l1_max_sweeps: int = 2000
    l1_tol: float = 1e-7
    chunk_bytes: int = 64 * 2**20

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not np.isfinite(value) or value <= 0:
                raise InputError(f"CannonTrainConfig.{f.name} must be positive, got {value!r}")


class _GramBuilder:
    """Builds Q_p = A^T diag(w_p) A (P, T, T) and b_p = A^T (w_p f_p) (P, T) for all pixels at once.

    The products a_t a_u (t <= u) of the design matrix are packed into an (N, T(T+1)/2) matrix, so
    that all P normal-equation matrices come from one GEMM ``w^T @ pairs``. When that matrix would
    exceed ``max_bytes`` (many labels), it is built and consumed in chunks of stars instead.
    """

    def __init__(self, a, max_bytes):
        self.a = a
        self.iu, self.ju = np.triu_indices(a.shape[1])
        row_bytes = 8 * self.iu.size
        self.star_chunk = max(1, int(max_bytes // row_bytes))
        self.pairs = self._pairs(slice(None)) if self.star_chunk >= a.shape[0] else None

    def _pairs(self, rows):
        return self.a[rows, self.iu] * self.a[rows, self.ju]

    def __call__(self, w, wf):
        n, t = self.a.shape
        if self.pairs is not None:
            packed = w.T @ self.pairs
        else:
            packed = np.zeros((w.shape[1], self.iu.size))
            for start in range(0, n, self.star_chunk):
                rows = slice(start, start + self.star_chunk)
                packed += w[rows].T @ self._pairs(rows)
        q = np.empty((w.shape[1], t, t))
        q[:, self.iu, self.ju] = packed
        q[:, self.ju, self.iu] = packed
        return q, wf.T @ self.a


def _solve_stack(q, b, keep):
    """Solve Q theta = b per pixel over the terms in ``keep`` (P, T) (others fixed at zero).

    Columns are equilibrated by sqrt(diag Q) before solving; pixels whose matrix is singular fall
    back to the pseudo-inverse (minimum-norm solution).
    """
    d = np.sqrt(np.where(keep, np.einsum("ptt->pt", q), 1.0))
    d = np.where(d > 0, d, 1.0)
    qe = q / d[:, :, None] / d[:, None, :]
    be = b / d
    drop = ~keep
    if drop.any():
        both = keep[:, :, None] & keep[:, None, :]
        qe = np.where(both, qe, 0.0)
        pix, term = np.nonzero(drop)
        qe[pix, term, term] = 1.0
        be = np.where(keep, be, 0.0)
    try:
        y = np.linalg.solve(qe, be[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        y = np.empty_like(be)
        for start in range(0, qe.shape[0], 256):  # only reached for degenerate training sets
            sl = slice(start, start + 256)
            y[sl] = (np.linalg.pinv(qe[sl]) @ be[sl, :, None])[:, :, 0]
        log.warning("the Cannon normal equations are singular for some pixels; using minimum-norm solutions")
    if not np.all(np.isfinite(y)):
        bad = ~np.all(np.isfinite(y), axis=1)
        y[bad] = (np.linalg.pinv(qe[bad]) @ be[bad, :, None])[:, :, 0]
    return np.where(keep, y / d, 0.0)


def _lasso_stack(q, b, lam, theta0, keep, max_sweeps, tol):
    """Minimise theta^T Q theta - 2 b^T theta + sum_t lam_t |theta_t| for every pixel at once.

    Cyclic coordinate descent on the precomputed (P, T, T) Gram matrices: each update is the exact
    soft-thresholded minimiser along one coefficient, vectorised over pixels; the loop runs over
    terms and sweeps, never over pixels. The problem is convex, so this converges to the optimum.
    Returns theta (P, T) and the number of sweeps.
    """
    theta = np.where(keep, theta0, 0.0).copy()
    diag = np.einsum("ptt->pt", q).copy()
    scale = np.sqrt(np.maximum(diag, 0.0))
    ok = keep & (diag > 0)
    grad_part = np.einsum("ptu,pu->pt", q, theta)  # Q theta, kept up to date
    for sweep in range(1, max_sweeps + 1):
        biggest = np.zeros(q.shape[0])
        for t in range(q.shape[1]):
            qtt = diag[:, t]
            rho = b[:, t] - grad_part[:, t] + qtt * theta[:, t]
            half = 0.5 * lam[:, t]
            new = np.sign(rho) * np.maximum(np.abs(rho) - half, 0.0) / np.where(ok[:, t], qtt, 1.0)
            new = np.where(ok[:, t], new, 0.0)
            delta = new - theta[:, t]
            if np.any(delta):
                grad_part += q[:, :, t] * delta[:, None]
                theta[:, t] = new
                np.maximum(biggest, np.abs(delta) * scale[:, t], out=biggest)
        if biggest.max() <= tol:
            return theta, sweep
    log.warning("L1 coordinate descent reached %d sweeps (largest last change %.2e)", max_sweeps, biggest.max())
    return theta, max_sweeps


def _solve_s2(r2, ivar, s2_start, max_iter, rtol):
    """Maximum-likelihood s2 >= 0 per pixel for fixed residuals (safeguarded Newton, vectorised).

    Solves g(s2) = sum_n [w_n - r_n^2 w_n^2] = 0 with w_n = ivar_n / (1 + ivar_n s2), the derivative of
    the objective. g(0) >= 0 means the data need no intrinsic scatter (s2 = 0). Otherwise a root is
    bracketed in (0, max r^2] (every term of g is >= 0 there). Steps are Newton steps, or Fisher
    scoring steps (expected curvature sum w^2) where the curvature is not positive, and bisection
    when a step leaves the bracket. Pixels that converge are dropped from the working arrays.
    """
    n_pix = r2.shape[1]
    s2 = np.zeros(n_pix)
    g0 = np.sum(ivar, axis=0) - np.sum(r2 * ivar * ivar, axis=0)
    idx = np.flatnonzero(g0 < 0)
    if idx.size == 0:
        return s2
    r2c, ivc = r2[:, idx], ivar[:, idx]
    hi = np.max(np.where(ivc > 0, r2c, 0.0), axis=0)
    lo = np.zeros(idx.size)
    prev = s2_start[idx]
    fisher0 = -g0[idx] / np.sum(ivc * ivc, axis=0)  # one scoring step from s2 = 0
    s = np.where(np.isfinite(prev) & (prev > 0), prev, fisher0)
    s = np.where((s > lo) & (s < hi), s, 0.5 * (lo + hi))
    for _ in range(max_iter):
        w = ivc / (1.0 + ivc * s)
        q = r2c * w
        g = np.sum(w * (1.0 - q), axis=0)
        w2 = w * w
        fisher = np.sum(w2, axis=0)
        h = 2.0 * np.sum(w2 * q, axis=0) - fisher
        lo = np.where(g < 0, s, lo)
        hi = np.where(g >= 0, s, hi)
        curvature = np.where(h > 0, h, fisher)
        new = s - g / curvature
        done = (np.abs(new - s) <= rtol * s) | (hi - lo <= rtol * hi) | (g == 0)
        new = np.where(done | ((new >= lo) & (new <= hi)), new, 0.5 * (lo + hi))
        s = new
        if done.all():
            s2[idx] = s
            return s2
        if done.sum() > 0.25 * done.size:  # compact the working arrays (amortised copies)
            s2[idx[done]] = s[done]
            keep = ~done
            idx, r2c, ivc, s, lo, hi = idx[keep], r2c[:, keep], ivc[:, keep], s[keep], lo[keep], hi[keep]
    s2[idx] = s
    log.warning("the s2 root finder reached %d iterations for %d pixels", max_iter, idx.size)
    return s2


def train_cannon(a, flux, ivar, *, lam=None, keep=None, config: CannonTrainConfig | None = None):
    """Maximum-likelihood (theta, s2) for every pixel, given the design matrix.

    Parameters
    ----------
    a : (N, T) design matrix (constant column first).
    flux, ivar : (N, P) training fluxes and inverse variances (ivar = 0 excludes a star at a pixel).
    lam : (P, T) L1 strengths (0 for unregularised coefficients), optional.
    keep : (P, T) bool, the coefficients each pixel may use (censoring), optional.

    Returns
    -------
    theta (P, T), s2 (P,), converged (P,) bool, n_iter (int). Pixels with fewer stars than terms get
    theta = (1, 0, ..., 0) and s2 = inf (no information) and count as converged.
    """
    cfg = config or CannonTrainConfig()
    n, t = a.shape
    p = flux.shape[1]
    keep = np.ones((p, t), dtype=bool) if keep is None else keep
    regularised = lam is not None and np.any(lam > 0)
    if lam is None:
        lam = np.zeros((p, t))
    theta = np.zeros((p, t))
    theta[:, 0] = 1.0
    s2 = np.zeros(p)
    n_good = np.sum(ivar > 0, axis=0)
    informative = n_good >= keep.sum(axis=1) + 1
    s2[~informative] = np.inf
    if (~informative).any():
        log.warning("%d pixels have fewer training stars than coefficients; they get s2 = inf",
                    int((~informative).sum()))
    # a typical measurement variance per pixel (harmonic mean), the scale of the convergence test
    var_scale = n_good / np.maximum(np.sum(ivar, axis=0), np.finfo(float).tiny)

    gram = _GramBuilder(a, cfg.chunk_bytes)
    per_pixel = 8 * (3 * n + 4 * t * t)
    chunk = max(1, int(cfg.chunk_bytes // per_pixel))
    converged = ~informative
    n_iter = 0
    idx_all = np.flatnonzero(informative)
    for start in range(0, idx_all.size, chunk):
        idx = idx_all[start:start + chunk]
        f_c, iv_c = flux[:, idx], ivar[:, idx]
        k_c, l_c = keep[idx], lam[idx]
        th_c, s2_c = theta[idx], s2[idx]
        active = np.ones(idx.size, dtype=bool)
        done_c = np.zeros(idx.size, dtype=bool)
        for it in range(1, cfg.max_iter + 1):
            n_iter = max(n_iter, it)
            sel = np.flatnonzero(active)
            w = iv_c[:, sel] / (1.0 + iv_c[:, sel] * s2_c[sel][None, :])
            q, b = gram(w, w * f_c[:, sel])
            th = _solve_stack(q, b, k_c[sel])
            if regularised:
                th, _ = _lasso_stack(q, b, l_c[sel], th if it == 1 else th_c[sel], k_c[sel],
                                     cfg.l1_max_sweeps, cfg.l1_tol)
            th_c[sel] = th
            r = f_c[:, sel] - a @ th.T
            new = _solve_s2(r * r, iv_c[:, sel], s2_c[sel], cfg.s2_max_iter, cfg.s2_rtol)
            small = np.abs(new - s2_c[sel]) <= cfg.tol * (new + var_scale[idx][sel])
            s2_c[sel] = new
            done_c[sel[small]] = True
            active[sel[small]] = False
            if not active.any():
                break
        # theta at the final s2 (the last s2 step moved s2 by at most tol of the variance)
        w = iv_c / (1.0 + iv_c * s2_c[None, :])
        q, b = gram(w, w * f_c)
        th = _solve_stack(q, b, k_c)
        if regularised:
            th, _ = _lasso_stack(q, b, l_c, th_c, k_c, cfg.l1_max_sweeps, cfg.l1_tol)
        theta[idx], s2[idx] = th, s2_c
        converged[idx] = done_c
    if not converged.all():
        log.warning("%d of %d pixels did not converge in %d iterations", int((~converged).sum()), p, cfg.max_iter)
    return theta, s2, converged, n_iter


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
def _short_hash(*arrays) -> str:
    h = hashlib.sha256()
    for arr in arrays:
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


class CannonModel(Emulator):
    """The Cannon as a trainable emulator (scikit-learn lifecycle).

    Parameters
    ----------
    vectorizer : int, term list or PolynomialVectorizer
        A polynomial order (all terms up to it, cross terms up to order - 1, thecannon's
        convention), or an explicit term list without the constant (thecannon's
        ``[[[label_index, power], ...], ...]`` or AnniesLasso's ``[[["TEFF", 4]], ...]``, or its JSON).
    pivots : "median" or array (L,)
        Label offsets; default the median of the training labels (thecannon's fiducials).
    scales : "ptp" or array (L,) or scalar
        Label scales, ``z = (x - pivots) / scales``; default the range between the 2.5th and 97.5th
        percentiles of the training labels (thecannon's default).
    regularization : float or array (P,)
        L1 strength Lambda (Casey et al. 2016) on the non-constant coefficients, in the units of the
        objective ``chi^2 + sum ln(var) + Lambda * ||theta[1:]||_1`` with theta in the z basis.
    censors : dict label name -> bool array (P,), optional
        True where the label may affect the pixel; terms involving a label are dropped (their
        coefficients fixed to 0) at pixels where its mask is False.
    config : CannonTrainConfig
        Numerical settings of the training.

    Attributes (after :meth:`fit`)
    ------------------------------
    theta_ : (P, T) coefficients in the z basis (constant first, then the vectorizer's terms).
    s2_ : (P,) intrinsic variance per pixel (inf where the training set carried no information). It is
        the maximum-likelihood estimate, as in thecannon and Casey et al. (2016): like any ML variance it
        is biased low, to first order by sum_n w_n h_n / sum_n w_n^2 (h_n the leverages, about T/N of the
        pixel's total variance for similar weights); tests/test_cannon.py checks exactly this.
    vectorizer_ : PolynomialVectorizer, pivots_ (L,), scales_ (L,), converged_ (P,), n_iter_.
    """

    kind = "cannon"

    def __init__(self, vectorizer=2, *, pivots="median", scales="ptp", regularization=0.0, censors=None,
                 config: CannonTrainConfig | None = None):
        # hyperparameters only (scikit-learn); the emulator state is set by fit() or the readers
        self.vectorizer = vectorizer
        self.pivots = pivots
        self.scales = scales
        self.regularization = regularization
        self.censors = censors
        self.config = config
        self._label_space = None
        self.wavelength = None
        self.wavelength_medium = "vacuum"
        self.meta = {}
        self._dtype = np.dtype(np.float64)

    def get_params(self) -> dict:
        """The hyperparameters, so that ``type(m)(**m.get_params())`` is an unfitted copy."""
        return {"vectorizer": self.vectorizer, "pivots": self.pivots, "scales": self.scales,
                "regularization": self.regularization, "censors": self.censors, "config": self.config}

    # -- emulator state -------------------------------------------------------------------------
    @property
    def label_space(self) -> LabelSpace:
        if self._label_space is None:
            raise NotFittedError("this CannonModel is not fitted yet; call fit(labels, flux, ivar) first")
        return self._label_space

    @label_space.setter
    def label_space(self, value):
        self._label_space = value

    @property
    def is_fitted(self) -> bool:
        return getattr(self, "theta_", None) is not None

    def _check_fitted(self):
        if not self.is_fitted:
            raise NotFittedError("this CannonModel is not fitted yet; call fit(labels, flux, ivar) first")

    @property
    def dtype(self):
        return self._dtype

    @property
    def n_pixels(self) -> int:
        self._check_fitted()
        return self.theta_.shape[0]

    def astype(self, dtype) -> CannonModel:
        self._check_fitted()
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float64):
            raise InputError(f"dtype must be float32 or float64, got {dt}")
        new = type(self)(**self.get_params())
        new._set_state(self.label_space, self.wavelength, self.wavelength_medium, self.meta, self.vectorizer_,
                       self.pivots_, self.scales_, self.theta_, self.s2_, dtype=dt)
        for name in ("converged_", "n_iter_", "censor_mask_"):
            setattr(new, name, getattr(self, name, None))
        return new

    def _set_state(self, label_space, wavelength, wavelength_medium, meta, vectorizer, pivots, scales, theta, s2,
                   dtype=np.float64):
        """Install trained parameters and precompute the evaluation arrays."""
        Emulator.__init__(self, label_space, wavelength, wavelength_medium=wavelength_medium, meta=meta)
        self._dtype = np.dtype(dtype)
        n_lab = len(label_space)
        if vectorizer.n_labels != n_lab:
            raise InputError(f"the vectorizer has {vectorizer.n_labels} labels but the label space has {n_lab}")
        pivots = as_float_array(pivots, "pivots", ndim=1)
        scales = as_float_array(scales, "scales", ndim=1)
        theta = as_float_array(theta, "theta", ndim=2)
        s2 = as_float_array(s2, "s2", ndim=1)
        if pivots.shape != (n_lab,) or scales.shape != (n_lab,):
            raise InputError(f"pivots {pivots.shape} and scales {scales.shape} must have one value per label ({n_lab})")
        if not np.all(np.isfinite(scales)) or np.any(scales == 0) or not np.all(np.isfinite(pivots)):
            raise InputError("pivots must be finite and scales finite and non-zero")
        if theta.shape[1] != vectorizer.n_terms:
            raise InputError(f"theta has {theta.shape[1]} coefficients per pixel but the vectorizer has "
                             f"{vectorizer.n_terms} terms")
        if s2.shape != (theta.shape[0],):
            raise InputError(f"s2 has shape {s2.shape} but theta has {theta.shape[0]} pixels")
        if np.any(s2 < 0) or np.any(np.isnan(s2)):
            raise InputError("s2 must be >= 0 (inf marks pixels without information)")
        if self.wavelength is not None and self.wavelength.size != theta.shape[0]:
            raise InputError(f"theta has {theta.shape[0]} pixels but wavelength has {self.wavelength.size}")
        for arr in (pivots, scales, theta, s2):
            arr.flags.writeable = False
        self.vectorizer_, self.pivots_, self.scales_, self.theta_, self.s2_ = vectorizer, pivots, scales, theta, s2
        # Internal, well-conditioned basis: u = (x - pivots) / span = x_scaled + shift, so that
        # z = u * span / scales and theta_int_t = theta_t * prod_l (span_l / scales_l) ** e_tl.
        span = label_space.span
        self._shift = ((label_space.center() - pivots) / span).astype(self._dtype)
        self._term_factor = np.prod((span / scales)[None, :] ** vectorizer.exponents, axis=1)
        self._theta_int_t = np.ascontiguousarray((theta * self._term_factor).T.astype(self._dtype))

    # -- training -------------------------------------------------------------------------------
    def fit(self, labels, flux, ivar, *, label_names=None, wavelength=None, wavelength_medium="vacuum",
            units=()) -> CannonModel:
        """Train on N stars: labels (N, L), flux and ivar (N, P). Returns self.

        ``ivar = 0`` excludes a star at a pixel (its flux may then be non-finite). The label space
        (the scaling box of the emulator contract) is the training set's [min, max] per label.
        """
        x = as_float_array(labels, "labels", ndim=2)
        f = as_float_array(flux, "flux", ndim=2)
        iv = as_float_array(ivar, "ivar", ndim=2)
        n, n_lab = x.shape
        if f.shape[0] != n:
            raise InputError(f"flux has {f.shape[0]} spectra (shape {f.shape}) but labels has {n} rows")
        if iv.shape != f.shape:
            raise InputError(f"ivar has shape {iv.shape} but flux has {f.shape}")
        if not np.all(np.isfinite(x)):
            raise InputError("labels contains non-finite values")
        if np.any(np.isnan(iv)) or np.any(iv < 0) or np.any(np.isinf(iv)):
            raise InputError("ivar must be finite and >= 0 (use 0 for pixels to ignore)")
        bad_flux = ~np.isfinite(f) & (iv > 0)
        if bad_flux.any():
            raise InputError(f"flux has {int(bad_flux.sum())} non-finite values where ivar > 0; set their ivar to 0")
        f = np.where(iv > 0, f, 0.0)
        names = tuple(label_names) if label_names is not None else tuple(f"label_{i}" for i in range(n_lab))
        if len(names) != n_lab:
            raise InputError(f"label_names has {len(names)} entries but labels has {n_lab} columns")
        wl = None
        if wavelength is not None:
            wl = as_float_array(wavelength, "wavelength", ndim=1)
            check_increasing(wl)
            if wl.size != f.shape[1]:
                raise InputError(f"wavelength has {wl.size} values but flux has {f.shape[1]} pixels")
        lo, hi = x.min(axis=0), x.max(axis=0)
        if np.any(hi <= lo):
            flat = [names[i] for i in np.flatnonzero(hi <= lo)]
            raise InputError(f"labels {flat} have no spread in the training set")
        label_space = LabelSpace(names, lo, hi, tuple(units))

        vec = _resolve_vectorizer(self.vectorizer, names)
        pivots = self._resolve_label_stat(self.pivots, "pivots", x, names)
        scales = self._resolve_label_stat(self.scales, "scales", x, names)
        if np.any(scales == 0):
            raise InputError(f"scales are zero for labels {[names[i] for i in np.flatnonzero(scales == 0)]}")
        p = f.shape[1]
        keep, censor_mask = self._censoring(vec, names, p)
        lam = self._regularization_matrix(vec, p)

        # design matrix in the internal basis u = (x - pivots) / span (well conditioned); see _set_state
        span = hi - lo
        u = (x - pivots) / span
        a, _ = vec.design_matrix(u)
        term_factor = np.prod((span / scales)[None, :] ** vec.exponents, axis=1)
        cfg = self.config or CannonTrainConfig()
        log.info("training a %d-term Cannon on %d stars x %d pixels", vec.n_terms, n, p)
        theta_int, s2, converged, n_iter = train_cannon(a, f, iv, lam=lam / term_factor if lam is not None else None,
                                                        keep=keep, config=cfg)
        theta = theta_int / term_factor
        meta = {"training_set_hash": _short_hash(x, f, iv), "n_training_stars": int(n),
                "vectorizer_terms": vec.terms(names)}
        self._set_state(label_space, wl, wavelength_medium, meta, vec, pivots, scales, theta, s2, dtype=self._dtype)
        self.converged_ = converged
        self.n_iter_ = n_iter
        self.censor_mask_ = censor_mask
        return self

    @staticmethod
    def _resolve_label_stat(value, name, x, names):
        if isinstance(value, str):
            if name == "pivots" and value == "median":
                return np.median(x, axis=0)
            if name == "scales" and value == "ptp":
                return np.ptp(np.percentile(x, THECANNON_SCALE_PERCENTILES, axis=0), axis=0)
            expected = "'median'" if name == "pivots" else "'ptp'"
            raise InputError(f"{name} must be {expected} or an array of one value per label, got {value!r}")
        arr = np.array(value, dtype=np.float64, copy=True)
        if arr.ndim == 0:
            arr = np.full(len(names), float(arr))
        if arr.shape != (len(names),) or not np.all(np.isfinite(arr)):
            raise InputError(f"{name} must have one finite value per label ({len(names)}), got shape {arr.shape}")
        return arr

    def _censoring(self, vec, names, n_pixels):
        if not self.censors:
            return None, None
        if not isinstance(self.censors, dict):
            raise InputError(f"censors must be a dict label name -> bool array (P,), got {type(self.censors).__name__}")
        mask = np.ones((len(names), n_pixels), dtype=bool)
        for label, m in self.censors.items():
            if label not in names:
                raise InputError(f"censors names label {label!r}; the labels are {list(names)}")
            m = np.asarray(m)
            if m.shape != (n_pixels,) or m.dtype != bool:
                raise InputError(f"censors[{label!r}] must be a bool array of shape ({n_pixels},), got "
                                 f"{m.dtype} {m.shape}")
            mask[names.index(label)] = m
        # term t is kept at pixel p when every label it uses may affect p
        uses = vec.uses_label()  # (T, L)
        keep = ~np.any(uses[None, :, :] & ~mask.T[:, None, :], axis=2)
        return keep, mask

    def _regularization_matrix(self, vec, n_pixels):
        reg = np.array(self.regularization, dtype=np.float64, copy=True)
        if reg.ndim == 0:
            reg = np.full(n_pixels, float(reg))
        if reg.shape != (n_pixels,) or not np.all(np.isfinite(reg)) or np.any(reg < 0):
            raise InputError(f"regularization must be a non-negative scalar or an array of shape ({n_pixels},)")
        if not np.any(reg > 0):
            return None
        lam = np.repeat(reg[:, None], vec.n_terms, axis=1)
        lam[:, 0] = 0.0  # the constant term is never regularised
        return lam

    # -- the contract ---------------------------------------------------------------------------
    def _evaluate_scaled(self, x_scaled, jacobian):
        self._check_fitted()
        u = x_scaled + self._shift
        v, dv = self.vectorizer_.design_matrix(u, derivative=jacobian)
        flux = v @ self._theta_int_t
        if not jacobian:
            return flux, None
        n, t, n_lab = dv.shape
        # one GEMM: (N L, T) @ (T, P) -> (N, L, P), returned as an (N, P, L) view
        jac_nlp = (np.swapaxes(dv, 1, 2).reshape(n * n_lab, t) @ self._theta_int_t).reshape(n, n_lab, -1)
        return flux, np.swapaxes(jac_nlp, 1, 2)

    # -- intrinsic scatter, for the fitter -------------------------------------------------------
    def variance_floor(self) -> np.ndarray:
        """The intrinsic variance s2 (P,) to add to the measurement variance of every pixel.

        The likelihood of an observed spectrum is Normal(flux | model, 1/ivar + s2); inf marks pixels
        the training set did not constrain (they should carry no weight). See :meth:`adjusted_ivar`.
        """
        self._check_fitted()
        return np.array(self.s2_, copy=True)

    @property
    def intrinsic_scatter(self) -> np.ndarray:
        """sqrt(s2) per pixel (flux units)."""
        return np.sqrt(self.variance_floor())

    def adjusted_ivar(self, ivar) -> np.ndarray:
        """``ivar / (1 + ivar * s2)`` for ivar (..., P): the inverse of (1/ivar + s2), 0 where ivar = 0
        or s2 = inf. A new array; the input is not modified."""
        self._check_fitted()
        iv = as_float_array(ivar, "ivar")
        if iv.shape[-1:] != (self.n_pixels,):
            raise InputError(f"ivar has shape {iv.shape} but the model has {self.n_pixels} pixels")
        s2 = self.s2_
        with np.errstate(invalid="ignore"):
            out = iv / (1.0 + iv * np.where(np.isfinite(s2), s2, 0.0))
        return np.where((iv > 0) & np.isfinite(s2), out, 0.0)

    # -- files ----------------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        self._check_fitted()
        out = {"theta": self.theta_, "s2": self.s2_, "exponents": self.vectorizer_.exponents,
               "pivots": self.pivots_, "scales": self.scales_,
               "regularization": np.array(self.regularization, dtype=np.float64)}
        mask = getattr(self, "censor_mask_", None)
        out["censor_mask"] = mask if mask is not None else np.zeros((0, self.n_pixels), dtype=bool)
        return out

    @classmethod
    def from_arrays(cls, params, label_space, wavelength, *, activation="", wavelength_medium="vacuum", meta=None,
                    dtype=np.float64) -> CannonModel:
        """Inverse of :meth:`to_arrays` (used by :func:`~paynekit.emulators.formats.load_emulator`)."""
        if activation:
            raise FileFormatError(f"a Cannon model has no activation, but the file says {activation!r}")
        missing = [k for k in ("theta", "s2", "exponents", "pivots", "scales") if k not in params]
        if missing:
            raise FileFormatError(f"Cannon model file lacks {missing}")
        vec = PolynomialVectorizer(params["exponents"])
        reg = params.get("regularization", np.array(0.0))
        censor = params.get("censor_mask")
        censors = None
        if censor is not None and censor.size:
            censors = {name: np.array(censor[i]) for i, name in enumerate(label_space.names)}
        model = cls(vec.terms(), pivots=np.array(params["pivots"]), scales=np.array(params["scales"]),
                    regularization=float(reg) if np.ndim(reg) == 0 else np.array(reg), censors=censors)
        model._set_state(label_space, wavelength, wavelength_medium, meta, vec, params["pivots"], params["scales"],
                         params["theta"], params["s2"], dtype=dtype)
        model.censor_mask_ = np.array(censor, dtype=bool) if censors is not None else None
        model.converged_ = None
        model.n_iter_ = None
        return model

    @classmethod
    def from_thecannon_npz(cls, path, data) -> CannonModel:
        """A model trained by the peer package thecannon, converted to npz.

        Expected arrays: ``theta`` (P, T), ``s2`` (P,), ``vectorizer_terms_json`` (thecannon's
        ``[[[label_index, power], ...], ...]``, constant implicit and first), ``label_names``,
        ``dispersion`` (P,), and ``fiducials``/``scales`` or ``training_set_labels`` (from which
        thecannon's defaults, median and the 2.5-97.5 percentile range, are recomputed). thecannon
        predicts ``theta @ v((x - fiducials) / scales)``, which is exactly this model with
        pivots = fiducials.

        The wavelength medium is taken from a ``wavevac`` or ``wavelength_medium`` array when present;
        otherwise models converted from thedoppler (its note says so) are air (thedoppler's Cannon grids
        are written with ``wavevac = False``), and anything else is assumed vacuum.
        """
        files = set(data.files)
        names = tuple(str(s) for s in data["label_names"])
        vec = PolynomialVectorizer.from_terms(str(data["vectorizer_terms_json"]), names)
        theta = np.asarray(data["theta"], dtype=np.float64)
        s2 = np.asarray(data["s2"], dtype=np.float64)
        training = np.asarray(data["training_set_labels"], dtype=np.float64) if "training_set_labels" in files else None
        if "fiducials" in files and "scales" in files:
            fiducials, scales = np.asarray(data["fiducials"], float), np.asarray(data["scales"], float)
        elif training is not None:
            fiducials = np.median(training, axis=0)
            scales = np.ptp(np.percentile(training, THECANNON_SCALE_PERCENTILES, axis=0), axis=0)
        else:
            raise FileFormatError(f"{path}: thecannon model without fiducials/scales or training_set_labels")
        if training is not None:
            lo, hi = training.min(axis=0), training.max(axis=0)
            default_scales = np.ptp(np.percentile(training, THECANNON_SCALE_PERCENTILES, axis=0), axis=0)
            if not (np.allclose(fiducials, np.median(training, axis=0)) and np.allclose(scales, default_scales)):
                log.warning("%s: fiducials/scales differ from thecannon's defaults on its training labels", path)
        else:
            lo, hi = fiducials - 0.5 * np.abs(scales), fiducials + 0.5 * np.abs(scales)
        if "wavevac" in files:
            medium = "vacuum" if bool(data["wavevac"]) else "air"
        elif "wavelength_medium" in files:
            medium = str(data["wavelength_medium"])
        elif "note" in files and "thedoppler" in str(data["note"]):
            medium = "air"
        else:
            medium = "vacuum"
        wl = np.asarray(data["dispersion"], dtype=np.float64) if "dispersion" in files else None
        meta = {"source_file": str(path), "source_format": "thecannon_npz", "wavelength_medium_source":
                "file" if {"wavevac", "wavelength_medium"} & files else "assumed"}
        if "note" in files:
            meta["source_note"] = str(data["note"])
        model = cls(vec.terms(), pivots=fiducials, scales=scales)
        model._set_state(LabelSpace(names, lo, hi), wl, medium, meta, vec, fiducials, scales, theta, s2)
        model.converged_ = None
        model.n_iter_ = None
        model.censor_mask_ = None
        return model

    def __repr__(self) -> str:
        if not self.is_fitted:
            return f"CannonModel(vectorizer={self.vectorizer!r}, unfitted)"
        return (f"CannonModel({self.n_labels} labels, {self.vectorizer_.n_terms} terms, {self.n_pixels} pixels, "
                f"{np.dtype(self.dtype).name}, labels={list(self.label_names)})")


def _register():
    from .formats import register_emulator_kind

    register_emulator_kind("cannon", CannonModel)


_register()
