"""numba kernels of :mod:`paynekit._kernels`, imported on first use (numba loads only when a fit needs it).

They are defined at module level so that numba's on-disk cache finds them again in a new process
(kernels made inside a function are closures, whose cache entries never matched: every process compiled
them again, ~3 s).
"""

import math

import numba
import numpy as np


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


@numba.njit(cache=True, nogil=True)
def interpolate_rows(  # pragma: no cover - compiled
    data, weights, lam, kind, origin, step, starts, stops, lows, highs, tol, out_d, out_w
):
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



@numba.njit(cache=True, nogil=True)
def median_snr_rows(data, weights, out):  # pragma: no cover - compiled
    n, p = data.shape
    buf = np.empty(p)
    for r in range(n):
        m = 0
        for i in range(p):
            w = weights[r, i]
            if w > 0:
                buf[m] = data[r, i] * math.sqrt(w)
                m += 1
        out[r] = np.median(buf[:m]) if m > 0 else np.nan


@numba.njit(cache=True, nogil=True, fastmath=True)
def gram_rows(js, r, h, g):  # pragma: no cover - compiled
    n, f, p = js.shape
    for s in range(n):
        a = js[s]
        rr = r[s]
        for i in range(f):
            ai = a[i]
            acc = 0.0
            for k in range(p):
                acc += ai[k] * rr[k]
            g[s, i] = acc
            for j in range(i, f):
                aj = a[j]
                acc = 0.0
                for k in range(p):
                    acc += ai[k] * aj[k]
                h[s, i, j] = acc
                h[s, j, i] = acc


@numba.njit(cache=True, nogil=True)
def doppler_rows_transpose(values, v, log_step, c_kms, starts, stops, out):  # pragma: no cover - compiled
    # the adjoint of doppler_rows for one channel: out[r, clamp(i + s + k - 2)] += w_k * values[r, i]
    n, _p = values.shape
    for r in range(n):
        delta = -math.log1p(v[r] / c_kms) / log_step
        sr, w64, _ = cubic5(delta, 0.0)
        w = w64.astype(values.dtype)
        k0, k1, k2, k3, k4 = w[0], w[1], w[2], w[3], w[4]
        x = values[r]
        y = out[r]
        for q in range(starts.size):
            a, b = starts[q], stops[q]
            lo = min(max(a - sr + 2, a), b)
            hi = min(max(b - sr - 2, lo), b)
            # targets t in [t0, t1) receive from interior sources only: written once, from slices indexed
            # from 0 so that LLVM vectorises (as in doppler_rows); every other target is summed into
            t0 = lo + sr + 2 if hi > lo else b
            t1 = max(hi + sr - 2, t0) if hi > lo else b
            for t in range(a, t0):
                y[t] = 0.0
            for t in range(t1, b):
                y[t] = 0.0
            if t1 > t0:
                xs = x[t0 - sr - 2 : t1 - sr + 2]
                ys = y[t0:t1]
                for j in range(t1 - t0):
                    ys[j] = k0 * xs[j + 4] + k1 * xs[j + 3] + k2 * xs[j + 2] + k3 * xs[j + 1] + k4 * xs[j]
            if hi > lo:
                # ... the first and last four interior sources also reach targets outside it
                for e0, e1 in ((lo, min(lo + 4, hi)), (max(hi - 4, lo + 4), hi)):
                    for i in range(e0, e1):
                        for k in range(5):
                            t = i + sr + k - 2
                            if t < t0 or t >= t1:
                                y[t] += w[k] * x[i]
            for e0, e1 in ((a, lo), (hi, b)):  # sources whose taps clamp at the segment's edge
                for i in range(e0, e1):
                    for k in range(5):
                        t = min(max(i + sr + k - 2, a), b - 1)
                        y[t] += w[k] * x[i]


@numba.njit(cache=True, nogil=True)
def residual_rows(data, weights, rows, model, dv, want, out_wr, out_wdv, out):  # pragma: no cover - compiled
    m, p = model.shape
    for i in range(m):
        d = data[rows[i]]
        w = weights[rows[i]]
        mo = model[i]
        s = 0.0
        if not want:
            for j in range(p):
                r = d[j] - mo[j]
                s += w[j] * r * r
            out[i, 0] = s
            continue
        s1 = 0.0
        s2 = 0.0
        has_dv = dv.shape[0] > 0
        for j in range(p):
            r = d[j] - mo[j]
            wr = w[j] * r
            s += wr * r
            out_wr[i, j] = wr
            if has_dv:
                x = dv[i, j]
                s1 += wr * x
                s2 += w[j] * x * x
                out_wdv[i, j] = w[j] * x
        out[i, 0] = s
        out[i, 1] = s1
        out[i, 2] = s2


@numba.njit(cache=True, nogil=True, fastmath=True)
def continuum_rows(  # pragma: no cover - compiled
    data, weights, rows, flux, starts, stops, basis_t, degrees, offsets, ridge, cont, coef, grams
):
    # per star and region: G = sum w f^2 T T^T, rhs = sum w f d T, a = G^-1 rhs.
    # basis_t (D_max, sum P_r): the regions' Chebyshev terms, region r from offsets[r]; the sums run over
    # pixels innermost (vectorised; fastmath reorders them, so they agree with numpy to rounding)
    m = flux.shape[0]
    n_reg = starts.size
    d_max = basis_t.shape[0]
    g = np.empty((d_max, d_max))
    rhs = np.empty(d_max)
    wff = np.empty(basis_t.shape[1])
    wfd = np.empty(basis_t.shape[1])
    for i in range(m):
        d = data[rows[i]]
        w = weights[rows[i]]
        f = flux[i]
        k0 = 0
        for r in range(n_reg):
            nd = degrees[r]
            a, b, o = starts[r], stops[r], offsets[r]
            n = b - a
            for p in range(n):
                fp = np.float64(f[a + p])
                wf = w[a + p] * fp
                wff[p] = wf * fp
                wfd[p] = wf * d[a + p]
            tr = 0.0
            for j in range(nd):
                tj = basis_t[j, o : o + n]
                acc = 0.0
                for p in range(n):
                    acc += wfd[p] * tj[p]
                rhs[j] = acc
                for k in range(j, nd):
                    tk = basis_t[k, o : o + n]
                    acc = 0.0
                    for p in range(n):
                        acc += wff[p] * tj[p] * tk[p]
                    g[j, k] = acc
                    g[k, j] = acc
                    grams[i, r, j, k] = acc
                    grams[i, r, k, j] = acc
                tr += g[j, j]
            scale = tr / nd * ridge if tr != 0 else 1.0
            for j in range(nd):
                g[j, j] += scale
            # Gaussian elimination with partial pivoting on the small system (nd <= a few)
            for c in range(nd):
                piv = c
                for rr in range(c + 1, nd):
                    if abs(g[rr, c]) > abs(g[piv, c]):
                        piv = rr
                if piv != c:
                    for k in range(nd):
                        tmp = g[c, k]
                        g[c, k] = g[piv, k]
                        g[piv, k] = tmp
                    tmp = rhs[c]
                    rhs[c] = rhs[piv]
                    rhs[piv] = tmp
                for rr in range(c + 1, nd):
                    fac = g[rr, c] / g[c, c]
                    for k in range(c, nd):
                        g[rr, k] -= fac * g[c, k]
                    rhs[rr] -= fac * rhs[c]
            for c in range(nd - 1, -1, -1):
                s = rhs[c]
                for k in range(c + 1, nd):
                    s -= g[c, k] * coef[i, k0 + k]
                coef[i, k0 + c] = s / g[c, c]
            out = cont[i, a:b]
            for p in range(n):
                out[p] = 0.0
            for j in range(nd):
                cj = coef[i, k0 + j]
                tj = basis_t[j, o : o + n]
                for p in range(n):
                    out[p] += cj * tj[p]
            k0 += nd


@numba.njit(cache=True, nogil=True)
def hidden_flip_updates(pt, b, rows, s2, u2, delta2, sv, s1, u1, delta1, r1, w0t, w1t):  # pragma: no cover
    # second-layer units first: their term uses b before the first-layer units change it
    nl, h = pt.shape[1], pt.shape[2]
    h2 = b.shape[2]
    for j in range(s2.size):
        i, u, dd = rows[s2[j]], u2[j], delta2[j]
        for l in range(nl):
            c = dd * b[i, l, u]
            for k in range(h):
                pt[i, l, k] += c * sv[u, k]
    for j in range(s1.size):
        i, u, dd = rows[s1[j]], u1[j], delta1[j]
        for l in range(nl):
            c = w0t[l, u]
            for k in range(h):
                pt[i, l, k] += c * r1[j, k]
            c = dd * c
            for k in range(h2):
                b[i, l, k] += c * w1t[u, k]
