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
# # How much thinking? Quality against the number of thinking slots K
#
# Reads a sweep over `thinking.num_slots` (K = 0 is the same fine-tune without a thinking block) and asks, per
# task family, whether any K beats K = 0 on the same test examples: scores per K with 95% intervals (across
# seeds when there are several), validation losses, the prefill cost, and paired comparisons against K = 0.
#
#     coat analyze --notebooks thinking_length [--sweep NAME]

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else ./mlruns.db
experiment = "coat"
sweep = None  # a sweep's name; None: the newest sweep that varies thinking.num_slots
out_dir = "analysis-out/thinking_length"

# %%
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from coat import tracking
from coat.analysis import compare, runs
from coat.analysis.notebooks import outputs

K = "thinking.num_slots"
uri = tracking.resolve_uri(tracking_uri)
out = outputs(out_dir)
found = runs.find_sweep(uri, experiment, sweep, varying=(K,), grid=True)
assert found is not None, f"no sweep in experiment {experiment!r} at {uri} varies {K}"
parent, trials = found
families = compare.families(trials)
metrics = {family: compare.quality_metric(trials, family) for family in families}
others = [f for f in runs.varied(trials) if f not in (K, compare.SEED)]  # e.g. an expert set crossed with K
seeds = trials["train.seed"].nunique()
print(f"sweep {parent['name']}: {len(trials)} trials, K in {sorted(trials[K].unique())}, {seeds} seed(s)")

# %% [markdown]
# ## Quality per K

# %%
quality = compare.by_setting(trials, [K, *others], list(metrics.values()))
out.table(quality, "quality_by_k")
ks = sorted(quality[K].unique())
fig, axes = plt.subplots(1, len(families), figsize=(3.2 * len(families), 3), squeeze=False)
for ax, family in zip(axes[0], families, strict=True):
    x = range(len(ks))
    for setting, part in compare.settings(quality[quality["metric"] == metrics[family]], others):
        rows = part.set_index(K).reindex(ks)
        ax.errorbar(x, rows["mean"], yerr=[rows["mean"] - rows["ci_low"], rows["ci_high"] - rows["mean"]],
                    marker="o", capsize=3, label=setting or None)
    chance = trials[f"eval/{family}/chance"].mean() if f"eval/{family}/chance" in trials else math.nan
    if not math.isnan(chance):
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xticks(list(x), [str(k) for k in ks])
    ax.set_title(family)
    ax.set_xlabel("K")
    ax.set_ylabel(metrics[family].rsplit("/", 1)[1])
    if others:
        ax.legend(fontsize=6)
fig.tight_layout()
out.figure(fig, "quality_vs_k")
quality

# %% [markdown]
# ## Validation losses and prefill cost per K

# %%
losses = [c for c in trials.columns if c.startswith("val/") and not c.endswith(("_ci_low", "_ci_high"))]
cost = [c for c in ("cost/prefill_positions", "latency/ttft_s") if c in trials]
summary = compare.by_setting(trials, [K, *others], losses + cost)
out.table(summary, "losses_and_cost_by_k")
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
for setting, part in compare.settings(summary, others):
    for loss in losses:
        rows = part[part["metric"] == loss]
        left.plot(rows[K], rows["mean"], marker="o", label=f"{loss} {setting}".strip())
left.set_xlabel("K")
left.set_ylabel("validation loss")
left.legend(fontsize=7)
positions = summary[summary["metric"] == "cost/prefill_positions"].groupby(K, as_index=False)["mean"].mean()
right.plot(positions[K], positions["mean"], marker="s", color="tab:grey")
right.set_xlabel("K")
right.set_ylabel("added prefill positions (tokens)")
timed = right.twinx()
for setting, part in compare.settings(summary[summary["metric"] == "latency/ttft_s"], others):
    timed.errorbar(part[K], part["mean"], yerr=[part["mean"] - part["ci_low"], part["ci_high"] - part["mean"]],
                   marker="o", capsize=3, label=setting or None)
timed.set_ylabel("time to first token (s, batch 1)", color="tab:blue")
fig.tight_layout()
out.figure(fig, "losses_and_prefill_vs_k")
summary

# %% [markdown]
# ## Each K against K = 0 on the same examples (paired bootstrap, exact McNemar; pairs pooled over seeds)

# %%
paired = compare.paired_against(uri, trials, K, 0)
out.table(paired, "paired_vs_k0")
fig, axes = plt.subplots(1, len(families), figsize=(3.2 * len(families), 3), squeeze=False)
for ax, family in zip(axes[0], families, strict=True):
    rows = paired[paired["task"] == family].sort_values(K)
    ax.errorbar(range(len(rows)), rows["diff"], yerr=[rows["diff"] - rows["diff_ci_low"],
                                                       rows["diff_ci_high"] - rows["diff"]], marker="o", capsize=3)
    ax.axhline(0, color="grey", linestyle=":")
    ax.set_xticks(range(len(rows)), [str(k) for k in rows[K]])
    ax.set_title(f"{family}: K vs K=0")
    ax.set_xlabel("K")
    ax.set_ylabel(f"difference in {rows['metric'].iloc[0] if len(rows) else 'score'}")
fig.tight_layout()
out.figure(fig, "paired_vs_k0")
paired

# %% [markdown]
# ## Conclusion (computed from the pairs above)

# %%
sentences = compare.family_sentences(paired, K, "K", 0) or [
    "No run with K > 0 has a K = 0 run of the same other settings to be paired with: no comparison to conclude."]
if seeds == 1:
    sentences.append("One seed: these intervals cover test examples, not training runs; rerun with --seeds.")
out.conclude(sentences, parent["run_id"])
