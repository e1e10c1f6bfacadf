"""Evaluation: the runner on real coat-mini audio with a tiny CoAT model, and the CLI (answer parsing, metrics and
the benchmark loaders are in test_scoring.py)."""

import json
import re
from dataclasses import replace
from pathlib import Path

import jiwer
import numpy as np
import pandas as pd
import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from coat.backbones import check_audio_window
from coat.cli import eval_command
from coat.config import ConfigError, default_suites, load_config
from coat.data.audio import decode
from coat.data.corpora import load_suite
from coat.data.manifest import model_prompt, read_manifest
from coat.data.synth import EMOTIONS, synthesize
from coat.eval.evaluate import (
    EvalReport,
    base_model,
    choose_rows,
    circular_rows,
    evaluate,
    generated_lengths,
    reasoning_before_answer,
    timed_generate,
    token_budget,
)
from coat.eval.scoring import normalise_transcript, string_match
from coat.eval.systems import evaluate_systems, pooled_latency, source_parts
from coat.eval.tasks import final_answer, split_answer
from coat.model import CoATModel
from coat.provenance import provenance
from coat.report import print_eval_reports
from tests.conftest import write_tone
from tests.test_scoring import official_accuracy

MAX_NEW_TOKENS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("coat-mini"), 12, 0, workers=0)


@pytest.fixture(scope="module")
def model(manifest) -> CoATModel:
    cfg = load_config(overrides=[
        "experts.names=[]", "thinking.num_slots=2", "thinking.max_slots=4", "backbone.audio_window_s=8",
        f"data.manifest={manifest}", "eval.batch_size=4", f"eval.suites.coat-mini.max_new_tokens={MAX_NEW_TOKENS}",
        "eval.bootstrap=200", "eval.latency_examples=3", "eval.latency_warmup=1",
    ])
    return CoATModel(cfg).eval()


@pytest.fixture(scope="module")
def report(model, manifest):
    return evaluate(model, read_manifest(manifest), model.cfg.eval, progress=False)


# ---------------------------------------------------------------- runner

def test_evaluate_scores_every_example(report, manifest):
    rows = read_manifest(manifest)
    ex = report.examples
    assert ex["id"].tolist() == rows["id"].tolist() and report.quarantine.empty
    table = report.table.set_index("task")
    assert set(table.index) == set(rows["task"]) and (table["scoring"] == "generate").all()
    for task, group in ex.groupby("task"):
        assert table.loc[task, "n"] == len(group)
        if task == "transcription":
            refs = [normalise_transcript(a) for a in group["answer"]]
            assert table.loc[task, "metric"] == "wer"
            assert table.loc[task, "value"] == pytest.approx(jiwer.wer(refs, list(group["prediction"])))
            assert (group["prediction"] == [normalise_transcript(t) for t in group["output"]]).all()
        else:
            assert table.loc[task, "metric"] == "accuracy"
            assert table.loc[task, "value"] == pytest.approx(group["correct"].mean())
            assert group["prediction"].isin([*group["choices"].iloc[0], ""]).all()
    assert table.loc["emotion", "chance"] == pytest.approx(1 / len(EMOTIONS))
    assert report.setting["device"] == "cpu" and report.setting["batch_size"] == 4
    assert report.setting["subsample"] == "all" and report.setting["dtype"] == "float32"


def test_latency_is_measured_one_example_at_a_time_apart_from_quality(model, report, manifest):
    assert report.latency["examples"] == 3
    measured = report.examples.dropna(subset=["ttft_s"])
    assert len(measured) == 3 and ((measured["ttft_s"] > 0) & (measured["ttft_s"] < measured["latency_s"])).all()
    metrics = report.metrics()
    assert metrics["latency/ttft_s"] == pytest.approx(measured["ttft_s"].mean())
    assert metrics["eval/emotion/accuracy"] == report.table.set_index("task").loc["emotion", "value"]
    row = read_manifest(manifest).iloc[0]
    batch = model.encode([decode(row["audio_path"], 16000).numpy()], [row["prompt"]])
    ids, timing = timed_generate(model, batch, MAX_NEW_TOKENS)
    assert timing.llm_calls == generated_lengths(ids, model.backbone.end_of_turn_id)[0]  # one prefill, then a call
    assert 0 < timing.ttft_s < timing.total_s                                            # per further token


def choice_logprobs(model, audio, prompt: str, choices: list[str]) -> list[tuple[float, int]]:
    """Per choice: the summed log-probability of the choice and its end of turn, and their token count."""
    out = []
    for choice in choices:
        batch = model.encode([audio], [prompt], [choice])
        with torch.no_grad():
            logits = model.lm(**model._model_inputs(batch)).logits[0, :-1]
        labels = batch["labels"][0, 1:]
        scored = labels != -100
        out.append((-torch.nn.functional.cross_entropy(logits[scored], labels[scored], reduction="sum").item(),
                    int(scored.sum())))
    return out


def test_latency_over_several_sources_is_that_of_all_their_measured_examples():
    """A mixture's sources are measured apart: pooled, the count is their sum, the 90th percentiles are over every
    measured example and the decode rate over every decode step, as one measurement of all of them would give."""
    timings = {"a": ([0.1, 0.2, 0.3], [0.5, 0.6, 0.9], [4, 4, 6]), "b": ([1.0], [2.0], [2])}

    def report(source: str) -> EvalReport:
        ttft, total, steps = (np.array(v, dtype=float) for v in timings[source])
        latency = {"ttft_s": ttft.mean(), "ttft_p90_s": np.quantile(ttft, 0.9), "total_s": total.mean(),
                   "total_p90_s": np.quantile(total, 0.9), "new_tokens": (steps + 1).mean(), "examples": len(ttft),
                   "s_per_decode_step": (total - ttft).sum() / steps.sum()}
        examples = pd.DataFrame({"id": [f"{source}{i}" for i in range(len(ttft))], "ttft_s": ttft, "latency_s": total})
        return EvalReport("coat", "coat-mini", examples, pd.DataFrame(), latency, {}, source=source)

    reports = [report("a"), report("b")]
    pooled = pooled_latency(reports, pd.concat([r.examples for r in reports], ignore_index=True))
    ttft, total, steps = (np.concatenate([np.array(timings[s][i], dtype=float) for s in "ab"]) for i in range(3))
    assert pooled["examples"] == 4
    assert pooled["ttft_s"] == pytest.approx(ttft.mean()) and pooled["total_s"] == pytest.approx(total.mean())
    assert pooled["ttft_p90_s"] == pytest.approx(np.quantile(ttft, 0.9))
    assert pooled["total_p90_s"] == pytest.approx(np.quantile(total, 0.9))
    assert pooled["new_tokens"] == pytest.approx((steps + 1).mean())
    assert pooled["s_per_decode_step"] == pytest.approx((total - ttft).sum() / steps.sum())


def test_loglik_scoring_ranks_the_choices_per_token_by_default_summed_or_calibrated(model, manifest):
    rows = read_manifest(manifest)
    rows = rows[rows["choices"].notna()].head(4)
    cfg = replace(model.cfg.eval, scoring="loglik", latency_examples=0)
    reports = {how: evaluate(model, rows, replace(cfg, loglik=how), progress=False)
               for how in ("per_token", "sum", "calibrated")}
    out = reports["per_token"]
    assert (out.table["scoring"] == "loglik").all() and out.latency == {} and out.setting["loglik"] == "per_token"
    assert any(key.endswith("/loglik_accuracy") for key in out.metrics())
    for i, (_, row) in enumerate(rows.iterrows()):
        audio = decode(row["audio_path"], 16000).numpy()
        heard = choice_logprobs(model, audio, model_prompt(row["prompt"], row["choices"]), row["choices"])
        silent = choice_logprobs(model, np.zeros_like(audio), model_prompt("N/A", row["choices"]), row["choices"])
        expected = {"sum": [total for total, _ in heard], "per_token": [total / n for total, n in heard],
                    "calibrated": [a / n - b / m for (a, n), (b, m) in zip(heard, silent, strict=True)]}
        for how, scores in expected.items():
            assert reports[how].examples["response"].iloc[i] == row["choices"][int(np.argmax(scores))], how


def test_loglik_scoring_reports_the_scorers_chance_on_silence(model, manifest):
    rows = read_manifest(manifest)
    rows = rows[rows["choices"].notna()].head(4)
    out = evaluate(model, rows, replace(model.cfg.eval, scoring="loglik", latency_examples=0), progress=False)
    table = out.table.set_index(["task", "metric"])
    for (task, _), row in table.iterrows():
        group = rows[rows["task"] == task]
        right = []
        for _, item in group.iterrows():
            audio = np.zeros_like(decode(item["audio_path"], 16000).numpy())
            heard = choice_logprobs(model, audio, model_prompt(item["prompt"], item["choices"]), item["choices"])
            right.append(item["choices"][int(np.argmax([total / n for total, n in heard]))] == item["answer"])
        assert row["chance_empirical"] == pytest.approx(np.mean(right)), task
        assert out.metrics()[f"eval/{task}/chance_empirical"] == row["chance_empirical"]
    other = replace(out, system="base", table=out.table.assign(chance_empirical=0.125))  # another system's silence
    console = Console(record=True, width=300)
    print_eval_reports([out, other], console=console)
    printed = console.export_text()
    for task, row in table.iterrows():
        assert f"({row['chance_empirical']:.3f} on silence)" in printed and "(0.125 on silence)" in printed, task


def test_circular_eval_asks_every_rotation_and_counts_an_item_only_when_every_rotation_is_right(model, manifest):
    rows = read_manifest(manifest)
    rows = rows[rows["choices"].notna()].head(4)
    asked = circular_rows(rows)
    assert len(asked) == sum(len(c) for c in rows["choices"]) and set(asked["circular_id"]) == set(rows["id"])
    first = rows.iloc[0]
    rotated = asked[asked["circular_id"] == first["id"]]
    assert rotated["id"].iloc[0] == first["id"] and rotated["id"].iloc[1] == f"{first['id']}@rotation1"
    assert rotated["choices"].iloc[1] == [*first["choices"][1:], first["choices"][0]]

    cfg = replace(model.cfg.eval, scoring="loglik", latency_examples=0)
    circular = evaluate(model, rows, replace(cfg, circular=True), progress=False)
    plain = evaluate(model, rows, cfg, progress=False)
    by_rotation = evaluate(model, asked, cfg, progress=False).examples.set_index("id")  # each rotation by itself
    examples = circular.examples.set_index("id")
    assert list(examples.index) == list(rows["id"]) and circular.setting["circular"] is True
    assert (examples["correct"] == plain.examples.set_index("id")["correct"]).all(), "rotation 0: the standard answer"
    for item, group in asked.groupby("circular_id"):
        assert examples.loc[item, "correct_circular"] == by_rotation.loc[group["id"], "correct"].all()
        assert examples.loc[item, "circular_responses"] == by_rotation.loc[group["id"], "prediction"].tolist()
    table = circular.table.set_index(["task", "metric"])
    for task, group in examples.groupby("task"):
        assert table.loc[(task, "circular_accuracy"), "value"] == pytest.approx(group["correct_circular"].mean())
        assert table.loc[(task, "circular_accuracy"), "value"] <= table.loc[(task, "accuracy"), "value"]
    assert any(key.endswith("/loglik_circular_accuracy") for key in circular.metrics())


def test_benchmarks_are_heard_whole_up_to_the_backbones_window_and_longer_clips_are_counted(model, tmp_path):

    rows = pd.DataFrame([{"id": f"g{i}", "audio": str(write_tone(tmp_path / f"g{i}.wav", seconds=seconds)),
                          "task": "music", "prompt": None, "answer": "blues", "choices": ["blues", "rock"],
                          "split": "test"} for i, seconds in enumerate([3.0, 9.5, 12.0])])
    cfg = replace(model.cfg.eval, latency_examples=0, scoring="loglik")
    heard = evaluate(model, rows, cfg, suite="gtzan", progress=False)
    assert model.backbone.audio_window_s == 8.0 and heard.setting["heard_s"] == 8.0
    assert heard.setting["cut"] == 2 and heard.metrics()["eval/cut"] == 2 and len(heard.examples) == 3
    rejected = evaluate(model, rows, replace(cfg, long_clips="reject"), suite="gtzan", progress=False)
    assert list(rejected.examples["id"]) == ["g0"] and rejected.metrics()["eval/quarantined/too_long"] == 2
    for suite, knob in (("gtzan", "eval.long_clips"), ("coat-mini", "data.long_clips")):  # coat-mini follows data.*
        console = Console(record=True, width=250)
        print_eval_reports([replace(heard, setting=heard.setting | {"suite": suite})], console=console)
        assert (f"2 clips are longer than the 8 s the model hears of a clip: heard as their first part ({knob}=reject "
                "leaves them out)") in console.export_text()
    with pytest.raises(ConfigError, match=r"data.max_seconds.*10 s is longer than qwen2-audio hears of a clip \(8 s\)"):
        check_audio_window(load_config(overrides=["data.max_seconds=10"]))


def test_a_subsample_keeps_each_groups_share_and_says_so(model, manifest):
    rows = read_manifest(manifest)
    cfg = replace(model.cfg.eval, max_examples=5, latency_examples=0)
    first, again = (evaluate(model, rows, cfg, progress=False) for _ in range(2))
    assert first.examples["id"].tolist() == again.examples["id"].tolist() and len(first.examples) == 5
    assert set(first.examples["task"]) == set(rows["task"])  # five families, one each
    assert first.setting["subsample"] == "5 of 12, stratified by task, seed 0"
    other = evaluate(model, rows, replace(cfg, seed=1), progress=False)
    assert other.examples["id"].tolist() != first.examples["id"].tolist()


def test_bad_rows_are_quarantined_and_the_rest_evaluated(model, manifest):
    rows = read_manifest(manifest).head(3).copy()
    rows.loc[0, "audio_path"] = str(manifest.parent / "audio" / "gone.wav")
    mc = rows.index[rows["choices"].notna()][-1]
    rows.at[mc, "answer"] = "not a choice"
    out = evaluate(model, rows, model.cfg.eval, progress=False)
    reasons = dict(zip(out.quarantine["id"], out.quarantine["reason"], strict=True))
    assert reasons == {rows.loc[0, "id"]: "missing_file", rows.loc[mc, "id"]: "answer_not_in_choices"}
    assert len(out.examples) == 1
    with pytest.raises(ValueError, match="answer"):
        evaluate(model, rows.drop(columns="answer"), model.cfg.eval, progress=False)


def test_cot_baseline_is_the_base_backbone_reasoning_in_text(checkpoint, manifest):
    base = base_model(checkpoint)
    rows = read_manifest(manifest).head(4)
    cfg = replace(base.cfg.eval, latency_examples=2)
    direct = evaluate(base, rows, cfg, system="base", progress=False)
    cot = evaluate(base, rows, replace(cfg, cot_tokens=12), system="cot", progress=False)
    assert cot.setting["max_new_tokens"] == direct.setting["max_new_tokens"] + 12
    assert cot.latency["new_tokens"] > direct.latency["new_tokens"]
    assert cot.latency["total_s"] > direct.latency["total_s"]
    assert (cot.examples["response"] == [final_answer(o) for o in cot.examples["output"]]).all()
    for report in (direct, cot):  # each system says how many of its answers ran out of tokens
        ran_out = report.examples["out_of_budget"] == 1
        assert (report.examples.loc[ran_out, "new_tokens"] == report.setting["max_new_tokens"]).all()
        assert report.metrics()["eval/out_of_budget"] == pytest.approx(ran_out.mean())
    assert not any("answer:" in o.lower() for o in cot.examples.loc[cot.examples["out_of_budget"] == 1, "output"])


def test_every_path_reads_a_chain_of_thought_answer_after_its_last_mark():
    text = "The answer: maybe happy, since it rises. Answer: sad"
    assert split_answer(text) == ("The answer: maybe happy, since it rises. ", " sad") and final_answer(text) == " sad"
    assert reasoning_before_answer(text) == "The answer: maybe happy, since it rises."
    assert reasoning_before_answer("no mark at all ") == "no mark at all" and final_answer("happy") == "happy"


def test_base_model_ignores_trained_parts(model, tmp_path):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01)
    try:
        model.save(tmp_path / "ckpt")
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
    base = base_model(tmp_path / "ckpt")
    assert base.num_slots == 0 and len(base.heads) == 0
    lora_b = [p for n, p in base.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    with pytest.raises(FileNotFoundError, match="not a CoAT checkpoint"):
        base_model(tmp_path)


def test_token_budget_covers_the_longest_reference(model, librispeech):
    rows, _ = load_suite("librispeech", librispeech)
    tokenizer = model.backbone.tokenizer
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in rows["answer"])
    budget = token_budget(default_suites()["librispeech"], rows, tokenizer)
    assert budget >= longest + 4 and budget > 16
    assert token_budget(default_suites()["mmau"], rows, tokenizer) == 64
    assert token_budget(default_suites()["librispeech"], rows, tokenizer, override=7) == 7


# ---------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    app.command()(eval_command)

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
        return result.exit_code, " ".join(result.output.split())

    return invoke


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    saved = tmp_path_factory.mktemp("checkpoint")
    model.cfg.eval.max_examples = 2  # what training-time evaluation used: `coat eval` must not inherit it
    try:
        return model.save(saved)
    finally:
        model.cfg.eval.max_examples = None


def test_coat_is_compared_with_both_baselines_on_the_same_examples(cli, checkpoint, tmp_path):
    out = tmp_path / "preds.jsonl"
    code, output = cli("--checkpoint", checkpoint, "--split", "train", "--max-examples", "4", "--baseline", "base",
                       "--baseline", "cot", "--cot-tokens", "4", "--out", out)
    assert code == 0, output
    for text in ("coat", "base", "cot", "time to first token", "paired comparison", "4 of 10, stratified by task"):
        assert text in output
    files = [out, tmp_path / "preds.base.jsonl", tmp_path / "preds.cot.jsonl"]
    ids = [[json.loads(line)["id"] for line in f.read_text().splitlines()] for f in files]
    assert len(ids[0]) == 4 and ids[0] == ids[1] == ids[2]
    record = json.loads(out.read_text().splitlines()[0])
    assert {"id", "answer", "prediction", "correct", "output"} <= set(record)
    made = json.loads((tmp_path / "preds.provenance.json").read_text())
    assert made["code_sha256"] == provenance()["code_sha256"] and "version.jiwer" in made
    assert set(made["systems"]) == {"coat", "base", "cot"} and made["systems"]["cot"]["max_new_tokens"] > 0
    assert "scored by coat" in output


def test_a_mixture_is_scored_source_by_source_and_pooled_only_where_the_metric_is_one_kind(checkpoint, manifest):
    rows = read_manifest(manifest)
    rows = rows.assign(mixture=["mini" if i % 2 else "bench" for i in range(len(rows))],
                       source=[None if i % 2 else "mmau" for i in range(len(rows))])
    parts = source_parts(rows, default_suites())
    assert [(source, suite, len(part)) for source, suite, part in parts] == [("bench", "mmau", 6),
                                                                             ("mini", "coat-mini", 6)]
    cfg = replace(load_config().eval, latency_examples=0, bootstrap=50)
    (report,) = evaluate_systems(checkpoint, parts, cfg, [], "cpu")
    bench = report.examples[report.examples["source"] == "bench"]
    choice = bench[bench["choices"].notna()]
    assert list(choice["correct"]) == [string_match(a, r, c) for a, r, c in
                                       zip(choice["answer"], choice["response"], choice["choices"], strict=True)]
    metrics = report.metrics()
    for source, part in report.examples.groupby("source"):
        for task, group in part[part["task"] != "transcription"].groupby("task"):
            assert metrics[f"eval/{source}/{task}/accuracy"] == pytest.approx(group["correct"].mean())
    for task, group in report.examples[report.examples["task"] != "transcription"].groupby("task"):
        assert metrics[f"eval/{task}/accuracy"] == pytest.approx(group["correct"].mean()), "pooled accuracy"
    assert report.setting["suite"] == "bench:mmau+mini:coat-mini" and len(report.examples) == len(rows)


def test_mmau_is_evaluated_whole_and_written_in_its_submission_format(cli, checkpoint, mmau, tmp_path):
    out = tmp_path / "mmau.json"
    code, output = cli("--checkpoint", checkpoint, "--suite", "mmau", "--data", mmau, "--out", out)
    assert code == 0, output
    submitted = json.loads(out.read_text())
    assert len(submitted) == 9 and all("model_output" in item for item in submitted)  # all but the silent clip
    assert {item["id"] for item in submitted} == {f"m{i}" for i in range(9)}
    for text in ("reasoning/task.sound", "reasoning/difficulty.hard", "1 rows quarantined (not evaluated: "
                 "missing_file 1)", "duplicate_choices 1", "answer_not_in_choices 1", "examples: all"):
        assert text in output, text
    official = official_accuracy(out, "model_output", ("task",))
    scored = re.search(r"reasoning │ accuracy │ ([\d.]+) \[", output).group(1)
    assert float(scored) == pytest.approx(official["total"], abs=5e-4), "coat eval's number is the official one"
    code, output = cli("--checkpoint", checkpoint, "--suite", "mmau", "--data", mmau, "--max-examples", "3",
                       "--out", out)
    assert code == 0 and "3 of 10, stratified by group.task, seed 0" in output
    assert sorted(item["task"] for item in json.loads(out.read_text())) == ["music", "sound", "speech"]


def test_mmau_circular_eval_scores_each_rotation_by_string_match_and_pairs_on_it(cli, checkpoint, mmau, tmp_path):
    out = tmp_path / "mmau.json"
    code, output = cli("--checkpoint", checkpoint, "--suite", "mmau", "--data", mmau, "--out", out, "--circular",
                       "--baseline", "base")
    assert code == 0, output
    assert "circular_accuracy" in output and "reasoning/task.sound" in output
    submitted = json.loads(out.read_text())
    assert len(submitted) == 9 and not any("@rotation" in item["id"] for item in submitted), "one answer an item"
    assert output.count("circular_accuracy") >= 2, "the table and the paired comparison"


def test_a_librispeech_copy_is_transcribed_and_scored_by_wer(cli, checkpoint, librispeech, tmp_path):
    code, output = cli("--checkpoint", checkpoint, "--suite", "librispeech", "--data", librispeech, "--out",
                       tmp_path / "ls.jsonl")
    assert code == 0, output
    assert "transcription" in output and "wer" in output
    assert len((tmp_path / "ls.jsonl").read_text().splitlines()) == 3


def test_evaluation_errors_name_the_problem(cli, checkpoint, tmp_path):
    code, output = cli("--checkpoint", checkpoint, "--suite", "mmau")
    assert code == 2 and "needs --data" in output
    code, output = cli("--checkpoint", checkpoint, "--suite", "nope")
    assert code == 2 and "'nope' is not one of" in output
    code, output = cli("--checkpoint", checkpoint, "--baseline", "gpt")
    assert code == 2 and "'gpt' is not one of" in output
    code, output = cli("--checkpoint", checkpoint, "--suite", "gtzan", "--data", tmp_path / "missing")
    assert code == 1 and "missing: no genre folders found" in output
    code, output = cli("--checkpoint", tmp_path, "--split", "train")
    assert code == 1 and "not a CoAT checkpoint" in output


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def mmau(tmp_path_factory) -> Path:
    """Ten items in MMAU test-mini's layout, three per task, with its quirks: a list-valued category, duplicate
    choices, one item without its question and one whose answer is not among its choices (both scored, as the
    official script scores them), and one whose audio is missing (dropped, counted, never silently)."""
    root = tmp_path_factory.mktemp("MMAU")
    items = []
    for i, task in enumerate(["sound", "music", "speech"] * 3):
        choices = ["Man", "Woman", "Child", "Child"] if i == 1 else ["Man", "Woman", "Child"]
        items.append({"id": f"m{i}", "audio_id": f"./test-mini-audios/m{i}.wav", "question": "Who is it?",
                      "choices": choices, "answer": "Woman", "task": task, "split": "test-mini",
                      "category": ["Reasoning"] if i == 2 else "Reasoning", "sub-category": "Source",
                      "difficulty": ["easy", "medium", "hard"][i // 3]})
        write_tone(root / "test-mini-audios" / f"m{i}.wav", hz=200 + 40 * i)
    del items[8]["question"]
    items[7]["answer"] = "Robot"
    items.append(items[0] | {"id": "m9", "audio_id": "./test-mini-audios/gone.wav"})
    (root / "mmau-test-mini.json").write_text(json.dumps(items))
    return root


def test_a_subsample_names_the_column_it_was_really_stratified_by():

    cfg = replace(load_config().eval, max_examples=4)
    recipe = default_suites()["mmau"]  # single-family benchmarks stratify by their first breakdown
    one_family = pd.DataFrame({"id": [str(i) for i in range(8)], "task": ["reasoning"] * 8,
                               "group.task": ["sound", "music"] * 4})
    assert choose_rows(one_family, recipe, cfg)[1] == "group.task"
    chosen, by = choose_rows(one_family.drop(columns="group.task"), recipe, cfg)
    assert (len(chosen), by) == (4, "task")
