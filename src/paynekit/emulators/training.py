"""Training The Payne with PyTorch: labels -> spectra networks, fast on a laptop CPU.

:class:`PayneTrainer` follows the scikit-learn lifecycle (``TrainConfig`` in, ``fit`` sets
``emulator_`` and ``history_``); :func:`train_payne` does the same for a
:class:`~paynekit.grids.TrainingGrid`. The result is a plain :class:`~paynekit.emulators.PayneMLP`
(float64 weights), exactly the upstream form ``flux = W_K @ act(... act(W_0 @ x_s + b_0)) + b_K``.

How training is made fast (all of it folded back into the exported last layer):

* **Targets in a principal-component basis** (``target_basis="pca"``, chosen automatically for the
  unweighted L2 loss). A network whose last hidden layer has H units can only produce spectra in an
  H-dimensional affine subspace, so it loses nothing to learn the coefficients of the spectra on the
  leading ``n_components`` principal components of the training flux (mean-subtracted) instead of all
  P pixels. For an orthonormal basis the L2 loss in coefficient space equals the pixel-space loss up to
  a constant (the part of the data outside the basis), so the optimum is the same; the output layer
  shrinks from H x P to H x r (7214 -> ~400 columns for APOGEE), which is most of the cost of a step.
  After training, ``W_last = s * B^T W_c`` and ``b_last = mu + s * B^T b_c``.
* **Pixel basis** (``target_basis="pixels"``) for the L1 loss and for observed spectra with inverse
  variances (the data-driven Payne): the loss of every pixel is weighted by its ivar (L2) or sqrt(ivar)
  (L1), normalised by the mean weight, so pixels with ivar = 0 contribute exactly nothing (their flux is
  never read: it may be NaN or garbage).
* float32, data moved to the device once, index-based minibatches without a DataLoader, one
  validation pass per ``eval_every`` epochs, a cosine learning-rate decay over the training budget.

Checkpoints (``checkpoint=path``) are written with ``torch.save`` of tensors and plain Python numbers
only and read back with ``torch.load(weights_only=True)``, so a checkpoint file cannot execute code.
Torch's global state (default dtype, number of threads) is left as it was found.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checks import as_float_array
from ..errors import InputError, NotFittedError
from ..labels import LabelSpace
from .payne import ACTIVATIONS, LEAKY_SLOPE, PayneMLP

log = logging.getLogger(__name__)

OPTIMIZERS = ("radam", "adam")
LOSSES = ("l1", "l2")
SCHEDULES = ("cosine", "plateau", "constant")
TARGET_BASES = ("auto", "pca", "pixels")
DTYPES = ("float32", "float64")
DEVICES = ("cpu", "cuda")

CHECKPOINT_FORMAT = "paynekit-train-checkpoint"
CHECKPOINT_VERSION = 1
#: Config fields that may differ between a checkpoint and the run that resumes it (stopping rules,
#: bookkeeping); every other field must match, or the resumed run would be a different training.
RESUMABLE_CHANGES = ("max_epochs", "max_steps", "time_budget_s", "patience", "progress", "num_threads",
                     "checkpoint_every_s", "device")
#: Default number of optimiser steps when no stopping rule is given.
DEFAULT_MAX_STEPS = 20_000
#: Rows per chunk when evaluating a (rows x pixels) block (bounds memory at ~16 MB in float32).
_EVAL_CHUNK_ELEMENTS = 4 * 2**20


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of :class:`PayneTrainer` (frozen; unknown options are an error).

    Parameters
    ----------
    hidden_sizes : tuple of int
        Hidden layer widths (The Payne: 2 x 300).
    activation : {"leaky_relu", "sigmoid"}
        Leaky ReLU has slope 0.01, as upstream.
    optimizer : {"radam", "adam"}
    betas : (float, float)
        Adam's decay rates of the gradient mean and square. beta2 = 0.99 rather than torch's 0.999:
        RAdam's variance rectification acts as a warm-up over ~2 / (1 - beta2) steps, which with
        0.999 wastes the first thousand or so steps of a short training.
    loss : {"l2", "l1"}
        Mean squared or mean absolute flux error (ivar-weighted for observed spectra). L2 allows the
        fast principal-component basis.
    learning_rate : float
        Peak learning rate.
    batch_size : int
        Spectra per optimiser step; a training set smaller than this is used whole (full batch).
    weight_decay : float
        L2 penalty on the weights (0 = none).
    max_epochs, max_steps, time_budget_s : optional
        Stopping rules; training ends at the first one reached. Without any of them, ``max_steps`` is
        ``DEFAULT_MAX_STEPS``. ``time_budget_s`` counts wall time from the start of ``fit``
        (preparation included; resumed runs continue the clock of the checkpoint).
    schedule : {"cosine", "plateau", "constant"}
        ``cosine`` decays the rate from ``learning_rate`` to ``learning_rate * min_lr_fraction`` over
        the budget (the fraction used of max_steps, max_epochs or time_budget_s, whichever is
        furthest along); ``plateau`` halves it after ``plateau_patience`` evaluations without
        improvement. Cosine is the default because the budget is known: decaying to ~0 exactly at
        its end gives the lowest final error for that budget (and a time budget is honoured by the
        schedule itself), whereas a plateau schedule spends its time at a too-high rate until the
        validation loss stalls and needs its patience tuned to the data set. Note that with a time
        budget the schedule follows the clock, so only step- or epoch-limited runs are bitwise
        reproducible.
    warmup_fraction : float
        Linear warm-up over this fraction of the budget (cosine schedule only).
    min_lr_fraction : float
        Final learning rate of the cosine schedule, as a fraction of the peak.
    plateau_patience : int
    validation_fraction : float
        Share of the training spectra held out for validation when ``fit`` gets no validation set
        (0 = no validation: the last weights are kept and there is no early stopping).
    eval_every : int
        Evaluate the validation loss every this many epochs; the weights with the best validation
        loss are the ones returned.
    patience : int or None
        Early stopping: stop after this many evaluations without a new best validation loss.
    target_basis : {"auto", "pca", "pixels"}
        ``auto`` = ``pca`` for the L2 loss on spectra without ivar, else ``pixels``.
    n_components : int or None
        Principal components for the ``pca`` basis (default ``PCA_COMPONENTS_PER_UNIT`` times the
        width of the last hidden layer, at most min(N, P)).
    seed : int
        Seeds weight initialisation, the validation split and the minibatch order.
    device : {"cpu", "cuda"}
    dtype : {"float32", "float64"}
        Precision of training (the exported PayneMLP is float64 either way).
    num_threads : int, "auto" or None
        Torch intra-op threads during training (restored afterwards); None leaves torch's setting.
        On a machine shared with other busy processes 1 thread can be many times faster than 2
        (the threads wait on each other at every operation), while on an idle 2-core machine 2
        threads are ~1.6x faster. ``"auto"`` starts on 1 thread and compares it with torch's setting
        during training (a few steps each, repeated as the load changes), keeping the faster; since
        the thread count changes the order of floating-point sums, "auto" runs are not bitwise
        reproducible.
    progress : bool or None
        tqdm progress bar; None = only when stderr is a terminal.
    checkpoint_every_s : float
        How often ``fit(checkpoint=...)`` rewrites the checkpoint file (it is also written at the end).
    """

    hidden_sizes: tuple[int, ...] = (300, 300)
    activation: str = "leaky_relu"
    optimizer: str = "radam"
    loss: str = "l2"
    learning_rate: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.99)
    batch_size: int = 512
    weight_decay: float = 0.0
    max_epochs: int | None = None
    max_steps: int | None = None
    time_budget_s: float | None = None
    schedule: str = "cosine"
    warmup_fraction: float = 0.0
    min_lr_fraction: float = 1e-3
    plateau_patience: int = 50
    validation_fraction: float = 0.1
    eval_every: int = 1
    patience: int | None = None
    target_basis: str = "auto"
    n_components: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    num_threads: int | str | None = None
    progress: bool | None = None
    checkpoint_every_s: float = 60.0

    def __post_init__(self):
        hs = self.hidden_sizes
        if isinstance(hs, int) or not hs or any(int(h) != h or h < 1 for h in hs):
            raise InputError(f"hidden_sizes must be a non-empty sequence of positive ints, got {hs!r}")
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in hs))
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise InputError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", betas)
        choices = (("activation", ACTIVATIONS), ("optimizer", OPTIMIZERS), ("loss", LOSSES),
                   ("schedule", SCHEDULES), ("target_basis", TARGET_BASES), ("dtype", DTYPES))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (self.device in DEVICES or str(self.device).startswith("cuda:")):
            raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        positive = {"learning_rate": self.learning_rate, "batch_size": self.batch_size,
                    "eval_every": self.eval_every, "plateau_patience": self.plateau_patience,
                    "checkpoint_every_s": self.checkpoint_every_s}
        if self.num_threads is not None and self.num_threads != "auto" and (
                isinstance(self.num_threads, (str, bool)) or int(self.num_threads) != self.num_threads
                or self.num_threads < 1):
            raise InputError(f"num_threads must be a positive int, 'auto' or None, got {self.num_threads!r}")
        for name in ("max_epochs", "max_steps", "time_budget_s", "patience", "n_components"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number, got {value!r}")
        for name in ("batch_size", "eval_every", "plateau_patience", "max_epochs", "max_steps", "patience",
                     "n_components", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value):
                raise InputError(f"{name} must be an integer, got {value!r}")
        if not 0 <= self.validation_fraction < 1:
            raise InputError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0 <= self.warmup_fraction < 1:
            raise InputError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.min_lr_fraction <= 1:
            raise InputError(f"min_lr_fraction must be in [0, 1], got {self.min_lr_fraction}")
        if self.weight_decay < 0:
            raise InputError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build a config from a dict (e.g. parsed JSON); unknown keys raise InputError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown TrainConfig option(s) {unknown}; known options are {sorted(known)}")
        values = dict(values)
        for key in ("hidden_sizes", "betas"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    @property
    def stopping_steps(self) -> int | None:
        """``max_steps``, or the default when no stopping rule at all is given."""
        if self.max_steps is None and self.max_epochs is None and self.time_budget_s is None:
            return DEFAULT_MAX_STEPS
        return self.max_steps


#: The default ``n_components`` is this many principal components per unit of the last hidden layer.
PCA_COMPONENTS_PER_UNIT = 4 / 3


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError("training needs PyTorch: pip install 'paynekit[train]'") from None
    return torch


# ------------------------------------------------------------------------------------------------
# data preparation: pure functions of arrays
# ------------------------------------------------------------------------------------------------
#: Power iterations of the randomised range finder in :func:`principal_basis`.
_POWER_ITERATIONS = 1


def _orthonormal_columns(y):
    """Orthonormal basis of the column space of a tall (n, k) torch matrix, via its k x k Gram matrix.

    Matrix products only (LAPACK's QR of a tall matrix is slow on a busy machine); the columns of
    negligible weight are dropped. Orthonormal to about eps * cond(y)**2, plenty for a range finder.
    """
    import torch

    evals, v = torch.linalg.eigh(y.T @ y)
    keep = evals > evals.max() * 1e-13
    return (y @ v[:, keep]) / torch.sqrt(evals[keep])


def principal_basis(z, n_components: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Leading principal directions (r, P) of the rows of ``z`` (N, P) and their singular values.

    Exact (eigen-decomposition of a small Gram matrix) when N or P is not much larger than r, otherwise
    a seeded randomised range finder with a power iteration (Halko, Martinsson & Tropp 2011) reduces
    ``z`` to k = 1.25 r + 10 rows first. Only matrix products and k x k eigenproblems are used, in
    float64 torch (so that ``TrainConfig.num_threads`` applies), which keeps this to seconds for
    thousands of spectra with thousands of pixels. Directions with a singular value below 1e-6 of the
    largest are dropped (r may come out smaller than asked).
    """
    torch = _torch()
    zt = torch.as_tensor(np.asarray(z, dtype=np.float64))
    n, p = zt.shape
    r = min(n_components, n, p)
    k = min(r + r // 4 + 10, n, p)
    if p <= k:  # few pixels: the P x P Gram matrix is small
        evals, v = torch.linalg.eigh(zt.T @ zt)
        evals, v = evals.flip(0)[:r], v.flip(1)[:, :r]
        s = evals.clamp(min=0).sqrt()
        basis = v.T
    else:
        if n <= k:  # few spectra: work with them directly
            b = zt
        else:
            omega = torch.as_tensor(np.random.default_rng(seed).standard_normal((p, k)))
            q = _orthonormal_columns(zt @ omega)
            for _ in range(_POWER_ITERATIONS):  # orthonormalised after every product: conditioning s_1/s_k
                q = _orthonormal_columns(zt @ _orthonormal_columns(zt.T @ q))
            b = q.T @ zt  # (k, P): the rows of z projected on their dominant subspace
        evals, u = torch.linalg.eigh(b @ b.T)
        evals, u = evals.flip(0)[:r], u.flip(1)[:, :r]
        s = evals.clamp(min=0).sqrt()
        basis = (u.T @ b) / torch.where(s > 0, s, 1.0)[:, None]
    s, basis = s.numpy(), basis.numpy()
    keep = s > s[0] * 1e-6 if s.size and s[0] > 0 else np.zeros(s.shape, bool)
    if not keep.any():
        raise InputError("the training flux does not vary (all spectra equal); nothing to learn")
    return np.ascontiguousarray(basis[keep]), s[keep]


def _as_validation(validation, n_labels, n_pixels):
    """(labels, flux, ivar-or-None) from a tuple or a TrainingGrid."""
    from ..grids import TrainingGrid

    if isinstance(validation, TrainingGrid):
        return validation.labels, validation.flux, validation.ivar
    if not isinstance(validation, (tuple, list)) or len(validation) not in (2, 3):
        raise InputError("validation must be a TrainingGrid or a tuple (labels, flux) or (labels, flux, ivar), "
                         f"got {type(validation).__name__}")
    labels = as_float_array(validation[0], "validation labels", ndim=2)
    flux = as_float_array(validation[1], "validation flux", ndim=2)
    ivar = as_float_array(validation[2], "validation ivar", ndim=2) if len(validation) == 3 else None
    if labels.shape[1] != n_labels or flux.shape != (labels.shape[0], n_pixels):
        raise InputError(f"validation labels {labels.shape} and flux {flux.shape} must be (Nv, {n_labels}) "
                         f"and (Nv, {n_pixels}) to match the training set")
    if ivar is not None and ivar.shape != flux.shape:
        raise InputError(f"validation ivar has shape {ivar.shape} but validation flux has {flux.shape}")
    return labels, flux, ivar


def _check_ivar(ivar, flux, name):
    if ivar is None:
        if not np.all(np.isfinite(flux)):
            raise InputError(f"{name.replace('ivar', 'flux')} has non-finite values; pass ivar with 0 there")
        return None
    if ivar.shape != flux.shape:
        raise InputError(f"{name} has shape {ivar.shape} but flux has {flux.shape}")
    if not np.all(np.isfinite(ivar)) or np.any(ivar < 0):
        raise InputError(f"{name} must be finite and >= 0 (0 = pixel not used)")
    if np.any(~np.isfinite(flux) & (ivar > 0)):
        raise InputError(f"flux is non-finite where {name} > 0")
    return ivar


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------
class PayneTrainer:
    """Train a :class:`~paynekit.emulators.PayneMLP` on labelled spectra.

    Examples
    --------
    >>> trainer = PayneTrainer(TrainConfig(time_budget_s=300)).fit(labels, flux, label_names=names,
    ...                                                            wavelength=wl)  # doctest: +SKIP
    >>> trainer.emulator_.predict(labels[:3])  # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig | None = None):
        if config is None:
            config = TrainConfig()
        if not isinstance(config, TrainConfig):
            raise InputError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self._emulator = None
        self._history = None

    # -- fitted attributes ------------------------------------------------------------------------
    @property
    def emulator_(self) -> PayneMLP:
        if self._emulator is None:
            raise NotFittedError("this PayneTrainer is not fitted yet; call fit(labels, flux, ...) first")
        return self._emulator

    @property
    def history_(self) -> dict:
        if self._history is None:
            raise NotFittedError("this PayneTrainer is not fitted yet; call fit(labels, flux, ...) first")
        return self._history

    def predict(self, labels) -> np.ndarray:
        """Flux of the trained emulator (same as ``emulator_.predict``)."""
        return self.emulator_.predict(labels)

    # -- fit --------------------------------------------------------------------------------------
    def fit(self, labels, flux, ivar=None, label_space: LabelSpace | None = None, wavelength=None,
            validation=None, checkpoint=None, resume: bool = False, *, label_names=None,
            wavelength_medium: str = "vacuum", callback=None) -> PayneTrainer:
        """Train on ``labels`` (N, L) and ``flux`` (N, P); returns self.

        Parameters
        ----------
        labels, flux : arrays (N, L) and (N, P)
        ivar : array (N, P), optional
            Inverse variances of observed spectra; the loss of each pixel is weighted by them and
            pixels with ivar = 0 are ignored (their flux may be anything).
        label_space : LabelSpace, optional
            Scaling box; default the min/max of the training labels (The Payne's convention), named by
            ``label_names`` (default ``label_0``, ``label_1``, ...).
        wavelength : array (P,), optional
            Stored in the emulator.
        validation : TrainingGrid or tuple (labels, flux[, ivar]), optional
            Held-out spectra for best-checkpoint keeping and early stopping; default a seeded random
            ``validation_fraction`` of the training spectra.
        checkpoint : path, optional
            Write the training state there (every ``checkpoint_every_s`` and at the end).
        resume : bool
            Continue from ``checkpoint`` when it exists (history, optimiser, RNG and clock continue).
        callback : callable, optional
            Called after every evaluation with a dict (step, epoch, time_s, lr, train_loss, val_loss,
            best_val_loss, best_emulator: a function returning the current best PayneMLP); returning
            True stops training (as an interruption would: the checkpoint allows resuming). Time spent
            in the callback does not count against ``time_budget_s``.
        """
        torch = _torch()
        t_start = time.perf_counter()
        cfg = self.config
        x_all = as_float_array(labels, "labels", ndim=2)
        y_all = as_float_array(flux, "flux", ndim=2)
        if y_all.shape[0] != x_all.shape[0]:
            raise InputError(f"flux has {y_all.shape[0]} spectra (shape {y_all.shape}) but labels has "
                             f"{x_all.shape[0]} rows")
        if not np.all(np.isfinite(x_all)):
            raise InputError("labels contains non-finite values")
        w_all = _check_ivar(None if ivar is None else as_float_array(ivar, "ivar", ndim=2), y_all, "ivar")
        n_all, n_pix = y_all.shape
        if wavelength is not None:
            wavelength = as_float_array(wavelength, "wavelength", ndim=1)
            if wavelength.size != n_pix:
                raise InputError(f"wavelength has {wavelength.size} values but flux has {n_pix} pixels")
        from ..grids import training_set_hash

        data_hash = training_set_hash(x_all, y_all, wavelength, w_all)

        # validation split (seeded)
        if validation is not None:
            xv, yv, wv = _as_validation(validation, x_all.shape[1], n_pix)
            wv = _check_ivar(wv, yv, "validation ivar")
            xt, yt, wt = x_all, y_all, w_all
        elif cfg.validation_fraction > 0:
            n_val = round(cfg.validation_fraction * n_all)
            if n_val < 1 or n_all - n_val < 2:
                raise InputError(f"validation_fraction={cfg.validation_fraction} of {n_all} spectra leaves no "
                                 "validation or training set; pass validation=... or change the fraction")
            perm = np.random.default_rng(cfg.seed).permutation(n_all)
            iv, it = np.sort(perm[:n_val]), np.sort(perm[n_val:])
            xv, yv, wv = x_all[iv], y_all[iv], None if w_all is None else w_all[iv]
            xt, yt, wt = x_all[it], y_all[it], None if w_all is None else w_all[it]
        else:
            xv = yv = wv = None
            xt, yt, wt = x_all, y_all, w_all
        if label_space is None:
            names = tuple(label_names) if label_names is not None else tuple(f"label_{i}" for i in
                                                                            range(x_all.shape[1]))
            label_space = LabelSpace.from_training_labels(names, xt)
        elif not isinstance(label_space, LabelSpace):
            raise InputError(f"label_space must be a LabelSpace, got {type(label_space).__name__}")
        if len(label_space) != x_all.shape[1]:
            raise InputError(f"label_space has {len(label_space)} labels but labels has {x_all.shape[1]} columns")

        basis = cfg.target_basis
        if basis == "auto":
            basis = "pca" if (cfg.loss == "l2" and wt is None and wv is None) else "pixels"
        if basis == "pca" and (cfg.loss != "l2" or wt is not None or wv is not None):
            raise InputError("target_basis='pca' needs the unweighted L2 loss (loss='l2' and no ivar); use "
                             "target_basis='pixels' for the L1 loss or for spectra with ivar")

        prev_threads = torch.get_num_threads()
        if isinstance(cfg.num_threads, int):
            torch.set_num_threads(cfg.num_threads)
        elif cfg.num_threads == "auto":  # the preparation runs on 1 thread, the safe choice when busy
            torch.set_num_threads(1)
        try:
            run_hash = data_hash if validation is None else data_hash + training_set_hash(xv, yv, None, wv)
            state = _TrainState(cfg, basis, label_space, xt, yt, wt, xv, yv, wv, run_hash, torch,
                                wavelength=wavelength, wavelength_medium=wavelength_medium)
            state.max_threads = prev_threads
            if resume and checkpoint is not None and Path(checkpoint).exists():
                state.load_checkpoint(Path(checkpoint))
            elif resume:
                log.info("no checkpoint at %s yet; starting from scratch", checkpoint)
            state.run(t_start, checkpoint=None if checkpoint is None else Path(checkpoint), callback=callback)
            emulator = state.export(best=True)
        finally:
            torch.set_num_threads(prev_threads)
        emulator.meta.update({
            "training_set_hash": data_hash,
            "trained_by": "paynekit.emulators.training.PayneTrainer",
            "train_config": cfg.to_dict(),
            "target_basis": basis,
            "n_components": state.n_out if basis == "pca" else None,
            "n_train": int(xt.shape[0]),
            "n_validation": 0 if xv is None else int(xv.shape[0]),
            "best_step": state.best_step,
            "best_val_loss": None if not np.isfinite(state.best_val) else float(state.best_val),
            "stopped_because": state.stop_reason,
        })
        self._emulator = emulator
        self._history = state.history
        return self


def train_payne(grid, config: TrainConfig | None = None, *, validation=None, checkpoint=None, resume=False,
                callback=None) -> tuple[PayneMLP, dict]:
    """Train a PayneMLP on a :class:`~paynekit.grids.TrainingGrid`; returns (emulator, history).

    The label box is the grid's (its min/max, The Payne's convention), the wavelength and its medium
    come from the grid, and ``emulator.meta["training_set_hash"]`` identifies the grid.
    """
    from ..grids import TrainingGrid

    if not isinstance(grid, TrainingGrid):
        raise InputError(f"grid must be a TrainingGrid, got {type(grid).__name__}")
    trainer = PayneTrainer(config).fit(grid.labels, grid.flux, grid.ivar, label_names=grid.label_names,
                                       wavelength=grid.wavelength, wavelength_medium=grid.wavelength_medium,
                                       validation=validation, checkpoint=checkpoint, resume=resume,
                                       callback=callback)
    trainer.emulator_.meta["training_grid_meta"] = grid.meta
    return trainer.emulator_, trainer.history_


# ------------------------------------------------------------------------------------------------
# internals
# ------------------------------------------------------------------------------------------------
def _init_params(sizes, activation, generator, dtype, device, torch):
    """All weights and biases in one flat leaf tensor, and the (weight, bias) shapes of each layer.

    Kaiming-uniform weights for the hidden layers, small uniform biases, zero output layer. Hidden biases
    are drawn over the range of the pre-activations so that the kinks of the leaky ReLUs are spread
    through the label box rather than all passing through its centre. The output layer starts at zero:
    the network starts out predicting the mean spectrum. One flat tensor makes the optimiser step a
    handful of vector operations instead of a loop over parameter tensors.
    """
    gain = math.sqrt(2.0 / (1 + LEAKY_SLOPE**2)) if activation == "leaky_relu" else 1.0
    pieces, shapes = [], []
    for k, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        if k == len(sizes) - 2:
            w = torch.zeros((n_out, n_in), dtype=dtype)
            b = torch.zeros(n_out, dtype=dtype)
        else:
            bound = gain * math.sqrt(3.0 / n_in)
            w = (torch.rand((n_out, n_in), generator=generator, dtype=dtype) * 2 - 1) * bound
            b = (torch.rand(n_out, generator=generator, dtype=dtype) * 2 - 1) * (0.5 if k == 0 else 0.1)
        pieces += [w.reshape(-1), b]
        shapes += [(n_out, n_in), (n_out,)]
    flat = torch.cat(pieces).to(device).requires_grad_()
    return flat, shapes


def _unflatten(flat, shapes):
    """Views of the flat parameter tensor, one per weight matrix and bias vector."""
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[start:start + size].view(shape))
        start += size
    return out


def _forward(params, x, activation, torch):
    f = torch.nn.functional
    a = x
    n_layers = len(params) // 2
    for k in range(n_layers):
        a = torch.addmm(params[2 * k + 1], a, params[2 * k].T)
        if k < n_layers - 1:
            a = f.leaky_relu(a, LEAKY_SLOPE) if activation == "leaky_relu" else torch.sigmoid(a)
    return a


class _TrainState:
    """Everything that evolves during training; saved to and restored from checkpoints."""

    def __init__(self, cfg, basis, label_space, xt, yt, wt, xv, yv, wv, data_hash, torch, wavelength=None,
                 wavelength_medium="vacuum"):
        self.cfg, self.basis, self.label_space, self.torch = cfg, basis, label_space, torch
        self.data_hash = data_hash
        self.wavelength, self.wavelength_medium = wavelength, wavelength_medium
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device={cfg.device!r} but torch sees no CUDA device")
        self.tdtype = torch.float32 if cfg.dtype == "float32" else torch.float64
        self.n_train = xt.shape[0]
        self.n_pix = yt.shape[1]
        self.has_val = xv is not None
        self._prepare_targets(xt, yt, wt, xv, yv, wv)
        self.generator = torch.Generator().manual_seed(int(cfg.seed))
        sizes = (len(label_space), *cfg.hidden_sizes, self.n_out)
        self.flat, self.shapes = _init_params(sizes, cfg.activation, self.generator, self.tdtype, self.device,
                                              torch)
        opt_cls = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
        self.optimizer = opt_cls([self.flat], lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.batch = min(cfg.batch_size, self.n_train)
        self.steps_per_epoch = math.ceil(self.n_train / self.batch)
        # counters and history
        self.step = 0
        self.epoch = 0
        self.pos = 0
        self.perm = None
        self.elapsed = 0.0
        self.lr = cfg.learning_rate
        self.lr_scale = 1.0  # plateau schedule
        self.best_val = math.inf
        self.best_step = 0
        self.evals_since_best = 0
        self.evals_since_plateau_best = 0
        self.plateau_best = math.inf
        self.best_flat = self.flat.detach().clone()
        self.epoch_loss_sum = 0.0
        self.epoch_loss_n = 0
        self.stop_reason = ""
        self.history = {"epoch": [], "step": [], "time_s": [], "lr": [], "train_loss": [], "val_loss": []}

    # -- targets ----------------------------------------------------------------------------------
    def _tensor(self, a):
        return self.torch.as_tensor(np.ascontiguousarray(a), dtype=self.tdtype).to(self.device)

    def _prepare_targets(self, xt, yt, wt, xv, yv, wv):
        cfg = self.cfg
        ls = self.label_space
        self.x_train = self._tensor(ls.scale(xt))
        self.x_val = None if xv is None else self._tensor(ls.scale(xv))
        if self.basis == "pca":
            mu = yt.mean(axis=0)
            zt = yt - mu
            r_default = round(PCA_COMPONENTS_PER_UNIT * cfg.hidden_sizes[-1])
            r = min(cfg.n_components or r_default, zt.shape[0], zt.shape[1])
            basis, _ = principal_basis(zt, r, cfg.seed)
            torch = self.torch
            b64 = torch.from_numpy(basis)

            def project(z):  # coefficients and the squared norm outside the basis, per pixel and spectrum
                z64 = torch.from_numpy(z)
                c = z64 @ b64.T
                perp = max(float((z64 * z64).sum() - (c * c).sum()), 0.0) / (z.shape[0] * self.n_pix)
                return c.numpy(), perp

            ct, self.perp_train = project(zt)
            scale = float(np.sqrt(np.mean(ct**2))) or 1.0
            self.mu, self.basis_matrix, self.scale, self.n_out = mu, basis, scale, basis.shape[0]
            self.y_train = self._tensor(ct / scale)
            self.w_train = None
            if xv is not None:
                cv, self.perp_val = project(yv - mu)
                self.y_val = self._tensor(cv / scale)
                self.w_val = None
            log.info("training on %d principal components (%.3g of the variance outside the basis)",
                     self.n_out, self.perp_train * zt.shape[0] * self.n_pix / max(np.sum(zt**2), 1e-300))
            return
        # pixel basis: per-pixel mean of the used pixels, one global scale, ivar weights
        used_t = np.ones(yt.shape, bool) if wt is None else wt > 0
        yt0 = np.where(used_t, yt, 0.0)
        count = used_t.sum(axis=0)
        fill = yt0.sum() / max(used_t.sum(), 1)
        mu = np.where(count > 0, yt0.sum(axis=0) / np.maximum(count, 1), fill)
        zt = np.where(used_t, yt0 - mu, 0.0)
        scale = float(np.sqrt(np.sum(zt**2) / max(used_t.sum(), 1))) or 1.0
        self.mu, self.basis_matrix, self.scale, self.n_out = mu, None, scale, self.n_pix
        self.perp_train = self.perp_val = 0.0
        self.y_train = self._tensor(zt / scale)
        power = 1.0 if cfg.loss == "l2" else 0.5
        if wt is None:
            self.weight_norm = 1.0
            self.w_train = None
        else:
            wpow = np.where(used_t, wt, 0.0) ** power
            self.weight_norm = float(wpow.mean()) or 1.0
            self.w_train = self._tensor(wpow / self.weight_norm)
        if xv is not None:
            used_v = np.ones(yv.shape, bool) if wv is None else wv > 0
            self.y_val = self._tensor(np.where(used_v, np.where(used_v, yv, 0.0) - mu, 0.0) / scale)
            if wv is None:
                self.w_val = None
            else:
                self.w_val = self._tensor(np.where(used_v, wv, 0.0) ** power / self.weight_norm)

    # -- losses -----------------------------------------------------------------------------------
    def _batch_loss(self, pred, target, weight):
        r = pred - target
        per = r * r if self.cfg.loss == "l2" else r.abs()
        if weight is not None:
            per = per * weight
        return per.mean()

    def _to_flux_units(self, loss_value: float, perp: float) -> float:
        """Loss on scaled targets -> loss in flux units (L2: mean squared; L1: mean absolute)."""
        if self.cfg.loss == "l2":
            return loss_value * self.scale**2 * self.n_out / self.n_pix + perp
        return loss_value * self.scale

    def evaluate(self, x, y, w, perp) -> float:
        torch = self.torch
        rows = max(1, _EVAL_CHUNK_ELEMENTS // self.n_out)
        total = 0.0
        with torch.no_grad():
            for i in range(0, x.shape[0], rows):
                sl = slice(i, i + rows)
                pred = _forward(_unflatten(self.flat, self.shapes), x[sl], self.cfg.activation, torch)
                total += float(self._batch_loss(pred, y[sl], None if w is None else w[sl])) * pred.shape[0]
        return self._to_flux_units(total / x.shape[0], perp)

    # -- schedule ---------------------------------------------------------------------------------
    def progress(self) -> float:
        cfg = self.cfg
        fr = 0.0
        max_steps = cfg.stopping_steps
        if max_steps is not None:
            fr = max(fr, self.step / max_steps)
        if cfg.max_epochs is not None:
            fr = max(fr, (self.epoch + self.pos / self.n_train) / cfg.max_epochs)
        if cfg.time_budget_s is not None:
            fr = max(fr, self.elapsed / cfg.time_budget_s)
        return min(fr, 1.0)

    def learning_rate(self) -> float:
        cfg = self.cfg
        if cfg.schedule == "constant":
            return cfg.learning_rate
        if cfg.schedule == "plateau":
            return cfg.learning_rate * self.lr_scale
        f = self.progress()
        lo = cfg.learning_rate * cfg.min_lr_fraction
        lr = lo + (cfg.learning_rate - lo) * 0.5 * (1 + math.cos(math.pi * f))
        if cfg.warmup_fraction > 0 and f < cfg.warmup_fraction:
            lr *= max(f / cfg.warmup_fraction, 1e-3)
        return lr

    # -- the loop ---------------------------------------------------------------------------------
    def _should_stop(self) -> str:
        cfg = self.cfg
        max_steps = cfg.stopping_steps
        if max_steps is not None and self.step >= max_steps:
            return "max_steps"
        if cfg.max_epochs is not None and self.epoch >= cfg.max_epochs:
            return "max_epochs"
        if cfg.time_budget_s is not None and self.elapsed >= cfg.time_budget_s:
            return "time_budget_s"
        return ""

    def run(self, t_start, checkpoint, callback):
        torch = self.torch
        cfg = self.cfg
        elapsed0 = self.elapsed  # time of earlier runs (from a checkpoint); this call's preparation counts too
        paused = 0.0

        def now():
            return elapsed0 + (time.perf_counter() - t_start) - paused

        last_ckpt = time.perf_counter()
        tuner = None
        if cfg.num_threads == "auto" and self.device.type == "cpu" and self.max_threads > 1:
            tuner = _ThreadTuner(torch, self.max_threads)
        bar = _progress_bar(cfg, total=cfg.stopping_steps, initial=self.step)
        act = cfg.activation
        try:
            while True:
                self.elapsed = now()
                reason = self._should_stop()
                if reason:
                    self.stop_reason = reason
                    break
                if self.pos == 0 or self.perm is None:
                    self.perm = torch.randperm(self.n_train, generator=self.generator).to(self.device)
                    self.pos = 0
                idx = self.perm[self.pos:self.pos + self.batch]
                self.pos += self.batch
                self.lr = self.learning_rate()
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr
                self.optimizer.zero_grad(set_to_none=True)
                pred = _forward(_unflatten(self.flat, self.shapes), self.x_train[idx], act, torch)
                loss = self._batch_loss(pred, self.y_train[idx], None if self.w_train is None else self.w_train[idx])
                loss.backward()
                self.optimizer.step()
                self.step += 1
                if tuner is not None:
                    tuner.after_step()
                self.epoch_loss_sum += loss.detach() * idx.shape[0]  # a tensor: no device sync per step
                self.epoch_loss_n += idx.shape[0]
                if self.pos < self.n_train:
                    continue
                # end of an epoch
                self.pos = 0
                self.epoch += 1
                if bar is not None:
                    bar.update(self.step - bar.n)
                if self.epoch % cfg.eval_every:
                    continue
                self.elapsed = now()
                stop = self._end_of_evaluation_period()
                if bar is not None and self.history["val_loss"]:
                    bar.set_postfix(val=f"{self.history['val_loss'][-1]:.3g}", lr=f"{self.lr:.2g}")
                if callback is not None:
                    t_cb = time.perf_counter()
                    if callback(self._callback_info()):
                        stop = stop or "callback"
                    paused += time.perf_counter() - t_cb
                if checkpoint is not None and time.perf_counter() - last_ckpt >= cfg.checkpoint_every_s:
                    self.elapsed = now()
                    self.save_checkpoint(checkpoint)
                    last_ckpt = time.perf_counter()
                if stop:
                    self.stop_reason = stop
                    break
            self.elapsed = now()
            if self.epoch_loss_n or not self.history["step"] or self.history["step"][-1] != self.step:
                self._end_of_evaluation_period()  # the partial period at the end
            if checkpoint is not None:
                self.save_checkpoint(checkpoint)
        finally:
            if bar is not None:
                bar.close()
        log.info("training stopped (%s) after %d steps, %d epochs, %.1f s; best validation loss %.4g at step %d",
                 self.stop_reason, self.step, self.epoch, self.elapsed, self.best_val, self.best_step)

    def _end_of_evaluation_period(self) -> str:
        """Record history, keep the best weights; return a stop reason (early stopping) or ''."""
        cfg = self.cfg
        trained = self.epoch_loss_n > 0
        train = (self._to_flux_units(float(self.epoch_loss_sum) / self.epoch_loss_n, self.perp_train)
                 if trained else math.nan)
        if trained and not math.isfinite(train):
            raise FloatingPointError(f"training diverged by step {self.step} (loss {train}); lower "
                                     f"learning_rate (now {cfg.learning_rate})")
        self.epoch_loss_sum, self.epoch_loss_n = 0.0, 0
        if self.has_val:
            val = self.evaluate(self.x_val, self.y_val, self.w_val, self.perp_val)
        else:
            val = math.nan
        h = self.history
        h["epoch"].append(self.epoch)
        h["step"].append(self.step)
        h["time_s"].append(self.elapsed)
        h["lr"].append(self.lr)
        h["train_loss"].append(train)
        h["val_loss"].append(val)
        if not self.has_val:  # nothing to select on: the current weights are the result
            self.best_step = self.step
            return ""
        score = val
        if not math.isfinite(score):
            return ""
        if score < self.best_val:
            self.best_val = score
            self.best_step = self.step
            self.evals_since_best = 0
            self.best_flat.copy_(self.flat.detach())
        else:
            self.evals_since_best += 1
        if cfg.schedule == "plateau":
            if score < self.plateau_best * (1 - 1e-3):
                self.plateau_best = score
                self.evals_since_plateau_best = 0
            else:
                self.evals_since_plateau_best += 1
                if self.evals_since_plateau_best >= cfg.plateau_patience:
                    self.lr_scale = max(self.lr_scale * 0.5, cfg.min_lr_fraction)
                    self.evals_since_plateau_best = 0
        if cfg.patience is not None and self.evals_since_best >= cfg.patience:
            return "early_stopping"
        return ""

    def _callback_info(self) -> dict:
        h = self.history
        return {"step": self.step, "epoch": self.epoch, "time_s": self.elapsed, "lr": self.lr,
                "train_loss": h["train_loss"][-1], "val_loss": h["val_loss"][-1],
                "best_val_loss": self.best_val, "best_emulator": lambda: self.export(best=True)}

    # -- export -----------------------------------------------------------------------------------
    def export(self, best=True) -> PayneMLP:
        """The (best or current) weights as a float64 PayneMLP with the target transform folded in."""
        src = self.best_flat if (best and self.has_val) else self.flat
        arrays = [p.numpy().copy() for p in _unflatten(src.detach().cpu().to(self.torch.float64), self.shapes)]
        weights, biases = arrays[0::2], arrays[1::2]
        w_last, b_last = weights[-1], biases[-1]
        if self.basis_matrix is not None:
            weights[-1] = self.scale * (self.basis_matrix.T @ w_last)
            biases[-1] = self.mu + self.scale * (b_last @ self.basis_matrix)
        else:
            weights[-1] = self.scale * w_last
            biases[-1] = self.mu + self.scale * b_last
        return PayneMLP(weights, biases, self.label_space, self.wavelength, activation=self.cfg.activation,
                        dtype=np.float64, wavelength_medium=self.wavelength_medium)

    # -- checkpoints ------------------------------------------------------------------------------
    def _config_for_checkpoint(self) -> dict:
        d = self.cfg.to_dict()
        return {k: v for k, v in d.items() if k not in RESUMABLE_CHANGES}

    def save_checkpoint(self, path: Path):
        torch = self.torch
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config_json": json.dumps(self._config_for_checkpoint(), sort_keys=True),
            "data_hash": self.data_hash,
            "basis": self.basis,
            "params": self.flat.detach().cpu(),
            "best_params": self.best_flat.cpu(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "perm": None if self.perm is None else self.perm.cpu(),
            "counters": {"step": self.step, "epoch": self.epoch, "pos": self.pos, "elapsed": self.elapsed,
                         "lr_scale": self.lr_scale, "best_val": self.best_val, "best_step": self.best_step,
                         "evals_since_best": self.evals_since_best, "plateau_best": self.plateau_best,
                         "evals_since_plateau_best": self.evals_since_plateau_best,
                         "epoch_loss_sum": self.epoch_loss_sum, "epoch_loss_n": self.epoch_loss_n},
            "history": {k: [float(v) for v in vals] for k, vals in self.history.items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def load_checkpoint(self, path: Path):
        torch = self.torch
        from ..errors import FileFormatError

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            raise FileFormatError(f"{path}: not a paynekit training checkpoint ({type(exc).__name__}: {exc})") \
                from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise FileFormatError(f"{path}: not a paynekit training checkpoint (found {found}; expected "
                                  f"format={CHECKPOINT_FORMAT!r})")
        if state.get("version") != CHECKPOINT_VERSION:
            raise FileFormatError(f"{path}: checkpoint version {state.get('version')!r}; this paynekit reads "
                                  f"version {CHECKPOINT_VERSION}")
        if state["data_hash"] != self.data_hash:
            raise InputError(f"{path}: the checkpoint was made on another training set (hash "
                             f"{state['data_hash']}, these data {self.data_hash}); use a new checkpoint path")
        saved = json.loads(state["config_json"])
        mine = self._config_for_checkpoint()
        diff = sorted(k for k in set(saved) | set(mine) if json.dumps(saved.get(k)) != json.dumps(mine.get(k)))
        if diff or state["basis"] != self.basis:
            raise InputError(f"{path}: the checkpoint was made with other settings ({', '.join(diff) or 'basis'}"
                             f"); only {', '.join(RESUMABLE_CHANGES)} may change when resuming")
        with torch.no_grad():
            self.flat.copy_(state["params"].to(self.device))
            self.best_flat.copy_(state["best_params"].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.perm = None if state["perm"] is None else state["perm"].to(self.device)
        c = state["counters"]
        self.step, self.epoch, self.pos = int(c["step"]), int(c["epoch"]), int(c["pos"])
        self.elapsed, self.lr_scale = float(c["elapsed"]), float(c["lr_scale"])
        self.best_val, self.best_step = float(c["best_val"]), int(c["best_step"])
        self.evals_since_best = int(c["evals_since_best"])
        self.plateau_best = float(c["plateau_best"])
        self.evals_since_plateau_best = int(c["evals_since_plateau_best"])
        self.epoch_loss_sum, self.epoch_loss_n = float(c["epoch_loss_sum"]), int(c["epoch_loss_n"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.history["epoch"] = [int(v) for v in self.history["epoch"]]
        self.history["step"] = [int(v) for v in self.history["step"]]
        log.info("resumed from %s at step %d (epoch %d, %.1f s)", path, self.step, self.epoch, self.elapsed)


#: With ``num_threads="auto"``: steps timed per thread setting, and seconds between two comparisons.
THREAD_PROBE_STEPS = 8
THREAD_PROBE_EVERY_S = 20.0


class _ThreadTuner:
    """Compare 1 thread with torch's thread count on the running training, keep the faster.

    Starts on 1 thread (the safe choice on a busy machine). After a short warm-up it times
    ``THREAD_PROBE_STEPS`` steps with each setting and switches when the other is more than 10%
    faster. Comparisons repeat because the load of a shared machine changes: after
    ``THREAD_PROBE_EVERY_S`` seconds, and twice as long after each comparison that changed nothing (at
    most 16 times), so a losing setting costs little. The caller restores torch's setting afterwards.
    """

    def __init__(self, torch, max_threads):
        self.torch = torch
        self.options = (1, max_threads)
        self.current = 1
        self.interval = THREAD_PROBE_EVERY_S
        self.timing = {}
        self._start("warmup", 1)

    def _start(self, phase, threads):
        self.phase, self.count, self.t0 = phase, 0, time.perf_counter()
        self.torch.set_num_threads(threads)

    def after_step(self):
        self.count += 1
        now = time.perf_counter()
        if self.phase == "warmup":
            if self.count >= 3:
                self._start("time_current", self.current)
        elif self.phase in ("time_current", "time_other"):
            if self.count < THREAD_PROBE_STEPS:
                return
            self.timing[self.torch.get_num_threads()] = (now - self.t0) / self.count
            if self.phase == "time_current":
                other = self.options[1] if self.current == self.options[0] else self.options[0]
                self._start("time_other", other)
                return
            fast = min(self.timing, key=self.timing.get)
            if fast != self.current and self.timing[fast] < 0.9 * self.timing[self.current]:
                log.info("num_threads='auto': %d thread(s) take %.3g s per step, %d take %.3g s; using %d",
                         fast, self.timing[fast], self.current, self.timing[self.current], fast)
                self.current = fast
                self.interval = THREAD_PROBE_EVERY_S
            else:
                self.interval = min(2 * self.interval, 16 * THREAD_PROBE_EVERY_S)
            self._start("idle", self.current)
        elif now - self.t0 >= self.interval:
            self._start("time_current", self.current)


def _progress_bar(cfg, total, initial):
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="training", leave=False)
