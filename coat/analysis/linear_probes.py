"""Linear probes per layer of the hidden states `hidden_states.py` extracted: does expert information reach the
thinking slots and the response position?

`probe_rows` + `probe_targets` give per-clip targets: expert features standardised with the training split's
statistics (the checkpoint's `target_stats.json`) and averaged over frames, or the answers of each subtask (one
question type, one answer set: pooled subtasks could be told apart by the question alone). `fit_probes` fits a
standardised linear probe per (position, layer, target) under grouped cross-validation, beside a baseline
conditioned on the question (the training folds' mean or majority answer for the clip's question type: what the
question alone predicts) and a control task in Hewitt and Liang's sense (each question type gets a fixed random
target drawn from the real ones, and the same probe is trained and tested on it): selectivity = score - control,
so a probe that scores by memorising which question was asked scores nothing. Out-of-fold scores are kept per clip
too, so layers can be chosen on some clips and compared on others.
"""

from __future__ import annotations

import json
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from coat.analysis.hidden_states import read_extraction, read_layer
from coat.data.manifest import TASKS, read_manifest, validate_rows
from coat.data.store import read_located, standardise
from coat.data.stream import TargetSource, training_items
from coat.train.checkpoint import TARGET_STATS_FILE

FAMILY = "family"
FREE_TEXT_TASKS = ("transcription",)
ALPHAS = np.logspace(-2, 4, 13)
SPEAKER_COLUMNS = ("speaker", "voice")
COLUMNS = ("position", "layer", "target", "kind", "metric", "score", "baseline", "control", "selectivity",
           "n_clips", "folds", "dims", "control_by", "note")
CLIP_COLUMNS = ("position", "layer", "target", "clip", "score", "control")
METRICS = {"regression": "r2", "classification": "accuracy"}




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


@dataclass
class _Prepared:
    """A target made ready for every layer: its values (constant regression dimensions dropped), the extracted rows
    it covers, the folds, its control task and question-conditioned baseline, or the `note` saying why it cannot be
    fit."""

    target: ProbeTarget
    y: np.ndarray
    rows: np.ndarray
    dims: int
    note: str
    control_by: str
    splits: list | None = None
    control: np.ndarray | None = None
    baseline: float = np.nan


def _prepare(target: ProbeTarget, groups: np.ndarray, questions: np.ndarray | None, folds: int, seed: int
             ) -> _Prepared:
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
    prepared = _Prepared(target, y, rows, dims, _why_not(target, y, groups[rows], folds),
                         "question" if by_question else "clip")
    if not prepared.note:
        prepared.splits = cv_splits(groups[rows], folds, seed)
        types = asked if by_question else np.arange(len(rows))
        prepared.control = control_task(y, types, seed=zlib.crc32(f"{seed}/{target.name}".encode()))
        prepared.baseline = clip_scores(target.kind, y, _out_of_fold(target.kind, None, y, prepared.splits,
                                                                      asked)).mean()
    return prepared


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

    prepared = [_prepare(target, groups, questions, folds, seed) for target in targets]
    records, per_clip = [], []
    for position in extraction.positions:
        for layer in layers:
            x = read_layer(features_dir, position, layer) if any(not p.note for p in prepared) else None
            for p in prepared:
                score = control_score = np.nan
                if not p.note:
                    xs = x[p.rows]
                    scores = clip_scores(p.target.kind, p.y, _out_of_fold(p.target.kind, xs, p.y, p.splits))
                    controls = clip_scores(p.target.kind, p.control,
                                           _out_of_fold(p.target.kind, xs, p.control, p.splits))
                    score, control_score = scores.mean(), controls.mean()
                    per_clip.append(pd.DataFrame({"position": position, "layer": int(layer), "target": p.target.name,
                                                  "clip": np.asarray(extraction.ids)[p.rows], "score": scores,
                                                  "control": controls}))
                records.append({
                    "position": position, "layer": int(layer), "target": p.target.name, "kind": p.target.kind,
                    "metric": METRICS[p.target.kind], "score": score, "baseline": p.baseline,
                    "control": control_score, "selectivity": score - control_score, "n_clips": len(p.rows),
                    "folds": folds, "dims": p.dims, "control_by": p.control_by, "note": p.note,
                })
    table = pd.DataFrame.from_records(records, columns=list(COLUMNS)).astype(
        {"layer": "int64", "n_clips": "int64", "folds": "int64", "dims": "int64", "score": "float64",
         "baseline": "float64", "control": "float64", "selectivity": "float64"})
    clips = (pd.concat(per_clip, ignore_index=True) if per_clip
             else pd.DataFrame(columns=list(CLIP_COLUMNS)).astype({"layer": "int64"}))
    return ProbeFit(table, clips)


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


