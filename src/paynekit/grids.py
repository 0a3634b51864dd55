"""Training grids: labelled spectra that an emulator learns from, and their HDF5 file format.

A :class:`TrainingGrid` holds N spectra on one wavelength grid with their labels: ``labels`` (N, L),
``label_names`` (L), ``wavelength`` (P, Angstrom), ``flux`` (N, P) and, for observed spectra (the
data-driven Payne), an optional inverse variance ``ivar`` (N, P; 0 = pixel not used).

File layout (HDF5, written with h5py)::

    /                 attributes: paynekit_format = "paynekit-grid", format_version = 1,
                      package_version, wavelength_medium ("vacuum" | "air"), meta_json
    /labels           float (N, L)
    /label_names      utf-8 strings (L,)
    /wavelength       float64 (P,)
    /flux             float32 or float64 (N, P), chunked by rows, gzip (lossless)
    /ivar             optional, same shape and dtype as flux

Reading a file of another layout or version raises :class:`~paynekit.errors.FileFormatError` naming
the file, what was found and what was expected.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checks import as_float_array, check_increasing
from .errors import FileFormatError, InputError
from .labels import LabelSpace

log = logging.getLogger(__name__)

GRID_FORMAT_NAME = "paynekit-grid"
GRID_FORMAT_VERSION = 1
SUPPORTED_GRID_VERSIONS = (1,)
_REQUIRED_DATASETS = ("labels", "label_names", "wavelength", "flux")
#: Rows of flux per HDF5 chunk (a chunk of a 8575-pixel float64 grid is then ~4 MB).
_CHUNK_ROWS = 64
#: Length of the hex digest returned by :func:`training_set_hash`.
HASH_HEX_CHARS = 16


def _flux_dtype(value) -> np.dtype:
    """Keep float32 grids in float32 (half the memory); everything else becomes float64."""
    dt = getattr(value, "dtype", None)
    return np.dtype(np.float32) if dt == np.float32 else np.dtype(np.float64)


@dataclass(eq=False)
class TrainingGrid:
    """N labelled spectra on one wavelength grid.

    Parameters
    ----------
    labels : array (N, L)
        Physical labels, one row per spectrum.
    label_names : sequence of str (L,)
    wavelength : array (P,)
        Pixel wavelengths in Angstrom, strictly increasing.
    flux : array (N, P)
        Continuum-normalised flux (float32 input stays float32, anything else becomes float64).
    ivar : array (N, P), optional
        Inverse variance for observed spectra; pixels with ivar = 0 carry no information (their flux
        may be anything, NaN included). None for synthetic grids (every pixel exact).
    meta : dict
        JSON-serialisable provenance (who made the grid, with which settings).
    wavelength_medium : {"vacuum", "air"}

    The arrays are copied: the grid never shares memory with the caller's arrays.
    """

    labels: np.ndarray
    label_names: tuple[str, ...]
    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    wavelength_medium: str = "vacuum"

    def __post_init__(self):
        names = (self.label_names,) if isinstance(self.label_names, str) else self.label_names
        self.label_names = tuple(str(n) for n in names)
        self.labels = np.atleast_2d(as_float_array(self.labels, "labels", ndim=(1, 2)))
        if self.labels.shape[1] != len(self.label_names):
            raise InputError(f"labels has {self.labels.shape[1]} columns (shape {self.labels.shape}) but "
                             f"label_names has {len(self.label_names)} names")
        if len(set(self.label_names)) != len(self.label_names):
            raise InputError(f"label_names must be unique, got {self.label_names}")
        if not np.all(np.isfinite(self.labels)):
            raise InputError("labels contains non-finite values")
        self.wavelength = as_float_array(self.wavelength, "wavelength", ndim=1)
        check_increasing(self.wavelength)
        self.flux = np.atleast_2d(as_float_array(self.flux, "flux", ndim=(1, 2), dtype=_flux_dtype(self.flux)))
        n, p = self.flux.shape
        if n != self.labels.shape[0]:
            raise InputError(f"flux has {n} spectra (shape {self.flux.shape}) but labels has "
                             f"{self.labels.shape[0]} rows")
        if p != self.wavelength.size:
            raise InputError(f"flux has {p} pixels (shape {self.flux.shape}) but wavelength has "
                             f"{self.wavelength.size}")
        if self.ivar is not None:
            self.ivar = np.atleast_2d(as_float_array(self.ivar, "ivar", ndim=(1, 2), dtype=self.flux.dtype))
            if self.ivar.shape != self.flux.shape:
                raise InputError(f"ivar has shape {self.ivar.shape} but flux has {self.flux.shape}")
            if not np.all(np.isfinite(self.ivar)) or np.any(self.ivar < 0):
                raise InputError("ivar must be finite and >= 0 (use 0 for pixels without data)")
            used = self.ivar > 0
            if not np.all(np.isfinite(self.flux[used])):
                raise InputError("flux is non-finite in pixels with ivar > 0")
        elif not np.all(np.isfinite(self.flux)):
            raise InputError("flux contains non-finite values; give ivar = 0 for pixels without data")
        if self.wavelength_medium not in ("vacuum", "air"):
            raise InputError(f"wavelength_medium must be 'vacuum' or 'air', got {self.wavelength_medium!r}")
        try:
            self.meta = json.loads(json.dumps(dict(self.meta or {})))
        except (TypeError, ValueError) as exc:
            raise InputError(f"meta must be JSON-serialisable: {exc}") from None

    # -- shape ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.flux.shape[0]

    @property
    def n_spectra(self) -> int:
        return self.flux.shape[0]

    @property
    def n_pixels(self) -> int:
        return self.flux.shape[1]

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def __repr__(self) -> str:
        kind = "observed (with ivar)" if self.ivar is not None else "synthetic"
        return (f"TrainingGrid({self.n_spectra} {kind} spectra x {self.n_pixels} pixels, "
                f"labels={list(self.label_names)})")

    # -- derived ----------------------------------------------------------------------------------
    def label_space(self) -> LabelSpace:
        """The box spanned by the grid's labels (The Payne's x_min, x_max)."""
        return LabelSpace.from_training_labels(self.label_names, self.labels)

    def hash(self) -> str:
        """:func:`training_set_hash` of this grid."""
        return training_set_hash(self.labels, self.flux, self.wavelength, self.ivar)

    def subset(self, index) -> TrainingGrid:
        """A new grid with the spectra selected by ``index`` (integer array, slice or boolean mask)."""
        idx = np.arange(self.n_spectra)[index]
        return TrainingGrid(self.labels[idx], self.label_names, self.wavelength, self.flux[idx],
                            None if self.ivar is None else self.ivar[idx], self.meta, self.wavelength_medium)

    def split(self, fractions, seed: int) -> tuple[TrainingGrid, ...]:
        """Split into disjoint random subsets, e.g. ``grid.split((0.8, 0.1, 0.1), seed=1)``.

        Each part gets ``floor(fraction * N)`` spectra; when the fractions sum to 1 the last part also
        takes the few left over by rounding, so every spectrum is used. The permutation comes from
        ``numpy.random.default_rng(seed)``.
        """
        fr = as_float_array(fractions, "fractions", ndim=1)
        if fr.size == 0 or np.any(fr <= 0) or fr.sum() > 1 + 1e-9:
            raise InputError(f"fractions must be positive and sum to at most 1, got {fr.tolist()}")
        n = self.n_spectra
        counts = np.floor(fr * n + 1e-9).astype(int)
        if abs(fr.sum() - 1) < 1e-9:
            counts[-1] = n - counts[:-1].sum()
        if np.any(counts == 0):
            raise InputError(f"fractions {fr.tolist()} of {n} spectra leave an empty part ({counts.tolist()})")
        perm = np.random.default_rng(seed).permutation(n)
        edges = np.concatenate([[0], np.cumsum(counts)])
        return tuple(self.subset(np.sort(perm[a:b])) for a, b in itertools.pairwise(edges))


def training_set_hash(labels, flux, wavelength=None, ivar=None) -> str:
    """Short hex sha256 of a training set (labels, flux, wavelength and ivar if given).

    Values are hashed as little-endian float64 with their shapes, so a float32 grid and its float64
    copy hash alike. With ivar, the flux of pixels with ivar = 0 is hashed as 0 (it carries no
    information and may be NaN). Stored in model files to tie a model to the data it was trained on.
    """
    if ivar is not None:
        flux = np.where(np.asarray(ivar) > 0, flux, 0.0)
    h = hashlib.sha256()
    for name, arr in (("labels", labels), ("flux", flux), ("wavelength", wavelength), ("ivar", ivar)):
        if arr is None:
            continue
        a = np.ascontiguousarray(np.asarray(arr, dtype="<f8"))
        h.update(f"{name}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:HASH_HEX_CHARS]


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def write_grid(grid: TrainingGrid, path, *, compression: str | None = "gzip") -> Path:
    """Write ``grid`` to ``path`` (HDF5). Returns the path.

    ``compression`` is an h5py filter for flux and ivar ("gzip", lossless; None to store raw).
    The file is written to a temporary name and renamed, so a crash never leaves half a grid.
    """
    import h5py

    from .emulators.formats import package_version

    if not isinstance(grid, TrainingGrid):
        raise InputError(f"grid must be a TrainingGrid, got {type(grid).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    chunks = (min(_CHUNK_ROWS, grid.n_spectra), grid.n_pixels)
    opts = {"compression": compression, "chunks": chunks} if compression else {}
    with h5py.File(tmp, "w") as fh:
        fh.attrs["paynekit_format"] = GRID_FORMAT_NAME
        fh.attrs["format_version"] = GRID_FORMAT_VERSION
        fh.attrs["package_version"] = package_version()
        fh.attrs["wavelength_medium"] = grid.wavelength_medium
        fh.attrs["meta_json"] = json.dumps(grid.meta)
        fh.create_dataset("labels", data=grid.labels)
        fh.create_dataset("label_names", data=np.array(grid.label_names, dtype=object),
                          dtype=h5py.string_dtype("utf-8"))
        fh.create_dataset("wavelength", data=grid.wavelength)
        fh.create_dataset("flux", data=grid.flux, **opts)
        if grid.ivar is not None:
            fh.create_dataset("ivar", data=grid.ivar, **opts)
    tmp.replace(path)
    log.info("wrote %r to %s", grid, path)
    return path


def _attr_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_grid(path) -> TrainingGrid:
    """Read a grid written by :func:`write_grid`; other layouts raise FileFormatError."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file; expected a paynekit training grid (HDF5)")
    expected = (f"expected a paynekit training grid (HDF5 with attribute paynekit_format={GRID_FORMAT_NAME!r}, "
                f"format_version in {SUPPORTED_GRID_VERSIONS}, datasets {', '.join(_REQUIRED_DATASETS)}[, ivar])")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        with open(path, "rb") as raw:
            head = raw.read(8)
        raise FileFormatError(f"{path}: not an HDF5 file (starts with {head!r}; {exc}); {expected}") from None
    with fh:
        attrs = {k: fh.attrs[k] for k in fh.attrs}
        found = f"found attributes {sorted(attrs)} and datasets {sorted(fh.keys())}"
        fmt = _attr_str(attrs.get("paynekit_format", ""))
        if fmt != GRID_FORMAT_NAME:
            what = f"paynekit_format={fmt!r}" if fmt else "no paynekit_format attribute"
            raise FileFormatError(f"{path}: unknown layout ({what}; {found}); {expected}")
        try:
            version = int(attrs.get("format_version", -1))
        except (TypeError, ValueError):
            version = -1
        if version not in SUPPORTED_GRID_VERSIONS:
            found_version = attrs.get("format_version")
            found_version = found_version.item() if hasattr(found_version, "item") else found_version
            raise FileFormatError(f"{path}: paynekit grid format version {found_version!r}, but "
                                  f"this paynekit reads versions {SUPPORTED_GRID_VERSIONS}; {found}")
        missing = [k for k in _REQUIRED_DATASETS if k not in fh]
        if missing:
            raise FileFormatError(f"{path}: paynekit grid lacks datasets {missing}; {found}; {expected}")
        try:
            meta = json.loads(_attr_str(attrs.get("meta_json", "{}")))
        except ValueError as exc:
            raise FileFormatError(f"{path}: meta_json attribute is not valid JSON ({exc})") from None
        names = tuple(_attr_str(s) for s in fh["label_names"][()])
        try:
            return TrainingGrid(
                labels=fh["labels"][()], label_names=names, wavelength=fh["wavelength"][()],
                flux=fh["flux"][()], ivar=fh["ivar"][()] if "ivar" in fh else None, meta=meta,
                wavelength_medium=_attr_str(attrs.get("wavelength_medium", "vacuum")),
            )
        except InputError as exc:
            raise FileFormatError(f"{path}: inconsistent grid contents: {exc}") from None
