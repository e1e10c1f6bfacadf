"""What an audio expert is, as the model and the feature store see it.

An expert turns waveforms into features the thinking slots learn to regress. The model only needs an
`ExpertSpec` (shape and kind of the target); the feature store also needs the callable `Expert`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

ExpertKind = Literal["continuous", "discrete", "multilabel"]


@dataclass(frozen=True)
class ExpertSpec:
    """Shape of one expert's target.

    `dim` is the feature size for continuous experts and the number of classes for discrete ones (whose
    frames are class posteriors or one-hot rows, classes exclusive) and multi-label ones (independent
    per-class probabilities, e.g. an AudioSet tagger's sigmoids). `frame_rate` is None for clip-level experts
    (one vector per clip), which the model regresses from the mean of the slots.
    """

    name: str
    dim: int
    frame_rate: float | None
    kind: ExpertKind = "continuous"
    # Where frame t's centre is, in frames: t + frame_offset. 0 for frames centred on t / frame_rate (STFT-style),
    # 0.5 for frames spanning [t, t + 1) / frame_rate (chunks, strided encoders). Aligns frames to slots by time.
    frame_offset: float = 0.0

    @property
    def clip_level(self) -> bool:
        return self.frame_rate is None


class Expert(Protocol):
    """A batched feature extractor whose outputs land in the feature store.

    `version` hashes weights and settings: a new version means new features and a recompute of that
    expert only.
    """

    name: str
    role: str
    version: str
    sample_rate: int
    spec: ExpertSpec

    def __call__(self, waveforms: list[torch.Tensor],
                 sample_rate: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """Mono float waveforms at `sample_rate` -> per-clip features [T, dim] (or [dim]) and frame counts.

        Clip-level experts return one [dim] vector and a count of 1 per clip. A caller that passes the rate it
        decoded at gets a ValueError when it is not the expert's `sample_rate`.
        """
        ...


def check_waveforms(name: str, waveforms: Sequence[torch.Tensor], expected_rate: int,
                    sample_rate: int | None = None) -> list[torch.Tensor]:
    """Validate a batch for expert `name`; return its clips as contiguous float32 CPU tensors [N].

    Experts cannot tell a wrong rate from the samples, so callers that know the decode rate pass
    `sample_rate` and get a clear error instead of silently wrong features.

    Raises:
        ValueError: `sample_rate` differs from `expected_rate`, the batch is empty, or a clip is not 1-D mono,
            has no samples or holds NaN/inf (the message names the clip's index).
        TypeError: the batch is not a sequence, or a clip is not a floating-point tensor or array.
    """
    if sample_rate is not None and sample_rate != expected_rate:
        raise ValueError(f"expert {name!r} needs {expected_rate} Hz audio, got {sample_rate} Hz: "
                         "resample first")
    if isinstance(waveforms, torch.Tensor) or not isinstance(waveforms, Sequence):
        raise TypeError(f"expert {name!r} takes a list of 1-D waveforms, got {type(waveforms).__name__}")
    if not waveforms:
        raise ValueError(f"expert {name!r} got an empty batch")
    clips = []
    for i, wave in enumerate(waveforms):
        wave = torch.as_tensor(wave)
        if not wave.is_floating_point():
            raise TypeError(f"expert {name!r}: clip {i} has dtype {wave.dtype}; "
                            "pass float samples in [-1, 1]")
        if wave.ndim != 1:
            raise ValueError(f"expert {name!r}: clip {i} has shape {tuple(wave.shape)}; expected mono 1-D "
                             "[samples] (mix channels down first)")
        if wave.numel() == 0:
            raise ValueError(f"expert {name!r}: clip {i} is empty (0 samples)")
        if not torch.isfinite(wave).all():
            raise ValueError(f"expert {name!r}: clip {i} holds NaN or inf samples")
        clips.append(wave.detach().to("cpu", torch.float32).contiguous())
    return clips


def version_hash(files: Iterable[str | Path], settings: Mapping[str, object]) -> str:
    """Short content hash of weight files plus settings: equal hashes mean equal features.

    Raises:
        FileNotFoundError: a weight file does not exist.
        TypeError: a setting is not JSON-serialisable.
    """
    digest = hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode())
    for path in sorted(Path(f) for f in files):
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:12]
