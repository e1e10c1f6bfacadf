"""`coat experts ...`: what experts there are and what they produce."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from coat.experts.roles import PAPER_ROLES, ROLE_DEFAULTS

app = typer.Typer(help="Audio experts whose features the thinking slots regress.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Audio experts whose features the thinking slots regress."""


@app.command("list")
def list_experts(
    hub: Annotated[list[str] | None, typer.Option(help="Also list the hub model in this folder.")] = None,
) -> None:
    """Print name, role, dim, frame rate, kind, version and source of each expert (building it hashes its
    weights). A role marked * is one of the method's five; a config may name a role for its default expert."""
    from coat.experts.registry import HUB_PREFIX, available_experts, build_expert

    table = Table(title="coat experts", caption="* one of the method's five roles; experts.names may name a role "
                                               "for its default expert")
    for column in ("name", "role", "dim", "frame rate", "kind", "version", "source"):
        table.add_column(column, overflow="fold")
    defaults = {expert: role for role, expert in ROLE_DEFAULTS.items()}
    for name in [*available_experts(), *(HUB_PREFIX + path for path in hub or [])]:
        expert = build_expert(name)
        rate = "clip" if expert.spec.frame_rate is None else f"{expert.spec.frame_rate:g} fps"
        role = expert.role + ("*" if expert.role in PAPER_ROLES else "")
        if name in defaults:
            role += f" (default for {defaults[name]})"
        table.add_row(expert.name, role, str(expert.spec.dim), rate, expert.spec.kind, expert.version,
                      expert.source)
    Console().print(table)
