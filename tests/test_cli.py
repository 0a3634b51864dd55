"""The command line: each subcommand on tiny inputs, and one-line errors for bad input."""

import numpy as np
import pytest

from paynekit.cli import main
from paynekit.grids import TrainingGrid, write_grid


@pytest.fixture
def grid_file(tmp_path, small_mlp):
    g = np.random.default_rng(11)
    labels = small_mlp.label_space.unscale(g.uniform(-0.5, 0.5, (240, 4)))
    grid = TrainingGrid(labels=labels, label_names=small_mlp.label_names, wavelength=small_mlp.wavelength,
                        flux=small_mlp.predict(labels))
    return write_grid(grid, tmp_path / "grid.h5")


def test_train_then_validate(grid_file, tmp_path, capsys):
    model = tmp_path / "model.npz"
    assert main(["train", str(grid_file), "-o", str(model), "--hidden", "32", "32", "--max-steps", "300",
                 "--quiet", "--seed", "1"]) == 0
    assert model.exists()
    assert main(["validate", str(model), str(grid_file), "--json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "median" in out and (tmp_path / "v.json").exists()


def test_fit_bundle_to_catalog(tmp_path, small_mlp, capsys):
    from paynekit.catalog import read_catalog
    from paynekit.emulators import save_emulator
    from paynekit.fitting import write_bundle
    from paynekit.spectra import SpectrumBatch

    g = np.random.default_rng(12)
    truth = small_mlp.label_space.unscale(g.uniform(-0.3, 0.3, (6, 4)))
    truth[:, 3] = 0.0  # the value --freeze holds mg_h at
    flux = small_mlp.predict(truth)
    ivar = np.full(flux.shape, 200.0**2)
    flux = flux + g.normal(0, 1 / 200, flux.shape)
    flux[2] = np.nan  # a bad spectrum becomes a flagged row
    bundle = write_bundle(tmp_path / "obs.npz", SpectrumBatch(small_mlp.wavelength, flux, ivar,
                                                               ids=[f"s{i}" for i in range(6)]))
    model = save_emulator(small_mlp, tmp_path / "m.npz")
    cat = tmp_path / "cat.fits"
    assert main(["fit", str(model), str(bundle), "-o", str(cat), "--rv-range", "0", "--workers", "1",
                 "--quiet", "--freeze", "mg_h=0.0"]) == 0
    table = read_catalog(cat)
    assert list(table["id"]) == [f"s{i}" for i in range(6)]
    assert bool(table["flag_bad"][2]) and str(table["flag_reason"][2])
    good = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(np.asarray(table["mg_h"])[good], 0.0)
    assert np.all(np.abs(np.asarray(table["teff"])[good] - truth[good, 0]) < 200)
    assert main(["merge", str(tmp_path / "cat_run"), "-o", str(tmp_path / "again.parquet")]) == 0
    assert len(read_catalog(tmp_path / "again.parquet")) == 6
    png = tmp_path / "s1.png"
    assert main(["plot-fit", str(tmp_path / "cat_run"), "s1", "-o", str(png), "--catalog", str(cat)]) == 0
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("content", [b"", b"SIMPLE  =                    T" + b" " * 50])
def test_bad_model_file_is_one_line_error(tmp_path, capsys, content):
    bad = tmp_path / "model.npz"
    bad.write_bytes(content)
    assert main(["validate", str(bad), str(tmp_path / "grid.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("paynekit: error:") and "model.npz" in err and "\n" not in err


def test_bad_freeze_argument(tmp_path, capsys, small_mlp):
    from paynekit.emulators import save_emulator

    model = save_emulator(small_mlp, tmp_path / "m.npz")
    assert main(["fit", str(model), str(tmp_path / "x.npz"), "-o", str(tmp_path / "c.fits"), "--freeze", "teff"]) == 2
    assert "--freeze expects name=value" in capsys.readouterr().err


def test_chi2_tolerance_and_exact_curvature_reach_the_fit_config(tmp_path, capsys, small_mlp):
    from paynekit.cli import build_parser, fit_config_from_args
    from paynekit.emulators import save_emulator
    from paynekit.fitting import FitConfig

    parse = build_parser().parse_args
    assert fit_config_from_args(parse(["fit", "m.npz", "x.npz"])).chi2_tolerance == FitConfig().chi2_tolerance
    loose = parse(["fit", "m.npz", "x.npz", "--chi2-tolerance", "0.1"])
    assert fit_config_from_args(loose).chi2_tolerance == 0.1
    assert fit_config_from_args(loose).lm_hidden_curvature is FitConfig().lm_hidden_curvature is True
    exact = parse(["fit", "m.npz", "x.npz", "--exact-curvature"])
    assert fit_config_from_args(exact).lm_hidden_curvature is False
    model = save_emulator(small_mlp, tmp_path / "m.npz")
    argv = ["fit", str(model), str(tmp_path / "x.npz"), "-o", str(tmp_path / "c.fits"),
            "--chi2-tolerance", "-1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "chi2_tolerance must be > 0" in err and "-1" in err


@pytest.mark.slow
def test_demo_runs_end_to_end_at_small_scale(tmp_path, capsys):
    import json

    small = ["--n-train", "120", "--n-fit", "6", "--train-steps", "150"]
    assert main(["demo", "--out", str(tmp_path / "demo"), *small]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["training"] == {"steps": 150, "stopped_because": "max_steps"}
    for name in ("grid", "model", "catalog", "report"):
        assert (tmp_path / "demo").joinpath(summary["files"][name]).exists() or \
            __import__("pathlib").Path(summary["files"][name]).exists()
    assert "recovery against the truth" in capsys.readouterr().out
    # the demo's model file is our own format again: it loads without pickle and names its grid
    from paynekit import load_emulator
    from paynekit.grids import read_grid

    emu = load_emulator(tmp_path / "demo" / "model.npz")
    grid = read_grid(tmp_path / "demo" / "grid.h5")
    assert emu.meta["training_set_hash"] == grid.hash()
    # the 2 x 300 weights on 8575 pixels are 21.4 MB in float64; nothing else of size (the old bug pickled
    # the whole grid in, 7+ MB here)
    assert (tmp_path / "demo" / "model.npz").stat().st_size < 21.6e6
    # training is limited by steps, not the clock: a second run gives the same catalog
    assert main(["demo", "--out", str(tmp_path / "again"), *small]) == 0
    from paynekit.catalog import read_catalog

    first = read_catalog(tmp_path / "demo" / "catalog.fits")
    second = read_catalog(tmp_path / "again" / "catalog.fits")
    assert first.colnames == second.colnames
    for name in first.colnames:
        a, b = np.asarray(first[name]), np.asarray(second[name])
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name


def test_pixel_mask_file_equals_mask_array(tmp_path, small_mlp):
    from paynekit.fitting import FitConfig, fit

    g = np.random.default_rng(13)
    truth = small_mlp.label_space.unscale(g.uniform(-0.3, 0.3, (3, 4)))
    flux = small_mlp.predict(truth) + g.normal(0, 0.01, (3, small_mlp.n_pixels))
    ivar = np.full(flux.shape, 1e4)
    wl = small_mlp.wavelength
    lo, hi = wl[100], wl[180]
    (tmp_path / "mask.txt").write_text(f"{lo - 1e-6} {hi + 1e-6}\n")
    in_window = (wl >= lo) & (wl <= hi)
    garbage = flux.copy()
    garbage[:, in_window] = 5.0  # what the mask hides must not matter
    cfg = FitConfig(rv_range=0, seed=1)
    by_array = fit(small_mlp, (wl, flux, ivar, np.broadcast_to(in_window, flux.shape)), cfg)
    by_file = fit(small_mlp, (wl, garbage, ivar), cfg.replace(pixel_mask_file=str(tmp_path / "mask.txt")))
    for name in small_mlp.label_names:
        np.testing.assert_allclose(by_file[name], by_array[name], rtol=1e-10)
