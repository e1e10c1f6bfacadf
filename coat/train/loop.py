"""The per-worker training loop: batch, forward, losses, backward, step, log, checkpoint — top to bottom.

Runs inside each Ray Train worker, or in this process with `train.num_workers=0` (see `session.py`). Each epoch
every rank streams the rows `epoch_order` deals it, in a seeded order; the randomness of each step is seeded by
(seed, rank, step). A run resumed from a checkpoint therefore continues exactly where the uninterrupted run
would be, and takes the same steps. Rank 0 alone writes checkpoints; per-step metrics travel inside them and
reach MLflow once the checkpoint is committed (see `checkpoint.py`), so every step is logged exactly once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time

import numpy as np
import torch
from torch.distributed.fsdp import FullyShardedDataParallel

from coat.config import CoATConfig, from_yaml
from coat.data.stream import Stream, epoch_order, iter_training_batches
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
    whole_trained_parts,
)
from coat.train.session import RayTrainSession


def stage_at(cfg: CoATConfig, step: int):
    """The schedule's stage that optimizer step `step` (0-based) belongs to."""
    for stage in cfg.train.stages:
        if step < stage.steps:
            return stage
        step -= stage.steps
    return cfg.train.stages[-1]


def lr_factor(cfg: CoATConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of `train.lr` over all stages."""
    warmup, total = cfg.train.warmup_steps, cfg.train.total_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


@torch.no_grad()
def validation_losses(model, coat: CoATModel, val: Stream, cfg: CoATConfig, rank: int, world: int, device
                      ) -> dict[str, float]:
    """Mean losses over the same validation rows every time (at most `train.val_batches` batches per rank, the
    same number on every rank), averaged over ranks. `val/ce` compares across trials whatever their loss
    weights: it is what sweeps rank by.

    Forwards through `coat` itself unless FSDP holds its weights in shards (then every rank must run the same
    number of batches); DDP's wrapper would sync buffers on every call."""
    forward = model if isinstance(model, FullyShardedDataParallel) else coat
    per_rank = min(len(val) // world, cfg.train.val_batches * cfg.train.batch_size)
    coat.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in iter_training_batches(val.dataset(np.arange(per_rank * world)[rank::world]), coat,
                                       cfg.train.batch_size):
        n = batch["input_ids"].shape[0]
        add_losses(sums, forward(batch), n)
        count += n
    coat.train()
    return {f"val/{name}": value for name, value in all_ranks_mean(sums, count, device).items()}


def accumulating(model, last: bool):
    """DDP and FSDP all-reduce gradients on every backward: all but a step's last micro-batch skip it."""
    return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def train_loop_per_worker(loop_config: dict) -> None:
    """The entry point of each Ray Train worker."""
    run_loop(loop_config, RayTrainSession())


def run_loop(loop_config: dict, session) -> None:
    """`loop_config`: `config` (YAML of the CoATConfig), `experts` (spec dicts), `streams` (`Stream`s of the train
    and val splits), `target_stats` (the statistics the targets are standardised with, per expert), `launched_at`
    (the driver's start, epoch seconds), `mlflow_uri` / `mlflow_run_id` (None: no tracking), `faults` and
    `fault_dir` (see `faults.py`). `session`: a `coat.train.session` session (Ray Train worker or in-process).

    Raises ValueError when the checkpoint resumed from was trained on targets standardised otherwise (the
    training split changed)."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # a pipeline per epoch: its start-up notes are noise
    cfg = from_yaml(loop_config["config"])
    experts = {name: ExpertSpec(**spec) for name, spec in loop_config["experts"].items()}
    train, val = loop_config["streams"]["train"], loop_config["streams"]["val"]
    rank, world = session.rank, session.world
    faults.arm(loop_config.get("faults"), rank, loop_config["fault_dir"])
    tracked = loop_config.get("mlflow_run_id") is not None
    device = session.device(cfg.train.use_gpu)
    torch.manual_seed(cfg.train.seed)  # the same initial model on every rank: FSDP, unlike DDP, does not broadcast it
    coat = CoATModel(cfg, experts, device=device)
    coat.train()
    step, epoch, batch_in_epoch = 0, 0, 0
    state = None
    with session.restored() as directory:
        if directory is not None:
            _check_target_stats(directory, loop_config["target_stats"])
            coat.load_trained(directory)
            state = load_training_state(directory)
            if state["optimizer"] is None:  # FSDP: every rank saved its own shard
                state["optimizer"] = load_optimizer_shard(directory, rank)
            if rank == 0 and tracked:  # committed, maybe not yet logged: logging again is idempotent
                log_committed_steps(loop_config["mlflow_uri"], loop_config["mlflow_run_id"],
                                    (directory / STEPS_FILE).read_text())
    if state is not None:
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    model = session.wrap(coat, cfg.train.strategy)
    params = [p for p in coat.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    batch_size, accum = cfg.train.batch_size, cfg.train.grad_accum
    pending: list[tuple[int, int, dict[str, float]]] = []  # rank 0's (step, ms, metrics) since the last checkpoint
    last_step_end = time.perf_counter()
    while step < cfg.train.total_steps:
        order = epoch_order(len(train), seed=cfg.train.seed, epoch=epoch, world=world, rank=rank,
                            step_rows=batch_size * accum)
        # Closed on leaving, so a stream stopped mid-epoch (the last step) shuts down while Ray is still up.
        stream = iter_training_batches(train.dataset(order[batch_in_epoch * batch_size:]), coat, batch_size)
        with contextlib.closing(stream) as batches:
            while step < cfg.train.total_steps and batch_in_epoch < len(order) // batch_size:
                torch.manual_seed(step_seed(cfg.train.seed, rank, step))
                metrics = train_step(model, batches, optimizer, scheduler, params, cfg, stage_at(cfg, step), device)
                step, batch_in_epoch = step + 1, batch_in_epoch + accum
                faults.point("step", step)
                now = time.perf_counter()
                metrics |= {"train/epoch": epoch, "train/since_launch_s": time.time() - loop_config["launched_at"],
                            "train/samples_per_s": batch_size * accum * world / (now - last_step_end)}
                pending.append((step, int(time.time() * 1000), metrics))
                last_step_end = now
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.total_steps:
                    metrics |= validation_losses(model, coat, val, cfg, rank, world, device)  # the step's record too
                    report = {"step": step, "epoch": epoch, "cost/prefill_positions": cfg.thinking.prefill_positions,
                              **metrics}
                    position = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
                    checkpoint_and_report(session, model, coat, optimizer, scheduler, position, report, pending,
                                          loop_config["target_stats"])
                    pending = []
                    last_step_end = time.perf_counter()  # validation and checkpointing are not training time
        epoch, batch_in_epoch = epoch + 1, 0


def train_step(model, batches, optimizer, scheduler, params, cfg: CoATConfig, stage, device) -> dict[str, float]:
    """One optimizer step over `train.grad_accum` micro-batches; its losses averaged over every micro-batch and
    rank, its learning rate and gradient norm."""
    accum = cfg.train.grad_accum
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.train.use_gpu)
    sums: dict[str, float] = {}
    count = 0
    for micro in range(accum):
        batch = next(batches)
        with accumulating(model, last=micro == accum - 1), autocast:
            out = model(batch, ce_weight=stage.ce_weight, expert_scale=stage.expert_scale)
            (out.loss / accum).backward()
        n = batch["input_ids"].shape[0]
        add_losses(sums, out, n)
        count += n
    grad_norm = clip_gradients(model, params, cfg.train.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {f"train/{name}": value for name, value in all_ranks_mean(sums, count, device).items()}
    return metrics | {"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm.item()}


def checkpoint_and_report(session, model, coat: CoATModel, optimizer, scheduler, position: dict, report: dict,
                          pending: list, target_stats: dict) -> None:
    """Every rank reports; rank 0 writes the checkpoint (under FSDP every rank also its optimizer shard), carrying
    the step metrics `pending` since the last one, which reach MLflow once it is committed."""
    sharded = isinstance(model, FullyShardedDataParallel)
    rank, step = session.rank, position["step"]
    trained = whole_trained_parts(model, coat)  # every rank, under FSDP
    if rank == 0 or sharded:
        with session.checkpoint_dir(step) as directory:
            if sharded:
                save_optimizer_shard(directory, rank, optimizer)
            if rank == 0:
                save_checkpoint(directory, coat, trained, None if sharded else optimizer.state_dict(), scheduler,
                                step, position["epoch"], position["batch_in_epoch"], report, pending, target_stats)
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
