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
# # Which loss weights matter? Quality against each weight, and Optuna's parameter importances
#
# Reads a sampled sweep over the CE and expert loss weights (`loss.*`): the sweep's metric and every task
# family's score against each weight, and fANOVA importances of every sampled parameter for the sweep's metric.
#
#     coat analyze --notebooks loss_weights [--sweep NAME]

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else ./mlruns.db
experiment = "coat"
sweep = None  # a sweep's name; None: the newest sweep that varies a loss weight
out_dir = "analysis-out/loss_weights"

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from coat import tracking
from coat.analysis import compare, runs
from coat.analysis.notebooks import outputs

uri = tracking.resolve_uri(tracking_uri)
out = outputs(out_dir)
found = runs.required_sweep(uri, experiment, sweep, ("loss.",), "experiments/ablate_loss_weights.py makes one")
parent, trials = found
metric, mode = parent["sweep.metric"], parent["sweep.mode"]
done = trials[trials["status"] == "FINISHED"]
varied = runs.varied(done)
weights = [p for p in varied if p.startswith("loss.")]
families = compare.families(done)
scores = [metric] + [compare.quality_metric(done, family) for family in families]
if not weights:  # ASHA stopped all trials but one, or the finished ones share their weights
    raise runs.NothingToAnalyse(f"sweep {parent['sweep']}: no loss weight varies among its {len(done)} trials that "
                                f"trained to the end (of {len(trials)}): sample more trials (sweep.num_samples)")
print(f"sweep {parent['name']}: {len(trials)} trials ({len(done)} finished); weights {weights}; metric {metric}")

# %% [markdown]
# ## Quality against each weight (one point per finished trial)

# %%
fig, axes = plt.subplots(len(scores), len(weights), figsize=(3.2 * len(weights), 2.6 * len(scores)),
                         squeeze=False)
for row, score in zip(axes, scores, strict=True):
    for ax, weight in zip(row, weights, strict=True):
        ax.scatter(done[weight], done[score])
        ax.set_xscale("log")
        ax.set_xlabel(weight)
        ax.set_ylabel(score)
fig.tight_layout()
out.figure(fig, "quality_vs_weights")
out.table(done[["name", *varied, *scores]], "trials")

# %% [markdown]
# ## Parameter importances for the sweep's metric (fANOVA over the finished trials and those ASHA stopped)

# %%
importance = compare.importances(trials, varied, metric, mode)
print(f"importances over {importance.attrs['finished']} finished trials and {importance.attrs['stopped']} that ASHA "
      "stopped early, each at its last reported value")
out.table(importance.rename("importance").rename_axis("parameter").reset_index(), "importances")
fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * max(1, len(importance))))
ax.barh(list(importance.index)[::-1], list(importance.values)[::-1])
ax.set_xlabel(f"importance for {metric}")
fig.tight_layout()
out.figure(fig, "importances")
importance

# %% [markdown]
# ## Conclusion (computed from the trials above)

# %%
scored = done.dropna(subset=[metric])  # a finished trial that never reported the metric is in no ranking
best = scored.sort_values(metric, ascending=mode == "min").iloc[0]
setting = ", ".join(f"{p}={best[p]:.3g}" if isinstance(best[p], float) else f"{p}={best[p]}" for p in varied)
sentences = [f"Best of {len(scored)} finished trials by {metric} ({mode}): {setting} ({metric} = {best[metric]:.4g})."]
if len(importance):
    top = importance.index[0]
    sentences.append(f"Most important for {metric}: {top} ({importance.iloc[0]:.0%} of fANOVA's importance"
                     f"{'' if len(importance) == 1 else f'; next {importance.index[1]} {importance.iloc[1]:.0%}'}; "
                     f"over {importance.attrs['finished']} finished trials and {importance.attrs['stopped']} stopped "
                     "early by ASHA at their last reported value).")
for weight in weights:
    rho = pd.Series(scored[weight]).corr(scored[metric], method="spearman")
    sentences.append(f"{weight} against {metric}: Spearman {rho:+.2f} over {len(scored)} trials.")
sentences.append("Sampled trials each train one seed: these are search results; confirm a setting over seeds "
                 "with a grid sweep (--seeds) before resting a claim on it.")
out.conclude(sentences, parent["run_id"])
