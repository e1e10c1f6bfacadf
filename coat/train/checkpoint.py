"""Checkpoints: the trained parts (`CoATModel.save`) plus everything a restart needs to continue."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch.distributed.fsdp import FullyShardedDataParallel

STATE_FILE = "training_state.pt"
FSDP_UNIT = "_fsdp_wrapped_module."  # in the parameter names of modules FSDP wrapped as units of their own


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
                    scheduler, step: int, epoch: int, batch_in_epoch: int, metrics: dict,
                    unlogged: list[tuple[int, int, dict]]) -> Path:
    """`trained`: from `whole_trained_parts`; `optimizer_state`: None when each rank saves its shard.
    `metrics`: what is reported with this checkpoint; `unlogged`: (step, timestamp ms, metrics) of the steps it
    covers, logged to MLflow only after it is committed (a restart logs them again, idempotently)."""
    coat.save(directory, trained)
    torch.save(
        {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
         "batch_in_epoch": batch_in_epoch, "rng": torch.get_rng_state(), "metrics": metrics,
         "unlogged": list(unlogged)},
        directory / STATE_FILE,
    )
    return directory


def load_training_state(directory: Path) -> dict:
    """Raises FileNotFoundError naming the directory when it holds no training state."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {STATE_FILE}: not a coat training checkpoint")
    return torch.load(path, weights_only=False)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (in-process runs keep their own; Ray keeps the others)."""
    done = sorted(p.parent for p in root.glob(f"checkpoint_*/{STATE_FILE}"))
    return done[-1] if done else None


def prune_checkpoints(root: Path, keep: int) -> None:
    for old in sorted(root.glob("checkpoint_*"))[:-keep]:
        shutil.rmtree(old)
