"""The experiment scripts end to end on the embedded default (`--smoke`), as a user runs them."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["ablate_thinking_len", "ablate_loss_weights", "ablate_expert_sets", "compare_backbones"]


def run_script(name: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The script in a subprocess, stopped before the test's own 900 s timeout would stop the test."""
    return subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=840, env={**os.environ, "COLUMNS": "250"})


def sweep_children(cwd: Path) -> tuple[object, list]:
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, "tags.`coat.kind` = 'sweep'")
    children = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, children


def test_ablate_thinking_len_smoke_runs_the_whole_job(tmp_path):
    done = run_script("ablate_thinking_len", tmp_path, "--smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sweep ablate_thinking_len-smoke: 3 trials" in done.stdout
    printed = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr).splitlines()
    from_trials = [line.split(")", 1)[1] for line in printed if line.startswith("(func pid=")]
    assert all(line.strip() for line in from_trials), "a trial printed an empty line"
    assert "Traceback" not in "\n".join(printed)
    assert "thinking.num_slots=0" in done.stdout and "thinking.targets=none" in done.stdout
    assert (tmp_path / "data" / "coat-mini-smoke" / "manifest.jsonl").is_file(), "coat-mini generated on first use"
    parent, children = sweep_children(tmp_path)
    assert sorted((c.data.params["thinking.num_slots"], c.data.params["thinking.targets"]) for c in children) == [
        ("0", "experts"), ("4", "experts"), ("4", "none")]
    for child in children:  # Tune's trial table names each trial by its whole label, as the dashboard does
        trial_id = child.data.tags["coat.run_name"].rsplit("-", 1)[1]
        assert any(line.startswith(f"│ {child.info.run_name} ({trial_id})") for line in printed), child.info.run_name
    assert {c.info.status for c in children} == {"FINISHED"} and parent.info.status == "FINISHED"
    assert any(key.startswith("eval/") for key in children[0].data.metrics)
    notebook = tmp_path / "analysis-out" / "ablate_thinking_len-smoke" / "thinking_length"
    assert (notebook / "thinking_length.ipynb").is_file() and (notebook / "quality_vs_k.png").is_file()
    concluded = done.stdout.split("executed notebook:")[1]
    assert "K=0" in concluded and "at K=4: coat vs K=0" in concluded and "coat vs none" in concluded
    assert "What explains it:" in concluded and "Holm" in concluded
    html = [a.path for a in MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").list_artifacts(
        parent.info.run_id, "analysis/thinking_length") if a.path.endswith(".html")]
    assert html == ["analysis/thinking_length/thinking_length.html"], "the dashboard shows the notebook inline"
    assert "quality_vs_k" in (notebook / "thinking_length.html").read_text() or "<img" in (
        notebook / "thinking_length.html").read_text()
    analyzed = subprocess.run([str(Path(sys.executable).parent / "coat"), "analyze", "--notebook-dir",
                               str(ROOT / "analysis")], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "COLUMNS": "250"})
    assert analyzed.returncode == 0, analyzed.stdout[-3000:] + analyzed.stderr[-3000:]
    skipped = {line.split(":")[0]: line for line in analyzed.stdout.splitlines() if ": skipped, " in line}
    assert set(skipped) == {"loss_weights", "expert_sets", "probes"}, analyzed.stdout
    assert "experiments/ablate_loss_weights.py" in skipped["loss_weights"] and "coat probe" in skipped["probes"]
    assert "Traceback" not in analyzed.stdout + analyzed.stderr and "AssertionError" not in analyzed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS[1:])
def test_other_experiments_smoke(tmp_path, name):
    done = run_script(name, tmp_path, "--smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    _, children = sweep_children(tmp_path)
    statuses = {c.info.status for c in children}  # KILLED: stopped early by ASHA (ablate_loss_weights)
    assert "FINISHED" in statuses and statuses <= {"FINISHED", "KILLED"}


def test_bad_override_fails_before_any_compute(tmp_path):
    done = run_script("ablate_thinking_len", tmp_path, "--smoke", "--", "thinking.num_slot=3")
    assert done.returncode != 0 and "thinking.num_slot" in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlruns.db").exists()
