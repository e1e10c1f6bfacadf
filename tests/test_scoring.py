"""Scoring as the benchmarks score: answer parsing, MMAU's/MMAR's published scorer, Whisper-normalised WER,
weighted F1, the scoring entry points, paired comparisons, predictions files, `coat score`, and the benchmark
loaders on small copies written in the benchmarks' published layouts (each quirk of the real metadata
included)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
import pandas as pd
import pytest
import typer
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from coat.cli import score_command
from coat.config import default_suites
from coat.data.audio import decode
from coat.data.corpora import (
    GTZAN_GENRES,
    MELD_EMOTIONS,
    gtzan_clips,
    gtzan_splits,
    load_gtzan,
    load_librispeech,
    load_meld,
    load_mmar,
    load_mmau,
    load_suite,
    question_rows,
    read_records,
)
from coat.data.manifest import validate_rows
from coat.data.synth import EMOTIONS, EVENTS, PITCH_CLASSES
from coat.eval.metrics import (
    bootstrap_ci,
    chance_level,
    paired_bootstrap,
    weighted_f1,
    word_error_rate,
    word_errors,
)
from coat.eval.scoring import (
    TABLE_COLUMNS,
    normalise_transcript,
    paired_comparison,
    read_predictions,
    results_table,
    score_examples,
    string_match,
    table_metrics,
    write_predictions,
)
from coat.eval.tasks import is_correct, normalise_text, parse_answer
from coat.provenance import provenance
from tests.conftest import write_tone

LETTERED = ["(A) Man", "(B) Woman", "(C) Child"]
VOICES = ["Man", "Woman", "Child", "Robot"]


def official_string_match(answer, prediction, choices):
    """Reference oracle: `string_match` copied verbatim from MMAU's evaluation.py (github.com/Sakshi113/MMAU);
    MMAR's code/evaluation.py (github.com/ddlBoJack/MMAR) holds the same function."""
    # Function to normalize and tokenize text
    def tokenize(text):
        # Convert to lowercase and find all word tokens
        return set(re.findall(r'\b\w+\b', text.lower()))

    # Tokenize prediction and answer
    prediction_tokens = tokenize(prediction)
    answer_tokens = tokenize(answer)

    if not prediction_tokens:
        return False

    # Tokenize incorrect choices and exclude tokens present in the answer
    incorrect_tokens = set()
    for choice in choices:
        choice_tokens = tokenize(choice)
        if choice_tokens != answer_tokens:
            incorrect_tokens.update(choice_tokens - answer_tokens)

    # Condition 1: All tokens of the answer are in the prediction
    cond1 = answer_tokens.issubset(prediction_tokens)

    # Condition 2: Prediction does not contain any tokens from incorrect choices (excluding shared words)
    cond2 = prediction_tokens.isdisjoint(incorrect_tokens)

    return cond1 and cond2


def official_accuracy(path: Path, output_key: str, group_keys: tuple[str, ...]) -> dict[str, float]:
    """Reference oracle: the reading and counting loop of the official evaluation.py scripts (MMAU's reads one
    JSON list, MMAR's picks JSON or JSON Lines by the name's ending), reduced to the accuracies they print."""
    name = str(path)
    with open(name) as f:
        data = json.load(f) if name.endswith("json") else [json.loads(line.strip()) for line in f]
    counts: dict[str, list[int]] = {"total": [0, 0]}
    for sample in data:
        if output_key not in sample:
            continue
        match = official_string_match(sample["answer"], sample[output_key], sample["choices"])
        for key in ["total", *(f"{g}.{sample[g]}" for g in group_keys)]:
            counts.setdefault(key, [0, 0])
            counts[key][0] += match
            counts[key][1] += 1
    return {key: right / total for key, (right, total) in counts.items()}


def _examples(rows: list[tuple], **extra) -> pd.DataFrame:
    """(id, task, answer, choices, response) tuples as an example table."""
    df = pd.DataFrame(rows, columns=["id", "task", "answer", "choices", "response"]).astype({"choices": object})
    return df.assign(**extra)


# ---------------------------------------------------------------- parsing (the `choice` rule)

@pytest.mark.parametrize("text, choices, expected", [
    ("sad", EMOTIONS, "sad"),  # exact
    ("  SAD. ", EMOTIONS, "sad"),  # case and punctuation
    ("The speaker sounds angry to me.", EMOTIONS, "angry"),  # extra words
    ("happy, or maybe sad", EMOTIONS, ""),  # hedging names two choices: no answer
    ("not happy but sad", EMOTIONS, ""),  # the rule reads names, not negations
    ("sad, definitely sad", EMOTIONS, "sad"),  # one choice named twice is still one choice
    ("I hear sadness", EMOTIONS, ""),  # whole words only
    ("no idea", EMOTIONS, ""),  # unanswered
    ("I hear C# here", PITCH_CLASSES, "C#"),  # symbols that choices contain are kept: not "C"
    ("C or C#", PITCH_CLASSES, ""),
    ("c.", PITCH_CLASSES, "C"),
    ("a loud noise burst", EVENTS, "noise burst"),  # multi-word choices
    ("a loud noise burst", [*EVENTS, "noise"], "noise burst"),  # "noise" inside "noise burst" is not named
    ("noise, then a noise burst", [*EVENTS, "noise"], ""),  # but named on its own it is
    ("Maybe happy, maybe sad. Answer: angry", EMOTIONS, "angry"),  # chain of thought: after the last mark
    ("(B)", LETTERED, "(B) Woman"),  # letters, when the choices are lettered
    ("B) is my guess", LETTERED, "(B) Woman"),
    ("c", LETTERED, "(C) Child"),
    ("a woman", LETTERED, "(B) Woman"),  # a lettered choice's text alone also names it
    ("(A) or (B)", LETTERED, ""),
    ("(B)", ["Man", "Woman"], ""),  # no letters to refer to
    ("fourteen", ["four", "nine", "fourteen", "fourteen"], "fourteen"),  # duplicate choices are one choice
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


# ---------------------------------------------------------------- MMAU's / MMAR's string_match

GRASSLAND = ["Mountain Canyon", "Dense Forest", "Open Grassland", "City Streets"]
DOGS = ["A dog barking ", "A dog growling", "A cat hissing", "A person coughing"]
SECONDS = ["1.63 seconds", "2.74 seconds", "1.53 seconds", "1.63 seconds"]


@pytest.mark.parametrize("answer, prediction, choices, expected", [
    ("Man", "Man", VOICES, True),
    ("Man", "The speaker is an adult MAN.", VOICES, True),  # case, punctuation, extra words
    ("Man", "man or woman", VOICES, False),  # hedging names another choice's token
    ("happy", "happy or sad", ["happy", "sad", "angry"], False),
    ("Man", "", VOICES, False),  # empty
    ("Man", "?!", VOICES, False),  # no word tokens at all
    ("Open Grassland", "an open grassland, far from the city", GRASSLAND, False),  # "city" is another choice's
    ("Open Grassland", "Grassland", GRASSLAND, False),  # every answer token is needed
    ("Open Grassland", "the open grassland of Mongolia", GRASSLAND, True),  # words no choice has are fine
    ("A dog growling", "a dog growling", DOGS, True),  # "a", "dog": shared with other choices, allowed
    ("A dog growling", "dog growling", DOGS, False),  # the answer's "a" is missing
    ("A dog growling", "a dog growling, not barking", DOGS, False),
    ("thirteen", "thirteen", ["thirteen", "twenty", "thirteen", "five"], True),  # the answer duplicated
    ("nine", "fourteen", ["four", "nine", "fourteen", "fourteen"], False),
    ("1.63 seconds", "1.63 seconds", SECONDS, True),
    ("1.63 seconds", "about 1.63 seconds, not 2.74", SECONDS, False),
    ("Man", "a man", ["man", "Man", "Woman"], True),  # choices with the answer's very tokens are ignored
])
def test_string_match_hand_checked(answer, prediction, choices, expected):
    assert string_match(answer, prediction, choices) is expected
    assert official_string_match(answer, prediction, choices) is expected


def test_string_match_agrees_with_the_official_function():
    choice_sets = [VOICES, GRASSLAND, DOGS, SECONDS, ["four", "nine", "fourteen", "fourteen"], list(EMOTIONS),
                   ["Café au lait", "Thé vert", "Eau"], ["C#", "C", "D"], ["yes", "no"]]
    cases = 0
    for choices in choice_sets:
        predictions = ["", "   ", "I don't know", *choices, *(f"{a} or {b}" for a in choices for b in choices),
                       *(f"The answer is: {c.upper()}!" for c in choices), *(c.split()[-1] for c in choices)]
        for answer in choices:
            for prediction in predictions:
                assert string_match(answer, prediction, choices) == official_string_match(answer, prediction,
                                                                                           choices), (answer,
                                                                                                      prediction)
                cases += 1
    assert cases > 500


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


def test_whisper_normalised_wer_ignores_conventions():
    ref = "MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES AND WE ARE GLAD TO WELCOME HIS GOSPEL"
    hyp = "Mr. Quilter is the apostle of the middle classes, and we are glad to welcome his gospel."
    assert normalise_transcript(ref) == normalise_transcript(hyp)
    assert normalise_transcript("TWENTY ONE") == normalise_transcript("21") == "21"
    assert normalise_transcript("COLOUR") == normalise_transcript("color")
    rows = _examples([("u1", "transcription", ref, None, hyp), ("u2", "transcription", "TWENTY ONE", None, "21"),
                      ("u3", "transcription", "I DON'T KNOW", None, "i do not know")])
    scored = score_examples(rows, "wer")
    assert scored["wer"].tolist() == [0.0, 0.0, 0.0] and scored["correct"].all()
    table = results_table(scored, metrics=["accuracy"], breakdowns=[], scoring="generate", n=50)
    assert table.loc[0, "metric"] == "wer" and table.loc[0, "value"] == 0.0
    one_wrong = score_examples(rows.assign(response=[hyp, "22", "i do not know"]), "wer")
    assert one_wrong["wer"].tolist() == [0.0, 1.0, 0.0] and one_wrong["correct"].tolist() == [True, False, True]
    words = len(normalise_transcript(ref).split()) + 1 + 4
    assert results_table(one_wrong, metrics=[], breakdowns=[], scoring="generate", n=50).loc[0, "value"] == \
        pytest.approx(1 / words)


def test_weighted_f1_matches_sklearn_and_counts_no_answer_as_wrong():
    gold = ["joy", "joy", "anger", "neutral", "neutral", "neutral", "sadness", "joy"]
    said = ["joy", "", "anger", "neutral", "joy", "", "sadness", "joy"]
    est = weighted_f1(gold, said, n=300, seed=0)
    expected = f1_score(gold, said, labels=sorted(set(gold)), average="weighted", zero_division=0)
    assert est.value == pytest.approx(expected) and est.n == 8
    assert est.ci_low <= est.value <= est.ci_high
    assert weighted_f1(gold, said, n=300, seed=0) == est  # seeded
    assert weighted_f1(gold, gold, n=50).value == 1.0
    with pytest.raises(ValueError, match="8 gold labels but 7"):
        weighted_f1(gold, said[:7])


def test_paired_bootstrap_is_centred_on_the_difference():
    a = np.arange(200) % 10 < 7
    b = np.arange(200) % 10 < 5
    low, high, p = paired_bootstrap(a, b, n=500, seed=0)
    assert low < 0.2 < high and p < 0.01
    assert paired_bootstrap(a, a, n=200) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="1-D of one length"):
        paired_bootstrap([1, 0], [1])


# ---------------------------------------------------------------- score_examples / results_table

def test_score_examples_per_rule():
    rows = _examples([
        ("q1", "reasoning", "Man", VOICES, "It is a man."),
        ("q2", "reasoning", "Man", VOICES, "man or woman"),
        ("q3", "reasoning", "Woman", VOICES, "Child"),
        ("q4", "emotion", "happy", list(EMOTIONS), "happy, or maybe sad"),
        ("q5", "emotion", "sad", list(EMOTIONS), "Answer: sad"),
        ("t1", "transcription", "HELLO WORLD", None, "Hello, world!"),
    ])
    matched = score_examples(rows, "string_match")
    assert matched["correct"].tolist() == [True, False, False, False, True, True]
    assert matched["prediction"].tolist()[:4] == ["Man", "man or woman", "Child", "happy, or maybe sad"]
    assert matched.loc[5, "prediction"] == "hello world" and matched.loc[5, "wer"] == 0.0
    assert matched["wer"].iloc[:5].isna().all()
    chosen = score_examples(rows, "choice")
    assert chosen["prediction"].tolist() == ["Man", "", "Child", "", "sad", "hello world"]
    assert chosen["correct"].tolist() == [True, False, False, False, True, True]
    assert score_examples(rows, "wer")["prediction"].tolist() == chosen["prediction"].tolist()
    assert "prediction" not in rows  # the input is left as it was
    with pytest.raises(ValueError, match="'exact' is not one of string_match, choice, wer"):
        score_examples(rows, "exact")
    with pytest.raises(ValueError, match="lack the columns"):
        score_examples(rows.drop(columns=["response", "choices"]), "choice")
    with pytest.raises(ValueError, match=r"\['q1'\] have no answer"):
        score_examples(rows.assign(answer=[None, *rows["answer"][1:]]), "choice")


def test_score_examples_takes_loglik_choices_as_they_are():
    rows = _examples([("q1", "emotion", "sad", list(EMOTIONS), None), ("q2", "emotion", "sad", list(EMOTIONS), None),
                      ("t1", "transcription", "hello world", None, "hello word")],
                     prediction=["sad", "happy", None])
    scored = score_examples(rows.drop(columns="response").assign(response=[None, None, "hello word"]), "choice")
    assert scored["correct"].tolist() == [True, False, False]
    assert scored.loc[2, "wer"] == 0.5
    no_response = score_examples(rows.drop(columns="response").head(2), "string_match")
    assert no_response["correct"].tolist() == [True, False]


def test_weighted_f1_is_compared_with_its_own_chance():
    answers = ["joy"] * 6 + ["anger"] * 3 + ["fear"]
    examples = score_examples(_examples([(f"m{i}", "emotion", a, list(MELD_EMOTIONS), "joy")
                                         for i, a in enumerate(answers)]), "choice")
    table = results_table(examples, metrics=["accuracy", "weighted_f1"], breakdowns=[], scoring="generate",
                          n=10).set_index("metric")
    assert table.loc["accuracy", "chance"] == pytest.approx(1 / 7)
    assert table.loc["weighted_f1", "chance"] == pytest.approx(0.6**2 + 0.3**2 + 0.1**2)
    metrics = table_metrics(table.reset_index())
    assert metrics["eval/emotion/chance"] == pytest.approx(1 / 7)
    assert metrics["eval/emotion/weighted_f1_chance"] == pytest.approx(0.46)


def test_a_chosen_choice_scores_as_the_official_script_scores_its_text(tmp_path):
    """An event-order item whose choices are permutations of the same words: choosing another order holds every
    answer word and no word only other choices have, so MMAU's own script counts it right."""
    order = ["dog barks then car passes", "car passes then dog barks", "car passes dog barks then"]
    items = [{"id": "e1", "audio_id": "e1.wav", "question": "Which order?", "choices": order, "answer": order[0],
              "task": "sound", "difficulty": "hard"},
             {"id": "e2", "audio_id": "e2.wav", "question": "Who?", "choices": VOICES, "answer": "Man",
              "task": "sound", "difficulty": "easy"}]
    rows = question_rows("mmau", items, tmp_path)[0].assign(response=None, prediction=[order[1], "Woman"],
                                                             scoring="loglik")
    examples = score_examples(rows, "string_match")
    path = write_predictions(examples, "mmau", tmp_path / "mmau.json")
    assert [item["model_output"] for item in json.loads(path.read_text())] == [order[1], "Woman"]
    assert examples["correct"].tolist() == [True, False]
    official = official_accuracy(path, "model_output", ("task",))
    table = results_table(examples, metrics=["accuracy"], breakdowns=[], scoring="loglik", n=10)
    assert table["value"].iloc[0] == official["total"] == 0.5
    back = score_examples(read_predictions(path, "mmau"), "string_match")
    assert back["correct"].tolist() == examples["correct"].tolist(), "coat score reads the file the same way"


@pytest.fixture
def scored_mmau_like() -> pd.DataFrame:
    df = _examples([(f"q{i}", "reasoning", "Man", VOICES, "man" if i % 4 else "woman") for i in range(12)])
    df["group.task"] = [("sound", "music", "speech")[i % 3] for i in range(12)]
    df["group.difficulty"] = ["easy", "hard"] * 6
    df["group.sub-category"] = ["Acoustic Source/Inference"] * 11 + [None]
    return score_examples(df, "string_match")


def test_results_table_rows_breakdowns_and_names(scored_mmau_like):
    table = results_table(scored_mmau_like, metrics=["accuracy"], breakdowns=["task", "difficulty", "sub-category"],
                          scoring="generate", n=200)
    assert tuple(table.columns) == TABLE_COLUMNS
    assert table["task"].tolist() == [
        "reasoning", "reasoning/task.music", "reasoning/task.sound", "reasoning/task.speech",
        "reasoning/difficulty.easy", "reasoning/difficulty.hard", "reasoning/sub-category.Acoustic Source_Inference"]
    by_task = table.set_index("task")
    correct = scored_mmau_like["correct"]
    assert by_task.loc["reasoning", "value"] == pytest.approx(correct.mean()) == 0.75
    assert by_task.loc["reasoning/task.sound", "value"] == pytest.approx(
        correct[scored_mmau_like["group.task"] == "sound"].mean())
    assert by_task.loc["reasoning/sub-category.Acoustic Source_Inference", "n"] == 11  # the None is not a value
    assert (table["chance"] == 0.25).all() and (table["scoring"] == "generate").all()
    assert (table["ci_low"] <= table["value"]).all() and (table["value"] <= table["ci_high"]).all()
    again = results_table(scored_mmau_like, metrics=["accuracy"], breakdowns=["task", "difficulty", "sub-category"],
                          scoring="generate", n=200)
    pd.testing.assert_frame_equal(table, again)  # seeded
    with pytest.raises(ValueError, match=r"group\.modality"):
        results_table(scored_mmau_like, metrics=["accuracy"], breakdowns=["modality"], scoring="generate")
    with pytest.raises(ValueError, match="'sample' is not one of generate, loglik"):
        results_table(scored_mmau_like, metrics=["accuracy"], breakdowns=[], scoring="sample")
    with pytest.raises(ValueError, match=r"\['f1'\] are not among"):
        results_table(scored_mmau_like, metrics=["f1"], breakdowns=[], scoring="generate")


def test_results_table_weighted_f1_and_mixed_families():
    gold = ["joy", "joy", "anger", "neutral", "neutral", "sadness"]
    said = ["joy", "joy or anger", "anger", "neutral", "joy", "I cannot tell"]
    pairs = enumerate(zip(gold, said, strict=True))
    rows = _examples([(f"m{i}", "emotion", g, list(MELD_EMOTIONS), s) for i, (g, s) in pairs]
                     + [("t1", "transcription", "hello world", None, "hello")])
    table = results_table(score_examples(rows, "choice"), metrics=["accuracy", "weighted_f1"], breakdowns=[],
                          scoring="generate", n=100).set_index(["task", "metric"])
    predicted = ["joy", "", "anger", "neutral", "joy", ""]
    assert table.loc[("emotion", "accuracy"), "value"] == pytest.approx(3 / 6)
    assert table.loc[("emotion", "weighted_f1"), "value"] == pytest.approx(
        f1_score(gold, predicted, labels=sorted(set(gold)), average="weighted", zero_division=0))
    assert table.loc[("emotion", "accuracy"), "chance"] == pytest.approx(1 / 7)
    assert table.loc[("transcription", "wer"), "value"] == 0.5
    assert math.isnan(table.loc[("transcription", "wer"), "chance"])


def test_table_metrics_names_the_scoring_mode(scored_mmau_like):
    generate = results_table(scored_mmau_like, metrics=["accuracy"], breakdowns=["task"], scoring="generate", n=50)
    metrics = table_metrics(generate)
    assert metrics["eval/reasoning/accuracy"] == 0.75
    assert metrics["eval/reasoning/n"] == 12.0 and metrics["eval/reasoning/chance"] == 0.25
    assert "eval/reasoning/task.sound/accuracy_ci_low" in metrics
    loglik = table_metrics(generate.assign(scoring="loglik"))
    assert loglik["eval/reasoning/loglik_accuracy"] == 0.75 and "eval/reasoning/accuracy" not in loglik
    speech = _examples([("t1", "transcription", "a b", None, "a b")])
    wer = results_table(score_examples(speech, "wer"), metrics=[], breakdowns=[], scoring="loglik", n=10)
    assert "eval/transcription/wer" in table_metrics(wer)  # transcripts are always generated
    assert all(re.fullmatch(r"[/\w.\- ]+", key) for key in metrics)  # MLflow's allowed characters


# ---------------------------------------------------------------- paired comparison

def test_paired_comparison_all_discordant_pairs_favour_a():
    rows = _examples([(f"q{i}", "reasoning", "Man", VOICES, "man") for i in range(20)])
    a = score_examples(rows, "string_match")
    b = score_examples(rows.assign(response="woman"), "string_match")
    out = paired_comparison(a, b, n=500).iloc[0]
    assert (out["task"], out["metric"], out["a"], out["b"], out["diff"]) == ("reasoning", "accuracy", 1.0, 0.0, 1.0)
    assert (out["a_only_correct"], out["b_only_correct"], out["n_pairs"]) == (20, 0, 20)
    assert out["p_mcnemar"] == pytest.approx(2 * 0.5**20)
    assert out["p_bootstrap"] == pytest.approx(2 / 501), "never 0 from 500 resamples"
    assert out["diff_ci_low"] == out["diff_ci_high"] == 1.0


def test_paired_comparison_identical_systems_and_known_counts():
    rows = _examples([(f"q{i}", "reasoning", "Man", VOICES, "man") for i in range(10)])
    a = score_examples(rows.assign(response=["man"] * 6 + ["woman"] * 4), "string_match")
    same = paired_comparison(a, a, n=200).iloc[0]
    assert (same["diff"], same["diff_ci_low"], same["diff_ci_high"]) == (0.0, 0.0, 0.0)
    assert same["p_bootstrap"] == 1.0 and same["p_mcnemar"] == 1.0 and same["a_only_correct"] == 0
    # a right on 0-5, b right on 0-1 and 6: discordant 4 for a, 1 for b -> exact two-sided p = 12/32
    b = score_examples(rows.assign(response=["man"] * 2 + ["woman"] * 4 + ["man"] + ["woman"] * 3), "string_match")
    out = paired_comparison(a, b, n=500).iloc[0]
    assert (out["a_only_correct"], out["b_only_correct"]) == (4, 1)
    assert out["diff"] == pytest.approx(0.3) and out["p_mcnemar"] == pytest.approx(0.375)
    assert out["diff_ci_low"] <= 0.3 <= out["diff_ci_high"] and 0 < out["p_bootstrap"] <= 1


def test_paired_comparison_wer_and_unpaired_ids():
    refs = ["the cat sat on the mat", "hello world", "good morning"]
    a = score_examples(_examples([(f"u{i}", "transcription", r, None, r) for i, r in enumerate(refs)]), "wer")
    b = score_examples(_examples([(f"u{i}", "transcription", r, None, "the") for i, r in enumerate(refs)]
                                 + [("extra", "transcription", "x", None, "x")]), "wer")
    out = paired_comparison(a.iloc[1:], b, n=200)
    row = out.iloc[0]
    assert (row["metric"], row["a"], row["b"], row["n_pairs"]) == ("wer", 0.0, 1.0, 2)
    assert row["diff"] == -1.0 and math.isnan(row["p_mcnemar"]) and math.isnan(row["a_only_correct"])
    assert out.attrs == {"a_unpaired": 0, "b_unpaired": 2}
    with pytest.raises(ValueError, match="more than once"):
        paired_comparison(pd.concat([a, a]), b)


# ---------------------------------------------------------------- benchmark loaders

def _check_manifest_shape(df: pd.DataFrame, suite: str) -> None:
    """As the runner sees the rows: the recipe's prompt where items have none, then validated."""
    prompt = default_suites()[suite].prompt
    good, quarantine = validate_rows(df.assign(prompt=df["prompt"].where(df["prompt"].notna(), prompt)))
    assert quarantine.empty, quarantine
    for path in df["audio"]:
        assert Path(path).is_absolute() and Path(path).is_file()


MMAU_ITEMS = [
    {"id": "q0", "audio_id": "./test-mini-audios/q0.wav", "question": "Who speaks?", "choices": VOICES,
     "answer": "Man", "dataset": "AudioSet", "task": "sound", "split": "test-mini", "category": "Reasoning",
     "sub-category": "Acoustic Source Inference", "difficulty": "easy"},
    {"id": "q1", "audio_id": "./test-mini-audios/q1.wav", "question": "How many beats?",
     "choices": ["four", "nine", "fourteen", "fourteen"], "answer": "nine", "dataset": "musicbench",
     "task": "music", "split": "test-mini", "category": "Information Extraction",
     "sub-category": "Rhythm and Tempo Understanding", "difficulty": "medium"},
    {"id": "q2", "audio_id": "./test-mini-audios/q2.wav", "question": "What is said?",
     "choices": [" First speaker's claim.", " Second speaker's claim."], "answer": " Second speaker's claim.",
     "dataset": "meld", "task": "speech", "split": "test-mini", "category": ["Reasoning"],
     "sub-category": "Conversational Fact Retrieval", "difficulty": "hard"},
    {"id": "q3", "audio_id": "./test-mini-audios/q3.wav", "choices": VOICES, "answer": "Child", "task": "sound",
     "category": "Reasoning", "sub-category": "Acoustic Source Inference", "difficulty": "hard"},
    {"id": "q4", "audio_id": "./test-mini-audios/q4.wav", "question": "Who?", "choices": VOICES,
     "answer": "Alien", "task": "sound", "category": "Reasoning", "sub-category": "Acoustic Source Inference",
     "difficulty": "easy"},
    {"id": "q5", "audio_id": "./test-mini-audios/q5.wav", "question": "Where?", "choices": ["Park", "Office"],
     "answer": "Park", "task": "sound", "category": ["Reasoning", "Information Extraction"],
     "sub-category": "Acoustic Scene Reasoning", "difficulty": "medium"},
]


@pytest.fixture(scope="module")
def mmau_copy(tmp_path_factory) -> Path:
    """Six items with the quirks of the real test-mini: duplicate choices, list-valued category (one and two
    elements), padded text, a missing question, an answer outside its choices."""
    root = tmp_path_factory.mktemp("MMAU")
    (root / "mmau-test-mini.json").write_text(json.dumps(MMAU_ITEMS, indent=2))
    for i in range(len(MMAU_ITEMS)):
        write_tone(root / "test-mini-audios" / f"q{i}.wav", hz=300 + 100 * i)
    return root


def test_load_mmau(mmau_copy):
    df, quirks = load_suite("mmau", mmau_copy)
    assert df["id"].tolist() == [f"q{i}" for i in range(6)]  # nothing dropped
    assert quirks == {"duplicate_choices": 1, "list_valued_fields": 2, "missing_fields": 1,
                      "answer_not_in_choices": 1}
    _check_manifest_shape(df.iloc[[0, 1, 2, 5]], "mmau")
    assert (df["task"] == "reasoning").all() and (df["split"] == "test").all()
    assert df["group.task"].tolist() == ["sound", "music", "speech", "sound", "sound", "sound"]
    assert df["group.difficulty"].tolist() == ["easy", "medium", "hard", "hard", "easy", "medium"]
    assert df.loc[2, "group.category"] == "Reasoning"
    assert df.loc[5, "group.category"] == "Reasoning+Information Extraction"
    assert df.loc[0, "group.sub-category"] == "Acoustic Source Inference"
    assert df["category"].tolist() == df["group.task"].tolist()
    assert df.loc[1, "prompt"] == "How many beats?" and df.loc[1, "answer"] == "nine"
    assert df.loc[1, "choices"] == ["four", "nine", "fourteen"]
    assert df.loc[1, "item"] == MMAU_ITEMS[1]  # the item whole, its duplicate choices included
    assert df.loc[2, "answer"] == "Second speaker's claim." and df.loc[2, "choices"][0] == "First speaker's claim."
    assert df.loc[2, "audio"] == str(mmau_copy / "test-mini-audios" / "q2.wav")
    reasons = dict(zip(*validate_rows(df)[1][["id", "reason"]].T.values, strict=True))
    assert reasons == {"q3": "missing_field:prompt", "q4": "answer_not_in_choices"}
    assert load_mmau(mmau_copy / "mmau-test-mini.json")["id"].tolist() == df["id"].tolist()
    assert load_mmau(mmau_copy).drop(columns="item").equals(df.drop(columns="item"))


MMAR_ITEMS = [
    {"id": "a1", "audio_path": "./audio/a1.wav", "question": "Which accent?",
     "choices": ["British", "American", "Australian"], "answer": " American ", "modality": "speech",
     "category": "Semantic Layer", "sub-category": "Content Analysis", "language": "en", "source": "youtube",
     "url": "https://example.com", "timestamp": "00:00:01,00:00:05", "thinking": "The vowels.",
     "cue": ["rhotic r"], "rubric": [{"name": "Cue", "choices": [0, 1]}]},
    {"id": "a2", "audio_path": "./audio/a2.wav", "question": "What plays?", "choices": ["Piano", "Guitar"],
     "answer": "Piano", "modality": "mix-sound-music", "category": "Perception Layer",
     "sub-category": "Music Theory", "language": None, "source": "youtube", "cue": [], "rubric": []},
    {"id": "a3", "question": "Where?", "choices": ["Home", "Street"], "answer": "Street", "modality": "sound",
     "category": "Signal Layer", "sub-category": "Spatial Analysis"},
]


@pytest.fixture(scope="module")
def mmar_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("MMAR")
    (root / "MMAR-meta.jsonl").write_text("".join(json.dumps(item) + "\n" for item in MMAR_ITEMS))
    for name in ("a1", "a2", "a3"):
        write_tone(root / "audio" / f"{name}.wav")
    return root


def test_load_mmar(mmar_copy, tmp_path):
    df, quirks = load_suite("mmar", mmar_copy)
    _check_manifest_shape(df.head(2), "mmar")
    assert df["id"].tolist() == ["a1", "a2", "a3"]
    assert quirks == {"missing_fields": 1}  # cue and rubric are lists by design, not breakdown fields
    assert df["answer"].tolist() == ["American", "Piano", "Street"]
    assert df["group.modality"].tolist() == ["speech", "mix-sound-music", "sound"]
    assert df["group.category"].tolist() == ["Semantic Layer", "Perception Layer", "Signal Layer"]
    assert df["group.sub-category"].tolist() == ["Content Analysis", "Music Theory", "Spatial Analysis"]
    assert df["category"].tolist() == df["group.modality"].tolist()
    assert df.loc[0, "item"]["rubric"] == MMAR_ITEMS[0]["rubric"]
    assert pd.isna(df.loc[2, "audio"])
    assert validate_rows(df)[1]["reason"].tolist() == ["missing_field:audio"]
    # the older release's name, as a JSON list; and JSON Lines under a .json name, read by content
    (tmp_path / "MMAR-meta.json").write_text(json.dumps(MMAR_ITEMS[:2]))
    assert load_mmar(tmp_path)["id"].tolist() == ["a1", "a2"]
    (tmp_path / "MMAR-meta.json").write_text("\n".join(json.dumps(item) for item in MMAR_ITEMS))
    assert load_mmar(tmp_path)["id"].tolist() == ["a1", "a2", "a3"]
    (tmp_path / "MMAR-meta.jsonl").write_text(json.dumps(MMAR_ITEMS[1]) + "\n")  # .jsonl first when both exist
    assert load_mmar(tmp_path)["id"].tolist() == ["a2"]


def test_read_records_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n\n{"id": 2\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}:3: invalid JSON"):
        read_records(bad)
    listed = tmp_path / "list.json"
    listed.write_text('[{"id": 1}, 7]')
    with pytest.raises(ValueError, match="item 2: expected a JSON object, got int"):
        read_records(listed)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1},')
    with pytest.raises(ValueError, match="invalid JSON"):
        read_records(broken)
    lines = tmp_path / "lines.json"
    lines.write_text('{"id": 1}\n\n{"id": 2}\n')
    assert [where for where, _ in read_records(lines)] == [f"{lines}:1", f"{lines}:3"]


def test_load_meld(tmp_path):
    csv = pd.DataFrame({
        "Sr No.": [1, 2, 3, 4], "Utterance": ["Oh my god!", "Fine.", "Why?", "Hm."],
        "Speaker": ["Ross", "Rachel", "Joey", "Monica"], "Emotion": ["surprise", "neutral", "anger", None],
        "Sentiment": ["positive", "neutral", "negative", "neutral"], "Dialogue_ID": [0, 0, 3, 4],
        "Utterance_ID": [0, 1, 2, 0], "Season": [1, 1, 2, 2], "Episode": [1, 1, 4, 4],
        "StartTime": ["00:00:01,000"] * 4, "EndTime": ["00:00:02,000"] * 4,
    })
    csv.to_csv(tmp_path / "test_sent_emo.csv", index=False)
    for d, u in [(0, 0), (0, 1), (3, 2), (4, 0)]:
        write_tone(tmp_path / "output_repeated_splits_test" / f"dia{d}_utt{u}.wav")
    df, quirks = load_suite("meld", tmp_path)
    _check_manifest_shape(df.head(3), "meld")
    assert df["id"].tolist() == ["dia0_utt0", "dia0_utt1", "dia3_utt2", "dia4_utt0"]
    assert df["answer"].tolist()[:3] == ["surprise", "neutral", "anger"] and pd.isna(df.loc[3, "answer"])
    assert quirks == {"missing_fields": 1}
    assert df["prompt"].isna().all()  # the recipe's prompt is the runner's to add
    assert (df["task"] == "emotion").all() and df.loc[0, "choices"] == list(MELD_EMOTIONS)
    assert df.loc[0, "item"]["Speaker"] == "Ross" and df.loc[0, "item"]["Sr No."] == 1
    assert validate_rows(df.assign(prompt="p"))[1]["reason"].tolist() == ["missing_field:answer"]
    csv.drop(columns="Emotion").to_csv(tmp_path / "test_sent_emo.csv", index=False)
    with pytest.raises(ValueError, match="Emotion"):
        load_meld(tmp_path)




def test_load_librispeech(librispeech):
    df, quirks = load_suite("librispeech", librispeech)
    _check_manifest_shape(df, "librispeech")
    assert df["id"].tolist() == ["1089-134686-0000", "84-121123-0000", "84-121123-0001"]
    assert df.loc[1, "answer"] == "go do you hear" and df.loc[1, "item"]["transcript"] == "GO DO YOU HEAR"
    assert (df["task"] == "transcription").all() and df["choices"].isna().all() and df["prompt"].isna().all()
    assert quirks == {}
    assert decode(df.loc[2, "audio"], 16000).shape == (16000,)  # real FLAC
    assert load_librispeech(librispeech).drop(columns="item").equals(df.drop(columns="item"))


def test_load_gtzan(tmp_path):
    for genre in ("blues", "rock"):
        for i in range(10):
            write_tone(tmp_path / "genres_original" / genre / f"{genre}.{i:05d}.wav", seconds=0.2, rate=22050)
    clips = gtzan_clips(tmp_path)
    assert len(clips) == 20 and clips.loc[19, "item"] == {"file": "rock/rock.00009.wav", "genre": "rock"}
    split = dict(zip(clips["id"], gtzan_splits(clips, seed=0, val_share=0.1, test_share=0.1), strict=True))
    df = load_gtzan(tmp_path)
    _check_manifest_shape(df, "gtzan")
    assert df["id"].tolist() == [i for i, s in split.items() if s == "test"] and len(df) == 2, "a test clip a genre"
    assert sorted(df["answer"]) == ["blues", "rock"] and (df["split"] == "test").all()
    assert df.loc[0, "choices"] == list(GTZAN_GENRES) and (df["task"] == "music").all()
    assert load_gtzan(tmp_path, "train")["id"].tolist() == [i for i, s in split.items() if s == "train"]


def test_load_suite_reads_the_coat_mini_manifest_split(tmp_path):
    rows = [{"id": f"c{i}", "audio": f"audio/c{i}.wav", "task": "emotion", "prompt": "How?", "answer": "sad",
             "choices": list(EMOTIONS), "split": split} for i, split in enumerate(["train", "test", "test"])]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    df, quirks = load_suite("coat-mini", tmp_path / "manifest.jsonl")
    assert df["id"].tolist() == ["c1", "c2"] and quirks == {}


def test_load_suite_names_an_unknown_suite(tmp_path):
    with pytest.raises(ValueError, match="'audiocaps' is not one of coat-mini, mmau"):
        load_suite("audiocaps", tmp_path)


@pytest.mark.parametrize("loader, layout", [
    (load_mmau, "mmau-test-mini.json"), (load_mmar, "MMAR-meta.jsonl"), (load_meld, "test_sent_emo.csv"),
    (load_librispeech, "trans.txt"), (load_gtzan, "genre"),
])
def test_loaders_name_the_missing_root_and_layout(tmp_path, loader, layout):
    with pytest.raises(FileNotFoundError) as err:
        loader(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and layout in str(err.value)


# ---------------------------------------------------------------- predictions files

MODEL_OUTPUTS = ["The speaker is a man.", "nine or fourteen", "Second speaker's claim.", "Park"]


def _mmau_examples(root: Path) -> pd.DataFrame:
    """The loadable MMAU items answered (as the runner leaves them: quarantined items have no row)."""
    rows = load_mmau(root).iloc[[0, 1, 2, 5]].reset_index(drop=True)
    return score_examples(rows.assign(response=MODEL_OUTPUTS), "string_match")


def test_mmau_predictions_are_scored_as_the_official_script_scores_them(mmau_copy, tmp_path):
    examples = _mmau_examples(mmau_copy)
    path = write_predictions(examples, "mmau", tmp_path / "out" / "mmau.json")
    written = json.loads(path.read_text())
    assert [item["model_output"] for item in written] == MODEL_OUTPUTS
    assert written[1]["choices"] == ["four", "nine", "fourteen", "fourteen"]  # the item as published
    official = official_accuracy(path, "model_output", ("task", "difficulty"))
    back = read_predictions(path, "mmau")
    assert back["id"].tolist() == examples["id"].tolist() and back.attrs["skipped"] == 0
    table = results_table(score_examples(back, "string_match"), metrics=["accuracy"],
                          breakdowns=["task", "difficulty"], scoring="generate", n=20).set_index("task")
    assert table.loc["reasoning", "value"] == official["total"] == 0.75
    for key, value in official.items():
        if key != "total":
            assert table.loc[f"reasoning/{key}", "value"] == pytest.approx(value), key
    with pytest.raises(ValueError, match="reads one JSON list"):
        write_predictions(examples, "mmau", tmp_path / "mmau.jsonl")
    with pytest.raises(ValueError, match="column item"):
        write_predictions(examples.drop(columns="item"), "mmau", tmp_path / "mmau.json")


def test_mmar_predictions_as_json_lines_and_skipped_items(mmar_copy, tmp_path):
    rows = load_mmar(mmar_copy)
    examples = score_examples(rows.assign(response=["american english", "piano and guitar", "street"]),
                              "string_match")
    for name in ("mmar.jsonl", "mmar.json"):
        path = write_predictions(examples, "mmar", tmp_path / name)
        official = official_accuracy(path, "answer_prediction", ("modality", "category"))
        back = score_examples(read_predictions(path, "mmar"), "string_match")
        assert back["correct"].tolist() == examples["correct"].tolist() == [True, False, True]
        assert official["total"] == pytest.approx(back["correct"].mean())
    assert len((tmp_path / "mmar.jsonl").read_text().splitlines()) == 3
    items = [json.loads(line) for line in (tmp_path / "mmar.jsonl").read_text().splitlines()]
    del items[1]["answer_prediction"]
    skipped = tmp_path / "skipped.jsonl"
    skipped.write_text("".join(json.dumps(item) + "\n" for item in items))
    back = read_predictions(skipped, "mmar")
    assert back["id"].tolist() == ["a1", "a3"] and back.attrs["skipped"] == 1
    del items[0]["answer"]
    skipped.write_text("".join(json.dumps(item) + "\n" for item in items))
    with pytest.raises(ValueError, match=rf"{re.escape(str(skipped))}:1: no 'answer'"):
        read_predictions(skipped, "mmar")


def test_other_suites_round_trip_as_json_lines(tmp_path):
    rows = _examples([("m1", "emotion", "joy", list(MELD_EMOTIONS), "joy"),
                      ("m2", "emotion", "anger", list(MELD_EMOTIONS), "joy or anger")],
                     **{"group.speaker": ["Ross", "Rachel"], "ttft_s": [0.1, 0.2], "item": [{}, {}]})
    scored = score_examples(rows, "choice")
    path = write_predictions(scored, "meld", tmp_path / "meld.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(records[0]) == {"id", "task", "answer", "choices", "response", "prediction", "correct", "wer",
                               "group.speaker", "ttft_s"}
    assert records[1]["prediction"] == "" and records[1]["correct"] is False and records[1]["wer"] is None
    back = score_examples(read_predictions(path, "meld"), "choice")
    assert back["correct"].tolist() == [True, False] and back["group.speaker"].tolist() == ["Ross", "Rachel"]
    with pytest.raises(ValueError, match="give a .jsonl path"):
        write_predictions(scored, "meld", tmp_path / "meld.json")


@pytest.mark.parametrize("record, message", [
    ({"answer": "joy", "choices": ["joy"], "response": "joy"}, ":1: no 'id'"),
    ({"id": "m1", "choices": ["joy"], "response": "joy"}, ":1: no 'answer'"),
    ({"id": "m1", "answer": "joy", "choices": ["joy"]}, ":1: no 'response'"),
    ({"id": "m1", "answer": "joy", "response": "joy"}, ":1: no 'choices'"),
])
def test_read_predictions_names_the_line_and_field(tmp_path, record, message):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}{message}")):
        read_predictions(path, "meld")


def test_read_predictions_needs_a_task_for_coat_mini_and_a_known_suite(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps({"id": "x", "answer": "a b", "response": "a b"}) + "\n")
    assert read_predictions(path, "librispeech").loc[0, "task"] == "transcription"
    with pytest.raises(ValueError, match=":1: no 'task'"):
        read_predictions(path, "coat-mini")
    with pytest.raises(ValueError, match="'mmlu' is not one of"):
        read_predictions(path, "mmlu")
    with pytest.raises(FileNotFoundError, match="no such predictions file"):
        read_predictions(tmp_path / "gone.jsonl", "meld")


# ---------------------------------------------------------------- coat score

@pytest.fixture(scope="module")
def score():
    app = typer.Typer()
    app.command()(score_command)

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})  # rich wraps tables
        return result.exit_code, " ".join(result.output.split()), result.stdout

    return invoke


def test_score_prints_the_suite_table(score, mmau_copy, tmp_path):
    path = write_predictions(_mmau_examples(mmau_copy), "mmau", tmp_path / "mmau.json")
    code, output, _ = score("--suite", "mmau", path, "--bootstrap", "50")
    assert code == 0, output
    for text in ("reasoning/task.sound", "reasoning/difficulty.hard", "accuracy", "0.750", "95% CI", "chance",
                 f"scored by coat {provenance()['code_sha256']}"):
        assert text in output
    code, _, stdout = score("--suite", "mmau", path, "--json", "--bootstrap", "50")
    metrics = json.loads(stdout)["metrics"]
    assert code == 0 and list(json.loads(stdout)) == ["metrics", "provenance"]
    assert metrics["accuracy"] == 0.75
    assert metrics["task.sound/accuracy"] == 1.0 and metrics["task.music/accuracy"] == 0.0
    assert metrics["difficulty.hard/accuracy"] == 1.0 and metrics["difficulty.medium/accuracy"] == 0.5


def test_score_json_for_wer_f1_and_mixed_suites(score, tmp_path):
    speech = _examples([("u1", "transcription", "TWENTY ONE", None, "21"),
                        ("u2", "transcription", "HELLO WORLD", None, "hello")])
    path = write_predictions(score_examples(speech, "wer"), "librispeech", tmp_path / "ls.jsonl")
    code, output, stdout = score("--suite", "librispeech", path, "--json", "--bootstrap", "20")
    assert code == 0, output
    assert json.loads(stdout)["metrics"] == {"wer": pytest.approx(1 / 3)}
    meld = _examples([("m1", "emotion", "joy", list(MELD_EMOTIONS), "joy"),
                      ("m2", "emotion", "anger", list(MELD_EMOTIONS), "sadness")])
    path = write_predictions(score_examples(meld, "choice"), "meld", tmp_path / "meld.jsonl")
    metrics = json.loads(score("--suite", "meld", path, "--json", "--bootstrap", "20")[2])["metrics"]
    assert metrics == {"accuracy": 0.5, "weighted_f1": 0.5}  # joy's F1 1, anger's 0, equal support
    mixed = pd.concat([speech, meld], ignore_index=True)
    path = write_predictions(score_examples(mixed, "choice"), "coat-mini", tmp_path / "mini.jsonl")
    metrics = json.loads(score("--suite", "coat-mini", path, "--json", "--bootstrap", "20")[2])["metrics"]
    assert metrics == {"emotion/accuracy": 0.5, "transcription/wer": pytest.approx(1 / 3), "accuracy": 0.5,
                       "wer": pytest.approx(1 / 3)}
    labels = pd.DataFrame({"id": ["m1", "m2"], "task": "emotion", "answer": ["joy", "anger"],
                           "choices": [list(MELD_EMOTIONS)] * 2, "prediction": ["joy", "joy"]})
    path = write_predictions(labels, "meld", tmp_path / "labels.jsonl")  # predicted labels, by any system
    metrics = json.loads(score("--suite", "meld", path, "--json", "--bootstrap", "20")[2])["metrics"]
    assert set(metrics) == {"accuracy", "weighted_f1"} and metrics["accuracy"] == 0.5
    path = write_predictions(labels.assign(scoring="loglik"), "gtzan", tmp_path / "loglik.jsonl")
    printed = json.loads(score("--suite", "gtzan", path, "--json", "--bootstrap", "20")[2])
    assert printed["provenance"] == provenance(), "which code and scorer versions made the numbers"
    metrics = printed["metrics"]
    assert metrics == {"loglik_accuracy": 0.5}, "named after log-likelihood scoring only when the file says so"
    mixed = write_predictions(labels.assign(scoring=["loglik", "generate"]), "gtzan", tmp_path / "mixed.jsonl")
    code, output, _ = score("--suite", "gtzan", mixed, "--json")
    assert code == 1 and "mixed.jsonl" in output and "declare the scoring modes" in output


def test_score_rescores_every_rotation_of_a_circular_evaluation(score, tmp_path):
    """The file's `correct_circular` was scored by the rule of the run that wrote it: `coat score` scores each
    rotation's response itself, and an item without them is left out of the circular accuracy, not counted right."""
    rows = _examples([("m1", "emotion", "joy", list(MELD_EMOTIONS), "joy"),
                      ("m2", "emotion", "anger", list(MELD_EMOTIONS), "anger"),
                      ("m3", "emotion", "joy", list(MELD_EMOTIONS), "joy")],
                     circular_responses=[["joy"] * 7, ["anger", "joy", *["anger"] * 5], None],
                     correct_circular=[False, True, None])  # as a run under another rule had scored them
    path = write_predictions(score_examples(rows, "choice"), "meld", tmp_path / "circular.jsonl")
    code, output, stdout = score("--suite", "meld", path, "--json", "--bootstrap", "20")
    assert code == 0, output
    assert json.loads(stdout)["metrics"]["circular_accuracy"] == 0.5, "m1 right under every rotation, m2 not"


def test_score_against_a_baseline(score, tmp_path):
    rows = _examples([(f"q{i}", "reasoning", "Man", VOICES, "man") for i in range(12)])
    a = write_predictions(score_examples(rows, "choice"), "coat-mini", tmp_path / "a.jsonl")
    b = write_predictions(score_examples(rows.assign(response=["woman"] * 10 + ["man"] * 2).head(11), "choice"),
                          "coat-mini", tmp_path / "b.jsonl")
    code, output, _ = score("--suite", "coat-mini", a, "--against", b, "--bootstrap", "50")
    assert code == 0, output
    assert "p McN" in output and "10/0" in output and "1 ids only in A" in output
    assert f"A: {a} (generate), B: {b} (generate), paired on id" in output, "each file's scoring mode is named"
    code, _, stdout = score("--suite", "coat-mini", a, "--against", b, "--json", "--bootstrap", "50")
    paired = json.loads(stdout)["paired"]
    assert len(paired) == 1 and paired[0]["a_only_correct"] == 10 and paired[0]["n_pairs"] == 11
    assert paired[0]["diff"] == pytest.approx(10 / 11) and paired[0]["p_mcnemar"] == pytest.approx(2 * 0.5**10)


def test_score_errors_name_the_problem(score, tmp_path):
    code, output, _ = score("--suite", "nope", tmp_path)
    assert code == 2
    code, output, _ = score("--suite", "mmau", tmp_path / "gone.json")
    assert code == 2 and "gone.json" in output and "does not exist" in output
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps({"id": "m1", "choices": ["joy"], "response": "joy"}) + "\n")
    code, output, _ = score("--suite", "nope", path)
    assert code == 2 and "'nope' is not one of" in output
    code, output, _ = score("--suite", "meld", path)
    assert code == 1 and f"{path}:1: no 'answer'" in output and "Traceback" not in output
    path.write_text("not json\n")
    code, output, _ = score("--suite", "meld", path)
    assert code == 1 and "invalid JSON" in output
    path.write_text("")
    code, output, _ = score("--suite", "meld", path)
    assert code == 1 and "holds no predictions" in output


def test_score_names_a_file_of_another_suite(score, mmau_copy, tmp_path):
    path = write_predictions(_mmau_examples(mmau_copy), "mmau", tmp_path / "mmau.json")
    code, output, _ = score("--suite", "mmar", path)
    assert code == 1 and "no item has 'answer_prediction'" in output


def test_rescoring_a_file_loads_no_model_ray_or_tracking_package(mmau_copy, tmp_path):
    path = write_predictions(_mmau_examples(mmau_copy), "mmau", tmp_path / "mmau.json")
    code = ("import sys\nfrom coat.cli import main\ntry:\n    main(['score', '--suite', 'mmau', '--json', "
            f"{str(path)!r}])\nexcept SystemExit as done:\n    assert not done.code, done.code\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout[:out.stdout.rindex("}") + 1])["metrics"], out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"
