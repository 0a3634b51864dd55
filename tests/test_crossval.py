"""Cross-validation: folds, the per-star fitter, and label recovery of held-out stars."""

import numpy as np
import pytest

from paynekit.crossval import (
    CrossValidationResult,
    LabelFitConfig,
    cross_validate,
    kfold_assignments,
    least_squares_labels,
    leave_one_out,
)
from paynekit.emulators import CannonModel
from paynekit.emulators.cannon import PolynomialVectorizer
from paynekit.errors import InputError
from paynekit.labels import LabelSpace

from .test_cannon import HI, LO, NAMES, quadratic_truth

ONE_START = LabelFitConfig(n_starts=1)


def test_kfold_assignments_partition_and_are_seeded():
    fold = kfold_assignments(23, 5, seed=4)
    assert sorted(np.bincount(fold)) == [4, 4, 5, 5, 5]
    np.testing.assert_array_equal(fold, kfold_assignments(23, 5, seed=4))
    assert not np.array_equal(fold, kfold_assignments(23, 5, seed=5))
    for bad in (1, 24):
        with pytest.raises(InputError):
            kfold_assignments(23, bad, seed=0)


def test_least_squares_labels_recovers_noiseless_labels():
    t = quadratic_truth(21, 300, 80)
    model = CannonModel(2).fit(t["x"], t["flux"], t["ivar"], label_names=NAMES)
    x = np.random.default_rng(2).uniform(LO + 0.1 * (HI - LO), HI - 0.1 * (HI - LO), (6, 3))
    flux = model.predict(x)
    ivar = np.full_like(flux, 1e4)
    before = ivar.copy()
    res = least_squares_labels(model, flux, ivar)
    np.testing.assert_array_equal(ivar, before)
    assert res.success.all() and np.all(res.chi2 < 1e-12)
    np.testing.assert_allclose(res.labels, x, rtol=1e-7, atol=1e-9)


def test_kfold_cross_validation_has_small_bias_and_expected_scatter():
    t = quadratic_truth(31, 200, 100)
    result = cross_validate(CannonModel(2), t["x"], t["flux"], t["ivar"], n_folds=5, seed=1,
                            label_names=NAMES, fit_config=ONE_START)
    assert isinstance(result, CrossValidationResult) and result.label_names == NAMES
    assert result.success.all() and np.unique(result.fold).size == 5
    # the Cramer-Rao bound of each star under the true model and scatter
    params = {"theta": t["theta"], "s2": t["s2"], "pivots": t["pivots"], "scales": t["scales"],
              "exponents": PolynomialVectorizer.from_order(3, 2).exponents}
    truth_model = CannonModel.from_arrays(params, LabelSpace(NAMES, LO, HI), None)
    jac = truth_model.jacobian(t["x"])
    w = truth_model.adjusted_ivar(t["ivar"])
    crlb = np.sqrt(np.einsum("nll->nl", np.linalg.inv(np.einsum("npk,np,npl->nkl", jac, w, jac))))
    expected = np.sqrt(np.mean(crlb**2, axis=0))
    n = len(t["x"])
    # measured (seed 31): scatter / CRLB = 1.04, 1.10, 1.02 (the training noise adds to the test noise);
    # bias / (scatter / sqrt(N)) = -0.14, 0.93, 1.42
    assert np.all(result.scatter > 0.8 * expected) and np.all(result.scatter < 1.5 * expected)
    assert np.all(np.abs(result.bias) < 4 * result.scatter / np.sqrt(n))
    assert np.all(np.abs(result.robust_bias) < 5 * result.scatter / np.sqrt(n))
    assert "fe_h" in result.summary()


def test_leave_one_out_matches_a_manual_hold_out():
    t = quadratic_truth(41, 40, 30)
    x, f, iv = t["x"], t["flux"], t["ivar"]
    result = leave_one_out(CannonModel(1), x, f, iv, label_names=NAMES, fit_config=ONE_START)
    np.testing.assert_array_equal(result.fold, np.arange(40))
    keep = np.arange(40) != 7
    model = CannonModel(1).fit(x[keep], f[keep], iv[keep], label_names=NAMES)
    manual = least_squares_labels(model, f[7:8], iv[7:8], config=ONE_START).labels[0]
    np.testing.assert_allclose(result.predicted_labels[7], manual, rtol=1e-12)


def test_custom_fitter_and_estimator_factory_are_used():
    t = quadratic_truth(51, 60, 20)
    calls = []

    def fitter(model, flux, ivar):
        calls.append((model.n_pixels, flux.shape[0]))
        return np.tile(model.label_space.center(), (flux.shape[0], 1))

    result = cross_validate(lambda: CannonModel(1), t["x"], t["flux"], t["ivar"], n_folds=3, seed=0,
                            fitter=fitter)
    assert sorted(c[1] for c in calls) == [20, 20, 20] and all(c[0] == 20 for c in calls)
    assert result.success.all()
    with pytest.raises(InputError):
        cross_validate(CannonModel(1), t["x"], t["flux"], t["ivar"], n_folds="all")
