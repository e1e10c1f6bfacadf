"""Ray's training overhead: `coat train` (Ray Train, one worker) against a plain single-process PyTorch loop.

    python experiments/benchmarks/train_throughput.py                 # tiny qwen2-audio, CPU, 80 steps
    python experiments/benchmarks/train_throughput.py --steps 120 --batch-size 8
    python experiments/benchmarks/train_throughput.py --workers 0    # `coat train` in-process (train.num_workers=0)

Both train the same model on the same rows of the same feature store for the same number of optimizer steps,
decoding every batch, side by side in one run. The plain loop runs right before and right after `coat train`
(A-B-A), so a machine that slows down during the run, as shared 2-core VMs do, shifts both sides alike. Reported:
steady-state samples/s (median over steps after the first few), end-to-end samples/s, `coat train`'s time from
its call to its first optimizer step, and the ratios. With Ray Train, also the floor: how long a `TorchTrainer`
with one worker and an empty loop takes on the same Ray, and the end-to-end ratio that leaves at best
(`end_to_end_ceiling`: the plain loop's time over that time plus the floor). Prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from rich.console import Console
from rich.table import Table

from coat import tracking
from coat.config import load_config
from coat.data.prepare import prepare_data, training_streams
from coat.data.stream import collate, load_batch
from coat.experts.registry import expert_spec
from coat.model import CoATModel
from coat.train.launch import train


def plain_loop(cfg, manifest: Path, store: Path, steps: int) -> tuple[list[float], float]:
    """The same model, rows and optimizer in one process: per-step samples/s and total seconds."""
    start = time.perf_counter()
    stream = training_streams(cfg, manifest, store)["train"]
    items = stream.items
    model = CoATModel(cfg, {e: expert_spec(e) for e in cfg.experts.names}).train()
    rate = model.backbone.sample_rate
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    size = cfg.train.batch_size
    rates = []
    for step in range(steps):
        begin = time.perf_counter()
        rows = [items[(step * size + i) % len(items)] for i in range(size)]
        batch = load_batch({key: [row[key] for row in rows] for key in rows[0]}, stream.sources, rate,
                           stream.crop_seconds)
        loss = model(collate(batch, model)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(size / (time.perf_counter() - begin))
    return rates, time.perf_counter() - start


def coat_train(cfg) -> tuple[list[float], float, float]:
    """`coat train` as the CLI runs it: per-step samples/s, total seconds and seconds to the first step."""
    start = time.perf_counter()
    result = train(cfg, evaluate_after=False)
    total = time.perf_counter() - start
    uri = tracking.resolve_uri(cfg.tracking.uri)
    rates = [v for _, v in tracking.metric_history(uri, result.mlflow_run_id, "train/samples_per_s")]
    first_step = tracking.metric_history(uri, result.mlflow_run_id, "train/since_launch_s")[0][1]
    return rates, total, first_step


def ray_train_floor(storage: Path) -> float:
    """Seconds a `TorchTrainer` with one worker and an empty loop takes on the same Ray: what any run under Ray Train
    pays around its steps (controller, worker group, teardown), coat or not."""
    start = time.perf_counter()
    TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="floor", storage_path=str(storage))).fit()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 400 clips give ~36 batches an epoch: steady state, not mostly epoch starts.
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the steady-state median")
    parser.add_argument("--workers", type=int, default=1,
                        help="train.num_workers: 1 runs Ray Train with one worker, 0 trains in the driver's process")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="coat-train-bench-"))
    overrides = [
        f"data.manifest={workdir / 'coat-mini' / 'manifest.jsonl'}", f"data.store={workdir / 'store'}",
        f"data.synth_size={args.clips}", "data.decode_tasks=1", f"train.storage={workdir / 'runs'}",
        f"tracking.uri=sqlite:///{workdir / 'mlruns.db'}", "experts.names=[mel,prosody]", "thinking.num_slots=8",
        f"train.num_workers={args.workers}", "train.cpus_per_worker=1", f"train.batch_size={args.batch_size}",
        f"train.stages=[{{steps: {args.steps}}}]", f"train.checkpoint_every={args.steps}",
    ]
    cfg = load_config(overrides=overrides)
    manifest, store = prepare_data(cfg)

    samples = args.steps * args.batch_size
    before, before_total = plain_loop(cfg, manifest, store, args.steps)
    ray_rates, ray_total, first_step = coat_train(cfg)
    after, after_total = plain_loop(cfg, manifest, store, args.steps)
    out: dict[str, object] = {
        "steps": args.steps, "batch_size": args.batch_size, "workers": args.workers,
        "plain_samples_per_s": statistics.median(before[args.skip:] + after[args.skip:]),
        "ray_samples_per_s": statistics.median(ray_rates[args.skip:]),
        "plain_end_to_end_samples_per_s": 2 * samples / (before_total + after_total),
        "ray_end_to_end_samples_per_s": samples / ray_total,
        "ray_time_to_first_step_s": first_step,
    }
    out["steady_ratio"] = out["ray_samples_per_s"] / out["plain_samples_per_s"]
    out["end_to_end_ratio"] = out["ray_end_to_end_samples_per_s"] / out["plain_end_to_end_samples_per_s"]
    if args.workers:
        plain_s = samples / out["plain_end_to_end_samples_per_s"]
        out["ray_train_floor_s"] = ray_train_floor(workdir / "floor")
        out["end_to_end_ceiling"] = plain_s / (plain_s + out["ray_train_floor_s"])  # the best any Ray Train run gets
    print(json.dumps(out))
    how = "Ray Train, 1 worker" if args.workers else "in-process"
    table = Table(title=f"coat train ({how}) vs a plain loop: {args.steps} steps x {args.batch_size}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in out.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console().print(table)


if __name__ == "__main__":
    main()
