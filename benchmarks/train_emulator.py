"""Benchmark: how fast does paynekit train a 2 x 300 Payne network to a given emulation error on CPU?

The task (issue 2): the per-pixel APOGEE network ``apogee_5label_perpixel_dwarfs_2018.npz`` is the
teacher; 12000 label vectors are drawn uniformly in its [x_min, x_max] box with
``numpy.random.default_rng(20251122)``; the first 2000 train, the next 500 validate, the next 1000
test. A 2 x 300 PayneMLP is trained on CPU and |Δflux| on the 1000 test spectra is reported (median,
95th, 99th percentile) with the wall time, at several time budgets.

Anchor (same task, same machine class): the upstream The Payne trainer needs ~17 minutes (5000 steps)
to reach a median |Δflux| of 1.6e-3 (95th percentile 7.7e-3). Target: that median in at most a third
of the time (340 s) and a clearly lower error at 17 minutes.

Modes: ``separate`` (default) trains once per budget, each with ``time_budget_s`` = that budget so
the learning-rate schedule anneals over it (what a user asking for that budget gets); ``single``
trains once with the largest budget and evaluates the best weights as the clock passes each smaller
budget (cheaper, but the smaller budgets then see a learning rate that has not yet decayed).

Not run by CI. Example::

    python benchmarks/train_emulator.py --budgets 60,120,340,1020 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER = ROOT.parent / "shared" / "data" / "emulators" / "apogee_5label_perpixel_dwarfs_2018.npz"
LABEL_NAMES = ("teff", "logg", "fe_h", "alpha_fe", "v_macro")
DATA_SEED = 20251122
N_DRAW, N_TRAIN, N_VAL, N_TEST = 12000, 2000, 500, 1000
ANCHOR = {"time_s": 17 * 60, "steps": 5000, "median": 1.6e-3, "p95": 7.7e-3}


def make_data(teacher):
    rng = np.random.default_rng(DATA_SEED)
    ls = teacher.label_space
    labels = rng.uniform(ls.x_min, ls.x_max, size=(N_DRAW, ls.x_min.size))
    tr = labels[:N_TRAIN]
    va = labels[N_TRAIN:N_TRAIN + N_VAL]
    te = labels[N_TRAIN + N_VAL:N_TRAIN + N_VAL + N_TEST]
    return (tr, teacher.predict(tr)), (va, teacher.predict(va)), (te, teacher.predict(te))


def test_errors(emulator, test):
    from paynekit.validation import emulation_error

    rep = emulation_error(emulator, test)
    return rep["median"], rep["p95"], rep["p99"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER)
    ap.add_argument("--budgets", default="60,120,340,1020", help="comma-separated time budgets in seconds")
    ap.add_argument("--mode", choices=("separate", "single"), default="separate")
    ap.add_argument("--threads", default=None,
                    help="torch threads: a number, 'auto' (measure 1 vs all during training) or torch's setting")
    ap.add_argument("--learning-rate", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--optimizer", choices=("radam", "adam"), default=None)
    ap.add_argument("--n-components", type=int, default=None)
    ap.add_argument("--loss", choices=("l1", "l2"), default=None)
    ap.add_argument("--activation", choices=("leaky_relu", "sigmoid"), default=None)
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--target-basis", choices=("auto", "pca", "pixels"), default=None)
    ap.add_argument("--seed", type=int, default=0, help="training seed (the data seed is fixed)")
    ap.add_argument("--out", type=Path, default=None, help="write the trained models here")
    args = ap.parse_args(argv)

    import torch

    from paynekit.emulators import load_emulator, save_emulator
    from paynekit.emulators.training import PayneTrainer, TrainConfig

    if not args.teacher.exists():
        sys.exit(f"teacher network not found: {args.teacher} (it lives in ../shared/data)")
    budgets = sorted(float(b) for b in args.budgets.split(","))
    threads = args.threads if args.threads in (None, "auto") else int(args.threads)
    load_before = os.getloadavg()
    t = time.perf_counter()
    teacher = load_emulator(args.teacher, label_names=LABEL_NAMES)
    train, val, test = make_data(teacher)
    t_data = time.perf_counter() - t

    overrides = {k: v for k, v in {"learning_rate": args.learning_rate, "batch_size": args.batch_size,
                                   "optimizer": args.optimizer, "n_components": args.n_components,
                                   "loss": args.loss, "target_basis": args.target_basis,
                                   "activation": args.activation, "weight_decay": args.weight_decay}.items()
                 if v is not None}

    def config(budget):
        return TrainConfig(time_budget_s=budget, max_steps=10**9, num_threads=threads, seed=args.seed,
                           progress=False, **overrides)

    rows = []

    def fit(budget, callback=None):
        trainer = PayneTrainer(config(budget))
        t0 = time.perf_counter()
        trainer.fit(*train, label_space=teacher.label_space, wavelength=teacher.wavelength,
                    validation=val, callback=callback)
        return trainer, time.perf_counter() - t0

    if args.mode == "separate":
        for b in budgets:
            trainer, wall = fit(b)
            h = trainer.history_
            rows.append((b, wall, h["step"][-1], *test_errors(trainer.emulator_, test)))
            if args.out:
                save_emulator(trainer.emulator_, args.out / f"payne_{int(b)}s.npz")
            print(f"budget {b:.0f} s done: {rows[-1]}", file=sys.stderr, flush=True)
    else:
        pending = list(budgets[:-1])

        def snapshot(info):
            while pending and info["time_s"] >= pending[0]:
                b = pending.pop(0)
                rows.append((b, info["time_s"], info["step"], *test_errors(info["best_emulator"](), test)))
                print(f"snapshot at {b:.0f} s: {rows[-1]}", file=sys.stderr, flush=True)
            return False

        trainer, wall = fit(budgets[-1], snapshot)
        rows.append((budgets[-1], wall, trainer.history_["step"][-1], *test_errors(trainer.emulator_, test)))
        if args.out:
            save_emulator(trainer.emulator_, args.out / f"payne_{int(budgets[-1])}s.npz")
    load_after = os.getloadavg()

    cfg = config(budgets[-1])
    print(f"## Training a 2 x {cfg.hidden_sizes[-1]} PayneMLP on CPU ({args.mode} runs)\n")
    print("| budget (s) | wall (s) | steps | median abs(Δflux) | p95 | p99 | median vs anchor |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b, wall, steps, med, p95, p99 in rows:
        print(f"| {b:.0f} | {wall:.0f} | {steps} | {med:.2e} | {p95:.2e} | {p99:.2e} | "
              f"{med / ANCHOR['median']:.2f} |")
    print(f"| upstream trainer (anchor) | ~{ANCHOR['time_s']} | {ANCHOR['steps']} | {ANCHOR['median']:.1e} | "
          f"{ANCHOR['p95']:.1e} | - | 1.00 |")
    first = next((r for r in rows if r[3] <= ANCHOR["median"]), None)
    print()
    if first is not None:
        print(f"Anchor median reached within the {first[0]:.0f} s budget ({first[1]:.0f} s wall, "
              f"{ANCHOR['time_s'] / first[1]:.1f}x faster than the upstream trainer's ~17 min).")
    print(f"Config: activation={cfg.activation}, optimizer={cfg.optimizer}, lr={cfg.learning_rate}, batch={cfg.batch_size}, loss={cfg.loss}, "
          f"schedule={cfg.schedule}, target_basis={cfg.target_basis}, n_components={cfg.n_components}, "
          f"betas={cfg.betas}, weight_decay={cfg.weight_decay}, dtype={cfg.dtype}")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, torch threads {threads or torch.get_num_threads()}; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (shared machine: wall times are noisy). "
          f"Teacher spectra generated in {t_data:.0f} s (not counted).")
    print(f"\nCommand: python {shlex.join(['benchmarks/train_emulator.py', *(argv or sys.argv[1:])])}")


if __name__ == "__main__":
    main()
