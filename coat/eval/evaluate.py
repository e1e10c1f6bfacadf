"""Run a model over a suite's rows: answers scored by the suite's rule, and latency measured apart.

Two measurements, kept apart because they answer different questions:
- **Quality**: every row answered in batches of `eval.batch_size` — greedy text scored by the suite's published
  rule (`scoring="generate"`), or the choice the model finds most likely (`scoring="loglik"`, for small or
  untrained models whose free text cannot be parsed; transcription is always generated).
- **Latency**: `eval.latency_examples` rows one at a time, after `eval.latency_warmup` untimed calls. A forward
  hook on the backbone's LLM stamps every call (synchronised on CUDA), so the first stamp is the end of the one
  prefill (audio encoder + prompt + thinking block: the time to first token) and each later stamp is one decode
  step. CoAT adds K prefill positions and no decode step; text chain-of-thought pays a decode step per token.

Systems: `coat` (the trained model), `base` (the checkpoint's backbone, no thinking block, no fine-tune) and
`cot` (the same base backbone asked to reason in text before answering; the answer is read after the last
`Answer:` mark). Every evaluation keeps one row per example, for paired comparisons between systems.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from rich.progress import track

from coat.config import EvalConfig, SuiteRecipe, from_yaml, validate
from coat.data.audio import AudioError, decode
from coat.data.manifest import (
    REQUIRED,
    model_prompt,
    quarantine_records,
    reason_code,
    stratified_subsample,
    validate_rows,
)
from coat.eval.scoring import results_table, score_examples, table_metrics
from coat.eval.tasks import final_answer, has_answer_mark, split_answer
from coat.model.coat_model import CONFIG_FILE, CoATModel, not_a_checkpoint

COT_SUFFIX = " Think step by step about what you hear, then give the final answer after 'Answer:'."
SYSTEMS = ("coat", "base", "cot")
NO_QUESTION = "Which option fits the audio?"  # asked of a benchmark item published without a question
CONTENT_FREE = "N/A"  # the question calibrated log-likelihood scoring asks of silence
ROTATION = "@rotation"  # circular evaluation: `<id>@rotation<r>` asks row <id> with its choices rotated by r
TRANSCRIPTION = "transcription"


@dataclass
class EvalReport:
    system: str
    suite: str
    examples: pd.DataFrame  # one scored row per evaluated example
    table: pd.DataFrame  # task, metric, value, ci_low, ci_high, n, chance, scoring
    latency: dict[str, float]  # batch-size-1 measurement (see the module docstring); empty when not measured
    setting: dict[str, object]  # how the numbers were made: device, dtype, batch size, scoring, budget, subsample
    quarantine: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["id", "path", "reason"]))
    source: str | None = None  # the mixture entry (or imported corpus) the rows came from; None: one source

    def metrics(self) -> dict[str, float]:
        """Flat names for MLflow: the table's (`eval/<task>/<metric>[_ci_low|_ci_high]`, `eval/<task>/n`,
        `eval/<task>/chance`), `latency/<name>` (batch size 1), `eval/quarantined` and `eval/out_of_budget` (the
        share of generated answers that ran out of tokens before ending, or before their `Answer:` mark; absent
        when nothing was generated). Raises nothing."""
        out = table_metrics(self.table)
        out |= {f"latency/{name}": value for name, value in self.latency.items()}
        out["eval/quarantined"] = float(len(self.quarantine))
        out |= {f"eval/quarantined/{code}": float(n)
                for code, n in self.quarantine["reason"].map(reason_code).value_counts().items()}
        out["eval/cut"] = float(self.setting.get("cut", 0))
        if "out_of_budget" in self.examples and self.examples["out_of_budget"].notna().any():
            out["eval/out_of_budget"] = float(self.examples["out_of_budget"].mean())
        return out


def base_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> CoATModel:
    """The `base` and `cot` systems: the checkpoint's backbone with no thinking block, no heads and zero LoRA (its
    initial state, identical to the backbone), the trained parts never loaded.

    Raises FileNotFoundError when `checkpoint` holds no saved config, ConfigError when that config is invalid.
    """
    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(not_a_checkpoint(checkpoint, CONFIG_FILE))
    trained = from_yaml(path.read_text())
    cfg = replace(trained, thinking=replace(trained.thinking, num_slots=0),
                  experts=replace(trained.experts, names=[]), loss=replace(trained.loss, weights={}, distance={}))
    validate(cfg)
    return CoATModel(cfg, experts={}, device=device)


def token_budget(recipe: SuiteRecipe, rows: pd.DataFrame, tokenizer, override: int | None = None) -> int:
    """`override`, else the recipe's budget, else 1.5 x the longest reference answer in tokens, plus 4 (long
    enough for the longest transcript)."""
    if override is not None:
        return override
    if recipe.max_new_tokens is not None:
        return recipe.max_new_tokens
    longest = max((len(tokenizer(str(a), add_special_tokens=False)["input_ids"]) for a in rows["answer"]), default=1)
    return math.ceil(1.5 * longest) + 4


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
    return [row.index(eos_id) + 1 if eos_id in row else len(row) for row in ids.tolist()]


@torch.no_grad()
def response_logprobs(model: CoATModel, audio: list[np.ndarray], prompts: list[str], responses: list[str],
                      scored: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(response + end of turn | audio, prompt) per row, summed over the last `scored[i]` tokens of row i's
    response (default: all of them), and how many tokens that is: [B] sums, [B] counts."""
    batch = model.encode(audio, prompts, responses)
    labels = batch["labels"][:, 1:].to(model.slot_table.device)
    labelled = labels != -100
    if scored is not None:
        from_end = labelled.flip(1).cumsum(1).flip(1)  # 1 at a response's last token, 2 before it, ...
        labelled &= from_end <= torch.tensor(scored, device=labels.device)[:, None]
    positions = torch.cat([labelled, torch.zeros_like(labelled[:, :1])], dim=1)  # each predicts the next token
    logits, _ = model.next_token_logits(model._model_inputs(batch), positions)
    picked = torch.zeros_like(labels, dtype=torch.float32)
    picked[labelled] = torch.log_softmax(logits.float(), -1).gather(-1, labels[labelled, None])[:, 0]
    return picked.sum(1).cpu(), labelled.sum(1).cpu()


def _autocast(device: torch.device):
    """Evaluation runs as training ran: bf16 autocast on CUDA."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _decode_rows(rows: pd.DataFrame, rate: int, max_seconds: float | None, crop: bool
                 ) -> tuple[list[np.ndarray], list, pd.DataFrame]:
    audio, kept, failed, reasons = [], [], [], []
    for i, path in rows["audio_path"].items():
        try:
            audio.append(decode(path, rate, max_seconds, crop).numpy())
            kept.append(i)
        except AudioError as err:
            failed.append(i)
            reasons.append(err.reason)
    return audio, kept, quarantine_records(rows.loc[failed], reasons)


def prepare_rows(rows: pd.DataFrame, recipe: SuiteRecipe) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The suite's prompt where the recipe sets one, `audio_path`, then `validate_rows`: (good rows, quarantine).

    A suite scored by its published string match (MMAU, MMAR) keeps every item its official script scores: one
    whose answer is not among its choices is asked and scored (it can only match by the answer's words), and one
    without a question is asked `NO_QUESTION`. Raises ValueError naming the manifest columns `rows` lacks."""
    rows = rows.copy()
    if recipe.prompt is not None:
        rows["prompt"] = recipe.prompt
    if "audio_path" not in rows:
        rows["audio_path"] = rows["audio"]
    missing = [c for c in REQUIRED if c not in rows.columns]
    if missing:
        raise ValueError(f"evaluate: rows lack the manifest columns {missing}")
    if recipe.rule != "string_match":
        return validate_rows(rows)
    rows["prompt"] = rows["prompt"].map(lambda p: p if isinstance(p, str) and p.strip() else NO_QUESTION)
    return validate_rows(rows, keep={"answer_not_in_choices"})


def clips_longer_than(rows: pd.DataFrame, seconds: float) -> int:
    """How many of `rows`' audio files last longer than `seconds` (from their headers; unreadable ones are left to
    the decoder to quarantine). Raises nothing."""
    def longer(path: str) -> bool:
        try:
            return sf.info(path).duration > seconds
        except (RuntimeError, TypeError, ValueError, OSError):
            return False

    return sum(longer(path) for path in rows["audio_path"])


def evaluate(model: CoATModel, rows: pd.DataFrame, cfg: EvalConfig, *, suite: str = "coat-mini",
             system: str = "coat", max_new_tokens: int | None = None,
             max_seconds: float | None = None, crop: bool | None = None, progress: bool = True) -> EvalReport:
    """Answer and score every row of `rows` (manifest rows, or a `coat.data.corpora` loader's) with `system`'s
    prompt, then measure latency (see the module docstring).

    The suite's recipe (`cfg.suites[suite]`) gives the prompt, token budget, scoring rule, metrics and breakdowns;
    `max_new_tokens` overrides the budget. `cfg.max_examples` subsamples, stratified by task family (by the first
    breakdown for single-family benchmarks) with `cfg.seed`. `system="cot"` asks `model` (a `base_model`) to
    reason first, with `cfg.cot_tokens` more new tokens. Audio longer than `max_seconds` is cut to it (`crop`) or
    quarantined as `too_long`; rows that fail validation or do not decode land in `report.quarantine` and the
    rest go on.

    `max_seconds` None (benchmarks) is what the backbone hears of a clip (`Backbone.audio_window_s`), with
    `eval.long_clips` in place of `crop`; clips cut to it are counted (`setting["cut"]`, `eval/cut`).

    Raises ValueError naming the columns `rows` lacks, an unknown suite or system.
    """
    if max_seconds is None:
        max_seconds, crop = model.backbone.audio_window_s, cfg.long_clips == "crop"
    if suite not in cfg.suites:
        raise ValueError(f"unknown suite {suite!r}; eval.suites has {', '.join(cfg.suites)}")
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; one of {', '.join(SYSTEMS)}")
    recipe = cfg.suites[suite]
    good, quarantine = prepare_rows(rows, recipe)
    chosen, by = choose_rows(good, recipe, cfg)
    budget = token_budget(recipe, chosen, model.backbone.tokenizer, max_new_tokens)
    budget += cfg.cot_tokens if system == "cot" else 0
    suffix = COT_SUFFIX if system == "cot" else ""
    rate, device = model.backbone.sample_rate, model.slot_table.device
    asked = circular_rows(chosen) if cfg.circular else chosen
    with _evaluating(model):
        records, undecodable = answer_rows(model, asked, cfg, suffix, budget, max_seconds, crop,
                                           progress=f"evaluating {system}" if progress else None)
        latency, alone = measure_latency(model, chosen, cfg, suffix, budget, rate, max_seconds, crop)
        silent = (answer_rows(model, chosen, cfg, suffix, budget, max_seconds, crop, silence=True)[0]
                  if cfg.scoring == "loglik" else [])
    examples, table = score_answers(records, alone, recipe, cfg)
    if silent and len(table):  # the scorer's own chance: the same model and scoring, given silence
        _, heard_nothing = score_answers(silent, alone.iloc[:0], recipe, replace(cfg, circular=False))
        table = table.merge(heard_nothing[["task", "metric", "value"]].rename(columns={"value": "chance_empirical"}),
                            on=["task", "metric"], how="left")
    setting = {
        "suite": suite, "system": system, "scoring": cfg.scoring, "device": _device_name(device),
        "dtype": _dtype_name(model, device), "batch_size": cfg.batch_size, "max_new_tokens": budget,
        "examples": len(examples), "eligible": len(good), "circular": cfg.circular, "heard_s": max_seconds,
        "loglik": cfg.loglik if cfg.scoring == "loglik" else None,
        "cut": clips_longer_than(chosen, max_seconds) if crop else 0,
        "subsample": f"{len(chosen)} of {len(good)}, stratified by {by}, seed {cfg.seed}"
        if len(chosen) < len(good) else "all",
    }
    if cfg.circular:  # an item whose audio does not decode is quarantined once, not once per rotation
        undecodable = undecodable[~undecodable["id"].astype(str).str.contains(ROTATION, regex=False)]
    skipped = [q for q in (quarantine, undecodable) if len(q)]
    return EvalReport(system, suite, examples, table, latency, setting,
                      pd.concat(skipped, ignore_index=True) if skipped else quarantine)


def choose_rows(good: pd.DataFrame, recipe: SuiteRecipe, cfg: EvalConfig) -> tuple[pd.DataFrame, str]:
    """The rows to evaluate (`cfg.max_examples` of `good`, drawn with `cfg.seed`) and the column they are
    stratified by: the task family, or a single-family benchmark's first breakdown, so that each part keeps its
    share."""
    by = f"group.{recipe.breakdowns[0]}" if recipe.breakdowns and good["task"].nunique() == 1 else "task"
    by = by if by in good else "task"  # the setting names the column the draw really used
    return stratified_subsample(good, cfg.max_examples, cfg.seed, by), by


def score_answers(records: list[dict], alone: pd.DataFrame, recipe: SuiteRecipe, cfg: EvalConfig
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The answered rows scored by the suite's rule (each rotation of a circular evaluation by itself, then folded
    into its item: `fold_rotations`), with the batch-size-1 timings of those measured alone, and the results table
    over them (both empty when no row was answered)."""
    examples = pd.DataFrame(records)
    if not len(examples):
        return examples, pd.DataFrame()
    examples = score_examples(examples.merge(alone, on="id", how="left"), recipe.rule).assign(scoring=cfg.scoring)
    if cfg.circular:
        examples = fold_rotations(examples)
    breakdowns = [b for b in recipe.breakdowns if f"group.{b}" in examples]  # manifests may not carry them
    return examples, results_table(examples, metrics=recipe.metrics, breakdowns=breakdowns, scoring=cfg.scoring,
                                   n=cfg.bootstrap, seed=cfg.seed)


def circular_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """CircularEval's questions: every multiple-choice row once per rotation of its choices (rotation r asks
    choices[r:] + choices[:r]; rotation 0 is the row as it is, under its own id, the others as `<id>@rotation<r>`),
    other rows once. Column `circular_id` holds the row's own id. Raises nothing."""
    asked = []
    for _, row in rows.iterrows():
        choices = row["choices"] if isinstance(row["choices"], list) else []
        for r in range(max(1, len(choices))):
            rotated = row.copy()
            rotated["circular_id"] = str(row["id"])
            if r:
                rotated["id"], rotated["choices"] = f"{row['id']}{ROTATION}{r}", [*choices[r:], *choices[:r]]
            asked.append(rotated)
    return pd.DataFrame(asked).reset_index(drop=True)


def fold_rotations(examples: pd.DataFrame) -> pd.DataFrame:
    """Scored rotations (from `circular_rows`) back to one row per item: rotation 0's row (the standard answer, in
    the benchmark's own choice order) with `correct_circular` (right under every rotation) and
    `circular_responses` (each rotation's response or chosen choice, in rotation order). Raises nothing."""
    said = examples["response"].where(examples["response"].notna(), examples["prediction"])
    folded = examples.assign(said=said).groupby("circular_id", sort=False).agg(
        correct_circular=("correct", "all"), circular_responses=("said", list))
    first = examples[examples["id"] == examples["circular_id"]].drop(columns="circular_id")
    return first.merge(folded, left_on="id", right_index=True, how="left").reset_index(drop=True)


@contextmanager
def _evaluating(model: CoATModel) -> Iterator[None]:
    """`model` in eval mode, as training ran it (bf16 autocast on CUDA), and back to its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with _autocast(model.slot_table.device):
            yield
    finally:
        model.train(was_training)


def answer_rows(model: CoATModel, rows: pd.DataFrame, cfg: EvalConfig, suffix: str, budget: int,
                max_seconds: float | None, crop: bool, progress: str | None = None, silence: bool = False
                ) -> tuple[list[dict], pd.DataFrame]:
    """Every row answered in batches of `cfg.batch_size` (`cfg.scoring`: generated, or the likeliest choice by
    `cfg.loglik`), the prompt followed by `suffix`, with `budget` new tokens: one record per answered row, and the
    rows whose audio did not decode (a quarantine table). `silence`: each clip replaced by as long a silence (what
    the scorer makes of the question alone). `progress`: the description of a progress bar; None: no bar."""
    rate, eos = model.backbone.sample_rate, model.backbone.end_of_turn_id
    records, failed = [], []
    starts = range(0, len(rows), cfg.batch_size)
    for start in track(starts, description=progress or "", transient=True, disable=progress is None):
        chunk = rows.iloc[start:start + cfg.batch_size]
        audio, kept, undecodable = _decode_rows(chunk, rate, max_seconds, crop)
        failed.append(undecodable)
        if kept:
            audio = [np.zeros_like(a) for a in audio] if silence else audio
            records += _answer(model, chunk.loc[kept], audio, cfg.scoring, cfg.loglik, suffix, budget, eos)
    undecodable = [q for q in failed if len(q)]
    return records, (pd.concat(undecodable, ignore_index=True) if undecodable
                     else pd.DataFrame(columns=["id", "path", "reason"]))


def _answer(model: CoATModel, chunk: pd.DataFrame, audio: list[np.ndarray], scoring: str, how: str, suffix: str,
            budget: int, eos: int) -> list[dict]:
    """One record per row: the generated `output` (and its final-answer `response`), or with loglik scoring the
    `prediction` ranked among the row's choices after whatever reasoning was generated first."""
    prompts = [model_prompt(p, c) + suffix for p, c in zip(chunk["prompt"], chunk["choices"], strict=True)]
    has_choices = [isinstance(c, list) and len(c) > 0 for c in chunk["choices"]]
    direct = scoring == "loglik" and not suffix
    outputs, lengths, cut = [""] * len(chunk), [0] * len(chunk), [math.nan] * len(chunk)
    if not direct or not all(has_choices):
        started = time.perf_counter()
        ids = model.generate(model.encode(audio, prompts), budget)
        batch_s = (time.perf_counter() - started) / len(chunk)
        outputs, lengths = model.backbone.decode(ids), generated_lengths(ids, eos)
        # Ran out of tokens before ending its turn (a chain of thought: before its `Answer:` mark too).
        cut = [float(eos not in row and not (suffix and has_answer_mark(text)))
               for row, text in zip(ids.tolist(), outputs, strict=True)]
    else:
        batch_s = float("nan")
    ranked = (_rank_choices(model, chunk, audio, prompts, outputs if suffix else None, how, suffix)
              if scoring == "loglik" else {})
    records = []
    for i, (_, row) in enumerate(chunk.iterrows()):
        record = {"id": str(row["id"]), "task": row["task"], "answer": row["answer"],
                  "choices": row["choices"] if has_choices[i] else None, "output": outputs[i],
                  "response": final_answer(outputs[i]) if suffix else outputs[i], "new_tokens": lengths[i],
                  "out_of_budget": cut[i], "batch_s_per_example": batch_s}
        record |= {k: row[k] for k in row.index if k.startswith("group.") or k in ("item", "circular_id")}
        if i in ranked:  # the likeliest choice is the answer given: scored and written as its text
            record["response"] = ranked[i]
        records.append(record)
    return records


def reasoning_before_answer(output: str) -> str:
    """What a chain of thought said before its answer (all of it when it never reached an `Answer:` mark): the
    lead that log-likelihood scoring ranks each choice after."""
    reasoning, answer = split_answer(output)
    return (reasoning if reasoning else answer).strip()


def _rank_choices(model: CoATModel, chunk: pd.DataFrame, audio: list[np.ndarray], prompts: list[str],
                  reasoning: list[str] | None, how: str, suffix: str) -> dict[int, str]:
    """Per row with choices (by position in `chunk`), the choice the model finds most likely as its answer — after
    its own `reasoning` and an `Answer:` mark when given — by `how` (`eval.loglik`): `sum` of the choice's token
    log-probabilities (its end of turn included), their `per_token` mean (so a longer choice is not penalised for
    its length: "C#" against "C"), or `calibrated`, that mean less the same choice's mean given silence and a
    content-free question (`CONTENT_FREE`: what the model would say of any audio). Every row's candidates are
    scored together, as many sequences per forward pass as the chunk has rows."""
    tokens = functools.cache(lambda text: len(model.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]))
    end = model.backbone.spec.end_of_turn
    candidates = []
    for i, choices in enumerate(chunk["choices"]):
        if isinstance(choices, list) and choices:
            lead = f"{reasoning_before_answer(reasoning[i])} Answer: " if reasoning is not None else ""
            candidates += [(i, choice, lead + choice, tokens(lead + choice + end) - (tokens(lead) if lead else 0))
                           for choice in dict.fromkeys(choices)]

    def scores(heard: list[np.ndarray], asked: list[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(candidates), len(chunk)):
            part = candidates[start:start + len(chunk)]
            total, count = response_logprobs(model, [heard[i] for i, *_ in part], [asked[i] for i, *_ in part],
                                             [text for _, _, text, _ in part], [n for *_, n in part])
            out += (total if how == "sum" else total / count).tolist()
        return out

    ranked = scores(audio, prompts)
    if how == "calibrated":
        silence = [np.zeros_like(a) for a in audio]
        content_free = [model_prompt(CONTENT_FREE, c) + suffix for c in chunk["choices"]]
        ranked = [a - b for a, b in zip(ranked, scores(silence, content_free), strict=True)]
    best: dict[int, tuple[float, str]] = {}
    for (i, choice, _, _), score in zip(candidates, ranked, strict=True):
        if i not in best or score > best[i][0]:
            best[i] = (score, choice)
    return {i: choice for i, (_, choice) in best.items()}


def measure_latency(model: CoATModel, rows: pd.DataFrame, cfg: EvalConfig, suffix: str, budget: int, rate: int,
                    max_seconds: float | None, crop: bool) -> tuple[dict[str, float], pd.DataFrame]:
    """Batch-size-1 latency over the first `cfg.latency_examples` rows that decode, after `cfg.latency_warmup`
    untimed calls on the first: means and 90th percentiles of time to first token and of the whole answer, tokens
    per answer, seconds per decode step (empty when no row decodes or `latency_examples` is 0); and per measured
    example its `ttft_s` and `latency_s`."""
    timings, tokens, ids_measured, warm = [], [], [], False
    eos = model.backbone.end_of_turn_id
    for index in range(len(rows)):
        if len(timings) >= cfg.latency_examples:
            break
        one = rows.iloc[[index]]
        audio, kept, _ = _decode_rows(one, rate, max_seconds, crop)
        if not kept:
            continue
        batch = model.encode(audio, [model_prompt(one["prompt"].iloc[0], one["choices"].iloc[0]) + suffix])
        for _ in range(0 if warm else cfg.latency_warmup):
            model.generate(batch, budget)
        warm = True
        ids, timing = timed_generate(model, batch, budget)
        timings.append(timing)
        tokens.append(generated_lengths(ids, eos)[0])
        ids_measured.append(str(one["id"].iloc[0]))
    alone = pd.DataFrame({"id": ids_measured, "ttft_s": [t.ttft_s for t in timings],
                          "latency_s": [t.total_s for t in timings]})
    if not timings:
        return {}, alone
    ttft = np.array([t.ttft_s for t in timings])
    total = np.array([t.total_s for t in timings])
    steps = np.array([t.llm_calls - 1 for t in timings])
    return {
        "ttft_s": float(ttft.mean()), "ttft_p90_s": float(np.quantile(ttft, 0.9)),
        "total_s": float(total.mean()), "total_p90_s": float(np.quantile(total, 0.9)),
        "new_tokens": float(np.mean(tokens)), "examples": float(len(timings)),
        "s_per_decode_step": float((total - ttft).sum() / steps.sum()) if steps.sum() else float("nan"),
    }, alone


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _dtype_name(model: CoATModel, device: torch.device) -> str:
    weights = str(model.backbone.model.dtype).removeprefix("torch.")
    return f"{weights} weights, bfloat16 autocast" if device.type == "cuda" else weights


