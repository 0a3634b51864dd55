"""Fitting: forward-model derivatives, recovery, RV anywhere in +-400 km/s, optimiser agreement,
covariances, masks, bad inputs, frozen labels and priors, files."""

from __future__ import annotations

import numpy as np
import pytest

from paynekit.errors import FileFormatError, InputError
from paynekit.fitting import (
    FitConfig,
    FitResult,
    NoiseModel,
    fit,
    parse_assignments,
    presearch_grid,
    read_bundle,
    read_pixel_mask,
    write_bundle,
)
from paynekit.fitting.forward import EmulatorEvaluator, build_forward_model, model_spectra, normal_equations
from paynekit.emulators import PayneMLP
from paynekit.emulators.payne import JacobianCache
from paynekit.instrument import ChebyshevContinuum, DopplerResampler, GaussianLSF, NoContinuum
from paynekit.spectra import Spectrum, SpectrumBatch

from ._fitting_toys import LineToy, linear_mlp, noisy

SNR = 100.0


@pytest.fixture(scope="module")
def toy():
    return LineToy()


@pytest.fixture(scope="module")
def mock(toy):
    """40 stars at S/N 100 with radial velocities in +-400 km/s, on the emulator's grid."""
    rng = np.random.default_rng(11)
    x = toy.draw_labels(40, rng)
    v = rng.uniform(-400, 400, 40)
    clean = toy.observe(x, v)
    flux, ivar = noisy(clean, SNR, rng)
    return x, v, clean, flux, ivar


@pytest.fixture(scope="module")
def batched_result(toy, mock):
    *_, flux, ivar = mock
    return fit(toy.emu, (toy.emu.wavelength, flux, ivar), FitConfig())


def _labels(table, names):
    return np.stack([np.asarray(table[n]) for n in names], axis=1)


# ------------------------------------------------------------------------------------------------
# forward model derivatives
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data_grid", ["same", "other"])
def test_forward_jacobian_equals_finite_differences(toy, data_grid):
    emu = toy.emu
    wl = emu.wavelength if data_grid == "same" else np.linspace(emu.wavelength[5], emu.wavelength[-5], 650)
    cfg = FitConfig(resolution=15000.0)
    fm = build_forward_model(emu, wl, cfg)
    ev = EmulatorEvaluator(emu, "float64")
    theta = np.array([[0.1, -0.2, 0.3, 0.05, 123.4], [-0.3, 0.25, -0.1, 0.2, -77.7]])
    vals = model_spectra(fm, ev, theta, jacobian=True)
    cov = fm.resampler.coverage(theta[:, -1] - 1, theta[:, -1] + 1)
    steps = [1e-6] * 4 + [1e-4]
    for k, h in enumerate(steps):
        tp, tm = theta.copy(), theta.copy()
        tp[:, k] += h
        tm[:, k] -= h
        fd = (model_spectra(fm, ev, tp, False)[:, 0] - model_spectra(fm, ev, tm, False)[:, 0]) / (2 * h)
        an = vals[:, 1 + k]
        scale = np.abs(an[cov]).max()
        assert np.abs(fd - an)[cov].max() < 1e-5 * scale, f"parameter {k}"


def _two_region_continuum_model(emu):
    """Forward model with a degree-2 Chebyshev continuum in two regions, evaluated in float64."""
    cfg = FitConfig(continuum=ChebyshevContinuum(2, regions=((15150.0, 15290.0), (15290.0, 15400.0))))
    return build_forward_model(emu, emu.wavelength, cfg), EmulatorEvaluator(emu, "float64")


def test_profiled_gradient_and_continuum_jacobian(toy):
    """With a fitted continuum, g = J^T W r equals -1/2 d chi2_min / d theta (envelope theorem)."""
    emu = toy.emu
    fm, ev = _two_region_continuum_model(emu)
    rng = np.random.default_rng(2)
    x = toy.draw_labels(2, rng)
    data = toy.observe(x, [30.0, -12.0]) * (1.1 + 0.05 * np.linspace(-1, 1, emu.n_pixels))
    data = data + rng.normal(0, 0.01, data.shape)
    w = np.full(data.shape, 1e4) * fm.continuum.in_region
    theta = np.array([[0.05, -0.1, 0.2, 0.0, 29.0], [0.1, 0.1, -0.2, 0.1, -11.5]])

    def chi2(th):
        return normal_equations(fm, model_spectra(fm, ev, th, False), data, w, jacobian=False).chi2

    ne = normal_equations(fm, model_spectra(fm, ev, theta, True), data, w, jacobian=True)
    for k, h in enumerate([1e-6] * 4 + [1e-4]):
        tp, tm = theta.copy(), theta.copy()
        tp[:, k] += h
        tm[:, k] -= h
        fd = -0.5 * (chi2(tp) - chi2(tm)) / (2 * h)
        np.testing.assert_allclose(ne.g[:, k], fd, rtol=2e-4, atol=1e-3 * np.abs(ne.g).max())
    # the continuum is linear in its coefficients: d model / d a_j = flux * T_j exactly
    flux = model_spectra(fm, ev, theta, False)[:, 0]
    np.testing.assert_allclose(ne.model, flux * ne.continuum)
    np.testing.assert_allclose(fm.continuum.evaluate(ne.coefficients), ne.continuum, atol=1e-12)


def test_restarts_keep_the_best_fit_and_only_touch_poor_fits(toy, mock):
    """Stars above restart_reduced_chi2 are refitted from the next pre-search candidates; never worse."""
    *_, flux, ivar = mock
    spectra = (toy.emu.wavelength, flux, ivar)
    base = dict(presearch_size=6, rv_range=500.0)
    off = fit(toy.emu, spectra, FitConfig(**base, restart_reduced_chi2=None))
    never = fit(toy.emu, spectra, FitConfig(**base, restart_reduced_chi2=1e9))
    everyone = fit(toy.emu, spectra, FitConfig(**base, restart_reduced_chi2=1e-9, restart_starts=3))
    for name in ("chi2", "teff", "v_rel", "n_iterations"):
        np.testing.assert_array_equal(never[name], off[name])
    chi2_off, chi2_all = np.asarray(off["chi2"]), np.asarray(everyone["chi2"])
    assert np.all(chi2_all <= chi2_off + 1e-6 * chi2_off)
    assert np.all(np.asarray(everyone["n_iterations"]) > np.asarray(off["n_iterations"]))
    # (this toy has no false minima, so nothing improves here; benchmarks show the gain on 25 labels)


def test_normal_equations_in_cache_blocks_equal_one_block(toy, monkeypatch):
    import paynekit.fitting.forward as forward

    emu = toy.emu
    fm, ev = _two_region_continuum_model(emu)
    rng = np.random.default_rng(4)
    x = toy.draw_labels(5, rng)
    data = toy.observe(x, rng.uniform(-50, 50, 5)) + rng.normal(0, 0.01, (5, emu.n_pixels))
    w = np.full(data.shape, 1e4) * fm.continuum.in_region
    theta = np.column_stack([x, rng.uniform(-50, 50, 5)])
    values = model_spectra(fm, ev, theta, True)
    whole = normal_equations(fm, values, data, w)
    monkeypatch.setattr(forward, "NORMAL_BLOCK_BYTES", 2 * values.shape[1] * values.shape[2] * 8)
    blocked = normal_equations(fm, values, data, w)
    np.testing.assert_allclose(blocked.H, whole.H, rtol=1e-12)
    np.testing.assert_allclose(blocked.g, whole.g, rtol=1e-12, atol=1e-12 * np.abs(whole.g).max())
    np.testing.assert_array_equal(blocked.chi2, whole.chi2)


@pytest.mark.parametrize("continuum", [False, True])
def test_fit_equations_in_star_blocks_equal_model_then_normal_equations(toy, continuum, monkeypatch):
    """The optimiser's blocked path (emulator once, then instrument + normal equations per block of stars)
    gives what model_spectra followed by normal_equations gives."""
    import paynekit.fitting.forward as forward

    emu = toy.emu
    if continuum:
        fm, ev = _two_region_continuum_model(emu)
    else:
        fm = build_forward_model(emu, emu.wavelength, FitConfig(continuum=NoContinuum()))
        ev = EmulatorEvaluator(emu, dtype="float32")
    rng = np.random.default_rng(5)
    n = 7
    x = toy.draw_labels(n, rng)
    v = rng.uniform(-300, 300, n)
    data = toy.observe(x, v) + rng.normal(0, 0.01, (n, emu.n_pixels))
    w = np.full(data.shape, 1e4) * (fm.continuum.in_region if continuum else 1.0)
    theta = np.column_stack([x, v])
    whole = normal_equations(fm, model_spectra(fm, ev, theta, True), data, w)
    per_star = (len(x[0]) + 2) * emu.n_pixels * 4
    monkeypatch.setattr(forward, "FIT_BLOCK_BYTES", 3 * per_star)  # blocks of 3, 3 and 1 stars
    blocked = forward.fit_equations(fm, ev, theta, data, w)
    for name in ("chi2", "H", "g", "model", "continuum", "coefficients"):
        a, b = getattr(blocked, name), getattr(whole, name)
        if b is None:
            assert a is None
        else:
            b = np.asarray(b)
            atol = 1e-12 * np.abs(b).max()
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=atol, err_msg=name)


# ------------------------------------------------------------------------------------------------
# recovery
# ------------------------------------------------------------------------------------------------
def test_noise_free_recovery(toy):
    rng = np.random.default_rng(5)
    x = toy.draw_labels(12, rng)
    names = toy.emu.label_names
    span = toy.emu.label_space.span
    # at rest (no interpolation of the model): exact up to the stopping rule (chi2 within
    # chi2_tolerance = 0.01 of its minimum, i.e. a tenth of a formal sigma), and tighter on request
    clean = toy.observe(x, np.zeros(12))
    ivar = np.full(clean.shape, SNR**2)
    for tol, max_sigma in ((1e-2, 0.1), (1e-6, 1e-3)):
        t = fit(toy.emu, (toy.emu.wavelength, clean, ivar), FitConfig(dtype="float64", chi2_tolerance=tol))
        err = _labels(t, names) - x
        assert np.max(np.abs(err / _labels(t, [f"raw_e_{n}" for n in names]))) < max_sigma
        assert np.max(np.abs(err / span)) < 3 * max_sigma * 0.03  # formal errors are ~3% of the range
    assert np.max(np.abs(t["v_rel"])) < 0.01
    # shifted anywhere: the only model error is the cubic interpolation of the shifted model (the toy's
    # lines are 1-2 pixels wide), a small fraction of the range and of the S/N 100 errors
    v = rng.uniform(-300, 300, 12)
    clean = toy.observe(x, v)
    t = fit(toy.emu, (toy.emu.wavelength, clean, ivar), FitConfig(dtype="float64"))
    err = _labels(t, names) - x
    assert np.max(np.abs(err / span)) < 5e-3
    assert np.max(np.abs(err / _labels(t, [f"raw_e_{n}" for n in names]))) < 0.3
    assert np.max(np.abs(t["v_rel"] - v)) < 0.1  # ~1 formal sigma: the interpolation limits v at ~0.05 km/s
    assert not np.any(t["flag_bad"])


def test_snr100_labels_within_three_formal_sigma(toy, mock, batched_result):
    x, *_ = mock
    t = batched_result
    names = toy.emu.label_names
    z = (_labels(t, names) - x) / _labels(t, [f"raw_e_{n}" for n in names])
    assert np.mean(np.abs(z) < 3) >= 0.95
    # errors are honest on average, neither too small nor too large
    assert 0.7 < np.std(z) < 1.3
    assert np.all(t["e_teff"] == t["raw_e_teff"])  # identity noise model


def test_rv_recovered_anywhere_in_400_kms(mock, batched_result):
    _, v, *_ = mock
    t = batched_result
    dv = np.asarray(t["v_rel"]) - v
    assert np.max(np.abs(v)) > 300
    assert np.max(np.abs(dv)) < 0.5
    assert np.mean(np.abs(dv / t["e_v_rel"]) < 3) >= 0.95
    assert np.max(np.abs(t["presearch_v_rel"] - v)) < 2.0  # the cross-correlation found every one


def test_rv_on_another_data_grid(toy):
    """Data on a coarser, linear grid: the model is shifted and interpolated onto it."""
    rng = np.random.default_rng(8)
    x = toy.draw_labels(10, rng)
    v = rng.uniform(-400, 400, 10)
    wl = np.linspace(toy.emu.wavelength[2], toy.emu.wavelength[-3], 700)
    flux, ivar = noisy(toy.observe(x, v, wl), SNR, rng)
    t = fit(toy.emu, (wl, flux, ivar), FitConfig(rv_method="grid", rv_grid_step=4.0))
    assert np.max(np.abs(t["v_rel"] - v)) < 1.0
    z = (_labels(t, toy.emu.label_names) - x) / _labels(t, [f"raw_e_{n}" for n in toy.emu.label_names])
    assert np.mean(np.abs(z) < 3) >= 0.9


def test_batched_and_scipy_agree(toy, mock, batched_result):
    *_, flux, ivar = mock
    sub = slice(0, 12)
    ts = fit(toy.emu, (toy.emu.wavelength, flux[sub], ivar[sub]), FitConfig(optimizer="scipy"))
    tb = batched_result[sub]
    for n in toy.emu.label_names:
        diff = np.abs(np.asarray(ts[n]) - np.asarray(tb[n])) / np.asarray(tb[f"raw_e_{n}"])
        assert diff.max() < 0.1, n  # the batched optimiser stops within ~0.1 sigma (chi2_tolerance)
        np.testing.assert_allclose(ts[f"raw_e_{n}"], tb[f"raw_e_{n}"], rtol=0.02)
    assert np.max(np.abs(ts["v_rel"] - tb["v_rel"]) / tb["e_v_rel"]) < 0.1
    np.testing.assert_allclose(ts["chi2"], tb["chi2"], rtol=1e-4)


def test_multi_damping_steps_reach_the_same_minimum(toy, mock, batched_result):
    """With several trial dampings per step (chi2 only, then one Jacobian at the best) the fits end where
    the one-damping fits end: the same labels within 0.1 sigma and chi2; the threshold switches it on."""
    *_, flux, ivar = mock
    sub = slice(0, 12)
    n_params = len(toy.emu.label_names) + 1
    assert FitConfig().lm_trial_min_params > n_params  # the toy is a small problem: one damping by default
    configs = [FitConfig(lm_trial_min_params=n_params)]
    try:
        import torch  # noqa: F401

        configs.append(FitConfig(lm_trial_min_params=n_params, backend="torch"))
    except ImportError:
        pass
    ref = batched_result[sub]
    for cfg in configs:
        multi = fit(toy.emu, (toy.emu.wavelength, flux[sub], ivar[sub]), cfg)
        for n in toy.emu.label_names:
            d = np.abs(np.asarray(multi[n]) - np.asarray(ref[n])) / np.asarray(ref[f"raw_e_{n}"])
            assert d.max() < 0.1, (cfg.backend, n)
        np.testing.assert_allclose(multi["chi2"], ref["chi2"], rtol=1e-4)
        assert not np.any(multi["flag_bad"])


def _leaky_toy(toy):
    """The toy's weights with leaky ReLU: a piecewise linear network."""
    e = toy.emu
    return PayneMLP(e.weights, e.biases, e.label_space, e.wavelength, activation="leaky_relu")


def _leaky_observations(toy, mock, n, seed):
    """The leaky toy, and noisy Doppler-shifted spectra of the first n mock stars."""
    leaky = _leaky_toy(toy)
    x, v, *_ = mock
    flux, ivar = noisy(leaky.predict(x[:n]), SNR, np.random.default_rng(seed))
    flux = DopplerResampler(leaky.wavelength, leaky.wavelength).apply(flux[:, None, :], v[:n])[:, 0, :]
    return leaky, flux, ivar


def test_incremental_jacobians_reach_the_same_fits(toy, mock, monkeypatch):
    """A leaky-ReLU network (the toy's weights, piecewise linear) fitted with Jacobians updated from step to
    step and with full ones: the same labels within 0.05 sigma and the same chi2, and the updates ran."""
    leaky, flux, ivar = _leaky_observations(toy, mock, 16, seed=5)
    counts = {"updated": 0}
    call = JacobianCache.__call__

    def counting(self, xs, rows):
        before = self.n_updated
        out = call(self, xs, rows)
        counts["updated"] += self.n_updated - before
        return out

    monkeypatch.setattr(JacobianCache, "__call__", counting)
    spectra = (leaky.wavelength, flux, ivar)
    # the exact curvature at every step (the hidden-layer curvature would skip the cache until the end)
    exact = dict(lm_trial_min_params=len(leaky.label_names) + 1, lm_hidden_curvature=False)
    inc = fit(leaky, spectra, FitConfig(**exact))
    assert counts["updated"] > 16
    full = fit(leaky, spectra, FitConfig(**exact, incremental_jacobian=False))
    assert not np.any(inc["flag_bad"]) and not np.any(full["flag_bad"])
    for n in leaky.label_names:
        d = np.abs(np.asarray(inc[n]) - np.asarray(full[n])) / np.asarray(full[f"raw_e_{n}"])
        assert d.max() < 0.05, n
        np.testing.assert_allclose(inc[f"raw_e_{n}"], full[f"raw_e_{n}"], rtol=1e-3)
    np.testing.assert_allclose(inc["chi2"], full["chi2"], rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_kink_step_lands_on_the_crossed_hyperplane(toy, layer):
    """A star whose last step crossed one hidden unit's kink: the kink step is the minimiser of the damped
    quadratic model on that unit's hyperplane (the equality-constrained solution, solved exactly here), a
    star that crossed nothing gets none, and a coordinate held at a bound stays held."""
    from paynekit.emulators.payne import activate
    from paynekit.fitting.optimizers import _KinkPlanes, _restrict

    leaky = _leaky_toy(toy)
    fm = build_forward_model(leaky, leaky.wavelength, FitConfig(rv_range=0))
    kinks = _KinkPlanes(leaky, fm)
    w0, b0, w1, b1 = (np.asarray(a, float) for a in (leaky.weights[0], leaky.biases[0], leaky.weights[1],
                                                         leaky.biases[1]))

    def pre(x):
        z1 = w0 @ x + b0
        a1, d1 = activate(z1, "leaky_relu", derivative=True)
        return z1, d1, w1 @ a1 + b1

    rng = np.random.default_rng(3)
    x = rng.uniform(-0.2, 0.2, 4)
    z1, d1, z2 = pre(x)
    unit = int(np.argmin(np.abs(z1) if layer == 0 else np.abs(z2)))
    normal = w0[unit] if layer == 0 else (w1[unit] * d1) @ w0
    z = (z1 if layer == 0 else z2)[unit]
    x = x - (z - 1e-4) * normal / (normal @ normal)  # 1e-4 on the positive side of the kink ...
    previous = x - 2e-4 * normal / (normal @ normal)  # ... after a step from 1e-4 on the other side
    z1, _, z2 = pre(x)
    p1, _, p2 = pre(previous)
    crossed = np.concatenate([(z1 > 0) != (p1 > 0), (z2 > 0) != (p2 > 0)])
    assert np.flatnonzero(crossed).tolist() == [unit + (0 if layer == 0 else w0.shape[0])]
    z_now = (z1 if layer == 0 else z2)[unit]
    a = rng.normal(size=(4, 4))
    h = a @ a.T + 4 * np.eye(4)
    g = rng.normal(size=4)
    free = np.ones((2, 4), dtype=bool)
    theta = np.stack([x, x])
    prev = np.stack([previous, x])  # the second star's last step crossed nothing
    lo, hi = np.full((2, 4), -0.5), np.full((2, 4), 0.5)
    both = np.array([True, True])
    step, has = kinks.steps(theta, prev, both, np.stack([h, h]), np.stack([g, g]), free, lo, hi)
    assert has.tolist() == [True, False] and np.all(step[1] == 0)
    kkt = np.block([[h, normal[:, None]], [normal[None, :], np.zeros((1, 1))]])
    exact = np.linalg.solve(kkt, np.append(g, -z_now))[:4]
    np.testing.assert_allclose(step[0], exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    # on the hyperplane: what is left of z is tiny next to how far the step moves it along the normal
    assert abs(z_now + normal @ step[0]) < 1e-5 * np.linalg.norm(normal) * np.linalg.norm(step[0])
    # a coordinate held at a bound (free = False, as the optimiser restricts the normal equations)
    free[0, 2] = False
    hr, gr = _restrict(np.stack([h, h]), np.stack([g, g]), free)
    step, has = kinks.steps(theta, prev, both, hr, gr, free, lo, hi)
    assert has[0] and step[0, 2] == 0.0


def test_kink_steps_are_taken_and_fit_as_well(toy, mock, monkeypatch):
    """With the trial dampings on, a leaky-ReLU network's fits take kink steps, and end at a chi2 no higher
    than without them (within 0.5 for at least 90 % of the stars, lower in sum), with unflagged rows."""
    from paynekit.fitting.optimizers import _KinkPlanes

    leaky, flux, ivar = _leaky_observations(toy, mock, 24, seed=6)
    offered = {"n": 0}
    original = _KinkPlanes.steps

    def counting(self, *args):
        out = original(self, *args)
        offered["n"] += int(out[1].sum())
        return out

    monkeypatch.setattr(_KinkPlanes, "steps", counting)
    spectra = (leaky.wavelength, flux, ivar)
    with_kinks = fit(leaky, spectra, FitConfig(lm_trial_min_params=1, lm_kink_steps=True))
    assert offered["n"] >= 10
    plain = fit(leaky, spectra, FitConfig(lm_trial_min_params=1, lm_kink_steps=False))
    assert not np.any(with_kinks["flag_bad"]) and not np.any(plain["flag_bad"])
    d = np.asarray(with_kinks["chi2"]) - np.asarray(plain["chi2"])
    assert np.mean(d < 0.5) >= 0.9 and d.sum() <= 0.0


def test_float32_torch_and_polish_paths_agree(toy, mock, batched_result):
    _, _, _, flux, ivar = mock
    sub = slice(0, 8)
    ref = batched_result[sub]
    configs = [FitConfig(dtype="float64"), FitConfig(polish_float64=True)]
    try:
        import torch  # noqa: F401

        configs.append(FitConfig(backend="torch"))
    except ImportError:
        pass
    for cfg in configs:
        t = fit(toy.emu, (toy.emu.wavelength, flux[sub], ivar[sub]), cfg)
        for n in toy.emu.label_names:
            assert np.max(np.abs(t[n] - ref[n]) / ref[f"raw_e_{n}"]) < 0.1, (cfg, n)


# ------------------------------------------------------------------------------------------------
# covariances
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("continuum", [False, True])
def test_covariance_of_a_linear_model(continuum):
    """For an emulator linear in its labels the covariance is (A^T W A)^-1 exactly, in physical units."""
    emu = linear_mlp()
    rng = np.random.default_rng(4)
    x = emu.label_space.unscale(rng.uniform(-0.3, 0.3, (3, 3)))
    flux = emu.predict(x)
    sigma = rng.uniform(0.005, 0.02, emu.n_pixels)
    cfg = FitConfig(rv_range=0.0, dtype="float64")
    if continuum:
        cfg = cfg.replace(continuum=ChebyshevContinuum(2, regions=((emu.wavelength[0], emu.wavelength[-1]),)))
        cont_true = 1.0 + 0.1 * np.linspace(-1, 1, emu.n_pixels) ** 2
        flux = flux * cont_true
    ivar = np.broadcast_to(1 / sigma**2, flux.shape).copy()
    t = fit(emu, (emu.wavelength, flux, ivar), cfg)
    err = (_labels(t, emu.label_names) - x) / _labels(t, [f"raw_e_{n}" for n in emu.label_names])
    assert np.max(np.abs(err)) < 0.05  # noise-free data: recovered up to the stopping rule
    jac = emu.jacobian(x[0])  # (P, L) physical units, the same for every star
    for k in range(len(x)):
        design = jac
        if continuum:
            basis = np.polynomial.chebyshev.chebvander(np.linspace(-1, 1, emu.n_pixels), 2)
            f_emu = flux[k] / cont_true
            design = np.concatenate([jac * cont_true[:, None], f_emu[:, None] * basis], axis=1)
        cov = np.linalg.inv(design.T @ (design / sigma[:, None] ** 2))[:3, :3]
        e = np.sqrt(np.diag(cov))
        # with a continuum the design depends (weakly) on the fitted point, which the stopping rule
        # leaves a few hundredths of a sigma from the truth
        tol = 1e-4 if continuum else 1e-7
        for i, n in enumerate(emu.label_names):
            np.testing.assert_allclose(t[f"raw_e_{n}"][k], e[i], rtol=tol)
        rho = cov / np.outer(e, e)
        np.testing.assert_allclose(t["rho_teff_logg"][k], rho[0, 1], atol=tol)
        np.testing.assert_allclose(t["rho_teff_fe_h"][k], rho[0, 2], atol=tol)
        np.testing.assert_allclose(t["rho_logg_fe_h"][k], rho[1, 2], atol=tol)


@pytest.mark.slow
def test_correlations_match_monte_carlo(toy):
    """Formal covariance (RV free, non-linear model) against the scatter of 150 noise realisations."""
    rng = np.random.default_rng(9)
    x = toy.draw_labels(1, rng)
    clean = toy.observe(np.repeat(x, 150, axis=0), np.full(150, 57.0))
    flux, ivar = noisy(clean, 50.0, rng)
    t = fit(toy.emu, (toy.emu.wavelength, flux, ivar), FitConfig(presearch_size=1024))
    names = list(toy.emu.label_names) + ["v_rel"]
    est = np.stack([np.asarray(t[n]) for n in names], axis=1)
    emp = np.cov(est.T)
    e_emp = np.sqrt(np.diag(emp))
    for i, n in enumerate(toy.emu.label_names):
        assert abs(np.median(t[f"raw_e_{n}"]) / e_emp[i] - 1) < 0.2, n
    rho_emp = emp / np.outer(e_emp, e_emp)
    for i, a in enumerate(toy.emu.label_names):
        for j in range(i + 1, len(toy.emu.label_names)):
            b = toy.emu.label_names[j]
            assert abs(np.median(t[f"rho_{a}_{b}"]) - rho_emp[i, j]) < 0.2, (a, b)


# ------------------------------------------------------------------------------------------------
# masks, bad input, caller's arrays
# ------------------------------------------------------------------------------------------------
def test_masked_pixels_do_not_change_the_result(toy, mock):
    _, _, _, flux, ivar = mock
    flux, ivar = flux[:6].copy(), ivar[:6].copy()
    rng = np.random.default_rng(1)
    mask = rng.uniform(size=flux.shape) < 0.1
    garbage = flux.copy()
    garbage[mask] = rng.choice([np.nan, np.inf, 1e6, -3.0], size=mask.sum())
    ivar_g = ivar.copy()
    ivar_g[:3][mask[:3]] = np.nan  # junk ivar too, in half of them
    ref_ivar = np.where(mask, 0.0, ivar)
    clean_masked = np.where(mask, 1.0, flux)
    t1 = fit(toy.emu, (toy.emu.wavelength, garbage, np.where(np.arange(6)[:, None] < 3, ivar_g, ivar), mask))
    t2 = fit(toy.emu, (toy.emu.wavelength, clean_masked, ref_ivar))
    for n in [*toy.emu.label_names, "v_rel", "chi2"]:
        np.testing.assert_allclose(t1[n], t2[n], rtol=1e-9, atol=1e-9)
    assert np.all(t1["n_pixels"] == t2["n_pixels"])
    assert not np.any(t1["flag_bad"])


def test_bad_inputs_become_flagged_rows(toy, mock):
    _, _, _, flux, ivar = mock
    wl = toy.emu.wavelength
    good = [Spectrum(wl, flux[i], ivar[i], meta={"id": f"star{i}"}) for i in range(3)]
    all_nan = Spectrum(wl, np.full(wl.size, np.nan), ivar[3], meta={"id": "nan"})
    zero_ivar = Spectrum(wl, flux[4], np.zeros(wl.size), meta={"id": "zero"})
    short = Spectrum(wl[:500], flux[5, :500], ivar[5, :500], meta={"id": "short"})
    spectra = [good[0], all_nan, good[1], zero_ivar, short, good[2]]
    t = fit(toy.emu, spectra)
    assert list(t["id"]) == ["star0", "nan", "star1", "zero", "short", "star2"]
    assert list(t["flag_bad"]) == [False, True, False, True, True, False]
    assert "not finite" in t["flag_reason"][1]
    assert "ivar" in t["flag_reason"][3]
    assert "500 pixels" in t["flag_reason"][4]
    assert np.all(np.isnan(t["teff"][[1, 3, 4]]))
    ref = fit(toy.emu, good)
    for n in [*toy.emu.label_names, "v_rel", "raw_e_teff"]:
        np.testing.assert_allclose(np.asarray(t[n])[[0, 2, 5]], ref[n], rtol=1e-10)
    # ragged tuple input: a row of the wrong length is flagged, not an exception
    rows = [flux[0], flux[1][:-7]]
    t2 = fit(toy.emu, (wl, rows, [ivar[0], ivar[1][:-7]]))
    assert list(t2["flag_bad"]) == [False, True]
    assert "pixels" in t2["flag_reason"][1]


def test_caller_arrays_are_not_modified(toy, mock):
    _, _, _, flux, ivar = mock
    f = flux[:3].copy()
    f[0, :10] = np.nan
    iv = ivar[:3].copy()
    iv[1, 20:30] = 0.0
    m = np.zeros(f.shape, dtype=bool)
    m[2, 50:60] = True
    wl = toy.emu.wavelength.copy()
    copies = [a.copy() for a in (wl, f, iv, m)]
    batch = SpectrumBatch(wl, f, iv, m)
    bcopies = [a.copy() for a in (batch.flux, batch.ivar, batch.mask)]
    fit(toy.emu, (wl, f, iv, m), FitConfig(continuum=ChebyshevContinuum(1)))
    fit(toy.emu, batch, FitConfig(optimizer="scipy", presearch_size=256))
    for a, b in zip((wl, f, iv, m), copies):
        np.testing.assert_array_equal(a, b)
    for a, b in zip((batch.flux, batch.ivar, batch.mask), bcopies):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------------
def test_frozen_labels_and_priors(toy, mock):
    x, _, _, flux, ivar = mock
    sub = slice(0, 6)
    frozen_val = float(x[0, 3])
    t = fit(toy.emu, (toy.emu.wavelength, flux[:1], ivar[:1]), FitConfig(frozen={"alpha_fe": frozen_val}))
    assert t["alpha_fe"][0] == frozen_val
    assert np.isnan(t["raw_e_alpha_fe"][0]) and np.isnan(t["rho_teff_alpha_fe"][0])
    assert abs(t["teff"][0] - x[0, 0]) < 4 * t["raw_e_teff"][0]
    # a strong prior pulls the label to its mean, a weak one changes nothing
    strong = fit(toy.emu, (toy.emu.wavelength, flux[sub], ivar[sub]), FitConfig(priors={"logg": (3.0, 1e-3)}))
    assert np.max(np.abs(strong["logg"] - 3.0)) < 5e-3
    assert np.all(strong["raw_e_logg"] < 1.1e-3)
    weak = fit(toy.emu, (toy.emu.wavelength, flux[sub], ivar[sub]), FitConfig(priors={"logg": (3.0, 1e3)}))
    free = fit(toy.emu, (toy.emu.wavelength, flux[sub], ivar[sub]))
    np.testing.assert_allclose(weak["logg"], free["logg"], atol=1e-3 * np.asarray(free["raw_e_logg"]).max())


def test_only_rv_free_and_grid_reuse(toy, mock):
    x, v, _, flux, ivar = mock
    frozen = dict(zip(toy.emu.label_names, (float(a) for a in x[0])))
    t = fit(toy.emu, (toy.emu.wavelength, flux[:1], ivar[:1]), FitConfig(frozen=frozen))
    assert abs(t["v_rel"][0] - v[0]) < 3 * t["e_v_rel"][0]
    assert np.isnan(t["raw_e_teff"][0]) and t["teff"][0] == frozen["teff"]
    cfg = FitConfig(presearch_size=512)
    grid = presearch_grid(toy.emu, toy.emu.wavelength, cfg)
    a = fit(toy.emu, (toy.emu.wavelength, flux[:3], ivar[:3]), cfg, presearch_grid=grid)
    b = fit(toy.emu, (toy.emu.wavelength, flux[:3], ivar[:3]), cfg)
    np.testing.assert_array_equal(a["teff"], b["teff"])


def test_continuum_fit_recovers_labels(toy):
    rng = np.random.default_rng(21)
    x = toy.draw_labels(8, rng)
    v = rng.uniform(-200, 200, 8)
    wl = toy.emu.wavelength
    cont = 0.8 + 0.3 * rng.uniform(size=(8, 1)) * (1 + 0.2 * np.sin((wl - wl[0]) / 40.0))[None, :]
    flux, ivar = noisy(toy.observe(x, v) * cont, SNR, rng)
    cfg = FitConfig(continuum=ChebyshevContinuum(4))
    res = fit(toy.emu, (wl, flux, ivar / cont**2 * 0 + ivar), cfg, return_models=True)
    assert isinstance(res, FitResult)
    t = res.table
    z = (_labels(t, toy.emu.label_names) - x) / _labels(t, [f"raw_e_{n}" for n in toy.emu.label_names])
    assert np.mean(np.abs(z) < 3) >= 0.9
    covered = np.isfinite(res.continuum)
    assert np.max(np.abs(res.continuum - cont)[covered] / cont[np.nonzero(covered)[0], 0]) < 0.02
    resid = (flux - res.model_flux)[covered] * np.sqrt(ivar[covered])
    assert abs(np.std(resid) - 1) < 0.05


def test_return_models_without_continuum(toy, mock):
    _, _, clean, flux, ivar = mock
    res = fit(toy.emu, (toy.emu.wavelength, flux[:4], ivar[:4]), return_models=True)
    ok = np.isfinite(res.model_flux)
    assert ok.mean() > 0.9
    assert np.all(res.continuum[ok] == 1.0)
    assert np.max(np.abs(res.model_flux - clean[:4])[ok]) < 0.01  # model error << noise (0.01 per pixel)
    assert "model_flux" not in res.table.colnames


def test_noise_model_and_parabola(toy, mock, tmp_path):
    _, _, _, flux, ivar = mock
    nm = NoiseModel(scale={"teff": 2.0}, floor={"logg": 0.05})
    path = nm.write(tmp_path / "noise.json")
    cfg = FitConfig(
        noise_model=path, parabola_uncertainty=True, parabola_resolution=22500.0, presearch_size=512
    )
    t = fit(toy.emu, (toy.emu.wavelength, flux[:4], ivar[:4]), cfg)
    np.testing.assert_allclose(t["e_teff"], 2 * t["raw_e_teff"])
    np.testing.assert_allclose(t["e_logg"], np.hypot(t["raw_e_logg"], 0.05))
    np.testing.assert_allclose(t["e_fe_h"], t["raw_e_fe_h"])
    # Zeta-Payne's chi2 rise (chi2_min sqrt(2 / N_deg)) is far above 1: its errors exceed the formal ones
    assert np.all(np.isfinite(t["zeta_e_teff"])) and np.all(t["zeta_e_teff"] > t["raw_e_teff"])
    np.savez(
        tmp_path / "noise.npz", label_names=np.array(["teff"]), scale=np.array([1.5]), floor=np.array([0.0])
    )
    assert NoiseModel.read(tmp_path / "noise.npz").scale == {"teff": 1.5}
    with pytest.raises(InputError, match="does not have"):
        fit(
            toy.emu, (toy.emu.wavelength, flux[:1], ivar[:1]), FitConfig(noise_model=NoiseModel({"vsini": 2}))
        )
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(FileFormatError):
        NoiseModel.read(tmp_path / "bad.json")


def test_rv_off_fixes_velocity(toy):
    rng = np.random.default_rng(6)
    x = toy.draw_labels(3, rng)
    flux, ivar = noisy(toy.observe(x, np.zeros(3)), SNR, rng)
    t = fit(toy.emu, (toy.emu.wavelength, flux, ivar), FitConfig(rv_range=0.0))
    assert np.all(t["v_rel"] == 0.0) and np.all(np.isnan(t["e_v_rel"]))
    assert np.all(t["n_pixels"] == toy.emu.n_pixels)


def test_config_validation():
    with pytest.raises(TypeError):
        FitConfig(optimiser="batched")  # misspelt option: an error, not ignored
    with pytest.raises(InputError, match="unknown FitConfig option"):
        FitConfig.from_dict({"rv_range": 100.0, "tolerance": 1e-3})
    with pytest.raises(InputError, match="optimizer"):
        FitConfig(optimizer="lbfgs")
    with pytest.raises(InputError, match="cuda"):
        FitConfig(device="cuda")
    with pytest.raises(InputError, match="both"):
        FitConfig(resolution=2000.0, lsf=GaussianLSF(2000.0))
    with pytest.raises(InputError, match="resolving power"):
        FitConfig(parabola_uncertainty=True)
    with pytest.raises(InputError, match="frozen and given a prior"):
        FitConfig(frozen={"teff": 5000.0}, priors={"teff": (5000.0, 10.0)})
    for bad in ((1.5,), (0.0,), ("half",), (True,)):
        with pytest.raises(InputError, match="lm_backtracking"):
            FitConfig(lm_backtracking=bad)
    assert FitConfig(lm_backtracking=()).lm_backtracking == ()
    with pytest.raises(InputError, match="lm_kink_steps"):
        FitConfig(lm_kink_steps="yes")
    cfg = FitConfig(rv_range=100.0)
    assert cfg.replace(seed=3).rv_range == 100.0 and cfg.replace(seed=3).seed == 3
    with pytest.raises(InputError, match="teff"):
        FitConfig(frozen={"teff": "hot"})
    assert parse_assignments(["teff=4800", " logg = 2.5"]) == {"teff": 4800.0, "logg": 2.5}
    for bad in (["teff"], ["teff=hot"], ["=3"], ["teff=nan"]):
        with pytest.raises(InputError, match="name=value"):
            parse_assignments(bad)


def test_unknown_label_names_are_errors(toy, mock):
    _, _, _, flux, ivar = mock
    with pytest.raises(InputError, match="vsini"):
        fit(toy.emu, (toy.emu.wavelength, flux[:1], ivar[:1]), FitConfig(frozen={"vsini": 3.0}))


# ------------------------------------------------------------------------------------------------
# input files for the command line
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_bundle_round_trip_and_mask_files(tmp_path, suffix, mock, toy):
    _, _, _, flux, ivar = mock
    wl = toy.emu.wavelength
    mask = np.zeros(flux[:3].shape, dtype=bool)
    mask[:, :5] = True
    batch = SpectrumBatch(wl, flux[:3], ivar[:3], mask, ids=["a", "b", "c"])
    path = write_bundle(tmp_path / f"bundle{suffix}", batch)
    back = read_bundle(path)
    assert back.ids == ["a", "b", "c"]
    np.testing.assert_array_equal(back.flux, batch.flux)
    np.testing.assert_array_equal(back.mask, mask)
    np.savez(tmp_path / "m.npz", mask=np.arange(wl.size) < 10)
    assert read_pixel_mask(tmp_path / "m.npz", wl).sum() == 10
    (tmp_path / "m.txt").write_text(f"# masked intervals\n{wl[0] - 1} {wl[3]}\n{wl[100]} {wl[101]}\n")
    assert read_pixel_mask(tmp_path / "m.txt", wl).sum() == 6
    np.savez(tmp_path / "nokeys.npz", flux=flux[:1])
    with pytest.raises(FileFormatError, match="wavelength"):
        read_bundle(tmp_path / "nokeys.npz")
    with pytest.raises(FileFormatError, match="boolean"):
        read_pixel_mask(tmp_path / "nokeys.npz", wl)


# ------------------------------------------------------------------------------------------------
# the real networks (skip without ../shared/data)
# ------------------------------------------------------------------------------------------------
@pytest.mark.shared
def test_real_perpixel_network_recovery():
    from paynekit.emulators import load_emulator

    from .conftest import shared_path

    emu = load_emulator(
        shared_path("emulators/apogee_5label_perpixel_dwarfs_2018.npz"),
        label_names=("teff", "logg", "fe_h", "alpha_fe", "v_macro"),
    )
    rng = np.random.default_rng(20251122)
    x = emu.label_space.unscale(rng.uniform(-0.4, 0.4, (6, 5)))
    v = np.array([-350.0, -120.0, 0.0, 40.0, 210.0, 390.0])
    cfg0 = FitConfig(rv_range=0.0, dtype="float64", presearch_size=16)
    # data made by the fitter's own forward model at known v (exact shifts of a per-pixel network)
    fm = build_forward_model(emu, emu.wavelength, cfg0.replace(rv_range=500.0))
    clean = model_spectra(
        fm,
        EmulatorEvaluator(emu, "float64"),
        np.concatenate([emu.label_space.scale(x), v[:, None]], axis=1),
        jacobian=False,
    )[:, 0]
    cover = fm.resampler.coverage(v)
    flux, ivar = noisy(np.where(cover, clean, 1.0), SNR, rng)
    ivar = ivar * cover
    t = fit(emu, (emu.wavelength, flux, ivar), FitConfig(presearch_size=1024))
    assert np.max(np.abs(t["v_rel"] - v)) < 0.5
    z = (_labels(t, emu.label_names) - x) / _labels(t, [f"raw_e_{n}" for n in emu.label_names])
    assert np.mean(np.abs(z) < 3) >= 0.9


@pytest.mark.shared
@pytest.mark.slow
def test_real_optical_network_at_low_resolution():
    """The 22-label optical MLP (air wavelengths), data at R = 2000 on a coarser vacuum log grid."""
    from paynekit.emulators import load_emulator
    from paynekit.instrument import DopplerResampler
    from paynekit.wavelength import air_to_vacuum

    from .conftest import shared_path

    path = shared_path("emulators/optical_22label_mlp_giants_4000-5000.npz")
    emu = load_emulator(path)
    with np.load(path) as f:
        truth = f["validation_labels"][:3].astype(np.float64)
    truth = np.clip(truth, emu.label_space.x_min, emu.label_space.x_max)
    r_power = 2000.0
    wl_vac = air_to_vacuum(emu.wavelength)
    dln = 1.0 / (3.0 * r_power)
    wl = wl_vac[0] * 1.01 * np.exp(dln * np.arange(int(np.log(wl_vac[-1] / wl_vac[0] / 1.03) / dln)))
    v = np.array([-210.0, 15.0, 160.0])
    conv = GaussianLSF(r_power).convolve(wl_vac, emu.predict(truth))
    clean = DopplerResampler(wl_vac, wl).apply(conv[:, None, :], v)[:, 0, :]
    rng = np.random.default_rng(3)
    flux, ivar = noisy(clean, 100.0, rng)
    t = fit(emu, (wl, flux, ivar), FitConfig(resolution=r_power, presearch_size=1024))
    assert np.max(np.abs(t["v_rel"] - v)) < 1.0
    for n in ("teff", "logg", "mh"):
        assert np.all(np.abs(t[n] - truth[:, emu.label_space.index(n)]) < 5 * t[f"raw_e_{n}"]), n
