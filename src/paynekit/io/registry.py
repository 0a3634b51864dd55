"""The reader registry: one identify/read pair per file format, and batch reading with failure records.

Each survey module registers itself (as specutils' ``default_loaders`` do)::

    register_format("apstar", identify_apstar, read_apstar, "APOGEE apStar (DR14-DR17, SDSS-V)")

``identify(probe) -> bool`` looks only at a :class:`FileProbe` (the file's kind and lazily read
headers); ``read(path, *, visits=False, **options) -> list[Spectrum]`` reads one file. Formats are
tried in registration order and the first whose identify function says yes reads the file.

:func:`read_spectra` takes files, glob patterns and folders of mixed formats and returns a
:class:`ReadResult`: the spectra that were read, and one :class:`ReadFailure` (path and a one-line
reason) for every file, pattern or spectrum that could not be read, so that a batch run turns a bad
file into a flagged row while the other files proceed.
"""

from __future__ import annotations

import glob
import inspect
import logging
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, InputError, PaynekitError
from ..spectra import Spectrum, SpectrumBatch
from ._fits import check_file, checked_warnings, one_line

log = logging.getLogger(__name__)

#: File name endings that a folder is searched for (other files in a folder are skipped).
SPECTRUM_FILE_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".npz", ".h5", ".hdf5", ".hdf")

_GLOB_CHARS = set("*?[")

#: Meta keys every spectrum read through the registry has (None where the file does not say).
COMMON_META_KEYS = ("id", "snr", "rv", "frame", "normalized", "mjd")


# ------------------------------------------------------------------------------------------------
# probing a file
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HDUInfo:
    """What an identify function may look at for one FITS HDU (read from its header only)."""

    index: int
    name: str
    kind: str  # "image" or "table"
    header: object
    shape: tuple  # numpy order (slowest axis first); tables: (n_rows,)
    columns: dict  # lower-case column name -> (TFORM, repeat count); empty for images

    @property
    def bitpix(self) -> int:
        return int(self.header.get("BITPIX", 0))

    def has_columns(self, *names) -> bool:
        return all(n.lower() in self.columns for n in names)


def _sniff(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(b"SIMPLE  ="):
        return "fits"
    if head.startswith(b"\x1f\x8b"):
        import gzip

        try:
            with gzip.open(path, "rb") as fh:
                inner = fh.read(9)
        except (OSError, EOFError):
            return "unknown"
        return "fits" if inner == b"SIMPLE  =" else "unknown"
    if head.startswith(b"PK"):
        return "npz"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    return "unknown"


def _table_columns(header) -> dict:
    cols = {}
    for i in range(1, int(header.get("TFIELDS", 0)) + 1):
        name = str(header.get(f"TTYPE{i}", "")).strip().lower()
        tform = str(header.get(f"TFORM{i}", "")).strip().upper()
        digits = "".join(ch for ch in tform if ch.isdigit())
        repeat = int(digits) if digits and tform[: len(digits)] == digits else 1
        cols[name] = (tform, repeat)
    return cols


class FileProbe:
    """A file as identify functions see it: path, kind ('fits', 'npz', 'hdf5', 'unknown'), headers.

    FITS headers are read lazily, one HDU at a time, and the file is closed by :meth:`close`.
    """

    def __init__(self, path):
        self.path = check_file(path)
        self.name = self.path.name
        self.kind = _sniff(self.path)
        self._hdul = None
        self._hdus: dict[int, HDUInfo | None] = {}
        self._keys = None

    def _open(self):
        if self._hdul is None:
            from astropy.io import fits

            with checked_warnings(self.path):
                try:
                    self._hdul = fits.open(self.path, memmap=False, lazy_load_hdus=True)
                except (OSError, ValueError, EOFError, IndexError) as exc:
                    raise FileFormatError(f"{self.path}: not a readable FITS file ({one_line(exc)})") from None
        return self._hdul

    def hdu(self, index: int) -> HDUInfo | None:
        """Header information of HDU ``index`` (None if the file has no such HDU or is not FITS)."""
        if self.kind != "fits":
            return None
        if index not in self._hdus:
            hdul = self._open()
            with checked_warnings(self.path):
                try:
                    hdu = hdul[index]
                except IndexError:
                    self._hdus[index] = None
                    return None
                except (OSError, ValueError, EOFError) as exc:
                    raise FileFormatError(f"{self.path}: the FITS file is truncated or corrupt "
                                          f"({one_line(exc)})") from None
                header = hdu.header
                is_table = header.get("XTENSION", "").strip() in ("BINTABLE", "TABLE")
                naxis = int(header.get("NAXIS", 0))
                if is_table:
                    shape = (int(header.get("NAXIS2", 0)),)
                else:
                    shape = tuple(int(header.get(f"NAXIS{i}", 0)) for i in range(naxis, 0, -1))
                name = str(header.get("EXTNAME", "PRIMARY" if index == 0 else "")).strip().upper()
                self._hdus[index] = HDUInfo(index, name, "table" if is_table else "image", header, shape,
                                            _table_columns(header) if is_table else {})
        return self._hdus[index]

    @property
    def keys(self) -> tuple[str, ...]:
        """Array names of an npz archive or top-level datasets of an HDF5 file (empty otherwise)."""
        if self._keys is None:
            if self.kind == "npz":
                try:
                    with np.load(self.path, allow_pickle=False) as data:
                        self._keys = tuple(data.files)
                except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
                    raise FileFormatError(f"{self.path}: unreadable npz archive ({one_line(exc)})") from None
            elif self.kind == "hdf5":
                import h5py

                try:
                    with h5py.File(self.path, "r") as fh:
                        self._keys = tuple(k for k in fh if isinstance(fh[k], h5py.Dataset))
                except OSError as exc:
                    raise FileFormatError(f"{self.path}: unreadable HDF5 file ({one_line(exc)})") from None
            else:
                self._keys = ()
        return self._keys

    def close(self) -> None:
        if self._hdul is not None:
            self._hdul.close()
            self._hdul = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpectrumFormat:
    """One registered file format: ``identify(probe) -> bool`` and ``read(path, **options)``."""

    name: str
    identify: Callable[[FileProbe], bool]
    read: Callable[..., list]
    description: str = ""

    @property
    def options(self) -> tuple[str, ...]:
        """Keyword options the reader takes (besides the path)."""
        params = list(inspect.signature(self.read).parameters.values())[1:]
        return tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY)


_FORMATS: dict[str, SpectrumFormat] = {}


def register_format(name: str, identify, read, description: str = "", *, overwrite: bool = False) -> None:
    """Add a file format; formats are tried in registration order."""
    if not isinstance(name, str) or not name:
        raise InputError(f"format name must be a non-empty string, got {name!r}")
    if name in _FORMATS and not overwrite:
        raise InputError(f"format {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(identify) or not callable(read):
        raise InputError(f"format {name!r}: identify and read must be callables")
    _FORMATS[name] = SpectrumFormat(name, identify, read, description)


def available_formats() -> dict[str, str]:
    """Registered format names and their descriptions, in the order they are tried."""
    return {name: fmt.description for name, fmt in _FORMATS.items()}


def get_format(name: str) -> SpectrumFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise InputError(f"unknown format {name!r}; the formats are {list(_FORMATS)}") from None


def identify_format(path) -> str:
    """The name of the first registered format that recognises ``path``."""
    with FileProbe(path) as probe:
        if probe.kind == "unknown":
            raise FileFormatError(f"{probe.path}: not a FITS, npz or HDF5 file; the formats are "
                                  f"{', '.join(_FORMATS)}")
        for fmt in _FORMATS.values():
            if fmt.identify(probe):
                return fmt.name
        detail = ""
        if probe.kind == "fits":
            h1 = probe.hdu(1)
            h0 = probe.hdu(0)
            detail = (f" (primary HDU shape {h0.shape if h0 else None}, HDU 1 "
                      f"{'missing' if h1 is None else h1.kind + ' ' + (h1.name or 'unnamed')})")
        elif probe.kind in ("npz", "hdf5"):
            detail = f" (arrays: {', '.join(probe.keys[:12]) or 'none'})"
        raise FileFormatError(f"{probe.path}: a {probe.kind.upper()} file of no known spectrum product{detail}; "
                              f"the formats are {', '.join(_FORMATS)}")


def _check_options(fmt: SpectrumFormat, options: dict) -> None:
    unknown = sorted(set(options) - set(fmt.options))
    if unknown:
        raise InputError(f"format {fmt.name!r} has no option(s) {unknown}; its options are {list(fmt.options)}")


def read_file(path, *, format: str | None = None, visits: bool = False, **options) -> list[Spectrum]:
    """Read every spectrum in one file.

    Parameters
    ----------
    path : str or Path
    format : str, optional
        A registered format name (the file must still have that format's structure); identified
        from the file when not given.
    visits : bool
        Per-visit spectra instead of the combined one, for formats that have them (apStar, LAMOST
        MRS); formats without visits return their spectra unchanged.
    **options
        Options of that format's reader (e.g. ``reject_bits`` for APOGEE); an unknown option is an error.
    """
    return _read_one(path, format, visits, lambda name: options)


def _read_one(path, format, visits, options_for) -> list[Spectrum]:
    path = check_file(path)
    if format is None:
        name = identify_format(path)
        fmt = get_format(name)
    else:
        name = format
        fmt = get_format(name)
        with FileProbe(path) as probe:
            if not fmt.identify(probe):
                raise FileFormatError(f"{path}: not a {name} file ({fmt.description}); its structure does not match")
    options = options_for(name)
    _check_options(fmt, dict(options, visits=visits))
    try:
        spectra = fmt.read(path, visits=visits, **options)
    except PaynekitError:
        raise
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as exc:
        raise FileFormatError(f"{path}: cannot be read as {name} ({type(exc).__name__}: {one_line(exc)})") from None
    for s in spectra:
        s.meta.setdefault("file", str(path))
        s.meta.setdefault("format", name)
        s.meta.setdefault("wavelength_medium", "vacuum")
        for key in COMMON_META_KEYS:
            s.meta.setdefault(key, None)
    return spectra


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadFailure:
    """A file, pattern or spectrum that could not be read: where, why (one line), and the error type."""

    path: str
    reason: str
    error: str = "FileFormatError"
    id: str | None = None


@dataclass
class ReadResult:
    """What :func:`read_spectra` returns: the spectra read, and one failure record per problem."""

    spectra: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    files: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def __len__(self) -> int:
        return len(self.spectra)

    def to_batch(self) -> SpectrumBatch:
        """The spectra as one SpectrumBatch (they must share a grid: read with ``resample_to=``)."""
        return SpectrumBatch.from_spectra(self.spectra)


def _is_glob(text: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in text)


def _has_spectrum_suffix(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in SPECTRUM_FILE_SUFFIXES)


def expand_paths(paths, *, recursive: bool = False) -> tuple[list[Path], list[ReadFailure]]:
    """Files named by ``paths`` (files, glob patterns, folders), in order and without repeats.

    A folder contributes its files whose names end in one of :data:`SPECTRUM_FILE_SUFFIXES`
    (searched recursively if ``recursive``); a pattern contributes what it matches (``**`` allowed).
    A name that matches nothing becomes a :class:`ReadFailure`.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    failures: list[ReadFailure] = []
    seen = set()

    def add(p: Path):
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append(p)

    def add_folder(folder: Path):
        found = folder.rglob("*") if recursive else folder.iterdir()
        chosen = sorted(p for p in found if p.is_file() and not p.name.startswith(".") and _has_spectrum_suffix(p))
        if not chosen:
            failures.append(ReadFailure(str(folder), f"{folder}: folder holds no spectrum files "
                                        f"({', '.join(SPECTRUM_FILE_SUFFIXES)})", "FileFormatError"))
        for p in chosen:
            add(p)

    for entry in paths:
        text = str(entry)
        p = Path(text)
        if p.is_dir():
            add_folder(p)
        elif p.exists():
            add(p)
        elif _is_glob(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                failures.append(ReadFailure(text, f"{text}: no file matches this pattern", "FileFormatError"))
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    add_folder(mp)
                else:
                    add(mp)
        else:
            failures.append(ReadFailure(text, f"{text}: no such file or folder", "FileFormatError"))
    return files, failures


def iter_spectra(paths, *, format: str | None = None, visits: bool = False, options: dict | None = None,
                 resample_to=None, resample_medium: str = "vacuum", resample_method: str = "linear",
                 recursive: bool = False, _expanded=None) -> Iterator[Spectrum | ReadFailure]:
    """Yield, file by file, each spectrum read or a :class:`ReadFailure`; see :func:`read_spectra`."""
    from .resample import _check_medium, _check_method, _grid_of, resample

    options = dict(options or {})
    for name, opts in options.items():
        fmt = get_format(name)
        if not isinstance(opts, dict):
            raise InputError(f"options[{name!r}] must be a dict of reader options, got {type(opts).__name__}")
        _check_options(fmt, dict(opts, visits=visits))
    if format is not None:
        get_format(format)
    grid, grid_medium = None, None
    if resample_to is not None:
        grid, grid_medium = _grid_of(resample_to, resample_medium)
        _check_medium(grid_medium)
        _check_method(resample_method)
    files, failures = expand_paths(paths, recursive=recursive) if _expanded is None else _expanded
    yield from failures
    for path in files:
        try:
            spectra = _read_one(path, format, visits, lambda name: options.get(name, {}))
        except PaynekitError as exc:
            log.warning("%s", one_line(exc))
            yield ReadFailure(str(path), one_line(exc), type(exc).__name__)
            continue
        for s in spectra:
            if grid is None:
                yield s
                continue
            try:
                yield resample(s, grid, medium=grid_medium, method=resample_method)
            except PaynekitError as exc:
                log.warning("%s", one_line(exc))
                yield ReadFailure(str(path), one_line(exc), type(exc).__name__, s.id or None)


def read_spectra(paths, *, format: str | None = None, visits: bool = False, options: dict | None = None,
                 resample_to=None, resample_medium: str = "vacuum", resample_method: str = "linear",
                 recursive: bool = False, on_error: str = "record") -> ReadResult:
    """Read spectra from files, glob patterns and folders of mixed formats.

    Parameters
    ----------
    paths : str, Path or iterable of them
        Files, glob patterns (``"data/apStar-*.fits"``, ``"**"`` allowed) and folders.
    format : str, optional
        Force one registered format for every file (default: identify each file).
    visits : bool
        Per-visit spectra (apStar visit rows, LAMOST MRS exposures) instead of combined ones.
    options : dict, optional
        Reader options per format name, e.g. ``{"apstar": {"reject_bits": ("BADPIX",)}}``.
    resample_to : Emulator or array, optional
        Resample every spectrum onto this grid (a model's ``wavelength`` and ``wavelength_medium``,
        or an array in ``resample_medium``); a spectrum that does not overlap it becomes a failure.
    resample_method : {"linear", "flux_conserving"}
        See :func:`paynekit.io.resample.resample`.
    recursive : bool
        Search folders recursively.
    on_error : {"record", "raise"}
        Record a :class:`ReadFailure` and go on (default), or raise the first error.

    Returns
    -------
    ReadResult
        ``spectra`` (list of Spectrum, each with meta ``id``, ``file``, ``format``, ...),
        ``failures`` (list of ReadFailure: path, one-line reason, error type, spectrum id if any),
        ``files`` (the files that were tried).
    """
    if on_error not in ("record", "raise"):
        raise InputError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    result = ReadResult()
    expanded = expand_paths(paths, recursive=recursive)
    result.files = [str(p) for p in expanded[0]]
    for item in iter_spectra(paths, format=format, visits=visits, options=options, resample_to=resample_to,
                             resample_medium=resample_medium, resample_method=resample_method, recursive=recursive,
                             _expanded=expanded):
        if isinstance(item, ReadFailure):
            if on_error == "raise":
                raise (InputError if item.error == "InputError" else FileFormatError)(item.reason)
            result.failures.append(item)
        else:
            result.spectra.append(item)
    return result
