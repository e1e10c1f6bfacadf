"""Training on a real local Ray with real coat-mini audio, a real feature store and a real MLflow store."""

import contextlib
import importlib.metadata
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
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
from coat.analysis.runs import histories
from coat.config import ConfigError, apply_overrides, from_yaml, load_config, to_yaml
from coat.data.prepare import training_streams
from coat.data.stream import iter_training_batches, shuffled_donors
from coat.data.synth import synthesize
from coat.experts.registry import build_expert
from coat.model import CoATModel
from coat.model.coat_model import WEIGHTS_FILE
from coat.model.losses import distance
from coat.model.targets import target_statistics
from coat.ray_runtime import QUIET_IN_WORKERS
from coat.train.checkpoint import (
    CheckpointError,
    committed_checkpoints,
    latest_checkpoint,
    load_optimizer_shard,
    load_training_state,
    log_committed_steps,
    prune_checkpoints,
    save_checkpoint,
    save_optimizer_shard,
    steps_handed_to_mlflow,
    verify_checkpoint,
    whole_trained_parts,
)
from coat.train.launch import train
from coat.train.loop import (
    HELD_VALIDATION_BYTES,
    NonFiniteTrainingError,
    ValidationBatches,
    clip_gradients,
    enter_stage,
    expert_scale_at,
    lr_factor,
    make_optimizer,
    set_learning_rates,
    stage_at,
    stage_ends,
    train_step,
)
from coat.train.session import InProcessSession, fsdp_options
from tests.conftest import (
    SYNTHETIC_EXPERTS,
    free_port,
    mlflow_server,
    open_run,
    synthetic_targets,
    tiny_config,
    wait_for,
    wait_for_health,
)

# The method's two stages: the slots and heads learn alone (LLM frozen, little CE, their own learning rates), then
# LoRA joins with the expert losses annealed to half and mel's weight changed.
STAGE_1 = "{steps: 4, ce_weight: 0.1, train: [slots, heads], lr: {slots: 0.005, heads: 0.003}}"
STAGE_2 = "{steps: 4, ce_weight: 1.0, expert_scale_end: 0.5, weights: {mel: 2.0}}"


def train_config(tmp_path: Path, manifest: Path, *overrides: str):
    return load_config(overrides=[
        f"data.manifest={manifest}", f"data.store={manifest.parent / 'store'}", f"train.storage={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", "experts.names=[mel,prosody]",
        "thinking.num_slots=4", "thinking.max_slots=8", "train.batch_size=2", "train.warmup_steps=2",
        "heads.dim=32", f"train.stages=[{STAGE_1}, {STAGE_2}]",
        "train.checkpoint_every=2", *overrides,
    ])


def steps_logged(uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    return [step for step, _ in tracking.metric_history(uri, run_id, key)]


def test_schedule_stages_learning_rates_and_annealing():
    cfg = load_config(overrides=["train.stages=[{steps: 3, ce_weight: 0.0, lr: {slots: 0.01}, train: [slots, heads]}, "
                                 "{steps: 5, "
                                 "expert_scale: 1.0, expert_scale_end: 0.0, warmup_steps: 1}]", "train.warmup_steps=2",
                                 "train.lr=0.002"])
    assert [stage_at(cfg, s)[1].ce_weight for s in range(8)] == [0.0] * 3 + [1.0] * 5
    assert [stage_at(cfg, s)[0] for s in range(8)] == [0] * 3 + [1] * 5 and stage_ends(cfg) == {3, 8}
    factors = [lr_factor(cfg, s) for s in range(8)]
    assert factors[:2] == [0.5, 1.0] and factors[2] < 1.0, "stage 1 warms up over 2 steps, then decays"
    assert factors[3] == 1.0 and factors[4] < 1.0 and factors[-1] == pytest.approx(0.1), "stage 2: its own schedule"
    assert [expert_scale_at(cfg, s) for s in range(3, 8)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    coat = CoATModel(tiny_config("qwen2-audio"), SYNTHETIC_EXPERTS)
    optimizer = make_optimizer(coat, cfg)
    assert set_learning_rates(optimizer, cfg, 1) == {"slots": 0.01, "heads": 0.002, "lora": 0.0}
    assert set_learning_rates(optimizer, cfg, 3) == {"slots": 0.002, "heads": 0.002, "lora": 0.002}
    assert [g["lr"] for g in optimizer.param_groups] == [0.002] * 3


def test_each_stage_trains_its_groups_and_freezes_the_rest(clips, tmp_path):
    cfg = tiny_config("qwen2-audio", "train.stages=[{steps: 2, train: [slots, heads]}, {steps: 2}]",
                      "train.warmup_steps=0", "lora.modules_to_save=[lm_head]")
    torch.manual_seed(0)
    coat = CoATModel(cfg, SYNTHETIC_EXPERTS)
    groups = {group: [name for name, _ in members] for group, members in coat.parameter_groups().items()}
    assert groups["slots"] == [n for n in coat.trained_names if n.endswith("embed_tokens.table")]
    assert all(n.startswith("heads.") for n in groups["heads"]) and groups["heads"]
    assert any("lora_A" in n for n in groups["lora"]) and any("lm_head" in n for n in groups["lora"])
    batch = {**coat.encode(clips[:2], ["What is it?"] * 2, ["a tone", "a chirp"]), **synthetic_targets(4)}
    session, optimizer, model = InProcessSession(tmp_path, 1, False, None), make_optimizer(coat, cfg), None
    start = {name: value.clone() for name, value in coat.trained_state().items()}

    def grads(stage) -> dict[str, bool]:
        coat(batch, stage=stage).loss.backward()
        got = {group: [p.grad is not None for _, p in members] for group, members in coat.parameter_groups().items()}
        coat.zero_grad(set_to_none=True)
        return {group: all(flags) if any(flags) else False for group, flags in got.items()}

    for stage in cfg.train.stages:
        model = enter_stage(session, coat, model, stage, "ddp")
        trained = set(stage.train)
        assert grads(stage) == {g: g in trained for g in ("slots", "heads", "lora")}
    model = enter_stage(session, coat, None, cfg.train.stages[0], "ddp")
    for step in range(2):
        train_step(model, coat, iter([batch]), optimizer, cfg, step, torch.device("cpu"))
    now = coat.trained_state()
    assert all(torch.equal(now[n], start[n]) for n in groups["lora"]), "stage 1 leaves the LLM as it was"
    assert not any(optimizer.state.get(p) for _, p in coat.parameter_groups()["lora"])
    assert all(not torch.equal(now[n], start[n]) for n in groups["slots"] + [groups["heads"][0]])
    model = enter_stage(session, coat, model, cfg.train.stages[1], "ddp")
    train_step(model, coat, iter([batch]), optimizer, cfg, 2, torch.device("cpu"))
    assert any(not torch.equal(coat.trained_state()[n], start[n]) for n in groups["lora"] if "lora_B" in n)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, coat_mini):
    """One in-process run to the end, never killed: what every resumed run must reproduce."""
    cfg = train_config(tmp_path_factory.mktemp("uninterrupted"), coat_mini, "train.num_workers=0",
                       "train.run_name=local")
    return cfg, train(cfg, evaluate_after=False)


def test_every_step_is_logged_once_and_a_finished_run_started_again_trains_nothing(uninterrupted):
    cfg, first = uninterrupted
    uri = tracking.resolve_uri(cfg.tracking.uri)
    assert first.metrics["step"] == 8
    assert steps_logged(uri, first.mlflow_run_id) == list(range(1, 9))
    for key in ("train/ce", "train/mel", "train/prosody", "train/lr", "train/samples_per_s"):
        assert len(steps_logged(uri, first.mlflow_run_id, key)) == 8, key
    assert steps_logged(uri, first.mlflow_run_id, "val/ce") == [2, 4, 6, 8], "validation with each checkpoint"
    assert [v for _, v in tracking.metric_history(uri, first.mlflow_run_id, "train/stage")] == [0] * 4 + [1] * 4
    lora_lr = [v for _, v in tracking.metric_history(uri, first.mlflow_run_id, "train/lr/lora")]
    slots_lr = [v for _, v in tracking.metric_history(uri, first.mlflow_run_id, "train/lr/slots")]
    assert slots_lr[1] == pytest.approx(0.005), "stage 1's own rate for the slots, warmed up over 2 steps"
    assert lora_lr[:4] == [0.0] * 4, "stage 1 freezes LoRA"
    assert lora_lr[4:6] == pytest.approx([cfg.train.lr / 2, cfg.train.lr]) and lora_lr[7] < lora_lr[5], \
        "LoRA joining in stage 2 warms up again"
    scales = [v for _, v in tracking.metric_history(uri, first.mlflow_run_id, "train/expert_scale")]
    assert scales[:4] == [1.0] * 4 and scales[4:] == pytest.approx([1.0, 5 / 6, 2 / 3, 0.5])
    run = mlflow.tracking.MlflowClient(uri).get_run(first.mlflow_run_id)
    counts = CoATModel(cfg).parameter_counts()
    assert {k: int(v) for k, v in run.data.tags.items() if k.startswith("trainable.")} == {
        f"trainable.{group}": n for group, n in counts.items()} and counts["lora"] > 0
    assert run.data.params["thinking.num_slots"] == "4" and run.data.tags["backbone"] == "qwen2-audio"
    assert (first.checkpoint / "coat.safetensors").is_file() and (first.checkpoint / "training_state.pt").is_file()

    written = {path: path.stat().st_mtime_ns for path in first.checkpoint.parent.rglob("*") if path.is_file()}
    again = train(cfg, evaluate_after=False)  # the same command, once the run has ended: nothing left to train
    assert again.mlflow_run_id == first.mlflow_run_id and again.metrics["step"] == 8
    assert steps_logged(uri, first.mlflow_run_id) == list(range(1, 9))
    assert {path: path.stat().st_mtime_ns for path in written} == written, "no checkpoint rewritten"


def test_every_worker_of_coats_ray_silences_ray_trains_cleaner_which_cannot_reach_the_state_api(uninterrupted):
    """Ray Train's placement-group cleaner warns every second when Ray has no dashboard (the local Ray coat starts);
    every worker process of coat's Ray sets that logger to errors only before running anything."""
    @ray.remote
    def levels() -> list[int]:
        return [logging.getLogger(name).getEffectiveLevel() for name in QUIET_IN_WORKERS]

    assert ray.get(levels.remote()) == [logging.ERROR] * len(QUIET_IN_WORKERS)


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


def test_shuffled_targets_come_from_another_clip_of_the_split_fixed_per_epoch_by_the_seed(uninterrupted):
    donors = shuffled_donors(12, seed=0, epoch=0)
    assert sorted(donors) == list(range(12)) and not (donors == np.arange(12)).any(), "every clip's targets, elsewhere"
    assert (donors == shuffled_donors(12, seed=0, epoch=0)).all()
    assert (donors != shuffled_donors(12, seed=0, epoch=1)).any()
    assert (donors != shuffled_donors(12, seed=1, epoch=0)).any()
    cfg, _ = uninterrupted
    cfg = apply_overrides(cfg, ["thinking.targets=shuffled"])
    train_stream = training_streams(cfg, Path(cfg.data.manifest), Path(cfg.data.store))["train"]
    coat = CoATModel(cfg)
    donors = shuffled_donors(len(train_stream), seed=0, epoch=0)
    rows = [0, 1, 2, 3]
    (own,) = iter_training_batches(train_stream.dataset(rows), coat, 4)
    (shuffled,) = iter_training_batches(train_stream.dataset(rows, donors), coat, 4)
    (theirs,) = iter_training_batches(train_stream.dataset(donors[rows]), coat, 4)
    assert torch.equal(shuffled["input_ids"], own["input_ids"]), "the clip's own audio, question and answer"
    for name in ("mel", "prosody"):
        assert torch.equal(shuffled[f"target.{name}"], theirs[f"target.{name}"]), "the donor's targets"
        assert not torch.equal(shuffled[f"target.{name}"], own[f"target.{name}"])
    torch.testing.assert_close(shuffled["duration"], theirs["duration"], rtol=1e-3, atol=1e-3)


def test_validation_decodes_its_rows_once_and_holds_them_unless_they_are_too_large(uninterrupted, monkeypatch):
    cfg, _ = uninterrupted
    val = training_streams(cfg, Path(cfg.data.manifest), Path(cfg.data.store))["val"]
    coat = CoATModel(cfg)

    def passes(held_bytes: int) -> tuple[list[list[dict]], int, int]:
        """Three checkpoints' validation batches, and how many batches were decoded here and pipelines started."""
        monkeypatch.setattr("coat.train.loop.HELD_VALIDATION_BYTES", held_bytes)
        batches = ValidationBatches(val, coat, cfg, rank=0, world=1)
        here, pipelines = [], []
        decode_here, dataset = batches.decode_here, val.dataset
        monkeypatch.setattr(batches, "decode_here", lambda rows: here.append(1) or decode_here(rows))
        monkeypatch.setattr(val, "dataset", lambda rows: pipelines.append(1) or dataset(rows))
        return [list(batches) for _ in range(3)], len(here), len(pipelines)

    held, decoded_here, pipelines = passes(HELD_VALIDATION_BYTES)
    assert 0 < len(held[0]) <= cfg.train.val_batches
    assert (decoded_here, pipelines) == (len(held[0]), 0), "decoded once, in this process, and held"
    streamed, decoded_here, pipelines = passes(0)
    assert (decoded_here, pipelines) == (1, 3), "too large to hold (one batch tells): streamed at every checkpoint"
    for batches in [*held, *streamed]:  # the same batches, decoded here or by Ray Data, every time
        assert len(batches) == len(held[0])
        for batch, first in zip(batches, held[0], strict=True):
            assert batch.keys() == first.keys() and all(torch.equal(batch[k], first[k]) for k in first)


def test_controls_train_the_same_slots_on_the_same_data_with_no_or_shuffled_supervision(uninterrupted, tmp_path):
    cfg, reference = uninterrupted
    uri = tracking.resolve_uri(cfg.tracking.uri)
    short = ["train.stages=[{steps: 1, ce_weight: 0.1, train: [slots, heads]}, {steps: 1}]"]
    none = apply_overrides(cfg, [*short, "thinking.targets=none", "train.run_name=pause"])
    assert not CoATModel(none).heads and CoATModel(none).parameter_counts()["heads"] == 0
    first = {}
    for control in ("none", "shuffled"):
        run = train(apply_overrides(cfg, [*short, f"thinking.targets={control}", f"train.run_name={control}"]),
                    evaluate_after=False)
        logged = mlflow.tracking.MlflowClient(uri).get_run(run.mlflow_run_id).data.metrics
        assert ("train/mel" in logged) == (control == "shuffled") and "val/ce" in logged
        first[control] = {key: tracking.metric_history(uri, run.mlflow_run_id, key)[0][1]
                          for key in ("train/ce", "train/mel") if key in logged}
    expected = {key: tracking.metric_history(uri, reference.mlflow_run_id, key)[0][1]
                for key in ("train/ce", "train/mel")}
    assert first["none"]["train/ce"] == pytest.approx(expected["train/ce"], rel=1e-6), "same slots, data and order"
    assert first["shuffled"]["train/ce"] == pytest.approx(expected["train/ce"], rel=1e-6)
    assert first["shuffled"]["train/mel"] != pytest.approx(expected["train/mel"], rel=1e-3), "another clip's targets"


def test_a_sweep_can_rank_by_validation_quality_never_by_test(uninterrupted):
    cfg, _ = uninterrupted
    uri = tracking.resolve_uri(cfg.tracking.uri)
    run = train(apply_overrides(cfg, ["train.stages=[{steps: 2}]", "train.checkpoint_every=1", "train.val_scores=true",
                                      "train.val_examples=5", "train.run_name=val-scores"]), evaluate_after=False)
    logged = mlflow.tracking.MlflowClient(uri).get_run(run.mlflow_run_id).data.metrics
    scores = sorted(k for k in logged if k.startswith("val/") and k.count("/") == 2)
    assert scores and all(k.endswith(("/accuracy", "/wer")) for k in scores) and not any(k.startswith("eval/")
                                                                                       for k in logged)
    assert [step for step, _ in tracking.metric_history(uri, run.mlflow_run_id, scores[0])] == [1, 2]
    with pytest.raises(ConfigError, match="sweep.metric.*test split"):
        apply_overrides(cfg, ["sweep.metric=eval/emotion/accuracy"])
    with pytest.raises(ConfigError, match="sweep.metric.*train.val_scores=true"):
        apply_overrides(cfg, ["sweep.metric=val/emotion/accuracy"])
    assert apply_overrides(cfg, ["sweep.metric=val/emotion/accuracy", "train.val_scores=true"])


def uninformed_mel_score(coat: CoATModel, stream) -> float:
    """The mse of predicting 0 for every slot's mel target over the whole stream."""
    targets = torch.cat([coat.slot_target("mel", batch, torch.device("cpu"))
                         for batch in iter_training_batches(stream.dataset(), coat, 8)])
    return distance("mse", torch.zeros_like(targets), targets).item()


def test_an_uninformed_slot_prediction_scores_about_one_for_frame_level_experts(uninterrupted):
    """Frames are standardised one by one, but a slot averages many: its target varies less, and predicting the
    mean scored well under 1. Standardised again per slot (the training split's statistics at the run's K), an
    uninformed prediction scores about 1 whatever K, as the loss weights assume (clip-level prosody is one vector a
    clip, already standardised where the loss sees it)."""
    cfg, _ = uninterrupted
    store = Path(cfg.data.store)
    for k in (1, 4):
        run = apply_overrides(cfg, [f"thinking.num_slots={k}"])
        train_stream = training_streams(run, Path(run.data.manifest), store)["train"]
        stats = target_statistics(run, train_stream, store)
        assert stats["mel"]["slots"]["k"] == k and "slots" not in stats["prosody"]
        # Kept in the store for the next run: what it reads back is what a store without it computes again.
        kept = list(store.glob("mel/*/stats/*.json"))
        assert stats["mel"]["slots"]["id"] in {path.stem for path in kept}
        for path in kept:
            path.unlink()
        assert target_statistics(run, train_stream, store) == stats
        coat = CoATModel(run)
        before = uninformed_mel_score(coat, train_stream)
        coat.standardise_slots(stats)
        after = uninformed_mel_score(coat, train_stream)
        assert after == pytest.approx(1, abs=0.02) and before < 0.8, (k, before, after)
    with pytest.raises(ValueError, match="computed at K=4, the model has K=1"):
        CoATModel(apply_overrides(cfg, ["thinking.num_slots=1"])).standardise_slots(stats)


def test_a_diverging_run_skips_non_finite_steps_then_stops_and_never_writes_a_non_finite_checkpoint(uninterrupted):
    cfg, _ = uninterrupted
    diverging = apply_overrides(cfg, ["train.lr=1e30", "train.warmup_steps=0", "train.max_nonfinite_steps=2",
                                      "train.stages=[{steps: 8}]", "train.checkpoint_every=1",
                                      "train.run_name=diverging"])
    with pytest.raises(NonFiniteTrainingError, match=r"training stopped at step \d+: .*not finite; 3 steps skipped"):
        train(diverging, evaluate_after=False)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    run_id = tracking.find_run(uri, tracking.get_or_create_experiment(uri, "coat"), "diverging")
    assert tracking.run_status(uri, run_id) == "FAILED"
    written = sorted((Path(cfg.train.storage) / "diverging").glob("checkpoint_*"))
    for checkpoint in written:
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / WEIGHTS_FILE).values()), checkpoint
    skipped = [v for _, v in tracking.metric_history(uri, run_id, "train/skipped")]
    assert skipped[0] == 0.0 and skipped.count(1.0) <= 2, "the skipped steps a checkpoint committed are logged"


def test_a_restart_knows_which_steps_went_to_mlflow_even_when_the_server_cannot_say(tmp_path):
    """Steps handed to MLflow (sent, or spooled through an outage) are recorded beside the run: a restart while the
    server is away must not log the steps it redoes a second time."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run = tracking.start_run(uri, "coat", "marker", load_config())
    log_committed_steps(run, json.dumps([[3, 1000, {"train/loss": 1.0}], [4, 2000, {"train/loss": 0.9}]]), tmp_path)
    assert steps_handed_to_mlflow(tmp_path) == 4 == tracking.last_logged_step(uri, run.run_id, "train/loss")
    log_committed_steps(run, json.dumps([[2, 500, {"train/loss": 1.1}]]), tmp_path)  # an older checkpoint
    assert steps_handed_to_mlflow(tmp_path) == 4
    (tmp_path / "logged_through").write_bytes(b"\xff")
    assert steps_handed_to_mlflow(tmp_path) == 0 and steps_handed_to_mlflow(tmp_path / "absent") == 0


def test_checkpoints_past_a_million_steps_keep_their_order(tmp_path):
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        (tmp_path / f"checkpoint_{step:06d}").mkdir()
    assert [p.name for p in committed_checkpoints(tmp_path)][-2:] == ["checkpoint_1000000", "checkpoint_1000001"]
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1000000", "checkpoint_1000001"]


def killable(cfg, tmp_path: Path, faults: str) -> tuple[list[str], dict, str]:
    """`coat train` of `cfg` in-process as run `killed`, with `COAT_TEST_SIGKILL_AT=faults`: its command,
    environment and the uri of its MLflow store."""
    killed = apply_overrides(cfg, ["train.num_workers=0", "train.run_name=killed", f"train.storage={tmp_path / 'runs'}",
                                   f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"])
    (tmp_path / "killed.yaml").write_text(to_yaml(killed))
    command = [str(Path(sys.executable).parent / "coat"), "train", "--config", str(tmp_path / "killed.yaml")]
    env = {**os.environ, "COAT_TEST_SIGKILL_AT": faults, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return command, env, tracking.resolve_uri(killed.tracking.uri)


def killed_runs(cfg, tmp_path: Path, faults: str, runs: int) -> tuple[list[int], str]:
    """`killable` run `runs` times: the exit codes and the uri of its MLflow store."""
    command, env, uri = killable(cfg, tmp_path, faults)
    done = [subprocess.run(command, env=env, capture_output=True, text=True, timeout=240) for _ in range(runs)]
    assert done[-1].returncode == 0, done[-1].stderr[-3000:]
    return [d.returncode for d in done], uri


def assert_resumed_like(uri: str, run_name: str, reference_uri: str, reference_run: str, steps: int | list[int]
                        ) -> str:
    """Every step (of `steps`, or 1..`steps`) logged once, with the losses of the uninterrupted reference run, which
    logged every step. Returns the run id."""
    steps = steps if isinstance(steps, list) else list(range(1, steps + 1))
    run_id = tracking.find_run(uri, tracking.get_or_create_experiment(uri, "coat"), run_name)
    losses = tracking.metric_history(uri, run_id, "train/loss")
    assert [s for s, _ in losses] == steps, "each logged step exactly once"
    expected = dict(tracking.metric_history(reference_uri, reference_run, "train/loss"))
    np.testing.assert_allclose([v for _, v in losses], [expected[s] for s in steps], rtol=1e-5)
    return run_id


def test_a_run_killed_mid_checkpoint_resumes_to_the_uninterrupted_losses(uninterrupted, tmp_path):
    """Killed in stage 2 while writing the step-6 checkpoint: the restart starts stage 2 again from stage 1's final
    checkpoint (step 4), with LoRA joining, the same data order and randomness; it logs each logged step once
    (here every third step, plus the checkpoints' with their validation) and evaluates where it trained. (The
    faults tier kills a run in stage 1, logging every step.)"""
    cfg, reference = uninterrupted
    codes, uri = killed_runs(apply_overrides(cfg, ["tracking.log_every=3"]), tmp_path, "checkpoint@6", runs=2)
    assert codes == [-signal.SIGKILL, 0]
    assert not list((tmp_path / "runs" / "killed").glob(".staging-*")), "the torn write is cleared"
    run_id = assert_resumed_like(uri, "killed", tracking.resolve_uri(cfg.tracking.uri), reference.mlflow_run_id,
                                 [2, 3, 4, 6, 8])
    assert steps_logged(uri, run_id, "val/ce") == [2, 4, 6, 8]
    curves = histories(uri, [run_id], "train/loss")
    assert curves["step"].tolist() == [2, 3, 4, 6, 8] and curves["value"].notna().all(), "what the notebooks read"

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


def cut_short(checkpoint: Path) -> None:
    weights = checkpoint / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def overwrite_a_block(checkpoint: Path) -> None:
    state = checkpoint / "training_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = bytes(16)
    state.write_bytes(bytes(data))


@pytest.mark.faults  # two `coat train` starts per damage, killed and resumed: 30 s each on 2 cores
@pytest.mark.parametrize("damage", [cut_short, overwrite_a_block])
def test_a_torn_newest_checkpoint_is_skipped_for_the_one_before(uninterrupted, tmp_path, damage):
    """Killed after step 7 (checkpoint 6 committed and logged); then checkpoint 6 is damaged on disk. The restart
    says it skips it and why, resumes from checkpoint 4, redoes steps 5 to 8 with the uninterrupted run's losses,
    and MLflow still holds every step once."""
    cfg, reference = uninterrupted
    command, env, uri = killable(cfg, tmp_path, "step@7")
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == -signal.SIGKILL
    runs = tmp_path / "runs" / "killed"
    damage(runs / "checkpoint_000006")
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {runs / 'checkpoint_000004'}: skipped {runs / 'checkpoint_000006'}" in again.stderr
    assert_resumed_like(uri, "killed", tracking.resolve_uri(cfg.tracking.uri), reference.mlflow_run_id, 8)
    assert verify_checkpoint(runs / "checkpoint_000008") is None


@pytest.mark.faults  # two Ray Train fits: two minutes on 2 cores
def test_ray_train_skips_a_torn_newest_checkpoint_for_the_one_before(tmp_path, coat_mini, monkeypatch):
    """Ray Train hands the restart its newest registered checkpoint; cut short on disk, the session finds the one
    before it in the run's storage and resumes from there."""
    monkeypatch.setenv("COAT_TEST_SIGKILL_AT", "step@5")
    cfg = train_config(tmp_path, coat_mini, "train.num_workers=1", "train.run_name=torn", "train.stages=[{steps: 6}]")
    with pytest.raises(Exception, match="(?i)fail"):  # the worker is killed and no restart is allowed
        train(cfg, evaluate_after=False)
    checkpoints = sorted(p for p in (tmp_path / "runs" / "torn").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    cut_short(checkpoints[-1])
    result = train(cfg, evaluate_after=False)
    assert result.metrics["step"] == 6
    assert steps_logged(tracking.resolve_uri(cfg.tracking.uri), result.mlflow_run_id) == [1, 2, 3, 4, 5, 6]


def test_a_run_whose_checkpoints_all_fail_is_refused_not_restarted(uninterrupted, tmp_path):
    _, result = uninterrupted
    root = tmp_path / "runs"
    shutil.copytree(result.checkpoint, root / "checkpoint_000008")
    (root / "checkpoint_000008" / "manifest.json").unlink()  # as a checkpoint written before manifests existed
    with pytest.raises(CheckpointError, match="no checkpoint of this run can be resumed from.*no manifest.json"):
        latest_checkpoint(root)


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["COAT_TEST_MARKER"]),))


def test_checkpoints_load_tensors_and_numbers_only(uninterrupted, tmp_path, monkeypatch):
    _, result = uninterrupted
    state = load_training_state(result.checkpoint)
    assert state["step"] == 8 and state["optimizer"]["state"] and isinstance(state["metrics"]["train/loss"], float)
    marker = tmp_path / "ran"
    monkeypatch.setenv("COAT_TEST_MARKER", str(marker))
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"step": 1, "payload": Payload()}, evil / "training_state.pt")
    with pytest.raises(CheckpointError, match=f"{evil / 'training_state.pt'} holds objects other than tensors"):
        load_training_state(evil)
    assert not marker.exists(), "the pickle's code did not run"


def test_a_full_disk_fails_the_save_naming_the_folder_and_keeps_the_last_checkpoint(uninterrupted, tmp_path):
    """A file-size limit makes the kernel refuse the write (EFBIG), as a full disk would (ENOSPC)."""
    cfg, result = uninterrupted
    root = tmp_path / "runs"
    shutil.copytree(result.checkpoint, root / "checkpoint_000008")
    coat = CoATModel.load(result.checkpoint)
    session = InProcessSession(root, keep=2, report_to_tune=False, run=None)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    try:
        with pytest.raises(CheckpointError, match=f"could not write checkpoint {root}/.staging-000010.*File too "
                                                  "large.*point train.storage"):
            with session.checkpoint_dir(10) as directory:
                save_checkpoint(directory, coat, coat.trained_state(), None, 10, 1, 0, {}, [], {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert [p.name for p in root.iterdir()] == ["checkpoint_000008"], "nothing torn is left behind"
    assert latest_checkpoint(root) == root / "checkpoint_000008"


def test_the_five_roles_train_in_two_stages_from_real_experts(tmp_path):
    """pitch, phonetic, affect (eGeMAPS), sound events (the tiny AST) and both reconstructions (log-mel, the
    backbone's own encoder): precomputed into the store, streamed, regressed; each loss logged every step.
    A coat-mini of its own, 12 clips: every expert runs on every clip."""
    manifest = synthesize(tmp_path / "mini", size=12, seed=5, workers=0)
    roles = train_config(tmp_path, manifest, "train.num_workers=0", "train.run_name=roles",
                         "experts.names=[pitch,phonetic,affect,sound-events,reconstruction,audio-encoder]",
                         "train.stages=[{steps: 2, ce_weight: 0.1, train: [slots, heads]}, {steps: 2}]")
    result = train(roles, evaluate_after=False)
    uri = tracking.resolve_uri(roles.tracking.uri)
    for name in ("pitch", "phonetic", "egemaps", "sound-events", "mel", "audio-encoder"):
        losses = [v for _, v in tracking.metric_history(uri, result.mlflow_run_id, f"train/{name}")]
        assert len(losses) == 4 and all(np.isfinite(losses)), name
    tags = mlflow.tracking.MlflowClient(uri).get_run(result.mlflow_run_id).data.tags
    assert tags["expert.audio-encoder.version"].startswith(build_expert("audio-encoder").version)
    assert "expert.sound-events.stats" not in tags, "probabilities are regressed as they are, not standardised"
    assert [v for _, v in tracking.metric_history(uri, result.mlflow_run_id, "train/stage")] == [0, 0, 1, 1]


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


@pytest.mark.faults  # a worker group killed and restarted: a minute on 2 cores
def test_two_ddp_workers_survive_a_kill_before_anything_is_committed(tmp_path, coat_mini, server, monkeypatch):
    """Rank 0 dies while writing the first checkpoint, so the restart redoes steps 1 and 2; metrics go to a real
    tracking server, from Ray Train's controller once each checkpoint is registered."""
    uri, _ = server
    monkeypatch.setenv("COAT_TEST_SIGKILL_AT", "checkpoint@2")
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
    monkeypatch.setenv("COAT_TEST_SIGKILL_AT", "step@1,checkpoint@4,reported@10")
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


@pytest.mark.faults  # a server killed and restarted under a `coat train`: 30 s on 2 cores
def test_a_run_rides_out_a_tracking_server_outage_and_logs_everything_once(uninterrupted, tmp_path):
    """A real server killed as soon as the run is open, and brought back (same port, same store) half-way
    through training: the run never stops; what it wrote meanwhile waited on disk and reached the server once."""
    cfg, _ = uninterrupted
    root, port = tmp_path / "server", free_port()
    root.mkdir()
    server = ("sqlite:///" + str(root / "db"), root, "--artifacts-destination", str(root / "art"))
    outage = contextlib.ExitStack()
    uri = outage.enter_context(mlflow_server(*server, port=port))
    run = apply_overrides(cfg, ["train.num_workers=0", "train.run_name=outage", f"train.storage={tmp_path / 'runs'}",
                                f"tracking.uri={uri}", "tracking.retry_s=1"])
    (tmp_path / "outage.yaml").write_text(to_yaml(run))
    spool = tmp_path / "runs" / "outage" / "mlflow-spool"
    command = [str(Path(sys.executable).parent / "coat"), "train", "--config", str(tmp_path / "outage.yaml")]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        run_id = wait_for(lambda: open_run(uri, "outage"), "the run to open")
        outage.close()  # the server goes away
        wait_for(lambda: (tmp_path / "runs" / "outage" / "checkpoint_000004").is_dir(), "training to go on")
        proc.send_signal(signal.SIGSTOP)  # held while the server restarts, so that it is back mid-run
        waiting = list(spool.glob("*.jsonl"))
        with mlflow_server(*server, port=port):
            proc.send_signal(signal.SIGCONT)
            assert proc.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
            assert waiting, "the steps trained while the server was away waited in the spool"
            assert not list(spool.glob("*.jsonl")), "and were replayed before the run ended"
            assert steps_logged(uri, run_id) == list(range(1, 9)), "every step once"
            assert steps_logged(uri, run_id, "val/ce") == [2, 4, 6, 8]
            client = mlflow.tracking.MlflowClient(uri)
            record = client.get_run(run_id)
            assert record.info.status == "FINISHED" and record.data.params["thinking.num_slots"] == "4"
            assert any(key.startswith("eval/") for key in record.data.metrics)
            assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "trained_parts", "eval"}
    finally:
        proc.kill()
        outage.close()
    output = (tmp_path / "train.log").read_text()
    assert "is unreachable" in output and "is back: replayed" in output


@pytest.mark.faults  # Ray Train's worker group: a minute on 2 cores
def test_ray_train_rides_out_an_outage_past_its_end_and_replays_at_the_next_start(tmp_path, coat_mini):
    """The server goes away once the run is open and is still away when training ends: the run ends normally
    (Ray Train's controller spools the step metrics), and the same command, once the server is back, replays
    what waited and trains nothing."""
    root, port = tmp_path / "server", free_port()
    root.mkdir()
    server = ("sqlite:///" + str(root / "db"), root, "--artifacts-destination", str(root / "art"))
    cfg = train_config(tmp_path, coat_mini, "train.num_workers=1", "train.run_name=away", "tracking.retry_s=1",
                       f"tracking.uri=http://127.0.0.1:{port}", "train.stages=[{steps: 4}]")
    spool = tmp_path / "runs" / "away" / "mlflow-spool"

    def kill_once_open(uri: str) -> None:
        with mlflow_server(*server, port=port):
            wait_for(lambda: open_run(uri, "away"), "the run to open")

    killer = threading.Thread(target=kill_once_open, args=(cfg.tracking.uri,))
    killer.start()
    wait_for_health(cfg.tracking.uri)
    first = train(cfg, evaluate_after=False)
    killer.join()
    assert first.metrics["step"] == 4 and list(spool.glob("*.jsonl")), "the run ended with writes waiting"
    with mlflow_server(*server, port=port) as uri:
        again = train(cfg, evaluate_after=False)
        assert again.mlflow_run_id == first.mlflow_run_id and not list(spool.glob("*.jsonl"))
        assert steps_logged(uri, first.mlflow_run_id) == [1, 2, 3, 4], "every step once"
        assert tracking.run_status(uri, first.mlflow_run_id) == "FINISHED"
        artifacts = mlflow.tracking.MlflowClient(uri).list_artifacts(first.mlflow_run_id, "trained_parts")
        assert "trained_parts/coat.safetensors" in {a.path for a in artifacts}


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
            optimizer = make_optimizer(coat, apply_overrides(coat.cfg, ["train.lr=0.01"]))
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
    optimizer = make_optimizer(coat, apply_overrides(coat.cfg, ["train.lr=0.01"]))
    for step in (1, 2):
        fsdp_step(coat, coat, optimizer, fsdp_batch(coat, clips, step))
        saved, expected = load_file(tmp_path / f"step{step}" / WEIGHTS_FILE), coat.trained_state()
        assert saved.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(saved[name], value, atol=1e-4, rtol=1e-4, msg=f"step {step}: {name}")


@pytest.mark.faults  # three in-process runs: ~40 s on 2 cores
def test_a_run_left_with_one_torn_checkpoint_is_refused_with_advice_that_works(tmp_path, coat_mini):
    """`train.keep_checkpoints=1`: the only checkpoint, damaged on disk after its commit, cannot be resumed from.
    The run is refused, not started again from step 0, and the message's fix (another `train.run_name`) trains
    afresh into a new MLflow run while the old one keeps the steps it logged."""
    cfg = train_config(tmp_path, coat_mini, "train.num_workers=0", "train.run_name=only", "train.keep_checkpoints=1",
                       "train.stages=[{steps: 4}]")
    first = train(cfg, evaluate_after=False)
    runs = tmp_path / "runs" / "only"
    assert [p.name for p in committed_checkpoints(runs)] == ["checkpoint_000004"], "one kept"
    cut_short(runs / "checkpoint_000004")
    refused = r"no checkpoint of this run can be resumed from: .*checkpoint_000004 \(coat.safetensors has .*"
    with pytest.raises(CheckpointError, match=refused + "another train.run_name.*new MLflow run") as err:
        train(cfg, evaluate_after=False)
    assert "move them aside" not in str(err.value)
    again = train(apply_overrides(cfg, ["train.run_name=only-again"]), evaluate_after=False)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    assert again.metrics["step"] == 4 and again.mlflow_run_id != first.mlflow_run_id
    assert steps_logged(uri, again.mlflow_run_id) == steps_logged(uri, first.mlflow_run_id) == [1, 2, 3, 4]


@contextlib.contextmanager
def tmpfs(folder: Path, kib: int):
    """A real tmpfs of `kib` KiB on `folder`, so that a storage fills up for real (ENOSPC). Skips the test where
    this process may not mount one (not root, or no CAP_SYS_ADMIN in a container)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up: {mounted.stderr.strip()} (needs root or CAP_SYS_ADMIN)")
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def resize_tmpfs(folder: Path, kib: int) -> None:
    """Grow the tmpfs on `folder` to `kib` KiB, keeping what it holds: the storage freed up."""
    subprocess.run(["mount", "-o", f"remount,size={kib}k", str(folder)], check=True, capture_output=True)


def stored_kib(checkpoint: Path) -> int:
    """What `checkpoint` takes on a tmpfs, which holds each file in whole 4 KiB pages."""
    return sum(-(-path.stat().st_size // 4096) * 4 for path in checkpoint.rglob("*") if path.is_file())


@pytest.mark.faults  # an in-process reference and two Ray Train fits: a minute and a half on 2 cores
def test_ray_train_upload_to_a_full_storage_fails_naming_it_and_resumes_from_the_checkpoint_before(tmp_path,
                                                                                                  coat_mini):
    """The storage holds one checkpoint and a half (`train.keep_checkpoints=1`), so Ray Train's copy of the second
    into it runs out of space half-way: the run fails with coat's error naming the run's storage folder and the fix,
    not the worker's staging folder; the torn copy is gone and the first checkpoint, the only one, is intact. With
    space freed, the same command resumes from it to an uninterrupted run's losses; that last checkpoint, damaged
    later, is refused with the advice that holds under Ray Train."""
    common = ["train.stages=[{steps: 6}]"]
    (tmp_path / "plain").mkdir()
    plain = train(train_config(tmp_path / "plain", coat_mini, *common, "train.num_workers=0", "train.run_name=plain"),
                  evaluate_after=False)
    size = stored_kib(plain.checkpoint)
    storage = tmp_path / "storage"
    cfg = train_config(tmp_path, coat_mini, *common, "train.num_workers=1", "train.run_name=full",
                       "train.keep_checkpoints=1", f"train.storage={storage}")
    runs = storage / "full"
    with tmpfs(storage, size + size // 2):
        full = f"could not write checkpoint {re.escape(str(runs))}/checkpoint_[^ ]*: No space left on device; free "
        with pytest.raises(CheckpointError, match=full + "space there or point train.storage") as err:
            train(cfg, evaluate_after=False)
        assert isinstance(err.value.__cause__, ray.train.WorkerGroupError), "raised by the worker, said by coat"
        (only,) = committed_checkpoints(runs)
        assert verify_checkpoint(only) is None and load_training_state(only)["step"] == 2
        uri = tracking.resolve_uri(cfg.tracking.uri)
        run_id = tracking.find_run(uri, tracking.get_or_create_experiment(uri, "coat"), "full")
        assert steps_logged(uri, run_id) == [1, 2], "the steps of the committed checkpoint only"
        resize_tmpfs(storage, 4 * size)
        result = train(cfg, evaluate_after=False)
        assert result.metrics["step"] == 6 and len(committed_checkpoints(runs)) == 1
        assert_resumed_like(uri, "full", tracking.resolve_uri(train_config(tmp_path / "plain", coat_mini).tracking.uri),
                            plain.mlflow_run_id, 6)
        cut_short(result.checkpoint)
        with pytest.raises(CheckpointError, match="another train.run_name.*new MLflow run"):
            train(cfg, evaluate_after=False)
