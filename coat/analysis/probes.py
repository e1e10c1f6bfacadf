"""Linear probes per layer: does expert information reach the thinking slots and the response position?

Three steps, each usable on its own:

1. `extract_hidden_states` runs the model once over a split's prompts (no generation) and streams, per batch,
   two vectors per clip and requested layer to disk: the mean hidden state of the K thinking slots (`slots`,
   absent when K = 0) and the hidden state at the last prompt position, which produces the first response token
   (`response`). A 7B model's 29 layers over thousands of clips never sit in memory at once.
2. `probe_rows` + `probe_targets` give per-clip targets: expert features standardised with the training split's
   statistics (the checkpoint's `target_stats.json`) and averaged over frames, or the answers of each subtask
   (one question type, one answer set: pooled subtasks could be told apart by the question alone).
3. `fit_probes` fits a standardised linear probe per (position, layer, target) under grouped cross-validation,
   beside a baseline conditioned on the question (the training folds' mean or majority answer for the clip's
   question type: what the question alone predicts) and a control task in Hewitt and Liang's sense (each question
   type gets a fixed random target drawn from the real ones, and the same probe is trained and tested on it):
   selectivity = score - control, so a probe that scores by memorising which question was asked scores nothing.
   Out-of-fold scores are kept per clip too, so layers can be chosen on some clips and compared on others.

`probe_checkpoint` runs the three on a saved checkpoint and writes (and logs) the tables: what `coat probe` does.
`logit_lens` decodes each thinking slot's hidden state at each layer through the LM head (`coat probe
--logit-lens`): whether the slots carry language.

Hidden-state layout under the extraction folder (`read_layer` reads it; `HiddenStateWriter` writes it):

    <position>/chunk-<n>.npy   float32 [layers, batch, hidden], one per batch, layers in `meta.json` order
    clips.json                 the clip ids, in row order across the chunks
    meta.json                  layers, positions, hidden size, chunk count; written last (absent: incomplete)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from rich.progress import track
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from coat import tracking
from coat.config import ConfigError, from_yaml
from coat.data.audio import AudioError, decode
from coat.data.manifest import TASKS, ManifestError, read_manifest, validate_rows
from coat.data.store import read_located, standardise
from coat.data.stream import MissingFeaturesError, TargetSource, training_items
from coat.errors import UsageError, UserError
from coat.eval.metrics import bootstrap_ci
from coat.model.coat_model import CONFIG_FILE, WEIGHTS_FILE, CoATModel, not_a_checkpoint
from coat.train.checkpoint import TARGET_STATS_FILE

POSITIONS = ("slots", "response")
FAMILY = "family"
FREE_TEXT_TASKS = ("transcription",)
ALPHAS = np.logspace(-2, 4, 13)
SPEAKER_COLUMNS = ("speaker", "voice")
META_FILE = "meta.json"
CLIPS_FILE = "clips.json"
COLUMNS = ("position", "layer", "target", "kind", "metric", "score", "baseline", "control", "selectivity",
           "n_clips", "folds", "dims", "control_by", "note")
CLIP_COLUMNS = ("position", "layer", "target", "clip", "score", "control")
METRICS = {"regression": "r2", "classification": "accuracy"}
RUN_PREFIX = "probe-"


class ProbeError(UserError):
    """A checkpoint, manifest, store or tracking store a probe run cannot use; the message names it."""


class LayerError(UsageError, ValueError):
    """A requested layer index the model does not have."""


# ---------------------------------------------------------------- hidden states on disk

@dataclass
class Extraction:
    """A finished extraction folder: what `meta.json` records. `skipped`: rows whose audio did not decode
    (`id`, `path`, `reason`), left out of `ids`."""

    path: Path
    ids: list[str]
    layers: list[int]
    positions: list[str]
    hidden_size: int
    chunks: int
    fingerprint: str | None = None
    skipped: list[dict] = field(default_factory=list)
    reused: bool = False  # returned as found: an earlier extraction with the same fingerprint


class HiddenStateWriter:
    """Streams per-batch hidden states into the extraction layout (see the module docstring).

    Anything a previous extraction left in `path` (chunks, meta, clip list) is removed first, so a folder never
    mixes two extractions; other files are left alone.
    """

    def __init__(self, path: str | Path, layers: Sequence[int], positions: Sequence[str], hidden_size: int,
                 fingerprint: str | None = None):
        unknown = [p for p in positions if p not in POSITIONS]
        if unknown:
            raise ValueError(f"unknown positions {unknown}; expected a subset of {POSITIONS}")
        self.path, self.layers, self.positions = Path(path), list(layers), list(positions)
        self.hidden_size, self.fingerprint = hidden_size, fingerprint
        self.ids: list[str] = []
        self.chunks = 0
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in (META_FILE, CLIPS_FILE):
            (self.path / stale).unlink(missing_ok=True)
        for position in POSITIONS:
            for chunk in (self.path / position).glob("chunk-*.npy"):
                chunk.unlink()

    def append(self, ids: Sequence[str], states: Mapping[str, np.ndarray]) -> None:
        """One batch: `states[position]` is [layers, len(ids), hidden]. Raises ValueError on a shape mismatch."""
        expected = (len(self.layers), len(ids), self.hidden_size)
        if set(states) != set(self.positions):
            raise ValueError(f"batch has positions {sorted(states)}, the writer expects {self.positions}")
        for position, values in states.items():
            if tuple(values.shape) != expected:
                raise ValueError(f"{position}: batch states have shape {tuple(values.shape)}, expected {expected} "
                                 "(layers, clips, hidden)")
        for position, values in states.items():
            folder = self.path / position
            folder.mkdir(exist_ok=True)
            np.save(folder / f"chunk-{self.chunks:06d}.npy", np.ascontiguousarray(values, dtype=np.float32))
        self.ids += [str(i) for i in ids]
        self.chunks += 1

    def close(self, skipped: Sequence[Mapping[str, object]] = ()) -> Extraction:
        """Write the clip list, then `meta.json` (which marks the folder complete)."""
        extraction = Extraction(self.path, self.ids, self.layers, self.positions, self.hidden_size, self.chunks,
                                self.fingerprint, [dict(s) for s in skipped])
        (self.path / CLIPS_FILE).write_text(json.dumps(self.ids))
        meta = {k: v for k, v in asdict(extraction).items() if k not in ("path", "ids", "reused")}
        tmp = self.path / f"{META_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, self.path / META_FILE)
        return extraction


def read_extraction(path: str | Path) -> Extraction:
    """The extraction in `path`. Raises FileNotFoundError when it holds no finished extraction."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no finished hidden-state extraction (no {META_FILE}): run "
                                "extract_hidden_states (coat probe) into it")
    meta = json.loads((path / META_FILE).read_text())
    return Extraction(path=path, ids=json.loads((path / CLIPS_FILE).read_text()), **meta)


def read_layer(path: str | Path, position: str, layer: int) -> np.ndarray:
    """[clips, hidden] float32 states of one position and layer (an index into `hidden_states`), read chunk by
    chunk. Raises ValueError naming the positions or layers the extraction holds."""
    extraction = read_extraction(path)
    if position not in extraction.positions:
        raise ValueError(f"{path}: no {position!r} states (it holds {extraction.positions}; slots need K > 0)")
    if layer not in extraction.layers:
        raise ValueError(f"{path}: layer {layer} was not extracted (it holds layers {extraction.layers})")
    j = extraction.layers.index(layer)
    folder = Path(path) / position
    parts = [np.load(folder / f"chunk-{c:06d}.npy", mmap_mode="r")[j] for c in range(extraction.chunks)]
    if not parts:
        return np.zeros((0, extraction.hidden_size), np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def hidden_state_count(model) -> int:
    """Entries of the LLM's `hidden_states`: the embeddings plus one per decoder layer."""
    return model.backbone.model.config.get_text_config().num_hidden_layers + 1


def normalise_layers(layers: Sequence[int] | None, count: int) -> list[int]:
    """Requested `hidden_states` indices (negative ones count from the end; None: all) as sorted distinct indices.

    Raises:
        LayerError: naming a layer outside [-count, count - 1].
    """
    if layers is None:
        return list(range(count))
    out = set()
    for layer in layers:
        if not -count <= layer < count:
            raise LayerError(f"layer {layer} is out of range: this model has {count} hidden states (0 = embeddings "
                             f"... {count - 1} = last layer; negative indices count from the end)")
        out.add(layer % count)
    return sorted(out)


def extract_hidden_states(model, rows: pd.DataFrame, out_dir: str | Path, layers: Sequence[int] | None = None,
                          batch_size: int = 8, *, max_seconds: float | None = None, crop: bool = True,
                          fingerprint: str | None = None, progress: bool = False) -> Extraction:
    """Run `model` (a CoATModel) over `rows` (`id`, `audio_path`, `prompt`: the question as the model is asked it,
    `model_prompt(prompt, choices)`) and stream the `slots` and `response` states of `layers` to `out_dir`.

    One forward per batch on the left-padded prompt encoding (`model.encode(audio, prompts)`), under no_grad, on
    the model's device with bf16 autocast on CUDA. Audio is decoded as training decodes it: cut to `max_seconds`
    with `crop`, else refused when longer. Rows whose audio does not decode are left out and listed in
    `skipped`. With a `fingerprint` equal to the one a finished extraction in `out_dir` recorded, that
    extraction is returned as it is (the caller hashes whatever determines the states).

    Raises:
        ValueError: a layer out of range, `batch_size` < 1, or rows lacking a column.
    """


    _check_rows(rows, batch_size)
    count = hidden_state_count(model)
    layers = normalise_layers(layers, count)
    out_dir = Path(out_dir)
    if fingerprint is not None and (out_dir / META_FILE).is_file():
        previous = read_extraction(out_dir)
        if previous.fingerprint == fingerprint:
            return replace(previous, reused=True)
    k = model.num_slots
    positions = [p for p in POSITIONS if p != "slots" or k > 0]
    writer = HiddenStateWriter(out_dir, layers, positions, model.backbone.hidden_size, fingerprint)
    skipped: list[dict] = []
    for kept, inputs, hidden in _forward_batches(model, rows, batch_size, max_seconds, crop, skipped,
                                                 "hidden states" if progress else None):
        states = {"response": np.stack([hidden[layer][:, -1].float().cpu().numpy() for layer in layers])}
        if k > 0:
            states["slots"] = np.stack([_slot_states(model, inputs, hidden[layer]).float().mean(1).cpu().numpy()
                                        for layer in layers])
        writer.append(kept, states)
    return writer.close(skipped)


def logit_lens(model, rows: pd.DataFrame, layers: Sequence[int] | None = None, batch_size: int = 8, *,
               top_k: int = 5, max_seconds: float | None = None, crop: bool = True, progress: bool = False
               ) -> pd.DataFrame:
    """Each thinking slot's hidden state at each of `layers` read through the LM head, as latent-reasoning papers
    do to ask whether slots carry language: the final norm applied (the last layer's states have had it), the
    next-token distribution averaged over `rows`' clips, and its `top_k` tokens. Columns: layer, slot, rank,
    token_id, token, probability. Empty at K = 0; rows are read as `extract_hidden_states` reads them.

    Raises:
        ValueError: a layer out of range, `batch_size` < 1, or rows lacking a column.
    """
    _check_rows(rows, batch_size)
    count = hidden_state_count(model)
    layers = normalise_layers(layers, count)
    columns = ["layer", "slot", "rank", "token_id", "token", "probability"]
    k = model.num_slots
    if k == 0:
        return pd.DataFrame(columns=columns)
    norm, head = model.backbone.llm.norm, model.backbone.model.get_output_embeddings()
    dtype = next(head.parameters()).dtype

    def next_token(layer: int, states: torch.Tensor) -> torch.Tensor:
        states = states if layer == count - 1 else norm(states)
        return torch.softmax(head(states.to(dtype)).float(), -1)

    sums, clips = None, 0
    for kept, inputs, hidden in _forward_batches(model, rows, batch_size, max_seconds, crop, [],
                                                 "logit lens" if progress else None):
        with torch.no_grad():  # [layers, K, vocabulary], summed over the batch's clips
            probabilities = torch.stack([next_token(layer, _slot_states(model, inputs, hidden[layer])).sum(0)
                                         for layer in layers])
        sums = probabilities if sums is None else sums + probabilities
        clips += len(kept)
    if sums is None:
        return pd.DataFrame(columns=columns)
    top = (sums / clips).topk(min(top_k, sums.shape[-1]), dim=-1)
    tokenizer = model.backbone.tokenizer
    records = [(layer, slot, rank + 1, int(token), tokenizer.decode([int(token)]), float(p))
               for j, layer in enumerate(layers) for slot in range(k)
               for rank, (token, p) in enumerate(zip(top.indices[j, slot], top.values[j, slot], strict=True))]
    return pd.DataFrame(records, columns=columns)


def _check_rows(rows: pd.DataFrame, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if missing := [c for c in ("id", "audio_path", "prompt") if c not in rows.columns]:
        raise ValueError(f"rows lack the columns {missing}")


def _forward_batches(model, rows: pd.DataFrame, batch_size: int, max_seconds: float | None, crop: bool,
                     skipped: list[dict], progress: str | None):
    """Per batch of `rows`: the ids whose audio decoded, the model inputs (the left-padded prompt encoding) and the
    hidden states of one forward pass under no_grad, in eval mode, with bf16 autocast on CUDA. Rows whose audio
    does not decode are appended to `skipped` (`id`, `path`, `reason`). `progress`: a progress bar's description."""
    device, rate, count = model.slot_table.device, model.backbone.sample_rate, hidden_state_count(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(rows), batch_size)
        for start in track(starts, description=progress or "", transient=True, disable=progress is None):
            chunk = rows.iloc[start:start + batch_size]
            audio, kept, prompts = [], [], []
            for i, path, prompt in zip(chunk["id"], chunk["audio_path"], chunk["prompt"], strict=True):
                try:
                    audio.append(decode(path, rate, max_seconds, crop).numpy())
                except AudioError as err:
                    skipped.append({"id": str(i), "path": str(path), "reason": err.reason})
                    continue
                kept.append(str(i))
                prompts.append(str(prompt))
            if not kept:
                continue
            with torch.no_grad(), autocast:
                inputs = model._model_inputs(model.encode(audio, prompts))
                if not bool(inputs["attention_mask"][:, -1].all()):
                    raise RuntimeError("the prompt encoding is not left-padded: the last position is not every "
                                       "row's last prompt token")
                hidden = model.lm(**inputs, output_hidden_states=True, use_cache=False).hidden_states
            if len(hidden) != count:
                raise RuntimeError(f"the model returned {len(hidden)} hidden states, its config promises {count}")
            yield kept, inputs, hidden
    finally:
        model.train(was_training)


def _slot_states(model, inputs: dict, hidden):
    """[B, K, H]: the states at the K thinking slots of each row."""
    is_slot = model.backbone.thinking.is_slot(inputs["input_ids"])
    return hidden[is_slot].view(is_slot.shape[0], model.num_slots, -1)


# ---------------------------------------------------------------- targets

@dataclass
class ProbeTarget:
    """One thing to probe for: `values` [n, D] floats (regression) or [n] labels (classification), for the
    clips at `rows` (indices into the extraction's clip order). A `note` marks a target that is not fit, and why."""

    name: str
    kind: str
    values: np.ndarray
    rows: np.ndarray
    note: str = ""


def load_target_stats(checkpoint: str | Path) -> dict[str, dict | None]:
    """The checkpoint's `target_stats.json` (per expert: the training split's standardisation statistics, None for
    discrete and multi-label experts); {} when the checkpoint has none."""
    path = Path(checkpoint) / TARGET_STATS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def probe_rows(manifest: str | Path, split: str, experts: Sequence[str], store_dir: str | Path, *,
               target_stats: Mapping[str, Mapping | None], max_seconds: float | None = None,
               long_clips: str = "crop", train_split: str = "train", max_clips: int | None = None, seed: int = 0,
               ) -> tuple[pd.DataFrame, dict, pd.DataFrame, list[str]]:
    """The split's rows to probe, as `training_items` locates them (with the store's features of every expert
    in `experts`, under the version training used), plus `task` and any speaker column of the manifest.

    Continuous targets are standardised with `target_stats` (the checkpoint's); an expert it lacks gets the
    statistics of `train_split` from the store, never the probed split's. `max_clips` keeps a seeded random
    subset, in manifest order. Returns (rows, TargetSource per expert, rows left out, experts whose statistics
    came from the store).

    Raises:
        ManifestError: the manifest cannot be read.
        ValueError: the split has no usable rows.
        UnknownExpertError: an expert name is unknown.
        MissingFeaturesError: the store lacks features (the message names the precompute command).
    """
    common = {"max_seconds": max_seconds, "long_clips": long_clips}
    stats_from = {name: TargetSource(name, "", False, target_stats[name]) for name in experts if name in target_stats}
    from_store = [name for name in experts if name not in target_stats]
    if from_store:
        _, train_sources, _ = training_items(manifest, train_split, from_store, store_dir, **common)
        stats_from |= train_sources
    rows, sources, left_out = training_items(manifest, split, list(experts), store_dir, stats_from=stats_from,
                                             **common)
    rows = pd.DataFrame(rows)
    good, _ = validate_rows(read_manifest(manifest))
    extra = [c for c in ("task", "subtask", *SPEAKER_COLUMNS) if c in good.columns and c not in rows.columns]
    rows = rows.merge(good[["id", *extra]].astype({"id": str}), on="id", how="left")
    if max_clips is not None and max_clips < len(rows):
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), max_clips, replace=False))
        rows = rows.iloc[keep].reset_index(drop=True)
    return rows, sources, left_out, from_store


def probe_targets(rows: pd.DataFrame, names: Sequence[str], sources: Mapping[str, object]) -> list[ProbeTarget]:
    """Targets for `names` over `rows` (from `probe_rows`, in the extraction's clip order).

    An expert name gives one regression target [clips, dim]: each clip's features standardised with its
    source's statistics (kept as they are for discrete and multi-label experts, whose frame average is then a
    class distribution) and averaged over frames. `family` gives one classification target per subtask of each
    task family present (`family/<task>/<subtask>`: the answers of its clips; `family/<task>` where the rows name
    no subtask); free-text families are listed with a note, not fit.

    Raises:
        KeyError: naming an expert without a source.
    """
    targets = []
    for name in names:
        if name == FAMILY:
            tasks = rows["task"].astype(str).to_numpy()
            subtasks = rows["subtask"].astype(str).to_numpy() if "subtask" in rows else None
            answers = rows["answer"].astype(str).to_numpy()
            for task in sorted(set(tasks) & TASKS):
                note = "free-text answers: not a classification target" if task in FREE_TEXT_TASKS else ""
                at_task = np.flatnonzero(tasks == task)
                parts = {task: at_task} if subtasks is None or note else {
                    f"{task}/{subtask}": at_task[subtasks[at_task] == subtask]
                    for subtask in sorted(set(subtasks[at_task]))}
                for label, at in parts.items():
                    targets.append(ProbeTarget(f"{FAMILY}/{label}", "classification", answers[at], at, note))
            continue
        if name not in sources:
            raise KeyError(f"no target source for expert {name!r}: pass it to probe_rows")
        stats = sources[name].stats
        where = pd.DataFrame({"clip_hash": rows["clip_hash"], "part": rows[f"part.{name}"],
                              "row": rows[f"row.{name}"]}).drop_duplicates("clip_hash")
        found = read_located(where)
        values = []
        for h in rows["clip_hash"]:
            frames = found[h]
            if stats is not None:
                frames = standardise(frames, stats)
            values.append(np.asarray(frames, np.float64).mean(0))
        targets.append(ProbeTarget(name, "regression", np.stack(values), np.arange(len(rows))))
    return targets


def clip_groups(rows: pd.DataFrame) -> np.ndarray:
    """Cross-validation groups [rows]: rows sharing an audio clip (`clip_hash`) or a speaker (a `speaker` or
    `voice` column, where present) share a group, transitively, so no fold tests on a clip or a voice it trained
    on."""
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    keys = [c for c in ("clip_hash", *SPEAKER_COLUMNS) if c in rows.columns]
    for column in keys:
        first: dict[object, int] = {}
        for i, value in enumerate(rows[column]):
            if value is None or (isinstance(value, float) and np.isnan(value)):
                continue
            value = str(value)
            if value in first:
                parent[root(i)] = root(first[value])
            else:
                first[value] = i
    return np.unique([root(i) for i in range(len(rows))], return_inverse=True)[1]


def question_types(rows: pd.DataFrame) -> np.ndarray:
    """Per row, the question type it was asked: its `subtask` where the rows have one (coat-mini's question types),
    else its prompt. The condition of the probes' baseline and the types of their control task."""
    column = "subtask" if "subtask" in rows and rows["subtask"].notna().all() else "prompt"
    return rows[column].astype(str).to_numpy()


# ---------------------------------------------------------------- probes

def cv_splits(groups: np.ndarray, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of a seeded `GroupKFold`: a group's rows all land in one test fold."""
    groups = np.asarray(groups)
    return list(GroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(groups)), groups=groups))


def _probe(kind: str):
    if kind == "regression":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def clip_scores(kind: str, y: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Each clip's share of the score, so that their mean is it: 1 for a right answer (accuracy), and for
    regression 1 - the clip's squared error over the target's variance, averaged over dimensions (their mean is
    the uniform-average R², as scikit-learn's r2_score computes it)."""
    if kind == "classification":
        return (y == predicted).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - ((y - predicted) ** 2 / y.var(0)).mean(1)


def _out_of_fold(kind: str, x: np.ndarray | None, y: np.ndarray, splits, conditions: np.ndarray | None = None
                 ) -> np.ndarray:
    """Out-of-fold predictions of the probe (`x` given) or of the baseline (`x` None: the training folds' mean, or
    their majority class, among the clips of the same `conditions` value where the training folds hold one). A
    training fold holding one class predicts it."""
    predicted = np.empty(y.shape, dtype=y.dtype if kind == "regression" else object)
    for train, test in splits:
        if x is None:
            for i in test:
                same = train[conditions[train] == conditions[i]] if conditions is not None else train
                predicted[i] = _typical(kind, y[same if len(same) else train])
            continue
        if kind == "classification" and len(np.unique(y[train])) == 1:
            predicted[test] = y[train][0]
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            predicted[test] = _probe(kind).fit(x[train], y[train]).predict(x[test]).reshape(y[test].shape)
    return predicted


def _typical(kind: str, y: np.ndarray):
    """The mean target, or the majority class."""
    if kind == "regression":
        return y.mean(0)
    classes, counts = np.unique(y, return_counts=True)
    return classes[np.argmax(counts)]


def control_task(y: np.ndarray, types: np.ndarray, seed: int) -> np.ndarray:
    """Hewitt and Liang's control task for target values `y`, with clip types (question types) in the place of their
    word types: each type is assigned a type at random (seeded, fixed), and each clip takes the value of a random
    clip of its assigned type. What a type's clips share becomes a fixed random value per type, which a probe gets
    only by memorising the type; what varies within a type becomes noise that no probe predicts across grouped
    folds. The control keeps the target's distribution and the share of it that types explain, and says nothing
    else about the clip. With every clip its own type it is a shuffle of `y`. A classification control is redrawn
    (up to 100 times) while it would hold one class."""
    rng = np.random.default_rng(seed)
    kinds, index = np.unique(types, return_inverse=True)
    members = [np.flatnonzero(index == kind) for kind in range(len(kinds))]
    for _ in range(100):
        assigned = rng.integers(0, len(kinds), len(kinds))[index]
        control = y[[members[kind][rng.integers(len(members[kind]))] for kind in assigned]]
        if y.dtype.kind in "fc" or len(np.unique(control)) > 1 or len(np.unique(y)) == 1:
            break
    return control


def _why_not(target: ProbeTarget, y: np.ndarray, groups: np.ndarray, folds: int) -> str:
    """Why a target cannot be probed with these folds ('' when it can)."""
    if target.note:
        return target.note
    n_groups = len(np.unique(groups))
    if n_groups < folds:
        return f"{len(y)} clips in {n_groups} groups: too few for {folds} folds"
    if target.kind == "classification" and len(np.unique(y)) < 2:
        return f"one class only ({str(y[0])!r})"
    if target.kind == "regression" and y.shape[1] == 0:
        return "every dimension is constant over these clips"
    return ""


@dataclass
class ProbeFit:
    """What `fit_probes` found: one row per (position, layer, target) (`COLUMNS`), and one per clip of each
    (`CLIP_COLUMNS`: its out-of-fold share of the probe's and the control's score; see `clip_scores`)."""

    table: pd.DataFrame
    clips: pd.DataFrame


def fit_probes(features_dir: str | Path, targets: Sequence[ProbeTarget], groups: np.ndarray,
               questions: np.ndarray | None = None, layers: Sequence[int] | None = None, folds: int = 5,
               seed: int = 0) -> ProbeFit:
    """Probes for `targets` at every (position, layer) of the extraction in `features_dir`.

    Regression targets: `StandardScaler` + `RidgeCV` scored by out-of-fold R² (the mean over target dimensions;
    dimensions constant over the clips carry nothing and are dropped, `dims` counts the rest). Classification:
    `StandardScaler` + `LogisticRegression` scored by out-of-fold accuracy. Folds: `GroupKFold` over `groups`
    (one label per extracted clip, e.g. `clip_groups`), the same for every layer, position and the control.
    `questions` (one per extracted clip, e.g. `question_types`) conditions the `baseline` — the training folds'
    mean or majority class among clips of the same question — and types the `control` (`control_task`, seeded per
    target, the same at every layer), so selectivity = score - control discounts what a probe gets by memorising
    which question was asked (`control_by` "question"). Without them, or where a target's clips share one
    question, every clip is its own type and the control scores about chance (`control_by` "clip"). Targets that
    cannot be fit get NaN scores and a `note`.

    Raises:
        ValueError: `groups` or `questions` do not match the extraction's clips, `folds` < 2, or a layer was not
            extracted.
    """
    extraction = read_extraction(features_dir)
    groups = np.asarray(groups)
    if len(groups) != len(extraction.ids) or (questions is not None and len(questions) != len(groups)):
        raise ValueError(f"{len(groups)} groups and {'no' if questions is None else len(questions)} questions for "
                         f"the {len(extraction.ids)} clips of {features_dir}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    layers = extraction.layers if layers is None else list(layers)
    if absent := [layer for layer in layers if layer not in extraction.layers]:
        raise ValueError(f"{features_dir}: layers {absent} were not extracted (it holds {extraction.layers})")

    prepared = []
    for target in targets:
        y = np.asarray(target.values)
        dims = 1
        if target.kind == "regression":
            y = y.reshape(len(y), -1).astype(np.float64)
            y = y[:, y.std(0) > 1e-8]
            dims = y.shape[1]
        elif target.kind != "classification":
            raise ValueError(f"target {target.name!r}: kind must be regression or classification, not {target.kind}")
        rows = np.asarray(target.rows)
        asked = None if questions is None else np.asarray(questions)[rows]
        by_question = asked is not None and len(np.unique(asked)) > 1
        note = _why_not(target, y, groups[rows], folds)
        splits = control = None
        baseline = np.nan
        if not note:
            splits = cv_splits(groups[rows], folds, seed)
            types = asked if by_question else np.arange(len(rows))
            control = control_task(y, types, seed=zlib.crc32(f"{seed}/{target.name}".encode()))
            baseline = clip_scores(target.kind, y, _out_of_fold(target.kind, None, y, splits, asked)).mean()
        prepared.append((target, y, rows, dims, note, splits, control, baseline, "question" if by_question else "clip"))

    records, per_clip = [], []
    for position in extraction.positions:
        for layer in layers:
            x = read_layer(features_dir, position, layer) if any(not p[4] for p in prepared) else None
            for target, y, rows, dims, note, splits, control, baseline, control_by in prepared:
                score = control_score = np.nan
                if not note:
                    xs = x[rows]
                    scores = clip_scores(target.kind, y, _out_of_fold(target.kind, xs, y, splits))
                    controls = clip_scores(target.kind, control, _out_of_fold(target.kind, xs, control, splits))
                    score, control_score = scores.mean(), controls.mean()
                    per_clip.append(pd.DataFrame({"position": position, "layer": int(layer), "target": target.name,
                                                  "clip": np.asarray(extraction.ids)[rows], "score": scores,
                                                  "control": controls}))
                records.append({
                    "position": position, "layer": int(layer), "target": target.name, "kind": target.kind,
                    "metric": METRICS[target.kind], "score": score, "baseline": baseline, "control": control_score,
                    "selectivity": score - control_score, "n_clips": len(rows), "folds": folds,
                    "dims": dims, "control_by": control_by, "note": note,
                })
    table = pd.DataFrame.from_records(records, columns=list(COLUMNS)).astype(
        {"layer": "int64", "n_clips": "int64", "folds": "int64", "dims": "int64", "score": "float64",
         "baseline": "float64", "control": "float64", "selectivity": "float64"})
    clips = (pd.concat(per_clip, ignore_index=True) if per_clip
             else pd.DataFrame(columns=list(CLIP_COLUMNS)).astype({"layer": "int64"}))
    return ProbeFit(table, clips)


def log_probe_results(run, table: pd.DataFrame, clips: pd.DataFrame | None = None,
                      lens: pd.DataFrame | None = None) -> None:
    """Log `probe/<position>/<target>/<metric>` and `..._selectivity` at step = layer for every fitted row, the
    table as the artifact `probes/results.parquet`, and where given the per-clip scores (`probes/clips.parquet`)
    and the logit lens (`probes/logit_lens.parquet`) to `run` (a `coat.tracking.TrackedRun`). Raises
    MlflowException (unknown run, store errors)."""
    fitted = table[table["score"].notna()]
    for layer, at in fitted.groupby("layer"):
        metrics = {}
        for row in at.itertuples():
            key = f"probe/{row.position}/{row.target}/{row.metric}"
            metrics[key], metrics[f"{key}_selectivity"] = row.score, row.selectivity
        run.log_metrics(metrics, step=int(layer))
    run.log_table(table, "probes/results.parquet")
    for name, extra in (("clips", clips), ("logit_lens", lens)):
        if extra is not None:
            run.log_table(extra, f"probes/{name}.parquet")


def held_out_comparison(coat: pd.DataFrame, plain: pd.DataFrame, *, n: int = 1000, seed: int = 0) -> dict:
    """A CoAT run's probe against its K = 0 twin's, for one target at one position, from their per-clip scores
    (`ProbeFit.clips` rows): each run's layer is chosen by mean selectivity (score - control) on a seeded half of the
    clips both probed, and the two are compared at those layers on the other half, which neither choice saw: each
    one's mean selectivity there, their difference, and its bootstrap 95% interval over clips. Returns
    {coat_layer, plain_layer, coat, plain, diff, ci_low, ci_high, n_clips}. Raises ValueError when the runs share
    fewer than four clips."""
    shared = sorted(set(coat["clip"]) & set(plain["clip"]))
    if len(shared) < 4:
        raise ValueError(f"the two runs share {len(shared)} probed clips: too few to choose a layer on half of them")
    choose = set(np.random.default_rng(seed).permutation(shared)[: len(shared) // 2])
    report = [clip for clip in shared if clip not in choose]

    def at_chosen_layer(clips: pd.DataFrame) -> tuple[int, np.ndarray]:
        clips = clips.assign(selectivity=clips["score"] - clips["control"])
        layer = int(clips[clips["clip"].isin(choose)].groupby("layer")["selectivity"].mean().idxmax())
        rows = clips[clips["layer"] == layer].set_index("clip")
        return layer, rows.loc[report, "selectivity"].to_numpy(np.float64)

    (coat_layer, mine), (plain_layer, theirs) = at_chosen_layer(coat), at_chosen_layer(plain)
    low, high = bootstrap_ci(mine - theirs, n=n, seed=seed)
    return {"coat_layer": coat_layer, "plain_layer": plain_layer, "coat": float(mine.mean()),
            "plain": float(theirs.mean()), "diff": float((mine - theirs).mean()), "ci_low": low, "ci_high": high,
            "n_clips": len(report)}


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per (target, position): the best layer by score, its score and selectivity, and the last layer's score and
    selectivity, in the table's order of targets and positions. Targets that were not fit are left out."""
    out = []
    fitted = table[table["score"].notna()]
    for target in fitted["target"].unique():
        for position in fitted["position"].unique():
            at = fitted[(fitted["target"] == target) & (fitted["position"] == position)]
            if at.empty:
                continue
            best, last = at.loc[at["score"].idxmax()], at.loc[at["layer"].idxmax()]
            out.append({"target": target, "position": position, "metric": best["metric"],
                        "best_layer": best["layer"], "best_score": best["score"],
                        "best_selectivity": best["selectivity"], "baseline": best["baseline"],
                        "last_layer": last["layer"], "last_score": last["score"],
                        "last_selectivity": last["selectivity"]})
    return pd.DataFrame(out)


# ---------------------------------------------------------------- a checkpoint, end to end

@dataclass
class ProbeRun:
    """What `probe_checkpoint` did: the results table and per-clip scores (also in `out`), the logit lens (None:
    not asked for), the extraction, the MLflow run it logged to (None: none), and what was left out, reused or taken
    from the store, in words."""

    table: pd.DataFrame
    clips: pd.DataFrame
    lens: pd.DataFrame | None
    out: Path
    extraction: Extraction
    run_id: str | None
    notes: list[str]


def probe_checkpoint(checkpoint: Path, names: Sequence[str], *, uri: str, split: str = "test",
                     data: Path | None = None, store: Path | None = None, out: Path | None = None,
                     layers: Sequence[int] | None = None, batch_size: int = 8, max_clips: int | None = None,
                     folds: int = 5, seed: int = 0, mlflow_run: str | None = None, experiment: str | None = None,
                     lens_top_k: int | None = None, progress: bool = False) -> ProbeRun:
    """Probe `checkpoint` for `names` (experts and/or `family`) on `split` of `data` (default: the checkpoint
    config's manifest and store), write `results.csv` / `results.parquet` and the per-clip `clips.parquet` to `out`
    (default `<checkpoint>/probes/<split>`) and log them to the run `mlflow_run`, or to a new run of `experiment`.
    With `lens_top_k`, also the slots' logit lens (`logit_lens`, that many tokens each) as `logit_lens.parquet`.

    The hidden states go to `<out>/hidden/` and are reused while the checkpoint, clips and layers stay the same.
    Everything that can be checked before the forward passes is (checkpoint, tracking store, data); nothing is
    written until then.

    Raises:
        ProbeError: the checkpoint, data or tracking store cannot be used (the message names which).
        LayerError: a layer in `layers` the model does not have.
    """
    if not (checkpoint / CONFIG_FILE).is_file():
        raise ProbeError(not_a_checkpoint(checkpoint, CONFIG_FILE))
    try:
        cfg = from_yaml((checkpoint / CONFIG_FILE).read_text())
    except (ConfigError, ValueError) as err:
        raise ProbeError(f"{checkpoint / CONFIG_FILE}: {err}") from None
    out = out or checkpoint / "probes" / split
    if mlflow_run or experiment:
        try:
            tracking.check_reachable(uri)
            if mlflow_run:
                tracking.mlflow_client(uri).get_run(mlflow_run)
        except (tracking.TrackingUnavailableError, MlflowException) as err:
            raise ProbeError(f"MLflow: {str(err).splitlines()[0]}") from None

    experts = [n for n in names if n != FAMILY]
    try:
        rows, sources, left_out, from_store = probe_rows(
            data or Path(cfg.data.manifest), split, experts, store or Path(cfg.data.store),
            target_stats=load_target_stats(checkpoint), max_seconds=cfg.data.max_seconds,
            long_clips=cfg.data.long_clips, train_split=cfg.data.train_split, max_clips=max_clips, seed=seed)
    except (ManifestError, MissingFeaturesError, ValueError) as err:
        raise ProbeError(err) from None
    notes = []
    if from_store:
        notes.append(f"{', '.join(from_store)}: not in the checkpoint's target_stats.json; standardised with split "
                     f"{cfg.data.train_split!r}'s statistics from the store")
    if len(left_out):
        notes.append(f"{len(left_out)} manifest rows left out (invalid, undecodable or too long)")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = CoATModel.load(checkpoint, device=device)
    except (FileNotFoundError, ValueError, ConfigError) as err:
        raise ProbeError(err) from None
    chosen = normalise_layers(layers, hidden_state_count(model))
    read = {"max_seconds": cfg.data.max_seconds, "crop": cfg.data.long_clips == "crop", "progress": progress}
    extraction = extract_hidden_states(
        model, rows, out / "hidden", chosen, batch_size, **read,
        fingerprint=_fingerprint(checkpoint, rows, chosen, cfg.data.max_seconds, cfg.data.long_clips))
    lens = None if lens_top_k is None else logit_lens(model, rows, chosen, batch_size, top_k=lens_top_k, **read)
    del model
    if extraction.reused:
        notes.append(f"reusing the hidden states in {out / 'hidden'} (same checkpoint, clips and layers)")
    if extraction.skipped:
        notes.append(f"{len(extraction.skipped)} clips did not decode and were left out")
    rows = rows.set_index("id").loc[extraction.ids].reset_index()

    fit = fit_probes(out / "hidden", probe_targets(rows, names, sources), clip_groups(rows), question_types(rows),
                     folds=folds, seed=seed)
    table = fit.table.assign(checkpoint=str(checkpoint.resolve()), split=split, num_slots=cfg.thinking.num_slots)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    table.to_parquet(out / "results.parquet", index=False)
    fit.clips.to_parquet(out / "clips.parquet", index=False)
    if lens is not None:
        lens.to_parquet(out / "logit_lens.parquet", index=False)
    run_id = mlflow_run
    try:
        if experiment:
            run_id = _new_probe_run(uri, experiment, checkpoint, cfg, split, names)
        if run_id:
            run = tracking.TrackedRun(uri, run_id)
            log_probe_results(run, table, fit.clips, lens)
            if experiment:
                run.end()
    except (MlflowException, ValueError) as err:
        raise ProbeError(f"MLflow: {str(err).splitlines()[0]} (results are in {out})") from None
    return ProbeRun(table, fit.clips, lens, out, extraction, run_id, notes)


def _fingerprint(checkpoint: Path, rows: pd.DataFrame, layers: list[int], max_seconds: float, long_clips: str) -> str:
    """What the hidden states depend on: the trained parts, the config, the clips and prompts, layers and cropping."""
    digest = hashlib.sha256()
    with open(checkpoint / WEIGHTS_FILE, "rb") as f:
        digest.update(hashlib.file_digest(f, "sha256").digest())
    digest.update((checkpoint / CONFIG_FILE).read_bytes())
    digest.update(repr((layers, max_seconds, long_clips)).encode())
    for row in rows[["id", "clip_hash", "prompt"]].itertuples(index=False):
        digest.update("\t".join(map(str, row)).encode() + b"\n")
    return digest.hexdigest()[:16]


def _new_probe_run(uri: str, experiment: str, checkpoint: Path, cfg, split: str, names: Sequence[str]) -> str:
    """A run `probe-<checkpoint folder>` of `experiment`, tagged with what was probed."""
    tags = {"coat.probe.checkpoint": str(checkpoint.resolve()), "coat.probe.split": split,
            "coat.probe.targets": ",".join(names), "backbone": cfg.backbone.name,
            "thinking.num_slots": str(cfg.thinking.num_slots)}
    experiment_id = tracking.get_or_create_experiment(uri, experiment)
    run = tracking.mlflow_client(uri).create_run(experiment_id, run_name=f"{RUN_PREFIX}{checkpoint.resolve().name}",
                                                 tags=tags)
    return run.info.run_id
