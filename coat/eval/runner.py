"""Run a model over manifest rows: batched greedy generation, parsed answers, scores and latency.

Latency is measured where the paper's claim lives: a forward hook on the backbone's LLM stamps every call,
so the first stamp is the end of the one prefill (audio encoder + prompt + thinking block: the time to first
token) and each later stamp is one decode step. CoAT adds K prefill positions and no decode step; text
chain-of-thought (`COT_SUFFIX`, a larger token budget) pays one decode step per reasoning token.

Baselines run through the same `evaluate`: `base_model` (the backbone, no fine-tune), a checkpoint trained
with K = 0 (nothing special), and `prompt_suffix=COT_SUFFIX`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from coat.config import CoATConfig, EvalConfig, from_yaml, validate
from coat.data.audio import AudioError, decode
from coat.data.manifest import REQUIRED, model_prompt, quarantine_records, validate_rows
from coat.eval.metrics import latency_summary, task_table, word_errors
from coat.eval.tasks import is_correct, normalise_text, parse_answer
from coat.model.coat_model import CONFIG_FILE, CoATModel

COT_SUFFIX = " Think step by step about what you hear, then give the final answer after 'Answer:'."
BOOTSTRAP_SEED = 0


@dataclass
class EvalReport:
    examples: pd.DataFrame  # one row per evaluated example
    table: pd.DataFrame  # task, metric, value, ci_low, ci_high, n, chance
    latency: dict[str, float]
    quarantine: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["id", "path", "reason"]))

    def metrics(self) -> dict[str, float]:
        """Flat names for MLflow: `eval/<task>/<metric>[_ci_low|_ci_high]`, `eval/<task>/n`,
        `eval/<task>/chance`, `eval/latency/<name>`, `eval/quarantined`. Raises nothing."""
        out: dict[str, float] = {}
        for row in self.table.itertuples(index=False):
            key = f"eval/{row.task}/{row.metric}"
            out |= {key: row.value, f"{key}_ci_low": row.ci_low, f"{key}_ci_high": row.ci_high,
                    f"eval/{row.task}/n": float(row.n)}
            if pd.notna(row.chance):
                out[f"eval/{row.task}/chance"] = row.chance
        out |= {f"eval/latency/{name}": value for name, value in self.latency.items()}
        out["eval/quarantined"] = float(len(self.quarantine))
        return out


def base_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> CoATModel:
    """The `base` baseline: the checkpoint's backbone with no thinking block, no heads and zero LoRA (its
    initial state, identical to the backbone), the trained parts never loaded.

    Raises FileNotFoundError when `checkpoint` holds no saved config, ConfigError when that config is invalid.
    """
    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a CoAT checkpoint (no {CONFIG_FILE})")
    cfg: CoATConfig = from_yaml(path.read_text())
    cfg.thinking.num_slots = 0
    cfg.experts.names, cfg.loss.weights, cfg.loss.distance = [], {}, {}
    validate(cfg)
    return CoATModel(cfg, experts={}, device=device)


@dataclass
class Timing:
    ttft_s: float
    total_s: float
    llm_calls: int


def timed_generate(model: CoATModel, batch: dict, max_new_tokens: int) -> tuple[torch.Tensor, Timing]:
    """`model.generate` with a perf_counter stamp after every LLM forward call (synchronised on CUDA).

    Raises RuntimeError if the LLM was never called (the backbone's generate bypassed `backbone.llm`)."""
    device = model.slot_table.device

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    stamps: list[float] = []
    handle = model.backbone.llm.register_forward_hook(lambda *_: stamps.append(now()))
    try:
        start = now()
        ids = model.generate(batch, max_new_tokens)
        end = now()
    finally:
        handle.remove()
    if not stamps:
        raise RuntimeError(f"{model.backbone.name}: generate never called backbone.llm; cannot time the prefill")
    return ids, Timing(stamps[0] - start, end - start, len(stamps))


def generated_lengths(ids: torch.Tensor, eos_id: int) -> list[int]:
    """Tokens each row generated, its end-of-turn token included (later positions are padding). Raises nothing."""
    lengths = []
    for row in ids.tolist():
        lengths.append(row.index(eos_id) + 1 if eos_id in row else len(row))
    return lengths


def evaluate(model: CoATModel, rows: pd.DataFrame, cfg: EvalConfig, *, prompt_suffix: str = "",
             max_new_tokens: int | None = None, max_seconds: float | None = None, seed: int = BOOTSTRAP_SEED,
             progress: bool = True) -> EvalReport:
    """Answer every row greedily in batches of `cfg.batch_size` and score the answers.

    `rows` are manifest rows (`read_manifest` or a `coat.eval.benchmarks` loader); the first
    `cfg.max_examples` are used. Each row is asked `model_prompt(prompt, choices) + prompt_suffix`, the
    instruction the model was trained on. Rows that fail `validate_rows` or whose audio does not decode
    (or is longer than `max_seconds`) land in `report.quarantine` and the rest go on; audio longer than the
    backbone's window is cut to it by the processor, as the backbones do. Token budget: `max_new_tokens`,
    default `cfg.max_new_tokens`. One untimed 1-token call on the first batch keeps one-off start-up costs
    out of its latency.

    Raises ValueError naming the columns `rows` lacks.
    """
    missing = [c for c in REQUIRED if c not in rows.columns]
    if missing:
        raise ValueError(f"evaluate: rows lack the manifest columns {missing}")
    rows = rows if cfg.max_examples is None else rows.head(cfg.max_examples)
    rows = rows.assign(audio_path=rows["audio_path"] if "audio_path" in rows else rows["audio"])
    good, quarantine = validate_rows(rows)
    budget = max_new_tokens or cfg.max_new_tokens
    rate, eos = model.backbone.sample_rate, model.backbone.end_of_turn_id
    starts = range(0, len(good), cfg.batch_size)
    records, skipped, warm = [], [quarantine], False
    was_training = model.training
    model.eval()
    try:
        for number, start in enumerate(track(starts, description="evaluating", transient=True, disable=not progress)):
            chunk = good.iloc[start:start + cfg.batch_size]
            audio, kept, failed, reasons = [], [], [], []
            for i, row in chunk.iterrows():
                try:
                    audio.append(decode(row["audio_path"], rate, max_seconds).numpy())
                    kept.append(i)
                except AudioError as err:
                    failed.append(i)
                    reasons.append(err.reason)
            skipped.append(quarantine_records(chunk.loc[failed], reasons))
            if not kept:
                continue
            chunk = chunk.loc[kept]
            prompts = [model_prompt(p, c) + prompt_suffix
                       for p, c in zip(chunk["prompt"], chunk["choices"], strict=True)]
            batch = model.encode(audio, prompts)
            if not warm:
                model.generate(batch, 1)
                warm = True
            ids, timing = timed_generate(model, batch, budget)
            texts = model.backbone.decode(ids)
            for (_, row), text, length in zip(chunk.iterrows(), texts, generated_lengths(ids, eos), strict=True):
                choices = row["choices"] if isinstance(row["choices"], list) and row["choices"] else None
                prediction = parse_answer(row["task"], text, choices)
                records.append({
                    "id": row["id"], "task": row["task"], "category": row.get("category"),
                    "prediction": prediction, "answer": row["answer"], "choices": choices,
                    "correct": is_correct(row["task"], prediction, row["answer"], choices), "text": text,
                    "new_tokens": length, "batch": number, "ttft_s": timing.ttft_s, "total_s": timing.total_s,
                    "llm_calls": timing.llm_calls,
                })
    finally:
        model.train(was_training)
    examples = pd.DataFrame(records, columns=[
        "id", "task", "category", "prediction", "answer", "choices", "correct", "text", "new_tokens", "batch",
        "ttft_s", "total_s", "llm_calls"])
    if examples["category"].isna().all():
        examples = examples.drop(columns="category")
    examples.insert(examples.columns.get_loc("correct") + 1, "wer", _per_example_wer(examples))
    parts = [q for q in skipped if len(q)]
    return EvalReport(
        examples=examples,
        table=task_table(examples, n=cfg.bootstrap, seed=seed),
        latency=latency_summary(examples),
        quarantine=pd.concat(parts, ignore_index=True) if parts else quarantine,
    )


def _per_example_wer(examples: pd.DataFrame) -> pd.Series:
    wer = pd.Series(float("nan"), index=examples.index)
    speech = examples["task"] == "transcription"
    if speech.any():
        refs = [normalise_text(a) for a in examples.loc[speech, "answer"]]
        errors, words = word_errors(refs, list(examples.loc[speech, "prediction"]))
        wer[speech] = [e / w if w else float("nan") for e, w in zip(errors, words, strict=True)]
    return wer


def print_report(report: EvalReport, title: str = "evaluation", console: Console | None = None) -> None:
    """Print the per-task table, the latency summary and the quarantine count. Raises nothing."""
    console = console or Console()
    table = Table(title=title)
    for col in ("task", "metric", "value", "95% CI", "n", "chance"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for row in report.table.itertuples(index=False):
        chance = "" if pd.isna(row.chance) else f"{row.chance:.3f}"
        table.add_row(row.task, row.metric, f"{row.value:.3f}", f"[{row.ci_low:.3f}, {row.ci_high:.3f}]",
                      str(row.n), chance)
    console.print(table)
    latency = Table(title="latency", show_header=False)
    names = {"ttft_s": "time to first token (s)", "ttft_p90_s": "  p90", "total_s": "generation (s)",
             "total_p90_s": "  p90", "new_tokens": "new tokens per example", "llm_calls": "LLM calls per batch",
             "s_per_decode_step": "s per decode step", "s_per_example": "s per example (batched)"}
    for key, label in names.items():
        if key in report.latency:
            latency.add_row(label, f"{report.latency[key]:.4g}")
    console.print(latency)
    if len(report.quarantine):
        first = report.quarantine.iloc[0]
        console.print(f"{len(report.quarantine)} rows quarantined (not evaluated), first: {first['id']}: "
                      f"{first['reason']}")
