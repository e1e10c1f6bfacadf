"""Training on a real local Ray with real coat-mini audio, a real feature store and a real MLflow store."""

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import requests
import torch
from safetensors.torch import load_file
from torch.distributed.fsdp import FullyShardedDataParallel

from coat import tracking
from coat.config import apply_overrides, from_yaml, load_config, to_yaml
from coat.experts.registry import build_expert
from coat.model import CoATModel
from coat.model.coat_model import WEIGHTS_FILE
from coat.train.checkpoint import load_optimizer_shard, save_optimizer_shard, whole_trained_parts
from coat.train.launch import train, training_streams
from coat.train.loop import clip_gradients, lr_factor, stage_at
from coat.train.session import fsdp_options
from tests.conftest import SYNTHETIC_EXPERTS, free_port, synthetic_targets, tiny_config


def train_config(tmp_path: Path, manifest: Path, *overrides: str):
    return load_config(overrides=[
        f"data.manifest={manifest}", f"data.store={manifest.parent / 'store'}", f"train.storage={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", "experts.names=[mel,prosody]",
        "thinking.num_slots=4", "thinking.max_slots=8", "train.batch_size=2", "train.warmup_steps=2",
        "heads.dim=32", "train.stages=[{steps: 4, ce_weight: 0.1}, {steps: 4, ce_weight: 1.0}]",
        "train.checkpoint_every=2", *overrides,
    ])


def steps_logged(uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    return [step for step, _ in tracking.metric_history(uri, run_id, key)]


def test_schedule_stages_and_learning_rate():
    cfg = load_config(overrides=["train.stages=[{steps: 3, ce_weight: 0.0}, {steps: 5}]", "train.warmup_steps=2"])
    assert [stage_at(cfg, s).ce_weight for s in range(8)] == [0.0] * 3 + [1.0] * 5
    factors = [lr_factor(cfg, s) for s in range(8)]
    assert factors[0] == 0.5 and factors[1] == 1.0 and factors[-1] < factors[2] and min(factors) >= 0.1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, coat_mini):
    """One in-process run to the end, never killed: what every resumed run must reproduce."""
    cfg = train_config(tmp_path_factory.mktemp("uninterrupted"), coat_mini, "train.num_workers=0",
                       "train.run_name=local")
    return cfg, train(cfg, evaluate_after=False)


def test_train_in_process_logs_every_step_and_resumes_instead_of_restarting(uninterrupted):
    cfg, first = uninterrupted
    uri = tracking.resolve_uri(cfg.tracking.uri)
    assert first.metrics["step"] == 8
    assert steps_logged(uri, first.mlflow_run_id) == list(range(1, 9))
    for key in ("train/ce", "train/mel", "train/prosody", "train/lr", "train/samples_per_s"):
        assert len(steps_logged(uri, first.mlflow_run_id, key)) == 8, key
    assert steps_logged(uri, first.mlflow_run_id, "val/ce") == [2, 4, 6, 8], "validation with each checkpoint"
    run = mlflow.tracking.MlflowClient(uri).get_run(first.mlflow_run_id)
    assert run.data.params["thinking.num_slots"] == "4" and run.data.tags["backbone"] == "qwen2-audio"
    assert (first.checkpoint / "coat.safetensors").is_file() and (first.checkpoint / "training_state.pt").is_file()

    again = train(cfg, evaluate_after=False)  # the same command: resumes from the finished run's checkpoint
    assert again.mlflow_run_id == first.mlflow_run_id
    assert steps_logged(uri, first.mlflow_run_id) == list(range(1, 9))


def test_a_run_records_where_its_numbers_came_from(uninterrupted):
    cfg, result = uninterrupted
    uri = tracking.resolve_uri(cfg.tracking.uri)
    client = mlflow.tracking.MlflowClient(uri)
    tags = client.get_run(result.mlflow_run_id).data.tags
    streams = training_streams(cfg, Path(cfg.data.manifest), Path(cfg.data.store))
    assert tags["git_commit"] == subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                cwd=Path(__file__).parent, check=True).stdout.strip()
    assert tags["git_dirty"] in ("true", "false") and len(tags["code_sha256"]) == 16
    for package in ("torch", "transformers", "peft", "ray", "mlflow"):
        assert tags[f"version.{package}"] == importlib.metadata.version(package)
    assert tags["backbone.source"] == "random tiny weights, seed 0"
    assert tags["data.train.rows"] == str(len(streams["train"])) and len(tags["data.val.sha256"]) == 16
    stats = streams["train"].sources["mel"].stats
    assert tags["expert.mel.stats"] == stats["id"]
    assert tags["expert.mel.version"] == f"{build_expert('mel').version}-crop8s"  # clips cut to data.max_seconds
    saved = json.loads(Path(client.download_artifacts(result.mlflow_run_id, "target_stats.json")).read_text())
    assert saved["mel"]["id"] == stats["id"] and saved["mel"]["mean"] == stats["mean"]
    assert json.loads((result.checkpoint / "target_stats.json").read_text())["mel"]["id"] == stats["id"]
    assert from_yaml(Path(client.download_artifacts(result.mlflow_run_id, "config.yaml")).read_text()) == cfg


def killed_runs(cfg, tmp_path: Path, faults: str, runs: int) -> tuple[list[int], str]:
    """`coat train` of `cfg` in-process, in a subprocess, run `runs` times with `COAT_FAULT=faults`: the exit codes
    and the uri of its MLflow store."""
    killed = apply_overrides(cfg, ["train.num_workers=0", "train.run_name=killed", f"train.storage={tmp_path / 'runs'}",
                                   f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"])
    (tmp_path / "killed.yaml").write_text(to_yaml(killed))
    command = [str(Path(sys.executable).parent / "coat"), "train", "--config", str(tmp_path / "killed.yaml")]
    env = {**os.environ, "COAT_FAULT": faults, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = [subprocess.run(command, env=env, capture_output=True, text=True, timeout=240) for _ in range(runs)]
    assert done[-1].returncode == 0, done[-1].stderr[-3000:]
    return [d.returncode for d in done], tracking.resolve_uri(killed.tracking.uri)


def assert_resumed_like(uri: str, run_name: str, reference_uri: str, reference_run: str, steps: int) -> str:
    """Every step logged once, with the losses of the uninterrupted reference run. Returns the run id."""
    run_id = tracking.find_run(uri, tracking.get_or_create_experiment(uri, "coat"), run_name)
    losses = tracking.metric_history(uri, run_id, "train/loss")
    assert [s for s, _ in losses] == list(range(1, steps + 1)), "every step logged exactly once"
    expected = tracking.metric_history(reference_uri, reference_run, "train/loss")
    np.testing.assert_allclose([v for _, v in losses], [v for _, v in expected], rtol=1e-5)
    return run_id


def test_a_run_killed_mid_checkpoint_resumes_to_the_uninterrupted_losses(uninterrupted, tmp_path):
    """Killed while writing the step-4 checkpoint (step 2's committed): the restart continues the same data order
    from step 2 with the same randomness, logs every step once, and evaluates where it trained."""
    cfg, reference = uninterrupted
    codes, uri = killed_runs(cfg, tmp_path, "checkpoint@4", runs=2)
    assert codes == [-signal.SIGKILL, 0]
    assert not list((tmp_path / "runs" / "killed").glob(".staging-*")), "the torn write is cleared"
    run_id = assert_resumed_like(uri, "killed", tracking.resolve_uri(cfg.tracking.uri), reference.mlflow_run_id, 8)

    client = mlflow.tracking.MlflowClient(uri)
    tags = client.get_run(run_id).data.tags
    assert (tags["eval.device"], tags["eval.dtype"], tags["latency.batch_size"]) == ("cpu", "float32", "1")
    assert tags["eval.batch_size"] == str(cfg.eval.batch_size) and tags["eval.subsample"] == "all"
    predictions = Path(client.download_artifacts(run_id, "eval/predictions.jsonl")).read_text().splitlines()
    test_ids = [row["id"] for row in map(json.loads, Path(cfg.data.manifest).read_text().splitlines())
                if row["split"] == "test"]
    assert sorted(json.loads(line)["id"] for line in predictions) == sorted(test_ids)


@pytest.mark.faults
def test_a_run_killed_before_its_first_checkpoint_and_after_a_commit_resumes_exactly(uninterrupted, tmp_path):
    cfg, reference = uninterrupted
    codes, uri = killed_runs(cfg, tmp_path, "step@1,reported@6", runs=3)
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0]
    assert_resumed_like(uri, "killed", tracking.resolve_uri(cfg.tracking.uri), reference.mlflow_run_id, 8)


def test_logged_step_metrics_are_the_mean_over_micro_batches(uninterrupted, tmp_path):
    cfg, reference = uninterrupted  # batches of 2
    accumulated = train(apply_overrides(cfg, [
        "train.num_workers=0", "train.run_name=accumulated", f"train.storage={tmp_path / 'runs'}",
        "train.batch_size=1", "train.grad_accum=2", "train.stages=[{steps: 1, ce_weight: 0.1}]",
        "train.checkpoint_every=1"]), evaluate_after=False)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    for key in ("train/mel", "train/prosody"):  # the step's two rows, before any update: the same means
        (whole,) = [v for s, v in tracking.metric_history(uri, reference.mlflow_run_id, key) if s == 1]
        (mean,) = [v for _, v in tracking.metric_history(uri, accumulated.mlflow_run_id, key)]
        assert mean == pytest.approx(whole, rel=1e-4), key


def test_a_batch_that_cannot_fill_one_step_is_refused_before_decoding(uninterrupted, tmp_path):
    cfg, _ = uninterrupted
    with pytest.raises(ValueError, match="train.batch_size"):
        training_streams(apply_overrides(cfg, ["train.batch_size=1000"]), Path(cfg.data.manifest),
                         Path(cfg.data.store))


def test_two_ddp_workers_survive_a_kill_before_anything_is_committed(tmp_path, coat_mini, server, monkeypatch):
    """Rank 0 dies while writing the first checkpoint, so the restart redoes steps 1 and 2; metrics go to a real
    tracking server, from Ray Train's controller once each checkpoint is registered."""
    uri, _ = server
    monkeypatch.setenv("COAT_FAULT", "checkpoint@2")
    cfg = train_config(tmp_path, coat_mini, "train.num_workers=2", "train.max_failures=1", "train.run_name=ddp",
                       f"tracking.uri={uri}", "tracking.experiment=served",
                       "train.stages=[{steps: 2, ce_weight: 0.1}, {steps: 4, ce_weight: 1.0}]")
    result = train(cfg, evaluate_after=False)
    assert (tmp_path / "runs" / "ddp" / ".fault-checkpoint-2").exists() and result.metrics["step"] == 6
    history = requests.get(f"{uri}/api/2.0/mlflow/metrics/get-history",
                           params={"run_id": result.mlflow_run_id, "metric_key": "train/loss"}, timeout=10).json()
    assert sorted(m["step"] for m in history["metrics"]) == list(range(1, 7)), "every step logged exactly once"
    run = requests.get(f"{uri}/api/2.0/mlflow/runs/get", params={"run_id": result.mlflow_run_id}, timeout=10).json()
    params = {p["key"]: p["value"] for p in run["run"]["data"]["params"]}
    tags = {t["key"]: t["value"] for t in run["run"]["data"]["tags"]}
    assert params["train.stages"] and params["experts.names"] == "['mel', 'prosody']"
    assert tags["experts"] == "mel,prosody" and run["run"]["info"]["status"] == "FINISHED"
    artifacts = mlflow.tracking.MlflowClient(uri).list_artifacts(result.mlflow_run_id, "trained_parts")
    assert "trained_parts/coat.safetensors" in {a.path for a in artifacts}


@pytest.mark.faults
def test_ddp_losses_after_restarts_equal_an_uninterrupted_run(tmp_path, coat_mini, monkeypatch):
    common = ["train.num_workers=2", "train.max_failures=3", "train.stages=[{steps: 4, ce_weight: 0.1}, {steps: 8}]"]
    (tmp_path / "plain").mkdir()
    (tmp_path / "killed").mkdir()
    plain = train(train_config(tmp_path / "plain", coat_mini, *common, "train.run_name=plain"), evaluate_after=False)
    monkeypatch.setenv("COAT_FAULT", "step@1,checkpoint@4,reported@10")
    cfg = train_config(tmp_path / "killed", coat_mini, *common, "train.run_name=killed")
    train(cfg, evaluate_after=False)
    assert len(list((tmp_path / "killed" / "runs" / "killed").glob(".fault-*"))) == 3
    assert_resumed_like(tracking.resolve_uri(cfg.tracking.uri), "killed",
                        tracking.resolve_uri(train_config(tmp_path / "plain", coat_mini).tracking.uri),
                        plain.mlflow_run_id, 12)


def test_tracking_server_down_fails_before_any_compute(tmp_path):
    missing = tmp_path / "not-yet" / "manifest.jsonl"
    cfg = train_config(tmp_path, missing, f"tracking.uri=http://127.0.0.1:{free_port()}")
    with pytest.raises(tracking.TrackingUnavailableError, match="127.0.0.1"):
        train(cfg)
    assert not missing.parent.exists() and not (tmp_path / "runs").exists()


def fsdp_batch(coat: CoATModel, clips: list, step: int) -> dict:
    """A different batch per step, so that a restart without Adam's moments would update differently."""
    prompts, responses = ["What is the first sound?", "Is the second tone higher?"], ["a rising chirp", "yes"]
    return {**coat.encode(clips, prompts, responses), **synthetic_targets(coat.num_slots, seed=step)}


def fsdp_model() -> CoATModel:
    torch.manual_seed(0)
    return CoATModel(tiny_config("qwen2-audio"), SYNTHETIC_EXPERTS).eval()  # eval: no dropout, same on every rank


def fsdp_step(model, coat: CoATModel, optimizer, batch: dict) -> float:
    """A step as the loop takes it, with clipping that binds: the update depends on the whole gradient's norm."""
    model(batch).loss.backward()
    norm = clip_gradients(model, [p for p in coat.parameters() if p.requires_grad], 0.05).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def fsdp_rank(rank: int, port: int, clips: list, out: Path) -> None:
    """One of two gloo ranks training under FSDP as `run_loop` does: a step, a checkpoint, a restart from it, a
    second step. Rank 0 writes the trained parts after each step, every rank its optimizer shard."""
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for step in (1, 2):
            coat = fsdp_model()
            if step == 2:
                coat.load_trained(out / "step1")
            model = FullyShardedDataParallel(coat, device_id=torch.device("cpu"), **fsdp_options(coat))
            optimizer = torch.optim.AdamW([p for p in coat.parameters() if p.requires_grad], lr=1e-2)
            if step == 2:
                optimizer.load_state_dict(load_optimizer_shard(out, rank))
            assert fsdp_step(model, coat, optimizer, fsdp_batch(coat, clips, step)) > 0.05
            trained = whole_trained_parts(model, coat)
            if rank == 0:
                coat.save(out / f"step{step}", trained)
            save_optimizer_shard(out, rank, optimizer)
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_checkpoints_hold_the_whole_trained_parts_and_optimizer_state(clips, tmp_path):
    torch.multiprocessing.spawn(fsdp_rank, args=(free_port(), clips, tmp_path), nprocs=2)
    coat = fsdp_model()  # the same two steps in one process, unsharded
    optimizer = torch.optim.AdamW([p for p in coat.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2):
        fsdp_step(coat, coat, optimizer, fsdp_batch(coat, clips, step))
        saved, expected = load_file(tmp_path / f"step{step}" / WEIGHTS_FILE), coat.trained_state()
        assert saved.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(saved[name], value, atol=1e-4, rtol=1e-4, msg=f"step {step}: {name}")
