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
# first response token, beside a control task (Hewitt and Liang's random value per question type: selectivity =
# probe - control discounts what memorising the question gives). A CoAT run is compared with the run of the same
# sweep that differs only by K = 0, on the same clips: each run's layer is chosen on half of the clips and the two
# are compared at those layers on the other half, with a bootstrap interval over clips. Where `coat probe
# --logit-lens` ran, the slots' states are also read through the LM head, layer by layer.
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
import numpy as np
import pandas as pd

from coat import tracking
from coat.analysis import runs
from coat.analysis.compare import held_out_comparison
from coat.analysis.notebooks import outputs

K = "thinking.num_slots"
uri = tracking.resolve_uri(tracking_uri)
out = outputs(out_dir)
found = runs.required_sweep(uri, experiment, sweep, (K,), "`coat probe --mlflow-run RUN` on its runs adds them "
                            "(experiments/ablate_thinking_len.py makes the sweep)", metric_prefix="probe/")
parent, trials = found
probed = trials[trials.filter(like="probe/").notna().any(axis=1)]
if not len(probed):
    raise runs.NothingToAnalyse(f"no run of sweep {parent['name']} holds probe results: `coat probe --mlflow-run RUN` "
                                "adds them")
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
# ## CoAT against its K = 0 twin at the response position, on clips the choice of layer never saw

# %%
clips = {run: runs.table_artifact(uri, run_id, "probes/clips.parquet") for run, run_id in
         zip(probed["name"], probed["run_id"], strict=True) if runs.has_artifact(uri, run_id, "probes/clips.parquet")}
held_out = []
for (setting, target), group in results[results["position"] == "response"].groupby(["setting", "target"]):
    plain = group.loc[group["K"] == 0, "run"].unique()
    for run, k in group.loc[group["K"] > 0, ["run", "K"]].drop_duplicates().itertuples(index=False):
        if len(plain) != 1 or run not in clips or plain[0] not in clips:
            continue
        mine, theirs = (clips[name][(clips[name]["target"] == target) & (clips[name]["position"] == "response")]
                        for name in (run, plain[0]))
        held_out.append({"setting": setting, "target": target, "K": k, "metric": group["metric"].iloc[0],
                         **held_out_comparison(mine, theirs)})
held_out = pd.DataFrame(held_out)
out.table(held_out if len(held_out) else pd.DataFrame(columns=["setting", "target", "K"]), "held_out_vs_k0")
held_out

# %% [markdown]
# ## The thinking slots through the LM head (logit lens)

# %%
lenses = {run: runs.table_artifact(uri, run_id, "probes/logit_lens.parquet") for run, run_id in
          zip(probed["name"], probed["run_id"], strict=True)
          if runs.has_artifact(uri, run_id, "probes/logit_lens.parquet")}
lenses = {run: lens for run, lens in lenses.items() if len(lens)}
if lenses:
    fig, axes = plt.subplots(1, len(lenses), figsize=(4.5 * len(lenses), 3.2), squeeze=False)
    for ax, (run, lens) in zip(axes[0], lenses.items(), strict=True):
        top = lens[lens["rank"] == 1].pivot(index="layer", columns="slot", values="probability").sort_index()
        tokens = lens[lens["rank"] == 1].pivot(index="layer", columns="slot", values="token").sort_index()
        image = ax.imshow(top.to_numpy(), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
        for (i, j), token in np.ndenumerate(tokens.to_numpy()):
            ax.text(j, i, repr(token)[1:-1][:6], ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(top.shape[1]), list(top.columns))
        ax.set_yticks(range(top.shape[0]), list(top.index))
        ax.set_xlabel("slot")
        ax.set_ylabel("layer")
        ax.set_title(f"{run}: likeliest token", fontsize=8)
        fig.colorbar(image, ax=ax, label="probability (mean over clips)")
    fig.tight_layout()
    out.figure(fig, "logit_lens")
    out.table(pd.concat([lens.assign(run=run) for run, lens in lenses.items()], ignore_index=True), "logit_lens")
print(f"logit lens of {len(lenses)} run(s): {sorted(lenses)}")

# %% [markdown]
# ## Conclusion (computed from the probe results above)

# %%
sentences = []
for row in held_out.itertuples():
    sentences.append(
        f"{row.target} at the response position{f' ({row.setting})' if row.setting else ''}: K={row.K} (layer "
        f"{row.coat_layer}) has {row.metric} selectivity {row.coat:+.3f} against {row.plain:+.3f} at K=0 (layer "
        f"{row.plain_layer}), a difference of {row.diff:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}] (95% bootstrap "
        f"interval over {row.n_clips} clips; each run's layer chosen on the other half of the clips).")
for run, lens in lenses.items():
    deepest = lens["layer"].max()  # `coat probe --layers` may leave the model's last layer out
    top = lens[(lens["rank"] == 1) & (lens["layer"] == deepest)]
    sentences.append(f"{run}: read through the LM head at layer {deepest}, the deepest it was read at, its slots' "
                     "likeliest tokens are "
                     + ", ".join(f"{t!r} ({p:.2f})" for t, p in zip(top["token"], top["probability"], strict=True))
                     + ".")
for (target, note), unprobed in results[results["score"].isna()].groupby(["target", "note"], sort=True):
    sentences.append(f"{target}: not probed in {', '.join(sorted(unprobed['run'].unique()))} ({note}).")
if held_out.empty:
    sentences.append("No CoAT run has a K = 0 twin with per-clip probe results: probe both (coat probe) to compare "
                     "them.")
out.conclude(sentences, parent["run_id"])
