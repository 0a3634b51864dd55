"""The result catalog: column names, units, dtypes and descriptions in one place, and its writers.

One row per input spectrum, in input order; a spectrum that could not be fitted is a row with NaN labels,
``flag_bad`` True and a ``flag_reason``. Columns (``L`` = the emulator's labels, in its order):

==========================  =========  ==========================================================
``id``                      str        spectrum identifier
``<label>``                 label unit best-fit value (the frozen value for a frozen label)
``e_<label>``               label unit error after the noise model (``raw_e`` if none)
``raw_e_<label>``           label unit formal error, sqrt of the covariance diagonal (NaN if frozen)
``zeta_e_<label>``          label unit Zeta-Payne chi2-parabola error (only with parabola_uncertainty)
``rho_<a>_<b>``                        formal correlation of labels a and b (a before b in label order)
``v_rel``, ``e_v_rel``      km/s       radial velocity (classical, lambda_obs = lambda_rest (1 + v/c))
``chi2``, ``reduced_chi2``             chi2 over used pixels; reduced: / (n_pixels - free parameters)
``n_pixels``                           pixels used in the fit
``snr``                                median flux * sqrt(ivar) over usable pixels
``n_iterations``                       model evaluations (batched) or function evaluations (scipy)
``presearch_<label>``,      ...        the pre-search start (best Sobol point, its velocity and chi2)
``presearch_v_rel``, ``presearch_chi2``
``result_flags``            int64      bits of :class:`paynekit.flags.ResultFlag`
``flag_warn``, ``flag_bad`` bool       any bit set; failure or bad input
``flag_reason``             str        why the row is flagged, in words
==========================  =========  ==========================================================

Best-fit model spectra are not in the table (they are large): ``fit(..., return_models=True)`` returns
them beside it (:class:`paynekit.fitting.FitResult`).

Files: FITS (``.fits``, ``.fits.gz``) through astropy, Parquet (``.parquet``) through pyarrow (the
``[parquet]`` extra). Units that FITS cannot store (``dex``) are kept in the header (``PKUNITS``) and
restored by :func:`read_catalog`. Writes are atomic (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Column as AstropyColumn
from astropy.table import Table

from .errors import FileFormatError, InputError

log = logging.getLogger(__name__)

CATALOG_FORMAT_VERSION = 1
_FITS_SUFFIXES = (".fits", ".fit", ".fits.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    dtype: str
    unit: str
    description: str


def rho_name(a: str, b: str) -> str:
    return f"rho_{a}_{b}"


def label_pairs(label_names) -> list[tuple[str, str]]:
    names = list(label_names)
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]


def result_columns(
    label_names, label_units=None, *, parabola: bool = False, presearch: bool = True
) -> list[ColumnSpec]:
    """The catalog schema for an emulator with these labels."""
    names = list(label_names)
    units = list(label_units) if label_units is not None else [""] * len(names)
    if len(units) != len(names):
        raise InputError(f"label_units has {len(units)} entries but there are {len(names)} labels")
    cols = [ColumnSpec("id", "str", "", "spectrum identifier")]
    for n, u in zip(names, units):
        cols.append(ColumnSpec(n, "float64", u, f"best-fit {n}"))
    for n, u in zip(names, units):
        cols.append(ColumnSpec(f"e_{n}", "float64", u, f"error of {n} after the noise model"))
    for n, u in zip(names, units):
        cols.append(ColumnSpec(f"raw_e_{n}", "float64", u, f"formal error of {n} (covariance diagonal)"))
    if parabola:
        for n, u in zip(names, units):
            cols.append(ColumnSpec(f"zeta_e_{n}", "float64", u, f"Zeta-Payne chi2-parabola error of {n}"))
    for a, b in label_pairs(names):
        cols.append(ColumnSpec(rho_name(a, b), "float64", "", f"formal correlation of {a} and {b}"))
    cols += [
        ColumnSpec("v_rel", "float64", "km/s", "radial velocity, lambda_obs = lambda_rest (1 + v/c)"),
        ColumnSpec("e_v_rel", "float64", "km/s", "formal error of v_rel"),
        ColumnSpec("chi2", "float64", "", "chi2 over the pixels used"),
        ColumnSpec("reduced_chi2", "float64", "", "chi2 / (n_pixels - number of free parameters)"),
        ColumnSpec("n_pixels", "int32", "", "pixels used in the fit"),
        ColumnSpec("snr", "float64", "", "median flux * sqrt(ivar) over usable pixels"),
        ColumnSpec("n_iterations", "int32", "", "model (batched) or function (scipy) evaluations"),
    ]
    if presearch:
        for n, u in zip(names, units):
            cols.append(ColumnSpec(f"presearch_{n}", "float64", u, f"{n} of the pre-search start"))
        cols.append(ColumnSpec("presearch_v_rel", "float64", "km/s", "radial velocity of the pre-search"))
        cols.append(ColumnSpec("presearch_chi2", "float64", "", "chi2 of the pre-search start"))
    cols += [
        ColumnSpec("result_flags", "int64", "", "bits of paynekit.flags.ResultFlag"),
        ColumnSpec("flag_warn", "bool", "", "any flag bit set"),
        ColumnSpec("flag_bad", "bool", "", "fitting failure or bad input: do not use"),
        ColumnSpec("flag_reason", "str", "", "why the row is flagged"),
    ]
    return cols


def empty_result_table(label_names, label_units, n_rows: int, *, parabola=False, presearch=True) -> Table:
    """A result table of ``n_rows`` with NaN floats, zero ints, False bools and empty strings."""
    t = Table()
    for spec in result_columns(label_names, label_units, parabola=parabola, presearch=presearch):
        if spec.dtype == "float64":
            data = np.full(n_rows, np.nan)
        elif spec.dtype == "bool":
            data = np.zeros(n_rows, dtype=bool)
        elif spec.dtype == "str":
            data = np.array([""] * n_rows, dtype=object)
        else:
            data = np.zeros(n_rows, dtype=spec.dtype)
        t[spec.name] = AstropyColumn(data, unit=spec.unit or None, description=spec.description)
    t.meta["CATVERS"] = CATALOG_FORMAT_VERSION
    t.meta["LABELS"] = json.dumps(list(label_names))
    return t


def finalize_strings(table: Table) -> Table:
    """Turn object string columns into fixed-width unicode (as files store them)."""
    for name in table.colnames:
        col = table[name]
        if col.dtype == object:
            vals = [str(v) for v in col]
            width = max([len(v) for v in vals] + [1])
            table.replace_column(
                name,
                AstropyColumn(
                    np.array(vals, dtype=f"<U{width}"), unit=col.unit, description=col.info.description
                ),
            )
    return table


# ------------------------------------------------------------------------------------------------
# writers and reader
# ------------------------------------------------------------------------------------------------
def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_FITS_SUFFIXES):
        return "fits"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    raise InputError(f"{path}: catalog files must end in {_FITS_SUFFIXES + _PARQUET_SUFFIXES}")


def _atomic(path: Path, write):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fits_unit_ok(unit) -> bool:
    if unit is None:
        return True
    try:
        unit.to_string(format="fits")
        return True
    except (ValueError, TypeError):
        return False


def write_catalog(table: Table, path, *, overwrite: bool = False) -> Path:
    """Write a result table to ``.fits`` or ``.parquet``, atomically. Returns the path."""
    path = Path(path)
    kind = _kind(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it")
    out = finalize_strings(Table(table, copy=True))
    if kind == "fits":
        dropped = {}
        for name in out.colnames:
            if not _fits_unit_ok(out[name].unit):
                dropped[name] = out[name].unit.to_string()
                out[name].unit = None
        if dropped:
            out.meta["PKUNITS"] = json.dumps(dropped)
        _atomic(path, lambda tmp: out.write(tmp, format="fits", overwrite=True))
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - depends on the environment
            raise InputError("writing Parquet needs pyarrow: pip install 'paynekit[parquet]'") from None
        fields, arrays = [], []
        for name in out.colnames:
            col = out[name]
            meta = {
                "unit": col.unit.to_string() if col.unit is not None else "",
                "description": col.info.description or "",
            }
            arr = pa.array(np.asarray(col).tolist() if col.dtype.kind == "U" else np.asarray(col))
            fields.append(pa.field(name, arr.type, metadata={k: v.encode() for k, v in meta.items()}))
            arrays.append(arr)
        tmeta = {
            "paynekit_meta": json.dumps(
                {k: v for k, v in out.meta.items() if isinstance(v, (str, int, float, bool))}
            )
        }
        patable = pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=tmeta))
        _atomic(path, lambda tmp: pq.write_table(patable, tmp))
    log.info("wrote %d rows to %s", len(out), path)
    return path


def read_catalog(path) -> Table:
    """Read a catalog written by :func:`write_catalog` (units and empty strings restored)."""
    path = Path(path)
    kind = _kind(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such catalog")
    if kind == "fits":
        try:
            # mask_invalid=False: NaN stays NaN and "" stays "" (not masked values)
            t = Table.read(path, format="fits", character_as_bytes=False, mask_invalid=False)
        except (OSError, ValueError) as exc:
            raise FileFormatError(f"{path}: not a readable FITS table ({exc})") from None
        units = json.loads(t.meta.pop("PKUNITS", "{}"))
        for name, unit in units.items():
            if name in t.colnames:
                t[name].unit = unit
        return t
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover
        raise InputError("reading Parquet needs pyarrow: pip install 'paynekit[parquet]'") from None
    try:
        pat = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"{path}: not a readable Parquet file ({exc})") from None
    t = Table()
    for field in pat.schema:
        meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
        data = pat.column(field.name).to_numpy(zero_copy_only=False)
        if data.dtype == object:
            data = np.array([str(v) for v in data])
        t[field.name] = AstropyColumn(
            data, unit=meta.get("unit") or None, description=meta.get("description") or None
        )
    raw = (pat.schema.metadata or {}).get(b"paynekit_meta")
    if raw:
        t.meta.update(json.loads(raw.decode()))
    return t
