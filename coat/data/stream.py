"""The training stream: decoded audio, prompt, answer and standardised expert targets, read from the store.

`training_dataset` checks up front, on the driver, that the store holds every chosen expert's features for
every clip of the split (experts are never run here), then returns a Ray Data dataset whose batch function
decodes audio and reads only the chosen experts' parts, and only their value columns. `collate` turns rows
into a model batch; `iter_training_batches` does both per Ray Train worker (pass the dataset to
`TorchTrainer(datasets=...)` and the worker's `ray.train.get_dataset_shard(name)` here).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.utils.rnn import pad_sequence

from coat.data.audio import decode
from coat.data.manifest import model_prompt
from coat.data.precompute import ensure_ray, manifest_clips
from coat.data.store import FeatureStore, read_located, standardise


class MissingFeaturesError(LookupError):
    """The store lacks an expert's features for clips the stream needs; the message says what to run."""


@dataclass(frozen=True)
class TargetSource:
    """Where one expert's targets come from and how to standardise them (stats None: discrete, kept as is)."""

    name: str
    version: str
    clip_level: bool
    stats: Mapping[str, object] | None


def training_items(manifest: str | Path, split: str, experts: Sequence[str], store_dir: str | Path, *,
                   settings: Mapping[str, Mapping[str, object]] | None = None,
                   ) -> tuple[list[dict], dict[str, TargetSource]]:
    """The split's rows (`id`, `audio_path`, `prompt`, `answer`, `clip_hash`, and `part.<e>`/`row.<e>`: where
    each expert's features sit in the store) and one `TargetSource` per expert.

    Learns each expert's version (from weights and `settings`); computes nothing. Clips the store's quarantine
    lists as undecodable are left out.

    Raises:
        ManifestError: the manifest cannot be read.
        ValueError: the split has no usable rows.
        UnknownExpertError, ValueError: an expert name or its settings are invalid.
        MissingFeaturesError: naming the expert, the first missing clip id and the precompute command.
        FileNotFoundError: an expert's precompute never completed (no statistics).
    """
    from coat.experts.registry import expert_spec, expert_version

    settings = settings or {}
    store = FeatureStore(store_dir)
    good, _ = manifest_clips(manifest, split)
    rows = good[~good["clip_hash"].isin(store.quarantined())]
    if rows.empty:
        raise ValueError(f"{manifest}: no usable rows in split {split!r}")
    choices = rows["choices"] if "choices" in rows else [None] * len(rows)
    rows = rows.assign(prompt=[model_prompt(p, c) for p, c in zip(rows["prompt"], choices, strict=True)])
    rows = rows[["id", "audio_path", "prompt", "answer", "clip_hash"]].astype({"id": str})
    sources = {}
    for name in experts:
        chosen = settings.get(name, {})
        spec, version = expert_spec(name, **chosen), expert_version(name, **chosen)
        index = store.index(name, version).set_index("clip_hash")
        absent = rows[~rows["clip_hash"].isin(index.index)]
        if len(absent):
            first = absent.iloc[0]
            with_settings = f" with settings {dict(settings[name])}" if settings.get(name) else ""
            raise MissingFeaturesError(
                f"feature store {store_dir} has no features of expert {name!r} (version {version}) "
                f"for clip {first['id']!r} ({first['audio_path']}) and {len(absent) - 1} more clips of split "
                f"{split!r}; run: coat experts precompute --data {manifest} --experts {name} "
                f"--store {store_dir}{with_settings}")
        located = index.loc[rows["clip_hash"]]
        rows[f"part.{name}"], rows[f"row.{name}"] = located["part"].to_numpy(), located["row"].to_numpy()
        stats = store.stats(name, version) if spec.kind == "continuous" else None
        sources[name] = TargetSource(name, version, spec.clip_level, stats)
    return rows.to_dict(orient="records"), sources


def load_batch(batch: Mapping[str, Sequence], sources: Mapping[str, TargetSource], sample_rate: int
               ) -> dict[str, list]:
    """Batch function of the stream: rows from `training_items` -> `id`, `audio` (float32 at `sample_rate`),
    `prompt`, `answer` and `target.<e>` ([T, D] or [D] for clip-level experts, standardised when continuous).

    Raises:
        AudioError: a clip does not decode (precompute would have quarantined it).
        FileNotFoundError: a part file was removed after `training_items` located the clip in it.
    """
    out = {"id": [str(i) for i in batch["id"]], "prompt": [str(p) for p in batch["prompt"]],
           "answer": [str(a) for a in batch["answer"]],
           "audio": [decode(p, sample_rate).numpy() for p in batch["audio_path"]]}
    for name, src in sources.items():
        where = pd.DataFrame({"clip_hash": batch["clip_hash"], "part": batch[f"part.{name}"],
                              "row": batch[f"row.{name}"]}).drop_duplicates("clip_hash")
        found = read_located(where)
        targets = [found[h] for h in batch["clip_hash"]]
        if src.stats is not None:
            targets = [standardise(t, src.stats) for t in targets]
        out[f"target.{name}"] = [t[0] if src.clip_level else t for t in targets]
    return out


def training_dataset(manifest: str | Path, split: str, experts: Sequence[str], store_dir: str | Path,
                     sample_rate: int, *, settings: Mapping[str, Mapping[str, object]] | None = None,
                     decode_tasks: int | None = None):
    """A Ray Data dataset of the split's rows with decoded audio and standardised targets (see `load_batch`).

    Raises:
        as `training_items`, before any Ray work starts.
    """
    items, sources = training_items(manifest, split, experts, store_dir, settings=settings)
    return dataset_of(items, sources, sample_rate, decode_tasks)


def dataset_of(items: list[dict], sources: Mapping[str, TargetSource], sample_rate: int,
               decode_tasks: int | None = None):
    """The stream over rows already located by `training_items`, decoded by at most `decode_tasks` tasks at
    once (None: as many as free CPUs allow)."""
    import ray

    ensure_ray()
    return ray.data.from_items(items).map_batches(
        load_batch, fn_kwargs={"sources": sources, "sample_rate": sample_rate}, batch_size=8,
        batch_format="numpy", num_cpus=0.5, concurrency=decode_tasks)


def _columns(rows: Mapping[str, Sequence] | Sequence[Mapping]) -> Mapping[str, Sequence]:
    if isinstance(rows, Mapping):
        return rows
    return {key: [r[key] for r in rows] for key in rows[0]}


def collate(rows: Mapping[str, Sequence] | Sequence[Mapping], model) -> dict[str, torch.Tensor]:
    """`model.encode(audio, prompts, answers)` plus `target.<e>` per expert: [B, T, D] zero-padded with
    `target_len.<e>` [B] for frame-level experts, [B, D] for clip-level ones.

    `rows` is a batch of columns (Ray's numpy batches) or a list of row dicts (a DataLoader's).

    Raises:
        KeyError: naming an expert of the model whose `target.<e>` the rows lack.
    """
    cols = _columns(rows)
    batch = model.encode([np.asarray(a, np.float32) for a in cols["audio"]], [str(p) for p in cols["prompt"]],
                         [str(a) for a in cols["answer"]])
    for name in model.experts:
        key = f"target.{name}"
        if key not in cols:
            raise KeyError(f"rows have no {key!r}: add expert {name!r} to the stream's experts")
        values = [torch.tensor(np.asarray(v, np.float32)) for v in cols[key]]  # Ray's arrays are read-only
        if values[0].dim() == 1:
            batch[key] = torch.stack(values)
        else:
            batch[key] = pad_sequence(values, batch_first=True)
            batch[f"target_len.{name}"] = torch.tensor([len(v) for v in values], dtype=torch.long)
    return batch


def iter_training_batches(dataset, model, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Model batches, on the model's device, from a Ray Dataset or a Ray Train worker's shard
    (`ray.train.get_dataset_shard`). Ray collates the next batch in a background thread while the model trains
    on this one: tokenising and audio features cost a third of a tiny model's CPU step.

    Raises:
        as `collate` and `load_batch`.
    """
    from ray.data.collate_fn import NumpyBatchCollateFn

    class ModelCollate(NumpyBatchCollateFn):
        def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return collate(rows, model)

    yield from dataset.iter_torch_batches(batch_size=batch_size, collate_fn=ModelCollate(),
                                          device=model.slot_table.device)
