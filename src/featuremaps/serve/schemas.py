"""The viewer's API in and out: pydantic models of every JSON body.

FastAPI validates requests against these and serializes responses through them, so the
JSON the page reads is written down once, here.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from ..summaries import json_floats
from .jobs import Job, JobStatus

Floats = list[float | None]
"""Numbers rounded to 6 significant digits; None where not finite."""


class CaptureRequest(BaseModel):
    """Body of ``POST /api/captures``."""

    model: str = Field(min_length=1, max_length=300)
    weights: str = Field(default="DEFAULT", max_length=20)
    image_id: str = Field(min_length=1, max_length=64)
    compare_model: str | None = Field(default=None, max_length=300)
    """A second model (a spec the server accepts, like ``model``) captured on the same image."""
    compare_weights: str = Field(default="DEFAULT", max_length=20)

    @field_validator("compare_model")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value if value is None or value.strip() else None


class CompareOut(BaseModel):
    """One layer of two captures: whether both PCA pictures share one basis, or why not."""

    layer: str
    model_a: str
    model_b: str
    channels_a: int
    channels_b: int | None
    """None when model B has no layer of that name."""
    joint: bool
    note: str | None


class RelevanceRequest(BaseModel):
    """Body of ``POST /api/captures/{id}/relevance``: the class, and the layer on show."""

    target: int | str | None = None
    """A class index, an ImageNet label, or null for the top-1 prediction."""
    layer: str | None = Field(default=None, max_length=300)

    @field_validator("target", mode="before")
    @classmethod
    def _class(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(
                "give a class index, an ImageNet label, or null for the top-1 prediction"
            )
        if isinstance(value, int) and not 0 <= value <= 100_000:
            raise ValueError("a class index is a number from 0")
        if isinstance(value, str) and not 1 <= len(value) <= 120:
            raise ValueError("a label is 1 to 120 characters long")
        return value


class TargetOut(BaseModel):
    """The class relevance is computed for (``featuremaps.relevance.Target``)."""

    index: int | None
    label: str | None
    prob: float | None
    score: float


class RelevanceOut(BaseModel):
    """One layer's relevance to one class, as :func:`featuremaps.relevance` returned it."""

    layer: str
    target: TargetOut
    channels: Floats
    """Per-channel relevance (gradient x activation summed over space), full float32 values."""
    order: list[int]
    """Channels from the most to the least relevant."""
    positive: float
    negative: float
    cam_shape: list[int]
    gradcam_max: float | None
    layercam_max: float | None


class LabelsOut(BaseModel):
    """The ImageNet class names, by index."""

    labels: list[str]


class VisualizeRequest(BaseModel):
    """Body of ``POST /api/visualize``: a channel of a capture's model and the settings."""

    capture_id: str = Field(min_length=1, max_length=64)
    layer: str = Field(min_length=1, max_length=300)
    channel: int = Field(ge=0, le=1_000_000)
    steps: int = Field(default=128, ge=1, le=1024)
    size: int = Field(default=128, ge=32, le=384)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class VisualizationOut(BaseModel):
    """A finished visualization: the objective, settings and its value along the way."""

    id: str
    objective: str
    model: str
    weights: str
    layer: str
    channel: int
    steps: int
    size: int
    seed: int
    value: float | None
    history: Floats
    seconds: float


CamKind = Literal["gradcam", "layercam"]


class ImageOut(BaseModel):
    """An image the server keeps, by content hash."""

    image_id: str
    width: int
    height: int


class JobOut(BaseModel):
    """A job's progress (a capture, a relevance or a visualization)."""

    job_id: str
    capture_id: str
    result_id: str
    compare_id: str = ""
    """The second model's capture (when the request named one)."""
    status: JobStatus
    phase: str
    step: int
    steps: int
    message: str
    elapsed: float


class ModelOut(BaseModel):
    name: str
    pretrained: bool


class ConfigOut(BaseModel):
    """What the page offers: models, samples and the values of each view option."""

    models: list[ModelOut]
    default_model: str
    samples: list[str]
    cmaps: list[str]
    norms: list[str]
    orders: list[str]
    order_labels: dict[str, str]
    scales: list[str]
    allow_code_models: bool
    max_upload_bytes: int
    visualize_steps: int
    visualize_size: int


class LayerRow(BaseModel):
    """One layer in a capture's listing."""

    name: str
    type: str
    shape: list[int]
    stride: list[float] | None
    stage: bool
    captured: bool


class CaptureOut(BaseModel):
    """A capture: the model, its input, predictions and layers."""

    capture_id: str
    model: str
    weights: str
    preprocess: str
    input_size: list[int]
    predictions: list[dict[str, Any]] | None
    predictions_note: str | None
    classifier: bool
    """Whether the model is an ImageNet classifier (relevance to a class needs one)."""
    pretrained: bool
    stages: list[str]
    layers: list[LayerRow]


class LayerOut(BaseModel):
    """Per-channel statistics of one layer."""

    name: str
    type: str
    shape: list[int]
    stride: list[float] | None
    channels: int
    dead_count: int
    dead_share: float
    layer_min: float | None
    layer_mean: float | None
    layer_max: float | None
    min: Floats
    mean: Floats
    max: Floats
    dead: list[bool]


class ChannelOut(BaseModel):
    """One channel: its statistics and the colour scale of its picture."""

    layer: str
    channel: int
    shape: list[int]
    min: float | None
    mean: float | None
    max: float | None
    dead: bool
    norm: str
    vmin: float
    vmax: float
    ticks: list[float]


class GridMeta(BaseModel):
    """The ``X-Featuremaps-Grid`` header of a grid picture: where each channel is."""

    layer: str
    channels: list[int]
    boxes: list[list[int]]
    width: int
    height: int
    factor: int
    vmin: Floats
    vmax: Floats


def exact_floats(values: Any) -> Floats:
    """JSON numbers of an array, unrounded (float32 values are exact in JSON); None where
    not finite."""
    arr = np.asarray(values, np.float64).ravel()
    return [float(v) if np.isfinite(v) else None for v in arr]


def floats(values: Any) -> Floats:
    """JSON numbers of an array: 6 significant digits, None where not finite."""
    return json_floats(np.asarray(values, np.float64).ravel(), 6)


def job_out(job: Job) -> JobOut:
    return JobOut(
        job_id=job.id,
        capture_id=job.capture_id,
        result_id=job.result_id,
        compare_id=job.compare_id,
        status=job.status,
        phase=job.phase,
        step=job.step,
        steps=job.steps,
        message=job.message,
        elapsed=job.elapsed,
    )
