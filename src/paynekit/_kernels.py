"""Compiled inner loops (numba), used by the numpy paths when numba is importable.

Each kernel computes what the numpy code beside it computes, in the same order of floating-point
operations: the Doppler shift gives the same numbers bit for bit, the interpolation agrees to 1e-13
relative (it takes logarithms with the C library's log, numpy with its own). The numpy code stays as the
fallback and is tested against the kernels. numba is imported on first use, not when paynekit is imported, and
``PAYNEKIT_DISABLE_NUMBA=1`` turns the kernels off.

Why compiled: the Doppler shift interpolates (flux + every Jacobian column) of every star at every
optimiser step. In numpy each of its five taps is a multiply and an add over the whole (n, C, P) array,
ten passes through memory; the kernel makes one pass per star. On the 5-label APOGEE fit it was a third
of the fitting time. The kernels are serial on purpose: numba's threads and OpenBLAS's spin-waiting
threads slowed each other down 7x. The compiled code is cached on disk (numba ``cache=True``, in the
package's ``__pycache__``, or numba's user cache folder when that is read-only).
"""

from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)

_STATE: dict = {}


def numba_enabled() -> bool:
    """True when numba can be imported and ``PAYNEKIT_DISABLE_NUMBA`` is not set to a true value."""
    if os.environ.get("PAYNEKIT_DISABLE_NUMBA", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if "ok" not in _STATE:
        try:
            import numba  # noqa: F401

            _STATE["ok"] = True
        except ImportError:  # pragma: no cover - numba is a dependency; the fallback is for odd platforms
            log.info("numba is not importable; using the numpy paths")
            _STATE["ok"] = False
    return _STATE["ok"]


def doppler_rows(values, v, log_step, c_kms, starts, stops, out) -> None:
    """The Doppler shift of ``DopplerResampler._apply_fast`` for values (n, C, P) at velocities v (n,).

    On a log-uniform grid of step ``log_step`` a star at v moves by delta = -log1p(v / c) / log_step
    pixels: ``out[r, ch, i] = sum_k w_k(delta) * values[r, ch, clamp(i + s + k - 2)]`` with s = rint(delta)
    and Catmull-Rom weights, within each segment [starts[q], stops[q]) (taps beyond its edge read the
    edge). When ``out`` has C + 1 channels the last is d values[:, 0] / d v. values and out share one
    float dtype; the weights are computed in float64 and rounded to it, as numpy does.
    """
    from ._numba_kernels import doppler_rows as kernel

    kernel(values, v, log_step, c_kms, starts, stops, out)


def doppler_rows_transpose(values, v, log_step, c_kms, starts, stops) -> np.ndarray:
    """The adjoint (transpose) of :func:`doppler_rows` for one channel: for values (n, P) on the data grid,
    ``out[r] = S(v[r])^T values[r]`` on the model grid, so that ``sum(doppler(x) * y) == sum(x * out)``
    (the chain rule from data pixels back to model pixels). Compiled; needs numba."""
    from ._numba_kernels import doppler_rows_transpose as kernel

    vals = np.ascontiguousarray(values)
    out = np.empty_like(vals)
    kernel(vals, np.asarray(v, dtype=np.float64), log_step, c_kms, starts, stops, out)
    return out


def hidden_flip_updates(pt, b, rows, flips2, delta2, sv, flips1, delta1, r1, w0t, w1t) -> None:
    """Update in place, for stars ``rows`` whose hidden units changed side, ``b[i] = W0f^T D1 W1^T`` (nl, H2)
    and ``pt[i] = b[i] D2 sv`` (nl, H): second-layer unit u of local star s changing its slope by
    delta2 adds ``delta2 b[i][:, u] (x) sv[u]`` (with b before the first-layer changes), first-layer unit u
    adds ``w0t[:, u] (x) r1[j]`` (``r1[j] = delta1 (w1t[u] * D2_new) @ sv``, one matrix product for all
    pairs, made by the caller) to pt and ``delta1 w0t[:, u] (x) w1t[u]`` to b. ``flips1``/``flips2`` are
    (local star, unit) pairs as np.nonzero gives them. Compiled; needs numba."""
    from ._numba_kernels import hidden_flip_updates as kernel

    kernel(pt, b, rows, flips2[0], flips2[1], delta2, sv, flips1[0], flips1[1], delta1, r1, w0t, w1t)


def residual_rows(data, weights, rows, model, dv=None, want=False):
    """chi2 per star of ``model`` (m, P) against rows ``rows`` of data and weights (N, P, float64), without
    gathering them: ``sum(w (d - model)^2)``. With ``want`` also w r (m, P, float32), and with ``dv``
    (d model / d v, (m, P)) w dv and the sums ``sum(w r dv)``, ``sum(w dv^2)``. Returns
    (chi2, w r or None, w dv or None, sum w r dv, sum w dv^2). Compiled; needs numba."""
    from ._numba_kernels import residual_rows as kernel

    m, p = model.shape
    dvv = np.empty((0, 0), dtype=model.dtype) if dv is None else np.ascontiguousarray(dv, dtype=model.dtype)
    wr = np.empty((m, p) if want else (0, 0), dtype=np.float32)
    wdv = np.empty((m, p) if (want and dv is not None) else (0, 0), dtype=np.float32)
    out = np.zeros((m, 3))
    rows = np.asarray(rows, dtype=np.int64)
    kernel(data, weights, rows, np.ascontiguousarray(model), dvv, want, wr, wdv, out)
    return out[:, 0], (wr if want else None), (wdv if want and dv is not None else None), out[:, 1], out[:, 2]


def continuum_rows(design, data, weights, rows, flux, ridge):
    """:func:`paynekit.fitting.forward.solve_continuum` for model ``flux`` (m, P) against rows ``rows`` of
    data and weights (N, P, float64), in one compiled pass per star without gathering them: (continuum
    (m, P), coefficients (m, K), [G_r (m, D_r, D_r)]) with the same relative ``ridge``. Needs numba and
    contiguous regions (``design.slices`` with step 1)."""
    from ._numba_kernels import continuum_rows as kernel

    starts = np.array([sl.start for sl in design.slices], dtype=np.int64)
    stops = np.array([sl.stop for sl in design.slices], dtype=np.int64)
    degrees = np.array([b.shape[1] for b in design.bases], dtype=np.int64)
    d_max = int(degrees.max())
    basis_t = np.zeros((d_max, int(sum(b.shape[0] for b in design.bases))))
    offsets = np.zeros(len(design.bases), dtype=np.int64)
    o = 0
    for r, b in enumerate(design.bases):
        basis_t[: b.shape[1], o : o + b.shape[0]] = b.T
        offsets[r] = o
        o += b.shape[0]
    m, p = flux.shape
    cont = np.zeros((m, p))
    coef = np.zeros((m, int(degrees.sum())))
    grams = np.zeros((m, starts.size, d_max, d_max))
    rows = np.asarray(rows, dtype=np.int64)
    kernel(data, weights, rows, np.ascontiguousarray(flux), starts, stops, basis_t, degrees, offsets,
           float(ridge), cont, coef, grams)
    return cont, coef, [grams[:, r, :nd, :nd] for r, nd in enumerate(degrees)]


def interpolate_rows(data, weights, lam, segments, tolerance):
    """Linear interpolation of float64 data (n, P) and inverse-variance weights at wavelengths lam
    ((n, Q), or (1, Q) for all rows) on a grid of "log" or "linear" segments (``instrument._Segment``);
    the compiled form of :func:`paynekit.fitting.presearch.interpolate_data` (same rules)."""
    from ._numba_kernels import interpolate_rows as kernel

    kind = np.array([0 if s.kind == "log" else 1 for s in segments], dtype=np.int64)
    origin = np.array([s.origin for s in segments], dtype=np.float64)
    step = np.array([s.step for s in segments], dtype=np.float64)
    starts = np.array([s.start for s in segments], dtype=np.int64)
    stops = np.array([s.stop for s in segments], dtype=np.int64)
    lows = np.array([s.wl_lo for s in segments], dtype=np.float64)
    highs = np.array([s.wl_hi for s in segments], dtype=np.float64)
    n, q = data.shape[0], lam.shape[1]
    out_d = np.empty((n, q))
    out_w = np.empty((n, q))
    kernel(
        np.ascontiguousarray(data, dtype=np.float64),
        np.ascontiguousarray(weights, dtype=np.float64),
        np.ascontiguousarray(lam, dtype=np.float64),
        kind, origin, step, starts, stops, lows, highs, tolerance * highs, out_d, out_w,
    )
    return out_d, out_w


def median_snr(data, weights) -> np.ndarray:
    """Per row, the median of data * sqrt(weights) over the pixels with weights > 0 (NaN for a row without
    one): ``nanmedian(where(weights > 0, data * sqrt(weights), nan), axis=1)``, the same numbers, without
    the (n, P) temporaries; compiled when numba is enabled."""
    data = np.ascontiguousarray(data, dtype=np.float64)
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if data.shape != weights.shape or data.ndim != 2:
        raise ValueError(
            f"data and weights must be 2-D arrays of one shape, got {data.shape} and {weights.shape}"
        )
    out = np.full(data.shape[0], np.nan)
    if numba_enabled():
        from ._numba_kernels import median_snr_rows

        median_snr_rows(data, weights, out)
        return out
    has = np.any(weights > 0, axis=1)
    with np.errstate(invalid="ignore"):
        pix = np.where(weights[has] > 0, data[has] * np.sqrt(weights[has]), np.nan)
    out[has] = np.nanmedian(pix, axis=1)
    return out


def gram_rows(js, r):
    """Per star s: ``H[s] = js[s] @ js[s].T`` (F, F) and ``g[s] = js[s] @ r[s]`` (F,), accumulated in float64,
    for js (n, F, P) and r (n, P) of one float dtype. Compiled (numba, fastmath: the sums are reordered,
    so they agree with BLAS to rounding, not bit for bit); for few parameters it is ~2x faster than
    numpy's stacked matmul, whose per-star (F x P) @ (P x F) products are too thin for BLAS."""
    from ._numba_kernels import gram_rows as kernel

    n, f, _ = js.shape
    h = np.empty((n, f, f))
    g = np.empty((n, f))
    kernel(np.ascontiguousarray(js), np.ascontiguousarray(r, dtype=js.dtype), h, g)
    return h, g
