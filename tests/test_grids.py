"""Training grids: validation, exact HDF5 round trip, clear errors for foreign files, seeded splits."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from paynekit.errors import FileFormatError, InputError
from paynekit.grids import (
    GRID_FORMAT_NAME,
    TrainingGrid,
    read_grid,
    training_set_hash,
    write_grid,
)

NAMES = ("teff", "logg", "fe_h")


def make_grid(rng, n=40, p=30, ivar=False, dtype=np.float64):
    labels = np.column_stack([rng.uniform(4000, 6000, n), rng.uniform(1, 5, n), rng.uniform(-1, 0.5, n)])
    wl = 15000 + np.arange(p) * 0.25
    flux = (1 - 0.3 * rng.random((n, p))).astype(dtype)
    iv = rng.uniform(0, 1e4, (n, p)).astype(dtype) if ivar else None
    if ivar:
        iv[:, :3] = 0
    return TrainingGrid(labels, NAMES, wl, flux, iv, meta={"made_by": "test", "seed": 1})


@pytest.mark.parametrize("ivar", [False, True])
@pytest.mark.parametrize("compression", ["gzip", None])
def test_round_trip_is_exact(tmp_path, rng, ivar, compression):
    grid = make_grid(rng, ivar=ivar)
    path = write_grid(grid, tmp_path / "grid.h5", compression=compression)
    back = read_grid(path)
    assert back.label_names == NAMES
    assert back.meta == {"made_by": "test", "seed": 1}
    assert back.wavelength_medium == "vacuum"
    for name in ("labels", "wavelength", "flux"):
        a, b = getattr(grid, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    if ivar:
        assert np.array_equal(grid.ivar, back.ivar)
    else:
        assert back.ivar is None
    assert back.hash() == grid.hash()


def test_float32_grid_stays_float32_and_air_medium_survives(tmp_path, rng):
    grid = make_grid(rng, dtype=np.float32)
    grid = TrainingGrid(grid.labels, grid.label_names, grid.wavelength, grid.flux, wavelength_medium="air")
    back = read_grid(write_grid(grid, tmp_path / "g32.h5"))
    assert back.flux.dtype == np.float32 and np.array_equal(back.flux, grid.flux)
    assert back.wavelength_medium == "air"


def test_grid_copies_caller_arrays(rng):
    labels = rng.uniform(0, 1, (5, 3))
    flux = rng.uniform(0.5, 1, (5, 8))
    grid = TrainingGrid(labels, NAMES, np.arange(8.0) + 1, flux)
    grid.flux[0, 0] = -1.0
    assert flux[0, 0] != -1.0


def test_grid_validation_names_the_problem(rng):
    wl = np.arange(10.0) + 1
    with pytest.raises(InputError, match="label_names has 3"):
        TrainingGrid(np.zeros((4, 2)), NAMES, wl, np.ones((4, 10)))
    with pytest.raises(InputError, match="wavelength has 10"):
        TrainingGrid(np.zeros((4, 3)), NAMES, wl, np.ones((4, 9)))
    with pytest.raises(InputError, match="labels has 5 rows"):
        TrainingGrid(np.zeros((5, 3)), NAMES, wl, np.ones((4, 10)))
    with pytest.raises(InputError, match="ivar must be finite and >= 0"):
        TrainingGrid(np.zeros((4, 3)), NAMES, wl, np.ones((4, 10)), -np.ones((4, 10)))
    with pytest.raises(InputError, match="non-finite"):
        TrainingGrid(np.zeros((4, 3)), NAMES, wl, np.full((4, 10), np.nan))
    # NaN flux is fine where ivar = 0 (observed spectra with bad pixels)
    flux = np.ones((4, 10))
    flux[0, 0] = np.nan
    ivar = np.ones((4, 10))
    ivar[0, 0] = 0
    TrainingGrid(np.zeros((4, 3)), NAMES, wl, flux, ivar)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(FileFormatError, match="no such file"):
        read_grid(tmp_path / "nope.h5")
    bad = tmp_path / "text.h5"
    bad.write_text("teff,logg\n5000,4.4\n")
    with pytest.raises(FileFormatError, match=r"text\.h5: not an HDF5 file.*expected a paynekit training grid"):
        read_grid(bad)


def test_foreign_hdf5_layout_says_what_was_found_and_expected(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("spectra", data=np.ones((3, 4)))
        fh.attrs["creator"] = "someone else"
    with pytest.raises(FileFormatError) as err:
        read_grid(path)
    msg = str(err.value)
    assert "foreign.h5" in msg and "no paynekit_format attribute" in msg
    assert "spectra" in msg and "creator" in msg and GRID_FORMAT_NAME in msg


def test_unknown_version_and_missing_dataset(tmp_path, rng):
    path = write_grid(make_grid(rng), tmp_path / "g.h5")
    with h5py.File(path, "a") as fh:
        fh.attrs["format_version"] = 99
    with pytest.raises(FileFormatError, match=r"format version 99.*reads versions \(1,\)"):
        read_grid(path)
    path = write_grid(make_grid(rng), tmp_path / "g2.h5")
    with h5py.File(path, "a") as fh:
        del fh["flux"]
    with pytest.raises(FileFormatError, match=r"lacks datasets \['flux'\]"):
        read_grid(path)


def test_split_is_disjoint_complete_and_seeded(rng):
    grid = make_grid(rng, n=103)
    a, b, c = grid.split((0.8, 0.1, 0.1), seed=3)
    assert (len(a), len(b), len(c)) == (82, 10, 11)
    rows = np.concatenate([a.labels, b.labels, c.labels])
    assert len({tuple(r) for r in rows}) == 103
    again = grid.split((0.8, 0.1, 0.1), seed=3)
    assert np.array_equal(again[1].flux, b.flux)
    other = grid.split((0.8, 0.1, 0.1), seed=4)
    assert not np.array_equal(other[1].labels, b.labels)
    (half,) = grid.split((0.5,), seed=0)
    assert len(half) == 51
    with pytest.raises(InputError, match="sum to at most 1"):
        grid.split((0.7, 0.7), seed=0)


def test_training_set_hash(rng):
    grid = make_grid(rng)
    h = training_set_hash(grid.labels, grid.flux, grid.wavelength)
    assert len(h) == 16 and h == training_set_hash(grid.labels.copy(), grid.flux.copy(), grid.wavelength)
    flux = grid.flux.copy()
    flux[3, 4] += 1e-12
    assert training_set_hash(grid.labels, flux, grid.wavelength) != h
    g32 = make_grid(np.random.default_rng(1), dtype=np.float32)
    assert training_set_hash(g32.labels, g32.flux, g32.wavelength) == training_set_hash(
        g32.labels, g32.flux.astype(np.float64), g32.wavelength)
