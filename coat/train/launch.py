"""The driver: prepare data, open the MLflow run, run the Ray Train `TorchTrainer`, evaluate, log.

    coat train --config experiments/configs/train_tiny.yaml [dotted.key=value ...]

Re-running with the same `train.run_name` (by default derived from the config) resumes from the run's last
checkpoint and logs into the same MLflow run. The evaluation after training runs where training ran: on a GPU
in a Ray task when training used GPUs, in this process on CPU otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import ray
import ray.train
import ray.tune
import soundfile as sf
from mlflow.exceptions import MlflowException
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from coat import tracking
from coat.backbones import BACKBONES, backbone_source, check_audio_window
from coat.config import CoATConfig, expert_settings, mixture_name, redacted, to_yaml
from coat.data.mixture import combine, sample_weights
from coat.data.precompute import precompute
from coat.data.store import read_located, standardise
from coat.data.stream import Stream, training_items
from coat.errors import UserError
from coat.experts.registry import expert_spec
from coat.locks import check_locking
from coat.model.targets import slot_statistics
from coat.ray_runtime import ensure_ray
from coat.spool import atomic_write
from coat.train import faults
from coat.train.checkpoint import MANIFEST_FILE, latest_checkpoint, load_training_state
from coat.train.loop import run_loop, train_loop_per_worker
from coat.train.session import CommittedStepsLogger, InProcessSession

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_name: str
    checkpoint: Path  # the last checkpoint: trained parts (CoATModel.load) + training state
    metrics: dict  # the last reported training metrics
    mlflow_run_id: str
    eval_metrics: dict


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


def crop_seconds(cfg: CoATConfig) -> float | None:
    """What clips are cut to, for experts and model alike (None: longer clips are left out instead)."""
    return cfg.data.max_seconds if cfg.data.long_clips == "crop" else None


def prepare_data(cfg: CoATConfig) -> tuple[Path, Path]:
    """The manifest (a mixture's entries combined into it; coat-mini generated on first use when
    `data.synth_size` > 0) and a store holding every configured expert's features. Raises ConfigError when
    data.max_seconds is longer than the backbone hears of a clip, FileNotFoundError naming the manifest when it is
    missing."""
    check_audio_window(cfg)
    manifest, store = Path(cfg.data.manifest).resolve(), Path(cfg.data.store).resolve()
    if cfg.data.mixture:
        combine(cfg.data.mixture, manifest)
    elif not manifest.is_file():
        if cfg.data.synth_size <= 0 or manifest.name != "manifest.jsonl":
            raise FileNotFoundError(
                f"data.manifest={manifest} does not exist; point it at a manifest, or set data.synth_size>0 with "
                "a path ending in manifest.jsonl to generate coat-mini there"
            )
        from coat.data.synth import synthesize

        synthesize(manifest.parent, cfg.data.synth_size, cfg.data.synth_seed, test_share=cfg.data.synth_test_share)
    if cfg.experts.names:
        precompute(manifest, list(cfg.experts.names), store, settings=expert_settings(cfg),
                   crop_seconds=crop_seconds(cfg), verify_hashes=False,
                   max_seconds=cfg.data.max_seconds if cfg.data.long_clips == "reject" else None)
    return manifest, store


def training_streams(cfg: CoATConfig, manifest: Path, store: Path) -> dict[str, Stream]:
    """The `train` and `val` streams. Validation targets are standardised with the training split's statistics.

    Raises ValueError, before decoding anything, when the training rows cannot fill one step of every worker.
    """
    rate = BACKBONES[cfg.backbone.name].sample_rate
    common = {"max_seconds": cfg.data.max_seconds, "long_clips": cfg.data.long_clips,
              "settings": expert_settings(cfg)}
    items, sources, left_out = training_items(manifest, cfg.data.train_split, cfg.experts.names, store, **common)
    world = max(1, cfg.train.num_workers)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    if len(items) < world * per_step:
        raise ValueError(f"{len(items)} training rows cannot fill one step of {world} workers x {per_step} examples: "
                         "lower train.batch_size or train.num_workers")
    val_items, _, val_left_out = training_items(manifest, cfg.data.val_split, cfg.experts.names, store,
                                                stats_from=sources, **common)
    crop = crop_seconds(cfg)
    weights = None
    if cfg.data.mixture:
        weights = sample_weights([item["mixture"] for item in items],
                                 {mixture_name(entry): entry.weight for entry in cfg.data.mixture})
    return {"train": Stream(items, sources, rate, crop, cfg.data.decode_tasks, left_out, weights),
            "val": Stream(val_items, sources, rate, crop, cfg.data.decode_tasks, val_left_out)}


def target_statistics(cfg: CoATConfig, train: Stream) -> dict[str, dict | None]:
    """Per expert, the statistics its targets are standardised with (the training split's, see
    `FeatureStore.split_stats`), with `slots` (`coat.model.targets.slot_statistics`) for continuous frame-level
    experts when K > 0: the training clips' targets pooled to the run's K slots, so that each slot's target is
    standardised again where the loss sees it."""
    stats = {name: source.stats for name, source in train.sources.items()}
    if not cfg.thinking.supervised:
        return stats
    items = pd.DataFrame(train.items).drop_duplicates("clip_hash")
    seconds = [min(sf.info(path).duration, train.crop_seconds or math.inf) for path in items["audio_path"]]
    for name, source in train.sources.items():
        spec = expert_spec(name, **expert_settings(cfg).get(name, {}))
        if source.stats is None or spec.clip_level:
            continue
        located = items[["clip_hash", f"part.{name}", f"row.{name}"]].set_axis(["clip_hash", "part", "row"], axis=1)
        frames = read_located(located)
        clips = ((standardise(frames[h], source.stats), s) for h, s in zip(items["clip_hash"], seconds, strict=True))
        stats[name] = dict(source.stats) | {"slots": slot_statistics(clips, cfg.thinking.num_slots, spec.frame_rate,
                                                                     spec.frame_offset)}
    return stats


def validation_questions(cfg: CoATConfig, manifest: Path) -> list:
    """The `train.val_examples` validation questions `train.val_scores` answers at every checkpoint, by source
    (`source_parts`): a fixed subset drawn with `eval.seed`, each task family and mixture entry keeping its share."""
    from coat.data.manifest import read_manifest, stratified_subsample
    from coat.eval.systems import source_parts

    rows = read_manifest(manifest)
    rows = rows[rows["split"] == cfg.data.val_split].reset_index(drop=True)
    by = [column for column in ("task", "mixture") if column in rows]
    return source_parts(stratified_subsample(rows, cfg.train.val_examples, cfg.eval.seed, by), cfg.eval.suites)


def data_provenance(streams: dict[str, Stream]) -> dict[str, str]:
    """Tags naming the exact data: per split a hash of its (id, clip hash) rows and their count, per expert its
    features' version and the id of the standardisation statistics."""
    tags = {}
    for split, stream in streams.items():
        digest = hashlib.sha256("".join(sorted(f"{r['id']}\t{r['clip_hash']}\n" for r in stream.items)).encode())
        tags |= {f"data.{split}.sha256": digest.hexdigest()[:16], f"data.{split}.rows": str(len(stream)),
                 f"data.{split}.left_out": str(len(stream.quarantine))}
    for name, source in streams["train"].sources.items():
        tags[f"expert.{name}.version"] = source.version
        if source.stats is not None:
            tags[f"expert.{name}.stats"] = str(source.stats["id"])
    return tags


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
    target_stats = target_statistics(cfg, streams["train"])

    tags = {"dataset_fingerprint": tracking.dataset_fingerprint(manifest), "backbone.source": backbone_source(cfg),
            **data_provenance(streams)}
    run_id = tracking.start_run(uri, cfg.tracking.experiment, name, cfg, parent_run_id=parent_run_id,
                                parent_spool=parent_spool, tags=tags,
                                display_name=display_name, spool=spool)
    tracking.log_text(uri, run_id, to_yaml(redacted(cfg)), "config.yaml")
    tracking.log_dict_artifact(uri, run_id, target_stats, "target_stats.json")
    loop_config = {
        "config": to_yaml(cfg),
        "experts": {n: asdict(expert_spec(n, **chosen)) for n, chosen in expert_settings(cfg).items()},
        "streams": streams,
        "val_parts": validation_questions(cfg, manifest) if cfg.train.val_scores else None,
        "target_stats": target_stats,
        "launched_at": launched_at,
        "mlflow_uri": uri,
        "mlflow_run_id": run_id,
        "mlflow_spool": spool,
        "faults": fault_spec,
        "run_dir": storage / name,
    }
    try:
        if cfg.train.num_workers == 0:
            session = InProcessSession(storage / name, cfg.train.keep_checkpoints, report_to_tune, (uri, run_id))
            run_loop(loop_config, session)
            metrics, checkpoint = session.last
        else:
            logger = CommittedStepsLogger(uri, run_id, spool, cfg.tracking.retry_s, cfg.tracking.spool_max_mb)
            result = _trainer(cfg, loop_config, storage, name, report_to_tune, logger).fit()
            metrics, checkpoint = result.metrics, result.checkpoint and Path(result.checkpoint.path)
    except ray.train.WorkerGroupError as err:
        tracking.end_run(uri, run_id, "FAILED")
        explained = next((e for e in err.worker_failures.values() if isinstance(e, UserError)), None)
        if explained is None:
            raise
        raise explained from err  # a worker's own error (a full storage, a diverging run) says it in one line
    except Exception:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    # A re-run of a finished run trains nothing and reports nothing: its result is the last checkpoint.
    checkpoint = checkpoint or latest_checkpoint(storage / name)
    metrics = dict(metrics or load_training_state(checkpoint)["metrics"])
    tracking.log_artifacts(uri, run_id, checkpoint, "trained_parts")
    trained_at = time.time()
    # Stamped with the last checkpoint's commit, so a start after a crash that logs them again stores nothing new;
    # wall times differ from start to start, so they are logged by the first start that gets there only.
    stamp = int((checkpoint / MANIFEST_FILE).stat().st_mtime * 1000)
    tracking.log_metrics(uri, run_id, {tracking.PREFILL_COST: cfg.thinking.prefill_positions},
                         step=cfg.train.total_steps, timestamp_ms=stamp)
    once(storage / name, "time/train_s", lambda: tracking.log_metrics(
        uri, run_id, {"time/train_s": trained_at - launched_at}, step=cfg.train.total_steps, timestamp_ms=stamp))
    eval_metrics = {}
    if evaluate_after:
        eval_metrics = evaluate_checkpoint(checkpoint, cfg, manifest, uri, run_id, stamp)
        once(storage / name, "time/eval_s", lambda: tracking.log_metrics(
            uri, run_id, {"time/eval_s": time.time() - trained_at}, step=cfg.train.total_steps, timestamp_ms=stamp))
        if report_to_tune:
            ray.tune.report({**metrics, **eval_metrics})
    tracking.end_run(uri, run_id)
    if not tracking.flush(run_id):
        log.warning("MLflow at %s is still unreachable: this run's last writes wait in %s and reach it at the next "
                    "start of the run (the same command again)", uri, spool)
    return TrainResult(name, checkpoint, metrics, run_id, eval_metrics)


def once(run_dir: Path, what: str, log) -> None:
    """Call `log` unless an earlier start of the run in `run_dir` did (a marker file remembers)."""
    marker = run_dir / f".logged-{what.replace('/', '-')}"
    if not marker.exists():
        log()
        atomic_write(marker, "")


def _trainer(cfg: CoATConfig, loop_config: dict, storage: Path, name: str, report_to_tune: bool,
             logger: CommittedStepsLogger) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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
    import torch

    from coat.data.manifest import read_manifest
    from coat.eval.systems import evaluate_systems, source_parts

    device = "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"
    rows = read_manifest(manifest)
    parts = source_parts(rows[rows["split"] == cfg.data.test_split], cfg.eval.suites)
    return evaluate_systems(checkpoint, parts, cfg.eval, cfg.eval.baselines, device, max_seconds=cfg.data.max_seconds,
                            crop=cfg.data.long_clips == "crop", progress=False)


def evaluate_checkpoint(checkpoint: Path, cfg: CoATConfig, manifest: Path, uri: str, run_id: str, stamp: int
                        ) -> dict:
    """Evaluate where training ran (a Ray task holding a GPU when training used GPUs), print the table, and log
    metrics (stamped `stamp` ms: the evaluation is deterministic, so logging it again stores nothing new), the
    table, the per-example results and how they were made (device, dtype, batch sizes) to the run. Baselines'
    metrics carry their system's name in front (`base/eval/...`). Returns the trained model's metrics."""
    from coat.eval.runner import print_reports
    from coat.eval.scoring import write_predictions

    if cfg.train.use_gpu:
        task = ray.remote(num_gpus=1, num_cpus=cfg.train.cpus_per_worker)(evaluate_on_device)
        reports = ray.get(task.remote(checkpoint, cfg, manifest))
    else:
        reports = evaluate_on_device(checkpoint, cfg, manifest)
    print_reports(reports, title=f"test split: {checkpoint}")
    setting = reports[0].setting
    tracking.set_tags(uri, run_id, {f"eval.{key}": str(value) for key, value in setting.items() if key != "system"}
                      | {"latency.batch_size": "1"})
    with tempfile.TemporaryDirectory() as folder:
        for report in reports:
            prefix = "" if report.system == "coat" else f"{report.system}/"
            tracking.log_metrics(uri, run_id, {prefix + k: v for k, v in report.metrics().items()},
                                 step=cfg.train.total_steps, timestamp_ms=stamp)
            suffix = "" if report.system == "coat" else f".{report.system}"
            tracking.log_table(uri, run_id, report.table, f"eval/table{suffix}.json")
            write_predictions(report.examples, "coat-mini", Path(folder) / f"predictions{suffix}.jsonl")
        tracking.log_artifacts(uri, run_id, folder, "eval")
    return reports[0].metrics()
