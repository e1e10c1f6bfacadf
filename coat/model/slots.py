"""The thinking slots: a small trainable table behind the backbone's own input embedding.

Swapping the embedding module (rather than feeding `inputs_embeds`) keeps each backbone's forward, audio
merge, position encoding, KV cache and `generate` unchanged, so the block rides in the one prefill. For ids
outside the reserved range the output is the backbone's embedding bit for bit: K = 0 is the backbone.
"""

import torch
from torch import nn

from coat.backbones.base import ThinkingTokens


class SlotEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, thinking: ThinkingTokens):
        super().__init__()
        self.base = base
        self.first_id = thinking.first_id
        self.count = thinking.count
        scale = entry_std(base.weight.detach())
        # Kept in float32 like the LoRA weights, whatever the backbone dtype: it is trained.
        self.table = nn.Parameter(torch.randn(self.count, base.embedding_dim, device=base.weight.device) * scale)

    @property
    def weight(self) -> torch.Tensor:
        # Callers that inspect the embedding (dtype, device, tied heads) see the backbone's own matrix.
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        reserved = (input_ids >= self.first_id) & (input_ids < self.first_id + self.count)
        embedded = self.base(input_ids.masked_fill(reserved, 0))
        rows = self.table[(input_ids - self.first_id).clamp(0, self.count - 1)]
        return torch.where(reserved.unsqueeze(-1), rows.to(embedded.dtype), embedded)


def entry_std(weight: torch.Tensor, rows: int = 1024) -> float:
    """The standard deviation of every entry of `weight`, read `rows` rows at a time in float64: a real vocabulary's
    embedding (150k x 3584 in bf16) is never copied whole to float32 (2 GB) to learn one number."""
    blocks = weight.reshape(-1, weight.shape[-1]).split(rows)
    mean = sum(block.double().sum().item() for block in blocks) / weight.numel()
    squares = sum(((block.double() - mean) ** 2).sum().item() for block in blocks)
    return (squares / (weight.numel() - 1)) ** 0.5
