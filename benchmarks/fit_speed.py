"""Fitting speed and accuracy: the batched optimiser against the scipy reference (not run by CI).

Two tasks:

1. **5-label teacher task** (the foundation benchmark's): the per-pixel network
   ``../shared/data/emulators/apogee_5label_perpixel_dwarfs_2018.npz`` is the teacher; 12000 label vectors
   drawn uniformly in its box with ``default_rng(20251122)``: the first 2000 train, the next 500 validate,
   the next 1000 test. The emulator is a 2 x 300 PayneMLP trained on the 2000 by
   ``paynekit.emulators.training.PayneTrainer`` (``--train-seconds``, validated on the 500), or one given
   with ``--emulator FILE``; without a trainer the teacher itself is used (the output says which). The 1000 test spectra
   (teacher flux + Gaussian noise at S/N 100, rest frame) are fitted by both optimisers with the default
   FitConfig (RV free in +-500 km/s, 4000 Sobol pre-search points, float32 model in the batched optimiser).
2. **22-label optical task**: spectra of ``optical_22label_mlp_giants_4000-5000.npz`` at labels from its
   validation set, convolved to R = 2000 and sampled at 3 pixels per FWHM on a log grid, shifted by a
   random RV in +-300 km/s, S/N 100; fitted with that network (LSF R = 2000, RV free).

Reported: ms per spectrum of each optimiser (the pre-search, identical for both, included; the one-off
Sobol grid build shown apart), their ratio, and per-label bias and RMS against the truth. The batched
optimiser runs ``--repeat`` times (3; the machines here are shared and one run varies by +-10 %): the median
is its time, each run is listed, and the runs must give the identical catalog. scipy runs once.

    python benchmarks/fit_speed.py [--n-test 1000] [--n-optical 200] [--emulator FILE | --train-seconds 300
                                   [--save-emulator FILE]] [--skip-optical] [--skip-apogee] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from paynekit.emulators import load_emulator
from paynekit.fitting import FitConfig, fit, presearch_grid
from paynekit.instrument import DopplerResampler, GaussianLSF

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TEACHER = SHARED / "emulators" / "apogee_5label_perpixel_dwarfs_2018.npz"
OPTICAL = SHARED / "emulators" / "optical_22label_mlp_giants_4000-5000.npz"
NAMES_5 = ("teff", "logg", "fe_h", "alpha_fe", "v_macro")
SEED = 20251122
N_DRAW, N_TRAIN, N_VAL = 12000, 2000, 500


def _warm_up(emulator, small, config, grid):
    """One fit of a few spectra first, timed apart: numba loads (or compiles) its kernels once per process."""
    t0 = time.perf_counter()
    fit(emulator, small, config, presearch_grid=grid)
    return time.perf_counter() - t0


def _timed_fit(emulator, spectra, config, grid, repeat=1):
    """(table, median seconds, all seconds) of ``repeat`` fits; the tables must be identical (determinism)."""
    times, table = [], None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        t = fit(emulator, spectra, config, presearch_grid=grid)
        times.append(time.perf_counter() - t0)
        if table is not None:
            for name in t.colnames:
                a, b = np.asarray(t[name]), np.asarray(table[name])
                same = np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
                if not same:
                    raise RuntimeError(f"repeated fit gave a different column {name!r}: not deterministic")
        table = t
    return table, float(np.median(times)), times


def _grid(emulator, wavelength, config, medium="vacuum"):
    t0 = time.perf_counter()
    grid = presearch_grid(emulator, wavelength, config, wavelength_medium=medium)
    return grid, time.perf_counter() - t0


def _stats_rows(table, truth, names, show):
    rows = []
    for j, n in enumerate(names):
        if n not in show:
            continue
        d = np.asarray(table[n]) - truth[:, j]
        d = d[np.isfinite(d)]
        rows.append(
            (n, float(np.mean(d)), float(np.sqrt(np.mean(d**2))), float(np.nanmedian(table[f"raw_e_{n}"])))
        )
    return rows


def _report(title, n, grid_s, results, truth, names, show, v_true=None, warm_s=None):
    print(f"\n## {title}\n")
    print(
        f"spectra: {n}; Sobol pre-search grid built once in {grid_s:.2f} s "
        f"({1e3 * grid_s / n:.2f} ms/spectrum "
        "if not reused)"
    )
    if warm_s is not None:
        print(f"one-off start-up, not in the times below: a first fit of 4 spectra took {warm_s:.2f} s "
              "(numba's compiled kernels loaded from its cache, or compiled on a first run)")
    base = results["scipy"][1]
    print("\n| optimiser | ms/spectrum | ratio to scipy | failed | runs (ms/spectrum each) |")
    print("|---|---|---|---|---|")
    for name, (t, secs, times) in results.items():
        each = ", ".join(f"{1e3 * x / n:.2f}" for x in times)
        print(f"| {name} | {1e3 * secs / n:.2f} | {base / secs:.1f}x faster | {int(np.sum(t['flag_bad']))} | "
              f"{len(times)}: {each} |")
    if any(len(v[2]) > 1 for v in results.values()):
        print("\n(with several runs: the median is the time, and every run gave the identical catalog)")
    print("\n| label | " + " | ".join(f"{k} bias | {k} RMS" for k in results) + " | median formal error |")
    print("|---|" + "---|---|" * len(results) + "---|")
    per = {k: _stats_rows(t, truth, names, show) for k, (t, _, _) in results.items()}
    for i, label in enumerate([r[0] for r in per["scipy"]]):
        cells = " | ".join(f"{per[k][i][1]:.4g} | {per[k][i][2]:.4g}" for k in results)
        print(f"| {label} | {cells} | {per['batched'][i][3]:.4g} |")
    if v_true is not None:
        cells = " | ".join(
            f"{np.mean(t['v_rel'] - v_true):.3g} | {np.sqrt(np.mean((t['v_rel'] - v_true) ** 2)):.3g}"
            for t, _, _ in results.values()
        )
        print(f"| v_rel (km/s) | {cells} | {np.nanmedian(results['batched'][0]['e_v_rel']):.3g} |")
        dv = np.asarray(results["batched"][0]["v_rel"]) - v_true
        print(
            f"\nbatched v_rel - truth: robust sigma (1.4826 MAD) {1.4826 * np.median(np.abs(dv - np.median(dv))):.3g} "
            f"km/s, |dv| > 1 km/s for {int(np.sum(np.abs(dv) > 1))} of {dv.size}"
        )
    tb, ts = results["batched"][0], results["scipy"][0]
    diffs = []
    for label in show:
        diffs.append(np.abs(np.asarray(tb[label]) - np.asarray(ts[label])) / np.asarray(tb[f"raw_e_{label}"]))
    diffs = np.concatenate(diffs)
    diffs = diffs[np.isfinite(diffs)]
    print(
        f"\n|batched - scipy| / formal error over all spectra and labels: median {np.median(diffs):.3g}, "
        f"99th percentile {np.percentile(diffs, 99):.3g}, largest {diffs.max():.3g}"
    )


def five_label(args):
    teacher = load_emulator(TEACHER, label_names=NAMES_5)
    ls = teacher.label_space
    rng = np.random.default_rng(SEED)
    labels = ls.x_min + ls.span * rng.uniform(size=(N_DRAW, ls.x_min.size))
    test = labels[N_TRAIN + N_VAL : N_TRAIN + N_VAL + args.n_test]
    if args.emulator:
        emulator = load_emulator(args.emulator, label_names=NAMES_5)
        note = f"{args.emulator} ({type(emulator).__name__}, given with --emulator)"
    else:
        try:
            from paynekit.emulators.training import PayneTrainer, TrainConfig
        except ImportError:
            PayneTrainer = None
        if PayneTrainer is None:
            emulator = teacher
            note = "the teacher itself (no --emulator given and no PayneTrainer in this paynekit)"
        else:
            train, val = labels[:N_TRAIN], labels[N_TRAIN : N_TRAIN + N_VAL]
            t0 = time.perf_counter()
            cfg = TrainConfig(time_budget_s=args.train_seconds, progress=False)
            trainer = PayneTrainer(cfg).fit(
                train,
                teacher.predict(train),
                label_space=ls,
                wavelength=teacher.wavelength,
                validation=(val, teacher.predict(val)),
            )
            emulator = trainer.emulator_
            err = np.abs(emulator.predict(test) - teacher.predict(test))
            note = (
                f"PayneMLP {emulator.hidden_sizes} trained by PayneTrainer on the 2000 for "
                f"{time.perf_counter() - t0:.0f} s; test median |dflux| {np.median(err):.2e}, "
                f"95th percentile {np.percentile(err, 95):.2e}"
            )
            if args.save_emulator:
                from paynekit.emulators import save_emulator

                save_emulator(emulator, args.save_emulator)
    flux = teacher.predict(test)
    noise_rng = np.random.default_rng(SEED + 1)
    sigma = 1.0 / 100.0
    data = flux + noise_rng.normal(0, sigma, flux.shape)
    ivar = np.full(flux.shape, 1 / sigma**2)
    spectra = (teacher.wavelength, data, ivar)
    config = FitConfig()
    grid, grid_s = _grid(emulator, teacher.wavelength, config)
    warm_s = _warm_up(emulator, (teacher.wavelength, data[:4], ivar[:4]), config, grid)
    results = {}
    results["batched"] = _timed_fit(emulator, spectra, config, grid, args.repeat)
    results["scipy"] = _timed_fit(emulator, spectra, config.replace(optimizer="scipy"), grid)
    print(f"emulator: {note}")
    _report(
        "5-label teacher task (APOGEE, 7214 px, S/N 100, RV free +-500 km/s)",
        len(test),
        grid_s,
        results,
        test,
        NAMES_5,
        NAMES_5,
        v_true=np.zeros(len(test)),
        warm_s=warm_s,
    )


def optical(args):
    emu = load_emulator(OPTICAL)
    names = emu.label_names
    with np.load(OPTICAL) as f:
        pool = f["validation_labels"].astype(np.float64)
    rng = np.random.default_rng(SEED)
    truth = pool[rng.choice(pool.shape[0], args.n_optical, replace=False)]
    truth = np.clip(truth, emu.label_space.x_min, emu.label_space.x_max)
    r_power = 2000.0
    # data grid: log-uniform at 3 pixels per FWHM, inside the model's range, air wavelengths like the model
    dln = 1.0 / (3.0 * r_power)
    lo, hi = emu.wavelength[0] * 1.01, emu.wavelength[-1] / 1.01
    wl = lo * np.exp(dln * np.arange(int(np.log(hi / lo) / dln)))
    v_true = rng.uniform(-300, 300, args.n_optical)
    conv = GaussianLSF(r_power).convolve(emu.wavelength, emu.predict(truth))
    flux = DopplerResampler(emu.wavelength, wl).apply(conv[:, None, :], v_true)[:, 0, :]
    sigma = 1.0 / 100.0
    data = flux + rng.normal(0, sigma, flux.shape)
    from paynekit.spectra import SpectrumBatch

    batch = SpectrumBatch(
        wl, data, np.full(flux.shape, 1 / sigma**2), meta=[{"wavelength_medium": "air"}] * args.n_optical
    )
    config = FitConfig(resolution=r_power)
    grid, grid_s = _grid(emu, wl, config, "air")
    small = SpectrumBatch(
        wl, data[:4], np.full((4, wl.size), 1 / sigma**2), meta=[{"wavelength_medium": "air"}] * 4
    )
    warm_s = _warm_up(emu, small, config, grid)
    results = {}
    results["batched"] = _timed_fit(emu, batch, config, grid, args.repeat)
    results["scipy"] = _timed_fit(emu, batch, config.replace(optimizer="scipy"), grid)
    show = ("teff", "logg", "mh", "cm", "nm", "om", "mgm", "sim", "cam", "tim")
    _report(
        f"22-label optical task (R = 2000, {wl.size} px log grid, S/N 100, RV in +-300 km/s)",
        args.n_optical,
        grid_s,
        results,
        truth,
        names,
        show,
        v_true=v_true,
        warm_s=warm_s,
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--n-optical", type=int, default=200)
    parser.add_argument("--emulator", help="a trained 5-label emulator file (default: train one)")
    parser.add_argument("--train-seconds", type=float, default=300.0, help="PayneTrainer time budget")
    parser.add_argument("--save-emulator", help="write the trained emulator here (reuse with --emulator)")
    parser.add_argument("--skip-optical", action="store_true")
    parser.add_argument("--skip-apogee", action="store_true")
    parser.add_argument("--repeat", type=int, default=3,
                        help="batched fits per task (median time reported; scipy runs once)")
    args = parser.parse_args()
    if not TEACHER.exists():
        sys.exit(f"needs the shared data folder ({SHARED})")
    print("# paynekit fit speed\n")
    print("command: python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]))
    print(
        f"machine: {os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f} at start "
        "(timings on a shared machine: compare the ratios)"
    )
    if not args.skip_apogee:
        five_label(args)
    if not args.skip_optical:
        optical(args)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
