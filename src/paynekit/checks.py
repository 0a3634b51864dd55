"""Input validation at the public boundary, in one place.

Every function returns a *new* array (never a view that the caller could see us modify) and raises
:class:`~paynekit.errors.InputError` naming the argument and what was expected.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


def as_float_array(value, name: str, ndim: int | tuple[int, ...] | None = None, dtype=np.float64) -> np.ndarray:
    """Return ``value`` as a new float array, checking its number of dimensions."""
    try:
        arr = np.array(value, dtype=dtype, copy=True)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be numeric array-like, got {type(value).__name__}: {exc}") from None
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if arr.ndim not in allowed:
            raise InputError(f"{name} must have {' or '.join(map(str, allowed))} dimension(s), got shape {arr.shape}")
    return arr


def as_label_matrix(labels, n_labels: int, name: str = "labels", dtype=np.float64) -> tuple[np.ndarray, bool]:
    """Return labels as a (N, L) array and whether the input was a single label vector."""
    arr = as_float_array(labels, name, ndim=(1, 2), dtype=dtype)
    single = arr.ndim == 1
    arr = np.atleast_2d(arr)
    if arr.shape[1] != n_labels:
        raise InputError(f"{name} has {arr.shape[1]} labels per star (shape {arr.shape}) but the model has {n_labels}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains non-finite values")
    return arr, single


def check_same_shape(reference: np.ndarray, ref_name: str, **arrays) -> None:
    """Raise if any of ``arrays`` (name=array) does not have the shape of ``reference``."""
    for name, arr in arrays.items():
        if arr is not None and np.shape(arr) != np.shape(reference):
            raise InputError(f"{name} has shape {np.shape(arr)} but {ref_name} has {np.shape(reference)}")


def check_increasing(wavelength: np.ndarray, name: str = "wavelength") -> None:
    if wavelength.ndim != 1 or wavelength.size < 2:
        raise InputError(f"{name} must be a 1-D array of at least 2 values, got shape {wavelength.shape}")
    if not np.all(np.isfinite(wavelength)) or not np.all(np.diff(wavelength) > 0):
        raise InputError(f"{name} must be finite and strictly increasing")
