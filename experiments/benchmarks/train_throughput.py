"""Ray's training overhead: `coat train` (Ray Train, one worker) against a plain single-process PyTorch loop.

    python experiments/benchmarks/train_throughput.py                 # tiny qwen2-audio, CPU, 40 steps
    python experiments/benchmarks/train_throughput.py --steps 60 --batch-size 8

Both run the same model, the same rows from the same feature store and the same number of optimizer steps,
side by side in one run. Reported: steady-state samples/s of each (median over steps after the first few) and
their ratio (goal >= 0.9), end-to-end samples/s, and the time from calling `coat train` to its first optimizer
step. Prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from coat import tracking
from coat.config import load_config
from coat.data.stream import collate, load_batch, training_items
from coat.experts.registry import expert_spec
from coat.model import CoATModel
from coat.train.launch import prepare_data, train


def plain_loop(cfg, manifest: Path, store: Path, steps: int) -> tuple[list[float], float]:
    """The same model, rows and optimizer in one process: per-step samples/s and total seconds."""
    items, sources = training_items(manifest, cfg.data.train_split, cfg.experts.names, store)
    model = CoATModel(cfg, {e: expert_spec(e) for e in cfg.experts.names}).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    size = cfg.train.batch_size
    rates, start = [], time.perf_counter()
    for step in range(steps):
        begin = time.perf_counter()
        rows = [items[(step * size + i) % len(items)] for i in range(size)]
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        batch = collate(load_batch(columns, sources, model.backbone.sample_rate), model)
        loss = model(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(size / (time.perf_counter() - begin))
    return rates, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clips", type=int, default=120)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the steady-state median")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="coat-train-bench-"))
    cfg = load_config(overrides=[
        f"data.manifest={workdir / 'coat-mini' / 'manifest.jsonl'}", f"data.store={workdir / 'store'}",
        f"data.synth_size={args.clips}", f"train.storage={workdir / 'runs'}",
        f"tracking.uri=sqlite:///{workdir / 'mlruns.db'}", "experts.names=[mel,prosody]", "thinking.num_slots=8",
        "train.num_workers=1", "train.cpus_per_worker=1", f"train.batch_size={args.batch_size}",
        f"train.stages=[{{steps: {args.steps}}}]", f"train.checkpoint_every={args.steps}",
    ])
    manifest, store = prepare_data(cfg)

    plain_rates, plain_total = plain_loop(cfg, manifest, store, args.steps)
    start = time.perf_counter()
    result = train(cfg, evaluate_after=False)
    ray_total = time.perf_counter() - start
    uri = tracking.resolve_uri(cfg.tracking.uri)
    ray_rates = [v for _, v in tracking.metric_history(uri, result.mlflow_run_id, "train/samples_per_s")]
    first_step = tracking.metric_history(uri, result.mlflow_run_id, "train/since_launch_s")[0][1]

    samples = args.steps * args.batch_size
    out = {
        "steps": args.steps, "batch_size": args.batch_size,
        "plain_samples_per_s": statistics.median(plain_rates[args.skip:]),
        "ray_samples_per_s": statistics.median(ray_rates[args.skip:]),
        "plain_end_to_end_samples_per_s": samples / plain_total,
        "ray_end_to_end_samples_per_s": samples / ray_total,
        "ray_time_to_first_step_s": first_step,
    }
    out["steady_ratio"] = out["ray_samples_per_s"] / out["plain_samples_per_s"]
    out["end_to_end_ratio"] = out["ray_end_to_end_samples_per_s"] / out["plain_end_to_end_samples_per_s"]
    print(json.dumps(out))
    table = Table(title=f"coat train (Ray Train, 1 worker) vs a plain loop: {args.steps} steps x {args.batch_size}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in out.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console().print(table)


if __name__ == "__main__":
    main()
