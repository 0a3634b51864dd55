"""Real files end to end through `paynekit fit` (issue 4): a DR14 star against ASPCAP, bad files in a batch.

Needs ../shared/data (skips without it).
"""

import json

import numpy as np
import pytest

from paynekit.catalog import read_catalog
from paynekit.cli import main

from .conftest import shared_path

BINSPEC_LABELS = "teff,logg,fe_h,alpha_fe,v_macro"


@pytest.fixture(scope="module")
def binspec(tmp_path_factory):
    """The binspec_plus network with its label names, saved in our format (the upstream npz has none)."""
    from paynekit.emulators import load_emulator, save_emulator

    emu = load_emulator(shared_path("emulators/apogee_5label_perpixel_binspec_plus.npz"),
                        label_names=tuple(BINSPEC_LABELS.split(",")))
    return save_emulator(emu, tmp_path_factory.mktemp("model") / "binspec_plus.npz")


@pytest.fixture
def bad_files(tmp_path):
    from astropy.io import fits

    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    real = shared_path("apogee/dr17_apstar/apStar-dr17-2M19485057+5005279.fits")
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(real.read_bytes()[:20000])
    other = tmp_path / "image.fits"
    fits.HDUList([fits.PrimaryHDU(np.zeros((4, 4)))]).writeto(other)
    optical = tmp_path / "optical.npz"  # a spectrum whose wavelengths miss the APOGEE model
    wl = np.linspace(4000, 5000, 500)
    np.savez(optical, wavelength=wl, flux=np.ones((1, 500)), ivar=np.ones((1, 500)), ids=np.array(["blue"]))
    return {"empty": empty, "truncated": truncated, "other product": other, "no overlap": optical}


@pytest.mark.shared
def test_dr14_star_matches_aspcap(binspec, tmp_path):
    star = shared_path("apogee/dr14_aspcapstar_2M08002084+4044415.npz")
    aspcap = json.loads(shared_path("apogee/dr14_aspcapstar_2M08002084+4044415_aspcap_labels.json").read_text())
    cat = tmp_path / "dr14.fits"
    assert main(["fit", str(binspec), str(star), "-o", str(cat), "--rv-range", "50", "--quiet", "--workers", "1"]) == 0
    row = read_catalog(cat)[0]
    assert row["id"] == "2M08002084+4044415" and not row["flag_bad"]
    assert abs(row["teff"] - aspcap["effective_temperature"]) < 250
    assert abs(row["logg"] - aspcap["log_surface_gravity"]) < 0.3
    assert abs(row["fe_h"] - aspcap["metallicity"]) < 0.2
    assert row["reduced_chi2"] < 2.0


@pytest.mark.shared
@pytest.mark.parametrize("problem", ["empty", "truncated", "other product", "no overlap"])
def test_bad_file_alone_is_a_one_line_error(binspec, bad_files, tmp_path, capsys, problem):
    path = bad_files[problem]
    assert main(["fit", str(binspec), str(path), "-o", str(tmp_path / "c.fits"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("paynekit: error:") and path.name in err and "\n" not in err
    assert "Traceback" not in err


@pytest.mark.shared
def test_bad_files_in_a_batch_become_flagged_rows(binspec, bad_files, tmp_path):
    good = [shared_path("apogee/dr14_aspcapstar_2M08002084+4044415.npz"),
            shared_path("apogee/dr17_apstar/apStar-dr17-2M19485057+5005279.fits")]
    cat = tmp_path / "batch.fits"
    inputs = [str(p) for p in good] + [str(p) for p in bad_files.values()]
    assert main(["fit", str(binspec), *inputs, "-o", str(cat), "--rv-range", "100", "--quiet", "--workers", "1"]) == 0
    table = read_catalog(cat)
    reasons = [str(r) for r in table["flag_reason"]]
    sources = [str(s) for s in table["source"]]
    assert len(table) == len(inputs)
    expected = {"empty": "empty", "truncated": "truncated", "other product": "no known spectrum product",
                "no overlap": "wavelength coverage"}
    for problem, path in bad_files.items():  # each bad file: one flagged row, from that file, saying why
        rows = [i for i, src in enumerate(sources) if src.endswith(path.name)]
        assert len(rows) == 1, (path.name, sources)
        assert table["flag_bad"][rows[0]] and expected[problem] in reasons[rows[0]], (problem, reasons[rows[0]])
    fitted = table[~np.asarray(table["flag_bad"], bool)]
    assert set(fitted["id"]) == {"2M08002084+4044415", "2M19485057+5005279"}
    assert np.all(np.isfinite(fitted["teff"]))
