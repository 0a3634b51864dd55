"""Two optimisers on one forward model.

* :func:`batched_levenberg_marquardt`: many spectra at once. Each iteration evaluates the model and its
  analytic Jacobian for the stars still active (one emulator call for all of them), forms the profiled
  normal equations, and takes a Levenberg-Marquardt step (Marquardt's diagonal scaling) per star. Bounds
  are respected by a projected step: coordinates at a bound whose gradient points outwards are held,
  the others solved for, and the trial point clipped to the box. A star stops when its Gauss-Newton
  decrement ``g^T H^-1 g`` (about twice the chi2 still to gain) is below ``chi2_tolerance``, or when an
  accepted step gains less than that, or after ``lm_max_rejections`` rejected steps in a row (a minimum
  at a kink of a leaky-ReLU network, where the quadratic model keeps promising a gain); it leaves the
  active set. Damping follows Nielsen (1999): after an accepted step it shrinks by how well the
  quadratic model predicted the gain, after a rejected one it grows by ``lm_factor``, doubling each time.
  With many parameters (``lm_trial_min_params``) each step tries several dampings
  (``lm_trial_dampings`` times the current one) by chi2 alone, which costs ~1/(F+1) of a Jacobian
  evaluation each, and evaluates the Jacobian only at the best of them (which then sets the damping);
  on a leaky-ReLU network, whose chi2 surface is piecewise quadratic, this shortens the slow crawl
  across kinks that one damping at a time makes. With numpy and a two-hidden-layer leaky-ReLU Payne
  network each star's Jacobian is kept between steps and updated for the hidden units that changed side
  (``incremental_jacobian``, :class:`paynekit.emulators.payne.JacobianCache`; exact up to rounding).
  With such a network and the trial dampings on, one more trial lands on the kinks the star crossed in its
  last step (``lm_kink_steps``, :class:`_KinkPlanes`), which ends the zigzag across a kink at a minimum.
  Where the network, the data and the fit allow it (``lm_hidden_curvature``, no LSF, one log-uniform
  grid; :class:`~paynekit.fitting.hidden_space.HiddenSpaceEvaluator`),
  the steps take chi2 and gradient exactly but the curvature from a Gram matrix in the network's last hidden
  layer, without forming the pixels' Jacobian; the exact curvature is evaluated once where the fits ended.
  There (``lm_predicted_trials``) the trials are ranked by the chi2 the evaluator predicts from the last
  hidden layer alone (exact through the network's kinks, approximate only in the Gram matrix), and only
  the best of them gets its model flux and true chi2, the next one by prediction where that one does not
  lower chi2 (:func:`_check_predicted`): every accepted step still lowers the true chi2. Predicted trials
  being cheap, the best one's step is also tried shortened (``lm_backtracking``), which replaces the
  kink steps there (``lm_kink_steps=None``).
  A star still descending after ``max_iterations`` is a failure if its decrement exceeds
  :data:`NONCONVERGED_DECREMENT`. Works with numpy or torch (CPU/CUDA) arrays; the per-star linear algebra is float64.
* :func:`scipy_reference`: one spectrum at a time with ``scipy.optimize.curve_fit(method="trf")``, the
  labels bounded in scaled space, as The Payne and SDSS Astra do, with our analytic (variable-projection)
  Jacobian. It is the reference the batched optimiser is tested against.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from ..instrument import _is_torch
from .forward import ForwardModel, fit_equations, model_spectra, solve_continuum, to_numpy
from .uncertainties import invert_curvature

log = logging.getLogger(__name__)

#: Levenberg-Marquardt damping limits; a star whose damping exceeds the maximum has stalled.
LM_MIN_DAMPING = 1e-6
LM_MAX_DAMPING = 1e10
#: After a rejected step the damping is at least this: Marquardt damping well below 1 barely changes
#: the step, and a rejected Gauss-Newton step near a leaky-ReLU kink needs a shorter one.
LM_REJECTION_FLOOR = 1.0
#: A stopped fit that could still gain more chi2 than this (Gauss-Newton decrement) is a failure.
NONCONVERGED_DECREMENT = 1.0
#: Distance (parameter units) from a bound inside which a coordinate counts as being at it.
BOUND_EPSILON = 1e-10
#: Relative ridge on the per-star normal matrices.
NORMAL_RIDGE = 1e-12
#: Iterations of the optional float64 polish.
POLISH_ITERATIONS = 5


@dataclass
class OptimizeResult:
    """Per-star results of an optimiser (numpy, n rows)."""

    theta: np.ndarray  # (n, F) best parameters (scaled labels, then v)
    chi2: np.ndarray  # data chi2
    objective: np.ndarray  # chi2 + prior penalty
    cov: np.ndarray  # (n, F, F) formal covariance in parameter units
    n_iter: np.ndarray
    converged: np.ndarray
    failure: list  # str per star ("" = fine)
    model: np.ndarray  # (n, P) best-fit model (with continuum)
    continuum: np.ndarray | None  # (n, P) or None


def _solve_small(h, g):
    """Solve (n, F, F) x = (n, F) with a tiny ridge; rows that fail come back as zeros."""
    n, f, _ = h.shape
    if f == 0:
        return np.zeros((n, 0))
    diag = np.abs(np.diagonal(h, axis1=1, axis2=2))
    scale = np.max(diag, axis=1)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    hr = h + (NORMAL_RIDGE * scale)[:, None, None] * np.eye(f)
    good = np.all(np.isfinite(hr.reshape(n, -1)), axis=1) & np.all(np.isfinite(g), axis=1)
    out = np.zeros((n, f))
    if not np.any(good):
        return out
    try:
        out[good] = np.linalg.solve(hr[good], g[good][..., None])[..., 0]
    except np.linalg.LinAlgError:
        for i in np.flatnonzero(good):
            out[i] = np.linalg.lstsq(hr[i], g[i], rcond=None)[0]
    return out


def _restrict(h, g, free):
    """Normal equations with the non-free coordinates held (identity rows, zero gradient)."""
    ff = free[:, :, None] & free[:, None, :]
    hf = np.where(ff, h, 0.0)
    idx = np.arange(h.shape[1])
    hf[:, idx, idx] = np.where(free, hf[:, idx, idx], 1.0)
    return hf, np.where(free, g, 0.0)


def _free_set(theta, g, lower, upper):
    at_lo = (theta <= lower + BOUND_EPSILON) & (g < 0)
    at_hi = (theta >= upper - BOUND_EPSILON) & (g > 0)
    return ~(at_lo | at_hi)


def decrement(h, g, theta, lower, upper) -> np.ndarray:
    """Gauss-Newton decrement g^T H^-1 g on the free (not bound-blocked) coordinates."""
    free = _free_set(theta, g, lower, upper)
    hf, gf = _restrict(h, g, free)
    return np.sum(gf * _solve_small(hf, gf), axis=1)


class _Evaluator:
    """chi2, curvature and gradient (priors included) of chosen stars of a chunk."""

    def __init__(self, fm: ForwardModel, emulator_eval, data, weights, incremental_jacobian=False):
        self.fm = fm
        self.ev = emulator_eval
        self.data = emulator_eval.to_backend(data)
        self.weights = emulator_eval.to_backend(weights)
        self.n = data.shape[0]
        self.cache = emulator_eval.jacobian_cache(self.n) if incremental_jacobian else None

    def __call__(self, theta, rows, jacobian=True):
        if rows.size == self.n and np.array_equal(rows, np.arange(self.n)):
            d, w = self.data, self.weights
        else:
            sel = _torch_index(rows, self.data) if _is_torch(self.data) else rows
            d, w = self.data[sel], self.weights[sel]
        ne = fit_equations(self.fm, self.ev, theta, d, w, jacobian=jacobian, cache=self.cache, rows=rows)
        pc, ph, pg = self.fm.prior_terms(theta)
        obj = ne.chi2 + pc
        if not jacobian:
            return obj, ne.chi2, None, None, ne
        h = ne.H + ph[:, :, None] * np.eye(ph.shape[1])[None]
        g = ne.g + pg
        ok = (
            np.isfinite(obj)
            & np.all(np.isfinite(h.reshape(h.shape[0], -1)), axis=1)
            & np.all(np.isfinite(g), axis=1)
        )
        return np.where(ok, obj, np.inf), ne.chi2, h, g, ne


#: Kink steps: the penalty that holds a trial step on a crossed hyperplane, relative to the curvature.
KINK_PENALTY = 1e6
#: ... and a star within this distance (scaled labels) of a first-layer kink counts as on it.
KINK_ON_PLANE = 1e-5


class _KinkPlanes:
    """Trial steps that end on the kinks of a two-hidden-layer leaky-ReLU network that a star crossed in
    its last accepted step.

    The chi2 of such a network is piecewise quadratic in the labels, and near a minimum that lies on a
    kink (a hidden unit's pre-activation z = 0) a damped Gauss-Newton step overshoots to the other side,
    and the next one back: the fit zigzags across the kink for many steps. Each crossed unit is a
    hyperplane in label space, ``z + n . d = 0`` for a step d (exact for the first layer, whose z is linear
    in the labels; to first order for the second). This step minimises the damped quadratic model plus
    ``KINK_PENALTY`` times the curvature scale on those hyperplanes, i.e. it lands on the crossed kinks
    and moves along them. It is one more trial for the optimiser, kept only when its chi2 is the lowest
    and gains at least the tolerance.
    """

    def __init__(self, mlp, fm: ForwardModel):
        self.w0 = np.asarray(mlp.weights[0], dtype=np.float64)
        self.b0 = np.asarray(mlp.biases[0], dtype=np.float64)
        self.w1 = np.asarray(mlp.weights[1], dtype=np.float64)
        self.b1 = np.asarray(mlp.biases[1], dtype=np.float64)
        self.w0_norm = np.linalg.norm(self.w0, axis=1)
        self.fm = fm

    @classmethod
    def for_evaluator(cls, emulator_eval, fm: ForwardModel):
        from ..emulators.payne import JacobianCache

        emulator = getattr(emulator_eval, "emulator", None)
        return cls(emulator, fm) if JacobianCache.supports(emulator) else None

    def _pre_activations(self, x):
        from ..emulators.payne import activate

        z1 = x @ self.w0.T + self.b0
        a1, d1 = activate(z1, "leaky_relu", derivative=True)
        return z1, d1, a1 @ self.w1.T + self.b1

    def steps(self, theta, previous, has_previous, h_damped, g, free, lower, upper):
        """Steps (m, F) to the kinks crossed between ``previous`` and ``theta`` (zeros where none was
        crossed, or too many: far from a minimum) and a mask of the stars that have one."""
        m, f = theta.shape
        out = np.zeros((m, f))
        fm = self.fm
        z1, d1, z2 = self._pre_activations(fm.full_scaled(theta))
        p1, _, p2 = self._pre_activations(fm.full_scaled(previous))
        c1 = ((z1 > 0) != (p1 > 0)) & has_previous[:, None]
        c2 = ((z2 > 0) != (p2 > 0)) & has_previous[:, None]
        # a first-layer kink the star already sits on (a kink step's landing point) stays held
        c1 |= (np.abs(z1) < KINK_ON_PLANE * self.w0_norm) & has_previous[:, None]
        k = c1.sum(axis=1) + c2.sum(axis=1)
        rows = np.flatnonzero((k > 0) & (2 * k < f))
        if rows.size == 0:
            return out, np.zeros(m, dtype=bool)
        c1, c2, z1, z2, d1 = c1[rows], c2[rows], z1[rows], z2[rows], d1[rows]
        parts_n, parts_z, parts_ok = [], [], []
        for crossed, z, layer in ((c1, z1, 0), (c2, z2, 1)):
            width = int(crossed.sum(axis=1).max())
            if width == 0:
                continue
            units = np.argsort(~crossed, axis=1, kind="stable")[:, :width]  # crossed units first
            parts_ok.append(np.take_along_axis(crossed, units, axis=1))
            parts_z.append(np.take_along_axis(z, units, axis=1))
            if layer == 0:
                parts_n.append(self.w0[units])  # (r, width, L)
            else:
                parts_n.append((self.w1[units] * d1[:, None, :]) @ self.w0)
        normal_x = np.concatenate(parts_n, axis=1)
        zz = np.concatenate(parts_z, axis=1)
        ok = np.concatenate(parts_ok, axis=1)
        normal = np.zeros(normal_x.shape[:2] + (f,))
        normal[..., : fm.free.size] = normal_x[..., fm.free]
        normal *= free[rows][:, None, :]  # coordinates held at a bound stay held
        nn = np.sum(normal * normal, axis=2)
        ok &= nn > 0
        hb = h_damped[rows]
        scale = np.mean(np.abs(np.diagonal(hb, axis1=1, axis2=2)), axis=1)
        mu = np.where(ok, KINK_PENALTY * scale[:, None] / np.where(ok, nn, 1.0), 0.0)
        h = hb + np.einsum("rk,rki,rkj->rij", mu, normal, normal)
        rhs = g[rows] - np.einsum("rk,rki,rk->ri", mu, normal, zz)
        th = theta[rows]
        out[rows] = np.clip(th + _solve_small(h, rhs), lower[rows], upper[rows]) - th
        has = np.zeros(m, dtype=bool)
        has[rows] = np.any(ok, axis=1)
        return out, has


def _check_predicted(evaluate, theta, rows, steps, predicted, current):
    """Pick each star's trial step by predicted objective and confirm it with the true one.

    ``steps`` (T, m, F) and their predicted objectives (T, m); the trials are tried in order of prediction
    while the prediction still promises a gain, the true objective of one per star at a time (chi2 only;
    the evaluator keeps the flux for the Jacobian evaluation). Returns the index of the first trial that
    truly does not raise the objective, and whether there was one."""
    n_trials, m = predicted.shape
    order = np.argsort(predicted, axis=0, kind="stable")
    pick = order[0].copy()
    go = np.zeros(m, dtype=bool)
    pending = np.arange(m)
    for r in range(n_trials):
        cand = order[r, pending]
        hopeful = predicted[cand, pending] <= current[pending]
        pending, cand = pending[hopeful], cand[hopeful]
        if pending.size == 0:
            break
        true_obj = evaluate(theta[pending] + steps[cand, pending], rows[pending], jacobian=False)[0]
        ok = true_obj <= current[pending]
        pick[pending[ok]] = cand[ok]
        go[pending[ok]] = True
        pending = pending[~ok]
    return pick, go


def _torch_index(rows, like):
    import torch

    return torch.as_tensor(rows, dtype=torch.long, device=like.device)


def _cheap_trials(n_params: int, config) -> bool:
    return n_params >= config.lm_trial_min_params and len(config.lm_trial_dampings) > 1


def uses_hidden_curvature(fm: ForwardModel, emulator_eval, config) -> bool:
    """Whether :func:`batched_levenberg_marquardt` takes the hidden-layer path for this fit (many labels,
    several trial dampings, ``config.lm_hidden_curvature``, and what
    :meth:`~paynekit.fitting.hidden_space.HiddenSpaceEvaluator.supports` needs)."""
    if not (_cheap_trials(fm.n_params, config) and config.lm_hidden_curvature):
        return False
    from .hidden_space import HiddenSpaceEvaluator

    return HiddenSpaceEvaluator.supports(fm, emulator_eval)


def batched_levenberg_marquardt(
    fm: ForwardModel,
    emulator_eval,
    data,
    weights,
    theta0,
    lower,
    upper,
    config,
    max_iterations: int | None = None,
    exact_block: int | None = None,
) -> OptimizeResult:
    """Fit all rows of ``data``/``weights`` (n, P) from starts ``theta0`` (n, F) within [lower, upper].

    ``exact_block``: on the hidden-layer path (:func:`uses_hidden_curvature`), the exact evaluation where
    the fits ended goes through blocks of at most this many stars (its Jacobian is the largest array)."""
    max_iterations = config.max_iterations if max_iterations is None else max_iterations
    n, f = theta0.shape
    factors = np.asarray(config.lm_trial_dampings, dtype=np.float64)
    cheap_trials = _cheap_trials(f, config)
    p = data.shape[1]
    hidden = None
    if uses_hidden_curvature(fm, emulator_eval, config):
        from .hidden_space import HiddenSpaceEvaluator

        hidden = HiddenSpaceEvaluator(fm, emulator_eval.emulator, data, weights)
    exact = _Evaluator(fm, emulator_eval, data, weights, config.incremental_jacobian and hidden is None)
    evaluate = exact if hidden is None else hidden
    predicted_trials = hidden is not None and config.lm_predicted_trials
    if predicted_trials:
        trial_objective = hidden.predict  # choose among the trials by prediction, then check the choice
    else:
        def trial_objective(trial, rows):
            return evaluate(trial, rows, jacobian=False)[0]
    theta = np.clip(np.asarray(theta0, dtype=np.float64), lower, upper)
    rows_all = np.arange(n)
    obj, chi2, h, g, ne = evaluate(theta, rows_all)
    model = np.array(to_numpy(ne.model), dtype=np.float64)
    cont = np.array(to_numpy(ne.continuum), dtype=np.float64) if ne.continuum is not None else None
    failure = ["" if np.isfinite(o) else "the model is not finite at the start" for o in obj]
    active = np.isfinite(obj)
    lam = np.full(n, float(config.lm_damping))
    nu = np.full(n, float(config.lm_factor))
    n_iter = np.ones(n, dtype=np.int64)
    converged = np.zeros(n, dtype=bool)
    rejections = np.zeros(n, dtype=np.int64)
    backtracking = np.asarray(config.lm_backtracking if predicted_trials else (), dtype=np.float64)
    kink_steps = config.lm_kink_steps if config.lm_kink_steps is not None else backtracking.size == 0
    kinks = _KinkPlanes.for_evaluator(emulator_eval, fm) if cheap_trials and kink_steps else None
    previous = theta.copy()  # where each star's last accepted step started
    has_previous = np.zeros(n, dtype=bool)
    for _ in range(max_iterations):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        th, lo, hi = theta[idx], lower[idx], upper[idx]
        free = _free_set(th, g[idx], lo, hi)
        hf, gf = _restrict(h[idx], g[idx], free)
        dec = np.sum(gf * _solve_small(hf, gf), axis=1)
        done = dec < config.chi2_tolerance
        converged[idx[done]] = True
        active[idx[done]] = False
        keep = ~done
        idx, th, lo, hi, hf, gf = idx[keep], th[keep], lo[keep], hi[keep], hf[keep], gf[keep]
        free = free[keep]
        if idx.size == 0:
            break
        diag = np.diagonal(hf, axis1=1, axis2=2)
        m = idx.size
        steps = []
        for fac in factors if cheap_trials else (1.0,):
            hd = hf + ((fac * lam[idx])[:, None] * diag)[:, :, None] * np.eye(f)[None]
            steps.append(np.clip(th + _solve_small(hd, gf), lo, hi) - th)
        if cheap_trials:
            # the objective (flux only) at every trial damping, then the Jacobian at the best one only
            all_trials = np.concatenate([th + st for st in steps])
            t_obj_all = trial_objective(all_trials, np.tile(idx, factors.size))
            t_obj_all = t_obj_all.reshape(factors.size, m)
            chosen_all = factors
            if kinks is not None:
                h1 = hf + (lam[idx][:, None] * diag)[:, :, None] * np.eye(f)[None]
                k_step, k_has = kinks.steps(th, previous[idx], has_previous[idx], h1, gf, free, lo, hi)
                k_obj = np.full(m, np.inf)
                if np.any(k_has):
                    k_obj[k_has] = trial_objective(th[k_has] + k_step[k_has], idx[k_has])
                # a kink step must gain: one that does not would end the fit where the crawl could go on
                k_obj = np.where(obj[idx] - k_obj >= config.chi2_tolerance, k_obj, np.inf)
                steps.append(k_step)
                t_obj_all = np.concatenate([t_obj_all, k_obj[None]])
                chosen_all = np.append(factors, 1.0)
            t_obj_all = np.where(np.isfinite(t_obj_all), t_obj_all, np.inf)
            steps = np.stack(steps)
            if backtracking.size:
                # the best trial's step, shortened (predicted, so ~free): a step that crossed kinks
                # overshoots along a good direction, where more damping would also turn it
                direction = steps[np.argmin(t_obj_all, axis=0), np.arange(m)]
                shorter = np.clip(th + backtracking[:, None, None] * direction, lo, hi) - th
                s_obj = trial_objective((th + shorter).reshape(-1, f), np.tile(idx, backtracking.size))
                steps = np.concatenate([steps, shorter])
                t_obj_all = np.concatenate([t_obj_all, s_obj.reshape(backtracking.size, m)])
                chosen_all = np.append(chosen_all, np.ones(backtracking.size))
            if predicted_trials:
                pick, go = _check_predicted(evaluate, th, idx, steps, t_obj_all, obj[idx])
            else:
                pick = np.argmin(t_obj_all, axis=0)
                best_obj = t_obj_all[pick, np.arange(m)]
                go = np.isfinite(best_obj) & (best_obj <= obj[idx])
            step = steps[pick, np.arange(m)]
            chosen = chosen_all[pick]
        else:
            step = steps[0]
            chosen = np.ones(m)
            go = np.ones(m, dtype=bool)
        trial = th + step
        # chi2(theta + d) ~ chi2 - 2 g.d + d^T H d: the reduction the quadratic model predicts
        predicted = 2.0 * np.sum(gf * step, axis=1) - np.einsum("ni,nij,nj->n", step, hf, step)
        t_obj = np.full(m, np.inf)
        t_chi2 = np.full(m, np.inf)
        t_h = np.zeros((m, f, f))
        t_g = np.zeros((m, f))
        t_model = None
        sub = np.flatnonzero(go)
        if sub.size:
            o_, c_, h_, g_, ne_ = evaluate(trial[sub], idx[sub])
            t_obj[sub], t_chi2[sub], t_h[sub], t_g[sub] = o_, c_, h_, g_
            t_model = (sub, ne_)
        n_iter[idx] += 1
        better = np.isfinite(t_obj) & (t_obj <= obj[idx])
        gain = np.where(better, obj[idx] - t_obj, 0.0)
        acc = idx[better]
        previous[acc] = theta[acc]
        has_previous[acc] = True
        theta[acc] = trial[better]
        obj[acc], chi2[acc], h[acc], g[acc] = t_obj[better], t_chi2[better], t_h[better], t_g[better]
        if acc.size:
            sub, ne_ = t_model
            pos = np.flatnonzero(better[sub])
            model[acc] = to_numpy(ne_.model)[pos]
            if cont is not None:
                cont[acc] = to_numpy(ne_.continuum)[pos]
        lam[acc] = lam[acc] * chosen[better]
        # Nielsen's damping update: shrink by how well the quadratic model predicted the gain
        rho = np.where(
            predicted[better] > 0, gain[better] / np.where(predicted[better] > 0, predicted[better], 1), 0
        )
        lam[acc] = np.maximum(lam[acc] * np.maximum(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), LM_MIN_DAMPING)
        nu[acc] = config.lm_factor
        rejections[acc] = 0
        # a step that gained less than the tolerance ends the fit: near a minimum of a piecewise-smooth
        # network (leaky ReLU) the quadratic model overstates what is left, and more steps only crawl
        small = idx[better & (gain < config.chi2_tolerance)]
        converged[small] = True
        active[small] = False
        rej = idx[~better]
        lam[rej] = np.maximum(lam[rej] * nu[rej], LM_REJECTION_FLOOR)
        nu[rej] *= 2.0
        rejections[rej] += 1
        # no step along the damped path helps: a minimum at a kink of the network (not a failure)
        active[rej[(lam[rej] > LM_MAX_DAMPING) | (rejections[rej] > config.lm_max_rejections)]] = False
    if hidden is not None:
        # the steps used an approximate curvature: the exact one (and chi2, model) where the fits ended
        fin = np.flatnonzero(np.isfinite(obj))
        block = max(1, exact_block or fin.size)
        for b0 in range(0, fin.size, block):
            sel = fin[b0 : b0 + block]
            obj[sel], chi2[sel], h[sel], g[sel], ne_ = exact(theta[sel], sel)
            model[sel] = to_numpy(ne_.model)
            if cont is not None:
                cont[sel] = to_numpy(ne_.continuum)
    # stars still descending when the iterations ran out: a failure if they are far from the minimum
    for i in np.flatnonzero(active & np.isfinite(obj)):
        d = decrement(h[i : i + 1], g[i : i + 1], theta[i : i + 1], lower[i : i + 1], upper[i : i + 1])[0]
        if d > NONCONVERGED_DECREMENT:
            failure[i] = f"not converged after {n_iter[i]} evaluations (chi2 could still drop by {d:.3g})"
    cov, ok = invert_curvature(h)
    for i in np.flatnonzero(~ok & np.isfinite(obj)):
        if not failure[i]:
            failure[i] = "singular curvature matrix: a free label has no measurable effect on the spectrum"
    if p != model.shape[1]:  # pragma: no cover - defensive
        raise RuntimeError("model has the wrong number of pixels")
    return OptimizeResult(theta, chi2, obj, cov, n_iter, converged, failure, model, cont)


# ------------------------------------------------------------------------------------------------
# scipy reference
# ------------------------------------------------------------------------------------------------
def _kaufman_jacobian(fm, vals, data, weights):
    """Model, continuum and the variable-projection model Jacobian (F, P) for one star (numpy float64)."""
    flux = vals[:, 0, :]
    jac = vals[0, 1:, :]
    if fm.continuum is None:
        return flux[0], None, jac
    cont, _, grams = solve_continuum(fm.continuum, flux, data[None], weights[None])
    cont = cont[0]
    jhat = jac * cont[None, :]
    out = jhat.copy()
    for sl, basis, gram in zip(fm.continuum.slices, fm.continuum.bases, grams):
        a = flux[0, sl, None] * basis  # (P_r, D)
        m = a.T @ (weights[sl, None] * jhat[:, sl].T)  # (D, F)
        g = gram[0] + np.eye(gram.shape[-1]) * max(np.trace(gram[0]) * 1e-12, 1e-300)
        out[:, sl] = jhat[:, sl] - (a @ np.linalg.solve(g, m)).T
    return flux[0] * cont, cont, out


def scipy_reference(
    fm: ForwardModel, emulator_eval, data, weights, theta0, lower, upper, config
) -> OptimizeResult:
    """Fit each row with ``scipy.optimize.curve_fit(method="trf")`` (one spectrum at a time)."""
    from scipy.optimize import OptimizeWarning, curve_fit

    n, f = theta0.shape
    p = data.shape[1]
    theta = np.full((n, f), np.nan)
    chi2 = np.full(n, np.nan)
    obj = np.full(n, np.nan)
    cov = np.full((n, f, f), np.nan)
    n_iter = np.zeros(n, dtype=np.int64)
    converged = np.zeros(n, dtype=bool)
    failure = [""] * n
    model = np.full((n, p), np.nan)
    cont = np.full((n, p), np.nan) if fm.continuum is not None else None
    n_prior = fm.prior_index.size
    for i in range(n):
        d, w = data[i], weights[i]
        good = np.flatnonzero(w > 0)
        cache = {}

        def compute(params, d=d, w=w, good=good, cache=cache):
            key = np.asarray(params, dtype=np.float64).tobytes()
            if key not in cache:
                cache.clear()
                th = np.asarray(params, dtype=np.float64)[None]
                vals = to_numpy(model_spectra(fm, emulator_eval, th, jacobian=True)).astype(np.float64)
                m, c, j = _kaufman_jacobian(fm, vals, d, w)
                cache[key] = (m, c, j)
            return cache[key]

        def func(_x, *params, good=good):
            m, _, _ = compute(params)
            out = m[good]
            if n_prior:
                th = np.asarray(params)
                out = np.concatenate([out, (th[fm.prior_index] - fm.prior_mean) / fm.prior_sigma])
            return out

        def jacobian(_x, *params, good=good):
            _, _, j = compute(params)
            out = j[:, good].T
            if n_prior:
                jp = np.zeros((n_prior, f))
                jp[np.arange(n_prior), fm.prior_index] = 1.0 / fm.prior_sigma
                out = np.concatenate([out, jp])
            return out

        ydata = np.concatenate([d[good], np.zeros(n_prior)])
        sigma = np.concatenate([1.0 / np.sqrt(w[good]), np.ones(n_prior)])
        p0 = np.clip(theta0[i], lower[i], upper[i])
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", OptimizeWarning)
                popt, pcov, info, _msg, ier = curve_fit(
                    func,
                    np.arange(ydata.size),
                    ydata,
                    p0=p0,
                    sigma=sigma,
                    absolute_sigma=True,
                    bounds=(lower[i], upper[i]),
                    method="trf",
                    jac=jacobian,
                    ftol=config.scipy_tolerance,
                    xtol=config.scipy_tolerance,
                    gtol=config.scipy_tolerance,
                    max_nfev=config.scipy_max_nfev,
                    full_output=True,
                )
            for wmsg in caught:
                log.debug("spectrum %d: %s", i, wmsg.message)
        except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
            failure[i] = f"scipy curve_fit failed: {exc}"
            continue
        m, c, _ = compute(popt)
        r = d[good] - m[good]
        theta[i] = popt
        chi2[i] = float(np.sum(w[good] * r * r))
        pen = fm.prior_terms(popt[None])[0][0]
        obj[i] = chi2[i] + pen
        cov[i] = pcov
        n_iter[i] = int(info.get("nfev", 0))
        converged[i] = ier in (1, 2, 3, 4)
        model[i] = m
        if cont is not None:
            cont[i] = c
        if not np.all(np.isfinite(pcov)):
            failure[i] = "singular curvature matrix: a free label has no measurable effect on the spectrum"
    return OptimizeResult(theta, chi2, obj, cov, n_iter, converged, failure, model, cont)
