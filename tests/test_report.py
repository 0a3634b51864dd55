"""The HTML report: figures written and not blank, the page links only files that exist, summary numbers."""

from __future__ import annotations

import html.parser
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from astropy.table import Table

from paynekit.errors import InputError
from paynekit.report import catalog_summary, write_report
from paynekit.wavelength import payne_apogee_wavelength

from .test_plots import SEED, assert_png_not_blank, make_catalog, make_emulator


class _Links(html.parser.HTMLParser):
    """Every src/href in a page, every <script>, and the text of every table cell."""

    def __init__(self):
        super().__init__()
        self.img, self.other, self.scripts, self.cells, self._cell = [], [], 0, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.img.append(attrs.get("src"))
        elif "src" in attrs or ("href" in attrs and tag != "a") or tag == "link":
            self.other.append(attrs.get("src") or attrs.get("href"))
        if tag == "a" and not attrs.get("href", "").startswith("#"):
            self.other.append(attrs.get("href"))
        if tag == "script":
            self.scripts += 1
        if tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(self._cell.strip())
            self._cell = None


def parse(index: Path) -> _Links:
    p = _Links()
    p.feed(index.read_text(encoding="utf-8"))
    return p


def report_inputs(n=200, seed=SEED):
    """Catalog, reference (truth of a mock), emulator, validation, history and two fits."""
    rng = np.random.default_rng(seed)
    cat = make_catalog(n, seed)
    ref = Table({"id": cat["id"], "teff": cat["teff"] - 40.0 + rng.normal(0, 60.0, n),
                 "logg": cat["logg"] + rng.normal(0, 0.08, n), "fe_h": cat["fe_h"] + rng.normal(0, 0.05, n)})
    emu = make_emulator(seed)
    resid = rng.normal(0, 1e-3, (30, emu.n_pixels))
    validation = {"median": 1e-3, "p95": 3e-3, "p99": 5e-3,
                  "per_pixel_median": np.median(np.abs(resid), axis=0)}
    history = {"train_loss": list(np.geomspace(1, 1e-3, 30)), "val_loss": list(np.geomspace(1, 2e-3, 30))}
    wl = payne_apogee_wavelength()
    fits = []
    for k in range(2):
        model = 1 - 0.3 * np.exp(-0.5 * ((wl - 15200.0 - 300 * k) / 0.4) ** 2)
        ivar = np.full(wl.size, 1e4)
        fits.append((str(cat["id"][k]), wl, model + rng.normal(0, 0.01, wl.size), ivar, model,
                     np.arange(wl.size) % 50 == 0, {"teff": float(cat["teff"][k]), "logg": float(cat["logg"][k])}))
    return cat, ref, emu, validation, history, fits


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cat, ref, emu, validation, history, fits = report_inputs()
    before = cat.copy(copy_data=True)
    index = write_report(cat, out / "r", reference=ref, emulator=emu, validation=validation, history=history,
                         fits=fits, title="Mock run <test>", bit_names={0: "LOW_SNR", 3: "NOT_CONVERGED"})
    return index, cat, before, ref


def test_full_report_links_only_existing_non_blank_pngs(full_report):
    index, cat, before, _ = full_report
    assert index.name == "index.html" and index.is_file()
    page = parse(index)
    assert page.scripts == 0 and page.other == []  # self-contained: no scripts, styles or links elsewhere
    srcs = page.img
    expected = {"kiel.png", "label_histograms.png", "abundance_trends.png", "fit_quality.png", "flags.png",
                "compare.png", "gradient_spectra.png", "emulation_error.png", "training_curves.png"}
    assert expected <= set(srcs)
    assert len([s for s in srcs if s.startswith("spectrum_")]) == 2
    assert len(srcs) == len(set(srcs)) == len(expected) + 2
    for src in srcs:
        assert not re.match(r"^[a-z]+:|^/", src), src  # relative links only
        assert_png_not_blank(index.parent / src)
    text = index.read_text(encoding="utf-8")
    assert "Mock run &lt;test&gt;" in text  # the title is escaped
    for name in cat.colnames:
        np.testing.assert_array_equal(np.asarray(cat[name]), np.asarray(before[name]))


def test_full_report_summary_tables(full_report):
    index, cat, _, _ref = full_report
    cells = parse(index).cells
    n_bad = int(np.sum(cat["flag_bad"]))
    summary = catalog_summary(cat, {0: "LOW_SNR", 3: "NOT_CONVERGED"})
    assert summary["n_stars"] == len(cat) and summary["n_bad"] == n_bad
    assert cells[cells.index("stars") + 1] == str(len(cat))
    assert cells[cells.index("flag_bad") + 1] == str(n_bad)
    assert cells[cells.index("NOT_CONVERGED") + 2] == str(n_bad)
    # the comparison table: bias of Teff near the injected +40 K (scatter 60 K)
    row = cells.index("Teff [K]", cells.index("bias (mean)"))
    bias, scatter = float(cells[row + 3]), float(cells[row + 4])
    n = int(cells[row + 2])
    assert n == len(cat) - n_bad
    assert abs(bias - 40.0) < 4 * 60 / np.sqrt(n) and abs(scatter / 60.0 - 1) < 0.2
    # the median reduced chi2 of the stars not flagged bad
    good = ~np.asarray(cat["flag_bad"])
    assert summary["median_reduced_chi2"] == pytest.approx(np.median(np.asarray(cat["reduced_chi2"])[good]))


def test_minimal_catalog_skips_what_it_cannot_draw(tmp_path):
    rng = np.random.default_rng(SEED)
    cat = Table({"id": [f"s{i}" for i in range(50)], "teff": rng.uniform(4000, 6000, 50),
                 "logg": rng.uniform(1, 4.5, 50)})
    path = tmp_path / "cat.ecsv"
    cat.write(path)
    index = write_report(path, tmp_path / "out")  # a path to a table file works too
    page = parse(index)
    assert set(page.img) == {"kiel.png", "label_histograms.png"}
    for src in page.img:
        assert_png_not_blank(index.parent / src)
    text = index.read_text(encoding="utf-8")
    assert "Not drawn" in text and "no fe_h and other [X/H] columns" in text
    # writing again into the same folder replaces the page
    index2 = write_report(cat, tmp_path / "out", title="again")
    assert index2 == index and "<title>again</title>" in index.read_text(encoding="utf-8")


def test_report_input_errors(tmp_path):
    cat = make_catalog(20)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        write_report(cat, tmp_path / "file")
    with pytest.raises(InputError, match="does not exist"):
        write_report(tmp_path / "missing.fits", tmp_path / "o")
    with pytest.raises(InputError, match="fits\\[0\\]"):
        write_report(cat, tmp_path / "o", fits=[(1, 2, 3)])
    with pytest.raises(InputError, match="Emulator"):
        write_report(cat, tmp_path / "o", emulator=42)


def test_report_all_bad_catalog_and_results_from_json_or_dataclass(tmp_path):
    """Edge cases: every star flagged bad; validation as a dataclass, history from a JSON file."""
    import dataclasses
    import json

    @dataclasses.dataclass(frozen=True)
    class Validation:
        median: float
        p95: float
        per_pixel_median: np.ndarray
        per_label: dict

    cat = make_catalog(40)
    cat["flag_bad"] = True
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"train_loss": [1.0, 0.5, 0.2], "val_loss": [1.1, 0.6, 0.3]}))
    rng = np.random.default_rng(SEED)
    validation = Validation(1e-3, 3e-3, np.abs(rng.normal(0, 1e-3, 300)), {"teff": 1.0})
    index = write_report(cat, tmp_path / "out", validation=validation, history=history)
    page = parse(index)
    assert {"kiel.png", "emulation_error.png", "training_curves.png"} <= set(page.img)
    for src in page.img:
        assert (index.parent / src).is_file()
    cells = page.cells
    assert cells[cells.index("flag_bad") + 1] == "40" and cells[cells.index("p95") + 1] == "0.003"
    with pytest.raises(InputError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        write_report(cat, tmp_path / "out", history=tmp_path / "bad.json")
