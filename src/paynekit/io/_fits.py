"""Helpers shared by the survey readers: checked FITS opening, header look-ups, log-lambda grids.

Every problem with a file becomes a :class:`~paynekit.errors.FileFormatError` whose message is one
line that starts with the file name.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

import numpy as np

from ..errors import FileFormatError

log = logging.getLogger(__name__)

#: Speed of light in km/s (for redshift -> radial velocity).
C_KMS = 299792.458

#: Warning texts from astropy that mean the file is cut short or its structure is broken.
_BROKEN_FILE_HINTS = ("truncated", "not multiple of 2880", "not a multiple of 2880", "extra bytes after the last HDU",
                      "corrupt", "end-of-stream", "END card")

_TWOMASS_ID = re.compile(r"2M\d{8}[+-]\d{7}")


def one_line(text) -> str:
    """``text`` (an exception or string) as a single line."""
    lines = [s.strip() for s in str(text).splitlines() if s.strip()]
    return " ".join(lines) if lines else type(text).__name__


def check_file(path) -> Path:
    """The path as a Path, after checking that it is an existing, non-empty regular file."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file")
    if not path.is_file():
        raise FileFormatError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise FileFormatError(f"{path}: the file is empty (0 bytes)")
    return path


def _is_broken(message: str) -> bool:
    return any(h.lower() in message.lower() for h in _BROKEN_FILE_HINTS)


def _is_harmless(w) -> bool:
    from astropy.io.fits.verify import VerifyWarning

    return issubclass(w.category, VerifyWarning) and not _is_broken(str(w.message))


@contextlib.contextmanager
def checked_warnings(path):
    """Record warnings raised while reading ``path``; turn truncation warnings into FileFormatError.

    Harmless header-card warnings (a non-standard card such as ``AKWISE = 'NAN'`` in DR13 files)
    are logged at debug level; any other warning is re-emitted after the block. The warning filters
    are restored on exit (``warnings.catch_warnings``), so call this from one thread at a time.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except (OSError, ValueError, TypeError, IndexError, KeyError, EOFError):
            broken = [str(w.message) for w in caught if _is_broken(str(w.message))]
            if broken:
                raise FileFormatError(f"{path}: the FITS file is truncated or corrupt ({one_line(broken[0])})") from None
            raise
    broken = [str(w.message) for w in caught if _is_broken(str(w.message))]
    if broken:
        raise FileFormatError(f"{path}: the FITS file is truncated or corrupt ({one_line(broken[0])})")
    for w in caught:
        if _is_harmless(w):
            log.debug("%s: %s", path, one_line(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def open_fits(path):
    """Open a FITS file for reading (all headers checked for truncation); yields the HDUList.

    Arrays read inside the block are read into memory (no memory map), so they outlive the file.
    """
    from astropy.io import fits

    path = check_file(path)
    with checked_warnings(path):
        try:
            hdul = fits.open(path, memmap=False, lazy_load_hdus=True)
        except (OSError, ValueError, EOFError, IndexError) as exc:
            raise FileFormatError(f"{path}: not a readable FITS file ({one_line(exc)})") from None
        try:
            try:
                hdul.readall()
            except (OSError, ValueError, EOFError, IndexError) as exc:
                raise FileFormatError(f"{path}: the FITS file is truncated or corrupt ({one_line(exc)})") from None
            yield hdul
        finally:
            hdul.close()


def hget(header, *keys, default=None):
    """The value of the first of ``keys`` present in ``header`` (None and blank strings skipped)."""
    if header is None:
        return default
    for key in keys:
        if key in header:
            value = header[key]
            if isinstance(value, str):
                value = value.strip()
                if not value:
                    continue
            if value is None:
                continue
            return value
    return default


def as_float(value, default=None):
    """``value`` as a Python float, or ``default`` if it is missing, non-numeric or a -9999 sentinel."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    if not np.isfinite(out) or out <= -9999.0:
        return default
    return out


def as_int(value, default=None):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def as_str(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).strip()


def id_from_filename(path) -> str:
    """A 2MASS-style APOGEE id found in the file name, else the file name without extensions."""
    name = Path(path).name
    match = _TWOMASS_ID.search(name)
    if match:
        return match.group(0)
    for suffix in (".gz", ".bz2", ".fz"):
        name = name.removesuffix(suffix)
    return name.rsplit(".", 1)[0] if "." in name else name


def loglam_wavelength(loglam, path, what="loglam", start=None, step=None) -> np.ndarray:
    """Wavelengths (float64) from log10(lambda) values, rebuilt exactly when the grid is log-linear.

    Survey tables store log10(lambda) in float32, whose rounding (~2e-7 dex, a few mA) makes
    successive steps jitter. If ``start + step * i`` (header values such as BOSS's COEFF0/COEFF1)
    or else a straight line fitted in pixel index reproduces the values to a tenth of a step, that
    exact line is used; otherwise the stored values are used as they are.
    """
    ll = np.asarray(loglam, dtype=np.float64).ravel()
    if ll.size < 2 or not np.all(np.isfinite(ll)):
        raise FileFormatError(f"{path}: {what} has {ll.size} values, not all finite")
    idx = np.arange(ll.size, dtype=np.float64)
    candidates = []
    if start is not None and step:
        candidates.append((float(step), float(start)))
    candidates.append(tuple(np.polyfit(idx, ll, 1)))
    for slope, intercept in candidates:
        fit = intercept + slope * idx
        if slope != 0 and np.max(np.abs(fit - ll)) < 0.1 * abs(slope):
            return 10.0**fit
    return 10.0**ll


def linear_header_wavelength(header, n, path) -> np.ndarray | None:
    """Wavelengths from CRVAL1/CDELT1 (or CD1_1)/CRPIX1 with log-linear DC-FLAG/CTYPE1, or None."""
    crval = as_float(hget(header, "CRVAL1"))
    cdelt = as_float(hget(header, "CDELT1", "CD1_1"))
    if crval is None or cdelt is None or cdelt == 0:
        return None
    crpix = as_float(hget(header, "CRPIX1"), 1.0)
    x = crval + cdelt * (np.arange(n, dtype=np.float64) + 1.0 - crpix)
    ctype = str(hget(header, "CTYPE1", default="")).upper()
    log_flag = as_int(hget(header, "DC-FLAG"), 0) == 1 or "LOG" in ctype
    if log_flag or crval < 6:  # a log10 start value below 6 cannot be a wavelength in Angstrom
        return 10.0**x
    return x


def ivar_from_error(err, bad_error=None) -> np.ndarray:
    """1/err^2 where err is finite and positive (and below ``bad_error`` if given), else 0."""
    err = np.asarray(err, dtype=np.float64)
    good = np.isfinite(err) & (err > 0)
    if bad_error is not None:
        good &= err < bad_error
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(good, 1.0 / np.where(good, err, 1.0) ** 2, 0.0)


def finish_pixels(flux, ivar, bad) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine a reader's bad-pixel mask with non-finite/non-positive ivar and non-finite flux.

    Returns (flux, ivar, mask) with ivar = 0 and flux = 0 wherever the pixel is unusable, so no
    NaN reaches a fitter that multiplies by ivar.
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    mask = np.asarray(bad, dtype=bool) | ~np.isfinite(flux) | ~np.isfinite(ivar) | (ivar <= 0)
    return np.where(mask, 0.0, flux), np.where(mask, 0.0, ivar), mask


def median_snr(flux, ivar) -> float | None:
    """Median of flux * sqrt(ivar) over usable pixels (None if there are none)."""
    good = ivar > 0
    if not np.any(good):
        return None
    return float(np.median(flux[good] * np.sqrt(ivar[good])))
