"""Reading survey spectra: one reader per format, a registry, and resampling onto a model's grid.

>>> from paynekit.io import read_spectra
>>> result = read_spectra(["apStar-*.fits", "spectra/"], resample_to=emulator)
>>> batch = result.to_batch()          # the spectra that were read, on the model grid
>>> result.failures                    # [ReadFailure(path, reason, error, id), ...] for the rest

Every reader returns :class:`~paynekit.spectra.Spectrum` records with vacuum wavelengths in
Angstrom (``meta["wavelength_medium"] == "vacuum"``), flux, ivar (0 for unusable pixels), a pixel
mask (True = bad) and meta with at least ``id``, ``file``, ``format``, ``snr``, ``frame`` and
``normalized``, plus ``rv``, ``mjd``/``visit``, ``telescope``/``fiber`` where the file has them.
"""

from . import apogee, arrays, boss, gaiaxp, lamost  # noqa: F401  (registers the formats, in this order)
from .apogee import APOGEE_REJECT_BITS, read_apstar, read_apvisit, read_aspcapstar
from .arrays import read_arrays, write_arrays
from .boss import BOSS_REJECT_BITS, read_boss
from .gaiaxp import GAIA_XP_WAVELENGTH, read_gaiaxp, read_gaiaxp_table
from .lamost import read_lamost_lrs, read_lamost_mrs
from .registry import (
    ReadFailure,
    ReadResult,
    available_formats,
    expand_paths,
    identify_format,
    iter_spectra,
    read_file,
    read_spectra,
    register_format,
)
from .resample import resample, resample_batch

__all__ = [
    "APOGEE_REJECT_BITS",
    "BOSS_REJECT_BITS",
    "GAIA_XP_WAVELENGTH",
    "ReadFailure",
    "ReadResult",
    "available_formats",
    "expand_paths",
    "identify_format",
    "iter_spectra",
    "read_apstar",
    "read_apvisit",
    "read_arrays",
    "read_aspcapstar",
    "read_boss",
    "read_file",
    "read_gaiaxp",
    "read_gaiaxp_table",
    "read_lamost_lrs",
    "read_lamost_mrs",
    "read_spectra",
    "register_format",
    "resample",
    "resample_batch",
    "write_arrays",
]  # fmt: skip
