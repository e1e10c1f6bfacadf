"""`coat ...`: the command line. Each area owns its sub-commands; this file only mounts them."""

import typer

from coat.analysis.analyze_cli import analyze_command
from coat.analysis.probe_cli import probe_command
from coat.data.cli import app as data_app
from coat.eval.cli import eval_command
from coat.eval.score_cli import score_command
from coat.experts.cli import app as experts_app
from coat.experts.precompute_cli import precompute_command
from coat.train.cli import train_command
from coat.tune.cli import sweep_command

app = typer.Typer(
    help="Continuous Audio Thinking: data, experts, training, evaluation and sweeps.", no_args_is_help=True
)
experts_app.command("precompute")(precompute_command)
app.add_typer(data_app, name="data")
app.add_typer(experts_app, name="experts")
app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("score")(score_command)
app.command("analyze")(analyze_command)
app.command("probe")(probe_command)
app.command("sweep")(sweep_command)
