"""Signal-processing experts without weights: log-mel frames (reconstruction) and prosody statistics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchaudio

from coat.experts.base import ExpertSpec, check_waveforms, version_hash

SAMPLE_RATE = 16_000
HOP = 160  # 100 fps; frame t centred on sample t * HOP, T = 1 + samples // HOP
_REVISION = 1

# Prosody vector, one value per name, in this order. log-f0 is the natural log of f0 in Hz over voiced frames
# (all three are 0 when no frame is voiced); range = 95th - 5th percentile; energy is the 25 ms frame power in
# dB re full scale (floor -100 dB) over all frames; peak rate = energy-envelope peaks per second, a
# syllable-rate proxy (peaks at least 6 dB above the envelope's minimum within +-150 ms, above -50 dB).
PROSODY_FIELDS = ("log_f0_mean", "log_f0_std", "log_f0_range", "voiced_fraction",
                  "energy_db_mean", "energy_db_std", "energy_db_range", "energy_peak_rate")
_PITCH_WIN = 640  # 40 ms: two periods of the lowest f0
_ENERGY_WIN = 400  # 25 ms
_VOICED_CLARITY = 0.5  # normalised autocorrelation at the pitch lag
_VOICED_MIN_DB = -50.0
_PEAK_RADIUS, _VALLEY_RADIUS, _PEAK_PROMINENCE_DB = 7, 15, 6.0  # frames, frames, dB


def _frames(wave: torch.Tensor, win: int) -> torch.Tensor:
    """Centred frames [1 + len // HOP, win], zero-padded at both ends."""
    padded = F.pad(wave, (win // 2, win // 2))
    return padded.unfold(0, win, HOP)[: 1 + len(wave) // HOP]


class MelExpert:
    """Log-mel frames [T, n_mels]: natural log of mel power (25 ms Hann window, 100 fps), floored at 1e-10."""

    role = "reconstruction"
    source = "torchaudio log-mel"
    sample_rate = SAMPLE_RATE

    @staticmethod
    def describe(name: str = "mel", n_mels: int = 80, **_settings) -> ExpertSpec:
        return ExpertSpec(name=name, dim=n_mels, frame_rate=SAMPLE_RATE / HOP, kind="continuous")

    def __init__(self, name: str = "mel", n_mels: int = 80, device: str = "cpu"):
        """Raises ValueError when `n_mels` is not in [1, 201] (the 400-point FFT's bins)."""
        if not 1 <= n_mels <= 201:
            raise ValueError(f"mel expert {name!r}: n_mels={n_mels} must be in [1, 201]")
        self.name, self.device = name, torch.device(device)
        # Zero padding (not reflect) makes a clip's frames independent of how far the batch pads it.
        self.mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=400, hop_length=HOP, n_mels=n_mels,
                                                        pad_mode="constant").to(self.device)
        self.spec = self.describe(name, n_mels)
        self.version = version_hash([], {"expert": "log-mel", "n_mels": n_mels, "revision": _REVISION})

    @torch.inference_mode()
    def __call__(self, waveforms: list[torch.Tensor],
                 sample_rate: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """Per clip [T, n_mels] float32.

        Raises:
            ValueError, TypeError: bad batch (see `check_waveforms`).
        """
        clips = check_waveforms(self.name, waveforms, SAMPLE_RATE, sample_rate)
        batch = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True).to(self.device)
        logmel = self.mel(batch).clamp_min(1e-10).log().transpose(1, 2).cpu()
        counts = [1 + len(c) // HOP for c in clips]
        return [m[:n] for m, n in zip(logmel, counts, strict=True)], counts


class ProsodyExpert:
    """Clip-level prosody vector [len(PROSODY_FIELDS)] from an autocorrelation pitch track and energy."""

    role = "prosody"
    source = "coat (autocorrelation pitch, energy; torchaudio)"
    sample_rate = SAMPLE_RATE

    @staticmethod
    def describe(name: str = "prosody", **_settings) -> ExpertSpec:
        return ExpertSpec(name=name, dim=len(PROSODY_FIELDS), frame_rate=None, kind="continuous")

    def __init__(self, name: str = "prosody", fmin: float = 60.0, fmax: float = 500.0):
        """`fmin`/`fmax` bound the pitch search.

        Raises:
            ValueError: unless 2 * SAMPLE_RATE / _PITCH_WIN <= fmin < fmax <= SAMPLE_RATE / 8.
        """
        if not 2 * SAMPLE_RATE / _PITCH_WIN <= fmin < fmax <= SAMPLE_RATE / 8:
            raise ValueError(f"prosody expert {name!r}: need {2 * SAMPLE_RATE / _PITCH_WIN} <= fmin < fmax "
                             f"<= {SAMPLE_RATE / 8}, got fmin={fmin}, fmax={fmax}")
        self.name, self.fmin, self.fmax = name, fmin, fmax
        self.spec = self.describe(name)
        self.version = version_hash([], {"expert": "prosody", "fields": PROSODY_FIELDS, "fmin": fmin,
                                         "fmax": fmax, "revision": _REVISION})

    @torch.inference_mode()
    def __call__(self, waveforms: list[torch.Tensor],
                 sample_rate: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """Per clip a [len(PROSODY_FIELDS)] float32 vector; counts are 1.

        Raises:
            ValueError, TypeError: bad batch (see `check_waveforms`).
        """
        clips = check_waveforms(self.name, waveforms, SAMPLE_RATE, sample_rate)
        features = [self._stats(c) for c in clips]
        return features, [1] * len(features)

    def _stats(self, wave: torch.Tensor) -> torch.Tensor:
        energy_db = 10 * torch.log10(_frames(wave, _ENERGY_WIN).pow(2).mean(-1) + 1e-10)
        f0, clarity = self.track_pitch(wave)
        voiced = (clarity >= _VOICED_CLARITY) & (energy_db >= _VOICED_MIN_DB)
        log_f0 = f0[voiced].log()
        pitch = [log_f0.mean(), log_f0.std(correction=0), _spread(log_f0)] if voiced.any() else [0.0] * 3
        seconds = len(wave) / SAMPLE_RATE
        return torch.tensor([*pitch, voiced.float().mean(), energy_db.mean(), energy_db.std(correction=0),
                             _spread(energy_db), _peak_count(energy_db) / seconds], dtype=torch.float32)

    def track_pitch(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 in Hz and clarity (normalised autocorrelation at the chosen lag, ~1 = periodic) per 10 ms frame.

        The lag is the first local maximum of the autocorrelation within 90% of the best one in
        [fmin, fmax], refined by a parabola: picking the global best would often land on twice the period.
        """
        frames = _frames(wave, _PITCH_WIN)
        frames = frames - frames.mean(-1, keepdim=True)
        n = frames.shape[-1]
        power = torch.fft.rfft(frames, 2 * n).abs().pow(2)
        acf = torch.fft.irfft(power, 2 * n)[:, :n] / (n - torch.arange(n))  # unbiased
        lo, hi = math.floor(SAMPLE_RATE / self.fmax), math.ceil(SAMPLE_RATE / self.fmin)
        c = acf[:, lo - 1:hi + 2] / acf[:, :1].clamp_min(1e-12)  # one lag of margin on both sides
        mid = c[:, 1:-1]
        best = mid.max(-1, keepdim=True).values
        peaks = (mid >= c[:, :-2]) & (mid > c[:, 2:]) & (mid >= 0.9 * best)
        i = peaks.float().argmax(-1, keepdim=True) + 1  # index into c
        left, centre, right = c.gather(1, i - 1), c.gather(1, i), c.gather(1, i + 1)
        curve = left - 2 * centre + right
        shift = torch.where(curve < 0, 0.5 * (left - right) / curve.clamp_max(-1e-12), 0.0)
        f0 = SAMPLE_RATE / (lo - 1 + i + shift.clamp(-0.5, 0.5))
        clarity = torch.where(peaks.any(-1, keepdim=True), centre, torch.zeros_like(centre))
        return f0[:, 0], clarity[:, 0]


def _spread(values: torch.Tensor) -> torch.Tensor:
    return torch.quantile(values, 0.95) - torch.quantile(values, 0.05)


def _peak_count(energy_db: torch.Tensor) -> int:
    """Energy-envelope peaks: local maxima (+-70 ms) of the 50 ms-smoothed dB envelope that stand out."""
    env = F.avg_pool1d(energy_db[None, None], 5, 1, 2, count_include_pad=False)[0, 0]
    local_max = F.max_pool1d(env[None, None], 2 * _PEAK_RADIUS + 1, 1, _PEAK_RADIUS)[0, 0]
    valley = -F.max_pool1d(-env[None, None], 2 * _VALLEY_RADIUS + 1, 1, _VALLEY_RADIUS)[0, 0]
    peaks = (env == local_max) & (env - valley >= _PEAK_PROMINENCE_DB) & (env >= _VOICED_MIN_DB)
    return int(peaks.sum())
