"""FitConfig: every option and number of the fitter, in one frozen dataclass.

An unknown option is an error (the dataclass constructor raises ``TypeError``; :meth:`FitConfig.from_dict`
raises :class:`~paynekit.errors.InputError` naming it). Strategies (continuum, LSF, noise model) are
small objects, not strings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from ..errors import InputError
from ..instrument import ChebyshevContinuum, GaussianLSF, NoContinuum, PixelKernelLSF
from .uncertainties import NoiseModel

OPTIMIZERS = ("batched", "scipy")
BACKENDS = ("numpy", "torch")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")
RV_METHODS = ("ccf", "grid")


def _number(name, value, *, minimum=None, integer=False, strict=False):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not float(value).is_integer())
    ):
        raise InputError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise InputError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")


def _range(name, value):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a (low, high) pair, got {value!r}") from None
    if not hi > lo:
        raise InputError(f"{name} must have high > low, got {value!r}")
    return (lo, hi)


@dataclass(frozen=True)
class FitConfig:
    """Options of :func:`paynekit.fitting.fit`.

    Optimiser
        ``optimizer``: "batched" (many spectra at once, analytic Jacobians, Levenberg-Marquardt with
        bounds) or "scipy" (the reference: ``scipy.optimize.curve_fit(method="trf")``, one spectrum at
        a time). ``backend`` "numpy" or "torch" and ``device`` "cpu" or "cuda" (cuda needs torch) for the
        batched optimiser; ``dtype`` the precision of the model evaluation in the batched optimiser
        ("float32" default; the small linear algebra is always float64); ``polish_float64`` runs a final
        float64 Gauss-Newton iteration.
    Radial velocity
        ``rv_range`` (km/s): v is searched in [-rv_range, rv_range]; 0 fixes v = 0 (Astra's
        ``v_rad_tolerance = 0``). ``rv_method``: "ccf" (cross-correlation) or "grid" (chi2 on a grid of
        step ``rv_grid_step`` km/s, default one pixel). ``rv_window``: the optimiser refines v within
        this many km/s of the pre-search value.
    Pre-search
        ``presearch_size`` Sobol label vectors (Zeta-Payne uses 4000; 0 starts from the box centre);
        chi2 evaluated on at most ``presearch_max_pixels`` (evenly strided) model pixels;
        ``presearch_candidates``: with a fitted continuum, the best this many (under a pre-normalisation)
        get the exact linear continuum solve. ``n_starts``: the optimiser starts from the best K.
        ``restart_reduced_chi2``, ``restart_starts``: a star whose best fit has a reduced chi2 above
        this (default 1.5; None turns it off) is fitted again from the next ``restart_starts`` (2)
        pre-search candidates and keeps the lowest chi2: most such stars sit in a local minimum, and
        only they pay for the extra starts (on the demo's 200 mock stars with 25 labels, 17 had
        reduced chi2 > 1.5 from one start).
        ``presearch_scaled_solar``: the fraction of the pre-search set drawn on the scaled-solar
        subspace, where every [X/H] label equals [Fe/H] (or [M/H]) and every [X/Fe], [X/M] label is 0
        (see :func:`~paynekit.fitting.presearch.scaled_solar_points`). With 20 abundances in the box, 4000
        points spread over all 25 dimensions leave a start whose abundances are wrong by ~0.5 dex, and
        from there the optimiser ends in a local minimum for ~40 % of stars; the scaled-solar points
        cover (teff, logg, v_turb, v_macro, [Fe/H], ...) densely. 0 turns it off; ignored when the
        labels have no metallicity and abundance labels.
    Model
        ``continuum``: :class:`~paynekit.instrument.NoContinuum` (default) or
        :class:`~paynekit.instrument.ChebyshevContinuum`. ``resolution``: a resolving power R for a
        Gaussian LSF, or ``lsf`` an LSF object (not both); None = the emulator is at the data's resolution.
    Labels
        ``frozen``: {label: value} held fixed. ``priors``: {label: (mean, sigma)} Gaussian priors in
        physical units. ``scaled_bounds``: the box in scaled labels (The Payne's [-0.5, 0.5]).
    Convergence
        ``max_iterations`` (200: with 25 labels most stars converge in ~20-30 iterations, but ~2 % crawl along
        a degenerate valley for 100-200; on 400 mock APOGEE stars 100 left 8 of them flagged not converged,
        200 none, at the same mean cost); ``chi2_tolerance``: stop when the Gauss-Newton decrement (the chi2 still to
        gain, about (distance / sigma)^2) or the gain of the last step is below it (0.01: a tenth of a
        formal sigma); ``lm_damping`` initial Levenberg-Marquardt damping (Marquardt's diagonal
        scaling), ``lm_factor`` its growth after a rejected step (doubling with each further one),
        ``lm_max_rejections`` rejected steps in a row before a star stops; ``lm_trial_dampings``: with at
        least ``lm_trial_min_params`` free parameters (labels + v) each step tries these multiples of the
        current damping at once, chi2 only (the model without its Jacobian costs ~1/(F+1) of a Jacobian
        evaluation), and takes the Jacobian at the best one only: on 200 demo stars with 25 labels this
        cut the iterations from 36 to 29 and ended at lower chi2 for most stars (Teff RMS 58 -> 43 K);
        with 5 labels the extra evaluations cost more than they save, hence the threshold;
        ``incremental_jacobian`` (True): with numpy and a leaky-ReLU Payne network of two hidden layers,
        keep each star's Jacobian between steps and update it for the hidden units that changed side
        (exact up to float rounding; :class:`paynekit.emulators.payne.JacobianCache`) instead of
        evaluating it in full; ``lm_kink_steps``: with a leaky-ReLU Payne network of two hidden
        layers and the trial dampings on, each step also tries one that lands on the kinks (hidden units
        that changed side) the star crossed in its previous step and moves along them, which ends the
        zigzag across a kink at a minimum: on 512 mock APOGEE stars with 25 labels the errors against the
        truth shrank in 24 of 25 labels (Teff RMS 36.6 -> 32.9 K), at 20-30 % more time (docs/design.md);
        None (the default) takes them where the trials are evaluated in full and leaves them out where
        they are predicted with backtracking (``lm_predicted_trials``, ``lm_backtracking``), which does
        better without them;
        ``lm_hidden_curvature`` (True): with such a network, numpy, the trial dampings on, no LSF and
        model and data on one log-uniform grid, the steps take chi2 and gradient exactly but
        the curvature from a per-star Gram matrix in the network's last hidden layer
        (:mod:`paynekit.fitting.hidden_space`), and the exact curvature only at the end, for the
        covariance: minima as low in chi2 at 1.75x the speed for 25 APOGEE labels, labels as accurate
        for the median label (Teff RMS +6 %), often at another of the network's near-equal minima
        (docs/design.md); ``lm_predicted_trials`` (True): on that path, choose among the trial dampings
        and the kink step by the chi2 predicted in the last hidden layer
        (:meth:`~paynekit.fitting.hidden_space.HiddenSpaceEvaluator.predict`, exact through the kinks)
        and compute the model flux of the chosen trial only, taking the next one by prediction when
        it does not lower the true chi2: 1.3x faster, labels as accurate (docs/design.md);
        ``lm_backtracking`` ((0.5, 0.25, 0.125)): with predicted trials, the best trial's step is also tried
        at these fractions of its length (predicted, then checked like the others): a step that crosses
        kinks overshoots along a good direction, and more damping would also turn it. On 512 mock APOGEE
        stars with 25 labels: 30 -> 22 steps, 1.2x faster, chi2 lower by a median 0.8, Teff RMS
        34.9 -> 24.8 K, log g 0.29 -> 0.18 (docs/design.md); () turns it off;
        ``scipy_tolerance`` (ftol = xtol = gtol of curve_fit), ``scipy_max_nfev``.
    Data
        ``pixel_mask_file``: pixels to leave out of every fit, on the data's grid: a text file of
        (start, end) wavelength intervals in Angstrom, or an npz/HDF5 boolean array ``mask`` (True = masked),
        read by :func:`paynekit.fitting.io_bundle.read_pixel_mask`.
    Uncertainties
        ``noise_model``: a :class:`~paynekit.fitting.uncertainties.NoiseModel` or the path of one;
        ``parabola_uncertainty``: also the Zeta-Payne chi2-parabola errors (``zeta_e_<label>``), which need
        a resolving power (``resolution`` or ``parabola_resolution``).
    Flags (see :mod:`paynekit.flags`)
        ``flag_teff_range``, ``flag_logg_range``, ``flag_fe_h_range``, ``flag_min_snr`` (Astra's);
        ``flag_max_reduced_chi2``; ``flag_min_good_pixel_fraction``; ``flag_bound_tolerance`` (scaled
        units from a box edge); ``flag_rv_bound_tolerance`` (km/s); ``flag_presearch_shift`` (largest
        scaled-label change from the pre-search start).
    Resources
        ``chunk_size`` spectra per batch, capped so that one Jacobian block stays under
        ``max_chunk_bytes`` (the hidden-layer path forms the Jacobian only where its fits end, in blocks of
        that size, and caps its batches by its smaller per-star arrays); ``seed`` for the Sobol sequence.
    """

    optimizer: str = "batched"
    backend: str = "numpy"
    device: str = "cpu"
    dtype: str = "float32"
    polish_float64: bool = False
    rv_range: float = 500.0
    rv_method: str = "ccf"
    rv_grid_step: float | None = None
    rv_window: float = 25.0
    presearch_size: int = 4000
    presearch_max_pixels: int = 2000
    presearch_candidates: int = 64
    n_starts: int = 1
    restart_reduced_chi2: float | None = 1.5
    restart_starts: int = 2
    presearch_scaled_solar: float = 0.5
    continuum: object = field(default_factory=NoContinuum)
    resolution: float | None = None
    lsf: object | None = None
    frozen: dict = field(default_factory=dict)
    priors: dict = field(default_factory=dict)
    scaled_bounds: tuple = (-0.5, 0.5)
    max_iterations: int = 200
    chi2_tolerance: float = 1e-2
    lm_damping: float = 1e-3
    lm_factor: float = 2.0
    lm_max_rejections: int = 3
    lm_trial_dampings: tuple = (1.0, 0.1, 0.01)
    lm_trial_min_params: int = 12
    incremental_jacobian: bool = True
    lm_kink_steps: bool | None = None
    lm_hidden_curvature: bool = True
    lm_predicted_trials: bool = True
    lm_backtracking: tuple = (0.5, 0.25, 0.125)
    scipy_tolerance: float = 1e-8
    scipy_max_nfev: int = 500
    noise_model: object | None = None
    pixel_mask_file: str | None = None
    parabola_uncertainty: bool = False
    parabola_resolution: float | None = None
    flag_teff_range: tuple = (3100.0, 7900.0)
    flag_logg_range: tuple = (0.1, 5.2)
    flag_fe_h_range: tuple = (-1.4, 0.4)
    flag_min_snr: float = 70.0
    flag_max_reduced_chi2: float = 3.0
    flag_min_good_pixel_fraction: float = 0.5
    flag_bound_tolerance: float = 1e-3
    flag_rv_bound_tolerance: float = 0.1
    flag_presearch_shift: float = 0.5
    chunk_size: int = 256
    max_chunk_bytes: int = 512 * 2**20
    seed: int = 0

    def __post_init__(self):
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("backend", BACKENDS),
            ("device", DEVICES),
            ("dtype", DTYPES),
            ("rv_method", RV_METHODS),
        ):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.device == "cuda" and self.backend != "torch":
            raise InputError("device='cuda' needs backend='torch'")
        _number("rv_range", self.rv_range, minimum=0)
        _number("rv_window", self.rv_window, minimum=0, strict=True)
        if self.rv_grid_step is not None:
            _number("rv_grid_step", self.rv_grid_step, minimum=0, strict=True)
        factors = tuple(self.lm_trial_dampings)
        valid = all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in factors)
        if not factors or not valid:
            raise InputError(f"lm_trial_dampings must be positive numbers, got {self.lm_trial_dampings!r}")
        fractions = tuple(self.lm_backtracking)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < 1 for x in fractions):
            raise InputError(
                f"lm_backtracking must be fractions in (0, 1) (or empty), got {self.lm_backtracking!r}"
            )
        if self.lm_kink_steps not in (None, True, False):
            raise InputError(
                f"lm_kink_steps must be True, False or None (automatic), got {self.lm_kink_steps!r}"
            )
        for name in ("presearch_size", "seed", "lm_max_rejections", "restart_starts", "lm_trial_min_params"):
            _number(name, getattr(self, name), minimum=0, integer=True)
        for name in (
            "presearch_max_pixels",
            "presearch_candidates",
            "n_starts",
            "max_iterations",
            "scipy_max_nfev",
            "chunk_size",
            "max_chunk_bytes",
        ):
            _number(name, getattr(self, name), minimum=1, integer=True)
        for name in ("chi2_tolerance", "lm_damping", "scipy_tolerance"):
            _number(name, getattr(self, name), minimum=0, strict=True)
        _number("lm_factor", self.lm_factor, minimum=1, strict=True)
        if self.restart_reduced_chi2 is not None:
            _number("restart_reduced_chi2", self.restart_reduced_chi2, minimum=0, strict=True)
        _number("presearch_scaled_solar", self.presearch_scaled_solar, minimum=0)
        if self.presearch_scaled_solar > 1:
            raise InputError(f"presearch_scaled_solar must be a fraction in [0, 1], got {self.presearch_scaled_solar}")
        if self.n_starts > max(self.presearch_size, 1):
            raise InputError(
                f"n_starts ({self.n_starts}) cannot exceed presearch_size ({self.presearch_size})"
            )
        if not isinstance(self.continuum, (NoContinuum, ChebyshevContinuum)):
            raise InputError(
                f"continuum must be NoContinuum() or ChebyshevContinuum(degree, regions), got "
                f"{self.continuum!r}"
            )
        if self.resolution is not None:
            _number("resolution", self.resolution, minimum=0, strict=True)
            if self.lsf is not None:
                raise InputError("give either resolution or lsf, not both")
        if self.lsf is not None and not hasattr(self.lsf, "operator"):
            raise InputError(
                f"lsf must be an LSF object with .operator(wavelength) (GaussianLSF, "
                f"PixelKernelLSF), got {self.lsf!r}"
            )
        if self.parabola_resolution is not None:
            _number("parabola_resolution", self.parabola_resolution, minimum=0, strict=True)
        if self.parabola_uncertainty and self.resolution is None and self.parabola_resolution is None:
            raise InputError(
                "parabola_uncertainty needs a resolving power: set resolution or parabola_resolution"
            )
        lo, hi = _range("scaled_bounds", self.scaled_bounds)
        object.__setattr__(self, "scaled_bounds", (lo, hi))
        frozen = {}
        for k, v in dict(self.frozen).items():
            _number(f"frozen[{k!r}]", v)
            frozen[str(k)] = float(v)
        priors = {}
        for k, v in dict(self.priors).items():
            try:
                mu, sigma = (float(a) for a in v)
            except (TypeError, ValueError):
                raise InputError(f"priors[{k!r}] must be (mean, sigma), got {v!r}") from None
            if not (math.isfinite(mu) and math.isfinite(sigma) and sigma > 0):
                raise InputError(f"priors[{k!r}] needs a finite mean and sigma > 0, got {v!r}")
            priors[str(k)] = (mu, sigma)
        both = sorted(set(frozen) & set(priors))
        if both:
            raise InputError(f"labels {both} are both frozen and given a prior")
        object.__setattr__(self, "frozen", MappingProxyType(frozen))
        object.__setattr__(self, "priors", MappingProxyType(priors))
        if self.pixel_mask_file is not None:
            if not Path(self.pixel_mask_file).exists():
                raise InputError(f"pixel_mask_file {self.pixel_mask_file}: no such file")
            object.__setattr__(self, "pixel_mask_file", str(self.pixel_mask_file))
        if isinstance(self.noise_model, (str, Path)):
            object.__setattr__(self, "noise_model", NoiseModel.read(self.noise_model))
        elif self.noise_model is not None and not isinstance(self.noise_model, NoiseModel):
            raise InputError(
                f"noise_model must be a NoiseModel, a file path or None, got {self.noise_model!r}"
            )
        for name in ("flag_teff_range", "flag_logg_range", "flag_fe_h_range"):
            object.__setattr__(self, name, _range(name, getattr(self, name)))
        for name in (
            "flag_min_snr",
            "flag_max_reduced_chi2",
            "flag_bound_tolerance",
            "flag_rv_bound_tolerance",
            "flag_presearch_shift",
        ):
            _number(name, getattr(self, name), minimum=0)
        _number("flag_min_good_pixel_fraction", self.flag_min_good_pixel_fraction, minimum=0)
        if self.flag_min_good_pixel_fraction > 1:
            raise InputError(
                f"flag_min_good_pixel_fraction must be <= 1, got {self.flag_min_good_pixel_fraction}"
            )

    # -- derived ----------------------------------------------------------------------------------
    @property
    def fit_rv(self) -> bool:
        return self.rv_range > 0

    @property
    def effective_lsf(self):
        """The LSF object in use (from ``lsf`` or ``resolution``), or None."""
        if self.lsf is not None:
            return self.lsf
        if self.resolution is not None:
            return GaussianLSF(float(self.resolution))
        return None

    def replace(self, **changes) -> FitConfig:
        """A copy with some options changed (unknown names are an error)."""
        return FitConfig.from_dict({**self.to_dict(raw=True), **changes})

    def to_dict(self, raw: bool = False) -> dict:
        """Options as a dict; with ``raw=False`` JSON-friendly (objects as their repr)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, MappingProxyType):
                v = dict(v)
            if not raw and isinstance(
                v, (NoContinuum, ChebyshevContinuum, GaussianLSF, PixelKernelLSF, NoiseModel)
            ):
                v = repr(v) if not isinstance(v, PixelKernelLSF) else f"PixelKernelLSF({v.kernels.shape})"
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, options: dict) -> FitConfig:
        """Build from a dict; an unknown option is an :class:`InputError` that names it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise InputError(f"unknown FitConfig option(s) {unknown}; the options are {sorted(names)}")
        return cls(**options)


def parse_assignments(items, what: str = "--freeze") -> dict:
    """``["teff=4800", "logg=2.5"]`` -> ``{"teff": 4800.0, "logg": 2.5}`` (for the command line)."""
    out = {}
    for item in items or ():
        name, sep, value = str(item).partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name or number is None or not math.isfinite(number):
            raise InputError(f"{what} expects name=value with a finite number, got {item!r}")
        out[name] = number
    return out
