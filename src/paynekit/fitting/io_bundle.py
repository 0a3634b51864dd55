"""Input files of ``paynekit fit``: a spectrum bundle, and a pixel mask.

Bundle (npz or HDF5; HDF5 datasets at the file's root):

* ``wavelength`` (P,) Angstrom (vacuum unless ``wavelength_medium`` = "air")
* ``flux`` (N, P), ``ivar`` (N, P) (inverse variance; 0 = no information)
* optional ``mask`` (N, P) or (P,) bool (True = bad pixel), ``ids`` (N,) strings,
  ``wavelength_medium`` (a string, "vacuum" or "air")

Pixel mask file (applied to every spectrum; True / listed = masked):

* npz with one boolean array of P values (key ``mask``, or the only array in the file), e.g. The Payne's
  ``payne_apogee_mask_7214.npz``; optionally ``wavelength`` (P,) to check that it matches the data grid;
* a text file (``.txt``, ``.csv``, ``.dat``) of wavelength intervals, two numbers per line (start end,
  Angstrom, in the data's medium); ``#`` starts a comment.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, InputError
from ..spectra import SpectrumBatch

_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_TEXT_SUFFIXES = (".txt", ".csv", ".dat")
_BUNDLE_KEYS = ("wavelength", "flux", "ivar")


def _read_arrays(path: Path) -> dict:
    if not path.exists():
        raise FileFormatError(f"{path}: no such file")
    if path.suffix.lower() in _HDF5_SUFFIXES:
        import h5py

        try:
            with h5py.File(path, "r") as fh:
                return {k: fh[k][()] for k in fh if isinstance(fh[k], h5py.Dataset)}
        except OSError as exc:
            raise FileFormatError(f"{path}: not a readable HDF5 file ({exc})") from None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise FileFormatError(
            f"{path}: not a readable npz archive (or HDF5 with suffix {_HDF5_SUFFIXES}): {exc}"
        ) from None


def _as_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode()
    arr = np.asarray(value)
    if arr.dtype.kind == "S":
        return arr.item().decode()
    return str(arr.item() if arr.ndim == 0 else arr)


def read_bundle(path) -> SpectrumBatch:
    """Read an npz or HDF5 spectrum bundle (layout in the module docstring) as a SpectrumBatch."""
    path = Path(path)
    arrays = _read_arrays(path)
    missing = [k for k in _BUNDLE_KEYS if k not in arrays]
    if missing:
        raise FileFormatError(
            f"{path}: a spectrum bundle needs {list(_BUNDLE_KEYS)}; missing {missing} "
            f"(found {sorted(arrays)})"
        )
    ids = None
    if "ids" in arrays:
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(arrays["ids"])]
    medium = _as_str(arrays["wavelength_medium"]) if "wavelength_medium" in arrays else "vacuum"
    if medium not in ("vacuum", "air"):
        raise FileFormatError(f"{path}: wavelength_medium must be 'vacuum' or 'air', got {medium!r}")
    try:
        batch = SpectrumBatch(arrays["wavelength"], arrays["flux"], arrays["ivar"], arrays.get("mask"), ids)
    except InputError as exc:
        raise FileFormatError(f"{path}: {exc}") from None
    batch.meta = [{"wavelength_medium": medium, "source_file": str(path)} for _ in range(len(batch))]
    return batch


def write_bundle(path, batch: SpectrumBatch) -> Path:
    """Write a SpectrumBatch as an npz or HDF5 bundle (by suffix) that :func:`read_bundle` reads."""
    path = Path(path)
    medium = batch.meta[0].get("wavelength_medium", "vacuum") if batch.meta else "vacuum"
    arrays = {
        "wavelength": batch.wavelength,
        "flux": batch.flux,
        "ivar": batch.ivar,
        "mask": batch.mask,
        "ids": np.array(batch.ids, dtype=str),
        "wavelength_medium": np.array(medium),
    }
    if path.suffix.lower() in _HDF5_SUFFIXES:
        import h5py

        with h5py.File(path, "w") as fh:
            for k, v in arrays.items():
                if v.dtype.kind == "U":
                    v = np.char.encode(v, "utf-8")
                fh.create_dataset(k, data=v)
    else:
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
    return path


def read_pixel_mask(path, wavelength) -> np.ndarray:
    """A boolean mask (P,) for the grid ``wavelength`` from a mask file (True = masked)."""
    path = Path(path)
    wl = np.asarray(wavelength, dtype=np.float64)
    if path.suffix.lower() in _TEXT_SUFFIXES:
        if not path.exists():
            raise FileFormatError(f"{path}: no such file")
        try:
            iv = np.loadtxt(path, delimiter="," if path.suffix.lower() == ".csv" else None, ndmin=2)
        except ValueError as exc:
            raise FileFormatError(
                f"{path}: expected two numbers (start end, Angstrom) per line ({exc})"
            ) from None
        if iv.size and iv.shape[1] != 2:
            raise FileFormatError(f"{path}: expected two columns (start end), got {iv.shape[1]}")
        mask = np.zeros(wl.size, dtype=bool)
        for a, b in iv:
            if not b >= a:
                raise FileFormatError(f"{path}: interval ({a}, {b}) has end < start")
            mask |= (wl >= a) & (wl <= b)
        return mask
    arrays = _read_arrays(path)
    if "mask" in arrays:
        mask = arrays["mask"]
    else:
        bools = [k for k, v in arrays.items() if np.asarray(v).dtype == bool]
        if len(bools) != 1:
            raise FileFormatError(
                f"{path}: expected a boolean array named 'mask' (or a single boolean array); "
                f"found {sorted(arrays)}"
            )
        mask = arrays[bools[0]]
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != wl.shape:
        raise FileFormatError(
            f"{path}: the mask must be a boolean array of {wl.size} pixels, got {mask.dtype} {mask.shape}"
        )
    if "wavelength" in arrays and not np.allclose(arrays["wavelength"], wl, rtol=1e-8, atol=0):
        raise FileFormatError(f"{path}: the mask's wavelength grid differs from the data's")
    return mask.copy()
