"""Expert targets as the slots see them: slot i regresses the expert's frames over the i-th K-th of the clip.

For a clip of D seconds, slot i (0-based) covers the audio span [i D / K, (i + 1) D / K). An expert's frame t
sits at (t + frame_offset) / frame_rate seconds (its centre: offset 0 for frames centred on t / rate, 0.5 for
frames spanning [t, t + 1) / rate), and belongs to the span holding that time (the last span also takes frames
at or past D). Slot i's target is the mean of its frames; a span that holds no frame (K above the frame count,
or a coarse expert) takes the frame nearest its centre. Every expert is thus aligned to the slots by time, not
by its own frame count, whatever its rate. Clip-level experts have no time axis: the heads read their target
from the mean over slots.

Frames are standardised per frame, but a slot's mean over its frames varies less than a frame does (the more so
the fewer the slots), so a continuous frame-level target is standardised again per slot with `slot_statistics` of
the training split at the run's K: an uninformed prediction then scores about 1 at every K and for every expert,
and loss weights compare frame-level with clip-level experts.
"""

import hashlib
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torch.nn.functional as F

from coat.config import CoATConfig
from coat.data.store import FeatureStore, read_located, standardise
from coat.data.stream import Stream
from coat.experts.base import ExpertSpec
from coat.experts.registry import expert_spec


def align_to_slots(frames: torch.Tensor, lengths: torch.Tensor, k: int, frame_rate: float,
                   durations: torch.Tensor | None = None, frame_offset: float = 0.0) -> torch.Tensor:
    """[B, T, D] frames with `lengths` valid -> [B, K, D]: slot i's mean over the frames in its span (above).

    `durations` [B] are the clips' lengths in seconds (default: valid frames / frame_rate).
    Raises ValueError for a clip with no valid frame.
    """
    if (lengths < 1).any():
        raise ValueError(f"every clip needs at least one target frame, got lengths {lengths.tolist()}")
    device = frames.device
    lengths = lengths.to(device).long()
    durations = (lengths / frame_rate if durations is None else durations.to(device)).double()
    t = torch.arange(frames.shape[1], device=device, dtype=torch.float64)
    seconds = (t + frame_offset) / frame_rate  # [T]
    slot_of = (seconds[None, :] * k / durations[:, None]).floor().clamp(0, k - 1).long()  # [B, T]
    valid = t[None, :] < lengths[:, None]
    slots = torch.arange(k, device=device)
    weights = (slot_of[:, None, :] == slots[None, :, None]) & valid[:, None, :]  # [B, K, T]
    centre = (slots[None, :] + 0.5) * durations[:, None] / k  # [B, K] seconds
    nearest = (centre * frame_rate - frame_offset).round().long().clamp(min=0)
    nearest = torch.minimum(nearest, lengths[:, None] - 1)
    empty = ~weights.any(-1, keepdim=True)
    weights = torch.where(empty, F.one_hot(nearest, frames.shape[1]).bool(), weights).to(frames.dtype)
    return weights @ frames / weights.sum(-1, keepdim=True)


def slot_targets(spec: ExpertSpec, values: torch.Tensor, lengths: torch.Tensor | None, k: int,
                 durations: torch.Tensor | None = None) -> torch.Tensor:
    """An expert's batch target shaped like its head's output: [B, K, D] per slot, or [B, D] per clip.

    Discrete experts may give class ids [B, T]; they become one-hot rows, so pooled spans are class
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
    return align_to_slots(values, lengths, k, spec.frame_rate, durations, spec.frame_offset)


def slot_statistics(clips: Iterable[tuple[np.ndarray, float]], k: int, frame_rate: float, frame_offset: float = 0.0
                    ) -> dict:
    """Per-dim mean and std (population) of the K slot targets (`align_to_slots`) of `clips`: (frames [T, D],
    standardised per frame; seconds the clip lasts), as `{"k", "mean", "std", "slots"}`. Raises ValueError for no
    clip."""
    total = total_sq = count = 0
    for frames, seconds in clips:
        pooled = align_to_slots(torch.from_numpy(np.asarray(frames, np.float64))[None], torch.tensor([len(frames)]),
                                k, frame_rate, torch.tensor([seconds]), frame_offset)[0].numpy()
        total, total_sq, count = total + pooled.sum(0), total_sq + (pooled * pooled).sum(0), count + len(pooled)
    if not count:
        raise ValueError("slot statistics need at least one clip")
    mean = total / count
    return {"k": k, "mean": mean.tolist(), "std": np.sqrt(np.maximum(total_sq / count - mean * mean, 0)).tolist(),
            "slots": int(count)}


def target_statistics(cfg: CoATConfig, train: Stream, store: Path) -> dict[str, dict | None]:
    """Per expert, the statistics its targets are standardised with (the training split's, see
    `FeatureStore.split_stats`), with `slots` (`slot_statistics`) for continuous frame-level experts when K > 0: the
    training clips' targets pooled to the run's K slots, so that each slot's target is standardised again where the
    loss sees it. Slot statistics read every training clip's frames, so `store` keeps them (`kept_stats`) for the
    next run of the same split, expert version and K."""
    stats = {name: source.stats for name, source in train.sources.items()}
    if not cfg.thinking.supervised:
        return stats
    items = pd.DataFrame(train.items).drop_duplicates("clip_hash")
    k, features = cfg.thinking.num_slots, FeatureStore(store)
    for name, source in train.sources.items():
        spec = expert_spec(name, **cfg.expert_settings.get(name, {}))
        if source.stats is None or spec.clip_level:
            continue
        key = f"{source.stats['id']}/slots/k={k}/rate={spec.frame_rate!r}/offset={spec.frame_offset!r}"

        def compute(stats_id: str, name=name, spec=spec, source=source) -> dict:
            located = items[["clip_hash", f"part.{name}", f"row.{name}"]].set_axis(["clip_hash", "part", "row"],
                                                                                   axis=1)
            frames = read_located(located)
            seconds = [min(sf.info(path).duration, train.crop_seconds or math.inf) for path in items["audio_path"]]
            clips = ((standardise(frames[h], source.stats), s)
                     for h, s in zip(items["clip_hash"], seconds, strict=True))
            return {"id": stats_id, **slot_statistics(clips, k, spec.frame_rate, spec.frame_offset)}

        slots = features.kept_stats(name, source.version, hashlib.sha256(key.encode()).hexdigest()[:16], compute)
        stats[name] = dict(source.stats) | {"slots": slots}
    return stats
