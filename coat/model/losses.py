"""Distances D_e between a head's prediction and its expert target, and the response cross-entropy.

Every distance is scaled so that a prediction that knows nothing scores about 1: the mean of a standardised
target (0) under `mse` and `smooth_l1`, an unrelated direction under `cosine`, the uniform distribution under
`ce`, probability 1/2 per label under `bce`. Expert losses then share one scale, so a loss weight means what a
sweep over weights thinks it means, whatever the expert's dimension or number of classes.
"""

import math

import torch
import torch.nn.functional as F

from coat.backbones.base import IGNORE_INDEX
from coat.config import DISTANCES

# E[smooth_l1(x, 0)] for x ~ N(0, 1) with beta = 1: 0.5 E[x^2; |x| < 1] + E[|x| - 0.5; |x| >= 1].
_PHI_1, _INSIDE = math.exp(-0.5) / math.sqrt(2 * math.pi), math.erf(1 / math.sqrt(2))
SMOOTH_L1_UNINFORMED = 0.5 * (_INSIDE - 2 * _PHI_1) + 2 * _PHI_1 - 0.5 * (1 - _INSIDE)


def distance(kind: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over slots and clips, scaled as the module docstring says. `ce` treats the target as a class
    distribution per slot (softmax over the prediction), `bce` as independent label probabilities (sigmoid).
    Raises ValueError for an unknown kind."""
    prediction = prediction.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(prediction, target, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(prediction, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(prediction, target) / SMOOTH_L1_UNINFORMED
    if kind == "ce":
        return -(target * F.log_softmax(prediction, dim=-1)).sum(-1).mean() / math.log(prediction.shape[-1])
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(prediction, target) / math.log(2)
    raise ValueError(f"unknown distance {kind!r}; one of {', '.join(DISTANCES)}")


def predicting(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose next token is labelled (a response token), the only ones whose logits the
    response cross-entropy reads."""
    following = labels[:, 1:] != IGNORE_INDEX
    return torch.cat([following, torch.zeros_like(following[:, :1])], dim=1)


def response_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the response: `logits` [N, V] at the `predicting(labels)` positions, in order,
    upcast to float32 (only these: at a 150k vocabulary, every position's would take gigabytes)."""
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX].to(logits.device)
    return F.cross_entropy(logits.float(), targets)
