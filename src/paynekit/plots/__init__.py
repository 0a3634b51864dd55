"""Figures of fits, catalogs, comparisons with reference labels, and emulators (needs matplotlib).

Every function takes arrays or tables, returns a :class:`matplotlib.figure.Figure` and saves it when
given ``path=``. Figures are built without ``pyplot`` (nothing is shown, no backend is selected, PNGs
are rendered by Agg) and styled inside ``matplotlib.rc_context``: global rcParams are never changed.
matplotlib is imported only when a figure is drawn.

* a fit: :func:`plot_fit`
* a catalog: :func:`plot_kiel`, :func:`plot_label_histograms`, :func:`plot_abundance_trends`,
  :func:`plot_fit_quality`, :func:`plot_flags_summary`
* against reference labels: :func:`plot_compare` (statistics: :func:`compare_labels`)
* an emulator: :func:`plot_gradient_spectra`, :func:`plot_emulation_error`, :func:`plot_training_curves`

The HTML report that gathers them is :func:`paynekit.report.write_report`.
"""

from ._common import abundance_columns, label_columns, label_tex, label_text
from .catalog import (
    flag_counts,
    plot_abundance_trends,
    plot_fit_quality,
    plot_flags_summary,
    plot_kiel,
    plot_label_histograms,
    reason_category,
    running_median,
)
from .compare import LabelComparison, compare_labels, match_ids, plot_compare
from .emulator import (
    TYPICAL_STEPS,
    gradient_spectra,
    plot_emulation_error,
    plot_gradient_spectra,
    plot_training_curves,
    reference_vector,
    typical_step,
)
from .fit import DEFAULT_ZOOM_WIDTH, fit_residuals, plot_fit

__all__ = [
    "DEFAULT_ZOOM_WIDTH",
    "TYPICAL_STEPS",
    "LabelComparison",
    "abundance_columns",
    "compare_labels",
    "fit_residuals",
    "flag_counts",
    "gradient_spectra",
    "label_columns",
    "label_tex",
    "label_text",
    "match_ids",
    "plot_abundance_trends",
    "plot_compare",
    "plot_emulation_error",
    "plot_fit",
    "plot_fit_quality",
    "plot_flags_summary",
    "plot_gradient_spectra",
    "plot_kiel",
    "plot_label_histograms",
    "plot_training_curves",
    "reason_category",
    "reference_vector",
    "running_median",
    "typical_step",
]  # fmt: skip
