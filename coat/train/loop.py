"""The per-worker training loop: batch, forward, losses, backward, step, log, checkpoint — top to bottom.

Runs inside each Ray Train worker, or in this process with `train.num_workers=0` (see `session.py`). Rank 0
alone writes checkpoints and talks to MLflow. Per-step metrics reach MLflow right after the checkpoint that
covers them is committed, and the checkpoint carries them too: a restart resumes from it, logs what a kill
left unlogged and never logs a step twice.
"""

from __future__ import annotations

import math
import time

import torch
from torch.distributed.fsdp import FullyShardedDataParallel

from coat import tracking
from coat.config import CoATConfig, from_yaml
from coat.data.stream import iter_training_batches
from coat.experts.base import ExpertSpec
from coat.model import CoATModel
from coat.train.checkpoint import (
    load_optimizer_shard,
    load_training_state,
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


def clip_gradients(model, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` by the norm of the whole gradient, and return that norm. FSDP ranks hold gradient
    shards: only the wrapper knows the whole norm."""
    if isinstance(model, FullyShardedDataParallel):
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


@torch.no_grad()
def validation_losses(model, coat: CoATModel, shard, cfg: CoATConfig, device) -> dict[str, float]:
    """Mean losses over (at most `train.val_batches` batches of) this worker's validation shard, averaged over
    workers. `val/ce` compares across trials whatever their loss weights: it is what sweeps rank by.

    Forwards through `coat` itself unless FSDP holds its weights in shards (then every rank must run the same
    number of batches, as equal shards do); DDP's wrapper would sync buffers on every call."""
    forward = model if isinstance(model, FullyShardedDataParallel) else coat
    coat.eval()
    sums: dict[str, float] = {}
    count = 0
    for index, batch in enumerate(iter_training_batches(shard, coat, cfg.train.batch_size)):
        if index >= cfg.train.val_batches:
            break
        out = forward(batch)
        n = batch["input_ids"].shape[0]
        for name, value in {"loss": out.loss, **out.losses}.items():
            sums[name] = sums.get(name, 0.0) + value.item() * n
        count += n
    coat.train()
    names = sorted(sums)
    totals = torch.tensor([sums[n] for n in names] + [count], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return {f"val/{name}": (totals[i] / totals[-1]).item() for i, name in enumerate(names)}


def train_loop_per_worker(loop_config: dict) -> None:
    """The entry point of each Ray Train worker."""
    run_loop(loop_config, RayTrainSession())


def run_loop(loop_config: dict, session) -> None:
    """`loop_config`: `config` (YAML of the CoATConfig), `experts` (spec dicts), `batches_per_epoch`,
    `launched_at` (the driver's start, epoch seconds) and `mlflow_uri` / `mlflow_run_id` (None: no tracking).
    `session`: a `coat.train.session` session (Ray Train worker or in-process)."""
    cfg = from_yaml(loop_config["config"])
    experts = {name: ExpertSpec(**spec) for name, spec in loop_config["experts"].items()}
    rank, world = session.rank, session.world
    device = session.device(cfg.train.use_gpu)
    torch.manual_seed(cfg.train.seed)  # the same initial model on every rank: FSDP, unlike DDP, does not broadcast it
    coat = CoATModel(cfg, experts, device=device)
    torch.manual_seed(cfg.train.seed + rank)
    coat.train()
    step, epoch, batch_in_epoch = 0, 0, 0
    state = None
    with session.restored() as directory:
        if directory is not None:
            coat.load_trained(directory)
            state = load_training_state(directory)
            if state["optimizer"] is None:  # FSDP: every rank saved its own shard
                state["optimizer"] = load_optimizer_shard(directory, rank)
    if state is not None:
        torch.set_rng_state(state["rng"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if rank == 0 and loop_config.get("mlflow_run_id"):
            # A restart can come between committing a checkpoint and logging its steps. Logging them again is
            # idempotent (same timestamps), even if the replaced worker is still finishing its own logging.
            for logged_step, stamp, values in state["unlogged"]:
                tracking.log_metrics(loop_config["mlflow_uri"], loop_config["mlflow_run_id"], values, logged_step,
                                     stamp)
    model = session.wrap(coat, cfg.train.strategy)
    sharded = isinstance(model, FullyShardedDataParallel)
    params = [p for p in coat.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    shard, val_shard = session.dataset("train"), session.dataset("val")
    batches_per_epoch = loop_config["batches_per_epoch"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.train.use_gpu)
    pending: list[tuple[int, int, dict[str, float]]] = []  # rank 0's (step, ms, metrics) since the last checkpoint
    samples_per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    total = cfg.train.total_steps
    last_step_end = time.perf_counter()

    while step < total:
        micro = 0
        for index, batch in enumerate(iter_training_batches(shard, coat, cfg.train.batch_size)):
            if index >= batches_per_epoch or step >= total:
                break
            if index < batch_in_epoch:  # resumed mid-epoch: these batches were trained on before the restart
                continue
            stage = stage_at(cfg, step)
            with autocast:
                out = model(batch, ce_weight=stage.ce_weight, expert_scale=stage.expert_scale)
            (out.loss / cfg.train.grad_accum).backward()
            micro += 1
            if micro < cfg.train.grad_accum:
                continue
            micro = 0
            grad_norm = clip_gradients(model, params, cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, batch_in_epoch = step + 1, index + 1

            now = time.perf_counter()
            metrics = {f"train/{name}": value.item() for name, value in out.losses.items()}
            metrics |= {
                "train/loss": out.loss.item(), "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": grad_norm.item(), "train/epoch": epoch,
                "train/samples_per_s": samples_per_step / (now - last_step_end),
                "train/since_launch_s": time.time() - loop_config["launched_at"],
            }
            last_step_end = now
            pending.append((step, int(time.time() * 1000), metrics))

            if step % cfg.train.checkpoint_every == 0 or step == total:
                metrics |= validation_losses(model, coat, val_shard, cfg, device)
                report = {"step": step, "epoch": epoch, "cost/prefill_positions": cfg.thinking.prefill_positions,
                          **metrics}
                trained = whole_trained_parts(model, coat)  # every rank, under FSDP
                if rank == 0 or sharded:
                    with session.checkpoint_dir(step) as directory:
                        if sharded:
                            save_optimizer_shard(directory, rank, optimizer)
                        if rank == 0:
                            save_checkpoint(directory, coat, trained, None if sharded else optimizer.state_dict(),
                                            scheduler, step, epoch, batch_in_epoch, report, unlogged=pending)
                        session.report(report, directory)
                else:
                    session.report(report, None)
                if rank == 0:
                    if loop_config.get("mlflow_run_id"):
                        for logged_step, stamp, values in pending:
                            tracking.log_metrics(loop_config["mlflow_uri"], loop_config["mlflow_run_id"], values,
                                                 logged_step, stamp)
                    pending.clear()
                last_step_end = time.perf_counter()  # validation and checkpointing are not training time
        epoch, batch_in_epoch = epoch + 1, 0
