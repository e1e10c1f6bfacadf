"""A cluster of several nodes: Ray's own multi-node test cluster (`ray.cluster_utils.Cluster`, a head and two
worker nodes on this machine) runs coat's training and sweeps; a worker node goes mid-run with every process on it,
or a grid spreads over the nodes, each blind to the others' own folders. Storage, the feature store and the MLflow
store are folders every node shares, as a cluster's shared file system would be. Each scenario runs in a process of
its own (tests/multinode_cluster.py)."""

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
from tests.conftest import mlflow_server, sweep_args
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
    """Two trials run at once, one per worker node; the node of the first to commit a checkpoint goes.
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


def can_hide_folders(folder: Path) -> bool:
    """Whether a child of this process may hide `folder` as the worker nodes do (`multinode_cluster.HIDING_PYTHON`):
    a mount namespace of its own with an empty file system over it (root, or CAP_SYS_ADMIN)."""
    folder.mkdir()
    command = ["unshare", "--mount", "mount", "-t", "tmpfs", "-o", "ro,size=4k", "hidden", str(folder)]
    try:
        return subprocess.run(command, capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.slow  # 16 short trials over two worker nodes, against PostgreSQL: 2 to 3 minutes on 2 cores
def test_a_grid_over_several_nodes_logs_every_trial_once_and_reads_nothing_only_the_driver_has(tmp_path, coat_mini,
                                                                                               postgres_uri):
    """16 trials, one at a time on each of two worker nodes (the head, where the driver runs, holds no CPUs),
    through a PostgreSQL-backed MLflow server, with the feature store in one folder every node reads. The driver's
    working and temporary folders, and each node's temporary folder, are empty and read-only on the other nodes, as
    on separate machines: a trial that reads (or writes) a path only the driver's node has fails. Every trial ends
    in MLflow exactly once; the driver's own overhead per trial (`sweep_efficiency.summarise`) is printed."""
    if not can_hide_folders(tmp_path / "probe"):
        pytest.skip("hiding the driver's folders from the worker nodes takes a mount namespace (`unshare --mount`: "
                    "root or CAP_SYS_ADMIN)")
    space = tmp_path / "nodes.yaml"
    space.write_text("thinking.num_slots: {grid: [1, 2, 3, 4, 5, 6, 7, 8]}\n")
    server_root = tmp_path / "server"
    server_root.mkdir()
    server = (postgres_uri, server_root, "--workers", "4", "--artifacts-destination", str(server_root / "art"))
    with mlflow_server(*server) as uri:
        overrides = sweep_args(tmp_path, coat_mini, "sweep.name=nodes", "sweep.seeds=[0,1]", "sweep.max_concurrent=2",
                               ONE_PER_WORKER_NODE, f"tracking.uri={uri}", "train.stages=[{steps: 2}]",
                               "eval.max_examples=2", "eval.latency_examples=0")
        recorded = run_scenario("grid", tmp_path, overrides, space=str(space), private=str(tmp_path / "private"))

        workers = recorded["workers"]
        assert [seen["node"] for seen in recorded["seen"]] == workers
        assert not any(seen["sees_driver_file"] for seen in recorded["seen"]), "the driver's folder is hidden"
        assert [seen["tmp"] for seen in recorded["seen"]] == [str(tmp_path / "private" / f"node-{i}" / "tmp")
                                                             for i in range(2)]
        assert set(recorded["trial_nodes"]) == set(workers), "trials ran on both worker nodes, none on the head"
        assert recorded["statuses"] == ["done"] * 16 and recorded["steps"] == [2] * 16

        assert tracking.run_status(uri, recorded["parent"]) == "FINISHED"
        children = tracking.child_runs(uri, recorded["parent"])
        assert len(children) == 16 and {r.info.status for r in children} == {"FINISHED"}
        assert len({r.data.tags[tracking.RUN_NAME_TAG] for r in children}) == 16, "one child per trial"
        assert sorted(r.info.run_name for r in children) == sorted(f"K={k} seed={s}" for k in range(1, 9)
                                                                   for s in (0, 1))
        (version,) = [p.name for p in (coat_mini.parent / "store" / "mel").iterdir() if p.is_dir()]
        assert {r.data.tags["expert.mel.version"] for r in children} == {version}, "one shared feature store"
        for child in children:
            run_id = child.info.run_id
            assert [s for s, _ in tracking.metric_history(uri, run_id, "train/loss")] == [1, 2]
            assert [s for s, _ in tracking.metric_history(uri, run_id, "val/ce")] == [2]
            assert [s for s, _ in tracking.metric_history(uri, run_id, tracking.PREFILL_COST)] == [2]
            assert any(key.startswith("eval/") for key in child.data.metrics)

    efficiency = recorded["efficiency"]
    assert efficiency["trials"] == 16 and efficiency["trial_steps"] == 32
    shares = efficiency["shares"]
    print(f"\n16 trials on 2 worker nodes in {efficiency['wall_s']:.0f} s: driver overhead "
          f"{efficiency['overhead_per_trial_s']:.1f} s per trial ({shares['outside_trials']:.0%} of 2 slots); "
          f"start-up {shares['startup']:.0%}, steps {shares['steps']:.0%}, rest of the loop "
          f"{shares['loop_other']:.0%}, evaluation {shares['evaluation']:.0%}")
