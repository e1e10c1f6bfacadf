"""The analysis layer: MLflow runs as tables, comparisons over seeds and against a reference, and every notebook in
analysis/ executed headless against a real MLflow store that real sweeps wrote (the session's `sweeps`)."""

import itertools
import json
import math
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import typer
from mlflow.tracking import MlflowClient
from scipy.stats import binomtest
from typer.testing import CliRunner

from coat import tracking
from coat.analysis import compare, runs
from coat.analysis.notebooks import NOTEBOOKS, EmptyFigureError, outputs
from coat.cli import analyze_command, probe_command
from coat.train.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]

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
    paired = compare.paired_against(uri, trials, "thinking.num_slots", 0, n=200)
    assert set(paired["thinking.num_slots"]) == {4} and set(paired["experts.names"]) == {"mel", "mel+prosody"}
    # Each expert set's K=4 run against the K=0 run of that set, never pooled across sets.
    for names in (("mel",), ("mel", "prosody")):
        rows = trials[trials["experts.names"].map(tuple) == names]
        mine, theirs = (runs.predictions(uri, rows[rows["thinking.num_slots"] == k].iloc[0]["run_id"]) for k in (4, 0))
        expected = compare.seed_paired([(mine, theirs)], n=200).set_index("task")
        got = paired[paired["experts.names"] == "+".join(names)].set_index("task")
        columns = ["metric", "a", "b", "diff", "diff_ci_low", "diff_ci_high", "p", "n_examples", "seeds"]
        pd.testing.assert_frame_equal(got[columns], expected[columns], check_dtype=False)
        assert (got["seeds"] == 1).all() and (got["interval"] == "test examples of one run (paired bootstrap)").all()


def planted(seeds: int, examples: int = 60, effect: float = 0.1, repeat: bool = False, family: str = "emotion",
            rng_seed: int = 0) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """(a, b) scored examples per seed: a right with p = q_i + effect, b with q_i, for a difficulty q_i per example
    shared by every seed; `repeat`: every seed is the first one again."""
    rng = np.random.default_rng(rng_seed)
    difficulty = rng.uniform(0.2, 0.7, examples)
    ids = [f"x{i}" for i in range(examples)]

    def scored(right: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({"id": ids, "task": family, "answer": "a", "prediction": np.where(right, "a", "b"),
                             "correct": right})

    pairs = [(scored(rng.random(examples) < difficulty + effect), scored(rng.random(examples) < difficulty))
             for _ in range(seeds)]
    return [pairs[0]] * seeds if repeat else pairs


def width(row: pd.Series) -> float:
    return row["diff_ci_high"] - row["diff_ci_low"]


def test_one_result_repeated_as_seeds_is_no_more_certain_than_one_seed():
    (one,) = compare.seed_paired(planted(1), n=2000).itertuples()
    (thrice,) = compare.seed_paired(planted(3, repeat=True), n=2000).itertuples()
    assert thrice.diff == pytest.approx(one.diff) and thrice.seeds == 3 and thrice.n_examples == one.n_examples == 60
    assert width(pd.Series(thrice._asdict())) >= width(pd.Series(one._asdict()))
    assert thrice.p >= one.p and thrice.p_signflip >= one.p_signflip and thrice.p_bootstrap >= one.p_bootstrap
    a, b = planted(1)[0]
    discordant = (a["correct"] & ~b["correct"]).sum(), (b["correct"] & ~a["correct"]).sum()
    assert one.p_signflip == pytest.approx(binomtest(discordant[0], sum(discordant), 0.5).pvalue), "McNemar's exact"
    assert one.p == max(one.p_signflip, one.p_bootstrap)


def test_independent_seeds_narrow_the_interval():
    """Over eight planted studies (one run's interval varies with its luck): four independent seeds give narrower
    intervals than one, by about the sqrt(3/4) that averaging the runs' noise promises here."""
    single = [compare.seed_paired(planted(1, rng_seed=r), n=2000).iloc[0] for r in range(8)]
    several = [compare.seed_paired(planted(4, rng_seed=r), n=2000).iloc[0] for r in range(8)]
    assert several[0]["seeds"] == 4 and len(several[0]["seed_diffs"]) == 4
    assert several[0]["diff"] == pytest.approx(np.mean(several[0]["seed_diffs"]))
    assert np.mean([width(r) for r in several]) < 0.9 * np.mean([width(r) for r in single])
    assert several[0]["interval"] == "seeds and test examples (two-level bootstrap)"


def test_transcription_pairs_compare_corpus_wer_seed_by_seed():
    ids = ["u1", "u2", "u3"]
    answers = ["the cat sees the dog", "a bird", "my friend likes the red ball"]
    a = pd.DataFrame({"id": ids, "task": "transcription", "answer": answers, "correct": False,
                      "prediction": ["the cat sees the dog", "a word", "my friend likes red ball"]})
    b = a.assign(prediction=["the cat sees a dog", "bird", "my friend likes the ball"])
    (row,) = compare.seed_paired([(a, b), (a, b)], n=200).itertuples()
    assert row.metric == "wer" and row.a == pytest.approx(2 / 13) and row.b == pytest.approx(3 / 13)
    assert row.diff == pytest.approx(-1 / 13) and row.seed_diffs == pytest.approx([-1 / 13, -1 / 13])
    (alone,) = compare.seed_paired([(a, b)], n=200).itertuples()
    assert (row.diff_ci_low, row.diff_ci_high, row.p) == (alone.diff_ci_low, alone.diff_ci_high, alone.p)


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
    assert table.loc[0, "interval"] == "across test examples of one run (bootstrap)"
    assert table.loc[4, "interval"] == "across 3 seeds (t)"


def test_runs_of_different_settings_or_one_seed_twice_are_never_pooled_as_seeds():
    children = pd.DataFrame({
        "status": ["FINISHED"] * 2, "name": ["a", "b"], "thinking.num_slots": [4, 4],
        "experts.names": [["mel"], ["mel", "prosody"]], "train.seed": [0, 0], "eval/emotion/accuracy": [0.5, 0.7]})
    with pytest.raises(ValueError, match="experts.names"):
        compare.by_setting(children, ["thinking.num_slots"], ["eval/emotion/accuracy"])
    table = compare.by_setting(children, ["thinking.num_slots", "experts.names"], ["eval/emotion/accuracy"])
    assert list(table["experts.names"]) == ["mel", "mel+prosody"] and list(table["mean"]) == [0.5, 0.7]
    assert (table["seeds"] == 1).all()
    twice = children.assign(**{"experts.names": [["mel"], ["mel"]]})
    with pytest.raises(ValueError, match=r"runs \['a', 'b'\] share .* train.seed=0"):
        compare.by_setting(twice, ["thinking.num_slots", "experts.names"], ["eval/emotion/accuracy"])


def test_verdicts_read_the_holm_adjusted_p_in_the_metrics_direction():
    paired = pd.DataFrame({"thinking.num_slots": [4, 8, 16], "task": "emotion", "metric": "accuracy",
                           "diff": [0.1, 0.06, -0.02], "diff_ci_low": [0.02, 0.01, -0.09],
                           "diff_ci_high": [0.2, 0.11, 0.05], "p": [0.01, 0.04, 0.6], "n_examples": 100,
                           "seeds": 3, "interval": "seeds and test examples (two-level bootstrap)"})
    adjusted = compare.adjust(paired)
    assert adjusted["p_holm"].tolist() == pytest.approx([0.03, 0.08, 0.6]) and (adjusted["comparisons"] == 3).all()
    assert [compare.verdict(r) for _, r in paired.iterrows()] == ["better", "better", "no different"]
    assert [compare.verdict(r) for _, r in adjusted.iterrows()] == ["better", "no different", "no different"]
    assert compare.verdict(adjusted.iloc[0].copy().replace({"accuracy": "wer"})) == "worse"
    (sentence,) = compare.family_sentences(adjusted, "thinking.num_slots", "K", 0)
    assert sentence.startswith("emotion: K=4 +0.100 [+0.020, +0.200], p 0.01 (Holm 0.03) beats K=0 on accuracy")
    assert "3 seeds, 100 test examples" in sentence and "Holm-adjusted over the 3 comparisons" in sentence


def test_a_sentence_whose_comparisons_rest_on_different_seeds_gives_each_its_own():
    """K=4 lost two of its three seeds: its win rests on one run, and the sentence must not say three seeds."""
    paired = compare.adjust(pd.DataFrame({
        "thinking.num_slots": [4, 8], "task": "emotion", "metric": "accuracy", "diff": [0.2, 0.01],
        "diff_ci_low": [0.1, -0.05], "diff_ci_high": [0.3, 0.07], "p": [0.001, 0.7], "n_examples": [500, 480],
        "seeds": [1, 3], "interval": ["test examples of one run (paired bootstrap)",
                                      "seeds and test examples (two-level bootstrap)"]}))
    (sentence,) = compare.family_sentences(paired, "thinking.num_slots", "K", 0)
    assert "K=4 +0.200 [+0.100, +0.300], p 0.001 (Holm 0.002), 1 seed beats K=0" in sentence
    assert ("(1 to 3 seeds, 480 to 500 test examples; 95% intervals over seeds and test examples (test examples of "
            "one run where one seed)") in sentence
    (even,) = compare.family_sentences(paired.assign(seeds=3), "thinking.num_slots", "K", 0)
    assert "seed beats" not in even and "(3 seeds, 480 to 500 test examples" in even


def comparison(a: str, b: str, diff: float, p_holm: float, family: str = "emotion") -> dict:
    return {"a_system": a, "b_system": b, "thinking.num_slots": 16, "task": family, "metric": "accuracy",
            "diff": diff, "diff_ci_low": diff - 0.05, "diff_ci_high": diff + 0.05, "p": p_holm / 2, "p_holm": p_holm,
            "comparisons": 5, "seeds": 3, "n_examples": 120,
            "interval": "seeds and test examples (two-level bootstrap)"}


@pytest.mark.parametrize(("gain", "over_none", "over_shuffled", "pause", "explanation"), [
    (0.01, 0.01, 0.01, 0.01, "neither: CoAT does not beat K=0 at the adjusted p, so there is no gain to explain "
                             "(though the none control beat K=0)"),
    (0.01, 0.01, 0.01, 0.5, "the experts' information: CoAT beats the same positions unsupervised and supervised "
                            "with another clip's targets"),
    (0.01, 0.5, 0.5, 0.01, "the positions: the same K slots without expert supervision beat K=0, and CoAT does not "
                           "beat them"),
    (0.01, 0.01, 0.01, 0.01, "both: the pause positions alone beat K=0"),
    (0.01, 0.01, 0.5, 0.5, "the supervision, not shown to need the experts' information: CoAT beats the same "
                           "positions unsupervised but not shuffled targets"),
    (0.01, 0.5, 0.5, 0.5, "the data cannot tell"),
])
def test_controls_say_what_explains_a_gain(gain, over_none, over_shuffled, pause, explanation):
    gain_diff = -0.1 if explanation.startswith("neither") else 0.1
    table = pd.DataFrame([comparison("coat", "K=0", gain_diff, gain), comparison("coat", "none", 0.08, over_none),
                          comparison("coat", "shuffled", 0.07, over_shuffled), comparison("none", "K=0", 0.09, pause),
                          comparison("shuffled", "K=0", 0.03, 0.9)])
    (sentence,) = compare.control_sentences(table)
    assert sentence.startswith("emotion at K=16: coat vs K=0 ") and f"What explains it: {explanation}" in sentence
    assert "coat vs none +0.080 [+0.030, +0.130]" in sentence and f"(Holm {over_none:.3g})" in sentence
    assert "3 seeds, 120 test examples" in sentence


# The verdicts (Holm-adjusted) of a `make demo` run at K=16 that the old rule explained wrongly: emotion was said to
# show no control differing from K=0 (shuffled beat it), music no control differing from CoAT (CoAT beat shuffled),
# and transcription and understanding left out that the unsupervised positions alone beat K=0.
DEMO_VERDICTS = {
    "emotion": ("no different", "no different", "no different", "better",
                "not shown to need the experts' information: shuffled targets beat K=0 too, and CoAT does not beat "
                "them; whether the positions alone would, the data cannot tell"),
    "music": ("no different", "better", "no different", "no different",
              "the data cannot tell: of the comparisons with the controls only CoAT beats the shuffled control at the "
              "adjusted p"),
    "transcription": ("better", "worse", "better", "better",
                      "the positions and their supervision, not shown to need the experts' information: the "
                      "positions alone beat K=0, and CoAT beats them unsupervised but shuffled targets beat CoAT"),
    "understanding": ("better", "no different", "better", "better",
                      "the positions and their supervision, not shown to need the experts' information: the "
                      "positions alone beat K=0, and CoAT beats them unsupervised but not shuffled targets"),
}
PAIRS = [("coat", "none"), ("coat", "shuffled"), ("none", "K=0"), ("shuffled", "K=0")]


@pytest.mark.parametrize("family", sorted(DEMO_VERDICTS))
def test_controls_explain_the_demo_gains_by_what_holds(family):
    *outcomes, explanation = DEMO_VERDICTS[family]
    as_row = {"better": (0.1, 0.01), "worse": (-0.1, 0.01), "no different": (0.05, 0.5)}
    table = pd.DataFrame([comparison("coat", "K=0", 0.2, 0.007, family),
                          *(comparison(a, b, *as_row[outcome], family)
                            for (a, b), outcome in zip(PAIRS, outcomes, strict=True))])
    (sentence,) = compare.control_sentences(table)
    assert f"What explains it: {explanation}" in sentence


@pytest.mark.parametrize("missing", [(), ("none",), ("shuffled",)])
def test_every_explanation_of_a_gain_claims_only_what_its_comparisons_show(missing):
    """Every combination of verdicts (243 with both controls): each phrase of the explanation is checked against the
    verdict it rests on, and a comparison that is absent supports nothing."""
    pairs = [pair for pair in PAIRS if not set(pair) & set(missing)]
    for outcomes in itertools.product(["better", "worse", "no different"], repeat=len(pairs) + 1):
        verdicts = {("coat", "K=0"): outcomes[0], **dict(zip(pairs, outcomes[1:], strict=True))}
        why, said = compare.explanation(verdicts), verdicts.get
        assert why.startswith("neither: CoAT does not beat K=0 at the adjusted p") == (
            said(("coat", "K=0")) != "better"), why
        if why.startswith("neither"):
            continue
        lead = why.split(":", 1)[0]
        assert (lead in ("both", "the experts' information")) <= (said(("coat", "shuffled")) == "better"), why
        assert ("supervision" in lead and "not" not in lead.split("supervision")[0]) <= (
            said(("coat", "none")) == "better"), why
        claims = {
            "the pause positions alone beat K=0": said(("none", "K=0")) == "better",
            "the positions alone beat K=0": said(("none", "K=0")) == "better",
            "the experts' information adds": said(("coat", "shuffled")) == "better",
            "not shown to need the experts' information": said(("coat", "shuffled")) in ("no different", "worse"),
            "CoAT beats them unsupervised": said(("coat", "none")) == "better",
            "CoAT beats the same positions unsupervised": said(("coat", "none")) == "better",
            "supervised with another clip's targets": said(("coat", "shuffled")) == "better",
            "but not shuffled targets": said(("coat", "shuffled")) == "no different",
            "shuffled targets beat CoAT": said(("coat", "shuffled")) == "worse",
            "shuffled targets beat K=0 too": said(("shuffled", "K=0")) == "better",
            "too, and CoAT does not beat them": said(("coat", "shuffled")) == "no different",
            "too, and they beat CoAT": said(("coat", "shuffled")) == "worse",
            "without expert supervision beat K=0": said(("none", "K=0")) == "better",
            "K=0, and CoAT does not beat them": said(("coat", "none")) == "no different",
            "K=0, and they beat CoAT": said(("coat", "none")) == "worse",
            "the none control differs from neither CoAT nor K=0":
                said(("coat", "none")) == said(("none", "K=0")) == "no different",
            "neither control differs from CoAT or from K=0":
                all(said(pair) == "no different" for pair in pairs),
            "without a shuffled control": ("coat", "shuffled") not in verdicts,
        }
        for phrase, true in claims.items():
            assert phrase not in why or true, f"{verdicts}: {why!r} says {phrase!r}"
        if "only " in why:
            listed = why.split("only ", 1)[1].removesuffix(" at the adjusted p").split(" and ")
            differing = [pair for pair in pairs if said(pair) != "no different"]
            assert len(listed) == len(differing), why
            for pair in differing:
                verb = "beats" if said(pair) == "better" else "does worse than"
                assert f"{compare.NAMES[pair[0]]} {verb} {compare.NAMES[pair[1]]}" in listed, why


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
    # ASHA stopped the trials with the largest weights early: they count, at their last value.
    stopped = trials.assign(status=np.where(weight > 5, "KILLED", "FINISHED"))
    with_stopped = compare.importances(stopped, ["loss.weights.mel", "train.lr"], "val/ce", "min")
    assert with_stopped.attrs == {"finished": int((weight <= 5).sum()), "stopped": int((weight > 5).sum())}
    assert with_stopped.index[0] == "loss.weights.mel"


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
    """`coat probe` into the K=4 run with one expert (with its logit lens) and its K=0 twin, then `coat analyze` of
    every notebook."""
    uri, out = sweeps["uri"], tmp_path_factory.mktemp("analysis-out")
    _, trials = runs.find_sweep(uri, "coat", sweep="k")
    probe = typer.Typer()
    probe.command()(probe_command)
    for _, run in trials[trials["experts.names"].map(len) == 1].iterrows():
        done = CliRunner().invoke(probe, ["--checkpoint", str(checkpoint_of(run)), "--targets", "mel", "--split",
                                          "train", "--max-clips", "16", "--folds", "4", "--mlflow-run",
                                          run["run_id"], "--tracking-uri", uri, "--logit-lens"])
        assert done.exit_code == 0, done.output
        assert ("logit lens: each slot's likeliest next token" in done.output) == (run["thinking.num_slots"] > 0)
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


def test_probes_compare_a_coat_run_with_its_k0_twin_on_clips_the_layer_choice_never_saw(analysed, sweeps):
    _, out, _ = analysed
    results = pd.read_parquet(out / "probes" / "probe_results.parquet")
    assert set(results["K"]) == {0, 4} and set(results["target"]) == {"mel"}
    assert set(results.loc[results["K"] == 4, "position"]) == {"slots", "response"}
    assert set(results.loc[results["K"] == 0, "position"]) == {"response"}
    assert (results["control_by"] == "question").all(), "coat-mini's clips carry their question type (subtask)"
    (row,) = pd.read_parquet(out / "probes" / "held_out_vs_k0.parquet").itertuples()
    assert row.K == 4 and row.n_clips == 8, "16 probed clips: the layers chosen on 8, compared on the other 8"
    conclusions = json.loads((out / "probes" / "summary.json").read_text())["conclusions"]
    (sentence,) = [s for s in conclusions if s.startswith("mel at the response position")]
    assert f"a difference of {row.diff:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}]" in sentence
    lens = pd.read_parquet(out / "probes" / "logit_lens.parquet")
    assert set(lens["slot"]) == {0, 1, 2, 3} and set(lens["rank"]) == {1, 2, 3, 4, 5}
    assert lens.groupby(["layer", "slot"])["probability"].apply(lambda p: p.is_monotonic_decreasing).all()
    assert (lens["probability"].between(0, 1)).all() and "logit_lens.png" in json.loads(
        (out / "probes" / "summary.json").read_text())["figures"]
    assert any(f"at layer {lens['layer'].max()}, the deepest it was read at, its slots' likeliest tokens are" in s
               for s in conclusions)


def test_a_run_without_a_reference_twin_is_counted_not_silently_left_out(sweeps):
    """A K=4 run whose K=0 twin is missing is in no comparison: `paired_against` counts it for the conclusion."""
    _, trials = runs.find_sweep(sweeps["uri"], "coat", sweep="k")
    plain = trials[trials[compare.K].astype(str) == "0"].iloc[0]
    without = trials.drop(plain.name)
    paired = compare.paired_against(sweeps["uri"], without, compare.K, 0, n=200)
    assert paired.attrs["unpaired_runs"] == 1
    assert set(paired["experts.names"]) == {name for name in without["experts.names"].map(compare.as_text)
                                            if name != compare.as_text(plain["experts.names"])}
    assert compare.paired_against(sweeps["uri"], trials, compare.K, 0, n=200).attrs["unpaired_runs"] == 0


def test_thinking_length_concludes_from_the_pairs_it_computed(analysed):
    _, out, _ = analysed
    paired = pd.read_parquet(out / "thinking_length" / "paired_vs_k0.parquet")
    conclusions = json.loads((out / "thinking_length" / "summary.json").read_text())["conclusions"]
    assert (paired["comparisons"] == len(paired)).all(), "Holm over every comparison the notebook made"
    for (family, names), rows in paired.groupby(["task", "experts.names"]):
        (sentence,) = [s for s in conclusions if s.startswith(f"{family} (experts.names={names}):")]
        verdicts = rows.apply(compare.verdict, axis=1)
        assert (": no K beats K=0" in sentence) != (verdicts == "better").any()
        assert f"Holm {rows['p_holm'].iloc[0]:.3g}" in sentence
    assert any("No control in this sweep" in s for s in conclusions) and any("One seed" in s for s in conclusions)


def test_backbones_names_the_metric_of_every_score_it_compares(analysed):
    """WER falls as a system gets better and accuracy rises: a score without its metric reads either way."""
    _, out, _ = analysed
    conclusions = json.loads((out / "backbones" / "summary.json").read_text())["conclusions"]
    compared = [s for s in conclusions if " vs fine-tune, K=0: " in s]
    assert compared
    for sentence in compared:
        scores = sentence.split(" vs fine-tune, K=0: ", 1)[1].split("; time to first token")[0].split(", ")
        named = {score.split()[0]: score.split()[1] for score in scores}
        assert named.get("transcription") == "wer" and set(named.values()) <= {"wer", "accuracy", "loglik_accuracy"}
        assert "runs, not a paired test; thinking_length pairs each K with K=0 seed by seed)" in sentence


def test_analyze_refuses_unknown_notebooks_and_names_failures(sweeps, tmp_path):
    app = typer.Typer()
    app.command()(analyze_command)
    bad = CliRunner().invoke(app, ["--notebooks", "thinking_lenght", "--tracking-uri", sweeps["uri"]])
    assert bad.exit_code == 2 and "'thinking_lenght' is not one of" in bad.output
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    skipped = CliRunner().invoke(app, ["--notebooks", "thinking_length", "--tracking-uri", empty, "--out",
                                       str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert skipped.exit_code == 0, skipped.output
    assert "thinking_length: skipped, no sweep varying thinking.num_slots" in skipped.output
    assert "experiments/ablate_thinking_len.py makes one" in skipped.output and "Error" not in skipped.output
    broken = tmp_path / "notebooks"
    shutil.copytree(ROOT / "analysis", broken)
    source = (broken / "thinking_length.py").read_text()
    (broken / "thinking_length.py").write_text(source.replace("out = outputs(out_dir)", "out = outputs(out_dir)\n1/0"))
    failed = CliRunner().invoke(app, ["--notebooks", "thinking_length", "--tracking-uri", sweeps["uri"], "--out",
                                      str(tmp_path / "out"), "--notebook-dir", str(broken)], env={"COLUMNS": "200"})
    assert failed.exit_code == 1 and "thinking_length failed" in failed.output and "ZeroDivisionError" in failed.output


def test_loss_weights_says_so_when_one_trial_trained_to_the_end(sweeps, tmp_path):
    """What a sampled sweep whose trials ASHA stopped but one leaves: nothing to plot against a weight."""
    shutil.copy(sweeps["root"] / "mlruns.db", tmp_path / "mlruns.db")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    children = tracking.child_runs(uri, sweeps["pareto"].parent_run_id)
    for child in children[1:]:
        MlflowClient(uri).set_terminated(child.info.run_id, "KILLED")
    app = typer.Typer()
    app.command()(analyze_command)
    done = CliRunner().invoke(app, ["--notebooks", "loss_weights", "--sweep", "m", "--tracking-uri", uri, "--out",
                                    str(tmp_path / "out")], env={"COLUMNS": "250"})
    assert done.exit_code == 0, done.output
    assert (f"loss_weights: skipped, sweep m: no loss weight varies among its 1 trials that trained to the end "
            f"(of {len(children)})") in done.output and "Error" not in done.output
