"""Spectrum records: what every reader returns and every fitter takes.

A :class:`Spectrum` is one observed (or mock) spectrum: wavelength (vacuum Angstrom unless
``meta["wavelength_medium"] == "air"``), flux, inverse variance and a pixel mask (True = bad).
A :class:`SpectrumBatch` is N spectra on one common wavelength grid, the form the fitter works on.
Masked pixels and pixels with ivar <= 0 or non-finite flux/ivar are all "unused": :meth:`usable_ivar`
returns the ivar with those set to 0, in a new array.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .checks import as_float_array, check_increasing
from .errors import InputError


def _clean_ivar(flux, ivar, mask):
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    if mask is not None:
        good &= ~mask
    return np.where(good, ivar, 0.0)


@dataclass(eq=False)
class Spectrum:
    """One spectrum: wavelength (P,), flux (P,), ivar (P,), mask (P,, True = bad) and metadata."""

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.wavelength = as_float_array(self.wavelength, "wavelength", ndim=1)
        check_increasing(self.wavelength)
        self.flux = as_float_array(self.flux, "flux", ndim=1)
        self.ivar = as_float_array(self.ivar, "ivar", ndim=1)
        for name, arr in (("flux", self.flux), ("ivar", self.ivar)):
            if arr.shape != self.wavelength.shape:
                raise InputError(f"{name} has shape {arr.shape} but wavelength has {self.wavelength.shape}")
        if self.mask is None:
            self.mask = np.zeros(self.flux.shape, dtype=bool)
        else:
            self.mask = np.array(self.mask, dtype=bool, copy=True)
            if self.mask.shape != self.flux.shape:
                raise InputError(f"mask has shape {self.mask.shape} but flux has {self.flux.shape}")
        self.meta = dict(self.meta)

    @property
    def id(self) -> str:
        return str(self.meta.get("id", ""))

    def usable_ivar(self) -> np.ndarray:
        return _clean_ivar(self.flux, self.ivar, self.mask)


@dataclass(eq=False)
class SpectrumBatch:
    """N spectra on one wavelength grid: flux, ivar and mask are (N, P); ``ids`` has N entries."""

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray | None = None
    ids: list | None = None
    meta: list | None = None

    def __post_init__(self):
        self.wavelength = as_float_array(self.wavelength, "wavelength", ndim=1)
        check_increasing(self.wavelength)
        self.flux = np.atleast_2d(as_float_array(self.flux, "flux", ndim=(1, 2)))
        self.ivar = np.atleast_2d(as_float_array(self.ivar, "ivar", ndim=(1, 2)))
        n, p = self.flux.shape
        if p != self.wavelength.size:
            raise InputError(f"flux has {p} pixels per spectrum (shape {self.flux.shape}) but wavelength has "
                             f"{self.wavelength.size}")
        if self.ivar.shape != self.flux.shape:
            raise InputError(f"ivar has shape {self.ivar.shape} but flux has {self.flux.shape}")
        if self.mask is None:
            self.mask = np.zeros(self.flux.shape, dtype=bool)
        else:
            self.mask = np.atleast_2d(np.array(self.mask, dtype=bool, copy=True))
            if self.mask.shape == (1, p) and n > 1:
                self.mask = np.repeat(self.mask, n, axis=0)
            if self.mask.shape != self.flux.shape:
                raise InputError(f"mask has shape {self.mask.shape} but flux has {self.flux.shape}")
        if self.ids is None:
            self.ids = [str(i) for i in range(n)]
        else:
            self.ids = [str(i) for i in self.ids]
        if len(self.ids) != n:
            raise InputError(f"ids has {len(self.ids)} entries but there are {n} spectra")
        self.meta = [dict(m) for m in self.meta] if self.meta is not None else [{} for _ in range(n)]
        if len(self.meta) != n:
            raise InputError(f"meta has {len(self.meta)} entries but there are {n} spectra")

    def __len__(self) -> int:
        return self.flux.shape[0]

    @property
    def n_pixels(self) -> int:
        return self.wavelength.size

    def usable_ivar(self) -> np.ndarray:
        return _clean_ivar(self.flux, self.ivar, self.mask)

    def __getitem__(self, index) -> SpectrumBatch:
        idx = np.arange(len(self))[index]
        idx = np.atleast_1d(idx)
        return SpectrumBatch(self.wavelength, self.flux[idx], self.ivar[idx], self.mask[idx],
                             [self.ids[i] for i in idx], [self.meta[i] for i in idx])

    def spectrum(self, i: int) -> Spectrum:
        meta = dict(self.meta[i], id=self.ids[i])
        return Spectrum(self.wavelength, self.flux[i], self.ivar[i], self.mask[i], meta)

    @classmethod
    def from_spectra(cls, spectra) -> SpectrumBatch:
        """Stack spectra that share a wavelength grid (resample first if they do not)."""
        spectra = list(spectra)
        if not spectra:
            raise InputError("spectra is empty")
        wl = spectra[0].wavelength
        for i, s in enumerate(spectra[1:], 1):
            if s.wavelength.shape != wl.shape or not np.allclose(s.wavelength, wl, rtol=0, atol=1e-6 * wl[0]):
                raise InputError(f"spectrum {i} ({s.id or 'no id'}) is on another wavelength grid than spectrum 0; "
                                 "resample them onto one grid first (paynekit.io.resample)")
        return cls(wl, np.stack([s.flux for s in spectra]), np.stack([s.ivar for s in spectra]),
                   np.stack([s.mask for s in spectra]), [s.id or str(i) for i, s in enumerate(spectra)],
                   [s.meta for s in spectra])
