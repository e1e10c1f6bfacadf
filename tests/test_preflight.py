"""`coat preflight` on the embedded default: every check passes on a real local Ray, MLflow store and tiny model,
each kind of trouble fails with its name and fix, the step times it measured are stored where a dry run bills
with them, and the largest batch that fits a card follows from two measured peaks."""

import json
from pathlib import Path

import pytest

from coat import tracking
from coat.cli import main
from coat.config import load_config
from coat.data.precompute import precompute
from coat.preflight import HEADROOM, Report, batch_summary, check_data, largest_batch, memory_batches
from coat.report import print_preflight_report
from coat.tune import cost
from coat.tune.space import load_space
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


def test_every_check_passes_on_the_embedded_default_and_the_step_is_measured(tmp_path, coat_mini, capsys,
                                                                            monkeypatch):
    precompute(coat_mini, ["mel"], tmp_path / "store", crop_seconds=2, progress=False)  # the other tests' store
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"                                          # keeps one mel version
    space = tmp_path / "space.yaml"
    space.write_text("thinking.num_slots: {grid: [0, 8]}\n")
    monkeypatch.delenv("COAT_STORAGE", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # the printed report's rows unwrapped
    overrides = [f"data.manifest={coat_mini}", f"data.store={tmp_path / 'store'}", "experts.names=[mel]",
                 "train.batch_size=2", "data.max_seconds=2", f"tracking.uri={uri}", "tracking.experiment=preflight",
                 f"train.storage={tmp_path / 'runs'}"]
    out, _ = run_ok(["preflight", "--config", TINY, "--json", "--space", str(space), *overrides], capsys)
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
    assert m["memory"] is None and m["gpu"] is None  # on CPU there is no card to fit a batch to
    assert [t["num_slots"] for t in m["step_times"]] == [0, 8] and all(t["step_s"] > 0 for t in m["step_times"])
    assert m["step_times"][1]["tokens_per_example"] - m["step_times"][0]["tokens_per_example"] == 8 + 2
    # Stored under train.storage, keyed by the setting, where a dry run of this config and space bills with them.
    assert report["stored"] == str(tmp_path / "runs" / cost.STORE)
    cfg = load_config(TINY, overrides)
    bill = cost.estimate(cfg, load_space(space, cfg), cost.load_records(Path(report["stored"])))
    assert [(r.step.kind, r.step.seconds) for r in bill.rows] == [("measured", t["step_s"]) for t in m["step_times"]]
    assert "preflight " in bill.rows[0].step.source and ", cpu" in bill.rows[0].step.source
    print_preflight_report(Report(measurements=report["measurements"], stored=report["stored"]))
    printed = capsys.readouterr().out
    assert "on CPU there is no GPU card: no peak memory, no largest batch" in printed
    assert any(line.startswith("│ largest batch (10% of the card free)") and line.rstrip("│ ").endswith("-")
               for line in printed.splitlines()), printed
    assert f"step times stored in {report['stored']}" in " ".join(printed.split())
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


def test_the_largest_batch_follows_from_two_measured_peaks_with_headroom():
    assert memory_batches(8) == (4, 8) and memory_batches(3) == (1, 3) and memory_batches(1) == (1, 2)
    # 10 GB fixed + 5 GB per clip on a 141 GB card: 126.9 GB usable holds (126.9 - 10) / 5 = 23.4 clips
    fit = largest_batch([(4, 30.0), (8, 50.0)], 141.0)
    assert (fit["fixed_gb"], fit["per_sample_gb"], fit["largest_batch"]) == (pytest.approx(10.0), pytest.approx(5.0),
                                                                             23)
    assert HEADROOM == 0.10 and largest_batch([(4, 30.0), (8, 50.0)], 141.0, headroom=0.0)["largest_batch"] == 26
    assert batch_summary(fit) == "23 (10.0 GB + 5.00 GB per clip of 141 GB)"
    assert largest_batch([(1, 90.0), (2, 120.0)], 80.0)["largest_batch"] == 0  # not even one clip fits
    short = largest_batch([(4, 70.0), (8, None)], 80.0)  # the larger batch ran out of memory
    assert (short["largest_batch"], short["note"]) == (4, "batch 8 ran out of memory")
    tight = largest_batch([(4, 75.0), (8, None)], 80.0)  # batch 4 fit, but with 5 GB of 80 free
    assert (tight["largest_batch"], tight["note"]) == (
        0, "batch 8 ran out of memory; batch 4 fit with less than 10% of the card free")
    flat = largest_batch([(1, 20.0), (2, 20.0)], 80.0)
    assert flat["largest_batch"] is None and "did not grow" in flat["note"] and batch_summary(flat).startswith("- (")
    assert batch_summary(None) == "-"
