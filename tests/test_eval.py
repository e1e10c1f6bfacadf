"""Evaluation: answer parsing, metrics, the runner on real coat-mini audio with a tiny CoAT model, the CLI, and
the benchmark loaders on small copies written in the benchmarks' published layouts."""

import json
import math
from pathlib import Path

import jiwer
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import typer
from typer.testing import CliRunner

from coat.config import load_config
from coat.data.audio import decode
from coat.data.manifest import read_manifest, validate_rows
from coat.data.synth import EMOTIONS, EVENTS, PITCH_CLASSES, synthesize
from coat.eval.benchmarks import (
    GTZAN_GENRES,
    MELD_EMOTIONS,
    load_gtzan,
    load_librispeech,
    load_meld,
    load_mmar,
    load_mmau,
)
from coat.eval.cli import eval_command
from coat.eval.metrics import bootstrap_ci, chance_level, word_error_rate, word_errors
from coat.eval.runner import COT_SUFFIX, base_model, evaluate
from coat.eval.tasks import is_correct, normalise_text, parse_answer
from coat.model import CoATModel

LETTERED = ["(A) Man", "(B) Woman", "(C) Child"]
MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on 2 shared cores: intra-op threads only contend (a decode step goes from ms to 0.5 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("coat-mini"), 12, 0, workers=0)


@pytest.fixture(scope="module")
def model(manifest) -> CoATModel:
    cfg = load_config(overrides=[
        "experts.names=[]", "thinking.num_slots=2", "thinking.max_slots=4", "backbone.audio_window_s=8",
        f"data.manifest={manifest}", "eval.batch_size=4", f"eval.max_new_tokens={MAX_NEW_TOKENS}",
        "eval.bootstrap=200",
    ])
    return CoATModel(cfg).eval()


@pytest.fixture(scope="module")
def report(model, manifest):
    return evaluate(model, read_manifest(manifest), model.cfg.eval, progress=False)


def _write_tone(path: Path, seconds: float = 1.0, hz: float = 440.0, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate)  # format from the suffix
    return path


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, choices, expected", [
    ("sad", EMOTIONS, "sad"),  # exact
    ("  SAD. ", EMOTIONS, "sad"),  # case and punctuation
    ("The speaker sounds angry to me.", EMOTIONS, "angry"),  # extra words
    ("happy, or maybe sad", EMOTIONS, "happy"),  # the first mention wins
    ("I hear sadness", EMOTIONS, ""),  # whole words only
    ("no idea", EMOTIONS, ""),  # unanswered
    ("I hear C# here", PITCH_CLASSES, "C#"),  # symbols that choices contain are kept: not "C"
    ("c.", PITCH_CLASSES, "C"),
    ("a loud noise burst", EVENTS, "noise burst"),  # multi-word choices
    ("Maybe happy, maybe sad. Answer: angry", EMOTIONS, "angry"),  # chain of thought: after the last mark
    ("(B)", LETTERED, "(B) Woman"),  # letters, when the choices are lettered
    ("B) is my guess", LETTERED, "(B) Woman"),
    ("c", LETTERED, "(C) Child"),
    ("a woman", LETTERED, "(B) Woman"),  # a lettered choice's text alone also names it
    ("(B)", ["Man", "Woman"], ""),  # no letters to refer to
])
def test_parse_answer_multiple_choice(text, choices, expected):
    assert parse_answer("reasoning", text, list(choices)) == expected


def test_parse_answer_transcription_normalises():
    assert parse_answer("transcription", "The cat, sat -- on the MAT!", None) == "the cat sat on the mat"
    assert parse_answer("transcription", "Don't  STOP", None) == normalise_text("DON'T STOP") == "dont stop"


def test_is_correct():
    assert is_correct("emotion", "sad", "sad", list(EMOTIONS))
    assert not is_correct("emotion", "happy", "sad", list(EMOTIONS))
    assert not is_correct("emotion", "", "sad", list(EMOTIONS))
    assert is_correct("transcription", "the cat sat", "The cat sat.")
    assert not is_correct("transcription", "the cat", "the cat sat")


# ---------------------------------------------------------------- metrics

def test_wer_matches_jiwer():
    refs = ["the cat sat on the mat", "hello world"]
    hyps = ["the cat sat on mat", "hello there world"]
    errors, words = word_errors(refs, hyps)
    assert errors.tolist() == [1, 1] and words.tolist() == [6, 2]
    est = word_error_rate(refs, hyps, n=200)
    assert est.value == pytest.approx(0.25) == jiwer.wer(refs, hyps)
    assert word_error_rate(["a b c"], [""], n=10).value == 1.0
    with pytest.raises(ValueError, match="2 references but 1"):
        word_errors(refs, hyps[:1])


def test_bootstrap_contains_the_estimate_and_shrinks_with_n():
    widths = {}
    for n in (20, 2000):
        correct = np.arange(n) < 0.7 * n
        low, high = bootstrap_ci(correct, n=1000, seed=0)
        assert low <= correct.mean() <= high
        widths[n] = high - low
    assert widths[2000] < widths[20] / 5
    assert widths[2000] == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 2000), rel=0.2)  # the normal approximation
    assert bootstrap_ci(np.arange(50) % 3 == 0, n=300, seed=1) == bootstrap_ci(np.arange(50) % 3 == 0, n=300, seed=1)
    with pytest.raises(ValueError, match="1-D of one length"):
        bootstrap_ci([1, 0], [1], n=10)


def test_chance_level():
    assert chance_level([["a", "b"], ["a", "b", "c", "d"], None]) == pytest.approx(0.375)
    assert math.isnan(chance_level([None, None]))


# ---------------------------------------------------------------- runner

def test_evaluate_scores_every_example(report, manifest):
    rows = read_manifest(manifest)
    ex = report.examples
    assert ex["id"].tolist() == rows["id"].tolist() and report.quarantine.empty
    table = report.table.set_index("task")
    assert set(table.index) == set(rows["task"])
    for task, group in ex.groupby("task"):
        assert table.loc[task, "n"] == len(group)
        if task == "transcription":
            refs = [normalise_text(a) for a in group["answer"]]
            assert table.loc[task, "metric"] == "wer"
            assert table.loc[task, "value"] == pytest.approx(jiwer.wer(refs, list(group["prediction"])))
        else:
            assert table.loc[task, "metric"] == "accuracy"
            assert table.loc[task, "value"] == pytest.approx(group["correct"].mean())
            assert group["prediction"].isin([*group["choices"].iloc[0], ""]).all()
    assert table.loc["emotion", "chance"] == pytest.approx(1 / len(EMOTIONS))
    speech = ex[ex["task"] == "transcription"]
    assert (speech["prediction"] == [normalise_text(t) for t in speech["text"]]).all()


def test_latency_one_prefill_then_one_call_per_token(report):
    ex = report.examples
    batches = ex.groupby("batch").agg(ttft=("ttft_s", "first"), total=("total_s", "first"),
                                      calls=("llm_calls", "first"), longest=("new_tokens", "max"), n=("id", "size"))
    assert batches["n"].tolist() == [4, 4, 4]
    assert ((batches["ttft"] > 0) & (batches["ttft"] < batches["total"])).all()
    assert (batches["calls"] == batches["longest"]).all()  # prefill makes token 1, each decode step one more
    assert ex["new_tokens"].between(1, MAX_NEW_TOKENS).all()
    metrics = report.metrics()
    assert metrics["eval/latency/ttft_s"] == pytest.approx(ex["ttft_s"].mean())
    emotion = report.table.set_index("task").loc["emotion"]
    assert metrics["eval/emotion/accuracy"] == emotion["value"]
    assert metrics["eval/emotion/accuracy_ci_low"] == emotion["ci_low"]
    assert metrics["eval/transcription/wer"] == report.table.set_index("task").loc["transcription", "value"]


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


def test_cot_costs_decode_steps(model, manifest):
    rows = read_manifest(manifest).head(4)
    plain = evaluate(model, rows, model.cfg.eval, progress=False)
    cot = evaluate(model, rows, model.cfg.eval, prompt_suffix=COT_SUFFIX, max_new_tokens=MAX_NEW_TOKENS + 12,
                   progress=False)
    assert cot.latency["new_tokens"] > plain.latency["new_tokens"]
    assert cot.latency["llm_calls"] > plain.latency["llm_calls"]
    assert cot.latency["total_s"] > plain.latency["total_s"]


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


# ---------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    app.command()(eval_command)

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        return result.exit_code, " ".join(result.output.split())  # rich wraps at the 80-column default

    return invoke


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    return model.save(tmp_path_factory.mktemp("checkpoint"))


def test_cli_evaluates_a_checkpoint_on_coat_mini(cli, checkpoint):
    code, output = cli("--checkpoint", checkpoint, "--split", "train", "--max-examples", "4")
    assert code == 0, output
    for task in ("reasoning", "understanding", "music", "emotion"):  # the first four train rows
        assert task in output
    assert "transcription" not in output
    assert "time to first token" in output


def test_cli_evaluates_a_benchmark_copy(cli, checkpoint, librispeech):
    code, output = cli("--checkpoint", checkpoint, "--suite", "librispeech", "--data", librispeech)
    assert code == 0, output
    assert "transcription" in output and "wer" in output


def test_cli_errors_name_the_problem(cli, checkpoint, tmp_path):
    code, output = cli("--checkpoint", checkpoint, "--suite", "mmau")
    assert code == 2 and "needs --data" in output
    code, output = cli("--checkpoint", checkpoint, "--suite", "nope")
    assert code == 2 and "'nope' is not one of" in output
    code, output = cli("--checkpoint", checkpoint, "--suite", "gtzan", "--data", tmp_path / "missing")
    assert code == 1 and "missing: no genre folders found" in output
    code, output = cli("--checkpoint", tmp_path, "--split", "train")
    assert code == 1 and "not a CoAT checkpoint" in output


# ---------------------------------------------------------------- benchmark loaders

def _check_manifest_shape(df: pd.DataFrame) -> None:
    good, quarantine = validate_rows(df)
    assert quarantine.empty, quarantine
    for path in df["audio"]:
        assert Path(path).is_absolute() and Path(path).is_file()


def test_load_mmau(tmp_path):
    items = [
        {"id": f"q{i}", "audio_id": f"./test-mini-audios/q{i}.wav", "question": f"Question {i}?",
         "choices": ["Man", "Woman", "Child", "Robot"], "answer": "Woman", "dataset": "AudioSet", "task": task,
         "split": "test-mini", "category": "Reasoning", "sub-category": "Acoustic Source Inference",
         "difficulty": "medium"}
        for i, task in enumerate(["sound", "music", "speech"])
    ]
    (tmp_path / "mmau-test-mini.json").write_text(json.dumps(items, indent=2))
    for i in range(3):
        _write_tone(tmp_path / "test-mini-audios" / f"q{i}.wav", hz=300 + 100 * i)
    df = load_mmau(tmp_path)
    _check_manifest_shape(df)
    assert df["id"].tolist() == ["q0", "q1", "q2"]
    assert df["category"].tolist() == ["sound", "music", "speech"]
    assert (df["task"] == "reasoning").all() and (df["split"] == "test").all()
    assert df.loc[1, "prompt"] == "Question 1?" and df.loc[1, "answer"] == "Woman"
    assert df.loc[1, "choices"] == ["Man", "Woman", "Child", "Robot"]
    assert df.loc[2, "audio"] == str(tmp_path / "test-mini-audios" / "q2.wav")
    assert load_mmau(tmp_path / "mmau-test-mini.json")["id"].tolist() == df["id"].tolist()


def test_load_mmar(tmp_path):
    items = [
        {"id": "a1", "audio_path": "./audio/a1.wav", "question": "Which accent?",
         "choices": ["British", "American", "Australian"], "answer": " American ", "modality": "speech",
         "category": "Semantic Layer", "sub-category": "Accent", "language": "en", "source": "youtube",
         "url": "https://example.com", "timestamp": "00:00:01,00:00:05"},
        {"id": "a2", "audio_path": "./audio/a2.wav", "question": "What plays?", "choices": ["Piano", "Guitar"],
         "answer": "Piano", "modality": "sound-music", "category": "Perception Layer", "sub-category": "Music",
         "language": "", "source": "youtube", "url": "https://example.com", "timestamp": "00:00:01,00:00:05"},
    ]
    (tmp_path / "MMAR-meta.json").write_text(json.dumps(items))
    for name in ("a1", "a2"):
        _write_tone(tmp_path / "audio" / f"{name}.wav")
    df = load_mmar(tmp_path)
    _check_manifest_shape(df)
    assert df["answer"].tolist() == ["American", "Piano"]
    assert df["category"].tolist() == ["speech", "sound-music"]


def test_load_meld(tmp_path):
    csv = pd.DataFrame({
        "Sr No.": [1, 2, 3], "Utterance": ["Oh my god!", "Fine.", "Why?"], "Speaker": ["Ross", "Rachel", "Joey"],
        "Emotion": ["surprise", "neutral", "anger"], "Sentiment": ["positive", "neutral", "negative"],
        "Dialogue_ID": [0, 0, 3], "Utterance_ID": [0, 1, 2], "Season": [1, 1, 2], "Episode": [1, 1, 4],
        "StartTime": ["00:00:01,000"] * 3, "EndTime": ["00:00:02,000"] * 3,
    })
    csv.to_csv(tmp_path / "test_sent_emo.csv", index=False)
    for d, u in [(0, 0), (0, 1), (3, 2)]:
        _write_tone(tmp_path / "output_repeated_splits_test" / f"dia{d}_utt{u}.wav")
    df = load_meld(tmp_path)
    _check_manifest_shape(df)
    assert df["id"].tolist() == ["dia0_utt0", "dia0_utt1", "dia3_utt2"]
    assert df["answer"].tolist() == ["surprise", "neutral", "anger"]
    assert (df["task"] == "emotion").all() and df.loc[0, "choices"] == list(MELD_EMOTIONS)
    csv.drop(columns="Emotion").to_csv(tmp_path / "test_sent_emo.csv", index=False)
    with pytest.raises(ValueError, match="Emotion"):
        load_meld(tmp_path)


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("LibriSpeech") / "test-clean"
    transcripts = {("84", "121123"): ["GO DO YOU HEAR", "BUT IN LESS THAN FIVE MINUTES THE STAIRCASE GROANED"],
                   ("1089", "134686"): ["HE HOPED THERE WOULD BE STEW FOR DINNER"]}
    for (speaker, chapter), lines in transcripts.items():
        folder = root / speaker / chapter
        for i, _ in enumerate(lines):
            _write_tone(folder / f"{speaker}-{chapter}-{i:04d}.flac", hz=200 + 50 * i)
        text = "".join(f"{speaker}-{chapter}-{i:04d} {line}\n" for i, line in enumerate(lines))
        (folder / f"{speaker}-{chapter}.trans.txt").write_text(text)
    return root


def test_load_librispeech(librispeech):
    df = load_librispeech(librispeech)
    _check_manifest_shape(df)
    assert df["id"].tolist() == ["1089-134686-0000", "84-121123-0000", "84-121123-0001"]
    assert df.loc[1, "answer"] == "go do you hear"
    assert (df["task"] == "transcription").all() and df["choices"].isna().all()
    assert decode(df.loc[2, "audio"], 16000).shape == (16000,)  # real FLAC


def test_load_gtzan(tmp_path):
    for name in ("blues/blues.00000.wav", "blues/blues.00001.wav", "rock/rock.00007.wav"):
        _write_tone(tmp_path / "genres_original" / name, seconds=0.5, rate=22050)
    df = load_gtzan(tmp_path)
    _check_manifest_shape(df)
    assert df["id"].tolist() == ["blues.00000", "blues.00001", "rock.00007"]
    assert df["answer"].tolist() == ["blues", "blues", "rock"]
    assert df.loc[0, "choices"] == list(GTZAN_GENRES) and (df["task"] == "music").all()


@pytest.mark.parametrize("loader, layout", [
    (load_mmau, "mmau-test-mini.json"), (load_mmar, "MMAR-meta.json"), (load_meld, "test_sent_emo.csv"),
    (load_librispeech, "trans.txt"), (load_gtzan, "genre"),
])
def test_loaders_name_the_missing_root_and_layout(tmp_path, loader, layout):
    with pytest.raises(FileNotFoundError) as err:
        loader(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and layout in str(err.value)
