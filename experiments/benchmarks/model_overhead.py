"""What the thinking block costs: prefill latency, training step and decode steps, K slots vs K = 0.

    python experiments/benchmarks/model_overhead.py --size tiny                       # CPU, tiny backbones
    python experiments/benchmarks/model_overhead.py --size real --backbones qwen2-audio --device cuda

`--size real` builds the 7B architecture with random bf16 weights on the GPU (no download). Inputs are
synthetic token ids with the backbone's audio placeholder expanded for a clip of `--seconds`, a prompt of
`--prompt-tokens` and the thinking block, so real-size models need no tokenizer. Prints one JSON line per
backbone and a table. Goals (real Qwen2-Audio-7B, H100, 10 s): prefill x1.07 and train step x1.10 at K = 32,
zero extra decode steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from coat.backbones import BACKBONES
from coat.config import load_config
from coat.experts.registry import available_experts, expert_spec
from coat.model import CoATModel
from coat.model.synthetic import synthetic_batch

SLOT_COUNTS = (0, 16, 32, 64)


def timed(fn, device: str, repeats: int, warmup: int = 3) -> float:
    """Median seconds of `fn` over `repeats` runs after `warmup`."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_batch(model: CoATModel, batch: dict, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of a prefill (no grad, KV cache on) and of a full training step on `batch`."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", *model.backbone.spec.audio_keys)}
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def prefill():
        with torch.no_grad(), autocast:
            model.lm(**inputs, use_cache=True)

    def train_step():
        with autocast:
            loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(prefill, device, repeats), timed(train_step, device, repeats)


def count_llm_calls(model: CoATModel, batch: dict, new_tokens: int) -> int:
    """Forward calls of the decoder stack while greedily generating exactly `new_tokens` tokens."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", *model.backbone.spec.audio_keys)}
    calls = []
    handle = model.backbone.llm.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model.lm.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)
    handle.remove()
    return len(calls)


def measure(name: str, args) -> dict:
    dtype = "bfloat16" if args.size == "real" else "float32"
    result: dict = {"backbone": name, "size": args.size, "device": args.device, "seconds": args.seconds}
    cfg = load_config(overrides=[
        f"backbone.name={name}", f"backbone.size={args.size}", f"backbone.dtype={dtype}",
        f"thinking.max_slots={max(SLOT_COUNTS)}", f"experts.names=[{','.join(available_experts())}]",
    ])
    model = CoATModel(cfg, {e: expert_spec(e) for e in cfg.experts.names}, device=args.device)
    for k in SLOT_COUNTS:
        # One set of weights for every K; with K = 0 the heads are skipped, leaving the plain LoRA step.
        model.cfg.thinking.num_slots = k
        for batch_size in (1, 8):
            batch = synthetic_batch(model, batch_size, args.seconds, args.prompt_tokens, k, 16, args.device)
            prefill_s, train_s = time_batch(model, batch, args.device, args.repeats)
            result[f"prefill_s_k{k}_b{batch_size}"], result[f"train_s_k{k}_b{batch_size}"] = prefill_s, train_s
        result[f"llm_calls_k{k}"] = count_llm_calls(model, batch, new_tokens=8)
    if args.device.startswith("cuda"):
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    for k in SLOT_COUNTS[1:]:
        for b in (1, 8):
            result[f"prefill_ratio_k{k}_b{b}"] = result[f"prefill_s_k{k}_b{b}"] / result[f"prefill_s_k0_b{b}"]
            result[f"train_ratio_k{k}_b{b}"] = result[f"train_s_k{k}_b{b}"] / result[f"train_s_k0_b{b}"]
        result[f"extra_decode_steps_k{k}"] = result[f"llm_calls_k{k}"] - result["llm_calls_k0"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=None, help="clip length (default 10 real, 4 tiny)")
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    args.seconds = args.seconds or (10.0 if args.size == "real" else 4.0)
    table = Table(title=f"thinking-block overhead ({args.size}, {args.device}, {args.seconds:g} s clips)")
    for column in ("backbone", "K", "prefill x (B=1)", "prefill x (B=8)", "train x (B=1)", "train x (B=8)",
                   "extra decode steps"):
        table.add_column(column, justify="right")
    for name in args.backbones:
        result = measure(name, args)
        print(json.dumps(result))
        for k in SLOT_COUNTS[1:]:
            table.add_row(name, str(k), *(f"{result[f'{m}_ratio_k{k}_b{b}']:.3f}" for m in ("prefill", "train")
                                          for b in (1, 8)), str(result[f"extra_decode_steps_k{k}"]))
    Console().print(table)


if __name__ == "__main__":
    main()
