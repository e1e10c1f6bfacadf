"""MLflow tracking: URI resolution, a fail-fast reachability check, and run helpers.

Everything goes through an explicit `MlflowClient(uri)`, never MLflow's fluent global state: one process may
drive several runs (a sweep's parent and children), and Ray workers log into a run the driver created.
Calls the store rejects (unknown run id, a server error) raise `mlflow.exceptions.MlflowException`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import get_default_host_creds
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE
from mlflow.utils.rest_utils import http_request
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from coat.config import CoATConfig, flatten
from coat.errors import UserError

RUN_NAME_TAG = "coat.run_name"
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
SQLITE_PREFIX = "sqlite:///"
DASHBOARD = "http://127.0.0.1:5000"  # where `make dashboard` serves the embedded store
PREFILL_COST = "cost/prefill_positions"  # the thinking block's extra prefill positions: every run reports it


class TrackingUnavailableError(UserError, RuntimeError):
    """The tracking store cannot be reached or written; raised before any compute starts."""


def resolve_uri(configured: str | None) -> str:
    """`configured`, else $MLFLOW_TRACKING_URI, else the embedded `sqlite:///<cwd>/mlruns.db`.

    Relative SQLite paths are made absolute here, because Ray Tune/Train change the working directory of the
    processes that later open the store. Raises nothing.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE_PREFIX}{Path.cwd().resolve()}/mlruns.db"
    path = _sqlite_path(uri)
    return f"{SQLITE_PREFIX}{path}" if path is not None else uri


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (absolute), None for other URIs and in-memory databases."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    raw = uri[len(SQLITE_PREFIX):].split("?", 1)[0]
    if raw in ("", ":memory:"):
        return None
    return Path(raw).resolve()


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, before training starts, if the tracking store cannot be used.

    http(s): one experiments/search call without retries (MLflow's own client would otherwise retry for
    minutes), with MLflow's auth/TLS settings. sqlite: the database's directory must exist and be writable.
    Other schemes are left to MLflow. Raises TrackingUnavailableError naming the URI and the cause.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            response = http_request(
                get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET", max_retries=0,
                timeout=timeout_s, params={"max_results": 1}, raise_on_status=False,
            )
        except MlflowException as err:
            cause = str(err).split(" failed with exception ", 1)[-1][:300]
            raise TrackingUnavailableError(
                f"MLflow tracking server at {uri} is not reachable ({cause}): start it with `make dashboard` "
                "or set MLFLOW_TRACKING_URI"
            ) from None
        if response.status_code in (401, 403):
            raise TrackingUnavailableError(
                f"MLflow tracking server at {uri} refused the request (HTTP {response.status_code}): set "
                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
            )
        if response.status_code != 200:
            raise TrackingUnavailableError(
                f"MLflow tracking server at {uri} is not reachable (HTTP {response.status_code} "
                f"{response.text[:200]!r}): start it with `make dashboard` or set MLFLOW_TRACKING_URI"
            )
    elif (path := _sqlite_path(uri)) is not None:
        if not path.parent.is_dir():
            raise TrackingUnavailableError(f"MLflow store {uri}: directory {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise TrackingUnavailableError(f"MLflow store {uri}: {path} is not writable")


@functools.cache
def mlflow_client(uri: str) -> MlflowClient:
    """One client per tracking URI, for what the functions here do not cover (searches, downloads)."""
    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created if missing.

    For the embedded SQLite store, artifacts default to `mlartifacts/` beside the database (not MLflow's
    cwd-relative `./mlruns`). Raises ValueError if the experiment exists but was deleted (restore or purge it).
    """
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        if artifact_location is None and (db := _sqlite_path(uri)) is not None:
            artifact_location = (db.parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as err:  # another process created it between the lookup and here
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} (id {experiment.experiment_id}) at {uri} is deleted: restore it or "
            "choose another tracking.experiment"
        )
    return experiment.experiment_id


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    cfg: CoATConfig,
    *,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    resume: bool = True,
    display_name: str | None = None,
) -> str:
    """Create a run (or, with `resume`, reopen the live run tagged `coat.run_name=run_name`) and log the config.

    The whole flattened config becomes params. MLflow params are immutable, so a reopened run keeps its
    original values and only gains keys it lacks; over-long values are truncated to MLflow's limit.
    `display_name` is what the dashboard shows (default `run_name`, which stays the run's key in the
    `coat.run_name` tag). Returns the run id. Raises ValueError for an empty run_name, one holding both quote
    characters (MLflow's search cannot match it), or a deleted experiment.
    """
    if not run_name or ("'" in run_name and '"' in run_name):
        raise ValueError(f"start_run: run_name {run_name!r} must be non-empty and not hold both ' and \"")
    experiment_id = get_or_create_experiment(uri, experiment)
    client = mlflow_client(uri)
    run_id = find_run(uri, experiment_id, run_name) if resume else None
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=display_name or run_name).info.run_id
        logged: dict[str, str] = {}
    else:
        client.update_run(run_id, status="RUNNING")
        logged = client.get_run(run_id).data.params

    all_tags = {
        "backbone": cfg.backbone.name,
        "experts": ",".join(cfg.experts.names),
        "thinking.num_slots": str(cfg.thinking.num_slots),
        **code_provenance(),
        RUN_NAME_TAG: run_name,
        **(tags or {}),
    }
    if parent_run_id is not None:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    params = [
        Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in flatten(cfg).items() if key not in logged
    ]
    run_tags = [RunTag(key, str(value)[:MAX_TAG_VAL_LENGTH]) for key, value in all_tags.items()]
    for i in range(0, max(len(params), len(run_tags)), MAX_PARAMS_TAGS_PER_BATCH):
        end = i + MAX_PARAMS_TAGS_PER_BATCH
        client.log_batch(run_id, params=params[i:end], tags=run_tags[i:end])
    return run_id


def find_run(uri: str, experiment_id: str, run_name: str) -> str | None:
    """The newest non-deleted run of the experiment tagged with this coat run name."""
    quote = "'" if "'" not in run_name else '"'  # MLflow's filter grammar has no escapes, only two quote styles
    runs = mlflow_client(uri).search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = {quote}{run_name}{quote}",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1, order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


PACKAGES = ("torch", "torchaudio", "transformers", "peft", "ray", "mlflow", "optuna", "numpy")


@functools.cache
def code_provenance() -> dict[str, str]:
    """Tags that say which code made a run: the git commit of the checkout this package lives in and whether its
    tracked files had changes (`unknown` outside a checkout), a hash of the package's own source files (which
    identifies the code even when installed from a wheel), and the versions of the packages the numbers depend
    on. Raises nothing."""
    from importlib.metadata import PackageNotFoundError, version

    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(str(source.relative_to(package)).encode() + source.read_bytes())
    tags = {"git_commit": _git(package, "rev-parse", "HEAD"), "code_sha256": digest.hexdigest()[:16]}
    status = _git(package, "status", "--porcelain", "--untracked-files=no")
    tags["git_dirty"] = "unknown" if tags["git_commit"] == "unknown" else str(status not in ("", "unknown")).lower()
    for name in PACKAGES:
        try:
            tags[f"version.{name}"] = version(name)
        except PackageNotFoundError:
            tags[f"version.{name}"] = "absent"
    return tags


def _git(where: Path, *args: str) -> str:
    """`git args` run in `where`, stripped; "unknown" when git or the checkout is not there."""
    try:
        out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if args[0] == "status" else out.stdout.strip() or "unknown"


def dataset_fingerprint(manifest_path: str | Path) -> str:
    """First 16 hex digits of the manifest's sha256: tag runs with it so results name the exact data.

    Raises FileNotFoundError naming the manifest.
    """
    path = Path(manifest_path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int | None = None
                ) -> None:
    """Log every metric at `step` in one batched call. Raises ValueError naming a non-numeric metric.

    With a fixed `timestamp_ms`, logging the same metrics again stores nothing new (MLflow keys a metric by
    key, value, timestamp and step): a restarted worker and the one it replaced cannot log a step twice."""
    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    batch = []
    for key, value in metrics.items():
        try:
            batch.append(Metric(key, float(value), now, int(step)))
        except (TypeError, ValueError):
            raise ValueError(f"metric {key!r} has non-numeric value {value!r}") from None
    for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
        mlflow_client(uri).log_batch(run_id, metrics=batch[i:i + MAX_METRICS_PER_BATCH])


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    """Write `text` to the run's artifact `artifact_file` (the config YAML, a report). Raises MlflowException."""
    mlflow_client(uri).log_text(run_id, text, artifact_file)


def log_dict_artifact(uri: str, run_id: str, data: dict[str, Any], artifact_file: str) -> None:
    """Write `data` as JSON or YAML (by the file's extension) to the run's artifacts. Raises MlflowException."""
    mlflow_client(uri).log_dict(run_id, data, artifact_file)


def log_artifacts(uri: str, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    """Upload a directory's contents (e.g. the trained parts). Raises NotADirectoryError naming `local_dir`."""
    if not Path(local_dir).is_dir():
        raise NotADirectoryError(f"log_artifacts: {local_dir} is not a directory")
    mlflow_client(uri).log_artifacts(run_id, str(local_dir), artifact_path)


def log_table(uri: str, run_id: str, df: pd.DataFrame, artifact_file: str) -> None:
    """Write a table (e.g. an eval table) as a .json (pandas "split", MLflow's table format), .csv or .parquet
    artifact. Unlike `MlflowClient.log_table`, this replaces an existing file rather than appending to it, so a
    re-run evaluation does not duplicate rows. Raises ValueError naming an unsupported extension."""
    name = Path(artifact_file).name
    suffix = Path(name).suffix
    if suffix not in (".json", ".csv", ".parquet"):
        raise ValueError(f"log_table: {artifact_file!r} must end in .json, .csv or .parquet")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        if suffix == ".json":
            df.to_json(local, orient="split", index=False, date_format="iso")
        elif suffix == ".csv":
            df.to_csv(local, index=False)
        else:
            df.to_parquet(local, index=False)
        parent = str(Path(artifact_file).parent)
        mlflow_client(uri).log_artifact(run_id, str(local), None if parent == "." else parent)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Set (or overwrite) tags on a run, values truncated to MLflow's limit. Raises MlflowException."""
    run_tags = [RunTag(key, str(value)[:MAX_TAG_VAL_LENGTH]) for key, value in tags.items()]
    for i in range(0, len(run_tags), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow_client(uri).log_batch(run_id, tags=run_tags[i:i + MAX_PARAMS_TAGS_PER_BATCH])


def set_description(uri: str, run_id: str, text: str) -> None:
    """The run's description: what the dashboard shows at the top of the run's page (MLflow's note tag)."""
    mlflow_client(uri).set_tag(run_id, MLFLOW_RUN_NOTE, text)


def dashboard_link(uri: str, experiment_id: str) -> str | None:
    """The address of an experiment's runs in the dashboard's "Model training" view (MLflow 3's default view of
    an experiment is its GenAI overview, empty for coat): `uri` itself for a tracking server, `make dashboard`'s
    for the embedded SQLite store; None for other stores."""
    base = uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else (
        DASHBOARD if _sqlite_path(uri) is not None else None)
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning" if base else None


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run finished, failed or killed. Raises ValueError for any other status."""
    if status not in END_STATUSES:
        raise ValueError(f"end_run: status {status!r} must be one of {', '.join(END_STATUSES)}")
    mlflow_client(uri).set_terminated(run_id, status)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, in step order; [] if never logged. Raises MlflowException."""
    history = sorted(mlflow_client(uri).get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(m.step, m.value) for m in history]


def child_runs(uri: str, parent_run_id: str) -> list[Run]:
    """The runs whose parent is `parent_run_id` (a sweep's trials), oldest first."""
    client = mlflow_client(uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"])


def child_run_ids(uri: str, parent_run_id: str) -> list[str]:
    """The ids of `child_runs`."""
    return [run.info.run_id for run in child_runs(uri, parent_run_id)]


def run_status(uri: str, run_id: str) -> str:
    """RUNNING, FINISHED, FAILED or KILLED."""
    return mlflow_client(uri).get_run(run_id).info.status


def latest_metrics(uri: str, run_id: str) -> dict[str, float]:
    """Each metric's last logged value."""
    return dict(mlflow_client(uri).get_run(run_id).data.metrics)
