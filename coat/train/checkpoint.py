"""Checkpoints: the trained parts (`CoATModel.save`) plus everything a restart needs to continue.

A checkpoint also carries the per-step metrics of the steps it covers (`steps.json`, with the time each was
taken). They reach MLflow only once the checkpoint is committed — registered by Ray Train's controller, or
renamed into place in-process — and whoever resumes from a checkpoint logs them again; MLflow keys a metric by
(key, value, timestamp, step), so that is idempotent. Steps after the last committed checkpoint are never
logged: a restart redoes them. Every step thus lands in MLflow exactly once, however a run is killed.

A checkpoint is what its manifest says it is. Each writer (rank 0, and under FSDP every rank for its optimizer
shard) ends by writing a manifest of its files with their sizes and sha256 (`manifest.json`, and
`manifest_rank<r>.json` for the other ranks' shards), after the files themselves are flushed to disk. A
checkpoint resumes only when rank 0's manifest is there and every file of every manifest matches it; otherwise
(a copy cut short, a block overwritten on shared storage, a write killed half-way) the restart falls back to the
previous committed one and says which it skipped and why. Checkpoints written before manifests existed are not
trusted either: a run whose checkpoints all fail is refused, never silently started again from step 0.

Training state and optimizer shards hold tensors, numbers and strings only, and are read with
`torch.load(weights_only=True)`: a checkpoint from a shared or downloaded path cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.fsdp import FullyShardedDataParallel

from coat import tracking
from coat.errors import UserError
from coat.model.coat_model import FSDP_UNIT
from coat.spool import atomic_write
from coat.train import faults

STATE_FILE = "training_state.pt"
STEPS_FILE = "steps.json"
TARGET_STATS_FILE = "target_stats.json"
LOGGED_FILE = "logged_through"  # in the run's folder: the last step whose metrics went to MLflow or its spool
MANIFEST_FILE = "manifest.json"

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that cannot be written, or cannot be trusted to resume from."""


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
    the ranks' checkpoint directories), rank 0 within `save_checkpoint`'s manifest, the others with one of their
    own. Gathering it whole instead would go through FSDP's optimizer-state resharding, which swapped Adam's moments
    on reload in torch 2.11 (tests/test_train.py checks the round trip)."""
    with writing(directory):
        save_tensors(optimizer.state_dict(), directory / f"optimizer_rank{rank}.pt")
        if rank != 0:
            write_manifest(directory, f"manifest_rank{rank}.json", [f"optimizer_rank{rank}.pt"])


def load_optimizer_shard(directory: Path, rank: int) -> dict:
    """Raises FileNotFoundError when the checkpoint was written by fewer FSDP ranks than are resuming it."""
    path = directory / f"optimizer_rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no optimizer shard for rank {rank}: resume an FSDP run with the "
                                "train.num_workers it was checkpointed with")
    return safe_load(path)


def save_checkpoint(directory: Path, coat, trained: dict[str, torch.Tensor], optimizer_state: dict | None,
                    step: int, epoch: int, batch_in_epoch: int, metrics: dict,
                    steps: list[tuple[int, int, dict]], target_stats: dict) -> Path:
    """`trained`: from `whole_trained_parts`; `optimizer_state`: None when each rank saves its shard.
    `metrics`: what is reported with this checkpoint; `steps`: (step, timestamp ms, metrics) of the steps it
    covers; `target_stats`: the standardisation statistics the targets were trained with, per expert. The manifest
    is written last: a directory without it is not a checkpoint.

    Raises CheckpointError naming the directory when the storage is full or cannot be written; the previous
    checkpoint is left as it was."""
    with writing(directory):
        coat.save(directory, trained)
        (directory / STEPS_FILE).write_text(json.dumps([[s, stamp, values] for s, stamp, values in steps]))
        (directory / TARGET_STATS_FILE).write_text(json.dumps(target_stats))
        faults.point("checkpoint", step)
        save_tensors({"optimizer": optimizer_state, "step": step, "epoch": epoch,
                      "batch_in_epoch": batch_in_epoch, "metrics": metrics}, directory / STATE_FILE)
        shards = [p.name for p in directory.glob("optimizer_rank*.pt")]  # this rank's, when FSDP saved it here
        files = [p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith("manifest")]
        write_manifest(directory, MANIFEST_FILE, sorted(set(files) | set(shards)))
    return directory


@contextmanager
def writing(directory: Path) -> Iterator[None]:
    """Turn a failed write (ENOSPC, EFBIG, EACCES, a path that is a file...) into one error naming the checkpoint
    folder and the fix. Every file goes through Python's own I/O (see `save_tensors`), so each such failure is an
    OSError."""
    try:
        yield
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else err.strerror or str(err)  # pyarrow's strerror is verbose
        raise CheckpointError(f"could not write checkpoint {directory}: {reason}; free space there or point "
                              "train.storage at a writable place (the previous checkpoint is intact)") from err


def save_tensors(state: dict, path: Path) -> None:
    """`torch.save` into memory, then written with Python's I/O: torch's own writer reports a full disk as an
    unrelated RuntimeError ("unexpected pos ...")."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(buffer.getbuffer())


def write_manifest(directory: Path, name: str, files: Iterable[str]) -> None:
    """Flush `files` to disk, then record their sizes and sha256 in `name`, itself written whole and renamed."""
    entries = {}
    for file in files:
        path = directory / file
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            entries[file] = {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    tmp = directory / f".{name}.tmp"
    with open(tmp, "w") as f:
        json.dump({"files": entries}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)


def verify_checkpoint(directory: Path) -> str | None:
    """Why `directory` cannot be resumed from (no manifest, a file missing, cut short or changed), else None."""
    if not (directory / MANIFEST_FILE).is_file():
        return (f"no {MANIFEST_FILE}: its write did not finish, or coat wrote it before checkpoints carried "
                "checksums")
    for manifest in sorted(directory.glob("manifest*.json")):
        try:  # garbled bytes, other JSON or entries of the wrong shape: the checkpoint cannot be trusted
            files = {str(name): (int(entry["bytes"]), str(entry["sha256"]))
                     for name, entry in json.loads(manifest.read_text(encoding="utf-8"))["files"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{manifest.name} does not parse"
        for name, (size, sha256) in files.items():
            path = directory / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} when written"
            with open(path, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != sha256:
                    return f"{name} changed since it was written (sha256 differs)"
    return None


def first_sound(candidates: Iterable[Path]) -> Path | None:
    """The first of `candidates` (newest first) that verifies, saying which it skipped and why.

    Raises CheckpointError when there are candidates and none verifies: starting such a run again from step 0
    would redo, and log again, steps it already trained. Its fix holds in-process and under Ray Train alike:
    checkpoints moved aside stay listed in Ray's run snapshot in the storage, and the MLflow run, found by the run's
    name, would take those steps a second time."""
    skipped = []
    for directory in candidates:
        reason = verify_checkpoint(directory)
        if reason is None:
            if skipped:
                log.warning("resuming from %s: skipped %s", directory, "; ".join(skipped))
            return directory
        skipped.append(f"{directory} ({reason})")
    if skipped:
        raise CheckpointError(f"no checkpoint of this run can be resumed from: {'; '.join(skipped)}; to train it "
                              "again from step 0, start it under another train.run_name, which opens a new MLflow "
                              "run (this one keeps the steps it logged)")
    return None


def load_training_state(directory: Path) -> dict:
    """Raises FileNotFoundError naming the directory when it holds no training state, CheckpointError when it holds
    something other than tensors, numbers and strings."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {STATE_FILE}: not a coat training checkpoint")
    return safe_load(path)


def safe_load(path: Path) -> dict:
    """`torch.load` that builds tensors, numbers, strings and containers only: a pickle naming any other object is
    refused before it is built, so loading cannot run code."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds objects other than tensors and numbers, which coat never writes; "
                              f"refusing to load it ({str(err).splitlines()[0][:200]})") from None


def log_committed_steps(run: tracking.TrackedRun, steps_json: str, run_dir: Path) -> None:
    """Log the step metrics a committed checkpoint carries (the text of its `steps.json`), each with the time it
    was taken: logging them again stores nothing new. Then record in `run_dir` the last step handed to MLflow
    (sent, or waiting in the spool to be sent), which a restart trusts when the server cannot say
    (`steps_handed_to_mlflow`)."""
    steps = json.loads(steps_json)
    if not steps:
        return
    run.log_steps(steps)
    if max(step for step, _, _ in steps) > steps_handed_to_mlflow(run_dir):
        atomic_write(run_dir / LOGGED_FILE, str(max(step for step, _, _ in steps)))


def steps_handed_to_mlflow(run_dir: Path) -> int:
    """The last step of the run in `run_dir` whose metrics were handed to MLflow; 0 when none was (or the record
    does not read)."""
    try:
        return int((run_dir / LOGGED_FILE).read_text(encoding="utf-8").strip())
    except (FileNotFoundError, ValueError):
        return 0


def committed_checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders under `root`, oldest first: by step for `checkpoint_<step>` (as numbers, so step
    1,000,000 follows 999,999), by name for Ray Train's time-stamped ones."""
    def age(path: Path) -> tuple:
        suffix = path.name.removeprefix("checkpoint_")
        return (0, int(suffix), "") if suffix.isdigit() else (1, 0, path.name)

    return sorted((p for p in root.glob("checkpoint_*") if p.is_dir()), key=age)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest committed checkpoint under `root` that verifies (in-process runs keep their own; Ray keeps the
    others), skipping torn ones with a warning. Raises CheckpointError as `first_sound`."""
    return first_sound(committed_checkpoints(root)[::-1])


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints. Called after a commit, so the one just written is among them."""
    for old in committed_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
