"""The Cannon: peer agreement on real APOGEE data, recovery of a known model, the emulator contract."""

import json

import numpy as np
import pytest

from paynekit.emulators import CannonModel, load_emulator, save_emulator
from paynekit.emulators.cannon import CannonTrainConfig, PolynomialVectorizer, train_cannon
from paynekit.errors import InputError, NotFittedError

from .conftest import shared_path

NAMES = ("teff", "logg", "fe_h")
LO = np.array([4000.0, 1.0, -1.5])
HI = np.array([5500.0, 3.5, 0.4])


def quadratic_truth(seed, n_stars, n_pixels):
    """Labels, a known quadratic Cannon (theta in thecannon's z basis), s2, noise; returns a dict."""
    g = np.random.default_rng(seed)
    x = g.uniform(LO, HI, (n_stars, 3))
    pivots = np.median(x, axis=0)
    scales = np.ptp(np.percentile(x, [2.5, 97.5], axis=0), axis=0)
    vec = PolynomialVectorizer.from_order(3, 2)
    a, _ = vec.design_matrix((x - pivots) / scales)
    theta = np.zeros((n_pixels, vec.n_terms))
    theta[:, 0] = g.uniform(0.7, 1.0, n_pixels)
    theta[:, 1:4] = g.normal(0, 0.05, (n_pixels, 3))
    theta[:, 4:] = g.normal(0, 0.01, (n_pixels, vec.n_terms - 4))
    s2 = np.exp(g.uniform(np.log(0.002**2), np.log(0.03**2), n_pixels))
    sigma = g.uniform(0.005, 0.03, (n_stars, 1)) * g.uniform(0.7, 1.3, (1, n_pixels))
    flux = a @ theta.T + g.normal(size=(n_stars, n_pixels)) * np.sqrt(sigma**2 + s2)
    return {"x": x, "a": a, "theta": theta, "s2": s2, "ivar": 1 / sigma**2, "flux": flux, "pivots": pivots,
            "scales": scales}


@pytest.fixture(scope="module")
def truth():
    return quadratic_truth(11, 600, 300)


@pytest.fixture(scope="module")
def fitted(truth):
    return CannonModel(2).fit(truth["x"], truth["flux"], truth["ivar"], label_names=NAMES,
                              wavelength=np.linspace(15100.0, 15200.0, 300))


def fixture_design(d):
    names = list(d["label_names"])
    z = d["labels"] - d["pivots"]
    cols = [np.ones(len(z))]
    for term in json.loads(str(d["label_vector_json"])):
        col = np.ones(len(z))
        for name, power in term:
            col = col * z[:, names.index(name)] ** power
        cols.append(col)
    return np.array(cols).T


# ------------------------------------------------------------------------------------------------
# vectorizer
# ------------------------------------------------------------------------------------------------
def test_order_two_terms_follow_thecannon():
    # thecannon's terminator for labels (A, B, C), order 2: A B C A^2 A*B A*C B^2 B*C C^2
    expected = [[[0, 1]], [[1, 1]], [[2, 1]], [[0, 2]], [[0, 1], [1, 1]], [[0, 1], [2, 1]], [[1, 2]],
                [[1, 1], [2, 1]], [[2, 2]]]
    vec = PolynomialVectorizer.from_order(3, 2)
    assert vec.terms() == expected
    assert vec.n_terms == 10
    same = PolynomialVectorizer.from_terms(json.dumps(expected), NAMES)
    np.testing.assert_array_equal(same.exponents, vec.exponents)
    named = PolynomialVectorizer.from_terms([[["logg", 1], ["teff", 1]], [["fe_h", 2.0]]], NAMES)
    assert named.terms(NAMES) == [[["teff", 1], ["logg", 1]], [["fe_h", 2]]]


def test_vectorizer_rejects_bad_terms():
    for bad in ([], [[]], [[["teff", 1.5]]], [[["mass", 1]]], [[[0, 1]], [[0, 1]]], "not json"):
        with pytest.raises(InputError):
            PolynomialVectorizer.from_terms(bad, NAMES)


def test_design_matrix_derivative_matches_finite_differences(rng):
    vec = PolynomialVectorizer.from_order(3, 3)
    z = rng.uniform(-1, 1, (5, 3))
    z[0, 1] = 0.0  # the prefix/suffix products must cope with a zero label
    _, dv = vec.design_matrix(z, derivative=True)
    h = 1e-6
    for lab in range(3):
        dz = np.zeros(3)
        dz[lab] = h
        fd = (vec.design_matrix(z + dz)[0] - vec.design_matrix(z - dz)[0]) / (2 * h)
        np.testing.assert_allclose(dv[:, :, lab], fd, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# acceptance: peer agreement on real APOGEE spectra
# ------------------------------------------------------------------------------------------------
@pytest.mark.shared
def test_peer_agreement_on_apogee_fixture():
    d = np.load(shared_path("apogee/cannon_fixture_671stars_100pix.npz"))
    names = tuple(str(n) for n in d["label_names"])
    ivar = 1.0 / d["flux_err"] ** 2
    model = CannonModel(str(d["label_vector_json"]), pivots=d["pivots"], scales=1.0)
    model.fit(d["labels"], d["flux"], ivar, label_names=names)
    assert model.converged_.all()
    reference = fixture_design(d) @ d["coefficients"].T
    ours = model.predict(d["labels"])
    rms = np.sqrt(np.mean((ours - reference) ** 2))
    data_rms = np.sqrt(np.mean((d["flux"] - reference) ** 2))
    assert rms <= 2e-3 and 0.01 < data_rms < 0.016
    # measured: rms 3.3e-9, correlation of sqrt(s2) with the reference scatter 0.9999999990
    assert rms < 1e-6
    corr = np.corrcoef(np.sqrt(model.s2_), d["scatter"])[0, 1]
    assert corr > 0.999
    np.testing.assert_allclose(np.sqrt(model.s2_), d["scatter"], rtol=1e-4)
    np.testing.assert_allclose(model.theta_, d["coefficients"], rtol=1e-3, atol=1e-12)
    # the remaining (1e-4 relative) differences are the peer optimiser's tolerance: the likelihood of our
    # solution is at least as high as the reference's for every pixel
    a = fixture_design(d)

    def objective(theta, s2):
        r = d["flux"] - a @ theta.T
        w = ivar / (1 + ivar * s2)
        return np.sum(r * r * w - np.log(w), axis=0)

    assert np.all(objective(model.theta_, model.s2_) <= objective(d["coefficients"], d["scatter"] ** 2) + 1e-9)


# ------------------------------------------------------------------------------------------------
# acceptance: recovery of a known model with known scatter
# ------------------------------------------------------------------------------------------------
def test_recovers_theta_and_s2_within_fisher_errors(truth, fitted):
    np.testing.assert_allclose(fitted.pivots_, truth["pivots"])
    np.testing.assert_allclose(fitted.scales_, truth["scales"])
    a, ivar = truth["a"], truth["ivar"]
    w = ivar / (1 + ivar * truth["s2"])  # weights at the truth
    cov = np.linalg.inv(np.einsum("np,nt,nu->ptu", w, a, a))
    theta_err = np.sqrt(np.einsum("ptt->pt", cov))
    pull = (fitted.theta_ - truth["theta"]) / theta_err
    assert abs(pull.mean()) < 0.1 and 0.9 < pull.std() < 1.1 and np.abs(pull).max() < 5.5

    # s2: Fisher error sqrt(2 / sum w^2). Maximum likelihood is biased low by O(T/N); to first order
    # by -sum(w h) / sum(w^2), h the leverages. Corrected pulls of pixels away from s2 = 0 are N(0, 1).
    s2_err = np.sqrt(2 / np.sum(w**2, axis=0))
    leverage = np.einsum("nt,ptu,nu->np", a, cov, a) * w
    ml_bias = -np.sum(w * leverage, axis=0) / np.sum(w**2, axis=0)
    raw = (fitted.s2_ - truth["s2"]) / s2_err
    assert np.abs(raw).max() < 5 and -0.7 < raw.mean() < 0.0
    far = truth["s2"] / s2_err > 3
    corrected = (fitted.s2_ - truth["s2"] - ml_bias) / s2_err
    assert far.sum() > 150
    assert abs(corrected[far].mean()) < 0.25 and 0.8 < corrected[far].std() < 1.2


def test_fit_is_a_likelihood_maximum(truth, fitted):
    # perturbing theta or s2 of any pixel raises the objective sum_n r^2 w - ln w
    a = (truth["x"] - fitted.pivots_) / fitted.scales_
    v, _ = fitted.vectorizer_.design_matrix(a)

    def objective(theta, s2):
        r = truth["flux"] - v @ theta.T
        w = truth["ivar"] / (1 + truth["ivar"] * s2)
        return np.sum(r * r * w - np.log(w), axis=0)

    best = objective(fitted.theta_, fitted.s2_)
    g = np.random.default_rng(3)
    for _ in range(3):
        theta = fitted.theta_ + g.normal(0, 1e-4, fitted.theta_.shape)
        assert np.all(objective(theta, fitted.s2_) > best)
    positive = fitted.s2_ > 0
    assert np.all(objective(fitted.theta_, fitted.s2_ * 1.01)[positive] > best[positive])
    assert np.all(objective(fitted.theta_, fitted.s2_ * 0.99)[positive] > best[positive])


# ------------------------------------------------------------------------------------------------
# the emulator contract
# ------------------------------------------------------------------------------------------------
def _finite_difference_jacobian(model, x, rel_step=1e-5):
    span = model.label_space.span
    cols = []
    for lab in range(model.n_labels):
        dx = np.zeros(model.n_labels)
        dx[lab] = rel_step * span[lab]
        cols.append((model.predict(x + dx) - model.predict(x - dx)) / (2 * dx[lab]))
    return np.stack(cols, axis=-1)


def test_jacobian_matches_finite_differences(fitted, rng):
    x = rng.uniform(LO, HI, (4, 3))
    flux, jac = fitted.predict_and_jacobian(x)
    np.testing.assert_allclose(flux, fitted.predict(x), rtol=0, atol=1e-14)
    fd = _finite_difference_jacobian(fitted, x)
    for lab in range(3):
        np.testing.assert_allclose(jac[..., lab], fd[..., lab], rtol=1e-5, atol=1e-9 * np.abs(fd[..., lab]).max())
    # the model is the polynomial theta . v((x - pivots) / scales), written out here term by term
    z = (x - fitted.pivots_) / fitted.scales_
    manual = np.zeros((4, fitted.n_pixels))
    for t, term in enumerate([[]] + fitted.vectorizer_.terms()):
        col = np.ones(4)
        for index, power in term:
            col = col * z[:, index] ** power
        manual += col[:, None] * fitted.theta_[:, t]
    np.testing.assert_allclose(flux, manual, rtol=0, atol=1e-12)


def test_float32_evaluation_agrees(fitted, rng):
    x = rng.uniform(LO, HI, (3, 3))
    f64, j64 = fitted.predict_and_jacobian(x)
    f32, j32 = fitted.astype(np.float32).predict_and_jacobian(x)
    assert f32.dtype == np.float32 and j32.dtype == np.float32
    np.testing.assert_allclose(f32, f64, atol=2e-6)
    np.testing.assert_allclose(j32, j64, atol=2e-6 * np.abs(j64).max())


def test_round_trip_is_exact(fitted, tmp_path, rng):
    path = save_emulator(fitted, tmp_path / "cannon.npz")
    back = load_emulator(path)
    assert isinstance(back, CannonModel) and back.kind == "cannon"
    for name in ("theta_", "s2_", "pivots_", "scales_"):
        np.testing.assert_array_equal(getattr(back, name), getattr(fitted, name))
    np.testing.assert_array_equal(back.vectorizer_.exponents, fitted.vectorizer_.exponents)
    np.testing.assert_array_equal(back.wavelength, fitted.wavelength)
    np.testing.assert_array_equal(back.label_space.x_min, fitted.label_space.x_min)
    np.testing.assert_array_equal(back.label_space.x_max, fitted.label_space.x_max)
    assert back.label_names == NAMES
    assert back.meta["training_set_hash"] == fitted.meta["training_set_hash"] != ""
    x = rng.uniform(LO, HI, (5, 3))
    np.testing.assert_array_equal(back.predict_and_jacobian(x)[1], fitted.predict_and_jacobian(x)[1])
    np.testing.assert_array_equal(back.variance_floor(), fitted.variance_floor())


def test_variance_floor_and_adjusted_ivar(fitted):
    s2 = fitted.variance_floor()
    np.testing.assert_array_equal(s2, fitted.s2_)
    np.testing.assert_allclose(fitted.intrinsic_scatter, np.sqrt(s2))
    ivar = np.full((2, fitted.n_pixels), 1e4)
    ivar[1, :5] = 0
    original = ivar.copy()
    adj = fitted.adjusted_ivar(ivar)
    np.testing.assert_array_equal(ivar, original)
    np.testing.assert_allclose(adj[0], 1 / (1e-4 + s2))
    assert np.all(adj[1, :5] == 0)


# ------------------------------------------------------------------------------------------------
# regularisation, censoring, degenerate pixels
# ------------------------------------------------------------------------------------------------
def test_l1_solution_satisfies_optimality_conditions():
    t = quadratic_truth(5, 300, 60)
    grads = {}
    for lam in (0.0, 50.0, 1e4):
        m = CannonModel(2, regularization=lam).fit(t["x"], t["flux"], t["ivar"], label_names=NAMES)
        v, _ = m.vectorizer_.design_matrix((t["x"] - m.pivots_) / m.scales_)
        w = t["ivar"] / (1 + t["ivar"] * m.s2_)
        q = np.einsum("np,nt,nu->ptu", w, v, v)
        b = np.einsum("np,nt,np->pt", w, v, t["flux"])
        grad = 2 * (np.einsum("ptu,pu->pt", q, m.theta_) - b)[:, 1:]
        th = m.theta_[:, 1:]
        nonzero = th != 0
        # subgradient conditions of chi^2 + lam |theta|: equality on the support, |grad| <= lam off it
        scale = max(lam, 1.0)
        assert np.all(np.abs(grad[nonzero] + lam * np.sign(th[nonzero])) < 1e-3 * scale)
        assert np.all(np.abs(grad[~nonzero]) <= lam * (1 + 1e-6))
        grads[lam] = int((~nonzero).sum())
    assert grads[0.0] == 0 < grads[50.0] < grads[1e4]


def test_censored_pixels_equal_a_model_without_that_label():
    t = quadratic_truth(8, 300, 40)
    censored = np.zeros(40, dtype=bool)
    censored[:15] = True
    full = CannonModel(2, censors={"fe_h": ~censored}).fit(t["x"], t["flux"], t["ivar"], label_names=NAMES)
    uses_feh = full.vectorizer_.uses_label()[:, 2]
    assert np.all(full.theta_[censored][:, uses_feh] == 0)
    assert np.any(full.theta_[~censored][:, uses_feh] != 0)
    jac = full.jacobian(t["x"][:3])
    assert np.all(jac[:, censored, 2] == 0) and np.all(np.abs(jac[:, ~censored, 2]).max(axis=0) > 0)
    # the censored pixels are fitted exactly as a two-label model with the same pivots and scales
    terms = PolynomialVectorizer.from_order(2, 2).terms()
    two = CannonModel(terms, pivots=full.pivots_[:2], scales=full.scales_[:2])
    two.fit(t["x"][:, :2], t["flux"][:, censored], t["ivar"][:, censored], label_names=NAMES[:2])
    np.testing.assert_allclose(full.theta_[censored][:, ~uses_feh], two.theta_, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(full.s2_[censored], two.s2_, rtol=1e-6)


def test_pixels_without_information_get_infinite_s2(rng):
    t = quadratic_truth(9, 100, 6)
    ivar = t["ivar"].copy()
    ivar[:, 2] = 0
    ivar[5:, 4] = 0  # five stars are fewer than the ten coefficients
    flux = t["flux"].copy()
    flux[:, 2] = np.nan
    m = CannonModel(2).fit(t["x"], flux, ivar, label_names=NAMES)
    assert np.isinf(m.s2_[[2, 4]]).all() and np.isfinite(m.s2_[[0, 1, 3, 5]]).all()
    np.testing.assert_array_equal(m.theta_[2], np.eye(10)[0])
    adj = m.adjusted_ivar(np.ones((1, 6)))
    assert adj[0, 2] == 0 and adj[0, 4] == 0 and np.all(adj[0, [0, 1, 3, 5]] > 0)


def test_batched_training_does_not_depend_on_chunking(truth):
    sub = slice(0, 40)
    a = CannonModel(2).fit(truth["x"], truth["flux"][:, sub], truth["ivar"][:, sub])
    b = CannonModel(2, config=CannonTrainConfig(chunk_bytes=50_000)).fit(
        truth["x"], truth["flux"][:, sub], truth["ivar"][:, sub])
    np.testing.assert_allclose(a.theta_, b.theta_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.s2_, b.s2_, rtol=1e-8)


def test_train_cannon_single_pixel_matches_a_generic_optimiser():
    # one pixel: maximise the profile likelihood over s2 with a generic scalar optimiser, theta(s2) by lstsq
    from scipy.optimize import minimize_scalar

    t = quadratic_truth(4, 200, 8)
    p = int(np.argmax(t["s2"]))  # a pixel with clearly positive intrinsic variance
    a, f, iv = t["a"], t["flux"][:, p], t["ivar"][:, p]
    theta, s2, converged, _ = train_cannon(a, t["flux"][:, p:p + 1], t["ivar"][:, p:p + 1])

    def profile(s2_value):
        w = iv / (1 + iv * s2_value)
        th = np.linalg.lstsq(a * np.sqrt(w)[:, None], f * np.sqrt(w), rcond=None)[0]
        r = f - a @ th
        return np.sum(r * r * w - np.log(w)), th

    res = minimize_scalar(lambda v: profile(v)[0], bounds=(0.0, 0.01), method="bounded",
                          options={"xatol": 1e-12})
    assert converged[0] and profile(s2[0])[0] <= res.fun + 1e-8
    np.testing.assert_allclose(s2[0], res.x, rtol=1e-4)
    np.testing.assert_allclose(theta[0], profile(res.x)[1], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# lifecycle and validation
# ------------------------------------------------------------------------------------------------
def test_unfitted_model_raises():
    m = CannonModel(2)
    assert "unfitted" in repr(m)
    with pytest.raises(NotFittedError):
        m.predict(np.zeros(3))
    with pytest.raises(NotFittedError):
        m.variance_floor()
    with pytest.raises(NotFittedError):
        save_emulator(m, "/nonexistent/never_written.npz")


def test_fit_validates_inputs_and_leaves_them_alone(truth):
    x, f, iv = truth["x"][:50].copy(), truth["flux"][:50, :5].copy(), truth["ivar"][:50, :5].copy()
    copies = (x.copy(), f.copy(), iv.copy())
    CannonModel(2).fit(x, f, iv, label_names=NAMES)
    for before, after in zip(copies, (x, f, iv)):
        np.testing.assert_array_equal(before, after)
    with pytest.raises(InputError, match="ivar has shape"):
        CannonModel(2).fit(x, f, iv[:, :4])
    with pytest.raises(InputError, match="label_names"):
        CannonModel(2).fit(x, f, iv, label_names=("a", "b"))
    bad = f.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        CannonModel(2).fit(x, bad, iv)
    with pytest.raises(InputError, match="pivots"):
        CannonModel(2, pivots="mean").fit(x, f, iv)
    with pytest.raises(InputError, match="censors"):
        CannonModel(2, censors={"mass": np.ones(5, bool)}).fit(x, f, iv, label_names=NAMES)
    with pytest.raises(TypeError):
        CannonModel(2, order=3)


# ------------------------------------------------------------------------------------------------
# the peer's model file
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def thecannon_model():
    return load_emulator(shared_path("cannon_models/thecannon_cubic_3label_optical.npz"))


@pytest.mark.shared
def test_thecannon_file_loads_and_matches_its_formula(thecannon_model):
    path = shared_path("cannon_models/thecannon_cubic_3label_optical.npz")
    d = np.load(path)
    m = thecannon_model
    assert isinstance(m, CannonModel) and m.n_pixels == 150001 and m.label_names == ("TEFF", "LOGG", "FEH")
    assert m.wavelength_medium == "air"  # thedoppler's Cannon grids are written with wavevac = False
    # the file's terms are thecannon's default cubic PolynomialVectorizer, in its term order
    np.testing.assert_array_equal(m.vectorizer_.exponents, PolynomialVectorizer.from_order(3, 3).exponents)
    # fiducials and scales are thecannon's defaults on its training labels (median, 2.5-97.5 range)
    train = d["training_set_labels"].astype(float)
    np.testing.assert_allclose(m.pivots_, np.median(train, axis=0))
    np.testing.assert_allclose(m.scales_, np.ptp(np.percentile(train, [2.5, 97.5], axis=0), axis=0))
    # thecannon's CannonModel.__call__: theta @ get_label_vector((labels - fiducials) / scales), term by term
    x = np.array([[4800.0, 2.5, -0.3], [6000.0, 4.2, -1.2], [3600.0, 0.8, 0.2]])
    z = (x - d["fiducials"]) / d["scales"]
    columns = [np.ones(3)]
    for term in json.loads(str(d["vectorizer_terms_json"])):
        col = 1.0
        for index, power in term:
            col = col * z[:, index] ** power
        columns.append(col)
    expected = np.array(columns).T @ d["theta"].astype(float).T
    np.testing.assert_allclose(m.predict(x), expected, rtol=0, atol=1e-10)


@pytest.mark.shared
def test_thecannon_predictions_look_like_spectra(thecannon_model):
    d = np.load(shared_path("cannon_models/thecannon_cubic_3label_optical.npz"))
    m = thecannon_model
    sample = d["training_set_labels"].astype(float)[::7]
    flux = m.predict(sample)
    # normalised spectra at the grid points the model was trained on: values 0..1.1, median near 1
    assert np.mean((flux > -0.02) & (flux < 1.1)) > 0.99
    assert 0.97 < np.median(flux) < 1.0
    # H-alpha (6562.8 A in air) deepens from 4000 K to 8000 K at logg 4, [Fe/H] 0: the TEFF index is right
    halpha = np.argmin(np.abs(m.wavelength - 6562.80))
    depth = [m.predict([teff, 4.0, 0.0])[halpha] for teff in (4000.0, 5000.0, 6000.0, 7000.0, 8000.0)]
    assert np.all(np.diff(depth) < 0) and depth[0] > 0.7 and depth[-1] < 0.3


@pytest.mark.shared
def test_thecannon_jacobian_matches_finite_differences(thecannon_model):
    m = thecannon_model
    x = np.array([[5200.0, 3.1, -0.6], [4300.0, 1.9, -1.8]])
    pixels = slice(30000, 60000)  # 6000-9000 A keeps the test light
    jac = m.jacobian(x)[:, pixels]
    fd = _finite_difference_jacobian(m, x)[:, pixels]
    for lab in range(3):
        np.testing.assert_allclose(jac[..., lab], fd[..., lab], rtol=1e-5, atol=1e-9 * np.abs(fd[..., lab]).max())
