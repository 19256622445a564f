"""The notebook explorer: in-process checks, then a real kernel (nbclient + ipykernel) runs a
notebook with two explorers, and Chromium clicks each one to show they are independent."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import featuremaps as fm
from featuremaps.errors import FeatureMapsError
from featuremaps.notebook import Explorer, cell_html, explore, maps_html, scoped_css

ROOT = Path(__file__).resolve().parents[1]


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2)
    ).eval()


def embedded(html: str) -> dict[str, Any]:
    m = re.search(r'class="fm-explorer-data">(.*?)</script>', html, re.S)
    assert m, "no embedded data"
    return json.loads(m.group(1))  # type: ignore[no-any-return]


def test_explore_a_tensor_batch_keeps_the_maps_and_embeds_them() -> None:
    net = small_net()
    x = torch.randn(2, 3, 20, 20)
    ex = explore(net, x, ["0", "2"], max_channels=5, order="variance")
    assert isinstance(ex, Explorer) and ex.names == ["image 0", "image 1"]
    ref = fm.capture(net, x, ["0", "2"])
    for name in ("0", "2"):
        torch.testing.assert_close(ex.maps[name], ref[name])
    assert ex.predictions == [None, None]
    assert ex.data()["preprocess"].startswith("a (B, 3, H, W) tensor fed as given")
    html = ex._repr_html_()
    data = embedded(html)
    assert len(data["images"]) == 2 and data["order"] == "variance"
    for i in range(2):
        t = ref["2"][i].numpy()
        var = t.reshape(6, -1).astype(np.float64).var(1)
        layer = data["images"][i]["layers"]["2"]
        assert layer["channels"] == np.argsort(-var, kind="stable")[:5].tolist()
        assert layer["atlas"].startswith("data:image/png;base64,")
    assert re.search(r"https?://", html) is None  # offline: nothing to fetch
    assert html.count("<script>") == 1 and "attachShadow" in html


def test_each_display_has_its_own_id() -> None:
    ex = explore(small_net(), torch.randn(1, 3, 16, 16), ["0"])
    ids = {re.search(r'id="(fm-explorer-[0-9a-f]+)"', ex._repr_html_()).group(1) for _ in range(3)}  # type: ignore[union-attr]
    assert len(ids) == 3


def test_size_cap_subsamples_channels_and_says_so() -> None:
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1)).eval()
    ex = explore(net, torch.randn(1, 3, 64, 64), ["0"], max_channels=64, max_bytes=150_000)
    data, note = ex.cell_data()
    shown = len(data["images"][0]["layers"]["0"]["channels"])
    assert shown < 64 and len(json.dumps(data)) <= 150_000
    assert note and f"Showing {shown} channel(s)" in note and "max_channels" in note
    assert note in ex._repr_html_() or "Showing" in ex._repr_html_()
    full = explore(net, torch.randn(1, 3, 64, 64), ["0"], max_channels=64)
    assert full.cell_data()[1] is None


def test_bad_input_is_a_clear_error() -> None:
    net = small_net()
    with pytest.raises(FeatureMapsError, match="order"):
        explore(net, torch.randn(1, 3, 8, 8), ["0"], order="sideways")
    with pytest.raises(FeatureMapsError, match=r"\(B, 3, H, W\)"):
        explore(net, torch.randn(1, 4, 8, 8), ["0"])
    with pytest.raises(FeatureMapsError, match="max_bytes"):
        explore(net, torch.randn(1, 3, 8, 8), ["0"], max_bytes=10)


@pytest.mark.slow
def test_relevance_in_the_explorer(photo: Path) -> None:
    torch.manual_seed(0)
    model = fm.load_model("resnet18", "none")
    ex = explore(model, [photo], ["layer4"], max_channels=8, target="tabby", order="relevance")
    rel = ex.relevance[0] if ex.relevance else None
    assert rel is not None and rel.main.target.label == "tabby"
    html = ex._repr_html_()
    data = embedded(html)
    assert data["order_text"] == "most relevant to the target class first"
    assert data["class_labels"] is not None and len(data["class_labels"]) == 1000
    classes = data["images"][0]["relevance"]["classes"]
    assert classes[0]["target"]["index"] == 281 and len(classes) in (5, 6)  # + the top-5
    x = fm.images.preprocess(fm.images.load_image(photo), model.preprocess)[None]
    expect = fm.relevance(model.module, x, ["layer4"], 281)["layer4"].channels[0].numpy()
    got = np.asarray(classes[0]["layers"]["layer4"]["relevance"], np.float64)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6 * np.abs(expect).max())
    assert classes[0]["layers"]["layer4"]["cam"].startswith("data:image/jpeg;base64,")
    order = np.argsort(-expect.astype(np.float64), kind="stable")[:8].tolist()
    assert data["images"][0]["layers"]["layer4"]["channels"] == order  # ranked by relevance
    assert "featuremapsRelevance.mount(shadow, data, view)" in html
    assert re.search(r"https?://", html) is None
    plain = explore(model, [photo], ["layer4"], max_channels=8)
    assert plain.relevance == [None]
    assert "relevance" not in embedded(plain._repr_html_())["images"][0]
    with pytest.raises(FeatureMapsError, match=r"relevance=True .*ImageNet classifier"):
        explore(small_net(), torch.randn(1, 3, 8, 8), ["0"], relevance=True)
    with pytest.raises(FeatureMapsError, match="no such class"):
        explore(model, [photo], ["layer4"], target="no such class")


def test_save_writes_the_report(tmp_path: Path) -> None:
    ex = explore(small_net(), torch.randn(1, 3, 16, 16), ["0", "2"])
    out = ex.save(tmp_path / "x.html")
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>") and "Content-Security-Policy" in text


def test_scoped_css_never_styles_the_page() -> None:
    css = scoped_css(
        ":root { --a: 1; }\nhtml, body { margin: 0; }\nbody {\n x: 1; }\n"
        ".dlg-body { y: 2; }\n@media (max-width: 9px) {}"
    )
    assert ":root" not in css and ":host" in css
    assert re.search(r"(^|[\s,}])(html|body)\s*[{,]", css) is None
    assert ".dlg-body { y: 2; }" in css and "@container (max-width: 9px)" in css


def test_objects_display_themselves() -> None:
    grid = fm.render_grid(torch.rand(4, 6, 6))
    png = grid._repr_png_()
    assert png.startswith(b"\x89PNG")
    maps = fm.capture(small_net(), torch.randn(1, 3, 16, 16), ["0", "2"])
    table = maps_html(maps)
    assert table.count("<tr>") == 3 and "data:image/png;base64," in table
    assert "1×6×7×7" in table
    assert maps._repr_html_() == table  # FeatureMaps shows itself as this table
    assert cell_html(
        {
            "title": "t",
            "model": "m",
            "weights": "w",
            "preprocess": "p",
            "full_image": False,
            "order_text": "by index",
            "images": [],
            "layers": [],
        }
    ).startswith('<div class="fm-explorer"')


# -- a real kernel ---------------------------------------------------------------------------

SETUP = """\
import torch
from torch import nn
import featuremaps as fm
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2)).eval()
"""


def run_notebook(cells: list[str], tmp_path: Path) -> Any:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return nb


def outputs(cell: Any, mime: str) -> list[str]:
    return [
        o["data"][mime]
        for o in cell.outputs
        if o.get("output_type") in ("execute_result", "display_data") and mime in o.get("data", {})
    ]


@pytest.mark.slow
@pytest.mark.browser
def test_two_explorers_in_a_real_kernel(tmp_path: Path) -> None:
    cells = [
        SETUP,
        'ex1 = fm.explore(net, torch.randn(2, 3, 24, 24), layers=["0", "2"], max_channels=6)\nex1',
        'ex2 = fm.explore("efficientnet_lite0", [fm.sample_image("cat")], layers="stages",\n'
        "                 max_channels=12, relevance=True)\nex2",
        'print(tuple(ex1.maps["2"].shape), ex2.names)\nfm.render_grid(ex1.maps["0"][0])',
    ]
    nb = run_notebook(cells, tmp_path)
    h1, h2 = outputs(nb.cells[1], "text/html")[0], outputs(nb.cells[2], "text/html")[0]
    d1, d2 = embedded(h1), embedded(h2)
    assert [layer["name"] for layer in d1["layers"]] == ["0", "2"] and len(d1["images"]) == 2
    assert [layer["name"] for layer in d2["layers"]] == STAGES
    assert d2["images"][0]["name"] == "cat.jpg"
    assert len(d1["images"][0]["layers"]["0"]["channels"]) == 6
    # relevance where asked: the top-1 (a cat) and the other top-5 classes, none in ex1
    classes = d2["images"][0]["relevance"]["classes"]
    assert classes[0]["target"]["label"] in CAT_LABELS and len(classes) == 5
    assert set(classes[0]["layers"]) == set(STAGES) and "relevance" not in d1["images"][0]
    text = "".join(o.get("text", "") for o in nb.cells[3].outputs if o["output_type"] == "stream")
    assert "(2, 6, 11, 11) ['cat.jpg']" in text
    assert outputs(nb.cells[3], "image/png"), "the grid shows itself"
    page = export_html(nb, tmp_path / "notebook.html", [h1, h2])
    _click_both(page, d2)


STAGES = ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "head_act"]
CAT_LABELS = ("Egyptian cat", "tabby", "tiger cat")
EXPLORER = re.compile(
    r'<div class="fm-explorer" id="(fm-explorer-[0-9a-f]+)">.*?</script><script>.*?</script></div>',
    re.S,
)


def export_html(nb: Any, out: Path, cells_html: list[str]) -> Path:
    """The executed notebook exported as nbconvert does (``jupyter nbconvert --to html``),
    after checking that the export carries each explorer, with its own id, and that no
    explorer refers to anything outside itself."""
    nbconvert = pytest.importorskip("nbconvert")
    body, _ = nbconvert.HTMLExporter().from_notebook_node(nb)
    found = EXPLORER.findall(body)
    parts = [m.group(0) for m in EXPLORER.finditer(body)]
    assert len(found) == 2 and found[0] != found[1], "two explorers, two ids"
    # nbconvert re-serializes the markup (attribute order, indents), not script or style
    inline = re.compile(r"<(script|style)[^>]*>(.*?)</\1>", re.S)
    for part, cell in zip(parts, cells_html, strict=True):
        assert inline.findall(part) == inline.findall(cell), "data, script, style carried"
    for part in parts:
        assert re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", part) is None, "offline"
        assert re.search(r'(src|href)="(?!data:)', part) is None
        assert re.search(r"@import|url\((?!['\"]?data:)", part) is None
    out.write_text(body, encoding="utf-8")
    return out


def _click_both(page_file: Path, d2: dict[str, Any]) -> None:
    """Chromium on the nbconvert export, every non-file request aborted: a layer click, a
    channel click (and in the second, a class pick) each change only their own explorer."""
    pw = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("/usr/bin/chromium")
    if chromium is None:
        pytest.skip("no Chromium at /usr/bin/chromium")
    body = page_file.read_text(encoding="utf-8")
    outside = EXPLORER.sub("", body)  # the notebook template without the explorers
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            blocked: list[str] = []

            def offline(route: Any) -> None:
                url = route.request.url
                if url.startswith("file:"):
                    route.continue_()
                else:
                    blocked.append(url)
                    route.abort()

            page.route("**/*", offline)
            page.goto(page_file.as_uri())
            views = page.locator(".fm-explorer-view")
            page.wait_for_function(
                "[...document.querySelectorAll('.fm-explorer-view')]"
                ".every(v => v.dataset.ready === '1')"
            )

            def layers() -> list[str]:
                return views.evaluate_all("vs => vs.map(v => v.dataset.layer)")  # type: ignore[no-any-return]

            def dialogs() -> list[int]:
                return [views.nth(i).locator("#channel-dialog[open]").count() for i in range(2)]

            def wait_layer(i: int, name: str) -> None:
                page.wait_for_function(
                    f"document.querySelectorAll('.fm-explorer-view')[{i}].dataset.layer"
                    f" === {json.dumps(name)}"
                )

            assert layers() == ["0", "_blocks.0"]
            # the notebook's own style is untouched by the explorers' style
            assert page.eval_on_selector("h1, .jp-Cell", "e => getComputedStyle(e).color") in (
                "rgb(0, 0, 0)",
                "rgba(0, 0, 0, 0.87)",
            )
            ex1, ex2 = views.nth(0), views.nth(1)
            assert ex1.locator(".relevance-panel").count() == 0
            assert ex2.locator(".relevance-panel").count() == 1
            # explorer 1: a layer, then a channel
            ex1.locator("#layer-nav button[data-layer='2']").click()
            wait_layer(0, "2")
            assert layers() == ["2", "_blocks.0"]
            assert ex1.locator("#img-1 .grid[data-layer='2'] .cell").count() == 6
            ex1.locator("#img-0 .cell[data-channel='3']").click()
            ex1.locator("#channel-dialog[open][data-channel='3']").wait_for()
            assert dialogs() == [1, 0]
            assert ex1.locator("#dlg-title").inner_text() == "2 · channel 3"
            ex1.locator("#dlg-close").click()
            assert dialogs() == [0, 0]
            # explorer 2: a layer (its relevance follows), a class, then a channel
            cam = ex2.locator(".relevance-panel .cam-img")
            assert (
                cam.get_attribute("src")
                == d2["images"][0]["relevance"]["classes"][0]["layers"]["_blocks.0"]["cam"]
            )
            ex2.locator("#layer-nav button[data-layer='_blocks.4']").click()
            wait_layer(1, "_blocks.4")
            assert layers() == ["2", "_blocks.4"]
            classes = d2["images"][0]["relevance"]["classes"]
            assert cam.get_attribute("src") == classes[0]["layers"]["_blocks.4"]["cam"]
            ex2.locator(".class-picker").select_option("1")
            panel = ex2.locator(".relevance-panel")
            assert panel.get_attribute("data-target") == str(classes[1]["target"]["index"])
            assert cam.get_attribute("src") == classes[1]["layers"]["_blocks.4"]["cam"]
            assert ex2.locator("#img-0 .grid[data-layer='_blocks.4'] .cell").count() == 12
            assert layers() == ["2", "_blocks.4"] and dialogs() == [0, 0]
            ex2.locator(".class-picker").select_option("0")
            _screenshot(page)
            ex2.locator("#img-0 .cell[data-channel='2']").click()
            ex2.locator("#channel-dialog[open][data-channel='2']").wait_for()
            assert dialogs() == [0, 1] and layers() == ["2", "_blocks.4"]
            assert ex2.locator("#dlg-title").inner_text() == "_blocks.4 · channel 2"
            assert ex1.locator("#dlg-title").inner_text() == "2 · channel 3"  # as left
            assert errors == []
            # offline: only the notebook template's own CDN assets were asked for (and
            # refused); the explorers asked for nothing
            assert all(u in outside for u in blocked), blocked
            if re.search(r'<script[^>]+src="https?://', outside):
                assert blocked, "the template's CDN scripts were asked for and refused"
        finally:
            browser.close()


def _screenshot(page: Any) -> None:
    """The second explorer's cell (code and output) in the exported notebook, for the
    README: test-output/screenshots/, and docs/ when FEATUREMAPS_UPDATE_DOCS=1."""
    from PIL import Image

    cell = page.locator(".jp-Cell").filter(has=page.locator(".fm-explorer")).nth(1)
    cell.scroll_into_view_if_needed()
    # the cell's view scrolls inside itself: show the layer (relevance, grid) under the nav
    page.locator(".fm-explorer-view").nth(1).evaluate(
        "v => { const b = v.shadowRoot.querySelector('.fm-body');"
        " const p = v.shadowRoot.querySelector('.image-section .layer-panel');"
        " b.scrollTop += p.getBoundingClientRect().top - b.getBoundingClientRect().top - 40; }"
    )
    shots = ROOT / "test-output" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    path = shots / "notebook-explorer.png"
    cell.screenshot(path=str(path))
    with Image.open(path) as img:
        assert img.width > 600 and img.height > 400
        small = img.convert("RGB")
    small.thumbnail((900, 1100))
    small = small.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    if os.environ.get("FEATUREMAPS_UPDATE_DOCS") == "1":
        shutil.copyfile(path, ROOT / "docs" / "notebook-explorer.png")


TOUR = ROOT / "examples" / "tour.ipynb"


def test_tour_is_stored_without_outputs() -> None:
    nb = json.loads(TOUR.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


@pytest.mark.slow
def test_tour_runs_in_a_real_kernel(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(TOUR, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "".join(
        o.get("text", "") for c in code for o in c.outputs if o["output_type"] == "stream"
    )
    # the in-place ReLU pitfall, with numbers: the naive hook lost every negative value
    naive = re.search(r"naive hook:  min (\S+)  negative values: (\d+)", text)
    ours = re.search(r"featuremaps: min (\S+)  negative values: (\d+)", text)
    assert naive and ours, text
    assert float(naive.group(1)) == 0.0 and naive.group(2) == "0"
    assert float(ours.group(1)) < 0 and int(ours.group(2)) > 0
    assert "after ReLU they agree: True" in text
    assert "layer4   (1, 2048, 7, 7)  stride (32.0, 32.0)" in text
    labels = re.search(r"\['([^']+)', '([^']+)'\]", text)
    assert labels and labels.group(1) in ("Egyptian cat", "tabby", "tiger cat")
    assert labels.group(2) == "espresso"
    pngs = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 2  # the channel grid and the PCA panel show themselves
    html = [
        o["data"]["text/html"] for c in code for o in c.outputs if "text/html" in o.get("data", {})
    ]
    assert len(html) == 2 and all('class="fm-explorer"' in h for h in html)
    assert "target: tabby" in text
    why = embedded(html[1])["images"][0]
    assert why["relevance"]["classes"][0]["target"]["label"] == "tabby"
    for h in html:
        assert re.search(r"https?://", h) is None
