"""Expert targets as the slots see them: frame sequences pooled into K segments, slot i <- segment i."""

import torch
import torch.nn.functional as F

from coat.experts.base import ExpertSpec


def pool_segments(frames: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, D] frames with `lengths` valid -> [B, K, D] means of K contiguous, near-equal segments.

    When a clip has fewer valid frames than K, neighbouring slots share a frame (each segment covers at
    least one). Raises ValueError for a clip with no valid frame.
    """
    if (lengths < 1).any():
        raise ValueError(f"every clip needs at least one target frame, got lengths {lengths.tolist()}")
    index = torch.arange(k, device=frames.device)
    lengths = lengths.to(frames.device).long()
    start = (index[None, :] * lengths[:, None]) // k
    end = torch.maximum(((index[None, :] + 1) * lengths[:, None]) // k, start + 1)
    t = torch.arange(frames.shape[1], device=frames.device)
    weights = ((t >= start[..., None]) & (t < end[..., None])).to(frames.dtype)  # [B, K, T]
    return weights @ frames / weights.sum(-1, keepdim=True)


def slot_targets(spec: ExpertSpec, values: torch.Tensor, lengths: torch.Tensor | None, k: int) -> torch.Tensor:
    """An expert's batch target shaped like its head's output: [B, K, D] per slot, or [B, D] per clip.

    Discrete experts may give class ids [B, T]; they become one-hot rows, so pooled segments are class
    distributions. Raises ValueError when the shape does not match the expert.
    """
    if spec.kind == "discrete" and not values.is_floating_point():
        values = F.one_hot(values.long(), spec.dim)
    values = values.float()
    if values.shape[-1] != spec.dim:
        raise ValueError(f"expert {spec.name!r}: target has {values.shape[-1]} features, expected {spec.dim}")
    if spec.clip_level:
        if values.dim() != 2:
            raise ValueError(f"expert {spec.name!r} is clip-level: target must be [B, {spec.dim}]")
        return values
    if values.dim() != 3 or lengths is None:
        raise ValueError(f"expert {spec.name!r} is frame-level: target must be [B, T, {spec.dim}] with lengths")
    return pool_segments(values, lengths, k)
