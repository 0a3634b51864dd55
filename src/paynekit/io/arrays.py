"""Plain array bundles (npz or HDF5): wavelength, flux, ivar [, mask, ids].

paynekit's own layout (what :func:`write_arrays` writes)
---------------------------------------------------------
``wavelength`` (P,) Angstrom; ``flux`` (P,) or (N, P); ``ivar`` like flux; optional ``mask`` like
flux (True = bad pixel), ``ids`` (N,), ``snr`` (N,), ``wavelength_medium`` ('vacuum' or 'air',
default vacuum) and ``normalized`` (bool). In HDF5 these are datasets at the top level.

Other bundles are read through the aliases below (checked in this order), which cover the shared
APOGEE npz files: flux from ``flux``, ``spectrum``, ``spectra``, ``normalized_flux``; ivar from
``ivar``, ``inverse_variance``, or 1/err^2 from ``flux_err``, ``flux_error``, ``spec_err``, ``spec_errs``,
``normalized_error``, ``error``, ``err``, ``sigma``; a mask from ``mask``/``bad_pixel_mask`` (True = bad)
or ``good_pixel_mask`` (True = good); wavelength from ``wavelength``, ``wave``, ``wl``, ``lambda``,
``wavelength_A``, ``wavelength_nm`` (x 10) or ``wavelength_air_A`` (air). A bundle without wavelengths
is accepted only when its pixel count is one of APOGEE's standard grids (7214: The Payne/ASPCAP DR12
grid; 7514: the DR13+ ASPCAP grid; 8575: apStar), and ``meta["wavelength_source"]`` says the grid was assumed. Keys named
``normalized_*`` mark the spectra as continuum-normalised. ``snr``/``snrs``, ``vhelio(s)``/``rv``,
``mjd``/``mjds`` and ``hjd``/``hjds`` (per spectrum) reach meta as ``snr``, ``rv``, ``mjd``, ``hjd``.

Ids: the ``ids`` (or ``id``, ``apogee_id``, ``object_id``) array; otherwise a 2MASS-style APOGEE id in
the file name (else the file stem), with ``:i`` appended when the bundle holds several spectra.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, InputError
from ..spectra import Spectrum, SpectrumBatch
from ..wavelength import APSTAR_N_PIXELS, air_to_vacuum, apstar_wavelength, payne_apogee_wavelength
from ._fits import check_file, finish_pixels, id_from_filename, ivar_from_error, one_line
from .registry import register_format

log = logging.getLogger(__name__)

FLUX_KEYS = ("flux", "spectrum", "spectra", "normalized_flux")
IVAR_KEYS = ("ivar", "inverse_variance")
ERROR_KEYS = ("flux_err", "flux_error", "spec_err", "spec_errs", "normalized_error", "error", "err", "sigma")
BAD_MASK_KEYS = ("mask", "bad_pixel_mask")
GOOD_MASK_KEYS = ("good_pixel_mask",)
#: wavelength keys -> (factor to Angstrom, medium)
WAVELENGTH_KEYS = {
    "wavelength": (1.0, None), "wave": (1.0, None), "wl": (1.0, None), "lambda": (1.0, None),
    "wavelength_a": (1.0, None), "wavelength_nm": (10.0, None), "wavelength_air_a": (1.0, "air"),
}  # fmt: skip
ID_KEYS = ("ids", "id", "apogee_id", "object_id")
_PER_SPECTRUM = {"snr": ("snr", "snrs"), "rv": ("vhelio", "vhelios", "rv"), "mjd": ("mjd", "mjds"),
                 "hjd": ("hjd", "hjds")}


def known_grid(n_pixels: int):
    """(wavelength, description) of the standard APOGEE grid with ``n_pixels`` pixels, or None."""
    if n_pixels == 7214:
        return payne_apogee_wavelength(), "assumed: The Payne / ASPCAP DR12 7214-pixel APOGEE grid (vacuum)"
    if n_pixels == 7514:
        from .apogee import aspcap_dr13_wavelength

        return aspcap_dr13_wavelength(), "assumed: the DR13+ ASPCAP 7514-pixel APOGEE grid (vacuum)"
    if n_pixels == APSTAR_N_PIXELS:
        return apstar_wavelength(), "assumed: the 8575-pixel apStar grid (vacuum)"
    return None


def _load(path: Path, kind: str) -> dict:
    """All arrays of an npz / top-level datasets of an HDF5 file (keys lower-cased)."""
    if kind == "npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k.lower(): np.asarray(data[k]) for k in data.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise FileFormatError(f"{path}: unreadable npz archive ({one_line(exc)})") from None
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            out = {k.lower(): np.asarray(fh[k][()]) for k in fh if isinstance(fh[k], h5py.Dataset)}
            for k, v in fh.attrs.items():
                out.setdefault(k.lower(), np.asarray(v))
            return out
    except OSError as exc:
        raise FileFormatError(f"{path}: unreadable HDF5 file ({one_line(exc)})") from None


def _kind(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK"):
        return "npz"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    raise FileFormatError(f"{path}: neither an npz archive nor an HDF5 file")


def identify_arrays(probe) -> bool:
    return probe.kind in ("npz", "hdf5") and any(k.lower() in FLUX_KEYS for k in probe.keys)


def _first(data, keys):
    return next(((k, data[k]) for k in keys if k in data), (None, None))


def _text(value) -> str:
    v = np.asarray(value)
    v = v.item() if v.ndim == 0 else v.ravel()[0]
    return v.decode() if isinstance(v, bytes) else str(v)


def read_arrays(path, *, visits: bool = False):
    """Read an npz/HDF5 bundle of spectra (layout and accepted key names in the module docstring)."""
    path = check_file(path)
    data = _load(path, _kind(path))
    fkey, flux = _first(data, FLUX_KEYS)
    if flux is None:
        raise FileFormatError(f"{path}: no flux array (one of {', '.join(FLUX_KEYS)}); arrays present: "
                              f"{', '.join(sorted(data)) or 'none'}")
    flux = np.asarray(flux, dtype=np.float64)
    if flux.ndim not in (1, 2) or flux.shape[-1] < 2:
        raise FileFormatError(f"{path}: {fkey} has shape {flux.shape}; expected (P,) or (N, P)")
    single = flux.ndim == 1
    flux2 = np.atleast_2d(flux)
    n, p = flux2.shape

    ikey, ivar = _first(data, IVAR_KEYS)
    if ivar is None:
        ekey, err = _first(data, ERROR_KEYS)
        if err is None:
            raise FileFormatError(f"{path}: no inverse variance ({', '.join(IVAR_KEYS)}) or error array "
                                  f"({', '.join(ERROR_KEYS)}) next to {fkey}")
        ikey, ivar = ekey, ivar_from_error(err)
    ivar2 = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
    if ivar2.shape != flux2.shape:
        raise FileFormatError(f"{path}: {ikey} has shape {np.shape(ivar)} but {fkey} has {flux.shape}")

    bad = np.zeros(flux2.shape, bool)
    mkey, m = _first(data, BAD_MASK_KEYS)
    if m is None:
        mkey, m = _first(data, GOOD_MASK_KEYS)
        m = None if m is None else ~np.asarray(m, dtype=bool)
    if m is not None:
        m2 = np.atleast_2d(np.asarray(m, dtype=bool))
        if m2.shape == (1, p):
            m2 = np.repeat(m2, n, axis=0)
        if m2.shape != flux2.shape:
            raise FileFormatError(f"{path}: {mkey} has shape {np.shape(m)} but {fkey} has {flux.shape}")
        bad |= m2

    medium = _text(data["wavelength_medium"]) if "wavelength_medium" in data else None
    wkey = next((k for k in WAVELENGTH_KEYS if k in data), None)
    if wkey is not None:
        factor, key_medium = WAVELENGTH_KEYS[wkey]
        wavelength = np.asarray(data[wkey], dtype=np.float64).ravel() * factor
        medium = medium or key_medium or "vacuum"
        source = f"file ({wkey})"
    else:
        grid = known_grid(p)
        if grid is None:
            raise FileFormatError(f"{path}: no wavelength array ({', '.join(WAVELENGTH_KEYS)}) and its {p} pixels "
                                  "match no standard grid (7214, 7514 or 8575 APOGEE pixels)")
        wavelength, source = grid
        medium = medium or "vacuum"
        log.info("%s: %s", path, source)
    if medium not in ("vacuum", "air"):
        raise FileFormatError(f"{path}: wavelength_medium is {medium!r}; expected 'vacuum' or 'air'")
    if wavelength.size != p:
        raise FileFormatError(f"{path}: wavelength has {wavelength.size} values but {fkey} has {p} pixels")
    if medium == "air":
        wavelength = air_to_vacuum(wavelength)
    if not np.all(np.isfinite(wavelength)) or not np.all(np.diff(wavelength) > 0):
        raise FileFormatError(f"{path}: wavelength is not finite and strictly increasing")

    _, ids = _first(data, ID_KEYS)
    if ids is not None:
        ids = [x.decode() if isinstance(x, bytes) else str(x) for x in np.atleast_1d(ids).ravel()]
        if len(ids) != n:
            raise FileFormatError(f"{path}: {len(ids)} ids for {n} spectra")
    else:
        base = id_from_filename(path)
        ids = [base] if n == 1 else [f"{base}:{i}" for i in range(n)]

    per_spectrum = {}
    for name, keys in _PER_SPECTRUM.items():
        _, v = _first(data, keys)
        if v is not None and np.size(v) == n and np.asarray(v).dtype.kind in "fiu":
            per_spectrum[name] = np.asarray(v, dtype=np.float64).ravel()
    normalized = bool(np.asarray(data["normalized"]).item()) if "normalized" in data else (
        fkey.startswith("normalized") or None)

    out = []
    for i in range(n):
        f, iv, mask = finish_pixels(flux2[i], ivar2[i], bad[i])
        meta = {"id": ids[i], "file": str(path), "wavelength_medium": "vacuum", "wavelength_source": source,
                "normalized": normalized, "frame": None}
        if not single:
            meta["index"] = i
        for name, v in per_spectrum.items():
            meta[name] = float(v[i]) if np.isfinite(v[i]) else None
        if "snr" not in meta:
            good = iv > 0
            meta["snr"] = float(np.median(f[good] * np.sqrt(iv[good]))) if good.any() else None
        out.append(Spectrum(wavelength, f, iv, mask, meta))
    if visits:
        log.debug("%s: array bundles have no visit structure; returning all spectra", path)
    return out


def write_arrays(path, spectra, *, overwrite: bool = False) -> Path:
    """Write spectra on one grid (a SpectrumBatch, or Spectrum objects sharing a grid) as a bundle.

    The format follows the suffix: ``.npz`` or ``.h5``/``.hdf5``. Writes wavelength, flux, ivar,
    mask, ids, snr (NaN where unknown), wavelength_medium and normalized (if every spectrum says so).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists; pass overwrite=True to replace it")
    if isinstance(spectra, Spectrum):
        spectra = [spectra]
    batch = spectra if isinstance(spectra, SpectrumBatch) else SpectrumBatch.from_spectra(list(spectra))
    mediums = {m.get("wavelength_medium", "vacuum") for m in batch.meta}
    if len(mediums) > 1:
        raise InputError(f"spectra mix wavelength media {sorted(mediums)}; resample them onto one grid first")
    snr = np.array([np.nan if m.get("snr") is None else float(m["snr"]) for m in batch.meta])
    arrays = {
        "wavelength": batch.wavelength, "flux": batch.flux, "ivar": batch.ivar, "mask": batch.mask,
        "ids": np.array(batch.ids, dtype=str), "snr": snr, "wavelength_medium": np.array(mediums.pop()),
    }  # fmt: skip
    flags = [m.get("normalized") for m in batch.meta]
    if all(f is not None for f in flags):
        arrays["normalized"] = np.array(all(flags))
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
    elif suffix in (".h5", ".hdf5", ".hdf"):
        import h5py

        with h5py.File(path, "w") as fh:
            for k, v in arrays.items():
                if v.dtype.kind == "U":
                    fh.create_dataset(k, data=np.char.encode(v, "utf-8"))
                else:
                    fh.create_dataset(k, data=v)
    else:
        raise InputError(f"{path}: suffix must be .npz, .h5 or .hdf5")
    return path


register_format("arrays", identify_arrays, read_arrays, "npz / HDF5 bundles of wavelength, flux, ivar [, mask, ids]")
