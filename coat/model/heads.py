"""Projection heads: slot hidden states -> one expert's target. Trained, then dropped at inference.

A head reads the K slot states in order: slot i regresses the i-th K-th of the clip (`targets.py`), so each head
adds a per-slot position (`heads.position`) to the states it reads. Without it a transformer head is
permutation-equivariant and a linear head position-blind: neither could tell which span a state should
describe except through what the LLM put into it.
"""

import math

import torch
from torch import nn

from coat.config import HeadsConfig
from coat.experts.base import ExpertSpec


def sinusoidal(positions: int, dim: int) -> torch.Tensor:
    """The Transformer's fixed position table [positions, dim]: sin on even features, cos on odd ones."""
    position = torch.arange(positions, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10_000.0) / dim))
    table = torch.zeros(positions, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class SlotPosition(nn.Module):
    """Adds slot i's position to the i-th state: fixed sinusoids, learned rows (one per slot up to `max_slots`,
    so the parameter count does not depend on K), or nothing."""

    def __init__(self, kind: str, max_slots: int, dim: int):
        super().__init__()
        self.kind = kind
        if kind == "learned":
            self.table = nn.Parameter(0.02 * torch.randn(max_slots, dim))
        elif kind == "sinusoidal":
            self.register_buffer("table", sinusoidal(max_slots, dim), persistent=False)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return states
        return states + self.table[: states.shape[1]].to(states.dtype)


class LinearHead(nn.Module):
    def __init__(self, hidden: int, spec: ExpertSpec, cfg: HeadsConfig, max_slots: int):
        super().__init__()
        self.clip_level = spec.clip_level
        self.position = SlotPosition(cfg.position, max_slots, hidden)
        self.out = nn.Linear(hidden, spec.dim)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        slots = self.position(slots)
        return self.out(slots.mean(1) if self.clip_level else slots)


class TransformerHead(nn.Module):
    """A small encoder over the K slots (as in the paper), so a slot can draw on its neighbours."""

    def __init__(self, hidden: int, spec: ExpertSpec, cfg: HeadsConfig, max_slots: int):
        super().__init__()
        self.clip_level = spec.clip_level
        self.inp = nn.Linear(hidden, cfg.dim)
        self.position = SlotPosition(cfg.position, max_slots, cfg.dim)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.num_attention_heads, 2 * cfg.dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.out = nn.Linear(cfg.dim, spec.dim)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        encoded = self.encoder(self.position(self.inp(slots)))
        return self.out(encoded.mean(1) if self.clip_level else encoded)


def make_head(cfg: HeadsConfig, hidden: int, spec: ExpertSpec, max_slots: int) -> nn.Module:
    head = LinearHead if cfg.kind == "linear" else TransformerHead
    return head(hidden, spec, cfg, max_slots)
