"""Inputs of a survey run: what they are, how they are cut into chunks, and how one chunk is read.

Three kinds of source, in the order the user gave them:

* **bundle**: an npz or HDF5 file with 2-D ``flux`` and ``ivar`` (N, P) and ``wavelength`` (P,) at its top
  level (the layout of :func:`paynekit.fitting.write_bundle`). Its rows are read in slices: HDF5 by
  hyperslab, uncompressed npz through a memory map of the array inside the zip file, so memory does not
  grow with N. (A compressed npz member is decompressed from its start up to the slice: correct but
  quadratic in N; write large bundles as HDF5 or with ``np.savez``.)
* **file**: any other spectrum file (apStar, BOSS spec, LAMOST, Gaia XP table, ...), read whole by
  :mod:`paynekit.io` and resampled onto the emulator's wavelength grid; files are grouped
  ``chunk_size`` to a chunk. A path or pattern that names nothing is a file source too: it becomes a
  flagged row that says so.
* **memory**: a :class:`~paynekit.spectra.SpectrumBatch` or ``(wavelength, flux, ivar[, mask])`` passed in
  Python, cut in row slices.

A chunk's rows are fixed by the inputs and ``chunk_size`` alone (never by timing or worker count).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, InputError
from ..spectra import Spectrum, SpectrumBatch

log = logging.getLogger(__name__)

_BUNDLE_KEYS = ("wavelength", "flux", "ivar")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
MEMORY_SOURCE = "<memory>"


@dataclass(frozen=True)
class Source:
    """One input: a bundle (rows known), a survey file (rows known only once read), or in-memory arrays."""

    kind: str  # "bundle", "file" or "memory"
    path: str  # absolute path (or the name as given when it does not exist; MEMORY_SOURCE)
    n_rows: int | None = None
    n_pixels: int | None = None
    file_kind: str = ""  # "hdf5" or "npz" for bundles
    size: int = -1
    mtime_ns: int = 0
    digest: str = ""  # content hash of in-memory inputs

    def record(self) -> dict:
        """What identifies this input in the run's manifest (a changed file is a different input)."""
        out = {"kind": self.kind, "path": self.path}
        if self.kind == "memory":
            out.update(n_rows=self.n_rows, n_pixels=self.n_pixels, sha256=self.digest)
        else:
            out.update(size=self.size, mtime_ns=self.mtime_ns)
            if self.kind == "bundle":
                out.update(n_rows=self.n_rows, n_pixels=self.n_pixels, file_kind=self.file_kind)
        return out


@dataclass(frozen=True)
class ChunkSpec:
    """The rows of one chunk: a row range of one bundle / in-memory source, or a group of survey files."""

    chunk_id: int
    kind: str  # "rows" or "files"
    source: int = -1
    path: str = ""
    file_kind: str = ""
    start: int = 0
    stop: int = 0
    files: tuple = ()

    @property
    def expected_rows(self) -> int:
        """Rows this chunk will give (a survey file is counted as one; it may hold more)."""
        return self.stop - self.start if self.kind == "rows" else len(self.files)


@dataclass
class MemoryInput:
    """Arrays passed in Python, kept by the parent and sent to the workers a chunk at a time."""

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray | None
    ids: list
    medium: str

    def batch(self, start: int, stop: int) -> SpectrumBatch:
        mask = None if self.mask is None else self.mask[start:stop]
        n = stop - start
        return SpectrumBatch(self.wavelength, self.flux[start:stop], self.ivar[start:stop], mask,
                             self.ids[start:stop], [{"wavelength_medium": self.medium} for _ in range(n)])

    def digest(self) -> str:
        h = hashlib.sha256()
        for arr in (self.wavelength, self.flux, self.ivar) + (() if self.mask is None else (self.mask,)):
            a = np.ascontiguousarray(arr)
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(memoryview(a).cast("B"))
        h.update("\x00".join(self.ids).encode())
        h.update(self.medium.encode())
        return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# resolving the inputs
# ------------------------------------------------------------------------------------------------
def _memory_input(inputs) -> MemoryInput | None:
    if isinstance(inputs, SpectrumBatch):
        medium = inputs.meta[0].get("wavelength_medium", "vacuum") if inputs.meta else "vacuum"
        return MemoryInput(inputs.wavelength, inputs.flux, inputs.ivar, inputs.mask, list(inputs.ids), medium)
    if isinstance(inputs, tuple) and len(inputs) in (3, 4) and all(
            isinstance(a, np.ndarray) or a is None for a in inputs):
        try:
            batch = SpectrumBatch(inputs[0], inputs[1], inputs[2], inputs[3] if len(inputs) == 4 else None)
        except InputError as exc:
            raise InputError(f"inputs (wavelength, flux, ivar[, mask]): {exc}") from None
        return _memory_input(batch)
    return None


def resolve_inputs(inputs, *, recursive: bool = False) -> tuple[list[Source], MemoryInput | None]:
    """The sources named by ``inputs``, in order (files, globs, folders; or in-memory arrays)."""
    mem = _memory_input(inputs)
    if mem is not None:
        if mem.flux.shape[0] == 0:
            raise InputError("inputs holds no spectra")
        return [Source("memory", MEMORY_SOURCE, n_rows=mem.flux.shape[0], n_pixels=mem.wavelength.size,
                       digest=mem.digest())], mem
    from ..io import expand_paths

    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    try:
        entries = [str(p) for p in inputs]
    except TypeError:
        raise InputError("inputs must be file names, glob patterns or folders, a SpectrumBatch, or a tuple "
                         f"(wavelength, flux, ivar[, mask]); got {type(inputs).__name__}") from None
    if not entries:
        raise InputError("inputs is empty: give spectrum files, glob patterns or folders")
    sources: list[Source] = []
    seen = set()
    for e in entries:
        files, failures = expand_paths([e], recursive=recursive)
        if failures:  # a missing file, a pattern or folder that names nothing: one flagged row says so
            sources.append(Source("file", e))
        for p in files:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                sources.append(_probe(p))
    if not any(s.size >= 0 for s in sources):
        raise InputError(f"no input spectra found: none of {entries} names an existing spectrum file")
    return sources, None


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _probe(path: Path) -> Source:
    path = path.resolve()
    size, mtime = _stat(path)
    try:
        shape = bundle_shape(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        shape = None  # not readable as a bundle here; the survey readers will say why
    if shape is None:
        return Source("file", str(path), size=size, mtime_ns=mtime)
    kind, n, p = shape
    return Source("bundle", str(path), n_rows=n, n_pixels=p, file_kind=kind, size=size, mtime_ns=mtime)


def bundle_shape(path: Path):
    """("hdf5"|"npz", N, P) if ``path`` is a spectrum bundle with 2-D flux, else None."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head == _HDF5_MAGIC:
        import h5py

        with h5py.File(path, "r") as fh:
            if not all(k in fh and isinstance(fh[k], h5py.Dataset) for k in _BUNDLE_KEYS):
                return None
            shapes = {k: fh[k].shape for k in _BUNDLE_KEYS}
        kind = "hdf5"
    elif head.startswith(b"PK"):
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if not all(f"{k}.npy" in names for k in _BUNDLE_KEYS):
                return None
            shapes = {}
            for k in _BUNDLE_KEYS:
                with zf.open(f"{k}.npy") as fp:
                    shapes[k] = _npy_header(fp)[0]
        kind = "npz"
    else:
        return None
    fl, iv, wl = shapes["flux"], shapes["ivar"], shapes["wavelength"]
    if len(fl) != 2 or iv != fl or wl != (fl[1],):
        return None
    return kind, int(fl[0]), int(fl[1])


def plan_chunks(sources: list[Source], chunk_size: int) -> list[ChunkSpec]:
    """Cut the sources into chunks: row slices of bundles/arrays, groups of consecutive survey files."""
    chunks: list[ChunkSpec] = []
    pending: list[str] = []

    def flush():
        for a in range(0, len(pending), chunk_size):
            chunks.append(ChunkSpec(len(chunks), "files", files=tuple(pending[a:a + chunk_size])))
        pending.clear()

    for i, s in enumerate(sources):
        if s.kind == "file":
            pending.append(s.path)
            continue
        flush()
        for a in range(0, s.n_rows, chunk_size):
            chunks.append(ChunkSpec(len(chunks), "rows", source=i, path=s.path, file_kind=s.file_kind, start=a,
                                    stop=min(a + chunk_size, s.n_rows)))
    flush()
    return chunks


# ------------------------------------------------------------------------------------------------
# reading one chunk
# ------------------------------------------------------------------------------------------------
def _npy_header(fp):
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    return np.lib.format.read_array_header_2_0(fp)


def _decode_ids(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(values)]


def _as_str(value) -> str:
    arr = np.asarray(value)
    v = arr.item() if arr.ndim == 0 else arr.ravel()[0]
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_hdf5_rows(path: str, start: int, stop: int) -> dict:
    import h5py

    with h5py.File(path, "r") as fh:
        out = {"wavelength": fh["wavelength"][()], "flux": fh["flux"][start:stop], "ivar": fh["ivar"][start:stop]}
        if "mask" in fh:
            m = fh["mask"]
            out["mask"] = m[()] if m.ndim == 1 else m[start:stop]
        if "ids" in fh:
            out["ids"] = _decode_ids(fh["ids"][start:stop])
        if "wavelength_medium" in fh:
            out["medium"] = _as_str(fh["wavelength_medium"][()])
        elif "wavelength_medium" in fh.attrs:
            out["medium"] = _as_str(fh.attrs["wavelength_medium"])
    return out


class _NpzMember:
    """One array of an npz file, readable in row slices without loading the whole array."""

    def __init__(self, path: str, zf: zipfile.ZipFile, name: str):
        self.path, self.zf, self.name = path, zf, name
        info = zf.getinfo(name)
        self.stored = info.compress_type == zipfile.ZIP_STORED
        with zf.open(name) as fp:
            self.shape, self.fortran, self.dtype = _npy_header(fp)
            self.header_size = fp.tell()
        if self.dtype.hasobject:
            raise FileFormatError(f"{path}: array {name[:-4]!r} holds Python objects; store strings as a "
                                  "fixed-width string array")
        if self.stored:
            with open(path, "rb") as raw:
                raw.seek(info.header_offset)
                fields = _ZIP_LOCAL_HEADER.unpack(raw.read(_ZIP_LOCAL_HEADER.size))
            if fields[0] != 0x04034B50:
                raise FileFormatError(f"{path}: corrupt zip entry {name}")
            self.offset = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[9] + fields[10] + self.header_size

    def all(self) -> np.ndarray:
        return self.rows(0, self.shape[0]) if self.stored and len(self.shape) >= 1 else self._whole()

    def _whole(self):
        with self.zf.open(self.name) as fp:
            _npy_header(fp)
            count = int(np.prod(self.shape)) if self.shape else 1
            data = np.frombuffer(fp.read(count * self.dtype.itemsize), dtype=self.dtype, count=count)
        return data.reshape(self.shape, order="F" if self.fortran else "C")

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self.stored:
            mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape,
                           order="F" if self.fortran else "C")
            out = np.array(mm[start:stop])
            del mm
            return out
        if self.fortran or len(self.shape) == 0:
            return self._whole()[start:stop]
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with self.zf.open(self.name) as fp:
            _npy_header(fp)
            skip = start * row
            while skip > 0:  # ZipExtFile.seek would decompress the same bytes; read in blocks instead
                got = len(fp.read(min(skip, 64 * 2**20)))
                if got == 0:
                    break
                skip -= got
            buf = fp.read((stop - start) * row)
        return np.frombuffer(buf, dtype=self.dtype).reshape((stop - start,) + tuple(self.shape[1:])).copy()


def _read_npz_rows(path: str, start: int, stop: int) -> dict:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())

        def member(k):
            return _NpzMember(path, zf, f"{k}.npy")

        out = {"wavelength": member("wavelength").all(), "flux": member("flux").rows(start, stop),
               "ivar": member("ivar").rows(start, stop)}
        if "mask.npy" in names:
            m = member("mask")
            out["mask"] = m.all() if len(m.shape) == 1 else m.rows(start, stop)
        if "ids.npy" in names:
            out["ids"] = _decode_ids(member("ids").rows(start, stop))
        if "wavelength_medium.npy" in names:
            out["medium"] = _as_str(member("wavelength_medium")._whole())
    return out


def read_bundle_rows(path: str, file_kind: str, start: int, stop: int) -> SpectrumBatch:
    """Rows ``start:stop`` of a spectrum bundle as a SpectrumBatch (ids default to the row numbers)."""
    try:
        arrays = (_read_hdf5_rows if file_kind == "hdf5" else _read_npz_rows)(path, start, stop)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, FileFormatError):
            raise
        raise FileFormatError(f"{path}: cannot read rows {start}:{stop} of the bundle ({exc})") from None
    n = stop - start
    if arrays["flux"].shape[0] != n:
        raise FileFormatError(f"{path}: expected rows {start}:{stop}, the file has fewer (was it changed?)")
    medium = arrays.get("medium", "vacuum")
    if medium not in ("vacuum", "air"):
        raise FileFormatError(f"{path}: wavelength_medium must be 'vacuum' or 'air', got {medium!r}")
    ids = arrays.get("ids") or [str(i) for i in range(start, stop)]
    mask = arrays.get("mask")
    if mask is not None and mask.ndim == 1:
        mask = np.broadcast_to(mask, arrays["flux"].shape)
    try:
        return SpectrumBatch(arrays["wavelength"], arrays["flux"], arrays["ivar"], mask, ids,
                             [{"wavelength_medium": medium, "source_file": path} for _ in range(n)])
    except InputError as exc:
        raise FileFormatError(f"{path}: {exc}") from None


@dataclass
class FileRows:
    """What a chunk of survey files gave: per row its source, row in the source, and a Spectrum or a reason."""

    sources: list
    source_rows: list
    items: list  # Spectrum, or (id, reason) for a row that could not be read


def read_file_rows(files, emulator, *, format=None, visits=False, reader_options=None,
                   resample_method="linear") -> FileRows:
    """Read survey files one after another, resampled onto the emulator's grid; failures become rows.

    Every spectrum is then (re)normalised as The Payne does, a Chebyshev polynomial per region fitted on
    continuum pixels, here the emulator's own (:func:`paynekit.continuum.continuum_pixels_from_emulator`:
    pixels near 1 whose flux depends least on the labels, The Cannon's idea), so that data and model share
    one continuum definition. Spectra a survey pipeline already normalised (aspcapStar) are renormalised
    too: ASPCAP's continuum is not the one a given network was trained with (for the DR14 test star and
    the binspec_plus network, reduced chi2 8.2 before, 1.2 after).
    """
    from ..io import iter_spectra

    out = FileRows([], [], [])
    for path in files:
        row = 0
        for item in iter_spectra([path], format=format, visits=visits, options=dict(reader_options or {}),
                                 resample_to=emulator, resample_method=resample_method):
            out.sources.append(path)
            out.source_rows.append(row)
            if isinstance(item, Spectrum):
                item = _prenormalize(item, emulator)
                out.items.append(item)
            else:
                out.items.append((item.id or Path(item.path).name, f"unreadable input: {item.reason}"))
            row += 1
        if row == 0:
            out.sources.append(path)
            out.source_rows.append(0)
            out.items.append((Path(path).name, f"unreadable input: {path}: the file holds no spectrum"))
    return out


_CONTINUUM_PIXELS = weakref.WeakKeyDictionary()


def _prenormalize(spectrum, emulator):
    """Continuum-normalise one resampled spectrum on the emulator's continuum pixels (cached per emulator)."""
    from ..continuum import ChebyshevContinuum, continuum_pixels_from_emulator
    from ..instrument import default_continuum_regions

    pixels = _CONTINUUM_PIXELS.get(emulator)
    if pixels is None:
        regions = default_continuum_regions(emulator.wavelength)
        pixels = continuum_pixels_from_emulator(emulator, regions=regions)
        _CONTINUUM_PIXELS[emulator] = pixels
    regions = default_continuum_regions(spectrum.wavelength)
    return ChebyshevContinuum(regions=regions).normalize(spectrum, pixels)
