"""The compiled helpers of paynekit._kernels against their numpy definitions."""

import numpy as np
import pytest

from paynekit._kernels import median_snr, numba_enabled


def _reference(data, weights):
    out = np.full(data.shape[0], np.nan)
    has = np.any(weights > 0, axis=1)
    with np.errstate(invalid="ignore"):
        pix = np.where(weights[has] > 0, data[has] * np.sqrt(weights[has]), np.nan)
    out[has] = np.nanmedian(pix, axis=1)
    return out


@pytest.mark.parametrize("compiled", [True, False])
def test_median_snr_is_the_nanmedian_of_the_usable_pixels(compiled, monkeypatch):
    """Odd and even counts of usable pixels, one pixel, none, ties, sorted rows, negative flux: the same
    numbers as nanmedian(where(ivar > 0, flux * sqrt(ivar), nan)), with and without numba."""
    if compiled and not numba_enabled():
        pytest.skip("numba is not importable")
    if not compiled:
        monkeypatch.setenv("PAYNEKIT_DISABLE_NUMBA", "1")
    rng = np.random.default_rng(3)
    p = 501
    data = 1.0 + 0.1 * rng.normal(size=(12, p))
    weights = rng.uniform(50, 150, size=(12, p))
    weights[1, ::2] = 0  # 250 usable: an even count
    weights[2, :] = 0  # none
    weights[3, 1:] = 0  # one
    data[4] = 0.5  # all tied
    data[5] = np.sort(data[5])
    data[6] -= 2.0  # negative flux
    weights[7, rng.uniform(size=p) < 0.9] = 0
    data[8] = np.round(data[8], 1)  # many ties
    weights[9, :2] = 0
    weights[9, 3:] = 0  # two usable pixels
    before = (data.copy(), weights.copy())
    got = median_snr(data, weights)
    np.testing.assert_array_equal(got, _reference(data, weights))
    assert np.isnan(got[2]) and np.isfinite(got[np.arange(12) != 2]).all()
    np.testing.assert_array_equal(data, before[0])  # inputs untouched
    np.testing.assert_array_equal(weights, before[1])


def test_median_snr_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        median_snr(np.ones((2, 5)), np.ones((2, 4)))


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-5), (np.float64, 1e-12)])
def test_gram_rows_equals_numpy_products(dtype, rtol):
    """H = js js^T and g = js r per star, as numpy's matmul gives them (to rounding: the kernel reorders
    sums), symmetric, for one to twelve parameters."""
    from paynekit._kernels import gram_rows

    if not numba_enabled():
        pytest.skip("numba is not importable")
    rng = np.random.default_rng(4)
    for f in (1, 6, 12):
        js = rng.normal(size=(5, f, 1001)).astype(dtype)
        r = rng.normal(size=(5, 1001)).astype(dtype)
        h, g = gram_rows(js, r)
        js64, r64 = js.astype(np.float64), r.astype(np.float64)
        ref_h = js64 @ np.swapaxes(js64, 1, 2)
        ref_g = (js64 @ r64[:, :, None])[..., 0]
        assert h.dtype == g.dtype == np.float64
        np.testing.assert_allclose(h, ref_h, rtol=0, atol=rtol * np.abs(ref_h).max())
        np.testing.assert_allclose(g, ref_g, rtol=0, atol=rtol * np.abs(ref_g).max())
        np.testing.assert_array_equal(h, np.swapaxes(h, 1, 2))
