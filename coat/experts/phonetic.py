"""Phonetic expert: pocketsphinx all-phone decoding (en-us model in its wheel) -> one-hot phones, 100 fps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from coat.experts.base import ExpertSpec, check_waveforms, version_hash

SAMPLE_RATE = 16_000
HOP = 160  # pocketsphinx's 100 fps frame shift
# The en-us model's context-independent phones (its mdef): silence, two noise units, 39 CMU phones.
PHONES = ("SIL", "+NSN+", "+SPN+",
          "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH", "IH",
          "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW", "V",
          "W", "Y", "Z", "ZH")
_INDEX = {phone: i for i, phone in enumerate(PHONES)}
_DITHER_LSB = 2  # digital silence decodes as +SPN+ (speech noise) without a little noise
_REVISION = 1


class PhoneticExpert:
    """Phone posteriors as one-hot rows over `PHONES` (index 0 = SIL), T = 1 + samples // 160.

    Frames the decoder leaves unlabelled (the tail it does not frame, very short clips) count as silence.
    Each clip is decoded from a reset front end with a fixed-seed dither, so the same clip always gives the
    same phones whatever was decoded before it (pocketsphinx's live CMN otherwise carries over).
    """

    role = "phonetic"
    source = "pocketsphinx en-us phone decoder"
    sample_rate = SAMPLE_RATE

    @staticmethod
    def describe(name: str = "phonetic", **_settings) -> ExpertSpec:
        return ExpertSpec(name=name, dim=len(PHONES), frame_rate=SAMPLE_RATE / HOP, kind="discrete")

    def __init__(self, name: str = "phonetic"):
        """Load the en-us acoustic model and its phone language model (no settings to get wrong)."""
        # an expert's library loads where the expert runs, not in every process importing the registry
        from pocketsphinx import Decoder, get_model_path

        self.name = name
        model = Path(get_model_path("en-us"))
        self.decoder = Decoder(hmm=str(model / "en-us"), allphone=str(model / "en-us-phone.lm.bin"),
                               loglevel="FATAL")
        self.spec = self.describe(name)
        files = [model / "en-us-phone.lm.bin", *sorted((model / "en-us").iterdir())]
        self.version = version_hash(files, {"expert": "pocketsphinx-allphone", "dither": _DITHER_LSB,
                                           "revision": _REVISION})

    def __call__(self, waveforms: list[torch.Tensor],
                 sample_rate: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """Per clip [T, len(PHONES)] float32 one-hot rows.

        Raises:
            ValueError, TypeError: bad batch (see `check_waveforms`).
            RuntimeError: the decoder emits a phone outside `PHONES` (a different acoustic model).
        """
        clips = check_waveforms(self.name, waveforms, SAMPLE_RATE, sample_rate)
        features = []
        for clip in clips:
            labels = np.zeros(1 + len(clip) // HOP, dtype=np.int64)  # SIL
            for phone, start, end in self._segments(clip):
                if phone not in _INDEX:
                    raise RuntimeError(f"phonetic expert {self.name!r}: unknown phone {phone!r} from decoder")
                labels[start:end + 1] = _INDEX[phone]
            features.append(torch.nn.functional.one_hot(torch.from_numpy(labels), len(PHONES)).float())
        return features, [len(f) for f in features]

    def _segments(self, clip: torch.Tensor) -> list[tuple[str, int, int]]:
        pcm = np.round(clip.numpy().clip(-1, 1) * 32767)
        pcm += np.random.default_rng(0).integers(-_DITHER_LSB, _DITHER_LSB + 1, len(pcm))
        self.decoder.reinit_feat()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm.clip(-32768, 32767).astype(np.int16).tobytes(), full_utt=True)
        self.decoder.end_utt()
        return [(seg.word, seg.start_frame, seg.end_frame) for seg in self.decoder.seg() or []]
