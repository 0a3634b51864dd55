"""Flags: every bit raised in a constructed case, with a reason; decoding."""

from __future__ import annotations

import numpy as np
import pytest

from paynekit.errors import InputError
from paynekit.fitting import FitConfig, fit
from paynekit.flags import BAD_FLAGS, ResultFlag, decode_flags, flag_value, has_flag

from ._fitting_toys import LineToy, noisy

# a box wider than Astra's trusted ranges, so that a fit can land outside them
WIDE_MIN = np.array([2500.0, -0.5, -2.5, -0.5])
WIDE_MAX = np.array([9000.0, 6.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def wide():
    return LineToy(x_min=WIDE_MIN, x_max=WIDE_MAX, seed=4)


def run(toy, labels, v=None, snr=150.0, seed=0, config=None, ivar_factor=1.0, mask=None):
    rng = np.random.default_rng(seed)
    labels = np.atleast_2d(labels)
    v = np.zeros(len(labels)) if v is None else np.atleast_1d(v)
    flux, ivar = noisy(toy.observe(labels, v), snr, rng)
    args = (toy.emu.wavelength, flux, ivar * ivar_factor) + (() if mask is None else (mask,))
    return fit(toy.emu, args, config or FitConfig(presearch_size=1024))


def centre(toy):
    return toy.emu.label_space.center()


def test_decode_and_values():
    assert decode_flags(0) == []
    v = flag_value("LOW_SNR", "BAD_INPUT")
    assert v == (1 << 4) | (1 << 10)
    assert decode_flags(v) == ["LOW_SNR", "BAD_INPUT"]
    assert list(has_flag([0, v, 1 << 4], "LOW_SNR")) == [False, True, True]
    assert int(BAD_FLAGS) == (1 << 0) | (1 << 10)
    # the five Astra bits keep Astra's positions
    assert [int(f) for f in list(ResultFlag)[:5]] == [1, 2, 4, 8, 16]
    with pytest.raises(InputError, match="unknown flag"):
        flag_value("NOPE")


def test_clean_fit_has_no_flags(wide):
    t = run(wide, [5000.0, 3.0, -0.3, 0.1])
    assert t["result_flags"][0] == 0 and not t["flag_warn"][0] and t["flag_reason"][0] == ""


@pytest.mark.parametrize(
    ("labels", "bit", "word"),
    [
        ([8500.0, 3.0, -0.3, 0.1], "TEFF_OUT_OF_RANGE", "teff"),
        ([5000.0, 5.6, -0.3, 0.1], "LOGG_OUT_OF_RANGE", "logg"),
        ([5000.0, 3.0, -2.0, 0.1], "FE_H_OUT_OF_RANGE", "fe_h"),
    ],
)
def test_astra_range_flags(wide, labels, bit, word):
    t = run(wide, labels)
    assert decode_flags(t["result_flags"][0]) == [bit]
    assert word in t["flag_reason"][0]
    assert t["flag_warn"][0] and not t["flag_bad"][0]


def test_low_snr(wide):
    t = run(wide, [5000.0, 3.0, -0.3, 0.1], snr=40.0)
    assert has_flag(t["result_flags"], "LOW_SNR")[0]
    assert "S/N" in t["flag_reason"][0]
    assert abs(t["snr"][0] - 40.0 * np.median(wide.observe(np.array([[5000.0, 3.0, -0.3, 0.1]]), [0.0]))) < 3


def test_label_at_bound(wide):
    span = WIDE_MAX - WIDE_MIN
    x = centre(wide).copy()
    x[3] = WIDE_MAX[3] + 0.4 * span[3]  # beyond the box: the fit stops at its edge
    t = run(wide, x)
    assert has_flag(t["result_flags"], "LABEL_AT_BOUND")[0]
    assert "alpha_fe" in t["flag_reason"][0]
    assert t["alpha_fe"][0] == pytest.approx(WIDE_MAX[3])


def test_rv_at_bound(wide):
    # the star moves a little faster than the allowed range: the fit stops at its edge
    t = run(wide, [5000.0, 3.0, -0.3, 0.1], v=104.0, config=FitConfig(rv_range=100.0, presearch_size=512))
    assert has_flag(t["result_flags"], "RV_AT_BOUND")[0]
    assert t["v_rel"][0] == pytest.approx(100.0)
    assert "v_rel" in t["flag_reason"][0]


def test_high_reduced_chi2(wide):
    t = run(wide, [5000.0, 3.0, -0.3, 0.1], ivar_factor=9.0)  # errors underestimated 3x
    assert has_flag(t["result_flags"], "HIGH_REDUCED_CHI2")[0]
    assert t["reduced_chi2"][0] == pytest.approx(9.0, rel=0.1)


def test_few_good_pixels(wide):
    mask = np.zeros((1, wide.emu.n_pixels), dtype=bool)
    mask[0, :500] = True
    t = run(wide, [5000.0, 3.0, -0.3, 0.1], mask=mask)
    assert decode_flags(t["result_flags"][0]) == ["FEW_GOOD_PIXELS"]
    assert t["n_pixels"][0] <= 300


def test_presearch_disagrees(wide):
    t = run(wide, [5000.0, 3.0, -0.3, 0.1], config=FitConfig(presearch_size=64, flag_presearch_shift=1e-6))
    assert has_flag(t["result_flags"], "PRESEARCH_DISAGREES")[0]
    assert "pre-search" in t["flag_reason"][0]


def test_fit_failure_on_a_label_without_effect():
    toy = LineToy(dead_label=2, seed=5)
    t = run(toy, toy.emu.label_space.center())
    assert has_flag(t["result_flags"], "FIT_FAILURE")[0]
    assert t["flag_bad"][0]
    assert "singular" in t["flag_reason"][0]


def test_bad_input_rows(wide):
    x = np.array([[5000.0, 3.0, -0.3, 0.1]] * 3)
    rng = np.random.default_rng(1)
    flux, ivar = noisy(wide.observe(x, np.zeros(3)), 150.0, rng)
    flux[1] = np.nan
    ivar[2] = 0.0
    t = fit(wide.emu, (wide.emu.wavelength, flux, ivar), FitConfig(presearch_size=256))
    assert list(t["flag_bad"]) == [False, True, True]
    for i in (1, 2):
        assert has_flag(t["result_flags"], "BAD_INPUT")[i]
        assert t["flag_reason"][i]
        assert np.isnan(t["teff"][i]) and np.isnan(t["snr"][i])


def test_custom_thresholds_come_from_the_config(wide):
    cfg = FitConfig(presearch_size=512, flag_teff_range=(5500.0, 9000.0), flag_min_snr=10.0)
    t = run(wide, [5000.0, 3.0, -0.3, 0.1], config=cfg)
    assert decode_flags(t["result_flags"][0]) == ["TEFF_OUT_OF_RANGE"]
    assert "5500" in t["flag_reason"][0]
