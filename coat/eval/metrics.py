"""Scores with their uncertainty: accuracy and WER per task family, bootstrap 95% intervals, chance levels,
latency summaries.

Intervals come from a seeded percentile bootstrap over examples, so two runs on the same predictions give the
same numbers and a K-ablation's differences can be read against them. Corpus WER is a ratio (word errors over
reference words), so it is resampled as one: both sums are taken over the same resampled utterances.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jiwer
import numpy as np
import pandas as pd

from coat.eval.tasks import normalise_text

TRANSCRIPTION = "transcription"
TABLE_COLUMNS = ("task", "metric", "value", "ci_low", "ci_high", "n", "chance")


class Estimate(NamedTuple):
    value: float
    ci_low: float
    ci_high: float
    n: int


def bootstrap_ci(numerator: Sequence[float], denominator: Sequence[float] | None = None, *, n: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of sum(numerator) / sum(denominator) over `n` resamples of the examples.

    Without `denominator` the statistic is the mean. Empty input gives (nan, nan).
    Raises ValueError if the two sequences differ in length, `n` < 1 or `level` is not in (0, 1).
    """
    num = np.asarray(numerator, dtype=np.float64)
    den = np.ones_like(num) if denominator is None else np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"numerator {num.shape} and denominator {den.shape} must be 1-D of one length")
    if n < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap needs n >= 1 and 0 < level < 1, got n={n}, level={level}")
    if num.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**22 // num.size)  # resamples per draw: bounds memory at a few tens of MB
    stats = []
    for start in range(0, n, chunk):
        idx = rng.integers(0, num.size, size=(min(chunk, n - start), num.size))
        with np.errstate(invalid="ignore", divide="ignore"):
            stats.append(num[idx].sum(1) / den[idx].sum(1))
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(np.concatenate(stats), [tail, 100 - tail])
    return float(low), float(high)


def accuracy(correct: Sequence[bool], *, n: int = 1000, seed: int = 0) -> Estimate:
    """Fraction correct with its bootstrap interval (nan for no examples). Raises nothing for valid input."""
    values = np.asarray(correct, dtype=np.float64)
    point = float(values.mean()) if values.size else float("nan")
    return Estimate(point, *bootstrap_ci(values, n=n, seed=seed), int(values.size))


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per utterance: word errors (substitutions + deletions + insertions) and reference words, by jiwer.

    Raises ValueError if the lists differ in length."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors, words = [], []
    for ref, hyp in zip(references, hypotheses, strict=True):
        if not ref.strip():  # jiwer aligns against at least one word; an empty reference has only insertions
            errors.append(len(hyp.split()))
            words.append(0)
            continue
        out = jiwer.process_words(ref, hyp)
        errors.append(out.substitutions + out.deletions + out.insertions)
        words.append(out.substitutions + out.deletions + out.hits)
    return np.asarray(errors, dtype=np.float64), np.asarray(words, dtype=np.float64)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str], *, n: int = 1000,
                    seed: int = 0) -> Estimate:
    """Corpus WER (all errors over all reference words, as jiwer computes it) with its bootstrap interval.

    Raises ValueError if the lists differ in length."""
    errors, words = word_errors(references, hypotheses)
    point = float(errors.sum() / words.sum()) if words.sum() else float("nan")
    return Estimate(point, *bootstrap_ci(errors, words, n=n, seed=seed), len(errors))


def chance_level(choices: Iterable[object]) -> float:
    """Accuracy of uniform guessing: the mean of 1/len(choices) over the examples that have choices
    (nan when none has). Raises nothing."""
    sizes = [len(c) for c in choices if isinstance(c, list | tuple | np.ndarray) and len(c)]
    return float(np.mean([1 / k for k in sizes])) if sizes else float("nan")


def task_table(examples: pd.DataFrame, *, n: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per task family (and per `task/category` when the examples carry a `category`, e.g. MMAU's
    sound/music/speech): WER for transcription, accuracy otherwise, with interval, count and chance.

    `examples` needs `task`, `correct`, `answer`, `prediction` and `choices` columns (as `evaluate` makes).
    Raises KeyError naming a missing column.
    """
    missing = [c for c in ("task", "correct", "answer", "prediction", "choices") if c not in examples]
    if missing:
        raise KeyError(f"examples lack columns {missing}")
    groups: list[tuple[str, pd.DataFrame]] = [(str(t), g) for t, g in examples.groupby("task", sort=True)]
    if "category" in examples:
        with_category = examples[examples["category"].notna()]
        groups += [(f"{t}/{c}", g) for (t, c), g in with_category.groupby(["task", "category"], sort=True)]
    rows = []
    for name, group in sorted(groups, key=lambda item: item[0]):
        if name.split("/")[0] == TRANSCRIPTION:
            refs = [normalise_text(a) for a in group["answer"]]
            est, metric = word_error_rate(refs, list(group["prediction"]), n=n, seed=seed), "wer"
        else:
            est, metric = accuracy(group["correct"].astype(bool), n=n, seed=seed), "accuracy"
        rows.append((name, metric, est.value, est.ci_low, est.ci_high, est.n, chance_level(group["choices"])))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def latency_summary(examples: pd.DataFrame) -> dict[str, float]:
    """Means (and 90th percentiles) over examples of their batch's time to first token and total generation
    time, generated tokens per example, LLM forward calls per batch and seconds per decode step.

    Needs columns `ttft_s`, `total_s`, `new_tokens`, `llm_calls`, `batch`. Raises KeyError naming a missing
    column; empty input gives an empty dict.
    """
    missing = [c for c in ("ttft_s", "total_s", "new_tokens", "llm_calls", "batch") if c not in examples]
    if missing:
        raise KeyError(f"examples lack columns {missing}")
    if examples.empty:
        return {}
    batches = examples.groupby("batch").first()
    steps = (batches["llm_calls"] - 1).clip(lower=0)
    decode_s = (batches["total_s"] - batches["ttft_s"]).sum()
    return {
        "ttft_s": float(examples["ttft_s"].mean()),
        "ttft_p90_s": float(examples["ttft_s"].quantile(0.9)),
        "total_s": float(examples["total_s"].mean()),
        "total_p90_s": float(examples["total_s"].quantile(0.9)),
        "new_tokens": float(examples["new_tokens"].mean()),
        "llm_calls": float(batches["llm_calls"].mean()),
        "s_per_decode_step": float(decode_s / steps.sum()) if steps.sum() else float("nan"),
        "s_per_example": float(batches["total_s"].sum() / len(examples)),
    }
