"""MLflow on PostgreSQL, as a cluster's head serves it: a real PostgreSQL server of the test's own, a real `mlflow
server` with several workers over it proxying artifacts, and a real sweep logging through that server. SQLite
serialises every write; PostgreSQL lets four server workers write at once, so the exactly-once guarantees the
SQLite tests check are checked again where concurrent writers can break them."""

from pathlib import Path

import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from coat import tracking
from coat.tune.sweep import run_sweep
from tests.conftest import mlflow_server, sweep_config

pytestmark = pytest.mark.slow


def stored_runs(backend_uri: str) -> dict[str, str]:
    """Run id -> status, read from PostgreSQL itself, not through the server."""
    engine = sqlalchemy.create_engine(backend_uri)
    try:
        with engine.connect() as connection:
            return dict(connection.execute(sqlalchemy.text("SELECT run_uuid, status FROM runs")).all())
    finally:
        engine.dispose()


def test_a_grid_sweep_through_a_postgresql_backed_server_logs_every_trial_exactly_once(tmp_path, coat_mini,
                                                                                         postgres_uri):
    """Three trials through a 4-worker server on PostgreSQL: one parent, one child per trial, all FINISHED, each
    child's steps logged once each, the parent's summary and results table; the runs are rows of PostgreSQL."""
    space = tmp_path / "pg.yaml"
    space.write_text("thinking.num_slots: {grid: [0, 2, 4]}\n")
    server = (postgres_uri, tmp_path, "--workers", "4", "--artifacts-destination", str(tmp_path / "art"))
    with mlflow_server(*server) as uri:
        result = run_sweep(sweep_config(tmp_path, coat_mini, "sweep.name=pg", f"tracking.uri={uri}"), space)

        assert len(result.table) == 3 and set(result.table["status"]) == {"done"}
        assert set(result.table["steps"]) == {4}, "grid trials run to the end"
        assert tracking.run_status(uri, result.parent_run_id) == "FINISHED"
        children = tracking.child_runs(uri, result.parent_run_id)
        assert len(children) == 3 and {r.info.status for r in children} == {"FINISHED"}
        assert len({r.data.tags[tracking.RUN_NAME_TAG] for r in children}) == 3, "one child per trial"
        assert sorted(r.info.run_name for r in children) == ["K=0", "K=2", "K=4"]
        assert sorted(r.data.params["thinking.num_slots"] for r in children) == ["0", "2", "4"]
        for child in children:
            run_id = child.info.run_id
            assert [s for s, _ in tracking.metric_history(uri, run_id, "train/loss")] == [1, 2, 3, 4]
            assert [s for s, _ in tracking.metric_history(uri, run_id, "val/ce")] == [2, 4]
            assert [s for s, _ in tracking.metric_history(uri, run_id, tracking.PREFILL_COST)] == [4]
            assert any(key.startswith("eval/") for key in child.data.metrics)

        assert result.best is not None and result.best["val/ce"] == result.table["val/ce"].min()
        parent = MlflowClient(uri).get_run(result.parent_run_id)
        assert parent.data.tags["coat.kind"] == "sweep" and "best/val/ce" in parent.data.metrics
        assert "K (thinking.num_slots): 3 trials (3 done)" in parent.data.tags["mlflow.note.content"]
        artifacts = {a.path for a in MlflowClient(uri).list_artifacts(result.parent_run_id, "sweep")}
        assert "sweep/results.json" in artifacts

    stored = stored_runs(postgres_uri)
    assert stored == {run_id: "FINISHED" for run_id in [result.parent_run_id, *(r.info.run_id for r in children)]}
    uploaded = {p.name for p in Path(tmp_path / "art").rglob("*") if p.is_file()}
    assert "results.json" in uploaded, "artifacts went through the server into --artifacts-destination"
