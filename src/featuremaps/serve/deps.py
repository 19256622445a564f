"""Shared state reached by the routes through ``Depends``.

``ServerState`` bundles one server's configuration and stores; the app keeps it as
``app.state.engine`` and each route asks for the part it needs with the ``Annotated``
aliases below (``State``, ``Entry``, ``Cmap``, ``ChannelOrderParam``). The view
options themselves are the typed choices of :mod:`featuremaps.options`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final, Literal

from fastapi import Depends, Path, Query, Request

from ..options import ChannelOrder, Order, check_cmap, parse_order
from .config import ModelCatalog, ServerConfig
from .jobs import CaptureJobs, JobBoard
from .relevance import RelevanceService
from .stores import CaptureEntry, CaptureStore, ImageStore, ModelStore
from .upload import Decoder
from .visualize import VisualizeJobs


@dataclass
class ServerState:
    """Everything one server holds: configuration, stores and the job queue."""

    config: ServerConfig
    catalog: ModelCatalog
    decoder: Decoder
    images: ImageStore
    models: ModelStore
    captures: CaptureStore
    jobs: CaptureJobs
    relevance: RelevanceService
    visualize: VisualizeJobs

    @classmethod
    def create(cls, config: ServerConfig) -> ServerState:
        config.validate()
        catalog = ModelCatalog(config.allow_code_models)
        decoder = Decoder(config.max_decodes, config.max_pixels, config.image_bytes)
        images = ImageStore(decoder, config.max_upload_bytes)
        models = ModelStore(config.model_cache, config.device)
        captures = CaptureStore(models, config.cache_entries, config.cache_bytes)
        board = JobBoard()
        jobs = CaptureJobs(catalog, images, models, captures, board)
        relevance = RelevanceService(models, captures, jobs)
        visualize = VisualizeJobs(board, config.device)
        return cls(config, catalog, decoder, images, models, captures, jobs, relevance, visualize)

    def close(self) -> None:
        self.jobs.close()
        self.visualize.close()
        self.decoder.close()


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.engine
    return state


State = Annotated[ServerState, Depends(get_state)]


def get_entry(state: State, capture_id: Annotated[str, Path(max_length=64)]) -> CaptureEntry:
    """The capture named in the path (404 when evicted)."""
    return state.captures.get(capture_id)


Entry = Annotated[CaptureEntry, Depends(get_entry)]


def get_cmap(cmap: Annotated[str, Query(max_length=40)] = "viridis") -> str:
    """A colormap name that matplotlib knows (400 with suggestions otherwise)."""
    return check_cmap(cmap, "cmap")


Cmap = Annotated[str, Depends(get_cmap)]
LayerName = Annotated[str, Query(max_length=300)]


RELEVANCE: Final = "relevance"
"""The grid order by relevance to a class (``order=relevance&target=K``)."""


def get_order(
    order: Annotated[str, Query(max_length=2000)] = Order.INDEX,
) -> ChannelOrder | Literal["relevance"]:
    """A named channel order (``index``, ``top``, ..., ``relevance``) or indices ``3,7,12``."""
    if order.strip().lower() == RELEVANCE:
        return RELEVANCE
    return parse_order(order, "order")


ChannelOrderParam = Annotated[ChannelOrder | Literal["relevance"], Depends(get_order)]
