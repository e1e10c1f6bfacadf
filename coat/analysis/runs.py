"""MLflow runs as tidy tables: a sweep's parent and one row per child run, per-example predictions on demand.

A row holds the run's id, display name, status and parent, every param under its dotted config key (numbers as
numbers) and every metric's last value under its key (`eval/emotion/accuracy`, `latency/ttft_s`). Dots never
appear in metric keys nor slashes in param keys, so the two share one namespace without clashing.
"""

from __future__ import annotations

import ast
import json
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from coat import tracking

SWEEP_TAG, KIND_TAG, SEARCH_TAG = "coat.sweep", "coat.kind", "coat.search"
RUN_COLUMNS = ("run_id", "name", "status", "parent_run_id", "start_time")


class NothingToAnalyse(LookupError):
    """The store holds nothing a notebook analyses. `coat analyze` skips that notebook with this message, which
    says what would produce its inputs."""


def _value(text: str) -> object:
    """A logged param back as the number or list it was (MLflow stores strings)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: `RUN_COLUMNS`, params by dotted key, metrics (last values) by key."""
    rows = []
    for run in runs:
        tags = run.data.tags
        row = {"run_id": run.info.run_id, "name": tags.get(MLFLOW_RUN_NAME, run.info.run_name),
               "status": run.info.status, "parent_run_id": tags.get(MLFLOW_PARENT_RUN_ID),
               "start_time": pd.to_datetime(run.info.start_time, unit="ms")}
        row |= {key: _value(value) for key, value in run.data.params.items()}
        row |= dict(run.data.metrics)
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else list(RUN_COLUMNS))


def sweeps(uri: str, experiment: str) -> pd.DataFrame:
    """The experiment's sweep parent runs, newest first (`name` is the run's, `sweep` the sweep's own name,
    `search` "grid" or "optuna")."""
    client = tracking.mlflow_client(uri)
    experiment_id = tracking.get_or_create_experiment(uri, experiment)
    parents = client.search_runs([experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'",
                                 order_by=["attributes.start_time DESC"])
    table = runs_table(parents)
    table["sweep"] = [run.data.tags.get(SWEEP_TAG) for run in parents]
    table["search"] = [run.data.tags.get(SEARCH_TAG) for run in parents]
    return table


def children(uri: str, parent_run_id: str) -> pd.DataFrame:
    """One row per child run of a sweep (its trials), oldest first."""
    return runs_table(tracking.child_runs(uri, parent_run_id))


def varied(children: pd.DataFrame) -> list[str]:
    """The config fields that differ across a sweep's children (lists compared as text), in column order; not the
    run's own name, which differs by construction."""
    params = [c for c in children.columns if "." in c and "/" not in c and c not in (*RUN_COLUMNS, "train.run_name")]
    return [c for c in params if children[c].astype(str).nunique() > 1]


def find_sweep(uri: str, experiment: str, sweep: str | None = None, varying: tuple[str, ...] = (), *,
               grid: bool | None = None, multi_objective: bool | None = None, metric_prefix: str | None = None
               ) -> tuple[pd.Series, pd.DataFrame] | None:
    """The named sweep (`sweep` matches the parent run's name or its sweep name), else the newest one that fits:
    its children vary a field starting with one of `varying`, it is a grid (an exact ablation) or sampled as
    `grid` says, multi-objective as `multi_objective` says, and its children logged a metric starting with
    `metric_prefix`. Returns its parent row and its children; None when no sweep fits."""
    for _, parent in sweeps(uri, experiment).iterrows():
        if sweep is not None:
            if sweep in (parent["name"], parent["sweep"]):
                return parent, children(uri, parent["run_id"])
            continue
        if grid is not None and (parent["search"] == "grid") != grid:
            continue
        if multi_objective is not None and bool(parent.get("sweep.multi_objective")) != multi_objective:
            continue
        trials = children(uri, parent["run_id"])
        if varying and not any(f.startswith(varying) for f in varied(trials)):
            continue
        if metric_prefix and not any(str(c).startswith(metric_prefix) for c in trials.columns):
            continue
        return parent, trials
    return None


def required_sweep(uri: str, experiment: str, sweep: str | None, varying: tuple[str, ...], fix: str,
                   **kinds) -> tuple[pd.Series, pd.DataFrame]:
    """`find_sweep`, for a notebook that has nothing to say without one. Raises NothingToAnalyse saying what the
    notebook looked for and `fix`, what would make it."""
    found = find_sweep(uri, experiment, sweep, varying, **kinds)
    if found is None:
        fields = ", ".join(f"{v}*" if v.endswith(".") else v for v in varying)
        which = f"sweep {sweep!r}" if sweep else f"sweep varying {fields}" if varying else "sweep"
        if kinds.get("metric_prefix"):
            which += f" with {kinds['metric_prefix']}* metrics"
        raise NothingToAnalyse(f"no {which} in experiment {experiment!r} at {uri}: {fix}")
    return found


def predictions(uri: str, run_id: str, system: str = "coat") -> pd.DataFrame:
    """The per-example results a run's evaluation logged (`eval/predictions[.<system>].jsonl`): id, task, answer,
    prediction, correct, wer, tokens, latency. Raises MlflowException when the run has none."""
    name = "predictions.jsonl" if system == "coat" else f"predictions.{system}.jsonl"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(tracking.mlflow_client(uri).download_artifacts(run_id, f"eval/{name}", folder))
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return pd.DataFrame(rows).astype({"id": str})


def table_artifact(uri: str, run_id: str, path: str) -> pd.DataFrame:
    """A table a run logged (`coat.tracking.TrackedRun.log_table`: .parquet, .csv or pandas-split .json). Raises
    MlflowException when the run has no such artifact."""
    with tempfile.TemporaryDirectory() as folder:
        local = Path(tracking.mlflow_client(uri).download_artifacts(run_id, path, folder))
        if local.suffix == ".parquet":
            return pd.read_parquet(local)
        return pd.read_csv(local) if local.suffix == ".csv" else pd.read_json(local, orient="split")


def has_artifact(uri: str, run_id: str, path: str) -> bool:
    """Whether the run logged an artifact at `path` (e.g. `probes/clips.parquet`, which older runs lack)."""
    folder = path.rsplit("/", 1)[0] if "/" in path else None
    return any(a.path == path for a in tracking.mlflow_client(uri).list_artifacts(run_id, folder))


def histories(uri: str, run_ids: list[str], key: str) -> pd.DataFrame:
    """One row per (run, step) of metric `key`: run_id, step, value."""
    rows = [(run_id, step, value) for run_id in run_ids for step, value in tracking.metric_history(uri, run_id, key)]
    return pd.DataFrame(rows, columns=["run_id", "step", "value"])
