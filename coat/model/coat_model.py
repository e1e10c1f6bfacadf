"""CoATModel: a backbone with a thinking block, LoRA on its LLM and one projection head per expert.

    L = ce_weight * CE(response) + sum_e lambda_e * D_e(head_e(h_slots), pooled target_e)

`forward` returns the total and every component, projecting onto the vocabulary only the positions the response
cross-entropy reads (a real vocabulary's logits at every position would dwarf the rest); `generate` runs the
backbone's own `generate` on a prompt that already holds the block (heads unused), so thinking costs K prefill
positions and no decode step.
`save` writes only the trained parts (LoRA, slot table, heads) with the config; `load` rebuilds the base
from that config and refuses parts made for another backbone or slot count.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from coat.backbones import Backbone, build_backbone
from coat.config import (
    PARAM_GROUPS,
    CoATConfig,
    ConfigError,
    StageConfig,
    expert_weight,
    from_yaml,
    redacted,
    to_yaml,
)
from coat.data.store import STD_FLOOR
from coat.experts.base import ExpertSpec
from coat.experts.registry import expert_specs
from coat.model.heads import make_head
from coat.model.losses import distance, predicting, response_ce
from coat.model.slots import SlotEmbedding
from coat.model.targets import slot_targets

REGRESSION_MAX_DIM = 16
FSDP_UNIT = "_fsdp_wrapped_module."  # in the parameter names of modules FSDP wrapped as units of their own
WEIGHTS_FILE = "coat.safetensors"
CONFIG_FILE = "coat.yaml"
META_FILE = "coat.json"
INIT_STREAM = 1  # the initialisation's entry in train.seed's seed sequence (steps use [seed, rank, step])


@dataclass
class CoATOutput:
    loss: torch.Tensor
    losses: dict[str, torch.Tensor]  # "ce" and one entry per expert, unweighted
    logits: torch.Tensor  # [N, V] at the positions that predict a response token (`losses.predicting`), in order
    slot_states: torch.Tensor | None  # [B, K, H] at `heads.layer`, None when K = 0


def not_a_checkpoint(directory: str | Path, missing: str) -> str:
    """The message for a folder that is not a checkpoint, with where to find one."""
    return (f"{directory} is not a CoAT checkpoint (no {missing}): give a checkpoint folder a run wrote, e.g. "
            "runs/<run name>/checkpoint_000300")


def check_experts(cfg: CoATConfig, experts: Mapping[str, ExpertSpec]) -> None:
    """Expert specs against the config, before anything is built. Raises ConfigError naming the field."""
    missing = [name for name in cfg.experts.names if name not in experts]
    if missing:
        raise ConfigError(f"config field 'experts.names': no spec for {missing}")
    for name in cfg.experts.names:
        kind, chosen = experts[name].kind, cfg.loss.distance.get(name)
        if chosen == "ce" and kind != "discrete":
            raise ConfigError(f"config field 'loss.distance.{name}': ce needs a discrete expert, {name!r} is {kind}")
        if chosen == "bce" and kind != "multilabel":
            raise ConfigError(f"config field 'loss.distance.{name}': bce needs a multi-label expert, {name!r} is "
                              f"{kind}")


def default_distance(spec: ExpertSpec) -> str:
    """ce for discrete experts, bce for multi-label ones; for continuous ones smooth_l1 on up to
    `REGRESSION_MAX_DIM` dimensions, where magnitude matters (a pitch track's cosine is only its sign), cosine on
    wider features (embeddings, spectra), whose direction carries them."""
    if spec.kind == "discrete":
        return "ce"
    if spec.kind == "multilabel":
        return "bce"
    return "smooth_l1" if spec.dim <= REGRESSION_MAX_DIM else "cosine"


def init_seed(train_seed: int) -> int:
    """The seed the trained parts (slot table, LoRA, heads) are drawn from: `train.seed`'s own stream, apart from
    the data order's and each step's, so two seeds are two training runs while `backbone.seed` alone fixes the
    frozen base they train on."""
    return int(np.random.SeedSequence([train_seed, INIT_STREAM]).generate_state(1)[0])


def _lora_targets(cfg: CoATConfig) -> str:
    """A regex on module names: the LLM's projections, nothing under the excluded towers."""
    excluded = "|".join(cfg.lora.exclude)
    projections = "|".join(cfg.lora.target_modules)
    return rf"^(?!.*\b({excluded})\b).*\.({projections})$"


class CoATModel(nn.Module):
    def __init__(
        self, cfg: CoATConfig, experts: Mapping[str, ExpertSpec] | None = None, device: str | torch.device = "cpu"
    ):
        """Build the configured backbone on `device`, wrap it, add LoRA and heads.

        `experts` maps each name in `cfg.experts.names` to its spec (default: the expert registry).
        Raises ConfigError before building anything when the experts don't fit the config.
        """
        super().__init__()
        if experts is None:
            experts = expert_specs(cfg)
        check_experts(cfg, experts)
        self.cfg = cfg
        self._saved_config: tuple[CoATConfig | None, str] = (None, "")  # see `_config_yaml`
        self.experts = {name: experts[name] for name in cfg.experts.names}
        self.backbone: Backbone = build_backbone(cfg, device)
        model = self.backbone.model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed(cfg.train.seed))
            model.set_input_embeddings(SlotEmbedding(model.get_input_embeddings(), self.backbone.thinking))
            lora = LoraConfig(
                r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=_lora_targets(cfg), modules_to_save=list(cfg.lora.modules_to_save) or None,
            )
            with warnings.catch_warnings():  # peft reads transformers' deprecated alias; nothing of coat's to change
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                self.lm = get_peft_model(model, lora)
            self.slot_table.requires_grad_(True)
            # K = 0 (the plain LoRA baseline) and thinking.targets=none (pause positions) supervise nothing, so
            # they have no heads (DDP wants every trained parameter to get a gradient).
            hidden = self.backbone.hidden_size
            self.heads = nn.ModuleDict(
                {name: make_head(cfg.heads, hidden, spec, cfg.thinking.max_slots)
                 for name, spec in self.experts.items()}
                if cfg.thinking.supervised else {}
            ).to(device)
        # What training may change, whatever a stage freezes: saved, loaded and optimised as one fixed set.
        self.trained_names = [name for name, p in self.named_parameters() if p.requires_grad]
        self.slot_scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # `standardise_slots`

    @property
    def slot_table(self) -> nn.Parameter:
        return self.backbone.model.get_input_embeddings().table

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """The trained parameters by group (`config.PARAM_GROUPS`): the slot table, the heads, and the LLM's
        LoRA weights with `lora.modules_to_save`."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {group: [] for group in PARAM_GROUPS}
        slot_table = self.slot_table
        for name, param in self._trained():
            group = "slots" if param is slot_table else "heads" if name.startswith("heads.") else "lora"
            groups[group].append((name, param))
        return groups

    def _trained(self) -> list[tuple[str, nn.Parameter]]:
        """The trained parameters with their names as `named_parameters` gives them (FSDP inserts a part)."""
        wanted = set(self.trained_names)
        return [(name, p) for name, p in self.named_parameters() if name.replace(FSDP_UNIT, "") in wanted]

    def set_trainable(self, groups: list[str]) -> None:
        """Train exactly `groups`: their parameters take gradients, every other trained parameter is frozen."""
        for group, members in self.parameter_groups().items():
            for _, param in members:
                param.requires_grad_(group in groups)

    def parameter_counts(self) -> dict[str, int]:
        """Trained parameters per group, and in all."""
        counts = {group: sum(p.numel() for _, p in members) for group, members in self.parameter_groups().items()}
        return counts | {"total": sum(counts.values())}

    @property
    def num_slots(self) -> int:
        return self.cfg.thinking.num_slots

    def encode(self, audio, prompts, responses=None) -> dict[str, torch.Tensor]:
        """`Backbone.encode` with this model's K and placement."""
        return self.backbone.encode(
            audio, prompts, responses, num_slots=self.num_slots, placement=self.cfg.thinking.placement
        )

    def _model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.slot_table.device
        keys = ("input_ids", "attention_mask", *self.backbone.spec.audio_keys)
        return {key: batch[key].to(device) for key in keys}

    def forward(
        self, batch: Mapping[str, torch.Tensor], *, stage: StageConfig | None = None, expert_scale: float = 1.0
    ) -> CoATOutput:
        """Losses on one batch from `encode` plus targets `target.<expert>` ([B, T, D] or [B, D]),
        `target_len.<expert>` ([B], frame-level experts) and optionally `duration` ([B] seconds: aligns frames to
        slots by time, see `targets.py`). Raises KeyError naming a missing target.

        `stage` replaces the config's CE and expert weights with the stage's; `expert_scale` multiplies every
        expert weight (a stage's annealing)."""
        k = self.num_slots
        supervise = k > 0 and len(self.heads) > 0
        inputs = self._model_inputs(batch)
        logits, hidden_states = self.next_token_logits(inputs, predicting(batch["labels"]), hidden_states=supervise)
        losses = {"ce": response_ce(logits, batch["labels"])}
        total = (self.cfg.loss.ce_weight if stage is None else stage.ce_weight) * losses["ce"]
        slot_states = None
        if supervise:
            hidden = hidden_states[self.cfg.heads.layer]
            is_slot = self.backbone.thinking.is_slot(inputs["input_ids"])
            slot_states = hidden[is_slot].view(hidden.shape[0], k, hidden.shape[-1])
            for name, spec in self.experts.items():
                target = self.slot_target(name, batch, hidden.device)
                prediction = self.heads[name](slot_states.float())
                kind = self.cfg.loss.distance.get(name, default_distance(spec))
                losses[name] = distance(kind, prediction, target)
                total = total + expert_scale * expert_weight(self.cfg, name, stage) * losses[name]
        return CoATOutput(loss=total, losses=losses, logits=logits, slot_states=slot_states)

    def next_token_logits(self, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor,
                          hidden_states: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The LLM (LoRA and slots included) on `inputs`, its vocabulary logits [N, V] at the `positions` ([B, T]
        bool) only, and every layer's hidden states when asked. The backbone's own forward projects every
        position: its `model` (audio merged, decoder run) and `lm_head` are called apart."""
        base = self.lm.get_base_model()
        out = base.model(**inputs, output_hidden_states=hidden_states, use_cache=False)
        return base.lm_head(out.last_hidden_state[positions.to(out.last_hidden_state.device)]), out.hidden_states

    def slot_target(self, name: str, batch: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """Expert `name`'s target as its head predicts it (`slot_targets`), standardised per slot where
        `standardise_slots` gave statistics. Raises KeyError naming a missing target."""
        if f"target.{name}" not in batch:
            raise KeyError(f"batch has no target for expert {name!r} (key 'target.{name}')")
        target = slot_targets(self.experts[name], batch[f"target.{name}"].to(device), batch.get(f"target_len.{name}"),
                              self.num_slots, batch.get("duration"))
        if name not in self.slot_scales:
            return target
        mean, std = (t.to(device) for t in self.slot_scales[name])
        return (target - mean) / std

    def standardise_slots(self, target_stats: Mapping[str, Mapping | None]) -> None:
        """Standardise frame-level continuous targets per slot with the training split's slot statistics (each
        expert's `slots` entry of `target_stats`, computed at this model's K; see `targets.py`). Raises ValueError
        when they were computed at another K."""
        for name, stats in target_stats.items():
            slots = (stats or {}).get("slots")
            if slots is None or name not in self.experts:
                continue
            if slots["k"] != self.num_slots:
                raise ValueError(f"slot statistics of {name!r} were computed at K={slots['k']}, the model has "
                                 f"K={self.num_slots}")
            std = torch.tensor(slots["std"], dtype=torch.float32).clamp_min(STD_FLOOR)
            self.slot_scales[name] = (torch.tensor(slots["mean"], dtype=torch.float32), std)

    @torch.no_grad()
    def generate(
        self, batch: Mapping[str, torch.Tensor], max_new_tokens: int, min_new_tokens: int = 0
    ) -> torch.Tensor:
        """Greedy continuation of a prompt batch (`encode` without responses): new token ids [B, <=N].

        `min_new_tokens` holds off the end-of-turn token, for latency measurements at a fixed length."""
        inputs = self._model_inputs(batch)
        tokenizer = self.backbone.tokenizer
        sequences = self.lm.generate(
            **inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
            eos_token_id=self.backbone.end_of_turn_id, pad_token_id=tokenizer.pad_token_id,
        )
        return sequences[:, inputs["input_ids"].shape[1]:]

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self._trained()}

    def save(self, directory: str | Path, trained: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the trained parts (safetensors), the config and what they were made for. `trained`: the trained
        parts when this model's own are shards (FSDP, see `coat.train.checkpoint.whole_trained_parts`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        trained = self.trained_state() if trained is None else trained
        # Bytes written by Python's own I/O: a full disk is an OSError naming the file, not a serializer's error.
        (directory / WEIGHTS_FILE).write_bytes(safetensors_bytes({k: v.contiguous().cpu() for k, v in trained.items()}))
        (directory / CONFIG_FILE).write_text(self._config_yaml())
        meta = {"made_for": self._made_for(), "experts": {n: asdict(s) for n, s in self.experts.items()}}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    def _config_yaml(self) -> str:
        """The config as saved (`redacted`), written out again only when the model is given another: OmegaConf takes
        tens of milliseconds per config, and a run saves one every few steps."""
        if self._saved_config[0] is not self.cfg:
            self._saved_config = (self.cfg, to_yaml(redacted(self.cfg)))
        return self._saved_config[1]

    def _made_for(self) -> dict:
        b, t = self.cfg.backbone, self.cfg.thinking
        return {"backbone.name": b.name, "backbone.size": b.size, "backbone.checkpoint": b.checkpoint,
                "thinking.num_slots": t.num_slots, "thinking.max_slots": t.max_slots,
                "heads.kind": self.cfg.heads.kind, "experts.names": list(self.experts)}

    def load_trained(self, directory: str | Path) -> None:
        """Load trained parts saved by `save`. Raises ValueError when they were made for another backbone,
        slot count, head kind or expert set, and FileNotFoundError when `directory` holds no checkpoint."""
        directory = Path(directory)
        if not (directory / META_FILE).is_file():
            raise FileNotFoundError(not_a_checkpoint(directory, META_FILE))
        made_for = json.loads((directory / META_FILE).read_text())["made_for"]
        for key, ours in self._made_for().items():
            if made_for[key] != ours:
                raise ValueError(
                    f"checkpoint {directory} was made for {key}={made_for[key]!r}, but this model has "
                    f"{key}={ours!r}: load it with its own config (CoATModel.load(dir)) or retrain."
                )
        state = load_file(directory / WEIGHTS_FILE)
        params = dict(self.named_parameters())
        expected = set(self.trained_state())
        if set(state) != expected:
            raise ValueError(
                f"checkpoint {directory} does not match this model's trained parts: "
                f"missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}"
            )
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    @classmethod
    def load(cls, directory: str | Path, config: CoATConfig | None = None, device: str | torch.device = "cpu"
             ) -> CoATModel:
        """Rebuild a saved model on `device`: its own config by default, or `config` (which must fit the
        checkpoint)."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(not_a_checkpoint(directory, CONFIG_FILE))
        cfg = config or from_yaml((directory / CONFIG_FILE).read_text())
        meta = json.loads((directory / META_FILE).read_text())
        experts = {name: ExpertSpec(**spec) for name, spec in meta["experts"].items()}
        model = cls(cfg, experts if set(cfg.experts.names) <= set(experts) else None, device=device)
        model.load_trained(directory)
        return model
