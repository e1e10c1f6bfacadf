"""`coat score`: a predictions file scored offline by its suite's recipe, and its metrics as JSON records (the
tables are `coat.report`'s)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

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
    examples = score_examples(rows, recipe.rule)
    if "circular_responses" in examples:
        examples = examples.assign(correct_circular=circular_correct(examples, recipe.rule))
    return examples, declared.pop() if declared else "generate"


def circular_correct(examples: pd.DataFrame, rule: str) -> pd.Series:
    """Whether each item is right under every rotation of its choices, each of its `circular_responses` scored by
    `rule` as its first answer is (what the file's own `correct_circular` says was scored by the rule of the run that
    wrote it); NaN for an item without them, which the circular accuracy then leaves out."""
    asked = examples[examples["circular_responses"].map(lambda said: isinstance(said, list) and len(said) > 0)]
    rotations = asked[["id", "task", "answer", "choices", "circular_responses"]].explode("circular_responses")
    rotations = rotations.rename(columns={"circular_responses": "response"}).reset_index(drop=True)
    right = score_examples(rotations, rule).groupby("id")["correct"].all() if len(rotations) else pd.Series(dtype=bool)
    return examples["id"].map(right)


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


def records(table: pd.DataFrame) -> list[dict]:
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            for row in json.loads(table.to_json(orient="records"))]
