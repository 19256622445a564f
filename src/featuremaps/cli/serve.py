"""``featuremaps serve``: the local viewer."""

from __future__ import annotations

from typing import Annotated

import typer

from ._app import (
    app,
    err,
    out,
)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind (loopback only by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    allow_code_models: Annotated[
        bool,
        typer.Option(help="Accept package.module:factory and TorchScript specs (run code)."),
    ] = False,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload in MB.")] = 20.0,
    device: Annotated[str, typer.Option(help="cpu, cuda or mps.")] = "cpu",
) -> None:
    """Start the local interactive viewer (needs the extra featuremaps[serve])."""
    from ..serve import is_loopback, run_server

    if not is_loopback(host):
        err.print(f"[yellow]warning:[/yellow] serving on {host}: other machines can reach it")
    out.print(f"featuremaps viewer on http://{host}:{port}/  (Ctrl+C stops it)")
    run_server(
        host,
        port,
        allow_code_models=allow_code_models,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        device=device,
    )
