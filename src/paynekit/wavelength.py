"""Standard wavelength grids and air/vacuum conversion.

All wavelengths in paynekit are in Angstrom. Survey grids here are in vacuum, as APOGEE and BOSS use.
"""

from __future__ import annotations

import numpy as np

#: The apStar grid: log10(lambda / A) = 4.179 + 6e-6 * i, i = 0 .. 8574 (vacuum).
APSTAR_LOG10_START = 4.179
APSTAR_LOG10_STEP = 6e-6
APSTAR_N_PIXELS = 8575

#: The 7214-pixel grid of The Payne and ASPCAP is the apStar grid without the chip gaps and edges:
#: apStar pixels [322, 3242), [3648, 6048), [6412, 8306) (checked against The Payne's own grid).
PAYNE_APOGEE_SLICES = ((322, 3242), (3648, 6048), (6412, 8306))

#: APOGEE's three detectors (blue, green, red) in vacuum Angstrom.
APOGEE_CHIPS = ((15100.0, 15793.0), (15880.0, 16417.0), (16499.0, 17000.0))


def apstar_wavelength() -> np.ndarray:
    """The 8575-pixel apStar wavelength grid (vacuum Angstrom)."""
    return 10.0 ** (APSTAR_LOG10_START + APSTAR_LOG10_STEP * np.arange(APSTAR_N_PIXELS))


def payne_apogee_pixels() -> np.ndarray:
    """Indices into the apStar grid of The Payne's 7214-pixel APOGEE grid."""
    return np.concatenate([np.arange(a, b) for a, b in PAYNE_APOGEE_SLICES])


def payne_apogee_wavelength() -> np.ndarray:
    """The 7214-pixel APOGEE wavelength grid of The Payne (vacuum Angstrom)."""
    return apstar_wavelength()[payne_apogee_pixels()]


def _refraction_index_minus_one(sigma2):
    # Ciddor (1996) / Morton (2000) standard air, as used by the IAU and SDSS; sigma in 1/micron
    return 8.34254e-5 + 2.406147e-2 / (130.0 - sigma2) + 1.5998e-4 / (38.9 - sigma2)


def vacuum_to_air(wavelength) -> np.ndarray:
    """Vacuum -> air wavelengths (Angstrom), Morton (2000)."""
    wl = np.asarray(wavelength, dtype=np.float64)
    sigma2 = (1e4 / wl) ** 2
    return wl / (1.0 + _refraction_index_minus_one(sigma2))


def air_to_vacuum(wavelength) -> np.ndarray:
    """Air -> vacuum wavelengths (Angstrom): inverts :func:`vacuum_to_air` to < 1e-8 A by iteration."""
    air = np.asarray(wavelength, dtype=np.float64)
    vac = air.copy()
    for _ in range(4):
        sigma2 = (1e4 / vac) ** 2
        vac = air * (1.0 + _refraction_index_minus_one(sigma2))
    return vac
