"""`coat ...`: the command line. Each area owns its sub-commands; this file only mounts them and turns a user's
mistake into one line (`coat.errors`).

Importing this module loads no torch, Ray, MLflow or transformers: each command imports what it needs when it
runs, so `coat --help` answers at once.
"""

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from coat.analysis.analyze_cli import analyze_command
from coat.analysis.probe_cli import probe_command
from coat.data.cli import app as data_app
from coat.errors import reported
from coat.eval.cli import eval_command
from coat.eval.score_cli import score_command
from coat.experts.cli import app as experts_app
from coat.experts.precompute_cli import precompute_command
from coat.train.cli import train_command
from coat.tune.cli import sweep_command

app = typer.Typer(no_args_is_help=True)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (or COAT_DEBUG=1).")):
    """Continuous Audio Thinking: data, experts, training, evaluation and sweeps."""
    # `main` reads --debug wherever it stands on the line; declared here so that `coat --help` lists it.


experts_app.command("precompute")(precompute_command)
app.add_typer(data_app, name="data")
app.add_typer(experts_app, name="experts")
app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("score")(score_command)
app.command("analyze")(analyze_command)
app.command("probe")(probe_command)
app.command("sweep")(sweep_command)


config_app = typer.Typer(help="The config tree: fields, help, bounds.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show_command(
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted.key=value overrides")] = None,
    config: Annotated[Path | None, typer.Option("--config", exists=True, dir_okay=False,
                                                help="YAML config (defaults + this + overrides)")] = None,
    reference: Annotated[bool, typer.Option(
        "--reference", help="Print the Markdown reference of the defaults (docs/config.md) instead.")] = False,
) -> None:
    """Print the resolved config as YAML, each field with its help and bounds as a comment."""
    from coat.config import load_config
    from coat.config_help import reference as markdown_reference
    from coat.config_help import show

    typer.echo(markdown_reference() if reference else show(load_config(config, overrides or [])), nl=False)


@app.command("preflight")
def preflight_command(
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted.key=value overrides")] = None,
    config: Annotated[Path | None, typer.Option("--config", exists=True, dir_okay=False,
                                                help="YAML config (defaults + this + overrides)")] = None,
    space: Annotated[Path | None, typer.Option(
        "--space", exists=True, dir_okay=False, help="A sweep's search space: check every backbone it names.")] = None,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="Real-size backbones get random weights instead of their checkpoints.")] = False,
    wait_s: Annotated[float, typer.Option(
        "--wait-s", min=0, help="Wait this long for an autoscaling cluster to add the nodes a run needs.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of tables.")] = False,
) -> None:
    """Check that a run will work here before it starts: Ray resources, the worker group (CUDA, bf16, an
    all-reduce), backbone weights, data and expert features, MLflow, then real training steps, a checkpoint round
    trip and a generated answer per backbone, with step time, memory, tokens/s and the thinking block's prefill
    overhead. Exits 1 naming each failure and its fix."""
    from coat.config import load_config
    from coat.preflight import print_report, run_preflight

    cfg = load_config(config, overrides or [])
    backbones = None
    if space is not None:
        from coat.tune.space import load_space

        named = [p.values for p in load_space(space, config, overrides or []).params if p.path == "backbone.name"]
        backbones = list(dict.fromkeys(named[0])) if named else None
    report = run_preflight(cfg, backbones=backbones, random_weights=random_weights, wait_s=wait_s)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report)
    for failure in report.failures:
        typer.echo(f"preflight: {failure.name}: {failure.detail}" + (f" (fix: {failure.fix})" if failure.fix else ""),
                   err=True)
    if report.failures:
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> None:
    """The `coat` command. A user's mistake (`UserError`, a missing file) prints `error: <message>` and exits with
    its code (2 for a bad command line, config or space; 1 otherwise); `--debug` anywhere on the line, or
    COAT_DEBUG=1, lets the exception through with its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with reported("--debug" in argv or os.environ.get("COAT_DEBUG") == "1"):
        app([a for a in argv if a != "--debug"], prog_name="coat")
