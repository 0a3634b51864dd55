"""Gaia DR3 XP sampled spectra in a FITS table, one row per star.

Gaia's sampled BP/RP spectra (GaiaXPy's default sampling) have 343 pixels at 336, 338, ..., 1020 nm;
tables store them as vector columns ``flux`` and ``flux_error`` without a wavelength column, so the
grid is :data:`GAIA_XP_WAVELENGTH` (3360-10200 A in 20 A steps). paynekit labels it vacuum: the
air/vacuum difference (< 3 A) is a seventh of a pixel and far below XP's resolution (R ~ 30-100).

Any other column (ids, photometry, reference labels and errors such as APOGEE's teff/logg/fe_h/
alpha_m) is returned as a separate table by :func:`read_gaiaxp_table`; :func:`read_gaiaxp` puts
the labels in each spectrum's ``meta["reference_labels"]`` (NaN where the table has none).

meta: ``id`` is the Gaia source id when the table has one (else the first id-like column),
``snr`` the table's ``snr`` column if present (in the shared table it is median(flux/flux_error))
else that median computed here; ``apogee_id``, ``row`` and ``flux_scale`` (``medflux``) where present.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import FileFormatError
from ..spectra import Spectrum, SpectrumBatch
from ._fits import finish_pixels, ivar_from_error, open_fits
from .registry import register_format

log = logging.getLogger(__name__)

#: Gaia XP sampled-spectrum grid: 336-1020 nm in 2 nm steps, in Angstrom.
GAIA_XP_WAVELENGTH = np.arange(3360.0, 10200.0 + 1.0, 20.0)
GAIA_XP_N_PIXELS = GAIA_XP_WAVELENGTH.size  # 343

_SOURCE_ID_COLUMNS = ("source_id", "gaia_dr3_source_id", "gaiadr3_source_id", "gaiaedr3_source_id", "gaia_source_id")
_OTHER_ID_COLUMNS = ("apogee_id", "obj_id", "id", "name")
#: Column names treated as stellar labels (value and, with suffix _err, uncertainty).
_LABEL_COLUMNS = ("teff", "logg", "fe_h", "m_h", "alpha_m", "alpha_fe", "mh", "feh")


def _table_hdu_index(probe) -> int | None:
    for index in (1, 2):
        h = probe.hdu(index)
        if h is None:
            return None
        cols = h.columns
        if (h.kind == "table" and cols.get("flux", ("", 0))[1] == GAIA_XP_N_PIXELS
                and cols.get("flux_error", ("", 0))[1] == GAIA_XP_N_PIXELS):
            return index
    return None


def identify_gaiaxp(probe) -> bool:
    return _table_hdu_index(probe) is not None


def read_gaiaxp_table(path):
    """Read the whole table: a SpectrumBatch (N, 343) and an astropy Table of the other columns.

    The batch's ``ids`` and per-star ``meta`` are those :func:`read_gaiaxp` gives each spectrum.
    """
    from astropy.table import Table

    with open_fits(path) as hdul:
        index = next((i for i, h in enumerate(hdul) if getattr(h, "columns", None) is not None
                      and {"flux", "flux_error"} <= {c.lower() for c in h.columns.names}), None)
        if index is None:
            raise FileFormatError(f"{path}: no table with flux and flux_error columns (Gaia XP sampled spectra)")
        data = hdul[index].data
        names = {c.lower(): c for c in data.columns.names}
        flux = np.asarray(data[names["flux"]], dtype=np.float64)
        err = np.asarray(data[names["flux_error"]], dtype=np.float64)
        other = Table({c: np.asarray(data[c]) for c in data.columns.names
                       if c.lower() not in ("flux", "flux_error")})
    if flux.ndim != 2 or flux.shape[1] != GAIA_XP_N_PIXELS or err.shape != flux.shape:
        raise FileFormatError(f"{path}: flux {flux.shape} and flux_error {err.shape} must be (N, "
                              f"{GAIA_XP_N_PIXELS}) arrays of Gaia XP sampled spectra")
    n = flux.shape[0]
    lower = {c.lower(): c for c in other.colnames}

    def col(name):
        return np.asarray(other[lower[name]]) if name in lower else None

    source_col = next((c for c in _SOURCE_ID_COLUMNS if c in lower), None)
    other_id_col = next((c for c in _OTHER_ID_COLUMNS if c in lower), None)
    if source_col is not None:
        ids = [str(int(v)) for v in col(source_col)]
    elif other_id_col is not None:
        ids = [str(v).strip() for v in col(other_id_col)]
    else:
        ids = [f"{i}" for i in range(n)]
    ivar = ivar_from_error(err)
    flux, ivar, mask = finish_pixels(flux, ivar, np.zeros(flux.shape, bool))
    snr_col = col("snr")
    if snr_col is None:
        with np.errstate(invalid="ignore", divide="ignore"):
            snr_col = np.nanmedian(np.where(ivar > 0, flux * np.sqrt(ivar), np.nan), axis=1)
    labels = [c for c in _LABEL_COLUMNS if c in lower]
    label_values = {c: np.asarray(col(c), dtype=np.float64) for c in labels}
    label_errors = {c: np.asarray(col(c + "_err"), dtype=np.float64) for c in labels if c + "_err" in lower}
    apogee = col("apogee_id")
    medflux = col("medflux")
    metas = []
    for i in range(n):
        meta = {
            "id": ids[i],
            "row": i,
            "snr": float(snr_col[i]),
            "file": str(path),
            "frame": "observed",
            "normalized": False,
            "wavelength_medium": "vacuum",
            "reference_labels": {c: float(v[i]) for c, v in label_values.items()},
        }
        if label_errors:
            meta["reference_label_errors"] = {c: float(v[i]) for c, v in label_errors.items()}
        if source_col is not None:
            meta["gaia_source_id"] = ids[i]
        if apogee is not None:
            meta["apogee_id"] = str(apogee[i]).strip()
        if medflux is not None:
            meta["flux_scale"] = float(medflux[i])
        metas.append(meta)
    batch = SpectrumBatch(GAIA_XP_WAVELENGTH, flux, ivar, mask, ids, metas)
    return batch, other


def read_gaiaxp(path, *, visits: bool = False):
    """Read a Gaia XP sampled-spectra table as one Spectrum per row (see :func:`read_gaiaxp_table`)."""
    batch, _ = read_gaiaxp_table(path)
    return [Spectrum(batch.wavelength, batch.flux[i], batch.ivar[i], batch.mask[i], batch.meta[i])
            for i in range(len(batch))]


register_format("gaiaxp", identify_gaiaxp, read_gaiaxp, "Gaia DR3 XP sampled spectra table (343 px per row)")
