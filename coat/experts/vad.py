"""Speech-activity expert: silero-vad's speech probability per 512 samples (32 ms, 31.25 fps).

The JIT model ships in the silero-vad wheel. It is loaded by path rather than through `silero_vad`, whose
import calls `torch.set_num_threads(1)` for the whole process.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from coat.experts.base import ExpertSpec, check_waveforms, version_hash

SAMPLE_RATE = 16_000
CHUNK = 512
_REVISION = 1


def _model_path() -> Path:
    spec = importlib.util.find_spec("silero_vad")  # locates the package without running its __init__
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("silero-vad is not installed (pip install silero-vad)")
    return Path(spec.origin).parent / "data" / "silero_vad.jit"


class VadExpert:
    """Per chunk [speech probability]; T = ceil(samples / 512), the last chunk zero-padded.

    The model is causal, so padding a batch to its longest clip leaves each clip's probabilities unchanged.
    """

    role = "speech-activity"
    source = "silero-vad"
    sample_rate = SAMPLE_RATE

    @staticmethod
    def describe(name: str = "vad", **_settings) -> ExpertSpec:
        return ExpertSpec(name=name, dim=1, frame_rate=SAMPLE_RATE / CHUNK, kind="continuous",
                          frame_offset=0.5)

    def __init__(self, name: str = "vad", device: str = "cpu"):
        """Load silero-vad's JIT model.

        Raises:
            ModuleNotFoundError: silero-vad is not installed.
        """
        self.name, self.device = name, torch.device(device)
        path = _model_path()
        self.model = torch.jit.load(str(path), map_location=self.device).eval()
        self.spec = self.describe(name)
        self.version = version_hash([path], {"expert": "silero-vad", "revision": _REVISION})

    @torch.inference_mode()
    def __call__(self, waveforms: list[torch.Tensor],
                 sample_rate: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """Per clip [T, 1] float32 probabilities.

        Raises:
            ValueError, TypeError: bad batch (see `check_waveforms`).
        """
        clips = check_waveforms(self.name, waveforms, SAMPLE_RATE, sample_rate)
        counts = [-(-len(c) // CHUNK) for c in clips]
        batch = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)
        # The profiling JIT executor re-specialises on new shapes: ~50x slower for the first calls of each.
        with torch.jit.optimized_execution(False):
            probs = self.model.audio_forward(batch.to(self.device), SAMPLE_RATE).cpu()
        return [p[:n, None].float() for p, n in zip(probs, counts, strict=True)], counts
