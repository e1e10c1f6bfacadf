"""What every experiment script beside this file does: find its config and space in `configs/`, attach to a
cluster or start a local Ray, run the sweep, print and log the results table, execute its analysis notebook.

On a cluster (`ray submit`, `ray job submit`: see `coat.ray_runtime.attach_cluster`) a script uses
`<name>.cluster.yaml` (real checkpoints, GPUs), `$COAT_STORAGE` for results and checkpoints and
`$MLFLOW_TRACKING_URI` for MLflow; otherwise `<name>.yaml`, the embedded default. `--smoke` adds
`configs/smoke.yaml` and the space `spaces/<name>.smoke.yaml`.

`--dry-run` checks the config and space, runs nothing and prints the bill: trials, steps, step times (from
`coat preflight`'s stored measurements, or `--step-s`), GPU-hours and wall time (`coat.tune.cost`).
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
                        help="check the config and space, print what would run and what it costs, run nothing")
    parser.add_argument("--step-s", type=positive, metavar="SECONDS",
                        help="with --dry-run: bill every trial's optimizer step at this (default: coat preflight's "
                             "stored measurement)")
    parser.add_argument("--gpus", type=positive_int, metavar="N",
                        help="with --dry-run: the GPUs the sweep gets (default: the attached Ray cluster's, else 1)")
    parser.add_argument("--overhead-s", type=float, default=0.0, metavar="SECONDS",
                        help="with --dry-run: per-trial seconds outside the steps (start-up, validation, evaluation)")
    parser.add_argument("--json", action="store_true", help="with --dry-run: the bill as JSON")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides (after --)")
    args = parser.parse_args(argv)
    if not args.dry_run and (args.step_s or args.gpus or args.overhead_s or args.json):
        parser.error("--step-s, --gpus, --overhead-s and --json describe a bill: use them with --dry-run")

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
        dry_run(args, config, space, extra, cfg, on_cluster)
        return

    from coat.report import print_sweep_results
    from coat.tune.sweep import run_sweep

    result = run_sweep(cfg, space, resume=args.resume)
    print_sweep_results(result, cfg)
    if not args.no_analysis:
        conclude(name, result.name, cfg, PROJECT / "analysis")


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count")
    return value


def dry_run(args: argparse.Namespace, config: Path, space: Path, extra: list[str], cfg, on_cluster: bool) -> None:
    """Check the space against the config and print what the sweep would train and cost (`coat.tune.cost`)."""
    from coat.report import print_bill
    from coat.tune import cost
    from coat.tune.space import load_space

    searched = load_space(space, cfg)
    store = cost.store_path(cfg)
    records = [] if args.step_s else cost.load_records(store)
    gpus, gpus_from, cpus = cluster_size(on_cluster, args.gpus)
    bill = cost.estimate(cfg, searched, records, step_s=args.step_s, gpus=gpus, gpus_from=gpus_from, cpus=cpus,
                         overhead_s=args.overhead_s)
    hint = None if bill.known else cost.missing_hint(bill, cost.preflight_command(config, space, extra), store)
    if args.json:
        print(json.dumps({"config": str(config), "space": str(space), "measurements": str(store), **bill.to_json(),
                          "missing": hint}, indent=2))
        return
    print(f"config: {config}\nspace: {space}\ntrials: {bill.trials} ({bill.search})")
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    print_bill(bill, console)
    if hint:
        console.print(hint, markup=False, highlight=False)


def cluster_size(on_cluster: bool, gpus: int | None) -> tuple[int, str, float]:
    """(GPUs, who said so, CPUs) the sweep gets: `--gpus`, else what the attached Ray cluster offers now, else 1
    GPU and this machine's CPUs."""
    resources = {}
    if on_cluster:
        import ray

        resources = ray.cluster_resources()
    cpus = resources.get("CPU") or float(os.cpu_count() or 1)
    if gpus:
        return gpus, "--gpus", cpus
    if resources.get("GPU"):
        return int(resources["GPU"]), "the Ray cluster's now", cpus
    return 1, "default; --gpus N", cpus


def conclude(name: str, sweep: str, cfg, notebooks: Path) -> None:
    """Execute the experiment's notebook on its sweep, attach its outputs to the sweep's parent run, and print
    where the figures and the executed notebook are, and what they conclude. Exits 1 when the notebook fails; says
    why when it has nothing to analyse (a sampled sweep where ASHA left one trial to finish)."""
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
    if "skipped" in summary:
        console.print(f"analysis notebook {notebook} skipped: {summary['skipped']}", markup=False, highlight=False)
        return
    console.print(f"executed notebook: {out / notebook / f'{notebook}.ipynb'}")
    console.print("figures: " + ", ".join(str(out / notebook / f) for f in summary["figures"]))
    for sentence in summary["conclusions"]:
        console.print(f"  {sentence}", markup=False, highlight=False)
