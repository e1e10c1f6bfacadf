"""Pitch expert: CREPE (torchcrepe, weights in the wheel) -> log-f0 and periodicity at 100 fps.

Decoding uses `weighted_argmax`: torchcrepe's default Viterbi decoder costs ~18 s per 3 s clip on a CPU.
Frames of every clip in a batch go through the network together; decoding stays per clip.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from coat.experts.base import ExpertSpec, check_waveforms, version_hash

SAMPLE_RATE = 16_000
HOP = 160  # 10 ms: 100 fps, frame t centred on sample t * HOP
MODELS = ("tiny", "full")
_REVISION = 1  # bump when the code below changes what the features are


def _frame_count(num_samples: int) -> int:
    return 1 + num_samples // HOP


class PitchExpert:
    """CREPE pitch: per frame [log f0 in Hz (natural log), periodicity in [0, 1]].

    A frame is voiced when its periodicity reaches `threshold`. Unvoiced frames carry the log-f0 linearly
    interpolated between the nearest voiced frames (held flat before the first and after the last), so the
    target is continuous; a clip with no voiced frame gets log(fmin) throughout. Periodicity says which
    frames were voiced.
    """

    role = "pitch"
    source = "torchcrepe"
    sample_rate = SAMPLE_RATE

    @staticmethod
    def describe(name: str = "pitch", **_settings) -> ExpertSpec:
        return ExpertSpec(name=name, dim=2, frame_rate=SAMPLE_RATE / HOP, kind="continuous")

    def __init__(self, name: str = "pitch", model: str = "tiny", fmin: float = 50.0, fmax: float = 2006.0,
                 threshold: float = 0.21, device: str = "cpu", batch_frames: int = 512):
        """Load the CREPE `model` ("tiny" or "full"); `batch_frames` bounds memory, not results.

        Raises:
            ValueError: unknown `model`, an empty or inverted [fmin, fmax] range, or `threshold` outside [0, 1].
        """
        # torchcrepe imports librosa (seconds): keep it out of the import path of specs and the registry.
        import torchcrepe

        if model not in MODELS:
            raise ValueError(f"pitch expert {name!r}: model={model!r} must be one of {MODELS}")
        if not 0 < fmin < fmax <= torchcrepe.MAX_FMAX:
            raise ValueError(f"pitch expert {name!r}: need 0 < fmin < fmax <= {torchcrepe.MAX_FMAX}, "
                             f"got fmin={fmin}, fmax={fmax}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"pitch expert {name!r}: threshold={threshold} must be in [0, 1]")
        self._crepe = torchcrepe
        self.name, self.model, self.fmin, self.fmax, self.threshold = name, model, fmin, fmax, threshold
        self.source = f"torchcrepe {model}"
        self.device, self.batch_frames = torch.device(device), batch_frames
        weights = Path(torchcrepe.__file__).parent / "assets" / f"{model}.pth"
        # A private instance: torchcrepe's own `infer` caches one global model and reloads it whenever
        # `tiny` and `full` alternate in one process.
        self.net = torchcrepe.Crepe(model)
        self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net.eval().to(self.device)
        self.spec = self.describe(name)
        self.version = version_hash([weights], {"expert": "crepe", "model": model, "fmin": fmin, "fmax": fmax,
                                                "threshold": threshold, "revision": _REVISION})

    @torch.inference_mode()
    def __call__(self, waveforms: list[torch.Tensor],
                 sample_rate: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """Per clip [T, 2] float32 with T = 1 + samples // 160.

        Raises:
            ValueError, TypeError: bad batch (see `check_waveforms`).
        """
        clips = check_waveforms(self.name, waveforms, SAMPLE_RATE, sample_rate)
        frames = [next(self._crepe.preprocess(c[None], SAMPLE_RATE, HOP, None, "cpu", True)) for c in clips]
        stacked = torch.cat(frames)
        probs = torch.cat([self.net(chunk.to(self.device)).cpu()
                           for chunk in stacked.split(self.batch_frames)])
        features = []
        for p in probs.split([len(f) for f in frames]):
            f0, periodicity = self._crepe.postprocess(p.T[None], self.fmin, self.fmax,
                                                      self._crepe.decode.weighted_argmax,
                                                      return_periodicity=True)
            features.append(torch.stack([self._log_f0(f0[0], periodicity[0]), periodicity[0]], dim=1).float())
        return features, [len(f) for f in features]

    def _log_f0(self, f0: torch.Tensor, periodicity: torch.Tensor) -> torch.Tensor:
        voiced = (periodicity >= self.threshold).numpy()
        if not voiced.any():
            return torch.full_like(f0, math.log(self.fmin))
        log_f0 = np.log(f0.double().numpy())
        steps = np.arange(len(log_f0))
        return torch.from_numpy(np.interp(steps, steps[voiced], log_f0[voiced]))
