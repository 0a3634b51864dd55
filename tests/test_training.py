"""Training The Payne: accuracy against a teacher network, reproducibility, checkpoints, ivar weighting.

The teacher is the session fixture ``small_mlp`` (a random smooth 4-label PayneMLP, 400 pixels); the
students are small (2 x 48) so that every training here takes a few seconds on 2 busy cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from paynekit.emulators import load_emulator, save_emulator
from paynekit.emulators.training import (
    PayneTrainer,
    TrainConfig,
    principal_basis,
    train_payne,
)
from paynekit.errors import FileFormatError, InputError, NotFittedError
from paynekit.grids import TrainingGrid

SMALL = {"hidden_sizes": (48, 48), "batch_size": 128, "learning_rate": 1e-2, "num_threads": 1, "progress": False}


@pytest.fixture(scope="module")
def teacher_data(small_mlp):
    """1200 spectra of the teacher at labels drawn uniformly in its box (800 train, 400 test)."""
    rng = np.random.default_rng(20251122)
    ls = small_mlp.label_space
    x = rng.uniform(ls.x_min, ls.x_max, (1200, ls.x_min.size))
    y = small_mlp.predict(x)
    return x[:800], y[:800], x[800:], y[800:]


def fit(data, small_mlp, **kw):
    x, y = data[0], data[1]
    cfg = TrainConfig(**{**SMALL, **kw})
    return PayneTrainer(cfg).fit(x, y, label_space=small_mlp.label_space, wavelength=small_mlp.wavelength)


def test_training_reaches_stated_error(teacher_data, small_mlp):
    """600 steps on 720 spectra: held-out median |Δflux| < 3e-3, 6x below that of the mean spectrum.

    (The teacher's flux varies by 0.028 rms per pixel; with 1500 steps the median reaches 2e-3.)
    """
    _, y, xt, yt = teacher_data
    trainer = fit(teacher_data, small_mlp, max_steps=600)
    emu = trainer.emulator_
    err = np.abs(emu.predict(xt) - yt)
    baseline = np.abs(y.mean(axis=0) - yt)
    assert np.median(err) < np.median(baseline) / 6
    assert np.median(err) < 3e-3 and np.percentile(err, 99) < 1.5e-2
    # the exported network is the plain upstream form, float64, with its provenance
    assert emu.dtype == np.float64 and emu.hidden_sizes == (48, 48)
    assert emu.meta["target_basis"] == "pca" and emu.meta["n_train"] == 720 and emu.meta["n_validation"] == 80
    assert len(emu.meta["training_set_hash"]) == 16
    h = trainer.history_
    assert h["step"][-1] == 600 and len(h["val_loss"]) == len(h["train_loss"]) == len(h["lr"])
    assert h["val_loss"][-1] < h["val_loss"][0] / 20
    assert h["lr"][0] > h["lr"][-1]  # the cosine decay


def test_history_losses_are_pixel_mean_squared_errors(teacher_data, small_mlp):
    """In the principal-component basis the reported validation loss is still the pixel-space MSE."""
    x, y, xt, yt = teacher_data
    cfg = TrainConfig(**SMALL, max_steps=60)
    trainer = PayneTrainer(cfg).fit(x, y, label_space=small_mlp.label_space, validation=(xt, yt))
    emu = trainer.emulator_
    mse = np.mean((emu.predict(xt) - yt) ** 2)
    assert mse == pytest.approx(min(trainer.history_["val_loss"]), rel=1e-4)
    assert emu.meta["best_val_loss"] == pytest.approx(mse, rel=1e-4)


def test_l1_and_pixel_basis_train_too(teacher_data, small_mlp):
    """200 steps of each other path beat the mean spectrum (sigmoid networks learn slowest)."""
    _, y, xt, yt = teacher_data
    baseline = np.median(np.abs(y.mean(axis=0) - yt))
    cases = (({"loss": "l1"}, 3), ({"target_basis": "pixels"}, 3), ({"optimizer": "adam"}, 3),
             ({"activation": "sigmoid"}, 1.5))
    for kw, factor in cases:
        emu = fit(teacher_data, small_mlp, max_steps=200, **kw).emulator_
        err = np.median(np.abs(emu.predict(xt) - yt))
        assert err < baseline / factor, kw
        assert emu.meta["target_basis"] == ("pixels" if kw.get("loss") or kw.get("target_basis") else "pca")
        assert emu.activation == kw.get("activation", "leaky_relu")


def test_seeded_training_is_reproducible(teacher_data, small_mlp):
    a = fit(teacher_data, small_mlp, max_steps=40, seed=5).emulator_
    b = fit(teacher_data, small_mlp, max_steps=40, seed=5).emulator_
    c = fit(teacher_data, small_mlp, max_steps=40, seed=6).emulator_
    for wa, wb in zip(a.weights + a.biases, b.weights + b.biases):
        assert np.array_equal(wa, wb)
    assert not np.array_equal(a.weights[0], c.weights[0])


def test_best_weights_are_kept(teacher_data, small_mlp):
    """Validating against flat spectra (the training mean), the more the network learns the worse it
    validates: the weights of the first evaluation are the ones returned, not the last."""
    x, y, xt, _ = teacher_data
    flat = np.broadcast_to(y.mean(axis=0), (xt.shape[0], y.shape[1]))
    trainer = PayneTrainer(TrainConfig(**SMALL, max_steps=60)).fit(
        x, y, label_space=small_mlp.label_space, validation=(xt, flat))
    h = trainer.history_
    assert int(np.argmin(h["val_loss"])) == 0 and h["val_loss"][-1] > 2 * h["val_loss"][0]
    assert trainer.emulator_.meta["best_step"] == h["step"][0] < h["step"][-1]
    mse = np.mean((trainer.emulator_.predict(xt) - flat) ** 2)
    assert mse == pytest.approx(h["val_loss"][0], rel=1e-4)


def test_early_stopping(teacher_data, small_mlp):
    trainer = fit(teacher_data, small_mlp, max_steps=5000, learning_rate=3e-2, schedule="constant",
                  optimizer="adam", patience=3)
    h = trainer.history_
    assert trainer.emulator_.meta["stopped_because"] == "early_stopping"
    assert h["step"][-1] < 5000
    assert int(np.argmin(h["val_loss"])) == len(h["val_loss"]) - 4  # 3 evaluations without a new best


def test_resume_from_checkpoint_continues_exactly(teacher_data, small_mlp, tmp_path):
    x, y, xt, yt = teacher_data
    kw = {"max_steps": 120, "checkpoint_every_s": 1e9}
    straight = fit(teacher_data, small_mlp, **kw)

    ckpt = tmp_path / "train.ckpt"
    cfg = TrainConfig(**SMALL, **kw)
    first = PayneTrainer(cfg).fit(x, y, label_space=small_mlp.label_space, checkpoint=ckpt,
                                  callback=lambda info: info["step"] >= 60)  # interrupted half way
    assert first.history_["step"][-1] < 120 and ckpt.exists()
    resumed = PayneTrainer(cfg).fit(x, y, label_space=small_mlp.label_space, checkpoint=ckpt, resume=True)
    hs, hr = straight.history_, resumed.history_
    assert hr["step"] == hs["step"] and hr["epoch"] == hs["epoch"]  # the history continues
    assert np.allclose(hr["val_loss"], hs["val_loss"], rtol=1e-5)
    assert hr["time_s"][-1] >= first.history_["time_s"][-1]  # the clock continues too
    for wa, wb in zip(straight.emulator_.weights, resumed.emulator_.weights):
        assert np.allclose(wa, wb, rtol=1e-5, atol=1e-7)
    err_s = np.median(np.abs(straight.emulator_.predict(xt) - yt))
    err_r = np.median(np.abs(resumed.emulator_.predict(xt) - yt))
    assert err_r <= err_s * 1.001

    # a checkpoint from other data or other settings is refused, a foreign file is a format error
    with pytest.raises(InputError, match="another training set"):
        PayneTrainer(cfg).fit(x[:700], y[:700], label_space=small_mlp.label_space, checkpoint=ckpt, resume=True)
    other = TrainConfig(**{**SMALL, "hidden_sizes": (32, 32)}, **kw)
    with pytest.raises(InputError, match="hidden_sizes"):
        PayneTrainer(other).fit(x, y, label_space=small_mlp.label_space, checkpoint=ckpt, resume=True)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(FileFormatError, match="junk.ckpt"):
        PayneTrainer(cfg).fit(x, y, label_space=small_mlp.label_space, checkpoint=junk, resume=True)


def test_checkpoint_holds_float32_tensors_only(teacher_data, small_mlp, tmp_path):
    x, y = teacher_data[:2]
    ckpt = tmp_path / "c.ckpt"
    trainer = PayneTrainer(TrainConfig(**SMALL, max_steps=10)).fit(x, y, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)  # no pickled objects: loads with weights_only
    assert state["params"].dtype == torch.float32
    assert trainer.emulator_.dtype == np.float64


def test_ivar_zero_pixels_do_not_influence_training(teacher_data, small_mlp):
    x, y = teacher_data[:2]
    rng = np.random.default_rng(3)
    ivar = rng.uniform(0.5, 2.0, y.shape) * 1e4
    ivar[rng.random(y.shape) < 0.2] = 0.0
    clean = np.where(ivar > 0, y, 1.0)
    garbage = np.where(ivar > 0, y, rng.normal(0, 1e3, y.shape))
    garbage[ivar == 0] = np.where(rng.random((ivar == 0).sum()) < 0.3, np.nan, garbage[ivar == 0])
    garbage_copy = garbage.copy()
    cfg = TrainConfig(**SMALL, max_steps=40)
    a = PayneTrainer(cfg).fit(x, clean, ivar, label_space=small_mlp.label_space).emulator_
    b = PayneTrainer(cfg).fit(x, garbage, ivar, label_space=small_mlp.label_space).emulator_
    assert np.array_equal(garbage, garbage_copy, equal_nan=True)  # caller's arrays untouched
    assert a.meta["target_basis"] == "pixels"
    for wa, wb in zip(a.weights + a.biases, b.weights + b.biases):
        assert np.array_equal(wa, wb)
    # ...while the ivar values themselves do matter
    c = PayneTrainer(cfg).fit(x, clean, ivar * rng.uniform(0.1, 10, y.shape),
                              label_space=small_mlp.label_space).emulator_
    assert not np.allclose(a.weights[-1], c.weights[-1])


def test_ivar_weighted_training_learns_from_noisy_spectra(teacher_data, small_mlp):
    """Observed-spectrum mode: noisy fluxes with per-pixel errors and masked pixels still give the teacher."""
    x, y, xt, yt = teacher_data
    rng = np.random.default_rng(11)
    sigma = rng.uniform(0.002, 0.02, y.shape)
    ivar = 1 / sigma**2
    ivar[rng.random(y.shape) < 0.1] = 0
    noisy = y + rng.normal(size=y.shape) * sigma
    emu = PayneTrainer(TrainConfig(**SMALL, max_steps=600)).fit(
        x, noisy, ivar, label_space=small_mlp.label_space).emulator_
    err = np.median(np.abs(emu.predict(xt) - yt))
    assert err < np.median(sigma) / 2  # better than a single noisy spectrum


def test_torch_global_state_unchanged(teacher_data, small_mlp):
    before = (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled())
    fit(teacher_data, small_mlp, max_steps=10, num_threads=1, dtype="float64")
    assert (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled()) == before
    fit(teacher_data, small_mlp, max_steps=40, num_threads="auto")  # switches threads while training
    assert (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled()) == before


def test_not_fitted_and_config_errors():
    trainer = PayneTrainer()
    with pytest.raises(NotFittedError):
        trainer.emulator_  # noqa: B018
    with pytest.raises(NotFittedError):
        trainer.history_  # noqa: B018
    assert TrainConfig().optimizer == "radam" and TrainConfig().dtype == "float32"
    with pytest.raises(TypeError):
        TrainConfig(learnign_rate=1e-3)
    with pytest.raises(InputError, match="unknown TrainConfig option"):
        TrainConfig.from_dict({"learnign_rate": 1e-3})
    assert TrainConfig.from_dict({"hidden_sizes": [10, 10]}).hidden_sizes == (10, 10)
    for bad in ({"optimizer": "sgd"}, {"loss": "huber"}, {"learning_rate": -1}, {"batch_size": 0},
                {"hidden_sizes": ()}, {"validation_fraction": 1.0}, {"device": "tpu"}, {"dtype": "float16"},
                {"num_threads": "many"}, {"num_threads": 0}, {"betas": (0.9,)}):
        with pytest.raises(InputError):
            TrainConfig(**bad)


def test_fit_input_errors(small_mlp):
    trainer = PayneTrainer(TrainConfig(**SMALL, max_steps=5))
    with pytest.raises(InputError, match="labels has 3 rows"):
        trainer.fit(np.zeros((3, 4)), np.ones((4, 400)))
    with pytest.raises(InputError, match="pca"):
        PayneTrainer(TrainConfig(**SMALL, target_basis="pca")).fit(np.random.default_rng(0).random((20, 4)),
                                                                   np.ones((20, 5)), np.ones((20, 5)))
    with pytest.raises(InputError, match="non-finite"):
        trainer.fit(np.zeros((20, 4)), np.full((20, 5), np.nan))


def test_train_payne_on_a_grid_and_save(small_mlp, tmp_path):
    rng = np.random.default_rng(2)
    ls = small_mlp.label_space
    x = rng.uniform(ls.x_min, ls.x_max, (300, 4))
    grid = TrainingGrid(x, ls.names, small_mlp.wavelength, small_mlp.predict(x), meta={"origin": "teacher"})
    emu, history = train_payne(grid, TrainConfig(**SMALL, max_steps=30))
    assert emu.label_names == ls.names and np.array_equal(emu.wavelength, grid.wavelength)
    assert emu.meta["training_set_hash"] == grid.hash()
    assert history["step"][-1] == 30
    back = load_emulator(save_emulator(emu, tmp_path / "m.npz"))
    assert back.meta["training_set_hash"] == grid.hash()
    assert json.loads(json.dumps(back.meta["train_config"]))["hidden_sizes"] == [48, 48]
    assert np.allclose(back.predict(x[:5]), emu.predict(x[:5]), rtol=0, atol=1e-12)


def test_principal_basis_matches_svd():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 500)) + 1e-6 * rng.normal(size=(300, 500))
    basis, s = principal_basis(z, 12, seed=0)
    _, s_ref, vt = np.linalg.svd(z, full_matrices=False)
    assert np.allclose(basis @ basis.T, np.eye(12), atol=1e-10)
    assert np.allclose(s, s_ref[:12], rtol=1e-8)
    assert np.allclose(np.abs(basis @ vt[:12].T), np.eye(12), atol=1e-6)  # same directions up to sign
    wide = rng.normal(size=(2000, 60))  # many spectra, few pixels: the exact route
    basis, s = principal_basis(wide - wide.mean(0), 60, seed=0)
    assert basis.shape == (60, 60) and np.allclose(basis @ basis.T, np.eye(60), atol=1e-10)


@pytest.mark.slow
@pytest.mark.shared
def test_shared_teacher_anchor_accuracy(tmp_path):
    """The APOGEE per-pixel network as teacher: 800 steps beat the upstream 5000-step median (1.6e-3)."""
    from .conftest import shared_path

    teacher = load_emulator(shared_path("emulators/apogee_5label_perpixel_dwarfs_2018.npz"),
                            label_names=("teff", "logg", "fe_h", "alpha_fe", "v_macro"))
    rng = np.random.default_rng(20251122)
    ls = teacher.label_space
    x = rng.uniform(ls.x_min, ls.x_max, (2500, 5))
    y = teacher.predict(x)
    emu = PayneTrainer(TrainConfig(max_steps=800, num_threads=1, progress=False)).fit(
        x[:2000], y[:2000], label_space=ls, wavelength=teacher.wavelength).emulator_
    err = np.abs(emu.predict(x[2000:]) - y[2000:])
    assert np.median(err) < 1.6e-3
