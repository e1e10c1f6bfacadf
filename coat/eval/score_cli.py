"""`coat score`: rescore a predictions file offline with its suite's recipe, and compare two systems on it.

    coat score --suite mmau runs/k16/mmau-predictions.json
    coat score --suite meld runs/k16/meld.jsonl --json
    coat score --suite coat-mini runs/k16/coat-mini.jsonl --against runs/base/coat-mini.jsonl

Scoring needs no model, so the rule can be changed or checked after a run; this module keeps torch, Ray and
MLflow out of its imports so that it starts in a second.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from coat.config import SuiteRecipe, default_suites
from coat.eval.metrics import TRANSCRIPTION
from coat.eval.scoring import (
    metric_key,
    paired_comparison,
    read_predictions,
    results_table,
    score_examples,
)


def _scored(path: Path, suite: str, recipe: SuiteRecipe) -> tuple[pd.DataFrame, str]:
    """The file's examples scored by the recipe's rule, and the scoring mode they were produced in."""
    rows = read_predictions(path, suite)
    choice = rows["choices"].map(lambda c: isinstance(c, list) and len(c) > 0)
    said = rows["response"].map(lambda r: isinstance(r, str))
    scoring = "loglik" if choice.any() and not said[choice].any() else "generate"
    return score_examples(rows, recipe.rule), scoring


def _json_metrics(examples: pd.DataFrame, table: pd.DataFrame, recipe: SuiteRecipe, scoring: str) -> dict:
    """`accuracy`, `weighted_f1`, `wer` over the whole suite and `<field>.<value>/<metric>` per breakdown; a
    suite of several task families (coat-mini) also gets `<family>/...` for each."""
    families = sorted(examples["task"].astype(str).unique())
    out = {}
    for row in table.to_dict(orient="records"):
        family, _, group = row["task"].partition("/")
        name = "/".join(part for part in (family if len(families) > 1 else "", group,
                                          metric_key(row["metric"], scoring)) if part)
        out[name] = row["value"]
    choice = examples[examples["task"] != TRANSCRIPTION]
    if len(families) > 1 and len(choice):  # point values only, so a single resample
        overall = results_table(choice.assign(task="all"), metrics=recipe.metrics, breakdowns=[], scoring=scoring,
                                n=1)
        out |= {metric_key(m, scoring): v for m, v in zip(overall["metric"], overall["value"], strict=True)}
    speech = table.loc[table["task"] == TRANSCRIPTION, "value"]
    if len(families) > 1 and len(speech):
        out["wer"] = speech.iloc[0]
    return {k: None if isinstance(v, float) and math.isnan(v) else float(v) for k, v in out.items()}


def _number(value: float, digits: int = 3) -> str:
    return "" if pd.isna(value) else f"{value:.{digits}f}"


def _table(title: str, columns: tuple[str, ...]) -> Table:
    """Numbers never wrap; names and intervals fold, so a narrow terminal (80 columns in CI logs) loses nothing."""
    out = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in columns:
        text = col in ("task", "metric", "95% CI")
        out.add_column(col, justify="left" if col in ("task", "metric") else "right", overflow="fold",
                       no_wrap=not text, min_width=13 if col == "task" else None)
    return out


def _results(table: pd.DataFrame, title: str) -> Table:
    out = _table(title, ("task", "metric", "value", "95% CI", "n", "chance"))
    for row in table.itertuples(index=False):
        out.add_row(row.task, metric_key(row.metric, row.scoring), _number(row.value),
                    f"[{_number(row.ci_low)}, {_number(row.ci_high)}]", str(row.n), _number(row.chance))
    return out


def _paired(table: pd.DataFrame, title: str) -> Table:
    out = _table(title, ("task", "A", "B", "A - B", "95% CI", "p boot", "p McN", "only A/B"))
    for row in table.itertuples(index=False):
        only = "" if pd.isna(row.a_only_correct) else f"{row.a_only_correct:.0f}/{row.b_only_correct:.0f}"
        out.add_row(f"{row.task} {row.metric}, {row.n_pairs} pairs", _number(row.a), _number(row.b),
                    f"{row.diff:+.3f}", f"[{row.diff_ci_low:+.3f}, {row.diff_ci_high:+.3f}]",
                    _number(row.p_bootstrap), _number(row.p_mcnemar), only)
    return out


def _records(table: pd.DataFrame) -> list[dict]:
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            for row in json.loads(table.to_json(orient="records"))]


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
    suites = default_suites()
    if suite not in suites:
        raise typer.BadParameter(f"{suite!r} is not one of {', '.join(suites)}", param_hint="--suite")
    recipe = suites[suite]
    console = Console()
    try:
        examples, scoring = _scored(file, suite, recipe)
        other = _scored(against, suite, recipe)[0] if against is not None else None
    except (OSError, ValueError) as err:
        Console(stderr=True).print(f"[red]error:[/] {err}", highlight=False)
        raise typer.Exit(1) from None
    table = results_table(examples, metrics=recipe.metrics, breakdowns=recipe.breakdowns, scoring=scoring,
                          n=bootstrap, seed=seed)
    paired = None if other is None else paired_comparison(examples, other, n=bootstrap, seed=seed)
    if as_json:
        out: dict = {"metrics": _json_metrics(examples, table, recipe, scoring)}
        if paired is not None:
            out["paired"] = _records(paired)
        typer.echo(json.dumps(out, indent=2))
        return
    console.print(_results(table, f"{suite}: {file} ({recipe.rule}, {scoring})"))
    if examples.attrs.get("skipped"):
        console.print(f"{examples.attrs['skipped']} items without a model output skipped, as the official "
                      "scorer skips them")
    if paired is not None:
        console.print(_paired(paired, f"A: {file}, B: {against}, paired on id"))
        unpaired = paired.attrs["a_unpaired"] + paired.attrs["b_unpaired"]
        if unpaired:
            console.print(f"not compared: {paired.attrs['a_unpaired']} ids only in A, "
                          f"{paired.attrs['b_unpaired']} only in B")
