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
# # How much thinking? Quality against the number of thinking slots K, and what explains a gain
#
# Reads a sweep over `thinking.num_slots` (K = 0 is the same fine-tune without a thinking block) and asks, per
# task family, whether any K beats K = 0 on the same test examples: scores per K with 95% intervals (across
# seeds when there are several), validation losses, the prefill cost, and paired comparisons against K = 0, seed
# by seed. Where the sweep also ran the controls (`thinking.targets`: `none`, the same K slots unsupervised;
# `shuffled`, supervised with another clip's targets), it says whether the positions or the experts' information
# explain a gain. Every verdict reads a Holm-adjusted p over all the comparisons this notebook makes.
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
import pandas as pd

from coat import tracking
from coat.analysis import compare, runs
from coat.analysis.notebooks import outputs

K, TARGETS = compare.K, compare.TARGETS
uri = tracking.resolve_uri(tracking_uri)
out = outputs(out_dir)
found = runs.required_sweep(uri, experiment, sweep, (K,), "experiments/ablate_thinking_len.py makes one",
                            grid=True)
parent, trials = found
trials = compare.with_targets(trials)
coat_runs = trials[trials[TARGETS] == "experts"]  # K = 0 among them: at K = 0 the targets mean nothing
families = compare.families(trials)
metrics = {family: compare.quality_metric(trials, family) for family in families}
others = [f for f in runs.varied(trials) if f not in (K, TARGETS, compare.SEED)]  # e.g. an expert set crossed with K
seeds = trials["train.seed"].nunique()
controls = sorted(set(trials[TARGETS]) & set(compare.CONTROLS))
print(f"sweep {parent['name']}: {len(trials)} trials, K in {sorted(trials[K].unique())}, {seeds} seed(s), "
      f"controls: {', '.join(controls) or 'none'}")

# %% [markdown]
# ## Quality per K (controls as their own points)

# %%
quality = compare.by_setting(trials, [K, TARGETS, *others], list(metrics.values()))
out.table(quality, "quality_by_k")
ks = sorted(quality[K].unique())
fig, axes = plt.subplots(1, len(families), figsize=(3.2 * len(families), 3), squeeze=False)
for ax, family in zip(axes[0], families, strict=True):
    for setting, part in compare.settings(quality[quality["metric"] == metrics[family]], [TARGETS, *others]):
        part = part.sort_values(K)
        x = [ks.index(k) for k in part[K]]
        ax.errorbar(x, part["mean"], yerr=compare.error_bars(part, "mean", "ci_low", "ci_high"),
                    marker="o" if "=experts" in setting else "^", capsize=3, label=setting)
    chance = trials[f"eval/{family}/chance"].mean() if f"eval/{family}/chance" in trials else math.nan
    if not math.isnan(chance):
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_title(family)
    ax.set_xlabel("K")
    ax.set_ylabel(metrics[family].rsplit("/", 1)[1])
    ax.legend(fontsize=6)
fig.tight_layout()
out.figure(fig, "quality_vs_k")
quality

# %% [markdown]
# ## Validation losses and prefill cost per K

# %%
losses = [c for c in coat_runs.columns if c.startswith("val/") and not c.endswith(("_ci_low", "_ci_high"))]
cost = [c for c in ("cost/prefill_positions", "latency/ttft_s") if c in coat_runs]
summary = compare.by_setting(coat_runs, [K, *others], losses + cost)
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
    timed.errorbar(part[K], part["mean"], yerr=compare.error_bars(part, "mean", "ci_low", "ci_high"),
                   marker="o", capsize=3, label=setting or None)
timed.set_ylabel("time to first token (s, batch 1)", color="tab:blue")
fig.tight_layout()
out.figure(fig, "losses_and_prefill_vs_k")
summary

# %% [markdown]
# ## Each K against K = 0, and CoAT against the controls, on the same examples
#
# Paired seed by seed; 95% intervals from a two-level bootstrap (seeds, then test examples shared by every seed);
# p is the larger of that bootstrap's and an exact sign-flip test's over examples; `p_holm` adjusts every p of
# this section together (Holm-Bonferroni), and the verdicts read it.

# %%
vs_k0 = compare.paired_against(uri, coat_runs, K, 0).assign(a_system="coat", b_system="K=0")
vs_controls = compare.against_controls(uri, trials)
comparisons = compare.adjust(pd.concat([t for t in (vs_k0, vs_controls) if len(t)] or [vs_k0], ignore_index=True))
paired = comparisons[(comparisons["a_system"] == "coat") & (comparisons["b_system"] == "K=0")]
out.table(paired, "paired_vs_k0")
out.table(comparisons, "comparisons")
fig, axes = plt.subplots(1, len(families), figsize=(3.2 * len(families), 3), squeeze=False)
for ax, family in zip(axes[0], families, strict=True):
    rows = paired[paired["task"] == family].sort_values(K)
    ax.errorbar(range(len(rows)), rows["diff"], yerr=compare.error_bars(rows), marker="o", capsize=3)
    ax.axhline(0, color="grey", linestyle=":")
    ax.set_xticks(range(len(rows)), [str(k) for k in rows[K]])
    ax.set_title(f"{family}: K vs K=0")
    ax.set_xlabel("K")
    ax.set_ylabel(f"difference in {rows['metric'].iloc[0] if len(rows) else 'score'}")
fig.tight_layout()
out.figure(fig, "paired_vs_k0")
if controls:
    with_controls = comparisons[comparisons[K].isin(comparisons.loc[comparisons["b_system"] != "K=0", K])]
    fig, axes = plt.subplots(1, len(families), figsize=(3.6 * len(families), 3), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        rows = with_controls[with_controls["task"] == family]
        labels = [f"{a} vs {b} (K={k})" for a, b, k in zip(rows["a_system"], rows["b_system"], rows[K], strict=True)]
        ax.errorbar(rows["diff"], range(len(rows)), xerr=compare.error_bars(rows), fmt="o", capsize=3)
        ax.axvline(0, color="grey", linestyle=":")
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(f"{family}: controls")
        ax.set_xlabel(f"difference in {rows['metric'].iloc[0] if len(rows) else 'score'}")
    fig.tight_layout()
    out.figure(fig, "controls")
comparisons

# %% [markdown]
# ## Conclusion (computed from the comparisons above)

# %%
sentences = compare.family_sentences(paired, K, "K", 0, others) or [
    "No run with K > 0 has a K = 0 run of the same other settings to be paired with: no comparison to conclude."]
sentences += compare.control_sentences(comparisons, others) or [
    "No control in this sweep (thinking.targets none or shuffled at some K): nothing here separates the extra "
    "prefill positions from the expert supervision; ablate_thinking_len's space runs both controls at one K."]
unpaired = (("with K > 0", vs_k0, "a K = 0 run"),
            ("of CoAT at a control's K or of a control", vs_controls, "the run it is compared with"))
for what, table, twin in unpaired:
    if table.attrs["unpaired_runs"]:
        sentences.append(f"Not compared above: {compare.plural(table.attrs['unpaired_runs'], 'finished run')} {what} "
                         f"had no {twin} of the same settings and seed.")
if seeds == 1:
    sentences.append("One seed: these intervals cover test examples, not training runs; rerun with --seeds.")
out.conclude(sentences, parent["run_id"])
