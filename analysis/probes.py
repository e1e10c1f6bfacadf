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
# # Does expert information reach the response? Linear probes per layer, CoAT against its K = 0 twin
#
# Reads the probe results `coat probe --mlflow-run RUN` logged into a sweep's runs: per layer, how well a linear
# probe decodes each target from the hidden states at the thinking slots and at the position that produces the
# first response token, beside a control task with shuffled labels (selectivity = probe - control). A CoAT run
# is compared with the run of the same sweep that differs only by K = 0, on the same clips.
#
#     coat probe --checkpoint RUN/checkpoint_... --data MANIFEST --targets mel,prosody --mlflow-run RUN_ID
#     coat analyze --notebooks probes [--sweep NAME]

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else ./mlruns.db
experiment = "coat"
sweep = None  # a sweep's name; None: the newest sweep over thinking.num_slots with probe results
out_dir = "analysis-out/probes"

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from coat import tracking
from coat.analysis import runs
from coat.analysis.notebooks import outputs

K = "thinking.num_slots"
uri = tracking.resolve_uri(tracking_uri)
out = outputs(out_dir)
found = runs.find_sweep(uri, experiment, sweep, varying=(K,), metric_prefix="probe/")
assert found is not None, (f"no sweep in experiment {experiment!r} at {uri} varies {K} and holds probe results: "
                           "run `coat probe --mlflow-run RUN` on its runs")
parent, trials = found
probed = trials[trials.filter(like="probe/").notna().any(axis=1)]
assert len(probed), f"no run of sweep {parent['name']} holds probe results: run `coat probe --mlflow-run RUN`"
others = [f for f in runs.varied(trials) if f != K]
results = []
for _, run in probed.iterrows():
    table = runs.table_artifact(uri, run["run_id"], "probes/results.parquet")
    results.append(table.assign(run=run["name"], K=run[K], setting=" ".join(f"{f}={run[f]}" for f in others)))
results = pd.concat(results, ignore_index=True)
out.table(results, "probe_results")
print(f"sweep {parent['name']}: probe results of {len(probed)} runs: {sorted(probed['name'])}")

# %% [markdown]
# ## Score per layer: CoAT (K > 0) against its K = 0 twin

# %%
targets = sorted(results["target"].unique())
positions = sorted(results["position"].unique())
fig, axes = plt.subplots(len(targets), len(positions), figsize=(4 * len(positions), 2.8 * len(targets)),
                         squeeze=False)
for row, target in zip(axes, targets, strict=True):
    for ax, position in zip(row, positions, strict=True):
        rows = results[(results["target"] == target) & (results["position"] == position)]
        for (run, k), group in rows.groupby(["run", "K"], sort=True):
            group = group.sort_values("layer")
            ax.plot(group["layer"], group["score"], marker="o", label=f"{run} (K={k})")
            ax.plot(group["layer"], group["control"], linestyle=":", color=ax.lines[-1].get_color())
        ax.set_title(f"{target} at {position}")
        ax.set_xlabel("layer")
        ax.set_ylabel(rows["metric"].iloc[0] if len(rows) else "score")
        ax.legend(fontsize=6)
fig.tight_layout()
out.figure(fig, "probes_by_layer")

# %% [markdown]
# ## Conclusion (computed from the probe results above)

# %%
sentences = []
fitted = results[results["score"].notna()]
best = (fitted.sort_values("selectivity", ascending=False)
        .groupby(["setting", "K", "target", "position"], sort=True).head(1))
for (setting, target), group in best[best["position"] == "response"].groupby(["setting", "target"], sort=True):
    thinking, plain = group[group["K"] > 0], group[group["K"] == 0]
    if thinking.empty or plain.empty:
        continue
    for _, t in thinking.iterrows():
        p = plain.iloc[0]
        sentences.append(
            f"{target} at the response position{f' ({setting})' if setting else ''}: K={t['K']} decodes it with "
            f"{t['metric']} {t['score']:.3f} (selectivity {t['selectivity']:+.3f}, layer {t['layer']}) against "
            f"{p['score']:.3f} (selectivity {p['selectivity']:+.3f}, layer {p['layer']}) at K=0, a difference in "
            f"selectivity of {t['selectivity'] - p['selectivity']:+.3f} ({int(t['n_clips'])} clips, "
            f"{int(t['folds'])}-fold grouped cross-validation; one fit each, so no interval).")
for target, note in results.loc[results["score"].isna(), ["target", "note"]].drop_duplicates("target").values:
    sentences.append(f"{target}: not probed ({note}).")
if not sentences:
    sentences.append("No CoAT run has a K = 0 twin with probe results: probe both to compare them.")
out.conclude(sentences, parent["run_id"])
