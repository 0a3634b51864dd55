"""Fitting spectra for stellar labels: forward model, pre-search, optimisers, uncertainties.

The entry point is :func:`fit`; options are in :class:`FitConfig`.
"""

from .api import FitResult, fit, presearch_grid
from .config import FitConfig, parse_assignments
from .io_bundle import read_bundle, read_pixel_mask, write_bundle
from .presearch import PresearchGrid
from .uncertainties import NoiseModel

__all__ = [
    "FitConfig",
    "FitResult",
    "NoiseModel",
    "PresearchGrid",
    "fit",
    "parse_assignments",
    "presearch_grid",
    "read_bundle",
    "read_pixel_mask",
    "write_bundle",
]
