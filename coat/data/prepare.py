"""The data a run trains on, prepared in one place for training, sweeps and preflight: the manifest (a mixture's
entries combined into it; coat-mini generated on first use), every configured expert's features in the store, and
the `train` and `val` streams read from them, with tags naming exactly that data."""

from __future__ import annotations

import hashlib
from pathlib import Path

from coat.backbones import BACKBONES, check_audio_window
from coat.config import CoATConfig, mixture_name
from coat.data.mixture import combine, sample_weights
from coat.data.precompute import precompute
from coat.data.stream import Stream, training_items
from coat.data.synth import synthesize


def prepare_data(cfg: CoATConfig) -> tuple[Path, Path]:
    """The manifest (a mixture's entries combined into it; coat-mini generated on first use when
    `data.synth_size` > 0) and a store holding every configured expert's features. Raises ConfigError when
    data.max_seconds is longer than the backbone hears of a clip, FileNotFoundError naming the manifest when it is
    missing."""
    check_audio_window(cfg)
    manifest, store = Path(cfg.data.manifest).resolve(), Path(cfg.data.store).resolve()
    if cfg.data.mixture:
        combine(cfg.data.mixture, manifest)
    elif not manifest.is_file():
        if cfg.data.synth_size <= 0 or manifest.name != "manifest.jsonl":
            raise FileNotFoundError(
                f"data.manifest={manifest} does not exist; point it at a manifest, or set data.synth_size>0 with "
                "a path ending in manifest.jsonl to generate coat-mini there"
            )
        synthesize(manifest.parent, cfg.data.synth_size, cfg.data.synth_seed, test_share=cfg.data.synth_test_share)
    if cfg.experts.names:
        precompute(manifest, list(cfg.experts.names), store, settings=cfg.expert_settings,
                   crop_seconds=cfg.data.crop_seconds, verify_hashes=False, max_seconds=cfg.data.reject_seconds)
    return manifest, store


def training_streams(cfg: CoATConfig, manifest: Path, store: Path) -> dict[str, Stream]:
    """The `train` and `val` streams. Validation targets are standardised with the training split's statistics.

    Raises ValueError, before decoding anything, when the training rows cannot fill one step of every worker.
    """
    rate = BACKBONES[cfg.backbone.name].sample_rate
    common = {"max_seconds": cfg.data.max_seconds, "long_clips": cfg.data.long_clips,
              "settings": cfg.expert_settings}
    items, sources, left_out = training_items(manifest, cfg.data.train_split, cfg.experts.names, store, **common)
    world = max(1, cfg.train.num_workers)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    if len(items) < world * per_step:
        raise ValueError(f"{len(items)} training rows cannot fill one step of {world} workers x {per_step} examples: "
                         "lower train.batch_size or train.num_workers")
    val_items, _, val_left_out = training_items(manifest, cfg.data.val_split, cfg.experts.names, store,
                                                stats_from=sources, **common)
    crop = cfg.data.crop_seconds
    weights = None
    if cfg.data.mixture:
        weights = sample_weights([item["mixture"] for item in items],
                                 {mixture_name(entry): entry.weight for entry in cfg.data.mixture})
    return {"train": Stream(items, sources, rate, crop, cfg.data.decode_tasks, left_out, weights),
            "val": Stream(val_items, sources, rate, crop, cfg.data.decode_tasks, val_left_out)}


def data_provenance(streams: dict[str, Stream]) -> dict[str, str]:
    """Tags naming the exact data: per split a hash of its (id, clip hash) rows and their count, per expert its
    features' version and the id of the standardisation statistics."""
    tags = {}
    for split, stream in streams.items():
        digest = hashlib.sha256("".join(sorted(f"{r['id']}\t{r['clip_hash']}\n" for r in stream.items)).encode())
        tags |= {f"data.{split}.sha256": digest.hexdigest()[:16], f"data.{split}.rows": str(len(stream)),
                 f"data.{split}.left_out": str(len(stream.quarantine))}
    for name, source in streams["train"].sources.items():
        tags[f"expert.{name}.version"] = source.version
        if source.stats is not None:
            tags[f"expert.{name}.stats"] = str(source.stats["id"])
    return tags
