"""A cluster that loses a whole node: Ray's own multi-node test cluster (`ray.cluster_utils.Cluster`, a head and
two worker nodes on this machine) runs coat's training and sweeps, and a worker node goes mid-run with every
process on it. Storage, the feature store and the MLflow store are folders every node shares, as a cluster's
shared file system would be. Each scenario runs in a process of its own (tests/multinode_cluster.py)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from ray import cluster_utils

from coat import tracking
from tests.conftest import sweep_args
from tests.multinode_cluster import ONE_PER_WORKER_NODE

SCENARIOS = Path(__file__).with_name("multinode_cluster.py")

pytestmark = pytest.mark.skipif(cluster_utils.cluster_not_supported,
                                reason="ray.cluster_utils.Cluster (several raylets on one machine) does not run on "
                                       "Windows")


def run_scenario(kind: str, tmp_path: Path, overrides: list[str], **scenario) -> dict:
    """Run scenario `kind` in its own process and Ray temp folder (short: Ray's socket paths are limited to 107
    characters), then kill what is left of its process group, the cluster's nodes included, however it ended.
    Returns what it recorded."""
    (tmp_path / "scenario.json").write_text(json.dumps({"overrides": overrides, **scenario}))
    out, log = tmp_path / "out.json", tmp_path / "scenario.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "COAT_TEST_SIGKILL_AT")}
    ray_tmp = tempfile.mkdtemp(prefix="coat-mn-", dir="/tmp")
    command = [sys.executable, str(SCENARIOS), kind, str(tmp_path / "scenario.json"), str(out)]
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, env={**env, "RAY_TMPDIR": ray_tmp}, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        code = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        code = "timed out after 600 s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    recorded = json.loads(out.read_text()) if out.exists() else {}
    assert code == 0, f"scenario {kind}: {code}, recorded {recorded}\n{log.read_text()[-4000:]}"
    return recorded


def training(root: Path, manifest: Path) -> list[str]:
    """Two DDP workers, one per worker node, 6 steps over two stages (LoRA joins at step 3), a checkpoint every 2;
    one worker-group restart allowed."""
    return [f"data.manifest={manifest}", f"data.store={manifest.parent / 'store'}", f"train.storage={root / 'runs'}",
            f"tracking.uri=sqlite:///{root / 'mlruns.db'}", "experts.names=[mel,prosody]", "thinking.num_slots=4",
            "thinking.max_slots=8", "train.batch_size=2", "train.warmup_steps=2", "heads.dim=32",
            "train.stages=[{steps: 2, ce_weight: 0.1}, {steps: 4}]", "train.checkpoint_every=2",
            "train.num_workers=2", ONE_PER_WORKER_NODE, "train.max_failures=1"]


@pytest.mark.faults  # two runs of two workers on a three-node cluster, one losing a node: 3 minutes on 2 cores
def test_training_that_loses_a_node_waits_for_a_replacement_and_matches_an_uninterrupted_run(tmp_path, coat_mini):
    """After the first checkpoint, the node of one of the two workers goes. Ray Train counts the worker group's
    death as one failure (train.max_failures=1) and asks for a new group of two; the node left holds one, so the
    run waits until a replacement node joins, then resumes from the last checkpoint: every step is logged once,
    with the losses of the same config run without the loss on the same cluster."""
    recorded = run_scenario("train", tmp_path, training(tmp_path, coat_mini))
    before, removed = recorded["hosts_before"], recorded["removed"]
    assert len(set(before)) == 2 and removed in before, "two workers on two nodes, one of them lost"
    assert recorded["waited_for_replacement"], "Train waited with a worker group it could not place"
    (survivor,) = set(before) - {removed}
    assert sorted(recorded["hosts_after"]) == sorted([survivor, recorded["replacement"]])
    assert recorded["step"] == 6

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    losses, expected = (tracking.metric_history(uri, recorded[run], "train/loss") for run in ("lost", "plain"))
    assert [step for step, _ in losses] == list(range(1, 7)), "every step logged exactly once"
    np.testing.assert_allclose([v for _, v in losses], [v for _, v in expected], rtol=1e-5)
    assert [step for step, _ in tracking.metric_history(uri, recorded["lost"], "val/ce")] == [2, 4, 6]
    assert tracking.run_status(uri, recorded["lost"]) == "FINISHED"


@pytest.mark.faults  # a two-trial sweep on a three-node cluster: a minute and a half on 2 cores
def test_a_sweep_that_loses_the_node_of_a_trial_goes_on_and_logs_every_trial_once(tmp_path, coat_mini):
    """Two trials run at once, one per worker node; once both have committed a checkpoint, one trial's node goes.
    Tune retries that trial (sweep.trial_retries=1) on the node left, once the other trial frees it, and the retry
    goes on from the trial's checkpoint in the same MLflow child run. The parent and one child per trial end
    FINISHED, and each child holds every step once and one evaluation."""
    space = tmp_path / "lose.yaml"
    space.write_text("thinking.num_slots: {grid: [2, 4]}\n")
    overrides = sweep_args(tmp_path, coat_mini, "sweep.name=lose", "sweep.max_concurrent=2", ONE_PER_WORKER_NODE,
                           "train.stages=[{steps: 4, ce_weight: 0.1}, {steps: 4}]")
    recorded = run_scenario("sweep", tmp_path, overrides, space=str(space))
    before, removed = recorded["hosts_before"], recorded["removed"]
    assert len(set(before)) == 2 and removed in before, "two trials on two nodes, one of them lost"
    assert recorded["statuses"] == ["done", "done"] and recorded["steps"] == [8, 8]
    errors = [p.read_text() for p in (tmp_path / "sweeps" / "lose").glob("*/error.txt")]
    assert len(errors) == 1 and f"its node has died. Node Id: {removed}" in errors[0], "one trial lost, retried"

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert tracking.run_status(uri, recorded["parent"]) == "FINISHED"
    children = tracking.child_runs(uri, recorded["parent"])
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert len({r.data.tags[tracking.RUN_NAME_TAG] for r in children}) == 2, "one child per trial"
    assert sorted(r.data.params["thinking.num_slots"] for r in children) == ["2", "4"]
    for child in children:
        run_id = child.info.run_id
        assert [s for s, _ in tracking.metric_history(uri, run_id, "train/loss")] == list(range(1, 9))
        assert [s for s, _ in tracking.metric_history(uri, run_id, "val/ce")] == [2, 4, 6, 8]
        assert [s for s, _ in tracking.metric_history(uri, run_id, tracking.PREFILL_COST)] == [8]
        assert any(key.startswith("eval/") for key in child.data.metrics)
