"""ASHA + Optuna against the full grid over the same space, on the embedded default, side by side.

    python experiments/benchmarks/sweep_efficiency.py                 # 4 x 3 grid vs 4 Optuna trials
    python experiments/benchmarks/sweep_efficiency.py --steps 60 --samples 4

Reports, for each: the best validation score (`val/ce`) and the emotion accuracy (with its bootstrap 95%
interval) of the best trial, the trial-steps spent (ASHA stops trials early), and the share of the sweep's
wall-clock x concurrency spent outside training steps, split into trial start-up, the rest of the training loop
(validation, checkpoints), evaluation, and outside any trial (Ray and Tune start-up, scheduling, idle slots);
the last, in seconds per trial, is the driver's own overhead per trial (`summarise`, which tests/multinode_cluster.py
also calls on a grid spread over several nodes). The data (coat-mini and its expert features) is made before either
sweep starts, as a researcher's data is before their sweeps, and its time reported on its own.
Goal: the Optuna + ASHA best within the grid best's interval for at most a third of the grid's steps.
Prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from coat import tracking
from coat.config import load_config
from coat.data.prepare import prepare_data
from coat.tune.sweep import run_sweep

K_VALUES = [0, 4, 8, 16]
LR_VALUES = [1.0e-3, 3.0e-3, 1.0e-2]


def summarise(result, uri: str, wall: float, concurrency: int, batch_size: int) -> dict:
    """The sweep's best trial, its cost in trial-steps, and where its wall-clock x concurrency went, as shares:
    trial start-up (call to the end of the first optimizer step, less one typical step: model, data stream),
    training steps, the rest of the training loop (validation, checkpoints, logging), the test-split evaluation, and
    outside any trial (Ray and Tune start-up, data preparation, scheduling, slots left idle). That last share in
    seconds, divided by the trials, is `overhead_per_trial_s`: what the driver costs each trial beyond the trial's
    own work."""
    table = result.table
    phases = dict.fromkeys(("startup", "steps", "loop_other", "evaluation"), 0.0)
    for run_id in tracking.child_run_ids(uri, result.parent_run_id):
        history = {key: [v for _, v in tracking.metric_history(uri, run_id, key)]
                   for key in ("train/samples_per_s", "train/since_launch_s", "time/train_s", "time/eval_s")}
        if not history["train/since_launch_s"]:
            continue
        durations = [batch_size / r if r > 0 else 0.0 for r in history["train/samples_per_s"]]
        # The first step also waits for the data stream to start (Ray Data's executor, decode workers): what it
        # takes beyond the trial's median step is start-up, not training.
        first = min(durations[0], statistics.median(durations))
        steps = first + sum(durations[1:])
        startup = history["train/since_launch_s"][0] - first
        trained = (history["time/train_s"] or history["train/since_launch_s"])[-1]  # early-stopped: last step
        phases["startup"] += startup
        phases["steps"] += steps
        phases["loop_other"] += trained - startup - steps
        phases["evaluation"] += sum(history["time/eval_s"])
    capacity = wall * concurrency
    shares = {name: seconds / capacity for name, seconds in phases.items()}
    shares["outside_trials"] = 1 - sum(shares.values())
    best = result.best or {}
    return {
        "trials": len(table), "trial_steps": int(table["steps"].sum()),
        "best_val_ce": best.get("val/ce"), "best_setting": best.get("setting"),
        "best_emotion_accuracy": best.get("eval/emotion/accuracy"),
        "best_emotion_ci": [best.get("eval/emotion/accuracy_ci_low"), best.get("eval/emotion/accuracy_ci_high")],
        "wall_s": wall, "outside_training_share": 1 - shares["steps"], "shares": shares,
        "overhead_per_trial_s": shares["outside_trials"] * capacity / len(table) if len(table) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--samples", type=int, default=4, help="Optuna trials (the grid has 12)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="coat-sweep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    grid_space, tpe_space = work / "grid.yaml", work / "tpe.yaml"
    grid_space.write_text(f"thinking.num_slots: {{grid: {K_VALUES}}}\ntrain.lr: {{grid: {LR_VALUES}}}\n")
    tpe_space.write_text(f"thinking.num_slots: {{choice: {K_VALUES}}}\ntrain.lr: {{choice: {LR_VALUES}}}\n")
    common = [
        f"data.manifest={work / 'coat-mini' / 'manifest.jsonl'}", f"data.store={work / 'store'}",
        "data.synth_size=400", f"train.storage={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlruns.db'}",
        "experts.names=[prosody,mel]", "lora.modules_to_save=[lm_head]", "train.num_workers=0",
        "train.batch_size=8", f"train.stages=[{{steps: {args.steps}}}]", f"train.checkpoint_every={args.steps // 4}",
        "train.warmup_steps=5", "eval.max_examples=60", "eval.suites.coat-mini.max_new_tokens=8",
        "sweep.max_concurrent=2",
        f"sweep.grace_steps={args.steps // 4}",
    ]
    uri = f"sqlite:///{work / 'mlruns.db'}"
    start = time.perf_counter()
    prepare_data(load_config(overrides=common))  # coat-mini and its features: made once, before either sweep
    out: dict[str, object] = {"data_preparation_s": time.perf_counter() - start}
    for label, space, extra in (("grid", grid_space, ["sweep.name=grid"]),
                                ("optuna_asha", tpe_space, ["sweep.name=tpe", f"sweep.num_samples={args.samples}"])):
        start = time.perf_counter()
        result = run_sweep(load_config(overrides=[*common, *extra]), space)
        out[label] = summarise(result, uri, time.perf_counter() - start, 2, 8)
    out["steps_ratio"] = out["optuna_asha"]["trial_steps"] / out["grid"]["trial_steps"]
    low, high = out["grid"]["best_emotion_ci"]
    found = out["optuna_asha"]["best_emotion_accuracy"]
    out["within_grid_interval"] = None if None in (low, high, found) else bool(low <= found <= high)
    print(json.dumps(out, default=float))
    table = Table(title="sweep efficiency: Optuna TPE + ASHA vs the full grid (same space)")
    for column in ("sweep", "trials", "trial-steps", "best val/ce", "best setting", "emotion acc [95% CI]",
                   "outside training", "start-up / loop / eval / outside trials", "driver s/trial"):
        table.add_column(column)
    for label in ("grid", "optuna_asha"):
        r = out[label]
        ci = r["best_emotion_ci"]
        table.add_row(label, str(r["trials"]), str(r["trial_steps"]), f"{r['best_val_ce']:.3f}", str(r["best_setting"]),
                      f"{r['best_emotion_accuracy']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]",
                      f"{r['outside_training_share']:.0%}",
                      " / ".join(f"{r['shares'][k]:.0%}" for k in ("startup", "loop_other", "evaluation",
                                                                    "outside_trials")),
                      f"{r['overhead_per_trial_s']:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
