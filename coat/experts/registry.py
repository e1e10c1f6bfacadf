"""Experts by name: specs without loading weights (config validation, the model), built experts (the store).

Offline experts go by their names below. A hub expert goes by `hub:<local model directory>`, or by
`build_expert("hub", path=..., name=...)` with explicit settings.
"""

from __future__ import annotations

import functools
import inspect
import json

from coat.config import CoATConfig
from coat.errors import UsageError
from coat.experts.affect import EgemapsExpert
from coat.experts.base import Expert, ExpertSpec
from coat.experts.encoder import AudioEncoderExpert
from coat.experts.events import SoundEventExpert
from coat.experts.features import MelExpert, ProsodyExpert
from coat.experts.hub import HubExpert
from coat.experts.phonetic import PhoneticExpert
from coat.experts.pitch import PitchExpert
from coat.experts.speaker import SpeakerExpert
from coat.experts.vad import VadExpert

# name -> (class, preset settings). Expert modules import their heavy libraries inside __init__, so
# importing this registry and asking for specs stays cheap.
OFFLINE: dict[str, tuple[type, dict[str, object]]] = {
    "pitch": (PitchExpert, {"model": "tiny"}),
    "pitch-full": (PitchExpert, {"model": "full"}),
    "phonetic": (PhoneticExpert, {}),
    "speaker": (SpeakerExpert, {}),
    "vad": (VadExpert, {}),
    "mel": (MelExpert, {}),
    "prosody": (ProsodyExpert, {}),
    "egemaps": (EgemapsExpert, {}),
    "sound-events": (SoundEventExpert, {}),
    "audio-encoder": (AudioEncoderExpert, {}),
}
HUB_PREFIX = "hub:"


class UnknownExpertError(UsageError, KeyError):
    """An expert name that is neither an offline expert nor a hub expert."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def available_experts() -> list[str]:
    """Names of the offline experts (hub experts are any `hub:<local model directory>`)."""
    return list(OFFLINE)


def _resolve(name: str, settings: dict[str, object]) -> tuple[type, dict[str, object]]:
    """The class and full keyword arguments for `name`, with the settings checked against the class.

    Raises:
        UnknownExpertError: `name` is not an expert.
        ValueError: a setting the expert does not take, or a hub expert without a path.
    """
    if name.startswith(HUB_PREFIX) or name == "hub":
        cls, kwargs = HubExpert, dict(settings)
        if name != "hub":
            kwargs.setdefault("path", name[len(HUB_PREFIX):])
            kwargs.setdefault("name", name)
        if not kwargs.get("path"):
            raise ValueError("hub expert: give the model directory as 'hub:<path>' or as the setting path=")
    elif name in OFFLINE:
        cls, preset = OFFLINE[name]
        kwargs = {**preset, "name": name, **settings}
    else:
        raise UnknownExpertError(f"unknown expert {name!r}; available: {', '.join(OFFLINE)}, "
                                 f"or {HUB_PREFIX}<local model directory>")
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        known = [p for p in inspect.signature(cls).parameters if p != "name"]
        raise ValueError(f"expert {name!r}: bad settings {sorted(settings)} ({err}); "
                         f"it takes {known}") from None
    return cls, kwargs


def expert_spec(name: str, /, **settings) -> ExpertSpec:
    """The spec of expert `name` with `settings`, without loading any weights.

    Raises:
        UnknownExpertError: `name` is not an expert (the message lists the available ones).
        ValueError: bad settings, or a hub model whose config does not allow the requested output.
        FileNotFoundError: a hub expert's directory holds no saved model.
    """
    cls, kwargs = _resolve(name, settings)
    return cls.describe(**kwargs)


def expert_specs(cfg: CoATConfig) -> dict[str, ExpertSpec]:
    """The spec of each of a run's experts, with its settings (`CoATConfig.expert_settings`), loading no weights."""
    return {name: expert_spec(name, **settings) for name, settings in cfg.expert_settings.items()}


def build_expert(name: str, /, **settings) -> Expert:
    """Build expert `name` (loads its weights) with `settings`, e.g. `build_expert("mel", n_mels=64)`.

    Raises:
        UnknownExpertError: `name` is not an expert (the message lists the available ones).
        ValueError: bad settings or setting values.
        FileNotFoundError: a hub expert's directory holds no saved model.
    """
    cls, kwargs = _resolve(name, settings)
    return cls(**kwargs)


def expert_version(name: str, /, **settings) -> str:
    """The version of expert `name` with `settings`: what the store files its features under.

    A version hashes the expert's weights, which only a built expert knows where to find; each (name, settings)
    is built once per process, however many splits and trials ask. Raises as `build_expert`.
    """
    return _built_version(name, json.dumps(settings, sort_keys=True))


@functools.cache
def _built_version(name: str, settings: str) -> str:
    return build_expert(name, **json.loads(settings)).version
