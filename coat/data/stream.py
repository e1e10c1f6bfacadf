"""The training stream: decoded audio, prompt, answer and standardised expert targets, read from the store.

`training_items` checks up front, on the driver, that the store holds every chosen expert's features for
every clip of a split, none in a part it knows is damaged (experts are never run here), and locates them. A
`Stream` holds those rows and how to read them; it is small and picklable, so each Ray Train worker builds its
own Ray Data pipeline per epoch, over the rows `epoch_order` deals it in a seeded order (Ray's own split of a
dataset across workers is not reproducible, and resuming mid-epoch needs the exact order). The batch function
decodes audio and reads only the chosen experts' parts, and only their value columns. `collate` turns rows into a
model batch; `iter_training_batches` does both.

Targets are standardised with statistics of the training split only (`FeatureStore.split_stats`): the
validation and test splits reuse the training split's, so no information from them reaches training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch.nn.utils.rnn import pad_sequence

from coat.data.audio import decode, header_seconds
from coat.data.manifest import model_prompt, quarantine_records, stratified_subsample
from coat.data.precompute import manifest_clips
from coat.data.store import FeatureStore, feature_version, raise_if_damaged, read_located, standardise
from coat.errors import UserError
from coat.ray_runtime import ensure_ray, quiet

LONG_CLIPS = ("crop", "reject")
DECODE_BATCH = 8  # rows a decode task decodes per batch
SHUFFLE_STREAM = 1  # the shuffled-targets control's entry in (seed, epoch, ...): apart from the data order's


class MissingFeaturesError(UserError, LookupError):
    """The store lacks an expert's features for clips the stream needs; the message says what to run."""


@dataclass(frozen=True)
class TargetSource:
    """Where one expert's targets come from and how to standardise them (`stats` None: discrete or multi-label
    targets, kept as they are). `version` is the store's: the expert's, cropped where clips are."""

    name: str
    version: str
    clip_level: bool
    stats: Mapping[str, object] | None


@dataclass
class Stream:
    """One split's rows (from `training_items`) and how to read them; `dataset` builds the Ray Data pipeline."""

    items: list[dict]
    sources: dict[str, TargetSource]
    sample_rate: int
    crop_seconds: float | None = None  # audio is cut to this, as the experts' features were (`precompute`)
    decode_tasks: int | None = None  # concurrent decode tasks; None: as many as free CPUs allow
    quarantine: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["id", "path", "reason"]))
    weights: np.ndarray | None = None  # a mixture's per-row draw probabilities (`mixture.sample_weights`)

    def __len__(self) -> int:
        return len(self.items)

    def stratified(self, count: int, seed: int) -> np.ndarray:
        """The indices of `count` rows fixed by `seed`, each task family (and mixture entry) keeping its share of
        them, in manifest order: what every validation reads, so that val/ce weighs every corpus and family."""
        table = pd.DataFrame(self.items)
        by = [column for column in ("task", "mixture") if column in table]
        return stratified_subsample(table, count, seed, by).index.to_numpy()

    def dataset(self, order: Sequence[int] | None = None, donors: np.ndarray | None = None):
        """A Ray Data dataset of the rows at `order` (default: all, in manifest order), in exactly that order,
        decoded by at most `decode_tasks` tasks at once (see `load_batch`). With `donors` (`shuffled_donors`),
        row i carries the expert targets of row `donors[i]`: the shuffled-targets control."""
        ensure_ray()
        order = range(len(self.items)) if order is None else order
        rows = [self.items[i] if donors is None else with_targets_of(self.items[i], self.items[donors[i]])
                for i in order]
        # Blocks of at least one decode batch: Ray's default cuts up to 200 blocks whatever the rows, one put into
        # the object store each, which cost every epoch's start 0.5 s on coat-mini's 320 rows.
        most = ray.data.DataContext.get_current().read_op_min_num_blocks
        blocks = max(1, min(math.ceil(len(rows) / DECODE_BATCH), most))
        dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            load_batch, fn_kwargs={"sources": self.sources, "sample_rate": self.sample_rate,
                                   "crop_seconds": self.crop_seconds},
            batch_size=DECODE_BATCH, batch_format="numpy", num_cpus=0.5,
            compute=ray.data.TaskPoolStrategy(size=self.decode_tasks))
        dataset.context.execution_options.preserve_order = True
        return quiet(dataset)


def epoch_order(rows: int, *, seed: int, epoch: int, world: int, rank: int, step_rows: int,
                weights: np.ndarray | None = None) -> np.ndarray:
    """The row indices rank `rank` of `world` trains on in `epoch`, in order.

    A permutation of all rows drawn from (`seed`, `epoch`) — random, new each epoch, the same for the same
    seed — cut to whole optimizer steps of every rank (`step_rows`: rows per rank per step) and dealt to the
    ranks in turn, so no row is seen twice in an epoch and the rows left over differ from epoch to epoch.
    With `weights` (a mixture), `rows` draws with replacement at those probabilities take the permutation's place.
    """
    rng = np.random.default_rng([seed, epoch])
    permutation = rng.permutation(rows) if weights is None else rng.choice(rows, size=rows, p=weights)
    usable = rows // (world * step_rows) * world * step_rows
    return permutation[:usable][rank::world]


def shuffled_donors(rows: int, *, seed: int, epoch: int) -> np.ndarray:
    """For each row of a split, the other row whose expert targets it trains on under `thinking.targets=shuffled`:
    a random cycle through all rows (so no row keeps its own targets and every row's targets are used once), drawn
    from (`seed`, `epoch`) apart from the data order, so it is fixed for the epoch and reproduced on resume.
    Raises ValueError for fewer than two rows."""
    if rows < 2:
        raise ValueError(f"shuffled targets need at least two rows to exchange targets, the split has {rows}")
    cycle = np.random.default_rng([seed, epoch, SHUFFLE_STREAM]).permutation(rows)
    donors = np.empty(rows, dtype=np.int64)
    donors[cycle] = np.roll(cycle, -1)
    return donors


def with_targets_of(row: Mapping, donor: Mapping) -> dict:
    """`row` reading its expert targets from `donor`'s clip: where the features sit, and which audio they span."""
    located = {key: donor[key] for key in donor if key.startswith(("part.", "row."))}
    return {**row, **located, "targets_clip": donor["clip_hash"], "targets_audio_path": donor["audio_path"]}


def training_items(manifest: str | Path, split: str, experts: Sequence[str], store_dir: str | Path, *,
                   settings: Mapping[str, Mapping[str, object]] | None = None, max_seconds: float | None = None,
                   long_clips: str = "crop", stats_from: Mapping[str, TargetSource] | None = None,
                   ) -> tuple[list[dict], dict[str, TargetSource], pd.DataFrame]:
    """The split's rows (`id`, `audio_path`, `task`, `prompt`, `answer`, `clip_hash`, and `part.<e>`/`row.<e>`: where
    each expert's features sit in the store), one `TargetSource` per expert, and the quarantine of the split's
    rows left out (`id`, `path`, `reason`).

    Clips longer than `max_seconds` are cut to it (`long_clips="crop"`: the store must hold features of the
    cropped clips, see `precompute(crop_seconds=)`) or left out as `too_long` (`"reject"`). Continuous targets
    are standardised with `stats_from`'s statistics (the training split's) or, without it, with statistics of
    this split's own clips: pass the training split's sources when reading any other split. Learns each expert's
    version (from weights and `settings`); computes no expert. Rows that fail validation or hashing, and clips
    the store's quarantine lists as undecodable, are left out.

    Raises:
        ManifestError: the manifest cannot be read.
        ValueError: the split has no usable rows, or `long_clips` is unknown.
        UnknownExpertError, ValueError: an expert name or its settings are invalid.
        MissingFeaturesError: naming the expert, the first missing clip id and the precompute command.
        DamagedFeaturesError: a clip's features sit in a part the store knows is damaged (naming it and the fix).
    """
    if long_clips not in LONG_CLIPS:
        raise ValueError(f"long_clips={long_clips!r} must be one of {LONG_CLIPS}")
    crop = max_seconds if long_clips == "crop" else None
    settings = settings or {}
    store = FeatureStore(store_dir)
    rows, quarantine = manifest_clips(manifest, split)
    undecodable = store.quarantined()
    bad = rows["clip_hash"].isin(undecodable)
    left_out = [quarantine, quarantine_records(rows[bad], list(rows.loc[bad, "clip_hash"].map(undecodable)))]
    rows = rows[~bad]
    if long_clips == "reject" and max_seconds is not None and len(rows):
        seconds = rows["audio_path"].map(header_seconds)
        too_long = seconds > max_seconds
        left_out.append(quarantine_records(rows[too_long], [f"too_long: {s:.1f}s > {max_seconds:.1f}s"
                                                            for s in seconds[too_long]]))
        rows = rows[~too_long]
    if rows.empty:
        raise ValueError(f"{manifest}: no usable rows in split {split!r}")
    choices = rows["choices"] if "choices" in rows else [None] * len(rows)
    rows = rows.assign(prompt=[model_prompt(p, c) for p, c in zip(rows["prompt"], choices, strict=True)])
    kept = ["id", "audio_path", "task", "prompt", "answer", "clip_hash", *(["mixture"] if "mixture" in rows else [])]
    rows = rows[kept].astype({"id": str})
    sources = {name: _locate(rows, name, settings.get(name, {}), store, crop, stats_from,
                             f"split {split!r}", f"--data {manifest}") for name in experts}
    return rows.to_dict(orient="records"), sources, pd.concat(left_out, ignore_index=True)


def _locate(rows: pd.DataFrame, name: str, chosen: Mapping[str, object], store: FeatureStore, crop: float | None,
            stats_from: Mapping[str, TargetSource] | None, which: str, data: str) -> TargetSource:
    """Record in `rows` (`part.<name>`, `row.<name>`) where expert `name`'s features of each clip sit, and return
    its `TargetSource`. Raises MissingFeaturesError naming the first clip without them and the precompute command
    (`which` rows they are, `data` the command's data option), DamagedFeaturesError for a damaged part."""
    # the expert registry loads transformers (seconds): the decode tasks that import this module never need it
    from coat.experts.registry import expert_spec, expert_version

    spec, version = expert_spec(name, **chosen), feature_version(expert_version(name, **chosen), crop)
    index = store.index(name, version).set_index("clip_hash")
    absent = rows[~rows["clip_hash"].isin(index.index)]
    if len(absent):
        first = absent.iloc[0]
        with_settings = f" --config <the run's config> (expert settings {dict(chosen)})" if chosen else ""
        cropped = f" --crop-seconds {crop:g}" if crop is not None else ""
        raise MissingFeaturesError(
            f"feature store {store.root} has no features of expert {name!r} (version {version}) "
            f"for clip {first['id']!r} ({first['audio_path']}) and {len(absent) - 1} more clips of {which}; "
            f"run: coat experts precompute {data} --experts {name} --store {store.root}{cropped}{with_settings}")
    located = index.loc[rows["clip_hash"]]
    raise_if_damaged(located)
    rows[f"part.{name}"], rows[f"row.{name}"] = located["part"].to_numpy(), located["row"].to_numpy()
    if spec.kind != "continuous":
        stats = None
    elif stats_from is not None:
        stats = stats_from[name].stats
    else:
        stats = store.split_stats(name, version, rows["clip_hash"])
    return TargetSource(name, version, spec.clip_level, stats)


def load_batch(batch: Mapping[str, Sequence], sources: Mapping[str, TargetSource], sample_rate: int,
               crop_seconds: float | None = None) -> dict[str, list]:
    """Batch function of the stream: rows from `training_items` -> `id`, `audio` (float32 at `sample_rate`, cut
    to `crop_seconds`), `prompt`, `answer` and `target.<e>` ([T, D] or [D] for clip-level experts, standardised
    when continuous). Rows that read their targets from another clip (`with_targets_of`) also give
    `targets_seconds`: that clip's length, which aligns its frames to the slots.

    Raises:
        AudioError: a clip does not decode (precompute would have quarantined it).
        DamagedFeaturesError: a part is gone, or does not read, since `training_items` located the clip in it.
    """
    out = {"id": [str(i) for i in batch["id"]], "prompt": [str(p) for p in batch["prompt"]],
           "answer": [str(a) for a in batch["answer"]],
           "audio": [decode(p, sample_rate, crop_seconds, crop=True).numpy() for p in batch["audio_path"]]}
    clips = batch.get("targets_clip", batch["clip_hash"])
    if "targets_audio_path" in batch:
        longest = crop_seconds or math.inf
        out["targets_seconds"] = [min(header_seconds(p), longest) for p in batch["targets_audio_path"]]
    for name, src in sources.items():
        where = pd.DataFrame({"clip_hash": clips, "part": batch[f"part.{name}"],
                              "row": batch[f"row.{name}"]}).drop_duplicates("clip_hash")
        found = read_located(where)
        targets = [found[h] for h in clips]
        if src.stats is not None:
            targets = [standardise(t, src.stats) for t in targets]
        out[f"target.{name}"] = [t[0] if src.clip_level else t for t in targets]
    return out


def _columns(rows: Mapping[str, Sequence] | Sequence[Mapping]) -> Mapping[str, Sequence]:
    if isinstance(rows, Mapping):
        return rows
    return {key: [r[key] for r in rows] for key in rows[0]}


def collate(rows: Mapping[str, Sequence] | Sequence[Mapping], model) -> dict[str, torch.Tensor]:
    """`model.encode(audio, prompts, answers)`, the `duration` [B] in seconds of the clips the targets describe
    (the row's own, or `targets_seconds`), and `target.<e>` per expert:
    [B, T, D] zero-padded with `target_len.<e>` [B] for frame-level experts, [B, D] for clip-level ones.

    `rows` is a batch of columns (Ray's numpy batches) or a list of row dicts (a DataLoader's).

    Raises:
        KeyError: naming an expert of the model whose `target.<e>` the rows lack.
    """
    cols = _columns(rows)
    audio = [np.asarray(a, np.float32) for a in cols["audio"]]
    batch = model.encode(audio, [str(p) for p in cols["prompt"]], [str(a) for a in cols["answer"]])
    seconds = cols.get("targets_seconds", [len(a) / model.backbone.sample_rate for a in audio])
    batch["duration"] = torch.tensor([float(s) for s in seconds], dtype=torch.float64)
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
    """Model batches, on the model's device, from a Ray Dataset (`Stream.dataset`). Ray collates the next batch in
    a background thread while the model trains on this one: tokenising and audio features cost a third of a tiny
    model's CPU step.

    Raises:
        as `collate` and `load_batch`.
    """
    class ModelCollate(NumpyBatchCollateFn):
        def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return collate(rows, model)

    yield from dataset.iter_torch_batches(batch_size=batch_size, collate_fn=ModelCollate(),
                                          device=model.slot_table.device)
