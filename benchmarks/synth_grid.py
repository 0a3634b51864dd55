"""Time the demo synthesizer: a grid of N spectra (default 2000) on the 8575-pixel apStar grid.

    python benchmarks/synth_grid.py [--n 2000] [--workers 1 2] [--seed 1]

Prints one row per scipy.fft worker count: wall time, spectra per second, and a checksum of the grid
(identical rows mean identical spectra). The machine is usually shared: compare rows from one run.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from paynekit import synth


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kind", default="mixed", choices=synth.LABEL_KINDS)
    args = ap.parse_args(argv)

    print(f"command: python {' '.join(sys.argv)}")
    t0 = time.perf_counter()
    syn = synth.DemoSynthesizer()
    t_init = time.perf_counter() - t0
    labels = synth.sample_labels(args.n, args.seed, args.kind)
    syn.spectra(labels[:8])  # warm up the FFT plans
    print(f"line list: {syn.line_list.size} lines, built in {t_init:.3f} s")
    print(f"{'workers':>8} {'N':>6} {'wall [s]':>9} {'spectra/s':>10} {'checksum':>18}")
    for w in args.workers:
        syn = synth.DemoSynthesizer(workers=w)
        t0 = time.perf_counter()
        flux = syn.spectra(labels)
        dt = time.perf_counter() - t0
        print(f"{w:>8} {args.n:>6} {dt:>9.2f} {args.n / dt:>10.1f} {float(np.sum(flux)):>18.6f}")


if __name__ == "__main__":
    main()
