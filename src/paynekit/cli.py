"""The ``paynekit`` command line. Each subcommand builds the same config dataclasses as the Python API.

Errors a user can cause (bad files, bad arguments) print one line ``paynekit: error: ...`` and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import PaynekitError

log = logging.getLogger("paynekit")

#: `paynekit fit` with one input file reads it up front (to fail with one line) only below this size.
SINGLE_FILE_CHECK_BYTES = 64 * 2**20


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on error")


# -- demo -------------------------------------------------------------------------------------------
def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo
    from .pipeline.worker import keep_freed_memory

    keep_freed_memory()  # this process only fits (and trains): reuse freed memory, see there
    cfg = DemoConfig(n_train=args.n_train, n_fit=args.n_fit, seed=args.seed, train_steps=args.train_steps,
                     train_time_s=args.train_time)
    run_demo(Path(args.out), cfg, echo=print)
    return 0


# -- train / validate -----------------------------------------------------------------------------------
def _cmd_train(args) -> int:
    from .emulators.formats import save_emulator
    from .emulators.training import TrainConfig, train_payne
    from .grids import read_grid

    grid = read_grid(args.grid)
    options = {"hidden_sizes": tuple(args.hidden), "activation": args.activation, "optimizer": args.optimizer,
               "loss": args.loss, "seed": args.seed, "device": args.device, "progress": not args.quiet,
               "learning_rate": args.learning_rate, "batch_size": args.batch_size, "max_epochs": args.max_epochs,
               "max_steps": args.max_steps, "time_budget_s": args.time_budget,
               "validation_fraction": args.validation_fraction}
    cfg = TrainConfig(**{k: v for k, v in options.items() if v is not None})  # None: TrainConfig's default
    emulator, history = train_payne(grid, cfg, checkpoint=args.checkpoint, resume=args.resume)
    path = save_emulator(emulator, args.output)
    best = min(history["val_loss"]) if history.get("val_loss") else float("nan")
    print(f"wrote {path} ({emulator}); best validation loss {best:.3e}")
    return 0


def _cmd_validate(args) -> int:
    from .emulators.formats import load_emulator
    from .grids import read_grid
    from .validation import emulation_error, format_validation_table, write_validation_json

    emulator = load_emulator(args.model, trust_pickle=args.trust_pickle)
    report = emulation_error(emulator, read_grid(args.grid))
    print(format_validation_table(report))
    if args.json:
        write_validation_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


# -- fit / merge ---------------------------------------------------------------------------------------
def _parse_freeze(items) -> dict:
    from .errors import InputError

    frozen = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            frozen[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"--freeze expects name=value (a number), got {item!r}") from None
    return frozen


def _parse_continuum(values):
    from .errors import InputError
    from .instrument import ChebyshevContinuum, NoContinuum

    if not values or values[0] == "none":
        if values and len(values) > 1:
            raise InputError(f"--continuum none takes no degree, got {values!r}")
        return NoContinuum()
    if values[0] != "chebyshev":
        raise InputError(f"--continuum must be 'none' or 'chebyshev DEG', got {values!r}")
    try:
        degree = int(values[1]) if len(values) > 1 else 2
    except ValueError:
        raise InputError(f"--continuum chebyshev expects an integer degree, got {values[1]!r}") from None
    return ChebyshevContinuum(degree=degree)


def fit_config_from_args(args):
    """The FitConfig that ``paynekit fit`` arguments describe (one source of truth with the Python API)."""
    from .fitting import FitConfig

    options = {"optimizer": args.optimizer, "rv_range": args.rv_range, "continuum": _parse_continuum(args.continuum),
               "resolution": args.resolution, "frozen": _parse_freeze(args.freeze), "seed": args.seed}
    if args.chi2_tolerance is not None:
        options["chi2_tolerance"] = args.chi2_tolerance
    if args.exact_curvature:
        options["lm_hidden_curvature"] = False
    if args.noise_model:
        options["noise_model"] = args.noise_model
    if args.mask:
        options["pixel_mask_file"] = args.mask
    if args.device:
        options["device"] = args.device
        if args.device == "cuda":
            options["backend"] = "torch"
    return FitConfig(**options)


def _check_single_survey_file(inputs, emulator, visits) -> None:
    """A single survey file that cannot be fitted is an error (one line), not a catalog of one bad row.

    In a batch the same problem becomes a flagged row and the other files are fitted.
    """
    from .errors import InputError
    from .io import read_spectra

    if len(inputs) != 1 or not Path(inputs[0]).is_file():
        return
    if Path(inputs[0]).stat().st_size > SINGLE_FILE_CHECK_BYTES:  # a large bundle: the pipeline streams it
        return
    result = read_spectra(inputs, visits=visits, resample_to=emulator)
    if not result.spectra and result.failures:  # nothing in the file can be fitted
        raise InputError(result.failures[0].reason)


def _cmd_fit(args) -> int:
    from .emulators.formats import load_emulator
    from .errors import InputError
    from .pipeline import PipelineConfig, merge, run_pipeline
    from .pipeline.worker import keep_freed_memory

    keep_freed_memory()  # chunks fitted in this process (--workers 1) too
    if not args.output and not args.out_dir:
        raise InputError("give -o CATALOG (.fits or .parquet), --out-dir DIR, or both")
    emulator = load_emulator(args.model, trust_pickle=args.trust_pickle)
    config = fit_config_from_args(args)
    _check_single_survey_file(args.inputs, emulator, args.visits)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.output).with_name(Path(args.output).stem + "_run")
    pcfg = PipelineConfig(workers=args.workers, chunk_size=args.chunk_size, resume=args.resume,
                          scheduler=args.scheduler, device=args.device, visits=args.visits,
                          progress=not args.quiet)
    summary = run_pipeline(emulator, list(args.inputs), out_dir, config=config, pipeline_config=pcfg)
    print(f"fitted {summary.n_rows_run} spectra in {summary.seconds:.1f} s "
          f"({summary.spectra_per_second:.1f} spectra/s, {summary.executor}); "
          f"{summary.n_rows} rows in {out_dir}, {summary.n_bad} flagged bad")
    if args.output:
        path = merge(out_dir, args.output, overwrite=True)
        print(f"wrote {path}")
    return 0


def _cmd_merge(args) -> int:
    from .pipeline import merge

    path = merge(args.run_dir, args.output, overwrite=True, allow_partial=args.allow_partial)
    print(f"wrote {path}")
    return 0


def _cmd_report(args) -> int:
    from .report import write_report

    emulator = None
    if args.model:
        from .emulators.formats import load_emulator

        emulator = load_emulator(args.model)
    index = write_report(args.catalog, args.output, reference=args.reference, emulator=emulator,
                         validation=args.validation, history=args.history, id_column=args.id_column,
                         title=args.title)
    print(f"wrote {index}")
    return 0


def _cmd_plot_fit(args) -> int:
    import numpy as np

    from .catalog import read_catalog
    from .pipeline import load_model_spectra
    from .plots import plot_fit

    models = load_model_spectra(args.run_dir, [args.id])
    table = read_catalog(args.catalog) if args.catalog else None
    labels, flags = None, None
    if table is not None:
        row = table[np.asarray(table["id"]).astype(str) == args.id]
        if len(row):
            labels = {n: float(row[n][0]) for n in ("teff", "logg", "fe_h") if n in row.colnames}
            flags = str(row["flag_reason"][0]) if "flag_reason" in row.colnames else None
    wl, flux, ivar, mask = models.data_for(0)  # the observed spectrum, on the grid it was fitted on
    plot_fit(wl, flux, ivar, models.model_flux[0], mask=mask, labels=labels, flags=flags, title=args.id,
             path=args.output)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paynekit", description="Stellar labels from spectra (The Payne, The Cannon)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthesize, train, validate and fit on built-in data")
    p.add_argument("--out", default="paynekit-demo", help="output folder (default ./paynekit-demo)")
    p.add_argument("--n-train", type=int, default=None, help="grid size (default from DemoConfig)")
    p.add_argument("--n-fit", type=int, default=None, help="number of mock observations to fit")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default from DemoConfig)")
    p.add_argument("--train-time", type=float, default=None,
                   help="cap on the training time in seconds (off by default: with it the result depends on the machine's speed)")
    p.add_argument("--seed", type=int, default=None)
    _add_common(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train a Payne network on a grid file (HDF5)")
    p.add_argument("grid", help="training grid (HDF5: labels, label_names, wavelength, flux[, ivar])")
    p.add_argument("-o", "--output", required=True, help="model file to write (.npz)")
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 300], help="hidden layer sizes (default 300 300)")
    p.add_argument("--activation", choices=["leaky_relu", "sigmoid"], default="leaky_relu")
    p.add_argument("--optimizer", choices=["radam", "adam"], default="radam")
    p.add_argument("--loss", choices=["l1", "l2"], default=None, help="default: TrainConfig's")
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--validation-fraction", type=float, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="checkpoint file (written during training)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("validate", help="emulation error of a model on a grid")
    p.add_argument("model")
    p.add_argument("grid")
    p.add_argument("--json", default=None, help="write the full report as JSON")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled (Astra) model")
    _add_common(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("fit", help="fit labels to spectra (bundles or survey files); resumable, parallel")
    p.add_argument("model", help="emulator file (paynekit npz, upstream Payne npz, Cannon model)")
    p.add_argument("inputs", nargs="+", help="npz/HDF5 bundles, survey files, globs or folders")
    p.add_argument("-o", "--output", default=None, help="catalog to write (.fits or .parquet)")
    p.add_argument("--out-dir", default=None,
                   help="run folder (resumable store); default <catalog name>_run beside the catalog")
    p.add_argument("--optimizer", choices=["batched", "scipy"], default="batched")
    p.add_argument("--rv-range", type=float, default=500.0, help="|v| search range in km/s; 0 fixes v = 0")
    p.add_argument("--continuum", nargs="+", default=["none"], metavar="none|chebyshev DEG",
                   help="fit a Chebyshev response per region with the labels (default none)")
    p.add_argument("--resolution", type=float, default=None, help="convolve the model to resolving power R")
    p.add_argument("--mask", default=None, help="pixel mask file (wavelength intervals or a boolean array)")
    p.add_argument("--noise-model", default=None, help="noise model file (JSON or npz)")
    p.add_argument("--freeze", nargs="+", default=None, metavar="NAME=VALUE", help="hold labels fixed")
    p.add_argument("--chi2-tolerance", type=float, default=None, metavar="DCHI2",
                   help="stop a fit when less chi2 than this is left to gain (default FitConfig's 0.01; "
                        "0.1: ~15%% more spectra/s with 25 labels, labels within 0.2 sigma; docs/design.md)")
    p.add_argument("--exact-curvature", action="store_true",
                   help="take every optimiser step with the exact curvature and every trial step in full "
                        "instead of the hidden-layer path (FitConfig.lm_hidden_curvature=False: ~2.5x slower "
                        "with 25 APOGEE labels, and on mocks a median 0.85 higher chi2; docs/design.md)")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: all cores)")
    p.add_argument("--scheduler", default=None, help="Dask scheduler address (tcp://host:port)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--chunk-size", type=int, default=256, help="spectra per chunk")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue a run in --out-dir (default) or start it afresh")
    p.add_argument("--visits", action="store_true", help="fit each visit of apStar/apVisit files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled (Astra) model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("merge", help="merge a run folder into one catalog")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", required=True, help="catalog (.fits or .parquet)")
    p.add_argument("--allow-partial", action="store_true", help="merge an unfinished run")
    _add_common(p)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("report", help="figures and an HTML page for a catalog")
    p.add_argument("catalog")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--reference", default=None, help="table of reference labels joined by id")
    p.add_argument("--model", default=None, help="emulator, for gradient spectra")
    p.add_argument("--validation", default=None, help="validation JSON from `paynekit validate --json`")
    p.add_argument("--history", default=None, help="training history JSON")
    p.add_argument("--id-column", default="id")
    p.add_argument("--title", default="paynekit report")
    _add_common(p)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("plot-fit", help="draw one star's fit from a run folder")
    p.add_argument("run_dir")
    p.add_argument("id", help="source id")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.add_argument("--catalog", default=None, help="merged catalog, for labels and flags in the title")
    _add_common(p)
    p.set_defaults(func=_cmd_plot_fit)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (PaynekitError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if args.debug:
            raise
        print(f"paynekit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
