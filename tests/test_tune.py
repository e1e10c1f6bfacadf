"""Sweeps: search spaces, and real Ray Tune sweeps (grid and Optuna + ASHA) with MLflow parent/child runs."""

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray.tune
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial
from ray.tune.search.optuna import OptunaSearch

from coat import tracking
from coat.config import ConfigError, load_config
from coat.data.store import FeatureStore
from coat.tune.space import SpaceError, load_space, overrides
from coat.tune.sweep import (
    SweepResult,
    _trial_id,
    run_sweep,
    trial_folder,
    trial_label,
    trial_name,
    trial_status,
    with_seeds,
)
from tests.conftest import free_port, kill_when, mlflow_server, open_run, sweep_args, sweep_config, wait_for_health

ROOT = Path(__file__).resolve().parents[1]
TRIAL_CHECKPOINT = "trials/*/checkpoint_*/training_state.pt"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


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


def test_spaces_vary_stage_lengths_per_stage_weights_and_roles(tmp_path):
    space = load_space(write(tmp_path / "s.yaml", (
        "train.stages.0.steps: {grid: [20, 60]}\n"
        "experts.names: {grid: [[pitch, affect], [pitch, reconstruction]]}\n"
        "train.stages.1.weights.egemaps: {grid: [0.5, 2.0], when: {experts.names: {contains: affect}}}\n")))
    configs = [load_config(overrides=overrides(point)) for point in space.grid()]
    assert len(configs) == 2 * (2 + 1)
    assert sorted({c.train.stages[0].steps for c in configs}) == [20, 60]
    assert {c.train.total_steps - c.train.stages[0].steps for c in configs} == {240}, "stage 2 stays as it was"
    assert {tuple(c.experts.names) for c in configs} == {("pitch", "egemaps"), ("pitch", "mel")}
    assert sorted(c.train.stages[1].weights.get("egemaps", 0) for c in configs) == [0, 0, 0.5, 0.5, 2.0, 2.0]
    with pytest.raises(SpaceError, match="train.stages.3.steps.*has 2 entries"):
        load_space(write(tmp_path / "bad.yaml", "train.stages.3.steps: {grid: [5]}\n"))


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


def test_grid_sweep_logs_a_parent_and_one_child_per_trial(sweeps, coat_mini):
    result, uri = sweeps["grid"], sweeps["uri"]
    assert len(result.table) == 4 and set(result.table["status"]) == {"done"}
    assert set(result.table["steps"]) == {4}, "grid trials run to the end"
    children = child_runs(uri, result.parent_run_id)
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert sorted(r.info.run_name for r in children) == ["K=0 experts=mel", "K=0 experts=mel+prosody",
                                                         "K=4 experts=mel", "K=4 experts=mel+prosody"]
    assert sorted(r.data.params["thinking.num_slots"] for r in children) == ["0", "0", "4", "4"]
    assert all(len(tracking.metric_history(uri, r.info.run_id, "train/ce")) == 4 for r in children)
    for child in children:  # the baselines answered the same examples beside CoAT
        metrics = child.data.metrics
        assert {"base/latency/ttft_s", "cot/latency/ttft_s", "cost/prefill_positions"} <= set(metrics)
        assert metrics["cot/latency/new_tokens"] > metrics["base/latency/new_tokens"]
    assert result.best is not None and result.best["val/ce"] == result.table["val/ce"].min()
    parent = MlflowClient(uri).get_run(result.parent_run_id)
    assert parent.data.tags["coat.kind"] == "sweep" and "best/val/ce" in parent.data.metrics
    description = parent.data.tags["mlflow.note.content"]
    assert "K (thinking.num_slots), experts (experts.names): 4 trials (4 done)" in description
    assert "seconds at batch size 1" in description
    assert result.link.endswith(f"/#/experiments/{parent.info.experiment_id}/runs?workflowType=machine_learning")
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(result.parent_run_id, "sweep")}
    assert "sweep/results.json" in artifacts
    # Each expert's features were computed once for the whole sweep: one stored row per clip.
    store = FeatureStore(coat_mini.parent / "store")
    for expert in ("mel", "prosody"):
        (version,) = [p.name for p in (coat_mini.parent / "store" / expert).iterdir() if p.is_dir()]
        index = store.index(expert, version)
        assert len(index) == index["clip_hash"].nunique() == 40


def test_seeds_repeat_every_grid_point(tmp_path):
    space = load_space(write(tmp_path / "s.yaml", "thinking.num_slots: {grid: [0, 4]}\n"))
    points = with_seeds(space, [0, 1, 2]).grid()
    assert len(points) == 6 and {(p["thinking.num_slots"], p["train.seed"]) for p in points} == {
        (k, s) for k in (0, 4) for s in (0, 1, 2)}
    assert trial_label(points[0]) == "K=0 seed=0"
    assert trial_label({"loss.weights.mel": 0.123456, "experts.names": ["a", "b"]}) == "w.mel=0.123 experts=a+b"
    with pytest.raises(SpaceError, match="grid space"):
        with_seeds(load_space(write(tmp_path / "t.yaml", "train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")), [0, 1])
    with pytest.raises(ConfigError, match="sweep.seeds"):
        load_config(overrides=["sweep.seeds=[1,1]"])


def test_controls_join_the_grid_at_one_k(tmp_path):
    space = load_space(write(tmp_path / "s.yaml", (
        "thinking.num_slots: {grid: [0, 4, 16]}\n"
        "thinking.targets: {grid: [experts, none, shuffled], when: {thinking.num_slots: 16}}\n")))
    points = [(p["thinking.num_slots"], p.get("thinking.targets", "experts")) for p in space.grid()]
    assert points == [(0, "experts"), (4, "experts"), (16, "experts"), (16, "none"), (16, "shuffled")]
    assert trial_label({"thinking.num_slots": 16, "thinking.targets": "none"}) == "K=16 targets=none"
    with pytest.raises(ConfigError, match="thinking.targets"):
        load_config(overrides=["thinking.targets=shuffled", "experts.names=[]"])


def test_tune_names_a_trial_by_its_label_and_its_folder_gives_back_its_id():
    def unreported(folder: str) -> ray.tune.Result:  # a trial that crashed before its first report
        return ray.tune.Result(metrics={}, checkpoint=None, error=None, path=f"/runs/sweeps/k/{folder}")

    grid = Trial("run_trial", config={"setting": "K=16 targets=shuffled"}, trial_id="1a2b3_00004", stub=True)
    sampled = Trial("run_trial", config={"point": {"thinking.num_slots": 4, "experts.names": ["org/model", "mel"]}},
                    trial_id="1a2b3c4d", stub=True)
    assert trial_name(grid) == "K=16 targets=shuffled (1a2b3_00004)"
    assert trial_name(sampled) == "K=4 experts=org/model+mel (1a2b3c4d)"
    for trial in (grid, sampled):
        assert "/" not in trial_folder(trial) and _trial_id(unreported(trial_folder(trial))) == trial.trial_id
    # Folders Tune named itself, in sweeps begun before `trial_folder`: `--resume` still finds their trials' runs.
    assert _trial_id(unreported("run_trial_1a2b3_00004_4_setting=K_16_2026-12-05_10-00-00")) == "1a2b3_00004"
    assert _trial_id(unreported("run_trial_1a2b3c4d_3_point=thinking.num_slots=4_2026-12-05_10-00-00")) == "1a2b3c4d"


def test_a_trial_asha_stopped_stays_stopped_when_a_resumed_sweep_summarises_again(tmp_path):
    """The first summary closes a stopped trial's run KILLED; a later `--resume` summarises again and must not count
    it among the trials that trained to the end (and the candidates for the best)."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = tracking.get_or_create_experiment(uri, "coat")
    runs = {state: client.create_run(experiment).info.run_id for state in ("RUNNING", "FINISHED")}
    client.set_terminated(runs["FINISHED"], "FINISHED")
    assert trial_status(uri, runs["RUNNING"], error=False) == "stopped"
    assert tracking.run_status(uri, runs["RUNNING"]) == "KILLED"
    assert trial_status(uri, runs["RUNNING"], error=False) == "stopped", "summarised again after a resume"
    assert trial_status(uri, runs["FINISHED"], error=False) == "done"
    crashed = client.create_run(experiment).info.run_id
    assert trial_status(uri, crashed, error=True) == "error" and tracking.run_status(uri, crashed) == "FAILED"
    assert trial_status(uri, crashed, error=False) == "error"


def test_sweep_efficiency_counts_the_wait_for_the_data_stream_as_start_up_not_training(tmp_path):
    """A trial whose first step waited 4.5 s for its data stream: that wait is start-up; every step counts as long
    as it took, the first at most as long as a typical one."""
    spec = importlib.util.spec_from_file_location("efficiency", ROOT / "experiments/benchmarks/sweep_efficiency.py")
    efficiency = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(efficiency)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("coat")
    parent = client.create_run(experiment).info.run_id
    child = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
    seconds = [5.0, 0.5, 0.5, 0.4]  # 8 samples per step
    for step, (took, since) in enumerate(zip(seconds, [6.0, 6.5, 7.0, 7.4], strict=True), 1):
        client.log_metric(child, "train/samples_per_s", 8 / took, step=step)
        client.log_metric(child, "train/since_launch_s", since, step=step)
    client.log_metric(child, "time/train_s", 8.0, step=4)
    client.log_metric(child, "time/eval_s", 1.0, step=4)
    result = SweepResult("s", pd.DataFrame({"steps": [4]}), None, parent, tmp_path)
    shares = efficiency.summarise(result, uri, wall=10.0, concurrency=1, batch_size=8)["shares"]
    assert shares["startup"] * 10 == pytest.approx(6.0 - 0.5)
    assert shares["steps"] * 10 == pytest.approx(0.5 + 0.5 + 0.5 + 0.4)
    assert shares["loop_other"] * 10 == pytest.approx(8.0 - 5.5 - 1.9)
    assert shares["evaluation"] * 10 == pytest.approx(1.0)


def test_a_sweep_run_again_without_resume_is_a_new_sweep(tmp_path, coat_mini):
    """Its trials never join the earlier sweep's, where they would count as more seeds of the same settings."""
    space = write(tmp_path / "once.yaml", "thinking.num_slots: {grid: [2]}\n")
    args = sweep_args(tmp_path, coat_mini, "sweep.name=once", "train.stages=[{steps: 1}]", "eval.max_examples=2",
                      "eval.latency_examples=0")
    first, second = run_sweep(load_config(overrides=args), space), run_sweep(load_config(overrides=args), space)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert first.parent_run_id != second.parent_run_id
    assert len(child_runs(uri, first.parent_run_id)) == len(child_runs(uri, second.parent_run_id)) == 1


@pytest.mark.faults
def test_a_trial_killed_past_its_retries_is_marked_failed_and_the_sweep_goes_on(tmp_path, coat_mini):
    space = write(tmp_path / "f.yaml", "thinking.num_slots: {grid: [2, 4]}\n")
    killed: list[int] = []
    killer = threading.Thread(target=kill_when, args=(tmp_path / "sweeps", TRIAL_CHECKPOINT, "ImplicitFunc", killed))
    killer.start()
    result = run_sweep(sweep_config(tmp_path, coat_mini, "sweep.name=f", "sweep.trial_retries=0",
                                    "sweep.max_concurrent=1", "train.stages=[{steps: 8}]", "train.checkpoint_every=1"),
                       space)
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
    result = run_sweep(sweep_config(tmp_path, coat_mini, "sweep.name=r", "sweep.trial_retries=1",
                                    "train.stages=[{steps: 8}]", "train.checkpoint_every=1"), space)
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
@pytest.mark.parametrize("search", ["optuna", "grid"])
def test_a_sweep_resumes_after_the_driver_is_killed(tmp_path, coat_mini, search):
    grid = [1.0e-4, 1.0e-3, 1.0e-2]
    space = write(tmp_path / "o.yaml", f"train.lr: {{grid: {grid}}}\n" if search == "grid" else
                  "train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    args = sweep_args(tmp_path, coat_mini, "sweep.name=o", "sweep.num_samples=3", "sweep.max_concurrent=1")
    script = ("import sys; from coat.config import load_config; from coat.tune.sweep import run_sweep; "
              f"run_sweep(load_config(overrides={args!r}), {str(space)!r}, resume='--resume' in sys.argv)")
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
    client = MlflowClient(uri)
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   "tags.`coat.kind` = 'sweep'")
    # What a kill between a trial opening its run and Tune saving the trial leaves: a child no trial owns.
    orphan = client.create_run(parent.info.experiment_id, run_name="lr=0.001", tags={
        "mlflow.parentRunId": parent.info.run_id, "coat.run_name": "o-0000dead"}).info.run_id

    done = subprocess.run([sys.executable, "-c", script, "--resume"], cwd=tmp_path, timeout=840)  # < the test's 900 s
    assert done.returncode == 0
    runs = child_runs(uri, parent.info.run_id)
    orphans = [r for r in runs if "coat.orphan" in r.data.tags]  # the planted one, and any the kill really left
    assert orphan in {r.info.run_id for r in orphans} and {r.info.status for r in orphans} == {"KILLED"}
    children = [r for r in runs if "coat.orphan" not in r.data.tags]
    # Every trial ends closed: trained to the end, or stopped early by ASHA (KILLED); none left RUNNING.
    assert len(children) == 3 and {r.info.status for r in children} <= {"FINISHED", "KILLED"}
    first = finished_before[0]
    again = client.get_run(first.info.run_id)
    assert again.info.end_time == first.info.end_time, "a finished trial is not rerun"
    lrs = {float(r.data.params["train.lr"]) for r in children}
    assert len(lrs) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    if search == "grid":  # each point once, trained to the end
        assert lrs == set(grid) and {r.info.status for r in children} == {"FINISHED"}


def test_multi_objective_sweep_trades_quality_against_prefill_cost(sweeps):
    result, uri = sweeps["pareto"], sweeps["uri"]
    assert len(result.table) == 3 and set(result.table["status"]) == {"done"}
    for setting, cost in zip(result.table["setting"], result.table["cost/prefill_positions"], strict=True):
        k = int(setting.split(",")[0].split("=")[1])
        assert cost == (k + 2 if k else 0), setting
    search = MlflowClient(uri).download_artifacts(result.parent_run_id, "search.json", str(sweeps["root"]))
    assert '"multi_objective": true' in Path(search).read_text()
    # What Optuna itself was told, from the searcher state Tune saved: both objectives, each trial's cost among them.
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(sweeps["root"] / "sweeps" / result.name))
    study = searcher._ot_study
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2, "quality (val/ce, min) and cost (min)"
    told = [tuple(t.values) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(told) == sorted(zip(result.table["val/ce"], result.table["cost/prefill_positions"], strict=True))


@pytest.mark.faults
def test_a_sweep_keeps_its_parent_and_children_through_a_tracking_server_outage(tmp_path, coat_mini):
    """The server goes away once the sweep's parent run is open and comes back after the first trial has trained
    to the end: no trial fails; the children opened meanwhile are created under the parent, every step once."""
    root, port = tmp_path / "server", free_port()
    root.mkdir()
    server = ("sqlite:///" + str(root / "db"), root, "--artifacts-destination", str(root / "art"))
    done = threading.Event()
    first_trial_trained = threading.Event()

    def outage(uri: str) -> None:
        with contextlib.ExitStack() as up:
            up.enter_context(mlflow_server(*server, port=port))
            while not done.is_set() and not open_run(uri, "sweep-u"):
                time.sleep(0.2)
        while not done.is_set() and not list((tmp_path / "sweeps" / "trials").glob("*/checkpoint_000004")):
            time.sleep(0.2)
        first_trial_trained.set()
        with mlflow_server(*server, port=port):
            done.wait()

    uri = f"http://127.0.0.1:{port}"
    switcher = threading.Thread(target=outage, args=(uri,))
    switcher.start()
    try:
        wait_for_health(uri)
        space = write(tmp_path / "u.yaml", "thinking.num_slots: {grid: [2, 4]}\n")
        result = run_sweep(sweep_config(tmp_path, coat_mini, "sweep.name=u", "sweep.max_concurrent=1",
                                        f"tracking.uri={uri}", "tracking.retry_s=1"), space)
        assert first_trial_trained.is_set(), "the first trial trained while the server was away"
        assert list(result.table["status"]) == ["done", "done"]
        children = child_runs(uri, result.parent_run_id)
        assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
        assert sorted(r.data.params["thinking.num_slots"] for r in children) == ["2", "4"]
        for child in children:
            assert [s for s, _ in tracking.metric_history(uri, child.info.run_id, "train/loss")] == [1, 2, 3, 4]
        trials = tmp_path / "sweeps" / "trials"
        assert list(trials.glob("*/mlflow-spool/run_ids.json")), "a child opened while the server was away"
        assert not list(trials.glob("*/mlflow-spool/*.jsonl")), "nothing left waiting"
    finally:
        done.set()
        switcher.join()
