"""LAMOST LRS (5 x N image and DR8+ table) and MRS readers: synthetic files and the shared real files."""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from paynekit.errors import FileFormatError
from paynekit.io import identify_format, read_file

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "optical" / "lamost"
_skip_without_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/optical/lamost is absent")


def needs_shared(test):
    """Mark a test that reads ../shared/data (marker ``shared``); it skips when the data is absent."""
    return pytest.mark.shared(_skip_without_shared(test))

CRVAL, CD, N = 3.5682, 1e-4, 3909


def _lamost_header(**extra):
    h = fits.Header()
    h["TELESCOP"], h["OBSID"], h["DESIG"], h["FIBERID"], h["MJD"] = "LAMOST", 359910161, "LAMOST J0+0", 161, 57286
    h["VACUUM"], h["HELIO"], h["Z"], h["CLASS"] = True, True, -1e-4, "STAR"
    h["SNRU"], h["SNRG"], h["SNRR"], h["SNRI"], h["SNRZ"] = 25.0, 87.0, 128.0, 158.0, 119.0
    h["CRVAL1"], h["CD1_1"], h["COEFF0"], h["COEFF1"] = CRVAL, CD, CRVAL, CD
    for k, v in extra.items():
        h[k] = v
    return h


def _lrs_arrays(seed=0):
    rng = np.random.default_rng(seed)
    flux = 1000.0 + rng.normal(0, 10, N)
    ivar = np.full(N, 0.01)
    wave = 10.0 ** (CRVAL + CD * np.arange(N))
    and_mask = np.zeros(N)
    and_mask[100] = 8  # BRIGHTSKY
    ivar[-2:] = 0.0
    return flux, ivar, wave, and_mask


def make_lrs_image(path):
    flux, ivar, wave, and_mask = _lrs_arrays()
    image = np.vstack([flux, ivar, wave, and_mask, and_mask]).astype(np.float32)
    fits.PrimaryHDU(image, header=_lamost_header()).writeto(path)
    return flux, wave


def make_lrs_table(path):
    flux, ivar, wave, and_mask = _lrs_arrays()
    cols = [fits.Column("FLUX", f"{N}E", array=[flux]), fits.Column("IVAR", f"{N}E", array=[ivar]),
            fits.Column("WAVELENGTH", f"{N}E", array=[wave]), fits.Column("ANDMASK", f"{N}E", array=[and_mask]),
            fits.Column("ORMASK", f"{N}E", array=[and_mask])]
    h0 = _lamost_header()
    for k in ("CRVAL1", "CD1_1"):
        del h0[k]
    fits.HDUList([fits.PrimaryHDU(header=h0), fits.BinTableHDU.from_columns(cols, name="COADD")]).writeto(path)
    return flux, wave


def _mrs_table(name, loglam, flux, ivar, mask_name, mask, snr):
    cols = [fits.Column("FLUX", "E", array=flux), fits.Column("IVAR", "E", array=ivar),
            fits.Column("LOGLAM", "E", array=loglam), fits.Column(mask_name, "I", array=mask)]
    if mask_name == "ANDMASK":
        cols.append(fits.Column("ORMASK", "I", array=mask))
    hdu = fits.BinTableHDU.from_columns(cols, name=name)
    hdu.header["SNR"] = snr
    hdu.header["EXPTIME"] = 1200
    return hdu


def make_mrs(path, n_exposures=2):
    rng = np.random.default_rng(3)
    hdus = [fits.PrimaryHDU(header=_lamost_header())]
    arms = {"B": 3.6897 + 1e-5 * np.arange(500), "R": 3.7988 + 1e-5 * np.arange(500)}
    for arm, ll in arms.items():
        mask = np.zeros(ll.size, np.int16)
        mask[7] = 1
        hdus.append(_mrs_table(f"COADD_{arm}", ll.astype(np.float32), 100 + rng.normal(0, 1, ll.size),
                               np.ones(ll.size), "ANDMASK", mask, 100.0 if arm == "B" else 200.0))
    for e in range(n_exposures):
        lmjm = 84107311 + 24 * e
        for arm, ll in arms.items():
            ll_e = ll[::-1] if arm == "R" else ll  # red exposure tables run backwards in real files
            hdus.append(_mrs_table(f"{arm}-{lmjm}", ll_e.astype(np.float32), 100 + rng.normal(0, 2, ll.size),
                                   np.full(ll.size, 0.25), "PIXMASK", np.zeros(ll.size, np.int16), 40.0 + e))
    fits.HDUList(hdus).writeto(path)


@pytest.mark.parametrize("layout", ["image", "table"])
def test_synthetic_lrs(tmp_path, layout):
    path = tmp_path / f"spec-lrs-{layout}.fits"
    flux, wave = (make_lrs_image if layout == "image" else make_lrs_table)(path)
    assert identify_format(path) == "lamost_lrs"
    (s,) = read_file(path)
    np.testing.assert_allclose(s.wavelength, wave, rtol=1e-12)  # exact log-linear grid, not float32 values
    assert s.meta["id"] == "359910161" and s.meta["designation"] == "LAMOST J0+0"
    assert s.meta["snr"] == 128.0 and s.meta["snr_bands"]["g"] == 87.0
    assert s.meta["fiber"] == 161 and s.meta["mjd"] == 57286 and s.meta["telescope"] == "LAMOST"
    assert s.meta["rv"] == pytest.approx(-29.98, abs=0.01) and s.meta["frame"] == "heliocentric"
    assert s.ivar[100] == 0 and s.ivar[-1] == 0 and np.count_nonzero(s.mask) == 3
    np.testing.assert_allclose(s.flux[:50], flux[:50], rtol=1e-6)


def test_synthetic_mrs_coadd_and_exposures(tmp_path):
    path = tmp_path / "med-synthetic.fits"
    make_mrs(path, n_exposures=2)
    assert identify_format(path) == "lamost_mrs"
    (c,) = read_file(path)
    assert c.wavelength.size == 1000 and np.all(np.diff(c.wavelength) > 0)
    assert c.meta["snr_b"] == 100.0 and c.meta["snr_r"] == 200.0 and len(c.meta["arms"]) == 2
    assert c.ivar[7] == 0 and c.ivar[507] == 0 and np.count_nonzero(c.mask) == 2
    exposures = read_file(path, visits=True)
    assert [e.meta["lmjm"] for e in exposures] == [84107311, 84107335]
    for e in exposures:
        assert e.wavelength.size == 1000 and np.all(np.diff(e.wavelength) > 0)
        assert e.meta["kind"] == "visit" and e.meta["mjd"] == pytest.approx(e.meta["lmjm"] / 1440 - 1 / 3)
        np.testing.assert_allclose(e.ivar[~e.mask], 0.25, rtol=1e-6)


def test_mrs_without_exposures_asked_for_visits(tmp_path):
    path = tmp_path / "med-coadd-only.fits"
    make_mrs(path, n_exposures=0)
    with pytest.raises(FileFormatError, match="no per-exposure tables"):
        read_file(path, visits=True)


@needs_shared
def test_real_lamost_lrs():
    files = sorted(SHARED.glob("*spec-*.fits*"))
    assert len(files) == 2
    for path in files:
        (s,) = read_file(path)
        header = fits.getheader(path)
        raw = fits.getdata(path)
        assert s.meta["format"] == "lamost_lrs" and s.wavelength.shape == (3909,)
        assert s.wavelength[0] == pytest.approx(3699.99, abs=0.01) and s.wavelength[-1] == pytest.approx(9099.13, abs=0.01)
        np.testing.assert_allclose(s.wavelength, raw[2], rtol=1e-6)
        assert s.meta["id"] == str(header["OBSID"]) and s.meta["snr"] == pytest.approx(header["SNRR"])
        assert np.all(s.ivar[raw[1] <= 0] == 0) and np.all(s.ivar[raw[3] > 0] == 0)


@needs_shared
def test_real_lamost_mrs():
    path = SHARED / "med-58408-TD230151N343645T01_sp01-015.fits"
    (c,) = read_file(path)
    assert c.meta["format"] == "lamost_mrs" and c.wavelength.shape == (4101 + 3692,)
    assert 4893 < c.wavelength[0] < 4895 and 6850 < c.wavelength[-1] < 6851
    assert c.meta["id"] == "681001015" and c.meta["snr_b"] == pytest.approx(120.75)
    b = fits.getdata(path, "COADD_B")
    rejected = b["ANDMASK"] > 0
    assert rejected.any() and np.all(c.ivar[:4101][rejected] == 0)
    exposures = read_file(path, visits=True)
    assert len(exposures) == 7 and all(e.meta["snr"] > 10 for e in exposures)
