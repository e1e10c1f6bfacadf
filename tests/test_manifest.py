"""Manifest reading, row validation, audio decoding and `coat data check` on real audio files.

The corpus is written with soundfile: good clips at several rates and channel counts, plus one file (or row)
per failure the quarantine must catch. Every test asserts exactly which rows go where, and why.
"""

import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from coat.cli import data_app as app
from coat.data.audio import AudioError, check_audio_rows, decode, load
from coat.data.manifest import ManifestError, read_manifest, reason_code, validate_rows

RATE = 16000
MAX_SECONDS = 2.0


def _tone(freq, seconds, rate, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _row(id_, audio, task="reasoning", split="train", **extra):
    return {"id": id_, "audio": audio, "task": task, "prompt": f"What is in {id_}?", "answer": "a tone",
            "split": split, **extra}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Write clips + a JSONL manifest; return (manifest path, expected good ids, expected quarantine)."""
    root = tmp_path_factory.mktemp("corpus")
    clips = root / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)

    sf.write(clips / "tone16.wav", _tone(440, 1.0, 16000), 16000, subtype="PCM_16")
    sf.write(clips / "noise22.wav", (0.1 * rng.standard_normal(11025)).astype(np.float32), 22050)
    stereo = np.stack([_tone(440, 0.75, 44100), _tone(1000, 0.75, 44100, amp=0.25)], axis=1)
    sf.write(clips / "stereo44.wav", stereo, 44100, subtype="FLOAT")
    sf.write(clips / "speech8.flac", _tone(220, 1.5, 8000), 8000)
    sf.write(clips / "long.wav", _tone(440, 3.0, 16000), 16000)
    (clips / "empty.wav").write_bytes(b"")
    sf.write(clips / "full.wav", _tone(440, 1.0, 16000), 16000, subtype="PCM_16")
    whole = (clips / "full.wav").read_bytes()
    (clips / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    (clips / "garbage.wav").write_bytes(rng.bytes(4096))
    bad = _tone(440, 0.5, 16000)
    bad[100], bad[200] = np.nan, np.inf
    sf.write(clips / "nan.wav", bad, 16000, subtype="FLOAT")
    sf.write(clips / "silent.wav", (1e-6 * rng.standard_normal(8000)).astype(np.float32), 16000,
             subtype="FLOAT")

    rows = [
        _row("tone16", "clips/tone16.wav", choices=["a tone", "a dog"], speaker="s1"),
        _row("noise22", "clips/noise22.wav", task="understanding", split="val"),
        _row("stereo44", "clips/stereo44.wav", task="music", split="test"),
        _row("speech8", "clips/speech8.flac", task="transcription", speaker="s2"),
        _row("speech8_q2", "clips/speech8.flac", task="emotion"),  # a second question on the same clip
        _row("missing", "clips/nope.wav"),
        _row("empty", "clips/empty.wav"),
        _row("truncated", "clips/truncated.wav"),
        _row("garbage", "clips/garbage.wav"),
        _row("nan", "clips/nan.wav"),
        _row("silent", "clips/silent.wav"),
        _row("long", "clips/long.wav"),
        {k: v for k, v in _row("no_answer", "clips/tone16.wav").items() if k != "answer"},
        _row("blank_prompt", "clips/tone16.wav") | {"prompt": "   "},
        _row("wrong_answer", "clips/tone16.wav", choices=["a dog", "a cat"]),
        _row("bad_choices", "clips/tone16.wav", choices="a tone"),
        _row("bad_task", "clips/tone16.wav", task="dancing"),
        _row("bad_split", "clips/tone16.wav", split="dev"),
        _row("tone16", "clips/noise22.wav"),  # duplicate id
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    good = {"tone16", "noise22", "stereo44", "speech8", "speech8_q2"}
    quarantined = {
        ("missing", "missing_file"), ("empty", "empty_file"), ("truncated", "truncated"),
        ("garbage", "undecodable"), ("nan", "non_finite"), ("silent", "silent"), ("long", "too_long"),
        ("no_answer", "missing_field"), ("blank_prompt", "missing_field"),
        ("wrong_answer", "answer_not_in_choices"), ("bad_choices", "bad_choices"),
        ("bad_task", "unknown_task"), ("bad_split", "unknown_split"), ("tone16", "duplicate_id"),
    }
    return manifest, rows, good, quarantined


def _pairs(quarantine):
    return {(i, reason_code(r)) for i, r in zip(quarantine["id"], quarantine["reason"], strict=True)}


def test_bad_rows_are_quarantined_with_their_reason_and_good_rows_arrive(corpus):
    manifest, rows, good_ids, expected = corpus
    df = read_manifest(manifest)
    assert len(df) == len(rows)
    good, q_rows = validate_rows(df)
    good, q_audio, stats = check_audio_rows(good, RATE, MAX_SECONDS)
    quarantine = pd.concat([q_rows, q_audio], ignore_index=True)

    assert list(quarantine.columns) == ["id", "path", "reason"]
    assert len(quarantine) == len(expected) and _pairs(quarantine) == expected
    assert sorted(good["id"]) == sorted(good_ids)
    reasons = dict(zip(quarantine["id"], quarantine["reason"], strict=True))
    assert reasons["no_answer"] == "missing_field:answer"
    assert reasons["blank_prompt"] == "missing_field:prompt"
    assert reasons["bad_task"] == "unknown_task:dancing"
    assert reasons["long"] == "too_long: 3.0s > 2.0s"
    assert reasons["missing"] == "missing_file"
    clips = manifest.parent / "clips"
    paths = dict(zip(quarantine["id"], quarantine["path"], strict=True))
    assert paths["truncated"] == str(clips / "truncated.wav")
    assert paths["tone16"] == str(clips / "noise22.wav")  # the duplicate, not the first row

    # Free metadata and the original relative path pass through; the absolute path is beside them.
    by_id = good.set_index("id")
    assert by_id.loc["tone16", "speaker"] == "s1" and by_id.loc["tone16", "audio"] == "clips/tone16.wav"
    assert by_id.loc["tone16", "choices"] == ["a tone", "a dog"]
    assert by_id.loc["speech8", "audio_path"] == str(clips / "speech8.flac")

    st = stats.set_index("id")
    assert list(stats["id"]) == list(good["id"])
    native = {"tone16": (16000, 16000, 1), "noise22": (22050, 11025, 1), "stereo44": (44100, 33075, 2),
              "speech8": (8000, 12000, 1), "speech8_q2": (8000, 12000, 1)}
    for id_, (rate, frames, channels) in native.items():
        assert st.loc[id_, "sample_rate"] == rate and st.loc[id_, "channels"] == channels
        assert st.loc[id_, "duration_s"] == pytest.approx(frames / rate)
        wave = decode(by_id.loc[id_, "audio_path"], RATE, MAX_SECONDS)
        assert wave.dtype == torch.float32 and wave.ndim == 1
        assert len(wave) == math.ceil(frames * RATE / rate) == st.loc[id_, "num_samples"]


def test_resampling_keeps_the_pitch_and_stereo_is_the_mean_of_its_channels(corpus):
    clips = corpus[0].parent / "clips"
    mono, rate, channels = load(clips / "stereo44.wav")
    written, _ = sf.read(clips / "stereo44.wav", dtype="float32")
    assert (rate, channels) == (44100, 2)
    torch.testing.assert_close(mono, torch.from_numpy(written.mean(axis=1)))

    for name, freq in [("tone16.wav", 440), ("stereo44.wav", 440), ("speech8.flac", 220)]:
        wave = decode(clips / name, RATE).numpy()
        spectrum = np.abs(np.fft.rfft(wave))
        peak_hz = np.argmax(spectrum) * RATE / len(wave)
        assert abs(peak_hz - freq) < 3, (name, peak_hz)


@pytest.mark.parametrize("cut", ["half", "header_only", "flac_half"])
def test_truncated_files_are_caught_whatever_soundfile_does(tmp_path, cut):
    # libsndfile clamps a short WAV to what is there (no error) and raises mid-read on a short FLAC.
    fmt = "flac" if cut.startswith("flac") else "wav"
    full = tmp_path / f"full.{fmt}"
    sf.write(full, _tone(440, 1.0, 16000), 16000)
    whole = full.read_bytes()
    short = tmp_path / f"short.{fmt}"
    short.write_bytes(whole[:44] if cut == "header_only" else whole[: len(whole) // 2])
    with pytest.raises(AudioError) as err:
        decode(short, RATE)
    assert err.value.code == "truncated"
    assert str(short) in str(err.value)
    assert len(decode(full, RATE)) == RATE  # the intact file decodes


def test_audio_errors_name_the_file(corpus):
    clips = corpus[0].parent / "clips"
    for name, code in [("nope.wav", "missing_file"), ("garbage.wav", "undecodable"),
                       ("nan.wav", "non_finite"), ("silent.wav", "silent"), ("empty.wav", "empty_file")]:
        with pytest.raises(AudioError) as err:
            decode(clips / name, RATE, MAX_SECONDS)
        assert err.value.code == code and str(clips / name) in str(err.value)
    assert len(decode(clips / "long.wav", RATE, max_seconds=None)) == 3 * RATE  # the cap is optional


def test_duplicate_check_keeps_a_good_copy_behind_a_broken_first_one():
    rows = [_row("x", "a.wav"), _row("x", "b.wav"), _row("y", "c.wav"), _row("y", "d.wav")]
    rows[0].pop("answer")
    df = pd.DataFrame(rows).assign(audio_path=lambda d: d["audio"])
    good, quarantine = validate_rows(df)
    assert list(zip(good["id"], good["audio"], strict=True)) == [("x", "b.wav"), ("y", "c.wav")]
    assert list(zip(quarantine["path"], quarantine["reason"], strict=True)) == [
        ("a.wav", "missing_field:answer"), ("d.wav", "duplicate_id")]


def test_jsonl_and_parquet_manifests_read_the_same(corpus, tmp_path):
    manifest, rows, _, _ = corpus
    rows = [r for r in rows if r["id"] != "bad_choices"]  # Arrow cannot hold a string among lists
    (tmp_path / "clips").symlink_to(manifest.parent / "clips")
    jsonl, parquet = tmp_path / "manifest.jsonl", tmp_path / "manifest.parquet"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(parquet)
    from_jsonl, from_parquet = read_manifest(jsonl), read_manifest(parquet)
    assert from_parquet["audio_path"][0] == str(tmp_path / "clips" / "tone16.wav")
    pd.testing.assert_frame_equal(from_jsonl, from_parquet)
    assert isinstance(from_parquet["choices"][0], list) and from_parquet["choices"][1] is None
    assert _pairs(validate_rows(from_parquet)[1]) == _pairs(validate_rows(from_jsonl)[1])


def test_unreadable_manifests_raise_naming_the_file(tmp_path):
    cases = {"m.csv": b"id,audio\n", "m.jsonl": b'{"id": "a"}\n{"id": \n', "m.parquet": b"not parquet",
             "list.jsonl": b"[1, 2]\n"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ManifestError, match=re.escape(str(tmp_path / name))):
            read_manifest(tmp_path / name)
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: invalid JSON"):
        read_manifest(tmp_path / "m.jsonl")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "absent.jsonl")


def _table_line(output, label):
    """The table row whose first cell is `label` (box-drawing or ASCII borders)."""
    return next(line for line in output.splitlines() if re.match(rf"[\s│┃|]*{re.escape(label)}\b", line))


def _table_numbers(output, label):
    return [int(n) for n in re.findall(r"\b\d+\b", _table_line(output, label).split(label, 1)[1])]


def test_a_manifest_check_prints_counts_and_writes_the_quarantine(corpus, tmp_path):
    manifest, _, good_ids, expected = corpus
    runner = CliRunner()
    result = runner.invoke(app, ["check", str(manifest), "--max-seconds", str(MAX_SECONDS)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"{len(expected)} of {len(expected) + len(good_ids)} rows quarantined" in out
    # task rows: train, val, test, total
    assert _table_numbers(out, "reasoning") == [1, 0, 0, 1]
    assert _table_numbers(out, "understanding") == [0, 1, 0, 1]
    assert _table_numbers(out, "music") == [0, 0, 1, 1]
    assert _table_numbers(out, "transcription") == [1, 0, 0, 1]
    assert _table_numbers(out, "emotion") == [1, 0, 0, 1]
    assert _table_numbers(out, "rows kept") == [len(good_ids)]
    assert _table_numbers(out, "sample rates seen") == [8000, 2, 16000, 1, 22050, 1, 44100, 1]
    seconds = 1.0 + 0.5 + 0.75 + 1.5 + 1.5
    assert f"{seconds / 3600:.3f} h ({seconds:.1f} s)" in _table_line(out, "audio kept")
    assert _table_numbers(out, "missing_field") == [2]
    for code in ["missing_file", "empty_file", "truncated", "undecodable", "non_finite", "silent", "too_long",
                 "duplicate_id", "answer_not_in_choices"]:
        assert _table_numbers(out, code) == [1], code

    written = manifest.with_name("manifest.quarantine.jsonl")
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    assert _pairs(pd.DataFrame(lines)) == expected and len(lines) == len(expected)

    parquet = tmp_path / "q" / "bad.parquet"
    result = runner.invoke(app, ["check", str(manifest), "--max-seconds", "2", "--quarantine-out",
                                 str(parquet)])
    assert result.exit_code == 0, result.output
    assert _pairs(pd.read_parquet(parquet)) == expected


def test_a_manifest_check_fails_only_on_an_unreadable_manifest(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text("{not json\n")
    result = CliRunner().invoke(app, ["check", str(bad)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "broken.jsonl:1: invalid JSON" in result.output
    assert not os.path.exists(tmp_path / "broken.quarantine.jsonl")
