"""Comparisons a conclusion can rest on: scores per setting over seeds, each setting against a reference on the
same examples (paired across seeds), parameter importances from Optuna, and Pareto fronts.

Pairing is what makes a small difference readable: a setting's run and the reference run of the same seed answer
the same test examples, so their per-example results are compared pair by pair (`coat.eval.scoring
.paired_comparison`: paired bootstrap of the difference, exact McNemar). Pairs from every seed are pooled, and
the number of seeds is reported with every difference.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from coat.analysis.runs import predictions, varied
from coat.eval.scoring import paired_comparison

SEED = "train.seed"


def families(children: pd.DataFrame) -> list[str]:
    """The task families the runs were evaluated on (`eval/<family>/<metric>` keys without breakdowns)."""
    keys = [c.split("/") for c in children.columns if c.startswith("eval/") and c.count("/") == 2]
    return sorted({family for family, metric in ((k[1], k[2]) for k in keys)
                   if metric in ("accuracy", "loglik_accuracy", "wer")})


def quality_metric(children: pd.DataFrame, family: str) -> str:
    """The key of a family's headline score: WER, accuracy, or log-likelihood accuracy, whichever was logged."""
    for metric in ("wer", "accuracy", "loglik_accuracy"):
        if f"eval/{family}/{metric}" in children:
            return f"eval/{family}/{metric}"
    raise KeyError(f"no score of task family {family!r} among the runs' metrics")


def by_setting(children: pd.DataFrame, fields: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Per setting (the values of `fields`, seeds pooled) and metric: `mean` over seeds and a 95% interval —
    across seeds (Student t) when there are several, else that one run's bootstrap interval (`<metric>_ci_low`,
    `<metric>_ci_high` when logged). Columns: *fields, metric, mean, ci_low, ci_high, seeds.

    Raises ValueError when the runs also differ in a field besides `fields` and the seed: pooling those would
    count different settings as seeds of one."""
    from scipy import stats

    rows = []
    done = children[children["status"] == "FINISHED"]
    if others := [f for f in varied(done) if f not in fields and f != SEED]:
        raise ValueError(f"the runs also differ in {others}: add them to the fields to group by")
    done = done.assign(**{f: done[f].map(as_text) for f in fields})  # lists (expert sets) cannot be grouped
    for key, group in done.groupby(list(fields), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            values = group[metric].dropna() if metric in group else pd.Series(dtype=float)
            if values.empty:
                continue
            mean, seeds = float(values.mean()), len(values)
            if seeds > 1:
                half = stats.t.ppf(0.975, seeds - 1) * values.std(ddof=1) / math.sqrt(seeds)
                low, high = mean - half, mean + half
            else:
                row = group.loc[values.index[0]]
                low, high = row.get(f"{metric}_ci_low", np.nan), row.get(f"{metric}_ci_high", np.nan)
            rows.append((*key, metric, mean, float(low), float(high), seeds))
    return pd.DataFrame(rows, columns=[*fields, "metric", "mean", "ci_low", "ci_high", "seeds"])


def as_text(value: object) -> object:
    """A list-valued setting (an expert set) as text, `mel+prosody`; other values as they are."""
    return "+".join(map(str, value)) if isinstance(value, list | tuple) else value


def settings(table: pd.DataFrame, fields: Sequence[str]) -> list[tuple[str, pd.DataFrame]]:
    """`table` split by the values of `fields`, each part labelled `field=value ...`: one line per setting in a
    plot. One unlabelled part when `fields` is empty."""
    if not fields:
        return [("", table)]
    return [(" ".join(f"{f}={v}" for f, v in zip(fields, key, strict=True)), part)
            for key, part in table.groupby(list(fields), sort=True)]


def paired_against(uri: str, children: pd.DataFrame, field: str, reference: object, system: str = "coat",
                   n: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Every value of `field` against `reference` (e.g. `thinking.num_slots` against 0), on the same examples.

    Each finished run is paired with the reference run that matches it on every other varied field, seed
    included; the per-example results of all such pairs are pooled (ids made unique per pair) and compared per
    task family. Columns: `field`, task, metric, a (the setting), b (the reference), diff, diff_ci_low,
    diff_ci_high, p_bootstrap, p_mcnemar, n_pairs, a_only_correct, b_only_correct, seeds."""
    done = children[children["status"] == "FINISHED"]
    others = [f for f in varied(done) if f != field]
    key = (lambda row: tuple(str(row[f]) for f in others)) if others else (lambda row: ())
    references = {key(row): row for _, row in done[done[field].astype(str) == str(reference)].iterrows()}
    examples = functools.cache(lambda run_id: predictions(uri, run_id, system))  # a reference serves every setting
    pooled: dict[str, tuple[list, list, set]] = {}
    for _, row in done[done[field].astype(str) != str(reference)].iterrows():
        twin = references.get(key(row))
        if twin is None:
            continue
        tag = "|".join(key(row))
        a, b = (examples(run["run_id"]).assign(id=lambda d, t=tag: t + "|" + d["id"]) for run in (row, twin))
        mine, theirs, seeds = pooled.setdefault(str(row[field]), ([], [], set()))
        mine.append(a)
        theirs.append(b)
        seeds.add(row.get(SEED))
    tables = []
    for value, (mine, theirs, seeds) in pooled.items():
        table = paired_comparison(pd.concat(mine, ignore_index=True), pd.concat(theirs, ignore_index=True), n=n,
                                  seed=seed)
        tables.append(table.assign(**{field: _typed(value, done[field])}, seeds=len(seeds)))
    if not tables:
        return pd.DataFrame(columns=[field, "task", "metric", "a", "b", "diff", "diff_ci_low", "diff_ci_high",
                                     "p_bootstrap", "p_mcnemar", "n_pairs", "a_only_correct", "b_only_correct",
                                     "seeds"])
    out = pd.concat(tables, ignore_index=True)
    return out[[field, *[c for c in out.columns if c != field]]].sort_values([field, "task"], ignore_index=True)


def _typed(value: str, column: pd.Series) -> object:
    """`value` as the column's own type (the settings were compared as text)."""
    for original in column:
        if str(original) == value:
            return original
    return value


def verdict(row: pd.Series) -> str:
    """"better", "worse" or "no different": whether the whole 95% interval of the difference lies on one side of
    zero, in the direction that is better for the metric (lower for WER)."""
    better_is_lower = row["metric"] == "wer"
    low, high = row["diff_ci_low"], row["diff_ci_high"]
    if (high < 0) if better_is_lower else (low > 0):
        return "better"
    if (low > 0) if better_is_lower else (high < 0):
        return "worse"
    return "no different"


def family_sentences(paired: pd.DataFrame, field: str, label: str, reference: object) -> list[str]:
    """One sentence per task family: which settings beat the reference outside the paired interval, which are
    worse, or that none differ — with the differences, intervals and seed counts that say so."""
    sentences = []
    for family, group in paired.groupby("task", sort=True):
        group = group.assign(verdict=group.apply(verdict, axis=1))
        metric = group["metric"].iloc[0]

        def describe(rows: pd.DataFrame) -> str:
            return "; ".join(f"{label}={r[field]} {r['diff']:+.3f} [{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}]"
                             for _, r in rows.iterrows())

        better, worse = group[group["verdict"] == "better"], group[group["verdict"] == "worse"]
        seeds = int(group["seeds"].max())
        if len(better):
            verb = "beats" if len(better) == 1 else "beat"
            text = (f"{family}: {describe(better)} {verb} {label}={reference} on {metric} outside the paired 95% "
                    "interval")
        else:
            closest = group["diff"].idxmin() if metric == "wer" else group["diff"].idxmax()
            text = (f"{family}: no {label} beats {label}={reference} on {metric} outside the paired 95% interval "
                    f"(closest: {describe(group.loc[[closest]])})")
        if len(worse):
            text += f"; worse: {describe(worse)}"
        sentences.append(f"{text} ({seeds} seed{'s' if seeds != 1 else ''}, {int(group['n_pairs'].max())} pairs).")
    return sentences


def importances(children: pd.DataFrame, params: Sequence[str], metric: str, mode: str) -> pd.Series:
    """Optuna's parameter importances (fANOVA) of `params` for `metric`, from the finished runs as a study; empty
    when fewer than two runs finished or no parameter varies."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    done = children[(children["status"] == "FINISHED") & children[metric].notna()] if metric in children else []
    params = [p for p in params if len(done) and done[p].astype(str).nunique() > 1]
    if len(done) < 2 or not params:
        return pd.Series(dtype=float)
    distributions = {}
    for p in params:
        values = done[p]
        if pd.api.types.is_numeric_dtype(values):
            low, high = float(values.min()), float(values.max())
            distributions[p] = FloatDistribution(low, high, log=low > 0 and high / low > 10)
        else:
            distributions[p] = CategoricalDistribution(sorted(values.astype(str).unique()))
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for _, row in done.iterrows():
        chosen = {p: float(row[p]) if isinstance(distributions[p], FloatDistribution) else str(row[p]) for p in params}
        study.add_trial(optuna.trial.create_trial(params=chosen, distributions=distributions, value=float(row[metric])))
    return pd.Series(optuna.importance.get_param_importances(study, params=params), name=metric)


def pareto_front(points: pd.DataFrame, cost: str, score: str, lower_is_better: bool) -> pd.DataFrame:
    """The points no other point beats on both `cost` (lower is better) and `score`, sorted by cost."""
    ordered = points.dropna(subset=[cost, score]).sort_values([cost, score], ascending=[True, lower_is_better])
    front, best = [], math.inf if lower_is_better else -math.inf
    for index, row in ordered.iterrows():
        if (row[score] < best) if lower_is_better else (row[score] > best):
            front.append(index)
            best = row[score]
    return ordered.loc[front]
