"""Checkpoints: the trained parts (`CoATModel.save`) plus everything a restart needs to continue.

A checkpoint also carries the per-step metrics of the steps it covers (`steps.json`, with the time each was
taken). They reach MLflow only once the checkpoint is committed — registered by Ray Train's controller, or
renamed into place in-process — and whoever resumes from a checkpoint logs them again; MLflow keys a metric by
(key, value, timestamp, step), so that is idempotent. Steps after the last committed checkpoint are never
logged: a restart redoes them. Every step thus lands in MLflow exactly once, however a run is killed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch.distributed.fsdp import FullyShardedDataParallel

from coat import tracking
from coat.model.coat_model import FSDP_UNIT
from coat.train import faults

STATE_FILE = "training_state.pt"
STEPS_FILE = "steps.json"
TARGET_STATS_FILE = "target_stats.json"


def whole_trained_parts(model, coat) -> dict[str, torch.Tensor]:
    """The trained parts, whole on rank 0 (which alone writes them), named as in the unwrapped model. Under FSDP
    every rank holds a shard of them, so every rank must call this, together."""
    if not isinstance(model, FullyShardedDataParallel):
        return coat.trained_state()
    with FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True,
                                                     offload_to_cpu=torch.cuda.is_available()):
        return {name.replace(FSDP_UNIT, ""): value.clone() for name, value in coat.trained_state().items()}


def save_optimizer_shard(directory: Path, rank: int, optimizer) -> None:
    """Under FSDP each rank's optimizer holds the state of that rank's shard: each rank saves its own (Ray merges
    the ranks' checkpoint directories). Gathering it whole instead would go through FSDP's optimizer-state
    resharding, which swapped Adam's moments on reload in torch 2.11 (tests/test_train.py checks the round trip)."""
    torch.save(optimizer.state_dict(), directory / f"optimizer_rank{rank}.pt")


def load_optimizer_shard(directory: Path, rank: int) -> dict:
    """Raises FileNotFoundError when the checkpoint was written by fewer FSDP ranks than are resuming it."""
    path = directory / f"optimizer_rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no optimizer shard for rank {rank}: resume an FSDP run with the "
                                "train.num_workers it was checkpointed with")
    return torch.load(path, weights_only=False)


def save_checkpoint(directory: Path, coat, trained: dict[str, torch.Tensor], optimizer_state: dict | None,
                    step: int, epoch: int, batch_in_epoch: int, metrics: dict,
                    steps: list[tuple[int, int, dict]], target_stats: dict) -> Path:
    """`trained`: from `whole_trained_parts`; `optimizer_state`: None when each rank saves its shard.
    `metrics`: what is reported with this checkpoint; `steps`: (step, timestamp ms, metrics) of the steps it
    covers; `target_stats`: the standardisation statistics the targets were trained with, per expert. The training
    state is written last: a directory without it is not a checkpoint."""
    coat.save(directory, trained)
    (directory / STEPS_FILE).write_text(json.dumps([[s, stamp, values] for s, stamp, values in steps]))
    (directory / TARGET_STATS_FILE).write_text(json.dumps(target_stats))
    faults.point("checkpoint", step)
    torch.save(
        {"optimizer": optimizer_state, "step": step, "epoch": epoch,
         "batch_in_epoch": batch_in_epoch, "metrics": metrics},
        directory / STATE_FILE,
    )
    return directory


def load_training_state(directory: Path) -> dict:
    """Raises FileNotFoundError naming the directory when it holds no training state."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {STATE_FILE}: not a coat training checkpoint")
    return torch.load(path, weights_only=False)


def log_committed_steps(uri: str, run_id: str, steps_json: str) -> None:
    """Log the step metrics a committed checkpoint carries (the text of its `steps.json`), each with the time it
    was taken: logging them again stores nothing new."""
    for step, stamp, values in json.loads(steps_json):
        tracking.log_metrics(uri, run_id, values, step, stamp)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest committed checkpoint under `root` (in-process runs keep their own; Ray keeps the others)."""
    done = sorted(p.parent for p in root.glob(f"checkpoint_*/{STATE_FILE}"))
    return done[-1] if done else None


def prune_checkpoints(root: Path, keep: int) -> None:
    for old in sorted(root.glob("checkpoint_*"))[:-keep]:
        shutil.rmtree(old)
