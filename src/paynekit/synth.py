"""Built-in demo synthesizer: APOGEE-like normalised spectra for The Payne's 25 labels.

**This is a demonstration model, not a stellar atmosphere or radiative-transfer code.** It exists so
that paynekit can run its whole job (synthesize a grid, train an emulator, fit mock stars) with no
external data. Its spectra look and behave like APOGEE spectra: thousands of lines of the right
species whose depths respond to every label with the right sign and roughly the right physics, and
they are smooth functions of the labels. Real science needs networks trained on real synthetic grids
(ATLAS/Kurucz, MARCS, Turbospectrum, ...) or on observed spectra.

The model
---------
1. *One line-forming layer.* The atmosphere is a single layer at ``T = 0.85 teff``
   (:data:`LAYER_T_FRACTION`), ``theta = 5040 / T``. Its gas and electron pressures come from
   hydrostatic equilibrium with an H- continuum, ``P_g P_e h(theta) ~ g`` with
   ``h = theta^2.5 10^(0.754 theta)``, and charge balance with hydrogen and the main electron donors
   (Na, Mg, Al, Si, K, Ca, Fe, each with its label abundance) through the Saha equation; the pair is
   solved by bisection in log P_e, vectorised over stars.
2. *Species.* Atoms (neutral or singly ionised) take their ionisation fraction from Saha at that
   P_e, so neutral lines of easily ionised metals are insensitive to gravity and strengthen towards
   low temperature, while ionised lines weaken with gravity (about g^-1/3). Molecules come from
   dissociation equilibrium: CO with C and O solved exactly (a quadratic), CN and OH as trace species
   using the free C and O; the C budget is split between 12C and 13C by ``c12_c13``. Hydrogen
   Brackett lines (n = 11..22 -> 4) depend on the n=4 population (12.75 eV) and on P_e.
3. *Lines.* Each line has a fixed wavelength (vacuum), species, excitation potential chi and an
   effective log gf, and its integrated optical depth in km/s is
   ``log10 S = loggf + Psi_species(labels) - theta chi``, where Psi holds abundance, ionisation or
   molecular fraction, continuum opacity (``1 / (P_e h(theta))``) and, for molecules, the
   rotational partition function. The optical depth profile is a Voigt profile whose Gaussian width
   is ``b^2 = 2 k T / m + v_turb^2`` (thermal plus microturbulence, per mass group) and whose
   Lorentz width is van der Waals damping (~ P_g) for atoms, weaker for molecules, and linear Stark
   broadening (~ P_e^(2/3)) for hydrogen.
4. *Curve of growth.* The normalised flux at high resolution is
   ``1 - MAX_LINE_DEPTH (1 - exp(-tau))`` with ``tau`` the sum of all profiles, so weak lines grow
   linearly with abundance and strong lines saturate, flatten and grow damping wings.
5. *Broadening.* That spectrum is convolved with a Gaussian macroturbulence (1/e half width
   ``v_macro``) and a Gaussian instrumental profile of FWHM ``c / R`` (R = 22,500) and sampled at the
   requested pixels.

The line list is drawn once from a seed (:class:`DemoSynthesizer` ``seed``) and rounded like a real
line list (0.001 A, 0.001 eV, 0.001 dex), so it is the same on every machine. Its CO lines are the
real band structure of the 12C16O and 13C16O second overtone (Delta v = 3) from Dunham constants;
CN, OH and atomic lines are drawn at random positions with species-dependent excitation and strength
distributions, calibrated so that the line strengths of a reference giant (:data:`REFERENCE_LABELS`)
follow a plausible distribution; the strongest CN lines get 13CN isotopic partners a few A away.
Lines are placed over the apStar range plus a margin of :data:`MARGIN_PIXELS` apStar pixels (about
15048-17060 A), so that the edge pixels and Doppler-shifted grids see the same line density as the
middle.

Computation
-----------
Everything works on a fine grid uniform in log wavelength (:data:`OVERSAMPLE` points per apStar
pixel, 1.035 km/s), where every velocity broadening is a fixed kernel. Line opacities are spread on
that grid with cubic B-spline weights (which keep each line's area and centroid and add a fixed
variance of dv^2/3, taken out of the Gaussian width) and convolved with each star's Voigt kernels by
FFT: the Voigt has an analytic Fourier transform, and summing its aliases makes the kernel the exact
transform of the sampled profile, so the optical depth is positive (no ringing). The Brackett lines
(few, very broad) are placed at exact positions by a direct DFT, and their Stark wings are tempered
beyond :data:`STARK_WING_CUTOFF`. After ``exp(-tau)`` the macro and instrumental broadening is a
second FFT product, and the result is resampled to the output pixels exactly (phase shift) when they
lie on the apStar lattice or any constant log shift of it (a Doppler-shifted apStar grid, The Payne's
7214-pixel grid), or by cubic spline otherwise. Compared with a direct calculation (Voigt on a
0.05 km/s grid, exp, direct convolution) a single saturated line agrees to 3e-5 in flux for typical
labels and to 2e-3 for the narrowest lines of the box (teff 3500 K, v_turb 0.5 km/s). Stars are
processed in chunks; nothing loops over stars or pixels in Python. A 2000-spectrum grid takes about
10 s on one core (benchmarks/synth_grid.py).

Label box
---------
:attr:`DemoSynthesizer.label_space` is :func:`paynekit.labels.apogee_label_space` unchanged (teff
3500-7000 K, logg 0-5, v_turb 0.5-3, v_macro 0-15 km/s, [X/H] -1.5..0.5, c12_c13 5-90). Labels
outside it are computed (the model extrapolates) as long as they are physical (teff > 0,
v_turb >= 0, v_macro >= 0, c12_c13 > 0).

Also here: :func:`sample_labels` (realistic label vectors), :func:`make_grid` (labels and spectra)
and :func:`mock_observations` (clean spectra -> noisy, shifted, continuum-multiplied, gapped
:class:`~paynekit.spectra.SpectrumBatch`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy.interpolate import CubicSpline
from scipy.special import ndtr, ndtri

from .checks import as_float_array, as_label_matrix, check_increasing
from .errors import InputError
from .labels import APOGEE_LABEL_NAMES, LabelSpace, apogee_label_space
from .spectra import SpectrumBatch
from .wavelength import (
    APOGEE_CHIPS,
    APSTAR_LOG10_START,
    APSTAR_LOG10_STEP,
    APSTAR_N_PIXELS,
    apstar_wavelength,
)

logger = logging.getLogger(__name__)

# -- physical constants ---------------------------------------------------------------------------
C_KMS = 299792.458  #: speed of light, km/s
K_BOLTZMANN = 1.380649e-23  # J/K
AMU = 1.66053907e-27  # kg
EV_PER_WAVENUMBER = 1.239841984e-4  # eV per cm^-1
RYDBERG_H = 109677.5834  # cm^-1 (hydrogen, finite nuclear mass)
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

# -- model constants (demo choices, documented in the module docstring) ------------------------------
#: Fine-grid points per apStar pixel (1.035 km/s per fine point).
OVERSAMPLE = 4
#: apStar pixels of margin (with lines) added at each end of the fine grid (~1060 km/s).
MARGIN_PIXELS = 256
#: Output pixels must be this far (km/s) inside the fine grid: FFT wrap-around stays outside.
GUARD_KMS = 150.0
#: Temperature of the single line-forming layer as a fraction of teff.
LAYER_T_FRACTION = 0.85
#: Largest intrinsic line depth: flux = 1 - MAX_LINE_DEPTH * (1 - exp(-tau)).
MAX_LINE_DEPTH = 0.9
#: log10(P_g P_e h(theta)) = logg + HYDROSTATIC_CONSTANT (cgs); the solar layer gets log P_g = 4.1,
#: log P_e = 0.15, a red-clump giant log P_g = 3.0, log P_e = -1.1.
HYDROSTATIC_CONSTANT = 0.65
#: He/H number ratio (P_H = P_g / (1 + HE_ABUNDANCE)).
HE_ABUNDANCE = 0.085
#: Lorentz half widths (km/s) at the solar layer: van der Waals for atoms and molecules (scale as P_g
#: T^0.3), linear Stark for the Brackett lines (scales as P_e^(2/3)).
GAMMA_VDW_SUN = 0.6
GAMMA_MOLECULE_SUN = 0.06
GAMMA_STARK_SUN = 40.0
#: Stark wings of the Brackett lines are tempered beyond this velocity (km/s) instead of running as
#: a pure Lorentzian across the whole band.
STARK_WING_CUTOFF = 1500.0
#: Variance (in fine pixels^2, times 2 for b^2) added by the cubic B-spline placement of lines, and the
#: smallest Gaussian width left after taking it out (fine pixels; only reached far outside the label box).
SPREAD_B2 = 2.0 / 3.0
MIN_B_EFF = 0.3
#: Default instrumental resolving power (APOGEE).
DEFAULT_RESOLUTION = 22500.0
DEFAULT_SEED = 20251122
DEFAULT_N_LINES = 5000
MIN_N_LINES = 300
#: Stars per FFT chunk (bounds memory to ~150 MB).
DEFAULT_CHUNK = 64

#: The star at which line strengths are calibrated (a red-clump-like giant, solar abundances).
REFERENCE_LABELS = {"teff": 4750.0, "logg": 2.5, "v_turb": 1.5, "v_macro": 5.0, "c12_c13": 20.0}
#: Hydrogen lines are calibrated on a warm dwarf instead (they are invisible in the reference giant).
HOT_REFERENCE_LABELS = {"teff": 6500.0, "logg": 4.2, "v_turb": 1.2, "v_macro": 4.0, "c12_c13": 50.0}
SOLAR_LABELS = {"teff": 5772.0, "logg": 4.44, "v_turb": 1.0, "v_macro": 3.0, "c12_c13": 89.0}


@dataclass(frozen=True)
class Element:
    """Rough atomic data: label, mass (amu), solar log N/N_H (Asplund et al. 2009), first ionisation
    potential (eV), log10(2 U_II / U_I) (partition ratio in the Saha equation)."""

    symbol: str
    label: str | None
    mass: float
    log_eps: float
    ionisation: float
    log_u_ratio: float


ELEMENTS = {e.symbol: e for e in (
    Element("H", None, 1.008, 0.0, 13.598, 0.0),
    Element("C", "c_h", 12.011, 8.43 - 12, 11.260, 0.12),
    Element("N", "n_h", 14.007, 7.83 - 12, 14.534, 0.65),
    Element("O", "o_h", 15.999, 8.69 - 12, 13.618, -0.05),
    Element("Na", "na_h", 22.990, 6.24 - 12, 5.139, 0.0),
    Element("Mg", "mg_h", 24.305, 7.60 - 12, 7.646, 0.60),
    Element("Al", "al_h", 26.982, 6.45 - 12, 5.986, -0.48),
    Element("Si", "si_h", 28.086, 7.51 - 12, 8.152, 0.12),
    Element("P", "p_h", 30.974, 5.41 - 12, 10.487, 0.65),
    Element("S", "s_h", 32.06, 7.12 - 12, 10.360, -0.05),
    Element("K", "k_h", 39.098, 5.03 - 12, 4.341, 0.0),
    Element("Ca", "ca_h", 40.078, 6.34 - 12, 6.113, 0.60),
    Element("Ti", "ti_h", 47.867, 4.95 - 12, 6.828, 0.56),
    Element("V", "v_h", 50.942, 3.93 - 12, 6.746, 0.24),
    Element("Cr", "cr_h", 51.996, 5.64 - 12, 6.767, 0.23),
    Element("Mn", "mn_h", 54.938, 5.43 - 12, 7.434, 0.37),
    Element("Fe", "fe_h", 55.845, 7.50 - 12, 7.902, 0.48),
    Element("Co", "co_h", 58.933, 4.99 - 12, 7.881, 0.23),
    Element("Ni", "ni_h", 58.693, 6.22 - 12, 7.640, -0.18),
    Element("Cu", "cu_h", 63.546, 4.19 - 12, 7.726, 0.0),
    Element("Ge", "ge_h", 72.630, 3.65 - 12, 7.900, -0.10),
)}  # fmt: skip

#: Electron donors in the charge balance (besides hydrogen).
DONORS = ("Na", "Mg", "Al", "Si", "K", "Ca", "Fe")


@dataclass(frozen=True)
class Molecule:
    """Diatomic data: reduced mass (amu), dissociation energy D0 (eV), rotational constant B (cm^-1)
    and ground-state statistical weights of the two atoms (for the equilibrium constant)."""

    name: str
    atoms: tuple[str, str]
    mu: float
    d0: float
    b_rot: float
    g_atoms: float


MOLECULES = {m.name: m for m in (
    Molecule("CO", ("C", "O"), 6.856, 11.09, 1.931, 81.0),
    Molecule("CN", ("C", "N"), 6.462, 7.72, 1.900, 36.0),
    Molecule("OH", ("O", "H"), 0.948, 4.39, 18.9, 18.0),
)}  # fmt: skip

#: Mass groups sharing one Voigt kernel per star: representative mass (amu) and damping kind.
GROUPS = (
    ("light atoms", 24.0, "vdw"),  # C .. Ca
    ("heavy atoms", 55.0, "vdw"),  # Ti .. Ge
    ("molecules", 26.0, "molecule"),  # CO, CN, OH and isotopologues
    ("hydrogen", 1.008, "stark"),
)
GROUP_HYDROGEN = 3


@dataclass(frozen=True)
class Species:
    """A line-forming species. ``kind`` is "atom", "molecule" or "hydrogen"; ``isotope`` is 12 or 13
    for carbon-bearing molecules (0 otherwise)."""

    name: str
    kind: str
    element: str  # atom: the element; molecule: the molecule name ("CO", "CN", "OH")
    stage: int = 0  # 0 neutral, 1 singly ionised
    isotope: int = 0

    @property
    def mass(self) -> float:
        if self.kind == "molecule":
            a, b = MOLECULES[self.element].atoms
            return ELEMENTS[a].mass + ELEMENTS[b].mass + (1.0 if self.isotope == 13 else 0.0)
        return ELEMENTS[self.element].mass

    @property
    def group(self) -> int:
        if self.kind == "hydrogen":
            return GROUP_HYDROGEN
        if self.kind == "molecule":
            return 2
        return 0 if self.mass < 45 else 1


#: Random atomic lines: species -> (share of the atomic lines, excitation range (eV), range of
#: log10 S (km/s) in the reference giant). Strengths are drawn as lo + (hi - lo) u^2 (mostly weak).
#: With these ranges the fraction of pixels deeper than 0.05 / 0.1 / 0.2 / 0.3 in a DR14 giant of
#: ../shared/data (4860 K, logg 2.4, [M/H] -0.33, with its ASPCAP labels) is 0.20 / 0.07 / 0.012 /
#: 0.002 in the demo against 0.23 / 0.08 / 0.013 / 0.004 in the real spectrum.
ATOMIC_LINES = {
    "Fe I": (0.30, (2.2, 6.5), (-2.4, 0.8)),
    "Fe II": (0.015, (5.5, 6.2), (-2.2, -0.8)),
    "Mg I": (0.04, (5.1, 6.8), (-1.8, 1.4)),
    "Si I": (0.07, (5.0, 7.2), (-1.8, 1.1)),
    "Al I": (0.015, (4.0, 4.2), (-1.2, 1.0)),
    "Na I": (0.012, (3.7, 3.8), (-1.5, 0.3)),
    "K I": (0.012, (2.6, 2.7), (-1.5, 0.1)),
    "Ca I": (0.03, (4.5, 5.0), (-1.5, 0.6)),
    "Ti I": (0.06, (0.8, 2.3), (-2.0, 0.4)),
    "Ti II": (0.012, (3.0, 3.2), (-1.8, -0.5)),
    "V I": (0.02, (1.0, 2.5), (-2.2, -0.5)),
    "Cr I": (0.03, (3.0, 4.2), (-2.0, 0.0)),
    "Mn I": (0.02, (4.1, 4.9), (-1.7, 0.4)),
    "Co I": (0.02, (2.3, 4.3), (-2.2, -0.4)),
    "Ni I": (0.05, (4.0, 6.0), (-2.0, 0.3)),
    "Cu I": (0.012, (3.8, 5.4), (-2.2, -0.6)),
    "Ge I": (0.012, (2.0, 2.4), (-2.2, -0.8)),
    "C I": (0.03, (7.4, 9.7), (-2.2, -0.2)),
    "N I": (0.015, (10.3, 11.8), (-3.4, -1.8)),
    "O I": (0.012, (9.1, 12.1), (-3.2, -1.7)),
    "P I": (0.012, (7.2, 8.1), (-3.0, -1.4)),
    "S I": (0.015, (6.5, 8.7), (-2.4, -1.0)),
}
#: Shares of the whole line list: 12CO and 13CO each, CN, 13CN partners, OH (the rest is atoms).
CO_SHARE = 0.10
CN_SHARE = 0.18
CN13_SHARE = 0.05
OH_SHARE = 0.08
#: Random molecular lines: excitation range (eV) and log10 S range in the reference giant.
CN_LINES = ((0.05, 1.9), (-2.4, 0.2))
OH_LINES = ((0.25, 1.6), (-2.0, 0.2))
#: Strongest 12CO line in the reference giant (log10 S, km/s).
CO_MAX_LOG_STRENGTH = 0.7
#: Brackett lines n -> 4 in the list, and log10 S of Br 11 in the hot reference dwarf.
BRACKETT_UPPER = tuple(range(11, 23))
BRACKETT11_LOG_STRENGTH = 2.0
#: 13CN partner offsets from their 12CN line (A, random sign).
CN13_SHIFT_RANGE = (1.0, 8.0)

#: 12C16O ground-state Dunham constants (cm^-1) and the 13C16O mass ratio rho = sqrt(mu12/mu13).
CO_CONSTANTS = {"we": 2169.81358, "wexe": 13.28831, "be": 1.93128087, "ae": 0.01750441, "de": 6.1215e-6}
CO13_RHO = float(np.sqrt((12.0 * 15.9949) / (12.0 + 15.9949) / ((13.00335 * 15.9949) / (13.00335 + 15.9949))))


def _species_table() -> tuple[Species, ...]:
    out = [Species(name, "atom", name.split()[0], 0 if name.endswith(" I") else 1) for name in ATOMIC_LINES]
    out += [Species("CO", "molecule", "CO", isotope=12), Species("13CO", "molecule", "CO", isotope=13),
            Species("CN", "molecule", "CN", isotope=12), Species("13CN", "molecule", "CN", isotope=13),
            Species("OH", "molecule", "OH"), Species("H I", "hydrogen", "H")]
    return tuple(out)


SPECIES = _species_table()
SPECIES_INDEX = {s.name: i for i, s in enumerate(SPECIES)}

LINE_LIST_DTYPE = np.dtype([
    ("wavelength", "f8"),  # vacuum Angstrom
    ("species", "U5"),
    ("excitation", "f8"),  # eV, lower level
    ("loggf", "f8"),  # effective log gf of this model: log10 S = loggf + Psi_species - theta * chi
    ("log_strength_ref", "f8"),  # log10 S (km/s) in the calibration star of its species
    ("group", "i4"),  # Voigt kernel group (see GROUPS)
    ("partner", "i4"),  # index of the isotopic partner line (12C <-> 13C), -1 if none
])  # fmt: skip


# ================================================================================================
# Labels -> state of the line-forming layer
# ================================================================================================
def _label_col(labels: np.ndarray, name: str) -> np.ndarray:
    return labels[:, APOGEE_LABEL_NAMES.index(name)]


def _log1p10(z):
    """log10(1 + 10^z), stable for any z."""
    return np.logaddexp(0.0, z * np.log(10.0)) / np.log(10.0)


def _log_saha(element: Element, log_t, theta):
    """log10 of the Saha factor Phi = P_e N_II / N_I (dyn cm^-2)."""
    return element.log_u_ratio + 2.5 * log_t - theta * element.ionisation - 0.1762


def _log_k_molecule(mol: Molecule, log_t, theta):
    """log10 of the dissociation constant K_p = P_A P_B / P_AB (dyn cm^-2), rigid rotor, no vibration."""
    return (4.414 + 1.5 * np.log10(mol.mu) + 2.5 * log_t + np.log10(mol.g_atoms)
            - np.log10(0.6950 * 10**log_t / mol.b_rot) - theta * mol.d0)


def layer_state(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Physical state of the line-forming layer for labels (N, 25): temperatures, pressures, molecules.

    Returns a dict of (N,) arrays: ``T``, ``theta``, ``log_pg``, ``log_pe``, ``log_ph``, ``log_h``
    (H- opacity temperature factor), ``log_pco``, ``log_pcn``, ``log_poh``, ``log_c_free_frac``,
    ``log_o_free_frac``. All logs are base 10, pressures in dyn cm^-2.
    """
    t = LAYER_T_FRACTION * _label_col(labels, "teff")
    theta = 5040.0 / t
    log_t = np.log10(t)
    log_h = 2.5 * np.log10(theta) + 0.754 * theta
    log_a = _label_col(labels, "logg") + HYDROSTATIC_CONSTANT - log_h  # log10(P_g P_e)
    log_a_h = log_a - np.log10(1.0 + HE_ABUNDANCE)  # log10(P_H P_e)
    # donors: log eps_k + [X/H] and log Phi_k, shape (N, 1 + n_donors)
    log_eps = np.stack([np.zeros_like(t)] + [ELEMENTS[d].log_eps + _label_col(labels, ELEMENTS[d].label)
                                             for d in DONORS], axis=1)
    log_phi = np.stack([_log_saha(ELEMENTS["H"], log_t, theta)]
                       + [_log_saha(ELEMENTS[d], log_t, theta) for d in DONORS], axis=1)
    # charge balance: P_e^2 = P_H P_e sum_k eps_k Phi_k / (Phi_k + P_e); solve 2y - log_a_h - log(sum) = 0
    lo = np.full_like(t, -10.0)
    hi = np.full_like(t, 8.0)
    for _ in range(60):  # bisection: 18 / 2^60 ~ 1.6e-17 dex, i.e. converged to machine precision
        y = 0.5 * (lo + hi)
        terms = log_eps - _log1p10(y[:, None] - log_phi)
        f = 2.0 * y - log_a_h - np.log10(np.sum(10.0**terms, axis=1))
        pos = f > 0
        hi = np.where(pos, y, hi)
        lo = np.where(pos, lo, y)
    log_pe = 0.5 * (lo + hi)
    log_pg = log_a - log_pe
    log_ph = log_a_h - log_pe
    # molecules: CO exact (quadratic), CN and OH as trace species
    ph = 10.0**log_ph
    ct = 10.0 ** (ELEMENTS["C"].log_eps + _label_col(labels, "c_h")) * ph
    ot = 10.0 ** (ELEMENTS["O"].log_eps + _label_col(labels, "o_h")) * ph
    log_nt = ELEMENTS["N"].log_eps + _label_col(labels, "n_h") + log_ph
    k_co = 10.0 ** _log_k_molecule(MOLECULES["CO"], log_t, theta)
    # free C (u) and free O (v): u^2 + (Ot - Ct + K) u - K Ct = 0 and the symmetric one, cancellation-free
    b_c = ot - ct + k_co
    b_o = ct - ot + k_co
    disc = np.sqrt(b_c * b_c + 4.0 * k_co * ct)
    u = np.where(b_c > 0, 2.0 * k_co * ct / np.where(b_c > 0, b_c + disc, 1.0), 0.5 * (disc - b_c))
    v = np.where(b_o > 0, 2.0 * k_co * ot / np.where(b_o > 0, b_o + disc, 1.0), 0.5 * (disc - b_o))
    log_u, log_v = np.log10(u), np.log10(v)
    return {
        "T": t, "theta": theta, "log_h": log_h, "log_pg": log_pg, "log_pe": log_pe, "log_ph": log_ph,
        "log_pco": log_u + log_v - np.log10(k_co),
        "log_pcn": log_u + log_nt - _log_k_molecule(MOLECULES["CN"], log_t, theta),
        "log_poh": log_v + log_ph - _log_k_molecule(MOLECULES["OH"], log_t, theta),
        "log_c_free_frac": log_u - np.log10(ct), "log_o_free_frac": log_v - np.log10(ot),
    }  # fmt: skip


def species_terms(labels: np.ndarray, state: dict | None = None) -> np.ndarray:
    """Psi (N, n_species): the label-dependent part of log10 line strength for each species in SPECIES."""
    st = layer_state(labels) if state is None else state
    log_t = np.log10(st["T"])
    cont = st["log_pe"] + st["log_h"]  # log10 continuum opacity per H atom (up to a constant)
    ratio = _label_col(labels, "c12_c13")
    log_frac12 = np.log10(ratio / (1.0 + ratio))
    log_frac13 = -np.log10(1.0 + ratio)
    out = np.empty((labels.shape[0], len(SPECIES)))
    for i, sp in enumerate(SPECIES):
        if sp.kind == "atom":
            el = ELEMENTS[sp.element]
            z = _log_saha(el, log_t, st["theta"]) - st["log_pe"]  # log10(N_II / N_I)
            log_frac = -_log1p10(z) if sp.stage == 0 else -_log1p10(-z)
            psi = el.log_eps + _label_col(labels, el.label) + log_frac - cont
            if sp.element == "C":
                psi = psi + st["log_c_free_frac"]
            elif sp.element == "O":
                psi = psi + st["log_o_free_frac"]
        elif sp.kind == "hydrogen":
            z = _log_saha(ELEMENTS["H"], log_t, st["theta"]) - st["log_pe"]
            psi = -_log1p10(z) - cont
        else:
            mol = MOLECULES[sp.element]
            psi = st["log_p" + sp.element.lower()] - st["log_ph"] - cont - np.log10(0.6950 * st["T"] / mol.b_rot)
            if sp.isotope == 12:
                psi = psi + log_frac12
            elif sp.isotope == 13:
                psi = psi + log_frac13
        out[:, i] = psi
    return out


def _labels_from_dict(values: dict) -> np.ndarray:
    x = np.zeros((1, len(APOGEE_LABEL_NAMES)))
    for k, v in values.items():
        x[0, APOGEE_LABEL_NAMES.index(k)] = v
    return x


# ================================================================================================
# The line list
# ================================================================================================
def _co_band_lines(rho: float):
    """Second-overtone (v+3 <- v) lines of CO, v = 0..9, J = 0..120, R and P branches.

    Returns (wavelength A (vacuum), lower-level excitation eV, log10 relative gf), always in the same
    transition order, so index i is the same (v, branch, J) for 12C16O (``rho`` = 1) and 13C16O
    (``rho`` = sqrt(mu12/mu13): isotopic scaling of the Dunham constants).
    """
    c = CO_CONSTANTS
    we, wexe, be, ae, de = c["we"] * rho, c["wexe"] * rho**2, c["be"] * rho**2, c["ae"] * rho**3, c["de"] * rho**4

    def g(v):
        return we * (v + 0.5) - wexe * (v + 0.5) ** 2

    def f(v, j):
        bv = be - ae * (v + 0.5)
        return bv * j * (j + 1) - de * (j * (j + 1)) ** 2

    wl, chi, loggf = [], [], []
    j = np.arange(1, 121, dtype=float)
    for v in range(10):
        # band strength of a Delta v = 3 overtone grows roughly as (v+1)(v+2)(v+3)/6 (harmonic estimate)
        band = np.log10((v + 1) * (v + 2) * (v + 3) / 6.0)
        e_low = (g(v) - g(0) + f(v, j)) * EV_PER_WAVENUMBER
        for dj, hl in ((+1, j + 1), (-1, j)):  # R and P branches, Honl-London factors J+1 and J
            nu = g(v + 3) - g(v) + f(v + 3, j + dj) - f(v, j)
            wl.append(1e8 / nu)
            chi.append(e_low)
            loggf.append(band + np.log10(hl))
    return np.concatenate(wl), np.concatenate(chi), np.concatenate(loggf)


def _brackett_lines():
    n = np.array(BRACKETT_UPPER, dtype=float)
    wn = RYDBERG_H * (1.0 / 16.0 - 1.0 / n**2)
    # Kramers' oscillator strength for 4 -> n (Gaunt factor 1), statistical weight g = 2 * 4^2
    f = 32.0 / (3.0 * np.sqrt(3.0) * np.pi) / (4.0**5 * n**3) / (1.0 / 16.0 - 1.0 / n**2) ** 3
    return 1e8 / wn, np.full(n.size, RYDBERG_H * (1 - 1 / 16.0) * EV_PER_WAVENUMBER), np.log10(32.0 * f)


def _strength_draw(u, lo_hi):
    lo, hi = lo_hi
    return lo + (hi - lo) * u**2


def build_line_list(seed: int, n_lines: int, log_wl_range: tuple[float, float]) -> np.ndarray:
    """Draw the demo line list (structured array, sorted by wavelength) deterministically from ``seed``.

    Only uniform draws of one generator are used, then transformed here, so the list does not depend
    on numpy's distribution algorithms; values are rounded like a real line list. Each line's
    ``log_strength_ref`` is its log10 S in the calibration star of its species (REFERENCE_LABELS, or
    HOT_REFERENCE_LABELS for hydrogen), and ``loggf`` is derived from it; a 13C line has the loggf of
    its 12C partner.
    """
    rng = np.random.default_rng(seed)
    lo_log, hi_log = log_wl_range
    lo_wl, hi_wl = 10.0**lo_log, 10.0**hi_log
    theta_ref = 5040.0 / (LAYER_T_FRACTION * REFERENCE_LABELS["teff"])
    log_ratio_ref = np.log10(REFERENCE_LABELS["c12_c13"])

    n_h = len(BRACKETT_UPPER)
    n_co = round(CO_SHARE * n_lines)
    n_cn = round(CN_SHARE * n_lines)
    n_cn13 = round(CN13_SHARE * n_lines)
    n_oh = round(OH_SHARE * n_lines)
    n_atoms = n_lines - n_h - 2 * n_co - n_cn - n_cn13 - n_oh
    shares = np.array([v[0] for v in ATOMIC_LINES.values()])
    counts = np.maximum(2, np.floor(shares / shares.sum() * n_atoms)).astype(int)
    counts[list(ATOMIC_LINES).index("Fe I")] += n_atoms - counts.sum()

    wl, sp, chi, xs, part = [], [], [], [], []

    def n_so_far():
        return sum(a.size for a in wl)

    def add(wavelength, species, excitation, strength, partner=None):
        wl.append(np.asarray(wavelength, float))
        sp.append(np.full(np.size(wavelength), SPECIES_INDEX[species]))
        chi.append(np.asarray(excitation, float))
        xs.append(np.asarray(strength, float))
        part.append(np.full(np.size(wavelength), -1) if partner is None else np.asarray(partner))

    def positions(u):
        return 10.0 ** (lo_log + (hi_log - lo_log) * u)

    def uniform(u, lo_hi):
        return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u

    # atoms
    for (name, (_, chi_range, x_range)), n in zip(ATOMIC_LINES.items(), counts, strict=True):
        u = rng.random((3, n))
        add(positions(u[0]), name, uniform(u[1], chi_range), _strength_draw(u[2], x_range))
    # CN and 13CN partners of the strongest CN lines (same transition strength, a few A away)
    u = rng.random((3, n_cn))
    cn_wl, cn_chi, cn_x = positions(u[0]), uniform(u[1] ** 1.5, CN_LINES[0]), _strength_draw(u[2], CN_LINES[1])
    strongest = np.argsort(-cn_x, kind="stable")[:n_cn13]
    u13 = rng.random((2, n_cn13))
    shift = np.where(u13[0] < 0.5, -1.0, 1.0) * uniform(u13[1], CN13_SHIFT_RANGE)
    first_cn = n_so_far()
    cn_partner = np.full(n_cn, -1)
    cn_partner[strongest] = first_cn + n_cn + np.arange(n_cn13)
    add(cn_wl, "CN", cn_chi, cn_x, cn_partner)
    add(np.clip(cn_wl[strongest] + shift, lo_wl, hi_wl), "13CN", cn_chi[strongest],
        cn_x[strongest] - log_ratio_ref, first_cn + strongest)
    # OH
    u = rng.random((3, n_oh))
    add(positions(u[0]), "OH", uniform(u[1] ** 1.5, OH_LINES[0]), _strength_draw(u[2], OH_LINES[1]))
    # CO bands: the n_co strongest 12CO and 13CO transitions in range (reference giant), paired by transition
    w12, c12, g12 = _co_band_lines(1.0)
    w13, c13, g13 = _co_band_lines(CO13_RHO)
    rank12 = np.where((w12 > lo_wl) & (w12 < hi_wl), g12 - theta_ref * c12, -np.inf)
    rank13 = np.where((w13 > lo_wl) & (w13 < hi_wl), g13 - theta_ref * c13, -np.inf)
    pick12 = np.argsort(-rank12, kind="stable")[:n_co]
    pick13 = np.argsort(-rank13, kind="stable")[:n_co]
    if not (np.all(np.isfinite(rank12[pick12])) and np.all(np.isfinite(rank13[pick13]))):
        raise InputError(f"n_lines={n_lines} asks for {n_co} lines of each CO isotopologue, more than the "
                         "band lines in the wavelength range")
    offset = CO_MAX_LOG_STRENGTH - rank12[pick12].max()
    first_co = n_so_far()
    where12 = np.full(w12.size, -1)
    where12[pick12] = first_co + np.arange(n_co)
    where13 = np.full(w13.size, -1)
    where13[pick13] = first_co + n_co + np.arange(n_co)
    add(w12[pick12], "CO", c12[pick12], rank12[pick12] + offset, where13[pick12])
    add(w13[pick13], "13CO", c13[pick13], rank13[pick13] + offset - log_ratio_ref, where12[pick13])
    # hydrogen (calibrated on the hot reference dwarf)
    wh, ch, gh = _brackett_lines()
    keep = (wh > lo_wl) & (wh < hi_wl)
    add(wh[keep], "H I", ch[keep], gh[keep] - gh[0] + BRACKETT11_LOG_STRENGTH)

    wave = np.round(np.concatenate(wl), 3)
    species = np.concatenate(sp)
    excitation = np.round(np.concatenate(chi), 3)
    x_ref = np.round(np.concatenate(xs), 3)
    partner = np.concatenate(part)
    psi_ref = species_terms(_labels_from_dict(REFERENCE_LABELS))[0]
    psi_hot = species_terms(_labels_from_dict(HOT_REFERENCE_LABELS))[0]
    theta_hot = 5040.0 / (LAYER_T_FRACTION * HOT_REFERENCE_LABELS["teff"])
    hot = species == SPECIES_INDEX["H I"]
    loggf = np.where(hot, x_ref - psi_hot[species] + theta_hot * excitation,
                     x_ref - psi_ref[species] + theta_ref * excitation)

    out = np.empty(wave.size, dtype=LINE_LIST_DTYPE)
    out["wavelength"] = wave
    out["species"] = np.array([s.name for s in SPECIES])[species]
    out["excitation"] = excitation
    out["loggf"] = np.round(loggf, 3)
    out["log_strength_ref"] = x_ref
    out["group"] = np.array([s.group for s in SPECIES])[species]
    order = np.argsort(wave, kind="stable")  # sort by wavelength and remap the partner indices
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    out = out[order]
    p = partner[order]
    out["partner"] = np.where(p >= 0, inverse[np.maximum(p, 0)], -1)
    return out


def _check_line_list(line_list, log_range) -> np.ndarray:
    names = getattr(getattr(line_list, "dtype", None), "names", None) or ()
    missing = [f for f in ("wavelength", "species", "excitation", "loggf") if f not in names]
    if missing:
        raise InputError(f"line_list must be a structured array with fields wavelength, species, excitation, "
                         f"loggf; missing {missing}")
    unknown = sorted({str(s) for s in line_list["species"]} - set(SPECIES_INDEX))
    if unknown:
        raise InputError(f"line_list has unknown species {unknown}; known: {list(SPECIES_INDEX)}")
    wl = np.asarray(line_list["wavelength"], dtype=float)
    lo, hi = 10.0 ** np.array(log_range)
    if wl.size == 0 or not np.all(np.isfinite(wl)) or wl.min() < lo or wl.max() > hi:
        raise InputError(f"line_list wavelengths must be finite and within {lo:.2f}-{hi:.2f} A (and not empty)")
    out = np.zeros(wl.size, dtype=LINE_LIST_DTYPE)
    for f in ("wavelength", "species", "excitation", "loggf"):
        out[f] = line_list[f]
    out["log_strength_ref"] = line_list["log_strength_ref"] if "log_strength_ref" in names else np.nan
    out["group"] = [SPECIES[SPECIES_INDEX[str(s)]].group for s in out["species"]]
    out["partner"] = line_list["partner"] if "partner" in names else -1
    return out


# ================================================================================================
# The synthesizer
# ================================================================================================
class DemoSynthesizer:
    """Demo spectral synthesizer for the 25 APOGEE labels (not an atmosphere code; see the module doc).

    Parameters
    ----------
    seed : int
        Seed of the line list (drawn once, deterministic).
    n_lines : int
        Total number of lines (atoms, CN, 13CN, OH, 12CO, 13CO and the Brackett series), >= 300.
    resolution : float
        Instrumental resolving power R (Gaussian LSF of FWHM c / R).
    wavelength : array or None
        Default output grid (vacuum Angstrom); None gives the 8575-pixel apStar grid. It must lie in
        :attr:`wavelength_range`.
    workers : int or None
        Threads for scipy.fft (None: scipy's default, one).
    chunk_size : int
        Stars synthesized together (memory ~ 2.3 MB per star).
    line_list : structured array, optional
        Use these lines instead of drawing them (fields ``wavelength``, ``species`` (a name in
        :data:`SPECIES`), ``excitation``, ``loggf``; ``seed`` and ``n_lines`` are then ignored).
        Useful to study one species or to test the radiative part against a direct calculation.
    """

    def __init__(self, seed: int = DEFAULT_SEED, n_lines: int = DEFAULT_N_LINES,
                 resolution: float = DEFAULT_RESOLUTION, wavelength=None, *, workers: int | None = None,
                 chunk_size: int = DEFAULT_CHUNK, line_list=None):
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise InputError(f"seed must be an integer, got {seed!r}")
        if not isinstance(n_lines, (int, np.integer)) or n_lines < MIN_N_LINES:
            raise InputError(f"n_lines must be an integer >= {MIN_N_LINES}, got {n_lines!r}")
        if not np.isfinite(resolution) or resolution <= 0:
            raise InputError(f"resolution must be a positive number, got {resolution!r}")
        if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.seed = int(seed)
        self.n_lines = int(n_lines)
        self.resolution = float(resolution)
        self.workers = workers
        self.chunk_size = int(chunk_size)
        self.label_space: LabelSpace = apogee_label_space()

        # fine grid: uniform in log10(lambda), OVERSAMPLE points per apStar pixel, aligned with it
        self._step = APSTAR_LOG10_STEP / OVERSAMPLE
        self._log0 = APSTAR_LOG10_START - MARGIN_PIXELS * APSTAR_LOG10_STEP
        self._n_fine = OVERSAMPLE * (APSTAR_N_PIXELS - 1 + 2 * MARGIN_PIXELS) + 1
        self._dv = C_KMS * np.log(10.0) * self._step  # km/s per fine point
        n = 4 * scipy.fft.next_fast_len(-(-self._n_fine // 4), real=True)  # a multiple of 4
        self._n_fft = n
        self._freq = np.arange(n // 2 + 1) / (n * self._dv)  # cycles per km/s
        self._guard = int(np.ceil(GUARD_KMS / self._dv))

        log_hi = self._log0 + (self._n_fine - 1) * self._step
        line_range = (self._log0 + 2 * self._step, log_hi - 2 * self._step)
        if line_list is None:
            lines = build_line_list(self.seed, self.n_lines, line_range)
        else:
            lines = _check_line_list(line_list, line_range)
            self.n_lines = lines.size
        lines.flags.writeable = False
        self.line_list = lines
        self._species_idx = np.array([SPECIES_INDEX[s] for s in lines["species"]])
        x = (np.log10(lines["wavelength"]) - self._log0) / self._step  # fine positions
        self._line_pos = x
        self._groups = []
        for g in range(len(GROUPS)):
            sel = np.flatnonzero(lines["group"] == g)
            j = np.floor(x[sel]).astype(np.int64)
            t = x[sel] - j  # cubic B-spline weights of fine points j-1 .. j+2
            w = np.stack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], axis=1)
            self._groups.append((sel, j, w / 6.0))
        sel_h = self._groups[GROUP_HYDROGEN][0]
        k = np.arange(n // 2 + 1)
        self._hydrogen_phase = np.exp(-2j * np.pi * np.outer(x[sel_h], k) / n) / self._dv
        sun = layer_state(_labels_from_dict(dict(SOLAR_LABELS)))
        self._sun_log_pg = float(sun["log_pg"][0])
        self._sun_log_pe = float(sun["log_pe"][0])
        self._sun_t = float(sun["T"][0])
        if wavelength is None:
            wl = apstar_wavelength()
        else:
            wl = as_float_array(wavelength, "wavelength", ndim=1)
            check_increasing(wl, "wavelength")
        self._plan_default = self._plan(wl, "wavelength")
        wl.flags.writeable = False
        self.wavelength = wl
        logger.debug("DemoSynthesizer: %d lines, fine grid %d points (FFT %d), %.4f km/s per point",
                     lines.size, self._n_fine, n, self._dv)

    # -- public ------------------------------------------------------------------------------------
    @property
    def label_names(self) -> tuple[str, ...]:
        return self.label_space.names

    @property
    def n_labels(self) -> int:
        return len(self.label_space)

    @property
    def n_pixels(self) -> int:
        return self.wavelength.size

    @property
    def wavelength_range(self) -> tuple[float, float]:
        """Vacuum wavelengths (A) between which :meth:`spectra` can evaluate."""
        return (10.0 ** (self._log0 + self._guard * self._step),
                10.0 ** (self._log0 + (self._n_fine - 1 - self._guard) * self._step))

    def __repr__(self) -> str:
        return (f"DemoSynthesizer(seed={self.seed}, {self.line_list.size} lines, R={self.resolution:g}, "
                f"{self.n_pixels} pixels)")

    def spectra(self, labels, wavelength=None) -> np.ndarray:
        """Normalised flux (N, P) for labels (N, 25); a single (25,) vector gives (P,).

        ``wavelength`` (vacuum A) overrides the default output grid; to synthesize a star moving at
        radial velocity v on an observed grid, pass ``wavelength_observed / (1 + v / c)``.
        """
        x, single = as_label_matrix(labels, self.n_labels)
        self._check_physical(x)
        if wavelength is None:
            plan = self._plan_default
        else:
            wl = as_float_array(wavelength, "wavelength", ndim=1)
            check_increasing(wl, "wavelength")
            plan = self._plan(wl, "wavelength")
        flux = np.empty((x.shape[0], plan["n_out"]))
        # stars with similar Doppler widths go into one chunk: the kernel then needs fewer aliases
        order = np.argsort(LAYER_T_FRACTION * x[:, 0] / GROUPS[1][1] * 2e-6 * K_BOLTZMANN / AMU
                           + x[:, self.label_space.index("v_turb")] ** 2, kind="stable")
        for start in range(0, x.shape[0], self.chunk_size):
            rows = order[start:start + self.chunk_size]
            flux[rows] = self._synthesize(x[rows], plan)
        return flux[0] if single else flux

    def log_line_strengths(self, labels) -> np.ndarray:
        """log10 of each line's integrated optical depth S (km/s), (N, n_lines) or (n_lines,)."""
        x, single = as_label_matrix(labels, self.n_labels)
        self._check_physical(x)
        out = self._log_strengths(x, species_terms(x), 5040.0 / (LAYER_T_FRACTION * x[:, 0]))
        return out[0] if single else out

    # -- internals ---------------------------------------------------------------------------------
    def _check_physical(self, x):
        for name, low, strict in (("teff", 0.0, True), ("v_turb", 0.0, False), ("v_macro", 0.0, False),
                                  ("c12_c13", 0.0, True)):
            col = x[:, self.label_space.index(name)]
            bad = (col <= low) if strict else (col < low)
            if np.any(bad):
                raise InputError(f"labels: {name} must be {'>' if strict else '>='} {low} "
                                 f"(star {int(np.flatnonzero(bad)[0])} has {col[bad][0]})")

    def _log_strengths(self, x, psi, theta):
        ll = self.line_list
        return ll["loggf"][None, :] + psi[:, self._species_idx] - theta[:, None] * ll["excitation"][None, :]

    def _plan(self, wl: np.ndarray, name: str) -> dict:
        """How to sample the fine grid at wavelengths wl: exactly (phase shift + stride) or by spline."""
        pos = (np.log10(wl) - self._log0) / self._step
        lo, hi = self.wavelength_range
        if pos[0] < self._guard - 1e-6 or pos[-1] > self._n_fine - 1 - self._guard + 1e-6:
            raise InputError(f"{name} spans {wl[0]:.2f}-{wl[-1]:.2f} A but the demo synthesizer covers "
                             f"{lo:.2f}-{hi:.2f} A (vacuum)")
        half = pos / 2.0  # the broadened spectrum is computed at every second fine point
        base = np.floor(half[0])
        shift_half = half[0] - base
        idx = half - shift_half
        ridx = np.round(idx)
        if np.all(np.abs(idx - ridx) < 1e-6):
            return {"mode": "exact", "n_out": wl.size, "index": ridx.astype(np.int64), "shift": 2.0 * shift_half}
        return {"mode": "spline", "n_out": wl.size, "pos": pos}

    def _voigt_ft(self, b, gamma, f, wing_cutoff=None):
        """DFT of the sampled, area-normalised Voigt kernel, shape (n, nf).

        b (Gaussian 1/e half width) and gamma (Lorentz HWHM): (n, 1) km/s; f: (nf,) cycles per km/s.
        The continuous transform is exp(-pi^2 b^2 f^2 - 2 pi gamma |f|); summing its aliases f + m/dv
        makes this the exact DFT of the profile sampled on the fine grid, which is positive everywhere
        (no truncation ringing). Aliases are evaluated only where they exceed ~1e-16. With
        ``wing_cutoff`` (km/s) the Lorentzian is tempered, exp(gamma (a - sqrt(a^2 + (2 pi f)^2))) with
        a = 1 / wing_cutoff (a normal-inverse-Gaussian profile): Lorentzian core, wings falling
        exponentially beyond ~wing_cutoff.
        """
        pi2 = np.pi**2
        fs = 1.0 / self._dv
        reach = np.sqrt(37.0) / (np.pi * float(np.min(b)))  # beyond this |f| the Gaussian is < 1e-16
        f_max = f[-1]

        def term(fa):
            g = -pi2 * b**2 * fa**2
            if wing_cutoff is None:
                return np.exp(g - 2.0 * np.pi * gamma * fa)
            a = 1.0 / wing_cutoff
            return np.exp(g + gamma * (a - np.sqrt(a * a + (2.0 * np.pi * fa) ** 2)))

        out = term(f)
        m_max = int(np.ceil((reach + f_max) / fs))
        for m in range(1, m_max + 1):
            # alias -m: |f - m fs| = m fs - f < reach  <=>  f > m fs - reach
            k0 = np.searchsorted(f, m * fs - reach)
            if k0 < f.size:
                out[:, k0:] += term(m * fs - f[k0:])
            # alias +m: f + m fs < reach
            k1 = np.searchsorted(f, reach - m * fs)
            if k1 > 0:
                out[:, :k1] += term(f[:k1] + m * fs)
        return out

    def _synthesize(self, x: np.ndarray, plan: dict) -> np.ndarray:
        n = x.shape[0]
        nfft = self._n_fft
        st = layer_state(x)
        psi = species_terms(x, st)
        strength = 10.0 ** self._log_strengths(x, psi, st["theta"])  # (n, n_lines), km/s
        v_turb = x[:, self.label_space.index("v_turb")]
        v_macro = x[:, self.label_space.index("v_macro")]
        thermal = 2.0 * K_BOLTZMANN * st["T"] / AMU * 1e-6  # (km/s)^2 per 1/amu
        p_scale = 10.0 ** (st["log_pg"] - self._sun_log_pg) * (st["T"] / self._sun_t) ** 0.3
        gammas = {"vdw": GAMMA_VDW_SUN * p_scale, "molecule": GAMMA_MOLECULE_SUN * p_scale,
                  "stark": GAMMA_STARK_SUN * 10.0 ** ((2.0 / 3.0) * (st["log_pe"] - self._sun_log_pe))}
        f = self._freq
        tau_hat = np.zeros((n, f.size), dtype=np.complex128)
        rows = np.arange(n)[:, None] * nfft
        for g, (_, mass, damping) in enumerate(GROUPS):
            sel, j, weights = self._groups[g]
            if sel.size == 0:
                continue
            b2 = thermal / mass + v_turb**2
            if g == GROUP_HYDROGEN:  # few lines: exact sub-pixel positions by a direct DFT
                kernel = self._voigt_ft(np.sqrt(b2)[:, None], gammas[damping][:, None], f, STARK_WING_CUTOFF)
                tau_hat += (strength[:, sel] @ self._hydrogen_phase) * kernel
                continue
            # lines are spread on the fine grid with cubic B-spline weights, which preserve area and
            # centroid and add a variance of exactly dv^2/3 whatever the sub-pixel phase: it is taken
            # out of the Gaussian width here (b^2 = 2 sigma^2)
            b_eff = np.sqrt(np.maximum(b2 - SPREAD_B2 * self._dv**2, (MIN_B_EFF * self._dv) ** 2))
            kernel = self._voigt_ft(b_eff[:, None], gammas[damping][:, None], f)
            s = strength[:, sel] / self._dv
            idx = (rows[:, :, None] + j[None, :, None] + np.arange(-1, 3)[None, None, :]).ravel()
            w = (s[:, :, None] * weights[None, :, :]).ravel()
            sticks = np.bincount(idx, weights=w, minlength=n * nfft).reshape(n, nfft)
            tau_hat += scipy.fft.rfft(sticks, axis=1, workers=self.workers) * kernel
        tau = scipy.fft.irfft(tau_hat, nfft, axis=1, workers=self.workers)
        depth = -MAX_LINE_DEPTH * np.expm1(-tau)
        sigma2 = (C_KMS / (self.resolution * FWHM_PER_SIGMA)) ** 2 + 0.5 * v_macro**2
        if plan["mode"] == "exact":
            m = nfft // 4 + 1
            d_hat = scipy.fft.rfft(depth, axis=1, workers=self.workers)[:, :m]
            d_hat *= np.exp(-2.0 * np.pi**2 * sigma2[:, None] * f[None, :m] ** 2)
            if plan["shift"] != 0.0:
                d_hat *= np.exp(2j * np.pi * np.arange(m) * plan["shift"] / nfft)[None, :]
            half = 0.5 * scipy.fft.irfft(d_hat, nfft // 2, axis=1, workers=self.workers)
            out = half[:, plan["index"]]
        else:
            d_hat = scipy.fft.rfft(depth, axis=1, workers=self.workers)
            d_hat *= np.exp(-2.0 * np.pi**2 * sigma2[:, None] * f[None, :] ** 2)
            full = scipy.fft.irfft(d_hat, nfft, axis=1, workers=self.workers)
            pos = plan["pos"]
            lo = max(int(np.floor(pos[0])) - 8, 0)
            hi = min(int(np.ceil(pos[-1])) + 9, nfft)
            out = CubicSpline(np.arange(lo, hi, dtype=float), full[:, lo:hi], axis=1)(pos)
        return np.minimum(1.0 - out, 1.0)


# ================================================================================================
# Labels, grids and mock observations
# ================================================================================================
LABEL_KINDS = ("mixed", "giants", "dwarfs", "uniform")
#: Fraction of giants in kind="mixed" (APOGEE is giant-dominated).
GIANT_FRACTION = 0.6
#: [alpha/Fe] weight per alpha element, and other [X/Fe] trends with [Fe/H] (slope) and scatter.
ALPHA_WEIGHTS = {"o_h": 1.0, "mg_h": 1.0, "si_h": 0.8, "s_h": 0.8, "ca_h": 0.7, "ti_h": 0.6, "al_h": 0.4}
XFE_SLOPE = {"mn_h": 0.2, "cu_h": 0.2, "na_h": 0.05}
XFE_SCATTER = {"c_h": 0.08, "n_h": 0.1, "p_h": 0.12, "k_h": 0.1, "v_h": 0.08, "cu_h": 0.08, "ge_h": 0.1}
DEFAULT_XFE_SCATTER = 0.05


def _truncated_normal(u, mean, sd, lo, hi):
    a, b = ndtr((lo - mean) / sd), ndtr((hi - mean) / sd)
    return mean + sd * ndtri(a + (b - a) * u)


def sample_labels(n: int, seed: int, kind: str = "mixed", label_space: LabelSpace | None = None) -> np.ndarray:
    """(n, 25) realistic label vectors in The Payne's APOGEE order, all inside the label box.

    kind: "mixed" (60 % giants: RGB and red clump along a rough isochrone, logg 0.3-3.6, hotter at low
    metallicity; 40 % dwarfs: main sequence 3600-6900 K with some subgiants), "giants", "dwarfs",
    or "uniform" (uniform in the box). [Fe/H] ~ N(-0.15, 0.3) truncated to the box; alpha elements
    follow [alpha/Fe] rising to ~0.3 at low [Fe/H]; giants have [C/Fe] ~ -0.2, [N/Fe] ~ +0.3 and
    c12_c13 ~ 6 + 6 logg (+-0.12 dex), dwarfs solar-scaled C and N and c12_c13 40-60; every [X/H] has
    a small scatter; v_turb = 2.48 - 0.325 logg (Holtzman et al. 2015) and v_macro rises towards low
    logg and high teff, each with scatter. ``label_space`` defaults to ``apogee_label_space()``.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"n must be a non-negative integer, got {n!r}")
    if kind not in LABEL_KINDS:
        raise InputError(f"kind must be one of {LABEL_KINDS}, got {kind!r}")
    ls = apogee_label_space() if label_space is None else label_space
    if tuple(ls.names) != APOGEE_LABEL_NAMES:
        raise InputError(f"label_space must have the 25 APOGEE labels in order {APOGEE_LABEL_NAMES}")
    rng = np.random.default_rng(seed)
    u = rng.random((n, 40))  # fixed number of uniforms per star: the draw for star i does not depend on n
    col = {name: i for i, name in enumerate(APOGEE_LABEL_NAMES)}
    out = np.empty((n, len(APOGEE_LABEL_NAMES)))
    if kind == "uniform":
        return ls.x_min + u[:, : len(APOGEE_LABEL_NAMES)] * ls.span
    if kind == "mixed":
        giant = u[:, 0] < GIANT_FRACTION
    else:
        giant = np.full(n, kind == "giants")
    fe = _truncated_normal(u[:, 1], -0.15, 0.3, ls.x_min[col["fe_h"]] + 0.05, ls.x_max[col["fe_h"]] - 0.05)
    # giants: RGB (75 %) along logg 0.3-3.6, or red clump (25 %)
    clump = u[:, 2] < 0.25
    logg_g = np.where(clump, 2.45 + 0.25 * (u[:, 3] - 0.5), 0.3 + 3.3 * u[:, 3])
    teff_g = np.where(clump, 4700.0, 4600.0 + 450.0 * (logg_g - 2.5)) - 300.0 * fe + 160.0 * (u[:, 4] - 0.5)
    # dwarfs: main sequence with a few subgiants
    teff_d = 3600.0 + 3300.0 * u[:, 3]
    logg_d = 4.75 - 0.55 * ((teff_d - 3600.0) / 3300.0) ** 1.5 - 0.5 * u[:, 2] ** 3 * (teff_d > 5000)
    logg_d = logg_d + 0.16 * (u[:, 4] - 0.5)
    teff = np.where(giant, teff_g, teff_d)
    logg = np.where(giant, logg_g, logg_d)
    out[:, col["teff"]] = teff
    out[:, col["logg"]] = logg
    out[:, col["v_turb"]] = 2.478 - 0.325 * logg + 0.3 * (u[:, 5] - 0.5)
    out[:, col["v_macro"]] = np.maximum(6.0 - 0.7 * logg + 0.0012 * (teff - 5000.0), 0.5) * (0.7 + 0.6 * u[:, 6])
    alpha = np.clip(0.05 - 0.25 * fe, 0.0, 0.35) + 0.08 * (u[:, 7] - 0.5)
    names = [nm for nm in APOGEE_LABEL_NAMES if nm.endswith("_h")]
    z = ndtri(np.clip(u[:, 8:8 + len(names)], 1e-12, 1 - 1e-12))  # one standard normal per element
    for k, nm in enumerate(names):
        x = fe + ALPHA_WEIGHTS.get(nm, 0.0) * alpha + XFE_SLOPE.get(nm, 0.0) * fe
        x = x + XFE_SCATTER.get(nm, DEFAULT_XFE_SCATTER) * z[:, k] if nm != "fe_h" else x
        if nm == "c_h":
            x = x - 0.2 * giant
        elif nm == "n_h":
            x = x + 0.3 * giant
        out[:, col[nm]] = x
    ratio_g = (6.0 + 6.0 * logg) * 10.0 ** (0.12 * ndtri(np.clip(u[:, 30], 1e-12, 1 - 1e-12)))
    out[:, col["c12_c13"]] = np.where(giant, np.clip(ratio_g, 5.0, 60.0), 40.0 + 20.0 * u[:, 39])
    margin = 1e-6 * ls.span
    return np.clip(out, ls.x_min + margin, ls.x_max - margin)


def make_grid(n: int, seed: int, synthesizer: DemoSynthesizer | None = None, kind: str = "mixed"):
    """Labels (n, 25) from :func:`sample_labels` and their demo spectra (n, P)."""
    synth = DemoSynthesizer() if synthesizer is None else synthesizer
    labels = sample_labels(n, seed, kind, synth.label_space)
    if n == 0:
        return labels, np.empty((0, synth.n_pixels))
    return labels, synth.spectra(labels)


#: Half range of the uniform draws of the continuum Legendre coefficients (order k gets /k) and of the
#: log10 of the per-chip level.
CONTINUUM_COEFF_RANGE = 0.15
CONTINUUM_LEVEL_RANGE = 0.15


def _per_star(value, name: str, n: int, p: int, allow_pixels: bool) -> np.ndarray:
    arr = as_float_array(value, name)
    if arr.ndim == 0:
        return np.full((n, 1), float(arr))
    if arr.shape == (n,):
        return arr[:, None]
    if allow_pixels and arr.shape == (n, p):
        return arr
    allowed = "a scalar, (N,)" + (" or (N, P)" if allow_pixels else "")
    raise InputError(f"{name} must be {allowed} with N={n}, P={p}; got shape {arr.shape}")


def _chip_segments(wl: np.ndarray) -> np.ndarray:
    """Segment index per pixel for the continuum: nearest APOGEE chip, or one segment if none overlaps."""
    chips = np.array(APOGEE_CHIPS)
    overlaps = (wl[-1] >= chips[:, 0]) & (wl[0] <= chips[:, 1])
    if not np.any(overlaps):
        return np.zeros(wl.size, dtype=int)
    dist = np.maximum(chips[None, :, 0] - wl[:, None], 0.0) + np.maximum(wl[:, None] - chips[None, :, 1], 0.0)
    dist[:, ~overlaps] = np.inf
    return np.argmin(dist, axis=1)


def mock_observations(wavelength, flux, *, snr, rv=0.0, continuum=True, chip_gaps=True,
                      bad_pixel_fraction=0.0, seed, continuum_order=2, nan_fraction=0.5, ids=None):
    """Turn clean normalised spectra into mock observations.

    Parameters
    ----------
    wavelength : (P,) vacuum A, the grid of ``flux`` and of the observations.
    flux : (N, P) or (P,) clean normalised spectra in the rest frame (finite).
    snr : scalar, (N,) or (N, P)
        Signal-to-noise at the continuum: sigma = continuum level / snr.
    rv : scalar or (N,), km/s
        Radial velocity; the classical Doppler formula lambda_obs = lambda_rest (1 + v / c) is used
        (at APOGEE velocities the relativistic correction, ~v^2/2c^2 < 1e-6, is far below a pixel).
        The shifted spectrum is a not-a-knot cubic spline of the clean one in log lambda; pixels that
        would need flux from outside ``wavelength`` get ivar = 0, mask = True.
    continuum : bool
        Multiply by a smooth continuum: per APOGEE chip a level 10^U(-0.15, 0.15) times
        1 + sum_k a_k P_k(x) (Legendre, k <= continuum_order, a_k ~ U(-0.15/k, 0.15/k)), seeded.
    chip_gaps : bool
        Pixels outside the chips of :data:`paynekit.wavelength.APOGEE_CHIPS` get flux 0, ivar 0 and
        mask True (as in apStar files).
    bad_pixel_fraction : float in [0, 1)
        Each pixel is bad with this probability: mask True, ivar 0, and flux NaN for a fraction
        ``nan_fraction`` of them, a positive spike (cosmic-ray-like) for the others.
    seed : int
        Seed of every random draw (continuum, noise, bad pixels).
    ids : list of N names, optional.

    Returns
    -------
    (SpectrumBatch, truth) where truth has ``rv`` (N,), ``snr`` (N,) or (N, P), ``continuum`` (N, P),
    ``flux`` (N, P) noise-free shifted normalised flux, ``sigma`` (N, P), ``bad_pixel`` (N, P),
    ``out_of_range`` (N, P) and ``chip_gap`` (P,).
    """
    wl = as_float_array(wavelength, "wavelength", ndim=1)
    check_increasing(wl, "wavelength")
    clean = np.atleast_2d(as_float_array(flux, "flux", ndim=(1, 2)))
    n, p = clean.shape
    if p != wl.size:
        raise InputError(f"flux has {p} pixels per spectrum (shape {clean.shape}) but wavelength has {wl.size}")
    if not np.all(np.isfinite(clean)):
        raise InputError("flux must be finite (clean model spectra)")
    snr_arr = _per_star(snr, "snr", n, p, allow_pixels=True)
    if not np.all(np.isfinite(snr_arr)) or np.any(snr_arr <= 0):
        raise InputError("snr must be finite and > 0")
    rv_arr = _per_star(rv, "rv", n, p, allow_pixels=False)[:, 0]
    if not np.all(np.isfinite(rv_arr)) or np.any(np.abs(rv_arr) >= C_KMS):
        raise InputError("rv must be finite and |rv| < c (km/s)")
    if not 0.0 <= float(bad_pixel_fraction) < 1.0:
        raise InputError(f"bad_pixel_fraction must be in [0, 1), got {bad_pixel_fraction!r}")
    if not 0.0 <= float(nan_fraction) <= 1.0:
        raise InputError(f"nan_fraction must be in [0, 1], got {nan_fraction!r}")
    if not isinstance(continuum_order, (int, np.integer)) or continuum_order < 0:
        raise InputError(f"continuum_order must be a non-negative integer, got {continuum_order!r}")
    rng = np.random.default_rng(seed)

    # Doppler shift: flux_obs(lambda) = flux_rest(lambda / (1 + v/c)), cubic spline in log lambda
    x = np.log(wl)
    x_rest = x[None, :] - np.log1p(rv_arr / C_KMS)[:, None]
    spline = CubicSpline(x, clean, axis=1)  # coefficients (4, P-1, N)
    k = np.clip(np.searchsorted(x, x_rest, side="right") - 1, 0, p - 2)
    dx = x_rest - x[k]
    c = spline.c[:, k, np.arange(n)[:, None]]
    shifted = ((c[0] * dx + c[1]) * dx + c[2]) * dx + c[3]
    out_of_range = (x_rest < x[0] - 1e-12) | (x_rest > x[-1] + 1e-12)
    shifted = np.where(out_of_range, 1.0, shifted)

    # continuum
    seg = _chip_segments(wl)
    n_seg = int(seg.max()) + 1
    cont = np.ones((n, p))
    if continuum:
        level = 10.0 ** (CONTINUUM_LEVEL_RANGE * (2.0 * rng.random((n, n_seg)) - 1.0))
        coef = (2.0 * rng.random((n, n_seg, continuum_order)) - 1.0) * CONTINUUM_COEFF_RANGE
        coef /= np.arange(1, continuum_order + 1)
        for s in range(n_seg):
            px = seg == s
            lo, hi = wl[px][0], wl[px][-1]
            t = (2.0 * wl[px] - lo - hi) / max(hi - lo, 1e-12)
            legendre = np.polynomial.legendre.legvander(t, continuum_order)[:, 1:]  # (p_s, order)
            cont[:, px] = level[:, s:s + 1] * (1.0 + coef[:, s, :] @ legendre.T)
    sigma = cont / snr_arr
    noisy = cont * shifted + sigma * rng.standard_normal((n, p))
    ivar = 1.0 / sigma**2
    mask = out_of_range.copy()

    gap = np.zeros(p, dtype=bool)
    if chip_gaps:
        chips = np.array(APOGEE_CHIPS)
        gap = ~np.any((wl[:, None] >= chips[None, :, 0]) & (wl[:, None] <= chips[None, :, 1]), axis=1)
        noisy[:, gap] = 0.0
        mask[:, gap] = True
    bad = np.zeros((n, p), dtype=bool)
    if bad_pixel_fraction > 0:
        u = rng.random((3, n, p))
        bad = (u[0] < bad_pixel_fraction) & ~gap[None, :]
        is_nan = bad & (u[1] < nan_fraction)
        spike = bad & ~is_nan
        noisy = np.where(spike, noisy + cont * (0.5 + 4.5 * u[2]), noisy)
        noisy[is_nan] = np.nan
        mask |= bad
    ivar = np.where(mask, 0.0, ivar)

    truth = {"rv": rv_arr, "snr": snr_arr[:, 0].copy() if snr_arr.shape[1] == 1 else snr_arr,
             "continuum": cont, "flux": shifted, "sigma": sigma, "bad_pixel": bad,
             "out_of_range": out_of_range, "chip_gap": gap}
    ids = [f"mock-{i:05d}" for i in range(n)] if ids is None else ids
    meta = [{"mock": True, "rv_true": float(rv_arr[i])} for i in range(n)]
    return SpectrumBatch(wl, noisy, ivar, mask, ids, meta), truth
