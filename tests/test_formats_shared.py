"""Importers reproduce the formulas of ../shared/data/README.md on the shared upstream files."""

import numpy as np
import pytest

from paynekit.emulators import PayneMLP, PaynePerPixel, load_emulator
from paynekit.wavelength import payne_apogee_wavelength

from .conftest import shared_path


def _scaled(x, x_min, x_max):
    return (x - x_min) / (x_max - x_min) - 0.5


def _box_draws(x_min, x_max, n, seed=1):
    return np.random.default_rng(seed).uniform(x_min, x_max, (n, x_min.size))


@pytest.mark.parametrize("name", ["apogee_5label_perpixel_binspec_plus", "apogee_5label_perpixel_dwarfs_2018"])
def test_perpixel_importer_matches_readme_formula(name):
    path = shared_path(f"emulators/{name}.npz")
    emu = load_emulator(path, label_names=("teff", "logg", "fe_h", "alpha_fe", "v_macro"))
    assert isinstance(emu, PaynePerPixel) and emu.n_pixels == 7214
    np.testing.assert_allclose(emu.wavelength, payne_apogee_wavelength())
    d = np.load(path)
    x = _box_draws(d["x_min"], d["x_max"], 4)
    xs = _scaled(x, d["x_min"], d["x_max"]).astype(np.float64)
    w0, b0 = d["w_array_0"].astype(np.float64), d["b_array_0"].astype(np.float64)
    w1, b1 = d["w_array_1"].astype(np.float64), d["b_array_1"].astype(np.float64)
    for i in range(len(x)):
        # flux_p = w1_p . sigmoid(W0_p x_s + b0_p) + b1_p, written pixel by pixel as in the README
        expected = np.array([w1[p] @ (1 / (1 + np.exp(-(w0[p] @ xs[i] + b0[p])))) + b1[p] for p in range(7214)])
        np.testing.assert_allclose(emu.predict(x[i]), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["optical_22label_mlp_giants_4000-5000", "optical_22label_mlp_giants_4900-6000"])
def test_optical_mlp_importer_matches_readme_formula(name):
    path = shared_path(f"emulators/{name}.npz")
    emu = load_emulator(path)
    assert isinstance(emu, PayneMLP) and emu.n_labels == 22 and emu.n_pixels == 14001
    assert emu.label_names[:3] == ("teff", "logg", "mh") and emu.wavelength_medium == "air"
    d = np.load(path)
    np.testing.assert_array_equal(emu.wavelength, d["wavelength_air_A"])
    x = _box_draws(d["x_min"], d["x_max"], 3)
    xs = _scaled(x, d["x_min"], d["x_max"])

    def lrelu(z):
        return np.where(z > 0, z, 0.01 * z)

    w = [d[f"w_array_{k}"].astype(np.float64) for k in range(3)]
    b = [d[f"b_array_{k}"].astype(np.float64) for k in range(3)]
    expected = np.stack([w[2] @ lrelu(w[1] @ lrelu(w[0] @ s + b[0]) + b[1]) + b[2] for s in xs])
    np.testing.assert_allclose(emu.predict(x), expected, rtol=0, atol=1e-6)


def test_payne_mlp_npz_without_metadata_needs_wavelength(tmp_path):
    # The Payne's current npz has only weights and x_min/x_max; wavelength comes from the caller
    src = np.load(shared_path("emulators/optical_22label_mlp_giants_4000-5000.npz"))
    keep = {k: src[k] for k in src.files if k.startswith(("w_array", "b_array", "x_"))}
    np.savez(tmp_path / "bare.npz", **keep)
    with pytest.raises(Exception, match="pass wavelength"):
        load_emulator(tmp_path / "bare.npz")
    emu = load_emulator(tmp_path / "bare.npz", wavelength=src["wavelength_air_A"], wavelength_medium="air")
    assert emu.label_names[0] == "label_0" and emu.n_pixels == 14001
