"""BOSS spec / spec-lite reader: synthetic files shaped like the product, and the shared real files."""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from paynekit.io import identify_format, read_file
from paynekit.io.boss import BOSS_PIXMASK_BITS, BOSS_REJECT_BITS, sppixmask_value
from paynekit.wavelength import vacuum_to_air

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "optical" / "boss"
_skip_without_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/optical/boss is absent")


def needs_shared(test):
    """Mark a test that reads ../shared/data (marker ``shared``); it skips when the data is absent."""
    return pytest.mark.shared(_skip_without_shared(test))

COEFF0, COEFF1, N = 3.5516, 1e-4, 4625


def make_spec_lite(path, *, vacuum=True, seed=0, catalogid=None):
    rng = np.random.default_rng(seed)
    loglam = (COEFF0 + COEFF1 * np.arange(N)).astype(np.float32)  # stored in float32, as SDSS does
    flux = (50.0 + rng.normal(0, 1, N)).astype(np.float32)
    ivar = np.ones(N, np.float32)
    ivar[5] = 0.0
    and_mask = np.zeros(N, np.int32)
    and_mask[10] = 1 << BOSS_PIXMASK_BITS["BRIGHTSKY"]
    and_mask[11] = 1 << BOSS_PIXMASK_BITS["PARTIALREJECT"]  # kept
    and_mask[12] = 1 << BOSS_PIXMASK_BITS["NODATA"]
    cols = [fits.Column("flux", "E", array=flux), fits.Column("loglam", "E", array=loglam),
            fits.Column("ivar", "E", array=ivar), fits.Column("and_mask", "J", array=and_mask),
            fits.Column("or_mask", "J", array=and_mask), fits.Column("wdisp", "E", array=np.full(N, 1.1, np.float32)),
            fits.Column("sky", "E", array=np.zeros(N, np.float32)), fits.Column("model", "E", array=flux)]
    coadd = fits.BinTableHDU.from_columns(cols, name="COADD")
    spall_cols = [fits.Column("PLATE", "J", array=[3586]), fits.Column("MJD", "J", array=[55181]),
                  fits.Column("FIBERID", "J", array=[220]), fits.Column("CLASS", "6A", array=["STAR"]),
                  fits.Column("Z", "E", array=[1e-4]), fits.Column("SN_MEDIAN_ALL", "E", array=[42.0]),
                  fits.Column("PLUG_RA", "D", array=[8.25]), fits.Column("PLUG_DEC", "D", array=[-0.7])]
    if catalogid is not None:
        spall_cols.append(fits.Column("CATALOGID", "K", array=[catalogid]))
    h0 = fits.Header()
    h0["TELESCOP"], h0["VACUUM"], h0["COEFF0"], h0["COEFF1"] = "SDSS 2.5-M", vacuum, COEFF0, COEFF1
    fits.HDUList([fits.PrimaryHDU(header=h0), coadd,
                  fits.BinTableHDU.from_columns(spall_cols, name="SPALL")]).writeto(path)
    return flux, ivar


def test_synthetic_spec_lite(tmp_path):
    path = tmp_path / "spec-3586-55181-0220.fits"
    flux, _ = make_spec_lite(path)
    assert identify_format(path) == "boss"
    (s,) = read_file(path)
    exact = 10.0 ** (COEFF0 + COEFF1 * np.arange(N))
    # the float32 log-lambda column is rebuilt as the exact log-linear grid
    np.testing.assert_allclose(s.wavelength, exact, rtol=1e-12)
    assert s.meta["id"] == "3586-55181-0220" and s.meta["snr"] == pytest.approx(42.0)
    assert s.meta["rv"] == pytest.approx(29.9792458, rel=1e-5) and s.meta["frame"] == "heliocentric"
    assert s.meta["plate"] == 3586 and s.meta["mjd"] == 55181 and s.meta["fiber"] == 220
    assert s.meta["telescope"] == "SDSS 2.5-M" and s.meta["wavelength_medium"] == "vacuum"
    assert s.meta["wdisp"].shape == (N,)
    assert s.ivar[5] == 0 and s.ivar[10] == 0 and s.ivar[12] == 0 and s.ivar[11] == 1.0
    assert np.count_nonzero(s.mask) == 3
    np.testing.assert_allclose(s.flux[20:30], flux[20:30])


def test_reject_bits_option_and_catalogid(tmp_path):
    path = tmp_path / "spec-lite.fits"
    make_spec_lite(path, catalogid=27021597764879876)
    (s,) = read_file(path, reject_bits=())
    assert s.ivar[10] > 0 and s.ivar[5] == 0  # ivar = 0 pixels stay unusable
    assert s.meta["id"] == "27021597764879876"  # SDSS-V: the catalog id
    assert sppixmask_value(BOSS_REJECT_BITS) & (1 << BOSS_PIXMASK_BITS["PARTIALREJECT"]) == 0


def test_air_wavelength_file_is_converted_to_vacuum(tmp_path):
    path = tmp_path / "spec-air.fits"
    make_spec_lite(path, vacuum=False)
    (s,) = read_file(path)
    air = 10.0 ** (COEFF0 + COEFF1 * np.arange(N))
    np.testing.assert_allclose(vacuum_to_air(s.wavelength), air, rtol=1e-9)
    assert s.meta["wavelength_medium"] == "vacuum"


@needs_shared
def test_real_boss_spec_files():
    files = sorted(SHARED.glob("spec-*.fits"))
    assert len(files) == 2
    for path in files:
        _, plate, mjd, fiber = path.stem.split("-")
        (s,) = read_file(path)
        assert s.meta["format"] == "boss" and s.wavelength.shape == (4625,)
        assert s.wavelength[0] == pytest.approx(3561.23, abs=0.01) and s.wavelength[-1] == pytest.approx(10327.6, abs=0.1)
        assert s.meta["id"] == f"{plate}-{mjd}-{fiber}"
        spall = fits.getdata(path, "SPALL")
        assert s.meta["snr"] == pytest.approx(float(spall["SN_MEDIAN_ALL"][0]))
        assert s.meta["class"] == "STAR"
        coadd = fits.getdata(path, "COADD")
        rejected = (coadd["and_mask"] & sppixmask_value(BOSS_REJECT_BITS)) != 0
        assert rejected.any() and np.all(s.ivar[rejected] == 0)
        kept = (coadd["ivar"] > 0) & ~rejected
        np.testing.assert_allclose(s.ivar[kept], coadd["ivar"][kept], rtol=1e-6)
        np.testing.assert_allclose(s.wavelength, 10.0 ** coadd["loglam"].astype(np.float64), rtol=2e-6)
