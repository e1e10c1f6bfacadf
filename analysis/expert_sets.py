# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Which experts matter? Every expert set against the full set, on the same examples
#
# Reads a sweep over `experts.names`. The reference is the largest set; a set missing exactly one expert is that
# expert's leave-one-out. Per task family: each set's difference from the full set, paired seed by seed on the same
# test examples, with its 95% interval (two-level bootstrap over seeds and examples), and which removals hurt at a
# Holm-adjusted p < 0.05 over every comparison this notebook makes.
#
#     coat analyze --notebooks expert_sets [--sweep NAME]

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else ./mlruns.db
experiment = "coat"
sweep = None  # a sweep's name; None: the newest sweep that varies experts.names
out_dir = "analysis-out/expert_sets"

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from coat import tracking
from coat.analysis import compare, runs
from coat.analysis.notebooks import outputs

EXPERTS = "experts.names"
uri = tracking.resolve_uri(tracking_uri)
out = outputs(out_dir)
found = runs.required_sweep(uri, experiment, sweep, (EXPERTS,), "experiments/ablate_expert_sets.py makes one",
                            grid=True)
parent, trials = found
trials = trials.assign(**{EXPERTS: trials[EXPERTS].map(lambda names: "+".join(names))})
full = max(trials[EXPERTS].unique(), key=lambda s: len(s.split("+")))
members = set(full.split("+"))
# The reference is the full set only when it holds every expert of the sweep; otherwise each set goes by its name.
is_full = members == {name for names in trials[EXPERTS] for name in names.split("+")}


def label(expert_set: str) -> str:
    missing = members - set(expert_set.split("+"))
    return f"without {missing.pop()}" if is_full and len(missing) == 1 else expert_set


families = compare.families(trials)
print(f"sweep {parent['name']}: {len(trials)} trials; {'full' if is_full else 'largest'} set {full}; sets "
      f"{sorted(trials[EXPERTS].unique())}")

# %% [markdown]
# ## Quality per expert set

# %%
others = [f for f in runs.varied(trials) if f not in (EXPERTS, compare.SEED)]  # e.g. K crossed with the sets
quality = compare.by_setting(trials, [EXPERTS, *others], [compare.quality_metric(trials, f) for f in families])
out.table(quality, "quality_by_set")
quality

# %% [markdown]
# ## Each set against the reference, the full set where one set holds every expert (paired seed by seed;
# leave-one-out where one expert is missing)

# %%
paired = compare.adjust(compare.paired_against(uri, trials, EXPERTS, full)).assign(set=lambda d: d[EXPERTS].map(label))
out.table(paired, "paired_vs_full_set")
fig, axes = plt.subplots(1, len(families), figsize=(3.6 * len(families), 3), squeeze=False)
for ax, family in zip(axes[0], families, strict=True):
    rows = paired[paired["task"] == family]
    ax.errorbar(rows["diff"], range(len(rows)), xerr=compare.error_bars(rows), fmt="o", capsize=3)
    ax.axvline(0, color="grey", linestyle=":")
    ax.set_yticks(range(len(rows)), list(rows["set"]))
    ax.set_title(f"{family}: set - {full}")
    ax.set_xlabel(f"difference in {rows['metric'].iloc[0] if len(rows) else 'score'}")
fig.tight_layout()
out.figure(fig, "paired_vs_full_set")
paired

# %% [markdown]
# ## Conclusion (computed from the pairs above)

# %%
sentences = [] if is_full else [f"No set holds every expert of the sweep: each set is compared with the largest, "
                                f"{full}, and named by its experts."]
for key, rows in paired.groupby(["task", *others], sort=True):
    rows, uneven = rows.assign(verdict=rows.apply(compare.verdict, axis=1)), compare.uneven_seeds(rows)
    hurt, helped = rows[rows["verdict"] == "worse"], rows[rows["verdict"] == "better"]
    setting = " ".join(f"{f}={v}" for f, v in zip(others, key[1:], strict=True))
    text = f"{key[0]}{f' ({setting})' if setting else ''}: " + (
        "; ".join(f"{compare.describe(r, r['set'], uneven)} is worse than {full}" for _, r in hurt.iterrows())
        or f"no set is worse than {full} at the adjusted p")
    if len(helped):
        text += f"; better than {full}: " + "; ".join(compare.describe(r, r["set"], uneven)
                                                     for _, r in helped.iterrows())
    sentences.append(f"{text} ({compare.evidence(rows)}).")
if paired.attrs["unpaired_runs"]:
    sentences.append(f"Not compared above: {compare.plural(paired.attrs['unpaired_runs'], 'finished run')} had no "
                     f"run of {full} with the same settings and seed.")
out.conclude(sentences, parent["run_id"])
