"""The HTML report and its plots: embedded PNGs that decode, and that a browser loads."""

import base64
import json
import re
import shutil
import subprocess

import pytest
import torch

import sparsenn as sn
from sparsenn.report import plots
from sparsenn.report.html import RunSummary, figures, render_html, write_report
from conftest import TinyMLP

PNG = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


class _Measured:  # what sparsenn.backend.inference.measure returns, without needing the runtime
    dense_bytes, sparse_bytes, formats = 6000, 1200, "csr"
    latency = {1: (2e-4, 1e-4), 64: (1e-3, 8e-4)}
    layers = [{"layer": "fc1", "format": "csr", "kernel": "csr_mm", "dense_s": 1e-4, "sparse_s": 5e-5}]


@pytest.fixture(scope="module")
def runs():
    torch.manual_seed(0)
    model = TinyMLP()
    x = torch.randn(8, 16)
    sn.Sparsifier(model, 0.8, method="magnitude")
    rep = sn.report(model, example_input=x)
    torch.manual_seed(1)
    other = TinyMLP()
    sn.Sparsifier(other, 0.5, method="random", pattern="2:4")
    return [RunSummary("dense", 0.95, 0.0),
            RunSummary.from_model("magnitude 80%", model, rep, accuracy=0.93, inference=_Measured(),
                                  before_finetune=0.6),
            RunSummary.from_model("random 2:4", other, sn.report(other, example_input=x).to_dict(), accuracy=0.9)]


def _images(html):
    return [base64.b64decode(m) for m in IMG.findall(html)]


def test_html_embeds_every_figure_as_a_png(runs):
    html = render_html(runs, title="t <&>", description="d", recipe={"sparsify": {"method": "magnitude"}})
    figs = figures(runs)
    assert [f.key for f in figs] == ["accuracy_vs_sparsity", "layer_sparsity", "mask_heatmaps", "bytes_and_macs",
                                     "speedup"]
    images = _images(html)
    assert len(images) == len(figs) == 5
    assert all(img.startswith(PNG) and len(img) > 1000 for img in images)
    assert "<title>t &lt;&amp;&gt;</title>" in html and "src=\"http" not in html  # escaped; nothing external
    assert "magnitude 80%" in html and "1.25x" in html and "csr_mm" in html and "method: magnitude" in html


def test_write_report_writes_html_markdown_and_plot_files(runs, tmp_path):
    written = write_report(tmp_path / "r", runs, title="demo")
    assert set(written) == {"html", "markdown"}
    md = written["markdown"].read_text()
    for key in ("accuracy_vs_sparsity", "layer_sparsity", "mask_heatmaps", "bytes_and_macs", "speedup"):
        assert f"(plots/{key}.png)" in md
        assert (tmp_path / "r" / "plots" / f"{key}.png").read_bytes().startswith(PNG)
    assert "| magnitude 80% | 93.00% | 79.99% |" in md
    with pytest.raises(ValueError, match="unknown report format 'pdf'; valid: markdown, html"):
        write_report(tmp_path, runs, formats=["pdf"])
    with pytest.raises(ValueError, match="at least one RunSummary"):
        write_report(tmp_path, [])


def test_plots_without_data_draw_nothing():
    assert plots.accuracy_vs_sparsity([]) is None
    assert plots.layer_sparsity({}) is None
    assert plots.mask_heatmaps({}) is None
    assert plots.layer_bytes_and_macs([{"name": "total"}]) is None
    assert plots.speedup({"a": {}}) is None
    only_dense = figures([RunSummary("dense", 0.9, 0.0)])
    assert [f.key for f in only_dense] == ["accuracy_vs_sparsity"]


def test_mask_heatmap_of_a_large_layer_is_block_averaged():
    mask = torch.zeros(1000, 300, dtype=torch.bool)
    mask[:500] = True
    grid = plots._density_grid(mask, 96)
    assert grid.shape[0] <= 96 and grid.shape[1] <= 96
    assert grid.mean().item() == pytest.approx(0.5, abs=0.02)
    assert plots.mask_heatmaps({"m": {"w": mask}}).startswith(PNG)


_PROBE = """<pre id="probe"></pre><script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  document.getElementById("probe").textContent = JSON.stringify(
    imgs.map(i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight})));
});
</script></body>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (Debian: apt install chromium)")
def test_report_images_load_in_headless_chromium(runs, tmp_path):
    html = render_html(runs, title="browser check")
    page = tmp_path / "report.html"
    page.write_text(html.replace("</body>", _PROBE), encoding="utf-8")
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    found = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout, re.S)
    assert found and found.group(1), f"no probe output from Chromium (rc {out.returncode}): {out.stderr[-2000:]}"
    images = json.loads(found.group(1))
    assert len(images) == len(_images(html)) == 5
    assert all(i["complete"] and i["w"] > 100 and i["h"] > 100 for i in images), images


def test_summary_table_says_runs_dense_where_one_timing_serves_both():
    """A batch size where the converted model runs every layer dense is timed once for both; the table
    says so instead of showing that timing against another run's dense timing."""
    from sparsenn.report.html import summary_table

    dense, sparse = RunSummary("dense", 0.9, 0.0), RunSummary("pruned", 0.9, 0.9)
    dense.latency = {1: (5e-5, 5e-5), 64: (2e-4, 2e-4)}
    sparse.latency = {1: (3e-5, 3e-5), 64: (2e-4, 1e-4)}
    head, body = summary_table([dense, sparse])
    assert head[-2:] == ["latency batch 1 (vs dense)", "latency batch 64 (vs dense)"]
    assert body[0][-2:] == ["0.050 ms (1.00x)", "0.200 ms (1.00x)"]
    assert body[1][-2:] == ["runs dense (1.00x)", "0.100 ms (2.00x)"]
