"""Gaia XP sampled-spectra table: a small synthetic table, and the shared 24,000-star table read once."""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from paynekit.io import GAIA_XP_WAVELENGTH, identify_format, read_file, read_gaiaxp_table

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "optical"
XP_TABLE = SHARED / "gaiaxp_apogee_dr17_24000stars.fits.gz"
_skip_without_shared = pytest.mark.skipif(not XP_TABLE.is_file(), reason="the shared Gaia XP table is absent")


def needs_shared(test):
    """Mark a test that reads ../shared/data (marker ``shared``); it skips when the data is absent."""
    return pytest.mark.shared(_skip_without_shared(test))


def make_xp_table(path, n=5, seed=0):
    rng = np.random.default_rng(seed)
    flux = 1.0 + rng.normal(0, 0.01, (n, 343))
    err = np.full((n, 343), 0.01)
    err[1, 3] = 0.0
    flux[2, 4] = np.nan
    cols = [fits.Column("source_id", "K", array=np.arange(n) + 1000),
            fits.Column("teff", "E", array=np.linspace(4000, 6000, n)),
            fits.Column("teff_err", "E", array=np.full(n, 20.0)),
            fits.Column("fe_h", "E", array=np.array([0.1, np.nan, -0.2, 0.0, -1.0][:n])),
            fits.Column("flux", "343E", array=flux), fits.Column("flux_error", "343E", array=err)]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(path)
    return flux


def test_grid():
    assert GAIA_XP_WAVELENGTH.size == 343
    assert GAIA_XP_WAVELENGTH[0] == 3360.0 and GAIA_XP_WAVELENGTH[-1] == 10200.0
    assert np.all(np.diff(GAIA_XP_WAVELENGTH) == 20.0)


def test_synthetic_table(tmp_path):
    path = tmp_path / "xp.fits"
    flux = make_xp_table(path)
    assert identify_format(path) == "gaiaxp"
    spectra = read_file(path)
    assert len(spectra) == 5
    assert [s.id for s in spectra] == [str(i) for i in range(1000, 1005)]
    s = spectra[1]
    assert s.ivar[3] == 0 and s.mask[3] and spectra[2].ivar[4] == 0 and spectra[2].flux[4] == 0
    np.testing.assert_allclose(spectra[0].ivar, 1e4, rtol=1e-6)
    np.testing.assert_allclose(spectra[0].flux, flux[0], rtol=1e-6)
    assert s.meta["reference_labels"]["teff"] == pytest.approx(4500.0) and np.isnan(s.meta["reference_labels"]["fe_h"])
    assert s.meta["reference_label_errors"]["teff"] == 20.0
    assert s.meta["snr"] == pytest.approx(100.0, rel=0.05)  # median flux/error, computed (no snr column)
    assert s.meta["row"] == 1 and s.meta["gaia_source_id"] == "1001"
    batch, labels = read_gaiaxp_table(path)
    assert batch.flux.shape == (5, 343) and batch.ids == [s.id for s in spectra]
    assert list(labels.colnames) == ["source_id", "teff", "teff_err", "fe_h"]


@pytest.fixture(scope="module")
def xp():
    return read_gaiaxp_table(XP_TABLE)


@needs_shared
def test_real_table_identified():
    assert identify_format(XP_TABLE) == "gaiaxp"


@needs_shared
def test_real_table_reads(xp):
    batch, labels = xp
    assert batch.flux.shape == (24000, 343) and len(labels) == 24000
    assert batch.wavelength[0] == 3360.0 and batch.wavelength[-1] == 10200.0
    assert len(set(batch.ids)) == len(set(labels["gaiaedr3_source_id"]))
    assert batch.ids[0] == str(labels["gaiaedr3_source_id"][0])
    snr = np.array([m["snr"] for m in batch.meta])
    np.testing.assert_allclose(snr, labels["snr"], rtol=1e-6)
    # the table's snr column is median(flux / flux_error): check it on our ivar
    usable = batch.ivar[:100] > 0
    ours = [np.median(batch.flux[i][usable[i]] * np.sqrt(batch.ivar[i][usable[i]])) for i in range(100)]
    np.testing.assert_allclose(ours, snr[:100], rtol=1e-4)
    m = batch.meta[0]
    assert m["apogee_id"] == labels["apogee_id"][0].strip()
    assert m["reference_labels"]["teff"] == pytest.approx(float(labels["teff"][0]))
    assert set(m["reference_labels"]) == {"teff", "logg", "fe_h", "alpha_m"}
    n_missing = sum(np.isnan(mm["reference_labels"]["fe_h"]) for mm in batch.meta)
    assert n_missing == int(np.sum(~np.isfinite(labels["fe_h"])))
