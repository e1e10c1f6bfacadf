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
# # CoAT on each backbone against its baselines: quality, time to first token, latency
#
# Reads a sweep over `backbone.name` (or, without one, the newest sweep) whose trials evaluated the baselines
# beside CoAT on the same examples (`eval.baselines: [base, cot]`): the backbone as it is, and the backbone
# reasoning in text first. Then the Pareto front of quality against prefill cost from the newest
# multi-objective sweep.
#
#     coat analyze --notebooks backbones [--sweep NAME]

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else ./mlruns.db
experiment = "coat"
sweep = None  # a sweep's name; None: the newest grid over backbone.name, else with baselines, else any grid
out_dir = "analysis-out/backbones"

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from coat import tracking
from coat.analysis import compare, runs
from coat.analysis.notebooks import outputs

BACKBONE, K = "backbone.name", "thinking.num_slots"
uri = tracking.resolve_uri(tracking_uri)
out = outputs(out_dir)
found = (runs.find_sweep(uri, experiment, sweep, varying=(BACKBONE,), grid=True)
         or runs.find_sweep(uri, experiment, grid=True, metric_prefix="base/")
         or runs.required_sweep(uri, experiment, None, (), "experiments/compare_backbones.py makes one",
                                    grid=True))
parent, trials = found
done = compare.with_targets(trials[trials["status"] == "FINISHED"])
done = done[done[compare.TARGETS] == "experts"]  # the controls (thinking_length reads them) are not systems
families = compare.families(done)
print(f"sweep {parent['name']}: backbones {sorted(done[BACKBONE].unique())}, K {sorted(done[K].unique())}")

# %% [markdown]
# ## Systems side by side (seeds pooled): CoAT, the same fine-tune without thinking, and the baselines

# %%
rows = []
for backbone, group in done.groupby(BACKBONE, sort=True):
    systems = {f"CoAT (K={k})": (group[group[K] == k], "") for k in sorted(group[K].unique()) if k > 0}
    systems |= {"fine-tune, K=0": (group[group[K] == 0], "")}
    with_thinking = group[group[K] > 0] if (group[K] > 0).any() else group
    systems |= {name: (with_thinking, prefix) for name, prefix in (("base", "base/"), ("text CoT", "cot/"))
                if any(c.startswith(prefix) for c in group.columns)}
    for system, (runs_of, prefix) in systems.items():
        if runs_of.empty:
            continue
        row = {"backbone": backbone, "system": system, "runs": len(runs_of)}
        for family in families:
            key = prefix + compare.quality_metric(done, family)
            row[family] = runs_of[key].mean() if key in runs_of else float("nan")
        for name, key in (("ttft_s", "latency/ttft_s"), ("latency_s", "latency/total_s"),
                          ("new_tokens", "latency/new_tokens")):
            row[name] = runs_of[prefix + key].mean() if prefix + key in runs_of else float("nan")
        rows.append(row)
systems = pd.DataFrame(rows)
out.table(systems, "systems")
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
labels = [f"{r.backbone}\n{r.system}" for r in systems.itertuples()]
left.barh(labels, systems["ttft_s"])
left.set_xlabel("time to first token (s, batch 1)")
right.barh(labels, systems["latency_s"])
right.set_xlabel("latency per answer (s, batch 1)")
fig.tight_layout()
out.figure(fig, "latency_by_system")
fig, axes = plt.subplots(1, len(families), figsize=(3.4 * len(families), 0.6 + 0.35 * len(systems)), squeeze=False)
for ax, family in zip(axes[0], families, strict=True):
    ax.barh(labels, systems[family].fillna(0))
    ax.set_title(family)
fig.tight_layout()
out.figure(fig, "quality_by_system")
systems

# %% [markdown]
# ## Quality against prefill cost: the Pareto front of the newest multi-objective sweep

# %%
front_found = runs.find_sweep(uri, experiment, multi_objective=True)
sentences = []
if front_found is not None:
    front_parent, front_trials = front_found
    metric, mode = front_parent["sweep.metric"], front_parent["sweep.mode"]
    points = front_trials[front_trials["status"] == "FINISHED"]
    front = compare.pareto_front(points, "cost/prefill_positions", metric, lower_is_better=mode == "min")
    out.table(front[["name", "cost/prefill_positions", metric]], "pareto_front")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.scatter(points["cost/prefill_positions"], points[metric], label="trials")
    ax.plot(front["cost/prefill_positions"], front[metric], color="C1", marker="o", label="Pareto front")
    ax.set_xlabel("extra prefill positions (K + 2)")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    out.figure(fig, "pareto_front")
    sentences.append(f"Pareto front of {metric} against prefill cost in sweep {front_parent['name']}: "
                     + ", ".join(f"{r['name']} ({r['cost/prefill_positions']:.0f} positions, {r[metric]:.4g})"
                                 for _, r in front.iterrows()) + ".")
else:
    sentences.append("No multi-objective sweep in this experiment: no Pareto front (sweep.multi_objective=true).")

# %% [markdown]
# ## Conclusion (computed from the tables above)

# %%
for backbone, group in systems.groupby("backbone", sort=True):
    coat_rows = group[group["system"].str.startswith("CoAT")]
    if coat_rows.empty:
        continue
    coat = coat_rows.iloc[-1]
    for other in ("fine-tune, K=0", "base", "text CoT"):
        theirs = group[group["system"] == other]
        if theirs.empty:
            continue
        theirs = theirs.iloc[0]
        scores = ", ".join(f"{f} {compare.quality_metric(done, f).rsplit('/', 1)[1]} {coat[f]:.3f} vs {theirs[f]:.3f}"
                           for f in families)
        paired = "; thinking_length pairs each K with K=0 seed by seed" if other == "fine-tune, K=0" else ""
        sentences.append(f"{backbone}: {coat['system']} vs {other}: {scores}; time to first token "
                         f"{coat['ttft_s']:.4f} s vs {theirs['ttft_s']:.4f} s, answer {coat['latency_s']:.4f} s vs "
                         f"{theirs['latency_s']:.4f} s (means over {coat['runs']} and {theirs['runs']} runs, not a "
                         f"paired test{paired}).")
if not any(c.startswith(("base/", "cot/")) for c in done.columns):
    sentences.append("The trials evaluated no baseline: set eval.baselines=[base,cot] to compare against them.")
out.conclude(sentences, parent["run_id"])
