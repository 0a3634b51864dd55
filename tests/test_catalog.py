"""Catalog: the schema in one place, FITS and Parquet writers, atomic writes, round trips."""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u

from paynekit.catalog import (
    empty_result_table,
    label_pairs,
    read_catalog,
    result_columns,
    write_catalog,
)
from paynekit.errors import FileFormatError, InputError
from paynekit.fitting import FitConfig, fit

from ._fitting_toys import LineToy, noisy

NAMES = ("teff", "logg", "fe_h")
UNITS = ("K", "dex", "dex")


def test_schema_has_every_column_once():
    cols = result_columns(NAMES, UNITS)
    names = [c.name for c in cols]
    assert len(names) == len(set(names))
    for n in NAMES:
        assert {n, f"e_{n}", f"raw_e_{n}", f"presearch_{n}"} <= set(names)
    assert {"rho_teff_logg", "rho_teff_fe_h", "rho_logg_fe_h"} <= set(names)
    assert {
        "id",
        "v_rel",
        "e_v_rel",
        "chi2",
        "reduced_chi2",
        "n_pixels",
        "snr",
        "result_flags",
        "flag_warn",
        "flag_bad",
        "flag_reason",
    } <= set(names)
    assert label_pairs(NAMES) == [("teff", "logg"), ("teff", "fe_h"), ("logg", "fe_h")]
    units = {c.name: c.unit for c in cols}
    assert units["e_teff"] == "K" and units["v_rel"] == "km/s" and units["rho_teff_logg"] == ""
    assert all(c.description for c in cols)
    assert "zeta_e_teff" in [c.name for c in result_columns(NAMES, UNITS, parabola=True)]
    with pytest.raises(InputError):
        result_columns(NAMES, ("K",))


def _filled_table(n=4):
    t = empty_result_table(NAMES, UNITS, n)
    rng = np.random.default_rng(0)
    t["id"][:] = np.array([f"2M{i:08d}" for i in range(n)], dtype=object)
    t["teff"][:] = rng.uniform(4000, 6000, n)
    t["fe_h"][:] = rng.uniform(-1, 0.3, n)
    t["n_pixels"][:] = 7000
    t["result_flags"][:] = [0, 16, 0, 1024]
    t["flag_warn"][:] = [False, True, False, True]
    t["flag_bad"][:] = [False, False, False, True]
    t["flag_reason"][:] = np.array(["", "S/N 40 < 70", "", "no pixel has ivar > 0"], dtype=object)
    return t


@pytest.mark.parametrize("suffix", [".fits", ".parquet"])
def test_round_trip(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    t = _filled_table()
    path = write_catalog(t, tmp_path / f"cat{suffix}")
    back = read_catalog(path)
    assert back.colnames == t.colnames
    np.testing.assert_array_equal(back["teff"], t["teff"])
    np.testing.assert_array_equal(back["result_flags"], t["result_flags"])
    assert back["flag_bad"].dtype == bool
    assert list(back["flag_reason"]) == list(t["flag_reason"])  # empty strings stay empty strings
    assert list(back["id"]) == list(t["id"])
    assert back["teff"].unit == u.K
    assert back["fe_h"].unit == u.dex  # FITS cannot store dex: it comes back from the header
    assert back["v_rel"].unit == u.km / u.s
    assert back["e_teff"].description
    assert np.isnan(back["logg"]).all()


def test_atomic_and_no_accidental_overwrite(tmp_path):
    t = _filled_table()
    path = write_catalog(t, tmp_path / "cat.fits")
    before = path.read_bytes()
    with pytest.raises(InputError, match="exists"):
        write_catalog(t[:2], path)
    assert path.read_bytes() == before
    write_catalog(t[:2], path, overwrite=True)
    assert len(read_catalog(path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.fits"]  # no temporary files left behind


def test_bad_paths(tmp_path):
    t = _filled_table()
    with pytest.raises(InputError, match="must end in"):
        write_catalog(t, tmp_path / "cat.csv")
    with pytest.raises(FileFormatError):
        read_catalog(tmp_path / "missing.fits")
    (tmp_path / "junk.fits").write_text("not a fits file")
    with pytest.raises(FileFormatError):
        read_catalog(tmp_path / "junk.fits")


def test_fit_output_matches_the_schema_and_writes(tmp_path):
    toy = LineToy(n_pixels=500, seed=2)
    rng = np.random.default_rng(3)
    x = toy.draw_labels(3, rng)
    flux, ivar = noisy(toy.observe(x, np.array([10.0, -20.0, 30.0])), 100.0, rng)
    flux[2] = np.nan
    t = fit(toy.emu, (toy.emu.wavelength, flux, ivar), FitConfig(presearch_size=256))
    spec = result_columns(toy.emu.label_names, toy.emu.label_space.units)
    assert t.colnames == [c.name for c in spec]
    for c in spec:
        assert str(t[c.name].unit or "") == str(u.Unit(c.unit)) if c.unit else t[c.name].unit is None, c.name
    pytest.importorskip("pyarrow")
    back = read_catalog(write_catalog(t, tmp_path / "fit.parquet"))
    np.testing.assert_array_equal(back["flag_bad"], t["flag_bad"])
    np.testing.assert_allclose(back["teff"], t["teff"], equal_nan=True)
    assert back["flag_reason"][2] == t["flag_reason"][2] != ""
