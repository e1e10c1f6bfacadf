"""Sweeps: Ray Tune over a search space, one training run per trial, a parent MLflow run per sweep.

Three levels, as Ray's guide has them: the sweep driver (`run_sweep`) builds the `Tuner`; each trial is a
Tune function (`run_trial`) that calls `coat.train.launch.train`, which runs the `TorchTrainer` (or, with
`train.num_workers=0`, the loop in the trial's own process — what short trials on one machine want); the
per-worker loop does the GPU work. Trial run names come from the trial id, so a restarted trial resumes from
its checkpoint and logs into the same MLflow child run.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import optuna
import pandas as pd
import ray
import ray.tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from coat import tracking
from coat.config import CoATConfig, apply_overrides, with_absolute_paths
from coat.data.prepare import prepare_data
from coat.ray_runtime import ensure_ray
from coat.roles import resolve_roles
from coat.train.launch import spool_folder, train
from coat.tune.space import Param, Space, SpaceError, load_space, overrides


@dataclass
class SweepResult:
    name: str
    table: pd.DataFrame  # one row per trial: its setting, status, validation and evaluation metrics
    best: dict | None  # the best finished trial's row
    parent_run_id: str
    path: Path  # Tune's experiment directory (what `--resume` restores)
    link: str | None = None  # the sweep's runs in the dashboard


# The trial id in Tune's folder name for it: `1a2b3_00004` from a grid, `1a2b3c4d` from a searcher (Optuna).
TRIAL_FOLDER = re.compile(r"_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})(?:_|$)")
# Short names for what a sweep varies, for its children's names in the dashboard ("K=16 seed=0").
LABELS = {"thinking.num_slots": "K", "thinking.targets": "targets", "train.seed": "seed", "experts.names": "experts",
          "backbone.name": "backbone", "loss.ce_weight": "ce"}


def trial_label(point: dict) -> str:
    """`K=16 seed=0`: each varied field by its short name (`loss.weights.mel` -> `w.mel`), lists joined by `+`,
    floats to three significant digits."""
    def short(path: str) -> str:
        return LABELS.get(path) or ("w." + path.rsplit(".", 1)[1] if path.startswith("loss.weights.") else
                                    path.rsplit(".", 1)[-1])

    def value(v) -> str:
        return "+".join(map(str, v)) if isinstance(v, list) else f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{short(path)}={value(v)}" for path, v in point.items())


def grid_points(space: Space) -> dict[str, dict]:
    """A grid's points by the label Tune shows for them (`K=16 targets=none`); the overrides themselves where two
    points would share a short label."""
    points = space.grid()
    labels = [trial_label(p) for p in points]
    if len(set(labels)) < len(labels):
        labels = [", ".join(overrides(p)) for p in points]
    return dict(zip(labels, points, strict=True))


def trial_name(trial) -> str:
    """Tune's name for a trial, in its table and log lines: `K=16 targets=shuffled (1a2b3_00004)`, the point's label
    and the trial id (its MLflow child run is `<sweep>-<trial id>`). Tune's table cuts a parameter's value to its
    last 20 characters, but not a trial's name."""
    label = trial.config["setting"] if "setting" in trial.config else trial_label(trial.config.get("point", {}))
    return f"{label} ({trial.trial_id})"


def trial_folder(trial) -> str:
    """`<trainable>_<trial id>`: Tune's default folder name starts with the trial's name, which holds the label."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def point_of(config: dict, points: dict[str, dict]) -> dict:
    """The point a trial trains: sampled by Optuna (`point`), or named by its grid label (`setting`)."""
    return config["point"] if "point" in config else points[config["setting"]]


def run_trial(config: dict, *, base: CoATConfig, sweep_name: str, parent_run_id: str, storage: str,
              parent_spool: str, points: dict[str, dict]) -> None:
    """One trial: the base config with the sampled point applied, trained and evaluated as a child run."""
    trial_id = ray.tune.get_context().get_trial_id()
    point = point_of(config, points)
    cfg = apply_overrides(base, [
        *overrides(point), f"train.run_name={sweep_name}-{trial_id}", f"train.storage={storage}/trials",
    ])
    train(cfg, parent_run_id=parent_run_id, parent_spool=Path(parent_spool), report_to_tune=True,
          display_name=trial_label(point))


def max_concurrent(cfg: CoATConfig) -> int:
    """`sweep.max_concurrent`, else as many trials as the cluster's resources hold, keeping half the CPUs
    for Ray Data's decode tasks on CPU-only clusters."""
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    resources = ray.cluster_resources()
    if cfg.train.use_gpu:
        return max(1, int(resources.get("GPU", 0) // max(1, cfg.train.num_workers)))
    return max(1, int(resources.get("CPU", 1) // (2 * trial_cpus(cfg))))


def trial_cpus(cfg: CoATConfig) -> float:
    """CPUs a trial's Tune function holds: all of the training when it runs in-process, else the driver's."""
    return cfg.train.cpus_per_worker if cfg.train.num_workers == 0 else 0.5


def run_sweep(cfg: CoATConfig, space_file: str | Path, *, resume: bool = False) -> SweepResult:
    """Run (or with `resume`, continue) the sweep of `space_file` over the config `cfg`.

    A bad space fails here, naming the path, before any trial starts; so does an unreachable tracking server. The
    expert features of every expert set in the space are computed once, up front.
    """
    base = with_absolute_paths(cfg)
    space = with_seeds(load_space(space_file, base), base.sweep.seeds)
    name = base.sweep.name or Path(space_file).stem
    uri = tracking.resolve_uri(base.tracking.uri)
    base = apply_overrides(base, [f"tracking.uri={uri}"])
    tracking.check_reachable(uri)
    prepare_data(_with_experts(base, _all_experts(base, space)))
    ensure_ray()

    storage = Path(base.train.storage).resolve() / "sweeps"
    # A sweep run again without --resume is a new sweep: its trials must not join the earlier one's as its seeds.
    parent = tracking.start_run(uri, base.tracking.experiment, f"sweep-{name}", base,
                                tags={"coat.kind": "sweep", "coat.sweep": name,
                                      "coat.search": "grid" if space.is_grid else "optuna"},
                                resume=resume, spool=spool_folder(storage, f"sweep-{name}"))
    parent.log_text(Path(space_file).read_text(), "space.yaml")
    search = {"search": "grid" if space.is_grid else "optuna-tpe", "num_samples": base.sweep.num_samples,
              "scheduler": "none" if space.is_grid else base.sweep.scheduler, "metric": base.sweep.metric,
              "mode": base.sweep.mode, "multi_objective": base.sweep.multi_objective}
    parent.log_dict_artifact(search, "search.json")

    points = grid_points(space) if space.is_grid else {}
    trainable = ray.tune.with_resources(
        partial(run_trial, base=base, sweep_name=name, parent_run_id=parent.run_id, storage=str(storage),
                parent_spool=str(spool_folder(storage, f"sweep-{name}")), points=points),
        {"CPU": trial_cpus(base)},
    )
    path = storage / name
    # Tune adds a TensorBoard logger (and prints how to open it) unless told not to; its CSV and JSON results are
    # asked for by name in `_new_tuner`.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if resume and ray.tune.Tuner.can_restore(str(path)):
        tuner = ray.tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(base, space, trainable, name, storage, points)
    grid = tuner.fit()

    tracking.wait_until_reachable(uri, f"the trials are done and kept in {path}: once it is back, run the same "
                                       "`coat sweep --resume` to log the sweep's summary")
    parent.flush()  # the parent first: a child opened during the outage needs its parent's real id
    for result in grid:  # trials that ended while the server was away
        tracking.replay_spool(uri, spool_folder(storage / "trials", f"{name}-{_trial_id(result)}"))
    close_orphans(parent, {f"{name}-{_trial_id(result)}" for result in grid})
    table = _results_table(grid, uri, base, name, points)
    best = _best(table, base)
    parent.log_table(table, "sweep/results.json")
    if best is not None:
        parent.log_metrics({f"best/{k}": v for k, v in best.items()
                            if isinstance(v, int | float) and not isinstance(v, bool)}, step=0)
        parent.log_dict_artifact({k: v for k, v in best.items()}, "sweep/best.json")
    parent.set_description(sweep_description(name, space, table, best, base))
    parent.end()
    experiment_id = tracking.get_or_create_experiment(uri, base.tracking.experiment)
    return SweepResult(name, table, best, parent.run_id, path, tracking.dashboard_link(uri, experiment_id))


def sweep_description(name: str, space: Space, table: pd.DataFrame, best: dict | None, cfg: CoATConfig) -> str:
    """The parent run's description: what varied, how many trials ended how, the best setting, and the units."""
    varied = ", ".join(f"{trial_label({p.path: 0}).split('=')[0]} ({p.path})" for p in space.params)
    statuses = table["status"].value_counts().items() if len(table) else []
    counts = ", ".join(f"{n} {status}" for status, n in statuses) or "none"
    lines = [f"Sweep `{name}` ({'grid' if space.is_grid else 'Optuna TPE'}) over {varied}: {len(table)} trials "
             f"({counts})."]
    if best is not None:
        lines.append(f"Best by {cfg.sweep.metric} ({cfg.sweep.mode}): {best['setting']} "
                     f"({cfg.sweep.metric} = {best[cfg.sweep.metric]:.4g}).")
    lines.append("Units: eval/<task>/accuracy, loglik_accuracy and wer are fractions over the test examples "
                 "evaluated (eval.max_examples caps them), with 95% bootstrap intervals in *_ci_low/*_ci_high; "
                 "latency/*_s are seconds at batch size 1, latency/new_tokens and latency/examples counts; "
                 f"{tracking.PREFILL_COST} counts tokens; time/train_s and time/eval_s are a run's wall seconds; "
                 "val/* are validation losses, and val/<task>/<metric> scores (train.val_scores); train/* are the "
                 "training losses, learning rates, gradient norm and stage. `coat analyze` adds figures, tables and "
                 "conclusions here.")
    return "\n\n".join(lines)


def with_seeds(space: Space, seeds: list[int]) -> Space:
    """A grid space with `train.seed` as its last axis: every point trained once per seed.

    Raises SpaceError for a sampled space (Optuna would treat the seed as a parameter to optimise) or one that
    already varies `train.seed`."""
    if not seeds:
        return space
    if not space.is_grid:
        raise SpaceError("sweep.seeds repeats every point of a grid space; a sampled space draws its own points: "
                         "leave sweep.seeds empty (or add train.seed to a grid space)")
    if any(p.path == "train.seed" for p in space.params):
        raise SpaceError("sweep.seeds: the space already varies train.seed; use one or the other")
    return Space((*space.params, Param("train.seed", "grid", tuple(seeds), {})))


def _new_tuner(cfg: CoATConfig, space: Space, trainable, name: str, storage: Path, points: dict[str, dict]
               ) -> ray.tune.Tuner:
    s = cfg.sweep
    if space.is_grid:  # a fixed list of points, each by its label (a grid_search would add a column of them, cut)
        param_space = {"setting": None}
        search_alg = BasicVariantGenerator(points_to_evaluate=[{"setting": label} for label in points],
                                           max_concurrent=max_concurrent(cfg))
        scheduler, num_samples = None, len(points)
    else:
        param_space = {}
        if s.multi_objective:
            metric, mode = [s.metric, tracking.PREFILL_COST], [s.mode, "min"]
            sampler = optuna.samplers.NSGAIISampler(seed=s.seed)
        else:
            metric, mode = s.metric, s.mode
            sampler = optuna.samplers.TPESampler(seed=s.seed, multivariate=True, constant_liar=True)
        search_alg = ConcurrencyLimiter(
            OptunaSearch(space=partial(_define_by_run, space), metric=metric, mode=mode, sampler=sampler),
            max_concurrent=max_concurrent(cfg),
        )
        scheduler = None
        if s.scheduler == "asha":
            # max_t past the last step: a trial that trains to the end still reports its evaluation.
            scheduler = ASHAScheduler(time_attr="step", metric=s.metric, mode=s.mode, max_t=cfg.train.total_steps + 1,
                                      grace_period=min(s.grace_steps, cfg.train.total_steps),
                                      reduction_factor=s.reduction_factor)
        num_samples = s.num_samples
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
            reuse_actors=True,  # a trial starts in a warm process: torch and the backbone code already imported
            trial_name_creator=trial_name, trial_dirname_creator=trial_folder,
        ),
        run_config=ray.tune.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=ray.tune.FailureConfig(max_failures=s.trial_retries),
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback()],  # not TensorBoard's: coat logs to MLflow
            verbose=1,
        ),
    )


def _define_by_run(space: Space, trial) -> dict:
    """Optuna's define-by-run space (a module-level function: Tune pickles the searcher to resume it)."""
    return {"point": space.suggest(trial)}


def _all_experts(cfg: CoATConfig, space: Space) -> list[str]:
    names = list(cfg.experts.names)
    for param in space.params:
        if param.path == "experts.names":
            for value in param.values:
                names += [n for n in resolve_roles(value) if n not in names]
    return names


def _with_experts(cfg: CoATConfig, names: list[str]) -> CoATConfig:
    """`cfg` training every expert in `names` (for preparing the store only)."""
    cfg = apply_overrides(cfg, [f"experts.names=[{','.join(names)}]"])
    return replace(cfg, loss=replace(cfg.loss, weights={}, distance={}))


def close_orphans(parent: tracking.TrackedRun, trials: set[str]) -> None:
    """Close the child runs still RUNNING that belong to no trial Tune knows (KILLED, tagged `coat.orphan`): a
    driver killed after a trial opened its run but before Tune saved the trial leaves one; the resumed sweep starts
    another trial in its place. Every trial Tune knows is thus one run, and no run stays open."""
    for run in tracking.child_runs(parent.uri, parent.run_id):
        if run.info.status == "RUNNING" and run.data.tags.get("coat.run_name") not in trials:
            orphan = tracking.TrackedRun(parent.uri, run.info.run_id)
            orphan.set_tags({"coat.orphan": "its trial was lost with the sweep's driver before Tune recorded it; the "
                                            "resumed sweep started another in its place"})
            orphan.end("KILLED")


def _results_table(grid, uri: str, cfg: CoATConfig, name: str, points: dict[str, dict]) -> pd.DataFrame:
    """One row per trial. Child runs that could not close themselves are closed here: FAILED for trials that
    crashed past their retries, KILLED for trials ASHA stopped early."""
    experiment = tracking.get_or_create_experiment(uri, cfg.tracking.experiment)
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = _trial_id(result)
        status = trial_status(uri, tracking.find_run(uri, experiment, f"{name}-{trial_id}"), bool(result.error))
        point = point_of(result.config, points) if result.config else {}
        row = {"trial": trial_id, "status": status, "setting": ", ".join(overrides(point)),
               "steps": metrics.get("step", 0)}
        row |= {k: v for k, v in metrics.items() if k.startswith(("val/", "eval/", "cost/", "latency/"))}
        rows.append(row)
    return pd.DataFrame(rows)


def trial_status(uri: str, run_id: str | None, error: bool) -> str:
    """"done", "stopped" (ASHA stopped it early) or "error", from its child run, which is closed here if it could not
    close itself: FAILED for a trial that crashed past its retries, KILLED for one ASHA stopped. A run closed so by an
    earlier summary of the sweep (a resumed sweep summarises again) keeps its status: only a trial that trained to the
    end is "done", and a candidate for the best."""
    status = tracking.run_status(uri, run_id) if run_id is not None else "FINISHED"
    if status == "RUNNING":
        status = "FAILED" if error else "KILLED"
        tracking.TrackedRun(uri, run_id).end(status)
    return "error" if error or status == "FAILED" else "stopped" if status == "KILLED" else "done"


def _trial_id(result) -> str:
    """The trial's id: from its metrics, or for a trial that never reported from its folder's name
    (`trial_folder`; `<trainable>_<trial id>_<index>_<config>` in sweeps begun before it)."""
    if trial_id := (result.metrics or {}).get("trial_id"):
        return trial_id
    found = TRIAL_FOLDER.search(Path(result.path).name)
    return found.group(1) if found else Path(result.path).name


def _best(table: pd.DataFrame, cfg: CoATConfig) -> dict | None:
    metric = cfg.sweep.metric
    if metric not in table:
        return None
    done = table[(table["status"] == "done") & table[metric].notna()]
    if done.empty:
        return None
    row = done.sort_values(metric, ascending=cfg.sweep.mode == "min").iloc[0]
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
