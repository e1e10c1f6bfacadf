"""Real width on a CPU: what the real widths cost per sample, measured on `backbone.size=real-width`.

    python experiments/benchmarks/real_width.py                       # every backbone, batches of 1 and 2
    python experiments/benchmarks/real_width.py --backbones qwen2-audio --seconds 8 --window-s 8

Tiny widths hide what a ~150 k vocabulary, 3584/4096-wide decoders and 1280-wide audio encoders cost. Per backbone,
in a process of its own (so its peak RSS is its own, and one such model is in memory at a time), this builds the
real-width model (the real config's widths, two layers per tower, random bf16 weights: the dtype the real runs train
in, and half float32's memory) and runs one CoAT training step (forward, backward, AdamW) on the project's own path
(`CoATModel.encode` on synthetic tones, the five default experts' targets) at each batch size, after one warm-up
step. It prints one JSON line per backbone, then a table:

- parameters in all and trained (LoRA, slot table, heads); peak RSS of the build and of each step;
- per sample, the vocabulary logits as the forward materialises them and their gradient, measured from the step's
  tensors (CoAT projects only the positions that predict a response token), against what projecting every
  position would take (sequence length x vocabulary x element size, the backbones' own forward), here and for the
  same prompt with the checkpoints' 30 s audio window;
- seconds per step.

Each child waits until the machine has `--min-free-gb` available before it builds (shared machines).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import psutil
import torch
from rich.console import Console
from rich.table import Table

from coat.backbones import BACKBONES
from coat.backbones.base import IGNORE_INDEX
from coat.config import load_config
from coat.experts.registry import expert_spec
from coat.model import CoATModel

PROMPT = "Which tone is higher, the first or the second?"
RESPONSE = "The second tone is higher."
GB = 1e9
REAL_WINDOW_TOKENS = 750  # audio tokens of the checkpoints' 30 s window (25 per second)


class PeakRSS:
    """The highest resident set size seen while the block runs, sampled every few milliseconds: `ru_maxrss` is
    the process's peak since it started, so it cannot tell a step's peak from the build's."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak, self._done = interval_s, 0, threading.Event()
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._done.wait(self.interval_s)

    @contextmanager
    def watch(self):
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._done.set()
            thread.join()
            self.peak = max(self.peak, self._process.memory_info().rss)


def tones(batch_size: int, seconds: float, rate: int) -> list[np.ndarray]:
    """`batch_size` clips of `seconds`, one rising tone each, so every row's audio is as long as the others'."""
    t = np.arange(int(seconds * rate)) / rate
    return [(0.3 * np.sin(2 * np.pi * (220 + 55 * i) * t)).astype(np.float32) for i in range(batch_size)]


def expert_targets(model: CoATModel, batch_size: int, seconds: float) -> dict[str, torch.Tensor]:
    """Targets of each expert's kind and shape: class ids for discrete experts, probabilities for multi-label ones,
    noise for continuous ones; frame-level experts cover the whole clip."""
    g = torch.Generator().manual_seed(0)
    batch = {}
    for name, spec in model.experts.items():
        shape = (batch_size,) if spec.clip_level else (batch_size, int(seconds * spec.frame_rate))
        if spec.kind == "discrete":
            value = torch.randint(0, spec.dim, shape, generator=g)
        elif spec.kind == "multilabel":
            value = torch.rand(*shape, spec.dim, generator=g)
        else:
            value = torch.randn(*shape, spec.dim, generator=g)
        batch[f"target.{name}"] = value
        if not spec.clip_level:
            batch[f"target_len.{name}"] = torch.full((batch_size,), shape[1])
    return batch


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def training_step(model: CoATModel, optimizer: torch.optim.Optimizer, batch: dict) -> dict:
    """One step; its seconds, its peak RSS, and per sample what the vocabulary logits and their gradient take as
    the step materialises them (measured from the tensors: the positions that predict a response token), against
    what projecting every position would take (the backbone's own forward), here and with a 30 s clip."""
    sampler, grads = PeakRSS(), []
    start = time.perf_counter()
    with sampler.watch():
        out = model(batch)
        out.logits.register_hook(lambda grad: grads.append(nbytes(grad)))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    logits = out.logits
    batch_size, seq_len = batch["input_ids"].shape
    vocab = logits.shape[-1]
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) // batch_size
    audio = int((batch["input_ids"][0] == audio_token_id(model)).sum())
    per_position = vocab * logits.element_size()
    return {
        "step_s": seconds, "step_peak_rss_gb": sampler.peak / GB, "loss": out.loss.item(), "seq_len": seq_len,
        "audio_tokens": audio, "response_positions": labelled, "vocab": vocab,
        "logits_dtype": str(logits.dtype).removeprefix("torch."),
        "logits_bytes_per_sample": nbytes(logits) // batch_size,
        "logits_grad_bytes_per_sample": sum(grads) // batch_size,
        "all_positions_logits_bytes_per_sample": seq_len * per_position,
        # The same prompt with the checkpoints' 30 s audio window (750 audio tokens), every position projected.
        "all_positions_logits_bytes_per_sample_30s": (seq_len - audio + REAL_WINDOW_TOKENS) * per_position,
    }


def audio_token_id(model: CoATModel) -> int:
    config = model.backbone.model.config
    return config.audio_token_id if hasattr(config, "audio_token_id") else config.audio_token_index


def build(name: str, args) -> tuple[CoATModel, float, float]:
    """The real-width CoAT model, the seconds and the peak RSS its build took."""
    cfg = load_config(overrides=[
        f"backbone.name={name}", "backbone.size=real-width", "backbone.dtype=bfloat16",
        f"backbone.audio_window_s={args.window_s:g}", f"data.max_seconds={args.window_s:g}",
    ])
    sampler = PeakRSS()
    start = time.perf_counter()
    with sampler.watch():
        model = CoATModel(cfg, {e: expert_spec(e) for e in cfg.experts.names})
    return model.train(), time.perf_counter() - start, sampler.peak / GB


def measure(name: str, args) -> dict:
    torch.manual_seed(0)
    model, build_s, build_peak = build(name, args)
    counts = model.parameter_counts()
    result: dict = {
        "backbone": name, "size": "real-width", "dtype": "bfloat16", "threads": torch.get_num_threads(),
        "seconds": args.seconds, "parameters": sum(p.numel() for p in model.parameters()),
        "trained_parameters": counts["total"], "build_s": build_s, "build_peak_rss_gb": build_peak,
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rate = model.backbone.sample_rate

    def batch_of(size: int) -> dict:
        encoded = model.encode(tones(size, args.seconds, rate), [PROMPT] * size, [RESPONSE] * size)
        return encoded | expert_targets(model, size, args.seconds)

    training_step(model, optimizer, batch_of(1))  # warm-up: first-call kernel selection and allocations
    for size in args.batch_sizes:
        result |= {f"{key}_b{size}": value for key, value in training_step(model, optimizer, batch_of(size)).items()}
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return result


def wait_for_memory(min_free_gb: float, timeout_s: float = 1800) -> None:
    """Block until the machine has `min_free_gb` available (other jobs share it). Raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while (free := psutil.virtual_memory().available / GB) < min_free_gb:
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {min_free_gb:g} GB of free memory ({free:.1f} GB)")
        print(f"{free:.1f} GB available, waiting for {min_free_gb:g} GB", file=sys.stderr, flush=True)
        time.sleep(30)


def run_child(name: str, argv: list[str]) -> dict:
    """`measure` in a process of its own: returns the JSON line it printed. Raises CalledProcessError."""
    done = subprocess.run([sys.executable, __file__, "--one", name, *argv], stdout=subprocess.PIPE, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict], batch_sizes: list[int]) -> Table:
    """Sizes in GB (memory), B (parameters) and MB (per-sample tensors), times in seconds."""
    out = Table(title="real-width CoAT step on a CPU (bf16 weights, 2 layers per tower; RSS in GB, tensors in MB "
                      "per sample)")
    for column in ("backbone", "params", "build RSS", "vocab", "seq", *(f"B={b} s / RSS" for b in batch_sizes),
                   "logits", "grad", "every position", "every position 30 s"):
        out.add_column(column, justify="right")
    b = batch_sizes[0]
    for r in results:
        out.add_row(
            r["backbone"], f"{r['parameters'] / GB:.2f} B", f"{r['build_peak_rss_gb']:.2f}", str(r[f"vocab_b{b}"]),
            str(r[f"seq_len_b{b}"]),
            *(f"{r[f'step_s_b{size}']:.1f} / {r[f'step_peak_rss_gb_b{size}']:.2f}" for size in batch_sizes),
            *(f"{r[f'{key}_b{b}'] / 1e6:.1f}" for key in (
                "logits_bytes_per_sample", "logits_grad_bytes_per_sample", "all_positions_logits_bytes_per_sample",
                "all_positions_logits_bytes_per_sample_30s")),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seconds", type=float, default=2.0, help="clip length")
    parser.add_argument("--window-s", type=float, default=2.0, help="backbone.audio_window_s (whole seconds)")
    parser.add_argument("--min-free-gb", type=float, default=10.0)
    parser.add_argument("--one", choices=list(BACKBONES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)), flush=True)
        return
    argv = ["--batch-sizes", *map(str, args.batch_sizes), "--seconds", str(args.seconds),
            "--window-s", str(args.window_s)]
    results = []
    for name in args.backbones:
        wait_for_memory(args.min_free_gb)
        results.append(run_child(name, argv))
        print(json.dumps(results[-1]), flush=True)
    Console(width=160).print(table(results, args.batch_sizes))


if __name__ == "__main__":
    main()
