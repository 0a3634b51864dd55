"""npz / HDF5 bundles: paynekit's own layout (round trip) and foreign key names."""

import numpy as np
import pytest

from paynekit.errors import FileFormatError, InputError
from paynekit.io import identify_format, read_file, write_arrays
from paynekit.spectra import Spectrum, SpectrumBatch
from paynekit.wavelength import apstar_wavelength, payne_apogee_wavelength, vacuum_to_air


def _batch(n=3, p=50, seed=0):
    rng = np.random.default_rng(seed)
    wl = np.linspace(5000.0, 5100.0, p)
    flux = 1.0 + rng.normal(0, 0.01, (n, p))
    ivar = np.full((n, p), 1e4)
    mask = np.zeros((n, p), bool)
    mask[1, 7] = True
    meta = [{"snr": 100.0 + i, "normalized": True} for i in range(n)]
    return SpectrumBatch(wl, flux, ivar, mask, [f"star{i}" for i in range(n)], meta)


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_round_trip(tmp_path, suffix):
    batch = _batch()
    path = write_arrays(tmp_path / f"bundle{suffix}", batch)
    assert identify_format(path) == "arrays"
    spectra = read_file(path)
    assert [s.id for s in spectra] == batch.ids
    for i, s in enumerate(spectra):
        np.testing.assert_array_equal(s.wavelength, batch.wavelength)
        np.testing.assert_array_equal(s.flux[~s.mask], batch.flux[i][~s.mask])
        assert s.meta["snr"] == 100.0 + i and s.meta["normalized"] is True and s.meta["index"] == i
    assert spectra[1].ivar[7] == 0 and spectra[1].mask[7]
    with pytest.raises(InputError, match="exists"):
        write_arrays(path, batch)


def test_foreign_keys_errors_good_mask_and_nm(tmp_path):
    wl_nm = np.linspace(1515.0, 1520.0, 40)
    flux = np.ones(40)
    err = np.full(40, 0.01)
    good = np.ones(40, bool)
    good[3] = False
    path = tmp_path / "x_2M01234567+7654321.npz"
    np.savez(path, wavelength_nm=wl_nm, normalized_flux=flux, normalized_error=err, good_pixel_mask=good)
    (s,) = read_file(path)
    np.testing.assert_allclose(s.wavelength, wl_nm * 10)
    assert s.id == "2M01234567+7654321" and s.meta["normalized"] is True
    assert s.ivar[3] == 0 and s.ivar[0] == pytest.approx(1e4)


def test_air_wavelengths_are_converted(tmp_path):
    wl_vac = np.linspace(6000.0, 6010.0, 30)
    path = tmp_path / "air.npz"
    np.savez(path, wavelength_air_A=vacuum_to_air(wl_vac), flux=np.ones(30), ivar=np.ones(30))
    (s,) = read_file(path)
    np.testing.assert_allclose(s.wavelength, wl_vac, rtol=1e-10)
    assert s.meta["wavelength_medium"] == "vacuum"


def test_standard_grids_assumed_only_for_their_pixel_counts(tmp_path):
    for n, grid in ((7214, payne_apogee_wavelength()), (8575, apstar_wavelength())):
        path = tmp_path / f"g{n}.npz"
        np.savez(path, spectrum=np.ones(n), spec_err=np.full(n, 0.01))
        (s,) = read_file(path)
        np.testing.assert_allclose(s.wavelength, grid)
        assert s.meta["wavelength_source"].startswith("assumed")
    path = tmp_path / "g100.npz"
    np.savez(path, flux=np.ones(100), flux_err=np.ones(100))
    with pytest.raises(FileFormatError, match="100 pixels match no standard grid"):
        read_file(path)


def test_bad_bundles(tmp_path):
    path = tmp_path / "noflux.npz"
    np.savez(path, wavelength=np.arange(5.0))
    with pytest.raises(FileFormatError, match="no known spectrum product"):
        read_file(path)
    with pytest.raises(FileFormatError, match="not a arrays file"):
        read_file(path, format="arrays")
    path = tmp_path / "shape.npz"
    np.savez(path, wavelength=np.arange(5.0) + 1, flux=np.ones(5), ivar=np.ones(4))
    with pytest.raises(FileFormatError, match="ivar has shape"):
        read_file(path)
    path = tmp_path / "noerr.npz"
    np.savez(path, wavelength=np.arange(5.0) + 1, flux=np.ones(5))
    with pytest.raises(FileFormatError, match="no inverse variance"):
        read_file(path)


def test_write_single_spectrum_and_inputs_untouched(tmp_path):
    s = Spectrum(np.linspace(4000, 4010, 11), np.ones(11), np.ones(11), meta={"id": "a", "snr": None})
    flux_before = s.flux.copy()
    path = write_arrays(tmp_path / "one.npz", s)
    (r,) = read_file(path)
    assert r.id == "a" and np.isnan(np.load(path)["snr"][0]) and r.meta["snr"] is None
    np.testing.assert_array_equal(s.flux, flux_before)
