"""Training on a real local Ray with real coat-mini audio, a real feature store and a real MLflow store."""

import os
import shutil
import threading
from pathlib import Path

import mlflow
import psutil
import pytest
import requests
import torch
from safetensors.torch import load_file
from torch.distributed.fsdp import FullyShardedDataParallel

from coat import tracking
from coat.config import load_config
from coat.data.stream import training_items
from coat.data.synth import synthesize
from coat.model import CoATModel
from coat.model.coat_model import WEIGHTS_FILE
from coat.train.checkpoint import load_optimizer_shard, save_optimizer_shard, whole_trained_parts
from coat.train.launch import prepare_data, train, training_datasets
from coat.train.loop import clip_gradients, lr_factor, stage_at
from coat.train.session import fsdp_options
from tests.conftest import SYNTHETIC_EXPERTS, free_port, kill_when, synthetic_targets, tiny_config


@pytest.fixture(scope="module")
def coat_mini(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coat-mini")
    return synthesize(root, size=40, seed=3)


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


def test_train_in_process_logs_every_step_and_resumes_instead_of_restarting(tmp_path, coat_mini):
    cfg = train_config(tmp_path, coat_mini, "train.num_workers=0", "train.run_name=local")
    first = train(cfg, evaluate_after=False)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    assert first.metrics["step"] == 8
    assert steps_logged(uri, first.mlflow_run_id) == list(range(1, 9))
    for key in ("train/ce", "train/mel", "train/prosody", "train/lr", "train/samples_per_s"):
        assert len(steps_logged(uri, first.mlflow_run_id, key)) == 8, key
    run = mlflow.tracking.MlflowClient(uri).get_run(first.mlflow_run_id)
    assert run.data.params["thinking.num_slots"] == "4" and run.data.tags["backbone"] == "qwen2-audio"
    assert (first.checkpoint / "coat.safetensors").is_file() and (first.checkpoint / "training_state.pt").is_file()

    again = train(cfg, evaluate_after=False)  # the same command: resumes from the finished run's checkpoint
    assert again.mlflow_run_id == first.mlflow_run_id
    assert steps_logged(uri, first.mlflow_run_id) == list(range(1, 9))


def test_cached_streams_decode_each_clip_once(tmp_path, coat_mini):
    data = shutil.copytree(coat_mini.parent, tmp_path / "coat-mini")
    cfg = train_config(tmp_path, data / "manifest.jsonl", "data.cache_decoded=true")
    manifest, store = prepare_data(cfg)
    cached, _ = training_datasets(cfg, manifest, store)
    streamed, _ = training_datasets(train_config(tmp_path, manifest, "data.decode_tasks=1"), manifest, store)
    rows = len(training_items(manifest, "train", cfg.experts.names, store)[0])
    with pytest.raises(ValueError, match="train.batch_size"):
        training_datasets(train_config(tmp_path, manifest, "train.batch_size=1000"), manifest, store)
    for wav in (data / "audio").glob("*.wav"):
        wav.unlink()
    for _epoch in range(2):  # every epoch reads the clips decoded before the files went away
        ids = [row["id"] for row in cached["train"].iter_rows() if len(row["audio"]) > 0]
        assert len(ids) == len(set(ids)) == rows
    with pytest.raises(Exception, match=r"(?s)AudioError.*\.wav: missing_file"):  # uncached: decodes every epoch
        list(streamed["train"].iter_rows())


def test_two_ddp_workers_survive_a_killed_worker(tmp_path, coat_mini):
    cfg = train_config(tmp_path, coat_mini, "train.num_workers=2", "train.max_failures=1", "train.run_name=ddp",
                       "train.stages=[{steps: 4, ce_weight: 0.1}, {steps: 8, ce_weight: 1.0}]")
    killed: list[int] = []
    killer = threading.Thread(target=kill_when, args=(tmp_path / "runs", "*/checkpoint_*", "RayTrainWorker", killed))
    killer.start()
    result = train(cfg, evaluate_after=False)
    killer.join()
    assert killed, "no Ray Train worker process was found to kill"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert result.metrics["step"] == 12
    steps = steps_logged(tracking.resolve_uri(cfg.tracking.uri), result.mlflow_run_id)
    assert steps == list(range(1, 13)), "every optimizer step logged exactly once across the restart"


def test_training_logs_to_a_real_tracking_server(tmp_path, coat_mini, server):
    uri, _ = server
    cfg = train_config(tmp_path, coat_mini, "train.num_workers=1", f"tracking.uri={uri}", "train.run_name=served",
                       "tracking.experiment=served", "train.stages=[{steps: 4}]", "data.cache_decoded=true")
    result = train(cfg, evaluate_after=False)
    run = requests.get(f"{uri}/api/2.0/mlflow/runs/get", params={"run_id": result.mlflow_run_id}, timeout=10).json()
    params = {p["key"]: p["value"] for p in run["run"]["data"]["params"]}
    tags = {t["key"]: t["value"] for t in run["run"]["data"]["tags"]}
    assert params["train.stages"] and params["experts.names"] == "['mel', 'prosody']"
    assert tags["experts"] == "mel,prosody" and run["run"]["info"]["status"] == "FINISHED"
    history = requests.get(f"{uri}/api/2.0/mlflow/metrics/get-history",
                           params={"run_id": result.mlflow_run_id, "metric_key": "train/mel"}, timeout=10).json()
    assert sorted(m["step"] for m in history["metrics"]) == [1, 2, 3, 4]
    artifacts = mlflow.tracking.MlflowClient(uri).list_artifacts(result.mlflow_run_id, "trained_parts")
    assert "trained_parts/coat.safetensors" in {a.path for a in artifacts}


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
