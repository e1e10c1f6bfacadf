"""Data path throughput: the Ray Data training stream vs a plain DataLoader, and expert precompute.

    python experiments/benchmarks/data_throughput.py                  # 32 clips; mel, prosody, vad
    python experiments/benchmarks/data_throughput.py --size 64 --experts mel,prosody,pitch --workers 2

All in one run on the same cores: coat-mini at `--rate` (22.05 kHz, so every path resamples to 16 kHz) is
precomputed expert by expert into a fresh store (clips/s per expert, actor start-up included; beside it the
same expert called in-process without Ray), then again over the finished store (goal: under 5% of the first
run's time; it re-hashes every part), and the store's check timed with hashes and with sizes only (what a
training start runs). Then the train split
streams `--epochs` times through `Stream.dataset` + `iter_training_batches` and through a
`torch.utils.data.DataLoader` whose workers run the same `load_batch` (decode, resample, target read,
standardise) and whose main loop runs the same `collate` (the tiny model's `encode`, target padding). Prints one
JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from coat.config import load_config
from coat.data.audio import decode
from coat.data.manifest import read_manifest
from coat.data.precompute import precompute
from coat.data.store import FeatureStore
from coat.data.stream import Stream, collate, iter_training_batches, load_batch, training_items
from coat.data.synth import synthesize
from coat.experts.registry import build_expert
from coat.model import CoATModel
from coat.ray_runtime import ensure_ray


class StoreRows(Dataset):
    """Map-style dataset over `training_items` rows, loading each with the stream's own `load_batch`."""

    def __init__(self, items: list[dict], sources: dict, sample_rate: int):
        self.items, self.sources, self.sample_rate = items, sources, sample_rate

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        loaded = load_batch({k: [v] for k, v in self.items[i].items()}, self.sources, self.sample_rate)
        return {k: v[0] for k, v in loaded.items()}


def timed_epochs(batches, epochs: int, model) -> list[float]:
    """Seconds per epoch of `batches()` (a fresh iterable of row batches per epoch), collated by `model`."""
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for rows in batches():
            collate(rows, model)
        seconds.append(time.perf_counter() - start)
    return seconds


def expert_alone(manifest: Path, name: str, batch_size: int) -> float:
    """Clips/s of the expert called in this process on the same clips (decode included, no Ray): what
    precompute would reach without actor start-up and scheduling."""
    expert = build_expert(name)
    paths = list(dict.fromkeys(read_manifest(manifest)["audio_path"]))
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        rate = expert.sample_rate
        expert([decode(p, rate) for p in paths[i:i + batch_size]], sample_rate=rate)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="coat-mini clips")
    parser.add_argument("--experts", default="mel,prosody,vad", help="comma-separated")
    parser.add_argument("--rate", type=int, default=22050, help="sample rate of the synthesized clips")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/coat-bench-data"))
    args = parser.parse_args()
    experts = [e.strip() for e in args.experts.split(",") if e.strip()]
    console = Console()

    manifest = args.out / "data" / "manifest.jsonl"
    if not manifest.is_file():
        synthesize(args.out / "data", size=args.size, seed=0, sample_rate=args.rate)
    store = args.out / "store"
    shutil.rmtree(store, ignore_errors=True)
    ensure_ray()  # started before any timing

    first, per_expert, alone = 0.0, {}, {}
    for name in experts:
        start = time.perf_counter()
        (run,) = precompute(manifest, [name], store, batch_size=args.batch_size).experts
        first += time.perf_counter() - start
        per_expert[name] = run.computed / run.seconds
        alone[name] = expert_alone(manifest, name, args.batch_size)
    start = time.perf_counter()
    again = precompute(manifest, experts, store, batch_size=args.batch_size, progress=False)
    second = time.perf_counter() - start
    assert all(run.computed == 0 for run in again.experts), "the second precompute computed clips"
    verify_s = {}
    for hashes in (True, False):  # `coat data check` and `coat experts precompute`; then what a training start pays
        start = time.perf_counter()
        for name, version in FeatureStore(store).versions():
            FeatureStore(store).verify(name, version, hashes=hashes)
        verify_s[hashes] = time.perf_counter() - start

    cfg = load_config(overrides=[f"experts.names=[{','.join(experts)}]", "thinking.num_slots=4",
                                 "thinking.max_slots=8", "backbone.audio_window_s=8"])
    model = CoATModel(cfg)
    rate = model.backbone.sample_rate
    start = time.perf_counter()
    items, sources, _ = training_items(manifest, "train", experts, store)
    dataset = Stream(items, sources, rate).dataset()
    ray_setup = time.perf_counter() - start
    clips = dataset.count()
    ray_s = timed_epochs(lambda: dataset.iter_batches(batch_size=args.batch_size, batch_format="numpy"),
                         args.epochs, model)
    next(iter_training_batches(dataset, model, args.batch_size))  # the helper training uses runs too

    loader = DataLoader(StoreRows(items, sources, rate), batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=list, persistent_workers=args.workers > 0)
    torch_s = timed_epochs(lambda: loader, args.epochs, model)

    steady = slice(1, None) if args.epochs > 1 else slice(None)
    result = {
        "cores": os.cpu_count(), "clips": args.size, "train_clips": clips, "batch_size": args.batch_size,
        "epochs": args.epochs, "dataloader_workers": args.workers,
        "stream_ray_clips_per_s": clips * len(ray_s[steady]) / sum(ray_s[steady]),
        "stream_ray_first_epoch_clips_per_s": clips / ray_s[0], "stream_ray_setup_s": ray_setup,
        "stream_torch_clips_per_s": clips * len(torch_s[steady]) / sum(torch_s[steady]),
        "stream_torch_first_epoch_clips_per_s": clips / torch_s[0],
        "precompute_clips_per_s": per_expert, "expert_alone_clips_per_s": alone,
        "precompute_first_s": first, "precompute_second_s": second,
        "second_over_first": second / first, "verify_hashes_s": verify_s[True], "verify_sizes_s": verify_s[False],
        "verify_sizes_over_hashes": verify_s[False] / verify_s[True],
    }
    print(json.dumps(result))

    table = Table(title=f"data throughput ({args.size} clips at {args.rate} Hz, {os.cpu_count()} cores)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    paths = {"Ray Data stream": "stream_ray", f"DataLoader ({args.workers} workers)": "stream_torch"}
    for label, key in paths.items():
        steady_rate, first_rate = result[f"{key}_clips_per_s"], result[f"{key}_first_epoch_clips_per_s"]
        table.add_row(f"{label}, clips/s (steady | first epoch)", f"{steady_rate:.1f} | {first_rate:.1f}")
    for name, rate in per_expert.items():
        table.add_row(f"precompute {name}, clips/s (expert alone)", f"{rate:.2f} ({alone[name]:.2f})")
    table.add_row("precompute, first run (s)", f"{first:.1f}")
    table.add_row("precompute, second run over the finished store (s)", f"{second:.2f}")
    table.add_row("second / first (goal < 5%)", f"{100 * result['second_over_first']:.2f}%")
    table.add_row("store check: hashes | sizes only, a training start's (ms)",
                  f"{1000 * verify_s[True]:.1f} | {1000 * verify_s[False]:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
