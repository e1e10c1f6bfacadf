"""MLflow tracking against real stores: an embedded SQLite file, and a real `mlflow server` on loopback."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from coat import tracking
from coat.config import flatten, from_yaml, load_config, redacted, to_yaml
from coat.provenance import provenance
from coat.spool import Spool, SpoolFullError
from coat.tracking import TrackingUnavailableError
from tests.conftest import free_port, mlflow_server, wait_for

OVERRIDES = ["thinking.num_slots=4", "experts.names=[pitch,mel]", "loss.weights.pitch=0.5", "train.lr=0.001"]


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One embedded store for the module (creating its tables takes seconds); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('store').resolve()}/mlruns.db"


@pytest.fixture
def experiment(request) -> str:
    return request.node.name


def test_resolve_uri_precedence_and_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cwd = tmp_path.resolve()
    assert tracking.resolve_uri(None) == f"sqlite:///{cwd}/mlruns.db"
    assert tracking.resolve_uri("sqlite:///sub/x.db") == f"sqlite:///{cwd}/sub/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.resolve_uri(None) == "http://tracking.example:5000"
    assert tracking.resolve_uri("http://127.0.0.1:5001") == "http://127.0.0.1:5001"


def test_start_run_logs_flat_config_and_tags(sqlite_uri, experiment, tmp_path):
    long_modules = [f"module_{i:04d}" for i in range(700)]  # str() of this list exceeds MLflow's 6000-char limit
    cfg = load_config(overrides=[*OVERRIDES, f"lora.target_modules=[{','.join(long_modules)}]"])
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"id": "a", "path": "a.wav"}\n')
    fingerprint = tracking.dataset_fingerprint(manifest)
    run_id = tracking.start_run(sqlite_uri, experiment, "k4", cfg, tags={"dataset_fingerprint": fingerprint}).run_id

    run = MlflowClient(sqlite_uri).get_run(run_id)
    expected = {key: str(value)[:6000] for key, value in flatten(cfg).items()}
    assert run.data.params == expected
    assert len(run.data.params["lora.target_modules"]) == 6000
    assert run.data.params["loss.weights.pitch"] == "0.5"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(tracking.__file__).parent, capture_output=True,
                          text=True).stdout.strip() or "unknown"
    assert {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")} == {
        "backbone": "qwen2-audio", "experts": "pitch,mel", "thinking.num_slots": "4", "git_commit": head,
        "coat.run_name": "k4", "dataset_fingerprint": fingerprint, **provenance(), "coat.starts": "1",
    }
    assert {"version.jiwer", "version.whisper-normalizer", "version.scikit-learn", "version.statsmodels",
            "version.opensmile", "version.torchcrepe"} <= set(run.data.tags), "scorers' and experts' versions too"
    assert run.info.run_name == "k4" and run.info.status == "RUNNING"
    assert MlflowClient(sqlite_uri).get_experiment(run.info.experiment_id).name == experiment
    # Artifacts sit beside the database, not in whatever the working directory was.
    db_dir = Path(sqlite_uri.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri == f"{(db_dir / 'mlartifacts').as_uri()}/{run_id}/artifacts"

    manifest.write_text('{"id": "b", "path": "b.wav"}\n')
    assert tracking.dataset_fingerprint(manifest) != fingerprint and len(fingerprint) == 16


def test_a_resumed_run_keeps_the_provenance_of_every_start(sqlite_uri, experiment, tmp_path):
    cfg = load_config(overrides=OVERRIDES)
    run_id = tracking.start_run(sqlite_uri, experiment, "twice", cfg).run_id
    again = tracking.start_run(sqlite_uri, experiment, "twice", cfg, tags={"version.jiwer": "0.0-other"})
    assert again.run_id == run_id
    client = MlflowClient(sqlite_uri)
    tags = client.get_run(run_id).data.tags
    assert tags["coat.starts"] == "2" and tags["coat.provenance_changed"] == "version.jiwer"
    starts = [json.loads(Path(client.download_artifacts(run_id, f"provenance/start-{n}.json", str(tmp_path)))
                         .read_text()) for n in (1, 2)]
    assert starts[0]["version.jiwer"] == provenance()["version.jiwer"] and starts[1]["version.jiwer"] == "0.0-other"
    assert starts[0]["code_sha256"] == starts[1]["code_sha256"] == provenance()["code_sha256"]
    tracking.start_run(sqlite_uri, experiment, "twice", cfg)
    assert client.get_run(run_id).data.tags["coat.provenance_changed"] == "version.jiwer", "a change stays recorded"


def test_metrics_round_trip_with_steps(sqlite_uri, experiment):
    run = tracking.start_run(sqlite_uri, experiment, "metrics", load_config(overrides=OVERRIDES))
    run_id = run.run_id
    for step, loss in [(0, 2.5), (10, 1.25), (20, 0.75)]:
        run.log_metrics({"loss": loss, "loss.pitch": loss / 2}, step)
    assert tracking.metric_history(sqlite_uri, run_id, "loss") == [(0, 2.5), (10, 1.25), (20, 0.75)]
    assert tracking.metric_history(sqlite_uri, run_id, "loss.pitch") == [(0, 1.25), (10, 0.625), (20, 0.375)]
    assert tracking.metric_history(sqlite_uri, run_id, "never_logged") == []
    with pytest.raises(ValueError, match="'acc'"):
        run.log_metrics({"acc": "high"}, 30)


def test_relogging_a_step_with_its_timestamp_stores_it_once(sqlite_uri, experiment):
    run = tracking.start_run(sqlite_uri, experiment, "relog", load_config(overrides=OVERRIDES))
    for _writer in range(2):  # a restarted worker and the one it replaced, logging the same checkpointed steps
        for step in (1, 2):
            run.log_metrics({"loss": 1.0 / step}, step, timestamp_ms=1_000 + step)
    assert tracking.metric_history(sqlite_uri, run.run_id, "loss") == [(1, 1.0), (2, 0.5)]


def test_artifacts_land_and_download_back(sqlite_uri, experiment, tmp_path):
    cfg = load_config(overrides=OVERRIDES)
    run = tracking.start_run(sqlite_uri, experiment, "artifacts", cfg)
    run_id = run.run_id
    parts = tmp_path / "parts"
    (parts / "heads").mkdir(parents=True)
    payload = os.urandom(4096)
    (parts / "heads" / "pitch.bin").write_bytes(payload)
    (parts / "slots.bin").write_bytes(payload[::-1])
    table = pd.DataFrame({"task": ["asr", "emotion"], "score": [0.125, 0.5], "n": [10, 20]})

    run.log_text(to_yaml(cfg), "config.yaml")
    run.log_dict_artifact({"k": 4, "experts": ["pitch", "mel"]}, "meta/info.json")
    run.log_artifacts(parts, "trained")
    run.log_table(table.iloc[:1], "eval/table.csv")
    run.log_table(table, "eval/table.csv")  # a re-run replaces, never appends
    run.log_table(table, "eval/table.json")

    down = Path(MlflowClient(sqlite_uri).download_artifacts(run_id, "", str(tmp_path / "down")))
    assert from_yaml((down / "config.yaml").read_text()) == cfg
    assert json.loads((down / "meta" / "info.json").read_text()) == {"k": 4, "experts": ["pitch", "mel"]}
    assert (down / "trained" / "heads" / "pitch.bin").read_bytes() == payload
    assert (down / "trained" / "slots.bin").read_bytes() == payload[::-1]
    pd.testing.assert_frame_equal(pd.read_csv(down / "eval" / "table.csv"), table)
    pd.testing.assert_frame_equal(pd.read_json(down / "eval" / "table.json", orient="split"), table)
    stored = Path(sqlite_uri.removeprefix("sqlite:///")).parent / "mlartifacts" / run_id / "artifacts"
    assert (stored / "trained" / "heads" / "pitch.bin").read_bytes() == payload

    with pytest.raises(ValueError, match="table.xlsx"):
        run.log_table(table, "eval/table.xlsx")
    with pytest.raises(NotADirectoryError, match="missing"):
        run.log_artifacts(tmp_path / "missing")


def test_same_run_name_resumes_the_run(sqlite_uri, experiment):
    cfg = load_config(overrides=OVERRIDES)
    client = MlflowClient(sqlite_uri)
    opened = tracking.start_run(sqlite_uri, experiment, "it's resumable", cfg)
    first = opened.run_id
    opened.log_metrics({"loss": 1.0}, 50)
    opened.end("FAILED")
    assert client.get_run(first).info.status == "FAILED"

    changed = load_config(overrides=[*OVERRIDES, "train.lr=0.01"])
    again = tracking.start_run(sqlite_uri, experiment, "it's resumable", changed)
    assert again.run_id == first
    run = client.get_run(first)
    assert run.info.status == "RUNNING"
    assert run.data.params["train.lr"] == "0.001"  # params are immutable: the first value stays
    again.log_metrics({"loss": 0.5}, 100)
    assert tracking.metric_history(sqlite_uri, first, "loss") == [(50, 1.0), (100, 0.5)]
    again.end()
    assert client.get_run(first).info.status == "FINISHED"

    assert tracking.start_run(sqlite_uri, experiment, "it's resumable", cfg, resume=False).run_id != first
    client.delete_run(first)
    assert tracking.start_run(sqlite_uri, experiment, "another", cfg).run_id != first

    # A run that crashed before its params were logged gets all of them on resume.
    experiment_id = tracking.get_or_create_experiment(sqlite_uri, experiment)
    bare = client.create_run(experiment_id, tags={"coat.run_name": "crashed"}).info.run_id
    assert tracking.start_run(sqlite_uri, experiment, "crashed", cfg).run_id == bare
    assert client.get_run(bare).data.params == {key: str(value) for key, value in flatten(cfg).items()}

    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        opened.end("DONE")


def test_child_run_gets_parent_id(sqlite_uri, experiment):
    cfg = load_config(overrides=OVERRIDES)
    parent = tracking.start_run(sqlite_uri, experiment, "sweep", cfg).run_id
    children = [
        tracking.start_run(sqlite_uri, experiment, f"trial_{i}", cfg, parent_run_id=parent).run_id for i in range(2)
    ]
    client = MlflowClient(sqlite_uri)
    assert [client.get_run(c).data.tags["mlflow.parentRunId"] for c in children] == [parent, parent]
    assert "mlflow.parentRunId" not in client.get_run(parent).data.tags
    found = client.search_runs([client.get_run(parent).info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_id for r in found) == sorted(children)


def test_bad_inputs_name_the_culprit(sqlite_uri, tmp_path):
    client = MlflowClient(sqlite_uri)
    client.delete_experiment(tracking.get_or_create_experiment(sqlite_uri, "gone"))
    with pytest.raises(ValueError, match="'gone'.*deleted"):
        tracking.get_or_create_experiment(sqlite_uri, "gone")
    with pytest.raises(TrackingUnavailableError, match="nowhere"):
        tracking.check_reachable(f"sqlite:///{tmp_path}/nowhere/mlruns.db")
    tracking.check_reachable(sqlite_uri)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        tracking.dataset_fingerprint(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="run_name"):
        tracking.start_run(sqlite_uri, "x", "", load_config())


def test_run_through_a_real_server(server, tmp_path):
    uri, artifact_root = server
    tracking.check_reachable(uri)
    cfg = load_config(overrides=OVERRIDES)
    served = tracking.start_run(uri, "coat", "served", cfg, tags={"dataset_fingerprint": "abc"})
    run_id = served.run_id
    served.log_metrics({"loss": 2.0}, 0)
    served.log_metrics({"loss": 1.5}, 5)
    served.log_text(to_yaml(cfg), "config.yaml")
    table = pd.DataFrame({"task": ["asr"], "wer": [0.25]})
    served.log_table(table, "eval/table.csv")
    served.end()

    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == {key: str(value) for key, value in flatten(cfg).items()}
    assert run.data.tags["coat.run_name"] == "served" and run.data.tags["experts"] == "pitch,mel"
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server, not to a path

    raw = requests.get(f"{uri}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=10).json()["run"]
    assert {p["key"]: p["value"] for p in raw["data"]["params"]}["thinking.num_slots"] == "4"
    assert {t["key"]: t["value"] for t in raw["data"]["tags"]}["dataset_fingerprint"] == "abc"
    assert raw["info"]["status"] == "FINISHED"
    history = requests.get(f"{uri}/api/2.0/mlflow/metrics/get-history", params={"run_id": run_id, "metric_key": "loss"},
                           timeout=10).json()["metrics"]
    assert sorted((m["step"], m["value"]) for m in history) == [(0, 2.0), (5, 1.5)]
    assert tracking.metric_history(uri, run_id, "loss") == [(0, 2.0), (5, 1.5)]

    down = Path(MlflowClient(uri).download_artifacts(run_id, "", str(tmp_path / "down")))
    assert from_yaml((down / "config.yaml").read_text()) == cfg
    pd.testing.assert_frame_equal(pd.read_csv(down / "eval" / "table.csv"), table)
    on_server = list(artifact_root.rglob(f"{run_id}/artifacts/eval/table.csv"))
    assert len(on_server) == 1 and pd.read_csv(on_server[0]).equals(table)

    assert tracking.start_run(uri, "coat", "served", cfg).run_id == run_id


@pytest.mark.timeout(30)
def test_server_down_fails_fast():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailableError, match=f"{uri}.*not reachable.*make dashboard"):
        tracking.check_reachable(uri, timeout_s=3)


def test_a_write_the_server_rejects_is_raised_not_spooled(server, tmp_path):
    """Only an outage makes a write wait: one the server refuses would wait forever, so it fails as before."""
    uri, _ = server
    spool = tmp_path / "spool"
    with pytest.raises(MlflowException, match="0" * 32):
        tracking.TrackedRun(uri, "0" * 32, spool, retry_s=1).log_metrics({"loss": 1.0}, 0)
    assert not list(spool.glob("*.jsonl"))


@pytest.mark.parametrize(("error_code", "message", "outage"), [
    ("BAD_REQUEST", "(sqlalchemy.exc.TimeoutError) QueuePool limit of size 5 overflow 10 reached", True),
    ("TEMPORARILY_UNAVAILABLE", "(sqlite3.OperationalError) database is locked", True),
    ("INTERNAL_ERROR", 'connection to server at "127.0.0.1", port 5432 failed: Connection refused', True),
    ("INTERNAL_ERROR", "FATAL:  sorry, too many clients already", True),
    ("RESOURCE_DOES_NOT_EXIST", "Run with id=0123 not found", False),
    ("INVALID_PARAMETER_VALUE", "Changing param values is not allowed. Param with key='lr' was already logged", False),
])
def test_a_server_out_of_capacity_is_an_outage_and_a_refused_write_is_not(error_code, message, outage):
    """What the server answers, as the client receives it: capacity errors wait in the spool whatever their status
    (pool exhaustion comes as 400); a write refused for what it is would wait forever, so it is raised."""
    assert tracking.is_outage(RestException({"error_code": error_code, "message": message})) is outage


@pytest.mark.faults  # a server held overloaded for ~45 s, then the spools replayed: ~1.5 min on 2 cores
def test_a_server_out_of_capacity_is_an_outage_its_writes_wait_and_arrive_once(tmp_path, monkeypatch, caplog):
    """An overloaded server answers writes 503 (`database is locked`) or 400 BAD_REQUEST (`QueuePool limit ...
    reached`): both are an outage, not a rejection. Made real: one server worker with two database connections,
    its SQLite file held under an exclusive lock by another process for 45 s while eight runs write, so that some
    writes wait on the lock (20 s) and others wait for a connection past SQLAlchemy's 30 s. Nothing is raised into
    the writers, and once the lock goes every write arrives exactly once."""
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "1")
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", "1")  # MLflow ignores 0
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")  # the client outwaits the server's pool
    db = tmp_path / "mlruns.db"
    with mlflow_server(f"sqlite:///{db}", tmp_path) as uri:
        client = MlflowClient(uri)
        experiment = client.create_experiment("overloaded")
        runs = [client.create_run(experiment).info.run_id for _ in range(8)]
        handles = {run_id: tracking.TrackedRun(uri, run_id, tmp_path / "spool" / run_id, retry_s=1) for run_id in runs}
        holder = sqlite3.connect(db, timeout=0)
        holder.execute("BEGIN EXCLUSIVE")
        raised: list[Exception] = []

        def write(run_id: str) -> None:
            try:
                for step in range(3):
                    handles[run_id].log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            except Exception as err:  # noqa: BLE001 - any error here is the failure under test
                raised.append(err)

        writers = [threading.Thread(target=write, args=(run_id,)) for run_id in runs]
        for writer in writers:
            writer.start()
        time.sleep(45)  # past the server's 20 s busy timeout and SQLAlchemy's 30 s pool timeout
        waiting = [run_id for run_id in runs if list((tmp_path / "spool" / run_id).glob("*.jsonl"))]
        holder.rollback()
        holder.close()
        for writer in writers:
            writer.join(timeout=120)
        assert not raised, raised
        assert waiting, "no write met the overload: the test did not test it"
        said = " ".join(record.getMessage() for record in caplog.records)
        assert "QueuePool limit" in said, "the pool's 400 was met and taken for an outage"
        for run_id in runs:  # the server drains the requests queued during the overload before it takes a replay
            wait_for(handles[run_id].flush, f"the writes of run {run_id} waiting in its spool to arrive", 120)
            assert tracking.metric_history(uri, run_id, "loss") == [(0, 1.0), (1, 0.5), (2, 1 / 3)]


def test_spooled_writes_reach_the_server_once_however_often_they_are_replayed(server, tmp_path):
    """A replay cut short is repeated whole: every record must be idempotent, a run opened while the server was
    away included (found again by its name, not created twice)."""
    uri, _ = server
    folder = tmp_path / "spool"
    spool = Spool(folder, lambda record, ids: None, lambda: True, "test", retry_s=1)
    spool.append({"kind": "open", "pending": "pending-1", "experiment": "coat", "run_name": "spooled",
                  "display_name": "spooled", "resume": True, "params": {"a": "1"}, "tags": {"k": "v"}})
    spool.append({"kind": "log", "run": "pending-1", "metrics": [["loss", 2.0, 1000, 1], ["loss", 1.0, 2000, 2]],
                  "tags": {"k": "w"}})
    (tmp_path / "note.txt").write_text("hello")
    spool.append({"kind": "artifact", "run": "pending-1", "local": str(tmp_path / "note.txt"), "path": "notes"})
    spool.append({"kind": "end", "run": "pending-1", "status": "FINISHED"})
    with open(spool.own, "a") as f:
        f.write('{"kind": "log", "run": "pend')  # a writer killed mid-append: never acknowledged, dropped
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert tracking.replay_spool(uri, folder) and tracking.replay_spool(uri, copy)
    experiment = tracking.get_or_create_experiment(uri, "coat")
    runs = MlflowClient(uri).search_runs([experiment], "tags.`coat.run_name` = 'spooled'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["k"] == "w"
    assert tracking.metric_history(uri, runs[0].info.run_id, "loss") == [(1, 2.0), (2, 1.0)]
    assert json.loads((folder / "run_ids.json").read_text()) == {"pending-1": runs[0].info.run_id}
    assert [a.path for a in MlflowClient(uri).list_artifacts(runs[0].info.run_id, "notes")] == ["notes/note.txt"]
    assert not list(folder.glob("*.jsonl")) and not list(folder.glob("files/*/*")), "sent records are cleared"


def test_clearing_a_replayed_spool_leaves_the_copy_another_process_is_making(server, tmp_path):
    """An append copies its artifact in before it takes the lock: the replay that clears the folder meanwhile must
    take only the copies of the records it sent."""
    uri, _ = server
    folder = tmp_path / "spool"
    spool = Spool(folder, lambda record, ids: None, lambda: True, "test", retry_s=1)
    spool.append(open_record("pending-1", "copies"))
    (tmp_path / "sent.txt").write_text("sent")
    spool.append({"kind": "artifact", "run": "pending-1", "local": str(tmp_path / "sent.txt"), "path": "x"})
    in_flight = folder / "files" / "in-flight" / "checkpoint.bin"
    in_flight.parent.mkdir()
    in_flight.write_bytes(b"being appended")
    assert tracking.replay_spool(uri, folder)
    assert [p.relative_to(folder) for p in folder.glob("files/*/*")] == [in_flight.relative_to(folder)]


def open_record(pending: str, name: str, **tags: str) -> dict:
    return {"kind": "open", "pending": pending, "experiment": "coat", "run_name": name, "display_name": name,
            "resume": True, "params": {}, "tags": tags}


def test_a_spool_never_jams_on_a_refused_record_a_torn_line_a_lost_copy_or_clock_skew(server, tmp_path, caplog):
    """A record the server refuses goes aside with its reason and the rest replay; a torn line is skipped, not the
    end of the file; a worker's file that sorts before the driver's `open` (its clock ran behind) still waits for
    the run to be opened; a copy a kill already cleaned up counts as sent."""
    uri, _ = server
    folder = tmp_path / "spool"
    driver, worker = (Spool(folder, lambda record, ids: None, lambda: True, "test", retry_s=1) for _ in range(2))
    worker.own = folder / "0-worker.jsonl"  # sorts first, as a file made on a host whose clock runs behind
    driver.append(open_record("pending-1", "jams"))
    worker.append({"kind": "log", "run": "pending-1", "metrics": [["loss", 2.0, 1000, 1]]})
    with open(driver.own, "ab") as f:
        f.write(b'{"kind": "log", "run": "pend\xff')  # cut short (and garbled) mid-append
    driver.append({"kind": "log", "run": "pending-1", "metrics": [["loss", 1.5, 2000, 2]],
                   "tags": {"k": "x" * 10}})
    driver.append({"kind": "log", "run": "pending-1", "params": {}, "tags": {"bad key!": "v"}})  # refused: bad key
    (tmp_path / "gone.txt").write_text("sent before a kill")
    driver.append({"kind": "artifact", "run": "pending-1", "local": str(tmp_path / "gone.txt"), "path": "x"})
    shutil.rmtree(next((folder / "files").iterdir()))  # the kill struck between sending it and unlinking the record
    driver.append({"kind": "log", "run": "pending-1", "metrics": [["loss", 1.0, 3000, 3]]})
    driver.append({"kind": "end", "run": "pending-1", "status": "FINISHED"})
    (folder / "run_ids.json").write_bytes(b"\xff\xfe garbled")  # counts as empty: the open is found by name
    assert tracking.replay_spool(uri, folder)
    run = MlflowClient(uri).search_runs([tracking.get_or_create_experiment(uri, "coat")],
                                        "tags.`coat.run_name` = 'jams'")[0]
    assert run.info.status == "FINISHED" and run.data.tags["k"] == "x" * 10
    assert [s for s, _ in tracking.metric_history(uri, run.info.run_id, "loss")] == [1, 2, 3]
    (rejected,) = [json.loads(line) for line in (folder / "rejected" / "records.jsonl").read_text().splitlines()]
    assert rejected["record"]["tags"] == {"bad key!": "v"} and "bad key!" in rejected["error"]
    assert "refused a spooled write" in caplog.text and "rejected/records.jsonl" in caplog.text
    assert not list(folder.glob("*.jsonl"))


def test_a_child_opened_while_its_sweep_parent_was_pending_finds_it_through_the_parents_spool(server, tmp_path):
    uri, _ = server
    parent_folder, child_folder = tmp_path / "parent", tmp_path / "child"
    parent = Spool(parent_folder, lambda record, ids: None, lambda: True, "test", retry_s=1)
    parent.append(open_record("pending-parent", "sweep-p"))
    child = Spool(child_folder, lambda record, ids: None, lambda: True, "test", retry_s=1)
    child.append(open_record("pending-child", "trial-c", **{"mlflow.parentRunId": "pending-parent"})
                 | {"parent_spool": str(parent_folder)})
    assert not tracking.replay_spool(uri, child_folder), "waits while its parent is not open"
    assert tracking.replay_spool(uri, parent_folder) and tracking.replay_spool(uri, child_folder)
    parent_id = json.loads((parent_folder / "run_ids.json").read_text())["pending-parent"]
    assert [r.data.tags["coat.run_name"] for r in tracking.child_runs(uri, parent_id)] == ["trial-c"]


def test_a_spool_stops_the_run_before_the_storage_fills(tmp_path):
    spool = Spool(tmp_path / "spool", lambda record, ids: None, lambda: True, "MLflow at x", retry_s=1,
                  max_bytes=4096)
    spool.append({"kind": "log", "run": "r", "metrics": [["loss", 1.0, 1, 1]]})
    (tmp_path / "checkpoint.bin").write_bytes(bytes(8192))
    with pytest.raises(SpoolFullError, match=r"MLflow at x is unreachable and 0 MB.*tracking.spool_max_mb=0.00390625"):
        spool.append({"kind": "artifact", "run": "r", "local": str(tmp_path / "checkpoint.bin"), "path": None})
    assert not (tmp_path / "spool" / "files").exists(), "nothing half-copied"


def test_a_password_in_the_tracking_uri_never_reaches_a_param_or_a_saved_config(sqlite_uri, experiment, tmp_path):
    cfg = load_config(overrides=[*OVERRIDES, "tracking.uri=http://alice:s3cret@tracking.example:5000"])
    run_id = tracking.start_run(sqlite_uri, experiment, "secret", cfg).run_id
    run = MlflowClient(sqlite_uri).get_run(run_id)
    assert run.data.params["tracking.uri"] == "http://alice:***@tracking.example:5000"
    assert not any("s3cret" in str(v) for v in [*run.data.params.values(), *run.data.tags.values()])
    assert "s3cret" not in to_yaml(redacted(cfg)) and cfg.tracking.uri.endswith("s3cret@tracking.example:5000")
    assert redacted(load_config(overrides=OVERRIDES)) == load_config(overrides=OVERRIDES)


# A replay killed at each of its steps (ALICE-style crash points), then run again by a fresh process: the server
# must hold every write exactly once and the spool must end empty. "before"/"after" say whether the kill strikes
# before or after the call it names; the number is which such call.
CRASH_POINTS = [("after", "send", 1), ("after", "send", 6), ("after", "ids", 1), ("after", "sent", 1),
                ("before", "unlink-records", 1), ("after", "unlink-records", 1), ("before", "rmtree-copies", 1),
                ("before", "unlink-sent", 1)]

KILLED_REPLAY = """
import os, shutil, signal, sys
from pathlib import Path
import coat.spool, coat.tracking
when, name, nth = sys.argv[3], sys.argv[4], int(sys.argv[5])
calls = {}

def strike(point, call):
    def wrapped(*args, **kwargs):
        hit = point(*args) and calls.setdefault(name, [0]) and calls[name].__setitem__(0, calls[name][0] + 1) is None \\
            and calls[name][0] == nth
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = call(*args, **kwargs)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

named = lambda suffix: lambda path, *_: str(path).endswith(suffix)
if name == "send":
    coat.tracking._send = strike(lambda *_: True, coat.tracking._send)
elif name in ("ids", "sent"):
    coat.spool.atomic_write = strike(named(coat.spool.IDS_FILE if name == "ids" else coat.spool.SENT_FILE),
                                     coat.spool.atomic_write)
elif name == "rmtree-copies":
    shutil.rmtree = strike(lambda path, *_: "/files/" in str(path), shutil.rmtree)
else:
    Path.unlink = strike(named(".jsonl" if name == "unlink-records" else "/" + coat.spool.SENT_FILE), Path.unlink)
coat.tracking.replay_spool(sys.argv[1], Path(sys.argv[2]))
sys.exit(3)  # the kill never struck
"""


def outage_spool(folder: Path, name: str, scratch: Path) -> None:
    """What two processes of one run (a driver and a worker) leave in the spool through an outage: the run opened,
    step metrics, checkpoint artifacts between them, a tag changed twice and the run's end; more requests than a
    replay sends per batch."""
    driver, worker = (Spool(folder, lambda record, ids: None, lambda: True, "test", retry_s=1) for _ in range(2))
    driver.append(open_record("pending-1", name))
    for step in range(1, 7):
        (worker if step % 2 else driver).append(
            {"kind": "log", "run": "pending-1", "metrics": [["loss", 1.0 / step, 1000 * step, step]],
             "tags": {"stage": str(step)}})
        (scratch / f"checkpoint-{step}.bin").write_bytes(bytes([step]) * 100)
        driver.append({"kind": "artifact", "run": "pending-1", "local": str(scratch / f"checkpoint-{step}.bin"),
                       "path": "checkpoints"})
    driver.append({"kind": "end", "run": "pending-1", "status": "FINISHED"})


@pytest.mark.faults  # eight processes killed mid-replay: ~40 s on 2 cores
@pytest.mark.parametrize(("when", "call", "nth"), CRASH_POINTS, ids=[f"{w}-{c}-{n}" for w, c, n in CRASH_POINTS])
def test_a_replay_killed_at_any_step_is_finished_by_the_next_with_every_write_once(server, tmp_path, when, call,
                                                                                  nth):
    uri, _ = server
    folder, name = tmp_path / "spool", f"crash-{when}-{call}-{nth}"
    outage_spool(folder, name, tmp_path)
    assert len(list(folder.glob("*.jsonl"))) == 2
    killed = subprocess.run([sys.executable, "-c", KILLED_REPLAY, uri, str(folder), when, call, str(nth)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert tracking.replay_spool(uri, folder)
    (run,) = MlflowClient(uri).search_runs([tracking.get_or_create_experiment(uri, "coat")],
                                           f"tags.`coat.run_name` = '{name}'")
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "6"
    assert tracking.metric_history(uri, run.info.run_id, "loss") == [(s, 1.0 / s) for s in range(1, 7)]
    stored = [a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "checkpoints")]
    assert stored == [f"checkpoints/checkpoint-{s}.bin" for s in range(1, 7)]
    assert json.loads((folder / "run_ids.json").read_text()) == {"pending-1": run.info.run_id}
    assert not list(folder.glob("*.jsonl")) and not list(folder.glob("files/**/*.bin")), "the spool ends empty"
