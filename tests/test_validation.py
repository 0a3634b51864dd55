"""Emulation error reports: exact statistics on constructed errors, ivar masking, label order, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from paynekit.errors import InputError
from paynekit.grids import TrainingGrid
from paynekit.validation import (
    emulation_error,
    format_validation_table,
    report_to_jsonable,
    write_validation_json,
)


@pytest.fixture
def grid_with_known_errors(small_mlp):
    """The teacher's spectra plus a known error: |delta| = 1e-3 * (1 + pixel / P) everywhere,
    and spectrum 7 off by 0.05 at pixel 100."""
    rng = np.random.default_rng(5)
    ls = small_mlp.label_space
    x = rng.uniform(ls.x_min, ls.x_max, (60, 4))
    p = small_mlp.n_pixels
    delta = 1e-3 * (1 + np.arange(p) / p) * rng.choice([-1.0, 1.0], (60, p))
    delta[7, 100] = 0.05
    flux = small_mlp.predict(x) + delta
    return TrainingGrid(x, ls.names, small_mlp.wavelength, flux), np.abs(delta)


def test_statistics_equal_numpy_on_known_errors(small_mlp, grid_with_known_errors):
    grid, abs_delta = grid_with_known_errors
    rep = emulation_error(small_mlp, grid, n_worst=3)
    assert rep["n_spectra"] == 60 and rep["n_pixels"] == small_mlp.n_pixels
    ref = np.percentile(abs_delta, [50, 95, 99])
    assert [rep["median"], rep["p95"], rep["p99"]] == pytest.approx(ref, rel=1e-5)
    assert rep["max"] == pytest.approx(0.05, rel=1e-5)
    # per pixel: the constructed |delta| is the same for every spectrum (except the one outlier)
    expected = 1e-3 * (1 + np.arange(small_mlp.n_pixels) / small_mlp.n_pixels)
    assert np.allclose(rep["per_pixel"]["median"], expected, rtol=1e-4)
    assert rep["per_pixel"]["p99"][100] > 1e-2 and rep["per_pixel"]["p99"].shape == (small_mlp.n_pixels,)
    worst = rep["worst_spectra"]
    assert len(worst) == 3 and worst[0]["index"] == 7
    assert worst[0]["max_abs_error"] == pytest.approx(0.05, rel=1e-5)
    assert worst[0]["labels"]["teff"] == pytest.approx(grid.labels[7, 0])
    assert rep["per_spectrum"]["median"].shape == (60,)


def test_perfect_emulator_has_zero_error(small_mlp):
    x = np.tile(small_mlp.label_space.center(), (4, 1))
    rep = emulation_error(small_mlp, (x, small_mlp.predict(x)))
    assert rep["max"] < 1e-12


def test_ivar_zero_pixels_are_left_out(small_mlp, grid_with_known_errors):
    grid, _ = grid_with_known_errors
    ivar = np.ones_like(grid.flux)
    ivar[:, 200:] = 0
    garbage = grid.flux.copy()
    garbage[:, 200:] = np.nan
    rep = emulation_error(small_mlp, (grid.labels, garbage, ivar))
    ref = emulation_error(small_mlp, (grid.labels, grid.flux, ivar))
    assert rep["median"] == ref["median"]
    assert np.all(np.isnan(rep["per_pixel"]["median"][200:]))
    assert np.isfinite(rep["per_pixel"]["median"][:200]).all()
    expected = 1e-3 * (1 + np.arange(200) / small_mlp.n_pixels)
    assert rep["median"] == pytest.approx(np.median(np.broadcast_to(expected, (60, 200))), rel=1e-4)


def test_label_columns_are_matched_by_name(small_mlp, grid_with_known_errors):
    grid, _ = grid_with_known_errors
    order = [2, 0, 3, 1]
    shuffled = TrainingGrid(grid.labels[:, order], [grid.label_names[i] for i in order], grid.wavelength,
                            grid.flux)
    assert emulation_error(small_mlp, shuffled)["median"] == emulation_error(small_mlp, grid)["median"]
    renamed = TrainingGrid(grid.labels, ("a", "b", "c", "d"), grid.wavelength, grid.flux)
    with pytest.raises(InputError, match="lack the emulator's"):
        emulation_error(small_mlp, renamed)


def test_mismatches_are_errors(small_mlp, grid_with_known_errors):
    grid, _ = grid_with_known_errors
    with pytest.raises(InputError, match="pixels"):
        emulation_error(small_mlp, (grid.labels, grid.flux[:, :-1]))
    shifted = TrainingGrid(grid.labels, grid.label_names, grid.wavelength * 1.001, grid.flux)
    with pytest.raises(InputError, match="wavelength"):
        emulation_error(small_mlp, shifted)
    with pytest.raises(InputError, match="TrainingGrid or a tuple"):
        emulation_error(small_mlp, grid.flux)


def test_json_is_small_and_valid(small_mlp, grid_with_known_errors, tmp_path):
    grid, _ = grid_with_known_errors
    rep = emulation_error(small_mlp, grid)
    path = write_validation_json(rep, tmp_path / "val.json")
    doc = json.loads(path.read_text())
    assert doc["median"] == pytest.approx(rep["median"])
    assert doc["worst_pixels"][0]["index"] == 100
    assert doc["worst_pixels"][0]["wavelength"] == pytest.approx(small_mlp.wavelength[100])
    assert path.stat().st_size < 20_000
    full = report_to_jsonable(rep, per_pixel="full")
    assert len(full["per_pixel"]["p95"]) == small_mlp.n_pixels
    table = format_validation_table(rep)
    assert "| all pixels of all spectra |" in table and f"{rep['median']:.3g}" in table
