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
        return PayneMLP(self.weights, self.biases, self.label_space, self.wavelength, activation=self.activation,
                        dtype=dtype, wavelength_medium=self.wavelength_medium, meta=self.meta)

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
