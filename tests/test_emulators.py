"""The emulator contract: shapes, dtypes, analytic Jacobians against finite differences, file round trips."""

import numpy as np
import pytest

from paynekit.emulators import PayneMLP, PaynePerPixel, load_emulator, save_emulator
from paynekit.errors import FileFormatError, InputError
from paynekit.labels import LabelSpace


def _perpixel(seed=3, n_pix=120, n_hidden=6):
    g = np.random.default_rng(seed)
    ls = LabelSpace(("teff", "logg", "fe_h"), [4000.0, 1.0, -1.0], [6000.0, 5.0, 0.5])
    return PaynePerPixel(g.normal(0, 1, (n_pix, n_hidden, 3)), g.normal(0, 0.5, (n_pix, n_hidden)),
                         g.normal(0, 0.1, (n_pix, n_hidden)), 1 + g.normal(0, 0.01, n_pix), ls,
                         np.linspace(15100, 15200, n_pix))


def _sigmoid_mlp(small_mlp):
    return PayneMLP(small_mlp.weights, small_mlp.biases, small_mlp.label_space, small_mlp.wavelength,
                    activation="sigmoid")


def _finite_difference_jacobian(emu, x, rel_step=1e-6):
    h = rel_step * emu.label_space.span
    cols = []
    for j in range(emu.n_labels):
        step = np.zeros(emu.n_labels)
        step[j] = h[j]
        cols.append((emu.predict(x + step) - emu.predict(x - step)) / (2 * h[j]))
    return np.stack(cols, axis=-1)


@pytest.fixture(params=["mlp_leaky", "mlp_sigmoid", "perpixel"])
def emulator(request, small_mlp):
    return {"mlp_leaky": lambda: small_mlp, "mlp_sigmoid": lambda: _sigmoid_mlp(small_mlp),
            "perpixel": _perpixel}[request.param]()


def _interior_labels(emu, rng, n=5):
    return emu.label_space.unscale(rng.uniform(-0.45, 0.45, (n, emu.n_labels)))


def test_jacobian_matches_finite_differences(emulator, rng):
    x = _interior_labels(emulator, rng)
    jac = emulator.jacobian(x)
    assert jac.shape == (5, emulator.n_pixels, emulator.n_labels)
    fd = _finite_difference_jacobian(emulator, x)
    # leaky ReLU kinks are measure-zero; with these seeds no unit sits within the step of its kink
    np.testing.assert_allclose(jac, fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())


def test_batched_equals_one_at_a_time(emulator, rng):
    x = _interior_labels(emulator, rng, 4)
    flux, jac = emulator.predict_and_jacobian(x)
    for i in range(4):
        f1, j1 = emulator.predict_and_jacobian(x[i])
        assert f1.shape == (emulator.n_pixels,) and j1.shape == (emulator.n_pixels, emulator.n_labels)
        np.testing.assert_allclose(f1, flux[i], rtol=1e-12)
        np.testing.assert_allclose(j1, jac[i], rtol=1e-10, atol=1e-14)


def test_float32_close_to_float64(emulator, rng):
    x = _interior_labels(emulator, rng)
    e32 = emulator.astype(np.float32)
    assert e32.dtype == np.float32 and e32.predict(x).dtype == np.float32
    np.testing.assert_allclose(e32.predict(x), emulator.predict(x), atol=1e-5)
    j64 = emulator.jacobian(x)
    np.testing.assert_allclose(e32.jacobian(x), j64, atol=1e-4 * np.abs(j64).max())


def test_mlp_float32_copy_is_kept_but_not_pickled(small_mlp, rng):
    import pickle

    size = len(pickle.dumps(small_mlp))
    e32 = small_mlp.astype(np.float32)
    assert small_mlp.astype("float32") is e32 and small_mlp.astype(small_mlp.dtype) is small_mlp
    # a worker is sent the network, not the network and its copies
    assert len(pickle.dumps(small_mlp)) == size
    back = pickle.loads(pickle.dumps(small_mlp))
    x = _interior_labels(small_mlp, rng)
    np.testing.assert_array_equal(back.astype(np.float32).predict(x), e32.predict(x))


def test_jacobian_chunking_gives_same_result(small_mlp, rng, monkeypatch):
    import paynekit.emulators.base as base

    x = _interior_labels(small_mlp, rng, 7)
    full = small_mlp.jacobian(x)
    monkeypatch.setattr(base, "JACOBIAN_CHUNK_BYTES", 1)  # one star per chunk
    np.testing.assert_array_equal(small_mlp.jacobian(x), full)


def test_predict_does_not_modify_input(small_mlp, rng):
    x = _interior_labels(small_mlp, rng)
    before = x.copy()
    small_mlp.predict_and_jacobian(x)
    np.testing.assert_array_equal(x, before)


def test_bad_labels_are_rejected_with_names(small_mlp):
    with pytest.raises(InputError, match="labels has 3 labels per star .* model has 4"):
        small_mlp.predict(np.zeros((2, 3)))
    with pytest.raises(InputError, match="non-finite"):
        small_mlp.predict([np.nan, 1, 2, 3])


def test_inconsistent_weights_rejected(small_mlp):
    w = list(small_mlp.weights)
    w[1] = w[1][:, :10]
    with pytest.raises(InputError, match="layer 1"):
        PayneMLP(w, small_mlp.biases, small_mlp.label_space, small_mlp.wavelength)
    with pytest.raises(InputError, match="activation"):
        PayneMLP(small_mlp.weights, small_mlp.biases, small_mlp.label_space, small_mlp.wavelength,
                 activation="tanh")


def test_torch_evaluator_matches_numpy(small_mlp, rng):
    torch = pytest.importorskip("torch")
    x = _interior_labels(small_mlp, rng)
    xs = torch.as_tensor(small_mlp.label_space.scale(x))
    flux, jac = small_mlp.torch_evaluator("cpu", torch.float64)(xs)
    f_np, j_np = small_mlp.predict_and_jacobian_scaled(small_mlp.label_space.scale(x))
    np.testing.assert_allclose(flux.numpy(), f_np, rtol=1e-12)
    np.testing.assert_allclose(jac.numpy(), j_np, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_save_load_round_trip_is_exact(emulator, tmp_path, rng, dtype):
    emu = emulator.astype(dtype)
    path = save_emulator(emu, tmp_path / "model.npz", training_set_hash="abc123")
    back = load_emulator(path)
    assert type(back) is type(emu)
    assert back.label_names == emu.label_names and back.dtype == emu.dtype
    assert back.meta["training_set_hash"] == "abc123"
    np.testing.assert_array_equal(back.wavelength, emu.wavelength)
    np.testing.assert_array_equal(back.label_space.x_min, emu.label_space.x_min)
    x = _interior_labels(emu, rng)
    np.testing.assert_array_equal(back.predict(x), emu.predict(x))
    with np.load(path, allow_pickle=False) as data:  # readable without pickle
        assert int(data["format_version"]) == 1 and str(data["kind"]) == emu.kind


def test_unknown_layout_fails_clearly(tmp_path):
    p = tmp_path / "odd.npz"
    np.savez(p, foo=np.zeros(3), bar=np.ones(2))
    with pytest.raises(FileFormatError, match=r"odd\.npz: unknown emulator layout; found arrays \['bar', 'foo'\]"):
        load_emulator(p)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(FileFormatError, match="empty"):
        load_emulator(empty)
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(FileFormatError, match="not an npz archive"):
        load_emulator(text)


def test_unknown_version_fails_clearly(small_mlp, tmp_path):
    path = save_emulator(small_mlp, tmp_path / "m.npz")
    with np.load(path) as d:
        arrays = {k: d[k] for k in d.files}
    arrays["format_version"] = np.array(99)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(FileFormatError, match="format version 99.*reads versions \\(1,\\)"):
        load_emulator(tmp_path / "future.npz")


def test_pickle_only_when_trusted(small_mlp, tmp_path, rng):
    import pickle

    model = {"weights": small_mlp.weights, "biases": small_mlp.biases, "x_min": small_mlp.label_space.x_min,
             "x_max": small_mlp.label_space.x_max, "wavelength": small_mlp.wavelength,
             "label_names": list(small_mlp.label_names)}
    path = tmp_path / "astra_payne.pkl"
    with open(path, "wb") as fh:
        pickle.dump(model, fh)
    with pytest.raises(FileFormatError, match="pickle.*trust_pickle=True"):
        load_emulator(path)
    emu = load_emulator(path, trust_pickle=True)
    x = _interior_labels(small_mlp, rng)
    np.testing.assert_allclose(emu.predict(x), small_mlp.predict(x), rtol=1e-14)
    assert emu.label_names == small_mlp.label_names


def test_save_refuses_a_hash_that_is_not_a_string(small_mlp, tmp_path):
    """A non-string hash (e.g. the bound method ``grid.hash``) would be pickled into the npz."""
    with pytest.raises(InputError, match="training_set_hash must be a str"):
        save_emulator(small_mlp, tmp_path / "model.npz", training_set_hash=lambda: "abc")
    assert not (tmp_path / "model.npz").exists()


def _leaky_mlp(seed=7, n_labels=6, h1=40, h2=30, n_pix=200, dtype=np.float64):
    rng = np.random.default_rng(seed)
    ls = LabelSpace([f"l{i}" for i in range(n_labels)], np.zeros(n_labels), np.ones(n_labels))
    ws = [rng.normal(0, 1.0, (h1, n_labels)), rng.normal(0, 0.3, (h2, h1)), rng.normal(0, 0.05, (n_pix, h2))]
    bs = [rng.normal(0, 0.2, h1), rng.normal(0, 0.2, h2), np.ones(n_pix)]
    return PayneMLP(ws, bs, ls, np.linspace(5000.0, 5100.0, n_pix), activation="leaky_relu", dtype=dtype)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_jacobian_cache_updates_equal_full_evaluations(dtype, rtol):
    """Jacobians kept per star and updated for the hidden units that changed side equal full evaluations
    along a walk of small and large steps (rows in any order, some left out), with the update path taken
    and the flux identical to predict."""
    from paynekit.emulators.payne import JacobianCache

    emu = _leaky_mlp(dtype=dtype)
    rng = np.random.default_rng(1)
    n = 10
    x = rng.uniform(-0.4, 0.4, (n, emu.n_labels))
    cache = JacobianCache(emu, n)
    cache(x.astype(dtype), np.arange(n))
    flips = 0
    for step in (1e-3, 3e-3, 1e-2, 3e-2, 1e-3, 0.2, 1e-2, 1e-2, 3e-3, 1e-3):
        rows = rng.permutation(n)[:7]
        x_new = np.clip(x[rows] + step * rng.normal(size=(7, emu.n_labels)), -0.5, 0.5)
        z1 = x_new @ emu.weights[0].T + emu.biases[0]
        flips += int(np.sum((z1 > 0) != (x[rows] @ emu.weights[0].T + emu.biases[0] > 0)))
        x[rows] = x_new
        flux, jac = cache(x_new.astype(dtype), rows)
        ref_flux, ref_jac = emu.predict_and_jacobian_scaled(x_new)
        np.testing.assert_array_equal(flux, ref_flux)
        ref_jac = np.swapaxes(ref_jac, 1, 2)
        np.testing.assert_allclose(jac, ref_jac, rtol=0, atol=rtol * np.abs(ref_jac).max())
    assert cache.n_updated > 20 and flips > 10  # the update path ran, across real kinks


def test_jacobian_cache_views_gather_the_right_rows():
    """The cache returns a view gathered lazily: slices by stars, chosen labels and the whole all agree with
    a full evaluation, and only slices by stars are accepted."""
    from paynekit.emulators.payne import JacobianCache

    emu = _leaky_mlp()
    rng = np.random.default_rng(2)
    x = rng.uniform(-0.4, 0.4, (6, emu.n_labels))
    cache = JacobianCache(emu, 9)
    rows = np.array([7, 2, 5, 0, 8, 3])
    _, view = cache(x, rows)
    ref = np.swapaxes(emu.predict_and_jacobian_scaled(x)[1], 1, 2)
    assert view.shape == ref.shape and view.dtype == ref.dtype
    np.testing.assert_allclose(view[1:4], ref[1:4], rtol=0, atol=1e-12)
    np.testing.assert_allclose(view.select_labels([4, 1])[:], ref[:, [4, 1]], rtol=0, atol=1e-12)
    assert view.select_labels([4, 1]).shape == (6, 2, emu.n_pixels)
    np.testing.assert_allclose(np.asarray(view), ref, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="sliced by stars"):
        view[0]


def test_jacobian_cache_only_for_two_layer_leaky_networks(small_mlp):
    from paynekit.emulators.payne import JacobianCache
    from paynekit.fitting.forward import EmulatorEvaluator

    assert JacobianCache.supports(_leaky_mlp())
    assert not JacobianCache.supports(_perpixel())
    assert not JacobianCache.supports(_sigmoid_mlp(small_mlp))
    assert EmulatorEvaluator(_leaky_mlp(), "float32").jacobian_cache(4) is not None
    assert EmulatorEvaluator(_perpixel(), "float32").jacobian_cache(4) is None
    with pytest.raises(InputError, match="two hidden layers"):
        JacobianCache(_perpixel(), 3)
    with pytest.raises(InputError, match="distinct"):
        JacobianCache(_leaky_mlp(), 3)(np.zeros((2, 6)), np.array([1, 1]))
