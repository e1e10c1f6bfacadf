"""`coat score`: rescore a predictions file offline with its suite's recipe, and compare two systems on it.

    coat score --suite mmau runs/k16/mmau-predictions.json
    coat score --suite meld runs/k16/meld.jsonl --json
    coat score --suite coat-mini runs/k16/coat-mini.jsonl --against runs/base/coat-mini.jsonl

Scoring needs no model, so the rule can be changed or checked after a run; this module keeps torch, Ray and
MLflow out of its imports so that it starts in a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from coat.config import default_suites


def score_command(
    file: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False, metavar="FILE",
        help="Predictions file (write_predictions: the benchmark's submission format for mmau/mmar, JSON Lines "
             "otherwise).")],
    suite: Annotated[str, typer.Option("--suite", help=f"One of {', '.join(default_suites())}.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print only {\"metrics\": {...}} as JSON.")] = False,
    against: Annotated[Path | None, typer.Option(
        "--against", exists=True, dir_okay=False,
        help="A second system's predictions on the same suite: adds a paired comparison (FILE minus it).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=1, help="Resamples for the intervals.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
) -> None:
    """Rescore FILE with the suite's recipe (rule, metrics, breakdowns) and print scores with 95% intervals.

    Exits 2 on a bad option or a missing file, 1 when a file cannot be read as the suite's predictions.
    """
    from coat.eval import score_report as report
    from coat.eval.scoring import paired_comparison, results_table

    suites = default_suites()
    if suite not in suites:
        raise typer.BadParameter(f"{suite!r} is not one of {', '.join(suites)}", param_hint="--suite")
    recipe = suites[suite]
    console = Console()
    try:
        examples, scoring = report.scored(file, suite, recipe)
        other = report.scored(against, suite, recipe)[0] if against is not None else None
    except (OSError, ValueError) as err:
        Console(stderr=True).print(f"[red]error:[/] {err}", highlight=False)
        raise typer.Exit(1) from None
    table = results_table(examples, metrics=recipe.metrics, breakdowns=recipe.breakdowns, scoring=scoring,
                          n=bootstrap, seed=seed)
    paired = None if other is None else paired_comparison(examples, other, n=bootstrap, seed=seed)
    if as_json:
        out: dict = {"metrics": report.json_metrics(examples, table, recipe, scoring)}
        if paired is not None:
            out["paired"] = report.records(paired)
        typer.echo(json.dumps(out, indent=2))
        return
    console.print(report.results(table, f"{suite}: {file} ({recipe.rule}, {scoring})"))
    if examples.attrs.get("skipped"):
        console.print(f"{examples.attrs['skipped']} items without a model output skipped, as the official "
                      "scorer skips them")
    if paired is not None:
        console.print(report.paired(paired, f"A: {file}, B: {against}, paired on id"))
        unpaired = paired.attrs["a_unpaired"] + paired.attrs["b_unpaired"]
        if unpaired:
            console.print(f"not compared: {paired.attrs['a_unpaired']} ids only in A, "
                          f"{paired.attrs['b_unpaired']} only in B")
