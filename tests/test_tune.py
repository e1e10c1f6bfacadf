"""Sweeps: search spaces, and real Ray Tune sweeps (grid and Optuna + ASHA) with MLflow parent/child runs."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from coat import tracking
from coat.data.store import FeatureStore
from coat.tune.space import SpaceError, load_space, overrides
from coat.tune.sweep import run_sweep
from tests.conftest import kill_when

SWEEP = [
    "experts.names=[mel]", "thinking.max_slots=8", "thinking.num_slots=4", "heads.dim=32",
    "lora.modules_to_save=[lm_head]",
    "train.num_workers=0", "train.batch_size=4", "train.warmup_steps=1", "train.val_batches=1",
    "train.stages=[{steps: 2, ce_weight: 0.1}, {steps: 2}]", "train.checkpoint_every=2",
    "eval.max_examples=4", "eval.max_new_tokens=4", "eval.bootstrap=100", "sweep.grace_steps=2",
]
TRIAL_CHECKPOINT = "trials/*/checkpoint_*/training_state.pt"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def sweep_args(tmp_path: Path, manifest: Path, *extra: str) -> list[str]:
    return [f"data.manifest={manifest}", f"data.store={manifest.parent / 'store'}", f"train.storage={tmp_path}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", *SWEEP, *extra]


def test_grid_space_with_conditions_enumerates_exact_points(tmp_path):
    space = load_space(write(tmp_path / "s.yaml", (
        "thinking.num_slots: {grid: [0, 8]}\n"
        "experts.names: {grid: [[mel], [mel, prosody]]}\n"
        "loss.weights.prosody: {grid: [0.5, 2.0], when: {experts.names: {contains: prosody}}}\n")))
    assert space.is_grid
    points = space.grid()
    assert len(points) == 2 * (1 + 2)
    assert {"thinking.num_slots": 8, "experts.names": ["mel"]} in points
    assert all(("loss.weights.prosody" in p) == ("prosody" in p["experts.names"]) for p in points)
    assert overrides(points[-1]) == ["thinking.num_slots=8", "experts.names=[mel, prosody]",
                                     "loss.weights.prosody=2.0"]


def test_sampled_space_respects_conditions_in_optuna(tmp_path):
    space = load_space(write(tmp_path / "s.yaml", (
        "train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "experts.names: {choice: [[mel], [mel, prosody]]}\n"
        "loss.weights.prosody: {uniform: [0.1, 2.0], when: {experts.names: {contains: prosody}}}\n"
        "heads.num_layers: {int: [1, 2]}\n")))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    points = [space.suggest(study.ask()) for _ in range(20)]
    assert all(1e-4 <= p["train.lr"] <= 1e-2 and p["heads.num_layers"] in (1, 2) for p in points)
    assert all(("loss.weights.prosody" in p) == ("prosody" in p["experts.names"]) for p in points)
    assert {len(p["experts.names"]) for p in points} == {1, 2}


@pytest.mark.parametrize(("text", "named"), [
    ("thinking.num_slot: {grid: [4]}\n", "thinking.num_slot"),
    ("thinking.num_slots: {grid: [4, 128]}\n", "thinking.num_slots"),
    ("loss.weights.vad: {uniform: [0.1, 1.0]}\n", "loss.weights.vad"),  # vad is not in experts.names
    ("train.lr: {loguniform: [0.0, 1.0]}\n", "train.lr"),
    ("train.lr: {normal: [0.0, 1.0]}\n", "train.lr"),
    ("heads.num_layers: {int: [1.5, 3]}\n", "heads.num_layers"),
    ("lora.r: {choice: [4, 8], when: {backbone.name: qwen2-audio}}\n", "lora.r"),  # condition on no entry
    ("thinking.num_slots: {grid: [0, 4]}\ntrain.lr: {uniform: [0.001, 0.01]}\n", "grid"),
])
def test_bad_spaces_fail_before_any_trial_naming_the_path(tmp_path, text, named):
    with pytest.raises(SpaceError, match=named):
        load_space(write(tmp_path / "bad.yaml", text))


def child_runs(uri: str, parent_id: str):
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_grid_sweep_logs_a_parent_and_one_child_per_trial(tmp_path, coat_mini):
    space = write(tmp_path / "k.yaml",
                  "thinking.num_slots: {grid: [0, 4]}\nexperts.names: {grid: [[mel], [mel, prosody]]}\n")
    result = run_sweep(None, space, sweep_args(tmp_path, coat_mini, "sweep.name=k"))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert len(result.table) == 4 and set(result.table["status"]) == {"done"}
    assert set(result.table["steps"]) == {4}, "grid trials run to the end"
    children = child_runs(uri, result.parent_run_id)
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert sorted(r.data.params["thinking.num_slots"] for r in children) == ["0", "0", "4", "4"]
    assert all(len(tracking.metric_history(uri, r.info.run_id, "train/ce")) == 4 for r in children)
    assert result.best is not None and result.best["val/ce"] == result.table["val/ce"].min()
    parent = MlflowClient(uri).get_run(result.parent_run_id)
    assert parent.data.tags["coat.kind"] == "sweep" and "best/val/ce" in parent.data.metrics
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(result.parent_run_id, "sweep")}
    assert "sweep/results.json" in artifacts
    # Each expert's features were computed once for the whole sweep: one stored row per clip.
    store = FeatureStore(coat_mini.parent / "store")
    for expert in ("mel", "prosody"):
        (version,) = [p.name for p in (coat_mini.parent / "store" / expert).iterdir() if p.is_dir()]
        index = store.index(expert, version)
        assert len(index) == index["clip_hash"].nunique() == 40


@pytest.mark.faults
def test_a_trial_killed_past_its_retries_is_marked_failed_and_the_sweep_goes_on(tmp_path, coat_mini):
    space = write(tmp_path / "f.yaml", "thinking.num_slots: {grid: [2, 4]}\n")
    killed: list[int] = []
    killer = threading.Thread(target=kill_when, args=(tmp_path / "sweeps", TRIAL_CHECKPOINT, "ImplicitFunc", killed))
    killer.start()
    result = run_sweep(None, space, sweep_args(tmp_path, coat_mini, "sweep.name=f", "sweep.trial_retries=0",
                                               "sweep.max_concurrent=1",
                                               "train.stages=[{steps: 8}]", "train.checkpoint_every=1"))
    killer.join()
    assert killed
    assert sorted(result.table["status"]) == ["done", "error"]
    statuses = {r.info.status for r in child_runs(f"sqlite:///{tmp_path / 'mlruns.db'}", result.parent_run_id)}
    assert statuses == {"FINISHED", "FAILED"}


@pytest.mark.faults
def test_a_retried_trial_resumes_from_its_checkpoint(tmp_path, coat_mini):
    space = write(tmp_path / "r.yaml", "thinking.num_slots: {grid: [4]}\n")
    killed: list[int] = []
    killer = threading.Thread(target=kill_when, args=(tmp_path / "sweeps", TRIAL_CHECKPOINT, "ImplicitFunc", killed))
    killer.start()
    result = run_sweep(None, space, sweep_args(tmp_path, coat_mini, "sweep.name=r", "sweep.trial_retries=1",
                                               "train.stages=[{steps: 8}]", "train.checkpoint_every=1"))
    killer.join()
    assert killed and list(result.table["status"]) == ["done"] and list(result.table["steps"]) == [8]
    (child,) = child_runs(f"sqlite:///{tmp_path / 'mlruns.db'}", result.parent_run_id)
    steps = [s for s, _ in tracking.metric_history(f"sqlite:///{tmp_path / 'mlruns.db'}", child.info.run_id,
                                                   "train/ce")]
    assert steps == list(range(1, 9)), "no step redone after the restart"


def finished_children(uri: str) -> list:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(experiments, "attributes.status = 'FINISHED'")
            if "mlflow.parentRunId" in r.data.tags]


@pytest.mark.faults
def test_optuna_asha_sweep_resumes_after_the_driver_is_killed(tmp_path, coat_mini):
    space = write(tmp_path / "o.yaml", "train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    args = sweep_args(tmp_path, coat_mini, "sweep.name=o", "sweep.num_samples=3", "sweep.max_concurrent=1")
    script = ("import sys; from coat.tune.sweep import run_sweep; "
              f"run_sweep(None, {str(space)!r}, {args!r}, resume='--resume' in sys.argv)")
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, start_new_session=True)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    deadline = time.monotonic() + 600
    finished_before: list = []
    while time.monotonic() < deadline and driver.poll() is None and not finished_before:
        time.sleep(0.5)
        # Only read the store once a trial has trained to the end: by then the driver has long created it.
        if list((tmp_path / "sweeps" / "trials").glob("*/checkpoint_000004/training_state.pt")):
            finished_before = finished_children(uri)
    assert finished_before, "no trial finished before the deadline"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and the running trial
    driver.wait()

    done = subprocess.run([sys.executable, "-c", script, "--resume"], cwd=tmp_path, timeout=900)
    assert done.returncode == 0
    client = MlflowClient(uri)
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   "tags.`coat.kind` = 'sweep'")
    children = child_runs(uri, parent.info.run_id)
    # Every trial ends closed: trained to the end, or stopped early by ASHA (KILLED); none left RUNNING.
    assert len(children) == 3 and {r.info.status for r in children} <= {"FINISHED", "KILLED"}
    first = finished_before[0]
    again = client.get_run(first.info.run_id)
    assert again.info.end_time == first.info.end_time, "a finished trial is not rerun"
    lrs = {float(r.data.params["train.lr"]) for r in children}
    assert len(lrs) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)


def test_multi_objective_sweep_trades_quality_against_prefill_cost(tmp_path, coat_mini):
    space = write(tmp_path / "m.yaml", "thinking.num_slots: {choice: [0, 2, 4]}\n")
    result = run_sweep(None, space, sweep_args(tmp_path, coat_mini, "sweep.name=m", "sweep.multi_objective=true",
                                               "sweep.num_samples=3", "sweep.scheduler=none"))
    assert len(result.table) == 3 and set(result.table["status"]) == {"done"}
    costs = dict(zip(result.table["setting"], result.table["cost/prefill_positions"], strict=True))
    assert all(costs[s] == (int(s.split("=")[1]) + 2 if s != "thinking.num_slots=0" else 0) for s in costs)
    search = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").download_artifacts(
        result.parent_run_id, "search.json", str(tmp_path))
    assert '"multi_objective": true' in Path(search).read_text()
