"""Hub experts: any transformers audio model saved in a local directory (never downloaded).

Three families, told apart by the config:
- Whisper (`model_type == "whisper"`): encoder hidden states, 50 fps; clips longer than the encoder's window
  (30 s for real checkpoints) run as consecutive windows whose valid frames are concatenated.
- wav2vec2-style encoders (configs with `conv_stride`: wav2vec2, HuBERT, WavLM, ...): hidden states at
  sample_rate / prod(conv_stride) fps (50 fps).
- Audio classifiers (`*ForAudioClassification`, `*ForSequenceClassification`, e.g. AST or wav2vec2 emotion
  models): class posteriors, one vector per clip.
Every model is fed by its own feature extractor from the same directory.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoFeatureExtractor, PretrainedConfig

from coat.experts.base import ExpertSpec, check_waveforms, version_hash

OUTPUTS = ("frames", "posteriors")
_CLASSIFIER_SUFFIXES = ("ForAudioClassification", "ForSequenceClassification")
_REVISION = 1


def _model_dir(path: str | Path) -> Path:
    """A save_pretrained directory, or the cached snapshot of a hub id already in the local cache."""
    root = Path(path).expanduser()
    if not root.exists() and "/" in str(path) and not str(path).startswith(("/", ".", "~")):
        # only a hub id needs the hub's client: a local path never loads it
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            root = Path(snapshot_download(str(path), local_files_only=True))
        except (LocalEntryNotFoundError, ValueError, OSError):
            pass
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"hub expert: no model at {path} (expected a save_pretrained directory with "
                                "config.json, or a hub id in the local cache; hub experts never download)")
    return root


def _is_multi_label(config: PretrainedConfig, multi_label: bool | None) -> bool:
    return config.problem_type == "multi_label_classification" if multi_label is None else multi_label


def _architecture(config: PretrainedConfig) -> str:
    return (config.architectures or ["AutoModel"])[0]


def _default_output(config: PretrainedConfig) -> str:
    return "posteriors" if _architecture(config).endswith(_CLASSIFIER_SUFFIXES) else "frames"


def _frame_rate(config: PretrainedConfig, sampling_rate: int, hop_length: int | None) -> float:
    """Raises ValueError for a model without a time axis (AST's hidden states are spectrogram patches)."""
    if config.model_type == "whisper":
        return sampling_rate / hop_length / 2  # conv2 has stride 2
    if hasattr(config, "conv_stride"):
        return sampling_rate / math.prod(config.conv_stride)
    raise ValueError(f"hub expert: {_architecture(config)} ({config.model_type}) has no frame-level hidden "
                     "states; use output='posteriors'")


def hub_spec(path: str | Path, output: str | None = None, name: str | None = None,
             multi_label: bool | None = None) -> ExpertSpec:
    """The spec of a hub expert from its config and feature-extractor config alone (no weights loaded).
    `multi_label` overrides the config's `problem_type` (AudioSet taggers are multi-label whatever it says).

    Raises:
        FileNotFoundError: `path` holds no saved model.
        ValueError: unknown `output`, posteriors from a model without a classifier, or frames from a model
            without a time axis.
    """
    root = _model_dir(path)
    config = AutoConfig.from_pretrained(root, local_files_only=True)
    output = output or _default_output(config)
    name = name or f"hub:{path}"
    if output not in OUTPUTS:
        raise ValueError(f"hub expert {name!r}: output={output!r} must be one of {OUTPUTS}")
    if output == "posteriors":
        if not _architecture(config).endswith(_CLASSIFIER_SUFFIXES):
            raise ValueError(f"hub expert {name!r}: {_architecture(config)} has no classifier; use "
                             "output='frames'")
        kind = "multilabel" if _is_multi_label(config, multi_label) else "discrete"
        return ExpertSpec(name=name, dim=config.num_labels, frame_rate=None, kind=kind)
    extractor = AutoFeatureExtractor.from_pretrained(root, local_files_only=True)
    rate = _frame_rate(config, extractor.sampling_rate, getattr(extractor, "hop_length", None))
    return ExpertSpec(name=name, dim=config.hidden_size, frame_rate=rate, kind="continuous", frame_offset=0.5)


class HubExpert:
    """A transformers audio model as an expert: hidden-state frames [T, hidden] or posteriors [num_labels].

    `layer` indexes `hidden_states` (0 = embeddings, -1 = last layer). Posteriors are a softmax, or
    per-class sigmoids for multi-label models (`problem_type == "multi_label_classification"`, e.g. AudioSet).
    wav2vec2-style models with a group-norm feature encoder (wav2vec2-base and kin, whose feature extractor
    asks for no attention mask) run one clip at a time, since zero padding would change their features.
    """

    role = "hub"

    @staticmethod
    def describe(path: str | Path, output: str | None = None, name: str | None = None,
                 multi_label: bool | None = None, **_settings) -> ExpertSpec:
        return hub_spec(path, output, name, multi_label)

    def __init__(self, path: str | Path, output: str | None = None, layer: int = -1, name: str | None = None,
                 role: str | None = None, multi_label: bool | None = None, device: str = "cpu"):
        """Load the model class named in the config and its feature extractor from `path`, offline.

        Raises:
            FileNotFoundError: `path` holds no saved model.
            ValueError: a bad `output` for this model (see `hub_spec`), or `layer` out of range.
            OSError: transformers cannot load the weights or feature extractor from `path`.
        """
        root = _model_dir(path)
        transformers.utils.logging.disable_progress_bar()  # loading a small expert is not worth a progress bar
        self.spec = hub_spec(root, output, name or f"hub:{path}", multi_label)
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        self.name, self.output, self.layer = self.spec.name, output or _default_output(config), layer
        self.role = role or ("classes" if self.output == "posteriors" else "encoder frames")
        self.device, self.family = torch.device(device), config.model_type
        depth = getattr(config, "encoder_layers", None) or config.num_hidden_layers
        if self.output == "frames" and not -(depth + 1) <= layer <= depth:
            raise ValueError(f"hub expert {self.name!r}: layer={layer} is out of range for {depth} layers "
                             f"(0 = embeddings, -1 = last)")
        self.extractor = AutoFeatureExtractor.from_pretrained(root, local_files_only=True)
        self.sample_rate = self.extractor.sampling_rate
        model_class = getattr(transformers, _architecture(config), transformers.AutoModel)
        self.model = model_class.from_pretrained(root, local_files_only=True).eval().to(self.device)
        self.multi_label = _is_multi_label(config, multi_label)
        self.source = f"{_architecture(config)} from {path}"
        weights = [p for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".json")]
        self.version = version_hash(weights, {"expert": "hub", "class": type(self.model).__name__,
                                              "output": self.output, "layer": layer, "revision": _REVISION,
                                              **({"multi_label": multi_label} if multi_label is not None else {})})

    @torch.inference_mode()
    def __call__(self, waveforms: list[torch.Tensor],
                 sample_rate: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """Per clip [T, hidden] frames or a [num_labels] posterior vector (count 1), float32.

        Raises:
            ValueError, TypeError: bad batch (see `check_waveforms`).
        """
        clips = [c.numpy() for c in check_waveforms(self.name, waveforms, self.sample_rate, sample_rate)]
        if self.output == "posteriors":
            features = self._posteriors(clips)
            return features, [1] * len(features)
        features = self._whisper_frames(clips) if self.family == "whisper" else self._conv_frames(clips)
        return features, [len(f) for f in features]

    def _inputs(self, clips: list[np.ndarray], **kwargs) -> dict[str, torch.Tensor]:
        batch = self.extractor(clips, sampling_rate=self.sample_rate, return_tensors="pt", **kwargs)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _one_at_a_time(self) -> bool:
        """Group-norm feature encoders normalise over the whole padded input: batching changes features."""
        config = self.model.config
        return hasattr(config, "conv_stride") and (getattr(config, "feat_extract_norm", "layer") == "group"
                                                   or not self.extractor.return_attention_mask)

    def _whisper_window(self) -> int:
        """Samples the encoder takes at once: 2 * max_source_positions mel frames (30 s for real models)."""
        return 2 * self.model.config.max_source_positions * self.extractor.hop_length

    def _posteriors(self, clips: list[np.ndarray]) -> list[torch.Tensor]:
        if self._one_at_a_time():
            logits = torch.cat([self.model(**self._inputs([c])).logits for c in clips])
        elif self.family == "whisper":  # the first window only: Whisper classifiers see at most one
            logits = self.model(**self._inputs(clips, max_length=self._whisper_window())).logits
        elif hasattr(self.model.config, "conv_stride"):
            logits = self.model(**self._inputs(clips, padding=True, return_attention_mask=True)).logits
        else:  # fixed-length inputs (AST pads or cuts to its max_length); its fbank needs one 25 ms window
            window = int(0.025 * self.sample_rate)
            padded = [np.pad(c, (0, max(0, window - len(c)))) for c in clips]
            logits = self.model(**self._inputs(padded)).logits
        probs = logits.float().sigmoid() if self.multi_label else logits.float().softmax(-1)
        return list(probs.cpu())

    def _whisper_frames(self, clips: list[np.ndarray]) -> list[torch.Tensor]:
        encoder, hop, window = self.model.get_encoder(), self.extractor.hop_length, self._whisper_window()
        pieces = [(i, c[s:s + window]) for i, c in enumerate(clips) for s in range(0, len(c), window)]
        inputs = self._inputs([p for _, p in pieces], max_length=window)
        hidden = encoder(inputs["input_features"], output_hidden_states=True).hidden_states[self.layer]
        frames: list[list[torch.Tensor]] = [[] for _ in clips]
        for (i, piece), h in zip(pieces, hidden.float().cpu(), strict=True):
            frames[i].append(h[: math.ceil(len(piece) / (2 * hop))])
        return [torch.cat(f) for f in frames]

    def _conv_frames(self, clips: list[np.ndarray]) -> list[torch.Tensor]:
        config = self.model.config
        field = _receptive_field(config.conv_kernel, config.conv_stride)
        clips = [np.pad(c, (0, max(0, field - len(c)))) for c in clips]  # shorter than one frame: pad
        counts = [_conv_frames_out(len(c), config.conv_kernel, config.conv_stride) for c in clips]
        groups = [[c] for c in clips] if self._one_at_a_time() else [clips]
        hidden = []
        for group in groups:
            kwargs = {"padding": True, "return_attention_mask": True} if len(group) > 1 else {}
            out = self.model(**self._inputs(group, **kwargs), output_hidden_states=True)
            hidden.extend(out.hidden_states[self.layer].float().cpu())
        return [h[:n] for h, n in zip(hidden, counts, strict=True)]


def _conv_frames_out(num_samples: int, kernels: tuple[int, ...], strides: tuple[int, ...]) -> int:
    for kernel, stride in zip(kernels, strides, strict=True):
        num_samples = (num_samples - kernel) // stride + 1
    return num_samples


def _receptive_field(kernels: tuple[int, ...], strides: tuple[int, ...]) -> int:
    field = 1
    for kernel, stride in reversed(list(zip(kernels, strides, strict=True))):
        field = (field - 1) * stride + kernel
    return field
