"""The pre-search label set: Sobol over the box, part of it on the scaled-solar subspace."""

from __future__ import annotations

import numpy as np
import pytest

from paynekit.emulators import PayneMLP
from paynekit.errors import InputError
from paynekit.fitting import FitConfig
from paynekit.fitting.forward import build_forward_model
from paynekit.fitting.presearch import presearch_label_points, scaled_solar_points, sobol_points
from paynekit.labels import LabelSpace, apogee_label_space


def _mlp(ls, n_pixels=50, seed=3):
    g = np.random.default_rng(seed)
    n = len(ls.names)
    wl = 10 ** (4.18 + 6e-6 * np.arange(n_pixels))
    w = [g.normal(0, 1, (8, n)), g.normal(0, 0.3, (8, 8)), g.normal(0, 0.02, (n_pixels, 8))]
    b = [g.normal(0, 0.3, 8), g.normal(0, 0.3, 8), np.ones(n_pixels)]
    return PayneMLP(w, b, ls, wl)


def _fm(emu, **kw):
    return build_forward_model(emu, emu.wavelength, FitConfig(rv_range=0.0, **kw))


def test_scaled_solar_points_tie_every_x_h_to_fe_h():
    ls = apogee_label_space()
    fm = _fm(_mlp(ls))
    pts = scaled_solar_points(fm, 1024, -0.5, 0.5, seed=4)
    assert pts.shape == (1024, 25)
    phys = ls.unscale(pts)
    names = list(ls.names)
    fe = phys[:, names.index("fe_h")]
    for i, name in enumerate(names):
        if name.endswith("_h") and name != "fe_h":  # every APOGEE [X/H] box is [Fe/H]'s, so no clipping
            np.testing.assert_allclose(phys[:, i], fe, atol=1e-12)
    # the untied labels (teff, logg, v_turb, v_macro, c12_c13, fe_h) fill the box
    for name in ("teff", "logg", "v_turb", "v_macro", "c12_c13", "fe_h"):
        col = pts[:, names.index(name)]
        assert col.min() < -0.49 and col.max() > 0.49
        assert abs(np.mean(col)) < 0.02
    np.testing.assert_array_equal(pts, scaled_solar_points(fm, 1024, -0.5, 0.5, seed=4))
    assert not np.array_equal(pts, scaled_solar_points(fm, 1024, -0.5, 0.5, seed=5))


def test_scaled_solar_points_set_x_fe_to_zero_and_clip_to_the_box():
    ls = LabelSpace(("teff", "logg", "fe_h", "alpha_fe", "mg_h"), np.array([4000, 1, -1, 0.05, -0.5]),
                    np.array([6000, 5, 0.5, 0.4, 0.5]))
    pts = scaled_solar_points(_fm(_mlp(ls)), 512, -0.5, 0.5, seed=0)
    phys = ls.unscale(pts)
    np.testing.assert_allclose(phys[:, 3], 0.05)  # alpha_fe = 0 lies below its box: clipped to x_min
    np.testing.assert_allclose(phys[:, 4], np.clip(phys[:, 2], -0.5, 0.5), atol=1e-12)
    assert np.all((pts >= -0.5) & (pts <= 0.5))


def test_scaled_solar_points_follow_a_frozen_metallicity():
    ls = apogee_label_space()
    fm = _fm(_mlp(ls), frozen={"fe_h": -1.0, "teff": 4500.0})
    pts = scaled_solar_points(fm, 256, -0.5, 0.5, seed=1)
    free_names = fm.free_names
    assert pts.shape == (256, 23) and "fe_h" not in free_names
    phys = ls.unscale(fm.full_scaled(pts))
    for name in ("mg_h", "c_h", "ge_h"):
        np.testing.assert_allclose(phys[:, list(ls.names).index(name)], -1.0, atol=1e-12)
    np.testing.assert_allclose(phys[:, 0], 4500.0)


def test_no_metallicity_label_means_plain_sobol():
    ls = LabelSpace(("teff", "logg", "v_macro"), np.array([4000.0, 1.0, 0.0]), np.array([6000.0, 5.0, 10.0]))
    fm = _fm(_mlp(ls))
    assert scaled_solar_points(fm, 64, -0.5, 0.5, seed=0) is None
    cfg = FitConfig(rv_range=0.0, presearch_size=64, seed=9)
    np.testing.assert_array_equal(presearch_label_points(fm, cfg), sobol_points(64, 3, -0.5, 0.5, 9))


def test_presearch_set_mixes_the_two_in_the_configured_fraction():
    ls = apogee_label_space()
    fm = _fm(_mlp(ls))
    names = list(ls.names)
    for frac, n_tied in ((0.0, 0), (0.25, 250), (1.0, 1000)):
        cfg = FitConfig(rv_range=0.0, presearch_size=1000, presearch_scaled_solar=frac)
        pts = ls.unscale(presearch_label_points(fm, cfg))
        assert pts.shape == (1000, 25)
        tied = np.all(np.abs(pts[:, [names.index(k) for k in ("c_h", "mg_h", "ni_h")]]
                             - pts[:, [names.index("fe_h")]]) < 1e-9, axis=1)
        assert tied.sum() == n_tied


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half"])
def test_presearch_scaled_solar_must_be_a_fraction(bad):
    with pytest.raises(InputError, match="presearch_scaled_solar"):
        FitConfig(presearch_scaled_solar=bad)


@pytest.mark.parametrize("shared", [True, False])
def test_compiled_interpolation_equals_numpy(shared, monkeypatch):
    """The numba form of interpolate_data gives the numpy numbers: chip gaps, masked neighbours, wavelengths
    off the grid, one wavelength set for all rows or one per row."""
    from paynekit._kernels import numba_enabled
    from paynekit.fitting.presearch import interpolate_data
    from paynekit.wavelength import payne_apogee_wavelength

    if not numba_enabled():
        pytest.skip("numba is not importable")
    wl = payne_apogee_wavelength()
    rng = np.random.default_rng(8)
    n = 6
    data = rng.normal(1.0, 0.02, (n, wl.size))
    w = rng.uniform(1e3, 1e4, (n, wl.size))
    w[rng.random(w.shape) < 0.05] = 0.0  # masked pixels
    lam = np.exp(np.linspace(np.log(wl[0]) - 1e-3, np.log(wl[-1]) + 1e-3, 9000))  # beyond both ends and gaps
    if not shared:
        lam = lam[None, :] * (1.0 + rng.uniform(-1e-3, 1e-3, (n, 1)))
    compiled = interpolate_data(wl, lam, data, w)
    monkeypatch.setenv("PAYNEKIT_DISABLE_NUMBA", "1")
    plain = interpolate_data(wl, lam, data, w)
    for a, b in zip(compiled, plain):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=0)
        np.testing.assert_array_equal(a == 0, b == 0)
    assert 0 < np.mean(compiled[1] == 0) < 0.5
