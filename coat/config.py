"""The one typed config tree: dataclasses, loaded as defaults + YAML + dotted overrides (OmegaConf).

Every sweepable knob is a dotted path (`thinking.num_slots`, `loss.weights.pitch`, `backbone.name`). A bad
config fails here, once, before any model is built, with a `ConfigError` naming the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

BACKBONES = ("qwen2-audio", "qwen2.5-omni", "audio-flamingo-3")
DISTANCES = ("cosine", "mse", "smooth_l1", "ce")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the dotted field and the fix."""


@dataclass
class BackboneConfig:
    name: str = "qwen2-audio"
    # "tiny": a small random-weight instance of the real class (embedded default, tests);
    # "real": the real checkpoint's architecture, from `checkpoint` if given, else random weights (benchmarks).
    size: str = "tiny"
    # Local path or an already-cached hub id of the real checkpoint; never downloaded.
    checkpoint: str | None = None
    # Seeds the tiny random weights, so trained parts saved without the base reload onto the same base.
    seed: int = 0
    dtype: str = "float32"
    # Tiny instances only: the audio window the processor pads to and the encoder accepts.
    audio_window_s: float = 8.0


@dataclass
class ThinkingConfig:
    num_slots: int = 16
    max_slots: int = 64
    # "after_prompt": between the instruction and the response; "after_audio": right after the audio.
    placement: str = "after_prompt"


@dataclass
class HeadsConfig:
    kind: str = "transformer"  # "transformer" (as in the paper) or "linear"
    layer: int = -1  # hidden_states index the heads read; -1 = last layer
    num_layers: int = 1  # transformer heads: encoder layers over the K slots
    dim: int = 128  # transformer heads: width
    num_attention_heads: int = 4


@dataclass
class ExpertsConfig:
    names: list[str] = field(default_factory=lambda: ["pitch", "phonetic", "prosody", "mel"])


@dataclass
class LossConfig:
    ce_weight: float = 1.0
    # lambda_e per expert; an expert in `experts.names` without an entry gets `default_weight`.
    weights: dict[str, float] = field(default_factory=dict)
    default_weight: float = 1.0
    # D_e per expert; default: cosine for continuous experts, ce for discrete ones.
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


@dataclass
class CoATConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    thinking: ThinkingConfig = field(default_factory=ThinkingConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


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
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"config field {err.full_key!r}{where}: {err.msg.splitlines()[0]}") from None
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
    if cfg.heads.num_layers < 1:
        fail("heads.num_layers", "must be >= 1")
    if cfg.heads.dim % cfg.heads.num_attention_heads:
        fail("heads.dim", f"{cfg.heads.dim} must be divisible by heads.num_attention_heads")

    names = cfg.experts.names
    if len(set(names)) != len(names):
        fail("experts.names", f"{names} lists an expert twice")
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


def expert_weight(cfg: CoATConfig, name: str) -> float:
    return cfg.loss.weights.get(name, cfg.loss.default_weight)


def to_yaml(cfg: CoATConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> CoATConfig:
    """Inverse of `to_yaml` (a saved run's config), validated like `load_config`."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CoATConfig), OmegaConf.create(text)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"config field {err.full_key!r}: {err.msg.splitlines()[0]}") from None
    validate(cfg)
    return cfg


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
