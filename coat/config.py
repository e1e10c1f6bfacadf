"""The one typed config tree: dataclasses, loaded as defaults + YAML + dotted overrides (OmegaConf).

Every sweepable knob is a dotted path (`thinking.num_slots`, `loss.weights.pitch`, `backbone.name`). A bad
config fails here, once, before any model is built, with a `ConfigError` naming the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from coat.errors import UsageError
from coat.experts.roles import resolve_roles

BACKBONES = ("qwen2-audio", "qwen2.5-omni", "audio-flamingo-3")
DISTANCES = ("cosine", "mse", "smooth_l1", "ce", "bce")


class ConfigError(UsageError, ValueError):
    """A config value that cannot work; the message names the dotted field and the fix."""


@dataclass
class BackboneConfig:
    name: str = "qwen2-audio"
    # "tiny": a small random-weight instance of the real class (embedded default, tests);
    # "real": the real checkpoint's architecture, from `checkpoint` if given, else random weights (benchmarks).
    size: str = "tiny"
    # Local path or an already-cached hub id of the real checkpoint; never downloaded.
    checkpoint: str | None = None
    # Per-backbone checkpoints, used when `checkpoint` is unset: lets a sweep vary backbone.name.
    checkpoints: dict[str, str] = field(default_factory=dict)
    # Seeds the tiny random weights, so trained parts saved without the base reload onto the same base.
    seed: int = 0
    dtype: str = "float32"
    # Tiny instances only: the audio window the processor pads to and the encoder accepts.
    audio_window_s: float = 8.0

    @property
    def resolved_checkpoint(self) -> str | None:
        """The checkpoint this config loads: `checkpoint`, else at real size `checkpoints[name]`, else None."""
        return self.checkpoint or (self.checkpoints.get(self.name) if self.size == "real" else None)


@dataclass
class ThinkingConfig:
    num_slots: int = 16
    max_slots: int = 64
    # "after_prompt": between the instruction and the response; "after_audio": right after the audio.
    placement: str = "after_prompt"

    @property
    def prefill_positions(self) -> int:
        """Extra prompt positions the block costs: K slots and its two delimiters (none at K = 0)."""
        return self.num_slots + 2 if self.num_slots else 0


HEAD_POSITIONS = ("sinusoidal", "learned", "none")
PARAM_GROUPS = ("slots", "heads", "lora")  # what a training stage trains; "lora" includes lora.modules_to_save


@dataclass
class HeadsConfig:
    kind: str = "transformer"  # "transformer" (as in the paper) or "linear"
    layer: int = -1  # hidden_states index the heads read; -1 = last layer
    # Which slot a head reads: "sinusoidal" (fixed) or "learned" (one row per slot up to thinking.max_slots, so the
    # parameter count does not depend on K) added to each slot's state; "none" leaves the heads order-blind.
    position: str = "sinusoidal"
    num_layers: int = 1  # transformer heads: encoder layers over the K slots
    dim: int = 128  # transformer heads: width
    num_attention_heads: int = 4


@dataclass
class ExpertsConfig:
    # Expert names (`coat experts list`) or roles, each standing for its default expert (coat.experts.roles).
    # Default: the method's five roles (pitch, phonetic, affect, sound-events, reconstruction).
    names: list[str] = field(default_factory=lambda: ["pitch", "phonetic", "egemaps", "sound-events", "mel"])
    # Per-expert settings, e.g. {sound-events: {path: DIR}}, used while the expert is in `names` (a sweep over
    # expert sets may add it); audio-encoder takes this config's backbone unless set here.
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LossConfig:
    ce_weight: float = 1.0
    # lambda_e per expert; an expert in `experts.names` without an entry gets `default_weight`.
    weights: dict[str, float] = field(default_factory=dict)
    default_weight: float = 1.0
    # D_e per expert (coat.model.losses): default smooth_l1 for continuous experts of up to 16 dims (magnitude
    # matters: pitch, prosody), cosine for wider ones (embeddings, spectra), ce for discrete, bce for multi-label.
    distance: dict[str, str] = field(default_factory=dict)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Module path parts that never get LoRA: the audio tower stays frozen, as does Omni's vision tower.
    exclude: list[str] = field(default_factory=lambda: ["audio_tower", "visual"])
    # Modules trained in full beside LoRA. Tiny random backbones need ["lm_head"]: behind a frozen final norm,
    # their frozen random head caps every logit near zero, so the response loss cannot fall.
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    # Relative paths resolve against the working directory of the command that loads the config.
    manifest: str = "data/coat-mini/manifest.jsonl"
    store: str = "data/coat-mini/store"
    # When `manifest` does not exist, generate coat-mini there with this many clips (0: fail instead).
    synth_size: int = 2000
    synth_seed: int = 0
    synth_test_share: float = 0.1  # of the generated clips, in tenths; a tenth is validation, the rest training
    # Clips longer than this are cut to it ("crop": experts and the model hear the same first max_seconds) or left
    # out ("reject"), in training and evaluation alike.
    max_seconds: float = 8.0
    long_clips: str = "crop"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # At most this many decode tasks at once (None: as many as free CPUs allow). Where training shares the CPUs,
    # Ray Data otherwise decodes far ahead in bursts that stall training steps: 1 suits the 2-core default.
    decode_tasks: int | None = None


@dataclass
class StageConfig:
    """One stage of the schedule: the paper grounds the slots first (LLM frozen, little CE), then trains jointly.

    Each stage warms its learning rates up over its first `warmup_steps` and decays them (cosine) to 10% by its
    end, so a group a stage unfreezes starts gently."""

    steps: int = 100
    ce_weight: float = 1.0  # replaces loss.ce_weight during the stage
    expert_scale: float = 1.0  # multiplies every expert weight at the stage's start
    expert_scale_end: float | None = None  # anneal linearly to this by the stage's end; None: held
    weights: dict[str, float] = field(default_factory=dict)  # per-expert weights for this stage, over loss.weights
    train: list[str] = field(default_factory=lambda: list(PARAM_GROUPS))  # groups trained; the others frozen
    lr: dict[str, float] = field(default_factory=dict)  # per group; a group without an entry gets train.lr
    warmup_steps: int | None = None  # None: train.warmup_steps


@dataclass
class TrainConfig:
    run_name: str | None = None  # re-running with the same name resumes; default: derived from the config
    storage: str = "runs"  # Ray Train storage (checkpoints, results); a shared path on clusters
    num_workers: int = 2
    use_gpu: bool = False
    # Fractional by default: Ray Data's decode tasks need CPU left over on a 2-core machine, else they never start.
    cpus_per_worker: float = 0.5
    strategy: str = "ddp"  # "ddp" or "fsdp" (shards the frozen 7B weights too)
    batch_size: int = 8  # per worker, per micro-batch
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    stages: list[StageConfig] = field(
        default_factory=lambda: [StageConfig(steps=60, ce_weight=0.1, train=["slots", "heads"]),
                                 StageConfig(steps=240, ce_weight=1.0)]
    )
    checkpoint_every: int = 50  # optimizer steps; validation runs and metrics reach MLflow with each checkpoint
    val_batches: int = 4  # per worker, per validation
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker-group restarts from the last checkpoint
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)


SCORING_RULES = ("string_match", "choice", "wer")
SCORING_MODES = ("generate", "loglik")
SUITE_METRICS = ("accuracy", "weighted_f1")


@dataclass
class SuiteRecipe:
    """How one evaluation suite is asked and scored; `coat eval --help` lists every suite's recipe.

    Rules: `string_match` is MMAU's and MMAR's published scorer (the answer's lower-cased word tokens all in the
    output, none of the tokens only other choices have); `choice` reads the one choice the output names (naming
    two is no answer); `wer` scores transcripts by word error rate after Whisper's English normaliser. Items
    without choices are always scored by WER."""

    prompt: str | None = None  # the instruction for every item; None: each item's own question
    max_new_tokens: int | None = None  # None: 1.5 x the longest reference answer in tokens, plus 4
    rule: str = "choice"
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])  # and/or "weighted_f1" (choice suites)
    breakdowns: list[str] = field(default_factory=list)  # item fields reported per value, e.g. MMAU's difficulty


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
    batch_size: int = 16
    max_new_tokens: int | None = None  # every suite's token budget; None: each suite's own (`suites`)
    bootstrap: int = 1000  # resamples for the 95% intervals
    # A subsample of this many examples, stratified by task family and drawn with `seed`; None: every example.
    max_examples: int | None = None
    seed: int = 0
    # "generate": free text scored by each suite's rule; "loglik": the choice the model finds most likely
    # (for small or untrained models whose text cannot be parsed; transcription is always generated).
    scoring: str = "generate"
    # Latency is measured apart from accuracy: this many examples one at a time, after `latency_warmup` calls.
    latency_examples: int = 16
    latency_warmup: int = 2
    # Also evaluated after training, on the same examples: "base" (the backbone, no thinking block, no fine-tune)
    # and "cot" (that backbone reasoning in text first, with `cot_tokens` more tokens).
    baselines: list[str] = field(default_factory=list)
    cot_tokens: int = 64
    suites: dict[str, SuiteRecipe] = field(default_factory=default_suites)


@dataclass
class TrackingConfig:
    # None: $MLFLOW_TRACKING_URI, else the embedded sqlite:///<cwd>/mlruns.db.
    uri: str | None = None
    experiment: str = "coat"


@dataclass
class SweepConfig:
    name: str | None = None  # default: the space file's name; `--resume` continues the sweep of this name
    num_samples: int = 8  # sampled spaces (Optuna TPE); a grid runs each point once
    metric: str = "val/ce"  # comparable across loss weights and expert sets, unlike the total loss
    mode: str = "min"
    scheduler: str = "asha"  # "asha" or "none"; grids always run every trial to the end
    grace_steps: int = 20  # ASHA: no trial is stopped before this many optimizer steps
    reduction_factor: int = 3
    max_concurrent: int | None = None  # None: derived from the cluster's CPUs/GPUs
    trial_retries: int = 1  # a crashed trial is retried from its checkpoint this often, then marked failed
    multi_objective: bool = False  # Optuna on (metric, prefill positions) instead of the metric alone
    seed: int = 0
    # Every point of a grid space trained once per seed (`train.seed`), so conclusions rest on several seeds.
    seeds: list[int] = field(default_factory=list)


@dataclass
class CoATConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    thinking: ThinkingConfig = field(default_factory=ThinkingConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> CoATConfig:
    """Defaults, then the YAML file, then `key.path=value` overrides; validated.

    Raises ConfigError naming the dotted field for unknown keys, wrong types and invalid values, and
    FileNotFoundError naming the file when `path` does not exist.
    """
    merged = OmegaConf.structured(CoATConfig)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            try:
                merged = OmegaConf.merge(merged, OmegaConf.load(path))
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
        merged = _with_overrides(merged, overrides)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"config field {err.full_key!r}{where}: {err.msg.splitlines()[0]}") from None
    return _resolved(cfg)


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
                raise ConfigError(f"config field {key!r}: {'.'.join(parts[:i])} has {len(parent)} entries; set "
                                  "the whole list to add one")
        parsed = OmegaConf.from_dotlist([f"value={value}"])["value"]  # YAML, as on the command line
        try:
            OmegaConf.update(merged, key, parsed, merge=True)
        except (IndexError, TypeError) as err:
            raise ConfigError(f"config field {key!r}: {err}") from None
    return merged


def _resolved(cfg: CoATConfig) -> CoATConfig:
    """Roles in `experts.names` replaced by their default experts, then validated."""
    cfg.experts.names = resolve_roles(cfg.experts.names)
    validate(cfg)
    return cfg


def validate(cfg: CoATConfig) -> None:
    """Cross-field checks that types alone can't express. Raises ConfigError naming the field."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"config field {key!r}: {msg}")

    if cfg.backbone.name not in BACKBONES:
        fail("backbone.name", f"{cfg.backbone.name!r} is not one of {', '.join(BACKBONES)}")
    if cfg.backbone.size not in ("tiny", "real"):
        fail("backbone.size", f"{cfg.backbone.size!r} must be 'tiny' or 'real'")
    for name in cfg.backbone.checkpoints:
        if name not in BACKBONES:
            fail(f"backbone.checkpoints.{name}", f"{name!r} is not one of {', '.join(BACKBONES)}")
    if cfg.backbone.checkpoint is not None and cfg.backbone.size != "real":
        fail("backbone.size", "a checkpoint holds the real architecture: set backbone.size=real with it")
    if cfg.backbone.dtype not in ("float32", "bfloat16", "float16"):
        fail("backbone.dtype", f"{cfg.backbone.dtype!r} must be float32, bfloat16 or float16")
    if cfg.backbone.audio_window_s <= 0:
        fail("backbone.audio_window_s", "must be positive")

    k = cfg.thinking
    if k.max_slots < 0:
        fail("thinking.max_slots", f"{k.max_slots} must be >= 0")
    if not 0 <= k.num_slots <= k.max_slots:
        fail("thinking.num_slots", f"{k.num_slots} must be between 0 and thinking.max_slots={k.max_slots}")
    if k.placement not in ("after_prompt", "after_audio"):
        fail("thinking.placement", f"{k.placement!r} must be 'after_prompt' or 'after_audio'")

    if cfg.heads.kind not in ("transformer", "linear"):
        fail("heads.kind", f"{cfg.heads.kind!r} must be 'transformer' or 'linear'")
    if cfg.heads.position not in HEAD_POSITIONS:
        fail("heads.position", f"{cfg.heads.position!r} must be one of {', '.join(HEAD_POSITIONS)}")
    if cfg.heads.num_layers < 1:
        fail("heads.num_layers", "must be >= 1")
    if cfg.heads.dim % cfg.heads.num_attention_heads:
        fail("heads.dim", f"{cfg.heads.dim} must be divisible by heads.num_attention_heads")

    names = cfg.experts.names
    if len(set(names)) != len(names):
        fail("experts.names", f"{names} lists an expert twice (a role counts as its default expert)")
    if cfg.loss.ce_weight < 0:
        fail("loss.ce_weight", f"{cfg.loss.ce_weight} must be >= 0")
    if cfg.loss.default_weight < 0:
        fail("loss.default_weight", f"{cfg.loss.default_weight} must be >= 0")
    for name, weight in cfg.loss.weights.items():
        if name not in names:
            fail(f"loss.weights.{name}", f"expert {name!r} is not in experts.names={names}")
        if weight < 0:
            fail(f"loss.weights.{name}", f"{weight} must be >= 0")
    for name, distance in cfg.loss.distance.items():
        if name not in names:
            fail(f"loss.distance.{name}", f"expert {name!r} is not in experts.names={names}")
        if distance not in DISTANCES:
            fail(f"loss.distance.{name}", f"{distance!r} must be one of {', '.join(DISTANCES)}")

    if cfg.lora.r < 1:
        fail("lora.r", "must be >= 1")

    if not (1 <= round(cfg.data.synth_test_share * 10) <= 8
            and abs(cfg.data.synth_test_share * 10 - round(cfg.data.synth_test_share * 10)) < 1e-9):
        fail("data.synth_test_share", f"{cfg.data.synth_test_share} must be a whole number of tenths in [0.1, 0.8]")
    if cfg.data.max_seconds <= 0:
        fail("data.max_seconds", f"{cfg.data.max_seconds} must be positive")
    if cfg.data.long_clips not in ("crop", "reject"):
        fail("data.long_clips", f"{cfg.data.long_clips!r} must be 'crop' or 'reject'")
    if cfg.data.decode_tasks is not None and cfg.data.decode_tasks < 1:
        fail("data.decode_tasks", f"{cfg.data.decode_tasks} must be >= 1, or null for as many as CPUs allow")
    t = cfg.train
    if not t.stages:
        fail("train.stages", "needs at least one stage")
    for i, stage in enumerate(t.stages):
        if stage.steps < 1:
            fail(f"train.stages.{i}.steps", f"{stage.steps} must be >= 1")
        if stage.ce_weight < 0 or stage.expert_scale < 0 or (stage.expert_scale_end or 0) < 0:
            fail(f"train.stages.{i}", "ce_weight, expert_scale and expert_scale_end must be >= 0")
        if bad := [g for g in [*stage.train, *stage.lr] if g not in PARAM_GROUPS]:
            fail(f"train.stages.{i}.train", f"{bad} are not among the parameter groups {', '.join(PARAM_GROUPS)}")
        if not stage.train:
            fail(f"train.stages.{i}.train", "trains nothing: name at least one of " + ", ".join(PARAM_GROUPS))
        if any(lr <= 0 for lr in stage.lr.values()):
            fail(f"train.stages.{i}.lr", f"{dict(stage.lr)}: learning rates must be positive (freeze a group by "
                                         "leaving it out of the stage's train list)")
        for name, weight in stage.weights.items():
            if name not in names or weight < 0:
                fail(f"train.stages.{i}.weights.{name}", f"{weight} for {name!r}: needs an expert of "
                                                         f"experts.names={names} and a weight >= 0")
        if stage.warmup_steps is not None and stage.warmup_steps < 0:
            fail(f"train.stages.{i}.warmup_steps", "must be >= 0")
    if t.strategy == "fsdp" and len({tuple(sorted(s.train)) for s in t.stages}) > 1:
        fail("train.stages", "under train.strategy=fsdp every stage must train the same groups: FSDP fixes the "
                             "trainable parameters when it wraps the model; use ddp, or the same `train` list")
    for key in ("num_workers", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints"):
        if getattr(t, key) < (0 if key == "num_workers" else 1):
            fail(f"train.{key}", f"{getattr(t, key)} is too small")
    if t.max_failures < 0:
        fail("train.max_failures", "must be >= 0")
    if t.strategy not in ("ddp", "fsdp"):
        fail("train.strategy", f"{t.strategy!r} must be 'ddp' or 'fsdp'")
    if t.cpus_per_worker <= 0:
        fail("train.cpus_per_worker", "must be positive")
    if t.lr <= 0:
        fail("train.lr", "must be positive")
    sw = cfg.sweep
    if sw.mode not in ("min", "max"):
        fail("sweep.mode", f"{sw.mode!r} must be 'min' or 'max'")
    if sw.scheduler not in ("asha", "none"):
        fail("sweep.scheduler", f"{sw.scheduler!r} must be 'asha' or 'none'")
    if sw.num_samples < 1 or sw.grace_steps < 1 or sw.reduction_factor < 2 or sw.trial_retries < 0:
        fail("sweep", "num_samples, grace_steps >= 1, reduction_factor >= 2 and trial_retries >= 0 are required")
    if len(set(sw.seeds)) != len(sw.seeds):
        fail("sweep.seeds", f"{sw.seeds} lists a seed twice")
    if not (sw.metric.startswith("val/") or sw.metric.startswith("eval/")):
        fail("sweep.metric", f"{sw.metric!r} must be a reported validation (val/...) or evaluation (eval/...) metric")
    e = cfg.eval
    if e.batch_size < 1 or e.bootstrap < 1 or (e.max_new_tokens is not None and e.max_new_tokens < 1):
        fail("eval", "batch_size, max_new_tokens and bootstrap must be >= 1")
    if e.max_examples is not None and e.max_examples < 1:
        fail("eval.max_examples", f"{e.max_examples} must be >= 1, or null for every example")
    if e.scoring not in SCORING_MODES:
        fail("eval.scoring", f"{e.scoring!r} must be one of {', '.join(SCORING_MODES)}")
    if e.latency_examples < 0 or e.latency_warmup < 0:
        fail("eval", "latency_examples and latency_warmup must be >= 0")
    if bad := [b for b in e.baselines if b not in ("base", "cot")]:
        fail("eval.baselines", f"{bad} are not among base, cot")
    if e.cot_tokens < 1:
        fail("eval.cot_tokens", "must be >= 1")
    for suite, recipe in e.suites.items():
        if recipe.rule not in SCORING_RULES:
            fail(f"eval.suites.{suite}.rule", f"{recipe.rule!r} must be one of {', '.join(SCORING_RULES)}")
        if recipe.max_new_tokens is not None and recipe.max_new_tokens < 1:
            fail(f"eval.suites.{suite}.max_new_tokens", "must be >= 1, or null for the references' length")
        unknown = [m for m in recipe.metrics if m not in SUITE_METRICS]
        if unknown:
            fail(f"eval.suites.{suite}.metrics", f"{unknown} are not among {', '.join(SUITE_METRICS)}")


def apply_overrides(cfg: CoATConfig, overrides: list[str]) -> CoATConfig:
    """`cfg` with dotted overrides applied, validated. Raises ConfigError naming the field."""
    try:
        out = OmegaConf.to_object(_with_overrides(OmegaConf.structured(cfg), overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"config field {err.full_key!r}: {err.msg.splitlines()[0]}") from None
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


def expert_settings(cfg: CoATConfig) -> dict[str, dict[str, Any]]:
    """Each configured expert's settings; audio-encoder defaults to this config's backbone, so each backbone
    regresses its own encoder."""
    out = {name: dict(cfg.experts.settings.get(name, {})) for name in cfg.experts.names}
    if "audio-encoder" in out:
        b = cfg.backbone
        own = {"backbone": b.name, "size": b.size, "seed": b.seed, "audio_window_s": b.audio_window_s,
               **({"checkpoint": b.resolved_checkpoint} if b.resolved_checkpoint else {})}
        out["audio-encoder"] = own | out["audio-encoder"]
    return out


def to_yaml(cfg: CoATConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> CoATConfig:
    """Inverse of `to_yaml` (a saved run's config), validated like `load_config`."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CoATConfig), OmegaConf.create(text)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"config field {err.full_key!r}: {err.msg.splitlines()[0]}") from None
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
