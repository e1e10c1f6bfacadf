"""What `coat score` prints: a predictions file scored by its suite's recipe, as tables or JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from rich import box
from rich.table import Table

from coat.config import SCORING_MODES, SuiteRecipe
from coat.eval.metrics import TRANSCRIPTION
from coat.eval.scoring import (
    metric_key,
    read_predictions,
    results_table,
    score_examples,
)


def scored(path: Path, suite: str, recipe: SuiteRecipe) -> tuple[pd.DataFrame, str]:
    """The file's examples scored by the recipe's rule, and the scoring mode the file says they were produced in
    (its records' `scoring`, which `coat eval` writes; "generate", so plain metric names, when it says nothing).

    Raises ValueError naming the file when its records declare different or unknown modes."""
    rows = read_predictions(path, suite)
    declared = set(rows["scoring"].dropna()) if "scoring" in rows else set()
    if len(declared) > 1 or not declared <= set(SCORING_MODES):
        raise ValueError(f"{path}: its records declare the scoring modes {sorted(declared)}; one of "
                         f"{', '.join(SCORING_MODES)} per file")
    return score_examples(rows, recipe.rule), declared.pop() if declared else "generate"


def json_metrics(examples: pd.DataFrame, table: pd.DataFrame, recipe: SuiteRecipe, scoring: str) -> dict:
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


def results(table: pd.DataFrame, title: str) -> Table:
    out = _table(title, ("task", "metric", "value", "95% CI", "n", "chance"))
    for row in table.itertuples(index=False):
        out.add_row(row.task, metric_key(row.metric, row.scoring), _number(row.value),
                    f"[{_number(row.ci_low)}, {_number(row.ci_high)}]", str(row.n), _number(row.chance))
    return out


def paired(table: pd.DataFrame, title: str) -> Table:
    out = _table(title, ("task", "A", "B", "A - B", "95% CI", "p boot", "p McN", "only A/B"))
    for row in table.itertuples(index=False):
        only = "" if pd.isna(row.a_only_correct) else f"{row.a_only_correct:.0f}/{row.b_only_correct:.0f}"
        out.add_row(f"{row.task} {row.metric}, {row.n_pairs} pairs", _number(row.a), _number(row.b),
                    f"{row.diff:+.3f}", f"[{row.diff_ci_low:+.3f}, {row.diff_ci_high:+.3f}]",
                    _number(row.p_bootstrap), _number(row.p_mcnemar), only)
    return out


def records(table: pd.DataFrame) -> list[dict]:
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            for row in json.loads(table.to_json(orient="records"))]
