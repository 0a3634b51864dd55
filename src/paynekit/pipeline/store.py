"""The run folder: an append-only store of part files, a manifest, and the merge into one catalog.

Layout of ``out_dir``::

    manifest.json                   what the run is (fingerprint of emulator, FitConfig, inputs, chunking)
                                    and which chunks are complete; the single commit point
    inputs.json                     the inputs in order (path, size, mtime or content hash, rows)
    parts/part-<run>-<chunk>.parquet   one row per input spectrum of that chunk (catalog schema +
                                    source, source_row, chunk_row)
    models/part-<run>-<chunk>.h5    best-fit model_flux and continuum (n, P), wavelength, id
    .lock                           held (flock) by the process that writes the manifest

Every file is written atomically: to a temporary name in the same folder, flushed and fsynced, then
renamed over the final name (and the folder fsynced). A chunk counts as done only once the manifest
lists it, and the manifest is written only after the chunk's files are in place, so a run killed at any
moment leaves either a complete chunk that the manifest lists, or files that a resumed run overwrites.
Only the parent process writes the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INPUTS = "inputs.json"
PARTS = "parts"
MODELS = "models"
LOCK = ".lock"
#: Transient file that hands the run context to local worker processes.
CONTEXT_PREFIX = ".context-"
STORE_FORMAT = "paynekit-pipeline-run"
STORE_VERSION = 1
#: Columns the pipeline adds to the catalog schema of :mod:`paynekit.catalog`.
PIPELINE_COLUMNS = {
    "input_index": ("int64", "row number of the spectrum in the inputs, in input order (0-based)"),
    "source": ("str", "input file the spectrum came from ('<memory>' for arrays passed in Python)"),
    "source_row": ("int64", "row of the spectrum within its input file"),
}
_INTERNAL_COLUMNS = ("chunk_row",)


class ResumeMismatchError(InputError):
    """The output folder holds a run with another emulator, FitConfig, inputs or chunking."""


# ------------------------------------------------------------------------------------------------
# atomic files
# ------------------------------------------------------------------------------------------------
def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)``, fsync the file, rename it to ``path``, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def part_name(run_id: str, chunk_id: int) -> str:
    return f"part-{run_id}-{chunk_id:07d}"


# ------------------------------------------------------------------------------------------------
# the manifest
# ------------------------------------------------------------------------------------------------
def _ranges(ids) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


class Manifest:
    """The run's description and its completed chunks (as ranges), rewritten atomically per chunk."""

    def __init__(self, out_dir: Path, data: dict):
        self.out_dir = Path(out_dir)
        self.data = data
        self.completed = {i for a, b in data.get("completed", []) for i in range(a, b)}

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def n_chunks(self) -> int:
        return int(self.data["n_chunks"])

    @classmethod
    def read(cls, out_dir) -> Manifest:
        out_dir = Path(out_dir)
        path = out_dir / MANIFEST
        if not path.exists():
            raise InputError(f"{out_dir}: no pipeline run here (no {MANIFEST})")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise FileFormatError(f"{path}: not a readable manifest ({exc})") from None
        if data.get("format") != STORE_FORMAT:
            raise FileFormatError(f"{path}: not a paynekit pipeline manifest")
        if data.get("version") != STORE_VERSION:
            raise FileFormatError(f"{path}: manifest version {data.get('version')} is not supported "
                                  f"(this paynekit reads version {STORE_VERSION})")
        return cls(out_dir, data)

    def write(self) -> None:
        self.data["completed"] = _ranges(self.completed)
        write_json(self.path, self.data)

    def mark_done(self, chunk_id: int, n_rows: int, n_bad: int, seconds: float = 0.0, fit_seconds: float = 0.0):
        """Record a finished chunk (its files are in place) and rewrite the manifest."""
        if chunk_id in self.completed:
            return
        self.completed.add(chunk_id)
        self.data["n_rows_done"] = int(self.data.get("n_rows_done", 0)) + int(n_rows)
        self.data["n_bad_done"] = int(self.data.get("n_bad_done", 0)) + int(n_bad)
        # worker time, summed over chunks: all of it, and the part inside fit() (the rest is I/O and bookkeeping)
        self.data["chunk_seconds"] = float(self.data.get("chunk_seconds", 0.0)) + float(seconds)
        self.data["fit_seconds"] = float(self.data.get("fit_seconds", 0.0)) + float(fit_seconds)
        self.write()

    def is_complete(self) -> bool:
        return len(self.completed) == self.n_chunks

    def part_path(self, chunk_id: int) -> Path:
        return self.out_dir / PARTS / f"{part_name(self.run_id, chunk_id)}.parquet"

    def model_path(self, chunk_id: int) -> Path:
        return self.out_dir / MODELS / f"{part_name(self.run_id, chunk_id)}.h5"


def mismatches(old: dict, new: dict) -> list[str]:
    """Which parts of two run fingerprints differ (names, for the error message)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(key)
    return out


# ------------------------------------------------------------------------------------------------
# part files
# ------------------------------------------------------------------------------------------------
def _require_pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError("the survey pipeline stores Parquet part files and needs pyarrow: "
                         "pip install 'paynekit[parquet]'") from None
    return pa, pq


def arrow_from_table(table, meta: dict):
    """An astropy result table as a pyarrow Table, keeping units and descriptions as field metadata
    (the layout :func:`paynekit.catalog.read_catalog` reads)."""
    pa, _ = _require_pyarrow()
    fields, arrays = [], []
    for name in table.colnames:
        col = table[name]
        fmeta = {"unit": col.unit.to_string() if col.unit is not None else "",
                 "description": col.info.description or ""}
        data = np.asarray(col)
        arr = pa.array(data.tolist() if data.dtype.kind in "UO" else data,
                       type=pa.string() if data.dtype.kind in "UO" else None)
        fields.append(pa.field(name, arr.type, metadata={k: v.encode() for k, v in fmeta.items()}))
        arrays.append(arr)
    tmeta = {"paynekit_meta": json.dumps({k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))})}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=tmeta))


def write_part(path: Path, table, meta: dict) -> None:
    _, pq = _require_pyarrow()
    patable = arrow_from_table(table, meta)
    atomic_write(path, lambda tmp: pq.write_table(patable, tmp))


def write_models(path: Path, wavelength, model_flux, continuum, ids, dtype: str, meta: dict) -> None:
    import h5py

    def write(tmp):
        n, p = model_flux.shape
        chunks = (1, p) if n > 0 else None
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("wavelength", data=np.asarray(wavelength, dtype=np.float64))
            fh.create_dataset("model_flux", data=model_flux.astype(dtype), chunks=chunks)
            fh.create_dataset("continuum", data=continuum.astype(dtype), chunks=chunks)
            fh.create_dataset("id", data=np.array([str(i).encode() for i in ids], dtype=object),
                              dtype=h5py.string_dtype())
            for k, v in meta.items():
                fh.attrs[k] = v

    atomic_write(path, write)


def read_part(path: Path):
    _, pq = _require_pyarrow()
    try:
        return pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"{path}: not a readable part file ({exc})") from None


def _part_meta(patable) -> dict:
    raw = (patable.schema.metadata or {}).get(b"paynekit_meta")
    return json.loads(raw.decode()) if raw else {}


def _checked_parts(out_dir, allow_partial: bool):
    """The manifest and, in chunk order, (chunk id, part path) of every completed chunk."""
    manifest = Manifest.read(out_dir)
    missing = sorted(set(range(manifest.n_chunks)) - manifest.completed)
    if missing and not allow_partial:
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise InputError(f"{out_dir}: the run is not complete: {len(missing)} of {manifest.n_chunks} chunks "
                         f"are not done ({shown}); run it again (it resumes) or pass allow_partial=True")
    parts = []
    for cid in sorted(manifest.completed):
        path = manifest.part_path(cid)
        if not path.exists():
            raise FileFormatError(f"{path}: listed as done in the manifest but missing; run the pipeline again "
                                  "into this folder to refit it")
        parts.append((cid, path))
    return manifest, parts


def _catalog_table(patable, offset: int, run_id: str, path: Path):
    """A part as the rows of the merged catalog: input_index added, internal columns dropped."""
    pa, _ = _require_pyarrow()
    meta = _part_meta(patable)
    if meta.get("RUNID") != run_id:
        raise FileFormatError(f"{path}: written by another run ({meta.get('RUNID')}, manifest says {run_id})")
    n = patable.num_rows
    idx = pa.array(np.arange(offset, offset + n, dtype=np.int64))
    desc = PIPELINE_COLUMNS["input_index"][1]
    field = pa.field("input_index", pa.int64(), metadata={b"unit": b"", b"description": desc.encode()})
    pos = patable.schema.get_field_index("source")
    out = patable.add_column(pos if pos >= 0 else patable.num_columns, field, idx)
    for name in _INTERNAL_COLUMNS:
        if name in out.column_names:
            out = out.drop_columns([name])
    meta.pop("CHUNK", None)
    return out.replace_schema_metadata({b"paynekit_meta": json.dumps(meta).encode()})


def merge(out_dir, output, *, overwrite: bool = False, allow_partial: bool = False) -> Path:
    """Merge a run's part files into one catalog (``.fits`` or ``.parquet``), in input order.

    Rows are those of every input spectrum, each once, with ``input_index`` (0..N-1), ``source`` and
    ``source_row`` beside the catalog columns of :mod:`paynekit.catalog`. Memory stays bounded by one
    part file: Parquet is written row group by row group, FITS as one binary table streamed part by part.
    The file is written atomically. Returns its path.
    """
    from ..catalog import _kind

    out_dir = Path(out_dir)
    output = Path(output)
    kind = _kind(output)
    if output.exists() and not overwrite:
        raise InputError(f"{output} exists; pass overwrite=True (or --overwrite) to replace it")
    manifest, parts = _checked_parts(out_dir, allow_partial)
    output.parent.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        atomic_write(output, lambda tmp: _merge_parquet(parts, manifest.run_id, tmp))
    else:
        atomic_write(output, lambda tmp: _merge_fits(parts, manifest.run_id, tmp))
    log.info("merged %d part files of %s into %s", len(parts), out_dir, output)
    return output


def _iter_catalog_parts(parts, run_id):
    offset = 0
    for _, path in parts:
        t = _catalog_table(read_part(path), offset, run_id, path)
        offset += t.num_rows
        yield t


def _merge_parquet(parts, run_id, tmp):
    _, pq = _require_pyarrow()
    writer = None
    try:
        for t in _iter_catalog_parts(parts, run_id):
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema)
            elif not t.schema.equals(writer.schema, check_metadata=False):
                raise FileFormatError("part files of this run have different columns; cannot merge them")
            writer.write_table(t)
        if writer is None:
            raise InputError("the run has no completed chunk to merge")
    finally:
        if writer is not None:
            writer.close()


def _astropy_from_arrow(patable, widths: dict):
    from astropy.table import Column, Table

    t = Table()
    for field in patable.schema:
        meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
        data = patable.column(field.name).to_numpy(zero_copy_only=False)
        if field.name in widths:
            data = np.array([str(v) for v in data], dtype=f"<U{widths[field.name]}")
        t[field.name] = Column(data, unit=meta.get("unit") or None, description=meta.get("description") or None)
    raw = (patable.schema.metadata or {}).get(b"paynekit_meta")
    if raw:
        t.meta.update(json.loads(raw.decode()))
    return t


def _fits_unit_ok(unit) -> bool:
    try:
        unit.to_string(format="fits")
        return True
    except (ValueError, TypeError):
        return False


def _merge_fits(parts, run_id, tmp):
    """One FITS binary table, written part by part (FITS rows are fixed-width records, so the header can
    be written first with the total row count and every string column at its widest value)."""
    import io

    import pyarrow.compute as pc
    from astropy.io import fits

    widths: dict[str, int] = {}
    total = 0
    for t in _iter_catalog_parts(parts, run_id):
        total += t.num_rows
        for field in t.schema:
            if str(field.type) == "string":
                lengths = pc.utf8_length(t.column(field.name))
                longest = pc.max(lengths).as_py() if t.num_rows else 0
                widths[field.name] = max(widths.get(field.name, 1), int(longest or 0), 1)
    if not parts:
        raise InputError("the run has no completed chunk to merge")

    def hdu_of(patable):
        table = _astropy_from_arrow(patable, widths)
        dropped = {}
        for name in table.colnames:
            if table[name].unit is not None and not _fits_unit_ok(table[name].unit):
                dropped[name] = table[name].unit.to_string()
                table[name].unit = None
        if dropped:
            table.meta["PKUNITS"] = json.dumps(dropped)
        return fits.table_to_hdu(table)

    with open(tmp, "wb") as fh:
        fh.write(fits.PrimaryHDU().header.tostring().encode("ascii"))
        header = None
        written = 0
        for t in _iter_catalog_parts(parts, run_id):
            hdu = hdu_of(t)
            if header is None:
                header = hdu.header.copy()
                header["NAXIS2"] = total
                fh.write(header.tostring().encode("ascii"))
            elif any(hdu.header.get(k) != header.get(k) for k in hdu.header if k.startswith(("TFORM", "TTYPE"))) \
                    or hdu.header["NAXIS1"] != header["NAXIS1"]:
                raise FileFormatError("part files of this run have different columns; cannot merge them")
            buf = io.BytesIO()
            hdu.writeto(buf)  # a primary HDU, this header, then the data (big-endian rows), padded
            raw = buf.getvalue()
            n_bytes = hdu.header["NAXIS1"] * hdu.header["NAXIS2"]
            padded = -(-n_bytes // 2880) * 2880
            fh.write(raw[len(raw) - padded:len(raw) - padded + n_bytes])
            written += n_bytes
        pad = (-written) % 2880
        fh.write(b"\x00" * pad)


# ------------------------------------------------------------------------------------------------
# model spectra by id
# ------------------------------------------------------------------------------------------------
@dataclass
class ModelSpectra:
    """Best-fit spectra of some catalog rows: ``model_flux`` and ``continuum`` (n, P) on ``wavelength``.

    ``model_flux`` includes the continuum (divide by ``continuum`` for the normalised model); NaN for
    rows that were not fitted and pixels the model does not cover. ``sources`` and ``source_rows`` say
    where each spectrum came from; :meth:`data_for` reads the observed spectrum as it was fitted.
    """

    ids: list
    input_index: np.ndarray
    wavelength: np.ndarray
    model_flux: np.ndarray
    continuum: np.ndarray
    sources: list = dc_field(default_factory=list)
    source_rows: list = dc_field(default_factory=list)
    reading: dict = dc_field(default_factory=dict, repr=False)

    def data_for(self, i: int):
        """(wavelength, flux, ivar, mask) of the observed spectrum ``i``, on the grid it was fitted on.

        Bundle rows are read from the bundle; survey files are read again and resampled onto the model
        grid as the run did. Spectra passed in memory are not kept by the run: an InputError says so.
        """
        from .sources import MEMORY_SOURCE, bundle_shape, read_bundle_rows

        src, row = self.sources[i], int(self.source_rows[i])
        if src == MEMORY_SOURCE:
            raise InputError(f"spectrum {self.ids[i]!r} was passed to the run in memory; the run folder does not "
                             "keep input data")
        path = Path(src)
        if not path.exists():
            raise InputError(f"{src}: the input of spectrum {self.ids[i]!r} no longer exists")
        shape = bundle_shape(path)
        if shape is not None:
            b = read_bundle_rows(src, shape[0], row, row + 1)
            return b.wavelength, b.flux[0], b.ivar[0], b.mask[0]
        from ..io import iter_spectra

        r = self.reading
        items = list(iter_spectra([src], format=r.get("format"), visits=r.get("visits", False),
                                  options=r.get("reader_options") or {}, resample_to=self.wavelength,
                                  resample_medium=r.get("wavelength_medium", "vacuum"),
                                  resample_method=r.get("resample_method", "linear")))
        if row >= len(items) or not hasattr(items[row], "flux"):
            reason = getattr(items[row], "reason", "") if row < len(items) else "fewer spectra than when fitted"
            raise InputError(f"{src}: cannot read spectrum {self.ids[i]!r} again ({reason})")
        s = items[row]
        return s.wavelength, s.flux, s.ivar, s.mask


def load_model_spectra(out_dir, ids=None, *, input_index=None) -> ModelSpectra:
    """Best-fit model spectra of the given source ids (or ``input_index`` values), read lazily.

    Only the requested rows are read from the HDF5 sidecar files (the id lookup reads the ``id`` column
    of the part files). An id that matches no row, or several rows (the same star in two input files),
    is an :class:`InputError`; ask by ``input_index`` (a column of the merged catalog) then. Lookups by
    id also work while a run is incomplete (``input_index`` is then -1: rows before may be missing).
    """
    import h5py

    out_dir = Path(out_dir)
    if (ids is None) == (input_index is None):
        raise InputError("give either ids or input_index")
    manifest, parts = _checked_parts(out_dir, allow_partial=True)
    if not manifest.data.get("save_models", True):
        raise InputError(f"{out_dir}: this run was made with save_models=False; no model spectra were kept")
    by_id = ids is not None
    keys = ([str(ids)] if isinstance(ids, str) else [str(i) for i in ids]) if by_id \
        else [int(i) for i in np.atleast_1d(input_index)]
    complete = manifest.completed == set(range(len(manifest.completed)))
    if not by_id and not complete:
        raise InputError(f"{out_dir}: lookups by input_index need every earlier chunk done; the run is incomplete")
    wanted = set(keys)
    found: dict = {}
    offset = 0
    for cid, path in parts:
        patable = read_part(path).select(["id", "chunk_row", "source", "source_row"])
        chunk_ids = patable.column("id").to_pylist()
        rows = patable.column("chunk_row").to_numpy()
        for k, (sid, r) in enumerate(zip(chunk_ids, rows)):
            key = sid if by_id else offset + k
            if key in wanted:
                found.setdefault(key, []).append((cid, int(r), offset + k if complete else -1, sid,
                                                  patable.column("source")[k].as_py(),
                                                  patable.column("source_row")[k].as_py()))
        offset += len(chunk_ids)
    picks = []
    for key in keys:
        hits = found.get(key, [])
        if not hits:
            raise InputError(f"{out_dir}: no fitted spectrum with {'id' if by_id else 'input_index'} {key!r}")
        if len(hits) > 1:
            raise InputError(f"{out_dir}: id {key!r} matches {len(hits)} spectra (input_index "
                             f"{[h[2] for h in hits]}); ask by input_index instead")
        picks.append(hits[0])
    wl = None
    flux_rows, cont_rows = [], []
    handles = {}
    try:
        for cid, row, *_ in picks:
            if cid not in handles:
                handles[cid] = h5py.File(manifest.model_path(cid), "r")
            fh = handles[cid]
            w = fh["wavelength"][()]
            if wl is None:
                wl = w
            elif w.shape != wl.shape or not np.array_equal(w, wl):
                raise InputError("the requested spectra were fitted on different wavelength grids; load them "
                                 "in separate calls")
            flux_rows.append(fh["model_flux"][row])
            cont_rows.append(fh["continuum"][row])
    except OSError as exc:
        raise FileFormatError(f"{out_dir}: cannot read model spectra ({exc})") from None
    finally:
        for fh in handles.values():
            fh.close()
    p = 0 if wl is None else wl.size
    pcfg = manifest.data.get("pipeline_config", {})
    reading = {k: pcfg.get(k) for k in ("format", "visits", "reader_options", "resample_method")}
    reading["wavelength_medium"] = manifest.data.get("emulator", {}).get("wavelength_medium", "vacuum")
    return ModelSpectra([h[3] for h in picks], np.array([h[2] for h in picks], dtype=np.int64),
                        wl if wl is not None else np.empty(0),
                        np.array(flux_rows).reshape(len(picks), p), np.array(cont_rows).reshape(len(picks), p),
                        [h[4] for h in picks], [h[5] for h in picks], reading)
