"""The demo synthesizer: determinism, the radiative part against a direct calculation, the direction in
which every label moves the lines of its species, and the mock-observation helper."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import voigt_profile

from paynekit import synth
from paynekit.errors import InputError
from paynekit.labels import APOGEE_LABEL_NAMES
from paynekit.spectra import SpectrumBatch
from paynekit.wavelength import APOGEE_CHIPS, apstar_wavelength, payne_apogee_pixels, payne_apogee_wavelength

from .conftest import shared_path

NAMES = APOGEE_LABEL_NAMES


@pytest.fixture(scope="module")
def syn():
    return synth.DemoSynthesizer()


def star(**values):
    """A (25,) label vector: solar abundances, a red-clump giant unless told otherwise."""
    out = np.zeros(len(NAMES))
    for k, v in {**synth.REFERENCE_LABELS, **values}.items():
        out[NAMES.index(k)] = v
    return out


def pair(base, name, a, b):
    x = np.stack([base, base])
    x[0, NAMES.index(name)] = a
    x[1, NAMES.index(name)] = b
    return x


def dominant_lines(syn, labels, species, dominance=0.8, min_log_strength=-1.0, window=15.0):
    """Indices of lines of ``species`` carrying > dominance of the opacity within +-window km/s, and
    their nearest pixels."""
    ll = syn.line_list
    wl = syn.wavelength
    s = 10.0 ** syn.log_line_strengths(labels)
    vel = synth.C_KMS * np.log(ll["wavelength"])
    order = np.argsort(vel)
    cum = np.concatenate([[0.0], np.cumsum(s[order])])
    lo = np.searchsorted(vel[order], vel - window)
    hi = np.searchsorted(vel[order], vel + window, side="right")
    share = s / (cum[hi] - cum[lo])
    inside = (ll["wavelength"] > wl[2]) & (ll["wavelength"] < wl[-3])
    sel = np.flatnonzero(np.isin(ll["species"], species) & inside & (share > dominance)
                        & (np.log10(s) > min_log_strength))
    pix = np.abs(wl[None, :] - ll["wavelength"][sel, None]).argmin(axis=1)
    return sel, pix


# -- determinism and basic contract ----------------------------------------------------------------
def test_same_seed_same_arrays_different_seed_different():
    a, b, c = synth.DemoSynthesizer(seed=3), synth.DemoSynthesizer(seed=3), synth.DemoSynthesizer(seed=4)
    assert np.array_equal(a.line_list, b.line_list)
    x = synth.sample_labels(3, 11)
    fa, fb, fc = a.spectra(x), b.spectra(x), c.spectra(x)
    assert np.array_equal(fa, fb)
    assert not np.array_equal(a.line_list["wavelength"], c.line_list["wavelength"])
    assert np.abs(fa - fc).max() > 0.05
    assert np.array_equal(synth.sample_labels(5, 1), synth.sample_labels(5, 1))
    assert not np.array_equal(synth.sample_labels(5, 1), synth.sample_labels(5, 2))


def test_line_list_contents(syn):
    ll = syn.line_list
    assert ll.size == synth.DEFAULT_N_LINES
    assert set(ll["species"]) == {s.name for s in synth.SPECIES}
    assert np.all(np.diff(ll["wavelength"]) >= 0)
    lo, hi = syn.wavelength_range
    assert ll["wavelength"].min() < lo and ll["wavelength"].max() > hi  # the margin is populated too
    # isotopic partners point at each other and pair 12C with 13C species
    has = np.flatnonzero(ll["partner"] >= 0)
    assert np.array_equal(ll["partner"][ll["partner"][has]], has)
    pairs = {(a, b) for a, b in zip(ll["species"][has], ll["species"][ll["partner"][has]], strict=True)}
    assert pairs == {("CO", "13CO"), ("13CO", "CO"), ("CN", "13CN"), ("13CN", "CN")}
    # a 13C line has the transition strength (loggf) of its 12C partner
    co13 = has[ll["species"][has] == "13CO"]
    assert np.allclose(ll["loggf"][co13], ll["loggf"][ll["partner"][co13]], atol=2e-3)
    # 12CO second-overtone band heads where they are observed (vacuum A): 3-0, 4-1, 5-2, 6-3
    w, _, _ = synth._co_band_lines(1.0)
    heads = w.reshape(10, 2, -1)[:, 0, :].min(axis=1)[:4]
    assert np.allclose(heads, [15582.5, 15781.5, 15985.5, 16195.5], atol=4.0)
    # Brackett 11 and 12 (vacuum)
    h = np.sort(ll["wavelength"][ll["species"] == "H I"])
    assert np.allclose(h[-2:], [16411.7, 16811.1], atol=0.2)


def test_shapes_range_and_validation(syn):
    one = syn.spectra(star())
    assert one.shape == (8575,)
    many = syn.spectra(synth.sample_labels(4, 2))
    assert many.shape == (4, 8575)
    assert np.all(many > 0) and np.all(many <= 1.0)
    assert np.all(many.max(axis=1) > 0.999)  # there is continuum
    assert np.all(many.min(axis=1) < 0.8)  # and there are lines
    assert np.array_equal(syn.wavelength, apstar_wavelength())
    with pytest.raises(InputError, match="labels"):
        syn.spectra(np.zeros(24))
    with pytest.raises(InputError, match="teff"):
        syn.spectra(star(teff=-5.0))
    with pytest.raises(InputError, match="wavelength"):
        syn.spectra(star(), wavelength=np.linspace(14000.0, 15000.0, 10))
    with pytest.raises(InputError, match="n_lines"):
        synth.DemoSynthesizer(n_lines=10)
    with pytest.raises(InputError, match="wavelength"):
        synth.DemoSynthesizer(wavelength=np.linspace(16000.0, 18000.0, 50))
    bad = np.zeros(1, dtype=synth.LINE_LIST_DTYPE)
    bad["wavelength"], bad["species"] = 16000.0, "Xx I"
    with pytest.raises(InputError, match="unknown species"):
        synth.DemoSynthesizer(line_list=bad)
    with pytest.raises(InputError, match="fields"):
        synth.DemoSynthesizer(line_list=np.zeros(3))


def test_result_does_not_depend_on_batching(syn):
    x = synth.sample_labels(7, 13)
    small_chunks = synth.DemoSynthesizer(chunk_size=3)
    together = syn.spectra(x)
    assert np.abs(small_chunks.spectra(x) - together).max() < 1e-12
    assert np.abs(syn.spectra(x[4]) - together[4]).max() < 1e-12


def test_labels_not_modified(syn):
    x = synth.sample_labels(2, 5)
    keep = x.copy()
    syn.spectra(x)
    assert np.array_equal(x, keep)


# -- the radiative part against a direct calculation ------------------------------------------------
def direct_line(labels, species, log_s, line_wl, wl):
    """One line computed the slow way: Voigt optical depth on a 0.05 km/s grid, exp, then a direct
    Gaussian convolution evaluated at the pixel velocities."""
    x = labels[None, :]
    st = synth.layer_state(x)
    sun = synth.layer_state(np.array([star(**synth.SOLAR_LABELS)]))
    t = st["T"][0]
    mass, damping = synth.GROUPS[synth.SPECIES[synth.SPECIES_INDEX[species]].group][1:]
    b = np.sqrt(2 * synth.K_BOLTZMANN * t / (mass * synth.AMU) * 1e-6 + labels[NAMES.index("v_turb")] ** 2)
    p_scale = 10 ** (st["log_pg"][0] - sun["log_pg"][0]) * (t / sun["T"][0]) ** 0.3
    gamma = {"vdw": synth.GAMMA_VDW_SUN, "molecule": synth.GAMMA_MOLECULE_SUN}[damping] * p_scale
    dv = 0.05
    v = np.arange(-1000.0, 1000.0, dv)
    depth = synth.MAX_LINE_DEPTH * -np.expm1(-(10**log_s) * voigt_profile(v, b / np.sqrt(2), gamma))
    sig = np.sqrt((synth.C_KMS / (22500 * synth.FWHM_PER_SIGMA)) ** 2 + 0.5 * labels[NAMES.index("v_macro")] ** 2)
    vpix = synth.C_KMS * np.log(wl / line_wl)
    near = np.abs(vpix) < 300
    kern = np.exp(-0.5 * ((vpix[near, None] - v[None, :]) / sig) ** 2) / (np.sqrt(2 * np.pi) * sig)
    return near, 1.0 - kern @ depth * dv


@pytest.mark.parametrize("species,labels,tol", [
    ("Fe I", star(teff=4700, logg=2.4, v_turb=1.5, v_macro=4.0), 3e-5),
    ("Mg I", star(teff=5600, logg=4.5, v_turb=1.0, v_macro=2.0), 3e-5),  # damping wings
    ("CO", star(teff=3900, logg=1.2, v_turb=2.0, v_macro=8.0), 3e-5),
    ("Ti I", star(teff=3600, logg=0.5, v_turb=0.6, v_macro=0.0), 2e-3),  # narrowest lines of the box
])  # fmt: skip
def test_single_line_matches_direct_calculation(species, labels, tol):
    ll = np.zeros(1, dtype=synth.LINE_LIST_DTYPE)
    ll["wavelength"], ll["species"], ll["excitation"] = 15800.0, species, 2.0
    probe = synth.DemoSynthesizer(line_list=ll)
    target = 1.2  # saturated: log10 S = 1.2 km/s
    ll["loggf"] = target - probe.log_line_strengths(labels)[0]
    syn1 = synth.DemoSynthesizer(line_list=ll)
    flux = syn1.spectra(labels)
    near, direct = direct_line(labels, species, target, 15800.0, syn1.wavelength)
    assert 1 - direct.min() > 0.2  # a real, saturated line
    assert np.abs(flux[near] - direct).max() < tol
    assert np.all(np.abs(flux[~near] - 1) < 2e-4)  # far wings, beyond the direct calculation


def test_curve_of_growth():
    """Weak lines grow as their opacity (linear part of the curve of growth), saturated ones much more
    slowly. (Fe also supplies electrons, so d log S / d [Fe/H] is a little below 1.)"""
    ll = np.zeros(1, dtype=synth.LINE_LIST_DTYPE)
    ll["wavelength"], ll["species"], ll["excitation"] = 16000.0, "Fe I", 5.0
    base = star()
    slopes, opacity_slopes = [], []
    for log_s in (-2.0, 1.8):
        ll["loggf"] = 0.0
        probe = synth.DemoSynthesizer(line_list=ll)
        ll["loggf"] = log_s - probe.log_line_strengths(base)[0]
        s1 = synth.DemoSynthesizer(line_list=ll)
        f = s1.spectra(pair(base, "fe_h", -0.1, 0.1))
        ew = np.sum((1 - f) * np.gradient(s1.wavelength), axis=1)
        slopes.append(np.log10(ew[1] / ew[0]) / 0.2)
        log_s_pair = s1.log_line_strengths(pair(base, "fe_h", -0.1, 0.1))[:, 0]
        opacity_slopes.append((log_s_pair[1] - log_s_pair[0]) / 0.2)
    assert 0.9 < opacity_slopes[0] < 1.0
    assert slopes[0] == pytest.approx(opacity_slopes[0], abs=0.01)
    assert slopes[1] < 0.4 * opacity_slopes[1]


# -- each label moves the lines of its species the expected way -------------------------------------
@pytest.mark.parametrize("label,lo,hi,species,sign", [
    ("fe_h", -0.2, 0.2, ["Fe I"], +1),
    ("mg_h", -0.2, 0.2, ["Mg I"], +1),
    ("si_h", -0.2, 0.2, ["Si I"], +1),
    ("c12_c13", 60.0, 5.0, ["13CO"], +1),  # deeper at lower 12C/13C
    ("c_h", -0.2, 0.2, ["CO", "CN"], +1),
    ("o_h", -0.2, 0.2, ["OH"], +1),
    ("logg", 3.5, 4.5, ["Fe II", "Ti II"], -1),  # ionised lines weaken with pressure (in a warm star)
])  # fmt: skip
def test_lines_respond_to_their_label(syn, label, lo, hi, species, sign):
    base = star(teff=4500, logg=2.2, v_turb=1.6, v_macro=5.0, c12_c13=20.0)
    if label == "logg":
        base = star(teff=6000, logg=4.0, v_turb=1.2, v_macro=4.0, c12_c13=50.0)
    f = syn.spectra(pair(base, label, lo, hi))
    sel, pix = dominant_lines(syn, base, species, dominance=0.7)
    assert sel.size >= 5
    deeper = sign * ((1 - f[1, pix]) - (1 - f[0, pix]))
    assert np.mean(deeper > 0) >= 0.95, (label, species, np.mean(deeper > 0))
    assert np.median(deeper) > 2e-3


def test_low_excitation_neutral_lines_deeper_at_lower_teff(syn):
    base = star(teff=4800, logg=2.5)
    f = syn.spectra(pair(base, "teff", 5000.0, 4500.0))
    sel, pix = dominant_lines(syn, base, ["Ti I", "V I", "Fe I", "Co I"])
    low = syn.line_list["excitation"][sel] < 3.0
    assert low.sum() >= 10
    deeper = (1 - f[1, pix[low]]) - (1 - f[0, pix[low]])
    assert np.mean(deeper > 0) >= 0.95 and np.median(deeper) > 0.01


def test_brackett_lines_stronger_in_warm_dwarfs(syn):
    f = syn.spectra(pair(star(teff=5000, logg=4.4, c12_c13=50), "teff", 5000.0, 6800.0))
    i = np.abs(syn.wavelength - 16811.1).argmin()
    wing = np.abs(syn.wavelength - 16811.1 - 3.0).argmin()  # Stark wings 3 A from the centre
    assert (1 - f[1, i]) > 0.2 and (1 - f[1, i]) > 2 * (1 - f[0, i])
    assert (1 - f[1, wing]) > 0.02


def test_macroturbulence_broadens_and_conserves_equivalent_width(syn):
    base = star()
    f = syn.spectra(pair(base, "v_macro", 2.0, 12.0))
    _, pix = dominant_lines(syn, base, ["Fe I", "Si I", "Mg I", "CN", "OH", "CO"], dominance=0.8, window=40.0)
    assert np.mean(f[1, pix] > f[0, pix]) > 0.95  # shallower line centres
    dl = np.gradient(syn.wavelength)
    ew = ((1 - f) * dl).sum(axis=1)
    assert ew[1] == pytest.approx(ew[0], rel=1e-3)


def test_microturbulence_strengthens_saturated_lines(syn):
    base = star()
    f = syn.spectra(pair(base, "v_turb", 0.8, 2.5))
    dl = np.gradient(syn.wavelength)
    ew = ((1 - f) * dl).sum(axis=1)
    assert ew[1] > 1.05 * ew[0]


def test_every_label_has_an_effect(syn):
    base = star(teff=4500, logg=2.0, v_turb=1.6, v_macro=5.0, c12_c13=15.0)
    span = syn.label_space.span
    x = np.repeat(base[None, :], 2 * len(NAMES), axis=0)
    for k in range(len(NAMES)):
        x[2 * k, k] -= 0.02 * span[k]
        x[2 * k + 1, k] += 0.02 * span[k]
    f = syn.spectra(x)
    effect = np.abs(f[1::2] - f[0::2]).max(axis=1)
    weak = [NAMES[k] for k in np.flatnonzero(effect < 1e-4)]
    assert not weak, f"labels with (almost) no effect: {weak}"


def test_smooth_in_the_labels(syn):
    base = star()
    for name, lo, hi in (("teff", 4400.0, 4600.0), ("logg", 2.0, 2.4), ("o_h", -0.3, -0.1)):
        x = np.repeat(base[None, :], 21, axis=0)
        x[:, NAMES.index(name)] = np.linspace(lo, hi, 21)
        f = syn.spectra(x)
        d1 = np.abs(np.diff(f, axis=0)).max()
        d2 = np.abs(np.diff(f, 2, axis=0)).max()
        assert d2 < 0.1 * d1, name


# -- wavelength overrides (Doppler-shifted grids) ---------------------------------------------------
def test_wavelength_override_exact_and_spline_paths_agree(syn):
    x = synth.sample_labels(2, 8)
    wl = syn.wavelength[2000:2400] / (1 + 41.7 / synth.C_KMS)  # rest-frame grid of a star at +41.7 km/s
    exact = syn.spectra(x, wavelength=wl)
    spline = syn.spectra(x, wavelength=np.append(wl, wl[-1] + 0.0123))[:, :-1]  # off the lattice
    assert np.abs(exact - spline).max() < 1e-5
    full = syn.spectra(x)
    assert np.abs(syn.spectra(x, wavelength=payne_apogee_wavelength()) - full[:, payne_apogee_pixels()]).max() < 1e-9
    other = synth.DemoSynthesizer(wavelength=payne_apogee_wavelength())
    assert other.n_pixels == 7214


# -- sample_labels and make_grid ------------------------------------------------------------------
def test_sample_labels_realistic():
    ls = synth.apogee_label_space()
    x = synth.sample_labels(2000, 4)
    assert x.shape == (2000, 25) and np.all(ls.contains(x))
    teff, logg = x[:, 0], x[:, 1]
    giants = logg < 3.7
    assert 0.45 < giants.mean() < 0.75
    # giants: cooler at lower logg; v_turb falls with logg; [X/H] follows [Fe/H]
    assert np.corrcoef(teff[giants], logg[giants])[0, 1] > 0.8
    assert np.corrcoef(logg, x[:, NAMES.index("v_turb")])[0, 1] < -0.9
    fe = x[:, NAMES.index("fe_h")]
    for nm in ("mg_h", "ni_h", "si_h"):
        assert np.corrcoef(fe, x[:, NAMES.index(nm)])[0, 1] > 0.9
    ratio = x[:, NAMES.index("c12_c13")]
    assert ratio.min() >= 5 and ratio.max() <= 60
    assert np.median(ratio[giants]) < np.median(ratio[~giants])
    for kind in ("giants", "dwarfs", "uniform"):
        assert np.all(ls.contains(synth.sample_labels(50, 1, kind)))
    assert np.all(synth.sample_labels(200, 1, "dwarfs")[:, 1] > 3.5)
    with pytest.raises(InputError, match="kind"):
        synth.sample_labels(3, 1, "stars")


def test_make_grid(syn):
    labels, flux = synth.make_grid(3, 9, syn)
    assert labels.shape == (3, 25) and flux.shape == (3, 8575)
    assert np.array_equal(flux, syn.spectra(labels))
    assert np.array_equal(labels, synth.sample_labels(3, 9))


# -- mock observations ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean(syn):
    return syn.spectra(synth.sample_labels(4, 21))


def test_mock_noise_matches_snr(syn, clean):
    snr = np.array([20.0, 50.0, 100.0, 200.0])
    batch, truth = synth.mock_observations(syn.wavelength, clean, snr=snr, continuum=False, chip_gaps=False, seed=1)
    assert isinstance(batch, SpectrumBatch)
    resid = (batch.flux - clean) * snr[:, None]
    assert np.allclose(resid.std(axis=1), 1.0, rtol=0.05)
    assert np.allclose(batch.ivar, snr[:, None] ** 2)
    # with a continuum the noise is continuum / snr and the flux is continuum * spectrum
    batch, truth = synth.mock_observations(syn.wavelength, clean, snr=80.0, seed=2)
    cont = truth["continuum"]
    assert np.all(cont > 0.5) and np.all(cont < 2.0) and np.ptp(cont[0]) > 0.01
    good = ~batch.mask
    z = ((batch.flux - cont * clean) / cont * 80.0)[good]
    assert z.std() == pytest.approx(1.0, rel=0.05)
    assert np.allclose(truth["sigma"], cont / 80.0)


def test_mock_chip_gaps_bad_pixels_and_inputs_unchanged(syn, clean):
    wl = syn.wavelength
    keep_wl, keep_flux = wl.copy(), clean.copy()
    batch, truth = synth.mock_observations(wl, clean, snr=100.0, rv=[0.0, 10.0, -20.0, 5.0],
                                           bad_pixel_fraction=0.02, seed=3)
    assert np.array_equal(wl, keep_wl) and np.array_equal(clean, keep_flux)
    chips = np.array(APOGEE_CHIPS)
    in_chip = np.any((wl[:, None] >= chips[:, 0]) & (wl[:, None] <= chips[:, 1]), axis=1)
    assert np.array_equal(truth["chip_gap"], ~in_chip) and (~in_chip).sum() > 100
    assert np.all(batch.mask[:, ~in_chip]) and np.all(batch.ivar[:, ~in_chip] == 0)
    bad = truth["bad_pixel"]
    assert 0.015 < bad[:, in_chip].mean() < 0.025
    assert np.all(batch.mask[bad]) and np.all(batch.ivar[bad] == 0)
    assert np.isnan(batch.flux).sum() > 0 and np.all(bad[np.isnan(batch.flux)])
    assert np.array_equal(batch.mask, bad | truth["out_of_range"] | ~in_chip[None, :])
    assert np.all(batch.usable_ivar()[batch.mask] == 0)
    # deterministic
    again, _ = synth.mock_observations(wl, clean, snr=100.0, rv=[0.0, 10.0, -20.0, 5.0],
                                       bad_pixel_fraction=0.02, seed=3)
    assert np.array_equal(again.flux, batch.flux, equal_nan=True)


def test_mock_rv_shift_moves_line_centroid():
    ll = np.zeros(1, dtype=synth.LINE_LIST_DTYPE)
    ll["wavelength"], ll["species"], ll["excitation"] = 16100.0, "Fe I", 5.0
    ll["loggf"] = 0.5 - synth.DemoSynthesizer(line_list=ll).log_line_strengths(star())[0]
    s1 = synth.DemoSynthesizer(line_list=ll)
    flux = s1.spectra(star())
    wl = s1.wavelength
    rv = np.array([-60.0, 0.0, 35.0])
    batch, truth = synth.mock_observations(wl, np.stack([flux] * 3), snr=1e6, rv=rv, continuum=False,
                                           chip_gaps=False, seed=4)
    win = np.abs(wl - 16100.0) < 12.0
    depth = 1 - batch.flux[:, win]
    centroid = (depth * wl[win]).sum(axis=1) / depth.sum(axis=1)
    expected = centroid[1] * (1 + rv / synth.C_KMS)
    assert np.abs(centroid - expected).max() < 0.01  # A; one pixel is ~0.22 A
    # pixels whose rest wavelength falls outside the grid are masked
    # (60 km/s is 14.5 pixels, 35 km/s 8.5 pixels)
    assert truth["out_of_range"][0, -14:].all() and not truth["out_of_range"][0, :-15].any()
    assert truth["out_of_range"][2, :8].all() and not truth["out_of_range"][2, 9:].any()
    assert not truth["out_of_range"][1].any()
    assert np.array_equal(batch.mask, truth["out_of_range"])
    # the spline shift agrees with synthesizing directly on the rest-frame grid
    direct = s1.spectra(star(), wavelength=wl[500:8000] / (1 + rv[2] / synth.C_KMS))
    # (a cubic spline through pixels ~1.5 LSF sigma apart: good to a few 1e-4 on a deep line)
    assert np.abs(truth["flux"][2, 500:8000] - direct).max() < 5e-4


def test_mock_validation(syn, clean):
    with pytest.raises(InputError, match="snr"):
        synth.mock_observations(syn.wavelength, clean, snr=0.0, seed=1)
    with pytest.raises(InputError, match="snr"):
        synth.mock_observations(syn.wavelength, clean, snr=[1.0, 2.0], seed=1)
    with pytest.raises(InputError, match="pixels"):
        synth.mock_observations(syn.wavelength[:-1], clean, snr=10.0, seed=1)
    with pytest.raises(InputError, match="bad_pixel_fraction"):
        synth.mock_observations(syn.wavelength, clean, snr=10.0, bad_pixel_fraction=1.5, seed=1)


@pytest.mark.shared
def test_line_depth_distribution_like_a_real_apogee_giant(syn):
    """The demo is calibrated to look like APOGEE: for a real DR14 giant (its ASPCAP labels, alpha
    elements at [alpha/M]), the fraction of pixels deeper than 0.1 and 0.2 agrees within a factor 1.5."""
    d = np.load(shared_path("apogee/dr14_aspcapstar_2M08002084+4044415.npz"))
    good = d["good_pixel_mask"].astype(bool) & np.isfinite(d["normalized_flux"]) & (d["normalized_flux"] > 0)
    real = d["normalized_flux"][good]
    real = real / np.percentile(real, 90)  # its pseudo-continuum sits ~1 % high
    m_h, alpha_m = -0.326, 0.253
    x = star(teff=4858.5, logg=2.427, v_turb=1.28, v_macro=3.62, c12_c13=15.0)
    for k, name in enumerate(NAMES):
        if name.endswith("_h"):
            x[k] = m_h + (alpha_m if name in ("o_h", "mg_h", "si_h", "s_h", "ca_h", "ti_h") else 0.0)
    x[NAMES.index("c_h")] += 0.03
    x[NAMES.index("n_h")] += 0.06
    demo = syn.spectra(x)[d["apstar_pixel"][good]]
    for depth in (0.1, 0.2):
        ratio = np.mean(demo < 1 - depth) / np.mean(real < 1 - depth)
        assert 1 / 1.5 < ratio < 1.5, (depth, ratio)
