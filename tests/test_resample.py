"""Resampling onto a model grid: exactness, variance propagation (Monte Carlo), coverage, gaps, air/vacuum."""

import numpy as np
import pytest

from paynekit.emulators import PaynePerPixel
from paynekit.errors import InputError
from paynekit.io import resample, resample_batch
from paynekit.io.resample import apply_resampling, find_gaps, pixel_edges, resampling_matrix
from paynekit.labels import LabelSpace
from paynekit.spectra import Spectrum
from paynekit.wavelength import (
    apstar_wavelength,
    payne_apogee_pixels,
    payne_apogee_wavelength,
    vacuum_to_air,
)

METHODS = ("linear", "flux_conserving")


def _spectrum(wl, seed=0, **meta):
    rng = np.random.default_rng(seed)
    flux = 1.0 + rng.normal(0, 0.05, wl.size)
    ivar = rng.uniform(100, 400, wl.size)
    return Spectrum(wl, flux, ivar, meta=dict({"id": "s", "file": "f.fits"}, **meta))


@pytest.mark.parametrize("method", METHODS)
def test_same_grid_is_an_exact_copy(method):
    wl = 10 ** (3.7 + 1e-5 * np.arange(500))
    s = _spectrum(wl)
    mask = np.zeros(500, bool)
    mask[[0, 77, 499]] = True
    s.mask = mask
    r = resample(s, wl, method=method)
    good = ~mask
    np.testing.assert_array_equal(r.flux[good], s.flux[good])
    np.testing.assert_allclose(r.ivar[good], s.ivar[good], rtol=1e-12)
    np.testing.assert_array_equal(r.mask, mask)


def test_apstar_to_payne_grid_is_a_pixel_selection():
    s = _spectrum(apstar_wavelength())
    r = resample(s, payne_apogee_wavelength())
    pix = payne_apogee_pixels()
    np.testing.assert_array_equal(r.flux, s.flux[pix])
    np.testing.assert_allclose(r.ivar, s.ivar[pix], rtol=1e-12)
    rf = resample(s, payne_apogee_wavelength(), method="flux_conserving")
    np.testing.assert_allclose(rf.flux, s.flux[pix], rtol=2e-4)  # only chip-edge bins differ, by ~1e-5 of a pixel


@pytest.mark.parametrize("method", METHODS)
def test_linear_function_reproduced(method):
    wl = np.linspace(5000, 5100, 401)
    s = Spectrum(wl, 2.0 + 0.01 * (wl - 5000), np.ones(wl.size))
    out = np.linspace(5003.3, 5096.1, 97)
    r = resample(s, out, method=method)
    # linear interpolation is exact; bin averaging of a step-function model is exact up to the
    # slope times the mismatch of bin centres (< 0.01/A * 0.25 A / 2 here; 3e-5 found)
    atol = 1e-12 if method == "linear" else 1e-4
    np.testing.assert_allclose(r.flux, 2.0 + 0.01 * (out - 5000), rtol=0, atol=atol)


@pytest.mark.parametrize("method,out", [("linear", np.linspace(5000.13, 5019.77, 150)),
                                        ("flux_conserving", np.linspace(5000.5, 5019.5, 61)),
                                        ("flux_conserving", np.linspace(5000.13, 5019.77, 150))])
def test_ivar_propagation_matches_monte_carlo(method, out):
    rng = np.random.default_rng(42)
    wl = np.linspace(5000.0, 5020.0, 201)
    sigma = rng.uniform(0.01, 0.05, wl.size)
    w, covered = resampling_matrix(wl, out, method)
    draws = 1.0 + rng.normal(0, 1, (4000, wl.size)) * sigma
    flux, ivar, mask = apply_resampling(w, covered, draws, np.broadcast_to(1 / sigma**2, draws.shape))
    assert not mask.any()
    empirical = flux.var(axis=0)
    np.testing.assert_allclose(empirical * ivar[0], 1.0, atol=0.1)  # 4000 draws: ~2% scatter, 5 sigma
    assert abs(np.mean(empirical * ivar[0]) - 1.0) < 0.02


def test_flux_conserving_conserves_the_integral():
    rng = np.random.default_rng(1)
    d = 0.1
    wl = 5000.0 + d * np.arange(300)
    flux = rng.uniform(0.5, 1.5, wl.size)
    out = wl[1:-1:3]  # bins of exactly three input pixels
    r = resample(Spectrum(wl, flux, np.ones(wl.size)), out, method="flux_conserving")
    assert np.all(r.ivar > 0)
    np.testing.assert_allclose(np.sum(r.flux) * 3 * d, np.sum(flux[: 3 * out.size]) * d, rtol=1e-12)
    np.testing.assert_allclose(r.ivar, 3.0, rtol=1e-12)  # mean of three unit-variance pixels


@pytest.mark.parametrize("method", METHODS)
def test_outside_coverage_and_gaps_get_zero_ivar(method):
    wl = np.concatenate([np.arange(5000.0, 5010.0, 0.1), np.arange(5020.0, 5030.0, 0.1)])
    assert find_gaps(wl).sum() == 1
    s = Spectrum(wl, np.ones(wl.size), np.ones(wl.size))
    out = np.arange(4990.0, 5040.0, 0.05)
    r = resample(s, out, method=method)
    inside = ((out >= 5000.2) & (out <= 5009.7)) | ((out >= 5020.2) & (out <= 5029.7))
    outside = (out < 4999.9) | ((out > 5010.0) & (out < 5019.9)) | (out > 5030.0)
    assert np.all(r.ivar[inside] > 0) and np.all(r.ivar[outside] == 0) and np.all(r.mask[outside])
    assert np.all(r.flux[outside] == 0)


def test_pixel_edges_mirror_at_gaps_and_ends():
    wl = np.array([1.0, 2.0, 3.0, 10.0, 11.0, 12.0])
    lo, hi = pixel_edges(wl)
    np.testing.assert_allclose(lo, [0.5, 1.5, 2.5, 9.5, 10.5, 11.5])
    np.testing.assert_allclose(hi, [1.5, 2.5, 3.5, 10.5, 11.5, 12.5])


@pytest.mark.parametrize("method", METHODS)
def test_bad_input_pixels_spread_only_to_their_neighbours(method):
    wl = np.arange(5000.0, 5010.0, 0.1)
    s = Spectrum(wl, np.ones(wl.size), np.ones(wl.size))
    s.ivar[50] = 0.0
    out = wl[10:90] + 0.03
    r = resample(s, out, method=method)
    bad = np.flatnonzero(r.ivar == 0)
    assert bad.size in (1, 2) and np.all(np.abs(out[bad] - wl[50]) < 0.1)


def test_air_model_grid():
    wl_vac = np.arange(5990.0, 6010.0, 0.02)
    line = 1.0 - 0.5 * np.exp(-0.5 * ((wl_vac - 6000.0) / 0.1) ** 2)
    s = Spectrum(wl_vac, line, np.full(wl_vac.size, 1e4), meta={"wavelength_medium": "vacuum"})
    air_grid = np.arange(5991.0, 6008.0, 0.005)
    r = resample(s, air_grid, medium="air")
    assert r.meta["wavelength_medium"] == "air"
    assert air_grid[np.argmin(r.flux)] == pytest.approx(vacuum_to_air(6000.0), abs=0.006)
    assert abs(vacuum_to_air(6000.0) - 6000.0) > 1.5  # the shift is real, not within the tolerance
    # and back: a spectrum in air resampled onto a vacuum grid
    s_air = Spectrum(air_grid, r.flux, r.ivar, r.mask, r.meta)
    back = resample(s_air, np.arange(5995.0, 6005.0, 0.005))
    assert back.meta["wavelength_medium"] == "vacuum"
    assert back.wavelength[np.argmin(np.where(back.ivar > 0, back.flux, 2))] == pytest.approx(6000.0, abs=0.006)


def test_model_as_target_uses_its_grid_and_medium():
    p = 50
    wl = np.linspace(6000.0, 6010.0, p)
    ls = LabelSpace(("teff",), np.array([4000.0]), np.array([6000.0]))
    rng = np.random.default_rng(0)
    emu = PaynePerPixel(rng.normal(size=(p, 2, 1)), rng.normal(size=(p, 2)), rng.normal(size=(p, 2)), np.ones(p),
                        ls, wl, wavelength_medium="air")
    s = _spectrum(np.linspace(5990.0, 6020.0, 400))
    r = resample(s, emu)
    assert r.wavelength.size == p and r.meta["wavelength_medium"] == "air" and np.all(r.ivar > 0)


def test_no_overlap_is_a_one_line_error_naming_file_and_id():
    s = _spectrum(np.linspace(3600.0, 9000.0, 100), id="2M123", file="/data/spec.fits")
    with pytest.raises(InputError) as info:
        resample(s, payne_apogee_wavelength())
    msg = str(info.value)
    assert "/data/spec.fits" in msg and "2M123" in msg and "no overlap" in msg and "\n" not in msg
    s.ivar[:] = 0
    with pytest.raises(InputError, match="no usable pixel"):
        resample(s, np.linspace(5000.0, 6000.0, 50))


def test_batch_equals_single_and_drops_native_arrays():
    wl = 10 ** (3.7 + 1e-5 * np.arange(300))
    spectra = [_spectrum(wl, seed=i, bitmask=np.zeros(300, int)) for i in range(3)]
    spectra.append(_spectrum(wl[10:], seed=9))
    out = np.linspace(wl[20], wl[-20], 123)
    batch = resample_batch(spectra, out, method="flux_conserving")
    assert batch.flux.shape == (4, 123)
    for i, s in enumerate(spectra):
        r = resample(s, out, method="flux_conserving")
        np.testing.assert_array_equal(batch.flux[i], r.flux)
        np.testing.assert_array_equal(batch.ivar[i], r.ivar)
        assert "bitmask" not in batch.meta[i] and batch.meta[i]["native_pixels"] == s.wavelength.size


def test_inputs_not_modified_and_options_checked():
    wl = np.linspace(5000, 5100, 101)
    s = _spectrum(wl)
    before = (s.flux.copy(), s.ivar.copy(), s.mask.copy())
    resample(s, np.linspace(5010, 5090, 33), method="flux_conserving")
    for a, b in zip(before, (s.flux, s.ivar, s.mask)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="method"):
        resample(s, wl, method="cubic")
    with pytest.raises(InputError, match="medium"):
        resample(s, wl, medium="water")
    with pytest.raises(InputError, match="increasing"):
        resample(s, wl[::-1])
