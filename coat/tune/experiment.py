"""What every script in `experiments/` does: find its config and space, attach to a cluster or start a local
Ray, run the sweep, print and log the results table.

On a cluster (`ray submit`, `ray job submit`: see `attach_ray`) the script uses `<name>.cluster.yaml` (real
checkpoints, GPUs), `$COAT_STORAGE` for results and checkpoints and `$MLFLOW_TRACKING_URI` for MLflow;
otherwise `<name>.yaml`, the embedded default. `ray submit` copies only the script, so configs are found
through the installed `coat` package (the cluster's setup installs it).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import ray

import coat
from coat.config import load_config

PROJECT = Path(coat.__file__).resolve().parents[1]
CONFIGS = PROJECT / "experiments" / "configs"

# Smoke runs (the tests use them): a small coat-mini of their own, a few steps, a few test examples.
SMOKE = [
    "data.manifest=data/coat-mini-smoke/manifest.jsonl", "data.store=data/coat-mini-smoke/store",
    "data.synth_size=60", "train.stages=[{steps: 3, ce_weight: 0.1}, {steps: 3, ce_weight: 1.0}]",
    "train.checkpoint_every=3", "train.batch_size=4", "train.warmup_steps=1", "train.val_batches=1",
    "eval.max_examples=6", "eval.max_new_tokens=6", "eval.bootstrap=200", "sweep.num_samples=2",
    "sweep.grace_steps=3",
]


def attach_ray() -> bool:
    """Attach to the cluster when there is one: `ray job submit` sets RAY_ADDRESS, and the cluster configs set
    COAT_STORAGE on every node (`ray submit` runs the script on the head). Not by probing with
    address="auto" alone, which would also attach to any local Ray left running on a workstation.
    Without a cluster the sweep starts a local Ray itself, after the config and space have been checked."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not (os.environ.get("RAY_ADDRESS") or os.environ.get("COAT_STORAGE")):
        return False
    ray.init(address="auto")
    return True


def main(name: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"{name}.py", description=f"coat experiment {name}")
    parser.add_argument("--smoke", action="store_true", help="a minutes-long check on a small coat-mini")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides (after --)")
    args = parser.parse_args(argv)

    on_cluster = attach_ray()
    config = CONFIGS / (f"{name}.cluster.yaml" if on_cluster else f"{name}.yaml")
    space = CONFIGS / "spaces" / (f"{name}.smoke.yaml" if args.smoke else f"{name}.yaml")
    extra = [*(SMOKE if args.smoke else []), f"sweep.name={name}{'-smoke' if args.smoke else ''}"]
    shared = os.environ.get("COAT_STORAGE") if on_cluster else None
    if shared:  # every node must see the data, results and checkpoints
        extra.append(f"train.storage={shared}")
        if args.smoke:
            extra += [f"data.manifest={shared}/data/coat-mini-smoke/manifest.jsonl",
                      f"data.store={shared}/data/coat-mini-smoke/store"]
    extra += args.overrides
    cfg = load_config(config, extra)  # a bad config fails here, before the sweep's heavy imports

    from coat.tune.report import print_results
    from coat.tune.sweep import run_sweep

    result = run_sweep(config, space, extra, resume=args.resume)
    print_results(result, cfg)
