"""``featuremaps serve``: the local viewer."""

from __future__ import annotations

from typing import Annotated

import typer

from ._app import app, err, out


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind (loopback only by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="A Host name other machines use to reach the viewer (repeatable); without "
            "one, or with a wildcard, a bind beyond loopback requires an access token.",
        ),
    ] = None,
    allow_code_models: Annotated[
        bool,
        typer.Option(help="Accept package.module:factory and TorchScript specs (run code)."),
    ] = False,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload in MB.", min=0.01)] = 20.0,
    max_decodes: Annotated[
        int,
        typer.Option(help="Uploads decoded at once; more get 503 with a retry hint.", min=1),
    ] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda or mps.")] = "cpu",
) -> None:
    """Start the local interactive viewer (needs the extra featuremaps[serve])."""
    from ..serve import Guard, is_loopback, run_server

    bind = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    guard = Guard.for_bind(bind, port, allow_host or ())
    if not is_loopback(bind):
        err.print(f"warning: serving on {bind}: other machines can reach it", markup=False)
    urls = guard.urls()
    out.print(f"featuremaps viewer on {urls[0]}  (Ctrl+C stops it)", markup=False)
    for url in urls[1:]:
        out.print(f"  or {url}", markup=False)
    if guard.token is not None:
        out.print(
            "  The token in the address is required: open it once in the browser "
            "(it is then kept as a cookie), or send it as 'Authorization: Bearer TOKEN'.",
            markup=False,
        )
    run_server(
        bind,
        port,
        allow_code_models=allow_code_models,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_decodes=max_decodes,
        device=device,
        guard=guard,
    )
