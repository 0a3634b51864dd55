"""Label spaces: names, units, bounds, and The Payne's scaling to [-0.5, 0.5].

The Payne scales every label with the minimum and maximum of its training set,
``x_s = (x - x_min) / (x_max - x_min) - 0.5``, so that the training box maps to [-0.5, 0.5]^L.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .checks import as_float_array
from .errors import InputError

SCALED_LOW = -0.5
SCALED_HIGH = 0.5

#: Units of the labels paynekit knows by name; anything else is dimensionless ("") unless given.
KNOWN_UNITS = {
    "teff": "K",
    "logg": "dex",
    "v_turb": "km/s",
    "v_micro": "km/s",
    "vmicro": "km/s",
    "v_macro": "km/s",
    "vmacro": "km/s",
    "v_rel": "km/s",
    "c12_c13": "",
}


def default_unit(name: str) -> str:
    key = name.lower()
    if key in KNOWN_UNITS:
        return KNOWN_UNITS[key]
    if key.endswith("_h") or key.endswith("_fe") or key.endswith("_m") or key in ("mh", "m_h", "fe_h", "feh"):
        return "dex"
    return ""


@dataclass(frozen=True, eq=False)
class LabelSpace:
    """Names, units and the training box [x_min, x_max] of a set of stellar labels."""

    names: tuple[str, ...]
    x_min: np.ndarray
    x_max: np.ndarray
    units: tuple[str, ...] = field(default=())

    def __post_init__(self):
        names = tuple(str(n) for n in self.names)
        if len(set(names)) != len(names):
            raise InputError(f"label names must be unique, got {names}")
        lo = as_float_array(self.x_min, "x_min", ndim=1)
        hi = as_float_array(self.x_max, "x_max", ndim=1)
        if lo.shape != (len(names),) or hi.shape != (len(names),):
            raise InputError(
                f"x_min {lo.shape} and x_max {hi.shape} must both have one value per label ({len(names)})"
            )
        if not np.all(hi > lo):
            bad = [names[i] for i in np.flatnonzero(~(hi > lo))]
            raise InputError(f"x_max must exceed x_min for every label; not for {bad}")
        units = tuple(self.units) if self.units else tuple(default_unit(n) for n in names)
        if len(units) != len(names):
            raise InputError(f"units has {len(units)} entries but there are {len(names)} labels")
        lo.flags.writeable = False
        hi.flags.writeable = False
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "x_min", lo)
        object.__setattr__(self, "x_max", hi)
        object.__setattr__(self, "units", units)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"LabelSpace({len(self)} labels: {', '.join(self.names)})"

    @property
    def span(self) -> np.ndarray:
        return self.x_max - self.x_min

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise InputError(f"unknown label {name!r}; the labels are {list(self.names)}") from None

    def scale(self, labels) -> np.ndarray:
        """Physical labels -> scaled labels (the training box maps to [-0.5, 0.5])."""
        x = np.asarray(labels)
        return (x - self.x_min.astype(x.dtype, copy=False)) / self.span.astype(x.dtype, copy=False) + SCALED_LOW

    def unscale(self, scaled) -> np.ndarray:
        """Scaled labels -> physical labels."""
        s = np.asarray(scaled)
        return (s - SCALED_LOW) * self.span.astype(s.dtype, copy=False) + self.x_min.astype(s.dtype, copy=False)

    def contains(self, labels) -> np.ndarray:
        """True where every label of a star lies inside [x_min, x_max]."""
        x = np.atleast_2d(labels)
        return np.all((x >= self.x_min) & (x <= self.x_max), axis=-1)

    def center(self) -> np.ndarray:
        return 0.5 * (self.x_min + self.x_max)

    @classmethod
    def from_training_labels(cls, names, labels, units=()) -> LabelSpace:
        """The box spanned by a training set, as The Payne defines x_min and x_max."""
        x = as_float_array(labels, "labels", ndim=2)
        return cls(tuple(names), x.min(axis=0), x.max(axis=0), tuple(units))


#: The 25 labels of The Payne's APOGEE model (Ting et al. 2019), in its order.
APOGEE_LABEL_NAMES = (
    "teff", "logg", "v_turb", "v_macro",
    "c_h", "n_h", "o_h", "na_h", "mg_h", "al_h", "si_h", "p_h", "s_h", "k_h", "ca_h",
    "ti_h", "v_h", "cr_h", "mn_h", "fe_h", "co_h", "ni_h", "cu_h", "ge_h", "c12_c13",
)  # fmt: skip

#: A default box for those labels (giants and dwarfs, the range of The Payne's APOGEE grid).
_APOGEE_MIN = [3500.0, 0.0, 0.5, 0.0] + [-1.5] * 20 + [5.0]
_APOGEE_MAX = [7000.0, 5.0, 3.0, 15.0] + [0.5] * 20 + [90.0]


def apogee_label_space() -> LabelSpace:
    """The 25-label APOGEE space with The Payne's names and a broad default box."""
    return LabelSpace(APOGEE_LABEL_NAMES, np.array(_APOGEE_MIN), np.array(_APOGEE_MAX))
