"""Checkpoints: the trained parts (`CoATModel.save`) plus everything a restart needs to continue."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

STATE_FILE = "training_state.pt"


def save_checkpoint(directory: Path, coat, optimizer, scheduler, step: int, epoch: int, batch_in_epoch: int,
                    metrics: dict, unlogged: list[tuple[int, dict]]) -> Path:
    """`metrics`: what is reported with this checkpoint; `unlogged`: per-step metrics the checkpoint covers that
    are logged to MLflow only after it is committed (a restart logs whichever of them are missing)."""
    coat.save(directory)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
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
