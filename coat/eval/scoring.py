"""Scoring as the benchmarks score: model text to per-example scores, per-suite tables with bootstrap
intervals, paired comparisons of two systems, and predictions files in each benchmark's own format.

Rules (`coat.config.SCORING_RULES`): `string_match` is MMAU's and MMAR's published scorer, re-implemented so
numbers are comparable with their leaderboards; `choice` reads the one choice the text names
(`coat.eval.tasks.parse_answer`), so hedging never scores; items without choices are scored by word error
rate after Whisper's English normaliser whatever the rule, as LibriSpeech results are reported. The evaluation
(`evaluate.py`) and `coat score` both go through `score_examples` and `results_table`, so a number means the
same wherever it was computed.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from coat.config import SCORING_MODES, SCORING_RULES, SUITE_METRICS, default_suites
from coat.data.corpora import question_rows, read_records
from coat.data.manifest import write_table
from coat.eval.metrics import (
    TRANSCRIPTION,
    accuracy,
    chance_level,
    paired_bootstrap,
    weighted_f1,
    word_error_rate,
    word_errors,
)
from coat.eval.tasks import is_correct, parse_answer

TABLE_COLUMNS = ("task", "metric", "value", "ci_low", "ci_high", "n", "chance", "scoring")
PAIRED_COLUMNS = ("task", "metric", "a", "b", "diff", "diff_ci_low", "diff_ci_high", "p_bootstrap", "p_mcnemar",
                  "n_pairs", "a_only_correct", "b_only_correct")
# The field each official evaluation.py reads the model's output from.
SUBMISSION_KEYS = {"mmau": "model_output", "mmar": "answer_prediction"}
# The task family of every item of a single-family suite (coat-mini's rows carry their own).
SUITE_FAMILIES = {"mmau": "reasoning", "mmar": "reasoning", "meld": "emotion", "librispeech": TRANSCRIPTION,
                  "gtzan": "music"}
RECORD_COLUMNS = ("id", "task", "answer", "choices", "output", "response", "prediction", "correct", "wer",
                  "correct_circular", "circular_responses", "scoring", "out_of_budget", "source")
CIRCULAR = "circular_accuracy"  # right under every rotation of the choices (`coat.eval.evaluate.circular_rows`)
# Per example: tokens generated and seconds in its batch (quality pass); where the latency pass measured it alone,
# its time to first token and to the whole answer.
LATENCY_COLUMNS = ("new_tokens", "batch_s_per_example", "ttft_s", "latency_s")
_WORD = re.compile(r"\b\w+\b")
_NOT_IN_METRIC_KEY = re.compile(r"[^\w.\- ]")  # MLflow allows [/\w.\- ] in keys; "/" separates ours


def string_match(answer: str, prediction: str, choices: Sequence[str]) -> bool:
    """MMAU's and MMAR's published scorer: with text as its set of lower-cased `\\b\\w+\\b` tokens, right when
    the prediction holds every answer token and none of the tokens other choices have beyond the answer's (a
    choice with the answer's very tokens is ignored). An empty prediction is wrong. Raises nothing."""

    def tokens(text: str | None) -> set[str]:
        return set(_WORD.findall((text or "").lower()))

    said, right = tokens(prediction), tokens(answer)
    if not said:
        return False
    wrong = set().union(*(t - right for t in map(tokens, choices) if t != right))
    return right <= said and said.isdisjoint(wrong)


@functools.cache
def _english():
    # the normaliser's import is slow: only transcription scoring needs it
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalise_transcript(text: str) -> str:
    """Whisper's English normaliser: case, punctuation, spelling variants, numbers ("TWENTY ONE" -> "21") and
    titles ("Mr." -> "mister") made uniform, so WER counts words, not conventions. Raises nothing."""
    return _english()(text)


def _choice_list(value: object) -> list | None:
    if isinstance(value, list | tuple | np.ndarray) and len(value):
        return list(value)
    return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def metric_key(metric: str, scoring: str) -> str:
    """A metric's reported name: `loglik_` in front when the choice was the model's most likely one rather than
    read from its text (WER is always from generated text, so never). Raises nothing."""
    return f"loglik_{metric}" if scoring == "loglik" and metric != "wer" else metric


def score_examples(examples: pd.DataFrame, rule: str) -> pd.DataFrame:
    """`examples` with `prediction`, `correct` and `wer` (per example errors/words, NaN without a transcript)
    set by `rule`.

    Needs `id`, `task`, `answer`, `choices` and the text to score in `response`. A choice item whose
    `response` is missing but whose `prediction` is set (a chosen choice) is scored as if it had said that
    choice's text, as the benchmark's own script scores a submission of it (under MMAU's string match, a choice
    holding the answer's words in another order is right), and that text becomes its `response`. A choice item's
    prediction is, for `string_match`,
    the answer when matched, else the response; for `choice` (and `wer`) the one choice the response names, or
    "". Items without choices get the normalised transcript and are right on an exact match.

    Raises ValueError naming an unknown rule, missing columns, or the ids of rows without an answer (which
    `coat.data.manifest.validate_rows` quarantines).
    """
    if rule not in SCORING_RULES:
        raise ValueError(f"scoring rule {rule!r} is not one of {', '.join(SCORING_RULES)}")
    missing = [c for c in ("id", "task", "answer", "choices") if c not in examples]
    if "response" not in examples and "prediction" not in examples:
        missing.append("response (or prediction)")
    if missing:
        raise ValueError(f"score_examples: examples lack the columns {missing}")
    no_answer = examples.loc[~examples["answer"].map(lambda a: isinstance(a, str)), "id"].tolist()
    if no_answer:
        raise ValueError(f"score_examples: examples {no_answer[:5]} have no answer; quarantine them first "
                         "(coat.data.manifest.validate_rows)")
    absent = pd.Series(None, index=examples.index, dtype=object)
    responses, chosen = examples.get("response", absent), examples.get("prediction", absent)
    predictions, correct, wer, said = [], [], [], []
    for task, answer, choices, response, prediction in zip(
            examples["task"], examples["answer"], examples["choices"], responses, chosen, strict=True):
        choices, response = _choice_list(choices), _text(response)
        said.append(response)
        if choices is None:
            hypothesis = normalise_transcript(response if response is not None else _text(prediction) or "")
            reference = normalise_transcript(answer)
            errors, words = word_errors([reference], [hypothesis])
            predictions.append(hypothesis)
            correct.append(hypothesis == reference != "")
            wer.append(errors[0] / words[0] if words[0] else math.nan)
            continue
        wer.append(math.nan)
        if response is None:  # the choice log-likelihood scoring chose: scored as its text, as a submission is
            response = said[-1] = _text(prediction) or ""
        if rule == "string_match":
            correct.append(string_match(answer, response, choices))
            predictions.append(answer if correct[-1] else response)
        else:
            predictions.append(parse_answer(task, response, choices))
            correct.append(is_correct(task, predictions[-1], answer, choices))
    out = examples.copy()
    out["response"] = pd.Series(said, index=examples.index, dtype=object)
    out["prediction"] = pd.Series(predictions, index=examples.index, dtype=object)
    out["correct"] = pd.Series(correct, index=examples.index, dtype=bool)
    out["wer"] = pd.Series(wer, index=examples.index, dtype=np.float64)
    return out


def _hypotheses(predictions: pd.Series) -> list[str]:
    return [p if isinstance(p, str) else "" for p in predictions]


def _references(answers: pd.Series) -> list[str]:
    return [normalise_transcript(a) for a in answers]


def _family_rows(name: str, family: str, group: pd.DataFrame, metrics: Sequence[str], scoring: str, n: int,
                 seed: int) -> list[tuple]:
    chance = chance_level(group["choices"])
    if family == TRANSCRIPTION:
        est = word_error_rate(_references(group["answer"]), _hypotheses(group["prediction"]), n=n, seed=seed)
        return [(name, "wer", *est[:3], est.n, chance, scoring)]
    rows = []
    for metric in metrics:
        if metric == "accuracy":
            est = accuracy(group["correct"].astype(bool), n=n, seed=seed)
        else:  # the gold label where right, else what was said ("" for no answer): a label of its own
            said = np.where(group["correct"].astype(bool), group["answer"], _hypotheses(group["prediction"]))
            est = weighted_f1(list(group["answer"]), list(said), n=n, seed=seed)
        rows.append((name, metric, *est[:3], est.n, stratified_f1(group["answer"]) if metric == "weighted_f1"
                     else chance, scoring))
    circular = group["correct_circular"].dropna() if "correct_circular" in group else ()
    if len(circular):  # an item without its rotations' answers is in no circular accuracy
        est = accuracy(circular.astype(bool), n=n, seed=seed)
        rows.append((name, CIRCULAR, *est[:3], est.n, chance, scoring))
    return rows


def stratified_f1(gold: Sequence[str]) -> float:
    """Weighted F1's chance: a guesser drawing labels at the gold shares p_c scores F1 p_c on class c, so
    sum_c p_c^2 over the support-weighted classes (uniform accuracy is the wrong reference for it). Raises
    nothing."""
    shares = pd.Series(list(gold)).value_counts(normalize=True)
    return float((shares**2).sum()) if len(shares) else math.nan


def _metric_part(value: object) -> str:
    return _NOT_IN_METRIC_KEY.sub("_", str(value))


def results_table(examples: pd.DataFrame, *, metrics: Sequence[str], breakdowns: Sequence[str], scoring: str,
                  n: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Scores of scored `examples` (from `score_examples`) with seeded bootstrap 95% intervals.

    One row per task family (WER for transcription, each of `metrics` otherwise), then one per family, field
    of `breakdowns` and value, read from the column `group.<field>` and named `<family>/<field>.<value>` with
    characters MLflow refuses in metric keys replaced by "_". Columns: `TABLE_COLUMNS`; `chance` as uniform
    guessing scores accuracy, and as a guesser at the gold label shares scores weighted F1 (`stratified_f1`);
    `scoring` ("generate" or "loglik") is in every row, so the mode stays with the number.
    Examples with `correct_circular` (a circular evaluation) add a `circular_accuracy` row to each choice row
    group.

    Raises ValueError naming an unknown metric or scoring mode, or columns the examples lack.
    """
    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring {scoring!r} is not one of {', '.join(SCORING_MODES)}")
    unknown = [m for m in metrics if m not in SUITE_METRICS]
    if unknown:
        raise ValueError(f"metrics {unknown} are not among {', '.join(SUITE_METRICS)}")
    missing = [c for c in ("task", "answer", "choices", "prediction", "correct") if c not in examples]
    missing += [f"group.{b}" for b in breakdowns if f"group.{b}" not in examples]
    if missing:
        raise ValueError(f"results_table: examples lack the columns {missing}; score them with score_examples, "
                         "and take breakdown fields from the suite's loader (coat.data.corpora)")
    families = sorted(examples["task"].astype(str).unique())
    rows = []
    for family in families:
        rows += _family_rows(family, family, examples[examples["task"] == family], metrics, scoring, n, seed)
    for family in families:
        group = examples[examples["task"] == family]
        for field in breakdowns:
            column = group[f"group.{field}"]
            keys = column.map(_metric_part).where(column.notna())
            for value in sorted(keys.dropna().unique()):
                rows += _family_rows(f"{family}/{_metric_part(field)}.{value}", family, group[keys == value],
                                     metrics, scoring, n, seed)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def table_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Flat MLflow names: `eval/<task>/<metric>` and its `_ci_low`/`_ci_high`, `eval/<task>/n` and
    `eval/<task>/chance` (when defined; `eval/<task>/<metric>_chance` for weighted F1, whose chance is its own) and
    `eval/<task>/chance_empirical` (log-likelihood scoring: the model on silence); `<metric>` is `loglik_<metric>`
    for log-likelihood scoring. Raises nothing for a table from `results_table`."""
    out: dict[str, float] = {}
    for row in table.to_dict(orient="records"):
        key = f"eval/{row['task']}/{metric_key(row['metric'], row.get('scoring', 'generate'))}"
        out |= {key: float(row["value"]), f"{key}_ci_low": float(row["ci_low"]),
                f"{key}_ci_high": float(row["ci_high"]), f"eval/{row['task']}/n": float(row["n"])}
        chance = f"{key}_chance" if row["metric"] == "weighted_f1" else f"eval/{row['task']}/chance"
        if pd.notna(row["chance"]):
            out[chance] = float(row["chance"])
        if pd.notna(row.get("chance_empirical", math.nan)):
            out[f"{chance}_empirical"] = float(row["chance_empirical"])
    return out


def paired_comparison(a: pd.DataFrame, b: pd.DataFrame, *, n: int = 1000, seed: int = 0,
                      correct: str = "correct") -> pd.DataFrame:
    """System `a` against system `b` per task family, on the examples both scored (joined on `id`).

    Accuracy, or corpus WER for transcription, for each system and their difference with a paired bootstrap
    interval and two-sided p (`metrics.paired_bootstrap`), the exact McNemar p on the discordant pairs
    (accuracy only; NaN for WER) and their counts. `correct="correct_circular"` compares circular accuracy (choice
    items only). Columns: `PAIRED_COLUMNS`. Ids in only one table are left out and counted in
    `attrs["a_unpaired"]` and `attrs["b_unpaired"]`.

    Raises ValueError naming missing columns or duplicate ids.
    """
    # scipy.stats takes a second to import: only the paired comparison needs it
    from scipy.stats import binomtest

    for name, table in (("a", a), ("b", b)):
        missing = [c for c in ("id", "task", "answer", "prediction", correct) if c not in table]
        if missing:
            raise ValueError(f"paired_comparison: {name} lacks the columns {missing}; score it with score_examples")
        dup = table.loc[table["id"].duplicated(), "id"].tolist()
        if dup:
            raise ValueError(f"paired_comparison: {name} holds ids more than once, e.g. {dup[:3]}")
    circular = correct == "correct_circular"
    pairs = a[["id", "task", "answer", "prediction", correct]].rename(columns={correct: "correct"}).merge(
        b[["id", "prediction", correct]].rename(columns={correct: "correct"}), on="id", suffixes=("_a", "_b"))
    if circular:
        pairs = pairs[pairs["task"] != TRANSCRIPTION]
    rows = []
    for family, group in pairs.groupby("task", sort=True):
        if family == TRANSCRIPTION:
            refs = _references(group["answer"])
            errors_a, words = word_errors(refs, _hypotheses(group["prediction_a"]))
            errors_b, _ = word_errors(refs, _hypotheses(group["prediction_b"]))
            with np.errstate(invalid="ignore", divide="ignore"):
                value_a, value_b = errors_a.sum() / words.sum(), errors_b.sum() / words.sum()
            low, high, p = paired_bootstrap(errors_a, errors_b, words, words, n=n, seed=seed)
            rows.append((family, "wer", value_a, value_b, value_a - value_b, low, high, p, math.nan, len(group),
                         math.nan, math.nan))
            continue
        right_a, right_b = group["correct_a"].astype(bool).to_numpy(), group["correct_b"].astype(bool).to_numpy()
        low, high, p = paired_bootstrap(right_a, right_b, n=n, seed=seed)
        a_only, b_only = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
        mcnemar = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
        rows.append((family, CIRCULAR if circular else "accuracy", right_a.mean(), right_b.mean(),
                     right_a.mean() - right_b.mean(), low, high, p, float(mcnemar), len(group), a_only, b_only))
    out = pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))
    out.attrs["a_unpaired"] = int((~a["id"].isin(b["id"])).sum())
    out.attrs["b_unpaired"] = int((~b["id"].isin(a["id"])).sum())
    return out


def _check_suite(suite: str) -> None:
    if suite not in default_suites():
        raise ValueError(f"suite {suite!r} is not one of {', '.join(default_suites())}")


def write_predictions(examples: pd.DataFrame, suite: str, path: str | Path) -> Path:
    """Write scored examples where `coat score` (and, for MMAU and MMAR, the benchmark's own evaluation.py)
    can read them back.

    MMAU: a JSON list of the benchmark items (`item`) each with `model_output`, the response (the chosen
    choice under log-likelihood scoring). MMAR: the same with `answer_prediction`, as JSON Lines when `path`
    ends in .jsonl, else a JSON list. Other suites: JSON Lines of `RECORD_COLUMNS`, `group.*` and latency
    columns, those present. Creates parent folders.

    Raises ValueError naming an unknown suite, a suffix the format cannot have, or examples without `item`.
    """
    _check_suite(suite)
    path = Path(path)
    if suite not in SUBMISSION_KEYS:
        if path.suffix != ".jsonl":
            raise ValueError(f"{path}: {suite} predictions are JSON Lines; give a .jsonl path")
        columns = [c for c in examples if c in RECORD_COLUMNS or c.startswith("group.") or c in LATENCY_COLUMNS]
        frame = examples[columns].copy()
        if "choices" in frame:
            frame["choices"] = frame["choices"].map(_choice_list)
        return write_table(frame, path)
    if suite == "mmau" and path.suffix == ".jsonl":
        raise ValueError(f"{path}: MMAU's evaluation.py reads one JSON list; give a .json path")
    if suite == "mmar" and path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: MMAR's evaluation.py reads .json or .jsonl files only")
    if "item" not in examples or not examples["item"].map(lambda item: isinstance(item, dict)).all():
        raise ValueError(f"{suite} predictions need each example's benchmark item (column item): load the suite "
                         f"with coat.data.corpora.load_{suite}")
    absent = pd.Series(None, index=examples.index, dtype=object)
    said = [_text(r) if _text(r) is not None else _text(p) or "" for r, p in
            zip(examples.get("response", absent), examples.get("prediction", absent), strict=True)]
    declared = examples.get("scoring", absent)  # how each answer was made, kept beside the official fields
    records = [{**item, SUBMISSION_KEYS[suite]: text, **({"scoring": how} if isinstance(how, str) else {})}
               for item, text, how in zip(examples["item"], said, declared, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        else:
            json.dump(records, f, ensure_ascii=False, indent=1)
    return path


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def read_predictions(path: str | Path, suite: str) -> pd.DataFrame:
    """Inverse of `write_predictions`: rows ready for `score_examples`.

    MMAU/MMAR: their submission format; items without the output field are skipped, as the official scripts
    skip them, and counted in `attrs["skipped"]` (a file where every item lacks it is an error). Other suites:
    JSON Lines records with `id`, `answer`, `response` or `prediction`, `choices` for items other than
    transcription, and `task` for coat-mini.

    Raises FileNotFoundError for a missing file, ValueError for an empty file, one naming the file, line and
    field that is missing or malformed, or an unknown suite.
    """
    _check_suite(suite)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file")
    records = read_records(path)
    if not records:
        raise ValueError(f"{path}: holds no predictions")
    if suite in SUBMISSION_KEYS:
        key = SUBMISSION_KEYS[suite]
        kept = [(where, item) for where, item in records if key in item]
        if not kept:
            raise ValueError(f"{path}: no item has {key!r}, the field {suite}'s evaluation.py scores; is it a "
                             f"{suite} predictions file?")
        for where, item in kept:
            for field in ("id", "answer", "choices"):
                if _missing(item.get(field)):
                    raise ValueError(f"{where}: no {field!r}; {suite} predictions are the benchmark's items "
                                     f"with {key!r} added")
        rows, _ = question_rows(suite, [item for _, item in kept], path.parent)
        rows["response"] = pd.Series([_text(item[key]) or "" for _, item in kept], index=rows.index, dtype=object)
        rows["scoring"] = pd.Series([item.get("scoring") for _, item in kept], index=rows.index, dtype=object)
        rows.attrs["skipped"] = len(records) - len(kept)
        return rows
    family = SUITE_FAMILIES.get(suite)
    rows = []
    for where, record in records:
        needed = ["id", "answer"] + (["task"] if family is None else [])
        for field in needed:
            if _missing(record.get(field)):
                raise ValueError(f"{where}: no {field!r}; {suite} predictions need {', '.join(needed)}")
        if _text(record.get("response")) is None and _text(record.get("prediction")) is None:
            raise ValueError(f"{where}: no 'response' (or 'prediction' for log-likelihood scoring) to score")
        task = record.get("task") or family
        if task != TRANSCRIPTION and _choice_list(record.get("choices")) is None:
            raise ValueError(f"{where}: no 'choices'; a {task} item is scored against its list of choices")
        rows.append({**record, "id": str(record["id"]), "task": task})
    frame = pd.DataFrame(rows)
    for column in ("id", "task", "answer", "choices", "response", "prediction"):
        if column not in frame:
            frame[column] = None
    frame.attrs["skipped"] = 0
    return frame.astype({"choices": object, "response": object, "prediction": object})

