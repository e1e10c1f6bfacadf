"""Linear probes per layer: does expert information reach the thinking slots and the response position?

Three steps, each usable on its own:

1. `extract_hidden_states` runs the model once over a split's prompts (no generation) and streams, per batch,
   two vectors per clip and requested layer to disk: the mean hidden state of the K thinking slots (`slots`,
   absent when K = 0) and the hidden state at the last prompt position, which produces the first response token
   (`response`). A 7B model's 29 layers over thousands of clips never sit in memory at once.
2. `probe_rows` + `probe_targets` give per-clip targets: expert features standardised with the training split's
   statistics (the checkpoint's `target_stats.json`) and averaged over frames, or each task family's answers.
3. `fit_probes` fits a standardised linear probe per (position, layer, target) under grouped cross-validation,
   beside a baseline (training folds' mean or majority class) and a control task (the same probe on labels
   shuffled across clips): selectivity = score - control, so a wide layer that can fit anything scores nothing.

`probe_checkpoint` runs the three on a saved checkpoint and writes (and logs) the table: what `coat probe` does.

Hidden-state layout under the extraction folder (`read_layer` reads it; `HiddenStateWriter` writes it):

    <position>/chunk-<n>.npy   float32 [layers, batch, hidden], one per batch, layers in `meta.json` order
    clips.json                 the clip ids, in row order across the chunks
    meta.json                  layers, positions, hidden size, chunk count; written last (absent: incomplete)
"""

from __future__ import annotations

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

from coat.errors import UsageError, UserError

POSITIONS = ("slots", "response")
FAMILY = "family"
FREE_TEXT_TASKS = ("transcription",)
ALPHAS = np.logspace(-2, 4, 13)
SPEAKER_COLUMNS = ("speaker", "voice")
META_FILE = "meta.json"
CLIPS_FILE = "clips.json"
COLUMNS = ("position", "layer", "target", "kind", "metric", "score", "baseline", "control", "selectivity",
           "n_clips", "folds", "dims", "note")
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
    import torch
    from rich.progress import track

    from coat.data.audio import AudioError, decode

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    missing = [c for c in ("id", "audio_path", "prompt") if c not in rows.columns]
    if missing:
        raise ValueError(f"extract_hidden_states: rows lack the columns {missing}")
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
    device = model.slot_table.device
    rate = model.backbone.sample_rate
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    skipped = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            starts = range(0, len(rows), batch_size)
            for start in track(starts, description="hidden states", transient=True, disable=not progress):
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
                if kept:
                    writer.append(kept, _batch_states(model, audio, prompts, layers, count))
    finally:
        model.train(was_training)
    return writer.close(skipped)


def _batch_states(model, audio: list[np.ndarray], prompts: list[str], layers: list[int], count: int
                  ) -> dict[str, np.ndarray]:
    batch = model.encode(audio, prompts)
    inputs = model._model_inputs(batch)
    if not bool(inputs["attention_mask"][:, -1].all()):
        raise RuntimeError("the prompt encoding is not left-padded: the last position is not every row's last "
                           "prompt token")
    hidden = model.lm(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    if len(hidden) != count:
        raise RuntimeError(f"the model returned {len(hidden)} hidden states, its config promises {count}")
    states = {"response": np.stack([hidden[layer][:, -1].float().cpu().numpy() for layer in layers])}
    k = model.num_slots
    if k > 0:
        is_slot = model.backbone.thinking.is_slot(inputs["input_ids"])
        rows = is_slot.shape[0]
        states["slots"] = np.stack([hidden[layer][is_slot].view(rows, k, -1).float().mean(1).cpu().numpy()
                                    for layer in layers])
    return states


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
    from coat.train.checkpoint import TARGET_STATS_FILE

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
    from coat.data.manifest import read_manifest, validate_rows
    from coat.data.stream import TargetSource, training_items

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
    extra = [c for c in ("task", *SPEAKER_COLUMNS) if c in good.columns]
    rows = rows.merge(good[["id", *extra]].astype({"id": str}), on="id", how="left")
    if max_clips is not None and max_clips < len(rows):
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), max_clips, replace=False))
        rows = rows.iloc[keep].reset_index(drop=True)
    return rows, sources, left_out, from_store


def probe_targets(rows: pd.DataFrame, names: Sequence[str], sources: Mapping[str, object]) -> list[ProbeTarget]:
    """Targets for `names` over `rows` (from `probe_rows`, in the extraction's clip order).

    An expert name gives one regression target [clips, dim]: each clip's features standardised with its
    source's statistics (kept as they are for discrete and multi-label experts, whose frame average is then a
    class distribution) and averaged over frames. `family` gives one classification target per task family
    present (the answers of that family's clips); free-text families are listed with a note, not fit.

    Raises:
        KeyError: naming an expert without a source.
    """
    from coat.data.manifest import TASKS
    from coat.data.store import read_located, standardise

    targets = []
    for name in names:
        if name == FAMILY:
            tasks = rows["task"].astype(str).to_numpy()
            for task in sorted(set(tasks) & TASKS):
                at = np.flatnonzero(tasks == task)
                note = "free-text answers: not a classification target" if task in FREE_TEXT_TASKS else ""
                labels = rows["answer"].astype(str).to_numpy()[at]
                targets.append(ProbeTarget(f"{FAMILY}/{task}", "classification", labels, at, note))
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


# ---------------------------------------------------------------- probes

def cv_splits(groups: np.ndarray, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of a seeded `GroupKFold`: a group's rows all land in one test fold."""
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    return list(GroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(groups)), groups=groups))


def _probe(kind: str):
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "regression":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def _score(kind: str, y: np.ndarray, predicted: np.ndarray) -> float:
    from sklearn.metrics import r2_score

    if kind == "regression":
        return float(r2_score(y, predicted, multioutput="uniform_average"))
    return float(np.mean(y == predicted))


def _out_of_fold(kind: str, x: np.ndarray | None, y: np.ndarray, splits) -> np.ndarray:
    """Out-of-fold predictions of the probe (`x` given) or of the baseline (`x` None: the training folds' mean,
    or their majority class). A training fold holding one class predicts it."""
    from sklearn.exceptions import ConvergenceWarning

    predicted = np.empty(y.shape, dtype=y.dtype if kind == "regression" else object)
    for train, test in splits:
        classes, counts = np.unique(y[train], return_counts=True) if kind == "classification" else (None, None)
        if kind == "regression" and x is None:
            predicted[test] = y[train].mean(0)
        elif kind == "classification" and (x is None or len(classes) == 1):
            predicted[test] = classes[np.argmax(counts)]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                predicted[test] = _probe(kind).fit(x[train], y[train]).predict(x[test]).reshape(y[test].shape)
    return predicted


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


def fit_probes(features_dir: str | Path, targets: Sequence[ProbeTarget], groups: np.ndarray,
               layers: Sequence[int] | None = None, folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """One row per (position, layer, target) of the extraction in `features_dir` (see `COLUMNS`).

    Regression targets: `StandardScaler` + `RidgeCV` scored by out-of-fold R² (the mean over target dimensions;
    dimensions constant over the clips carry nothing and are dropped, `dims` counts the rest). Classification:
    `StandardScaler` + `LogisticRegression` scored by out-of-fold accuracy. Folds: `GroupKFold` over `groups`
    (one label per extracted clip, e.g. `clip_groups`), the same for every layer, position and the control.
    `baseline`: the training folds' mean (R² <= 0) or majority class; `control`: the probe fit to the target's
    values shuffled across its clips (seeded per target, the same shuffle at every layer); selectivity = score -
    control. Targets that cannot be fit get NaN scores and a `note`.

    Raises:
        ValueError: `groups` does not match the extraction's clips, `folds` < 2, or a layer was not extracted.
    """
    extraction = read_extraction(features_dir)
    groups = np.asarray(groups)
    if len(groups) != len(extraction.ids):
        raise ValueError(f"{len(groups)} groups for the {len(extraction.ids)} clips of {features_dir}")
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
        note = _why_not(target, y, groups[rows], folds)
        splits = control = None
        if not note:
            splits = cv_splits(groups[rows], folds, seed)
            control = y[np.random.default_rng([seed, zlib.crc32(target.name.encode())]).permutation(len(y))]
        baseline = _score(target.kind, y, _out_of_fold(target.kind, None, y, splits)) if splits else np.nan
        prepared.append((target, y, rows, dims, note, splits, control, baseline))

    records = []
    for position in extraction.positions:
        for layer in layers:
            x = read_layer(features_dir, position, layer) if any(not p[4] for p in prepared) else None
            for target, y, rows, dims, note, splits, control, baseline in prepared:
                score = control_score = np.nan
                if not note:
                    xs = x[rows]
                    score = _score(target.kind, y, _out_of_fold(target.kind, xs, y, splits))
                    control_score = _score(target.kind, control, _out_of_fold(target.kind, xs, control, splits))
                records.append({
                    "position": position, "layer": int(layer), "target": target.name, "kind": target.kind,
                    "metric": METRICS[target.kind], "score": score, "baseline": baseline, "control": control_score,
                    "selectivity": score - control_score, "n_clips": len(rows), "folds": folds,
                    "dims": dims, "note": note,
                })
    return pd.DataFrame.from_records(records, columns=list(COLUMNS)).astype(
        {"layer": "int64", "n_clips": "int64", "folds": "int64", "dims": "int64", "score": "float64",
         "baseline": "float64", "control": "float64", "selectivity": "float64"})


def log_probe_results(uri: str, run_id: str, table: pd.DataFrame) -> None:
    """Log `probe/<position>/<target>/<metric>` and `..._selectivity` at step = layer for every fitted row, and the
    table as the artifact `probes/results.parquet`. Raises MlflowException (unknown run, store errors)."""
    from coat import tracking

    fitted = table[table["score"].notna()]
    for layer, at in fitted.groupby("layer"):
        metrics = {}
        for row in at.itertuples():
            key = f"probe/{row.position}/{row.target}/{row.metric}"
            metrics[key], metrics[f"{key}_selectivity"] = row.score, row.selectivity
        tracking.log_metrics(uri, run_id, metrics, step=int(layer))
    tracking.log_table(uri, run_id, table, "probes/results.parquet")


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
    """What `probe_checkpoint` did: the results table (also in `out`), the extraction, the MLflow run it logged to
    (None: none), and what was left out, reused or taken from the store, in words."""

    table: pd.DataFrame
    out: Path
    extraction: Extraction
    run_id: str | None
    notes: list[str]


def probe_checkpoint(checkpoint: Path, names: Sequence[str], *, uri: str, split: str = "test",
                     data: Path | None = None, store: Path | None = None, out: Path | None = None,
                     layers: Sequence[int] | None = None, batch_size: int = 8, max_clips: int | None = None,
                     folds: int = 5, seed: int = 0, mlflow_run: str | None = None, experiment: str | None = None,
                     progress: bool = False) -> ProbeRun:
    """Probe `checkpoint` for `names` (experts and/or `family`) on `split` of `data` (default: the checkpoint
    config's manifest and store), write `results.csv` / `results.parquet` to `out` (default
    `<checkpoint>/probes/<split>`) and log them to the run `mlflow_run`, or to a new run of `experiment`.

    The hidden states go to `<out>/hidden/` and are reused while the checkpoint, clips and layers stay the same.
    Everything that can be checked before the forward passes is (checkpoint, tracking store, data); nothing is
    written until then.

    Raises:
        ProbeError: the checkpoint, data or tracking store cannot be used (the message names which).
        LayerError: a layer in `layers` the model does not have.
    """
    import torch
    from mlflow.exceptions import MlflowException

    from coat import tracking
    from coat.config import ConfigError, from_yaml
    from coat.data.manifest import ManifestError
    from coat.data.stream import MissingFeaturesError
    from coat.model.coat_model import CONFIG_FILE, CoATModel, not_a_checkpoint

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
    extraction = extract_hidden_states(
        model, rows, out / "hidden", chosen, batch_size, max_seconds=cfg.data.max_seconds,
        crop=cfg.data.long_clips == "crop", progress=progress,
        fingerprint=_fingerprint(checkpoint, rows, chosen, cfg.data.max_seconds, cfg.data.long_clips))
    del model
    if extraction.reused:
        notes.append(f"reusing the hidden states in {out / 'hidden'} (same checkpoint, clips and layers)")
    if extraction.skipped:
        notes.append(f"{len(extraction.skipped)} clips did not decode and were left out")
    rows = rows.set_index("id").loc[extraction.ids].reset_index()

    table = fit_probes(out / "hidden", probe_targets(rows, names, sources), clip_groups(rows), folds=folds, seed=seed)
    table = table.assign(checkpoint=str(checkpoint.resolve()), split=split, num_slots=cfg.thinking.num_slots)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    table.to_parquet(out / "results.parquet", index=False)
    run_id = mlflow_run
    try:
        if experiment:
            run_id = _new_probe_run(uri, experiment, checkpoint, cfg, split, names)
        if run_id:
            log_probe_results(uri, run_id, table)
            if experiment:
                tracking.end_run(uri, run_id)
    except (MlflowException, ValueError) as err:
        raise ProbeError(f"MLflow: {str(err).splitlines()[0]} (results are in {out})") from None
    return ProbeRun(table, out, extraction, run_id, notes)


def _fingerprint(checkpoint: Path, rows: pd.DataFrame, layers: list[int], max_seconds: float, long_clips: str) -> str:
    """What the hidden states depend on: the trained parts, the config, the clips and prompts, layers and cropping."""
    import hashlib

    from coat.model.coat_model import CONFIG_FILE, WEIGHTS_FILE

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
    from coat import tracking

    tags = {"coat.probe.checkpoint": str(checkpoint.resolve()), "coat.probe.split": split,
            "coat.probe.targets": ",".join(names), "backbone": cfg.backbone.name,
            "thinking.num_slots": str(cfg.thinking.num_slots)}
    experiment_id = tracking.get_or_create_experiment(uri, experiment)
    run = tracking.mlflow_client(uri).create_run(experiment_id, run_name=f"{RUN_PREFIX}{checkpoint.resolve().name}",
                                                 tags=tags)
    return run.info.run_id
