"""Compiled inner loops (numba), used by the numpy paths when numba is importable.

Each kernel computes exactly what the numpy code beside it computes, in the same order of floating-point
operations, so the two give the same numbers; the numpy code stays as the fallback (and is tested against
the kernel). numba is imported on first use, not when paynekit is imported, and
``PAYNEKIT_DISABLE_NUMBA=1`` turns the kernels off.

Why compiled: the Doppler shift interpolates (flux + every Jacobian column) of every star at every
optimiser step. In numpy each of its five taps is a multiply and an add over the whole (n, C, P) array,
ten passes through memory; the kernel makes one pass per star and runs the stars on all cores. On the
5-label APOGEE fit it was a third of the fitting time.
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


def _build_doppler_kernel():
    import math

    import numba

    @numba.njit(cache=True, nogil=True)
    def cubic5(delta, scale):  # pragma: no cover - compiled
        # the weights of _apply_fast: shift s = rint(delta), Catmull-Rom taps at s-2..s+2 (one is 0)
        s = np.rint(delta)
        frac = delta - s
        neg = frac < 0
        t = frac + 1.0 if neg else frac
        t2 = t * t
        t3 = t * t * t
        w = np.zeros(5)
        dw = np.zeros(5)
        o = 0 if neg else 1
        w[o] = (-t3 + 2 * t2 - t) / 2
        w[o + 1] = (3 * t3 - 5 * t2 + 2) / 2
        w[o + 2] = (-3 * t3 + 4 * t2 + t) / 2
        w[o + 3] = (t3 - t2) / 2
        dw[o] = (-3 * t2 + 4 * t - 1) / 2 * scale
        dw[o + 1] = (9 * t2 - 10 * t) / 2 * scale
        dw[o + 2] = (-9 * t2 + 8 * t + 1) / 2 * scale
        dw[o + 3] = (3 * t2 - 2 * t) / 2 * scale
        return int(s), w, dw

    @numba.njit(cache=True, nogil=True)
    def doppler_rows(values, v, log_step, c_kms, starts, stops, out):  # pragma: no cover - compiled
        n, c, _p = values.shape
        deriv = out.shape[1] > c
        for r in range(n):
            delta = -math.log1p(v[r] / c_kms) / log_step
            sr, w64, dw64 = cubic5(delta, -1.0 / ((c_kms + v[r]) * log_step))
            w = w64.astype(values.dtype)
            dw = dw64.astype(values.dtype)
            for q in range(starts.size):
                a, b = starts[q], stops[q]
                lo = min(max(a - sr + 2, a), b)
                hi = min(max(b - sr - 2, lo), b)
                for ch in range(c + (1 if deriv else 0)):
                    if ch < c:
                        src = values[r, ch]
                        k0, k1, k2, k3, k4 = w[0], w[1], w[2], w[3], w[4]
                    else:
                        src = values[r, 0]
                        k0, k1, k2, k3, k4 = dw[0], dw[1], dw[2], dw[3], dw[4]
                    dst = out[r, ch]
                    if hi > lo:  # interior: taps never clamp; indices from 0 on slices let LLVM vectorise
                        m = hi - lo
                        x = src[lo + sr - 2 : hi + sr + 2]
                        y = dst[lo:hi]
                        for i in range(m):
                            y[i] = k0 * x[i] + k1 * x[i + 1] + k2 * x[i + 2] + k3 * x[i + 3] + k4 * x[i + 4]
                    for e0, e1 in ((a, lo), (hi, b)):
                        for i in range(e0, e1):
                            j = i + sr
                            t0 = src[min(max(j - 2, a), b - 1)]
                            t1 = src[min(max(j - 1, a), b - 1)]
                            t2 = src[min(max(j, a), b - 1)]
                            t3 = src[min(max(j + 1, a), b - 1)]
                            t4 = src[min(max(j + 2, a), b - 1)]
                            dst[i] = k0 * t0 + k1 * t1 + k2 * t2 + k3 * t3 + k4 * t4

    return doppler_rows


def doppler_rows(values, v, log_step, c_kms, starts, stops, out) -> None:
    """The Doppler shift of ``DopplerResampler._apply_fast`` for values (n, C, P) at velocities v (n,).

    On a log-uniform grid of step ``log_step`` a star at v moves by delta = -log1p(v / c) / log_step
    pixels: ``out[r, ch, i] = sum_k w_k(delta) * values[r, ch, clamp(i + s + k - 2)]`` with s = rint(delta)
    and Catmull-Rom weights, within each segment [starts[q], stops[q]) (taps beyond its edge read the
    edge). When ``out`` has C + 1 channels the last is d values[:, 0] / d v. values and out share one
    float dtype; the weights are computed in float64 and rounded to it, as numpy does.
    """
    kernel = _STATE.get("doppler")
    if kernel is None:
        kernel = _STATE["doppler"] = _build_doppler_kernel()
    kernel(values, v, log_step, c_kms, starts, stops, out)


def _build_interpolate_kernel():
    import math

    import numba

    @numba.njit(cache=True, nogil=True)
    def interpolate_rows(data, weights, lam, kind, origin, step, starts, stops, lows, highs, tol, out_d, out_w):  # pragma: no cover
        n = data.shape[0]
        q_n = lam.shape[1]
        n_seg = starts.size
        shared = lam.shape[0] == 1  # one set of wavelengths for every row: positions computed once
        j0s = np.empty(q_n, dtype=np.int64)
        j1s = np.empty(q_n, dtype=np.int64)
        fracs = np.empty(q_n)
        ins = np.empty(q_n, dtype=np.bool_)
        for r in range(n):
            if r == 0 or not shared:
                lr = lam[0 if shared else r]
                for q in range(q_n):
                    x = lr[q]
                    k = 0  # searchsorted(lows, x, "right") - 1, clipped to [0, n_seg - 1]
                    while k + 1 < n_seg and lows[k + 1] <= x:
                        k += 1
                    a, b = starts[k], stops[k]
                    if kind[k] == 0:
                        t = a + (math.log(x) - origin[k]) / step[k]
                    else:
                        t = a + (x - origin[k]) / step[k]
                    ins[q] = (x >= lows[k] - tol[k]) and (x <= highs[k] + tol[k])
                    t = min(max(t, a), b - 1)
                    j0 = min(max(int(math.floor(t)), a), max(b - 2, a))
                    j0s[q] = j0
                    j1s[q] = min(j0 + 1, b - 1)
                    fracs[q] = min(max(t - j0, 0.0), 1.0)
            for q in range(q_n):
                j0, j1, frac = j0s[q], j1s[q], fracs[q]
                w0, w1 = weights[r, j0], weights[r, j1]
                if ins[q] and w0 > 0 and w1 > 0:
                    out_d[r, q] = (1 - frac) * data[r, j0] + frac * data[r, j1]
                    out_w[r, q] = 1.0 / ((1 - frac) / w0 + frac / w1)
                else:
                    out_d[r, q] = 0.0
                    out_w[r, q] = 0.0

    return interpolate_rows


def interpolate_rows(data, weights, lam, segments, tolerance):
    """Linear interpolation of float64 data (n, P) and inverse-variance weights at wavelengths lam
    ((n, Q), or (1, Q) for all rows) on a grid of "log" or "linear" segments (``instrument._Segment``);
    the compiled form of :func:`paynekit.fitting.presearch.interpolate_data` (same rules)."""
    kernel = _STATE.get("interpolate")
    if kernel is None:
        kernel = _STATE["interpolate"] = _build_interpolate_kernel()
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
