"""`coat train --config FILE [dotted.key=value ...]`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from coat.config import load_config


def train_command(
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted.key=value overrides")] = None,
    config: Annotated[Path | None, typer.Option("--config", exists=True, dir_okay=False,
                                                             help="YAML config (defaults + this + overrides)")] = None,
) -> None:
    """Train a CoAT model with Ray Train, evaluate it on the test split and log the run to MLflow."""
    from coat.train.launch import train

    cfg = load_config(config, overrides or [])
    result = train(cfg)
    table = Table(title=f"run {result.run_name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted({**result.metrics, **result.eval_metrics}.items()):
        if isinstance(value, int | float):
            table.add_row(key, f"{value:.4g}")
    Console().print(table)
    Console().print(f"checkpoint: {result.checkpoint}\nMLflow run: {result.mlflow_run_id}")
