"""Where the training loop runs: a Ray Train worker, or this process (`train.num_workers=0`).

The loop asks its session for rank, device, the checkpoint to resume from, and where to report. In a Ray Train
worker those come from `ray.train`, and a checkpoint's step metrics reach MLflow from Ray Train's controller
once it has registered the checkpoint (`CommittedStepsLogger`). In-process (short trials on one machine, Tune
trials without workers, benchmarks) the session keeps its own checkpoints, committed by an atomic rename, since
Ray Train's API is not available inside a Tune function. Either way a restart resumes from the newest checkpoint
that verifies against its manifest, skipping torn ones with a warning (see `checkpoint.py`), and a storage that is
full or cannot be written fails the run with `CheckpointError` naming the folder in the storage, the previous
checkpoint left as the one to resume from.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import pyarrow.fs
import ray.train
import ray.train.torch
import ray.tune
import torch
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from coat import tracking
from coat.train import faults
from coat.train.checkpoint import (
    STEPS_FILE,
    CheckpointError,
    first_sound,
    latest_checkpoint,
    log_committed_steps,
    prune_checkpoints,
    writing,
)

STAGING = ".staging-"


class Session(Protocol):
    """What the training loop asks of where it runs."""

    rank: int
    world: int

    def device(self, use_gpu: bool) -> torch.device:
        """The device this rank trains on."""

    def wrap(self, model, strategy: str):
        """`model` as this rank trains it under `strategy` (ddp, fsdp): wrapped, or itself for a single process."""

    def restored(self) -> AbstractContextManager[Path | None]:
        """The newest checkpoint of this run that verifies, readable inside the block; None: a fresh start."""

    def checkpoint_dir(self, step: int) -> AbstractContextManager[Path]:
        """A folder to write the checkpoint of `step` into, inside the block; `report` commits it."""

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        """Report the metrics of a checkpoint step, committing `checkpoint` (rank 0's; None on other ranks)."""


def fsdp_options(coat) -> dict:
    """FSDP's options for a CoAT model: a unit per decoder layer, so that no rank ever gathers a 7B backbone
    whole, and the original parameters, since LoRA trains a few of each layer's and freezes the rest."""
    return {"use_orig_params": True,
            "auto_wrap_policy": ModuleWrapPolicy({type(layer) for layer in coat.backbone.llm.layers})}


class CommittedStepsLogger(ray.train.UserCallback):
    """Runs in Ray Train's controller: after a report, its checkpoint is registered (a restart resumes from it),
    so the step metrics it carries can go to MLflow without a restart ever logging those steps again."""

    def __init__(self, run: tracking.TrackedRun, run_dir: Path):
        self.run, self.run_dir = run, run_dir

    def after_report(self, run_context, metrics: list[dict], checkpoint: ray.train.Checkpoint | None) -> None:
        if checkpoint is None:
            return
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STEPS_FILE}") as f:
            log_committed_steps(self.run, f.read().decode(), self.run_dir)


class RayTrainSession:
    """A `Session` inside a `TorchTrainer` worker; `async_upload`: see `report`."""

    def __init__(self, async_upload: bool):
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.async_upload = async_upload

    def device(self, use_gpu: bool) -> torch.device:
        return ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def wrap(self, model, strategy: str):
        kwargs = fsdp_options(model) if strategy == "fsdp" else {}
        return ray.train.torch.prepare_model(model, parallel_strategy=strategy, parallel_strategy_kwargs=kwargs)

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        """Ray Train's latest registered checkpoint, or, when it does not verify, the newest older one that does."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with contextlib.ExitStack() as stack:
            candidates = (Path(stack.enter_context(c.as_directory())) for c in [checkpoint, *older(checkpoint)])
            yield first_sound(candidates)

    @contextmanager
    def checkpoint_dir(self, step: int) -> Iterator[Path]:
        """A folder in the worker's temporary space, which `report` has copied into the run's storage and Ray then
        deletes (removed here if writing it fails)."""
        directory = Path(tempfile.mkdtemp(prefix="coat-checkpoint-"))
        try:
            yield directory
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        """Hand `checkpoint` to Ray Train, which copies it into the run's storage (`upload`) and registers it: with
        `async_upload` in a background thread while training goes on, else before returning. Either way the
        previous checkpoint is registered before this one's copy starts: Ray's controller records a checkpoint in
        the run's snapshot, in the storage, only once the worker has moved on, and the next copy filling the
        storage meanwhile would fail that write and with it the run, leaving no registered checkpoint to resume
        from. (A run's last copy is waited for when the loop returns.)"""
        if checkpoint is None:
            ray.train.report(metrics)
            return
        committed = ray.train.CheckpointConsistencyMode.COMMITTED
        if self.async_upload:
            ray.train.get_all_reported_checkpoints(consistency_mode=committed)
        mode = ray.train.CheckpointUploadMode.ASYNC if self.async_upload else ray.train.CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint),
                         checkpoint_upload_fn=upload, checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=True)
        if not self.async_upload:
            ray.train.get_all_reported_checkpoints(consistency_mode=committed)


def upload(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
    """Ray Train's own copy of `checkpoint` into the run's storage as `name`, a copy that fails (a full or unwritable
    storage) raised as `writing` raises it, naming the folder in the storage rather than the worker's staging one,
    and its torn copy removed. Ray registers a checkpoint only once its copy returns, so the previous one stays the
    run's latest and is not pruned, even with `train.keep_checkpoints=1`."""
    storage = ray.train.get_context().get_storage()
    destination = storage.build_checkpoint_path_from_name(name)
    try:
        with writing(Path(destination)):
            return storage.persist_current_checkpoint(checkpoint, name)
    except CheckpointError:
        with contextlib.suppress(OSError):
            storage.storage_filesystem.delete_dir(destination)
        raise


def older(checkpoint: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's checkpoints older than `checkpoint`, newest first: its siblings in the run's storage, which Ray
    Train names `checkpoint_<time>` (so that names sort by age), listed through the storage's own filesystem."""
    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    names = sorted(info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory
                   and info.base_name.startswith("checkpoint_") and info.base_name < name)
    return [ray.train.Checkpoint(f"{parent}/{n}", filesystem=checkpoint.filesystem) for n in reversed(names)]


class InProcessSession:
    """A `Session` where this process is the only worker; checkpoints live under `root`, written to a staging
    folder and renamed into place; metrics go to MLflow once committed (`tracking`: uri and run id) and to Tune
    when in a trial."""

    rank, world = 0, 1

    def __init__(self, root: Path, keep: int, report_to_tune: bool, run: tracking.TrackedRun | None):
        self.root, self.keep, self.report_to_tune, self.run = root, keep, report_to_tune, run
        self.last: tuple[dict, Path | None] = ({}, None)  # what the last report committed
        for stale in root.glob(f"{STAGING}*"):  # a write that a kill interrupted
            shutil.rmtree(stale, ignore_errors=True)

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def wrap(self, model, strategy: str):
        return model

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield latest_checkpoint(self.root)

    @contextmanager
    def checkpoint_dir(self, step: int) -> Iterator[Path]:
        """A staging folder, renamed into place by `report`; removed when writing it fails."""
        directory = self.root / f"{STAGING}{step:06d}-{uuid.uuid4().hex[:8]}"
        with writing(directory):
            directory.mkdir(parents=True)
        try:
            yield directory
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            committed = self.root / f"checkpoint_{metrics['step']:06d}"
            torn = self.root / f"{STAGING}torn-{uuid.uuid4().hex[:8]}"
            if committed.exists():  # a torn checkpoint of this step, skipped at resume: the redone one replaces it
                os.replace(committed, torn)
            os.replace(checkpoint, committed)
            shutil.rmtree(torn, ignore_errors=True)
            faults.point("reported", metrics["step"])
            if self.run is not None:
                log_committed_steps(self.run, (committed / STEPS_FILE).read_text(), self.root)
            prune_checkpoints(self.root, self.keep)
            checkpoint = committed
        self.last = (metrics, checkpoint)
        if self.report_to_tune:
            ray.tune.report(metrics)
