"""Levenberg-Marquardt steps through the last hidden layer of a Payne network (the 25-label fast path).

For a two-hidden-layer leaky-ReLU :class:`~paynekit.emulators.PayneMLP` the model of a star is
``m = S_v (W h + b)``: h the last hidden layer (H values), W (P x H) the output weights, S_v the Doppler
shift. Its Jacobian with respect to the labels is ``S_v W M`` with ``M = D_2 W_1 D_1 W_0`` (H x L), so

* chi2 and the gradient ``g = M^T W^T S_v^T (w r)`` need one product with W each way, never the
  (L x P) Jacobian of the pixels (exact, like :func:`~paynekit.fitting.forward.fit_equations`);
* the curvature ``M^T (W^T S_v^T diag(w) S_v W) M`` is approximated with a Gram matrix in hidden-layer
  space computed once per star, at the star's velocity when it is first evaluated: exact for the
  rank-:data:`HIDDEN_RANK` singular-value part of W (``W ~ U_k S_k V_k^T``, shifted: ``(S_v U_k)^T
  diag(w) (S_v U_k)``), the rest of W weighted by the star's mean weight and not shifted.

With a fitted continuum c (solved exactly for each trial's labels, as the exact path does) the model is
``c * S_v (W h + b)``: the gradient goes back through c first, the Gram matrix weights the pixels by
``w c^2`` (c of the first evaluation), and the continuum's share of the curvature (the Schur complement
of its coefficients, the variable projection of :func:`~paynekit.fitting.forward.normal_equations`) is
subtracted with the same kept singular vectors.

The optimiser's trial steps are ranked without the output layer (:meth:`HiddenSpaceEvaluator.predict`):
chi2 is a quadratic in h about the star's last Jacobian evaluation, ``chi2 - 2 dh.W^T S^T (w r) +
dh^T G dh``, with the velocity to second order and the continuum profiled out, and h(trial) is exact, kinks
included; on 25-label APOGEE mocks it is within 0.25 % of the true gain for the median trial.

That is a Levenberg-Marquardt method with exact chi2 and gradient and an approximate Gauss-Newton
curvature: it accepts only steps that lower the true chi2 and stops where the true gradient vanishes,
as the exact one does, at ~3x less arithmetic per step for 25 labels x 8575 pixels (no (L x P)
Jacobian to update, shift and multiply). The optimiser evaluates the exact curvature once at the end
for the formal covariance (:func:`paynekit.fitting.optimizers.batched_levenberg_marquardt`).

Used when the network, the data and the fit allow it (:meth:`HiddenSpaceEvaluator.supports`): numpy, a
two-hidden-layer leaky-ReLU PayneMLP, no LSF, model and data on one log-uniform grid
(the Doppler shift is then a per-star shift with cubic weights, whose transpose is a compiled kernel).
"""

from __future__ import annotations

import numpy as np

from .._kernels import (
    continuum_rows,
    doppler_rows_transpose,
    hidden_flip_updates,
    numba_enabled,
    residual_rows,
)
from ..emulators.payne import activate
from ..instrument import SPEED_OF_LIGHT_KMS
from .forward import CONTINUUM_RIDGE, NormalEquations, _ridge, _solve

#: Singular values of the output weights kept exactly in the per-star curvature Gram matrix; the rest
#: gets the star's mean weight. 100 of 300 on the 25-label APOGEE network (the 100th is 4 % of the
#: first): ~2 ms per star for the Gram matrix instead of ~12 for all 300 (docs/design.md).
HIDDEN_RANK = 100

#: The projected Jacobian ``(S V^T) M`` of a star is updated from its last evaluation when at most this many
#: first-layer units changed side (each costs ~1/40 of making it anew; the median step changes ~4) ...
MAX_FLIPS = 24
#: ... and made anew after this many updates in a row (float32 rounding does not build up).
MAX_UPDATES = 16


def _constants(mlp, rank: int) -> dict:
    """The network's float32 weights and biases, W^T, and the basis of the output weights ``W = U S V^T``:
    ``u_k`` (P, k) and ``sv_all_t`` = (S V^T)^T (H, H), whose first k columns give the kept part
    ``S_k V_k^T`` (``sv``, (k, H)) and the others the tail ``S_t V_t^T`` (``W^T W = V S^2 V^T``); the
    transposes W1^T and W^T. Made once per network and
    rank and kept with it (the SVD of an 8575 x 300 matrix takes ~0.3 s, the copies ~30 ms)."""

    def make():
        w = [np.asarray(a, dtype=np.float32) for a in mlp.weights]
        b = [np.asarray(a, dtype=np.float32) for a in mlp.biases]
        u, s, vt = np.linalg.svd(np.asarray(mlp.weights[-1], dtype=np.float64), full_matrices=False)
        u_k = np.ascontiguousarray(u[:, :rank], dtype=np.float32)
        sv_all_t = np.ascontiguousarray((s[:, None] * vt).T, dtype=np.float32)
        return dict(w=w, b=b, w1_t=np.ascontiguousarray(w[1].T), w2_t=np.ascontiguousarray(w[2].T), u_k=u_k,
                    sv_all_t=sv_all_t, sv=np.ascontiguousarray(sv_all_t[:, :rank].T),
                    u_k_channels=np.ascontiguousarray(u_k.T)[None])

    return mlp.derived(("hidden_space", rank), make)


class HiddenSpaceEvaluator:
    """chi2, gradient (exact) and curvature (approximate, see the module) of chosen stars of a chunk, with
    the interface of the optimiser's exact evaluator: ``(objective, chi2, H, g, NormalEquations)``."""

    def __init__(self, fm, mlp, data, weights, rank: int = HIDDEN_RANK):
        self.fm = fm
        k = int(min(rank, *mlp.weights[-1].shape))
        const = _constants(mlp, k)
        self.w0, self.w1, self.w2 = const["w"]
        self.b0, self.b1, self.b2 = const["b"]
        self.w1_t, self.w2_t = const["w1_t"], const["w2_t"]
        self.data = np.ascontiguousarray(data, dtype=np.float64)
        self.weights = np.ascontiguousarray(weights, dtype=np.float64)
        self.n = self.data.shape[0]
        self.u_k, self.sv_all_t = const["u_k"], const["sv_all_t"]
        self.sv = const["sv"]  # S_k V_k^T (k, H)
        self.rank = k
        self.has_tail = self.sv_all_t.shape[1] > k
        self._u_k_channels = const["u_k_channels"]  # (1, k, P) for the Doppler shift
        self.gram = np.zeros((self.n, k, k), dtype=np.float32)
        self.mean_weight = np.zeros(self.n)
        self.has_gram = np.zeros(self.n, dtype=bool)
        rs = fm.resampler
        self._shift = (rs.log_step, SPEED_OF_LIGHT_KMS, rs._seg_starts, rs._seg_stops)
        self._trials = []  # (flux, {(row, theta bytes): index}) of the chi2-only evaluations since a Jacobian
        # each star's expansion point for :meth:`predict`: its last Jacobian evaluation
        n_hidden = self.w2.shape[1]
        self._h_at = np.zeros((self.n, n_hidden), dtype=np.float32)  # last hidden layer
        self._g_at = np.zeros((self.n, n_hidden), dtype=np.float32)  # W^T S^T (w c r)
        self._q_at = np.zeros((self.n, n_hidden), dtype=np.float32)  # rank-k W^T S^T (w dm/dv)
        self._chi2_at = np.full(self.n, np.nan)
        self._v_at = np.zeros((self.n, 3))  # v, sum w r dm/dv, sum w (dm/dv)^2
        self._profile_at = None  # continuum: per region (coefficient columns (n, D, H), v column, A^-1)
        # each star's projected Jacobian at its last evaluation, for _projected_jacobian
        self._w0t_free = np.ascontiguousarray(self.w0.T[fm.free])  # (nl, H1)
        self._pt = self._b = self._d1 = self._d2 = None
        self._updates = np.full(self.n, -1)  # updates since it was made anew (-1: none yet)

    @staticmethod
    def supports(fm, emulator_eval) -> bool:
        """True when this evaluator applies (see the module docstring)."""
        from ..emulators.payne import JacobianCache

        return (
            getattr(emulator_eval, "backend", None) == "numpy"
            and JacobianCache.supports(getattr(emulator_eval, "emulator", None))
            and fm.lsf is None
            and fm.resampler.fast
            and numba_enabled()
        )

    def _transpose_shift(self, values, v):
        return doppler_rows_transpose(values, v, *self._shift)

    def _ensure_gram(self, rows, v, cont=None):
        need = ~self.has_gram[rows]
        if not np.any(need):
            return
        rr, first = np.unique(rows[need], return_index=True)
        pos = np.flatnonzero(need)[first]  # where each of those stars is in this call
        for i, j in zip(rr, pos):
            wi = self.weights[i] if cont is None else self.weights[i] * cont[j].astype(np.float64) ** 2
            a = self.fm.resampler.apply(self._u_k_channels, v[j : j + 1])[0]
            a *= np.sqrt(wi).astype(np.float32)  # a new array (the compiled shift), weighted in place
            self.gram[i] = a @ a.T
            self.mean_weight[i] = float(np.mean(wi))
        self.has_gram[rr] = True

    def _output_layer(self, a2, theta, rows, jacobian):
        """Flux on the model grid, ``a2 @ W^T + b``. The optimiser evaluates the Jacobian only at trials
        whose flux a chi2-only evaluation since the last Jacobian evaluation has computed: those rows are
        reused, not redone."""
        m = a2.shape[0]
        if not jacobian:
            flux = a2 @ self.w2_t + self.b2
            index = {(int(r), t.tobytes()): i for i, (r, t) in enumerate(zip(rows, theta))}
            self._trials.append((flux, index))
            return flux
        flux = np.empty((m, self.w2.shape[0]), dtype=np.float32)
        todo = np.ones(m, dtype=bool)
        for done, index in self._trials:
            found = np.array([index.get((int(r), t.tobytes()), -1) for r, t in zip(rows, theta)])
            found[~todo] = -1
            flux[found >= 0] = done[found[found >= 0]]
            todo &= found < 0
        if np.any(todo):
            flux[todo] = a2[todo] @ self.w2_t + self.b2
        self._trials = []
        return flux

    def _hidden(self, theta, derivative):
        x = self.fm.full_scaled(theta).astype(np.float32)
        a1, d1 = activate(x @ self.w0.T + self.b0, "leaky_relu", derivative=derivative)
        a2, d2 = activate(a1 @ self.w1.T + self.b1, "leaky_relu", derivative=derivative)
        return x, a1, d1, a2, d2

    def _projected_jacobian(self, rows, d1, d2):
        """``(S V^T) M`` (m, nl, H) for the free labels at activation slopes d1, d2 (m, H1), (m, H2).

        ``M = D2 W1 D1 W0f`` changes between two evaluations of a star only through the hidden units that
        changed side, a few per step near a minimum: each changed first-layer unit adds a rank-one term
        (one row of a matrix product for all stars, instead of two (nl x H) x (H x H) products per star),
        each changed second-layer unit another. Stars with more changes, or with MAX_UPDATES updates
        since, are made anew. Equal to making it anew to float32 rounding."""
        nl = self.fm.free.size
        if self._pt is None:
            self._pt = np.zeros((self.n, nl, self.sv_all_t.shape[1]), dtype=np.float32)
            self._b = np.zeros((self.n, nl, self.w1.shape[0]), dtype=np.float32)
            self._d1 = np.zeros((self.n, self.w0.shape[0]), dtype=np.float32)
            self._d2 = np.zeros((self.n, self.w1.shape[0]), dtype=np.float32)
        d1, d2 = d1.astype(np.float32, copy=False), d2.astype(np.float32, copy=False)
        flips1 = d1 != self._d1[rows]
        count = self._updates[rows]
        update = (count >= 0) & (count < MAX_UPDATES) & (flips1.sum(axis=1) <= MAX_FLIPS)
        if np.unique(rows).size < rows.size:  # a star twice in one call (not from the optimiser): made anew
            update[:] = False
        anew = np.flatnonzero(~update)
        if anew.size:
            r = rows[anew]
            t1 = self._w0t_free[None] * d1[anew][:, None, :]
            b = (t1.reshape(anew.size * nl, -1) @ self.w1.T).reshape(anew.size, nl, -1)
            self._b[r] = b
            self._pt[r] = ((b * d2[anew][:, None, :]).reshape(anew.size * nl, -1) @ self.sv_all_t).reshape(
                anew.size, nl, -1)
            self._updates[r] = 0
        up = np.flatnonzero(update)
        if up.size:
            r = rows[up]
            f1 = np.nonzero(flips1[up])
            f2 = np.nonzero(d2[up] != self._d2[r])
            delta1 = d1[up][f1] - self._d1[r][f1]
            delta2 = d2[up][f2] - self._d2[r][f2]
            r1 = (delta1[:, None] * self.w1_t[f1[1]] * d2[up][f1[0]]) @ self.sv_all_t
            hidden_flip_updates(self._pt, self._b, r, f2, delta2, self.sv_all_t, f1, delta1, r1,
                                self._w0t_free, self.w1_t)
            self._updates[r] += 1
        self._d1[rows], self._d2[rows] = d1, d2
        return self._pt[rows]

    def _gram_form(self, p, rows):
        """``p[j] . G[rows[j]] p[j]`` for points p (m, k) of stars ``rows``. The optimiser's trials come as
        T blocks of the same stars in the same order: then one (T, k) x (k, k) product per star, without
        gathering T copies of its Gram matrix."""
        m = rows.size
        t = int(np.count_nonzero(rows == rows[0]))
        stars = rows[: m // t]
        if t > 1 and m % t == 0 and np.array_equal(rows.reshape(t, -1), np.broadcast_to(stars, (t, m // t))):
            pb = p.reshape(t, stars.size, -1).transpose(1, 0, 2)  # (stars, T, k)
            return np.sum(np.matmul(pb, self.gram[stars]) * pb, axis=2).T.reshape(-1)
        return np.matmul(np.matmul(p[:, None, :], self.gram[rows]), p[:, :, None])[:, 0, 0]

    def predict(self, theta, rows):
        """The objective of trial points (m, F) of the stars ``rows``, predicted without the output layer.

        The model is linear in the last hidden layer h for a fixed velocity, so chi2 at a trial is a
        quadratic in ``dh = h(trial) - h(at)`` about each star's expansion point (its last Jacobian
        evaluation, which the optimiser makes only at the point it keeps): ``chi2 - 2 dh.W^T S^T (w r) +
        dh^T G dh``, with the Gram matrix G of the curvature, the velocity to second order and the fitted
        continuum profiled out as in the curvature. h(trial) is exact (the network's two hidden layers,
        kinks and all), so the prediction holds across kinks where the label-space quadratic does not;
        only G is approximate. ~1/10 of the cost of the model flux (no 8575 x 300 product)."""
        fm = self.fm
        rows = np.asarray(rows, dtype=np.int64)
        a2 = self._hidden(theta, False)[3]
        dh = a2 - self._h_at[rows]
        pt = dh @ self.sv_all_t  # (S V^T) dh: the kept singular directions, then the tail's
        p = pt[:, : self.rank]
        gram = self._gram_form(p, rows)
        chi2 = self._chi2_at[rows] - 2.0 * np.sum(dh * self._g_at[rows], axis=1, dtype=np.float64)
        chi2 += gram.astype(np.float64)
        if self.has_tail:
            chi2 += self.mean_weight[rows] * np.sum(pt[:, self.rank :] ** 2, axis=1, dtype=np.float64)
        dv = fm.velocities(theta) - self._v_at[rows, 0] if fm.fit_rv else None
        if dv is not None:
            cross = np.sum(dh * self._q_at[rows], axis=1, dtype=np.float64)
            chi2 += dv * (2.0 * cross - 2.0 * self._v_at[rows, 1] + dv * self._v_at[rows, 2])
        if self._profile_at is not None:  # re-solving the continuum gains this much back
            for cols, col_v, a_inv in self._profile_at:
                c = np.matmul(cols[rows], dh[:, :, None])[:, :, 0].astype(np.float64)
                if dv is not None:
                    c += dv[:, None] * col_v[rows]
                chi2 -= np.einsum("md,mde,me->m", c, a_inv[rows], c)
        obj = chi2 + fm.prior_terms(theta)[0]
        return np.where(np.isfinite(obj), obj, np.inf)

    def __call__(self, theta, rows, jacobian=True):
        fm = self.fm
        rows = np.asarray(rows, dtype=np.int64)
        x, a1, d1, a2, d2 = self._hidden(theta, True)
        flux = self._output_layer(a2, theta, rows, jacobian)
        v = fm.velocities(theta)
        want_dv = jacobian and fm.fit_rv
        vals = fm.resampler.apply(flux[:, None, :], v, derivative=want_dv)
        shifted = vals[:, 0]
        dv = vals[:, 1] if want_dv else None
        cont = coef = grams = None
        if fm.continuum is not None:  # the continuum's coefficients solved exactly for these labels
            cont, coef, grams = continuum_rows(fm.continuum, self.data, self.weights, rows, shifted,
                                               CONTINUUM_RIDGE)
            cont = cont.astype(np.float32)
            model = shifted * cont
            dv = dv * cont if want_dv else None
        else:
            model = shifted
        chi2, wr, wdv, g_v, h_vv = residual_rows(self.data, self.weights, rows, model, dv, want=jacobian)
        pc, ph, pg = fm.prior_terms(theta)
        obj = chi2 + pc
        if not jacobian:
            finite = np.where(np.isfinite(obj), obj, np.inf)
            return finite, chi2, None, None, NormalEquations(chi2, None, None, model, cont, coef)
        if cont is not None:  # the labels move the model through the continuum-scaled flux
            wr = wr * cont
            wdv = wdv * cont if want_dv else None
        m = x.shape[0]
        free = fm.free
        nl = free.size
        # gradient: back through the Doppler shift, the output layer and the two hidden layers
        g_h = self._transpose_shift(wr, v) @ self.w2
        self._h_at[rows], self._g_at[rows], self._chi2_at[rows] = a2, g_h, chi2
        self._v_at[rows, 0] = v
        g_x = (((g_h * d2) @ self.w1) * d1) @ self.w0
        self._ensure_gram(rows, v, cont)
        f = fm.n_params
        h = np.zeros((m, f, f))
        g = np.zeros((m, f))
        pt = self._projected_jacobian(rows, d1, d2)  # (S V^T) M (m, nl, H): kept directions, then the tail's
        p = pt[:, :, : self.rank]
        h[:, :nl, :nl] = np.matmul(np.matmul(p, self.gram[rows]), p.transpose(0, 2, 1))
        if self.has_tail:
            tail = pt[:, :, self.rank :]
            h[:, :nl, :nl] += self.mean_weight[rows][:, None, None] * np.matmul(tail, tail.transpose(0, 2, 1))
        g[:, :nl] = g_x[:, free]
        if want_dv:
            g[:, -1] = g_v
            h[:, -1, -1] = h_vv
            qk = self._transpose_shift(wdv, v) @ self.u_k  # U_k^T S^T (w dm/dv)
            self._q_at[rows] = qk @ self.sv  # W^T S^T (w dm/dv), rank-k part
            self._v_at[rows, 1], self._v_at[rows, 2] = g_v, h_vv
            hv = np.einsum("mlk,mk->ml", p, qk)  # M^T of that
            h[:, :nl, -1] = hv
            h[:, -1, :nl] = hv
        if cont is not None:
            self._profile_continuum(h, p, shifted, cont, dv, rows, v, grams)
        curvature = h.copy()
        h[:, np.arange(f), np.arange(f)] += ph
        g += pg
        ok = np.isfinite(obj) & np.all(np.isfinite(h.reshape(m, -1)), axis=1) & np.all(np.isfinite(g), axis=1)
        equations = NormalEquations(chi2, curvature, g - pg, model, cont, coef)
        return np.where(ok, obj, np.inf), chi2, h, g, equations

    def _profile_continuum(self, h, p, shifted, cont, dv, rows, v, grams):
        """Subtract the continuum's share of the curvature (the Schur complement of the coefficients, as
        :func:`~paynekit.fitting.forward.normal_equations` does), with the kept singular vectors of W.

        The coefficients' columns are ``w c f T_d`` on each region; back through the Doppler shift they are
        taken as ``S^T (w c f)`` times T_d at the same pixel (the smooth Chebyshev terms barely change over
        a shift of a few tens of pixels), so that one transposed shift per star serves every column."""
        design = self.fm.continuum
        m, nl, _ = p.shape
        w = self.weights[rows]
        back = self._transpose_shift((w * cont * shifted).astype(np.float32), v)
        if self._profile_at is None:
            n, n_hidden = self.n, self.w2.shape[1]
            self._profile_at = [
                (np.zeros((n, b.shape[1], n_hidden), dtype=np.float32), np.zeros((n, b.shape[1])),
                 np.zeros((n, b.shape[1], b.shape[1])))
                for b in design.bases
            ]
        for sl, basis, gram, at in zip(design.slices, design.bases, grams, self._profile_at):
            t = np.asarray(basis, dtype=np.float32)  # (P_r, D)
            d = t.shape[1]
            cols = back[:, None, sl] * t.T[None]  # (m, D, P_r): W^T-side columns of the region
            ck = (cols.reshape(m * d, -1) @ self.u_k[sl]).reshape(m, d, -1)  # (m, D, k)
            ch = ck @ self.sv  # (m, D, H)
            cross = np.zeros((m, h.shape[1], d))
            cross[:, :nl] = np.einsum("mlk,mdk->mld", p, ck)  # M^T ch
            if dv is not None:  # d model / d v against the coefficients' columns, exact
                wa = (w[:, sl] * shifted[:, sl])[:, None, :] * t.T[None]
                cross[:, -1] = np.einsum("mdp,mp->md", wa, dv[:, sl])
            a = gram + _ridge(gram)
            h -= cross @ _solve(a, cross.transpose(0, 2, 1))
            a_inv = _solve(a, np.broadcast_to(np.eye(d), a.shape))
            at[0][rows], at[1][rows], at[2][rows] = ch, cross[:, -1] if dv is not None else 0.0, a_inv
