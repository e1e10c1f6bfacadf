"""The bill a dry run prints (`coat.tune.cost`): ASHA's rungs as Ray places them, the expected steps under them,
measurements matched to each trial's setting and never another's in silence, and the real thinking-length script's
`--dry-run` billing its smoke sweep from a stored measurement, from `--step-s`, or saying how to get one."""

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from coat.config import load_config
from coat.tune import cost
from coat.tune.space import load_space

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "ablate_thinking_len.yaml"
SMOKE_SPACE = ROOT / "experiments" / "configs" / "spaces" / "ablate_thinking_len.smoke.yaml"
ON_GPUS = ["train.use_gpu=true", "train.num_workers=2"]  # two GPUs per trial: a bill with GPUs in it


def smoke_config(*extra: str):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        from runner import smoke_overrides
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    return load_config(CONFIG, [*smoke_overrides(), *extra])


def measurement(cfg, step_times: dict[int, float], *, tokens: int = 100, gpu: str = "NVIDIA H200", **changed):
    """What preflight's model check returns, for `cfg` on CUDA, with these step times per K."""
    key = cost.setting_key(cfg, "cuda")
    return {**{k: v for k, v in key.items() if k != "num_slots"}, "gpu": gpu, "host": "node-1", "peak_gpu_gb": 40.0,
            "memory": {"largest_batch": 12}, **changed,
            "step_times": [{"num_slots": k, "step_s": s, "tokens_per_example": tokens + cost.block_tokens(k)}
                           for k, s in step_times.items()]}


def dry_run(cwd: Path, *args: str, script: str = "ablate_thinking_len") -> subprocess.CompletedProcess:
    """The experiment script's dry run in a subprocess, outside any cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "COAT_STORAGE")}
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{script}.py"), "--smoke", "--dry-run", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120, env={**env, "COLUMNS": "250"})
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize(("total", "grace", "rf"), [(400, 20, 3), (6, 3, 3), (300, 20, 2), (80, 20, 4), (8, 1, 3),
                                                    (17, 2, 3), (5000, 20, 3)])
def test_the_rungs_are_where_ray_puts_them(total, grace, rf):
    from ray.tune.schedulers.async_hyperband import _Bracket

    cfg = load_config(overrides=[f"train.stages=[{{steps: {total}}}]", f"sweep.grace_steps={grace}",
                                 f"sweep.reduction_factor={rf}"])
    ray_rungs = sorted(milestone for milestone, _ in _Bracket(grace, total + 1, rf, 0)._rungs)
    assert cost.asha_for(cfg).rungs == ray_rungs


def test_asha_decides_at_the_reports_and_the_expected_steps_follow_its_proportions():
    cfg = load_config(overrides=["train.stages=[{steps: 100}, {steps: 200}]", "train.checkpoint_every=50",
                                 "sweep.grace_steps=20", "sweep.reduction_factor=3"])
    asha = cost.asha_for(cfg)
    assert asha.rungs == [20, 60, 180] and cost.report_steps(cfg) == [50, 100, 150, 200, 250, 300]
    assert asha.decisions == [50, 100, 200]  # rung 20 at the report of 50, 60 at 100, 180 at 200
    # 2/3 stop at 50, 2/9 at 100, 2/27 at 200, 1/27 train all 300
    assert asha.expected_steps == pytest.approx(2 / 3 * 50 + 2 / 9 * 100 + 2 / 27 * 200 + 300 / 27)
    # Two rungs passed between reports are decided at successive reports; one at the last step saves nothing.
    assert cost.decision_steps([20, 40], [50, 100]) == [50, 100]
    assert cost.expected_steps([50, 100], 100, 2) == pytest.approx(0.5 * 50 + 0.5 * 100)


def test_a_trial_gets_its_own_settings_measurement_or_a_named_difference():
    cfg = smoke_config(*ON_GPUS)
    old = cost.records_of(measurement(cfg, {4: 2.0}), datetime(2025, 1, 1, tzinfo=UTC))
    new = cost.records_of(measurement(cfg, {4: 1.5}, gpu="NVIDIA H100"), datetime(2025, 2, 1, tzinfo=UTC))
    key = cost.setting_key(cfg)
    at_4 = cost.step_time(old + new, {**key, "num_slots": 4})
    assert (at_4.seconds, at_4.kind) == (1.5, "measured") and "NVIDIA H100" in at_4.source  # the newest
    at_16 = cost.step_time(new, {**key, "num_slots": 16})  # 100 + 6 tokens at K=4, 100 + 18 at K=16
    assert (at_16.seconds, at_16.kind) == (pytest.approx(1.5 * 118 / 106), "scaled")
    assert "scaled from K=4 by tokens 106 -> 118" in at_16.source
    other = cost.records_of(measurement(cfg, {4: 1.5}, batch_size=8, clip_s=30.0))
    missing = cost.step_time(other, {**key, "num_slots": 4})
    assert missing.seconds is None and missing.kind == "missing"
    assert missing.source == ("measured only for train.batch_size=8 (this trial: 4), data.max_seconds=30.0 "
                              f"(this trial: {cfg.data.max_seconds})")
    on_cpu = cost.step_time(new, {**key, "num_slots": 4, "device": "cpu"})
    assert on_cpu.source == "measured only for train.use_gpu=true (this trial: false)"


def test_stored_measurements_replace_their_own_setting_and_a_bad_file_is_named(tmp_path):
    cfg = smoke_config(*ON_GPUS)
    path = tmp_path / "preflight" / "measurements.json"
    cost.save_records(path, cost.records_of(measurement(cfg, {0: 1.0, 4: 2.0})))
    cost.save_records(path, cost.records_of(measurement(cfg, {4: 3.0})))  # measured again
    cost.save_records(path, cost.records_of(measurement(cfg, {4: 5.0}, gpu="NVIDIA A100")))  # another card
    stored = sorted((r["key"]["num_slots"], r["gpu"], r["step_s"]) for r in cost.load_records(path))
    assert stored == [(0, "NVIDIA H200", 1.0), (4, "NVIDIA A100", 5.0), (4, "NVIDIA H200", 3.0)]
    path.write_text("{not json")
    with pytest.raises(cost.MeasurementsError, match=f"{path} is not a preflight measurements file.*coat preflight"):
        cost.load_records(path)


def test_wall_time_fills_the_free_slots_in_order_and_concurrency_follows_the_gpus():
    assert cost.makespan([6.0, 9.0, 9.0], 2) == 15.0 and cost.makespan([6.0, 9.0, 9.0], 1) == 24.0
    cfg = smoke_config(*ON_GPUS)
    assert cost.concurrency(cfg, gpus=5, cpus=2) == 2
    capped = smoke_config(*ON_GPUS, "sweep.max_concurrent=1")
    assert cost.concurrency(capped, gpus=8, cpus=2) == 1
    assert cost.concurrency(smoke_config(), gpus=1, cpus=8) == 8  # in-process CPU trials: 0.5 CPU each, half kept
    assert [cost.duration(s) for s in (18, 45 * 60, 3 * 3600 + 12 * 60, 50 * 3600)] == [
        "18 s", "45 min", "3 h 12 min", "2 d 2 h"]


def test_the_smoke_dry_run_bills_each_trial_at_its_stored_step_time(tmp_path):
    cfg = smoke_config(*ON_GPUS)
    step = {0: 1.0, 4: 1.5}
    cost.save_records(tmp_path / "runs" / cost.STORE, cost.records_of(measurement(cfg, step)))
    done = dry_run(tmp_path, "--gpus", "4", "--json", "--", *ON_GPUS)
    bill = json.loads(done.stdout)
    steps = cfg.train.total_steps
    ks = [point["thinking.num_slots"] for point in load_space(SMOKE_SPACE).grid()]
    assert (bill["trials"], bill["search"], len(ks)) == (3, "grid", 3)
    assert [(r["steps"], r["gpus"], r["step"]["seconds"], r["step"]["kind"]) for r in bill["rows"]] == [
        (steps, 2, step[k], "measured") for k in ks]
    assert bill["gpu_hours"] == pytest.approx(sum(step[k] * steps * 2 for k in ks) / 3600)
    assert bill["concurrency"] == 2  # 4 GPUs, 2 per trial
    assert bill["wall_s"] == pytest.approx(1.0 * steps + 1.5 * steps)  # K=4 twice: the second after K=0 ends
    assert bill["asha"] is None and bill["missing"] is None
    table = dry_run(tmp_path, "--gpus", "4", "--", *ON_GPUS).stdout
    assert table.startswith(f"config: {CONFIG}\nspace: {SMOKE_SPACE}\ntrials: 3 (grid)\n")
    assert "preflight " in table and "NVIDIA H200" in table and "wall time on 4 GPU(s) (--gpus), 2 trial(s)" in table
    assert f"{cost.hours(bill['gpu_hours'])} " in table and "coat.tune.sweep uses no early stopping on grids" in table


def test_the_dry_run_takes_step_s_and_without_any_measurement_says_how_to_get_one(tmp_path):
    given = json.loads(dry_run(tmp_path, "--step-s", "2.5", "--json", "--", *ON_GPUS).stdout)
    steps = smoke_config(*ON_GPUS).train.total_steps
    assert {r["step"]["source"] for r in given["rows"]} == {"--step-s"}
    assert given["gpu_hours"] == pytest.approx(3 * 2.5 * steps * 2 / 3600)
    assert given["wall_s"] == pytest.approx(3 * 2.5 * steps) and given["gpus_from"] == "default; --gpus N"
    none = dry_run(tmp_path, "--json", "--", *ON_GPUS)
    bill = json.loads(none.stdout)
    assert bill["gpu_hours"] is None and {r["step"]["source"] for r in bill["rows"]} == {"no preflight measurement"}
    assert f"coat preflight --config {CONFIG} --space {SMOKE_SPACE}" in bill["missing"]
    assert "train.batch_size=4" in bill["missing"] and "--step-s SECONDS" in bill["missing"]
    assert str(Path("runs") / cost.STORE) in bill["missing"]


def test_a_measurement_of_another_setting_is_named_not_used_and_another_k_is_scaled(tmp_path):
    cfg = smoke_config(*ON_GPUS)
    store = tmp_path / "runs" / cost.STORE
    cost.save_records(store, cost.records_of(measurement(cfg, {0: 1.0, 4: 1.5}, batch_size=8)))
    bill = json.loads(dry_run(tmp_path, "--json", "--", *ON_GPUS).stdout)
    assert bill["gpu_hours"] is None and bill["missing"]
    assert {r["step"]["source"] for r in bill["rows"]} == {"measured only for train.batch_size=8 (this trial: 4)"}
    cost.save_records(store, cost.records_of(measurement(cfg, {4: 1.5})))  # this setting, at K=4 only
    rows = json.loads(dry_run(tmp_path, "--json", "--", *ON_GPUS).stdout)["rows"]
    assert [r["step"]["kind"] for r in rows] == ["scaled", "measured", "measured"]
    assert rows[0]["step"]["seconds"] == pytest.approx(1.5 * 100 / 106)  # K=0 drops the block's 6 tokens


def test_a_sampled_sweep_states_ashas_saving_as_an_estimate_beside_the_full_bill(tmp_path):
    done = dry_run(tmp_path, "--step-s", "1", "--gpus", "2", "--json", "--", "train.use_gpu=true",
                   "train.num_workers=1", script="ablate_loss_weights")
    bill = json.loads(done.stdout)
    # smoke: 6 steps, reports at 3 and 6, grace 3, factor 3: one rung at 3; 2/3 stop there, 1/3 train all 6
    assert bill["search"] == "optuna" and bill["trials"] == 2
    assert bill["asha"]["rungs"] == [3] and bill["asha"]["expected_steps"] == pytest.approx(4.0)
    assert bill["gpu_hours"] == pytest.approx(2 * 6 / 3600)
    assert bill["asha"]["gpu_hours"] == pytest.approx(2 * 4 / 3600)
    assert any(note.startswith("ASHA (estimate)") for note in bill["notes"])


def test_a_sampled_space_that_varies_a_trials_gpus_is_billed_as_its_costliest_value_and_says_so(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("train.num_workers: {choice: [1, 4]}\ntrain.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    cfg = load_config(overrides=["train.use_gpu=true", "sweep.num_samples=6"])
    bill = cost.estimate(cfg, load_space(space_file, cfg), [], step_s=1.0, gpus=8)
    (row,) = bill.rows
    assert row.gpus == 4 and "billed at the most steps" in row.setting and "an upper bound" in row.setting
    assert row.gpu_hours * row.trials == pytest.approx(6 * cfg.train.total_steps * 4 / 3600)


def test_a_measured_bill_says_that_stages_freezing_more_are_billed_at_the_last_stages_step(tmp_path):
    cfg = load_config(overrides=["train.use_gpu=true"])
    assert len({tuple(stage.train) for stage in cfg.train.stages}) > 1, "the default stages train different parts"
    space_file = tmp_path / "space.yaml"
    space_file.write_text("thinking.num_slots: {grid: [4]}\n")
    stage_note = "every stage's steps are billed at it"
    measured = cost.estimate(cfg, load_space(space_file, cfg), [])
    assert any(stage_note in note for note in measured.notes)
    one_stage = load_config(overrides=["train.use_gpu=true", "train.stages=[{steps: 10}]"])
    assert not any(stage_note in note for note in cost.estimate(one_stage, load_space(space_file, one_stage), []).notes)
