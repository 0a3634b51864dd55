"""Figures of paynekit.plots from small seeded synthetic inputs (Agg, no pyplot).

Each test renders a figure to PNG, checks that the file is a real, non-blank image, and checks the
science the figure shows: residuals are (flux - model) * sqrt(ivar), the Kiel diagram runs the
astronomers' way, [X/Fe] = [X/H] - [Fe/H], the comparison recovers an injected bias and scatter, and
gradient spectra equal finite differences of the emulator times the label step.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import itertools

from astropy.table import Table
from PIL import Image

from paynekit import LabelSpace, PayneMLP, plots
from paynekit.errors import InputError
from paynekit.wavelength import payne_apogee_wavelength

SEED = 20240607


def assert_png_not_blank(path, min_bytes=8_000):
    """The file is a PNG of real content: big enough, many colours, not one flat colour."""
    assert path.is_file(), path
    assert path.stat().st_size > min_bytes, f"{path} is only {path.stat().st_size} bytes"
    with Image.open(path) as im:
        assert im.format == "PNG"
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[0] > 100 and rgb.shape[1] > 100
    assert rgb.std() > 5.0
    non_white = np.any(rgb < 250, axis=-1).mean()
    assert non_white > 0.01, f"{path}: only {non_white:.3%} of pixels are not white"
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    assert np.unique(packed).size > 20


def make_catalog(n=300, seed=SEED):
    """A catalog in paynekit's result schema: a red-giant branch with [Mg/Fe] falling with [Fe/H]."""
    rng = np.random.default_rng(seed)
    teff = rng.uniform(4000, 5400, n)
    logg = 2.5 + (teff - 4700) / 560 + rng.normal(0, 0.15, n)
    fe_h = rng.normal(-0.2, 0.3, n)
    mg_h = fe_h + 0.1 - 0.2 * fe_h + rng.normal(0, 0.03, n)
    al_h = fe_h + rng.normal(0, 0.08, n)
    bits = (rng.random(n) < 0.15).astype(np.int64) | ((rng.random(n) < 0.05).astype(np.int64) << 3)
    bits[0] |= np.int64(1) << 40
    bad = (bits >> 3 & 1).astype(bool)
    reason = np.array(["" for _ in range(n)], dtype="U40")
    reason[bits & 1 == 1] = "LOW_SNR"
    reason[bad] = np.char.add(reason[bad], ";NOT_CONVERGED")
    tab = Table({
        "id": [f"2M{i:08d}+{i % 97:07d}" for i in range(n)],
        "teff": teff, "e_teff": np.full(n, 25.0), "raw_e_teff": np.full(n, 5.0),
        "logg": logg, "e_logg": np.full(n, 0.04),
        "fe_h": fe_h, "e_fe_h": np.full(n, 0.02),
        "mg_h": mg_h, "e_mg_h": np.full(n, 0.03),
        "al_h": al_h, "e_al_h": np.full(n, 0.05),
        "rho_teff_logg": np.full(n, 0.6),
        "v_rel": rng.normal(0, 20, n), "e_v_rel": np.full(n, 0.1),
        "snr": rng.lognormal(4.0, 0.6, n), "chi2": rng.lognormal(8.8, 0.2, n),
        "reduced_chi2": rng.lognormal(0.1, 0.3, n),
        "result_flags": bits, "flag_warn": (bits & 1).astype(bool), "flag_bad": bad, "flag_reason": reason,
    })  # fmt: skip
    return tab


def make_emulator(seed=SEED, stride=10):
    """A small seeded Payne MLP on every ``stride``-th pixel of the APOGEE grid (4 labels)."""
    rng = np.random.default_rng(seed)
    wl = payne_apogee_wavelength()[::stride]
    space = LabelSpace(("teff", "logg", "fe_h", "mg_h"), np.array([3800.0, 0.5, -1.5, -1.5]),
                       np.array([5800.0, 4.5, 0.5, 0.7]))
    sizes = (4, 16, 16, wl.size)
    weights = [rng.normal(0, 1.0 / np.sqrt(a), (b, a)) for a, b in itertools.pairwise(sizes)]
    biases = [rng.normal(0, 0.1, b) for b in sizes[1:]]
    weights[-1] *= 0.05
    biases[-1] = 0.95 + 0.02 * rng.standard_normal(wl.size)
    return PayneMLP(weights, biases, space, wl, activation="sigmoid")


@pytest.fixture(scope="module")
def catalog():
    return make_catalog()


@pytest.fixture(scope="module")
def spectrum():
    rng = np.random.default_rng(SEED)
    wl = payne_apogee_wavelength()
    centres = rng.uniform(wl[0], wl[-1], 250)
    model = 1.0 - (0.4 * np.exp(-0.5 * ((wl[:, None] - centres[None]) / 0.35) ** 2)).sum(axis=1)
    ivar = np.full(wl.size, 80.0**2)
    ivar[50:60] = 0.0
    flux = model + rng.normal(0, 1 / 80.0, wl.size)
    flux[200] = np.nan
    mask = np.zeros(wl.size, dtype=bool)
    mask[1000:1030] = True
    mask[rng.choice(wl.size, 40, replace=False)] = True
    return wl, flux, ivar, model, mask


# -- a fit ----------------------------------------------------------------------------------------
def test_plot_fit_residuals_masks_and_zooms(spectrum, tmp_path):
    wl, flux, ivar, model, mask = spectrum
    copies = [a.copy() for a in spectrum]
    path = tmp_path / "fit.png"
    fig = plots.plot_fit(wl, flux, ivar, model, mask=mask, labels={"teff": 4812.4, "logg": (2.45, 0.03)},
                         flags="LOW_SNR", title="2M00000001", zoom_lines=[wl[3000], (wl[5000], "Fe I"), 12000.0],
                         path=path)
    assert_png_not_blank(path, 50_000)
    for a, b in zip(spectrum, copies):  # caller arrays untouched
        np.testing.assert_array_equal(a, b)
    # 3 chips x (flux, residual) + 2 zooms (the line at 12000 A is outside the spectrum) x 2
    assert len(fig.axes) == 3 * 2 + 2 * 2
    title = fig.get_suptitle()
    assert "Teff = 4812 K" in title and "log g = 2.45 ± 0.03" in title and "flags: LOW_SNR" in title
    chi, usable = plots.fit_residuals(flux, ivar, model, mask)
    assert not usable[55] and not usable[200] and not usable[1010]
    expected = (flux - model) * np.sqrt(ivar)
    np.testing.assert_allclose(chi[usable], expected[usable])
    assert np.all(np.isnan(chi[~usable]))
    assert f"over {usable.sum()} pixels" in title
    # the residual panel of the first chip draws exactly these values (NaN at unused pixels)
    sel = (wl >= 15100.0) & (wl <= 15793.0)
    ydata = np.asarray(fig.axes[1].lines[0].get_ydata(), dtype=float)
    drawn = ydata[np.isfinite(ydata)]
    np.testing.assert_allclose(drawn, chi[sel][np.isfinite(chi[sel])])
    # unused pixels of the first chip are shaded: one rectangle per run of unused pixels
    from paynekit.plots._common import true_runs

    shaded = [c for c in fig.axes[0].collections if c.get_label() == "masked / no data"]
    assert len(shaded) == 1 and len(shaded[0].get_paths()) == len(true_runs(~usable[sel]))


def test_plot_fit_whole_range_and_errors(tmp_path):
    rng = np.random.default_rng(SEED)
    wl = np.linspace(5000.0, 5100.0, 400)  # optical: no APOGEE chip overlaps, draws the whole range
    model = 1 - 0.5 * np.exp(-0.5 * ((wl - 5050) / 0.5) ** 2)
    flux = model + rng.normal(0, 0.01, wl.size)
    fig = plots.plot_fit(wl, flux, np.full(wl.size, 1e4), model, path=tmp_path / "f.png")
    assert len(fig.axes) == 2
    assert_png_not_blank(tmp_path / "f.png")
    fig = plots.plot_fit(wl, flux, np.full(wl.size, 1e4), model, regions=[(5000, 5040), (5040, 5100)])
    assert len(fig.axes) == 4
    with pytest.raises(InputError, match="ivar has shape"):
        plots.plot_fit(wl, flux, np.ones(3), model)
    with pytest.raises(InputError, match="mask has shape"):
        plots.plot_fit(wl, flux, np.ones(wl.size), model, mask=np.zeros(3, bool))
    with pytest.raises(InputError, match="regions"):
        plots.plot_fit(wl, flux, np.ones(wl.size), model, regions=[(5040, 5000)])
    with pytest.raises(InputError, match="does not exist"):
        plots.plot_fit(wl, flux, np.ones(wl.size), model, path=tmp_path / "nofolder" / "f.png")


# -- a catalog ------------------------------------------------------------------------------------
def test_kiel_axes_inverted_and_bad_stars_left_out(catalog, tmp_path):
    fig = plots.plot_kiel(catalog, path=tmp_path / "kiel.png")
    assert_png_not_blank(tmp_path / "kiel.png")
    ax = fig.axes[0]
    assert ax.xaxis_inverted() and ax.yaxis_inverted()  # Teff decreasing to the right, log g downwards
    offsets = ax.collections[0].get_offsets()
    good = ~np.asarray(catalog["flag_bad"])
    assert len(offsets) == good.sum()
    np.testing.assert_allclose(np.sort(offsets[:, 0]), np.sort(catalog["teff"][good]))
    np.testing.assert_allclose(ax.collections[0].get_array(), catalog["fe_h"][good])
    assert fig.axes[1].get_ylabel() == "[Fe/H]"  # the colour bar
    assert f"{(~good).sum()} flagged bad not shown" in ax.get_title()


def test_label_histograms_count_every_good_star(catalog, tmp_path):
    from matplotlib.patches import Rectangle

    fig = plots.plot_label_histograms(catalog, path=tmp_path / "h.png")
    assert_png_not_blank(tmp_path / "h.png")
    names = plots.label_columns(catalog)
    assert names == ["teff", "logg", "fe_h", "mg_h", "al_h", "v_rel"]  # e_/raw_e_/rho_ columns are not labels
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == len(names)
    good = ~np.asarray(catalog["flag_bad"])
    for ax, name in zip(visible, names):
        v = np.asarray(catalog[name])[good]
        bars = [p for p in ax.patches if isinstance(p, Rectangle)]  # the outline of bad stars is a Polygon
        lo, hi = bars[0].get_x(), bars[-1].get_x() + bars[-1].get_width()
        in_range = np.count_nonzero((v >= lo) & (v <= hi))
        filled = sum(p.get_height() for p in bars)
        assert filled == in_range and in_range >= 0.98 * good.sum()


def test_abundance_trends_are_x_over_fe(catalog, tmp_path):
    fig = plots.plot_abundance_trends(catalog, path=tmp_path / "a.png")
    assert_png_not_blank(tmp_path / "a.png")
    assert plots.abundance_columns(catalog) == ["mg_h", "al_h"]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in axes] == ["[Mg/Fe]", "[Al/Fe]"]
    good = ~np.asarray(catalog["flag_bad"])
    pts = axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(pts[:, 1], (catalog["mg_h"] - catalog["fe_h"])[good])
    # the running median follows the injected trend [Mg/Fe] = 0.1 - 0.2 [Fe/H] (scatter 0.03 dex)
    xc, ym = axes[0].lines[0].get_data()
    np.testing.assert_allclose(ym, 0.1 - 0.2 * np.asarray(xc), atol=0.04)
    with pytest.raises(InputError, match="no \\[X/H\\] columns"):
        plots.plot_abundance_trends(catalog[["id", "teff", "fe_h"]])


def test_fit_quality(catalog, tmp_path):
    fig = plots.plot_fit_quality(catalog, path=tmp_path / "q.png")
    assert_png_not_blank(tmp_path / "q.png")
    assert [ax.get_xlabel() for ax in fig.axes] == [r"reduced $\chi^2$", "S/N", "S/N"]
    assert fig.axes[0].get_xscale() == "log"
    fig = plots.plot_fit_quality(catalog[["snr"]])
    assert len(fig.axes) == 1
    with pytest.raises(InputError, match="reduced_chi2"):
        plots.plot_fit_quality(catalog[["teff"]])


def test_flag_counts_and_summary(catalog, tmp_path):
    names = {0: "LOW_SNR", 1: "AT_EDGE", 3: "NOT_CONVERGED"}
    counts = plots.flag_counts(catalog, names)
    bits = np.asarray(catalog["result_flags"])
    expected = {b: int(np.count_nonzero(bits >> b & 1)) for b in range(64)}
    got = {b: c for b, _, c in counts["bits"]}
    assert got == {0: expected[0], 1: 0, 3: expected[3], 40: 1}  # named bits always, unnamed ones when set
    assert {b: n for b, n, _ in counts["bits"]}[40] == "bit 40"
    assert counts["n_bad"] == int(np.sum(catalog["flag_bad"])) == expected[3]
    reasons = dict(counts["reasons"])
    assert reasons["LOW_SNR"] == expected[0] and reasons["NOT_CONVERGED"] == expected[3]
    plots.plot_flags_summary(catalog, names, path=tmp_path / "flags.png")
    assert_png_not_blank(tmp_path / "flags.png")


def test_flag_names_from_paynekit_flags_and_reason_categories():
    from paynekit.flags import decode_flags, flag_value

    value = flag_value("LOW_SNR", "BAD_INPUT")
    tab = Table({"result_flags": np.array([value, 0, flag_value("LOW_SNR")], dtype=np.int64),
                 "flag_reason": ["bad input spectrum; S/N 12.3 < 70", "", "S/N 45 < 70"]})
    counts = plots.flag_counts(tab)  # bit names from paynekit.flags.decode_flags
    named = {name: c for _, name, c in counts["bits"]}
    assert named["LOW_SNR"] == 2 and named["BAD_INPUT"] == 1 and named["FIT_FAILURE"] == 0
    assert set(named) == {decode_flags(1 << b)[0] for b in range(11)}
    # reasons are counted per category: numbers replaced, label names (c12_c13) kept
    assert dict(counts["reasons"]) == {"S/N # < #": 2, "bad input spectrum": 1}
    assert plots.reason_category("c12_c13 -1.5e+01 outside 5..90") == "c12_c13 # outside #..#"


# -- against reference labels --------------------------------------------------------------------------
def test_compare_recovers_injected_bias_and_scatter(tmp_path):
    rng = np.random.default_rng(SEED)
    n = 400
    cat = make_catalog(n)
    truth_teff = np.asarray(cat["teff"]) - 30.0 + rng.normal(0, 50.0, n)  # fitted = truth + 30 K +- 50 K
    truth_logg = np.asarray(cat["logg"]) + rng.normal(0, 0.1, n)
    order = rng.permutation(n)[: n - 20]  # reference in another order, 20 stars missing, 5 extra
    ref = Table({"id": np.concatenate([np.asarray(cat["id"])[order], [f"x{i}" for i in range(5)]]),
                 "TEFF": np.concatenate([truth_teff[order], np.full(5, 5000.0)]),
                 "logg": np.concatenate([truth_logg[order], np.full(5, 3.0)])})
    stats = plots.compare_labels(cat, ref, ["teff", "logg"])
    bad = np.asarray(cat["flag_bad"])
    n_expected = int(np.count_nonzero(~bad[order]))
    st = stats["teff"]
    assert st.reference_column == "TEFF" and st.n == n_expected
    assert abs(st.bias - 30.0) < 4 * 50.0 / np.sqrt(st.n)
    assert abs(st.scatter / 50.0 - 1) < 0.15 and abs(st.robust_scatter / 50.0 - 1) < 0.2
    assert abs(stats["logg"].bias) < 4 * 0.1 / np.sqrt(st.n) and abs(stats["logg"].scatter / 0.1 - 1) < 0.15
    fig = plots.plot_compare(cat, ref, ["teff", "logg"], path=tmp_path / "c.png")
    assert_png_not_blank(tmp_path / "c.png")
    assert f"bias {st.bias:+.0f}" in fig.axes[0].texts[0].get_text()
    assert fig.axes[1].get_xscale() == "log"  # residuals against S/N
    # default labels: those the reference shares (case-insensitively)
    assert set(plots.compare_labels(cat, ref)) == {"teff", "logg"}
    with pytest.raises(InputError, match="duplicate"):
        plots.compare_labels(cat, Table({"id": ["a", "a"], "teff": [1.0, 2.0]}))
    with pytest.raises(InputError, match="no column for label 'fe_h'"):
        plots.compare_labels(cat, ref, ["fe_h"])


def test_compare_without_snr_draws_histograms(tmp_path):
    cat = make_catalog(100)
    cat.remove_column("snr")
    ref = Table({"id": cat["id"], "teff": cat["teff"] + 10.0})
    fig = plots.plot_compare(cat, ref, path=tmp_path / "c.png")
    assert fig.axes[1].get_ylabel() == "stars"
    assert_png_not_blank(tmp_path / "c.png")


# -- an emulator ----------------------------------------------------------------------------------
def test_gradient_spectra_are_jacobian_times_step(tmp_path):
    emu = make_emulator()
    ref = {"teff": 4750.0, "logg": 2.5, "fe_h": -0.3}
    x, grads = plots.gradient_spectra(emu, ref)
    assert x[emu.label_space.index("mg_h")] == -0.3  # [X/H] follows [Fe/H] when not given
    assert grads["teff"][0] == 100.0 and grads["fe_h"][0] == 0.1 and grads["logg"][0] == 0.2
    for name, h in (("teff", 1.0), ("fe_h", 1e-4)):
        i = emu.label_space.index(name)
        dx = np.zeros(emu.n_labels)
        dx[i] = h
        fd = (emu.predict(x + dx) - emu.predict(x - dx)) / (2 * h)
        np.testing.assert_allclose(grads[name][1], fd * grads[name][0], rtol=1e-5, atol=1e-9)
    fig = plots.plot_gradient_spectra(emu, ref, line_positions={"mg_h": [(15740.7, "Mg I")]},
                                      path=tmp_path / "g.png")
    assert_png_not_blank(tmp_path / "g.png")
    assert len(fig.axes) == 4
    y = np.asarray(fig.axes[0].lines[0].get_ydata(), dtype=float)
    np.testing.assert_allclose(y[np.isfinite(y)], grads["teff"][1])  # gaps become NaN, nothing else
    assert any(t.get_text().strip() == "Mg I" for t in fig.axes[3].texts)
    fig = plots.plot_gradient_spectra(emu, x, ["fe_h"], [15750.0], steps={"fe_h": 0.05},
                                      wavelength_range=(15700, 15800))
    assert len(fig.axes) == 1 and "+0.05 dex" in fig.axes[0].texts[0].get_text()
    with pytest.raises(InputError, match="does not have"):
        plots.gradient_spectra(emu, {"vsini": 3.0})
    with pytest.raises(InputError, match="shape"):
        plots.gradient_spectra(emu, [1.0, 2.0])


def test_emulation_error_dict_array_and_residuals(tmp_path):
    rng = np.random.default_rng(SEED)
    wl = payne_apogee_wavelength()[::4]
    resid = rng.normal(0, 2e-3, (60, wl.size)) * (1 + (np.arange(wl.size) % 7 == 0))
    per_pixel = np.median(np.abs(resid), axis=0)
    result = {"median": float(np.median(np.abs(resid))), "p95": 0.004, "p99": 0.006,
              "per_pixel_median": per_pixel, "per_pixel_p95": np.percentile(np.abs(resid), 95, axis=0)}
    fig = plots.plot_emulation_error(result, wl, path=tmp_path / "e.png")
    assert_png_not_blank(tmp_path / "e.png")
    assert "median: " in fig.axes[2].texts[0].get_text() and "p99: 0.006" in fig.axes[2].texts[0].get_text()
    xs, frac = fig.axes[1].lines[0].get_data()  # cumulative distribution of per-pixel median error
    np.testing.assert_allclose(xs, np.sort(per_pixel))
    assert frac[np.searchsorted(xs, np.median(per_pixel))] == pytest.approx(0.5, abs=2 / wl.size)
    fig = plots.plot_emulation_error(per_pixel)  # a plain per-pixel array, no wavelength
    assert fig.axes[0].get_xlabel() == "pixel"
    fig = plots.plot_emulation_error(resid, wl)  # residuals (N, P)
    assert len(fig.axes[0].lines) == 2
    np.testing.assert_allclose(np.sort(fig.axes[1].lines[0].get_xdata()), np.sort(per_pixel))
    with pytest.raises(InputError, match="wavelength has"):
        plots.plot_emulation_error(per_pixel, wl[:-1])
    with pytest.raises(InputError, match="no per-pixel array"):
        plots.plot_emulation_error({"median": 1.0})


def test_training_curves_mark_best_validation_epoch(tmp_path):
    epochs = np.arange(1, 41)
    val = np.exp(-epochs / 8) + 0.02 + 0.002 * np.maximum(epochs - 25, 0)
    history = {"epoch": epochs.tolist(), "train_loss": (np.exp(-epochs / 8) + 0.01).tolist(),
               "val_loss": val.tolist(), "lr": [1e-3] * 40}
    fig = plots.plot_training_curves(history, path=tmp_path / "t.png")
    assert_png_not_blank(tmp_path / "t.png")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines[:2]] == ["train_loss", "val_loss"]  # lr is not a loss
    best = ax.lines[2]
    assert best.get_xdata()[0] == epochs[np.argmin(val)] and best.get_ydata()[0] == val.min()
    assert ax.get_yscale() == "log"
    with pytest.raises(InputError, match="dict of lists"):
        plots.plot_training_curves([1, 2, 3])


# -- global state -------------------------------------------------------------------------------------
def test_plots_leave_rcparams_alone(catalog):
    import matplotlib

    before = dict(matplotlib.rcParams)
    plots.plot_kiel(catalog)
    plots.plot_fit_quality(catalog)
    after = dict(matplotlib.rcParams)
    assert {k for k in before if before[k] != after[k]} == set()


def test_no_pyplot_and_lazy_matplotlib():
    code = (
        "import sys; import paynekit.plots as p; assert 'matplotlib' not in sys.modules; "
        "from astropy.table import Table; "
        "p.plot_kiel(Table({'teff': [4500., 5000.], 'logg': [2., 3.], 'fe_h': [0., -1.]})); "
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_emulation_error_plot_takes_the_validation_report(tmp_path, small_mlp):
    from paynekit.plots import plot_emulation_error
    from paynekit.validation import emulation_error

    g = np.random.default_rng(5)
    labels = small_mlp.label_space.unscale(g.uniform(-0.4, 0.4, (30, 4)))
    flux = small_mlp.predict(labels) + g.normal(0, 1e-3, (30, small_mlp.n_pixels))
    report = emulation_error(small_mlp, (labels, flux))
    plot_emulation_error(report, small_mlp.wavelength, path=tmp_path / "err.png")
    assert_png_not_blank(tmp_path / "err.png")
