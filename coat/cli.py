"""`coat ...`: the command line. Each area owns its sub-commands; this file only mounts them and turns a user's
mistake into one line (`coat.errors`).

Importing this module loads no torch, Ray, MLflow or transformers: each command imports what it needs when it
runs, so `coat --help` answers at once.
"""

import os
import sys

import typer

from coat.analysis.analyze_cli import analyze_command
from coat.analysis.probe_cli import probe_command
from coat.data.cli import app as data_app
from coat.errors import UserError
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


def main(argv: list[str] | None = None) -> None:
    """The `coat` command. A user's mistake (`UserError`, a missing file) prints `error: <message>` and exits with
    its code (2 for a bad command line, config or space; 1 otherwise); `--debug` anywhere on the line, or
    COAT_DEBUG=1, lets the exception through with its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("COAT_DEBUG") == "1"
    try:
        app([a for a in argv if a != "--debug"], prog_name="coat")
    except (UserError, FileNotFoundError) as err:
        if debug:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(getattr(err, "exit_code", 1))
