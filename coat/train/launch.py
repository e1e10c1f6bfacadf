"""The driver: prepare data, open the MLflow run, run the Ray Train `TorchTrainer`, evaluate, log.

    coat train --config experiments/configs/train_tiny.yaml [dotted.key=value ...]

Re-running with the same `train.run_name` (by default derived from the config) resumes from the run's last
checkpoint and logs into the same MLflow run. The evaluation after training runs where training ran: on a GPU
in a Ray task when training used GPUs, in this process on CPU otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import ray
import ray.train
import ray.tune
import torch
from mlflow.exceptions import MlflowException
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from coat import tracking
from coat.backbones import backbone_source
from coat.config import CoATConfig, redacted, to_yaml
from coat.data.manifest import read_manifest, stratified_subsample
from coat.data.prepare import data_provenance, prepare_data, training_streams
from coat.errors import UserError
from coat.eval.scoring import write_predictions
from coat.eval.systems import evaluate_systems, source_parts
from coat.experts.registry import expert_specs
from coat.locks import check_locking
from coat.model.targets import target_statistics
from coat.ray_runtime import ensure_ray
from coat.spool import atomic_write
from coat.train import faults
from coat.train.checkpoint import MANIFEST_FILE, latest_checkpoint, load_training_state
from coat.train.loop import LoopInputs, run_loop, train_loop_per_worker
from coat.train.session import CommittedStepsLogger, InProcessSession

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_name: str
    checkpoint: Path  # the last checkpoint: trained parts (CoATModel.load) + training state
    metrics: dict  # the last reported training metrics
    mlflow_run_id: str
    eval_metrics: dict
    eval_reports: list = field(default_factory=list)  # the test split's, each system's (`EvalReport`), to print


def run_name(cfg: CoATConfig) -> str:
    """`train.run_name`, else backbone, K and a hash of the whole config: the same command, the same run."""
    if cfg.train.run_name:
        return cfg.train.run_name
    digest = hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:8]
    return f"{cfg.backbone.name}-k{cfg.thinking.num_slots}-{digest}"


def spool_folder(storage: Path, name: str) -> Path:
    """Where the MLflow writes of run `name` wait while the tracking server is away (see `coat/spool.py`)."""
    return storage / name / "mlflow-spool"


def finished_run(cfg: CoATConfig, uri: str, name: str, storage: Path) -> TrainResult | None:
    """The result of this run if it already trained to the end and closed its MLflow run: re-running the
    same command (or Tune restoring a trial that finished just before a crash) redoes nothing. With the
    tracking server away, None: the run resumes from its last checkpoint."""
    try:
        run_id = tracking.find_run(uri, tracking.get_or_create_experiment(uri, cfg.tracking.experiment), name)
    except MlflowException as err:
        if tracking.is_outage(err):
            return None
        raise
    checkpoint = latest_checkpoint(storage / name)
    if run_id is None or checkpoint is None or tracking.run_status(uri, run_id) != "FINISHED":
        return None
    state = load_training_state(checkpoint)
    if state["step"] < cfg.train.total_steps:
        return None
    logged = tracking.latest_metrics(uri, run_id)
    return TrainResult(name, checkpoint, state["metrics"], run_id,
                       {k: v for k, v in logged.items() if k.startswith(("eval/", "latency/"))})


def validation_questions(cfg: CoATConfig, manifest: Path) -> list:
    """The `train.val_examples` validation questions `train.val_scores` answers at every checkpoint, by source
    (`source_parts`): a fixed subset drawn with `eval.seed`, each task family and mixture entry keeping its share."""
    rows = read_manifest(manifest)
    rows = rows[rows["split"] == cfg.data.val_split].reset_index(drop=True)
    by = [column for column in ("task", "mixture") if column in rows]
    return source_parts(stratified_subsample(rows, cfg.train.val_examples, cfg.eval.seed, by), cfg.eval.suites)


def train(cfg: CoATConfig, *, evaluate_after: bool = True, parent_run_id: str | None = None,
          parent_spool: Path | None = None,
          report_to_tune: bool = False, display_name: str | None = None) -> TrainResult:
    """Train per `cfg` on Ray Train; evaluate the result on the test split; log everything to MLflow.

    Inside a sweep trial: `parent_run_id` makes the MLflow run a child of the sweep's (`parent_spool`: where the
    sweep's writes wait through an outage, so a child opened while its parent is too finds it), `display_name`
    names it in the dashboard by what the sweep varies, and `report_to_tune` forwards every checkpoint's metrics
    (validation included) and the final evaluation to Tune.
    Raises TrackingUnavailableError before any compute when the tracking server is down.
    """
    launched_at = time.time()
    uri = tracking.resolve_uri(cfg.tracking.uri)
    if parent_run_id is None:  # a wrong address fails before any compute; a sweep's trial rides an outage out
        tracking.check_reachable(uri)
    name = run_name(cfg)
    storage = Path(cfg.train.storage).resolve()
    check_locking(storage)  # checkpoints and the spool are shared by every worker and every start of the run
    spool = spool_folder(storage, name)
    tracking.replay_spool(uri, spool)  # what an earlier start of this run could not send
    finished = finished_run(cfg, uri, name, storage)
    if finished is not None:
        if report_to_tune:
            ray.tune.report({**finished.metrics, **finished.eval_metrics})
        return finished
    fault_spec = os.environ.get(faults.ENV)
    if faults.parse(fault_spec):  # a malformed spec fails here, before any compute
        log.warning("%s=%s is set: this run kills its own worker at those points (a test of recovery)", faults.ENV,
                    fault_spec)
    manifest, store = prepare_data(cfg)
    ensure_ray()
    streams = training_streams(cfg, manifest, store)
    target_stats = target_statistics(cfg, streams["train"], store)
    tags = {"dataset_fingerprint": tracking.dataset_fingerprint(manifest), "backbone.source": backbone_source(cfg),
            **data_provenance(streams)}
    run = tracking.start_run(uri, cfg.tracking.experiment, name, cfg, parent_run_id=parent_run_id,
                             parent_spool=parent_spool, tags=tags, display_name=display_name, spool=spool)
    run.log_text(to_yaml(redacted(cfg)), "config.yaml")
    run.log_dict_artifact(target_stats, "target_stats.json")
    inputs = LoopInputs(
        cfg, expert_specs(cfg), streams, target_stats,
        validation_questions(cfg, manifest) if cfg.train.val_scores else None, launched_at, storage / name, run,
        fault_spec)
    metrics, checkpoint = fit(inputs, report_to_tune)
    reports = log_outcome(inputs, checkpoint, manifest, evaluate_after)
    eval_metrics = reports[0].metrics() if reports else {}
    if report_to_tune and evaluate_after:
        ray.tune.report({**metrics, **eval_metrics})
    run.end()
    if not run.flush():
        log.warning("MLflow at %s is still unreachable: this run's last writes wait in %s and reach it at the next "
                    "start of the run (the same command again)", uri, spool)
    return TrainResult(name, checkpoint, metrics, run.run_id, eval_metrics, reports)


def fit(inputs: LoopInputs, report_to_tune: bool) -> tuple[dict, Path]:
    """Train in this process (`train.num_workers=0`) or on Ray Train: the last reported metrics and the last
    checkpoint. The MLflow run is closed as FAILED when training fails; a worker's own explained error (a full
    storage, a diverging run) is raised as it is, in one line."""
    cfg, run_dir, run = inputs.cfg, inputs.run_dir, inputs.run
    try:
        if cfg.train.num_workers == 0:
            session = InProcessSession(run_dir, cfg.train.keep_checkpoints, report_to_tune, run)
            run_loop(inputs, session)
            metrics, checkpoint = session.last
        else:
            logger = CommittedStepsLogger(run, run_dir)
            result = _trainer(cfg, inputs, run_dir.parent, run_dir.name, report_to_tune, logger).fit()
            metrics, checkpoint = result.metrics, result.checkpoint and Path(result.checkpoint.path)
    except ray.train.WorkerGroupError as err:
        run.end("FAILED")
        explained = next((e for e in err.worker_failures.values() if isinstance(e, UserError)), None)
        if explained is None:
            raise
        raise explained from err
    except Exception:
        run.end("FAILED")
        raise
    # A re-run of a finished run trains nothing and reports nothing: its result is the last checkpoint.
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    return dict(metrics or load_training_state(checkpoint)["metrics"]), checkpoint


def log_outcome(inputs: LoopInputs, checkpoint: Path, manifest: Path, evaluate: bool) -> list:
    """Log the trained parts, the block's prefill cost and the wall times to the run, and with `evaluate` the
    test-split evaluation (`evaluate_checkpoint`), whose reports it returns."""
    cfg, run_dir, run = inputs.cfg, inputs.run_dir, inputs.run
    run.log_artifacts(checkpoint, "trained_parts")
    trained_at = time.time()
    # Stamped with the last checkpoint's commit, so a start after a crash that logs them again stores nothing new;
    # wall times differ from start to start, so they are logged by the first start that gets there only.
    stamp, step = int((checkpoint / MANIFEST_FILE).stat().st_mtime * 1000), cfg.train.total_steps
    run.log_metrics({tracking.PREFILL_COST: cfg.thinking.prefill_positions}, step=step, timestamp_ms=stamp)
    once(run_dir, "time/train_s", lambda: run.log_metrics(
        {"time/train_s": trained_at - inputs.launched_at}, step=step, timestamp_ms=stamp))
    if not evaluate:
        return []
    reports = evaluate_checkpoint(checkpoint, cfg, manifest, run, stamp)
    once(run_dir, "time/eval_s", lambda: run.log_metrics(
        {"time/eval_s": time.time() - trained_at}, step=step, timestamp_ms=stamp))
    return reports


def once(run_dir: Path, what: str, log) -> None:
    """Call `log` unless an earlier start of the run in `run_dir` did (a marker file remembers)."""
    marker = run_dir / f".logged-{what.replace('/', '-')}"
    if not marker.exists():
        log()
        atomic_write(marker, "")


def _trainer(cfg: CoATConfig, inputs: LoopInputs, storage: Path, name: str, report_to_tune: bool,
             logger: CommittedStepsLogger) -> TorchTrainer:
    return TorchTrainer(
        partial(train_loop_per_worker, inputs),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[logger, *([TuneReportCallback()] if report_to_tune else [])],
        ),
    )


def evaluate_on_device(checkpoint: Path, cfg: CoATConfig, manifest: Path) -> list:
    """The test-split evaluation of the trained model and of `eval.baselines` on the same examples, on the device
    training used (`cuda` with `train.use_gpu`): each mixture entry (or imported corpus) by its own suite's recipe
    (`source_parts`)."""
    device = "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"
    rows = read_manifest(manifest)
    parts = source_parts(rows[rows["split"] == cfg.data.test_split], cfg.eval.suites)
    return evaluate_systems(checkpoint, parts, cfg.eval, cfg.eval.baselines, device, max_seconds=cfg.data.max_seconds,
                            crop=cfg.data.crop_seconds is not None, progress=False)


def evaluate_checkpoint(checkpoint: Path, cfg: CoATConfig, manifest: Path, run: tracking.TrackedRun, stamp: int
                        ) -> list:
    """Evaluate where training ran (a Ray task holding a GPU when training used GPUs) and log metrics (stamped
    `stamp` ms: the evaluation is deterministic, so logging it again stores nothing new), the table, the per-example
    results and how they were made (device, dtype, batch sizes) to the run. Baselines' metrics carry their system's
    name in front (`base/eval/...`). Returns the reports, the trained model's first."""
    if cfg.train.use_gpu:
        task = ray.remote(num_gpus=1, num_cpus=cfg.train.cpus_per_worker)(evaluate_on_device)
        reports = ray.get(task.remote(checkpoint, cfg, manifest))
    else:
        reports = evaluate_on_device(checkpoint, cfg, manifest)
    setting = reports[0].setting
    run.set_tags({f"eval.{key}": str(value) for key, value in setting.items() if key != "system"}
                 | {"latency.batch_size": "1"})
    with tempfile.TemporaryDirectory() as folder:
        for report in reports:
            prefix = "" if report.system == "coat" else f"{report.system}/"
            run.log_metrics({prefix + k: v for k, v in report.metrics().items()}, step=cfg.train.total_steps,
                            timestamp_ms=stamp)
            suffix = "" if report.system == "coat" else f".{report.system}"
            run.log_table(report.table, f"eval/table{suffix}.json")
            write_predictions(report.examples, "coat-mini", Path(folder) / f"predictions{suffix}.jsonl")
        run.log_artifacts(folder, "eval")
    return reports
