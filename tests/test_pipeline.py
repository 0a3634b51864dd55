"""The survey pipeline: streamed chunks, a resumable store, workers, Dask, flagged rows, merge, model spectra.

The reference is one uninterrupted in-process run over a small HDF5 bundle of spectra simulated from a
random smooth Payne network; every other way of running (killed with SIGKILL and resumed, two worker
processes, a Dask LocalCluster, an npz bundle, arrays in memory) must give the same catalog, value for
value.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from paynekit.catalog import read_catalog
from paynekit.emulators import PayneMLP, save_emulator
from paynekit.errors import InputError
from paynekit.fitting import FitConfig, fit, read_bundle, write_bundle
from paynekit.flags import ResultFlag
from paynekit.labels import LabelSpace
from paynekit.pipeline import (
    PipelineConfig,
    ResumeMismatchError,
    load_model_spectra,
    merge,
    run_pipeline,
)
from paynekit.pipeline.sources import read_bundle_rows
from paynekit.pipeline.worker import limited_threads
from paynekit.spectra import SpectrumBatch

N_SPECTRA = 240
CHUNK = 16
SNR = 100.0
FIT_OPTIONS = {"rv_range": 0.0, "presearch_size": 256}
REPO = Path(__file__).resolve().parents[1]


def _emulator():
    g = np.random.default_rng(11)
    n_pix, h = 300, 16
    wl = 15200.0 * np.exp(2e-5 * np.arange(n_pix))
    ls = LabelSpace(("teff", "logg", "fe_h", "mg_fe"), [4000.0, 1.0, -1.0, -0.2], [6000.0, 5.0, 0.5, 0.5],
                    units=("K", "", "dex", "dex"))
    w = [g.normal(0, 1.2, (h, 4)), g.normal(0, 0.4, (h, h)), g.normal(0, 0.03, (n_pix, h))]
    b = [g.normal(0, 0.3, h), g.normal(0, 0.3, h), 1 - np.abs(g.normal(0, 0.05, n_pix))]
    return PayneMLP(w, b, ls, wl, activation="sigmoid")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Emulator file, truth, and the same spectra as an HDF5 and an npz bundle."""
    root = tmp_path_factory.mktemp("pipeline")
    emu = _emulator()
    model = save_emulator(emu, root / "model.npz")
    g = np.random.default_rng(2024)
    truth = emu.label_space.unscale(g.uniform(-0.4, 0.4, (N_SPECTRA, 4)))
    flux = emu.predict(truth) + g.normal(0, 1 / SNR, (N_SPECTRA, emu.n_pixels))
    batch = SpectrumBatch(emu.wavelength, flux, np.full_like(flux, SNR**2),
                          ids=[f"2M{i:08d}" for i in range(N_SPECTRA)])
    return {"root": root, "model": model, "emu": emu, "truth": truth, "batch": batch,
            "h5": write_bundle(root / "spectra.h5", batch), "npz": write_bundle(root / "spectra.npz", batch)}


def _pcfg(**kw):
    return PipelineConfig(**{"workers": 1, "chunk_size": CHUNK, "progress": False, **kw})


def _table(out_dir, name="catalog.parquet"):
    return read_catalog(merge(out_dir, Path(out_dir) / name, overwrite=True))


def _assert_same_catalog(a, b, skip=()):
    assert a.colnames == b.colnames
    for name in a.colnames:
        if name in skip:
            continue
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.dtype.kind == "f":
            np.testing.assert_array_equal(x, y, err_msg=name)  # NaN == NaN here
        else:
            assert np.array_equal(x, y), name


@pytest.fixture(scope="module")
def reference(data):
    """One uninterrupted in-process run of the HDF5 bundle."""
    out = data["root"] / "reference"
    summary = run_pipeline(data["model"], [data["h5"]], out, FitConfig(**FIT_OPTIONS), _pcfg())
    return {"out": out, "summary": summary, "table": _table(out)}


def test_catalog_has_every_spectrum_once_in_input_order_with_recovered_labels(data, reference):
    t, s = reference["table"], reference["summary"]
    assert s.complete and s.n_chunks == N_SPECTRA // CHUNK and s.n_rows == N_SPECTRA and s.executor == "in-process"
    assert list(t["id"]) == data["batch"].ids
    np.testing.assert_array_equal(t["input_index"], np.arange(N_SPECTRA))
    np.testing.assert_array_equal(t["source_row"], np.arange(N_SPECTRA))
    assert set(t["source"]) == {str(Path(data["h5"]).resolve())}
    assert t["teff"].unit == "K" and t["fe_h"].unit == "dex"
    # the rows belong to their ids: labels within 4 formal sigma of each spectrum's own truth
    for j, name in enumerate(("teff", "logg", "fe_h", "mg_fe")):
        z = (np.asarray(t[name]) - data["truth"][:, j]) / np.asarray(t[f"e_{name}"])
        assert np.mean(np.abs(z) < 4) > 0.9, name
    assert not np.any(t["flag_bad"])
    # a chunk is exactly fit() on the same rows (chunk boundaries come from chunk_size and input order) with
    # the run's thread count (the last bits of BLAS results can depend on it)
    with limited_threads(1):
        direct = fit(data["emu"], read_bundle(data["h5"])[2 * CHUNK:3 * CHUNK], FitConfig(**FIT_OPTIONS))
    for name in ("teff", "logg", "chi2", "rho_teff_logg"):
        np.testing.assert_array_equal(np.asarray(direct[name]), np.asarray(t[name][2 * CHUNK:3 * CHUNK]))


_KILLED_RUN = textwrap.dedent("""
    import json, sys
    from paynekit.fitting import FitConfig
    from paynekit.pipeline import PipelineConfig, run_pipeline
    if __name__ == "__main__":
        run_pipeline(sys.argv[1], [sys.argv[2]], sys.argv[3], FitConfig(**json.loads(sys.argv[4])),
                     PipelineConfig(workers=2, chunk_size=int(sys.argv[5]), progress=False))
""")


def _completed(out: Path) -> int:
    try:
        return sum(b - a for a, b in json.loads((out / "manifest.json").read_text())["completed"])
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_then_resume_gives_the_uninterrupted_catalog(data, reference, tmp_path):
    pytest.importorskip("psutil")
    import psutil

    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:  # a file, not a pipe: orphaned workers would hold a pipe open
        proc = subprocess.Popen([sys.executable, str(script), str(data["model"]), str(data["h5"]), str(out),
                                 json.dumps(FIT_OPTIONS), str(CHUNK)], env=env, stderr=err)
    n_chunks = N_SPECTRA // CHUNK
    deadline = time.monotonic() + 120
    children = []
    while _completed(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        try:
            children = psutil.Process(proc.pid).children(recursive=True) or children
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_at_kill = _completed(out)
    assert 1 <= done_at_kill < n_chunks, f"kill missed the run (done {done_at_kill}): {log.read_text()[-2000:]}"
    # orphaned workers notice that their parent is gone and exit
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive
    # what a kill can leave behind: a half-written temporary file, a part file of a chunk not yet recorded
    run_id = json.loads((out / "manifest.json").read_text())["run_id"]
    (out / "parts" / f".part-{run_id}-0000099.parquet.1-dead.tmp").write_bytes(b"PAR1 half")
    pending = next(i for i in range(n_chunks) if i >= done_at_kill)
    (out / "parts" / f"part-{run_id}-{pending:07d}.parquet").write_bytes(b"garbage of a killed write")

    summary = run_pipeline(data["model"], [data["h5"]], out, FitConfig(**FIT_OPTIONS), _pcfg())
    assert summary.complete and summary.n_chunks_skipped == done_at_kill
    assert summary.n_chunks_run == n_chunks - done_at_kill and summary.n_rows == N_SPECTRA
    assert not list((out / "parts").glob(".*.tmp"))
    t = _table(out)
    assert len(set(t["id"])) == len(t) == N_SPECTRA
    _assert_same_catalog(reference["table"], t)  # workers=2 before the kill, in-process after: same values


def test_dask_local_cluster_equals_the_local_run(data, reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) \
            as cluster:
        with distributed.Client(cluster) as client:
            summary = run_pipeline(data["model"], [data["h5"]], tmp_path / "client", FitConfig(**FIT_OPTIONS),
                                   _pcfg(scheduler=client))
        assert summary.executor == "dask" and summary.complete and summary.workers == 2
        _assert_same_catalog(reference["table"], _table(tmp_path / "client"))
        # by scheduler address (the pipeline opens and closes its own client), arrays in memory
        run_pipeline(data["emu"], data["batch"], tmp_path / "address", FitConfig(**FIT_OPTIONS),
                     _pcfg(scheduler=cluster.scheduler_address))
    _assert_same_catalog(reference["table"], _table(tmp_path / "address"), skip=("source",))


@pytest.mark.slow
def test_forkserver_workers_equal_the_local_run(data, reference, tmp_path):
    summary = run_pipeline(data["model"], [data["h5"]], tmp_path / "run", FitConfig(**FIT_OPTIONS),
                           _pcfg(workers=2, start_method="forkserver"))
    assert summary.executor == "processes" and summary.workers == 2
    _assert_same_catalog(reference["table"], _table(tmp_path / "run"))


class CrashingMLP(PayneMLP):
    """Kills the process that evaluates it unless that is the process that made it (a worker 'OOM')."""

    def _evaluate_scaled(self, x, jacobian):
        if os.getpid() != self.meta["home_pid"]:
            os._exit(13)
        return super()._evaluate_scaled(x, jacobian)

    def astype(self, dtype):
        return CrashingMLP(self.weights, self.biases, self.label_space, self.wavelength, activation=self.activation,
                           dtype=dtype, meta=self.meta)


def test_a_worker_that_dies_gives_flagged_rows_not_a_crashed_run(data, tmp_path):
    emu = data["emu"]
    crashing = CrashingMLP(emu.weights, emu.biases, emu.label_space, emu.wavelength, activation=emu.activation,
                           meta={"home_pid": os.getpid()})
    summary = run_pipeline(crashing, data["batch"][:2 * CHUNK], tmp_path / "run", FitConfig(**FIT_OPTIONS),
                           _pcfg(workers=2, max_chunk_retries=0))
    assert summary.complete and summary.n_rows == 2 * CHUNK and summary.n_bad == 2 * CHUNK
    t = _table(tmp_path / "run")
    assert list(t["id"]) == data["batch"].ids[:2 * CHUNK]
    assert np.all(t["result_flags"] & ResultFlag.FIT_FAILURE)
    assert all("worker process died" in r for r in t["flag_reason"])


def test_npz_bundle_and_arrays_in_memory_give_the_same_catalog(data, reference, tmp_path):
    run_pipeline(data["model"], data["npz"], tmp_path / "npz", FitConfig(**FIT_OPTIONS), _pcfg())
    _assert_same_catalog(reference["table"], _table(tmp_path / "npz"), skip=("source",))
    run_pipeline(data["emu"], data["batch"], tmp_path / "mem", FitConfig(**FIT_OPTIONS), _pcfg())
    t = _table(tmp_path / "mem")
    _assert_same_catalog(reference["table"], t, skip=("source",))
    assert set(t["source"]) == {"<memory>"}


@pytest.mark.parametrize("compressed", [False, True])
def test_bundle_rows_are_read_in_slices(data, tmp_path, compressed):
    b = data["batch"]
    path = tmp_path / "b.npz"
    (np.savez_compressed if compressed else np.savez)(path, wavelength=b.wavelength, flux=b.flux, ivar=b.ivar,
                                                      ids=np.array(b.ids))
    for p, kind in ((path, "npz"), (data["h5"], "hdf5")):
        rows = read_bundle_rows(str(p), kind, 37, 53)
        np.testing.assert_array_equal(rows.flux, b.flux[37:53])
        np.testing.assert_array_equal(rows.ivar, b.ivar[37:53])
        assert rows.ids == b.ids[37:53]


def test_bad_files_bad_rows_and_failing_fits_become_flagged_rows(data, tmp_path, monkeypatch):
    import paynekit.fitting

    b = data["batch"][:40]
    flux, ivar = b.flux.copy(), b.ivar.copy()
    flux[3] = np.nan  # all-NaN spectrum
    ivar[5] = 0.0  # no usable pixel
    ids = list(b.ids)
    ids[20] = "diverges"
    bundle = write_bundle(tmp_path / "bad_rows.h5", SpectrumBatch(b.wavelength, flux, ivar, ids=ids))
    (tmp_path / "garbage.fits").write_bytes(os.urandom(4000))
    (tmp_path / "truncated.fits").write_bytes(b"SIMPLE  =                    T")

    real_fit = paynekit.fitting.fit

    def fit_that_diverges(emulator, spectra, *args, **kwargs):
        if "diverges" in spectra.ids:
            raise FloatingPointError("overflow in the Gauss-Newton step")
        return real_fit(emulator, spectra, *args, **kwargs)

    monkeypatch.setattr(paynekit.fitting, "fit", fit_that_diverges)
    inputs = [bundle, tmp_path / "garbage.fits", tmp_path / "missing.h5", tmp_path / "truncated.fits"]
    summary = run_pipeline(data["model"], inputs, tmp_path / "run", FitConfig(**FIT_OPTIONS), _pcfg())
    assert summary.complete and summary.n_rows == 43 and summary.n_fallback_chunks == 1
    t = _table(tmp_path / "run")
    assert len(t) == 43
    reasons = dict(zip(t["id"], t["flag_reason"]))
    flags = dict(zip(t["id"], t["result_flags"]))
    bad = {str(i) for i in t["id"][np.asarray(t["flag_bad"])]}
    assert bad == {ids[3], ids[5], "diverges", "garbage.fits", "missing.h5", "truncated.fits"}
    assert flags["diverges"] & ResultFlag.FIT_FAILURE and "FloatingPointError" in reasons["diverges"]
    assert "not finite" in reasons[ids[3]] and "ivar" in reasons[ids[5]]
    for name, words in (("garbage.fits", "not a FITS"), ("missing.h5", "no such file"),
                        ("truncated.fits", "truncated")):
        assert flags[name] & ResultFlag.BAD_INPUT and words in reasons[name]
        assert str(tmp_path / name) in reasons[name]
    # the other stars of the chunk that was refitted one at a time are fine
    good = [i for i in range(40) if ids[i] not in bad]
    assert len(good) == 37 and not np.any(np.isnan(np.asarray(t["teff"][good])))
    with pytest.raises(InputError, match="garbage.fits"):
        load_model_spectra(tmp_path / "run", ["garbage.fits"]).data_for(0)
    assert list(t["input_index"]) == list(range(43))


def test_merge_writes_fits_and_parquet_that_read_back(reference, tmp_path):
    out = reference["out"]
    fits_path = merge(out, tmp_path / "catalog.fits")
    pq_path = merge(out, tmp_path / "catalog.parquet")
    a, b = read_catalog(fits_path), read_catalog(pq_path)
    _assert_same_catalog(a, b)
    _assert_same_catalog(reference["table"], a)
    for name in a.colnames:
        assert str(a[name].unit or "") == str(b[name].unit or ""), name
    assert a.meta["LABELS"] == b.meta["LABELS"]
    with pytest.raises(InputError, match="exists"):
        merge(out, fits_path)
    with pytest.raises(InputError, match="catalog files must end in"):
        merge(out, tmp_path / "catalog.csv")


def test_model_spectra_load_by_id_and_index(data, reference):
    ids = [data["batch"].ids[i] for i in (7, 100, 239)]
    models = load_model_spectra(reference["out"], ids)
    assert models.ids == ids and list(models.input_index) == [7, 100, 239]
    np.testing.assert_array_equal(models.wavelength, data["emu"].wavelength)
    with limited_threads(1):
        direct = fit(data["emu"], read_bundle(data["h5"])[96:112], FitConfig(**FIT_OPTIONS), return_models=True)
    np.testing.assert_array_equal(models.model_flux[1], direct.model_flux[4].astype(np.float32))
    np.testing.assert_array_equal(models.continuum[1], np.ones(data["emu"].n_pixels, dtype=np.float32))
    # the model is a fit to the data: residuals at the noise level
    resid = (data["batch"].flux[[7, 100, 239]] - models.model_flux) * SNR
    assert 0.8 < np.std(resid) < 1.2
    # the observed spectrum as it was fitted, for plots
    wl, flux, ivar, mask = models.data_for(1)
    assert not mask.any()
    np.testing.assert_array_equal(wl, data["emu"].wavelength)
    np.testing.assert_array_equal(flux, data["batch"].flux[100])
    np.testing.assert_array_equal(ivar, data["batch"].ivar[100])
    assert models.sources[1] == str(Path(data["h5"]).resolve()) and models.source_rows[1] == 100
    by_index = load_model_spectra(reference["out"], input_index=[100])
    np.testing.assert_array_equal(by_index.model_flux[0], models.model_flux[1])
    assert by_index.ids == [ids[1]]
    with pytest.raises(InputError, match="no fitted spectrum"):
        load_model_spectra(reference["out"], ["nobody"])


def test_resume_checks_the_run_and_no_resume_starts_over(data, tmp_path):
    small = data["batch"][:2 * CHUNK]
    out = tmp_path / "run"
    first = run_pipeline(data["emu"], small, out, FitConfig(**FIT_OPTIONS), _pcfg())
    again = run_pipeline(data["emu"], small, out, FitConfig(**FIT_OPTIONS), _pcfg())
    assert again.n_chunks_run == 0 and again.n_chunks_skipped == 2 and again.complete
    with pytest.raises(ResumeMismatchError, match="fit_config"):
        run_pipeline(data["emu"], small, out, FitConfig(**FIT_OPTIONS, max_iterations=7), _pcfg())
    with pytest.raises(ResumeMismatchError, match="chunk_size"):
        run_pipeline(data["emu"], small, out, FitConfig(**FIT_OPTIONS), _pcfg(chunk_size=8))
    with pytest.raises(ResumeMismatchError, match="inputs"):
        run_pipeline(data["emu"], data["batch"][:CHUNK], out, FitConfig(**FIT_OPTIONS), _pcfg())
    fresh = run_pipeline(data["emu"], small, out, FitConfig(**FIT_OPTIONS, max_iterations=7), _pcfg(resume=False))
    assert fresh.n_chunks_skipped == 0 and fresh.n_chunks_run == 2 and fresh.run_id != first.run_id
    assert len(list((out / "parts").iterdir())) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    with pytest.raises(InputError, match="not empty"):
        run_pipeline(data["emu"], small, tmp_path / "other", FitConfig(**FIT_OPTIONS), _pcfg())


def test_thread_settings_are_restored_after_an_in_process_run(data, tmp_path):
    from paynekit.pipeline.worker import _get_threads

    before = [v for _, v in _get_threads(False)[0]]
    run_pipeline(data["emu"], data["batch"][:CHUNK], tmp_path / "run", FitConfig(**FIT_OPTIONS),
                 _pcfg(threads_per_worker=1))
    assert [v for _, v in _get_threads(False)[0]] == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_workers_keep_freed_memory_instead_of_faulting_it_in_again():
    """A pool worker's memory settings (keep_freed_memory): arrays of a fit's size allocated and freed 50
    times fault their pages in the first time only, not every time (measured in a fresh process, with and
    without); numpy no longer advises huge pages for them."""
    script = textwrap.dedent("""
        import resource, sys, numpy as np
        from numpy._core import multiarray
        from paynekit.pipeline.worker import keep_freed_memory
        if sys.argv[1] == "1":
            assert keep_freed_memory()
            assert not multiarray._get_madvise_hugepage()
        counts = []
        for _ in range(50):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            a = np.ones((256, 8575))  # 17.6 MB, a chunk's data
            b = a * 2.0
            del a, b
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(counts[0], sum(counts[1:]))
    """)
    runs = [subprocess.run([sys.executable, "-c", script, flag], capture_output=True, text=True, check=True)
            for flag in ("0", "1")]
    (_, again_default), (first, again) = [tuple(map(int, r.stdout.split())) for r in runs]
    # here: 43,000 faults in rounds 2-50 by default; with the settings 8,500 (4 KiB pages) in the first
    # round and 0 after
    assert first > 0 and again * 10 < first and again * 10 < again_default, (first, again, again_default)


def test_pipeline_config_is_validated():
    with pytest.raises(TypeError):
        PipelineConfig(n_workers=2)
    with pytest.raises(InputError, match="unknown PipelineConfig option"):
        PipelineConfig.from_dict({"chunksize": 10})
    for bad in ({"workers": 0}, {"chunk_size": 1.5}, {"device": "tpu"}, {"start_method": "fork"},
                {"model_dtype": "float16"}, {"scheduler": 3}, {"resume": "yes"}):
        with pytest.raises(InputError):
            PipelineConfig(**bad)
    assert PipelineConfig(workers=3).replace(chunk_size=7).to_dict()["chunk_size"] == 7
    assert PipelineConfig().effective_workers("cuda") == 1
