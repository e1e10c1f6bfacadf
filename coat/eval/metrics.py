"""Scores with their uncertainty: accuracy, weighted F1 and WER, bootstrap 95% intervals, paired differences,
chance levels.

Intervals come from a seeded percentile bootstrap over examples, so two runs on the same predictions give the
same numbers and a K-ablation's differences can be read against them. Corpus WER is a ratio (word errors over
reference words), so it is resampled as one: both sums are taken over the same resampled utterances. Two
systems are compared on the same resampled examples (`paired_bootstrap`), which is what makes a small
difference on a shared test set readable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jiwer
import numpy as np

TRANSCRIPTION = "transcription"


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


def weighted_f1(gold: Sequence[str], predicted: Sequence[str], *, n: int = 1000, seed: int = 0) -> Estimate:
    """F1 averaged over the gold labels weighted by their support (what the MELD literature reports), with a
    bootstrap interval; each resample averages over the gold labels it holds. A prediction outside the gold
    labels (e.g. "" for no answer) is simply wrong.

    Raises ValueError if the lists differ in length or `n` < 1."""
    from sklearn.metrics import f1_score  # sklearn takes seconds to import: only when F1 is asked for

    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if n < 1:
        raise ValueError(f"bootstrap needs n >= 1, got n={n}")
    size = len(gold)
    if not size:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    codes = np.unique(np.asarray([*gold, *predicted], dtype=str), return_inverse=True)[1]
    true, pred = codes[:size], codes[size:]

    def score(t: np.ndarray, p: np.ndarray) -> float:
        return float(f1_score(t, p, labels=np.unique(t), average="weighted", zero_division=0))

    rng = np.random.default_rng(seed)
    stats = [score(true[idx], pred[idx]) for idx in (rng.integers(0, size, size) for _ in range(n))]
    low, high = np.percentile(stats, [2.5, 97.5])
    return Estimate(score(true, pred), float(low), float(high), size)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], a_den: Sequence[float] | None = None,
                     b_den: Sequence[float] | None = None, *, n: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Interval and two-sided p-value of ratio(a) - ratio(b), where ratio(x) = sum(x) / sum(x_den) (the mean
    without a denominator), both taken over the same `n` resamples of the paired examples.

    p counts the resampled differences on either side of 0 (`_interval_and_p`): identical systems give 1. Empty
    input gives (nan, nan, nan). Raises ValueError unless all given sequences are 1-D of one
    length, `n` >= 1 and 0 < `level` < 1."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (a, b)]
    arrays += [np.ones_like(arrays[i]) if den is None else np.asarray(den, dtype=np.float64)
               for i, den in enumerate((a_den, b_den))]
    if len({x.shape for x in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"paired values {[x.shape for x in arrays]} must be 1-D of one length")
    if n < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap needs n >= 1 and 0 < level < 1, got n={n}, level={level}")
    size = arrays[0].size
    if not size:
        return float("nan"), float("nan"), float("nan")
    a_num, b_num, a_den_, b_den_ = arrays
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**22 // size)
    diffs = []
    for start in range(0, n, chunk):
        idx = rng.integers(0, size, size=(min(chunk, n - start), size))
        with np.errstate(invalid="ignore", divide="ignore"):
            diffs.append(a_num[idx].sum(1) / a_den_[idx].sum(1) - b_num[idx].sum(1) / b_den_[idx].sum(1))
    return _interval_and_p(np.concatenate(diffs), level)


def _interval_and_p(stats: np.ndarray, level: float) -> tuple[float, float, float]:
    """Percentile interval of the resampled statistics (NaN resamples dropped) and their two-sided p about 0,
    2 (min(k<=0, k>=0) + 1) / (n + 1) at most 1: never 0 from a finite number of resamples."""
    stats = stats[~np.isnan(stats)]
    if not stats.size:
        return float("nan"), float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    p = min(1.0, 2 * (min(int((stats <= 0).sum()), int((stats >= 0).sum())) + 1) / (stats.size + 1))
    return float(low), float(high), p


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


def two_level_bootstrap(a: np.ndarray, b: np.ndarray, den: np.ndarray | None = None, *, n: int = 1000,
                        seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Interval and two-sided p of the mean over seeds of ratio(a_s) - ratio(b_s), where ratio(x_s) =
    sum_i x_s,i / sum_i den_i over examples, for `a` and `b` of shape [seeds, examples] (one row per training seed
    of each system, the same examples in every row).

    Each of the `n` resamples draws the seeds with replacement, then the examples with replacement as clusters
    shared by every seed: an example is one unit however many seeds answered it, and a seed one training run (the
    pigeonhole bootstrap for crossed factors; it counts the seed-by-example noise twice, so it errs wide). The two
    draws come from separate streams, so seeds that repeat one result give exactly the one-seed interval, while
    independent seeds narrow it. p as in `paired_bootstrap`.

    Raises ValueError unless `a` and `b` are 2-D of one shape with `den` (default ones) one entry per example,
    `n` >= 1 and 0 < `level` < 1."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    den = np.ones(a.shape[-1]) if den is None else np.asarray(den, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or den.shape != a.shape[1:]:
        raise ValueError(f"seed x example arrays {a.shape} and {b.shape} with denominators {den.shape} must be "
                         "[seeds, examples] of one shape and [examples]")
    if n < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap needs n >= 1 and 0 < level < 1, got n={n}, level={level}")
    seeds, size = a.shape
    if not seeds or not size:
        return float("nan"), float("nan"), float("nan")
    diff = a - b
    pick_examples, pick_seeds = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    chunk = max(1, 2**22 // size)
    stats = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        examples = np.zeros((m, size))
        np.add.at(examples, (np.arange(m)[:, None], pick_examples.integers(0, size, (m, size))), 1.0)
        seed_share = np.zeros((m, seeds))
        np.add.at(seed_share, (np.arange(m)[:, None], pick_seeds.integers(0, seeds, (m, seeds))), 1.0 / seeds)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats.append(((seed_share @ diff) * examples).sum(1) / (examples @ den))
    return _interval_and_p(np.concatenate(stats), level)


def sign_flip_p(differences: Sequence[float], *, n: int = 9999, seed: int = 0) -> float:
    """Two-sided p of the paired sign-flip test that the per-example `differences` (a - b, each averaged over the
    seeds that answered the example) centre on 0: under the null, each example's two systems could swap names.

    When every non-zero difference has the same size (one seed of right/wrong answers) this is the exact binomial
    test on the discordant pairs, i.e. McNemar's exact test; otherwise scipy's permutation test (every sign pattern
    when there are at most `n` of them, else `n` seeded random ones). Empty or all-zero differences give 1. Raises
    nothing for 1-D input."""
    # scipy.stats takes a second to import: only the paired tests need it
    from scipy.stats import binomtest, permutation_test

    d = np.asarray(differences, dtype=np.float64)
    d = d[d != 0]
    if not d.size:
        return 1.0
    if np.allclose(np.abs(d), np.abs(d[0])):
        return float(binomtest(int((d > 0).sum()), d.size, 0.5).pvalue)
    test = permutation_test((d,), np.sum, permutation_type="samples", n_resamples=n, random_state=seed,
                            alternative="two-sided")
    return float(test.pvalue)
