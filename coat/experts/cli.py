"""`coat experts ...`: what experts there are and what they produce."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from coat.experts.registry import HUB_PREFIX, available_experts, build_expert

app = typer.Typer(help="Audio experts whose features the thinking slots regress.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Audio experts whose features the thinking slots regress."""


@app.command("list")
def list_experts(
    hub: Annotated[list[str] | None, typer.Option(help="Also list the hub model in this folder.")] = None,
) -> None:
    """Print name, role, dim, frame rate, kind and version of each expert (building it hashes its weights)."""
    table = Table(title="coat experts")
    for column in ("name", "role", "dim", "frame rate", "kind", "version"):
        table.add_column(column)
    for name in [*available_experts(), *(HUB_PREFIX + path for path in hub or [])]:
        expert = build_expert(name)
        rate = "clip" if expert.spec.frame_rate is None else f"{expert.spec.frame_rate:g} fps"
        table.add_row(expert.name, expert.role, str(expert.spec.dim), rate, expert.spec.kind, expert.version)
    Console().print(table)
