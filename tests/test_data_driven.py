"""The data-driven Payne: a PayneMLP trained on observed spectra with inverse variances.

The "observed" training set is drawn from a known smooth model (a sloped continuum with absorption
lines whose depths and widths depend non-linearly on three labels) with heteroscedastic noise: every
star has its own S/N (log-uniform 15-200), every pixel its own relative error, and a few pixels per
star are bad (ivar = 0, flux replaced by garbage). The tests show that

* the network trained through :class:`~paynekit.emulators.training.PayneTrainer` with ``ivar``
  recovers the noiseless model far better than the noise of a single training spectrum;
* what is in the ivar = 0 pixels does not matter at all (NaN or huge garbage: the same weights);
* the ivar weighting matters: ignoring it (equal weights on all good pixels) gives a worse model;
* the trained emulator fits the labels of held-out stars through :func:`paynekit.fitting.fit`
  (v fixed at 0, no continuum) with a bias consistent with zero and residuals consistent with the
  formal errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from paynekit.emulators import PayneMLP
from paynekit.emulators.training import PayneTrainer, TrainConfig
from paynekit.fitting import FitConfig, fit

pytest.importorskip("torch")

NAMES = ("teff", "logg", "fe_h")
LO = np.array([4000.0, 1.0, -1.0])
HI = np.array([6000.0, 5.0, 0.5])
WAVELENGTH = np.linspace(5000.0, 5200.0, 80)
LINE_CENTRES = np.linspace(5012.0, 5188.0, 9)
N_TRAIN = 1200
SNR_RANGE = (15.0, 200.0)
BAD_PIXEL_FRACTION = 0.05
#: Training settings: small and fixed (epochs, not a time budget, so the result is deterministic).
CONFIG = TrainConfig(hidden_sizes=(48, 48), learning_rate=3e-3, batch_size=128, max_epochs=200,
                     validation_fraction=0.1, num_threads=1, seed=3)


def true_flux(labels: np.ndarray) -> np.ndarray:
    """The known smooth model: (N, 3) physical labels -> (N, 80) normalised flux."""
    s = (labels - LO) / (HI - LO) - 0.5  # scaled labels in [-0.5, 0.5]
    t, g, m = s[:, :1], s[:, 1:2], s[:, 2:3]
    k = np.arange(LINE_CENTRES.size)[None, :]
    # line depths: each line has its own non-linear mix of the labels (cooler and richer = deeper)
    depth = 0.55 / (1.0 + np.exp(-(1.5 * m - 2.0 * t * (1 + 0.1 * k) + 0.4 * g * np.cos(k) + 0.2 * np.sin(2.0 * k))))
    width = 2.5 + 1.0 * g * (k % 3 == 0) + 0.3 * t  # Angstrom; pressure broadening of some lines
    x = (WAVELENGTH[None, None, :] - LINE_CENTRES[None, :, None]) / width[:, :, None]
    lines = np.prod(1.0 - depth[:, :, None] * np.exp(-0.5 * x**2), axis=1)
    continuum = 1.0 + 0.08 * t * (WAVELENGTH[None, :] - 5100.0) / 100.0
    return continuum * lines


def observe(labels: np.ndarray, seed: int, bad_fill=np.nan):
    """Noisy spectra of ``labels``: per-star S/N, per-pixel relative errors and bad pixels.

    Returns flux, ivar and the noiseless flux. Bad pixels get ivar = 0 and ``bad_fill`` as flux
    (NaN, or a number, or "random" for large random garbage); the good pixels and the bad-pixel
    positions depend only on ``seed``.
    """
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    clean = true_flux(labels)
    snr = np.exp(rng.uniform(np.log(SNR_RANGE[0]), np.log(SNR_RANGE[1]), n))
    relative = rng.uniform(0.6, 1.6, (n, WAVELENGTH.size))  # heteroscedastic across pixels too
    sigma = relative / snr[:, None]
    flux = clean + sigma * rng.standard_normal(clean.shape)
    bad = rng.random(clean.shape) < BAD_PIXEL_FRACTION
    garbage = np.random.default_rng(seed + 1).uniform(-1e4, 1e4, clean.shape)
    ivar = np.where(bad, 0.0, 1.0 / sigma**2)
    if isinstance(bad_fill, str) and bad_fill == "random":
        flux = np.where(bad, garbage, flux)
    else:
        flux = np.where(bad, bad_fill, flux)
    return flux, ivar, clean


def draw_labels(n: int, seed: int, margin: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lo, hi = LO + margin * (HI - LO), HI - margin * (HI - LO)
    return rng.uniform(lo, hi, (n, len(NAMES)))


def train(labels, flux, ivar) -> PayneMLP:
    trainer = PayneTrainer(CONFIG).fit(labels, flux, ivar, label_names=NAMES, wavelength=WAVELENGTH)
    return trainer.emulator_


@pytest.fixture(scope="module")
def training_set():
    labels = draw_labels(N_TRAIN, seed=11)
    flux, ivar, clean = observe(labels, seed=12)
    return labels, flux, ivar, clean


@pytest.fixture(scope="module")
def dd_payne(training_set):
    labels, flux, ivar, _ = training_set
    return train(labels, flux, ivar)


def test_training_inputs_are_not_modified_and_garbage_is_ignored(training_set, dd_payne):
    labels, flux, ivar, _ = training_set
    before = (labels.copy(), flux.copy(), ivar.copy())
    # the same stars with other garbage in the ivar = 0 pixels: huge random numbers instead of NaN
    flux_garbage, ivar_garbage, _ = observe(labels, seed=12, bad_fill="random")
    np.testing.assert_array_equal(ivar_garbage, ivar)
    good = ivar > 0
    np.testing.assert_array_equal(flux_garbage[good], flux[good])
    assert np.abs(flux_garbage[~good]).max() > 1e3
    other = train(labels, flux_garbage, ivar_garbage)
    for a, b in zip(dd_payne.weights + dd_payne.biases, other.weights + other.biases):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(before, (labels, flux, ivar)):
        np.testing.assert_array_equal(a, b)  # NaN == NaN here: assert_array_equal treats them as equal


def test_learned_model_beats_the_noise_and_the_unweighted_fit(training_set, dd_payne):
    labels, flux, ivar, _ = training_set
    test_labels = draw_labels(400, seed=21, margin=0.05)
    truth = true_flux(test_labels)
    err_weighted = np.sqrt(np.mean((dd_payne.predict(test_labels) - truth) ** 2))
    # the typical noise of one training spectrum (rms over the good pixels)
    noise = np.sqrt(np.median(1.0 / ivar[ivar > 0]))
    depth_scale = np.std(truth)  # how much the spectra vary across the label box
    assert err_weighted < 0.25 * noise, (err_weighted, noise)
    assert err_weighted < 0.05 * depth_scale
    # ignoring the inverse variances (same good pixels, equal weights) gives a clearly worse model
    flat = np.where(ivar > 0, 1.0, 0.0)
    unweighted = train(labels, flux, flat)
    err_unweighted = np.sqrt(np.mean((unweighted.predict(test_labels) - truth) ** 2))
    assert err_weighted < 0.8 * err_unweighted, (err_weighted, err_unweighted)


def test_dd_payne_fits_held_out_stars_with_small_bias(dd_payne):
    n = 150
    labels = draw_labels(n, seed=31, margin=0.1)
    flux, ivar, _ = observe(labels, seed=32)
    snr_boost = 4.0  # held-out stars at higher S/N so that the bias test is sharp
    clean = true_flux(labels)
    flux = np.where(ivar > 0, clean + (flux - clean) / snr_boost, np.nan)
    ivar = ivar * snr_boost**2
    flux_in, ivar_in = flux.copy(), ivar.copy()
    config = FitConfig(rv_range=0, presearch_size=512, dtype="float64", seed=0)
    table = fit(dd_payne, (WAVELENGTH, flux, ivar), config=config)
    np.testing.assert_array_equal(flux, flux_in)
    np.testing.assert_array_equal(ivar, ivar_in)
    assert len(table) == n
    span = HI - LO
    for j, name in enumerate(NAMES):
        fitted = np.asarray(table[name], dtype=float)
        err = np.asarray(table[f"e_{name}"], dtype=float)
        assert np.all(np.isfinite(fitted)) and np.all(err > 0)
        resid = fitted - labels[:, j]
        bias, scatter = resid.mean(), resid.std()
        # bias: consistent with zero (within 3 standard errors of the mean) and below 1% of the range
        assert abs(bias) < 3 * scatter / np.sqrt(n), (name, bias, scatter)
        assert abs(bias) < 0.01 * span[j], (name, bias)
        # the residuals are consistent with the formal errors (the emulator error adds a little)
        pull = np.median(np.abs(resid / err)) / 0.6745
        assert 0.7 < pull < 2.0, (name, pull)
