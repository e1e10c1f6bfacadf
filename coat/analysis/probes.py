"""`coat probe`: a checkpoint's linear probes, end to end. `probe_checkpoint` extracts the hidden states
(`hidden_states.py`), fits the probes (`linear_probes.py`), and writes and logs the tables.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from mlflow.exceptions import MlflowException

from coat import tracking
from coat.analysis.hidden_states import (
    Extraction,
    extract_hidden_states,
    hidden_state_count,
    logit_lens,
    normalise_layers,
)
from coat.analysis.linear_probes import (
    FAMILY,
    clip_groups,
    fit_probes,
    load_target_stats,
    probe_rows,
    probe_targets,
    question_types,
)
from coat.analysis.probe_spec import ProbeSpec
from coat.config import CoATConfig, ConfigError, from_yaml
from coat.data.manifest import ManifestError
from coat.data.stream import MissingFeaturesError
from coat.errors import UserError
from coat.model.coat_model import CONFIG_FILE, WEIGHTS_FILE, CoATModel, not_a_checkpoint

RUN_PREFIX = "probe-"


class ProbeError(UserError):
    """A checkpoint, manifest, store or tracking store a probe run cannot use; the message names it."""


def log_probe_results(run: tracking.TrackedRun, table: pd.DataFrame, clips: pd.DataFrame | None = None,
                      lens: pd.DataFrame | None = None) -> None:
    """Log `probe/<position>/<target>/<metric>` and `..._selectivity` at step = layer for every fitted row, the
    table as the artifact `probes/results.parquet`, and where given the per-clip scores (`probes/clips.parquet`)
    and the logit lens (`probes/logit_lens.parquet`) to `run` (a `coat.tracking.TrackedRun`). Raises
    MlflowException (unknown run, store errors)."""
    fitted = table[table["score"].notna()]
    for layer, at in fitted.groupby("layer"):
        metrics = {}
        for row in at.itertuples():
            key = f"probe/{row.position}/{row.target}/{row.metric}"
            metrics[key], metrics[f"{key}_selectivity"] = row.score, row.selectivity
        run.log_metrics(metrics, step=int(layer))
    run.log_table(table, "probes/results.parquet")
    for name, extra in (("clips", clips), ("logit_lens", lens)):
        if extra is not None:
            run.log_table(extra, f"probes/{name}.parquet")


@dataclass
class ProbeRun:
    """What `probe_checkpoint` did: the results table and per-clip scores (also in `out`), the logit lens (None:
    not asked for), the extraction, the MLflow run it logged to (None: none), and what was left out, reused or taken
    from the store, in words."""

    table: pd.DataFrame
    clips: pd.DataFrame
    lens: pd.DataFrame | None
    out: Path
    extraction: Extraction
    run_id: str | None
    notes: list[str]


def probe_checkpoint(checkpoint: Path, names: Sequence[str], spec: ProbeSpec, *, uri: str,
                     mlflow_run: str | None = None, experiment: str | None = None, progress: bool = False) -> ProbeRun:
    """Probe `checkpoint` for `names` (experts and/or `family`) as `spec` asks, write `results.csv` /
    `results.parquet` and the per-clip `clips.parquet` to `spec.out` and log them to the run `mlflow_run`, or to a
    new run of `experiment`. With `spec.lens_top_k`, also the slots' logit lens (`logit_lens`) as
    `logit_lens.parquet`.

    The hidden states go to `<out>/hidden/` and are reused while the checkpoint, clips and layers stay the same.
    Everything that can be checked before the forward passes is (checkpoint, tracking store, data); nothing is
    written until then.

    Raises:
        ProbeError: the checkpoint, data or tracking store cannot be used (the message names which).
        LayerError: a layer in `spec.layers` the model does not have.
    """
    cfg = _checkpoint_config(checkpoint)
    out = spec.out or checkpoint / "probes" / spec.split
    if mlflow_run or experiment:
        _check_tracking(uri, mlflow_run)
    rows, sources, notes = _probe_data(cfg, checkpoint, names, spec)
    try:
        model = CoATModel.load(checkpoint, device="cuda" if torch.cuda.is_available() else "cpu")
    except (FileNotFoundError, ValueError, ConfigError) as err:
        raise ProbeError(err) from None
    chosen = normalise_layers(spec.layers, hidden_state_count(model))
    read = {"max_seconds": cfg.data.max_seconds, "crop": cfg.data.crop_seconds is not None, "progress": progress}
    extraction = extract_hidden_states(
        model, rows, out / "hidden", chosen, spec.batch_size, **read,
        fingerprint=_fingerprint(checkpoint, rows, chosen, cfg.data.max_seconds, cfg.data.long_clips))
    lens = None if spec.lens_top_k is None else logit_lens(model, rows, chosen, spec.batch_size,
                                                           top_k=spec.lens_top_k, **read)
    del model
    if extraction.reused:
        notes.append(f"reusing the hidden states in {out / 'hidden'} (same checkpoint, clips and layers)")
    if extraction.skipped:
        notes.append(f"{len(extraction.skipped)} clips did not decode and were left out")
    rows = rows.set_index("id").loc[extraction.ids].reset_index()

    fit = fit_probes(out / "hidden", probe_targets(rows, names, sources), clip_groups(rows), question_types(rows),
                     folds=spec.folds, seed=spec.seed)
    table = fit.table.assign(checkpoint=str(checkpoint.resolve()), split=spec.split,
                             num_slots=cfg.thinking.num_slots)
    write_tables(out, table, fit.clips, lens)
    run_id = mlflow_run
    try:
        if experiment:
            run_id = _new_probe_run(uri, experiment, checkpoint, cfg, spec.split, names)
        if run_id:
            run = tracking.TrackedRun(uri, run_id)
            log_probe_results(run, table, fit.clips, lens)
            if experiment:
                run.end()
    except (MlflowException, ValueError) as err:
        raise ProbeError(f"MLflow: {str(err).splitlines()[0]} (results are in {out})") from None
    return ProbeRun(table, fit.clips, lens, out, extraction, run_id, notes)


def write_tables(out: Path, table: pd.DataFrame, clips: pd.DataFrame, lens: pd.DataFrame | None) -> None:
    """`results.csv`, `results.parquet`, `clips.parquet` and, with a logit lens, `logit_lens.parquet` in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    table.to_parquet(out / "results.parquet", index=False)
    clips.to_parquet(out / "clips.parquet", index=False)
    if lens is not None:
        lens.to_parquet(out / "logit_lens.parquet", index=False)


def _checkpoint_config(checkpoint: Path) -> CoATConfig:
    """The config `checkpoint` was trained with. Raises ProbeError naming the file when there is none or it is
    invalid."""
    if not (checkpoint / CONFIG_FILE).is_file():
        raise ProbeError(not_a_checkpoint(checkpoint, CONFIG_FILE))
    try:
        return from_yaml((checkpoint / CONFIG_FILE).read_text())
    except (ConfigError, ValueError) as err:
        raise ProbeError(f"{checkpoint / CONFIG_FILE}: {err}") from None


def _check_tracking(uri: str, mlflow_run: str | None) -> None:
    """Raises ProbeError when the tracking store, or the run the results would join, cannot be reached."""
    try:
        tracking.check_reachable(uri)
        if mlflow_run:
            tracking.mlflow_client(uri).get_run(mlflow_run)
    except (tracking.TrackingUnavailableError, MlflowException) as err:
        raise ProbeError(f"MLflow: {str(err).splitlines()[0]}") from None


def _probe_data(cfg: CoATConfig, checkpoint: Path, names: Sequence[str], spec: ProbeSpec
                ) -> tuple[pd.DataFrame, dict, list[str]]:
    """The split's rows with their expert targets (`probe_rows`), the targets' sources, and notes on how they were
    standardised and what was left out. Raises ProbeError naming the manifest, store or split."""
    experts = [n for n in names if n != FAMILY]
    try:
        rows, sources, left_out, from_store = probe_rows(
            spec.data or Path(cfg.data.manifest), spec.split, experts, spec.store or Path(cfg.data.store),
            target_stats=load_target_stats(checkpoint), max_seconds=cfg.data.max_seconds,
            long_clips=cfg.data.long_clips, train_split=cfg.data.train_split, max_clips=spec.max_clips,
            seed=spec.seed)
    except (ManifestError, MissingFeaturesError, ValueError) as err:
        raise ProbeError(err) from None
    notes = []
    if from_store:
        notes.append(f"{', '.join(from_store)}: not in the checkpoint's target_stats.json; standardised with split "
                     f"{cfg.data.train_split!r}'s statistics from the store")
    if len(left_out):
        notes.append(f"{len(left_out)} manifest rows left out (invalid, undecodable or too long)")
    return rows, sources, notes


def _fingerprint(checkpoint: Path, rows: pd.DataFrame, layers: list[int], max_seconds: float, long_clips: str) -> str:
    """What the hidden states depend on: the trained parts, the config, the clips and prompts, layers and cropping."""
    digest = hashlib.sha256()
    with open(checkpoint / WEIGHTS_FILE, "rb") as f:
        digest.update(hashlib.file_digest(f, "sha256").digest())
    digest.update((checkpoint / CONFIG_FILE).read_bytes())
    digest.update(repr((layers, max_seconds, long_clips)).encode())
    for row in rows[["id", "clip_hash", "prompt"]].itertuples(index=False):
        digest.update("\t".join(map(str, row)).encode() + b"\n")
    return digest.hexdigest()[:16]


def _new_probe_run(uri: str, experiment: str, checkpoint: Path, cfg, split: str, names: Sequence[str]) -> str:
    """A run `probe-<checkpoint folder>` of `experiment`, tagged with what was probed."""
    tags = {"coat.probe.checkpoint": str(checkpoint.resolve()), "coat.probe.split": split,
            "coat.probe.targets": ",".join(names), "backbone": cfg.backbone.name,
            "thinking.num_slots": str(cfg.thinking.num_slots)}
    experiment_id = tracking.get_or_create_experiment(uri, experiment)
    run = tracking.mlflow_client(uri).create_run(experiment_id, run_name=f"{RUN_PREFIX}{checkpoint.resolve().name}",
                                                 tags=tags)
    return run.info.run_id
