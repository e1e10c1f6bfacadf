"""Speaker expert: resemblyzer's 256-d voice embedding (weights in the wheel), one vector per clip.

Follows resemblyzer's `preprocess_wav` + `embed_utterance` (1.6 s partials at 1.3 per second, averaged and
L2-normed) with two changes: the mel spectrogram comes from torchaudio (equal to librosa's to 1e-6, without
librosa's numba compile on first use), and the partials of all clips in a batch run through the LSTM together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio

from coat.experts.base import ExpertSpec, check_waveforms, version_hash

SAMPLE_RATE = 16_000
DIM = 256
_RATE, _MIN_COVERAGE = 1.3, 0.75  # resemblyzer's embed_utterance defaults
_REVISION = 1


class SpeakerExpert:
    """Unit-norm voice embedding [256]. Silence (or a clip the network maps to all zeros) gives zeros."""

    role = "speaker"
    source = "resemblyzer voice encoder"
    sample_rate = SAMPLE_RATE

    @staticmethod
    def describe(name: str = "speaker", **_settings) -> ExpertSpec:
        return ExpertSpec(name=name, dim=DIM, frame_rate=None, kind="continuous")

    def __init__(self, name: str = "speaker", device: str = "cpu"):
        """Load resemblyzer's pretrained voice encoder."""
        # an expert's library loads where the expert runs, not in every process importing the registry
        import resemblyzer
        from resemblyzer import hparams

        self.name, self.device = name, torch.device(device)
        weights = Path(resemblyzer.__file__).parent / "pretrained.pt"
        self.encoder = resemblyzer.VoiceEncoder(self.device, verbose=False, weights_fpath=weights).eval()
        self.mel = torchaudio.transforms.MelSpectrogram(
            SAMPLE_RATE, n_fft=hparams.mel_window_length * SAMPLE_RATE // 1000,
            hop_length=hparams.mel_window_step * SAMPLE_RATE // 1000, n_mels=hparams.mel_n_channels,
            mel_scale="slaney", norm="slaney", pad_mode="constant")
        self.spec = self.describe(name)
        self.version = version_hash([weights], {"expert": "resemblyzer", "rate": _RATE,
                                                "min_coverage": _MIN_COVERAGE, "revision": _REVISION})

    @torch.inference_mode()
    def __call__(self, waveforms: list[torch.Tensor],
                 sample_rate: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """Per clip a [256] float32 embedding; counts are 1.

        Raises:
            ValueError, TypeError: bad batch (see `check_waveforms`).
        """
        clips = check_waveforms(self.name, waveforms, SAMPLE_RATE, sample_rate)
        partials = [self._partials(_preprocess(c.numpy())) for c in clips]
        embeds = self.encoder(torch.cat(partials).to(self.device)).cpu().nan_to_num(0.0)  # 0/0 -> zeros
        features = [F.normalize(e.mean(0), dim=0) for e in embeds.split([len(p) for p in partials])]
        return features, [1] * len(features)

    def _partials(self, wav: np.ndarray) -> torch.Tensor:
        wav_slices, mel_slices = self.encoder.compute_partial_slices(len(wav), _RATE, _MIN_COVERAGE)
        wav = np.pad(wav, (0, max(0, wav_slices[-1].stop - len(wav))))
        mel = self.mel(torch.from_numpy(wav)).T  # [frames, 40]
        return torch.stack([mel[s] for s in mel_slices])


def _preprocess(wav: np.ndarray) -> np.ndarray:
    """resemblyzer's volume normalisation and long-silence trimming, safe on silence and tiny clips."""
    # as in `__init__`
    from resemblyzer.audio import normalize_volume, trim_long_silences
    from resemblyzer.hparams import audio_norm_target_dBFS

    if not np.any(wav):
        return wav  # normalize_volume would compute 0 * inf
    wav = normalize_volume(wav, audio_norm_target_dBFS, increase_only=True).astype(np.float32)
    trimmed = trim_long_silences(wav)
    return trimmed if len(trimmed) else wav  # all "silence" by webrtcvad: keep the clip rather than nothing
