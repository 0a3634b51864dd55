"""``paynekit demo``: the whole job on built-in data, end to end, in a few minutes on 2 cores.

1. synthesize a training grid with the demonstration synthesizer (:mod:`paynekit.synth`);
2. train a 2 x 300 Payne network on it (PyTorch, CPU);
3. validate the emulator on held-out synthetic spectra;
4. make mock observations (S/N 50-200, RV +-200 km/s, a smooth continuum per chip, chip gaps) and fit them
   with the batched optimiser (labels, RV and a Chebyshev continuum at once);
5. print and write a recovery table (bias and RMS per label against the truth), the catalog, and an
   HTML report.

Everything is seeded and training is limited by a number of steps (``train_steps``), not by the clock, so
the same configuration gives the same files on the same machine. ``train_time_s`` (off by default) caps the
training time; with it the learning-rate schedule follows the clock whenever the time fraction is ahead (at
the start, while the data are prepared), so the network and the catalog then depend on the machine's speed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and seeds of the demo. None in the constructor means the default."""

    n_train: int = 2000
    n_validate: int = 300
    n_fit: int = 200
    seed: int = 20251122
    train_steps: int = 18000  # ~3 min on this project's 2-core machines (~100 steps/s)
    train_time_s: float | None = None  # optional cap; it makes the result depend on the machine's speed
    snr_range: tuple = (50.0, 200.0)
    rv_max: float = 200.0
    continuum_degree: int = 2
    n_report_fits: int = 3

    def __init__(self, **kwargs):
        names = {f.name for f in fields(self)}
        unknown = set(kwargs) - names
        if unknown:
            from .errors import InputError

            raise InputError(f"unknown DemoConfig option(s) {sorted(unknown)}; known: {sorted(names)}")
        for f in fields(self):
            value = kwargs.get(f.name)
            object.__setattr__(self, f.name, f.default if value is None else value)


def _recovery_table(names, truth, table):
    rows = []
    good = ~np.asarray(table["flag_bad"], bool)
    for j, name in enumerate(names):
        d = np.asarray(table[name], float)[good] - truth[good, j]
        rows.append((name, float(np.mean(d)), float(np.sqrt(np.mean(d**2))),
                     float(np.median(np.asarray(table[f"e_{name}"], float)[good]))))
    return rows


def _format_rows(header, rows, fmt):
    widths = [max(len(h), 10) for h in header]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    for row in rows:
        out.append("  ".join((fmt[i] % v if isinstance(v, float) else str(v)).rjust(widths[i])
                             for i, v in enumerate(row)))
    return "\n".join(out)


def run_demo(out_dir, config: DemoConfig | None = None, *, echo=None) -> dict:
    """Run the demo into ``out_dir``; returns a summary dict (also written as summary.json)."""
    from astropy.table import Table

    from .catalog import write_catalog
    from .emulators.formats import save_emulator
    from .emulators.training import PayneTrainer, TrainConfig
    from .fitting import FitConfig, fit
    from .grids import TrainingGrid, write_grid
    from .instrument import ChebyshevContinuum
    from .report import write_report
    from .synth import DemoSynthesizer, mock_observations, sample_labels
    from .validation import emulation_error, format_validation_table, write_validation_json

    cfg = config or DemoConfig()
    say = echo or (lambda *a, **k: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings = {}

    # 1. grid -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    synth = DemoSynthesizer()
    n_grid = cfg.n_train + cfg.n_validate
    labels = sample_labels(n_grid, seed=cfg.seed)
    flux = synth.spectra(labels)
    grid = TrainingGrid(labels=labels, label_names=synth.label_names, wavelength=synth.wavelength, flux=flux)
    grid_path = write_grid(grid, out / "grid.h5")
    timings["synthesize"] = time.perf_counter() - t0
    say(f"[1/5] synthesized {n_grid} spectra x {synth.n_pixels} pixels, {synth.n_labels} labels "
        f"in {timings['synthesize']:.1f} s -> {grid_path}")

    # 2. train ----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    train, valid = grid.subset(np.arange(cfg.n_train)), grid.subset(np.arange(cfg.n_train, n_grid))
    trainer = PayneTrainer(TrainConfig(max_steps=cfg.train_steps, time_budget_s=cfg.train_time_s, seed=cfg.seed,
                                       progress=False))
    trainer.fit(train.labels, train.flux, label_space=synth.label_space, wavelength=synth.wavelength,
                validation=(valid.labels, valid.flux))
    emulator = trainer.emulator_
    model_path = save_emulator(emulator, out / "model.npz", training_set_hash=grid.hash())
    timings["train"] = time.perf_counter() - t0
    stopped = emulator.meta.get("stopped_because", "")
    steps = int(trainer.history_["step"][-1]) if len(trainer.history_["step"]) else 0
    say(f"[2/5] trained {emulator} for {steps} steps in {timings['train']:.0f} s -> {model_path}")
    if stopped == "time_budget_s":
        say(f"      note: training reached the {cfg.train_time_s:g} s cap before {cfg.train_steps} steps; "
            "this model (and the catalog) depends on the machine's speed")

    # 3. validate ---------------------------------------------------------------------------------
    report = emulation_error(emulator, valid)
    write_validation_json(report, out / "validation.json")
    say("[3/5] emulation error on the held-out grid spectra:")
    say(format_validation_table(report))

    # 4. mock observations and fit ----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed + 1)
    truth = sample_labels(cfg.n_fit, seed=cfg.seed + 2, label_space=synth.label_space)
    snr = rng.uniform(*cfg.snr_range, cfg.n_fit)
    rv = rng.uniform(-cfg.rv_max, cfg.rv_max, cfg.n_fit)
    ids = [f"mock-{i:04d}" for i in range(cfg.n_fit)]
    batch, _ = mock_observations(synth.wavelength, synth.spectra(truth), snr=snr, rv=rv, continuum=True,
                                 seed=cfg.seed + 3, ids=ids)
    fit_config = FitConfig(continuum=ChebyshevContinuum(degree=cfg.continuum_degree), seed=cfg.seed)
    result = fit(emulator, batch, fit_config, return_models=True)
    table = result.table
    timings["fit"] = time.perf_counter() - t0
    catalog_path = write_catalog(table, out / "catalog.fits", overwrite=True)
    say(f"[4/5] fitted {cfg.n_fit} mock observations (S/N {cfg.snr_range[0]:.0f}-{cfg.snr_range[1]:.0f}, "
        f"RV +-{cfg.rv_max:.0f} km/s, continuum) in {timings['fit']:.1f} s "
        f"({1e3 * timings['fit'] / cfg.n_fit:.1f} ms per spectrum) -> {catalog_path}")

    names = list(emulator.label_names)
    rows = _recovery_table(names, truth, table)
    good = ~np.asarray(table["flag_bad"], bool)
    dv = np.asarray(table["v_rel"], float)[good] - rv[good]
    rows.append(("v_rel", float(np.mean(dv)), float(np.sqrt(np.mean(dv**2))),
                 float(np.median(np.asarray(table["e_v_rel"], float)[good]))))
    say(f"[5/5] recovery against the truth ({int(good.sum())} of {cfg.n_fit} fits not flagged bad):")
    say(_format_rows(("label", "bias", "rms", "median e_"), rows, ("%s", "%.4g", "%.4g", "%.4g")))

    reference = Table({"id": ids, **{n: truth[:, j] for j, n in enumerate(names)}, "v_rel": rv, "snr": snr})
    write_catalog(reference, out / "truth.fits", overwrite=True)
    fits = []
    for i in range(min(cfg.n_report_fits, cfg.n_fit)):
        fits.append((ids[i], result.wavelength, batch.flux[i], batch.ivar[i], result.model_flux[i], batch.mask[i],
                     {n: float(table[n][i]) for n in ("teff", "logg", "fe_h")}))
    index = write_report(table, out / "report", reference=reference, emulator=emulator, validation=report,
                         history=trainer.history_, fits=fits, title="paynekit demo")
    summary = {
        "config": asdict(cfg), "timings_s": timings, "total_s": time.perf_counter() - t_start,
        "training": {"steps": steps, "stopped_because": stopped},
        "emulation_error": {k: report[k] for k in ("median", "p95", "p99") if k in report},
        "recovery": {r[0]: {"bias": r[1], "rms": r[2], "median_e": r[3]} for r in rows},
        "files": {"grid": str(grid_path), "model": str(model_path), "catalog": str(catalog_path),
                  "report": str(index)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    say(f"report: {index}\ntotal {summary['total_s']:.0f} s")
    return summary


__all__ = ["DemoConfig", "run_demo"]
