"""The one typed config tree: dataclasses, loaded as defaults + YAML + dotted overrides (OmegaConf).

Every sweepable knob is a dotted path (`thinking.num_slots`, `loss.weights.pitch`, `backbone.name`). A bad
config fails here, once, before any model is built, with a `ConfigError` naming the field.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from coat.errors import UsageError
from coat.roles import resolve_roles

BACKBONES = ("qwen2-audio", "qwen2.5-omni", "audio-flamingo-3")
DISTANCES = ("cosine", "mse", "smooth_l1", "ce", "bce")


class ConfigError(UsageError, ValueError):
    """A config value that cannot work; the message names the dotted field and the fix."""


def invalid(key: str, message: str) -> ConfigError:
    return ConfigError(f"config field {key!r}: {message}")


def setting(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, choices: tuple | None = None,
            ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A config field with its help and bounds beside it: `coat config show` and docs/config.md print them, and
    `validate` enforces them (choices, >= ge, > gt, <= le; None values pass). What spans fields is checked by
    the section's `check`."""
    bounds = {k: v for k, v in {"choices": choices, "ge": ge, "gt": gt, "le": le}.items() if v is not None}
    return field(default=default, default_factory=factory, metadata={"help": help, **bounds})


@dataclass
class BackboneConfig:
    name: str = setting("qwen2-audio", "Which backbone adapter (coat/backbones).", choices=BACKBONES)
    size: str = setting("tiny", "tiny: a small random-weight instance of the real class (embedded default, tests); "
                        "real-width: the real widths with 2 layers per tower, random weights (CPU checks of what "
                        "real widths cost); real: the real architecture, from a checkpoint, else random weights "
                        "(benchmarks).",
                        choices=("tiny", "real", "real-width"))
    checkpoint: str | None = setting(None, "Local path or already-cached hub id of the real checkpoint; never "
                                           "downloaded.")
    checkpoints: dict[str, str] = setting(help="Per-backbone checkpoints, used when `checkpoint` is unset: lets a "
                                               "sweep vary backbone.name.", factory=dict)
    seed: int = setting(0, "Seeds the tiny random weights, so trained parts saved without the base reload onto the "
                           "same base.")
    dtype: str = setting("float32", "Weights' dtype.", choices=("float32", "bfloat16", "float16"))
    audio_window_s: float = setting(8.0, "Tiny instances only: the audio window the processor pads to and the "
                                         "encoder accepts (seconds).", gt=0)

    @property
    def resolved_checkpoint(self) -> str | None:
        """The checkpoint this config loads: `checkpoint`, else at real size `checkpoints[name]`, else None."""
        return self.checkpoint or (self.checkpoints.get(self.name) if self.size == "real" else None)

    def check(self) -> None:
        for name in self.checkpoints:
            if name not in BACKBONES:
                raise invalid(f"backbone.checkpoints.{name}", f"{name!r} is not one of {', '.join(BACKBONES)}")
        if self.checkpoint is not None and self.size != "real":
            raise invalid("backbone.size", "a checkpoint holds the real architecture: set backbone.size=real with it")


TARGETS = ("experts", "none", "shuffled")  # what the thinking slots regress (see ThinkingConfig.targets)


@dataclass
class ThinkingConfig:
    num_slots: int = setting(16, "K: thinking positions in the prefill (0: the plain fine-tune); at most max_slots.",
                             ge=0)
    max_slots: int = setting(64, "Slot embeddings allocated, so runs with different K share one architecture.", ge=0)
    placement: str = setting("after_prompt", "after_prompt: between the instruction and the response; "
                                             "after_audio: right after the audio.",
                             choices=("after_prompt", "after_audio"))
    targets: str = setting("experts", "What the slots regress: experts (CoAT); none (no heads, no expert loss: the "
                                      "same K positions as pause tokens); shuffled (the experts' targets of another "
                                      "clip of the training split, drawn per epoch from train.seed: supervision "
                                      "with the right statistics and no information). none and shuffled are the "
                                      "controls that separate the positions from the supervision.",
                           choices=TARGETS)

    @property
    def prefill_positions(self) -> int:
        """Extra prompt positions the block costs: K slots and its two delimiters (none at K = 0)."""
        return self.num_slots + 2 if self.num_slots else 0

    @property
    def supervised(self) -> bool:
        """Whether projection heads regress expert targets from the slots (K > 0 and targets not `none`)."""
        return self.num_slots > 0 and self.targets != "none"

    def check(self, experts: list[str]) -> None:
        """`experts`: experts.names."""
        if not 0 <= self.num_slots <= self.max_slots:
            raise invalid("thinking.num_slots", f"{self.num_slots} must be between 0 and "
                                                f"thinking.max_slots={self.max_slots}")
        if self.targets == "shuffled" and self.num_slots > 0 and not experts:
            raise invalid("thinking.targets", "shuffled shuffles the experts' targets, and experts.names is empty: "
                                              "name the experts whose targets to shuffle, or use none")


HEAD_POSITIONS = ("sinusoidal", "learned", "none")
PARAM_GROUPS = ("slots", "heads", "lora")  # what a training stage trains; "lora" includes lora.modules_to_save


@dataclass
class HeadsConfig:
    kind: str = setting("transformer", "Projection heads: transformer (as in the paper) or linear.",
                        choices=("transformer", "linear"))
    layer: int = setting(-1, "The hidden_states index the heads read; -1: the last layer.")
    position: str = setting("sinusoidal", "Which slot a head reads: sinusoidal (fixed) or learned (one row per slot "
                                          "up to thinking.max_slots) added to each slot's state; none: order-blind.",
                            choices=HEAD_POSITIONS)
    num_layers: int = setting(1, "Transformer heads: encoder layers over the K slots.", ge=1)
    dim: int = setting(128, "Transformer heads: width (divisible by num_attention_heads).", ge=1)
    num_attention_heads: int = setting(4, "Transformer heads: attention heads.", ge=1)

    def check(self) -> None:
        if self.dim % self.num_attention_heads:
            raise invalid("heads.dim", f"{self.dim} must be divisible by heads.num_attention_heads")


@dataclass
class ExpertsConfig:
    names: list[str] = setting(help="Expert names (`coat experts list`) or roles, each standing for its default "
                                    "expert. Default: the method's five roles (pitch, phonetic, affect, "
                                    "sound-events, reconstruction).",
                               factory=lambda: ["pitch", "phonetic", "egemaps", "sound-events", "mel"])
    settings: dict[str, dict[str, Any]] = setting(
        help="Per-expert settings, e.g. {sound-events: {path: DIR}}, used while the expert is in `names`; "
             "audio-encoder takes this config's backbone unless set here.", factory=dict)

    def check(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise invalid("experts.names", f"{self.names} lists an expert twice (a role counts as its default expert)")


@dataclass
class LossConfig:
    ce_weight: float = setting(1.0, "Weight of the response's cross-entropy.", ge=0)
    weights: dict[str, float] = setting(help="lambda_e per expert (>= 0); an expert in experts.names without an "
                                             "entry gets default_weight.", factory=dict)
    default_weight: float = setting(1.0, "lambda_e of experts without an entry in `weights`.", ge=0)
    distance: dict[str, str] = setting(
        help=f"D_e per expert, one of {', '.join(DISTANCES)}. Default: smooth_l1 for continuous experts of up to 16 "
             "dims, cosine for wider ones, ce for discrete, bce for multi-label.", factory=dict)

    def check(self, experts: list[str]) -> None:
        """Weights and distances name experts of `experts` (experts.names)."""
        for name, weight in self.weights.items():
            if name not in experts:
                raise invalid(f"loss.weights.{name}", f"expert {name!r} is not in experts.names={experts}")
            if weight < 0:
                raise invalid(f"loss.weights.{name}", f"{weight} must be >= 0")
        for name, distance in self.distance.items():
            if name not in experts:
                raise invalid(f"loss.distance.{name}", f"expert {name!r} is not in experts.names={experts}")
            if distance not in DISTANCES:
                raise invalid(f"loss.distance.{name}", f"{distance!r} must be one of {', '.join(DISTANCES)}")


@dataclass
class LoraConfig:
    r: int = setting(16, "LoRA rank.", ge=1)
    alpha: int = setting(32, "LoRA alpha.", gt=0)
    dropout: float = setting(0.0, "LoRA dropout.", ge=0, le=1)
    target_modules: list[str] = setting(
        help="Module names that get LoRA.",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    exclude: list[str] = setting(help="Module path parts that never get LoRA: the audio tower stays frozen, as does "
                                      "Omni's vision tower.", factory=lambda: ["audio_tower", "visual"])
    modules_to_save: list[str] = setting(
        help="Modules trained in full beside LoRA. Tiny random backbones need [lm_head]: their frozen random head "
             "caps every logit near zero.", factory=list)


@dataclass
class MixtureEntry:
    """One manifest of a training mixture, and its share of the training examples (weights are normalised)."""

    manifest: str = setting("", "Path of the manifest.")
    weight: float = setting(1.0, "Its share of the training draws, relative to the other entries'.", gt=0)
    name: str | None = setting(None, "Prefixes its ids and names it in the run; default: the manifest's folder "
                                     "name.")


@dataclass
class DataConfig:
    manifest: str = setting("data/coat-mini/manifest.jsonl", "The manifest (relative paths resolve against the "
                                                             "working directory); with a mixture, where it is "
                                                             "written.")
    mixture: list[MixtureEntry] = setting(
        help="Several manifests as one: combined into `manifest`; training draws from each in proportion to its "
             "weight, whatever its size; validation and test use every row.", factory=list)
    store: str = setting("data/coat-mini/store", "The feature store: experts' precomputed features.")
    synth_size: int = setting(2000, "When `manifest` does not exist, generate coat-mini there with this many "
                                    "clips (0: fail instead).", ge=0)
    synth_seed: int = setting(0, "Seed of the generated coat-mini.")
    synth_test_share: float = setting(0.1, "Of the generated clips, in tenths: the test share (a tenth is "
                                           "validation, the rest training).", ge=0.1, le=0.8)
    max_seconds: float = setting(8.0, "Clips longer than this are cropped to it or left out (`long_clips`), in "
                                      "training and evaluation alike.", gt=0)
    long_clips: str = setting("crop", "crop: experts and the model hear the same first max_seconds; reject: leave "
                                      "the clip out.", choices=("crop", "reject"))
    train_split: str = setting("train", "The manifest split trained on.")
    val_split: str = setting("val", "The split validation losses are measured on.")
    test_split: str = setting("test", "The split evaluated after training.")
    decode_tasks: int | None = setting(None, "At most this many decode tasks at once (null: as many as free CPUs "
                                             "allow); 1 suits a 2-core machine that also trains.", ge=1)

    @property
    def crop_seconds(self) -> float | None:
        """What clips are cut to, for experts and model alike (None: longer clips are left out instead)."""
        return self.max_seconds if self.long_clips == "crop" else None

    @property
    def reject_seconds(self) -> float | None:
        """Above what length clips are left out (None: longer clips are cropped instead)."""
        return self.max_seconds if self.long_clips == "reject" else None

    def check(self) -> None:
        tenths = self.synth_test_share * 10
        if not (1 <= round(tenths) <= 8 and abs(tenths - round(tenths)) < 1e-9):
            raise invalid("data.synth_test_share", f"{self.synth_test_share} must be a whole number of tenths in "
                                                   "[0.1, 0.8]")
        for i, entry in enumerate(self.mixture):
            if not entry.manifest:
                raise invalid(f"data.mixture.{i}.manifest", "is empty: give the path of a manifest")
        sources = [mixture_name(entry) for entry in self.mixture]
        if len(set(sources)) < len(sources):
            raise invalid("data.mixture", f"names {sources} repeat: give the entries distinct `name`s")


@dataclass
class StageConfig:
    """One stage of the schedule: the paper grounds the slots first (LLM frozen, little CE), then trains jointly.

    Each stage warms its learning rates up over its first `warmup_steps` and decays them (cosine) to 10% by its
    end, so a group a stage unfreezes starts gently."""

    steps: int = setting(100, "Optimizer steps of the stage.", ge=1)
    ce_weight: float = setting(1.0, "Replaces loss.ce_weight during the stage.", ge=0)
    expert_scale: float = setting(1.0, "Multiplies every expert weight at the stage's start.", ge=0)
    expert_scale_end: float | None = setting(None, "Anneal linearly to this by the stage's end; null: held.", ge=0)
    weights: dict[str, float] = setting(help="Per-expert weights for this stage, over loss.weights.", factory=dict)
    train: list[str] = setting(help=f"Parameter groups trained ({', '.join(PARAM_GROUPS)}); the others frozen.",
                               factory=lambda: list(PARAM_GROUPS))
    lr: dict[str, float] = setting(help="Learning rate per group; a group without an entry gets train.lr.",
                                   factory=dict)
    warmup_steps: int | None = setting(None, "Warm-up steps of the stage; null: train.warmup_steps.", ge=0)

    def check(self, key: str, experts: list[str]) -> None:
        """`key`: the stage's dotted path (`train.stages.<i>`); `experts`: experts.names."""
        if bad := [g for g in [*self.train, *self.lr] if g not in PARAM_GROUPS]:
            raise invalid(f"{key}.train", f"{bad} are not among the parameter groups {', '.join(PARAM_GROUPS)}")
        if not self.train:
            raise invalid(f"{key}.train", "trains nothing: name at least one of " + ", ".join(PARAM_GROUPS))
        if any(lr <= 0 for lr in self.lr.values()):
            raise invalid(f"{key}.lr", f"{dict(self.lr)}: learning rates must be positive (freeze a group by leaving "
                                       "it out of the stage's train list)")
        for name, weight in self.weights.items():
            if name not in experts or weight < 0:
                raise invalid(f"{key}.weights.{name}", f"{weight} for {name!r}: needs an expert of "
                                                       f"experts.names={experts} and a weight >= 0")


@dataclass
class TrainConfig:
    run_name: str | None = setting(None, "Re-running with the same name resumes; default: derived from the config.")
    storage: str = setting("runs", "Ray Train storage (checkpoints, results); a path every node shares on clusters.")
    num_workers: int = setting(2, "Ray Train workers (0: train in this process).", ge=0)
    use_gpu: bool = setting(False, "One GPU per worker, bf16 autocast.")
    cpus_per_worker: float = setting(0.5, "Fractional by default: Ray Data's decode tasks need CPU left over on a "
                                          "2-core machine.", gt=0)
    strategy: str = setting("ddp", "ddp, or fsdp (shards the frozen 7B weights too).", choices=("ddp", "fsdp"))
    batch_size: int = setting(8, "Examples per worker per micro-batch.", ge=1)
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", ge=1)
    lr: float = setting(2e-3, "Learning rate of groups a stage gives none.", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", ge=0)
    warmup_steps: int = setting(20, "Warm-up steps of each stage that sets none.", ge=0)
    max_grad_norm: float = setting(1.0, "Gradients are clipped to this norm.", gt=0)
    stages: list[StageConfig] = setting(
        help="The schedule: by default the slots and heads ground first (LLM frozen, little CE), then all train.",
        factory=lambda: [StageConfig(steps=60, ce_weight=0.1, train=["slots", "heads"]),
                         StageConfig(steps=240, ce_weight=1.0)])
    checkpoint_every: int = setting(50, "Optimizer steps between checkpoints; validation runs and metrics reach "
                                        "MLflow with each.", ge=1)
    val_batches: int = setting(4, "Validation batches per worker: the same rows at every checkpoint, decoded once and "
                               "held while they take at most 256 MB.", ge=1)
    val_scores: bool = setting(False, "At every checkpoint also answer val_examples validation questions as the test "
                                      "evaluation does (each source by its suite's recipe, eval.scoring) and report "
                                      "val/<task>/<metric>: what a sweep may select on by quality.")
    val_examples: int = setting(64, "Validation questions val_scores answers: a fixed subset, stratified by task "
                                    "and mixture entry, drawn with eval.seed.", ge=1)
    keep_checkpoints: int = setting(2, "Checkpoints kept.", ge=1)
    async_upload: bool = setting(True, "Under Ray Train, copy each checkpoint into train.storage in the background "
                                       "while training goes on; the next checkpoint first waits until it is "
                                       "registered. false: training waits for each copy.")
    max_failures: int = setting(0, "Worker-group restarts from the last checkpoint.", ge=0)
    max_nonfinite_steps: int = setting(5, "A step whose loss or gradient is NaN or inf is skipped (no update); after "
                                          "this many the run stops, naming the step, the non-finite terms and the "
                                          "last checkpoint.", ge=0)
    seed: int = setting(0, "One training run: seeds the initialisation of every trained part (slots, heads, LoRA), "
                           "the data order and dropout; backbone.seed alone seeds the frozen base.")

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def check(self, experts: list[str]) -> None:
        if not self.stages:
            raise invalid("train.stages", "needs at least one stage")
        for i, stage in enumerate(self.stages):
            stage.check(f"train.stages.{i}", experts)
        if self.val_scores and self.strategy == "fsdp":
            raise invalid("train.val_scores", "answers the validation questions on rank 0 alone, which FSDP's shards "
                                              "cannot do: use train.strategy=ddp, or rank by val/ce")
        if self.strategy == "fsdp" and len({tuple(sorted(s.train)) for s in self.stages}) > 1:
            raise invalid("train.stages", "under train.strategy=fsdp every stage must train the same groups: FSDP "
                                          "fixes the trainable parameters when it wraps the model; use ddp, or the "
                                          "same `train` list")


SCORING_RULES = ("string_match", "choice", "wer")
SCORING_MODES = ("generate", "loglik")
LOGLIK_RANKINGS = ("per_token", "sum", "calibrated")
SUITE_METRICS = ("accuracy", "weighted_f1")
BASELINES = ("base", "cot")  # systems built from a checkpoint's backbone (coat/eval/evaluate.py)


@dataclass
class SuiteRecipe:
    """How one evaluation suite is asked and scored; `coat eval --help` lists every suite's recipe.

    Rules: `string_match` is MMAU's and MMAR's published scorer (the answer's lower-cased word tokens all in the
    output, none of the tokens only other choices have); `choice` reads the one choice the output names (naming
    two is no answer); `wer` scores transcripts by word error rate after Whisper's English normaliser. Items
    without choices are always scored by WER."""

    prompt: str | None = setting(None, "The instruction for every item; null: each item's own question.")
    max_new_tokens: int | None = setting(None, "null: 1.5 x the longest reference answer in tokens, plus 4.", ge=1)
    rule: str = setting("choice", "How outputs are scored.", choices=SCORING_RULES)
    metrics: list[str] = setting(help=f"Reported metrics, among {', '.join(SUITE_METRICS)} (choice suites).",
                                 factory=lambda: ["accuracy"])
    breakdowns: list[str] = setting(help="Item fields reported per value, e.g. MMAU's difficulty.", factory=list)


def default_suites() -> dict[str, SuiteRecipe]:
    return {
        "coat-mini": SuiteRecipe(),
        "mmau": SuiteRecipe(max_new_tokens=64, rule="string_match", breakdowns=["task", "difficulty"]),
        "mmar": SuiteRecipe(max_new_tokens=64, rule="string_match", breakdowns=["modality", "category"]),
        "meld": SuiteRecipe(prompt="What emotion does the speaker convey?", metrics=["accuracy", "weighted_f1"]),
        "librispeech": SuiteRecipe(prompt="Transcribe the speech.", rule="wer"),
        "gtzan": SuiteRecipe(prompt="Which music genre is this?"),
    }


@dataclass
class EvalConfig:
    batch_size: int = setting(16, "Examples per generation batch.", ge=1)
    bootstrap: int = setting(1000, "Resamples for the 95% intervals.", ge=1)
    max_examples: int | None = setting(None, "A subsample of this many examples, stratified by task family and "
                                             "drawn with `seed`; null: every example.", ge=1)
    seed: int = setting(0, "Seed of the subsample and the bootstrap.")
    scoring: str = setting("generate", "generate: free text scored by each suite's rule; loglik: the choice the "
                                       "model finds most likely (transcription is always generated), scored as its "
                                       "text by the suite's rule, with the same model's accuracy on silence "
                                       "reported as the scorer's empirical chance.",
                           choices=SCORING_MODES)
    loglik: str = setting("per_token", "How loglik scoring ranks choices: per_token (the mean log-probability of the "
                                       "choice's tokens, so length does not decide), sum (their total: shorter "
                                       "choices win) or calibrated (per_token less the choice's per_token given "
                                       "silence and a content-free question).", choices=LOGLIK_RANKINGS)
    latency_examples: int = setting(16, "Latency is measured apart from accuracy, on this many examples one at a "
                                        "time.", ge=0)
    latency_warmup: int = setting(2, "Calls before latency is measured.", ge=0)
    baselines: list[str] = setting(help="Also evaluated after training, on the same examples: base (the backbone, "
                                        "no thinking block, no fine-tune) and cot (that backbone reasoning in text "
                                        "first, with cot_tokens more tokens).", factory=list)
    cot_tokens: int = setting(64, "Extra tokens the text chain-of-thought baseline may reason with.", ge=1)
    long_clips: str = setting("crop", "Benchmark clips longer than the backbone hears of a clip (its audio window): "
                                      "crop: heard as their first window, and counted; reject: left out as too_long, "
                                      "and counted. (coat-mini rows follow data.max_seconds and data.long_clips, as "
                                      "in training.)", choices=("crop", "reject"))
    circular: bool = setting(False, "CircularEval (as MMBench reports it): every multiple-choice item is asked once "
                                    "per rotation of its choices and counts as right only when right under every "
                                    "rotation; reported as circular_accuracy beside the standard accuracy.")
    suites: dict[str, SuiteRecipe] = setting(help="How each suite is asked and scored.", factory=default_suites)

    def check(self) -> None:
        if bad := [b for b in self.baselines if b not in BASELINES]:
            raise invalid("eval.baselines", f"{bad} are not among {', '.join(BASELINES)}")
        for suite, recipe in self.suites.items():
            if unknown := [m for m in recipe.metrics if m not in SUITE_METRICS]:
                raise invalid(f"eval.suites.{suite}.metrics", f"{unknown} are not among {', '.join(SUITE_METRICS)}")


@dataclass
class TrackingConfig:
    uri: str | None = setting(None, "MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns.db.")
    experiment: str = setting("coat", "MLflow experiment.")
    retry_s: float = setting(30.0, "While the tracking server is away, a run's writes wait on disk; this often it "
                                   "checks whether the server is back to send them.", gt=0)
    log_every: int | None = setting(None, "Steps between step-metric writes (a step's own values); checkpoint "
                                          "steps, with their validation metrics, and skipped steps are always "
                                          "logged. null: every step up to 1,000 steps, else 1/1,000 of the run.",
                                    ge=1)
    spool_max_mb: float = setting(2048.0, "At most this many MB of a run's writes (checkpoints' artifacts included) "
                                          "wait on disk for the tracking server; past it the run stops with an error "
                                          "naming the spool, before the storage fills.", gt=0)


@dataclass
class SweepConfig:
    name: str | None = setting(None, "Default: the space file's name; `--resume` continues the sweep of this name.")
    num_samples: int = setting(8, "Trials of a sampled space (Optuna TPE); a grid runs each point once.", ge=1)
    metric: str = setting("val/ce", "Ranks trials (Optuna, ASHA, the best trial): a validation metric, val/...; "
                                    "val/ce compares across loss weights and expert sets, unlike the total loss. "
                                    "Test metrics (eval/...) never select: every trial reports them alike.")
    mode: str = setting("min", "Whether the metric is minimised or maximised.", choices=("min", "max"))
    scheduler: str = setting("asha", "asha or none; grids always run every trial to the end.",
                             choices=("asha", "none"))
    grace_steps: int = setting(20, "ASHA: no trial is stopped before this many optimizer steps.", ge=1)
    reduction_factor: int = setting(3, "ASHA's reduction factor.", ge=2)
    max_concurrent: int | None = setting(None, "Trials at once; null: derived from the cluster's CPUs/GPUs.", ge=1)
    trial_retries: int = setting(1, "A crashed trial is retried from its checkpoint this often, then marked failed.",
                                 ge=0)
    multi_objective: bool = setting(False, "Optuna on (metric, prefill positions) instead of the metric alone.")
    seed: int = setting(0, "Seed of the search.")
    seeds: list[int] = setting(help="Every point of a grid space trained once per seed (train.seed), so conclusions "
                                    "rest on several seeds.", factory=list)

    def check(self, val_scores: bool) -> None:
        """`val_scores`: train.val_scores, without which no val/<task>/<metric> is reported."""
        if len(set(self.seeds)) != len(self.seeds):
            raise invalid("sweep.seeds", f"{self.seeds} lists a seed twice")
        if self.metric.count("/") >= 2 and self.metric.startswith("val/") and not val_scores:
            raise invalid("sweep.metric", f"{self.metric!r} is a validation score, reported only with "
                                          "train.val_scores=true: set it, or rank by val/ce")
        if self.metric.startswith("eval/"):
            raise invalid("sweep.metric", f"{self.metric!r} is scored on the test split, and selecting on it would "
                                          "report a test score chosen on the test data: rank by a validation metric "
                                          "(val/ce, or val/<task>/<metric> with train.val_scores=true)")
        if not self.metric.startswith("val/"):
            raise invalid("sweep.metric", f"{self.metric!r} must be a reported validation metric (val/...)")


@dataclass
class CoATConfig:
    backbone: BackboneConfig = setting(help="The audio LLM.", factory=BackboneConfig)
    thinking: ThinkingConfig = setting(help="The thinking block.", factory=ThinkingConfig)
    heads: HeadsConfig = setting(help="The projection heads (training only).", factory=HeadsConfig)
    experts: ExpertsConfig = setting(help="The audio experts whose features the slots regress.",
                                     factory=ExpertsConfig)
    loss: LossConfig = setting(help="CE plus weighted expert losses.", factory=LossConfig)
    lora: LoraConfig = setting(help="LoRA on the LLM.", factory=LoraConfig)
    data: DataConfig = setting(help="Manifests, feature store, clip length.", factory=DataConfig)
    train: TrainConfig = setting(help="Ray Train: workers, schedule, checkpoints.", factory=TrainConfig)
    eval: EvalConfig = setting(help="Evaluation after training.", factory=EvalConfig)
    tracking: TrackingConfig = setting(help="MLflow.", factory=TrackingConfig)
    sweep: SweepConfig = setting(help="Ray Tune + Optuna sweeps.", factory=SweepConfig)

    @property
    def steps_between_logs(self) -> int:
        """`tracking.log_every`, or by default every step up to 1,000 steps, then at most ~1,000 points a metric."""
        return self.tracking.log_every or max(1, self.train.total_steps // 1000)

    @property
    def expert_settings(self) -> dict[str, dict[str, Any]]:
        """Each configured expert's settings; audio-encoder defaults to this config's backbone, so each backbone
        regresses its own encoder."""
        out = {name: dict(self.experts.settings.get(name, {})) for name in self.experts.names}
        if "audio-encoder" in out:
            b = self.backbone
            own = {"backbone": b.name, "size": b.size, "seed": b.seed, "audio_window_s": b.audio_window_s,
                   **({"checkpoint": b.resolved_checkpoint} if b.resolved_checkpoint else {})}
            out["audio-encoder"] = own | out["audio-encoder"]
        return out


def mixture_name(entry: MixtureEntry) -> str:
    return entry.name or Path(entry.manifest).parent.name or Path(entry.manifest).stem


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> CoATConfig:
    """Defaults, then the YAML file, then `key.path=value` overrides; validated.

    Raises ConfigError naming the dotted field for unknown keys, wrong types and invalid values, and
    FileNotFoundError naming the file when `path` does not exist.
    """
    merged = OmegaConf.structured(CoATConfig)
    path = Path(path) if path is not None else None
    with _named_field(f" in {path}" if path is not None else ""):
        if path is not None:
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            try:
                merged = OmegaConf.merge(merged, OmegaConf.load(path))
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
        cfg = OmegaConf.to_object(_with_overrides(merged, overrides))
    return _resolved(cfg)


# Fields that were removed, and what to set instead.
RETIRED = {"eval.max_new_tokens": "one budget for every suite cut long answers (LibriSpeech transcripts) short; set "
                                  "a suite's own: eval.suites.<suite>.max_new_tokens"}


@contextmanager
def _named_field(where: str = "") -> Iterator[None]:
    """OmegaConf's errors (unknown key, wrong type) as a ConfigError naming the dotted field, and `where` it was
    set."""
    try:
        yield
    except OmegaConfBaseException as err:
        problem = RETIRED.get(err.full_key, err.msg.splitlines()[0])
        raise ConfigError(f"config field {err.full_key!r}{where}: {problem}") from None


def _with_overrides(merged, overrides):
    """`key.path=value` overrides applied one by one; a path may index a list (`train.stages.1.steps=200`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, value = item.split("=", 1)
        parts = key.split(".")
        for i, part in enumerate(parts[1:], 1):
            parent = OmegaConf.select(merged, ".".join(parts[:i]))
            if part.isdigit() and OmegaConf.is_list(parent) and int(part) >= len(parent):
                raise invalid(key, f"{'.'.join(parts[:i])} has {len(parent)} entries; set the whole list to add one")
        parsed = OmegaConf.from_dotlist([f"value={value}"])["value"]  # YAML, as on the command line
        try:
            OmegaConf.update(merged, key, parsed, merge=True)
        except (IndexError, TypeError) as err:
            raise invalid(key, str(err)) from None
    return merged


def _resolved(cfg: CoATConfig) -> CoATConfig:
    """Roles in `experts.names` replaced by their default experts, then validated."""
    cfg.experts.names = resolve_roles(cfg.experts.names)
    validate(cfg)
    return cfg


def declared_fields(node: Any, prefix: str = "") -> Iterator[tuple[str, Field, Any]]:
    """(dotted path, field, value) of every field of a config tree, entries of lists and dicts of sections
    included (`train.stages.0.steps`, `eval.suites.mmau.rule`)."""
    for f in fields(node):
        path, value = f"{prefix}{f.name}", getattr(node, f.name)
        yield path, f, value
        if is_dataclass(value):
            yield from declared_fields(value, f"{path}.")
        elif isinstance(value, list | dict):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if is_dataclass(item):
                    yield from declared_fields(item, f"{path}.{key}.")


def bounds_text(metadata: Mapping[str, Any]) -> str:
    """A field's declared bounds in words: `one of a, b`, `>= 1`, `in [0.1, 0.8]`; empty when it has none."""
    if "choices" in metadata:
        return "one of " + ", ".join(map(str, metadata["choices"]))
    low = f"{metadata['ge']:g}" if "ge" in metadata else None
    if low is not None and "le" in metadata:
        return f"in [{low}, {metadata['le']:g}]"
    parts = [f">= {low}" if low is not None else "", f"> {metadata['gt']:g}" if "gt" in metadata else "",
             f"<= {metadata['le']:g}" if "le" in metadata else ""]
    return " and ".join(p for p in parts if p)


def _out_of_bounds(value: Any, metadata: Mapping[str, Any]) -> bool:
    if value is None:
        return False
    if "choices" in metadata:
        return value not in metadata["choices"]
    return (("ge" in metadata and value < metadata["ge"]) or ("gt" in metadata and value <= metadata["gt"])
            or ("le" in metadata and value > metadata["le"]))


def validate(cfg: CoATConfig) -> None:
    """Each field's declared bounds (`setting`), then each section's `check` of what spans its fields. Raises
    ConfigError naming the field."""
    for path, declared, value in declared_fields(cfg):
        if _out_of_bounds(value, declared.metadata):
            raise invalid(path, f"{value!r} must be {bounds_text(declared.metadata)}")
    cfg.backbone.check()
    cfg.thinking.check(cfg.experts.names)
    cfg.heads.check()
    cfg.experts.check()
    cfg.loss.check(cfg.experts.names)
    cfg.data.check()
    cfg.train.check(cfg.experts.names)
    cfg.sweep.check(cfg.train.val_scores)
    cfg.eval.check()


def apply_overrides(cfg: CoATConfig, overrides: list[str]) -> CoATConfig:
    """`cfg` with dotted overrides applied, validated. Raises ConfigError naming the field."""
    with _named_field():
        out = OmegaConf.to_object(_with_overrides(OmegaConf.structured(cfg), overrides))
    return _resolved(out)


def with_absolute_paths(cfg: CoATConfig) -> CoATConfig:
    """Relative data/storage paths resolved against this process's working directory: Ray Tune and Train run
    trials and workers elsewhere."""
    return apply_overrides(cfg, [
        f"data.manifest={Path(cfg.data.manifest).resolve()}", f"data.store={Path(cfg.data.store).resolve()}",
        f"train.storage={Path(cfg.train.storage).resolve()}",
    ])


def expert_weight(cfg: CoATConfig, name: str, stage: StageConfig | None = None) -> float:
    """lambda_e: the stage's weight for `name` if it sets one, else `loss.weights`, else `loss.default_weight`."""
    if stage is not None and name in stage.weights:
        return stage.weights[name]
    return cfg.loss.weights.get(name, cfg.loss.default_weight)


def redacted(cfg: CoATConfig) -> CoATConfig:
    """`cfg` with the password of `tracking.uri` (`http://user:secret@host`) replaced by `***`: the config as it
    may be logged, saved beside results or shown. Raises nothing."""
    parts = urlsplit(cfg.tracking.uri or "")
    if parts.password is None:
        return cfg
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return replace(cfg, tracking=replace(cfg.tracking, uri=urlunsplit(parts._replace(netloc=netloc))))


def to_yaml(cfg: CoATConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> CoATConfig:
    """Inverse of `to_yaml` (a saved run's config), validated like `load_config`."""
    with _named_field():
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CoATConfig), OmegaConf.create(text)))
    return _resolved(cfg)


def flatten(cfg: CoATConfig) -> dict[str, Any]:
    """Dotted key -> value, for logging the whole config as MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            out[prefix] = value

    walk("", asdict(cfg))
    return out
