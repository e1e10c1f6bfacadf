"""Distances D_e between a head's prediction and its expert target, and the response cross-entropy."""

import torch
import torch.nn.functional as F

from coat.backbones.base import IGNORE_INDEX


def distance(kind: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over slots and clips. `ce` treats the target as a class distribution per slot."""
    prediction = prediction.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(prediction, target, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(prediction, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(prediction, target)
    if kind == "ce":
        return -(target * F.log_softmax(prediction, dim=-1)).sum(-1).mean()
    raise ValueError(f"unknown distance {kind!r}")


def response_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (response) positions only."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=IGNORE_INDEX
    )
