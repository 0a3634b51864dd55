"""Fit whole surveys: chunks streamed from the inputs, a resumable append-only store, local processes,
a Dask cluster or a GPU, and a merge into one catalog.

>>> from paynekit.fitting import FitConfig
>>> from paynekit.pipeline import PipelineConfig, run_pipeline, merge, load_model_spectra
>>> summary = run_pipeline("model.npz", ["spectra.h5"], "run/", config=FitConfig(),
...                        pipeline_config=PipelineConfig(workers=2, chunk_size=512))
>>> merge("run/", "catalog.fits")
>>> spectra = load_model_spectra("run/", ["2M00000002+7417074"])

A run killed at any moment (SIGKILL included) and started again with the same arguments continues
where it stopped and ends with exactly the catalog of an uninterrupted run. Modules: ``config``
(PipelineConfig), ``sources`` (inputs, chunk plan, streaming readers), ``worker`` (one chunk), ``store``
(manifest, part files, merge, model spectra), ``runner`` (run_pipeline and the executors).
"""

from .config import PipelineConfig
from .runner import DaskExecutor, InProcessExecutor, PipelineSummary, ProcessExecutor, run_pipeline
from .store import ModelSpectra, ResumeMismatchError, load_model_spectra, merge

__all__ = [
    "DaskExecutor",
    "InProcessExecutor",
    "ModelSpectra",
    "PipelineConfig",
    "PipelineSummary",
    "ProcessExecutor",
    "ResumeMismatchError",
    "load_model_spectra",
    "merge",
    "run_pipeline",
]
