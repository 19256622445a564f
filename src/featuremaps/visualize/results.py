"""The optimized pictures, their values, and how they are written."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .image import Transforms
from .objectives import Objective


@dataclass(frozen=True)
class Visualization:
    """One optimized picture.

    Attributes:
        objective: what was maximized (for a class given by name, with its index).
        image: the picture, ``(H, W, 3)`` float32 in [0, 1].
        value: the objective on the final picture, seen as it is (no transformation).
        history: the objective at each step, on that step's transformed picture.
    """

    objective: Objective
    image: np.ndarray
    value: float
    history: tuple[float, ...]

    def to_pil(self) -> Image.Image:
        """The picture as an 8-bit RGB image."""
        return Image.fromarray(np.round(self.image * 255).clip(0, 255).astype(np.uint8))

    def _repr_png_(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.to_pil().save(buf, format="PNG")
        return buf.getvalue()

    def to_dict(self, file: str | None = None) -> dict[str, Any]:
        obj = self.objective
        entry: dict[str, Any] = {
            "objective": obj.text,
            "kind": obj.kind.value,
            "layer": obj.layer,
            "index": obj.index,
            "label": obj.label,
            "value": self.value,
            "history": list(self.history),
        }
        if file is not None:
            entry["file"] = file
        return entry


@dataclass
class Visualizations(Sequence[Visualization]):
    """The pictures of one :func:`visualize` call, in objective order, and its settings."""

    items: list[Visualization]
    steps: int
    size: int
    seed: int
    lr: float
    transforms: Transforms
    model: str = ""
    weights: str = ""

    def __getitem__(self, i: Any) -> Any:
        return self.items[i]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Visualization]:
        return iter(self.items)

    def _repr_html_(self) -> str:
        """A row of the pictures with their objectives and values (notebooks)."""
        import base64
        import html

        cells = []
        for v in self.items:
            data = base64.b64encode(v._repr_png_()).decode("ascii")
            caption = html.escape(f"{v.objective.text} = {v.value:.4g}")
            cells.append(
                '<figure style="display:inline-block;margin:4px">'
                f'<img src="data:image/png;base64,{data}" alt="{caption}">'
                f'<figcaption style="font:12px monospace">{caption}</figcaption></figure>'
            )
        return "<div>" + "".join(cells) + "</div>"

    def file_names(self) -> list[str]:
        """A distinct PNG name per picture, from its objective."""
        names: list[str] = []
        for i, v in enumerate(self.items):
            name = f"{v.objective.file_stem}.png"
            if name in names:
                name = f"{v.objective.file_stem}-{i}.png"
            names.append(name)
        return names

    def manifest(self) -> dict[str, Any]:
        """What was made and how: settings and one entry per picture."""
        return {
            "model": self.model,
            "weights": self.weights,
            "steps": self.steps,
            "size": self.size,
            "seed": self.seed,
            "lr": self.lr,
            "transforms": self.transforms.to_dict(),
            "parameterization": "fourier 1/f, decorrelated colour, sigmoid",
            "visualizations": [
                v.to_dict(name) for v, name in zip(self.items, self.file_names(), strict=True)
            ],
        }

    def save(self, folder: str | os.PathLike[str]) -> list[Path]:
        """Write one PNG per picture and ``manifest.json`` into ``folder`` (atomically).

        Returns:
            The paths written, manifest last.
        """
        from .._files import prepare_output_dir, save_image, write_json

        target = prepare_output_dir(folder)
        paths = []
        for v, name in zip(self.items, self.file_names(), strict=True):
            save_image(v.to_pil(), target / name)
            paths.append(target / name)
        write_json(target / "manifest.json", self.manifest())
        paths.append(target / "manifest.json")
        return paths
