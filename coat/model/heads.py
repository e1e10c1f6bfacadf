"""Projection heads: slot hidden states -> one expert's target. Trained, then dropped at inference."""

import torch
from torch import nn

from coat.config import HeadsConfig
from coat.experts.base import ExpertSpec


class LinearHead(nn.Module):
    def __init__(self, hidden: int, spec: ExpertSpec):
        super().__init__()
        self.clip_level = spec.clip_level
        self.out = nn.Linear(hidden, spec.dim)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        return self.out(slots.mean(1) if self.clip_level else slots)


class TransformerHead(nn.Module):
    """A small encoder over the K slots (as in the paper), so a slot can draw on its neighbours."""

    def __init__(self, hidden: int, spec: ExpertSpec, cfg: HeadsConfig):
        super().__init__()
        self.clip_level = spec.clip_level
        self.inp = nn.Linear(hidden, cfg.dim)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.num_attention_heads, 2 * cfg.dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.out = nn.Linear(cfg.dim, spec.dim)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        encoded = self.encoder(self.inp(slots))
        return self.out(encoded.mean(1) if self.clip_level else encoded)


def make_head(cfg: HeadsConfig, hidden: int, spec: ExpertSpec) -> nn.Module:
    return LinearHead(hidden, spec) if cfg.kind == "linear" else TransformerHead(hidden, spec, cfg)
