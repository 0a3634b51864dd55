"""LAMOST low-resolution (LRS) and medium-resolution (MRS) spectra.

Layouts
-------
LRS, DR1-DR7 (``spec-*.fits[.gz]``)
    the primary HDU is a (5, N) float image: rows flux, ivar, wavelength (vacuum Angstrom,
    log-linear, heliocentric frame), and_mask, or_mask. Header: OBSID, DESIG, FIBERID, MJD, Z,
    SNRU..SNRZ, VACUUM, HELIO.
LRS, DR8 and later
    the same five arrays as columns (FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK) of a one-row table in HDU1.
MRS (``med-*.fits``)
    HDU1/2 ``COADD_B`` / ``COADD_R`` tables (FLUX, IVAR, LOGLAM, ANDMASK, ORMASK), followed by one
    table per exposure and arm (``B-<lmjm>``, ``R-<lmjm>``: FLUX, IVAR, LOGLAM, PIXMASK). The two
    arms (about 4950-5350 and 6300-6800 A) are joined into one spectrum with a gap between them.

Which pixels get ivar = 0: ivar <= 0 or non-finite values, and any pixel with a nonzero and_mask
(coadds) or pixmask (MRS exposures). Every LAMOST mask bit (BADCCD, BADPROFILE, NOSKY, BRIGHTSKY,
BADCENTER, NODATA) marks a pixel that was bad in every exposure, so all of them are rejected by
default (``reject_mask`` selects fewer).

meta: ``id`` is the OBSID (LAMOST's unique spectrum number), ``designation`` the LAMOST J-name;
``snr`` is the r-band S/N for LRS and the median per-pixel S/N of the joined arms for MRS (arm values
in ``snr_b``/``snr_r``); ``rv`` = c * Z when the header has a redshift.
"""

from __future__ import annotations

import logging
import re

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
    median_snr,
    open_fits,
)
from .registry import register_format

log = logging.getLogger(__name__)

#: Reject every LAMOST mask bit by default.
LAMOST_REJECT_MASK = 0xFFFF


def _is_lamost_header(header) -> bool:
    telescope = as_str(hget(header, "TELESCOP", default="")).upper()
    return telescope.startswith("LAMOST") or "LAMOST" in as_str(hget(header, "ORIGIN", "AUTHOR", default="")).upper()


def identify_lamost_lrs(probe) -> bool:
    h0 = probe.hdu(0)
    if h0 is None:
        return False
    if h0.kind == "image" and len(h0.shape) == 2 and h0.shape[0] in (3, 4, 5) and h0.bitpix < 0:
        return _is_lamost_header(h0.header) or "OBSID" in h0.header
    h1 = probe.hdu(1)
    return (h1 is not None and h1.kind == "table" and h1.has_columns("flux", "ivar", "wavelength")
            and _is_lamost_header(h0.header))


def identify_lamost_mrs(probe) -> bool:
    for index in (1, 2):
        h = probe.hdu(index)
        if h is not None and h.kind == "table" and h.name in ("COADD_B", "COADD_R") and h.has_columns(
                "flux", "ivar", "loglam"):
            return True
    return False


def _common_meta(h0, path) -> dict:
    obsid = hget(h0, "OBSID")
    z = as_float(hget(h0, "Z"))
    return {
        "id": str(as_int(obsid)) if as_int(obsid) is not None else id_from_filename(path),
        "designation": as_str(hget(h0, "DESIG", default="")) or None,
        "objname": as_str(hget(h0, "OBJNAME", default="")) or None,
        "mjd": as_int(hget(h0, "MJD")),
        "lmjd": as_int(hget(h0, "LMJD")),
        "planid": as_str(hget(h0, "PLANID", default="")) or None,
        "spid": as_int(hget(h0, "SPID")),
        "fiber": as_int(hget(h0, "FIBERID")),
        "ra": as_float(hget(h0, "RA")),
        "dec": as_float(hget(h0, "DEC")),
        "telescope": "LAMOST",
        "class": as_str(hget(h0, "CLASS", default="")) or None,
        "subclass": as_str(hget(h0, "SUBCLASS", default="")) or None,
        "z": z,
        "rv": None if z is None else C_KMS * z,
        "frame": "heliocentric" if hget(h0, "HELIO", default=True) else "observed",
        "normalized": False,
        "wavelength_medium": "vacuum",
        "file": str(path),
    }


def _to_vacuum(wavelength, header):
    return air_to_vacuum(wavelength) if hget(header, "VACUUM", default=True) is False else wavelength


def _check_mask(reject_mask):
    if not isinstance(reject_mask, (int, np.integer)) or reject_mask < 0:
        raise InputError(f"reject_mask must be a non-negative integer bit mask, got {reject_mask!r}")
    return int(reject_mask)


def read_lamost_lrs(path, *, visits: bool = False, reject_mask: int = LAMOST_REJECT_MASK):
    """Read a LAMOST low-resolution spectrum (5 x N image, or the DR8+ table layout)."""
    reject = _check_mask(reject_mask)
    with open_fits(path) as hdul:
        h0 = hdul[0].header
        if hdul[0].data is not None and np.ndim(hdul[0].data) == 2:
            image = np.asarray(hdul[0].data, dtype=np.float64)
            if image.shape[0] < 3:
                raise FileFormatError(f"{path}: LAMOST LRS image has {image.shape[0]} rows; expected 5 "
                                      "(flux, ivar, wavelength, and_mask, or_mask)")
            flux, ivar, wave = image[0], image[1], image[2]
            and_mask = image[3].astype(np.int64) if image.shape[0] > 3 else np.zeros(flux.shape, np.int64)
        else:
            table = hdul[1].data
            cols = {c.upper(): c for c in table.columns.names}
            missing = [c for c in ("FLUX", "IVAR", "WAVELENGTH") if c not in cols]
            if missing:
                raise FileFormatError(f"{path}: LAMOST LRS table lacks columns {missing}")
            flux = np.asarray(table[cols["FLUX"]][0], dtype=np.float64)
            ivar = np.asarray(table[cols["IVAR"]][0], dtype=np.float64)
            wave = np.asarray(table[cols["WAVELENGTH"]][0], dtype=np.float64)
            and_mask = (np.asarray(table[cols["ANDMASK"]][0]).astype(np.int64) if "ANDMASK" in cols
                        else np.zeros(flux.shape, np.int64))
    if np.any(wave <= 0) or not np.all(np.isfinite(wave)):
        raise FileFormatError(f"{path}: LAMOST wavelength row has non-positive or non-finite values")
    wavelength = _to_vacuum(loglam_wavelength(np.log10(wave), path, "wavelength",
                                              start=as_float(hget(h0, "COEFF0", "CRVAL1")),
                                              step=as_float(hget(h0, "COEFF1", "CD1_1"))), h0)
    flux, ivar, mask = finish_pixels(flux, ivar, (and_mask & reject) != 0)
    meta = _common_meta(h0, path)
    bands = {b: as_float(hget(h0, f"SNR{b.upper()}")) for b in "ugriz"}
    meta.update(kind="coadd", snr_bands=bands, snr=bands["r"] if bands["r"] is not None else median_snr(flux, ivar),
                and_mask=and_mask)
    if visits:
        log.debug("%s: LAMOST LRS files hold one coadded spectrum; returning it", path)
    return [Spectrum(wavelength, flux, ivar, mask, meta)]


def _arm(table, path, name, mask_col):
    cols = {c.upper(): c for c in table.columns.names}
    missing = [c for c in ("FLUX", "IVAR", "LOGLAM") if c not in cols]
    if missing:
        raise FileFormatError(f"{path}: LAMOST MRS table {name} lacks columns {missing}")
    loglam = np.asarray(table[cols["LOGLAM"]], dtype=np.float64)
    order = np.argsort(loglam, kind="stable")  # exposure tables of the red arm run backwards
    flux = np.asarray(table[cols["FLUX"]], dtype=np.float64)[order]
    ivar = np.asarray(table[cols["IVAR"]], dtype=np.float64)[order]
    pix = (np.asarray(table[cols[mask_col]]).astype(np.int64)[order] if mask_col in cols
           else np.zeros(flux.shape, np.int64))
    return loglam_wavelength(loglam[order], path, f"{name} LOGLAM"), flux, ivar, pix


def _arm_letter(name: str) -> str:
    return "B" if name.startswith("B") or name.endswith("_B") else "R"


def _join(arms, path, what):
    wl = np.concatenate([a[0] for a in arms])
    if not np.all(np.diff(wl) > 0):
        raise FileFormatError(f"{path}: LAMOST MRS {what} arms overlap in wavelength; cannot join them")
    return wl, *(np.concatenate([a[k] for a in arms]) for k in (1, 2, 3))


def read_lamost_mrs(path, *, visits: bool = False, reject_mask: int = LAMOST_REJECT_MASK):
    """Read a LAMOST MRS file: blue and red arms joined; with ``visits`` one spectrum per exposure."""
    reject = _check_mask(reject_mask)
    with open_fits(path) as hdul:
        h0 = hdul[0].header
        tables = {h.name.upper(): h for h in hdul[1:] if getattr(h, "columns", None) is not None}
        if not visits:
            groups = {"coadd": [(n, tables[n]) for n in ("COADD_B", "COADD_R") if n in tables]}
            mask_col = "ANDMASK"
        else:
            groups = {}
            for name, hdu in tables.items():
                m = re.fullmatch(r"([BR])-(\d+)", name)
                if m:
                    groups.setdefault(m.group(2), []).append((name, hdu))
            mask_col = "PIXMASK"
            if not groups:
                raise FileFormatError(f"{path}: no per-exposure tables (B-<lmjm>, R-<lmjm>) in this MRS file")
        read = {key: [(_arm_letter(n), _arm(h.data, path, n, mask_col), as_float(h.header.get("SNR")),
                       as_float(h.header.get("EXPTIME"))) for n, h in arms] for key, arms in groups.items()}
    out = []
    for key, arms in sorted(read.items()):
        arms = sorted(arms, key=lambda a: a[1][0][0])
        wl, flux, ivar, pix = _join([a[1] for a in arms], path, key)
        wl = _to_vacuum(wl, h0)
        flux, ivar, mask = finish_pixels(flux, ivar, (pix & reject) != 0)
        meta = _common_meta(h0, path)
        snr_arm = {letter: snr for letter, _, snr, _ in arms}
        meta.update(snr=median_snr(flux, ivar), snr_b=snr_arm.get("B"), snr_r=snr_arm.get("R"),
                    arms=[(float(a[1][0][0]), float(a[1][0][-1])) for a in arms])
        if key == "coadd":
            meta.update(kind="coadd", and_mask=pix)
        else:
            lmjm = int(key)
            meta.update(kind="visit", visit=lmjm, lmjm=lmjm, mjd=lmjm / 1440.0 - 8.0 / 24.0,
                        exptime=arms[0][3], pixmask=pix)
        out.append(Spectrum(wl, flux, ivar, mask, meta))
    if not out:
        raise FileFormatError(f"{path}: no COADD_B/COADD_R tables in this MRS file")
    return out


register_format("lamost_mrs", identify_lamost_mrs, read_lamost_mrs, "LAMOST medium-resolution spectra (MRS)")
register_format("lamost_lrs", identify_lamost_lrs, read_lamost_lrs, "LAMOST low-resolution spectra (LRS)")
