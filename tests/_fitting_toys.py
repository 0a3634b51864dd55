"""Small, fast emulators for the fitting tests (not collected by pytest).

:class:`LineToy` is a PayneMLP (labels -> 12 -> 24 sigmoid units -> pixels) whose last layer is a set of
Gaussian absorption lines, each line's depth scaled by one second-layer unit. Because the lines are
analytic, :meth:`LineToy.observe` computes the *exact* spectrum at any wavelength and radial velocity,
without the interpolation the fitter uses, so recovery tests are not an inverse crime.
"""

from __future__ import annotations

import numpy as np

from paynekit.emulators import PayneMLP
from paynekit.instrument import SPEED_OF_LIGHT_KMS
from paynekit.labels import LabelSpace

TOY_NAMES = ("teff", "logg", "fe_h", "alpha_fe")
TOY_MIN = np.array([4000.0, 1.0, -1.0, -0.2])
TOY_MAX = np.array([6000.0, 5.0, 0.5, 0.5])


class LineToy:
    def __init__(
        self,
        n_pixels=800,
        n_labels=4,
        seed=1,
        wl0=15200.0,
        dlog=1.5e-5,
        x_min=None,
        x_max=None,
        dead_label=None,
        n_lines_per_unit=8,
    ):
        rng = np.random.default_rng(seed)
        self.wl0, self.dlog = wl0, dlog
        wl = wl0 * np.exp(dlog * np.arange(n_pixels))
        h1, h2 = 12, 24
        w0 = rng.normal(0, 1.5, (h1, n_labels))
        if dead_label is not None:  # a label with no effect on the spectrum
            w0[:, dead_label] = 0.0
        b0 = rng.normal(0, 0.3, h1)
        w1 = rng.normal(0, 2.0 / np.sqrt(h1), (h2, h1))
        b1 = rng.normal(0, 0.3, h2)
        self.lines = [
            (h, rng.uniform(5, n_pixels - 5), rng.uniform(1.0, 2.0), rng.uniform(0.05, 0.25))
            for h in range(h2)
            for _ in range(n_lines_per_unit)
        ]
        w2 = self._w2(np.arange(n_pixels, dtype=float), h2)
        lo = TOY_MIN[:n_labels] if x_min is None else np.asarray(x_min, float)
        hi = TOY_MAX[:n_labels] if x_max is None else np.asarray(x_max, float)
        ls = LabelSpace(TOY_NAMES[:n_labels], lo, hi)
        self.emu = PayneMLP([w0, w1, w2], [b0, b1, np.ones(n_pixels)], ls, wl, activation="sigmoid")

    def _w2(self, u, h2):
        w2 = np.zeros((u.size, h2))
        for h, c, s, d in self.lines:
            w2[:, h] -= d * np.exp(-0.5 * ((u - c) / s) ** 2)
        return w2

    def observe(self, labels, v, wavelength=None):
        """Exact flux on ``wavelength`` (default the emulator's) for labels (n, L) and velocities v (n,)."""
        e = self.emu
        wl = e.wavelength if wavelength is None else np.asarray(wavelength)
        xs = e.label_space.scale(np.atleast_2d(labels))
        a1 = 1 / (1 + np.exp(-(xs @ e.weights[0].T + e.biases[0])))
        a2 = 1 / (1 + np.exp(-(a1 @ e.weights[1].T + e.biases[1])))
        v = np.broadcast_to(np.asarray(v, dtype=float), (xs.shape[0],))
        out = np.empty((xs.shape[0], wl.size))
        for i in range(xs.shape[0]):
            u = np.log(wl / (1 + v[i] / SPEED_OF_LIGHT_KMS) / self.wl0) / self.dlog
            out[i] = 1.0 + self._w2(u, a2.shape[1]) @ a2[i]
        return out

    def draw_labels(self, n, rng, margin=0.4):
        """Labels drawn uniformly in the central part (|scaled| < margin) of the box."""
        return self.emu.label_space.unscale(rng.uniform(-margin, margin, (n, self.emu.n_labels)))


def noisy(flux, snr, rng):
    """Flux with Gaussian noise of sigma = 1/snr, and the matching ivar."""
    sigma = 1.0 / snr
    return flux + rng.normal(0, sigma, flux.shape), np.full(flux.shape, 1.0 / sigma**2)


def linear_mlp(n_pixels=300, seed=3):
    """A PayneMLP that is exactly linear in its labels (leaky ReLU units that are always active)."""
    rng = np.random.default_rng(seed)
    wl = 15200.0 * np.exp(1.5e-5 * np.arange(n_pixels))
    w0 = rng.normal(0, 1.0, (6, 3))
    b0 = np.full(6, 10.0)  # |w0 x| < 5 for x in [-0.5, 0.5]^3: always in the linear branch
    w1 = rng.normal(0, 0.3, (6, 6))
    b1 = np.full(6, 100.0)
    w2 = rng.normal(0, 0.01, (n_pixels, 6))
    b2 = 1.0 - np.abs(rng.normal(0, 0.02, n_pixels)) - w2 @ (w1 @ b0 + b1)
    ls = LabelSpace(("teff", "logg", "fe_h"), np.array([4000.0, 1.0, -1.0]), np.array([6000.0, 5.0, 0.5]))
    return PayneMLP([w0, w1, w2], [b0, b1, b2], ls, wl, activation="leaky_relu")
