"""`coat sweep --config FILE --space SPACE.yaml [--resume] [dotted.key=value ...]`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coat.config import load_config


def sweep_command(
    space: Annotated[Path, typer.Option("--space", exists=True, dir_okay=False,
                                        help="Search space YAML over dotted config paths")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted.key=value overrides of the base config")] = None,
    config: Annotated[Path | None, typer.Option("--config", exists=True, dir_okay=False,
                                                help="Base config YAML")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the sweep of the same name")] = False,
) -> None:
    """Sweep with Ray Tune (Optuna TPE + ASHA, or an exact grid); one MLflow parent run, a child per trial."""
    from coat.tune.report import print_results
    from coat.tune.sweep import run_sweep

    result = run_sweep(config, space, overrides or [], resume=resume)
    print_results(result, load_config(config, overrides or []))
