"""What every experiment script beside this file does: find its config and space in `configs/`, attach to a
cluster or start a local Ray, run the sweep, print and log the results table, execute its analysis notebook.

On a cluster (`ray submit`, `ray job submit`: see `coat.ray_runtime.attach_cluster`) a script uses
`<name>.cluster.yaml` (real checkpoints, GPUs), `$COAT_STORAGE` for results and checkpoints and
`$MLFLOW_TRACKING_URI` for MLflow; otherwise `<name>.yaml`, the embedded default. `--smoke` adds
`configs/smoke.yaml` and the space `spaces/<name>.smoke.yaml`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from coat.config import load_config
from coat.errors import reported
from coat.ray_runtime import attach_cluster

PROJECT = Path(__file__).resolve().parents[1]
CONFIGS = PROJECT / "experiments" / "configs"

# The notebook in analysis/ that reads each experiment's sweep; run at its end.
NOTEBOOK = {"ablate_thinking_len": "thinking_length", "ablate_loss_weights": "loss_weights",
            "ablate_expert_sets": "expert_sets", "compare_backbones": "backbones"}


def smoke_overrides() -> list[str]:
    """`configs/smoke.yaml` (dotted keys, as in a space file) as overrides."""
    settings = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


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

    on_cluster = attach_cluster()
    config = CONFIGS / (f"{name}.cluster.yaml" if on_cluster else f"{name}.yaml")
    space = CONFIGS / "spaces" / (f"{name}.smoke.yaml" if args.smoke else f"{name}.yaml")
    extra = [*(smoke_overrides() if args.smoke else []), f"sweep.name={name}{'-smoke' if args.smoke else ''}"]
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
        conclude(name, result.name, cfg, PROJECT / "analysis")


def conclude(name: str, sweep: str, cfg, notebooks: Path) -> None:
    """Execute the experiment's notebook on its sweep, attach its outputs to the sweep's parent run, and print
    where the figures and the executed notebook are, and what they conclude. Exits 1 when the notebook fails."""
    from rich.console import Console

    from coat import tracking
    from coat.analysis.notebooks import analyze, notebook_folder

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
