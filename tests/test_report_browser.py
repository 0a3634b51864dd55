"""The report opened in headless Chromium renders with no missing images.

The report folder is served on 127.0.0.1 by http.server; Chromium (``--headless --dump-dom``) opens a
check page that loads the report's index.html in a same-origin iframe and, once it has loaded, writes
the number of <img> elements and the src of every image with naturalWidth 0 into the DOM, which
``--dump-dom`` prints. Needs only the Debian package ``chromium`` (no WebDriver, no Python packages);
skips when no Chromium is found (set PAYNEKIT_CHROMIUM to use another binary).
"""

from __future__ import annotations

import functools
import html
import inspect
import json
import os
import re
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from paynekit.report import write_report

from .test_plots import assert_png_not_blank
from .test_report import parse, report_inputs

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                  "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars")
BROWSER_TIMEOUT_S = 90


def find_chromium() -> str | None:
    env = os.environ.get("PAYNEKIT_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")

CHECK_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>image check</title></head><body>
<pre id="result">pending</pre>
<iframe id="report" src="{src}" style="width:1280px;height:900px"></iframe>
<script>
document.getElementById("report").addEventListener("load", function () {{
  var doc = this.contentDocument;
  var images = Array.prototype.slice.call(doc.images);
  var broken = images.filter(function (im) {{
    return !(im.complete && im.naturalWidth > 0 && im.naturalHeight > 0);
  }}).map(function (im) {{ return im.getAttribute("src"); }});
  document.getElementById("result").textContent = JSON.stringify({{
    images: images.length, broken: broken, title: doc.title,
    tables: doc.querySelectorAll("table").length, sections: doc.querySelectorAll("section").length
  }});
}});
</script>
</body></html>
"""


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


class served:
    """Serve ``root`` on 127.0.0.1 (a free port) in a thread for the duration of a with block."""

    def __init__(self, root: Path):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def chromium(args, profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False)


def check_images_in_browser(report_dir: Path, work: Path) -> dict:
    """Open ``report_dir/index.html`` in headless Chromium; return what the check page found."""
    root = work / "www"
    shutil.copytree(report_dir, root / "report")
    (root / "check.html").write_text(CHECK_PAGE.format(src="report/index.html"), encoding="utf-8")
    with served(root) as url:
        proc = chromium(["--virtual-time-budget=20000", "--dump-dom", f"{url}/check.html"], work / "profile")
    match = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert match, f"Chromium printed no result (rc {proc.returncode}); stderr tail:\n{proc.stderr[-2000:]}"
    text = html.unescape(match.group(1))
    assert text != "pending", "the report iframe never finished loading"
    return json.loads(text)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "report"
    cat, ref, emu, validation, history, fits = report_inputs(n=120)
    write_report(cat, out, reference=ref, emulator=emu, validation=validation, history=history, fits=fits[:1],
                 title="browser check")
    return out


def test_report_renders_with_no_missing_images(report_dir, tmp_path):
    result = check_images_in_browser(report_dir, tmp_path)
    n_img = len(parse(report_dir / "index.html").img)
    assert n_img >= 9
    assert result["images"] == n_img
    assert result["broken"] == []
    assert result["title"] == "browser check"
    assert result["tables"] >= 3 and result["sections"] >= 4


def test_check_detects_a_missing_image(report_dir, tmp_path):
    """Negative control: the same check reports an image whose file is gone."""
    broken_dir = tmp_path / "broken"
    shutil.copytree(report_dir, broken_dir)
    (broken_dir / "kiel.png").unlink()
    result = check_images_in_browser(broken_dir, tmp_path / "work")
    assert result["broken"] == ["kiel.png"]


def test_screenshot_of_report_is_not_blank(report_dir, tmp_path):
    shot = tmp_path / "shot.png"
    with served(report_dir) as url:
        proc = chromium([f"--screenshot={shot}", "--window-size=1280,2400", f"{url}/index.html"], tmp_path / "p")
    assert shot.is_file(), f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert_png_not_blank(shot, min_bytes=30_000)
    from PIL import Image

    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[:2] == (2400, 1280)


@pytest.mark.slow
def test_demo_report_renders_in_browser(tmp_path):
    """The acceptance check: the report that ``paynekit demo`` writes, opened in Chromium."""
    demo = pytest.importorskip("paynekit.demo")
    kwargs = {"echo": lambda *a, **k: None} if "echo" in inspect.signature(demo.run_demo).parameters else {}
    # the demo's own code path at a small size (the default run takes ~10 minutes)
    small = demo.DemoConfig(n_train=120, n_validate=40, n_fit=6, train_time_s=8.0)
    demo.run_demo(tmp_path / "demo", small, **kwargs)
    indexes = sorted((tmp_path / "demo").rglob("index.html"))
    assert indexes, "paynekit demo wrote no index.html"
    result = check_images_in_browser(indexes[0].parent, tmp_path / "work")
    assert result["images"] > 0 and result["broken"] == []
