"""Survey throughput: N mock APOGEE spectra fitted through ``paynekit fit --out-dir`` (not run by CI).

What it does

1. Base spectra: ``--n-base`` (default 2000) label vectors from :func:`paynekit.synth.sample_labels` and
   their demo-synthesizer spectra on the 8575-pixel apStar grid (made once, cached in ``--work-dir``).
2. Emulator, a 25-label 2 x 300 Payne MLP:
   ``--emulator train`` (default) trains one on the base spectra with
   :class:`paynekit.emulators.training.PayneTrainer` for ``--train-seconds``;
   ``--emulator random`` uses random smooth weights of that shape, and then the base spectra are made by
   that network instead of the synthesizer (so the fits converge as they would on real data);
   ``--emulator FILE`` uses a model file.
3. Inputs: N mock observations (:func:`paynekit.synth.mock_observations`: S/N 50-200, RV +-200 km/s,
   chip gaps, already normalised), each block of ``--n-base`` rows re-using the base spectra with new
   noise and RV draws, written as one chunked HDF5 bundle (float32 flux and ivar).
4. The fit, in a subprocess, through the CLI ``paynekit fit MODEL BUNDLE --out-dir DIR --workers W
   [--device D] [--chunk-size C]`` when the CLI has ``--out-dir``, else the same call through
   ``python -c 'paynekit.pipeline.run_pipeline(...)'`` (the table says which). Default FitConfig:
   RV free in +-500 km/s, 4000 Sobol pre-search points, float32 model evaluation.
5. Measured: wall time (start-up and the pre-search grid included) and spectra per second; the share of
   the workers' chunk time spent inside ``fit()`` (the rest is reading, writing, bookkeeping); peak memory
   of the process tree (sum of RSS of the parent and its workers, sampled with psutil every 0.1 s) and
   the largest single process (same sampling); CPU seconds of all processes
   (``getrusage(RUSAGE_CHILDREN)``), so that spectra per CPU second times the worker count estimates the
   throughput of otherwise idle cores when the machine is shared.

    python benchmarks/throughput.py --n 10000 100000 [--workers 2] [--device cpu|cuda] [--emulator train]

Targets (issue 6): >= 150 spectra/s on 2 CPU cores for 25 labels; peak memory flat in N and < 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SEED = 20251122
HIDDEN = (300, 300)


def _log(msg):
    print(f"[throughput] {msg}", file=sys.stderr, flush=True)


def base_spectra(work: Path, n_base: int, emulator_kind: str, train_seconds: float):
    """(model path, base labels, base flux, how the emulator was made), cached in ``work``."""
    from paynekit.emulators import PayneMLP, load_emulator, save_emulator
    from paynekit.labels import apogee_label_space
    from paynekit.synth import DemoSynthesizer, sample_labels
    from paynekit.wavelength import apstar_wavelength

    wl = apstar_wavelength()
    ls = apogee_label_space()
    labels = sample_labels(n_base, seed=SEED)
    tag = f"{emulator_kind if emulator_kind in ('train', 'random') else 'file'}-{n_base}"
    cache = work / f"base-{tag}.npz"
    model = work / f"model-{tag}.npz"
    if emulator_kind not in ("train", "random"):
        model = Path(emulator_kind)
    if cache.exists() and model.exists():
        with np.load(cache) as d:
            return model, d["labels"], d["flux"], str(d["how"])
    if emulator_kind == "random":
        g = np.random.default_rng(SEED)
        sizes = (len(ls),) + HIDDEN + (wl.size,)
        w = [g.normal(0, 1 / np.sqrt(sizes[k]), (sizes[k + 1], sizes[k])) for k in range(len(sizes) - 1)]
        w[-1] *= 0.05
        b = [g.normal(0, 0.1, s) for s in sizes[1:-1]] + [np.full(wl.size, 0.9)]
        emu = PayneMLP(w, b, ls, wl, activation="leaky_relu")
        save_emulator(emu, model)
        flux = emu.predict(labels)
        how = "random 2x300 weights; spectra made by that network"
    else:
        t0 = time.perf_counter()
        flux = DemoSynthesizer().spectra(labels, wavelength=wl)
        _log(f"synthesized {n_base} spectra in {time.perf_counter() - t0:.0f} s")
        if emulator_kind == "train":
            from paynekit.emulators.training import PayneTrainer, TrainConfig

            t0 = time.perf_counter()
            cfg = TrainConfig(hidden_sizes=HIDDEN, time_budget_s=train_seconds, progress=False, seed=0)
            trainer = PayneTrainer(cfg).fit(labels, flux, label_space=ls, wavelength=wl)
            save_emulator(trainer.emulator_, model)
            resid = trainer.predict(labels[:200]) - flux[:200]
            how = (f"PayneTrainer 2x300, {time.perf_counter() - t0:.0f} s on {n_base} synthesizer spectra "
                   f"(train RMS {np.sqrt(np.mean(resid ** 2)):.4f})")
        else:
            emu = load_emulator(model)
            if len(emu.label_space) != len(ls):
                _log(f"note: {model} has {len(emu.label_space)} labels")
            how = f"model file {model}"
    np.savez(cache, labels=labels, flux=flux.astype(np.float32), how=np.array(how))
    return model, labels, flux.astype(np.float32), how


def write_inputs(path: Path, base_flux, n: int, n_base: int):
    """N mock observations in a chunked HDF5 bundle, block by block (memory bounded by one block)."""
    import h5py

    from paynekit.synth import mock_observations
    from paynekit.wavelength import apstar_wavelength

    if path.exists():
        with h5py.File(path, "r") as fh:
            if fh["flux"].shape[0] == n:
                return
    wl = apstar_wavelength()
    tmp = path.with_suffix(".tmp.h5")
    t0 = time.perf_counter()
    with h5py.File(tmp, "w") as fh:
        fh.create_dataset("wavelength", data=wl)
        flux = fh.create_dataset("flux", (n, wl.size), dtype="f4", chunks=(64, wl.size))
        ivar = fh.create_dataset("ivar", (n, wl.size), dtype="f4", chunks=(64, wl.size))
        ids = fh.create_dataset("ids", (n,), dtype="S12")
        for k, start in enumerate(range(0, n, n_base)):
            m = min(n_base, n - start)
            g = np.random.default_rng(SEED + 1 + k)
            batch, _ = mock_observations(wl, base_flux[:m].astype(np.float64), snr=g.uniform(50, 200, m),
                                         rv=g.uniform(-200, 200, m), continuum=False, chip_gaps=True,
                                         seed=SEED + 1000 + k)
            flux[start:start + m] = batch.flux
            ivar[start:start + m] = batch.usable_ivar()
            ids[start:start + m] = np.array([f"mock{i:07d}" for i in range(start, start + m)], dtype="S12")
    os.replace(tmp, path)
    _log(f"wrote {n} mock spectra to {path} in {time.perf_counter() - t0:.0f} s")


def cli_has_out_dir() -> bool:
    try:
        out = subprocess.run([sys.executable, "-m", "paynekit.cli", "fit", "--help"], check=False, capture_output=True,
                             text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "--out-dir" in out.stdout


def fit_command(model, bundle, out_dir, args, use_cli: bool):
    if use_cli:
        cmd = [sys.executable, "-m", "paynekit.cli", "fit", str(model), str(bundle), "--out-dir", str(out_dir),
               "--workers", str(args.workers), "--chunk-size", str(args.chunk_size), "--device", args.device]
        if args.chi2_tolerance is not None:
            cmd += ["--chi2-tolerance", repr(args.chi2_tolerance)]
        if args.exact_curvature:
            cmd += ["--exact-curvature"]
        return cmd, " ".join(["paynekit"] + cmd[3:])
    options = {} if args.chi2_tolerance is None else {"chi2_tolerance": args.chi2_tolerance}
    if args.exact_curvature:
        options["lm_hidden_curvature"] = False
    fit_config = f"FitConfig(**{options!r})"
    code = ("from paynekit.fitting import FitConfig\n"
            "from paynekit.pipeline import PipelineConfig, run_pipeline\n"
            "if __name__ == '__main__':\n"
            f"    s = run_pipeline({str(model)!r}, [{str(bundle)!r}], {str(out_dir)!r}, {fit_config},\n"
            f"        PipelineConfig(workers={args.workers}, chunk_size={args.chunk_size}, device={args.device!r},"
            f" threads_per_worker={args.threads_per_worker}, progress=False))\n"
            "    print('SUMMARY', s.n_rows, s.n_bad, s.seconds)\n")
    return [sys.executable, "-c", code], "python -c 'run_pipeline(...)' (CLI has no --out-dir yet)"


def run_measured(cmd):
    """Run ``cmd``; return (wall s, peak RSS of the process tree in bytes, largest RSS of one process, stdout).

    Both sampled with psutil every 0.1 s. (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is no measure here: a
    child created by fork counts the parent's pages until it execs, so it reports this benchmark's own
    memory, which holds the mock spectra.)
    """
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = largest = 0
    stop = threading.Event()

    def sample():
        nonlocal peak, largest
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                    except psutil.NoSuchProcess:
                        continue
                    total += rss
                    largest = max(largest, rss)
                peak = max(peak, total)
            except psutil.NoSuchProcess:
                return
            stop.wait(0.1)

    t0 = time.perf_counter()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"the fit failed (exit {proc.returncode}):\n{out}")
    return wall, peak, largest, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2000], help="numbers of spectra to fit (one run each)")
    ap.add_argument("--n-base", type=int, default=2000, help="distinct base spectra (re-used with new noise/RV)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--chi2-tolerance", type=float, default=None,
                    help="passed to paynekit fit (default: FitConfig's; the targets are for the default)")
    ap.add_argument("--exact-curvature", action="store_true",
                    help="passed to paynekit fit: every step with the exact curvature (the default until "
                         "2026-12)")
    ap.add_argument("--emulator", default="train", help="'train', 'random' or a model file")
    ap.add_argument("--train-seconds", type=float, default=180.0)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/paynekit-throughput"))
    ap.add_argument("--entry", choices=("auto", "cli", "python"), default="auto")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    args = ap.parse_args(argv)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    model, _, base_flux, how = base_spectra(args.work_dir, args.n_base, args.emulator, args.train_seconds)
    use_cli = args.entry == "cli" or (args.entry == "auto" and cli_has_out_dir())
    rows = []
    for n in args.n:
        bundle = args.work_dir / f"mock-{args.emulator if args.emulator in ('train', 'random') else 'file'}-{n}.h5"
        write_inputs(bundle, base_flux, n, args.n_base)
        out_dir = args.work_dir / f"run-{n}"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        cmd, shown = fit_command(model, bundle, out_dir, args, use_cli)
        _log(f"fitting {n} spectra: {shown}")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall, peak, largest, _ = run_measured(cmd)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        manifest = json.loads((out_dir / "manifest.json").read_text())
        done, bad = manifest["n_rows_done"], manifest["n_bad_done"]
        in_fit = manifest.get("fit_seconds", 0.0) / max(manifest.get("chunk_seconds", 0.0), 1e-9)
        rows.append((n, done, bad, wall, n / wall, cpu, n / cpu, in_fit, peak / 2**30, largest / 2**30, shown))
        _log(f"N={n}: {wall:.0f} s, {n / wall:.1f} spectra/s, {n / cpu:.2f} spectra per CPU s, "
             f"peak RSS {peak / 2**30:.2f} GB, {bad} flag_bad")
        if not args.keep:
            shutil.rmtree(out_dir)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nEmulator: 25 labels, 2x300, {how}. Device {args.device}, {args.workers} worker(s) x "
          f"{args.threads_per_worker} thread(s), chunk {args.chunk_size}, chi2 tolerance "
          f"{'FitConfig default' if args.chi2_tolerance is None else args.chi2_tolerance}, "
          f"{'exact' if args.exact_curvature else 'hidden-layer (FitConfig default)'} curvature. "
          f"Load average at the end: {load:.1f} "
          f"on {os.cpu_count()} cores.\n")
    print("| N spectra | fitted | flag_bad | wall (s) | spectra/s | CPU s (all processes) | spectra per CPU s | "
          "worker time in fit() | peak RSS, process tree (GB) | largest process (GB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, done, bad, wall, rate, cpu, per_cpu, in_fit, peak, child, _ in rows:
        print(f"| {n} | {done} | {bad} | {wall:.1f} | {rate:.1f} | {cpu:.0f} | {per_cpu:.2f} | {in_fit:.0%} | "
              f"{peak:.2f} | {child:.2f} |")
    print(f"\nOn a loaded machine, spectra/s x (cores / load) is unknowable; spectra per CPU second times "
          f"{args.workers} is what {args.workers} otherwise idle cores would give (start-up included).")
    print(f"\nfit command: {rows[-1][-1] if rows else ''}")
    print("benchmark command: python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
