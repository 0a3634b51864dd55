"""``run_pipeline``: a whole survey through the fitter, chunk by chunk, resumable, on any executor.

Data flow::

    inputs --resolve--> sources --plan (chunk_size, input order)--> chunks
    chunks not in the manifest --executor (this process | local processes | Dask)--> run_chunk
        --> parts/*.parquet + models/*.h5 (written by the worker, atomically)
        --> ChunkReport --> parent: manifest.mark_done (the one writer), progress bar

Executors are small objects with one method, ``run(ctx, chunks, payload) -> iterator of ChunkReport``
(in completion order); the store and the manifest do not care which one ran a chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import secrets
import shutil
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .config import PipelineConfig
from .sources import MemoryInput, plan_chunks, resolve_inputs
from .store import (
    CONTEXT_PREFIX,
    INPUTS,
    LOCK,
    MANIFEST,
    MODELS,
    PARTS,
    STORE_FORMAT,
    STORE_VERSION,
    Manifest,
    ResumeMismatchError,
    atomic_write,
    mismatches,
    write_json,
)
from .worker import RunContext, failed_chunk, init_pool_worker, ping, pool_run_chunk, run_chunk

log = logging.getLogger(__name__)


@dataclass
class PipelineSummary:
    """What :func:`run_pipeline` returns."""

    out_dir: Path
    run_id: str
    n_chunks: int
    n_chunks_run: int  # fitted by this call
    n_chunks_skipped: int  # already done by an earlier call (resume)
    n_rows: int  # rows in the store now (all completed chunks)
    n_rows_run: int  # rows fitted by this call
    n_bad: int  # rows with flag_bad in the store now
    n_fallback_chunks: int  # chunks this call refitted one spectrum at a time after an exception
    seconds: float
    spectra_per_second: float
    executor: str
    workers: int
    device: str
    complete: bool


# ------------------------------------------------------------------------------------------------
# executors
# ------------------------------------------------------------------------------------------------
class InProcessExecutor:
    """Fits the chunks one after another in the calling process (``workers=1``)."""

    name = "in-process"

    def __init__(self):
        self.workers = 1

    def run(self, ctx, chunks, payload):
        for spec in chunks:
            yield run_chunk(ctx, spec, payload(spec))


class ProcessExecutor:
    """Local worker processes (``spawn``/``forkserver``), each with its own thread limit.

    A worker that dies (killed, out of memory) breaks the pool: the chunks in flight are sent again to
    a new pool, and a chunk that was in flight during more than ``max_retries`` breakages is stored as
    flagged rows by the parent.
    """

    name = "processes"

    def __init__(self, workers: int, start_method: str = "spawn", max_in_flight: int = 2, max_retries: int = 2):
        self.workers = workers
        self.start_method = start_method
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries

    def run(self, ctx, chunks, payload):
        import multiprocessing

        mp = multiprocessing.get_context(self.start_method)
        queue = deque(chunks)
        attempts: dict[int, int] = {}
        limit = self.workers * self.max_in_flight
        # The context (emulator included) goes to the workers through a file, not as initializer
        # arguments: CPython's spawn writes those into a pipe that it also holds open itself, so a
        # worker dying at start-up with a large payload unread would block this process for ever.
        ctx_path = Path(ctx.out_dir) / f"{CONTEXT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.pkl"
        atomic_write(ctx_path, lambda tmp: Path(tmp).write_bytes(pickle.dumps(ctx, protocol=pickle.HIGHEST_PROTOCOL)))
        try:
            while queue:
                pool = ProcessPoolExecutor(self.workers, mp_context=mp, initializer=init_pool_worker,
                                           initargs=(str(ctx_path), os.getpid(), self.start_method))
                inflight = {}
                clean = False
                try:
                    try:
                        pool.submit(ping).result()
                    except BrokenProcessPool:
                        raise InputError(
                            "the worker processes died while starting. If a script calls run_pipeline, guard it "
                            "with `if __name__ == '__main__':` (the spawn start method runs the script again in "
                            "each worker); the emulator must also be importable and picklable in a new "
                            "process") from None
                    while queue or inflight:
                        while queue and len(inflight) < limit:
                            spec = queue.popleft()
                            inflight[pool.submit(pool_run_chunk, spec, payload(spec))] = spec
                        done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                        for fut in sorted(done, key=lambda f: inflight[f].chunk_id):
                            report = fut.result()
                            inflight.pop(fut)
                            yield report
                    clean = True
                except BrokenProcessPool:
                    lost = sorted(inflight.values(), key=lambda s: s.chunk_id)
                    log.warning("a worker process died; %d chunk(s) in flight are tried again", len(lost))
                    retry = []
                    for spec in lost:
                        attempts[spec.chunk_id] = attempts.get(spec.chunk_id, 0) + 1
                        if attempts[spec.chunk_id] > self.max_retries:
                            reason = (f"the worker process died {attempts[spec.chunk_id]} times while fitting "
                                      "this chunk (out of memory? killed?)")
                            yield failed_chunk(ctx, spec, payload(spec), reason)
                        else:
                            retry.append(spec)
                    queue.extendleft(reversed(retry))
                finally:
                    # after an error do not wait for the chunks still running (their results are not recorded)
                    pool.shutdown(wait=clean, cancel_futures=True)
        finally:
            ctx_path.unlink(missing_ok=True)


class DaskExecutor:
    """Chunks as tasks on a Dask distributed cluster (a scheduler address or a Client).

    The run context (emulator included) is scattered to every worker once. Workers read the inputs and
    write the part files themselves, so they must see the input files and the output folder at the
    same paths as this process (a shared file system).
    """

    name = "dask"

    def __init__(self, scheduler, max_in_flight: int = 2, max_retries: int = 2):
        self.scheduler = scheduler
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self.workers = 0

    def run(self, ctx, chunks, payload):
        try:
            from distributed import Client, as_completed
        except ImportError:  # pragma: no cover - depends on the environment
            raise InputError("a Dask scheduler needs dask.distributed: pip install 'paynekit[dask]'") from None
        own = isinstance(self.scheduler, str)
        client = Client(self.scheduler) if own else self.scheduler
        try:
            nthreads = sum(client.nthreads().values()) or 1
            self.workers = nthreads
            ctx_future = client.scatter(ctx, broadcast=True, hash=False)
            queue = deque(chunks)
            pending = as_completed()
            specs = {}

            def submit():
                spec = queue.popleft()
                fut = client.submit(run_chunk, ctx_future, spec, payload(spec), pure=False, retries=self.max_retries,
                                    key=f"paynekit-{ctx.run_id}-chunk-{spec.chunk_id}-{time.monotonic_ns()}")
                specs[fut.key] = spec
                pending.add(fut)

            for _ in range(min(len(queue), nthreads * self.max_in_flight)):
                submit()
            for fut in pending:
                report = fut.result()
                specs.pop(fut.key, None)
                fut.release()
                if queue:
                    submit()
                yield report
        finally:
            if own:
                client.close()


def make_executor(pcfg: PipelineConfig, device: str):
    if pcfg.scheduler is not None:
        return DaskExecutor(pcfg.scheduler, pcfg.max_in_flight, pcfg.max_chunk_retries)
    workers = pcfg.effective_workers(device)
    if workers == 1:
        return InProcessExecutor()
    return ProcessExecutor(workers, pcfg.start_method, pcfg.max_in_flight, pcfg.max_chunk_retries)


# ------------------------------------------------------------------------------------------------
# fingerprints
# ------------------------------------------------------------------------------------------------
def _sha256(obj) -> str:
    return hashlib.sha256(obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=repr)
                          .encode()).hexdigest()


def emulator_digest(emulator) -> str:
    """A content hash of an emulator: its arrays, labels, box and wavelengths (or its pickle)."""
    h = hashlib.sha256()
    h.update(type(emulator).__qualname__.encode())
    ls = emulator.label_space
    h.update(json.dumps([list(ls.names), list(getattr(ls, "units", ()))]).encode())
    arrays = {"x_min": ls.x_min, "x_max": ls.x_max}
    if getattr(emulator, "wavelength", None) is not None:
        arrays["wavelength"] = emulator.wavelength
    if hasattr(emulator, "to_arrays"):
        arrays.update(emulator.to_arrays())
        h.update(repr((getattr(emulator, "activation", None), getattr(emulator, "wavelength_medium", None),
                       str(getattr(emulator, "dtype", "")))).encode())
    else:
        h.update(pickle.dumps(emulator, protocol=4))
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
    return h.hexdigest()


def fit_config_digest(config) -> str:
    """A hash of every FitConfig option (objects such as an LSF or a noise model by their content)."""
    raw = config.to_dict(raw=True)
    plain = config.to_dict()
    blobs = {k: pickle.dumps(v, protocol=4) for k, v in raw.items() if plain[k] != v}
    h = hashlib.sha256(json.dumps(plain, sort_keys=True, default=repr).encode())
    for k in sorted(blobs):
        h.update(k.encode())
        h.update(blobs[k])
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# the run folder
# ------------------------------------------------------------------------------------------------
_OUR_NAMES = (MANIFEST, INPUTS, PARTS, MODELS, LOCK)


class _RunLock:
    """An exclusive lock on the run folder for the parent process (released by the OS if it dies)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK
        self.fh = None

    def acquire(self):
        self.fh = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks; one run at a time is on the user
            return self
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise InputError(f"{self.path.parent}: another paynekit run is writing to this folder") from None
        return self

    def release(self):
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def _clear_run(out_dir: Path) -> None:
    """Delete a previous run's files (only ours; nothing else in the folder)."""
    for name in (MANIFEST, INPUTS):
        (out_dir / name).unlink(missing_ok=True)
    for name in (PARTS, MODELS):
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)


def _clean_temporaries(out_dir: Path) -> None:
    for folder in (out_dir, out_dir / PARTS, out_dir / MODELS):
        if folder.is_dir():
            for pattern in (".*.tmp", f"{CONTEXT_PREFIX}*.pkl"):
                for p in folder.glob(pattern):
                    p.unlink(missing_ok=True)


def _open_store(out_dir: Path, fingerprint: dict, description: dict, sources, resume: bool) -> Manifest:
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = [p.name for p in out_dir.iterdir() if p.name != LOCK]
    ours = [n for n in existing if n in _OUR_NAMES or (n.startswith(".") and n.endswith(".tmp"))
            or n.startswith(CONTEXT_PREFIX)]
    if existing and not ours:
        raise InputError(f"{out_dir}: the folder is not empty and holds no paynekit run; give an empty or new "
                         "--out-dir")
    manifest = None
    if (out_dir / MANIFEST).exists():
        manifest = Manifest.read(out_dir)
        if not resume:
            log.info("%s: resume=False, deleting the previous run", out_dir)
            _clear_run(out_dir)
            manifest = None
        else:
            diff = mismatches(manifest.data.get("fingerprint", {}), fingerprint)
            if diff:
                raise ResumeMismatchError(
                    f"{out_dir} holds a run with a different {', '.join(diff)}; resuming would mix results. "
                    "Pass resume=False (--no-resume) to delete it and start over, or use another --out-dir")
    elif ours:
        _clear_run(out_dir)  # killed before its manifest existed: nothing of it is usable
    _clean_temporaries(out_dir)
    if manifest is None:
        (out_dir / PARTS).mkdir(exist_ok=True)
        (out_dir / MODELS).mkdir(exist_ok=True)
        write_json(out_dir / INPUTS, {"inputs": [s.record() for s in sources]})
        data = dict(description, format=STORE_FORMAT, version=STORE_VERSION, fingerprint=fingerprint,
                    run_id=fingerprint_id(fingerprint), completed=[], n_rows_done=0, n_bad_done=0)
        manifest = Manifest(out_dir, data)
        manifest.write()
    else:
        (out_dir / PARTS).mkdir(exist_ok=True)
        (out_dir / MODELS).mkdir(exist_ok=True)
        lost = sorted(c for c in manifest.completed if not manifest.part_path(c).exists()
                      or (manifest.data.get("save_models") and not manifest.model_path(c).exists()))
        if lost:
            log.warning("%s: %d chunk(s) listed as done have lost their files; fitting them again", out_dir, len(lost))
            manifest.completed -= set(lost)
            manifest.write()
    return manifest


def fingerprint_id(fingerprint: dict) -> str:
    return _sha256(fingerprint)[:12]


# ------------------------------------------------------------------------------------------------
# the entry point
# ------------------------------------------------------------------------------------------------
def _load(emulator_or_path):
    if isinstance(emulator_or_path, (str, os.PathLike)):
        from ..emulators import load_emulator

        return load_emulator(emulator_or_path)
    needed = ("label_space", "wavelength", "predict_scaled", "predict_and_jacobian_scaled")
    missing = [a for a in needed if not hasattr(emulator_or_path, a)]
    if missing:
        raise InputError(f"emulator_or_path must be an emulator file or a paynekit Emulator; "
                         f"{type(emulator_or_path).__name__} lacks {missing}")
    if getattr(emulator_or_path, "wavelength", None) is None:
        raise InputError("the emulator has no wavelength grid; the pipeline needs one")
    return emulator_or_path


def run_pipeline(emulator_or_path, inputs, out_dir, config=None, pipeline_config: PipelineConfig | None = None):
    """Fit every spectrum of ``inputs`` into the run folder ``out_dir``; resumable, parallel, bounded memory.

    Parameters
    ----------
    emulator_or_path : Emulator or path
        A paynekit emulator, or a model file that :func:`paynekit.load_emulator` reads.
    inputs : path, glob, folder, list of them; or SpectrumBatch / (wavelength, flux, ivar[, mask])
        Spectrum bundles (npz/HDF5 with 2-D ``flux``) are streamed in row slices on their own
        wavelength grid; other survey files are read by :mod:`paynekit.io` and resampled onto the
        emulator's grid (see :mod:`paynekit.pipeline.sources`).
    out_dir : path
        The run folder (created). If it holds a run of the same emulator, FitConfig, inputs and chunking,
        that run is continued (``resume=True``); if it holds another run, :class:`ResumeMismatchError`.
    config : FitConfig
        How each spectrum is fitted (``device``, ``dtype``, continuum, ...).
    pipeline_config : PipelineConfig
        Chunking, workers, Dask scheduler, device override, output options.

    Returns
    -------
    PipelineSummary
        Then :func:`paynekit.pipeline.merge` writes the catalog and
        :func:`paynekit.pipeline.load_model_spectra` reads best-fit spectra by id.
    """
    from ..emulators.formats import package_version
    from ..fitting import FitConfig

    t0 = time.perf_counter()
    pcfg = PipelineConfig() if pipeline_config is None else pipeline_config
    if not isinstance(pcfg, PipelineConfig):
        raise InputError(f"pipeline_config must be a PipelineConfig, got {type(pcfg).__name__}")
    fcfg = FitConfig() if config is None else config
    if not isinstance(fcfg, FitConfig):
        raise InputError(f"config must be a FitConfig, got {type(fcfg).__name__}")
    if pcfg.device == "cuda":
        fcfg = fcfg.replace(device="cuda", backend="torch")
    elif pcfg.device == "cpu" and fcfg.device != "cpu":
        fcfg = fcfg.replace(device="cpu")
    emulator = _load(emulator_or_path)
    out_dir = Path(out_dir).resolve()
    sources, memory = resolve_inputs(inputs, recursive=pcfg.recursive)
    chunks = plan_chunks(sources, pcfg.chunk_size)
    reading = {"format": pcfg.format, "visits": pcfg.visits,
               "reader_options": {k: dict(v) for k, v in pcfg.reader_options.items()},
               "resample_method": pcfg.resample_method}
    fingerprint = {
        "emulator": emulator_digest(emulator),
        "fit_config": fit_config_digest(fcfg),
        "inputs": _sha256([s.record() for s in sources]),
        "chunk_size": pcfg.chunk_size,
        "threads_per_worker": pcfg.threads_per_worker,
        "reading": _sha256(reading),
        "models": [pcfg.save_models, pcfg.model_dtype],
    }
    description = {
        "package_version": package_version(),
        "n_chunks": len(chunks),
        "n_inputs": len(sources),
        "label_names": list(emulator.label_space.names),
        "emulator": {"type": type(emulator).__name__, "n_labels": len(emulator.label_space),
                     "n_pixels": int(np.asarray(emulator.wavelength).size),
                     "wavelength_medium": getattr(emulator, "wavelength_medium", "vacuum")},
        "fit_config": fcfg.to_dict(),
        "pipeline_config": {k: v for k, v in pcfg.to_dict().items() if k not in ("scheduler", "progress")},
        "save_models": pcfg.save_models,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _RunLock(out_dir).acquire()
    try:
        manifest = _open_store(out_dir, fingerprint, description, sources, pcfg.resume)
        done_before = set(manifest.completed)
        todo = [c for c in chunks if c.chunk_id not in done_before]
        ctx = RunContext(emulator, fcfg.to_dict(raw=True), str(out_dir), manifest.run_id, pcfg.threads_per_worker,
                         pcfg.save_models, pcfg.model_dtype, pcfg.format, pcfg.visits, reading["reader_options"],
                         pcfg.resample_method)
        executor = make_executor(pcfg, fcfg.device)
        summary = _drive(executor, ctx, todo, memory, manifest, pcfg, chunks, done_before)
    finally:
        lock.release()
    seconds = time.perf_counter() - t0
    n_rows_run, n_fallback = summary
    log.info("%s: %d chunk(s) fitted (%d spectra) in %.1f s; %d of %d chunks done", out_dir,
             len(todo), n_rows_run, seconds, len(manifest.completed), manifest.n_chunks)
    return PipelineSummary(
        out_dir=out_dir, run_id=manifest.run_id, n_chunks=manifest.n_chunks, n_chunks_run=len(todo),
        n_chunks_skipped=len(done_before), n_rows=int(manifest.data["n_rows_done"]), n_rows_run=n_rows_run,
        n_bad=int(manifest.data["n_bad_done"]), n_fallback_chunks=n_fallback, seconds=seconds,
        spectra_per_second=n_rows_run / seconds if seconds > 0 else 0.0, executor=executor.name,
        workers=executor.workers, device=fcfg.device, complete=manifest.is_complete())


def _drive(executor, ctx, todo, memory: MemoryInput | None, manifest: Manifest, pcfg, chunks, done_before):
    from tqdm.auto import tqdm

    def payload(spec):
        return memory.batch(spec.start, spec.stop) if memory is not None and spec.kind == "rows" else None

    expected = {c.chunk_id: c.expected_rows for c in chunks}
    total = int(manifest.data.get("n_rows_done", 0)) + sum(expected[c.chunk_id] for c in todo)
    n_rows_run = 0
    n_fallback = 0
    with tqdm(total=total, initial=int(manifest.data.get("n_rows_done", 0)), unit=" spectra", unit_scale=True,
              disable=not pcfg.progress, desc="paynekit fit", dynamic_ncols=True, smoothing=0.1) as bar:
        for report in executor.run(ctx, todo, payload):
            manifest.mark_done(report.chunk_id, report.n_rows, report.n_bad, report.seconds, report.fit_seconds)
            n_rows_run += report.n_rows
            n_fallback += report.n_fallback > 0
            if report.n_rows != expected[report.chunk_id]:  # survey files with several spectra
                bar.total += report.n_rows - expected[report.chunk_id]
            bar.update(report.n_rows)
            bar.set_postfix(bad=manifest.data["n_bad_done"], refresh=False)
    return n_rows_run, n_fallback
