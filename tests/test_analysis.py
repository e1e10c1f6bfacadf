"""The analysis layer: MLflow runs as tables, comparisons over seeds and against a reference, and every notebook in
analysis/ executed headless against a real MLflow store that real sweeps wrote (the session's `sweeps`)."""

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import typer
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from coat.analysis import compare, runs
from coat.analysis.notebooks import NOTEBOOKS, EmptyFigureError, outputs
from coat.cli import analyze_command, probe_command
from coat.eval.scoring import paired_comparison
from coat.train.checkpoint import latest_checkpoint

matplotlib.use("Agg")


def test_a_sweep_reads_as_one_row_per_child_with_params_and_final_metrics(sweeps):
    uri, grid = sweeps["uri"], sweeps["grid"]
    parent, trials = runs.find_sweep(uri, "coat", varying=("experts.names",))
    assert parent["run_id"] == grid.parent_run_id and len(trials) == 4
    assert sorted(runs.varied(trials)) == ["experts.names", "thinking.num_slots"]
    assert sorted(map(tuple, trials["experts.names"])) == [("mel",), ("mel",), ("mel", "prosody"), ("mel", "prosody")]
    assert trials["thinking.num_slots"].dtype.kind == "i" and (trials["parent_run_id"] == parent["run_id"]).all()
    client = MlflowClient(uri)
    key = next(c for c in trials.columns if c.startswith("eval/") and c.endswith("/accuracy"))
    for _, row in trials.iterrows():
        logged = client.get_run(row["run_id"]).data.metrics
        assert row[key] == logged[key]
        assert row["val/ce"] == runs.histories(uri, [row["run_id"]], "val/ce")["value"].iloc[-1]
        assert row["time/train_s"] > row["train/since_launch_s"] > 0 and row["time/eval_s"] > 0
    assert runs.find_sweep(uri, "coat", multi_objective=True)[0]["run_id"] == sweeps["pareto"].parent_run_id
    assert runs.find_sweep(uri, "coat", varying=("backbone.name",)) is None
    examples = runs.predictions(uri, trials["run_id"].iloc[0])
    assert {"id", "task", "answer", "prediction", "correct"} <= set(examples.columns) and len(examples) == 4


def test_each_setting_is_paired_with_its_reference_run_of_the_same_other_fields(sweeps):
    uri = sweeps["uri"]
    _, trials = runs.find_sweep(uri, "coat", sweep="k")
    paired = compare.paired_against(uri, trials, "thinking.num_slots", 0)
    assert set(paired["thinking.num_slots"]) == {4}
    # The pooled pairs are exactly each K=4 run against the K=0 run of its own expert set.
    mine, theirs = [], []
    for names in (("mel",), ("mel", "prosody")):
        rows = trials[trials["experts.names"].map(tuple) == names]
        for k, into in ((4, mine), (0, theirs)):
            run = rows[rows["thinking.num_slots"] == k].iloc[0]
            into.append(runs.predictions(uri, run["run_id"]).assign(id=lambda d, n=names: "+".join(n) + ":" + d["id"]))
    expected = paired_comparison(pd.concat(mine), pd.concat(theirs), n=100).set_index("task")
    got = paired.set_index("task")
    order_free = ["metric", "a", "b", "diff", "p_mcnemar", "n_pairs", "a_only_correct", "b_only_correct"]
    pd.testing.assert_frame_equal(got[order_free], expected[order_free], check_dtype=False)
    assert (got["n_pairs"] > 0).all() and (got["seeds"] == 1).all()


def test_scores_over_seeds_get_a_t_interval_and_one_seed_its_own_bootstrap():
    children = pd.DataFrame({
        "status": ["FINISHED"] * 4, "thinking.num_slots": [0, 4, 4, 4], "train.seed": [0, 0, 1, 2],
        "eval/emotion/accuracy": [0.5, 0.6, 0.7, 0.8], "eval/emotion/accuracy_ci_low": [0.3, 0, 0, 0],
        "eval/emotion/accuracy_ci_high": [0.7, 1, 1, 1]})
    table = compare.by_setting(children, ["thinking.num_slots"], ["eval/emotion/accuracy"]).set_index(
        "thinking.num_slots")
    assert (table.loc[0, "mean"], table.loc[0, "ci_low"], table.loc[0, "ci_high"], table.loc[0, "seeds"]) == (
        0.5, 0.3, 0.7, 1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
    assert table.loc[4, "mean"] == pytest.approx(0.7) and table.loc[4, "seeds"] == 3
    assert table.loc[4, "ci_low"] == pytest.approx(0.7 - half) and table.loc[4, "ci_high"] == pytest.approx(0.7 + half)


def test_runs_of_different_settings_are_never_pooled_as_seeds():
    children = pd.DataFrame({
        "status": ["FINISHED"] * 2, "thinking.num_slots": [4, 4], "experts.names": [["mel"], ["mel", "prosody"]],
        "train.seed": [0, 0], "eval/emotion/accuracy": [0.5, 0.7]})
    with pytest.raises(ValueError, match="experts.names"):
        compare.by_setting(children, ["thinking.num_slots"], ["eval/emotion/accuracy"])
    table = compare.by_setting(children, ["thinking.num_slots", "experts.names"], ["eval/emotion/accuracy"])
    assert list(table["experts.names"]) == ["mel", "mel+prosody"] and list(table["mean"]) == [0.5, 0.7]
    assert (table["seeds"] == 1).all()


def test_verdicts_read_the_interval_in_the_metrics_direction():
    row = {"metric": "accuracy", "diff_ci_low": 0.01, "diff_ci_high": 0.2}
    assert compare.verdict(pd.Series(row)) == "better"
    assert compare.verdict(pd.Series({**row, "metric": "wer"})) == "worse"
    assert compare.verdict(pd.Series({**row, "diff_ci_low": -0.01})) == "no different"
    paired = pd.DataFrame({"thinking.num_slots": [4, 8], "task": "emotion", "metric": "accuracy",
                           "diff": [0.1, 0.02], "diff_ci_low": [0.02, -0.05], "diff_ci_high": [0.2, 0.09],
                           "n_pairs": 100, "seeds": 3})
    (sentence,) = compare.family_sentences(paired, "thinking.num_slots", "K", 0)
    assert sentence.startswith("emotion: K=4 +0.100 [+0.020, +0.200] beats K=0") and "3 seeds, 100 pairs" in sentence


def test_pareto_front_and_importances():
    points = pd.DataFrame({"cost": [0, 6, 10, 18, 34], "val/ce": [3.0, 2.5, 2.7, 2.0, 2.1]})
    assert compare.pareto_front(points, "cost", "val/ce", lower_is_better=True)["cost"].tolist() == [0, 6, 18]
    rng = np.random.default_rng(0)
    weight, noise = rng.uniform(0.1, 10, 24), rng.uniform(0, 1, 24)
    trials = pd.DataFrame({"status": "FINISHED", "loss.weights.mel": weight, "train.lr": noise,
                           "val/ce": 5 * np.log(weight) + 0.01 * noise})
    importance = compare.importances(trials, ["loss.weights.mel", "train.lr"], "val/ce", "min")
    assert importance.index[0] == "loss.weights.mel" and importance.iloc[0] > 0.9
    assert compare.importances(trials.head(1), ["loss.weights.mel"], "val/ce", "min").empty


def test_an_empty_figure_is_a_failure(tmp_path):
    import matplotlib.pyplot as plt

    out = outputs(tmp_path)
    fig, (full, empty) = plt.subplots(1, 2)
    full.plot([0, 1], [1, 2])
    with pytest.raises(EmptyFigureError, match="nothing drawn"):
        out.figure(fig, "half")
    assert not (tmp_path / "half.png").exists()


def checkpoint_of(run: pd.Series) -> Path:
    return latest_checkpoint(Path(run["train.storage"]) / run["train.run_name"])


@pytest.fixture(scope="module")
def analysed(sweeps, tmp_path_factory):
    """`coat probe` into the K=4 run with one expert and its K=0 twin, then `coat analyze` of every notebook."""
    uri, out = sweeps["uri"], tmp_path_factory.mktemp("analysis-out")
    _, trials = runs.find_sweep(uri, "coat", sweep="k")
    probe = typer.Typer()
    probe.command()(probe_command)
    for _, run in trials[trials["experts.names"].map(len) == 1].iterrows():
        done = CliRunner().invoke(probe, ["--checkpoint", str(checkpoint_of(run)), "--targets", "mel", "--split",
                                          "train", "--max-clips", "16", "--folds", "4", "--mlflow-run",
                                          run["run_id"], "--tracking-uri", uri])
        assert done.exit_code == 0, done.output
    app = typer.Typer()
    app.command()(analyze_command)
    result = CliRunner().invoke(app, ["--tracking-uri", uri, "--out", str(out)], env={"COLUMNS": "200"})
    return result, out, list(NOTEBOOKS)


def test_every_notebook_executes_and_leaves_figures_tables_and_conclusions(analysed, sweeps):
    result, out, notebooks = analysed
    assert result.exit_code == 0, result.output
    client = MlflowClient(sweeps["uri"])
    for name in notebooks:
        summary = json.loads((out / name / "summary.json").read_text())
        executed = json.loads((out / name / f"{name}.ipynb").read_text())
        errors = [o for cell in executed["cells"] for o in cell.get("outputs", []) if o["output_type"] == "error"]
        assert not errors, f"{name}: {errors}"
        assert summary["figures"] and summary["conclusions"], name
        for figure in summary["figures"]:
            assert (out / name / figure).stat().st_size > 5000, f"{name}/{figure} is nearly blank"
        for table in summary["tables"]:
            assert len(pd.read_parquet(out / name / f"{table}.parquet")) > 0, f"{name}/{table}"
        attached = {a.path for a in client.list_artifacts(summary["parent_run_id"], f"analysis/{name}")}
        assert f"analysis/{name}/{summary['figures'][0]}" in attached and f"analysis/{name}/{name}.ipynb" in attached
        for sentence in summary["conclusions"]:
            assert sentence.split(":")[0] in result.output or sentence[:40] in " ".join(result.output.split())
    grid = client.get_run(sweeps["grid"].parent_run_id).data.tags["mlflow.note.content"]
    for name in ("thinking_length", "expert_sets", "backbones", "probes"):
        assert f"**{name}**" in grid
    assert "## Analysis" in grid and "Sweep `k`" in grid, "the sweep's own description is kept"
    pareto = client.get_run(sweeps["pareto"].parent_run_id).data.tags["mlflow.note.content"]
    assert "**loss_weights**" in pareto


def test_probes_compare_a_coat_run_with_its_k0_twin(analysed, sweeps):
    _, out, _ = analysed
    results = pd.read_parquet(out / "probes" / "probe_results.parquet")
    assert set(results["K"]) == {0, 4} and set(results["target"]) == {"mel"}
    assert set(results.loc[results["K"] == 4, "position"]) == {"slots", "response"}
    assert set(results.loc[results["K"] == 0, "position"]) == {"response"}
    (sentence,) = json.loads((out / "probes" / "summary.json").read_text())["conclusions"]
    best = results[results["position"] == "response"].sort_values("selectivity").groupby("K").tail(1).set_index("K")
    assert f"decodes it with r2 {best.loc[4, 'score']:.3f}" in sentence and f"{best.loc[0, 'score']:.3f}" in sentence


def test_thinking_length_concludes_from_the_pairs_it_computed(analysed):
    _, out, _ = analysed
    paired = pd.read_parquet(out / "thinking_length" / "paired_vs_k0.parquet")
    conclusions = json.loads((out / "thinking_length" / "summary.json").read_text())["conclusions"]
    for family in paired["task"].unique():
        (sentence,) = [s for s in conclusions if s.startswith(f"{family}:")]
        rows = paired[paired["task"] == family].apply(compare.verdict, axis=1)
        assert sentence.startswith(f"{family}: no K beats K=0") != (rows == "better").any()
    assert any("One seed" in s for s in conclusions)


def test_analyze_refuses_unknown_notebooks_and_names_failures(sweeps, tmp_path):
    app = typer.Typer()
    app.command()(analyze_command)
    bad = CliRunner().invoke(app, ["--notebooks", "thinking_lenght", "--tracking-uri", sweeps["uri"]])
    assert bad.exit_code == 2 and "'thinking_lenght' is not one of" in bad.output
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    failed = CliRunner().invoke(app, ["--notebooks", "thinking_length", "--tracking-uri", empty, "--out",
                                      str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert failed.exit_code == 1 and "thinking_length failed" in failed.output and "no sweep" in failed.output
