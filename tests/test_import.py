"""`coat data import`: tiny copies of each corpus in its published layout, with real audio files.

Clips are written with soundfile (WAV, FLAC); MELD's videos are real MP4s encoded here with PyAV (an AAC track
at 44.1 kHz stereo, and one video without any audio track). Each test asserts where every row went, and why.
"""

import json
import os
from dataclasses import replace

import av
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from typer.testing import CliRunner

from coat.cli import app, main
from coat.config import default_suites
from coat.data.corpora import GTZAN_GENRES, MELD_EMOTIONS, load_suite
from coat.data.import_spec import ImportSpec, ImportUsageError, TableColumns
from coat.data.importers import CorpusError, import_corpus, seeded_split
from coat.data.manifest import read_manifest, reason_code, validate_rows


def _clip(path, seconds=0.3, rate=16000, freq=440.0, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    sf.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate)
    return path


def _mp4(path, seconds=0.8, audio=True, rate=44100):
    """A real MELD-like video: 32x32 MPEG-4 frames, plus (when `audio`) a stereo AAC track of a 330 Hz tone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=rate, layout="stereo") if audio else None
        for i in range(int(seconds * 10)):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * (i % 5), np.uint8), format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame.reformat(format="yuv420p")))
        container.mux(video.encode())
        if sound is not None:
            t = np.arange(int(seconds * rate)) / rate
            wave = (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
            for start in range(0, len(wave), 1024):
                chunk = wave[start:start + 1024]
                frame = av.AudioFrame.from_ndarray(np.stack([chunk, chunk]), format="fltp", layout="stereo")
                frame.sample_rate = rate
                frame.pts = start
                container.mux(sound.encode(frame))
            container.mux(sound.encode())
    return path


def _reread(manifest):
    """The manifest as training reads it: every row valid, every audio file there."""
    df = read_manifest(manifest)
    good, bad = validate_rows(df)
    assert bad.empty, bad.to_dict(orient="records")
    assert all(pd.Series(good["audio_path"]).map(lambda p: __import__("os").path.isfile(p)))
    return good


def _reasons(summary):
    return dict(zip(summary.quarantine["id"], summary.quarantine["reason"].map(reason_code), strict=True))


# --- LibriSpeech -------------------------------------------------------------------------------------------------

LIBRI = {  # subset -> speaker -> chapter -> transcripts
    "train-clean-100": {"19": {"198": ["NORTHANGER ABBEY", "CHAPTER ONE"]}, "26": {"495": ["A TALE"]}},
    "dev-clean": {"84": {"121123": ["GO DO YOU HEAR"]}},
    "test-clean": {"1089": {"134686": ["HE HOPED THERE WOULD BE STEW", "STUFF IT INTO YOU"]}},
}


@pytest.fixture
def librispeech(tmp_path):
    """LibriSpeech/ with three subsets; 1089-134686-0001.flac is missing (listed in its transcript only)."""
    root = tmp_path / "LibriSpeech"
    for subset, speakers in LIBRI.items():
        for speaker, chapters in speakers.items():
            for chapter, lines in chapters.items():
                folder = root / subset / speaker / chapter
                folder.mkdir(parents=True)
                names = [f"{speaker}-{chapter}-{i:04d}" for i in range(len(lines))]
                (folder / f"{speaker}-{chapter}.trans.txt").write_text(
                    "".join(f"{n} {text}\n" for n, text in zip(names, lines, strict=True)))
                for name in names:
                    if name != "1089-134686-0001":
                        _clip(folder / f"{name}.flac", freq=300 + 10 * len(name))
    return root


def test_librispeech_splits_come_from_subset_names_and_keep_speakers(librispeech, tmp_path):
    summary = import_corpus("librispeech", librispeech, tmp_path / "out")
    rows = summary.rows.set_index("id")
    assert rows["split"].to_dict() == {"19-198-0000": "train", "19-198-0001": "train", "26-495-0000": "train",
                                       "84-121123-0000": "val", "1089-134686-0000": "test"}
    assert rows.loc["84-121123-0000", "speaker"] == "84" and rows.loc["84-121123-0000", "subset"] == "dev-clean"
    assert rows.loc["1089-134686-0000", "answer"] == "he hoped there would be stew"
    assert set(rows["prompt"]) == {default_suites()["librispeech"].prompt}
    assert set(rows["task"]) == {"transcription"} and set(rows["source"]) == {"librispeech"}
    assert _reasons(summary) == {"1089-134686-0001": "missing_file"}
    assert summary.counts.loc["transcription"].to_dict() == {"train": 3, "val": 1, "test": 1, "total": 5}
    good = _reread(summary.manifest)
    assert len(good) == 5
    quarantine = [json.loads(line) for line in summary.quarantine_path.read_text().splitlines()]
    assert [q["id"] for q in quarantine] == ["1089-134686-0001"]


def test_librispeech_one_subset_folder_is_one_split(librispeech, tmp_path):
    summary = import_corpus("librispeech", librispeech / "dev-clean", tmp_path / "out")
    assert list(summary.rows["split"]) == ["val"] and list(summary.rows["id"]) == ["84-121123-0000"]


def test_an_import_prints_the_summary_and_errors_name_the_fix(librispeech, tmp_path, capsys):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "import", "librispeech", str(librispeech), "--out", str(out)],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "rows kept per task and split" in result.output
    assert "│ transcription │     3 │   1 │    1 │     5 │" in result.output
    assert "missing_file │    1" in result.output and "5 of 6 rows kept" in result.output
    assert len(_reread(out / "manifest.jsonl")) == 5

    with pytest.raises(SystemExit) as exit_:
        main(["data", "import", "voxceleb", str(librispeech), "--out", str(out)])
    assert exit_.value.code == 2
    assert "unknown format 'voxceleb'; expected one of librispeech, meld, gtzan, mmau, mmar, table" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["data", "import", "librispeech", str(tmp_path / "nowhere"), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "nowhere: not found" in err and "trans.txt" in err
    with pytest.raises(SystemExit) as exit_:
        main(["data", "import", "librispeech", str(librispeech), "--out", str(out), "--task", "emotion"])
    assert exit_.value.code == 2 and "for the table format" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # no share left to train on
        main(["data", "import", "librispeech", str(librispeech), "--out", str(out), "--val-share", "0.5",
              "--test-share", "0.5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--val-share 0.5 and --test-share 0.5" in err and "some rows train" in err
    with pytest.raises(SystemExit) as exit_:  # a folder that is no LibriSpeech layout
        main(["data", "import", "librispeech", str(tmp_path / "out"), "--out", str(tmp_path / "o2")])
    assert exit_.value.code == 1 and "no LibriSpeech subset found" in capsys.readouterr().err


# --- MELD --------------------------------------------------------------------------------------------------------

MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
               "Episode", "StartTime", "EndTime"]


def _meld_csv(path, rows):
    pd.DataFrame([[i + 1, text, speaker, emotion, "neutral", d, u, 1, 1, "00:00:01,000", "00:00:02,000"]
                  for i, (text, speaker, emotion, d, u) in enumerate(rows)], columns=MELD_HEADER).to_csv(
        path, index=False)


@pytest.fixture
def meld(tmp_path):
    """train: pre-extracted WAVs (one 48 kHz stereo); test: released MP4s, one without audio, one corrupt, one
    absent, one labelled with an emotion outside MELD's seven; dev: no CSV at all."""
    root = tmp_path / "MELD.Raw"
    root.mkdir()
    _meld_csv(root / "train_sent_emo.csv", [("Oh my God!", "Rachel", "surprise", 0, 0),
                                            ("Hi.", "Ross", "joy", 0, 1)])
    _clip(root / "train_splits" / "dia0_utt0.wav", seconds=0.5, rate=48000, channels=2)
    _clip(root / "train_splits" / "dia0_utt1.wav")
    _meld_csv(root / "test_sent_emo.csv", [("Why?", "Monica", "anger", 0, 0), ("Fine.", "Joey", "neutral", 0, 1),
                                           ("No.", "Chandler", "sadness", 1, 0), ("Okay.", "Phoebe", "fear", 1, 1),
                                           ("Sure.", "Joey", "bored", 2, 0)])
    test = root / "output_repeated_splits_test"
    _mp4(test / "dia0_utt0.mp4", seconds=0.8)
    _mp4(test / "dia0_utt1.mp4", audio=False)
    (test / "dia1_utt0.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    _mp4(test / "dia2_utt0.mp4")
    return root


def test_meld_extracts_video_audio_and_quarantines_what_it_cannot_use(meld, tmp_path):
    out = tmp_path / "out"
    summary = import_corpus("meld", meld, out)
    rows = summary.rows.set_index("id")
    assert rows["split"].to_dict() == {"train-dia0_utt0": "train", "train-dia0_utt1": "train",
                                       "test-dia0_utt0": "test"}
    assert rows["speaker"].to_dict() == {"train-dia0_utt0": "Rachel", "train-dia0_utt1": "Ross",
                                         "test-dia0_utt0": "Monica"}
    assert rows.loc["test-dia0_utt0", "answer"] == "anger"
    assert rows.loc["test-dia0_utt0", "choices"] == list(MELD_EMOTIONS)
    assert set(rows["prompt"]) == {default_suites()["meld"].prompt}
    reasons = dict(zip(summary.quarantine["id"], summary.quarantine["reason"], strict=True))
    assert reasons["test-dia0_utt1"] == "bad_audio: no audio track"
    assert reasons["test-dia1_utt0"].startswith("bad_audio: cannot decode")
    assert reasons["test-dia1_utt1"] == "missing_file"  # neither a WAV nor a video
    assert reasons["test-dia2_utt0"] == "answer_not_in_choices"
    assert len(reasons) == 4 and summary.rows_read == 7
    paths = dict(zip(summary.quarantine["id"], summary.quarantine["path"], strict=True))
    assert paths["test-dia0_utt1"] == str(meld / "output_repeated_splits_test" / "dia0_utt1.mp4")

    wav = out / "audio" / "test" / "dia0_utt0.wav"
    assert rows.loc["test-dia0_utt0", "audio"] == "audio/test/dia0_utt0.wav"
    info = sf.info(wav)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert info.duration == pytest.approx(0.8, abs=0.05)
    assert not (out / "audio" / "test" / "dia2_utt0.wav").exists()  # quarantined rows are not extracted
    assert rows.loc["train-dia0_utt0", "audio"] == str(meld / "train_splits" / "dia0_utt0.wav")  # used in place
    good = _reread(summary.manifest)
    assert str(wav) in set(good["audio_path"])
    tone = sf.read(wav)[0]  # the 330 Hz tone survived extraction
    assert np.argmax(np.abs(np.fft.rfft(tone))) * 16000 / len(tone) == pytest.approx(330, abs=5)

    extracted_at, manifest = wav.stat().st_mtime_ns, summary.manifest.read_bytes()
    again = import_corpus("meld", meld, out)  # a rerun reuses what it extracted and writes the same manifest
    assert wav.stat().st_mtime_ns == extracted_at and again.manifest.read_bytes() == manifest


# --- GTZAN -------------------------------------------------------------------------------------------------------

@pytest.fixture
def gtzan(tmp_path):
    root = tmp_path / "gtzan" / "genres_original"
    for genre in GTZAN_GENRES[:3]:
        for i in range(10):
            _clip(root / genre / f"{genre}.{i:05d}.wav", seconds=0.2, rate=22050, freq=200 + 20 * i)
    return tmp_path / "gtzan"


def test_gtzan_seeded_split_is_stratified_by_genre_and_deterministic(gtzan, tmp_path):
    def splits(seed, out):
        spec = ImportSpec(seed=seed, val_share=0.2, test_share=0.3)
        summary = import_corpus("gtzan", gtzan, tmp_path / out, spec)
        assert summary.quarantine.empty
        return summary.rows.set_index("id")

    first, again, other = splits(0, "a"), splits(0, "b"), splits(1, "c")
    for genre in GTZAN_GENRES[:3]:
        counts = first[first["answer"] == genre]["split"].value_counts().to_dict()
        assert counts == {"train": 5, "test": 3, "val": 2}
    assert first["split"].equals(again["split"])
    assert not first["split"].equals(other["split"])
    assert set(first["prompt"]) == {default_suites()["gtzan"].prompt} and set(first["task"]) == {"music"}
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() == (tmp_path / "b" / "manifest.jsonl").read_bytes()
    _reread(tmp_path / "a" / "manifest.jsonl")


def test_seeded_split_keeps_groups_whole_and_ignores_row_order():
    groups = [f"spk{i % 7}" for i in range(70)]
    split = dict(zip(groups, seeded_split(groups, 3, 0.15, 0.15), strict=False))
    shuffled = list(reversed(groups))
    assert dict(zip(shuffled, seeded_split(shuffled, 3, 0.15, 0.15), strict=False)) == split
    assert all(len({s for g, s in zip(groups, seeded_split(groups, 3, 0.15, 0.15), strict=True) if g == k}) == 1
               for k in set(groups))
    assert sorted(split.values()).count("test") == 1 and sorted(split.values()).count("val") == 1


# --- MMAU / MMAR -------------------------------------------------------------------------------------------------

def test_mmau_and_mmar_rows_are_test_with_their_questions_and_choices(tmp_path):
    mmau = tmp_path / "mmau"
    _clip(mmau / "test-mini-audios" / "a.wav")
    _clip(mmau / "test-mini-audios" / "b.wav", freq=600)
    items = [
        {"id": "q1", "audio_id": "./test-mini-audios/a.wav", "question": "What rises?",
         "choices": ["pitch", "tempo"], "answer": "pitch", "task": "sound", "difficulty": "easy"},
        {"id": "q2", "audio_id": "./test-mini-audios/b.wav", "question": "Which?", "choices": ["x", "y"],
         "answer": "z", "task": "music", "difficulty": "hard"},
    ]
    (mmau / "mmau-test-mini.json").write_text(json.dumps(items))
    summary = import_corpus("mmau", mmau, tmp_path / "out-mmau")
    row = summary.rows.iloc[0]
    assert list(summary.rows["id"]) == ["q1"] and row["split"] == "test" and row["task"] == "reasoning"
    assert row["prompt"] == "What rises?" and row["choices"] == ["pitch", "tempo"]
    assert _reasons(summary) == {"q2": "answer_not_in_choices"}
    assert _reread(summary.manifest).iloc[0]["choices"] == ["pitch", "tempo"]

    mmar = tmp_path / "mmar"
    _clip(mmar / "audio" / "1.wav")
    (mmar / "MMAR-meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": 1, "audio_path": "./audio/1.wav", "question": "How many?", "choices": ["one", "two"],
         "answer": "two", "modality": "sound"},
        {"id": 2, "audio_path": "./audio/2.wav", "question": "Who?", "choices": ["a", "b"], "answer": "a",
         "modality": "speech"}]))
    summary = import_corpus("mmar", mmar, tmp_path / "out-mmar")
    assert summary.rows[["id", "split"]].values.tolist() == [["1", "test"]]
    assert _reasons(summary) == {"2": "missing_file"}


# --- evaluation scores what the import held out ----------------------------------------------------------------

def test_every_suite_evaluates_the_test_split_its_import_defines(librispeech, meld, gtzan, tmp_path):
    """An evaluated clip is never one the import put in training: by audio file, and by id in the import's naming."""
    mmau = tmp_path / "mmau"
    _clip(mmau / "a.wav")
    (mmau / "mmau-test-mini.json").write_text(json.dumps([{"id": "q1", "audio_id": "a.wav", "question": "Q?",
                                                           "choices": ["x", "y"], "answer": "x", "task": "sound"}]))
    cases = [("librispeech", librispeech, librispeech / "test-clean", lambda i: i),
             ("meld", meld, meld, lambda i: f"test-{i}"), ("gtzan", gtzan, gtzan, lambda i: i),
             ("mmau", mmau, mmau, lambda i: i)]
    for suite, corpus, data, imported_id in cases:
        rows = import_corpus(suite, corpus, tmp_path / f"out-{suite}").rows
        evaluated, _ = load_suite(suite, data, "test")
        ids = {imported_id(i) for i in evaluated["id"]}
        assert ids and not ids & set(rows.loc[rows["split"] != "test", "id"]), suite
        assert ids >= set(rows.loc[rows["split"] == "test", "id"]), f"{suite}: every held-out row is scored"
        training_audio = {os.path.realpath(p) for p in rows.loc[rows["split"] == "train", "audio_path"]}
        assert not {os.path.realpath(p) for p in evaluated["audio_path"]} & training_audio, suite
    with pytest.raises(ValueError, match="train-clean-100 is the train split"):
        load_suite("librispeech", librispeech / "train-clean-100", "test")


# --- generic table -----------------------------------------------------------------------------------------------

@pytest.fixture
def table(tmp_path):
    """A CSV of 12 questions by 6 speakers (pipe and JSON-list choices), audio relative to the CSV's folder."""
    folder = tmp_path / "corpus"
    rows = []
    for i in range(12):
        _clip(folder / "clips" / f"c{i}.wav", freq=250 + 30 * i)
        choices = "yes|no" if i % 2 else json.dumps(["low", "high"])
        rows.append({"file": f"clips/c{i}.wav", "q": f"Question {i}?", "a": "yes" if i % 2 else "high",
                     "opts": choices, "who": f"s{i % 6}"})
    rows[5]["a"] = "maybe"  # not among yes|no
    pd.DataFrame(rows).to_csv(folder / "qa.csv", index=False)
    return folder / "qa.csv"


COLS = TableColumns(audio="file", question="q", answer="a", choices="opts", speaker="who")


def test_table_seeded_split_by_speaker_keeps_every_speaker_in_one_split(table, tmp_path):
    def run(seed, out):
        spec = ImportSpec(columns=COLS, task="understanding", seed=seed, val_share=0.2, test_share=0.2)
        return import_corpus("table", table, tmp_path / out, spec)

    summary = run(0, "a")
    rows = summary.rows
    assert _reasons(summary) == {"qa-5": "answer_not_in_choices"}
    assert rows.groupby("speaker")["split"].nunique().max() == 1
    assert set(rows["split"]) == {"train", "val", "test"}
    first = rows.set_index("id")
    assert first.loc["qa-1", "choices"] == ["yes", "no"] and first.loc["qa-0", "choices"] == ["low", "high"]
    assert first.loc["qa-0", "prompt"] == "Question 0?" and first.loc["qa-0", "audio"] == \
        str(table.parent / "clips" / "c0.wav")
    assert run(0, "b").rows.set_index("id")["split"].equals(first["split"])
    assert not run(4, "c").rows.set_index("id")["split"].equals(first["split"])
    good = _reread(summary.manifest)
    assert set(good["source"]) == {"table"} and len(good) == 11


def test_table_jsonl_with_split_column_and_one_prompt(tmp_path):
    folder = tmp_path / "j"
    for i in range(3):
        _clip(folder / f"{i}.flac")
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"key": "x", "wav": "0.flac", "label": "calm", "part": "train", "opts": ["calm", "tense"]},
        {"key": "y", "wav": "1.flac", "label": "tense", "part": "dev", "opts": ["calm", "tense"]},
        {"key": "z", "wav": "2.flac", "label": "calm", "part": "holdout", "opts": ["calm", "tense"]}]))
    cols = TableColumns(audio="wav", question=None, answer="label", choices="opts", split="part", id="key")
    spec = ImportSpec(columns=cols, task="emotion", prompt="How does it feel?")
    summary = import_corpus("table", folder / "items.jsonl", tmp_path / "out", spec)
    assert summary.rows[["id", "split", "prompt"]].values.tolist() == [
        ["x", "train", "How does it feel?"], ["y", "val", "How does it feel?"]]
    assert _reasons(summary) == {"z": "unknown_split"}
    assert "speaker" not in summary.rows
    # the command: --prompt without --question-col stands in for the default question column
    args = ["data", "import", "table", str(folder / "items.jsonl"), "--out", str(tmp_path / "cli"), "--task", "emotion",
            "--prompt", "How does it feel?", "--audio-col", "wav", "--answer-col", "label", "--choices-col", "opts",
            "--split-col", "part", "--id-col", "key"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert (tmp_path / "cli" / "manifest.jsonl").read_text() == summary.manifest.read_text()


def test_table_errors_name_the_file_and_column(table, tmp_path, capsys):
    with pytest.raises(ImportUsageError, match=r"qa\.csv: no column --choices-col 'options'.*'opts'"):
        import_corpus("table", table, tmp_path / "out", ImportSpec(
            task="music", columns=TableColumns(audio="file", question="q", answer="a", choices="options")))
    with pytest.raises(ImportUsageError, match="--task must be one of"):
        import_corpus("table", table, tmp_path / "out", ImportSpec(columns=COLS, task="chat"))
    with pytest.raises(CorpusError, match="not a .csv or .jsonl file"):
        import_corpus("table", table.parent, tmp_path / "out", ImportSpec(columns=COLS, task="music"))
    assert not (tmp_path / "out").exists()

    args = ["data", "import", "table", str(table), "--out", str(tmp_path / "out"), "--task", "music",
            "--audio-col", "file", "--question-col", "q", "--answer-col", "answer"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and "qa.csv: no column --answer-col 'answer'" in err
    assert len(err.strip().splitlines()) == 1


# --- audio from elsewhere ----------------------------------------------------------------------------------------

@pytest.mark.timeout(120)  # before the fix a FIFO hung the decode and /dev/zero never ended: this fails, not hangs
def test_a_table_keeps_to_its_corpus_folder_and_refuses_what_is_not_a_file(tmp_path):
    """A table's audio column is its author's: an absolute path or a `..` out of the corpus folder is quarantined
    before anything is opened (unless --allow-outside-root), and a FIFO, a device or a folder is refused unread."""
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    _clip(corpus / "in.wav")
    _clip(elsewhere / "out.wav", freq=600)
    os.mkfifo(corpus / "pipe.wav")
    (corpus / "folder.wav").mkdir()
    audio = {"in": "in.wav", "dotdot": "../elsewhere/out.wav", "absolute": str(elsewhere / "out.wav"),
             "pipe": "pipe.wav", "zero": "/dev/zero", "folder": "folder.wav"}
    pd.DataFrame({"id": list(audio), "audio": list(audio.values()), "answer": "yes", "question": "Is it?",
                  "split": "train"}).to_csv(corpus / "items.csv", index=False)
    cols = TableColumns(split="split", id="id")
    spec = ImportSpec(columns=cols, task="understanding")
    summary = import_corpus("table", corpus / "items.csv", tmp_path / "out", spec)
    assert _reasons(summary) == {"dotdot": "outside_root", "absolute": "outside_root", "zero": "outside_root",
                                 "pipe": "not_a_file", "folder": "not_a_file"}
    assert summary.rows["id"].tolist() == ["in"]
    why = dict(zip(summary.quarantine["id"], summary.quarantine["reason"], strict=True))
    assert str(corpus) in why["dotdot"] and "--allow-outside-root" in why["dotdot"]
    assert why["pipe"] == "not_a_file: a FIFO, not a file"

    trusted = import_corpus("table", corpus / "items.csv", tmp_path / "out2", replace(spec, allow_outside_root=True))
    assert _reasons(trusted) == {"pipe": "not_a_file", "folder": "not_a_file", "zero": "not_a_file"}
    assert sorted(trusted.rows["id"]) == ["absolute", "dotdot", "in"]

    runner = CliRunner()
    args = ["data", "import", "table", str(corpus / "items.csv"), "--out", str(tmp_path / "out3"), "--task",
            "understanding", "--split-col", "split", "--id-col", "id"]
    assert runner.invoke(app, args).exit_code == 0
    assert [r["id"] for r in map(json.loads, (tmp_path / "out3" / "manifest.jsonl").read_text().splitlines())] == ["in"]
    assert runner.invoke(app, [*args[:5], str(tmp_path / "out4"), *args[6:], "--allow-outside-root"]).exit_code == 0
    assert len((tmp_path / "out4" / "manifest.jsonl").read_text().splitlines()) == 3


def test_video_decoding_stops_at_the_longest_clip_kept(tmp_path):
    """A video's audio is decoded only up to --max-seconds: a longer one is quarantined as too_long without its
    whole track in memory, and one within the cap is extracted whole."""
    from coat.data.importers import NoAudio, extract_audio

    video = _mp4(tmp_path / "long.mp4", seconds=3.0)
    with pytest.raises(NoAudio, match="longer than 1s") as refused:
        extract_audio(video, tmp_path / "cut.wav", max_seconds=1.0)
    assert refused.value.code == "too_long" and not (tmp_path / "cut.wav").exists()
    extract_audio(video, tmp_path / "whole.wav", max_seconds=5.0)
    assert sf.info(tmp_path / "whole.wav").duration == pytest.approx(3.0, abs=0.05)
    os.mkfifo(tmp_path / "pipe.mp4")
    with pytest.raises(NoAudio, match="FIFO") as refused:
        extract_audio(tmp_path / "pipe.mp4", tmp_path / "pipe.wav")
    assert refused.value.code == "not_a_file"
