"""The per-worker training loop: batch, forward, losses, backward, step, log, checkpoint — top to bottom.

Runs inside each Ray Train worker, or in this process with `train.num_workers=0` (see `session.py`). Each epoch
every rank streams the rows `epoch_order` deals it, in a seeded order (under `thinking.targets=shuffled` each row
with the targets of the row `shuffled_donors` gives it for the epoch); the randomness of each step is seeded by
(seed, rank, step). A run resumed from a checkpoint therefore continues exactly where the uninterrupted run
would be, and takes the same steps. Rank 0 alone writes checkpoints; step metrics (every `tracking.log_every`-th
step's, each checkpoint step's and each skipped step's) travel inside them and reach MLflow once the checkpoint is
committed (see `checkpoint.py`), so each is logged exactly once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.distributed.fsdp import FullyShardedDataParallel

from coat import tracking
from coat.config import CoATConfig, StageConfig
from coat.data.stream import Stream, collate, epoch_order, iter_training_batches, load_batch, shuffled_donors
from coat.eval.evaluate import evaluate
from coat.eval.scoring import metric_key
from coat.eval.systems import join_sources
from coat.experts.base import ExpertSpec
from coat.model import CoATModel
from coat.train import faults
from coat.train.checkpoint import (
    STEPS_FILE,
    TARGET_STATS_FILE,
    load_optimizer_shard,
    load_training_state,
    log_committed_steps,
    save_checkpoint,
    save_optimizer_shard,
    steps_handed_to_mlflow,
    whole_trained_parts,
)
from coat.train.session import RayTrainSession, Session


class NonFiniteTrainingError(RuntimeError):
    """Training went NaN or inf and could not go on; the message names the steps, the terms and what to resume."""

    def __init__(self, skipped: list[tuple[int, list[str]]], last_checkpoint: int | None):
        step, terms = skipped[-1]
        resume = (f"the last checkpoint is step {last_checkpoint}'s" if last_checkpoint
                  else "no checkpoint was written before it")
        super().__init__(
            f"training stopped at step {step}: {', '.join(terms)} not finite; {len(skipped)} steps skipped "
            f"(steps {', '.join(str(s) for s, _ in skipped[-5:])}), over train.max_nonfinite_steps; {resume}, and no "
            "checkpoint with non-finite weights is ever written. Lower train.lr (or a stage's lr), or check the "
            "expert features (coat data check --store STORE)")


def stage_at(cfg: CoATConfig, step: int) -> tuple[int, StageConfig, int]:
    """The stage that optimizer step `step` (0-based) belongs to: its index, itself, and the step within it."""
    for index, stage in enumerate(cfg.train.stages):
        if step < stage.steps:
            return index, stage, step
        step -= stage.steps
    return len(cfg.train.stages) - 1, cfg.train.stages[-1], cfg.train.stages[-1].steps - 1


def stage_ends(cfg: CoATConfig) -> set[int]:
    """The steps after which a stage ends: each is checkpointed, so the next stage starts from a committed one."""
    return set(itertools.accumulate(stage.steps for stage in cfg.train.stages))


def lr_factor(cfg: CoATConfig, step: int) -> float:
    """Within each stage: linear warm-up over its warm-up steps, then cosine decay to 10% by its end."""
    _, stage, within = stage_at(cfg, step)
    warmup = cfg.train.warmup_steps if stage.warmup_steps is None else stage.warmup_steps
    if within < warmup:
        return (within + 1) / warmup
    progress = (within - warmup + 1) / max(1, stage.steps - warmup)  # the stage's last step is at 10%
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def expert_scale_at(cfg: CoATConfig, step: int) -> float:
    """The stage's expert scale, annealed linearly from `expert_scale` to `expert_scale_end` over its steps."""
    _, stage, within = stage_at(cfg, step)
    if stage.expert_scale_end is None:
        return stage.expert_scale
    return stage.expert_scale + (stage.expert_scale_end - stage.expert_scale) * within / max(1, stage.steps - 1)


def set_learning_rates(optimizer, cfg: CoATConfig, step: int) -> dict[str, float]:
    """Each parameter group's learning rate at `step`: the stage's rate for it (else `train.lr`) times
    `lr_factor`, 0 for a group the stage freezes. Derived from the step alone, so a resumed run needs no
    scheduler state."""
    _, stage, _ = stage_at(cfg, step)
    factor = lr_factor(cfg, step)
    for group in optimizer.param_groups:
        trained = group["name"] in stage.train
        group["lr"] = stage.lr.get(group["name"], cfg.train.lr) * factor if trained else 0.0
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


def make_optimizer(coat: CoATModel, cfg: CoATConfig) -> torch.optim.AdamW:
    """AdamW over every trained parameter, one param group per `config.PARAM_GROUPS` entry. Frozen parameters
    stay in it: they get no gradient, so AdamW leaves them and their state alone until a stage trains them."""
    groups = [{"params": [p for _, p in members], "name": group}
              for group, members in coat.parameter_groups().items() if members]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def enter_stage(session: Session, coat: CoATModel, model, stage: StageConfig, strategy: str):
    """Freeze what `stage` does not train and return the model to train it through. DDP registers the parameters
    that take gradients when it wraps a model, so every stage wraps anew (FSDP fixes them for the whole run: the
    config allows it only when every stage trains the same groups, and it is wrapped once)."""
    coat.set_trainable(stage.train)
    return model if model is not None and strategy == "fsdp" else session.wrap(coat, strategy)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one rank's randomness (dropout) in one step: a resumed run draws what the uninterrupted one
    drew, with no generator state to save."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def clip_gradients(model, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` by the norm of the whole gradient, and return that norm. FSDP ranks hold gradient
    shards: only the wrapper knows the whole norm."""
    if isinstance(model, FullyShardedDataParallel):
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def all_ranks_mean(sums: dict[str, float], count: int, device) -> dict[str, float]:
    """Means over every rank of per-rank sums of `count` examples (every rank must call this, together)."""
    names = sorted(sums)
    totals = torch.tensor([sums[n] for n in names] + [count], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return {name: (totals[i] / totals[-1]).item() for i, name in enumerate(names)}


def add_losses(sums: dict[str, float], out, n: int) -> None:
    for name, value in {"loss": out.loss, **out.losses}.items():
        sums[name] = sums.get(name, 0.0) + value.item() * n


# Validation batches up to this size are decoded once, in the training process, and held between checkpoints; a
# larger set streams through Ray Data at each one. A short run's checkpoints otherwise spend most of their time
# starting a decode pipeline for a few batches.
HELD_VALIDATION_BYTES = 256 * 2**20


class ValidationBatches:
    """One rank's share of the validation rows, batched on the model's device: the same rows at every checkpoint (at
    most `train.val_batches` batches per rank, the same number on every rank; a subset fixed by `eval.seed` in which
    each task family and mixture entry keeps its share). At the first checkpoint its first batch is decoded here;
    when that many batches of its size fit in `HELD_VALIDATION_BYTES`, the rest follow and all are held."""

    def __init__(self, val: Stream, coat: CoATModel, cfg: CoATConfig, rank: int, world: int):
        per_rank = min(len(val) // world, cfg.train.val_batches * cfg.train.batch_size)
        self.rows = val.stratified(per_rank * world, cfg.eval.seed)[rank::world]
        self.val, self.coat, self.batch_size = val, coat, cfg.train.batch_size
        self.held: list[dict] | None = None
        self.too_large = False

    def __iter__(self) -> Iterator[dict]:
        if self.held is None and not self.too_large and len(self.rows):
            first = self.decode_here(self.rows[:self.batch_size])
            size = sum(t.numel() * t.element_size() for t in first.values())
            if size * math.ceil(len(self.rows) / self.batch_size) <= HELD_VALIDATION_BYTES:
                self.held = [first, *(self.decode_here(self.rows[start:start + self.batch_size])
                                      for start in range(self.batch_size, len(self.rows), self.batch_size))]
            else:
                self.too_large = True
        if self.held is not None:
            return iter(self.held)
        return iter_training_batches(self.val.dataset(self.rows), self.coat, self.batch_size)

    def decode_here(self, rows) -> dict[str, torch.Tensor]:
        """The batch of `rows` as the stream makes it (`load_batch`, `collate`), in this process."""
        items = [self.val.items[i] for i in rows]
        decoded = load_batch({key: [item[key] for item in items] for key in items[0]}, self.val.sources,
                             self.val.sample_rate, self.val.crop_seconds)
        return {key: value.to(self.coat.slot_table.device) for key, value in collate(decoded, self.coat).items()}


@torch.no_grad()
def validation_losses(model, coat: CoATModel, batches: ValidationBatches, device) -> dict[str, float]:
    """Mean losses over the validation `batches`, averaged over ranks. `val/ce` compares across trials whatever their
    loss weights: it is what sweeps rank by.

    Forwards through `coat` itself unless FSDP holds its weights in shards (then every rank must run the same
    number of batches); DDP's wrapper would sync buffers on every call."""
    forward = model if isinstance(model, FullyShardedDataParallel) else coat
    coat.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in batches:
        n = batch["input_ids"].shape[0]
        add_losses(sums, forward(batch), n)
        count += n
    coat.train()
    return {f"val/{name}": value for name, value in all_ranks_mean(sums, count, device).items()}


def validation_scores(coat: CoATModel, parts: list, cfg: CoATConfig) -> dict[str, float]:
    """`val/<task>/<metric>`: the validation questions `parts` (`coat.eval.systems.source_parts`) answered and scored
    as the test evaluation would score them, without intervals or latency; what a sweep may rank by quality. Rank 0
    alone answers them: the other ranks wait at the report that follows."""
    scoring = replace(cfg.eval, max_examples=None, latency_examples=0, circular=False, bootstrap=1)
    report = join_sources([replace(evaluate(coat, rows, scoring, suite=suite, max_seconds=cfg.data.max_seconds,
                                            crop=cfg.data.long_clips == "crop", progress=False), source=source)
                           for source, suite, rows in parts], scoring)
    return {f"val/{row.task}/{metric_key(row.metric, row.scoring)}": float(row.value)
            for row in report.table.itertuples()}


def accumulating(model, last: bool):
    """DDP and FSDP all-reduce gradients on every backward: all but a step's last micro-batch skip it."""
    return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


@dataclass(frozen=True)
class LoopInputs:
    """What the driver hands each training process (every Ray Train worker, or its own with `train.num_workers=0`)."""

    cfg: CoATConfig
    experts: dict[str, ExpertSpec]
    streams: dict[str, Stream]  # `train` and `val`
    target_stats: dict[str, dict | None]  # what the targets are standardised with, per expert (`target_statistics`)
    val_parts: list | None  # the validation questions `train.val_scores` answers, by source; None without
    launched_at: float  # the driver's start, epoch seconds
    run_dir: Path  # the run's folder in the storage: fault markers, `checkpoint.steps_handed_to_mlflow`
    run: tracking.TrackedRun | None = None  # the MLflow run it logs to; None: untracked
    faults: str | None = None  # see `faults.py`


def train_loop_per_worker(inputs: LoopInputs) -> None:
    """The entry point of each Ray Train worker."""
    run_loop(inputs, RayTrainSession(inputs.cfg.train.async_upload))


@dataclass
class Position:
    """Where training stands: optimizer steps taken, the epoch, and the micro-batches of it consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class Resumed:
    """What a restart takes from the checkpoint it resumes from (a fresh start: step 0, nothing else)."""

    position: Position = field(default_factory=Position)
    optimizer: dict | None = None
    logged_through: int = 0  # steps MLflow already holds (those of a newer checkpoint that turned out torn)


def run_loop(inputs: LoopInputs, session: Session) -> None:
    """Train per `inputs` from where the session's checkpoint left off (or the start) to the end.

    Raises ValueError when the checkpoint resumed from was trained on targets standardised otherwise (the
    training split changed)."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # a pipeline per epoch: its start-up notes are noise
    cfg = inputs.cfg
    faults.arm(inputs.faults, session.rank, inputs.run_dir)
    device = session.device(cfg.train.use_gpu)
    torch.manual_seed(cfg.train.seed)  # the same initial model on every rank: FSDP, unlike DDP, does not broadcast it
    coat = CoATModel(cfg, inputs.experts, device=device)
    coat.standardise_slots(inputs.target_stats)
    coat.train()
    resumed = resume(session, coat, inputs.target_stats, inputs.run, inputs.run_dir)
    model = enter_stage(session, coat, None, stage_at(cfg, min(resumed.position.step, cfg.train.total_steps - 1))[1],
                        cfg.train.strategy)
    optimizer = make_optimizer(coat, cfg)
    if resumed.optimizer is not None:
        optimizer.load_state_dict(resumed.optimizer)
    train_to_the_end(session, model, coat, optimizer, inputs, resumed, device)


def resume(session: Session, coat: CoATModel, target_stats: dict, run: tracking.TrackedRun | None,
           run_dir: Path) -> Resumed:
    """Load the checkpoint the session restores, if any, into `coat`: its trained parts, position and optimizer
    state (under FSDP each rank's own shard). Rank 0 logs the checkpoint's committed steps again (idempotent: they
    may not have reached MLflow) and learns which steps MLflow already holds, so that redone steps are not logged
    twice. On a first start rank 0 tags the run with the trainable parameter counts instead, once per run."""
    with session.restored() as directory:
        if directory is None:
            if session.rank == 0 and run:  # outcomes of settings: tags
                run.set_tags({f"trainable.{group}": str(n) for group, n in coat.parameter_counts().items()})
            return Resumed()
        _check_target_stats(directory, target_stats)
        coat.load_trained(directory)
        state = load_training_state(directory)
        if state["optimizer"] is None:  # FSDP: every rank saved its own shard
            state["optimizer"] = load_optimizer_shard(directory, session.rank)
        logged_through = 0
        if session.rank == 0 and run:
            log_committed_steps(run, (directory / STEPS_FILE).read_text(), run_dir)
            # What the server holds, or (when it cannot say) what went to it or to its spool before the restart.
            logged_through = max(tracking.last_logged_step(run.uri, run.run_id, "train/loss"),
                                 steps_handed_to_mlflow(run_dir))
    position = Position(state["step"], state["epoch"], state["batch_in_epoch"])
    return Resumed(position, state["optimizer"], logged_through)


def train_to_the_end(session: Session, model, coat: CoATModel, optimizer, inputs: LoopInputs, resumed: Resumed,
                     device) -> None:
    """Steps from `resumed.position` to `train.total_steps`, epoch by epoch, each rank streaming the rows
    `epoch_order` deals it; a checkpoint every `train.checkpoint_every` steps and at each stage's end."""
    cfg, train = inputs.cfg, inputs.streams["train"]
    val = ValidationBatches(inputs.streams["val"], coat, cfg, session.rank, session.world)
    at, ends = resumed.position, stage_ends(cfg)
    stage_index = stage_at(cfg, min(at.step, cfg.train.total_steps - 1))[0]
    batch_size, accum, world = cfg.train.batch_size, cfg.train.grad_accum, session.world
    pending: list[tuple[int, int, dict[str, float]]] = []  # rank 0's (step, ms, metrics) since the last checkpoint
    skipped: list[tuple[int, list[str]]] = []  # steps (1-based) skipped for non-finite losses or gradients
    last_checkpoint = at.step if at.step else None
    last_step_end = time.perf_counter()
    while at.step < cfg.train.total_steps:
        order = epoch_order(len(train), seed=cfg.train.seed, epoch=at.epoch, world=world, rank=session.rank,
                            step_rows=batch_size * accum, weights=train.weights)
        donors = (shuffled_donors(len(train), seed=cfg.train.seed, epoch=at.epoch)
                  if cfg.thinking.supervised and cfg.thinking.targets == "shuffled" else None)
        # Closed on leaving, so a stream stopped mid-epoch (the last step) shuts down while Ray is still up.
        stream = iter_training_batches(train.dataset(order[at.batch_in_epoch * batch_size:], donors), coat,
                                       batch_size)
        with contextlib.closing(stream) as batches:
            while at.step < cfg.train.total_steps and at.batch_in_epoch < len(order) // batch_size:
                index, stage, _ = stage_at(cfg, at.step)
                if index != stage_index:
                    stage_index, model = index, enter_stage(session, coat, model, stage, cfg.train.strategy)
                torch.manual_seed(step_seed(cfg.train.seed, session.rank, at.step))
                metrics = train_step(model, coat, batches, optimizer, cfg, at.step, device)
                if nonfinite := metrics.pop("nonfinite", None):
                    skipped.append((at.step + 1, nonfinite))
                    if len(skipped) > cfg.train.max_nonfinite_steps:
                        raise NonFiniteTrainingError(skipped, last_checkpoint)
                at.step, at.batch_in_epoch = at.step + 1, at.batch_in_epoch + accum
                faults.point("step", at.step)
                now = time.perf_counter()
                metrics |= {"train/epoch": at.epoch, "train/since_launch_s": time.time() - inputs.launched_at,
                            "train/samples_per_s": batch_size * accum * world / (now - last_step_end)}
                checkpointing = at.step % cfg.train.checkpoint_every == 0 or at.step in ends
                logged = checkpointing or nonfinite or at.step % cfg.steps_between_logs == 0
                if logged and at.step > resumed.logged_through:
                    pending.append((at.step, int(time.time() * 1000), metrics))
                last_step_end = now
                if checkpointing:
                    metrics |= validation_losses(model, coat, val, device)  # the record too
                    if cfg.train.val_scores and session.rank == 0:
                        metrics |= validation_scores(coat, inputs.val_parts, cfg)
                    # Tune's table shows a trial's first four numbers: the step, what sweeps rank by, the loss.
                    shown = {key: metrics[key] for key in (cfg.sweep.metric, "train/ce") if key in metrics}
                    report = {"step": at.step, **shown, "epoch": at.epoch,
                              tracking.PREFILL_COST: cfg.thinking.prefill_positions, **metrics}
                    checkpoint_and_report(session, model, coat, optimizer, at, report, pending,
                                          inputs.target_stats)
                    pending, last_checkpoint = [], at.step
                    last_step_end = time.perf_counter()  # validation and checkpointing are not training time
        at.epoch, at.batch_in_epoch = at.epoch + 1, 0


def train_step(model, coat: CoATModel, batches, optimizer, cfg: CoATConfig, step: int, device) -> dict[str, float]:
    """Optimizer step `step` (0-based) over `train.grad_accum` micro-batches, with the stage's weights and learning
    rates; its losses averaged over every micro-batch and rank, the stage, learning rates and gradient norm. A step
    whose loss or gradient norm is not finite changes nothing (`train/skipped` 1, and `nonfinite` lists the terms
    that were not, for `train_to_the_end` to count)."""
    index, stage, _ = stage_at(cfg, step)
    rates, scale = set_learning_rates(optimizer, cfg, step), expert_scale_at(cfg, step)
    accum = cfg.train.grad_accum
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.train.use_gpu)
    sums: dict[str, float] = {}
    count = 0
    for micro in range(accum):
        batch = next(batches)
        with accumulating(model, last=micro == accum - 1), autocast:
            out = model(batch, stage=stage, expert_scale=scale)
            (out.loss / accum).backward()
        n = batch["input_ids"].shape[0]
        add_losses(sums, out, n)
        count += n
    trained = [p for p in coat.parameters() if p.requires_grad]
    grad_norm = clip_gradients(model, trained, cfg.train.max_grad_norm).item()
    means = all_ranks_mean(sums, count, device)
    # Losses are means over every rank and gradients are all-reduced, so every rank sees the same and decides alike.
    nonfinite = [name for name, value in means.items() if not math.isfinite(value)]
    nonfinite += [] if math.isfinite(grad_norm) else ["grad_norm"]
    if not nonfinite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {f"train/{name}": value for name, value in means.items()}
    return metrics | {f"train/lr/{group}": lr for group, lr in rates.items()} | {
        "train/lr": max(rates.values()), "train/stage": index, "train/expert_scale": scale,
        "train/grad_norm": grad_norm, "train/skipped": float(bool(nonfinite))} | (
        {"nonfinite": nonfinite} if nonfinite else {})


def checkpoint_and_report(session: Session, model, coat: CoATModel, optimizer, position: Position, report: dict,
                          pending: list, target_stats: dict) -> None:
    """Every rank reports; rank 0 writes the checkpoint (under FSDP every rank also its optimizer shard), carrying
    the step metrics `pending` since the last one, which reach MLflow once it is committed."""
    sharded = isinstance(model, FullyShardedDataParallel)
    rank, step = session.rank, position.step
    trained = whole_trained_parts(model, coat)  # every rank, under FSDP
    if broken := [name for name, value in trained.items() if not torch.isfinite(value).all()]:
        raise NonFiniteTrainingError([(step, [f"parameter {name}" for name in broken[:3]])], None)
    if rank == 0 or sharded:
        with session.checkpoint_dir(step) as directory:
            if sharded:
                save_optimizer_shard(directory, rank, optimizer)
            if rank == 0:
                save_checkpoint(directory, coat, trained, None if sharded else optimizer.state_dict(),
                                step, position.epoch, position.batch_in_epoch, report, pending, target_stats)
            session.report(report, directory)
    else:
        session.report(report, None)
    faults.point("reported", step)


def _check_target_stats(directory, expected: dict) -> None:
    path = directory / TARGET_STATS_FILE
    if not path.is_file():
        return
    saved = {name: stats["id"] for name, stats in json.loads(path.read_text()).items() if stats}
    now = {name: stats["id"] for name, stats in expected.items() if stats}
    if saved != now:
        raise ValueError(f"checkpoint {directory} trained on targets standardised with statistics {saved}, but the "
                         f"training split now gives {now}: the training split changed since the run started; "
                         "start a new run (another train.run_name)")
