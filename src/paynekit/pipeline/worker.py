"""Fitting one chunk, wherever it runs (the calling process, a local worker process, a Dask worker).

:func:`run_chunk` reads the chunk's rows, fits them with :func:`paynekit.fitting.fit` in one batch,
writes the part file and the model-spectra sidecar (atomically) and returns a small
:class:`ChunkReport`; the parent then records the chunk in the manifest.

Failures that belong to one star never stop the run: an unreadable file or spectrum becomes a row with
``BAD_INPUT`` and the reason; an exception inside the batched fit makes the chunk be fitted again one
spectrum at a time, and a spectrum that still raises becomes a ``FIT_FAILURE`` row with the exception
in ``flag_reason``. A :class:`~paynekit.errors.PaynekitError` from ``fit`` is the caller's problem (an
option the emulator cannot honour, a grid it does not cover) and stops the run.

Threads: BLAS and torch threads are set to ``threads`` around each chunk (and restored after, so a
chunk fitted in the calling process leaves its thread settings as they were); the last bits of a fit
can depend on the thread count, so every chunk of a run uses the same count wherever it runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PaynekitError
from .sources import ChunkSpec, read_bundle_rows, read_file_rows
from .store import MODELS, PARTS, PIPELINE_COLUMNS, part_name, write_models, write_part

log = logging.getLogger(__name__)

_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS")
#: (get, set) symbol pairs of BLAS libraries: numpy/scipy's bundled OpenBLAS builds, plain OpenBLAS, MKL.
_BLAS_SYMBOLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
    ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),
)
#: Seconds between checks, in a pool worker, that the parent process is still alive.
PARENT_POLL_SECONDS = 0.5
#: glibc malloc in a pool worker: arrays up to this size come from the heap, not a fresh mmap (glibc's
#: ceiling for the option, 32 MiB on 64-bit) ...
WORKER_MMAP_THRESHOLD = 32 * 2**20
#: ... and freed heap memory up to this much stays with the process instead of going back to the OS.
WORKER_TRIM_THRESHOLD = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse the memory a fit frees instead of returning it to the OS and taking it back,
    and numpy not advise transparent huge pages for its arrays (:func:`no_huge_page_advice`).

    A fit allocates and frees arrays of (stars x pixels) at every step; by default glibc serves those from
    fresh mmaps and gives them back, so every step pays page faults for memory it had a moment ago (on the
    2-core test machine, 140,000 faults and 8 s of system time in a 28 s fit of 512 stars; 86,000 and 5 s
    with this). Only for processes that do nothing but fit (the pipeline's workers): peak memory is the same,
    but the process keeps it until it ends. False where the C library has no ``mallopt`` (not glibc)."""
    no_huge_page_advice()
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD)
    )


def no_huge_page_advice() -> bool:
    """Stop numpy from marking its large arrays MADV_HUGEPAGE in this process (what the environment variable
    ``NUMPY_MADVISE_HUGEPAGE=0`` does at import). True when numpy's switch was found.

    Where transparent huge pages are given on request (``/sys/kernel/mm/transparent_hugepage`` enabled and
    defrag ``madvise``, a common default), a fault in such memory can stall in synchronous compaction, and a
    fit faults in freed and reused arrays all the time (numpy issue 31590). On the 2-core test machine a
    512-star fit took 7-8.5 s of system time with the advice and 1.0-1.2 s without, 20-25 % of its time."""
    try:
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is None:  # pragma: no cover - a numpy without the switch
        return False
    setter(False)
    return True


# ------------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------------
def _loaded_blas_paths() -> list[str]:
    paths = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                name = parts[-1] if len(parts) >= 6 else ""
                if ("blas" in name.lower() or "libmkl_rt" in name) and name not in paths:
                    paths.append(name)
    except OSError:  # pragma: no cover - no /proc (macOS): look where the wheels keep their libraries
        import glob

        import numpy

        base = Path(numpy.__file__).parent.parent
        for pattern in ("numpy.libs/*blas*", "numpy/.dylibs/*blas*", "scipy.libs/*blas*", "scipy/.dylibs/*blas*"):
            paths.extend(glob.glob(str(base / pattern)))
    return paths


_BLAS_CACHE: dict[str, list] = {}


def _blas_controls() -> list:
    """(get, set) ctypes functions of every BLAS library loaded in this process."""
    out = []
    for path in _loaded_blas_paths():
        if path not in _BLAS_CACHE:
            found = []
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                lib = None
            for get_name, set_name in _BLAS_SYMBOLS if lib is not None else ():
                getter, setter = getattr(lib, get_name, None), getattr(lib, set_name, None)
                if getter is not None and setter is not None:
                    getter.restype = ctypes.c_int
                    found.append((getter, setter))
                    break
            _BLAS_CACHE[path] = found
        out.extend(_BLAS_CACHE[path])
    return out


def _get_threads(torch_too: bool):
    blas = [(s, int(g())) for g, s in _blas_controls()]
    torch = sys.modules.get("torch") if torch_too else None
    return blas, (torch.get_num_threads() if torch is not None else None)


def _set_threads(blas, torch_threads, n=None):
    for setter, value in blas:
        setter(ctypes.c_int(n if n is not None else value))
    torch = sys.modules.get("torch")
    if torch is not None and (n is not None or torch_threads is not None):
        torch.set_num_threads(n if n is not None else torch_threads)


_LIMIT_LOCK = threading.Lock()
_LIMIT_STATE = {"depth": 0, "saved": None}


@contextmanager
def limited_threads(n: int, *, torch_too: bool = False):
    """BLAS (and torch) threads set to ``n`` inside the block, restored after.

    Re-entrant and thread-safe for concurrent blocks with the same ``n`` (Dask threads in one process):
    the first to enter saves the settings, the last to leave restores them.
    """
    if torch_too:
        import torch  # noqa: F401  (loaded now, so that its thread pool is limited too)
    with _LIMIT_LOCK:
        if _LIMIT_STATE["depth"] == 0:
            blas, tt = _get_threads(torch_too)
            _LIMIT_STATE["saved"] = (blas, tt)
            _set_threads(blas, tt, n)
        _LIMIT_STATE["depth"] += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _LIMIT_STATE["depth"] -= 1
            if _LIMIT_STATE["depth"] == 0:
                blas, tt = _LIMIT_STATE["saved"]
                _set_threads(blas, tt)


# ------------------------------------------------------------------------------------------------
# what every chunk needs
# ------------------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """Everything a worker needs to fit chunks of one run (sent once per worker)."""

    emulator: object
    fit_options: dict  # FitConfig.to_dict(raw=True): FitConfig itself holds mappingproxies (not picklable)
    out_dir: str
    run_id: str
    threads: int
    save_models: bool
    model_dtype: str
    format: str | None
    visits: bool
    reader_options: dict
    resample_method: str
    _cache: dict = field(default_factory=dict, repr=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def config(self):
        if "config" not in self._cache:
            from ..fitting import FitConfig

            self._cache["config"] = FitConfig.from_dict(dict(self.fit_options))
        return self._cache["config"]

    def presearch_grid(self, wavelength: np.ndarray, medium: str):
        """The pre-search grid for this data grid, built once per worker (fit would build the same one)."""
        key = (wavelength.size, float(wavelength[0]), float(wavelength[-1]), hash(wavelength.tobytes()), medium)
        grids = self._cache.setdefault("grids", {})
        if key not in grids:
            try:
                from ..fitting.forward import EmulatorEvaluator, build_forward_model
                from ..fitting.presearch import build_presearch_grid

                config = self.config()
                fm = build_forward_model(self.emulator, wavelength, config, medium)
                grids[key] = build_presearch_grid(fm, EmulatorEvaluator(self.emulator, config.dtype, "numpy"), config)
            except Exception as exc:  # noqa: BLE001 - fit builds its own grid and reports any real problem
                log.debug("no cached pre-search grid (%s); fit builds one per chunk", exc)
                grids[key] = None
        return grids[key]


@dataclass
class ChunkReport:
    """What a worker tells the parent about a finished chunk."""

    chunk_id: int
    n_rows: int
    n_bad: int
    n_fallback: int
    seconds: float  # the whole chunk: read, fit, write
    fit_seconds: float  # inside paynekit.fitting.fit
    worker: str


# ------------------------------------------------------------------------------------------------
# one chunk
# ------------------------------------------------------------------------------------------------
@dataclass
class _Rows:
    n: int
    batch: object  # SpectrumBatch of the readable rows, or None
    fit_pos: np.ndarray  # positions (in the chunk) of the batch rows
    failures: dict  # position -> (id, reason, flag name)
    sources: list
    source_rows: list
    wavelength: np.ndarray


def _gather(ctx: RunContext, spec: ChunkSpec, payload) -> _Rows:
    if spec.kind == "rows":
        n = spec.stop - spec.start
        sources = [spec.path] * n
        source_rows = list(range(spec.start, spec.stop))
        try:
            batch = payload if payload is not None else read_bundle_rows(spec.path, spec.file_kind, spec.start,
                                                                          spec.stop)
        except PaynekitError as exc:
            reason = f"unreadable input: {exc}"
            fails = {i: (str(spec.start + i), reason, "BAD_INPUT") for i in range(n)}
            return _Rows(n, None, np.zeros(0, dtype=np.int64), fails, sources, source_rows,
                         np.asarray(ctx.emulator.wavelength))
        return _Rows(n, batch, np.arange(n), {}, sources, source_rows, batch.wavelength)
    from ..spectra import SpectrumBatch

    got = read_file_rows(spec.files, ctx.emulator, format=ctx.format, visits=ctx.visits,
                         reader_options=ctx.reader_options, resample_method=ctx.resample_method)
    n = len(got.items)
    good = [i for i, it in enumerate(got.items) if not isinstance(it, tuple)]
    fails = {i: (it[0], it[1], "BAD_INPUT") for i, it in enumerate(got.items) if isinstance(it, tuple)}
    batch = SpectrumBatch.from_spectra([got.items[i] for i in good]) if good else None
    wl = batch.wavelength if batch is not None else np.asarray(ctx.emulator.wavelength)
    return _Rows(n, batch, np.array(good, dtype=np.int64), fails, got.sources, got.source_rows, wl)


def _fit_batch(ctx: RunContext, batch):
    """fit() on the whole batch; on an exception, one spectrum at a time. Returns (results, failures)."""
    from ..fitting import fit

    config = ctx.config()
    medium = batch.meta[0].get("wavelength_medium", "vacuum") if batch.meta else "vacuum"
    grid = ctx.presearch_grid(batch.wavelength, medium)
    try:
        return [(np.arange(len(batch)), fit(ctx.emulator, batch, config, return_models=True,
                                            presearch_grid=grid))], {}, 0
    except PaynekitError:
        raise
    except Exception as exc:  # noqa: BLE001 - a numerical failure of some star; isolate it below
        log.warning("fit of a chunk of %d spectra raised %s: %s; fitting them one at a time",
                    len(batch), type(exc).__name__, exc)
    results, failures = [], {}
    for i in range(len(batch)):
        try:
            results.append((np.array([i]), fit(ctx.emulator, batch[i], config, return_models=True,
                                               presearch_grid=grid)))
        except PaynekitError:
            raise
        except Exception as exc:  # noqa: BLE001 - this star becomes a flagged row with the reason
            failures[i] = (batch.ids[i], f"fit failed: {type(exc).__name__}: {exc}", "FIT_FAILURE")
    return results, failures, len(batch)


def _assemble(ctx: RunContext, spec: ChunkSpec, rows: _Rows):
    """The chunk's table (input order) and model arrays; every row of the chunk exactly once."""
    from .. import catalog
    from ..flags import BAD_FLAGS, ResultFlag

    config = ctx.config()
    ls = ctx.emulator.label_space
    n, p = rows.n, rows.wavelength.size
    t0 = time.perf_counter()
    results, failures, n_fallback = ([], {}, 0) if rows.batch is None else _fit_batch(ctx, rows.batch)
    fit_seconds = time.perf_counter() - t0
    failures = {int(rows.fit_pos[i]): v for i, v in failures.items()}
    failures.update(rows.failures)
    table = catalog.empty_result_table(ls.names, ls.units, n, parabola=config.parabola_uncertainty, presearch=True)
    models = np.full((n, p), np.nan)
    conts = np.full((n, p), np.nan)
    for local, res in results:
        pos = rows.fit_pos[local]
        t = res.table
        for name in t.colnames:
            if name not in table.colnames:  # a column the fitter added since this was written
                table[name] = np.zeros(n, dtype=t[name].dtype) if t[name].dtype.kind != "U" else \
                    np.array([""] * n, dtype=object)
                table[name].unit, table[name].description = t[name].unit, t[name].info.description
            col = table[name]
            vals = np.asarray(t[name])
            if col.dtype == object:
                for j, v in zip(pos, vals):
                    col[j] = str(v)
            else:
                col[pos] = vals
        models[pos] = res.model_flux
        conts[pos] = res.continuum
        table.meta.update({k: v for k, v in t.meta.items() if isinstance(v, (str, int, float, bool))})
    for i, (sid, reason, flag) in failures.items():
        bit = int(getattr(ResultFlag, flag))
        table["id"][i] = str(sid)
        table["result_flags"][i] = bit
        table["flag_warn"][i] = True
        table["flag_bad"][i] = bool(bit & int(BAD_FLAGS))
        table["flag_reason"][i] = reason
        models[i] = np.nan
        conts[i] = np.nan
    table["source"] = np.array(rows.sources, dtype=object)
    table["source"].description = PIPELINE_COLUMNS["source"][1]
    table["source_row"] = np.asarray(rows.source_rows, dtype=np.int64)
    table["source_row"].description = PIPELINE_COLUMNS["source_row"][1]
    table["chunk_row"] = np.arange(n, dtype=np.int32)
    table.meta.update(RUNID=ctx.run_id, CHUNK=spec.chunk_id)
    return catalog.finalize_strings(table), models, conts, n_fallback, fit_seconds


def run_chunk(ctx: RunContext, spec: ChunkSpec, payload=None) -> ChunkReport:
    """Read, fit and store one chunk; returns its report (the parent records it in the manifest)."""
    t0 = time.perf_counter()
    config = ctx.config()
    with limited_threads(ctx.threads, torch_too=config.backend == "torch"):
        rows = _gather(ctx, spec, payload)
        table, models, conts, n_fallback, fit_seconds = _assemble(ctx, spec, rows)
    _store(ctx, spec, table, models, conts, rows.wavelength)
    n_bad = int(np.count_nonzero(np.asarray(table["flag_bad"])))
    return ChunkReport(spec.chunk_id, len(table), n_bad, n_fallback, time.perf_counter() - t0, fit_seconds,
                       f"{os.uname().nodename if hasattr(os, 'uname') else ''}:{os.getpid()}")


def failed_chunk(ctx: RunContext, spec: ChunkSpec, payload, reason: str) -> ChunkReport:
    """Store every row of a chunk as a FIT_FAILURE row (its worker process died, repeatedly)."""
    t0 = time.perf_counter()
    rows = _gather(ctx, spec, payload)
    for i in range(rows.n):
        if i not in rows.failures:
            k = int(np.flatnonzero(rows.fit_pos == i)[0])
            rows.failures[i] = (rows.batch.ids[k], reason, "FIT_FAILURE")
    rows = _Rows(rows.n, None, np.zeros(0, dtype=np.int64), rows.failures, rows.sources, rows.source_rows,
                 rows.wavelength)
    table, models, conts, _, _ = _assemble(ctx, spec, rows)
    _store(ctx, spec, table, models, conts, rows.wavelength)
    return ChunkReport(spec.chunk_id, len(table), len(table), 0, time.perf_counter() - t0, 0.0,
                       f"parent:{os.getpid()}")


def _store(ctx, spec, table, models, conts, wavelength):
    out = Path(ctx.out_dir)
    name = part_name(ctx.run_id, spec.chunk_id)
    meta = {"RUNID": ctx.run_id, "CHUNK": spec.chunk_id}
    if ctx.save_models:
        write_models(out / MODELS / f"{name}.h5", wavelength, models, conts, list(table["id"]), ctx.model_dtype,
                     meta)
    write_part(out / PARTS / f"{name}.parquet", table, dict(table.meta))


# ------------------------------------------------------------------------------------------------
# local worker processes
# ------------------------------------------------------------------------------------------------
_WORKER_CTX: RunContext | None = None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): the getppid() check still works
        return True


def _watch_parent(ppid: int, run_pid: int) -> None:
    """Exit when the run's process is gone (killed with SIGKILL, say): an orphan must not keep fitting."""
    while True:
        if os.getppid() != ppid or not _alive(run_pid):
            os._exit(70)
        time.sleep(PARENT_POLL_SECONDS)


def init_pool_worker(ctx_path: str, run_pid: int, start_method: str) -> None:
    """Initializer of a local worker process: the run context, thread limits, malloc settings
    (:func:`keep_freed_memory`), a parent watchdog.

    The watchdog exits the worker when ``os.getppid()`` changes from its value now (the run's process
    for 'spawn', the fork server for 'forkserver', which exits with the run's process) or when the run's
    process is gone; a 'spawn' worker whose parent is already not the run's process exits at once.
    """
    import pickle

    global _WORKER_CTX
    if (start_method == "spawn" and os.getppid() != run_pid) or not _alive(run_pid):
        os._exit(70)  # the run was killed while this worker was starting
    threading.Thread(target=_watch_parent, args=(os.getppid(), run_pid), daemon=True,
                     name="paynekit-parent-watch").start()
    with open(ctx_path, "rb") as fh:
        ctx = pickle.load(fh)  # written by our parent process for this run, removed when the run ends
    for var in _THREAD_ENV:  # for libraries loaded later in this process
        os.environ[var] = str(ctx.threads)
    keep_freed_memory()
    _WORKER_CTX = ctx


def ping() -> int:
    """A no-op task: proves that the pool's workers start."""
    return os.getpid()


def pool_run_chunk(spec: ChunkSpec, payload=None) -> ChunkReport:
    return run_chunk(_WORKER_CTX, spec, payload)
