"""PipelineConfig: how a survey run is cut, where it runs, and how it is stored (not how a star is fitted).

The fit itself is described by :class:`paynekit.fitting.FitConfig`; this object only holds what the
pipeline adds around it. An unknown option is an error (the dataclass constructor raises ``TypeError``;
:meth:`PipelineConfig.from_dict` raises :class:`~paynekit.errors.InputError` naming it).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import InputError

START_METHODS = ("spawn", "forkserver")
MODEL_DTYPES = ("float32", "float64")
RESAMPLE_METHODS = ("linear", "flux_conserving")
DEVICES = ("cpu", "cuda")

#: Spectra per chunk when not given: a chunk of 8575-pixel spectra then needs ~100 MB of input arrays.
DEFAULT_CHUNK_SIZE = 512


def usable_cpus() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class PipelineConfig:
    """Options of :func:`paynekit.pipeline.run_pipeline`.

    Chunks and resume
        ``chunk_size``: spectra per chunk (the unit of work, of resume and of one part file). Chunk
        boundaries follow from ``chunk_size`` and the input order alone, so a resumed run fits exactly
        the chunks an uninterrupted run would. Survey files (FITS, ...) are grouped ``chunk_size``
        files to a chunk. ``resume``: continue a run found in the output folder (default) or, with
        False, delete its files and start over.
    Where it runs
        ``workers``: local worker processes (None: one per usable CPU core, or 1 with ``device="cuda"``);
        ``workers=1`` fits in the calling process. ``threads_per_worker``: BLAS/torch threads of each
        worker, set inside the worker (default 1, so N workers use N cores). The thread count can change
        the last bits of a fit, so it is part of what a resumed run must match. ``start_method``:
        "spawn" (default) or "forkserver" for the process pool. ``scheduler``: a Dask distributed
        scheduler address ("tcp://host:port") or a ``dask.distributed.Client``; then the chunks run on
        that cluster (which must see the input files and the output folder at the same paths) and
        ``workers`` is ignored. ``device``: "cpu" or "cuda" overrides the FitConfig's device (cuda
        implies the torch backend); None keeps the FitConfig's.
    Inputs (survey files)
        ``format`` forces one reader; ``visits`` fits visit spectra; ``reader_options`` per format (see
        :func:`paynekit.io.read_spectra`); ``resample_method`` puts them on the model's grid;
        ``recursive`` searches folders recursively. Spectrum bundles (npz/HDF5 with ``wavelength``,
        ``flux``, ``ivar``) are streamed in row slices on their own grid instead.
    Output
        ``save_models``: write the best-fit model flux and continuum beside each part file, in
        ``model_dtype`` ("float32" default: 4 bytes a pixel). ``progress``: a tqdm bar on stderr
        (spectra/s, time left). ``max_in_flight``: chunks queued per worker. ``max_chunk_retries``:
        how often a chunk whose worker process died (killed, out of memory) is tried again before its
        rows are written as flagged rows.
    """

    workers: int | None = None
    threads_per_worker: int = 1
    chunk_size: int = DEFAULT_CHUNK_SIZE
    resume: bool = True
    scheduler: object | None = None
    device: str | None = None
    start_method: str = "spawn"
    format: str | None = None
    visits: bool = False
    reader_options: dict = field(default_factory=dict)
    resample_method: str = "linear"
    recursive: bool = False
    save_models: bool = True
    model_dtype: str = "float32"
    progress: bool = True
    max_in_flight: int = 2
    max_chunk_retries: int = 2

    def __post_init__(self):
        if self.workers is not None:
            _positive_int("workers", self.workers)
        for name in ("threads_per_worker", "chunk_size", "max_in_flight"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.max_chunk_retries, bool) or not isinstance(self.max_chunk_retries, int) \
                or self.max_chunk_retries < 0:
            raise InputError(f"max_chunk_retries must be an integer >= 0, got {self.max_chunk_retries!r}")
        for name in ("resume", "visits", "recursive", "save_models", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.device is not None and self.device not in DEVICES:
            raise InputError(f"device must be one of {DEVICES} or None, got {self.device!r}")
        if self.start_method not in START_METHODS:
            raise InputError(f"start_method must be one of {START_METHODS} (fork is unsafe with threads and "
                             f"CUDA), got {self.start_method!r}")
        if self.model_dtype not in MODEL_DTYPES:
            raise InputError(f"model_dtype must be one of {MODEL_DTYPES}, got {self.model_dtype!r}")
        if self.resample_method not in RESAMPLE_METHODS:
            raise InputError(f"resample_method must be one of {RESAMPLE_METHODS}, got {self.resample_method!r}")
        if self.format is not None and not isinstance(self.format, str):
            raise InputError(f"format must be a registered format name or None, got {self.format!r}")
        if self.scheduler is not None and not isinstance(self.scheduler, str) \
                and not hasattr(self.scheduler, "submit"):
            raise InputError("scheduler must be a Dask scheduler address ('tcp://host:port') or a "
                             f"dask.distributed.Client, got {type(self.scheduler).__name__}")
        try:
            opts = {str(k): dict(v) for k, v in dict(self.reader_options).items()}
        except (TypeError, ValueError):
            raise InputError("reader_options must map format names to dicts of reader options, got "
                             f"{self.reader_options!r}") from None
        object.__setattr__(self, "reader_options", MappingProxyType(opts))

    def effective_workers(self, device: str) -> int:
        """Worker processes a local run uses."""
        if self.workers is not None:
            return self.workers
        return 1 if device == "cuda" else usable_cpus()

    def to_dict(self) -> dict:
        """Options as a plain dict (the scheduler as its address or repr)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, MappingProxyType):
                v = {k: dict(o) for k, o in v.items()}
            if f.name == "scheduler" and v is not None and not isinstance(v, str):
                v = repr(v)
            out[f.name] = v
        return out

    def replace(self, **changes) -> PipelineConfig:
        """A copy with some options changed (unknown names are an error)."""
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        raw["reader_options"] = {k: dict(v) for k, v in self.reader_options.items()}
        return PipelineConfig.from_dict({**raw, **changes})

    @classmethod
    def from_dict(cls, options: dict) -> PipelineConfig:
        """Build from a dict; an unknown option is an :class:`InputError` that names it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise InputError(f"unknown PipelineConfig option(s) {unknown}; the options are {sorted(names)}")
        return cls(**options)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
