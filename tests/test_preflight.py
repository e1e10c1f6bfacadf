"""`coat preflight` on the embedded default: every check passes on a real local Ray, MLflow store and tiny model,
and each kind of trouble fails with its name and fix."""

import json
from pathlib import Path

import pytest

from coat import tracking
from coat.cli import main
from coat.config import load_config
from coat.data.precompute import precompute
from coat.preflight import check_data
from tests.conftest import free_port

TINY = str(Path(__file__).parents[1] / "experiments" / "configs" / "train_tiny.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main([*argv])
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def run_ok(argv: list[str], capsys) -> tuple[str, str]:
    code, out, err = run(argv, capsys)
    assert code == 0, out + err
    return out, err


def test_every_check_passes_on_the_embedded_default_and_the_step_is_measured(tmp_path, coat_mini, capsys):
    precompute(coat_mini, ["mel"], tmp_path / "store", crop_seconds=2, progress=False)  # the other tests' store
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"                                          # keeps one mel version
    out, _ = run_ok(["preflight", "--config", TINY, "--json", f"data.manifest={coat_mini}",
                     f"data.store={tmp_path / 'store'}", "experts.names=[mel]", "train.batch_size=2",
                     "data.max_seconds=2", f"tracking.uri={uri}", "tracking.experiment=preflight"], capsys)
    report = json.loads(out)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] and {c["status"] for c in checks.values()} == {"ok"}, checks
    assert list(checks) == ["ray", "workers", "weights[qwen2-audio]", "data", "mlflow", "model[qwen2-audio]"]
    assert checks["workers"]["detail"].startswith("2 workers on 1 host(s), gloo all-reduce")
    assert "features of mel" in checks["data"]["detail"]
    [m] = report["measurements"]
    assert (m["backbone"], m["size"], m["device"], m["batch_size"], m["num_slots"]) == ("qwen2-audio", "tiny", "cpu",
                                                                                         2, 8)
    assert m["step_s"] > 0 and m["tokens_per_s"] > 0 and m["prefill_s"] > 0 and m["prefill_s_k0"] > 0
    assert m["prefill_ratio"] == pytest.approx(m["prefill_s"] / m["prefill_s_k0"])
    assert m["checkpoint_round_trip"] and m["generated_tokens"] == 4 and m["peak_gpu_gb"] is None
    # The throwaway run is gone from the dashboard: deleted, none left active.
    client = tracking.mlflow_client(uri)
    experiment = client.get_experiment_by_name("preflight").experiment_id
    assert client.search_runs([experiment]) == []
    assert [r.info.run_name for r in client.search_runs([experiment], run_view_type=2)] == ["preflight"]


def test_each_failure_is_named_with_its_fix_and_what_depends_on_it_is_skipped(tmp_path, coat_mini, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("backbone.name: {grid: [qwen2-audio, audio-flamingo-3]}\n")
    port = free_port()
    code, out, err = run([
        "preflight", "--config", TINY, "--space", str(space), "train.num_workers=64", "backbone.size=real",
        f"data.manifest={coat_mini}", f"data.store={tmp_path / 'empty-store'}", "experts.names=[mel]",
        f"tracking.uri=http://127.0.0.1:{port}"], capsys)
    assert code == 1
    failures = {line.split(": ", 2)[1]: line for line in err.splitlines() if line.startswith("preflight: ")}
    assert sorted(failures) == ["data", "mlflow", "ray", "weights[audio-flamingo-3]", "weights[qwen2-audio]"]
    assert "short of CPU" in failures["ray"] and "lower train.num_workers=64" in failures["ray"]
    assert "backbone.checkpoints.audio-flamingo-3=DIR" in failures["weights[audio-flamingo-3]"]
    assert "--random-weights" in failures["weights[qwen2-audio]"]
    assert "store" in failures["data"] and "coat experts precompute" in failures["data"]
    assert f"http://127.0.0.1:{port}" in failures["mlflow"] and "not reachable" in failures["mlflow"]
    for skipped in ("workers", "model[qwen2-audio]", "model[audio-flamingo-3]"):
        assert any(line.startswith(f"│ {skipped}") and "skip" in line for line in out.splitlines()), out


def test_data_check_names_a_missing_manifest_and_a_split_without_rows(tmp_path, coat_mini):
    missing = check_data(load_config(overrides=[f"data.manifest={tmp_path}/none/manifest.jsonl",
                                                "data.synth_size=0"]))
    assert (missing.status, "does not exist" in missing.detail, "coat data import" in missing.fix) == (
        "fail", True, True)
    generated = check_data(load_config(overrides=[f"data.manifest={tmp_path}/new/manifest.jsonl"]))
    assert generated.status == "ok" and "generates coat-mini there" in generated.detail
    rows = [json.loads(line) for line in coat_mini.read_text().splitlines()]
    no_val = tmp_path / "no-val.jsonl"
    no_val.write_text("".join(json.dumps(r | {"audio": str(coat_mini.parent / r["audio"])}) + "\n"
                              for r in rows if r["split"] != "val"))
    check = check_data(load_config(overrides=[f"data.manifest={no_val}", f"data.store={tmp_path / 'store'}"]))
    assert (check.status, check.detail) == ("fail", f"{no_val}: no usable rows in split(s) val")
