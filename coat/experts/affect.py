"""Affect expert: the eGeMAPS low-level descriptors (openSMILE), a standard affective feature set.

eGeMAPS v02 (Eyben et al., 2016) gives 25 descriptors per 10 ms frame: loudness, spectral balance (alpha
ratio, Hammarberg index, slopes, flux), MFCC 1-4, f0 in semitones, jitter, shimmer, HNR, harmonic differences
and three formants. openSMILE's frames start at 0 with their own windows; they are put on the 100 fps grid the
other frame-level experts share (frame t centred on sample t * 160, 1 + samples // 160 frames) by taking, for
each grid frame, the openSMILE frame whose centre is nearest. Descriptors openSMILE leaves undefined (clips
shorter than its window) are 0, as eGeMAPS writes unvoiced frames' voice descriptors.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from coat.experts.base import ExpertSpec, check_waveforms, version_hash

SAMPLE_RATE = 16_000
HOP = 160
DIM = 25
_REVISION = 1


class EgemapsExpert:
    """eGeMAPS v02 low-level descriptors [T, 25] at 100 fps."""

    role = "affect"
    sample_rate = SAMPLE_RATE

    @staticmethod
    def describe(name: str = "egemaps", **_settings) -> ExpertSpec:
        return ExpertSpec(name=name, dim=DIM, frame_rate=SAMPLE_RATE / HOP, kind="continuous")

    def __init__(self, name: str = "egemaps"):
        """Build openSMILE's eGeMAPS v02 extractor (its configuration ships in the wheel)."""
        # an expert's library loads where the expert runs (its actor), not in every process importing the registry
        import opensmile

        self.name = name
        self.smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                                     feature_level=opensmile.FeatureLevel.LowLevelDescriptors)
        self.source = f"opensmile {opensmile.__version__} (eGeMAPSv02 LLDs)"
        self.fields = tuple(self.smile.feature_names)
        self.spec = self.describe(name)
        self.version = version_hash([], {"expert": "egemaps", "opensmile": opensmile.__version__,
                                         "fields": self.fields, "revision": _REVISION})

    def __call__(self, waveforms: list[torch.Tensor],
                 sample_rate: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """Per clip [1 + samples // 160, 25] float32.

        Raises:
            ValueError, TypeError: bad batch (see `check_waveforms`).
        """
        clips = check_waveforms(self.name, waveforms, SAMPLE_RATE, sample_rate)
        features = [self._frames(c.numpy()) for c in clips]
        return features, [len(f) for f in features]

    def _frames(self, wave: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():  # "Segment too short, filling with NaN": handled below
            warnings.simplefilter("ignore", UserWarning)
            table = self.smile.process_signal(wave, SAMPLE_RATE)
        starts = table.index.get_level_values("start").total_seconds().to_numpy()
        ends = table.index.get_level_values("end").total_seconds().to_numpy()
        centres = (starts + ends) / 2
        grid = np.arange(1 + len(wave) // HOP) * HOP / SAMPLE_RATE
        index = np.abs(grid[:, None] - centres[None, :]).argmin(axis=1)  # nearest centre; ties go to the earlier
        values = np.nan_to_num(table.to_numpy(np.float32)[index], nan=0.0, posinf=0.0, neginf=0.0)
        return torch.from_numpy(values)
