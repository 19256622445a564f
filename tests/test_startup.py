"""Start-up: what importing featuremaps and its command line loads (issue 16).

Each check runs in a fresh interpreter, since this test process has imported everything
already. Timings belong in ``benchmarks/bench_start.py``, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import featuremaps
from featuremaps.images import sample_image

HEAVY = ("torch", "torchvision", "numpy", "scipy", "matplotlib", "PIL", "sklearn", "timm")


def _loaded_after(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; return the JSON it prints last."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_import_featuremaps_loads_no_heavy_module() -> None:
    found = _loaded_after(
        f"""
        import json, sys
        import featuremaps
        print(json.dumps({{"loaded": [m for m in {HEAVY!r} + ("torch._dynamo",)
                                      if m in sys.modules]}}))
        """
    )
    assert found["loaded"] == []


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["atlas", "--help"]])
def test_command_line_help_loads_no_heavy_module(argv: list[str]) -> None:
    found = _loaded_after(
        f"""
        import json, sys
        from featuremaps.cli import main
        code = 0
        try:
            main({argv!r})
        except SystemExit as exc:
            code = exc.code
        print()
        print(json.dumps({{"code": code, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
        """
    )
    assert found == {"code": 0, "loaded": []}


def test_loading_a_model_and_preprocessing_skip_torch_dynamo() -> None:
    """torchvision (models, transforms v2) comes in without the TorchDynamo compiler."""
    found = _loaded_after(
        """
        import json, sys
        import featuremaps as fm
        m = fm.load_model("vgg11", weights="none")
        x = fm.preprocess(fm.load_image(fm.sample_image("cat")), m.preprocess)
        maps = fm.capture(m.module, x[None], "features.3")
        print(json.dumps({"torchvision": "torchvision" in sys.modules,
                          "dynamo": "torch._dynamo" in sys.modules,
                          "shape": list(maps["features.3"].shape)}))
        """
    )
    assert found == {"torchvision": True, "dynamo": False, "shape": [1, 128, 112, 112]}


def test_torch_dynamo_still_works_after_the_stand_ins() -> None:
    """The stand-ins are gone: the real torch._dynamo imports, and tv_tensors.wrap runs."""
    found = _loaded_after(
        """
        import json, sys
        import torch
        from featuremaps._torchvision import import_torchvision
        import_torchvision()
        before = "torch._dynamo" in sys.modules
        import torch._dynamo
        from torchvision import tv_tensors
        from torchvision.ops import roi_align
        like = tv_tensors.Image(torch.ones(3, 4, 4))
        wrapped = tv_tensors.wrap(torch.zeros(3, 4, 4), like=like)
        pooled = roi_align(torch.ones(1, 2, 8, 8), torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), 2)
        print(json.dumps({"before": before, "real": hasattr(torch._dynamo, "optimize"),
                          "wrapped": type(wrapped).__name__, "pooled": list(pooled.shape)}))
        """
    )
    assert found == {"before": False, "real": True, "wrapped": "Image", "pooled": [1, 2, 2, 2]}


def test_every_public_name_resolves() -> None:
    for name in featuremaps.__all__:
        assert getattr(featuremaps, name) is not None, name
    assert set(featuremaps.__all__) <= set(dir(featuremaps))


def test_functions_named_like_their_module_stay_functions() -> None:
    """``fm.capture`` is the function even after ``featuremaps.capture`` (the package) loads."""
    found = _loaded_after(
        """
        import json
        import featuremaps as fm
        import featuremaps.pipeline, featuremaps.relevance, featuremaps.visualize.optimize
        print(json.dumps({n: callable(getattr(fm, n)) and type(getattr(fm, n)).__name__
                          for n in ("capture", "relevance", "visualize")}))
        """
    )
    assert found == {"capture": "function", "relevance": "function", "visualize": "function"}


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        featuremaps.no_such_name  # noqa: B018


def test_stored_colormaps_equal_matplotlibs() -> None:
    from featuremaps._colormaps import BUILTIN, builtin_lut, from_matplotlib
    from featuremaps.options import REPORT_CMAPS

    assert set(BUILTIN) == set(REPORT_CMAPS)
    for name in REPORT_CMAPS:
        stored = builtin_lut(name)
        assert stored is not None and stored.shape == (256, 3)
        assert (stored == from_matplotlib(name)).all(), name
    assert builtin_lut("cividis") is None


def test_a_run_draws_without_matplotlib(tmp_path: Path) -> None:
    """The default colormap's grid and the PCA panel need no matplotlib, nor dynamo."""
    found = _loaded_after(
        f"""
        import json, sys
        from featuremaps.cli import main
        code = 0
        try:
            main(["run", "resnet18", {str(sample_image("cat"))!r}, "--weights", "none",
                  "--layers", "layer1,layer2", "--max-maps", "8", "--out", {str(tmp_path)!r}])
        except SystemExit as exc:
            code = exc.code
        print()
        print(json.dumps({{"code": code, "matplotlib": "matplotlib" in sys.modules,
                          "dynamo": "torch._dynamo" in sys.modules}}))
        """
    )
    assert found == {"code": 0, "matplotlib": False, "dynamo": False}
    assert (tmp_path / "manifest.json").is_file()
