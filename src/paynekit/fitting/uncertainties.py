"""Uncertainties: the formal covariance in physical units, correlations, an empirical noise model, and
the Zeta-Payne chi2 parabola.

The optimisers work in scaled labels ``s = (x - x_min) / span - 0.5`` (and v in km/s). The formal
covariance there is ``C_s = (J^T W J)^-1`` (with the continuum coefficients profiled out, i.e. the
Schur complement). Since ``x = x_min + span * (s + 0.5)``, the covariance of the physical labels is
``C_x = D C_s D`` with ``D = diag(span)``: every element scales by the *product* of the two spans.
(The Payne's upstream fitter multiplies the whole block by ``span`` once, which is wrong for every
element: variances need span squared.)

Noise model (a small file, identity by default): for each label,
``e = sqrt((scale * raw_e)**2 + floor**2)``. Formats:

* JSON: ``{"format": "paynekit-noise-model", "version": 1,
  "labels": {"teff": {"scale": 1.3, "floor": 25.0}, "logg": {"scale": 1.1, "floor": 0.03}}}``
* npz: ``label_names`` (L,), ``scale`` (L,), ``floor`` (L,) (and optionally ``format``/``version``).

Labels the file does not name keep scale 1 and floor 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, InputError

log = logging.getLogger(__name__)

NOISE_MODEL_FORMAT = "paynekit-noise-model"
NOISE_MODEL_VERSION = 1


def physical_covariance(cov_scaled, spans) -> np.ndarray:
    """Covariance (..., F, F) of scaled parameters -> physical units: ``C_ij * span_i * span_j``."""
    spans = np.asarray(spans, dtype=np.float64)
    return np.asarray(cov_scaled, dtype=np.float64) * spans[:, None] * spans[None, :]


def correlations(cov) -> np.ndarray:
    """rho_ij = C_ij / sqrt(C_ii C_jj) for covariances (..., F, F) (NaN where a variance is not positive)."""
    cov = np.asarray(cov, dtype=np.float64)
    d = np.sqrt(
        np.where(np.diagonal(cov, axis1=-2, axis2=-1) > 0, np.diagonal(cov, axis1=-2, axis2=-1), np.nan)
    )
    return cov / (d[..., :, None] * d[..., None, :])


def invert_curvature(h) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of curvature matrices (n, F, F); returns (cov, ok) with NaN rows where not invertible."""
    h = np.asarray(h, dtype=np.float64)
    n, f, _ = h.shape
    cov = np.full_like(h, np.nan)
    ok = np.zeros(n, dtype=bool)
    if f == 0:
        return np.zeros_like(h), np.ones(n, dtype=bool)
    finite = np.all(np.isfinite(h.reshape(n, -1)), axis=1)
    d = np.sqrt(np.abs(np.diagonal(h, axis1=1, axis2=2)))
    for i in np.flatnonzero(finite):
        if np.any(d[i] == 0):
            continue
        # equilibrate so that the condition number reflects correlations, not units
        hs = h[i] / d[i][:, None] / d[i][None, :]
        try:
            c = np.linalg.cholesky(hs)
        except np.linalg.LinAlgError:
            continue
        inv_c = np.linalg.solve(c, np.eye(f))
        cov[i] = (inv_c.T @ inv_c) / d[i][:, None] / d[i][None, :]
        ok[i] = True
    return cov, ok


@dataclass(frozen=True)
class NoiseModel:
    """Per-label inflation of formal errors: ``e = sqrt((scale * raw_e)**2 + floor**2)``.

    ``scale`` and ``floor`` map label names to numbers; unnamed labels keep scale 1, floor 0.
    """

    scale: dict = field(default_factory=dict)
    floor: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, mapping in (("scale", self.scale), ("floor", self.floor)):
            clean = {}
            for k, v in dict(mapping).items():
                try:
                    val = float(v)
                except (TypeError, ValueError):
                    raise InputError(f"noise model {name}[{k!r}] must be a number, got {v!r}") from None
                if not math.isfinite(val) or val < 0:
                    raise InputError(f"noise model {name}[{k!r}] must be finite and >= 0, got {val}")
                clean[str(k)] = val
            object.__setattr__(self, name, clean)

    @property
    def is_identity(self) -> bool:
        return all(v == 1.0 for v in self.scale.values()) and all(v == 0.0 for v in self.floor.values())

    def check_labels(self, label_names) -> None:
        unknown = sorted((set(self.scale) | set(self.floor)) - set(label_names))
        if unknown:
            raise InputError(
                f"the noise model names labels {unknown} that the emulator does not have "
                f"(labels: {list(label_names)})"
            )

    def apply(self, label_names, raw_e) -> np.ndarray:
        """Adjusted errors (n, L) for formal errors ``raw_e`` (n, L) of labels ``label_names``."""
        raw = np.asarray(raw_e, dtype=np.float64)
        s = np.array([self.scale.get(n, 1.0) for n in label_names])
        f = np.array([self.floor.get(n, 0.0) for n in label_names])
        return np.sqrt((s * raw) ** 2 + f**2)

    # -- files ------------------------------------------------------------------------------------
    @classmethod
    def read(cls, path) -> NoiseModel:
        """Read a noise model from a JSON or npz file (formats in the module docstring)."""
        path = Path(path)
        if not path.exists():
            raise FileFormatError(f"{path}: no such noise-model file")
        if path.suffix.lower() == ".json":
            try:
                obj = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise FileFormatError(f"{path}: not valid JSON ({exc})") from None
            if not isinstance(obj, dict) or obj.get("format") != NOISE_MODEL_FORMAT:
                raise FileFormatError(f'{path}: expected a JSON object with "format": "{NOISE_MODEL_FORMAT}"')
            if obj.get("version") != NOISE_MODEL_VERSION:
                raise FileFormatError(
                    f"{path}: noise-model version {obj.get('version')!r} is not supported "
                    f"(this paynekit reads version {NOISE_MODEL_VERSION})"
                )
            labels = obj.get("labels")
            if not isinstance(labels, dict):
                raise FileFormatError(f'{path}: "labels" must map label names to {{"scale", "floor"}}')
            scale, floor = {}, {}
            for name, spec in labels.items():
                if not isinstance(spec, dict) or not set(spec) <= {"scale", "floor"}:
                    raise FileFormatError(
                        f"{path}: labels[{name!r}] must be an object with keys scale/floor, got {spec!r}"
                    )
                scale[name] = spec.get("scale", 1.0)
                floor[name] = spec.get("floor", 0.0)
            return cls(scale, floor)
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = {"label_names", "scale", "floor"} - set(data.files)
                if missing:
                    raise FileFormatError(f"{path}: noise-model npz lacks {sorted(missing)}")
                names = [str(s) for s in data["label_names"]]
                sc, fl = np.atleast_1d(data["scale"]), np.atleast_1d(data["floor"])
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise FileFormatError(f"{path}: not a JSON or npz noise model ({exc})") from None
        if not (len(names) == sc.size == fl.size):
            raise FileFormatError(f"{path}: label_names, scale and floor must have the same length")
        return cls(dict(zip(names, sc.tolist())), dict(zip(names, fl.tolist())))

    def write(self, path) -> Path:
        """Write as JSON (atomically)."""
        path = Path(path)
        names = sorted(set(self.scale) | set(self.floor))
        obj = {
            "format": NOISE_MODEL_FORMAT,
            "version": NOISE_MODEL_VERSION,
            "labels": {n: {"scale": self.scale.get(n, 1.0), "floor": self.floor.get(n, 0.0)} for n in names},
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(obj, fh, indent=2)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


# ------------------------------------------------------------------------------------------------
# Zeta-Payne parabola uncertainty
# ------------------------------------------------------------------------------------------------
def zeta_payne_n_deg(resolution: float, wavelength_start: float, wavelength_end: float) -> float:
    """Zeta-Payne's number of degrees of freedom, ``4 R (l_end - l_start) / (l_start + l_end)``."""
    return 4.0 * resolution * (wavelength_end - wavelength_start) / (wavelength_start + wavelength_end)


def parabola_sigma(step_minus, step_plus, chi2_minus, chi2_0, chi2_plus, n_deg) -> np.ndarray:
    """1-sigma half-width from a parabola through chi2 at -step_minus, 0, +step_plus (Zeta-Payne).

    The parabola ``chi2(d) = a d**2 + b d + chi2_0`` through the three points has its minimum
    ``chi2_min = chi2_0 - b**2 / (4 a)``; sigma is the half-width at which it has risen by
    ``chi2_min * sqrt(2 / n_deg)``, i.e. where it crosses ``chi2_min (1 + sqrt(2 / n_deg))``.
    NaN where the curvature is not positive.
    """
    hm = np.asarray(step_minus, dtype=np.float64)
    hp = np.asarray(step_plus, dtype=np.float64)
    cm, c0, cp = (np.asarray(v, dtype=np.float64) for v in (chi2_minus, chi2_0, chi2_plus))
    with np.errstate(divide="ignore", invalid="ignore"):
        a = ((cp - c0) / hp + (cm - c0) / hm) / (hp + hm)
        b = (cp - c0) / hp - a * hp
        chi2_min = c0 - b**2 / (4.0 * a)
        rise = chi2_min * math.sqrt(2.0 / n_deg)
        sigma = np.sqrt(rise / a)
    return np.where((a > 0) & np.isfinite(sigma), sigma, np.nan)


#: Step (scaled units) of the parabola probes: the formal error, clipped to this range.
PARABOLA_STEP_RANGE = (1e-4, 0.05)


def parabola_errors(fm, evaluator, data, weights, theta, cov, lower, upper, n_deg) -> np.ndarray:
    """Zeta-Payne errors (n, free labels) in scaled units: chi2 probed at theta -/+ one formal sigma
    along each free label (others held at the best fit, continuum re-solved), through a parabola."""
    from .forward import model_spectra, normal_equations

    d_b, w_b = evaluator.to_backend(data), evaluator.to_backend(weights)

    def chi2_at(th):
        vals = model_spectra(fm, evaluator, th, jacobian=False)
        return normal_equations(fm, vals, d_b, w_b, jacobian=False).chi2

    theta = np.asarray(theta, dtype=np.float64)
    c0 = chi2_at(theta)
    out = np.full((theta.shape[0], fm.n_free_labels), np.nan)
    for j in range(fm.n_free_labels):
        with np.errstate(invalid="ignore"):
            h = np.sqrt(np.where(cov[:, j, j] > 0, cov[:, j, j], np.nan))
        h = np.clip(np.nan_to_num(h, nan=PARABOLA_STEP_RANGE[1]), *PARABOLA_STEP_RANGE)
        hp = np.minimum(h, upper[:, j] - theta[:, j])
        hm = np.minimum(h, theta[:, j] - lower[:, j])
        tp, tm = theta.copy(), theta.copy()
        tp[:, j] += np.maximum(hp, 0.0)
        tm[:, j] -= np.maximum(hm, 0.0)
        cp, cm = chi2_at(tp), chi2_at(tm)
        sig = parabola_sigma(hm, hp, cm, c0, cp, n_deg)
        out[:, j] = np.where((hp > 0) & (hm > 0), sig, np.nan)  # at a box edge there is no parabola
    return out
