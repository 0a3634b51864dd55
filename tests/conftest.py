"""Shared fixtures: a seed, the ../shared data folder (tests skip cleanly without it), small emulators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(relative: str) -> Path:
    """Path of a file under ../shared/data, skipping the test when it is absent."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(20251122)


@pytest.fixture(scope="session")
def small_mlp():
    """A small 4-label PayneMLP with smooth random weights on a short log-uniform grid (float64)."""
    from paynekit.emulators import PayneMLP
    from paynekit.labels import LabelSpace

    g = np.random.default_rng(7)
    wl = 10 ** (4.18 + 6e-6 * np.arange(400))
    ls = LabelSpace(("teff", "logg", "fe_h", "mg_h"), np.array([4000.0, 1.0, -1.0, -1.0]),
                    np.array([6000.0, 5.0, 0.5, 0.5]))
    w = [g.normal(0, 1.0, (30, 4)), g.normal(0, 0.3, (30, 30)), g.normal(0, 0.02, (400, 30))]
    b = [g.normal(0, 0.3, 30), g.normal(0, 0.3, 30), 1 - np.abs(g.normal(0, 0.05, 400))]
    return PayneMLP(w, b, ls, wl)
