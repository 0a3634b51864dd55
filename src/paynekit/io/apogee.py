"""APOGEE readers: apStar (combined spectrum and visit rows), aspcapStar and apVisit files.

Layouts (checked against real DR13, DR14 and DR17 files)
--------------------------------------------------------
apStar (DR14-DR17; SDSS-V apogee_drp keeps the layout)
    HDU0 header only (CRVAL1 = log10 of the first wavelength, CDELT1 its log10 step, NWAVE,
    OBJID, SNR, VHELIO, NVISITS, per-visit SFILEn/JDn/FIBERn/VHELIOn/SNRVISn/BCn), HDU1 flux,
    HDU2 error, HDU3 pixel bitmask, HDU4-7 sky/telluric, HDU9 the visit RV table. Arrays are
    (8575,) for a single-visit star in DR14-DR16, otherwise (nrows, 8575): row 0 is the combined
    spectrum with pixel-by-pixel weights (what ASPCAP fits), row 1 the combination with global
    weights, rows 2.. the visits (already shifted to the star's rest frame). DR17 single-visit stars
    have two rows and no separate visit row: the visit is the combined spectrum (row 0).
aspcapStar
    HDU1 normalised flux, HDU2 error, HDU3 ASPCAP's best-fitting model, HDU4 the ASPCAP table
    (PARAM/FPARAM...). 8575 pixels on the apStar grid (zeros in the chip gaps, as in the shared
    DR13 files), or the ASPCAP grids without gaps: 7514 pixels (DR13 and later,
    :data:`ASPCAP_DR13_SLICES`) or 7214 pixels (DR12, The Payne's grid). Pixels ASPCAP rejected have
    flux 0 (and error 10); they get ivar = 0.
apVisit
    HDU1 flux, HDU2 error, HDU3 bitmask, HDU4 wavelength: (3, 4096) arrays, one row per chip
    (red first, wavelength decreasing along a row), observed (not rest) frame.

All APOGEE wavelengths are in vacuum.

Which pixels get ivar = 0
-------------------------
A pixel is unusable (ivar = 0, mask True) if its flux or error is non-finite, its error is zero
or at least :data:`APOGEE_BAD_ERROR` (the reduction writes 1e10 for pixels it could not fill),
or its bitmask has any of :data:`APOGEE_REJECT_BITS`. Those bits are the APOGEE pipeline's own
"bad" set, ``PixelBitMask().badval()`` (BADPIX, CRPIX, SATPIX, UNFIXABLE, BADDARK, BADFLAT,
BADERR, NOSKY, NOT_ENOUGH_PSF: the pixel's value was not measured, is saturated, hit by a cosmic
ray, or has no sky or PSF model), plus SIG_SKYLINE, which ASPCAP adds before fitting (its
``badval() | getval('SIG_SKYLINE')``) because residuals of bright airglow lines dominate those
pixels, plus SDSS-V's INACTIVE_PIXEL and BAD_EXTRACTION (same "bad" level in apogee_drp 1.x; never
set in DR14-DR17 files). The warning-level bits LITTROW_GHOST, PERSIST_HIGH/MED/LOW and
SIG_TELLURIC are kept: ASPCAP keeps those pixels too (the combination already inflates their
errors), and The Payne's own pixel mask removes the worst regions at fitting time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, InputError
from ..spectra import Spectrum
from ..wavelength import APSTAR_N_PIXELS, apstar_wavelength, payne_apogee_wavelength
from ._fits import (
    as_float,
    as_int,
    as_str,
    finish_pixels,
    hget,
    id_from_filename,
    ivar_from_error,
    linear_header_wavelength,
    open_fits,
)
from .registry import register_format

log = logging.getLogger(__name__)

#: APOGEE_PIXMASK bit numbers (apogee_drp ``bitmask.PixelBitMask``; bits 16 and 24 are SDSS-V only).
APOGEE_PIXMASK_BITS = {
    "BADPIX": 0, "CRPIX": 1, "SATPIX": 2, "UNFIXABLE": 3, "BADDARK": 4, "BADFLAT": 5, "BADERR": 6,
    "NOSKY": 7, "LITTROW_GHOST": 8, "PERSIST_HIGH": 9, "PERSIST_MED": 10, "PERSIST_LOW": 11,
    "SIG_SKYLINE": 12, "SIG_TELLURIC": 13, "NOT_ENOUGH_PSF": 14, "INACTIVE_PIXEL": 16, "BAD_EXTRACTION": 24,
}  # fmt: skip

#: Bits whose pixels get ivar = 0 by default (see the module docstring for why).
APOGEE_REJECT_BITS = (
    "BADPIX", "CRPIX", "SATPIX", "UNFIXABLE", "BADDARK", "BADFLAT", "BADERR", "NOSKY", "NOT_ENOUGH_PSF",
    "SIG_SKYLINE", "INACTIVE_PIXEL", "BAD_EXTRACTION",
)  # fmt: skip

#: Errors at or above this are APOGEE's "no data" value (1e10), not measurements.
APOGEE_BAD_ERROR = 1e9

#: The ASPCAP grid of DR13 and later: apStar pixels without the chip gaps and edges (7514 pixels;
#: jobovy/apogee's ``_aspcapPixelLimits`` for DR >= 13, and the shared DR14 spectrum's apstar_pixel).
#: DR12's grid (7214 pixels) is :func:`paynekit.wavelength.payne_apogee_wavelength`.
ASPCAP_DR13_SLICES = ((246, 3274), (3585, 6080), (6344, 8335))


def aspcap_dr13_pixels() -> np.ndarray:
    """Indices into the apStar grid of the 7514-pixel DR13+ ASPCAP grid."""
    return np.concatenate([np.arange(a, b) for a, b in ASPCAP_DR13_SLICES])


def aspcap_dr13_wavelength() -> np.ndarray:
    """The 7514-pixel DR13+ ASPCAP wavelength grid (vacuum Angstrom)."""
    return apstar_wavelength()[aspcap_dr13_pixels()]


#: Wavelength range any APOGEE grid must fall in (vacuum Angstrom), a check on header values.
_APOGEE_RANGE = (14000.0, 18000.0)


def pixmask_value(bits) -> int:
    """The integer mask of APOGEE_PIXMASK ``bits`` (names, bit numbers, or an int mask itself)."""
    if isinstance(bits, (int, np.integer)):
        if bits < 0:
            raise InputError(f"reject_bits as an integer mask must be >= 0, got {bits}")
        return int(bits)
    value = 0
    for b in bits:
        if isinstance(b, str):
            key = b.strip().upper()
            if key not in APOGEE_PIXMASK_BITS:
                raise InputError(f"unknown APOGEE_PIXMASK bit {b!r}; the bits are {list(APOGEE_PIXMASK_BITS)}")
            value |= 1 << APOGEE_PIXMASK_BITS[key]
        elif isinstance(b, (int, np.integer)) and 0 <= b < 63:
            value |= 1 << int(b)
        else:
            raise InputError(f"reject_bits entries must be bit names or numbers 0-62, got {b!r}")
    return value


def _apogee_id(header, path) -> str:
    value = hget(header, "OBJID", "APOGEE_ID", "OBJ", "OBJECT", "SDSS_ID", "CATALOGID")
    return as_str(value) if value is not None else id_from_filename(path)


def _observatory(header, filename: str) -> str | None:
    telescope = hget(header, "TELESCOP")
    if telescope:
        t = as_str(telescope).lower()
        return "lco" if t.startswith("lco") else "apo" if t.startswith("apo") else t
    name = Path(filename).name
    for token in ("apo25m", "apo1m", "lco25m"):  # SDSS-V and DR17 paths/names carry the telescope
        if token in name:
            return token[:3]
    if name.startswith(("apStar", "apVisit", "aspcapStar")):
        return "apo"
    if name.startswith(("asStar", "asVisit")):
        return "lco"
    return None


def _check_range(wavelength, path, what):
    lo, hi = float(wavelength[0]), float(wavelength[-1])
    if lo < _APOGEE_RANGE[0] or hi > _APOGEE_RANGE[1]:
        raise FileFormatError(f"{path}: {what} wavelengths run {lo:.1f}-{hi:.1f} A, outside the APOGEE range "
                              f"{_APOGEE_RANGE[0]:.0f}-{_APOGEE_RANGE[1]:.0f} A")


def _make(path, wavelength, flux, err, bitmask, reject, meta) -> Spectrum:
    ivar = ivar_from_error(err, APOGEE_BAD_ERROR)
    bad = np.zeros(flux.shape, bool) if bitmask is None else (np.asarray(bitmask).astype(np.int64) & reject) != 0
    flux, ivar, mask = finish_pixels(flux, ivar, bad)
    meta = dict(meta, wavelength_medium="vacuum", file=str(path))
    if bitmask is not None:
        meta["bitmask"] = np.asarray(bitmask).astype(np.int64)
    return Spectrum(wavelength, flux, ivar, mask, meta)


# ------------------------------------------------------------------------------------------------
# apStar
# ------------------------------------------------------------------------------------------------
def _is_image(info, float_data: bool | None = None) -> bool:
    if info is None or info.kind != "image" or not info.shape:
        return False
    if float_data is None:
        return True
    return (info.bitpix < 0) == float_data


def _has_loglam_header(*headers) -> bool:
    return any(h is not None and "CRVAL1" in h and ("CDELT1" in h or "CD1_1" in h) for h in headers)


def identify_apstar(probe) -> bool:
    h0, h1, h3 = probe.hdu(0), probe.hdu(1), probe.hdu(3)
    if not (_is_image(h1, True) and _is_image(h3, False)) or h1.shape != h3.shape or len(h1.shape) > 2:
        return False
    if not _has_loglam_header(h0.header, h1.header):
        return False
    keys = h0.header
    return "NVISITS" in keys or "NWAVE" in keys or probe.name.startswith(("apStar", "asStar"))


def _visit_table(hdul, nvisits):
    for hdu in hdul[1:]:
        cols = getattr(hdu, "columns", None)
        if cols is None:
            continue
        names = [c.lower() for c in cols.names]
        if "vhelio" in names and ("jd" in names or "filename" in names) and len(hdu.data) == nvisits:
            data = hdu.data
            return {n: data[c] for n, c in zip(names, cols.names)}
    return None


def _visit_meta(header, table, i, nvisits) -> dict:
    """Meta of visit i (1-based) from the apStar header, falling back on the RV table."""

    def pick(key, col, conv=as_float):
        value = conv(hget(header, f"{key}{i}"))
        if (value is None or (conv is as_float and value == 0.0)) and table is not None and col in table:
            value = conv(table[col][i - 1])
        return value

    jd = pick("JD", "jd")
    meta = {
        "kind": "visit",
        "visit": i,
        "nvisits": nvisits,
        "visit_file": pick("SFILE", "filename", as_str) or None,
        "jd": jd,
        "mjd": None if jd is None else jd - 2400000.5,
        "fiber": as_int(hget(header, f"FIBER{i}")),
        "rv": pick("VHELIO", "vhelio"),
        "rv_err": as_float(hget(header, f"VERR{i}")),
        "bc": pick("BC", "bc"),
        "snr": pick("SNRVIS", "snr"),
        "starflag": as_int(hget(header, f"FLAG{i}")),
    }
    return meta


def read_apstar(path, *, visits: bool = False, reject_bits=APOGEE_REJECT_BITS, weighting: str = "pixel"):
    """Read an APOGEE apStar file.

    Parameters
    ----------
    visits : bool
        Return one spectrum per visit (rest-frame visit rows) instead of the combined spectrum.
    reject_bits : sequence of bit names/numbers, or int
        APOGEE_PIXMASK bits whose pixels get ivar = 0 (default :data:`APOGEE_REJECT_BITS`).
    weighting : {"pixel", "global"}
        Which combined spectrum: row 0 (pixel-by-pixel weights, what ASPCAP fits) or row 1.
    """
    if weighting not in ("pixel", "global"):
        raise InputError(f"weighting must be 'pixel' or 'global', got {weighting!r}")
    reject = pixmask_value(reject_bits)
    with open_fits(path) as hdul:
        if len(hdul) < 4:
            raise FileFormatError(f"{path}: apStar files have at least 4 HDUs (flux, error, bitmask); this has "
                                  f"{len(hdul)}")
        h0 = hdul[0].header
        flux, err, bitmask = (np.asarray(hdul[k].data) for k in (1, 2, 3))
        if flux.ndim not in (1, 2) or flux.shape != err.shape or flux.shape != bitmask.shape:
            raise FileFormatError(f"{path}: flux {flux.shape}, error {err.shape} and bitmask {bitmask.shape} "
                                  "must be equal 1-D or 2-D arrays in an apStar file")
        n_pix = flux.shape[-1]
        header = h0 if "CRVAL1" in h0 else hdul[1].header
        wavelength = linear_header_wavelength(header, n_pix, path)
        if wavelength is None:
            raise FileFormatError(f"{path}: no CRVAL1/CDELT1 log-lambda wavelength solution in HDU 0 or 1")
        _check_range(wavelength, path, "apStar")
        nvisits = as_int(hget(h0, "NVISITS"))
        table = _visit_table(hdul, nvisits) if nvisits else None

    flux2 = np.atleast_2d(flux)
    n_rows = flux2.shape[0]
    if nvisits is None:
        nvisits = n_rows - 2 if n_rows > 2 else 1
    common = {
        "id": _apogee_id(h0, path),
        "nvisits": nvisits,
        "field": as_str(hget(h0, "FIELD", default="")) or None,
        "ra": as_float(hget(h0, "RA")),
        "dec": as_float(hget(h0, "DEC")),
        "observatory": _observatory(h0, path),
        "telescope": as_str(hget(h0, "TELESCOP", default="")) or None,
        "frame": "rest",
        "normalized": False,
    }
    if not visits:
        row = 0 if weighting == "pixel" or n_rows == 1 else 1
        if weighting == "global" and n_rows == 1:
            log.info("%s: single-visit apStar file has only one combined spectrum; using it", path)
        meta = dict(common, kind="combined", row=row, weighting=weighting,
                    snr=as_float(hget(h0, "SNR")), rv=as_float(hget(h0, "VHELIO")),
                    rv_err=as_float(hget(h0, "VERR")), rv_scatter=as_float(hget(h0, "VSCATTER")),
                    starflag=as_int(hget(h0, "STARFLAG")))
        return [_make(path, wavelength, flux2[row], np.atleast_2d(err)[row], np.atleast_2d(bitmask)[row],
                      reject, meta)]

    if n_rows >= nvisits + 2:
        rows = list(range(2, 2 + nvisits))
    elif nvisits == 1:
        rows = [0]  # one visit: APOGEE stores no separate visit row, the combined spectrum is the visit
    else:
        raise FileFormatError(f"{path}: header says NVISITS = {nvisits} but the arrays have {n_rows} rows "
                              f"(expected {nvisits + 2}: two combined spectra, then the visits)")
    out = []
    for i, row in enumerate(rows, start=1):
        meta = dict(common, row=row, **_visit_meta(h0, table, i, nvisits))
        out.append(_make(path, wavelength, flux2[row], np.atleast_2d(err)[row], np.atleast_2d(bitmask)[row],
                         reject, meta))
    return out


# ------------------------------------------------------------------------------------------------
# aspcapStar
# ------------------------------------------------------------------------------------------------
#: The first seven entries of ASPCAP's PARAM/FPARAM vectors (DR13-DR17 order; checked against the
#: DR13 allStar columns PARAM_TEFF ... PARAM_ALPHA_M for the shared files).
ASPCAP_PARAM_NAMES = ("teff", "logg", "vmicro", "m_h", "c_m", "n_m", "alpha_m")


def identify_aspcapstar(probe) -> bool:
    h0, h1, h3 = probe.hdu(0), probe.hdu(1), probe.hdu(3)
    if not (_is_image(h1, True) and _is_image(h3, True)):
        return False
    if len(h1.shape) != 1 or h1.shape != h3.shape:
        return False
    if h1.shape[0] not in (7214, 7514, APSTAR_N_PIXELS) and not _has_loglam_header(h0.header, h1.header):
        return False
    h4 = probe.hdu(4)
    has_table = h4 is not None and h4.kind == "table" and ("fparam" in h4.columns or "param" in h4.columns)
    return has_table or probe.name.startswith("aspcapStar") or "FERRE" in h0.header


def _param_dict(vector) -> dict:
    vec = np.asarray(vector, dtype=np.float64).ravel()
    return {name: as_float(vec[k], np.nan) for k, name in enumerate(ASPCAP_PARAM_NAMES) if k < vec.size}


def read_aspcapstar(path, *, visits: bool = False):
    """Read an aspcapStar file: ASPCAP's continuum-normalised combined spectrum (meta ``normalized`` True).

    ``meta["aspcap_param"]`` / ``["aspcap_fparam"]`` hold ASPCAP's calibrated and spectroscopic
    labels (names :data:`ASPCAP_PARAM_NAMES`, NaN for -9999) and ``meta["aspcap_model"]`` its best fit.
    """
    with open_fits(path) as hdul:
        h0 = hdul[0].header
        flux = np.asarray(hdul[1].data, dtype=np.float64)
        err = np.asarray(hdul[2].data, dtype=np.float64)
        model = np.asarray(hdul[3].data, dtype=np.float64) if len(hdul) > 3 and hdul[3].data is not None else None
        table = None
        if len(hdul) > 4 and getattr(hdul[4], "columns", None) is not None and len(hdul[4].data):
            table = {c.upper(): hdul[4].data[c][0] for c in hdul[4].columns.names}
        h1 = hdul[1].header
    if flux.ndim != 1 or err.shape != flux.shape:
        raise FileFormatError(f"{path}: aspcapStar flux {flux.shape} and error {err.shape} must be equal 1-D arrays")
    n = flux.size
    if n == 7214:
        wavelength = payne_apogee_wavelength()
        layout = "aspcap7214"
    elif n == 7514:
        wavelength = aspcap_dr13_wavelength()
        layout = "aspcap7514"
    else:
        wavelength = linear_header_wavelength(h1 if "CRVAL1" in h1 else h0, n, path)
        layout = f"apstar{n}"
        if wavelength is None:
            raise FileFormatError(f"{path}: {n}-pixel aspcapStar without a CRVAL1/CDELT1 wavelength solution")
    _check_range(wavelength, path, "aspcapStar")
    table = table or {}
    meta = {
        "id": _apogee_id(h0, path) if hget(h0, "OBJ", "OBJID", "APOGEE_ID")
        else as_str(table.get("APOGEE_ID", id_from_filename(path))),
        "kind": "combined",
        "layout": layout,
        "snr": as_float(hget(h0, "SNR", default=table.get("SNR"))),
        "rv": as_float(hget(h0, "VHELIO", default=table.get("VHELIO"))),
        "rv_err": as_float(hget(h0, "VERR", default=table.get("VERR"))),
        "nvisits": as_int(hget(h0, "NVISITS", default=table.get("NVISITS"))),
        "field": as_str(hget(h0, "FIELD", default=table.get("FIELD", ""))) or None,
        "ra": as_float(hget(h0, "RA")),
        "dec": as_float(hget(h0, "DEC")),
        "observatory": _observatory(h0, path),
        "frame": "rest",
        "normalized": True,
    }
    if "PARAM" in table:
        meta["aspcap_param"] = _param_dict(table["PARAM"])
    if "FPARAM" in table:
        meta["aspcap_fparam"] = _param_dict(table["FPARAM"])
    if "ASPCAPFLAG" in table:
        meta["aspcapflag"] = as_int(table["ASPCAPFLAG"])
    if model is not None and model.shape == flux.shape:
        meta["aspcap_model"] = model
    # ASPCAP writes flux 0 with error 0 in the chip gaps and flux 0 with a large error (10) at pixels
    # it rejected; a normalised flux of exactly 0 is never a measurement.
    return [_make(path, wavelength, flux, np.where(flux == 0, 0.0, err), None, 0, meta)]


# ------------------------------------------------------------------------------------------------
# apVisit
# ------------------------------------------------------------------------------------------------
def identify_apvisit(probe) -> bool:
    h0, h1, h3, h4 = probe.hdu(0), probe.hdu(1), probe.hdu(3), probe.hdu(4)
    if not (_is_image(h1, True) and _is_image(h3, False) and _is_image(h4, True)):
        return False
    if len(h1.shape) != 2 or h1.shape != h4.shape or h1.shape != h3.shape or h1.shape[0] not in (2, 3):
        return False
    return any(k in h0.header for k in ("FIBERID", "MJD5", "JD-MID")) or probe.name.startswith(("apVisit", "asVisit"))


def read_apvisit(path, *, visits: bool = False, reject_bits=APOGEE_REJECT_BITS):
    """Read an apVisit file: the three chips joined in increasing wavelength, observed frame.

    ``meta["rv"]`` is the barycentric velocity VHELIO, ``meta["vrel"]`` the velocity relative to the
    observer (VRAD/VREL) and ``meta["bc"]`` the barycentric correction, all km/s.
    """
    reject = pixmask_value(reject_bits)
    with open_fits(path) as hdul:
        h0 = hdul[0].header
        flux, err, bitmask, wave = (np.asarray(hdul[k].data) for k in (1, 2, 3, 4))
    if not (flux.shape == err.shape == bitmask.shape == wave.shape) or flux.ndim != 2:
        raise FileFormatError(f"{path}: apVisit flux {flux.shape}, error {err.shape}, bitmask {bitmask.shape} and "
                              f"wavelength {wave.shape} must be equal (chips, pixels) arrays")
    wave = wave.astype(np.float64).ravel()
    order = np.argsort(wave, kind="stable")
    wavelength = wave[order]
    if not np.all(np.diff(wavelength) > 0):
        raise FileFormatError(f"{path}: apVisit chip wavelengths overlap or repeat; cannot join the chips")
    _check_range(wavelength, path, "apVisit")
    chips = sorted((float(w.min()), float(w.max())) for w in np.asarray(wave).reshape(flux.shape))
    mjd = as_int(hget(h0, "MJD5", "MJD"))
    jd = as_float(hget(h0, "JD-MID", "JD"))
    meta = {
        "id": _apogee_id(h0, path),
        "kind": "visit",
        "snr": as_float(hget(h0, "SNR")),
        "rv": as_float(hget(h0, "VHELIO")),
        "vrel": as_float(hget(h0, "VRAD", "VREL")),
        "rv_err": as_float(hget(h0, "VRADERR", "VRELERR")),
        "bc": as_float(hget(h0, "BC")),
        "mjd": mjd if mjd is not None else (None if jd is None else jd - 2400000.5),
        "jd": jd,
        "fiber": as_int(hget(h0, "FIBERID", "FIBER")),
        "plate": as_str(hget(h0, "PLATE", "PLATEID", "CONFIGID", default="")) or None,
        "telescope": as_str(hget(h0, "TELESCOP", default="")) or None,
        "observatory": _observatory(h0, path),
        "ra": as_float(hget(h0, "RA")),
        "dec": as_float(hget(h0, "DEC")),
        "starflag": as_int(hget(h0, "STARFLAG")),
        "chips": chips,
        "frame": "observed",
        "normalized": False,
    }
    return [_make(path, wavelength, flux.ravel()[order], err.ravel()[order], bitmask.ravel()[order], reject, meta)]


register_format("apstar", identify_apstar, read_apstar, "APOGEE apStar/asStar combined and visit spectra (DR14-DR17, SDSS-V)")
register_format("aspcapstar", identify_aspcapstar, read_aspcapstar,
                "APOGEE aspcapStar normalised spectra (7214, 7514 or 8575 px)")
register_format("apvisit", identify_apvisit, read_apvisit, "APOGEE apVisit/asVisit single-visit spectra (3 chips)")
