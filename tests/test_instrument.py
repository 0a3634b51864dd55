"""Instrument: Doppler shift and interpolation, line-spread functions, continuum designs."""

from __future__ import annotations

import numpy as np
import pytest

from paynekit.errors import InputError
from paynekit.instrument import (
    GAUSSIAN_FWHM_PER_SIGMA,
    SPEED_OF_LIGHT_KMS,
    BandedOperator,
    ChebyshevContinuum,
    DopplerResampler,
    GaussianLSF,
    NoContinuum,
    PixelKernelLSF,
    cubic_weights,
    default_continuum_regions,
    doppler_factor,
    grid_segments,
)
from paynekit.wavelength import APOGEE_CHIPS, payne_apogee_wavelength


def log_grid(n=600, start=15200.0, step=1.4e-5):
    return start * np.exp(step * np.arange(n))


def gaussian_line(wl, centre, sigma, depth=0.5):
    return 1.0 - depth * np.exp(-0.5 * ((wl - centre) / sigma) ** 2)


def test_doppler_factor_is_classical():
    assert doppler_factor(0.0) == 1.0
    np.testing.assert_allclose(doppler_factor(299.792458), 1.001)
    assert SPEED_OF_LIGHT_KMS == 299792.458


def test_cubic_weights_interpolate_and_sum_to_one():
    t = np.linspace(0, 0.999, 50)
    w, dw = cubic_weights(t, derivative=True)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    np.testing.assert_allclose(dw.sum(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(cubic_weights(np.array([0.0]))[0], [[0, 1, 0, 0]])
    # exact for quadratics: sum_k w_k p(k - 1) = p(t)
    p = np.array([-1.0, 0.0, 1.0, 2.0])
    np.testing.assert_allclose(w @ (3 * p**2 - p + 2), 3 * t**2 - t + 2, atol=1e-12)


def test_grid_segments_split_at_gaps():
    wl = payne_apogee_wavelength()
    segs = grid_segments(wl)
    assert [b - a for a, b in segs] == [2920, 2400, 1894]
    assert grid_segments(log_grid()) == [(0, 600)]


@pytest.mark.parametrize("v", [-400.0, -37.3, 0.0, 12.9, 333.3])
def test_shift_moves_a_line_to_lambda_times_one_plus_v_over_c(v):
    wl = log_grid(1200)
    centre, sigma = 15330.0, 0.6
    rest = gaussian_line(wl, centre, sigma)
    r = DopplerResampler(wl, wl)
    assert r.fast
    out = r.apply(rest[None, None, :], np.array([v]))[0, 0]
    expected = gaussian_line(wl, centre * doppler_factor(v), sigma)
    cov = r.coverage(np.array([v]))[0]
    assert np.max(np.abs(out - expected)[cov]) < 2e-3  # cubic interpolation of a 2.8-pixel line


def test_fast_and_general_paths_agree_and_derivative_is_exact():
    rng = np.random.default_rng(0)
    wl = np.concatenate([log_grid(300), log_grid(300)[-1] * np.exp(1.4e-5 * np.arange(100, 400))])
    vals = rng.normal(size=(5, 3, wl.size))
    v = np.array([0.0, 0.4, -0.3, 151.0, -399.0])
    fast = DopplerResampler(wl, wl)
    general = DopplerResampler(wl, wl)
    general.fast = False  # force the gather path on the same grid
    assert fast.fast and len(fast.segments) == 2
    a = fast.apply(vals, v, derivative=True)
    b = general.apply(vals, v, derivative=True)
    cov = fast.coverage(v)
    np.testing.assert_array_equal(cov, general.coverage(v))
    np.testing.assert_allclose(
        a[np.broadcast_to(cov[:, None], a.shape)], b[np.broadcast_to(cov[:, None], b.shape)], atol=1e-8
    )
    np.testing.assert_array_equal(a[0, :3], vals[0])  # v = 0 on the same grid is the identity
    h = 1e-4
    cov = fast.coverage(v - 1.0, v + 1.0)  # covered over the whole difference interval
    for r in (fast, general):
        fd = (r.apply(vals, v + h)[:, 0] - r.apply(vals, v - h)[:, 0]) / (2 * h)
        d = r.apply(vals, v, derivative=True)[:, 3]
        assert np.max(np.abs(fd - d)[cov]) < 1e-4 * np.abs(d[cov]).max()


def test_doppler_shift_in_cache_blocks_equals_one_block(monkeypatch):
    """Rows are shifted in cache-sized blocks (views for runs of rows, copies otherwise): same numbers."""
    import paynekit.instrument as instrument

    rng = np.random.default_rng(3)
    wl = np.concatenate([log_grid(300), log_grid(300)[-1] * np.exp(1.4e-5 * np.arange(100, 400))])
    vals = rng.normal(size=(9, 3, wl.size)).astype(np.float32)
    v = np.array([0.1, 0.2, -0.1, 151.0, 0.3, -399.0, 151.2, 0.0, -0.2])  # runs and scattered rows
    r = DopplerResampler(wl, wl)
    whole = r.apply(vals, v, derivative=True)
    monkeypatch.setattr(instrument, "DOPPLER_BLOCK_BYTES", 2 * 3 * wl.size * 4)  # two rows per block
    blocked = r.apply(vals, v, derivative=True)
    np.testing.assert_array_equal(blocked, whole)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_doppler_shift_equals_numpy(dtype, monkeypatch):
    """The numba kernel of the fast path gives the numpy path's numbers bit for bit (edges, both signs of
    the sub-pixel shift, shifts larger than a segment, the derivative channel)."""
    from paynekit._kernels import numba_enabled

    if not numba_enabled():
        pytest.skip("numba is not importable")
    rng = np.random.default_rng(11)
    wl = np.concatenate([log_grid(300), log_grid(300)[-1] * np.exp(1.4e-5 * np.arange(100, 400))])
    vals = rng.normal(size=(40, 3, wl.size)).astype(dtype)
    v = np.concatenate([[0.0, 0.4, -0.3, 151.0, -399.0, 1e-9, -1e-9, 2000.0], rng.uniform(-500, 500, 32)])
    r = DopplerResampler(wl, wl)
    for derivative in (False, True):
        compiled = r.apply(vals, v, derivative=derivative)
        monkeypatch.setenv("PAYNEKIT_DISABLE_NUMBA", "1")
        plain = r.apply(vals, v, derivative=derivative)
        monkeypatch.delenv("PAYNEKIT_DISABLE_NUMBA")
        assert compiled.dtype == plain.dtype == dtype
        np.testing.assert_array_equal(compiled, plain)


def test_resampling_onto_another_grid():
    wl_model = log_grid(1200)
    wl_data = np.linspace(wl_model[10], wl_model[-10], 700)
    r = DopplerResampler(wl_model, wl_data)
    assert not r.fast and not r.same_grid
    rest = gaussian_line(wl_model, 15300.0, 1.0)
    for v in (0.0, 250.0):
        out = r.apply(rest[None, None], np.array([v]))[0, 0]
        cov = r.coverage(np.array([v]))[0]
        assert np.max(np.abs(out - gaussian_line(wl_data, 15300.0 * doppler_factor(v), 1.0))[cov]) < 1e-3
    # pixels whose rest wavelength (lambda / (1 + v/c)) falls below the model grid are not covered
    cov = r.coverage(np.array([400.0]))[0]
    assert not cov[0] and cov[-1] and cov[350]
    cov = r.coverage(np.array([-400.0]))[0]
    assert cov[0] and not cov[-1]


def test_gaussian_lsf_fixed_kernel_with_the_right_width():
    wl = log_grid(2000)
    r_power = 8000.0
    op = GaussianLSF(r_power).operator(wl)
    assert op.fixed_kernel
    assert op.half_width >= 4 * (1 / r_power / GAUSSIAN_FWHM_PER_SIGMA) / 1.4e-5
    # a narrow line convolved: its width adds in quadrature with lambda / (2.3548 R)
    centre, s_line = wl[1000], 0.05
    line = gaussian_line(wl, centre, s_line, depth=0.01)
    out = op.apply(line)
    absorb = 1 - out
    mean = np.sum(wl * absorb) / absorb.sum()
    width = np.sqrt(np.sum((wl - mean) ** 2 * absorb) / absorb.sum())
    expected = np.hypot(s_line, centre / r_power / GAUSSIAN_FWHM_PER_SIGMA)
    assert abs(width / expected - 1) < 0.01
    assert abs(mean - centre) < 1e-3
    np.testing.assert_allclose(op.apply(np.ones((2, wl.size))), 1.0)  # flux conserving, edges too


def test_gaussian_lsf_on_a_general_grid_is_a_sparse_matrix():
    wl = np.sort(np.random.default_rng(2).uniform(5000, 5100, 900))
    op = GaussianLSF(3000.0).operator(wl)
    assert not op.fixed_kernel
    x = np.random.default_rng(3).normal(size=(3, wl.size))
    sp = op.to_sparse()
    np.testing.assert_allclose(op.apply(x), (sp @ x.T).T, atol=1e-12)
    np.testing.assert_allclose(np.asarray(sp.sum(axis=1)).ravel(), 1.0)
    # the kernel reaches at least 4 sigma
    sigma = wl / 3000.0 / GAUSSIAN_FWHM_PER_SIGMA
    row = sp.getrow(450).toarray().ravel()
    reach = np.abs(wl[row > 0] - wl[450]).max()
    assert reach >= 4 * sigma[450] - np.diff(wl).max()


def test_pixel_kernel_lsf_and_band_edges():
    kern = np.tile([1.0, 2.0, 1.0], (50, 1))
    op = PixelKernelLSF(kern).operator(np.arange(50.0) + 5000)
    x = np.zeros(50)
    x[10] = 1.0
    np.testing.assert_allclose(op.apply(x)[9:12], [0.25, 0.5, 0.25])
    np.testing.assert_allclose(op.apply(np.ones(50)), 1.0)
    with pytest.raises(InputError, match="odd"):
        PixelKernelLSF(np.ones((50, 2)))
    with pytest.raises(InputError, match="50 pixels"):
        op.apply(np.ones(40))
    assert isinstance(op, BandedOperator)


def test_lsf_validation():
    with pytest.raises(InputError):
        GaussianLSF(-1.0)
    with pytest.raises(InputError):
        GaussianLSF(np.array([1000.0, 2000.0])).operator(log_grid(10))


def test_chebyshev_continuum_design():
    wl = payne_apogee_wavelength()
    assert default_continuum_regions(wl) == tuple(APOGEE_CHIPS)
    design = ChebyshevContinuum(3).design(wl)
    assert len(design.slices) == 3 and design.n_coefficients == 12
    assert design.in_region.all()
    np.testing.assert_allclose(design.bases[0][:, 0], 1.0)
    assert np.all(np.abs(design.bases[1]) <= 1 + 1e-12)
    coef = np.zeros((1, 12))
    coef[0, [0, 4, 8]] = [1.0, 2.0, 3.0]
    np.testing.assert_allclose(design.evaluate(coef)[0, design.slices[1]], 2.0)
    # an optical grid without gaps is one region
    optical = np.linspace(4000, 5000, 500)
    assert ChebyshevContinuum(2).design(optical).regions == ((4000.0, 5000.0),)
    assert NoContinuum().design(wl) is None
    with pytest.raises(InputError):
        ChebyshevContinuum(2, regions=((5000, 4000),))
    with pytest.raises(InputError, match="no pixel"):
        ChebyshevContinuum(2, regions=((100, 200),)).design(wl)
    with pytest.raises(InputError):
        ChebyshevContinuum(-1)


def test_torch_and_numpy_instrument_agree():
    torch = pytest.importorskip("torch")
    wl = log_grid(400)
    rng = np.random.default_rng(5)
    vals = rng.normal(size=(3, 2, wl.size))
    v = np.array([3.0, -250.0, 0.2])
    r = DopplerResampler(wl, wl)
    ref = r.apply(vals, v, derivative=True)
    got = r.apply(torch.as_tensor(vals), v, derivative=True).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-12)
    op = GaussianLSF(5000.0).operator(wl)
    np.testing.assert_allclose(op.apply(torch.as_tensor(vals)).numpy(), op.apply(vals), atol=1e-12)
    wl2 = np.linspace(wl[5], wl[-5], 300)
    r2 = DopplerResampler(wl, wl2)
    np.testing.assert_allclose(
        r2.apply(torch.as_tensor(vals), v, derivative=True).numpy(),
        r2.apply(vals, v, derivative=True),
        atol=1e-12,
    )
