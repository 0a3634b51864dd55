"""The hidden-layer curvature path of the batched optimiser (paynekit.fitting.hidden_space): its compiled
kernels, its exact chi2 and gradient, its curvature against the exact one, the fits it makes, and where it
does not apply."""

from __future__ import annotations

import numpy as np
import pytest

from paynekit import _kernels
from paynekit.emulators import PayneMLP
from paynekit.fitting import FitConfig, fit
from paynekit.fitting.forward import EmulatorEvaluator, build_forward_model
from paynekit.fitting.hidden_space import HiddenSpaceEvaluator
from paynekit.fitting.optimizers import _Evaluator, batched_levenberg_marquardt, uses_hidden_curvature
from paynekit.fitting.uncertainties import invert_curvature
from paynekit.instrument import SPEED_OF_LIGHT_KMS, ChebyshevContinuum, DopplerResampler

from ._fitting_toys import LineToy, noisy

pytestmark = pytest.mark.skipif(not _kernels.numba_enabled(), reason="the hidden-layer path needs numba")


@pytest.fixture(scope="module")
def leaky():
    """The line toy's network with leaky ReLU (piecewise linear; 4 labels, hidden layers of 12 and 24)."""
    e = LineToy().emu
    return PayneMLP(e.weights, e.biases, e.label_space, e.wavelength, activation="leaky_relu")


@pytest.fixture(scope="module")
def observations(leaky):
    """24 noisy, Doppler-shifted spectra of the leaky toy (S/N 100), their labels and velocities."""
    rng = np.random.default_rng(21)
    xs = rng.uniform(-0.35, 0.35, (24, leaky.n_labels))
    v = rng.uniform(-300, 300, 24)
    flux, ivar = noisy(leaky.predict(leaky.label_space.unscale(xs)), 100.0, rng)
    flux = DopplerResampler(leaky.wavelength, leaky.wavelength).apply(flux[:, None, :], v)[:, 0, :]
    return xs, v, flux, ivar


def _two_segment_grid():
    step = 1.5e-5
    i = np.concatenate([np.arange(300), np.arange(420, 700)])
    return 15200.0 * np.exp(step * i)


def _three_segment_grid():
    step = 1.5e-5
    i = np.concatenate([np.arange(300), np.arange(420, 426), np.arange(500, 780)])
    return 15200.0 * np.exp(step * i)


@pytest.mark.parametrize("grid", [_two_segment_grid, _three_segment_grid])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_doppler_transpose_is_the_adjoint_of_the_shift(dtype, grid):
    """<S x, y> = <x, S^T y> for velocities that shift by fractions of a pixel, by many pixels and off a
    segment's edge (the clamped taps), on grids of log-uniform segments, one of them 6 pixels long
    (shorter than the taps' reach plus the interior's margins)."""
    wl = grid()
    rs = DopplerResampler(wl, wl)
    assert rs.fast and rs._seg_starts.size == (2 if grid is _two_segment_grid else 3)
    rng = np.random.default_rng(3)
    v = np.array([0.0, 0.4, -2.7, 6.1, -9.3, 150.0, -380.0, 2400.0])
    x = rng.normal(size=(v.size, wl.size)).astype(dtype)
    y = rng.normal(size=(v.size, wl.size)).astype(dtype)
    sx = rs.apply(x[:, None, :], v)[:, 0, :]
    sty = _kernels.doppler_rows_transpose(y, v, rs.log_step, SPEED_OF_LIGHT_KMS, rs._seg_starts,
                                          rs._seg_stops)
    lhs = np.sum(sx.astype(float) * y, axis=1)
    rhs = np.sum(x.astype(float) * sty, axis=1)
    # to rounding: a sum of ~600 products, of size ~|x| |y| at most
    scale = np.linalg.norm(x.astype(float), axis=1) * np.linalg.norm(y.astype(float), axis=1)
    np.testing.assert_array_less(np.abs(lhs - rhs), (1e-6 if dtype == np.float32 else 1e-14) * scale)
    # at v = 0 the shift is the identity, and so is its transpose
    np.testing.assert_allclose(sty[0], y[0], rtol=1e-6)


def test_residual_rows_equals_numpy():
    rng = np.random.default_rng(4)
    data = rng.normal(1.0, 0.1, (5, 200))
    weights = rng.uniform(0, 50, (5, 200))
    rows = np.array([3, 0, 3, 4])
    model = rng.normal(1.0, 0.1, (4, 200)).astype(np.float32)
    dv = rng.normal(0, 0.01, (4, 200)).astype(np.float32)
    chi2, wr, wdv, s_rdv, s_dv2 = _kernels.residual_rows(data, weights, rows, model, dv, want=True)
    r = data[rows] - model
    w = weights[rows]
    np.testing.assert_allclose(chi2, np.sum(w * r * r, axis=1), rtol=1e-12)
    np.testing.assert_allclose(wr, w * r, rtol=1e-6)
    np.testing.assert_allclose(wdv, w * dv, rtol=1e-6)
    np.testing.assert_allclose(s_rdv, np.sum(w * r * dv, axis=1), rtol=1e-10)
    np.testing.assert_allclose(s_dv2, np.sum(w * dv * dv, axis=1), rtol=1e-10)
    only = _kernels.residual_rows(data, weights, rows, model)
    np.testing.assert_allclose(only[0], chi2, rtol=1e-12)
    assert only[1] is None and only[2] is None


def _evaluators(leaky, flux, ivar, rank=None, **config):
    cfg = FitConfig(**config)
    fm = build_forward_model(leaky, leaky.wavelength, cfg)
    ev = EmulatorEvaluator(leaky, "float32", "numpy")
    hidden = HiddenSpaceEvaluator(fm, ev.emulator, flux, ivar, **({} if rank is None else {"rank": rank}))
    exact = _Evaluator(fm, EmulatorEvaluator(leaky, "float64", "numpy"), flux, ivar)
    return fm, ev, hidden, exact


def _relative(a, b):
    return np.linalg.norm(a - b, axis=(1, 2)) / np.linalg.norm(b, axis=(1, 2))


def test_chi2_and_gradient_are_exact_and_the_curvature_is_close(leaky, observations):
    """chi2 and gradient equal the exact evaluator's (float32 rounding); so does the curvature with all
    singular values kept (at the velocity of the first evaluation); bounds (Frobenius) away from that
    velocity and with fewer singular values."""
    xs, v, flux, ivar = observations
    fm, _, hidden, exact = _evaluators(leaky, flux, ivar)
    rows = np.arange(xs.shape[0])
    for vel in (np.zeros_like(v), v + 0.3):
        fm, _, hidden, exact = _evaluators(leaky, flux, ivar)  # a new Gram matrix at each velocity
        theta = np.column_stack([xs + 0.05, vel])
        o_h, c_h, h_h, g_h, _ = hidden(theta, rows)
        o_e, c_e, h_e, g_e, _ = exact(theta, rows)
        np.testing.assert_allclose(c_h, c_e, rtol=1e-4)
        np.testing.assert_allclose(o_h, o_e, rtol=1e-4)
        scale = np.max(np.abs(g_e), axis=1, keepdims=True)
        np.testing.assert_allclose(g_h / scale, g_e / scale, atol=1e-3)
        assert _relative(h_h, h_e).max() < 1e-4
        np.testing.assert_array_equal(hidden(theta, rows, jacobian=False)[1], c_h)
    # 2 km/s from the velocity where the Gram matrix was made: within 2 %
    theta = np.column_stack([xs + 0.05, v])
    hidden(theta, rows)
    moved = np.column_stack([xs + 0.05, v + 2.0])
    assert _relative(hidden(moved, rows)[2], exact(moved, rows)[2]).max() < 0.02
    # 8 of 24 singular values kept, the rest of the output weights weighted by the star's mean weight:
    # within 3 % for the median star, 20 % for the worst (this toy's 24 units are 24 separate line sets)
    _, _, low_rank, _ = _evaluators(leaky, flux, ivar, rank=8)
    assert low_rank.has_tail
    err = _relative(low_rank(theta, rows)[2], exact(theta, rows)[2])
    assert np.median(err) < 0.03 and err.max() < 0.2
    # the network's float32 copy and the basis of its output weights are made once, for every chunk
    assert low_rank.u_k is _evaluators(leaky, flux, ivar, rank=8)[2].u_k and hidden.u_k is not low_rank.u_k
    assert hidden.w2_t is _evaluators(leaky, flux, ivar)[2].w2_t


def test_priors_and_frozen_labels_follow_the_exact_evaluator(leaky, observations):
    xs, v, flux, ivar = observations
    names = leaky.label_names
    lo, hi = leaky.label_space.x_min, leaky.label_space.x_max
    config = dict(frozen={names[1]: float(0.5 * (lo[1] + hi[1]))},
                  priors={names[0]: (float(lo[0] + 0.4 * (hi[0] - lo[0])), float(0.05 * (hi[0] - lo[0])))})
    fm, _, hidden, exact = _evaluators(leaky, flux, ivar, **config)
    rows = np.arange(xs.shape[0])
    theta = np.column_stack([xs[:, fm.free], v])
    o_h, _, h_h, g_h, _ = hidden(theta, rows)
    o_e, _, h_e, g_e, _ = exact(theta, rows)
    np.testing.assert_allclose(o_h, o_e, rtol=1e-4)
    scale = np.max(np.abs(g_e), axis=1, keepdims=True)
    np.testing.assert_allclose(g_h / scale, g_e / scale, atol=1e-3)
    assert h_h.shape == h_e.shape == (xs.shape[0], fm.n_params, fm.n_params)
    assert _relative(h_h, h_e).max() < 0.1


def _optimiser_setup(leaky, xs, v, offset):
    """Forward model, evaluator, config (trial dampings on), starts ``offset`` from the true scaled labels
    and 3 km/s from the true velocity, and the bounds, for batched_levenberg_marquardt on the toy."""
    cfg = FitConfig(lm_trial_min_params=1)
    fm = build_forward_model(leaky, leaky.wavelength, cfg)
    n = xs.shape[0]
    start = np.column_stack([np.clip(xs + offset, -0.5, 0.5), v + 3.0])
    lower = np.column_stack([np.full((n, fm.n_free_labels), -0.5), v - 25])
    upper = np.column_stack([np.full((n, fm.n_free_labels), 0.5), v + 25])
    return fm, EmulatorEvaluator(leaky, "float32", "numpy"), cfg, start, lower, upper


def test_fits_with_the_hidden_curvature_end_as_low_with_the_exact_covariance(leaky, observations,
                                                                             monkeypatch):
    """The optimiser takes its steps with the hidden-layer evaluator, ends at a chi2 no higher than with
    exact curvature (within 0.5 for >= 90 % of the stars), and reports the covariance of the exact
    curvature where it ended."""
    xs, v, flux, ivar = observations
    calls = {"n": 0}
    original = HiddenSpaceEvaluator.__call__

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HiddenSpaceEvaluator, "__call__", counting)
    fm, ev, cfg, start, lower, upper = _optimiser_setup(leaky, xs, v, 0.05)
    n = xs.shape[0]
    res = batched_levenberg_marquardt(fm, ev, flux, ivar, start, lower, upper, cfg)
    assert calls["n"] > 10
    ref = batched_levenberg_marquardt(
        fm, ev, flux, ivar, start, lower, upper, cfg.replace(lm_hidden_curvature=False)
    )
    assert not any(res.failure) and not any(ref.failure)
    d = res.chi2 - ref.chi2
    assert np.mean(d < 0.5) >= 0.9, d
    h = _Evaluator(fm, ev, flux, ivar)(res.theta, np.arange(n))[2]
    cov, ok = invert_curvature(h)
    assert np.all(ok)
    np.testing.assert_allclose(res.cov, cov, rtol=1e-8)
    # and the labels are recovered: within 4 formal sigma of the truth
    sig = np.sqrt(np.diagonal(res.cov, axis1=1, axis2=2))
    assert np.all(np.abs(res.theta[:, :-1] - xs) / sig[:, :-1] < 4.0)
    # the exact evaluation where the fits ended, in blocks of 5 stars: the same result (float32 rounding)
    blocks = batched_levenberg_marquardt(fm, ev, flux, ivar, start, lower, upper, cfg, exact_block=5)
    np.testing.assert_array_equal(blocks.theta, res.theta)
    np.testing.assert_allclose(blocks.cov, res.cov, rtol=1e-4, atol=1e-6 * np.abs(res.cov).max())
    np.testing.assert_allclose(blocks.model, res.model, rtol=1e-6)
    np.testing.assert_allclose(blocks.chi2, res.chi2, rtol=1e-6)


@pytest.mark.parametrize("continuum", [False, True])
def test_the_catalog_is_the_same_kind_as_with_exact_curvature(leaky, observations, continuum):
    """Through fit(), with and without a fitted continuum: no flagged rows either way, labels within 2
    formal sigma of each other for >= 90 % of the stars, and uncertainties the same for the median star."""
    _, _, flux, ivar = observations
    wl = leaky.wavelength
    tilt = 1.0 + 0.2 * (wl - wl.mean()) / np.ptp(wl) if continuum else np.ones_like(wl)
    spectra = (wl, flux * tilt, ivar / tilt**2)
    extra = {"continuum": ChebyshevContinuum(2)} if continuum else {}
    a = fit(leaky, spectra, FitConfig(lm_trial_min_params=1, **extra))
    b = fit(leaky, spectra, FitConfig(lm_trial_min_params=1, lm_hidden_curvature=False, **extra))
    assert not np.any(a["flag_bad"]) and not np.any(b["flag_bad"])
    for name in leaky.label_names:
        z = np.abs(np.asarray(a[name]) - np.asarray(b[name])) / np.asarray(b[f"raw_e_{name}"])
        assert np.mean(z < 2) >= 0.9, name
        # uncertainties: the exact curvature where each fit ended (one side of a kink or the other)
        ratio = np.asarray(a[f"raw_e_{name}"]) / np.asarray(b[f"raw_e_{name}"])
        assert abs(np.median(ratio) - 1) < 0.01, name


def test_the_hidden_path_fits_in_larger_batches_with_the_jacobian_in_blocks(leaky, observations, monkeypatch):
    """fit() gives the hidden-layer path batches of up to chunk_size stars (it forms no Jacobian while it
    steps) and the exact evaluation where they end the Jacobian-sized blocks; the exact path keeps those."""
    import paynekit.fitting.api as api

    _, _, flux, ivar = observations
    seen = []
    original = api.batched_levenberg_marquardt

    def spy(fm, ev, data, *args, exact_block=None, **kwargs):
        seen.append((data.shape[0], exact_block))
        return original(fm, ev, data, *args, exact_block=exact_block, **kwargs)

    monkeypatch.setattr(api, "batched_levenberg_marquardt", spy)
    # memory for 5 stars' Jacobians, or 8 stars on the hidden path (this toy has 5 parameters, not 26)
    p = leaky.wavelength.size
    cfg = FitConfig(lm_trial_min_params=1, chunk_size=6, restart_reduced_chi2=None,
                    max_chunk_bytes=5 * (leaky.n_labels + 3) * p * 4 * api.JACOBIAN_BLOCKS_PER_STAR)
    a = fit(leaky, (leaky.wavelength, flux, ivar), cfg)
    assert seen == [(6, 5)] * 4
    seen.clear()
    b = fit(leaky, (leaky.wavelength, flux, ivar), cfg.replace(lm_hidden_curvature=False))
    assert seen == [(5, 5)] * 4 + [(4, 5)]
    assert not np.any(a["flag_bad"]) and not np.any(b["flag_bad"])


def test_a_fitted_continuum_is_profiled_out_as_the_exact_evaluator_does(leaky, observations):
    """With a Chebyshev continuum (solved for each trial's labels): chi2 and gradient equal the exact
    evaluator's, and with all singular values kept the curvature is within 2 %, the continuum's Schur
    complement included (without it: > 10 % off); the continuum comes back with the model."""
    xs, v, flux, ivar = observations
    wl = leaky.wavelength
    tilt = 1.0 + 0.2 * (wl - wl.mean()) / np.ptp(wl)  # a sloped continuum on every star
    fm, _, hidden, exact = _evaluators(leaky, flux * tilt, ivar / tilt**2, continuum=ChebyshevContinuum(2))
    assert fm.continuum is not None
    rows = np.arange(xs.shape[0])
    theta = np.column_stack([xs + 0.05, v + 0.3])
    o_h, c_h, h_h, g_h, ne_h = hidden(theta, rows)
    o_e, c_e, h_e, g_e, ne_e = exact(theta, rows)
    np.testing.assert_allclose(c_h, c_e, rtol=1e-4)
    scale = np.max(np.abs(g_e), axis=1, keepdims=True)
    np.testing.assert_allclose(g_h / scale, g_e / scale, atol=1e-3)
    # (the coefficients' columns go back through the shift as S^T (w c f) times the Chebyshev terms:
    # within 2 % at shifts of up to 67 of the toy's 800 pixels)
    assert _relative(h_h, h_e).max() < 0.02
    np.testing.assert_allclose(ne_h.continuum, ne_e.continuum, rtol=1e-4)
    np.testing.assert_allclose(ne_h.model, ne_e.model, rtol=1e-4)
    # without the Schur complement the curvature would be that of a continuum held fixed: visibly larger
    fixed = _evaluators(leaky, flux * tilt, ivar / tilt**2, continuum=ChebyshevContinuum(2))[2]
    fixed._profile_continuum = lambda *args: None
    assert _relative(fixed(theta, rows)[2], h_e).max() > 0.1


def test_it_is_not_used_where_it_does_not_apply(leaky):
    ev = EmulatorEvaluator(leaky, "float32", "numpy")
    fm = build_forward_model(leaky, leaky.wavelength, FitConfig())
    assert HiddenSpaceEvaluator.supports(fm, ev)
    fm_lsf = build_forward_model(leaky, leaky.wavelength, FitConfig(resolution=20000.0))
    assert not HiddenSpaceEvaluator.supports(fm_lsf, ev)
    sigmoid = EmulatorEvaluator(LineToy().emu, "float32", "numpy")
    assert not HiddenSpaceEvaluator.supports(fm, sigmoid)
    torch_ev = EmulatorEvaluator.__new__(EmulatorEvaluator)
    torch_ev.backend, torch_ev.emulator = "torch", ev.emulator
    assert not HiddenSpaceEvaluator.supports(fm, torch_ev)
    # data on another grid than the model's: the shift is a general interpolation, no fast transpose
    other = leaky.wavelength[5:-5]
    fm_other = build_forward_model(leaky, other, FitConfig())
    assert not HiddenSpaceEvaluator.supports(fm_other, ev)
    # and the optimiser takes it only with several trial dampings and lm_hidden_curvature
    assert uses_hidden_curvature(fm, ev, FitConfig(lm_trial_min_params=1))
    assert not uses_hidden_curvature(fm, ev, FitConfig(lm_trial_min_params=1, lm_hidden_curvature=False))
    assert not uses_hidden_curvature(fm, ev, FitConfig(lm_trial_min_params=1, lm_trial_dampings=(1.0,)))
    assert not uses_hidden_curvature(fm_lsf, ev, FitConfig(lm_trial_min_params=1))


def test_the_compiled_continuum_solve_equals_numpy():
    """``_kernels.continuum_rows`` (the hidden-layer path's continuum) against ``solve_continuum``: the same
    continuum, coefficients and normal matrices to rounding, for rows taken straight from the chunk,
    on the three APOGEE chips with a degree-2 Chebyshev series, an empty region included."""
    from paynekit.fitting.forward import CONTINUUM_RIDGE, solve_continuum
    from paynekit.wavelength import apstar_wavelength

    wl = apstar_wavelength()
    design = ChebyshevContinuum(2).design(wl)
    rng = np.random.default_rng(8)
    data = rng.normal(1.0, 0.1, (6, wl.size))
    weights = rng.uniform(0, 100, (6, wl.size)) * design.in_region
    weights[2, design.slices[1]] = 0.0  # a star with nothing on the middle chip
    rows = np.array([5, 2, 2, 0])
    flux = rng.normal(0.9, 0.05, (rows.size, wl.size)).astype(np.float32)
    ref = solve_continuum(design, flux, data[rows], weights[rows])
    got = _kernels.continuum_rows(design, data, weights, rows, flux, CONTINUUM_RIDGE)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[2], ref[2]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_the_jacobian_evaluation_reuses_the_trials_flux(leaky, observations):
    """After a chi2-only evaluation of trial points, an evaluation with the Jacobian at some of them (and at
    points that were not trials) takes those rows' flux from the trials and gives what a fresh evaluator
    gives (float32 rounding)."""
    xs, v, flux, ivar = observations
    _, _, hidden, _ = _evaluators(leaky, flux, ivar)
    _, _, fresh, _ = _evaluators(leaky, flux, ivar)
    n = xs.shape[0]
    rows = np.arange(n)
    trials = np.concatenate([np.column_stack([xs + dx, v]) for dx in (0.02, 0.04)])
    chi2_trials = hidden(trials, np.tile(rows, 2), jacobian=False)[1]
    # a second chi2-only evaluation (the optimiser's kink step) before the Jacobian one: kept as well
    chi2_more = hidden(np.column_stack([xs[:4] + 0.01, v[:4]]), rows[:4], jacobian=False)[1]
    taken = trials[n:].copy()
    taken[::3] = np.column_stack([xs[::3] - 0.03, v[::3]])  # every third star at a point that was no trial
    taken[1] = np.column_stack([xs[1:2] + 0.01, v[1:2]])[0]
    got = hidden(taken, rows)
    ref = fresh(taken, rows)
    assert hidden._trials == []  # used once
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5)
    np.testing.assert_allclose(got[1][4::3], chi2_trials[n + 4 :: 3], rtol=1e-12)  # the trials' own values
    np.testing.assert_allclose(got[1][1], chi2_more[1], rtol=1e-12)
    scale = np.max(np.abs(ref[3]), axis=1, keepdims=True)
    np.testing.assert_allclose(got[3] / scale, ref[3] / scale, atol=1e-4)
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-4)


def test_the_projected_jacobian_is_updated_where_few_units_change_side(leaky, observations, monkeypatch):
    """Evaluated again after a small step, a star's curvature comes from updating its last projected
    Jacobian for the hidden units that changed side; it equals making it anew (float32 rounding), after a
    run of such updates too, and stars with many changed units are made anew."""
    import paynekit.fitting.hidden_space as hs

    xs, v, flux, ivar = observations
    rows = np.arange(xs.shape[0])
    _, _, hidden, _ = _evaluators(leaky, flux, ivar)
    _, _, fresh, _ = _evaluators(leaky, flux, ivar)
    rng = np.random.default_rng(5)
    x = xs + 0.05
    hidden(np.column_stack([x, v]), rows)
    fresh(np.column_stack([x, v]), rows)
    changed = 0
    for _ in range(6):
        x = x + rng.normal(0.0, 0.03, x.shape)
        d1 = hidden._hidden(np.column_stack([x, v]), True)[2]
        changed += int(np.sum(d1 != hidden._d1))
        got = hidden(np.column_stack([x, v]), rows)[2]
        monkeypatch.setattr(hs, "MAX_FLIPS", -1)  # the reference: made anew every time
        ref = fresh(np.column_stack([x, v]), rows)[2]
        monkeypatch.setattr(hs, "MAX_FLIPS", 24)
        assert _relative(got, ref).max() < 1e-5
    assert changed > 20 and np.all(hidden._updates == 6) and np.all(fresh._updates == 0)
    # a star whose first-layer units mostly changed side is made anew
    monkeypatch.setattr(hs, "MAX_FLIPS", 1)
    hidden(np.column_stack([-x, v]), rows)
    assert np.any(hidden._updates == 0)
    # a star twice in one call, at two points: each made anew
    monkeypatch.setattr(hs, "MAX_FLIPS", 24)
    twice = np.array([3, 3])
    points = np.column_stack([x[twice] + np.array([[0.01], [-0.04]]), v[twice]])
    got = hidden(points, twice)[2]
    monkeypatch.setattr(hs, "MAX_FLIPS", -1)
    assert _relative(got, fresh(points, twice)[2]).max() < 1e-5


def test_the_gram_form_of_grouped_trials_equals_one_at_a_time(leaky, observations):
    """The optimiser's trials (T blocks of the same stars) take one product per star; any other order of
    rows takes one per row: the same values (float32 rounding)."""
    xs, v, flux, ivar = observations
    rows = np.arange(xs.shape[0])
    _, _, hidden, _ = _evaluators(leaky, flux, ivar, rank=8)
    hidden(np.column_stack([xs, v]), rows)
    rng = np.random.default_rng(2)
    tiled = np.tile(rows[3:15], 3)
    p = rng.normal(size=(tiled.size, hidden.rank)).astype(np.float32)
    got = hidden._gram_form(p, tiled)
    one = np.array([p[j] @ hidden.gram[r] @ p[j] for j, r in enumerate(tiled)])
    np.testing.assert_allclose(got, one, rtol=1e-5)
    mixed = tiled.copy()
    mixed[[0, 5]] = mixed[[5, 0]]
    np.testing.assert_allclose(hidden._gram_form(p, mixed), [p[j] @ hidden.gram[r] @ p[j] for j, r in
                                                             enumerate(mixed)], rtol=1e-5)


def _trial_points(xs, v, rng, size):
    return np.column_stack([np.clip(xs + rng.normal(0, size, xs.shape), -0.5, 0.5), v])


def test_the_predicted_objective_holds_across_kinks(leaky, observations):
    """With all singular values kept (the toy's 24) and the velocity where the star was evaluated, the
    prediction is the true objective (float32 rounding) even for steps that cross many kinks, where the
    label-space quadratic of the curvature is far off; with a velocity step it is right to second order,
    with a fitted continuum (profiled as in the curvature) and with 8 singular values kept close."""
    xs, v, flux, ivar = observations
    n = xs.shape[0]
    rows = np.arange(n)
    rng = np.random.default_rng(5)
    fm, _, hidden, exact = _evaluators(leaky, flux, ivar)
    assert not hidden.has_tail
    theta = np.column_stack([xs + 0.02, v + 0.2])
    o0, _, h0, g0, _ = hidden(theta, rows)
    trial = _trial_points(theta[:, :-1], theta[:, -1], rng, 0.1)
    z = [(a > 0) for a in hidden._hidden(theta, False)[1::2]]
    zt = [(a > 0) for a in hidden._hidden(trial, False)[1::2]]
    crossed = sum(np.sum(a != b, axis=1) for a, b in zip(z, zt))
    assert np.median(crossed) >= 3  # kinks crossed by the median star (of 36 units)
    true = exact(trial, rows, jacobian=False)[0]
    pred = hidden.predict(trial, rows)
    gain = o0 - true
    np.testing.assert_allclose(pred, true, rtol=2e-4, atol=1e-3 * np.abs(gain).max())
    d = trial - theta
    quadratic = o0 - 2 * np.sum(g0 * d, axis=1) + np.einsum("ni,nij,nj->n", d, h0, d)
    assert np.median(np.abs(quadratic - true) / np.abs(gain)) > 0.05
    assert np.median(np.abs(pred - true) / np.abs(gain)) < 1e-3
    # a velocity step as well: the prediction leaves out the term of the residual in dv * dh (as
    # Gauss-Newton leaves out second derivatives), so its error falls with the step, to < 1 % of the gain
    # at 0.05 km/s (late steps move v by less)
    errs = []
    for dv in (0.5, 0.05):
        moved = trial.copy()
        moved[:, -1] += dv
        errs.append(np.median(np.abs(hidden.predict(moved, rows) - exact(moved, rows, jacobian=False)[0])
                              / np.abs(gain)))
    assert errs[1] < 0.01 and errs[1] < 0.2 * errs[0]
    # 8 of 24 singular values: the tail weighted by the mean weight
    low = _evaluators(leaky, flux, ivar, rank=8)[2]
    low(theta, rows)
    err = np.abs(low.predict(trial, rows) - true) / np.abs(gain)
    assert np.median(err) < 0.1
    # a fitted continuum, solved again for each trial: profiled out to second order
    wl = leaky.wavelength
    tilt = 1.0 + 0.2 * (wl - wl.mean()) / np.ptp(wl)
    _, _, cont, cont_exact = _evaluators(leaky, flux * tilt, ivar / tilt**2, continuum=ChebyshevContinuum(2))
    o0 = cont(theta, rows)[0]
    near = _trial_points(theta[:, :-1], theta[:, -1], rng, 0.02)
    true = cont_exact(near, rows, jacobian=False)[0]
    err = np.abs(cont.predict(near, rows) - true) / np.abs(o0 - true)
    assert np.median(err) < 0.02
    cont._profile_at = None  # a continuum held fixed instead: the prediction overstates chi2
    assert np.median(np.abs(cont.predict(near, rows) - true) / np.abs(o0 - true)) > 2 * np.median(err)


def test_a_predicted_trial_is_checked_and_the_next_one_tried():
    """The trial with the lowest predicted objective is taken only when its true objective does not rise;
    otherwise the next one by prediction, as long as one is predicted to gain; none where none is."""
    from paynekit.fitting.optimizers import _check_predicted

    current = np.array([10.0, 10.0, 10.0, 10.0])
    predicted = np.array([[9.0, 11.0, 9.5, 8.0],
                          [8.0, 12.0, 9.0, 9.9],
                          [9.5, 13.0, 10.5, 9.0]])  # (trial, star)
    truth = np.array([[9.2, 10.5, 10.2, 8.1],
                      [10.4, 11.0, 10.1, 9.8],
                      [9.7, 12.0, 9.0, 9.1]])
    steps = np.arange(3 * 4, dtype=float).reshape(3, 4, 1)  # step k*4+i: trial k of star i
    calls = []

    def evaluate(points, rows, jacobian):
        assert not jacobian
        k = np.rint(points[:, 0]).astype(int) // 4
        calls.append(rows.copy())
        return truth[k, rows], None

    pick, go = _check_predicted(evaluate, np.zeros((4, 1)), np.arange(4), steps, predicted, current)
    # star 0: predicted best is trial 1 (true 10.4 > 10), then trial 0 (9.2): taken
    # star 1: nothing predicted to gain: no evaluation; star 2: trial 1, then 0 (true 10.2) fail, 2 is
    # predicted to rise: none; star 3: trial 0 (8.1) taken at once
    np.testing.assert_array_equal(go, [True, False, False, True])
    assert pick[0] == 0 and pick[3] == 0
    assert all(1 not in c for c in calls)
    assert [list(c) for c in calls] == [[0, 2, 3], [0, 2]]


def test_predicted_trials_cut_the_flux_evaluations_and_end_as_low(leaky, observations, monkeypatch):
    """The optimiser with predicted trials computes the model flux of far fewer trial points than with
    every trial evaluated in full, and ends as low in chi2 (within 0.5 for >= 90 % of the stars)."""
    xs, v, flux, ivar = observations
    counts = {}
    original = HiddenSpaceEvaluator._output_layer

    def counting(self, a2, theta, rows, jacobian):
        if not jacobian:
            counts["rows"] = counts.get("rows", 0) + a2.shape[0]
        return original(self, a2, theta, rows, jacobian)

    monkeypatch.setattr(HiddenSpaceEvaluator, "_output_layer", counting)
    fm, ev, cfg, start, lower, upper = _optimiser_setup(leaky, xs, v, 0.1)
    results = {}
    for predicted in (True, False):
        counts.clear()
        results[predicted] = batched_levenberg_marquardt(
            fm, ev, flux, ivar, start, lower, upper, cfg.replace(lm_predicted_trials=predicted))
        results[predicted, "rows"] = counts["rows"]
    a, b = results[True], results[False]
    assert not any(a.failure) and not any(b.failure)
    assert results[True, "rows"] < 0.5 * results[False, "rows"], results
    assert np.mean(a.chi2 - b.chi2 < 0.5) >= 0.9
    assert np.mean(b.chi2 - a.chi2 < 0.5) >= 0.9


def test_backtracking_steps_are_taken_and_replace_the_kink_steps(leaky, observations, monkeypatch):
    """With predicted trials the best trial's step is also tried at 1/2, 1/4, 1/8 of its length, those are
    taken, the kink steps are left out (lm_kink_steps=None) but kept where the trials are evaluated in
    full, and the fits end as low as without backtracking (within 0.5 for >= 90 % of the stars)."""
    from paynekit.fitting import optimizers

    xs, v, flux, ivar = observations
    picks, kinks = [], {"n": 0}
    check, steps = optimizers._check_predicted, optimizers._KinkPlanes.steps

    def recording(evaluate, theta, rows, trial_steps, predicted, current):
        pick, go = check(evaluate, theta, rows, trial_steps, predicted, current)
        picks.append((pick[go], predicted.shape[0]))
        return pick, go

    def counting(self, *args):
        kinks["n"] += 1
        return steps(self, *args)

    monkeypatch.setattr(optimizers, "_check_predicted", recording)
    monkeypatch.setattr(optimizers._KinkPlanes, "steps", counting)
    fm, ev, cfg, start, lower, upper = _optimiser_setup(leaky, xs, v, 0.1)
    assert cfg.lm_kink_steps is None and len(cfg.lm_backtracking) == 3
    res = batched_levenberg_marquardt(fm, ev, flux, ivar, start, lower, upper, cfg)
    assert kinks["n"] == 0
    n_dampings = len(cfg.lm_trial_dampings)
    assert all(n_trials == n_dampings + 3 for _, n_trials in picks)
    taken = np.concatenate([p for p, _ in picks])
    assert np.sum(taken >= n_dampings) >= 5  # shortened steps were the ones taken
    plain = batched_levenberg_marquardt(fm, ev, flux, ivar, start, lower, upper,
                                        cfg.replace(lm_backtracking=()))
    assert kinks["n"] > 0  # without backtracking the kink steps are back
    assert not any(res.failure) and not any(plain.failure)
    assert np.mean(res.chi2 - plain.chi2 < 0.5) >= 0.9
