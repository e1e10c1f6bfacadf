"""The scenarios of tests/test_multinode.py, each run in a process of its own (a `Cluster` needs a Ray of its own,
and the pytest session already holds one): a Ray test cluster on this machine, a head and two worker nodes (every
raylet on 127.0.0.1's host), runs coat's own training or sweep on it and removes a worker node mid-run, or spreads
a grid sweep over worker nodes that cannot see each other's own folders nor the driver's.

    python tests/multinode_cluster.py train|sweep|grid SCENARIO.json OUT.json

SCENARIO.json holds `overrides` (the config, as dotted overrides), for a sweep `space` (a space file), and for a
grid `private` (a folder for the nodes' own folders, see `grid_scenario`). What happened to the cluster (which
nodes held the work, which one went, what replaced it) and what the runs returned go to OUT.json, rewritten at
every entry, so that a scenario that hangs still says how far it got (and `kill -USR1` prints where each thread
waits).

Placement is forced by logical CPUs alone, with no config field of its own: a worker node offers 2 CPUs and the
head 1, so a Train worker or a trial asking for `ONE_PER_WORKER_NODE` fits only on a worker node, one per node,
with half a CPU left beside it for its decode tasks. Run it with RAY_TMPDIR set to a folder of its own: the cluster
records its address there, where no other process's `ray.init()` finds it and joins it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib.util
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import ray._private.state
from mlflow.exceptions import MlflowException
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from coat import tracking
from coat.config import load_config
from coat.train.launch import train
from coat.tune.sweep import TRIAL_FOLDER, run_sweep

HEAD_CPUS, NODE_CPUS = 1, 2
ONE_PER_WORKER_NODE = "train.cpus_per_worker=1.5"  # > HEAD_CPUS and > NODE_CPUS / 2
NODE_MEMORY = 200 * 1024 * 1024  # object store per node: coat-mini's batches are small
TRAIN_WORKER, TRIAL = "RayTrainWorker", "ImplicitFunc"  # the actor classes of a Train worker and of a Tune trial


def start_cluster(head_cpus: int = HEAD_CPUS, node_env: list[dict] | None = None,
                  runtime_env: dict | None = None) -> tuple[Cluster, list]:
    """A head (the driver, Train's controller and Tune's loop run there) and two worker nodes (`node_env`: the
    environment of each one's raylet, and so of its workers); Ray attached, with `runtime_env` for the job."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as `coat.ray_runtime`: Ray 2.60 turns token auth on
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus,
                                                            "object_store_memory": NODE_MEMORY})
    nodes = [add_worker_node(cluster, env) for env in node_env or [None, None]]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=runtime_env)
    return cluster, nodes


def add_worker_node(cluster: Cluster, env: dict | None = None):
    return cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=NODE_MEMORY, env_vars=env)


def actor_nodes(class_name: str) -> list[str]:
    """The node of every live actor of `class_name`, one entry per actor."""
    alive = ray._private.state.actors(actor_state_name="ALIVE").values()
    return [a["Address"]["NodeID"] for a in alive if a["ActorClassName"] == class_name]


def pending_placement_group() -> bool:
    """Whether a placement group waits for resources the cluster lacks (Train's next worker group)."""
    return any(pg["state"] == "PENDING" for pg in ray.util.placement_group_table().values())


def wait_for(condition, what: str, ended: threading.Event, timeout_s: float = 300.0):
    """`condition()` once true; raises TimeoutError past `timeout_s`, or as soon as the run has `ended` without it."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if ended.is_set() or time.monotonic() > deadline:
            raise TimeoutError(f"{'the run ended' if ended.is_set() else f'waited {timeout_s:.0f} s'} before {what}")
        time.sleep(0.2)
    return value


def remove_busy_node(cluster: Cluster, nodes: list, class_name: str, out: dict) -> None:
    """Remove the first worker node that holds an actor of `class_name`, noting where those actors were."""
    hosts = actor_nodes(class_name)
    out["hosts_before"] = hosts
    victim = next(node for node in nodes if node.node_id in hosts)
    cluster.remove_node(victim)  # every process of that node: its raylet, object store and workers
    out["removed"] = victim.node_id


def committed_steps(uri: str, run_name: str) -> list[int]:
    """The steps of run `run_name` whose checkpoint Ray Train has registered: their metrics reached MLflow; none
    while the store is busy with the run's own writes (SQLite locks it): asked again."""
    try:
        run_id = tracking.find_run(uri, tracking.get_or_create_experiment(uri, "coat"), run_name)
        return [step for step, _ in tracking.metric_history(uri, run_id, "train/loss")] if run_id else []
    except MlflowException:
        return []


def beside(work, watch, *args) -> None:
    """`work()` in a thread while this, the main thread, runs `watch(*args, ended)`: Ray adds a node from the main
    thread only (it installs signal handlers). Raises what either raised."""
    failed: list[BaseException] = []
    ended = threading.Event()

    def guarded() -> None:
        try:
            work()
        except BaseException as err:
            failed.append(err)
        finally:
            ended.set()

    worker = threading.Thread(target=guarded, daemon=True)  # a watch that fails leaves no run holding the exit
    worker.start()
    watch(*args, ended)
    worker.join()
    if failed:
        raise failed[0]


def lose_a_training_node(cluster: Cluster, nodes: list, uri: str, out: dict, ended: threading.Event) -> None:
    """Once run `lost` has committed a checkpoint, remove a node holding one of its two workers; once Train asks
    for a worker group the nodes left cannot hold, add a replacement, and note where the new group runs."""
    wait_for(lambda: committed_steps(uri, "lost"), "a committed checkpoint", ended)
    remove_busy_node(cluster, nodes, TRAIN_WORKER, out)
    wait_for(pending_placement_group, "Train asked for a new worker group", ended)
    out["waited_for_replacement"] = True
    out["replacement"] = add_worker_node(cluster).node_id
    out["hosts_after"] = wait_for(lambda: len(hosts := actor_nodes(TRAIN_WORKER)) == 2 and hosts,
                                  "the new worker group", ended)


def train_scenario(scenario: dict, out: dict) -> Cluster:
    """Run `plain` uninterrupted, then the same config as run `lost`, which loses a node after its first
    checkpoint: both on the same cluster, so that nothing but the loss tells them apart."""
    cluster, nodes = start_cluster()
    plain = train(load_config(overrides=[*scenario["overrides"], "train.run_name=plain"]), evaluate_after=False)
    out["plain"] = plain.mlflow_run_id
    cfg = load_config(overrides=[*scenario["overrides"], "train.run_name=lost"])

    def lost() -> None:
        result = train(cfg, evaluate_after=False)
        out.update({"lost": result.mlflow_run_id, "step": result.metrics["step"]})

    beside(lost, lose_a_training_node, cluster, nodes, tracking.resolve_uri(cfg.tracking.uri), out)
    return cluster


def trial_nodes() -> dict[str, str]:
    """The node of each trial alive now, by trial id: Tune moves a trial's process into its working folder
    (`coat.tune.sweep.trial_folder`), and the trial's actor names its process and node."""
    nodes = {}
    for actor in ray._private.state.actors(actor_state_name="ALIVE").values():
        if actor["ActorClassName"] == TRIAL:
            with contextlib.suppress(OSError):  # a process gone since: its trial is no longer alive
                folder = Path(os.readlink(f"/proc/{actor['Pid']}/cwd")).name
                if match := TRIAL_FOLDER.search(folder):
                    nodes[match[1]] = actor["Address"]["NodeID"]
    return nodes


def lose_a_trial_node(cluster: Cluster, trials: Path, out: dict, ended: threading.Event) -> None:
    """While both trials run, one per worker node, remove the node of the first one to commit a checkpoint (under
    `trials`/<sweep>-<trial id>): waiting for both to commit one raced the first trial's end on a loaded machine."""
    def checkpointed_while_both_run() -> str | None:
        nodes = trial_nodes()
        ready = [trial for trial in nodes if any(trials.glob(f"*-{trial}/checkpoint_*"))]
        return len(actor_nodes(TRIAL)) == 2 and ready and nodes[ready[0]]

    victim = wait_for(checkpointed_while_both_run, "a trial committed a checkpoint while both ran", ended)
    out["hosts_before"] = actor_nodes(TRIAL)
    cluster.remove_node(next(node for node in cluster.worker_nodes if node.node_id == victim))
    out["removed"] = victim


def sweep_scenario(scenario: dict, out: dict) -> Cluster:
    """The sweep of `space` over `overrides`; its trials' runs live under `train.storage`/sweeps/trials."""
    cluster, _ = start_cluster()
    storage = Path(load_config(overrides=scenario["overrides"]).train.storage)

    def sweep() -> None:
        result = run_sweep(load_config(overrides=scenario["overrides"]), scenario["space"])
        out.update({"parent": result.parent_run_id, "statuses": list(result.table["status"]),
                    "steps": [int(s) for s in result.table["steps"]]})

    beside(sweep, lose_a_trial_node, cluster, storage / "sweeps" / "trials", out)
    return cluster


# A worker node's Python (the job's `py_executable`): where its raylet names folders in COAT_TEST_HIDE, the worker
# starts in a mount namespace of its own in which each of them is an empty, read-only file system, as another
# machine's folders would be. `unshare` keeps the process: Ray knows its worker by its pid.
HIDING_PYTHON = """#!/bin/sh
[ -z "$COAT_TEST_HIDE" ] && exec {python} "$@"
exec unshare --mount sh -c 'for d in $COAT_TEST_HIDE; do mount -t tmpfs -o ro,size=4k hidden "$d" || exit 97; done
exec "$@"' hide {python} "$@"
"""


def private_nodes(private: Path, workers: int = 2) -> tuple[dict, list[dict]]:
    """Folders of the driver's node (`private`/head) and of each worker node (`private`/node-<i>), each node's
    temporary folder among them, every one hidden from the worker nodes it is not on: the driver moves into its
    own. Returns the job's runtime env and each worker node's environment."""
    head = private / "head"
    folders = [head, *(private / f"node-{i}" for i in range(workers))]
    for folder in folders:
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
    python = private / "python"
    python.write_text(HIDING_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    os.chdir(head)
    os.environ["TMPDIR"] = str(head / "tmp")  # the head's raylet and the driver's own temporary files
    tempfile.tempdir = None
    node_env = [{"TMPDIR": str(own / "tmp"), "COAT_TEST_HIDE": " ".join(str(f) for f in folders if f != own)}
                for own in folders[1:]]
    return {"py_executable": str(python)}, node_env


@ray.remote(num_cpus=0)
def look_around(driver_file: str) -> dict:
    """What a process of this node sees: the driver's own file (on a node of its own it cannot), its node's
    temporary folder."""
    return {"node": ray.get_runtime_context().get_node_id(), "sees_driver_file": Path(driver_file).exists(),
            "tmp": tempfile.gettempdir()}


def all_actor_nodes(class_name: str) -> list[str]:
    """The node of every actor of `class_name` the cluster has held, live or gone."""
    return [a["Address"]["NodeID"] for a in ray._private.state.actors().values() if a["ActorClassName"] == class_name]


def grid_scenario(scenario: dict, out: dict) -> Cluster:
    """The grid sweep of `space` over `overrides` on a head with no CPUs (only the driver and Tune's loop run
    there) and two worker nodes, which run every trial and every task. The driver's working folder and temporary
    folder, and each node's temporary folder, are hidden from the other nodes (`private_nodes`): a trial that
    reads or writes a path only another node has fails. Records what each worker node sees, which nodes ran
    trials, and what `sweep_efficiency.summarise` makes of the sweep (the driver's overhead per trial)."""
    runtime_env, node_env = private_nodes(Path(scenario["private"]))
    cluster, nodes = start_cluster(head_cpus=0, node_env=node_env, runtime_env=runtime_env)
    out["head"], out["workers"] = cluster.head_node.node_id, [node.node_id for node in nodes]
    driver_file = Path(tempfile.mkdtemp(prefix="driver-")) / "only-here"
    driver_file.write_text("only on the driver's node")
    out["seen"] = ray.get([look_around.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, False))
                           .remote(str(driver_file)) for node in nodes])
    cfg = load_config(overrides=scenario["overrides"])
    start = time.perf_counter()
    result = run_sweep(load_config(overrides=scenario["overrides"]), scenario["space"])
    wall = time.perf_counter() - start
    out.update({"parent": result.parent_run_id, "statuses": list(result.table["status"]),
                "steps": [int(s) for s in result.table["steps"]], "trial_nodes": all_actor_nodes(TRIAL)})
    efficiency = importlib.util.spec_from_file_location(
        "sweep_efficiency", Path(__file__).parents[1] / "experiments" / "benchmarks" / "sweep_efficiency.py")
    module = importlib.util.module_from_spec(efficiency)
    efficiency.loader.exec_module(module)
    out["efficiency"] = module.summarise(result, tracking.resolve_uri(cfg.tracking.uri), wall, len(nodes),
                                         cfg.train.batch_size)
    return cluster


class Record(dict):
    """What happened, written to `path` at every entry."""

    def __init__(self, path: Path):
        super().__init__()
        self.path, self.lock = path, threading.Lock()  # the run's thread and the watching one both write

    def __setitem__(self, key, value) -> None:
        with self.lock:
            super().__setitem__(key, value)
            self.path.write_text(json.dumps(self))

    def update(self, other: dict) -> None:
        for key, value in other.items():
            self[key] = value


def main(kind: str, scenario_file: str, out_file: str) -> None:
    faulthandler.register(signal.SIGUSR1)
    scenario = json.loads(Path(scenario_file).read_text())
    scenarios = {"train": train_scenario, "sweep": sweep_scenario, "grid": grid_scenario}
    cluster = scenarios[kind](scenario, Record(Path(out_file)))
    # The driver first, then every node: left to the exit hooks (each node registers its own, a replacement after
    # `ray.init`'s), the process ended with status 1 after a run that had succeeded.
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
