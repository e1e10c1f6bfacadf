"""Where the training loop runs: a Ray Train worker, or this process (`train.num_workers=0`).

The loop asks its session for rank, data, the checkpoint to resume from, and where to report. In a Ray Train
worker those come from `ray.train`; in-process (short trials on one machine, Tune trials without workers,
benchmarks) the session keeps its own checkpoints, since Ray Train's API is not available inside a Tune
function.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray.train
import ray.train.torch
import ray.tune
import torch
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from coat.train.checkpoint import STATE_FILE, latest_checkpoint, prune_checkpoints


def fsdp_options(coat) -> dict:
    """FSDP's options for a CoAT model: a unit per decoder layer, so that no rank ever gathers a 7B backbone
    whole, and the original parameters, since LoRA trains a few of each layer's and freezes the rest."""
    return {"use_orig_params": True,
            "auto_wrap_policy": ModuleWrapPolicy({type(layer) for layer in coat.backbone.llm.layers})}


class RayTrainSession:
    """Inside a `TorchTrainer` worker."""

    def __init__(self):
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.last: tuple[dict, Path | None] = ({}, None)

    def device(self, use_gpu: bool) -> torch.device:
        return ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def wrap(self, model, strategy: str):
        kwargs = fsdp_options(model) if strategy == "fsdp" else {}
        return ray.train.torch.prepare_model(model, parallel_strategy=strategy, parallel_strategy_kwargs=kwargs)

    def dataset(self, name: str):
        return ray.train.get_dataset_shard(name)

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
        else:
            with checkpoint.as_directory() as directory:
                yield Path(directory)

    @contextmanager
    def checkpoint_dir(self, step: int) -> Iterator[Path]:
        with tempfile.TemporaryDirectory() as directory:  # Ray copies it into the run's storage on report
            yield Path(directory)

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None)


class InProcessSession:
    """This process is the only worker; checkpoints live under `root`; metrics go to Tune when in a trial."""

    rank, world = 0, 1

    def __init__(self, root: Path, datasets: dict, keep: int, report_to_tune: bool):
        self.root, self.datasets, self.keep, self.report_to_tune = root, datasets, keep, report_to_tune
        self.last: tuple[dict, Path | None] = ({}, latest_checkpoint(root))

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def wrap(self, model, strategy: str):
        return model

    def dataset(self, name: str):
        return self.datasets[name]

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield latest_checkpoint(self.root)

    @contextmanager
    def checkpoint_dir(self, step: int) -> Iterator[Path]:
        directory = self.root / f"checkpoint_{step:06d}"
        directory.mkdir(parents=True, exist_ok=True)
        yield directory

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        if checkpoint is not None and (checkpoint / STATE_FILE).is_file():
            prune_checkpoints(self.root, self.keep)
        self.last = (metrics, checkpoint)
        if self.report_to_tune:
            ray.tune.report(metrics)
