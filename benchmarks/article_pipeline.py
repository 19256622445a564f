"""The article's pipeline as a script: the baseline that ``bench_start.py`` times.

The well-known notebook recipe for looking at a CNN's feature maps, written out plainly
so that a whole process can be timed against ``featuremaps run``::

    python benchmarks/article_pipeline.py PHOTO OUT_DIR

It does the work ``featuremaps run vgg11 PHOTO --weights none --layers
features.0,...,features.18 --max-maps 64`` does by default:

* torchvision ``vgg11(weights=None)`` (random init, seeded), eval mode;
* ImageNet preprocessing with ``torchvision.transforms`` (Resize 256, CenterCrop 224,
  ToTensor, Normalize);
* forward hooks on ``features.0, 3, 6, 8, 11, 13, 16, 18`` storing ``output.detach()``;
* per layer, one matplotlib subplot per channel (the first 64, 8x8, ``imshow``, axis
  off), ``savefig`` one PNG;
* the input crop saved as a PNG, and a PCA panel: each layer's ``(H*W, C)`` matrix
  reduced to 3 components with ``sklearn.decomposition.PCA``, min-max scaled to RGB,
  shown beside the input in one figure.

featuremaps also writes a colour bar under each grid and a ``manifest.json``; this
script leaves them out, which only makes the baseline faster.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch
import torchvision
from PIL import Image
from sklearn.decomposition import PCA
from torchvision import transforms

LAYERS = [0, 3, 6, 8, 11, 13, 16, 18]
MAX_MAPS = 64
SEED = 0


def main(photo: Path, out: Path) -> None:
    """Capture the eight layers of VGG-11 for one photo; write the grids and the PCA panel."""
    torch.manual_seed(SEED)
    model = torchvision.models.vgg11(weights=None).eval()

    preprocess = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    image = Image.open(photo).convert("RGB")
    x = preprocess(image).unsqueeze(0)

    activations: dict[str, torch.Tensor] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(module, inputs, output):  # type: ignore[no-untyped-def]
            activations[name] = output.detach()

        return fn

    for i in LAYERS:
        model.features[i].register_forward_hook(hook(f"features.{i}"))
    with torch.no_grad():
        model(x)

    out.mkdir(parents=True, exist_ok=True)
    crop = transforms.CenterCrop(224)(transforms.Resize(256)(image))
    crop.save(out / "input.png")

    for name, act in activations.items():
        maps = act[0]
        fig, axes = plt.subplots(8, 8, figsize=(8, 8))
        for i, ax in enumerate(axes.flat):
            if i < min(MAX_MAPS, maps.shape[0]):
                ax.imshow(maps[i].numpy(), cmap="viridis")
            ax.axis("off")
        fig.savefig(out / f"{name}.png")
        plt.close(fig)

    fig, axes = plt.subplots(1, len(activations) + 1, figsize=(2 * (len(activations) + 1), 2.4))
    axes[0].imshow(crop)
    axes[0].set_title("input")
    axes[0].axis("off")
    for ax, (name, act) in zip(axes[1:], activations.items(), strict=True):
        c, h, w = act.shape[1:]
        flat = act[0].permute(1, 2, 0).reshape(-1, c).numpy()
        comps = PCA(n_components=3).fit_transform(flat)
        comps = (comps - comps.min(0)) / (comps.max(0) - comps.min(0) + 1e-8)
        ax.imshow(np.clip(comps.reshape(h, w, 3), 0, 1))
        ax.set_title(name)
        ax.axis("off")
    fig.savefig(out / "pca_panel.png")
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: article_pipeline.py PHOTO OUT_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
