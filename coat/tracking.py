"""MLflow tracking: URI resolution, a fail-fast reachability check, and run helpers.

Everything goes through an explicit `MlflowClient(uri)`, never MLflow's fluent global state: one process may
drive several runs (a sweep's parent and children), and Ray workers log into a run the driver created.
Calls the store rejects (unknown run id, a server error) raise `mlflow.exceptions.MlflowException`.

Every write to a run goes through its handle, a `TrackedRun` (store, run id, spool folder) that `start_run` returns
and its owner passes to whatever else writes to the run (Ray Train's controller and workers, the evaluation) and
closes (`end`, then `flush`). A run with a spool folder survives the tracking server going away: its writes wait
on disk and are replayed exactly once (`spool.py`). Each write is therefore built as a record, which `_send`
delivers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
import requests
import yaml
from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE
from mlflow.utils.proto_json_utils import NumpyEncoder
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from coat.config import CoATConfig, flatten, redacted
from coat.errors import UserError
from coat.provenance import provenance
from coat.spool import PENDING, Spool, Unreachable, opened_runs

log = logging.getLogger(__name__)

# A write the server cannot take waits in the run's spool, so MLflow's own retries (seven, over about four
# minutes, by default) need not hold training up: two, over seconds when the server is down; a server that takes a
# request and never answers holds it for the three 30 s timeouts, once (the run's later writes follow it into the
# spool at once). MLflow reads them from the environment at each request; settings of the user's own win.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

# A fresh SQLite store announces at INFO that it creates and updates its tables: nothing a user acts on.
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)

RUN_NAME_TAG = "coat.run_name"
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
SQLITE_PREFIX = "sqlite:///"
DASHBOARD = "http://127.0.0.1:5000"  # where `make dashboard` serves the embedded store
STARTS_TAG, CHANGED_TAG = "coat.starts", "coat.provenance_changed"
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
            response = _ask_once(uri, timeout_s)
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


def _ask_once(uri: str, timeout_s: float) -> requests.Response:
    """One experiments/search request to the server at `uri`, not retried, answered within `timeout_s`. The one
    use of MLflow's internals (its REST helper and the credentials it reads from the environment): its public
    client retries for minutes and takes no timeout, and this must fail in seconds with the auth and TLS settings
    the client would use."""
    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET", max_retries=0,
                        timeout=timeout_s, params={"max_results": 1}, raise_on_status=False)


@functools.cache
def mlflow_client(uri: str) -> MlflowClient:
    """One client per tracking URI, for what the functions here do not cover (searches, downloads); MLflow's HTTP
    retries set short (`HTTP_RETRIES`) in this process first."""
    for name, value in HTTP_RETRIES.items():
        os.environ.setdefault(name, value)
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
    spool: Path | None = None,
    parent_spool: Path | None = None,
) -> TrackedRun:
    """Create a run (or, with `resume`, reopen the live run tagged `coat.run_name=run_name`) and log the config.

    The whole flattened config becomes params. MLflow params are immutable, so a reopened run keeps its
    original values and only gains keys it lacks; over-long values are truncated to MLflow's limit.
    `display_name` is what the dashboard shows (default `run_name`, which stays the run's key in the
    `coat.run_name` tag). With a `spool` folder the run's writes outlive a server outage (see `spool.py`); opened
    during one, the run gets a provisional id. A parent opened during an outage is found through its own spool
    (`parent_spool`) when it is replayed. Returns the run's handle. Raises ValueError for an empty run_name, one
    holding both quote characters (MLflow's search cannot match it), or a deleted experiment.
    """
    if not run_name or ("'" in run_name and '"' in run_name):
        raise ValueError(f"start_run: run_name {run_name!r} must be non-empty and not hold both ' and \"")
    all_tags = {
        "backbone": cfg.backbone.name,
        "experts": ",".join(cfg.experts.names),
        "thinking.num_slots": str(cfg.thinking.num_slots),
        **provenance(),
        **(tags or {}),
    }
    if parent_run_id is not None:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    record = {"kind": "open", "experiment": experiment, "run_name": run_name,
              "display_name": display_name or run_name, "resume": resume,
              **({"parent_spool": str(parent_spool)} if parent_spool is not None else {}),
              "params": {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in flatten(redacted(cfg)).items()},
              "tags": {key: str(value)[:MAX_TAG_VAL_LENGTH] for key, value in all_tags.items()}}
    run = TrackedRun(uri, "", spool, cfg.tracking.retry_s, cfg.tracking.spool_max_mb)
    run_spool = run.spool_of_process()
    return replace(run, run_id=_open_run(uri, record) if run_spool is None else run_spool.write(record))


def _open_run(uri: str, record: dict) -> str:
    """What `start_run` does on the server (an `open` record): find the run by its name or create it (tagged with
    the name, so that opening it again finds it), and log the params it lacks and the tags."""
    experiment_id = get_or_create_experiment(uri, record["experiment"])
    client = mlflow_client(uri)
    run_id = find_run(uri, experiment_id, record["run_name"]) if record["resume"] else None
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=record["display_name"]).info.run_id
        logged, earlier = {}, {}
    else:
        client.update_run(run_id, status="RUNNING")
        run = client.get_run(run_id)
        logged, earlier = run.data.params, run.data.tags
    params = [Param(key, value) for key, value in record["params"].items() if key not in logged]
    run_tags = [RunTag(key, value) for key, value in (record["tags"] | {RUN_NAME_TAG: record["run_name"]}
                                                      | _start_record(client, run_id, record, earlier)).items()]
    for i in range(0, max(len(params), len(run_tags)), MAX_PARAMS_TAGS_PER_BATCH):
        end = i + MAX_PARAMS_TAGS_PER_BATCH
        client.log_batch(run_id, params=params[i:end], tags=run_tags[i:end])
    return run_id


def _start_record(client: MlflowClient, run_id: str, record: dict, earlier: dict[str, str]) -> dict[str, str]:
    """Every start of a run keeps its own provenance: the artifact `provenance/start-<n>.json` holds the code and
    package versions of start n, and the tags `coat.starts` (n) and `coat.provenance_changed` (the provenance keys
    that differ from an earlier start) say whether the run's numbers came from more than one version of the code.
    The provenance tags themselves name the latest start."""
    start = int(earlier.get(STARTS_TAG, "0")) + 1
    now = {key: value for key, value in record["tags"].items() if key in provenance()}
    client.log_text(run_id, json.dumps({"start": start, "time_ms": int(time.time() * 1000), **now}, indent=2),
                    f"provenance/start-{start}.json")
    changed = {key for key, value in now.items() if earlier.get(key, value) != value}
    changed |= set(filter(None, earlier.get(CHANGED_TAG, "").split(",")))
    return {STARTS_TAG: str(start), **({CHANGED_TAG: ",".join(sorted(changed))} if changed else {})}


@functools.cache
def _spool(uri: str, folder: Path, retry_s: float, max_mb: float = float("inf")) -> Spool:
    """One `Spool` per folder in a process, whichever handle or replay asks: its lock and state are the folder's."""
    return Spool(Path(folder), functools.partial(_send, uri), functools.partial(_reachable, uri),
                 f"MLflow tracking server at {uri}", retry_s, max_mb * 2**20)


def wait_until_reachable(uri: str, then: str, timeout_s: float = 3600.0) -> None:
    """Wait (a warning a minute) for a server that went away, where nothing can go on without it. Raises
    TrackingUnavailableError, saying `then` (what to do once it is back), after `timeout_s`."""
    deadline, warned = time.monotonic() + timeout_s, -60.0
    while True:
        try:
            check_reachable(uri)
            return
        except TrackingUnavailableError as err:
            if time.monotonic() > deadline:
                raise TrackingUnavailableError(f"{err}; {then}") from None
            if time.monotonic() - warned >= 60:
                warned = time.monotonic()
                log.warning("%s; waiting for it (up to %.0f s)", err, deadline - time.monotonic())
            time.sleep(5)


def replay_spool(uri: str, folder: Path) -> bool:
    """Send what a run's spool folder holds (left by an earlier start of the run, or by its other processes) if
    the server answers. Returns whether nothing waits any more."""
    run_spool = _spool(uri, Path(folder), 0.0)
    return not run_spool.waiting() or run_spool.replay()


def _reachable(uri: str) -> bool:
    try:
        check_reachable(uri)
    except TrackingUnavailableError:
        return False
    return True


# What a tracking server (or the database behind it) says when it is overloaded or its database is away for a
# moment, whatever status it answers with: MLflow reports SQLAlchemy's pool exhaustion as 400 BAD_REQUEST.
CAPACITY_ERRORS = ("queuepool limit", "database is locked", "too many connections", "too many clients",
                   "remaining connection slots", "the database system is starting up",
                   "the database system is shutting down", "server closed the connection unexpectedly",
                   "could not connect to server", "connection refused")
CAPACITY_CODES = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED")


def is_outage(err: Exception) -> bool:
    """A write that failed because the server could not take it now: unreachable, 429 or 5xx past MLflow's
    retries (down, restarting, behind a proxy that is up), or out of capacity (`CAPACITY_ERRORS`), not a write the
    server rejected for what it was."""
    if isinstance(err, RestException):
        text = str(err).lower()
        return err.error_code in CAPACITY_CODES or any(sign in text for sign in CAPACITY_ERRORS)
    if isinstance(err, requests.HTTPError):
        return err.response is not None and (err.response.status_code >= 500 or err.response.status_code == 429)
    if isinstance(err, MlflowException):
        text = str(err)
        return " failed with exception " in text or " failed with timeout exception " in text or \
            err.get_http_status_code() in (429, 503) or \
            err.get_http_status_code() >= 500 and "failed with error code" in text or \
            any(sign in text.lower() for sign in CAPACITY_ERRORS)
    return isinstance(err, requests.ConnectionError | requests.Timeout)


def _send(uri: str, record: dict, ids: dict[str, str]) -> str | None:
    """Deliver one write record (`ids`: provisional run ids a replay has resolved). Raises `Unreachable` for an
    outage (see `is_outage`), MlflowException when the server rejects it."""
    try:
        if record["kind"] == "open":
            parent = record["tags"].get(MLFLOW_PARENT_RUN_ID)
            if parent and parent.startswith(PENDING):  # opened during an outage too: its own spool knows its id
                parent = ids.get(parent) or opened_runs(Path(record.get("parent_spool", ""))).get(parent, parent)
                if parent.startswith(PENDING):
                    raise Unreachable(f"the parent run {parent} is not open on the server yet")
            tags = record["tags"] | ({MLFLOW_PARENT_RUN_ID: parent} if parent else {})
            return _open_run(uri, {**record, "tags": tags})
        run_id = ids.get(record["run"], record["run"])
        if run_id.startswith(PENDING):
            raise Unreachable(f"run {run_id} is not open on the server yet")
        client = mlflow_client(uri)
        if record["kind"] == "log":
            metrics = [Metric(key, value, stamp, step) for key, value, stamp, step in record.get("metrics", [])]
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
            tags = [RunTag(key, value) for key, value in record.get("tags", {}).items()]
            for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, tags=tags[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        elif record["kind"] == "artifact":
            local = Path(record["local"])
            if local.is_dir():
                client.log_artifacts(run_id, str(local), record["path"])
            else:
                client.log_artifact(run_id, str(local), record["path"])
        elif record["kind"] == "end":
            client.set_terminated(run_id, record["status"])
        return None
    except Exception as err:
        if is_outage(err):
            raise Unreachable(str(err)) from err
        raise


def find_run(uri: str, experiment_id: str, run_name: str) -> str | None:
    """The newest non-deleted run of the experiment tagged with this coat run name."""
    quote = "'" if "'" not in run_name else '"'  # MLflow's filter grammar has no escapes, only two quote styles
    runs = mlflow_client(uri).search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = {quote}{run_name}{quote}",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1, order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def dataset_fingerprint(manifest_path: str | Path) -> str:
    """First 16 hex digits of the manifest's sha256: tag runs with it so results name the exact data.

    Raises FileNotFoundError naming the manifest.
    """
    path = Path(manifest_path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class TrackedRun:
    """One MLflow run to write to: its store (`uri`), its id, and the folder its writes wait in through a server
    outage (`spool`, at most `spool_max_mb` of them, the server asked again every `retry_s` seconds; None, or a local
    store, which has no outages: straight to the store). `start_run` makes it; its owner hands it to whatever else
    writes to the run (Ray Train's controller and workers travel with a pickled copy, which finds the spool again
    where it lands) and closes the run (`end`, then `flush`)."""

    uri: str
    run_id: str
    spool: Path | None = None
    retry_s: float = 30.0
    spool_max_mb: float = float("inf")

    def spool_of_process(self) -> Spool | None:
        """This process's `Spool` on the run's folder; None when writes go straight to the store."""
        if self.spool is None or urlparse(self.uri).scheme not in ("http", "https"):
            return None
        return _spool(self.uri, Path(self.spool), self.retry_s, self.spool_max_mb)

    def _write(self, record: dict) -> None:
        """Send a record, through the run's spool when it has one."""
        run_spool = self.spool_of_process()
        if run_spool is not None:
            run_spool.write(record)
            return
        try:
            _send(self.uri, record, {})
        except Unreachable as err:
            raise err.__cause__ from None

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Log every metric at `step` in one batched call. Raises ValueError naming a non-numeric metric.

        With a fixed `timestamp_ms`, logging the same metrics again stores nothing new (MLflow keys a metric by
        key, value, timestamp and step): a restarted worker and the one it replaced cannot log a step twice."""
        self.log_steps([(step, int(time.time() * 1000) if timestamp_ms is None else timestamp_ms, metrics)])

    def log_steps(self, steps: list[tuple[int, int, dict[str, float]]]) -> None:
        """Log the metrics of several steps, each `(step, timestamp_ms, metrics)`, as one write (see
        `log_metrics`)."""
        batch = []
        for step, stamp, metrics in steps:
            for key, value in metrics.items():
                try:
                    batch.append([key, float(value), int(stamp), int(step)])
                except (TypeError, ValueError):
                    raise ValueError(f"metric {key!r} has non-numeric value {value!r}") from None
        self._write({"kind": "log", "run": self.run_id, "metrics": batch})

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write `text` to the run's artifact `artifact_file` (the config YAML, a report). Raises MlflowException."""
        with _local_file(artifact_file) as local:
            local.write_text(text, encoding="utf-8")
            self._log_file(local, artifact_file)

    def log_dict_artifact(self, data: dict[str, Any], artifact_file: str) -> None:
        """Write `data` as JSON or YAML (by the file's extension) to the run's artifacts. Raises MlflowException."""
        as_yaml = Path(artifact_file).suffix in (".yaml", ".yml")
        plain = json.loads(json.dumps(data, cls=NumpyEncoder))  # numpy scalars and arrays as plain numbers, lists
        self.log_text(yaml.safe_dump(plain) if as_yaml else json.dumps(plain, indent=2), artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Upload a directory's contents (e.g. the trained parts). Raises NotADirectoryError naming `local_dir`."""
        if not Path(local_dir).is_dir():
            raise NotADirectoryError(f"log_artifacts: {local_dir} is not a directory")
        self._write({"kind": "artifact", "run": self.run_id, "local": str(local_dir), "path": artifact_path})

    def log_table(self, df: pd.DataFrame, artifact_file: str) -> None:
        """Write a table (e.g. an eval table) as a .json (pandas "split", MLflow's table format), .csv or .parquet
        artifact. Unlike `MlflowClient.log_table`, this replaces an existing file rather than appending to it, so a
        re-run evaluation does not duplicate rows. Raises ValueError naming an unsupported extension."""
        suffix = Path(artifact_file).suffix
        if suffix not in (".json", ".csv", ".parquet"):
            raise ValueError(f"log_table: {artifact_file!r} must end in .json, .csv or .parquet")
        with _local_file(artifact_file) as local:
            if suffix == ".json":
                df.to_json(local, orient="split", index=False, date_format="iso")
            elif suffix == ".csv":
                df.to_csv(local, index=False)
            else:
                df.to_parquet(local, index=False)
            self._log_file(local, artifact_file)

    def _log_file(self, local: Path, artifact_file: str) -> None:
        parent = str(Path(artifact_file).parent)
        self._write({"kind": "artifact", "run": self.run_id, "local": str(local),
                     "path": None if parent == "." else parent})

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set (or overwrite) tags on the run, values truncated to MLflow's limit. Raises MlflowException."""
        self._write({"kind": "log", "run": self.run_id,
                     "tags": {key: str(value)[:MAX_TAG_VAL_LENGTH] for key, value in tags.items()}})

    def set_description(self, text: str) -> None:
        """The run's description: what the dashboard shows at the top of the run's page (MLflow's note tag)."""
        self.set_tags({MLFLOW_RUN_NOTE: text})

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run finished, failed or killed. Raises ValueError for any other status."""
        if status not in END_STATUSES:
            raise ValueError(f"end: status {status!r} must be one of {', '.join(END_STATUSES)}")
        self._write({"kind": "end", "run": self.run_id, "status": status})

    def flush(self) -> bool:
        """At the run's end: replay what waits in its spool if the server is back. Returns whether nothing waits."""
        run_spool = self.spool_of_process()
        return run_spool is None or not run_spool.waiting() or run_spool.replay()


@contextlib.contextmanager
def _local_file(artifact_file: str) -> Iterator[Path]:
    """A path named like the artifact, in a folder removed on leaving."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / Path(artifact_file).name


def dashboard_link(uri: str, experiment_id: str) -> str | None:
    """The address of an experiment's runs in the dashboard's "Model training" view (MLflow 3's default view of
    an experiment is its GenAI overview, empty for coat): `uri` itself for a tracking server, `make dashboard`'s
    for the embedded SQLite store; None for other stores."""
    base = uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else (
        DASHBOARD if _sqlite_path(uri) is not None else None)
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning" if base else None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, in step order; [] if never logged. Raises MlflowException."""
    history = sorted(mlflow_client(uri).get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(m.step, m.value) for m in history]


def last_logged_step(uri: str, run_id: str, key: str) -> int:
    """The highest step at which `key` was logged; 0 when it never was, or the store cannot say (a run opened
    during an outage, the server away)."""
    try:
        return max((m.step for m in mlflow_client(uri).get_metric_history(run_id, key)), default=0)
    except MlflowException:
        return 0


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
