"""The registry and batch reading: identification, files/globs/folders, and bad input.

Bad input (an empty file, a truncated FITS, a FITS of another product, wavelengths that miss the
model) gives a one-line paynekit error naming the file when read alone, and a failure record inside
a batch while the other files are read.
"""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from paynekit.errors import FileFormatError, InputError, PaynekitError
from paynekit.io import (
    ReadFailure,
    available_formats,
    expand_paths,
    identify_format,
    iter_spectra,
    read_file,
    read_spectra,
    register_format,
)
from paynekit.io.registry import _FORMATS
from paynekit.wavelength import payne_apogee_wavelength

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_skip_without_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


def needs_shared(test):
    """Mark a test that reads ../shared/data (marker ``shared``); it skips when the data is absent."""
    return pytest.mark.shared(_skip_without_shared(test))


def make_apstar(path, obj="2M00000001+0000001", nvisits=1):
    h = fits.Header()
    h["CRVAL1"], h["CDELT1"], h["CRPIX1"], h["CTYPE1"], h["DC-FLAG"] = 4.179, 6e-6, 1, "LOG-LINEAR", 1
    h["NWAVE"], h["OBJID"], h["SNR"], h["NVISITS"] = 8575, obj, 100.0, nvisits
    rows = nvisits + 2
    fits.HDUList([fits.PrimaryHDU(header=h), fits.ImageHDU(np.full((rows, 8575), 100.0)),
                  fits.ImageHDU(np.full((rows, 8575), 1.0)),
                  fits.ImageHDU(np.zeros((rows, 8575), np.int32))]).writeto(path)
    return path


def make_optical(path):
    """A BOSS-like spec-lite covering 3600-10300 A (no overlap with APOGEE)."""
    n = 200
    loglam = (3.5516 + 1e-4 * np.arange(0, 20 * n, 20)).astype(np.float32)
    cols = [fits.Column("flux", "E", array=np.ones(n)), fits.Column("loglam", "E", array=loglam),
            fits.Column("ivar", "E", array=np.ones(n)), fits.Column("and_mask", "J", array=np.zeros(n))]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols, name="COADD")]).writeto(path)
    return path


def _one_line_naming(exc_info, path):
    msg = str(exc_info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


# ------------------------------------------------------------------------------------------------
# bad input, alone
# ------------------------------------------------------------------------------------------------
def test_empty_file(tmp_path):
    path = tmp_path / "apStar-empty.fits"
    path.write_bytes(b"")
    with pytest.raises(FileFormatError) as info:
        read_file(path)
    assert "empty" in _one_line_naming(info, path)


def test_truncated_fits(tmp_path):
    path = make_apstar(tmp_path / "apStar-full.fits")
    data = path.read_bytes()
    cut = tmp_path / "apStar-cut.fits"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FileFormatError) as info:
        read_file(cut)
    assert "truncated" in _one_line_naming(info, cut)
    cut2 = tmp_path / "apStar-cut-header.fits"
    cut2.write_bytes(data[:5000])  # inside the second header
    with pytest.raises(FileFormatError) as info:
        read_file(cut2)
    assert "truncated" in _one_line_naming(info, cut2) or "corrupt" in str(info.value)


def test_fits_of_another_product(tmp_path):
    path = tmp_path / "image.fits"
    fits.HDUList([fits.PrimaryHDU(np.zeros((10, 10))), fits.ImageHDU(np.zeros(5))]).writeto(path)
    with pytest.raises(FileFormatError) as info:
        read_file(path)
    msg = _one_line_naming(info, path)
    assert "no known spectrum product" in msg and "apstar" in msg
    # forcing a format on the wrong product also fails cleanly
    with pytest.raises(FileFormatError) as info:
        read_file(path, format="boss")
    _one_line_naming(info, path)


def test_not_a_data_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(FileFormatError, match="not a FITS, npz or HDF5 file"):
        read_file(path)
    with pytest.raises(FileFormatError, match="no such file"):
        read_file(tmp_path / "missing.fits")


def test_wavelengths_that_miss_the_model(tmp_path):
    path = make_optical(tmp_path / "spec-optical.fits")
    (s,) = read_file(path)
    from paynekit.io import resample

    with pytest.raises(InputError) as info:
        resample(s, payne_apogee_wavelength())
    assert "no overlap" in _one_line_naming(info, path)


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
def _bad_files(tmp_path):
    empty = tmp_path / "b_empty.fits"
    empty.write_bytes(b"")
    full = make_apstar(tmp_path / "tmp_full.fits").read_bytes()
    (tmp_path / "tmp_full.fits").unlink()
    truncated = tmp_path / "c_truncated.fits"
    truncated.write_bytes(full[: len(full) // 2])
    other = tmp_path / "d_other.fits"
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(other)
    optical = make_optical(tmp_path / "e_optical.fits")
    return empty, truncated, other, optical


def test_batch_turns_bad_files_into_failure_rows(tmp_path):
    good1 = make_apstar(tmp_path / "a_apStar.fits", obj="2M1")
    empty, truncated, other, optical = _bad_files(tmp_path)
    good2 = make_apstar(tmp_path / "f_apStar.fits", obj="2M2")
    files = [good1, empty, truncated, other, optical, good2]
    result = read_spectra(files, resample_to=payne_apogee_wavelength())
    assert [s.id for s in result.spectra] == ["2M1", "2M2"]
    assert all(s.wavelength.size == 7214 for s in result.spectra)
    assert result.to_batch().flux.shape == (2, 7214)
    reasons = {Path(f.path).name: f for f in result.failures}
    assert list(reasons) == ["b_empty.fits", "c_truncated.fits", "d_other.fits", "e_optical.fits"]
    assert "empty" in reasons["b_empty.fits"].reason
    assert "truncated" in reasons["c_truncated.fits"].reason
    assert "no known spectrum product" in reasons["d_other.fits"].reason
    assert "no overlap" in reasons["e_optical.fits"].reason and reasons["e_optical.fits"].error == "InputError"
    for f in result.failures:
        assert isinstance(f, ReadFailure) and "\n" not in f.reason and f.path in f.reason
    assert not result.ok and len(result) == 2 and len(result.files) == 6
    # without a model grid the optical file is simply read
    assert len(read_spectra(files).spectra) == 3
    with pytest.raises(FileFormatError, match="empty"):
        read_spectra(files, on_error="raise")


def test_iter_spectra_streams_in_file_order(tmp_path):
    good = make_apstar(tmp_path / "a.fits", obj="2M1", nvisits=2)
    empty = tmp_path / "b.fits"
    empty.write_bytes(b"")
    items = list(iter_spectra([good, empty], visits=True))
    assert [type(i).__name__ for i in items] == ["Spectrum", "Spectrum", "ReadFailure"]
    assert [i.meta["visit"] for i in items[:2]] == [1, 2]


def test_globs_folders_and_missing(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    a = make_apstar(tmp_path / "apStar-a.fits")
    b = make_apstar(sub / "apStar-b.fits")
    (tmp_path / "readme.txt").write_text("not a spectrum")
    files, failures = expand_paths([tmp_path, str(tmp_path / "apStar-*.fits"), tmp_path / "nope.fits",
                                    str(tmp_path / "zz*.fits")])
    assert files == [a] and len(failures) == 2  # duplicates removed, txt skipped in folders
    assert "no such file" in failures[0].reason and "no file matches" in failures[1].reason
    files, _ = expand_paths(tmp_path, recursive=True)
    assert sorted(files) == sorted([a, b])
    files, _ = expand_paths(str(tmp_path / "**" / "*.fits"))
    assert sorted(files) == sorted([a, b])
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    _, failures = expand_paths(empty_dir)
    assert "holds no spectrum files" in failures[0].reason


def test_options_are_checked():
    with pytest.raises(InputError, match="unknown format"):
        read_spectra([], options={"nosuch": {}})
    with pytest.raises(InputError, match="has no option"):
        read_spectra([], options={"apstar": {"bogus": 1}})
    with pytest.raises(InputError, match="on_error"):
        read_spectra([], on_error="ignore")


def test_register_a_format(tmp_path):
    def identify(probe):
        return probe.kind == "fits" and probe.hdu(0).header.get("MYFMT") == 1

    def read(path, *, visits=False):
        from paynekit.spectra import Spectrum

        return [Spectrum([1.0, 2.0], [1.0, 1.0], [1.0, 1.0], meta={"id": "mine"})]

    assert "mine" not in available_formats()
    register_format("mine", identify, read, "test format")
    try:
        path = tmp_path / "mine.fits"
        h = fits.Header()
        h["MYFMT"] = 1
        fits.PrimaryHDU(header=h).writeto(path)
        assert identify_format(path) == "mine"
        (s,) = read_file(path)
        assert s.meta["format"] == "mine" and s.meta["file"] == str(path)
        with pytest.raises(InputError, match="already registered"):
            register_format("mine", identify, read)
    finally:
        _FORMATS.pop("mine", None)


def test_errors_are_paynekit_errors():
    assert issubclass(FileFormatError, PaynekitError) and issubclass(InputError, PaynekitError)


@needs_shared
def test_real_mixed_batch_onto_payne_grid():
    paths = [SHARED / "apogee" / "dr17_apstar", SHARED / "optical" / "boss" / "spec-3586-55181-0220.fits",
             SHARED / "synthetic" / "apogee_rv_synth_grid_96.fits"]
    result = read_spectra(paths, resample_to=payne_apogee_wavelength())
    assert len(result.spectra) == 5  # 2 apStar + 3 apVisit, all on The Payne's grid
    for s in result.spectra:
        assert s.wavelength.size == 7214 and np.count_nonzero(s.ivar) > 6000
    names = {Path(f.path).name: f.reason for f in result.failures}
    assert set(names) == {"spec-3586-55181-0220.fits", "apogee_rv_synth_grid_96.fits"}
    assert "no overlap" in names["spec-3586-55181-0220.fits"]
    assert "no known spectrum product" in names["apogee_rv_synth_grid_96.fits"]
