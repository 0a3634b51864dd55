"""APOGEE readers: apStar (combined and visits), aspcapStar (8575 and 7214 px), apVisit.

Synthetic FITS files shaped like each product (built here with astropy.io.fits) cover every code
path; the real DR13/DR14/DR17 files in ../shared/data/apogee are read when present.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from paynekit.errors import FileFormatError, InputError
from paynekit.io import APOGEE_REJECT_BITS, identify_format, read_file, read_spectra
from paynekit.io.apogee import APOGEE_PIXMASK_BITS, aspcap_dr13_wavelength, pixmask_value
from paynekit.wavelength import apstar_wavelength, payne_apogee_pixels, payne_apogee_wavelength

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "apogee"
_skip_without_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/apogee is absent")


def needs_shared(test):
    """Mark a test that reads ../shared/data (marker ``shared``); it skips when the data is absent."""
    return pytest.mark.shared(_skip_without_shared(test))

REJECT = pixmask_value(APOGEE_REJECT_BITS)
N_PIX = 8575


# ------------------------------------------------------------------------------------------------
# synthetic products
# ------------------------------------------------------------------------------------------------
def _apstar_header(nvisits, snr=123.4):
    h = fits.Header()
    h["CRVAL1"], h["CDELT1"], h["CRPIX1"], h["CTYPE1"], h["DC-FLAG"] = 4.179, 6e-6, 1, "LOG-LINEAR", 1
    h["NWAVE"] = N_PIX
    h["OBJID"] = "2M00000001+0000001"
    h["FIELD"] = "TESTFLD"
    h["SNR"], h["VHELIO"], h["VERR"], h["NVISITS"] = snr, -12.5, 0.05, nvisits
    h["RA"], h["DEC"] = 10.0, 20.0
    for i in range(1, nvisits + 1):
        h[f"SFILE{i}"] = f"apVisit-dr17-1000-{56000 + i}-0{i:02d}.fits"
        h[f"JD{i}"] = 2456000.5 + i
        h[f"FIBER{i}"] = 100 + i
        h[f"VHELIO{i}"] = -12.0 - i
        h[f"SNRVIS{i}"] = 50.0 + i
        h[f"BC{i}"] = 5.0 * i
    return h


def make_apstar(path, nvisits=2, *, one_d=False, rows=None, seed=0):
    """An apStar-shaped file; returns (flux, err, bitmask) of all rows (2-D) as written."""
    rng = np.random.default_rng(seed)
    n_rows = 1 if one_d else (rows if rows is not None else nvisits + 2)
    flux = 1000.0 + rng.normal(0, 5, (n_rows, N_PIX))
    err = np.full((n_rows, N_PIX), 5.0)
    bitmask = np.zeros((n_rows, N_PIX), np.int64)
    bitmask[:, 100] = 1 << APOGEE_PIXMASK_BITS["BADPIX"]
    bitmask[:, 200] = 1 << APOGEE_PIXMASK_BITS["SIG_SKYLINE"]
    bitmask[:, 300] = 1 << APOGEE_PIXMASK_BITS["PERSIST_LOW"]  # warning only: kept
    bitmask[:, 400] = (1 << APOGEE_PIXMASK_BITS["SIG_TELLURIC"]) | (1 << APOGEE_PIXMASK_BITS["NOT_ENOUGH_PSF"])
    err[:, 500] = 1e10  # APOGEE's "no data" error
    flux[:, 600] = np.nan
    err[:, 700] = 0.0
    for r in range(n_rows):
        flux[r] += 10 * r  # rows distinguishable
    data = [flux[0], err[0], bitmask[0]] if one_d else [flux, err, bitmask]
    hdus = [fits.PrimaryHDU(header=_apstar_header(nvisits))]
    hdus += [fits.ImageHDU(d) for d in data]
    hdus += [fits.ImageHDU(np.zeros_like(data[0])) for _ in range(4)]
    fits.HDUList(hdus).writeto(path)
    return flux, err, bitmask


def make_aspcapstar(path, n=N_PIX, seed=1):
    rng = np.random.default_rng(seed)
    flux = 1.0 + rng.normal(0, 0.01, n)
    err = np.full(n, 0.01)
    if n == N_PIX:  # zeros in the chip gaps, as in DR13-DR17 files
        gaps = np.ones(n, bool)
        gaps[payne_apogee_pixels()] = False
        flux[gaps], err[gaps] = 0.0, 0.0
    h0 = fits.Header()
    h0["OBJ"], h0["SNR"], h0["VHELIO"], h0["NVISITS"], h0["FERRE"] = "2M00000002+0000002", 88.0, 3.0, 4, "v461a"
    h1 = fits.Header()
    h1["CRVAL1"], h1["CDELT1"], h1["CRPIX1"], h1["CTYPE1"], h1["DC-FLAG"] = 4.179, 6e-6, 1, "LOG-LINEAR", 1
    cols = [fits.Column("APOGEE_ID", "18A", array=["2M00000002+0000002"]),
            fits.Column("SNR", "E", array=[88.0]),
            fits.Column("PARAM", "9E", array=[[4800.0, 2.5, 1.2, -0.3, 0.1, 0.2, 0.05, 5, 0]]),
            fits.Column("FPARAM", "9E", array=[[4750.0, 2.4, 1.2, -0.35, 0.1, 0.2, 0.06, 5, 0]])]
    fits.HDUList([fits.PrimaryHDU(header=h0), fits.ImageHDU(flux.astype(np.float32), header=h1),
                  fits.ImageHDU(err.astype(np.float32), header=h1), fits.ImageHDU(flux.astype(np.float32), header=h1),
                  fits.BinTableHDU.from_columns(cols)]).writeto(path)
    return flux, err


def make_apvisit(path, n=400, seed=2):
    """Three chips, red first, wavelength decreasing along each row (as in real apVisit files)."""
    rng = np.random.default_rng(seed)
    starts = [16950.0, 16430.0, 15805.0]
    wave = np.array([s - 0.2 * np.arange(n) for s in starts])
    flux = 500.0 + rng.normal(0, 3, (3, n))
    err = np.full((3, n), 3.0, np.float32)
    mask = np.zeros((3, n), np.int16)
    mask[0, 10] = 1 << APOGEE_PIXMASK_BITS["CRPIX"]
    mask[2, 20] = 1 << APOGEE_PIXMASK_BITS["PERSIST_HIGH"]
    h0 = fits.Header()
    h0["OBJID"], h0["SNR"], h0["MJD5"], h0["JD-MID"], h0["FIBERID"] = "2M00000003+0000003", 44.0, 57000, 2457000.7, 128
    h0["VHELIO"], h0["VRAD"], h0["BC"], h0["TELESCOP"], h0["PLATE"] = -33.0, -44.0, 11.0, "apo25m", "5095"
    fits.HDUList([fits.PrimaryHDU(header=h0), fits.ImageHDU(flux.astype(np.float32)), fits.ImageHDU(err),
                  fits.ImageHDU(mask), fits.ImageHDU(wave)]).writeto(path)
    return wave, flux, mask


# ------------------------------------------------------------------------------------------------
# synthetic: apStar
# ------------------------------------------------------------------------------------------------
def test_apstar_combined_wavelength_bits_and_meta(tmp_path):
    path = tmp_path / "apStar-synthetic.fits"
    flux, _, _ = make_apstar(path, nvisits=2)
    assert identify_format(path) == "apstar"
    (s,) = read_file(path)
    np.testing.assert_allclose(s.wavelength, apstar_wavelength(), rtol=1e-12)
    assert s.meta["wavelength_medium"] == "vacuum"
    assert s.meta["id"] == "2M00000001+0000001" and s.meta["snr"] == pytest.approx(123.4)
    assert s.meta["rv"] == pytest.approx(-12.5) and s.meta["kind"] == "combined" and s.meta["row"] == 0
    assert s.meta["format"] == "apstar" and s.meta["file"] == str(path) and s.meta["frame"] == "rest"
    # rejected bits, the 1e10 error, NaN flux and zero error -> ivar 0; warning bits kept
    for pix in (100, 200, 400, 500, 600, 700):
        assert s.ivar[pix] == 0 and s.mask[pix], pix
    assert s.ivar[300] == pytest.approx(1 / 25.0) and not s.mask[300]
    assert s.flux[600] == 0.0  # no NaN reaches a fitter
    np.testing.assert_allclose(s.flux[:50], flux[0, :50])
    assert np.count_nonzero(s.mask) == 6


def test_apstar_global_weighting_and_reject_bits_option(tmp_path):
    path = tmp_path / "apStar-g.fits"
    flux, *_ = make_apstar(path, nvisits=2)
    (s,) = read_file(path, weighting="global", reject_bits=("BADPIX",))
    np.testing.assert_allclose(s.flux[:50], flux[1, :50])
    assert s.ivar[100] == 0 and s.ivar[200] > 0  # SIG_SKYLINE no longer rejected
    (s,) = read_file(path, reject_bits=0)
    assert s.ivar[100] > 0
    with pytest.raises(InputError, match="unknown APOGEE_PIXMASK bit"):
        read_file(path, reject_bits=("NOPE",))
    with pytest.raises(InputError, match="weighting"):
        read_file(path, weighting="median")
    with pytest.raises(InputError, match="no option"):
        read_file(path, resolution=3)


def test_apstar_visits(tmp_path):
    path = tmp_path / "apStar-v.fits"
    flux, *_ = make_apstar(path, nvisits=3)
    visits = read_file(path, visits=True)
    assert len(visits) == 3
    for i, v in enumerate(visits, start=1):
        assert v.meta["visit"] == i and v.meta["row"] == i + 1 and v.meta["kind"] == "visit"
        assert v.meta["mjd"] == pytest.approx(56000.0 + i) and v.meta["fiber"] == 100 + i
        assert v.meta["snr"] == pytest.approx(50.0 + i) and v.meta["rv"] == pytest.approx(-12.0 - i)
        assert v.meta["visit_file"].endswith(f"-0{i:02d}.fits") and v.meta["id"] == "2M00000001+0000001"
        np.testing.assert_allclose(v.flux[:50], flux[i + 1, :50])
        assert v.ivar[100] == 0


def test_apstar_single_visit_layouts(tmp_path):
    # DR14-DR16: 1-D arrays; DR17: two rows and no separate visit row. The visit is the combined spectrum.
    p1 = tmp_path / "apStar-1d.fits"
    flux1, *_ = make_apstar(p1, nvisits=1, one_d=True)
    p2 = tmp_path / "apStar-2row.fits"
    flux2, *_ = make_apstar(p2, nvisits=1, rows=2)
    for path, flux in ((p1, flux1), (p2, flux2)):
        (c,) = read_file(path)
        (v,) = read_file(path, visits=True)
        np.testing.assert_allclose(v.flux[:50], flux[0, :50])
        np.testing.assert_allclose(c.flux, v.flux)
        assert v.meta["visit"] == 1 and v.meta["fiber"] == 101
    p3 = tmp_path / "apStar-bad.fits"
    make_apstar(p3, nvisits=4, rows=3)
    with pytest.raises(FileFormatError, match="NVISITS = 4"):
        read_file(p3, visits=True)


def test_apstar_wavelength_outside_apogee_is_rejected(tmp_path):
    path = tmp_path / "apStar-wrong.fits"
    make_apstar(path)
    with fits.open(path, mode="update") as h:
        h[0].header["CRVAL1"] = 3.6
    with pytest.raises(FileFormatError, match="outside the APOGEE range"):
        read_file(path)


def test_pixmask_value():
    assert pixmask_value(("BADPIX", "CRPIX")) == 3
    assert pixmask_value((0, 12)) == 1 + 4096
    assert pixmask_value(5) == 5
    # the default set is the pipeline's badval (16639) plus SIG_SKYLINE and the two SDSS-V bad bits
    assert REJECT == 16639 | (1 << 12) | (1 << 16) | (1 << 24)


# ------------------------------------------------------------------------------------------------
# synthetic: aspcapStar and apVisit
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [N_PIX, 7514, 7214])
def test_aspcapstar_layouts(tmp_path, n):
    path = tmp_path / f"aspcapStar-{n}.fits"
    _, err = make_aspcapstar(path, n)
    assert identify_format(path) == "aspcapstar"
    (s,) = read_file(path)
    expected = {N_PIX: apstar_wavelength(), 7514: aspcap_dr13_wavelength(), 7214: payne_apogee_wavelength()}[n]
    np.testing.assert_allclose(s.wavelength, expected, rtol=1e-12)
    assert s.meta["normalized"] is True and s.meta["id"] == "2M00000002+0000002"
    assert s.meta["snr"] == pytest.approx(88.0)
    assert s.meta["layout"] == {N_PIX: "apstar8575", 7514: "aspcap7514", 7214: "aspcap7214"}[n]
    assert s.meta["aspcap_fparam"]["teff"] == pytest.approx(4750.0)
    assert s.meta["aspcap_param"]["alpha_m"] == pytest.approx(0.05)
    assert np.array_equal(s.ivar == 0, err == 0)
    assert s.meta["aspcap_model"].shape == (n,)


def test_apvisit_chips_joined_in_order(tmp_path):
    path = tmp_path / "apVisit-synthetic.fits"
    wave, flux, _ = make_apvisit(path)
    assert identify_format(path) == "apvisit"
    (s,) = read_file(path)
    assert s.wavelength.size == wave.size and np.all(np.diff(s.wavelength) > 0)
    order = np.argsort(wave.ravel())
    expected = flux.ravel()[order]
    np.testing.assert_allclose(s.flux[~s.mask], expected[~s.mask], rtol=1e-6)
    assert np.all(s.flux[s.mask] == 0)
    bad_wl = wave[0, 10]  # CRPIX -> rejected; PERSIST_HIGH kept
    assert s.ivar[np.argmin(np.abs(s.wavelength - bad_wl))] == 0
    assert s.ivar[np.argmin(np.abs(s.wavelength - wave[2, 20]))] > 0
    assert np.count_nonzero(s.mask) == 1
    m = s.meta
    assert m["id"] == "2M00000003+0000003" and m["mjd"] == 57000 and m["fiber"] == 128 and m["snr"] == 44.0
    assert m["rv"] == -33.0 and m["vrel"] == -44.0 and m["bc"] == 11.0 and m["frame"] == "observed"
    assert m["telescope"] == "apo25m" and len(m["chips"]) == 3


# ------------------------------------------------------------------------------------------------
# real files
# ------------------------------------------------------------------------------------------------
@needs_shared
def test_real_apstar_dr17():
    files = sorted((SHARED / "dr17_apstar").glob("apStar-*.fits"))
    assert len(files) == 2
    for path in files:
        header = fits.getheader(path)
        (s,) = read_file(path)
        assert s.wavelength.shape == (N_PIX,)
        assert s.wavelength[0] == pytest.approx(15100.80, abs=0.01) and s.wavelength[-1] == pytest.approx(16999.81, abs=0.01)
        assert s.meta["id"] == header["OBJID"] and s.meta["id"] in path.name
        assert s.meta["snr"] == pytest.approx(header["SNR"]) and s.meta["rv"] == pytest.approx(header["VHELIO"])
        bitmask = fits.getdata(path, 3)[0]
        rejected = (bitmask & REJECT) != 0
        assert rejected.sum() > 50 and np.all(s.ivar[rejected] == 0)
        assert np.all(np.isfinite(s.flux)) and np.all(s.ivar[~s.mask] > 0)
        # the combined spectrum has S/N ~ header SNR on usable pixels of the chips
        usable = s.ivar > 0
        assert np.median(s.flux[usable] * np.sqrt(s.ivar[usable])) == pytest.approx(header["SNR"], rel=0.3)
        visits = read_file(path, visits=True)
        assert len(visits) == header["NVISITS"]
        assert [v.meta["visit_file"] for v in visits] == [header[f"SFILE{i}"] for i in range(1, len(visits) + 1)]
        assert all(v.meta["snr"] > 0 and v.meta["mjd"] > 56000 for v in visits)


@needs_shared
def test_real_apvisit():
    files = sorted((SHARED / "dr17_apstar").glob("apVisit-*.fits"))
    assert len(files) == 3
    for path in files:
        _, _, plate, mjd, fiber = path.stem.split("-")
        (s,) = read_file(path)
        assert s.wavelength.shape == (3 * 4096,) and np.all(np.diff(s.wavelength) > 0)
        assert 15140 < s.wavelength[0] < 15145 and 16950 < s.wavelength[-1] < 16960
        assert s.meta["mjd"] == int(mjd) and s.meta["fiber"] == int(fiber) and s.meta["plate"] == plate
        assert s.meta["id"].startswith("2M") and s.meta["snr"] > 10
        wave = fits.getdata(path, 4).ravel()
        bits = fits.getdata(path, 3).ravel()[np.argsort(wave)]
        rejected = (bits.astype(np.int64) & REJECT) != 0
        assert rejected.any() and np.all(s.ivar[rejected] == 0)


@needs_shared
def test_real_aspcapstar_dr13_against_table():
    with open(SHARED / "dr13_aspcapstar" / "aspcap_params.csv") as fh:
        rows = {r["file"]: r for r in csv.DictReader(fh)}
    result = read_spectra(SHARED / "dr13_aspcapstar")
    assert len(result.spectra) == 25 and not result.failures  # the folder's csv is not a spectrum file
    for s in result.spectra:
        row = rows[Path(s.meta["file"]).name]
        assert s.meta["format"] == "aspcapstar" and s.wavelength.shape == (N_PIX,)
        assert s.meta["id"] == row["APOGEE_ID"]
        assert s.meta["snr"] == pytest.approx(float(row["SNR"]), rel=1e-5)
        assert s.meta["aspcap_fparam"]["teff"] == pytest.approx(float(row["FPARAM_TEFF"]), rel=1e-5)
        chips = s.flux[payne_apogee_pixels()]
        assert 0.9 < np.median(chips[chips > 0]) < 1.1  # normalised
        raw = fits.getdata(s.meta["file"], 1)
        assert np.all(s.ivar[raw == 0] == 0)  # chip gaps and pixels ASPCAP rejected


@needs_shared
def test_real_dr14_npz_and_binary_npz():
    path = SHARED / "dr14_aspcapstar_2M08002084+4044415.npz"
    raw = np.load(path)
    (s,) = read_file(path)
    assert s.meta["format"] == "arrays" and s.meta["id"] == "2M08002084+4044415" and s.meta["normalized"] is True
    assert s.wavelength.shape == (7514,)
    np.testing.assert_allclose(s.wavelength, apstar_wavelength()[raw["apstar_pixel"]], rtol=1e-12)
    np.testing.assert_allclose(s.wavelength, aspcap_dr13_wavelength(), rtol=1e-12)  # the DR13+ ASPCAP grid
    good = raw["good_pixel_mask"]
    np.testing.assert_allclose(s.ivar[good], raw["inverse_variance"][good])
    assert np.all(s.ivar[~good] == 0)
    labels = json.loads((SHARED / "dr14_aspcapstar_2M08002084+4044415_aspcap_labels.json").read_text())
    assert labels["object_id"] == s.id

    (c,) = read_file(SHARED / "binary_2M13012770+5754582_combined.npz")
    np.testing.assert_allclose(c.wavelength, payne_apogee_wavelength())
    assert c.meta["id"] == "2M13012770+5754582" and "assumed" in c.meta["wavelength_source"]
    visits = read_file(SHARED / "binary_2M13012770+5754582_visits.npz")
    raw = np.load(SHARED / "binary_2M13012770+5754582_visits.npz")
    assert len(visits) == 3
    for i, v in enumerate(visits):
        assert v.meta["snr"] == pytest.approx(float(raw["snrs"][i]), rel=1e-6)
        assert v.meta["rv"] == pytest.approx(float(raw["vhelios"][i]), rel=1e-6)
        assert v.meta["hjd"] == pytest.approx(float(raw["hjds"][i]))
        assert v.meta["id"] == f"2M13012770+5754582:{i}"


@needs_shared
def test_real_folder_reads_every_spectrum_file_and_flags_the_rest():
    result = read_spectra([SHARED, SHARED / "dr17_apstar"], recursive=False)
    names = {Path(s.meta["file"]).name for s in result.spectra}
    assert {"apStar-dr17-2M17335483-2753043.fits", "apVisit-r8-4914-55807-100.fits",
            "dr14_aspcapstar_2M08002084+4044415.npz", "binary_2M13012770+5754582_visits.npz"} <= names
    failed = {Path(f.path).name: f.reason for f in result.failures}
    # wavelength grids, masks and the 100-pixel Cannon fixture are not spectra: flagged, one line each
    assert set(failed) == {"apogee_wavelength_7214.npz", "cannon_continuum_pixels_7214.npz",
                           "payne_apogee_mask_7214.npz", "cannon_fixture_671stars_100pix.npz"}
    assert all("\n" not in r and Path(p).name in r for p, r in [(f.path, f.reason) for f in result.failures])
