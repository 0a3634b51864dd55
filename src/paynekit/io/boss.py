"""SDSS BOSS ``spec`` and ``spec-lite`` files (SDSS-III/IV plates and SDSS-V fields).

Layout: HDU1 ``COADD`` table with columns loglam (log10 vacuum Angstrom, heliocentric frame),
flux (1e-17 erg/s/cm^2/A), ivar, and_mask, or_mask, wdisp, sky, model; HDU2 ``SPALL`` one-row
table (PLATE, MJD, FIBERID, CLASS, Z, SN_MEDIAN_ALL, CATALOGID in SDSS-V, ...). Full ``spec``
files add per-exposure HDUs (one per camera, blue and red overlap), which are not read.

Which pixels get ivar = 0: ivar <= 0 or non-finite values, and pixels whose ``and_mask`` (bad in
every exposure) has one of :data:`BOSS_REJECT_BITS`: the fibre, trace, flat or arc failed
(NOPLUG ... WHOPPER), all exposures were rejected (FULLREJECT, COMBINEREJ, NODATA), or sky
subtraction is unreliable (NOSKY, BRIGHTSKY, BADSKYCHI, BADFLUXFACTOR). Warning bits (SMEAR*,
NEARBADPIXEL, LOWFLAT, PARTIALREJECT, SCATTEREDLIGHT, CROSSTALK) are kept.

``meta["wdisp"]`` holds the per-pixel line-spread sigma in pixels of 1e-4 dex (so
sigma_lambda = wdisp * 1e-4 * ln(10) * lambda).
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import FileFormatError, InputError
from ..spectra import Spectrum
from ..wavelength import air_to_vacuum
from ._fits import (
    C_KMS,
    as_float,
    as_int,
    as_str,
    finish_pixels,
    hget,
    id_from_filename,
    loglam_wavelength,
    open_fits,
)
from .registry import register_format

log = logging.getLogger(__name__)

#: SDSS SPPIXMASK bit numbers (idlspec2d sdssMaskbits.par).
BOSS_PIXMASK_BITS = {
    "NOPLUG": 0, "BADTRACE": 1, "BADFLAT": 2, "BADARC": 3, "MANYBADCOLUMNS": 4, "MANYREJECTED": 5,
    "LARGESHIFT": 6, "BADSKYFIBER": 7, "NEARWHOPPER": 8, "WHOPPER": 9, "SMEARIMAGE": 10, "SMEARHIGHSN": 11,
    "SMEARMEDSN": 12, "NEARBADPIXEL": 16, "LOWFLAT": 17, "FULLREJECT": 18, "PARTIALREJECT": 19,
    "SCATTEREDLIGHT": 20, "CROSSTALK": 21, "NOSKY": 22, "BRIGHTSKY": 23, "NODATA": 24, "COMBINEREJ": 25,
    "BADFLUXFACTOR": 26, "BADSKYCHI": 27, "REDMONSTER": 28,
}  # fmt: skip

#: and_mask bits whose pixels get ivar = 0 by default (see the module docstring).
BOSS_REJECT_BITS = (
    "NOPLUG", "BADTRACE", "BADFLAT", "BADARC", "MANYBADCOLUMNS", "MANYREJECTED", "LARGESHIFT", "BADSKYFIBER",
    "NEARWHOPPER", "WHOPPER", "FULLREJECT", "NOSKY", "BRIGHTSKY", "NODATA", "COMBINEREJ", "BADFLUXFACTOR",
    "BADSKYCHI",
)  # fmt: skip


def sppixmask_value(bits) -> int:
    """The integer mask of SPPIXMASK ``bits`` (names, bit numbers, or an int mask itself)."""
    if isinstance(bits, (int, np.integer)):
        if bits < 0:
            raise InputError(f"reject_bits as an integer mask must be >= 0, got {bits}")
        return int(bits)
    value = 0
    for b in bits:
        if isinstance(b, str) and b.strip().upper() in BOSS_PIXMASK_BITS:
            value |= 1 << BOSS_PIXMASK_BITS[b.strip().upper()]
        elif isinstance(b, (int, np.integer)) and 0 <= b < 63:
            value |= 1 << int(b)
        else:
            raise InputError(f"unknown SPPIXMASK bit {b!r}; the bits are {list(BOSS_PIXMASK_BITS)}")
    return value


def identify_boss(probe) -> bool:
    h1 = probe.hdu(1)
    if h1 is None or h1.kind != "table" or not h1.has_columns("loglam", "flux", "ivar"):
        return False
    if h1.name.startswith("COADD_"):  # LAMOST MRS
        return False
    return h1.name == "COADD" or "and_mask" in h1.columns or probe.name.startswith("spec")


def _column(data, name, path, required=True):
    lower = {c.lower(): c for c in data.columns.names}
    if name.lower() not in lower:
        if required:
            raise FileFormatError(f"{path}: column {name!r} missing from the COADD table "
                                  f"(columns: {', '.join(data.columns.names)})")
        return None
    return np.asarray(data[lower[name.lower()]])


def read_boss(path, *, visits: bool = False, reject_bits=BOSS_REJECT_BITS):
    """Read the coadded spectrum of a BOSS spec/spec-lite file (vacuum, heliocentric frame).

    ``visits`` is accepted for batch use; per-exposure spectra are not read (the coadd is returned).
    """
    reject = sppixmask_value(reject_bits)
    with open_fits(path) as hdul:
        h0 = hdul[0].header
        coadd = hdul[1].data
        loglam = _column(coadd, "loglam", path)
        flux = _column(coadd, "flux", path).astype(np.float64)
        ivar = _column(coadd, "ivar", path).astype(np.float64)
        and_mask = _column(coadd, "and_mask", path, required=False)
        wdisp = _column(coadd, "wdisp", path, required=False)
        spall = {}
        for hdu in hdul[2:]:
            if hdu.name.upper() in ("SPALL", "SPALLLINE") or (getattr(hdu, "columns", None) is not None
                                                              and "PLATE" in [c.upper() for c in hdu.columns.names]):
                if len(hdu.data) >= 1:
                    spall = {c.upper(): hdu.data[c][0] for c in hdu.columns.names}
                break
    if visits:
        log.debug("%s: BOSS per-exposure spectra are not read; returning the coadd", path)
    wavelength = loglam_wavelength(loglam, path, "loglam", start=as_float(hget(h0, "COEFF0")),
                                   step=as_float(hget(h0, "COEFF1")))
    if hget(h0, "VACUUM", default=True) is False:  # SDSS writes vacuum; convert if a file says air
        wavelength = air_to_vacuum(wavelength)
    bad = np.zeros(flux.shape, bool) if and_mask is None else (and_mask.astype(np.int64) & reject) != 0
    flux, ivar, mask = finish_pixels(flux, ivar, bad)

    plate = as_int(spall.get("PLATE", hget(h0, "PLATEID", "PLATE")))
    mjd = as_int(spall.get("MJD", hget(h0, "MJD")))
    fiber = as_int(spall.get("FIBERID", hget(h0, "FIBERID")))
    catalogid = spall.get("CATALOGID", hget(h0, "CATALOGID"))
    if catalogid is not None and as_int(catalogid, 0) > 0:
        obj_id = str(as_int(catalogid))
    elif plate is not None and mjd is not None and fiber is not None:
        obj_id = f"{plate:04d}-{mjd:05d}-{fiber:04d}"
    else:
        obj_id = id_from_filename(path)
    z = as_float(spall.get("Z"))
    meta = {
        "id": obj_id,
        "kind": "coadd",
        "plate": plate,
        "mjd": mjd,
        "fiber": fiber,
        "snr": as_float(spall.get("SN_MEDIAN_ALL")),
        "rv": None if z is None else C_KMS * z,
        "z": z,
        "class": as_str(spall.get("CLASS", "")) or None,
        "subclass": as_str(spall.get("SUBCLASS", "")) or None,
        "objtype": as_str(spall.get("OBJTYPE", "")) or None,
        "ra": as_float(spall.get("PLUG_RA", hget(h0, "PLUG_RA"))),
        "dec": as_float(spall.get("PLUG_DEC", hget(h0, "PLUG_DEC"))),
        "telescope": as_str(hget(h0, "TELESCOP", default="")) or None,
        "frame": "heliocentric",
        "normalized": False,
        "wavelength_medium": "vacuum",
        "file": str(path),
    }
    if meta["snr"] is None:
        good = ivar > 0
        meta["snr"] = float(np.median(flux[good] * np.sqrt(ivar[good]))) if good.any() else None
    if wdisp is not None:
        meta["wdisp"] = wdisp.astype(np.float64)
    if and_mask is not None:
        meta["and_mask"] = and_mask.astype(np.int64)
    return [Spectrum(wavelength, flux, ivar, mask, meta)]


register_format("boss", identify_boss, read_boss, "SDSS BOSS spec / spec-lite coadded spectra")
