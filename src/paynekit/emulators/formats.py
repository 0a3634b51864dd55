"""Emulator files: paynekit's own versioned npz format, and importers for upstream layouts.

Our format is a plain npz (never pickled objects) with these keys:

* ``paynekit_format`` = "paynekit-emulator", ``format_version`` (int), ``package_version``
* ``kind`` ("payne_mlp" or "payne_perpixel"; The Cannon adds "cannon")
* ``label_names``, ``label_units``, ``x_min``, ``x_max``, ``wavelength``, ``wavelength_medium``
* ``activation``, ``training_set_hash`` and the weights of the model (``w_0``, ``b_0``, ...)

Upstream layouts recognised by :func:`load_emulator`:

* The Payne's current MLP npz: ``w_array_0..K``, ``b_array_0..K`` (2-D weights), ``x_min``, ``x_max``;
  wavelength supplied separately (or the APOGEE 7214/8575 grid when the pixel count matches);
  optionally ``label_names`` and ``wavelength_air_A`` (the 22-label optical networks, air wavelengths).
* The per-pixel npz: ``w_array_0`` (P, H, L), ``w_array_1`` (P, H), ``b_array_0`` (P, H), ``b_array_1`` (P,).
* The SDSS Astra pickle (dict with weights, biases, x_min, x_max, wavelength, label_names), only with
  ``trust_pickle=True``: unpickling runs arbitrary code, so it is never done on an untrusted file.
"""

from __future__ import annotations

import json
import logging
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, InputError
from ..labels import LabelSpace
from ..wavelength import APSTAR_N_PIXELS, apstar_wavelength, payne_apogee_wavelength
from .payne import PayneMLP, PaynePerPixel

log = logging.getLogger(__name__)

FORMAT_NAME = "paynekit-emulator"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
_PICKLE_MAGIC = (b"\x80",)


def package_version() -> str:
    try:
        return metadata.version("paynekit")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _generic_label_names(n):
    return tuple(f"label_{i}" for i in range(n))


# ------------------------------------------------------------------------------------------------
# our own format
# ------------------------------------------------------------------------------------------------
_EMULATOR_CLASSES: dict[str, type] = {"payne_mlp": PayneMLP, "payne_perpixel": PaynePerPixel}


def register_emulator_kind(kind: str, cls: type) -> None:
    """Let :func:`load_emulator` read files of ``kind`` (used by The Cannon)."""
    _EMULATOR_CLASSES[kind] = cls


def save_emulator(emulator, path, *, training_set_hash: str = "", extra_meta: dict | None = None) -> Path:
    """Write ``emulator`` to ``path`` in paynekit's npz format (no pickle). Returns the path."""
    path = Path(path)
    if emulator.kind not in _EMULATOR_CLASSES:
        raise InputError(f"cannot save an emulator of kind {emulator.kind!r}")
    if not isinstance(training_set_hash, str):
        raise InputError(
            f"training_set_hash must be a str (e.g. TrainingGrid.hash()), got {type(training_set_hash).__name__}"
        )
    meta = dict(emulator.meta)
    meta.update(extra_meta or {})
    ls = emulator.label_space
    arrays = {
        "paynekit_format": np.array(FORMAT_NAME),
        "format_version": np.array(FORMAT_VERSION),
        "package_version": np.array(package_version()),
        "kind": np.array(emulator.kind),
        "label_names": np.array(ls.names),
        "label_units": np.array(ls.units),
        "x_min": ls.x_min,
        "x_max": ls.x_max,
        "wavelength": emulator.wavelength if emulator.wavelength is not None else np.zeros(0),
        "wavelength_medium": np.array(emulator.wavelength_medium),
        "activation": np.array(getattr(emulator, "activation", "")),
        "training_set_hash": np.array(training_set_hash or meta.get("training_set_hash", "")),
        "meta_json": np.array(json.dumps(meta, default=str)),
    }
    for key, value in emulator.to_arrays().items():
        arrays[f"param_{key}"] = value
    objects = [k for k, v in arrays.items() if np.asarray(v).dtype == object]
    if objects:  # np.savez would pickle these, and load_emulator (rightly) refuses pickles
        raise InputError(f"cannot save {', '.join(objects)}: object arrays would need pickle")
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def _load_own(path: Path, data) -> object:
    version = int(data["format_version"])
    if version not in SUPPORTED_VERSIONS:
        raise FileFormatError(
            f"{path}: paynekit emulator format version {version}, but this paynekit "
            f"({package_version()}) reads versions {SUPPORTED_VERSIONS}; upgrade paynekit"
        )
    kind = str(data["kind"])
    if kind not in _EMULATOR_CLASSES:
        raise FileFormatError(f"{path}: emulator kind {kind!r}; expected one of {sorted(_EMULATOR_CLASSES)}")
    meta = json.loads(str(data["meta_json"]))
    meta["training_set_hash"] = str(data["training_set_hash"])
    meta["source_file"] = str(path)
    meta["written_by"] = str(data["package_version"])
    ls = LabelSpace(tuple(data["label_names"]), data["x_min"], data["x_max"], tuple(data["label_units"]))
    wl = data["wavelength"]
    params = {k[len("param_"):]: data[k] for k in data.files if k.startswith("param_")}
    cls = _EMULATOR_CLASSES[kind]
    kwargs = {"wavelength_medium": str(data["wavelength_medium"]), "meta": meta}
    if str(data["activation"]):
        kwargs["activation"] = str(data["activation"])
    floats = [v.dtype for v in params.values() if v.dtype.kind == "f"]
    if floats:  # evaluate in the precision the weights were saved in
        kwargs["dtype"] = np.result_type(*floats)
    return cls.from_arrays(params, ls, wl if wl.size else None, **kwargs)


# ------------------------------------------------------------------------------------------------
# upstream layouts
# ------------------------------------------------------------------------------------------------
def _default_wavelength(n_pixels: int, path: Path):
    if n_pixels == 7214:
        log.info("%s: no wavelength given; using The Payne's 7214-pixel APOGEE grid", path)
        return payne_apogee_wavelength()
    if n_pixels == APSTAR_N_PIXELS:
        log.info("%s: no wavelength given; using the 8575-pixel apStar grid", path)
        return apstar_wavelength()
    raise InputError(
        f"{path}: the file has no wavelength array and its {n_pixels} pixels match no built-in grid "
        "(7214 or 8575 APOGEE pixels); pass wavelength=..."
    )


def _label_space_upstream(data, path, label_names, n_labels):
    names = label_names
    if names is None and "label_names" in data.files:
        names = tuple(str(s) for s in data["label_names"])
    if names is None:
        names = _generic_label_names(n_labels)
    if len(names) != n_labels:
        raise InputError(f"{path}: label_names has {len(names)} entries but the network takes {n_labels} labels")
    return LabelSpace(tuple(names), data["x_min"], data["x_max"])


def _load_upstream_mlp(path, data, wavelength, label_names, medium):
    n_layers = len([k for k in data.files if k.startswith("w_array_")])
    missing = [k for i in range(n_layers) for k in (f"w_array_{i}", f"b_array_{i}") if k not in data.files]
    if missing or "x_min" not in data.files or "x_max" not in data.files:
        raise FileFormatError(f"{path}: looks like an upstream Payne MLP but lacks {missing or ['x_min/x_max']}")
    weights = [data[f"w_array_{i}"] for i in range(n_layers)]
    biases = [data[f"b_array_{i}"] for i in range(n_layers)]
    n_pix = weights[-1].shape[0]
    if wavelength is None and "wavelength_air_A" in data.files:
        wavelength, medium = data["wavelength_air_A"], "air"
    elif wavelength is None and "wavelength" in data.files:
        wavelength = data["wavelength"]
    elif wavelength is None:
        wavelength = _default_wavelength(n_pix, path)
    activation = "leaky_relu"
    if "activation" in data.files and "sigmoid" in str(data["activation"]):
        activation = "sigmoid"
    ls = _label_space_upstream(data, path, label_names, weights[0].shape[1])
    return PayneMLP(weights, biases, ls, wavelength, activation=activation, wavelength_medium=medium,
                    meta={"source_file": str(path), "source_format": "payne_mlp_npz"})


def _load_upstream_perpixel(path, data, wavelength, label_names, medium):
    w0 = data["w_array_0"]
    if wavelength is None:
        wavelength = data["wavelength"] if "wavelength" in data.files else _default_wavelength(w0.shape[0], path)
    ls = _label_space_upstream(data, path, label_names, w0.shape[2])
    return PaynePerPixel(w0, data["b_array_0"], data["w_array_1"], data["b_array_1"], ls, wavelength,
                         activation="sigmoid", wavelength_medium=medium,
                         meta={"source_file": str(path), "source_format": "payne_perpixel_npz"})


def _load_astra_pickle(path: Path, wavelength, label_names, medium):
    import pickle

    with open(path, "rb") as fh:
        obj = pickle.load(fh)  # noqa: S301 - only reached with trust_pickle=True
    if not isinstance(obj, dict) or not {"weights", "biases", "x_min", "x_max"} <= set(obj):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise FileFormatError(f"{path}: pickle holds {found}; expected a dict with weights, biases, x_min, x_max, "
                              "wavelength, label_names (the SDSS Astra Payne model)")
    weights = [np.asarray(w) for w in obj["weights"]]
    biases = [np.asarray(b) for b in obj["biases"]]
    wl = wavelength if wavelength is not None else obj.get("wavelength")
    if wl is None:
        wl = _default_wavelength(weights[-1].shape[0], path)
    names = label_names or obj.get("label_names") or _generic_label_names(weights[0].shape[1])
    ls = LabelSpace(tuple(names), np.asarray(obj["x_min"], float), np.asarray(obj["x_max"], float))
    return PayneMLP(weights, biases, ls, wl, wavelength_medium=medium,
                    meta={"source_file": str(path), "source_format": "astra_pickle"})


def load_emulator(path, *, wavelength=None, label_names=None, wavelength_medium="vacuum", trust_pickle=False):
    """Read an emulator file, detecting its layout.

    Parameters
    ----------
    path : str or Path
        A paynekit npz, an upstream Payne npz (MLP or per-pixel), a Cannon model, or (with
        ``trust_pickle=True``) an SDSS Astra pickle.
    wavelength : array, optional
        Pixel wavelengths for upstream files that do not store them.
    label_names : sequence of str, optional
        Names for upstream files that do not store them (default ``label_0``, ``label_1``, ...).
    wavelength_medium : {"vacuum", "air"}
        Medium of a ``wavelength`` you pass (files that say so override it).
    trust_pickle : bool
        Unpickle an Astra model. Unpickling executes code from the file: only for files you trust.
    """
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise FileFormatError(f"{path}: the file is empty; expected an emulator (npz or Astra pickle)")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head.startswith(b"PK"):
        if head[:1] in _PICKLE_MAGIC or path.suffix in (".pkl", ".pickle"):
            if not trust_pickle:
                raise FileFormatError(
                    f"{path}: this is a Python pickle. Unpickling runs code from the file, so paynekit does it "
                    "only when you trust the file: load_emulator(path, trust_pickle=True) or "
                    "`--trust-pickle` on the command line"
                )
            return _load_astra_pickle(path, wavelength, label_names, wavelength_medium)
        raise FileFormatError(f"{path}: not an npz archive (starts with {head!r}); expected an emulator npz "
                              "(paynekit or The Payne) or a trusted Astra pickle")
    try:
        data = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise FileFormatError(f"{path}: unreadable npz archive ({exc})") from None
    with data:
        files = set(data.files)
        try:
            if "paynekit_format" in files:
                found = str(data["paynekit_format"])
                if found == FORMAT_NAME:
                    return _load_own(path, data)
                raise FileFormatError(f"{path}: paynekit file of type {found!r}, not an emulator")
            if "w_array_0" in files:
                ndim = data["w_array_0"].ndim
                if ndim == 3:
                    return _load_upstream_perpixel(path, data, wavelength, label_names, wavelength_medium)
                if ndim == 2:
                    return _load_upstream_mlp(path, data, wavelength, label_names, wavelength_medium)
            if {"theta", "s2", "vectorizer_terms_json"} <= files and "cannon" in _EMULATOR_CLASSES:
                return _EMULATOR_CLASSES["cannon"].from_thecannon_npz(path, data)
        except KeyError as exc:
            raise FileFormatError(f"{path}: missing array {exc} for the layout it resembles") from None
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise FileFormatError(f"{path}: npz holds pickled objects, which paynekit never loads") from None
            raise
    raise FileFormatError(
        f"{path}: unknown emulator layout; found arrays {sorted(files)}. Expected a paynekit file "
        f"(paynekit_format, format_version {SUPPORTED_VERSIONS}), The Payne's MLP npz (w_array_0..K, "
        "b_array_0..K, x_min, x_max), the per-pixel npz (w_array_0 of shape (P, H, L), w_array_1, b_array_0, "
        "b_array_1, x_min, x_max) or a Cannon model"
    )
