"""The Payne: neural-network emulators of synthetic spectra (Ting et al. 2019).

Two forms, both satisfying :class:`~paynekit.emulators.base.Emulator`:

* :class:`PayneMLP`, the current form: one fully connected network from the L scaled labels to all P
  pixels, ``flux = W_K @ act(... act(W_0 @ x_s + b_0) ...) + b_K`` (default 2 hidden layers of 300,
  leaky ReLU with slope 0.01).
* :class:`PaynePerPixel`, the pre-2019 form: for each pixel p a small network with one hidden layer of
  sigmoid neurons, ``flux_p = w1_p . sigmoid(W0_p @ x_s + b0_p) + b1_p``.

Weights follow the upstream convention: ``W_k`` has shape (n_out, n_in).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from ..errors import InputError
from ..labels import LabelSpace
from .base import Emulator

LEAKY_SLOPE = 0.01
ACTIVATIONS = ("leaky_relu", "sigmoid")


def _sigmoid(z):
    # scipy's expit is a stable ufunc for either sign (exp of a negative number only) and ~5x faster
    # than masking by sign by hand
    return expit(z)


def activate(z: np.ndarray, activation: str, derivative: bool):
    """Apply an activation; with ``derivative`` also return its derivative at z."""
    if activation == "leaky_relu":
        pos = z > 0
        a = np.where(pos, z, z * z.dtype.type(LEAKY_SLOPE))
        if not derivative:
            return a, None
        return a, np.where(pos, z.dtype.type(1.0), z.dtype.type(LEAKY_SLOPE))
    if activation == "sigmoid":
        a = _sigmoid(z)
        return a, (a * (1 - a) if derivative else None)
    raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


class PayneMLP(Emulator):
    """Fully connected Payne network (labels -> hidden layers -> all pixels) with analytic Jacobian.

    Parameters
    ----------
    weights, biases : sequences of arrays
        ``weights[k]`` has shape (n_out, n_in), ``biases[k]`` (n_out,); the first layer takes the L
        scaled labels, the last gives the P pixels.
    label_space : LabelSpace
    wavelength : array (P,)
    activation : {"leaky_relu", "sigmoid"}
    """

    kind = "payne_mlp"

    def __init__(self, weights, biases, label_space: LabelSpace, wavelength, *, activation="leaky_relu",
                 dtype=np.float64, wavelength_medium="vacuum", meta=None):
        super().__init__(label_space, wavelength, wavelength_medium=wavelength_medium, meta=meta)
        self.activation = _check_activation(activation)
        self._dtype = np.dtype(dtype)
        if self._dtype not in (np.float32, np.float64):
            raise InputError(f"dtype must be float32 or float64, got {self._dtype}")
        if len(weights) != len(biases) or len(weights) < 2:
            raise InputError(f"need at least 2 layers with one bias per weight matrix; got {len(weights)} "
                             f"weight matrices and {len(biases)} bias vectors")
        ws = [np.array(w, dtype=self._dtype) for w in weights]
        bs = [np.array(b, dtype=self._dtype).reshape(-1) for b in biases]
        n_in = len(label_space)
        for k, (w, b) in enumerate(zip(ws, bs)):
            if w.ndim != 2 or w.shape[1] != n_in or b.shape != (w.shape[0],):
                raise InputError(f"layer {k}: weight shape {w.shape} and bias shape {b.shape} do not chain "
                                 f"from {n_in} inputs (expected ({w.shape[0] if w.ndim == 2 else '?'}, {n_in}))")
            n_in = w.shape[0]
        if self.wavelength is not None and ws[-1].shape[0] != self.wavelength.size:
            raise InputError(f"the network has {ws[-1].shape[0]} output pixels but wavelength has "
                             f"{self.wavelength.size}")
        self.weights = ws
        self.biases = bs
        # transposed copies, contiguous, for the (N, L, H) Jacobian propagation
        self._weights_t = [np.ascontiguousarray(w.T) for w in ws]
        self._derived = {}  # see derived(); the weights are not changed after construction

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_derived"] = {}  # rebuilt where needed: a worker is not sent copies of the weights
        return state

    def derived(self, key, make):
        """``make()``, computed once per network and ``key`` (float32 copies, a factorisation of the
        weights) and kept with it: fits of many chunks with one network reuse it."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    @property
    def dtype(self):
        return self._dtype

    @property
    def n_pixels(self) -> int:
        return self.weights[-1].shape[0]

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(w.shape[0] for w in self.weights[:-1])

    def astype(self, dtype) -> PayneMLP:
        """This network in ``dtype`` (float32 or float64); the copy is made once and kept."""
        dtype = np.dtype(dtype)
        if dtype == self._dtype:
            return self
        return self.derived(("astype", dtype.str), lambda: PayneMLP(
            self.weights, self.biases, self.label_space, self.wavelength, activation=self.activation,
            dtype=dtype, wavelength_medium=self.wavelength_medium, meta=self.meta))

    def _evaluate_scaled(self, x, jacobian):
        a = x
        jt = None  # d a / d x_s, laid out (N, L, H) so that each layer is one large matrix product
        for k in range(len(self.weights) - 1):
            z = a @ self._weights_t[k]
            z += self.biases[k]
            a, da = activate(z, self.activation, derivative=jacobian)
            if jacobian:
                if jt is None:
                    jt = self._weights_t[k][None, :, :] * da[:, None, :]
                else:
                    jt = (jt @ self._weights_t[k]) * da[:, None, :]
        flux = a @ self._weights_t[-1]
        flux += self.biases[-1]
        if not jacobian:
            return flux, None
        # one (N*L, H) @ (H, P) product: numpy's stacked matmul over N small (L, H) blocks is ~10x slower
        n, n_lab, n_hid = jt.shape
        jac_nlp = (jt.reshape(n * n_lab, n_hid) @ self._weights_t[-1]).reshape(n, n_lab, -1)  # (N, L, P)
        return flux, np.swapaxes(jac_nlp, 1, 2)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"w_{k}"] = w
            out[f"b_{k}"] = b
        return out

    @classmethod
    def from_arrays(cls, params, label_space, wavelength, **kwargs) -> PayneMLP:
        """Inverse of :meth:`to_arrays` (used by the file reader)."""
        n = len([k for k in params if k.startswith("w_")])
        return cls([params[f"w_{k}"] for k in range(n)], [params[f"b_{k}"] for k in range(n)],
                   label_space, wavelength, **kwargs)

    def torch_evaluator(self, device="cpu", dtype=None):
        """A function ``x_scaled (torch, N x L) -> (flux (N, P), jac (N, P, L))`` on ``device``."""
        import torch

        tdtype = dtype or (torch.float64 if self._dtype == np.float64 else torch.float32)
        ws = [torch.as_tensor(w, dtype=tdtype, device=device) for w in self.weights]
        bs = [torch.as_tensor(b, dtype=tdtype, device=device) for b in self.biases]
        act = self.activation
        one = torch.ones((), dtype=tdtype, device=device)
        slope = torch.full((), LEAKY_SLOPE, dtype=tdtype, device=device)

        def evaluate(x, jacobian=True):
            a, jt = x, None
            for k in range(len(ws) - 1):
                z = torch.addmm(bs[k], a, ws[k].T)
                if act == "leaky_relu":
                    a = torch.nn.functional.leaky_relu(z, LEAKY_SLOPE)
                    da = torch.where(z > 0, one, slope) if jacobian else None
                else:
                    a = torch.sigmoid(z)
                    da = a * (1 - a) if jacobian else None
                if jacobian:
                    jt = ws[k].T[None] * da[:, None, :] if jt is None else (jt @ ws[k].T) * da[:, None, :]
            flux = torch.addmm(bs[-1], a, ws[-1].T)
            if not jacobian:
                return flux, None
            return flux, (jt @ ws[-1].T).transpose(1, 2)

        return evaluate


class PaynePerPixel(Emulator):
    """The pre-2019 Payne: an independent one-hidden-layer sigmoid network for every pixel.

    Parameters
    ----------
    w0 : (P, H, L), b0 : (P, H), w1 : (P, H), b1 : (P,)
        Upstream names ``w_array_0``, ``b_array_0``, ``w_array_1``, ``b_array_1``.
    """

    kind = "payne_perpixel"

    def __init__(self, w0, b0, w1, b1, label_space: LabelSpace, wavelength, *, activation="sigmoid",
                 dtype=np.float64, wavelength_medium="vacuum", meta=None):
        super().__init__(label_space, wavelength, wavelength_medium=wavelength_medium, meta=meta)
        self.activation = _check_activation(activation)
        self._dtype = np.dtype(dtype)
        if self._dtype not in (np.float32, np.float64):
            raise InputError(f"dtype must be float32 or float64, got {self._dtype}")
        w0 = np.array(w0, dtype=self._dtype)
        if w0.ndim != 3 or w0.shape[2] != len(label_space):
            raise InputError(f"w0 must have shape (P, H, {len(label_space)}), got {w0.shape}")
        p, h, _ = w0.shape
        b0 = np.array(b0, dtype=self._dtype)
        w1 = np.array(w1, dtype=self._dtype)
        b1 = np.array(b1, dtype=self._dtype).reshape(-1)
        for name, arr, shape in (("b0", b0, (p, h)), ("w1", w1, (p, h)), ("b1", b1, (p,))):
            if arr.shape != shape:
                raise InputError(f"{name} must have shape {shape} to match w0 {w0.shape}, got {arr.shape}")
        if self.wavelength is not None and self.wavelength.size != p:
            raise InputError(f"the network has {p} pixels but wavelength has {self.wavelength.size}")
        self.w0, self.b0, self.w1, self.b1 = w0, b0, w1, b1
        self._w0_flat_t = np.ascontiguousarray(w0.reshape(p * h, -1).T)  # (L, P*H)

    @property
    def dtype(self):
        return self._dtype

    @property
    def n_pixels(self) -> int:
        return self.w0.shape[0]

    def astype(self, dtype) -> PaynePerPixel:
        return PaynePerPixel(self.w0, self.b0, self.w1, self.b1, self.label_space, self.wavelength,
                             activation=self.activation, dtype=dtype, wavelength_medium=self.wavelength_medium,
                             meta=self.meta)

    def _evaluate_scaled(self, x, jacobian):
        p, h, _ = self.w0.shape
        z = (x @ self._w0_flat_t).reshape(x.shape[0], p, h)
        z += self.b0
        a, da = activate(z, self.activation, derivative=jacobian)
        flux = np.einsum("nph,ph->np", a, self.w1) + self.b1
        if not jacobian:
            return flux, None
        d = da * self.w1  # (N, P, H)
        jac_pnl = np.matmul(d.transpose(1, 0, 2), self.w0)  # (P, N, H) @ (P, H, L) -> (P, N, L)
        return flux, jac_pnl.transpose(1, 0, 2)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"w0": self.w0, "b0": self.b0, "w1": self.w1, "b1": self.b1}

    @classmethod
    def from_arrays(cls, params, label_space, wavelength, **kwargs) -> PaynePerPixel:
        """Inverse of :meth:`to_arrays` (used by the file reader)."""
        return cls(params["w0"], params["b0"], params["w1"], params["b1"], label_space, wavelength, **kwargs)


#: Incremental Jacobians (:class:`JacobianCache`): a star's Jacobian is evaluated in full again after
#: this many updates in a row (a safeguard: rounding does not accumulate; on the demo's 25-label network in
#: float32, 200 updates in a row stayed within 1.6e-6 of a full evaluation, relative to the largest entry) ...
JACOBIAN_REFRESH_UPDATES = 32
#: ... or when an update would cost more than this fraction of a full evaluation.
JACOBIAN_UPDATE_MAX_COST = 0.5


class JacobianCache:
    """The Jacobians of a fixed set of stars (rows), kept between evaluations of a leaky-ReLU PayneMLP
    with two hidden layers, and updated where hidden units changed side.

    With leaky ReLU the network is piecewise linear: between two label vectors x_o and x_n only the
    hidden units whose pre-activation changed sign change the Jacobian. With D_k the diagonal of
    activation slopes (1 or 0.01) of layer k, W_k the weights and T_1 = D_1 W_0, the Jacobian is
    ``J = W_2 D_2 W_1 T_1`` and exactly

        J_n - J_o = W_2[:, f2] (dD_2 W_1 T_1n)[f2]  +  (W_2 D_2o W_1[:, f1]) (dD_1 W_0)[f1]

    where f1, f2 are the units that flipped in layers 1 and 2. With k1 and k2 flips the update costs
    ~(k1 (H + L) + k2 L) / (H L) of a full evaluation (H hidden units, L labels), against the full
    (P x H) @ (H x L) product per star. Near a minimum a fitter's step flips a handful of units: on the
    25-label APOGEE network a median of 3 and 2 (:doc:`design`). A star is evaluated in full on its first
    call, after :data:`JACOBIAN_REFRESH_UPDATES` updates, and when an update would cost more than
    :data:`JACOBIAN_UPDATE_MAX_COST` of a full evaluation. The cache holds one (L, P) Jacobian per row.
    """

    def __init__(self, mlp: PayneMLP, n_rows: int):
        if not self.supports(mlp):
            raise InputError("JacobianCache needs a PayneMLP with two hidden layers and leaky ReLU")
        self.mlp = mlp
        self.n_rows = int(n_rows)
        h1, h2 = mlp.hidden_sizes
        self.mask1 = np.zeros((self.n_rows, h1), dtype=bool)
        self.mask2 = np.zeros((self.n_rows, h2), dtype=bool)
        self.age = np.full(self.n_rows, -1, dtype=np.int64)  # -1: nothing cached yet
        self.jac = None  # (n_rows, L, P), allocated on first use
        self.n_full = 0
        self.n_updated = 0

    @staticmethod
    def supports(emulator) -> bool:
        return (isinstance(emulator, PayneMLP) and emulator.activation == "leaky_relu"
                and len(emulator.hidden_sizes) == 2)

    def __call__(self, x, rows):
        """Flux (m, P) and d flux / d x_scaled (m, L, P) at scaled labels x (m, L) of cache rows ``rows``;
        the Jacobian as a :class:`CachedRows` view of the store (``np.asarray`` gathers it)."""
        mlp = self.mlp
        dt = mlp.dtype.type
        slope = dt(LEAKY_SLOPE)
        x = np.asarray(x, dtype=mlp.dtype)
        rows = np.asarray(rows, dtype=np.int64)
        if np.unique(rows).size != rows.size:
            raise InputError("JacobianCache rows must be distinct")
        w0t, w1t, w2t = mlp._weights_t
        w0, w1 = mlp.weights[0], mlp.weights[1]
        z1 = x @ w0t
        z1 += mlp.biases[0]
        pos1 = z1 > 0
        a1, d1 = activate(z1, mlp.activation, derivative=True)
        z2 = a1 @ w1t
        z2 += mlp.biases[1]
        pos2 = z2 > 0
        a2, d2 = activate(z2, mlp.activation, derivative=True)
        flux = a2 @ w2t
        flux += mlp.biases[2]
        m, n_lab = x.shape
        h1, h2 = mlp.hidden_sizes
        if self.jac is None:
            self.jac = np.empty((self.n_rows, n_lab, mlp.n_pixels), dtype=mlp.dtype)
        flip1 = pos1 != self.mask1[rows]
        flip2 = pos2 != self.mask2[rows]
        k1 = flip1.sum(axis=1)
        k2 = flip2.sum(axis=1)
        cost = (k1 * (h2 + n_lab) + k2 * n_lab) / (h2 * n_lab)
        age = self.age[rows]
        update = (age >= 0) & (age < JACOBIAN_REFRESH_UPDATES) & (cost <= JACOBIAN_UPDATE_MAX_COST)
        full = np.flatnonzero(~update)
        if full.size:
            jt = w0t[None, :, :] * d1[full][:, None, :]  # (n, L, H1)
            jt = (jt @ w1t) * d2[full][:, None, :]  # (n, L, H2)
            r_full = rows[full]
            if np.all(np.diff(r_full) == 1):
                # consecutive rows (a first call): the product goes straight into the store, no copy
                dest = self.jac[r_full[0] : r_full[-1] + 1].reshape(-1, w2t.shape[1])
                np.matmul(jt.reshape(-1, h2), w2t, out=dest)
            else:
                self.jac[r_full] = (jt.reshape(-1, h2) @ w2t).reshape(full.size, n_lab, -1)
            self.age[r_full] = 0
        upd = np.flatnonzero(update & ((k1 > 0) | (k2 > 0)))
        if upd.size:
            d2_old = np.where(self.mask2[rows[upd]], dt(1), slope)  # (u, H2)
            # second term: the columns W_2 D_2o W_1[:, f1] of every updated star, in one product
            cols = [d2_old[j][:, None] * w1[:, np.flatnonzero(flip1[i])] for j, i in enumerate(upd)]
            g_all = np.concatenate(cols, axis=1).T @ w2t if sum(c.shape[1] for c in cols) else None
            at = 0
            dd = dt(1) - slope
            for j, i in enumerate(upd):
                f1 = np.flatnonzero(flip1[i])
                f2 = np.flatnonzero(flip2[i])
                sign1 = np.where(pos1[i, f1], dd, -dd)  # dD_1 on the flipped units
                sign2 = np.where(pos2[i, f2], dd, -dd)
                c2 = sign1[:, None] * w0[f1]  # (k1, L)
                t1n = d1[i][:, None] * w0  # (H1, L)
                c1 = sign2[:, None] * (w1[f2] @ t1n)  # (k2, L)
                coef = np.concatenate([c2, c1])  # (k, L)
                basis = np.concatenate([g_all[at : at + f1.size] if f1.size else w2t[:0], w2t[f2]])  # (k, P)
                at += f1.size
                self.jac[rows[i]] += coef.T @ basis
        self.age[rows[update]] += 1
        self.mask1[rows] = pos1
        self.mask2[rows] = pos2
        self.n_full += full.size
        self.n_updated += int(update.sum())
        return flux, CachedRows(self.jac, rows)


class CachedRows:
    """Rows ``rows`` of a :class:`JacobianCache`'s store (n_rows, L, P), gathered only when used: slicing
    by stars (``view[a:b]``) gathers just those stars, so that the fitter copies each block of stars once,
    from the store into its cache-sized work array, instead of gathering all of them first.
    ``np.asarray(view)`` gathers everything. Valid until the cache's next call."""

    def __init__(self, store, rows, labels=None):
        self.store = store
        self.rows = rows
        self.labels = labels

    @property
    def shape(self):
        n_lab = self.store.shape[1] if self.labels is None else len(self.labels)
        return (self.rows.size, n_lab, self.store.shape[2])

    @property
    def dtype(self):
        return self.store.dtype

    def select_labels(self, labels) -> CachedRows:
        """The same rows, Jacobian columns ``labels`` only (indices into the store's labels)."""
        return CachedRows(self.store, self.rows, np.asarray(labels))

    def __getitem__(self, stars: slice) -> np.ndarray:
        if not isinstance(stars, slice):
            raise TypeError("CachedRows can be sliced by stars only (view[a:b])")
        out = self.store[self.rows[stars]]
        return out if self.labels is None else out[:, self.labels]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)
