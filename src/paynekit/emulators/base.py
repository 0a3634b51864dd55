"""The emulator contract: labels -> normalised flux, and its analytic Jacobian.

Every model in paynekit (The Payne MLP, the per-pixel Payne, The Cannon) implements one hook,
:meth:`Emulator._evaluate_scaled`, on *scaled* labels. The public methods validate input, scale,
chunk over stars to bound memory, and convert the Jacobian to physical units; the fitter only ever
talks to this class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..checks import as_label_matrix, check_increasing
from ..errors import InputError
from ..labels import LabelSpace

#: Jacobians are evaluated in chunks of stars so that an (N, P, L) block stays near this many bytes.
JACOBIAN_CHUNK_BYTES = 256 * 2**20


class Emulator(ABC):
    """A model that maps stellar labels to a continuum-normalised spectrum.

    Attributes
    ----------
    label_space : LabelSpace
        Label names, units and the training box used for scaling.
    wavelength : ndarray (P,)
        Pixel wavelengths in Angstrom (``wavelength_medium`` says whether vacuum or air).
    dtype : numpy dtype
        Precision in which the model is evaluated (float64 or float32); see :meth:`astype`.
    """

    kind: str = "emulator"

    def __init__(self, label_space: LabelSpace, wavelength, *, wavelength_medium: str = "vacuum", meta=None):
        if not isinstance(label_space, LabelSpace):
            raise InputError(f"label_space must be a LabelSpace, got {type(label_space).__name__}")
        self.label_space = label_space
        if wavelength is None:
            self.wavelength = None
        else:
            wl = np.array(wavelength, dtype=np.float64)
            check_increasing(wl, "wavelength")
            wl.flags.writeable = False
            self.wavelength = wl
        if wavelength_medium not in ("vacuum", "air"):
            raise InputError(f"wavelength_medium must be 'vacuum' or 'air', got {wavelength_medium!r}")
        self.wavelength_medium = wavelength_medium
        self.meta = dict(meta or {})

    # -- the one hook -----------------------------------------------------------------------------
    @abstractmethod
    def _evaluate_scaled(self, x_scaled: np.ndarray, jacobian: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Flux (N, P) and, if asked, d flux / d x_scaled (N, P, L) for scaled labels (N, L).

        Implementations are vectorised over stars and pixels and compute in ``self.dtype``.
        """

    @property
    @abstractmethod
    def dtype(self) -> np.dtype: ...

    @abstractmethod
    def astype(self, dtype) -> Emulator:
        """This emulator evaluated in ``dtype`` (float32 or float64): itself when it already is, else a copy
        (which an implementation may keep and hand out again: an emulator is not changed after it is made)."""

    @property
    @abstractmethod
    def n_pixels(self) -> int: ...

    # -- public contract --------------------------------------------------------------------------
    @property
    def label_names(self) -> tuple[str, ...]:
        return self.label_space.names

    @property
    def n_labels(self) -> int:
        return len(self.label_space)

    def predict(self, labels) -> np.ndarray:
        """Normalised flux (N, P) for physical labels (N, L); a single (L,) vector gives (P,)."""
        x, single = as_label_matrix(labels, self.n_labels)
        flux = self.predict_scaled(self.label_space.scale(x))
        return flux[0] if single else flux

    def jacobian(self, labels) -> np.ndarray:
        """d flux / d label (N, P, L) in physical units for labels (N, L); (P, L) for one star."""
        return self.predict_and_jacobian(labels)[1]

    def predict_and_jacobian(self, labels) -> tuple[np.ndarray, np.ndarray]:
        """Flux and physical-unit Jacobian in one pass (cheaper than calling both)."""
        x, single = as_label_matrix(labels, self.n_labels)
        flux, jac = self.predict_and_jacobian_scaled(self.label_space.scale(x))
        jac /= self.label_space.span.astype(jac.dtype)
        return (flux[0], jac[0]) if single else (flux, jac)

    def predict_scaled(self, x_scaled: np.ndarray) -> np.ndarray:
        """Flux for already scaled labels (N, L); no validation (for the fitter's hot loop)."""
        x = np.asarray(x_scaled, dtype=self.dtype)
        return self._evaluate_scaled(x, jacobian=False)[0]

    def predict_and_jacobian_scaled(self, x_scaled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flux (N, P) and d flux / d x_scaled (N, P, L), chunked over stars to bound memory."""
        x = np.asarray(x_scaled, dtype=self.dtype)
        n = x.shape[0]
        per_star = self.n_pixels * self.n_labels * np.dtype(self.dtype).itemsize
        chunk = max(1, JACOBIAN_CHUNK_BYTES // max(per_star, 1))
        if n <= chunk:
            return self._evaluate_scaled(x, jacobian=True)
        flux = np.empty((n, self.n_pixels), dtype=self.dtype)
        jac = np.empty((n, self.n_pixels, self.n_labels), dtype=self.dtype)
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            flux[sl], jac[sl] = self._evaluate_scaled(x[sl], jacobian=True)
        return flux, jac

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.n_labels} labels, {self.n_pixels} pixels, "
            f"{np.dtype(self.dtype).name}, labels={list(self.label_names)})"
        )
