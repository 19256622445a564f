"""Feature visualization of a channel: start the job, its numbers and its picture."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import Response

from ..deps import State
from ..pictures import png_response
from ..schemas import JobOut, VisualizationOut, VisualizeRequest, exact_floats, job_out

router = APIRouter(prefix="/api")
VisId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]


@router.post("/visualize")
def start(req: VisualizeRequest, state: State, response: Response) -> JobOut:
    """Queue the visualization of one channel: 202 while it runs, 200 when cached.

    The job's ``result_id`` names the result (``GET /api/visualizations/{id}``).
    """
    entry = state.captures.get(req.capture_id)
    job = state.visualize.start(entry, req.layer, req.channel, req.steps, req.size, req.seed)
    response.status_code = 200 if job.status.finished else 202
    return job_out(job)


@router.get("/visualizations/{vid}")
def visualization(vid: VisId, state: State) -> VisualizationOut:
    r = state.visualize.get(vid)
    s = r.settings
    return VisualizationOut(
        id=vid,
        objective=s.objective.text,
        model=s.spec,
        weights=r.weights_desc,
        layer=s.layer,
        channel=s.channel,
        steps=s.steps,
        size=s.size,
        seed=s.seed,
        value=exact_floats([r.value])[0],
        history=exact_floats(r.history),
        seconds=r.seconds,
    )


@router.get("/visualizations/{vid}/image.png")
def visualization_png(vid: VisId, state: State) -> Response:
    return png_response(state.visualize.get(vid).png)
