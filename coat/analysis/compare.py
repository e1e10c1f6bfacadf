"""Comparisons a conclusion can rest on: scores per setting over seeds, each setting against a reference on the
same examples, parameter importances from Optuna, Pareto fronts, and a probe's per-clip scores against its K = 0
twin's on clips neither chose a layer on (`held_out_comparison`).

The unit of analysis is kept: a seed is one training run, and a test example is one example however many seeds
answered it. Two settings are compared seed by seed (each run against the reference run of the same seed and other
settings, on the same test examples), and the per-seed differences are combined (`seed_paired`): a two-level
bootstrap (seeds, then examples as clusters shared by every seed) gives the 95% interval, and a difference counts
only when it survives both that bootstrap and an exact sign-flip test over examples (McNemar's test with one seed):
`p` is the larger of the two. A notebook that declares many verdicts adjusts them together (`adjust`,
Holm-Bonferroni), and `verdict` reads the adjusted p.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution, FloatDistribution
from scipy import stats
from statsmodels.stats.multitest import multipletests

from coat.analysis.runs import predictions, varied
from coat.eval.metrics import TRANSCRIPTION, bootstrap_ci, sign_flip_p, two_level_bootstrap, word_errors
from coat.eval.scoring import normalise_transcript

SEED, K, TARGETS = "train.seed", "thinking.num_slots", "thinking.targets"
CONTROLS = ("none", "shuffled")  # `thinking.targets` of the runs that explain a gain (see ThinkingConfig.targets)


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
    across seeds (Student t) when there are several, else that one run's bootstrap interval over test examples
    (`<metric>_ci_low`, `<metric>_ci_high` when logged); `interval` says which. Columns: *fields, metric, mean,
    ci_low, ci_high, seeds, interval.

    Raises ValueError when the runs also differ in a field besides `fields` and the seed (pooling those would count
    different settings as seeds of one), or when two runs of one setting share a seed (one training run twice is
    not two seeds)."""
    rows = []
    done = children[children["status"] == "FINISHED"]
    if others := [f for f in varied(done) if f not in fields and f != SEED]:
        raise ValueError(f"the runs also differ in {others}: add them to the fields to group by")
    done = done.assign(**{f: done[f].map(as_text) for f in fields})  # lists (expert sets) cannot be grouped
    _refuse_repeated_seeds(done, fields)
    for key, group in done.groupby(list(fields), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            values = group[metric].dropna() if metric in group else pd.Series(dtype=float)
            if values.empty:
                continue
            mean, seeds = float(values.mean()), len(values)
            if seeds > 1:
                half = stats.t.ppf(0.975, seeds - 1) * values.std(ddof=1) / math.sqrt(seeds)
                low, high, kind = mean - half, mean + half, f"across {seeds} seeds (t)"
            else:
                row = group.loc[values.index[0]]
                low, high = row.get(f"{metric}_ci_low", np.nan), row.get(f"{metric}_ci_high", np.nan)
                kind = "across test examples of one run (bootstrap)"
            rows.append((*key, metric, mean, float(low), float(high), seeds, kind))
    return pd.DataFrame(rows, columns=[*fields, "metric", "mean", "ci_low", "ci_high", "seeds", "interval"])


def _refuse_repeated_seeds(runs: pd.DataFrame, fields: Sequence[str]) -> None:
    """Raises ValueError naming the runs when two of `runs` agree on `fields` and share a seed."""
    seeds = runs[SEED].astype(str) if SEED in runs else pd.Series("unset", index=runs.index)
    keys = pd.Series(list(zip(*(runs[f].map(str) for f in fields), seeds, strict=True)), index=runs.index)
    if keys.duplicated().any():
        twice = keys[keys.duplicated()].iloc[0]
        names = list(runs.loc[keys == twice, "name"]) if "name" in runs else []
        raise ValueError(f"runs {names} share the setting {dict(zip(fields, twice, strict=False))} and "
                         f"{SEED}={twice[-1]}: one training run twice is not two seeds; keep one of them, or train "
                         "the others with seeds of their own")


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


PAIRED_COLUMNS = ("task", "metric", "a", "b", "diff", "diff_ci_low", "diff_ci_high", "p_bootstrap", "p_signflip", "p",
                  "seeds", "n_examples", "seed_diffs", "interval")
ALPHA = 0.05  # the level every verdict is declared at, after adjustment


def seed_paired(pairs: Sequence[tuple[pd.DataFrame, pd.DataFrame]], *, n: int = 10_000, seed: int = 0
                ) -> pd.DataFrame:
    """System a against system b per task family, from one (a, b) pair of scored examples (`id`, `task`, `answer`,
    `prediction`, `correct`) per training seed, on the examples every pair answered.

    Per seed: accuracy, or corpus WER for transcription, of each system and their difference (`seed_diffs`); `a`,
    `b` and `diff` are the means over seeds. The interval and `p_bootstrap` come from the two-level bootstrap
    (`metrics.two_level_bootstrap`), `p_signflip` from the sign-flip test over examples of the seed-averaged
    differences (`metrics.sign_flip_p`: McNemar's exact test with one seed), and `p` is the larger: a difference
    must survive the variation of the runs and of the examples. Columns: `PAIRED_COLUMNS`; ids some pair lacks are
    left out and counted in `attrs["unpaired"]`.

    Raises ValueError naming a table that holds an id twice or lacks a column."""
    for i, (a, b) in enumerate(pairs):
        for name, table in (("a", a), ("b", b)):
            missing = [c for c in ("id", "task", "answer", "prediction", "correct") if c not in table]
            if missing:
                raise ValueError(f"seed_paired: pair {i} {name} lacks the columns {missing}; score it with "
                                 "score_examples")
            if dup := table.loc[table["id"].duplicated(), "id"].tolist():
                raise ValueError(f"seed_paired: pair {i} {name} holds ids more than once, e.g. {dup[:3]}")
    tables = [t.set_index("id") for pair in pairs for t in pair]
    ids = sorted(functools.reduce(lambda kept, t: kept & set(t.index), tables[1:], set(tables[0].index)))
    rows = []
    first = tables[0].loc[ids]
    for family in sorted(first["task"].astype(str).unique()):
        at = first.index[first["task"] == family]
        if family == TRANSCRIPTION:
            references = [normalise_transcript(a) for a in first.loc[at, "answer"]]
            per_table = [word_errors(references, [p if isinstance(p, str) else "" for p in t.loc[at, "prediction"]])
                         for t in tables]
            scores, den, metric = np.stack([errors for errors, _ in per_table]), per_table[0][1], "wer"
        else:
            scores = np.stack([t.loc[at, "correct"].astype(bool).to_numpy(np.float64) for t in tables])
            den, metric = np.ones(len(at)), "accuracy"
        mine, theirs = scores[0::2], scores[1::2]  # [seeds, examples]
        with np.errstate(invalid="ignore", divide="ignore"):
            value_a, value_b = mine.sum(1) / den.sum(), theirs.sum(1) / den.sum()
        low, high, p_bootstrap = two_level_bootstrap(mine, theirs, den, n=n, seed=seed)
        p_signflip = sign_flip_p((mine - theirs).mean(0), seed=seed)
        diffs = value_a - value_b
        interval = ("seeds and test examples (two-level bootstrap)" if len(pairs) > 1
                    else "test examples of one run (paired bootstrap)")
        rows.append((family, metric, value_a.mean(), value_b.mean(), diffs.mean(), low, high, p_bootstrap, p_signflip,
                     max(p_bootstrap, p_signflip), len(pairs), len(at), [float(d) for d in diffs], interval))
    out = pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))
    out.attrs["unpaired"] = sum(len(t) for t in tables) - len(tables) * len(ids)
    return out


def paired_between(uri: str, a_runs: pd.DataFrame, b_runs: pd.DataFrame, match: Sequence[str], *,
                   system: str = "coat", n: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Runs `a_runs` against runs `b_runs` on the same test examples: each a-run is paired with the b-run equal to
    it on every field of `match` (the seed among them, where runs have one), and each setting of `match`'s other
    fields is compared over its seeds (`seed_paired`). Columns: those other fields, then `PAIRED_COLUMNS`.
    An a-run without a twin is left out and counted in `attrs["unpaired_runs"]`.

    Raises ValueError when two runs of one side share a setting and seed."""
    match = list(match)
    settings_of = [f for f in match if f != SEED]

    def key(row: pd.Series) -> tuple:
        return tuple(str(row[f]) for f in match)

    for runs in (a_runs, b_runs):
        _refuse_repeated_seeds(runs, settings_of)
    twins = {key(row): row for _, row in b_runs.iterrows()}
    groups: dict[tuple, list] = {}
    for _, row in a_runs.iterrows():
        if (twin := twins.get(key(row))) is not None:
            groups.setdefault(tuple(str(row[f]) for f in settings_of), []).append((row, twin))
    examples = functools.cache(lambda run_id: predictions(uri, run_id, system))  # a reference serves many settings
    tables = []
    for pairs in groups.values():
        table = seed_paired([(examples(a["run_id"]), examples(b["run_id"])) for a, b in pairs], n=n, seed=seed)
        tables.append(table.assign(**{f: as_text(pairs[0][0][f]) for f in settings_of}))
    out = (pd.concat(tables, ignore_index=True) if tables
           else pd.DataFrame(columns=[*settings_of, *PAIRED_COLUMNS]))
    out = out[[*settings_of, *PAIRED_COLUMNS]]
    out.attrs["unpaired_runs"] = len(a_runs) - sum(len(pairs) for pairs in groups.values())
    return out


def paired_against(uri: str, children: pd.DataFrame, field: str, reference: object, system: str = "coat",
                   n: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Every value of `field` against `reference` (e.g. `thinking.num_slots` against 0), on the same examples:
    each finished run is paired with the reference run equal to it on every other varied field, seed included, and
    each value and setting of the other fields is compared over its seeds (`paired_between`). Columns: `field`, the
    other varied fields but the seed, then `PAIRED_COLUMNS`; sorted by them and task. Runs without a reference twin
    are counted in `attrs["unpaired_runs"]`: they are in no comparison, and a conclusion must say so."""
    done = children[children["status"] == "FINISHED"]
    match = [f for f in varied(done) if f != field]
    is_reference = done[field].astype(str) == str(reference)
    tables, unpaired = [], 0
    for _, runs in done[~is_reference].groupby(done.loc[~is_reference, field].astype(str), sort=False):
        table = paired_between(uri, runs, done[is_reference], match, system=system, n=n, seed=seed)
        unpaired += table.attrs["unpaired_runs"]
        tables.append(table.assign(**{field: as_text(runs[field].iloc[0])}))
    others = [f for f in match if f != SEED]
    out = (pd.concat(tables, ignore_index=True)[[field, *others, *PAIRED_COLUMNS]]
           .sort_values([field, *others, "task"], ignore_index=True) if tables
           else pd.DataFrame(columns=[field, *others, *PAIRED_COLUMNS]))
    out.attrs["unpaired_runs"] = unpaired
    return out


def adjust(paired: pd.DataFrame) -> pd.DataFrame:
    """`paired` with `p_holm`: its `p` values adjusted together by Holm-Bonferroni (every row is one comparison
    of the family a notebook declares verdicts on), and `comparisons`, the size of that family. Rows without a p
    are left out of the family."""
    tested = paired["p"].notna()
    adjusted = pd.Series(np.nan, index=paired.index)
    if tested.any():
        adjusted[tested] = multipletests(paired.loc[tested, "p"].astype(float), alpha=ALPHA, method="holm")[1]
    return paired.assign(p_holm=adjusted, comparisons=int(tested.sum()))


def verdict(row: pd.Series) -> str:
    """"better", "worse" or "no different": whether the difference holds at p < 0.05 — the Holm-adjusted p when
    the row has one (`adjust`) — and in which direction, for the metric (lower is better for WER)."""
    p = row["p_holm"] if "p_holm" in row and pd.notna(row["p_holm"]) else row["p"]
    if pd.isna(p) or p >= ALPHA or row["diff"] == 0:
        return "no different"
    better_is_lower = row["metric"] == "wer"
    return "better" if (row["diff"] < 0) == better_is_lower else "worse"


def describe(row: pd.Series, name: str, seeds: bool = False) -> str:
    """`K=4 +0.100 [+0.020, +0.200], p 0.004 (Holm 0.012)`: a paired row's difference, interval and p values; with
    `seeds`, then the seeds it rests on (`, 1 seed`), for a sentence whose comparisons rest on different numbers."""
    holm = f" (Holm {row['p_holm']:.3g})" if "p_holm" in row and pd.notna(row["p_holm"]) else ""
    own = f", {plural(int(row['seeds']), 'seed')}" if seeds else ""
    return (f"{name} {row['diff']:+.3f} [{row['diff_ci_low']:+.3f}, {row['diff_ci_high']:+.3f}], p {row['p']:.3g}"
            f"{holm}{own}")


def plural(count: int, unit: str) -> str:
    return f"{count} {unit}{'' if count == 1 else 's'}"


def uneven_seeds(rows: pd.DataFrame) -> bool:
    """Whether the comparisons in `rows` rest on different numbers of seeds (then each says its own: `describe`)."""
    return rows["seeds"].nunique() > 1


def evidence(rows: pd.DataFrame) -> str:
    """What the verdicts on `rows` rest on: seeds, test examples, the interval's kind and the adjustment; a range
    where the comparisons differ (each comparison then gives its own seeds)."""
    def span(column: str, unit: str) -> str:
        low, high = int(rows[column].min()), int(rows[column].max())
        return plural(low, unit) if low == high else f"{low} to {high} {unit}s"

    kinds = rows["interval"].str.split(" (", regex=False).str[0].unique()
    over = kinds[0] if len(kinds) == 1 else "seeds and test examples (test examples of one run where one seed)"
    text = f"{span('seeds', 'seed')}, {span('n_examples', 'test example')}; 95% intervals over {over}"
    if "comparisons" in rows:
        text += f"; p Holm-adjusted over the {int(rows['comparisons'].max())} comparisons of this analysis"
    return text


def family_sentences(paired: pd.DataFrame, field: str, label: str, reference: object, others: Sequence[str] = ()
                     ) -> list[str]:
    """One sentence per task family (and setting of the `others` fields): which values of `field` beat the
    reference (`verdict`, Holm-adjusted when `paired` went through `adjust`), which are worse, or that none differ
    — with the differences, intervals, p values, seeds and examples that say so."""
    sentences = []
    for key, group in paired.groupby(["task", *others], sort=True):
        family, setting = key[0], " ".join(f"{f}={v}" for f, v in zip(others, key[1:], strict=True))
        group = group.assign(verdict=group.apply(verdict, axis=1))
        metric, uneven = group["metric"].iloc[0], uneven_seeds(group)

        def said(rows: pd.DataFrame, uneven: bool = uneven) -> str:
            return "; ".join(describe(r, f"{label}={r[field]}", uneven) for _, r in rows.iterrows())

        better, worse = group[group["verdict"] == "better"], group[group["verdict"] == "worse"]
        where = f"{family}{f' ({setting})' if setting else ''}"
        if len(better):
            text = f"{where}: {said(better)} {'beats' if len(better) == 1 else 'beat'} {label}={reference} on {metric}"
        else:
            closest = group["diff"].idxmin() if metric == "wer" else group["diff"].idxmax()
            text = (f"{where}: no {label} beats {label}={reference} on {metric} (closest: "
                    f"{said(group.loc[[closest]])})")
        if len(worse):
            text += f"; worse: {said(worse)}"
        sentences.append(f"{text} ({evidence(group)}).")
    return sentences


def with_targets(children: pd.DataFrame) -> pd.DataFrame:
    """`children` with `thinking.targets` set on every run (`experts` for runs logged before the field existed)."""
    targets = children[TARGETS] if TARGETS in children else pd.Series(None, index=children.index, dtype=object)
    return children.assign(**{TARGETS: targets.fillna("experts")})


def against_controls(uri: str, children: pd.DataFrame, *, system: str = "coat", n: int = 10_000, seed: int = 0
                     ) -> pd.DataFrame:
    """At each K with control runs (`thinking.targets` none or shuffled): CoAT against each control, and each
    control against K = 0, paired seed by seed (`paired_between`) on the same test examples. Columns: `a_system`,
    `b_system` (coat, none, shuffled, K=0), `thinking.num_slots`, the other varied fields but the seed, then
    `PAIRED_COLUMNS`. Empty when the sweep holds no control. A run of either side without a twin on the other is in
    no comparison: `attrs["unpaired_runs"]` counts them."""
    done = with_targets(children[children["status"] == "FINISHED"])
    match = [f for f in varied(done) if f not in (K, TARGETS)]
    coat, controls = done[done[TARGETS] == "experts"], done[done[TARGETS].isin(CONTROLS)]
    plain = coat[coat[K].astype(str) == "0"]
    tables, unpaired = [], 0
    for (k, control), runs in controls.groupby([K, TARGETS], sort=True):
        at_k = coat[coat[K].astype(str) == str(k)]
        for a_system, a_runs, b_system, b_runs in (("coat", at_k, control, runs), (control, runs, "K=0", plain)):
            table = paired_between(uri, a_runs, b_runs, match, system=system, n=n, seed=seed)
            unpaired += table.attrs["unpaired_runs"]
            tables.append(table.assign(a_system=a_system, b_system=b_system, **{K: k}))
    others = [f for f in match if f != SEED]
    columns = ["a_system", "b_system", K, *others, *PAIRED_COLUMNS]
    out = pd.concat(tables, ignore_index=True)[columns] if tables else pd.DataFrame(columns=columns)
    out.attrs["unpaired_runs"] = unpaired
    return out


NAMES = {"coat": "CoAT", "K=0": "K=0", "none": "the none control", "shuffled": "the shuffled control"}


def explanation(verdicts: dict[tuple[str, str], str]) -> str:
    """What explains CoAT's gain over K = 0, from the `verdict` of each (a_system, b_system) comparison at K with
    controls. The controls make a ladder: K=0, the same K slots unsupervised (`none`: the positions), supervised with
    another clip's targets (`shuffled`: the supervision without its information), CoAT (the experts' information).
    Each phrase claims only what a comparison that holds at the adjusted p shows; a missing comparison shows nothing."""
    def holds(a: str, b: str, outcome: str = "better") -> bool:
        return verdicts.get((a, b)) == outcome

    if not holds("coat", "K=0"):
        alone = [c for c in CONTROLS if holds(c, "K=0")]
        return "neither: CoAT does not beat K=0 at the adjusted p, so there is no gain to explain" + (
            f" (though the {' and '.join(alone)} control{'s' if len(alone) > 1 else ''} beat K=0)" if alone else "")
    positions, supervised = holds("none", "K=0"), holds("coat", "none")
    has_none, has_shuffled = ("coat", "none") in verdicts, ("coat", "shuffled") in verdicts
    shuffled = "shuffled targets beat CoAT" if holds("coat", "shuffled", "worse") else "not shuffled targets"
    if holds("coat", "shuffled") and (supervised or not has_none):
        if positions:
            return "both: the pause positions alone beat K=0, and the experts' information adds to them"
        return ("the experts' information: CoAT beats the same positions "
                f"{'unsupervised and ' if supervised else ''}supervised with another clip's targets")
    if supervised and not has_shuffled:
        return (f"{'the positions and ' if positions else ''}the supervision: CoAT beats the same positions "
                f"unsupervised{'; the positions alone beat K=0' if positions else ''}; without a shuffled control the "
                "data cannot tell the experts' information from supervision alone")
    if supervised and positions:
        return ("the positions and their supervision, not shown to need the experts' information: the positions alone "
                f"beat K=0, and CoAT beats them unsupervised but {shuffled}")
    if supervised:
        return (f"the supervision, not shown to need the experts' information: CoAT beats the same positions "
                f"unsupervised but {shuffled}")
    if positions:
        unsupervised = "they beat CoAT" if holds("coat", "none", "worse") else "CoAT does not beat them"
        return f"the positions: the same K slots without expert supervision beat K=0, and {unsupervised}"
    unsure = verdicts.get(("coat", "none")) == verdicts.get(("none", "K=0")) == "no different"
    if unsure and holds("shuffled", "K=0") and not holds("coat", "shuffled"):
        return ("not shown to need the experts' information: shuffled targets beat K=0 too, and "
                f"{'they beat CoAT' if holds('coat', 'shuffled', 'worse') else 'CoAT does not beat them'}; whether "
                "the positions alone would, the data cannot tell (the none control differs from neither CoAT nor K=0 "
                "at the adjusted p)")
    found = [f"{NAMES[a]} {'beats' if outcome == 'better' else 'does worse than'} {NAMES[b]}"
             for (a, b), outcome in verdicts.items() if (a, b) != ("coat", "K=0") and outcome != "no different"]
    if not found:
        return "the data cannot tell: neither control differs from CoAT or from K=0 at the adjusted p"
    return f"the data cannot tell: of the comparisons with the controls only {' and '.join(found)} at the adjusted p"


def control_sentences(comparisons: pd.DataFrame, others: Sequence[str] = ()) -> list[str]:
    """Per task family, K with controls and setting of `others`: the comparisons of CoAT, its controls and K = 0,
    and what explains CoAT's gain over K = 0 (`explanation`), from `comparisons`: `against_controls` rows with CoAT's
    own row against K = 0 (a_system coat, b_system K=0), after `adjust`."""
    sentences = []
    keys = ["task", K, *others]
    with_controls = comparisons[comparisons["b_system"].isin(CONTROLS)]
    for key, _ in with_controls.groupby(keys, sort=True):
        rows = comparisons[np.logical_and.reduce([comparisons[f].astype(str) == str(v) for f, v in
                                                  zip(keys, key, strict=True)])]
        found = {(r["a_system"], r["b_system"]): r for _, r in rows.iterrows()}
        why = explanation({pair: verdict(row) for pair, row in found.items()})
        setting = " ".join(f"{f}={v}" for f, v in zip(others, key[2:], strict=True))
        said = "; ".join(describe(found[pair], f"{pair[0]} vs {pair[1]}", uneven_seeds(rows)) for pair in
                         [("coat", "K=0"), ("coat", "none"), ("coat", "shuffled"), ("none", "K=0"),
                          ("shuffled", "K=0")] if pair in found)
        sentences.append(f"{key[0]} at K={key[1]}{f' ({setting})' if setting else ''}: {said}. What explains it: "
                         f"{why} ({evidence(rows)}).")
    return sentences


def importances(children: pd.DataFrame, params: Sequence[str], metric: str, mode: str) -> pd.Series:
    """Optuna's parameter importances (fANOVA) of `params` for `metric`, from the finished runs and those ASHA
    stopped early (KILLED), each at its last reported value, as a study: leaving the stopped ones out would hide
    the settings that did worst. `attrs["finished"]` and `attrs["stopped"]` count them. Empty when fewer than two
    runs qualify or no parameter varies."""
    done = (children[children["status"].isin(["FINISHED", "KILLED"]) & children[metric].notna()]
            if metric in children else children.iloc[:0])
    params = [p for p in params if len(done) and done[p].astype(str).nunique() > 1]
    counts = {"finished": int((done["status"] == "FINISHED").sum()), "stopped": int((done["status"] == "KILLED").sum())}
    if len(done) < 2 or not params:
        empty = pd.Series(dtype=float)
        empty.attrs |= counts
        return empty
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
    out = pd.Series(optuna.importance.get_param_importances(study, params=params), name=metric)
    out.attrs |= counts
    return out


def error_bars(rows: pd.DataFrame, value: str = "diff", low: str = "diff_ci_low", high: str = "diff_ci_high"
               ) -> list[pd.Series]:
    """Matplotlib's [below, above] error lengths of `rows`' intervals around `value`, never negative: a percentile
    interval may end a rounding error short of its point estimate."""
    return [(rows[value] - rows[low]).clip(lower=0), (rows[high] - rows[value]).clip(lower=0)]


def pareto_front(points: pd.DataFrame, cost: str, score: str, lower_is_better: bool) -> pd.DataFrame:
    """The points no other point beats on both `cost` (lower is better) and `score`, sorted by cost."""
    ordered = points.dropna(subset=[cost, score]).sort_values([cost, score], ascending=[True, lower_is_better])
    front, best = [], math.inf if lower_is_better else -math.inf
    for index, row in ordered.iterrows():
        if (row[score] < best) if lower_is_better else (row[score] > best):
            front.append(index)
            best = row[score]
    return ordered.loc[front]


def held_out_comparison(coat: pd.DataFrame, plain: pd.DataFrame, *, n: int = 1000, seed: int = 0) -> dict:
    """A CoAT run's probe against its K = 0 twin's, for one target at one position, from their per-clip scores
    (`ProbeFit.clips` rows): each run's layer is chosen by mean selectivity (score - control) on a seeded half of the
    clips both probed, and the two are compared at those layers on the other half, which neither choice saw: each
    one's mean selectivity there, their difference, and its bootstrap 95% interval over clips. Returns
    {coat_layer, plain_layer, coat, plain, diff, ci_low, ci_high, n_clips}. Raises ValueError when the runs share
    fewer than four clips."""
    shared = sorted(set(coat["clip"]) & set(plain["clip"]))
    if len(shared) < 4:
        raise ValueError(f"the two runs share {len(shared)} probed clips: too few to choose a layer on half of them")
    choose = set(np.random.default_rng(seed).permutation(shared)[: len(shared) // 2])
    report = [clip for clip in shared if clip not in choose]

    def at_chosen_layer(clips: pd.DataFrame) -> tuple[int, np.ndarray]:
        clips = clips.assign(selectivity=clips["score"] - clips["control"])
        layer = int(clips[clips["clip"].isin(choose)].groupby("layer")["selectivity"].mean().idxmax())
        rows = clips[clips["layer"] == layer].set_index("clip")
        return layer, rows.loc[report, "selectivity"].to_numpy(np.float64)

    (coat_layer, mine), (plain_layer, theirs) = at_chosen_layer(coat), at_chosen_layer(plain)
    low, high = bootstrap_ci(mine - theirs, n=n, seed=seed)
    return {"coat_layer": coat_layer, "plain_layer": plain_layer, "coat": float(mine.mean()),
            "plain": float(theirs.mean()), "diff": float((mine - theirs).mean()), "ci_low": low, "ci_high": high,
            "n_clips": len(report)}
