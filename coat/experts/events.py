"""Sound-event expert: an AudioSet tagger's 527 per-class probabilities (sigmoids), one vector per clip.

No AudioSet tagger ships offline on PyPI, so `path` names one: a local save_pretrained directory or a hub id
already in the local cache (e.g. MIT/ast-finetuned-audioset-10-10-0.4593, the AST the cluster configs use);
it is never downloaded. Without `path`, the expert is a tiny random-weight AST of the same class and output
(seeded, saved once under the coat cache): the embedded default trains on it so the role's wiring runs
everywhere, and `coat experts list` says that its targets carry no sound-event knowledge.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from coat.experts.base import ExpertSpec
from coat.experts.hub import HubExpert, hub_spec

AUDIOSET_CLASSES = 527
TINY_SEED = 0
_TINY_REVISION = 1


def cache_dir() -> Path:
    """Where coat keeps what it builds once per machine: $COAT_CACHE, else $XDG_CACHE_HOME/coat or ~/.cache/coat."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "coat"
    return Path(os.environ.get("COAT_CACHE", default)).expanduser()


def tiny_tagger() -> Path:
    """A tiny random AST AudioSet tagger (527 multi-label outputs), built with a fixed seed and saved once.

    Written to a temporary folder and renamed into place, so concurrent precompute actors never see half of it."""
    root = cache_dir() / f"tiny-ast-audioset-{TINY_SEED}-r{_TINY_REVISION}"
    if (root / "config.json").is_file():
        return root
    # transformers takes seconds to import: only building the tiny AST checkpoint needs it
    import torch
    import transformers

    config = transformers.ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    max_length=256, num_mel_bins=32, num_labels=AUDIOSET_CLASSES,
                                    problem_type="multi_label_classification")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = transformers.ASTForAudioClassification(config)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-ast-", dir=root.parent))
    model.save_pretrained(staging)
    transformers.ASTFeatureExtractor(num_mel_bins=32, max_length=256).save_pretrained(staging)
    try:
        staging.rename(root)
    except OSError:  # another process got there first: its copy is the same
        shutil.rmtree(staging, ignore_errors=True)
    return root


class SoundEventExpert(HubExpert):
    """AudioSet tag probabilities [527] per clip, from `path` or, without it, a tiny random tagger."""

    @staticmethod
    def describe(name: str = "sound-events", path: str | None = None, **_settings) -> ExpertSpec:
        if path is None:
            return ExpertSpec(name=name, dim=AUDIOSET_CLASSES, frame_rate=None, kind="multilabel")
        return hub_spec(path, "posteriors", name, multi_label=True)

    def __init__(self, name: str = "sound-events", path: str | None = None, device: str = "cpu"):
        """Raises FileNotFoundError naming `path` when it is neither a local model nor a cached hub id, and
        ValueError when the model there is not an audio classifier."""
        super().__init__(path or tiny_tagger(), output="posteriors", name=name, role="sound-events",
                         multi_label=True, device=device)
        if path is None:
            self.source = ("tiny random AST (no offline AudioSet tagger: set experts.settings.sound-events.path "
                           "to a local or cached checkpoint)")
