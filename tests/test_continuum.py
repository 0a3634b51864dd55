"""Continuum normalisation: recovery of known continua, agreement with The Payne's own algorithm,
continuum-pixel files, and continuum pixels chosen from a trained model."""

from pathlib import Path

import numpy as np
import pytest

from paynekit.continuum import (
    ChebyshevContinuum,
    apply_continuum,
    continuum_pixels_from_emulator,
    continuum_score,
    fit_continuum,
    load_continuum_pixels,
    normalize,
)
from paynekit.emulators import PaynePerPixel
from paynekit.errors import FileFormatError, InputError
from paynekit.labels import LabelSpace
from paynekit.spectra import Spectrum, SpectrumBatch
from paynekit.wavelength import APOGEE_CHIPS, apstar_wavelength, payne_apogee_pixels, payne_apogee_wavelength

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_skip_without_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


def needs_shared(test):
    """Mark a test that reads ../shared/data (marker ``shared``); it skips when the data is absent."""
    return pytest.mark.shared(_skip_without_shared(test))
CHIP_SLICES = (slice(0, 2920), slice(2920, 5320), slice(5320, 7214))


def _lines(wl, seed, n_lines=900):
    """A normalised spectrum with Gaussian absorption lines, and its true continuum pixels."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(wl[0], wl[-1], n_lines)
    depth = rng.uniform(0.05, 0.5, n_lines)
    norm = np.ones(wl.size)
    for c, d in zip(centres, depth):
        sel = np.abs(wl - c) < 2.0
        norm[sel] *= 1 - d * np.exp(-0.5 * ((wl[sel] - c) / 0.3) ** 2)
    flat = norm > 0.9995
    cont_pixels = flat & (rng.uniform(size=wl.size) < 0.3)
    return norm, cont_pixels


def _true_continuum(wl, seed):
    rng = np.random.default_rng(seed)
    cont = np.empty(wl.size)
    for lo, hi in APOGEE_CHIPS:
        sel = (wl >= lo) & (wl <= hi)
        t = (wl[sel] - lo) / (hi - lo)
        a = rng.uniform(-0.1, 0.1, 3)
        cont[sel] = 1000.0 * (1 + a[0] * t + a[1] * t**2 + a[2] * t**3)
    return cont


@pytest.fixture(scope="module")
def simulated():
    wl = payne_apogee_wavelength()
    norm, cp = _lines(wl, seed=3)
    rng = np.random.default_rng(4)
    conts = np.stack([_true_continuum(wl, s) for s in range(3)])
    snr = 100.0
    flux = conts * norm + rng.normal(0, 1, conts.shape) * conts / snr
    ivar = (snr / conts) ** 2
    return wl, norm, cp, conts, flux, ivar


def test_recovers_a_known_continuum(simulated):
    wl, norm, cp, conts, flux, ivar = simulated
    fitted = fit_continuum(wl, flux, ivar, cp)
    rel = fitted / conts - 1
    assert np.max(np.abs(rel)) < 0.005 and np.median(np.abs(rel)) < 0.001
    batch = SpectrumBatch(wl, flux, ivar, ids=["a", "b", "c"])
    out = ChebyshevContinuum().normalize(batch, cp)
    assert out.ids == ["a", "b", "c"] and all(m["normalized"] and not m["continuum_failed_regions"] for m in out.meta)
    resid = (out.flux - norm) * np.sqrt(out.ivar)
    assert abs(np.mean(resid)) < 0.1 and np.std(resid) == pytest.approx(1.0, abs=0.05)
    np.testing.assert_allclose(out.ivar, ivar * fitted**2, rtol=1e-12)


def test_batch_equals_one_by_one(simulated):
    wl, _, cp, _, flux, ivar = simulated
    together = fit_continuum(wl, flux, ivar, cp)
    for i in range(3):
        np.testing.assert_allclose(fit_continuum(wl, flux[i], ivar[i], cp), together[i], rtol=1e-12)


def test_noise_free_polynomial_is_exact():
    wl = apstar_wavelength()
    x = np.log(wl)
    cont = np.empty(wl.size)
    for lo, hi in APOGEE_CHIPS:
        sel = (wl >= lo) & (wl <= hi)
        t = 2 * (x[sel] - x[sel][0]) / (x[sel][-1] - x[sel][0]) - 1
        cont[sel] = np.polynomial.chebyshev.chebval(t, [900.0, 40.0, -20.0, 8.0, -3.0])
    cp = np.zeros(wl.size, bool)
    cp[::17] = True
    fitted = fit_continuum(wl, cont, np.ones(wl.size), cp)
    inside = np.isfinite(fitted)
    np.testing.assert_allclose(fitted[inside], cont[inside], rtol=1e-10)
    # pixels outside every chip (the apStar grid runs past 17000 A) have no continuum
    assert np.array_equal(~inside, ~np.any([(wl >= lo) & (wl <= hi) for lo, hi in APOGEE_CHIPS], axis=0))


def test_matches_the_payne_algorithm(simulated):
    """The Payne's get_apogee_continuum: numpy Chebyshev.fit, w = 1/err, pixel index mapped to [-1, 1] per chip."""
    wl, _, cp, _, flux, ivar = simulated
    err = 1 / np.sqrt(ivar[0])
    reference = np.empty(wl.size)
    for sl in CHIP_SLICES:
        n = sl.stop - sl.start
        x = 2 * np.arange(n) / (n - 1) - 1
        c = cp[sl]
        reference[sl] = np.polynomial.Chebyshev.fit(x[c], flux[0][sl][c], 4, w=1 / err[sl][c])(x)
    np.testing.assert_allclose(fit_continuum(wl, flux[0], ivar[0], cp), reference, rtol=1e-10)


def test_unusable_pixels_do_not_count(simulated):
    wl, _, cp, _, flux, ivar = simulated
    f = flux[0].copy()
    iv = ivar[0].copy()
    junk = np.flatnonzero(cp)[::5]
    f[junk] = 1e6
    iv[junk] = 0.0
    f2 = f.copy()
    f2[junk] = np.nan
    clean = fit_continuum(wl, np.where(iv > 0, flux[0], 0), iv, cp)
    np.testing.assert_allclose(fit_continuum(wl, f, iv, cp), clean, rtol=1e-12)
    np.testing.assert_allclose(fit_continuum(wl, f2, iv, cp), clean, rtol=1e-12)
    mask = np.zeros(wl.size, bool)
    mask[junk] = True
    f3 = flux[0].copy()
    f3[junk] = 1e6
    np.testing.assert_allclose(fit_continuum(wl, f3, ivar[0], cp, mask=mask), clean, rtol=1e-12)


def test_sigma_clipping_rejects_lines_on_continuum_pixels(simulated):
    wl, _, cp, conts, flux, ivar = simulated
    rng = np.random.default_rng(7)
    f = flux[0].copy()
    hit = np.flatnonzero(cp)[rng.uniform(size=cp.sum()) < 0.15]
    f[hit] *= 0.7  # unflagged absorption on 15% of the continuum pixels
    plain = fit_continuum(wl, f, ivar[0], cp) / conts[0] - 1
    clipped = ChebyshevContinuum(sigma_clip=(2.0, 5.0), max_iterations=10).fit(wl, f, ivar[0], cp) / conts[0] - 1
    assert np.median(plain) < -0.03  # biased low without clipping
    assert np.max(np.abs(clipped)) < 0.006 and abs(np.median(clipped)) < 0.001
    # symmetric clipping runs away from a biased first fit, but never below min_pixels: still finite
    symmetric = ChebyshevContinuum(sigma_clip=(3.0, 3.0), max_iterations=10).fit(wl, f, ivar[0], cp)
    assert np.all(np.isfinite(symmetric))


def test_regions_and_failed_regions(simulated):
    wl, _, cp, _, flux, ivar = simulated
    s = Spectrum(wl, flux[0], ivar[0], meta={"id": "x"})
    few = cp.copy()
    few[CHIP_SLICES[2]] = False
    few[np.flatnonzero(cp[CHIP_SLICES[2]])[:5] + 5320] = True  # 5 < min_pixels = 10
    out = ChebyshevContinuum().normalize(s, few)
    assert out.meta["continuum_failed_regions"] == [APOGEE_CHIPS[2]]
    assert np.all(out.ivar[CHIP_SLICES[2]] == 0) and np.all(out.mask[CHIP_SLICES[2]])
    assert np.all(out.ivar[CHIP_SLICES[0]] > 0)
    one = ChebyshevContinuum(regions=None, degree=8).fit(wl, flux[0], ivar[0], cp)
    assert np.all(np.isfinite(one))
    own = ChebyshevContinuum(regions=((15100.0, 15500.0),)).normalize(s, cp)
    assert np.all(own.ivar[wl > 15500] == 0) and np.all(own.ivar[(wl < 15500) & ~own.mask] > 0)


def test_config_is_validated():
    with pytest.raises(InputError, match="degree"):
        ChebyshevContinuum(degree=-1)
    with pytest.raises(InputError, match="regions"):
        ChebyshevContinuum(regions=((2.0, 1.0),))
    with pytest.raises(InputError, match="sigma_clip"):
        ChebyshevContinuum(sigma_clip=(3.0, -1.0))
    with pytest.raises(InputError, match="min_pixels"):
        ChebyshevContinuum(degree=4, min_pixels=3)
    with pytest.raises(TypeError):
        ChebyshevContinuum(order=4)  # an unknown option is an error
    with pytest.raises(InputError, match="continuum_pixels"):
        fit_continuum(np.arange(10.0) + 1, np.ones(10), np.ones(10), np.ones(9, bool))
    with pytest.raises(InputError, match="boolean"):
        fit_continuum(np.arange(10.0) + 1, np.ones(10), np.ones(10), np.linspace(0, 1, 10))


def test_apply_continuum_and_inputs_untouched(simulated):
    wl, _, cp, _, flux, ivar = simulated
    s = Spectrum(wl, flux[1], ivar[1])
    before = s.flux.copy()
    normalize(s, cp)
    np.testing.assert_array_equal(s.flux, before)
    f, iv, m = apply_continuum(np.array([2.0, 2.0, 2.0]), np.array([1.0, 1.0, 1.0]), np.array([2.0, np.nan, -1.0]))
    np.testing.assert_array_equal(f, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(iv, [4.0, 0.0, 0.0])
    np.testing.assert_array_equal(m, [False, True, True])


# ------------------------------------------------------------------------------------------------
# continuum-pixel files (True / 1 = continuum)
# ------------------------------------------------------------------------------------------------
def test_load_continuum_pixel_files(tmp_path):
    flags = np.zeros(7214, bool)
    flags[::13] = True
    np.savez(tmp_path / "c.npz", pixels_cannon=flags)
    np.testing.assert_array_equal(load_continuum_pixels(tmp_path / "c.npz"), flags)
    # a 7214-pixel file is on The Payne's grid; onto apStar's grid its pixels land exactly
    on_apstar = load_continuum_pixels(tmp_path / "c.npz", apstar_wavelength())
    assert on_apstar.sum() == flags.sum()
    np.testing.assert_array_equal(np.flatnonzero(on_apstar), payne_apogee_pixels()[flags])
    np.save(tmp_path / "c.npy", flags.astype(int))
    np.testing.assert_array_equal(load_continuum_pixels(tmp_path / "c.npy"), flags)
    np.savetxt(tmp_path / "c1.txt", flags.astype(int), fmt="%d")
    np.testing.assert_array_equal(load_continuum_pixels(tmp_path / "c1.txt"), flags)
    wl = np.linspace(5000, 5010, 11)
    np.savetxt(tmp_path / "c2.txt", np.column_stack([wl, [1, 0] * 5 + [1]]))
    target = np.array([5000.0, 5000.4, 5001.0, 5002.0, 5020.0])
    np.testing.assert_array_equal(load_continuum_pixels(tmp_path / "c2.txt", target), [True, True, False, True, False])
    np.savez(tmp_path / "k.npz", a=flags, b=flags)
    with pytest.raises(FileFormatError, match="pass key"):
        load_continuum_pixels(tmp_path / "k.npz")
    np.testing.assert_array_equal(load_continuum_pixels(tmp_path / "k.npz", key="b"), flags)
    np.save(tmp_path / "bad.npy", np.arange(10))
    with pytest.raises(FileFormatError, match="True/1 = continuum"):
        load_continuum_pixels(tmp_path / "bad.npy")
    with pytest.raises(InputError, match="without wavelengths"):
        np.save(tmp_path / "short.npy", np.ones(20, bool))
        load_continuum_pixels(tmp_path / "short.npy", np.linspace(1, 2, 30))


@needs_shared
def test_real_apstar_normalised_like_the_payne():
    from paynekit.io import read_file, resample

    cannon = SHARED / "apogee" / "cannon_continuum_pixels_7214.npz"
    (s,) = read_file(SHARED / "apogee" / "dr17_apstar" / "apStar-dr17-2M17335483-2753043.fits")
    r = resample(s, payne_apogee_wavelength())
    cp = load_continuum_pixels(cannon, r.wavelength)
    assert cp.sum() == 529
    mine = ChebyshevContinuum().fit(r.wavelength, r.flux, r.ivar, cp)
    # The Payne (utils.get_apogee_continuum): dead pixels set to 0.01 with a huge error, then Chebyshev.fit
    spec = np.where(r.ivar > 0, r.flux, 0.01)
    err = np.where(r.ivar > 0, 1 / np.sqrt(np.where(r.ivar > 0, r.ivar, 1)), np.max(np.abs(spec)) * 999)
    reference = np.empty(7214)
    for sl in CHIP_SLICES:
        n = sl.stop - sl.start
        x = 2 * np.arange(n) / (n - 1) - 1
        c = cp[sl]
        reference[sl] = np.polynomial.Chebyshev.fit(x[c], spec[sl][c], 4, w=1 / err[sl][c])(x)
    np.testing.assert_allclose(mine, reference, rtol=1e-9)
    normed = normalize(r, cannon)
    for sl in CHIP_SLICES:
        sel = cp[sl] & ~normed.mask[sl]
        assert np.median(normed.flux[sl][sel]) == pytest.approx(1.0, abs=0.005)
    # normalising on the native apStar grid with the mapped pixels gives the same spectrum
    native = normalize(s, load_continuum_pixels(cannon, s.wavelength))
    pix = payne_apogee_pixels()
    good = ~normed.mask
    np.testing.assert_allclose(native.flux[pix][good], normed.flux[good], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# continuum pixels from a model
# ------------------------------------------------------------------------------------------------
def _toy_emulator():
    """Pixels 0-19: flux exactly 1; 20-39: 1.005, independent of labels; 40-99: depend on the labels."""
    p, h, n_labels = 100, 3, 2
    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 2, (p, h, n_labels))
    b0 = rng.normal(0, 1, (p, h))
    w1 = rng.normal(0, 0.2, (p, h))
    b1 = np.ones(p)
    w1[:40] = 0.0
    b1[20:40] = 1.005
    ls = LabelSpace(("teff", "logg"), np.array([4000.0, 1.0]), np.array([6000.0, 5.0]))
    return PaynePerPixel(w0, b0, w1, b1, ls, np.linspace(15200.0, 15300.0, p))


def test_continuum_pixels_from_a_toy_model():
    emu = _toy_emulator()
    score = continuum_score(emu, n_samples=64)
    np.testing.assert_allclose(score[:20], 0.0, atol=1e-12)
    np.testing.assert_allclose(score[20:40], 0.005, atol=1e-12)
    assert np.all(score[40:] > 0.01)
    np.testing.assert_array_equal(np.flatnonzero(continuum_pixels_from_emulator(emu, max_deviation=0.001)),
                                  np.arange(20))
    np.testing.assert_array_equal(np.flatnonzero(continuum_pixels_from_emulator(emu, max_deviation=0.01)),
                                  np.arange(40))
    chosen = continuum_pixels_from_emulator(emu, fraction=0.3)
    assert chosen.sum() == 30 and chosen[:30].all()
    labels = np.array([[4500.0, 2.0], [5500.0, 4.0], [5000.0, 3.0]])
    assert continuum_pixels_from_emulator(emu, labels=labels, max_deviation=0.001)[:20].all()
    with pytest.raises(InputError, match="fraction"):
        continuum_pixels_from_emulator(emu, fraction=0)


@needs_shared
def test_model_continuum_pixels_agree_with_the_cannons():
    from paynekit import load_emulator

    emu = load_emulator(SHARED / "emulators" / "apogee_5label_perpixel_binspec_plus.npz")
    cannon = np.load(SHARED / "apogee" / "cannon_continuum_pixels_7214.npz")["pixels_cannon"]
    chosen = continuum_pixels_from_emulator(emu, regions=APOGEE_CHIPS, n_samples=64)
    assert all(chosen[sl].sum() >= 100 for sl in CHIP_SLICES)
    overlap = np.count_nonzero(chosen & cannon)
    expected_by_chance = chosen.sum() * cannon.mean()
    assert overlap > 3 * expected_by_chance  # ~190 found vs ~37 by chance
