"""What every script in `experiments/` does: find its config and space, attach to a cluster or start a local
Ray, run the sweep, print and log the results table.

On a cluster (`ray submit`, `ray job submit`: see `coat.ray_runtime.attach_cluster`) the script uses
`<name>.cluster.yaml` (real checkpoints, GPUs), `$COAT_STORAGE` for results and checkpoints and
`$MLFLOW_TRACKING_URI` for MLflow; otherwise `<name>.yaml`, the embedded default. Configs are found beside the
script (`configs/`, in a checkout), else under `$COAT_PROJECT/experiments/configs`: `ray submit` copies the script
alone to the head node's home folder, and the cluster configs' setup points COAT_PROJECT at the project they mount
there.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from coat.config import load_config
from coat.errors import UserError, reported
from coat.ray_runtime import attach_cluster

# The notebook in analysis/ that reads each experiment's sweep; run at its end.
NOTEBOOK = {"ablate_thinking_len": "thinking_length", "ablate_loss_weights": "loss_weights",
            "ablate_expert_sets": "expert_sets", "compare_backbones": "backbones"}

# Smoke runs (the tests use them): a small coat-mini of their own, a few steps, a few test examples.
SMOKE = [
    "data.manifest=data/coat-mini-smoke/manifest.jsonl", "data.store=data/coat-mini-smoke/store",
    "data.synth_size=60", "train.stages=[{steps: 3, ce_weight: 0.1}, {steps: 3, ce_weight: 1.0}]",
    "train.checkpoint_every=3", "train.batch_size=4", "train.warmup_steps=1", "train.val_batches=1",
    "eval.max_examples=6", "eval.max_new_tokens=6", "eval.bootstrap=200", "sweep.num_samples=2",
    "sweep.grace_steps=3",
]


def project_folder(script: str | Path) -> Path:
    """The project a script belongs to: the folder above its own `experiments/` when it has `configs/` beside
    it, else $COAT_PROJECT. Raises UserError naming both places and the fix."""
    beside = Path(script).resolve().parent
    candidates = [beside.parent, *([Path(os.environ["COAT_PROJECT"])] if os.environ.get("COAT_PROJECT") else [])]
    for project in candidates:
        if (project / "experiments" / "configs").is_dir():
            return project
    raise UserError(f"no experiment configs beside {beside} (configs/) nor in $COAT_PROJECT/experiments/configs "
                    f"(COAT_PROJECT={os.environ.get('COAT_PROJECT', 'unset')}): run the script from the project's "
                    "experiments/ folder, or set COAT_PROJECT to the project folder (the cluster configs do)")


def main(script: str | Path, argv: list[str] | None = None) -> None:
    """The experiment of `script` (its file name is the experiment's name), as its command line asks. A user's
    mistake prints one line and exits with its code, as `coat` does (COAT_DEBUG=1 shows the traceback)."""
    with reported(os.environ.get("COAT_DEBUG") == "1"):
        run(script, argv)


def run(script: str | Path, argv: list[str] | None = None) -> None:
    name = Path(script).stem
    parser = argparse.ArgumentParser(prog=f"{name}.py", description=f"coat experiment {name}")
    parser.add_argument("--smoke", action="store_true", help="a minutes-long check on a small coat-mini")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name")
    parser.add_argument("--seeds", help="train every point once per seed, e.g. 0,1,2 (grid spaces)")
    parser.add_argument("--no-analysis", action="store_true", help="skip the analysis notebook at the end")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and space, say what would run, and run nothing")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides (after --)")
    args = parser.parse_args(argv)

    project = project_folder(script)
    configs = project / "experiments" / "configs"
    on_cluster = attach_cluster()
    config = configs / (f"{name}.cluster.yaml" if on_cluster else f"{name}.yaml")
    space = configs / "spaces" / (f"{name}.smoke.yaml" if args.smoke else f"{name}.yaml")
    extra = [*(SMOKE if args.smoke else []), f"sweep.name={name}{'-smoke' if args.smoke else ''}"]
    shared = os.environ.get("COAT_STORAGE") if on_cluster else None
    if shared:  # every node must see the data, results and checkpoints
        extra.append(f"train.storage={shared}")
        if args.smoke:
            extra += [f"data.manifest={shared}/data/coat-mini-smoke/manifest.jsonl",
                      f"data.store={shared}/data/coat-mini-smoke/store"]
    if args.seeds:
        extra.append(f"sweep.seeds=[{args.seeds}]")
    extra += args.overrides
    cfg = load_config(config, extra)  # a bad config fails here, before the sweep's heavy imports
    if args.dry_run:
        from coat.tune.space import load_space

        searched = load_space(space, config, extra)
        trials = len(searched.grid()) * max(1, len(cfg.sweep.seeds)) if searched.is_grid else cfg.sweep.num_samples
        print(f"config: {config}\nspace: {space}\ntrials: {trials} ({'grid' if searched.is_grid else 'optuna'})")
        return

    from coat.tune.report import print_results
    from coat.tune.sweep import run_sweep

    result = run_sweep(config, space, extra, resume=args.resume)
    print_results(result, cfg)
    if not args.no_analysis:
        conclude(name, result.name, cfg, project / "analysis")


def conclude(name: str, sweep: str, cfg, notebooks: Path) -> None:
    """Execute the experiment's notebook on its sweep, attach its outputs to the sweep's parent run, and print
    where the figures and the executed notebook are, and what they conclude. Exits 1 when the notebook fails."""
    from rich.console import Console

    from coat import tracking
    from coat.analysis.analyze_cli import analyze
    from coat.analysis.notebooks import notebook_folder

    console = Console(width=None if sys.stdout.isatty() else 200)
    notebook = NOTEBOOK[name]
    try:
        folder = notebook_folder(notebooks if notebooks.is_dir() else None)
    except FileNotFoundError as err:
        console.print(f"analysis skipped: {err}")
        return
    out = Path("analysis-out") / sweep
    summary = analyze(tracking.resolve_uri(cfg.tracking.uri), cfg.tracking.experiment, sweep, [notebook], out,
                      folder)[notebook]
    if "error" in summary:
        console.print(f"analysis notebook {notebook} failed: {summary['error']} (see {out / notebook})")
        sys.exit(1)
    console.print(f"executed notebook: {out / notebook / f'{notebook}.ipynb'}")
    console.print("figures: " + ", ".join(str(out / notebook / f) for f in summary["figures"]))
    for sentence in summary["conclusions"]:
        console.print(f"  {sentence}", markup=False, highlight=False)
