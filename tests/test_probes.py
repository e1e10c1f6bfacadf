"""Linear probes: hidden-state extraction from a tiny CoAT model on real coat-mini audio, probes on synthetic features
whose answers are known, grouped folds, and `coat probe` end to end with a real feature store and MLflow store."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from coat import tracking
from coat.analysis.compare import held_out_comparison
from coat.analysis.hidden_states import (
    HiddenStateWriter,
    extract_hidden_states,
    logit_lens,
    normalise_layers,
    read_extraction,
    read_layer,
)
from coat.analysis.linear_probes import (
    COLUMNS,
    ProbeTarget,
    clip_groups,
    cv_splits,
    fit_probes,
    load_target_stats,
    probe_rows,
    probe_targets,
)
from coat.cli import probe_command
from coat.data.audio import decode
from coat.data.precompute import manifest_clips
from coat.data.store import FeatureStore, feature_rows, feature_version, standardise
from coat.experts.registry import build_expert
from coat.model import CoATModel
from coat.train.checkpoint import TARGET_STATS_FILE
from tests.conftest import BACKBONE_NAMES, tiny_config

MAX_SECONDS = 2.0  # tiny_config's audio window: clips are cut to it, for the experts and the model alike


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(coat_mini, tmp_path_factory) -> Path:
    """mel features of every coat-mini clip, cut to MAX_SECONDS, computed in this process (no Ray) and filed under
    the cropped version training reads; one part for the training split, one for the rest."""
    root = tmp_path_factory.mktemp("store")
    expert = build_expert("mel")
    clips, _ = manifest_clips(coat_mini)
    clips = clips.drop_duplicates("clip_hash")
    version = feature_version(expert.version, MAX_SECONDS)
    for part in (clips[clips["split"] == "train"], clips[clips["split"] != "train"]):
        waves = [decode(p, expert.sample_rate, MAX_SECONDS, crop=True) for p in part["audio_path"]]
        features, _ = expert(waves, sample_rate=expert.sample_rate)
        FeatureStore(root).write("mel", version, feature_rows(part["clip_hash"], [f.numpy() for f in features]))
    return root


@pytest.fixture(scope="module")
def checkpoint(coat_mini, store, tmp_path_factory) -> Path:
    """A tiny K = 4 CoAT checkpoint with the training split's mel statistics, as `save_checkpoint` leaves them."""
    cfg = tiny_config("qwen2-audio", "experts.names=[mel]", f"data.max_seconds={MAX_SECONDS}",
                      f"data.manifest={coat_mini}", f"data.store={store}")
    folder = CoATModel(cfg).save(tmp_path_factory.mktemp("run") / "checkpoint_000010")
    train, _ = manifest_clips(coat_mini, "train")
    version = feature_version(build_expert("mel").version, MAX_SECONDS)
    stats = FeatureStore(store).split_stats("mel", version, train["clip_hash"])
    (folder / TARGET_STATS_FILE).write_text(json.dumps({"mel": stats}))
    return folder


@pytest.fixture(scope="module")
def model(checkpoint) -> CoATModel:
    return CoATModel.load(checkpoint)


@pytest.fixture(scope="module")
def train_rows(coat_mini, store, checkpoint):
    return probe_rows(coat_mini, "train", ["mel"], store, target_stats=load_target_stats(checkpoint),
                      max_seconds=MAX_SECONDS)


# ---------------------------------------------------------------- extraction

def test_extraction_streams_both_positions_batch_by_batch(model, train_rows, tmp_path):
    rows = train_rows[0].iloc[:10]
    extraction = extract_hidden_states(model, rows, tmp_path / "hidden", batch_size=4, max_seconds=MAX_SECONDS)
    assert extraction.ids == rows["id"].tolist() and not extraction.skipped
    assert extraction.layers == [0, 1, 2] and extraction.positions == ["slots", "response"]
    assert extraction.chunks == 3 and extraction.hidden_size == 64
    for position in extraction.positions:
        chunks = sorted((tmp_path / "hidden" / position).glob("chunk-*.npy"))
        assert [np.load(c).shape for c in chunks] == [(3, 4, 64), (3, 4, 64), (3, 2, 64)]
        for layer in extraction.layers:
            assert read_layer(tmp_path / "hidden", position, layer).shape == (10, 64)
    assert read_extraction(tmp_path / "hidden").ids == extraction.ids
    assert json.loads((tmp_path / "hidden" / "clips.json").read_text()) == rows["id"].tolist()

    # The slots' input embeddings are the same for every clip; every later state depends on the clip.
    slots0, slots2 = (read_layer(tmp_path / "hidden", "slots", layer) for layer in (0, 2))
    assert np.allclose(slots0, slots0[0]) and not np.allclose(slots2, slots2[0])
    assert not np.allclose(read_layer(tmp_path / "hidden", "response", 2), slots2)

    # Left padding changes nothing: one clip at a time gives the same states, and they are the states of the
    # slots and of the last prompt token of an unpadded forward.
    alone = extract_hidden_states(model, rows, tmp_path / "alone", [-1], batch_size=1, max_seconds=MAX_SECONDS)
    assert alone.layers == [2] and alone.chunks == 10
    for position in ("slots", "response"):
        np.testing.assert_allclose(read_layer(tmp_path / "alone", position, 2),
                                   read_layer(tmp_path / "hidden", position, 2), atol=2e-4, rtol=1e-3)
    first = rows.iloc[0]
    batch = model.encode([decode(first["audio_path"], 16000, MAX_SECONDS, crop=True).numpy()], [first["prompt"]])
    with torch.no_grad():
        hidden = model.lm(**model._model_inputs(batch), output_hidden_states=True).hidden_states[2][0]
    ids = batch["input_ids"][0]
    slot_positions = torch.nonzero(model.backbone.thinking.is_slot(ids))[:, 0]
    assert slot_positions.tolist() == list(range(len(ids) - 5, len(ids) - 1))  # K slots, then the block's end
    np.testing.assert_allclose(read_layer(tmp_path / "alone", "slots", 2)[0], hidden[slot_positions].mean(0),
                               atol=1e-5)
    np.testing.assert_allclose(read_layer(tmp_path / "alone", "response", 2)[0], hidden[-1], atol=1e-5)


def test_extraction_without_slots_reuse_and_layer_range(train_rows, tmp_path):
    baseline = CoATModel(tiny_config("qwen2-audio", "experts.names=[mel]", "thinking.num_slots=0"))
    rows = train_rows[0].iloc[:3]
    first = extract_hidden_states(baseline, rows, tmp_path, [0, -1], 2, max_seconds=MAX_SECONDS, fingerprint="a")
    assert first.positions == ["response"] and first.layers == [0, 2] and not first.reused
    assert not (tmp_path / "slots").exists()
    again = extract_hidden_states(baseline, rows, tmp_path, [0, -1], 2, max_seconds=MAX_SECONDS, fingerprint="a")
    assert again.reused and again.ids == first.ids
    other = extract_hidden_states(baseline, rows.iloc[:1], tmp_path, [1], 2, max_seconds=MAX_SECONDS,
                                  fingerprint="b")
    assert not other.reused and other.layers == [1] and len(list((tmp_path / "response").glob("*.npy"))) == 1
    with pytest.raises(ValueError, match="slots"):
        read_layer(tmp_path, "slots", 1)
    assert normalise_layers([-1, 0, 2], 3) == [0, 2]
    with pytest.raises(ValueError, match="layer 3 is out of range: this model has 3 hidden states"):
        normalise_layers([3], 3)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES[1:])
def test_extraction_on_the_other_backbones_ignores_padding(backbone, train_rows, tmp_path):
    model = CoATModel(tiny_config(backbone, "experts.names=[mel]"))
    rows = train_rows[0].iloc[:3]
    batched = extract_hidden_states(model, rows, tmp_path / "batched", [-1], 2, max_seconds=MAX_SECONDS)
    alone = extract_hidden_states(model, rows, tmp_path / "alone", [-1], 1, max_seconds=MAX_SECONDS)
    assert batched.positions == ["slots", "response"] and batched.chunks == 2 and alone.chunks == 3
    for position in batched.positions:
        np.testing.assert_allclose(read_layer(tmp_path / "batched", position, batched.layers[0]),
                                   read_layer(tmp_path / "alone", position, alone.layers[0]), atol=2e-4, rtol=1e-3)


def test_the_logit_lens_reads_slots_through_the_lm_head_as_the_model_does_at_its_last_layer(model, train_rows):
    rows = train_rows[0].iloc[:6]
    lens = logit_lens(model, rows, batch_size=4, top_k=3, max_seconds=MAX_SECONDS)
    assert set(lens["layer"]) == {0, 1, 2} and set(lens["slot"]) == {0, 1, 2, 3} and set(lens["rank"]) == {1, 2, 3}
    audio = [decode(p, model.backbone.sample_rate, MAX_SECONDS, crop=True).numpy() for p in rows["audio_path"]]
    inputs = model._model_inputs(model.encode(audio, list(rows["prompt"])))
    with torch.no_grad():
        logits = model.lm(**inputs, use_cache=False).logits
    is_slot = model.backbone.thinking.is_slot(inputs["input_ids"])
    expected = torch.softmax(logits[is_slot].view(len(rows), 4, -1), -1).mean(0).topk(3, -1)  # [K, 3]
    last = lens[lens["layer"] == 2].sort_values(["slot", "rank"])
    assert last["token_id"].tolist() == expected.indices.flatten().tolist()
    np.testing.assert_allclose(last["probability"], expected.values.flatten().numpy(), rtol=1e-4)
    assert last["token"].tolist() == [model.backbone.tokenizer.decode([t]) for t in last["token_id"]]
    plain = CoATModel(tiny_config("qwen2-audio", "experts.names=[mel]", "thinking.num_slots=0"))
    assert logit_lens(plain, rows, max_seconds=MAX_SECONDS).empty


def test_expert_targets_use_the_checkpoint_statistics_and_average_frames(train_rows, checkpoint, store):
    rows, sources, left_out, from_store = train_rows
    assert len(rows) == 32 and left_out.empty and from_store == []
    stats = load_target_stats(checkpoint)["mel"]
    assert sources["mel"].stats == stats and sources["mel"].version.endswith("-crop2s")
    (target,) = probe_targets(rows, ["mel"], sources)
    assert target.kind == "regression" and target.values.shape == (32, 80)
    first = rows.iloc[0]
    frames = FeatureStore(store).read("mel", sources["mel"].version, [first["clip_hash"]])[first["clip_hash"]]
    assert frames.shape[0] == 201  # 2 s at 100 fps: the cropped clip's features
    np.testing.assert_allclose(target.values[0], standardise(frames, stats).mean(0), rtol=1e-5, atol=1e-5)


def test_probe_rows_subsample_and_statistics_missing_from_the_checkpoint(coat_mini, store, train_rows):
    """Statistics the checkpoint lacks come from the training split in the store, never from the probed split."""
    sub, sources, _, from_store = probe_rows(coat_mini, "val", ["mel"], store, target_stats={},
                                             max_seconds=MAX_SECONDS, max_clips=3, seed=1)
    assert from_store == ["mel"] and sources["mel"].stats == train_rows[1]["mel"].stats
    val, _ = manifest_clips(coat_mini, "val")
    assert len(sub) == 3 and set(sub["id"]) < set(val["id"])
    assert sub["id"].tolist() == [i for i in val["id"] if i in set(sub["id"])]  # manifest order
    again = probe_rows(coat_mini, "val", ["mel"], store, target_stats={}, max_seconds=MAX_SECONDS, max_clips=3,
                       seed=1)[0]
    assert again["id"].tolist() == sub["id"].tolist()


def test_family_targets_one_per_subtask(train_rows):
    """Subtasks of a family have disjoint answer sets: pooled, a probe could score from the question alone."""
    rows = train_rows[0]
    targets = {t.name: t for t in probe_targets(rows, ["family"], {})}
    expected = {f"family/{task}/{subtask}" for task, subtask in zip(rows["task"], rows["subtask"], strict=True)
                if task != "transcription"}
    assert set(targets) == expected | {"family/transcription"}
    for name, target in targets.items():
        if name != "family/transcription":
            task, subtask = name.split("/")[1:]
            assert target.kind == "classification" and set(rows["subtask"].iloc[target.rows]) == {subtask}
            assert set(rows["task"].iloc[target.rows]) == {task}
            assert list(target.values) == list(rows["answer"].iloc[target.rows])
    assert targets["family/transcription"].note.startswith("free-text")
    assert sum(len(t.rows) for t in targets.values()) == len(rows)


# ---------------------------------------------------------------- probes on features with known answers

def write_features(path: Path, layers: dict[int, np.ndarray], response: np.ndarray, chunk: int = 32) -> None:
    """Slots states per layer [clips, hidden] and one response array for every layer, in the extraction layout."""
    n, hidden = response.shape
    writer = HiddenStateWriter(path, sorted(layers), ["slots", "response"], hidden)
    slots = np.stack([layers[layer] for layer in sorted(layers)])
    for start in range(0, n, chunk):
        at = slice(start, start + chunk)
        writer.append([f"c{i}" for i in range(n)][at], {"slots": slots[:, at],
                                                         "response": np.stack([response[at]] * len(layers))})
    writer.close()


def test_probes_find_what_one_layer_holds_and_nothing_else(tmp_path):
    rng = np.random.default_rng(0)
    n, hidden = 120, 16
    layers = {layer: rng.standard_normal((n, hidden)) for layer in (0, 1, 2)}
    write_features(tmp_path, layers, rng.standard_normal((n, hidden)))
    assert read_extraction(tmp_path).chunks == 4
    informative = layers[1]
    targets = [
        ProbeTarget("linear", "regression", informative @ rng.standard_normal((hidden, 3))
                    + 0.05 * rng.standard_normal((n, 3)), np.arange(n)),
        ProbeTarget("noise", "regression", rng.standard_normal((n, 4)), np.arange(n)),
        ProbeTarget("sign", "classification", np.where(informative[:, 5] > 0, "up", "down"), np.arange(n)),
        ProbeTarget("one-class", "classification", np.array(["a"] * 20), np.arange(20)),
        ProbeTarget("few", "classification", np.array(["a", "b"] * 3), np.arange(6)),
    ]
    groups = np.arange(n) // 2  # clips in pairs
    fit = fit_probes(tmp_path, targets, groups, folds=5, seed=0)
    table = fit.table
    assert list(table.columns) == list(COLUMNS) and (table["control_by"] == "clip").all()
    assert len(table) == 2 * 3 * len(targets)
    at = table.set_index(["position", "layer", "target"])

    best = at.loc[("slots", 1, "linear")]
    assert best["score"] > 0.95 and abs(best["control"]) < 0.15 and best["selectivity"] > 0.85
    assert -0.1 < best["baseline"] <= 0 and best["metric"] == "r2" and best["dims"] == 3
    for position, layer in [("slots", 0), ("slots", 2), ("response", 1)]:
        assert at.loc[(position, layer, "linear"), "score"] < 0.1
    noise = table[table["target"] == "noise"]
    assert (noise["score"] < 0.05).all() and (noise["selectivity"].abs() < 0.15).all()

    sign = at.loc[("slots", 1, "sign")]
    majority = max(np.mean(targets[2].values == "up"), np.mean(targets[2].values == "down"))
    assert sign["metric"] == "accuracy" and sign["score"] > 0.9 and sign["score"] > majority + 0.3
    assert sign["baseline"] <= majority + 0.05 and sign["control"] < 0.75 and sign["selectivity"] > 0.25
    assert at.loc[("slots", 2, "sign"), "score"] < 0.75

    skipped = table[table["target"].isin(["one-class", "few"])]
    assert skipped["score"].isna().all() and skipped["selectivity"].isna().all()
    assert set(skipped.drop_duplicates("target")["note"]) == {"one class only ('a')",
                                                              "6 clips in 3 groups: too few for 5 folds"}
    per_clip = fit.clips.groupby(["position", "layer", "target"])[["score", "control"]].mean()
    fitted = table[table["score"].notna()].set_index(["position", "layer", "target"])
    np.testing.assert_allclose(per_clip.loc[fitted.index, "score"], fitted["score"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(per_clip.loc[fitted.index, "control"], fitted["control"], rtol=1e-9, atol=1e-12)
    assert len(fit.clips) == 2 * 3 * 3 * n, "every clip of every fitted target, position and layer"


def test_the_control_discounts_what_a_probe_gets_from_the_question_alone(tmp_path):
    """The states encode which of eight questions was asked and a clip signal. A target fixed by the question is
    decoded as well as one the clip signal holds; the control task (Hewitt and Liang's random value per type, with
    question types) tells them apart, as does the baseline conditioned on the question; a shuffled-label control
    does not."""
    rng = np.random.default_rng(3)
    n, hidden, kinds = 160, 24, 8
    questions = np.repeat(np.arange(kinds), n // kinds).astype(str)
    signal = rng.standard_normal((n, 4))
    states = np.concatenate([np.eye(kinds)[questions.astype(int)] * 3, signal, rng.standard_normal((n, hidden - 12))],
                            axis=1)
    write_features(tmp_path, {0: states}, states)
    targets = [ProbeTarget("by-question", "regression", rng.standard_normal((kinds, 2))[questions.astype(int)],
                           np.arange(n)),
               ProbeTarget("by-clip", "regression", signal[:, :2] + 0.05 * rng.standard_normal((n, 2)), np.arange(n))]
    groups = np.arange(n)
    table = fit_probes(tmp_path, targets, groups, questions, folds=5).table.set_index(["position", "target"])
    question, clip = table.loc[("slots", "by-question")], table.loc[("slots", "by-clip")]
    assert question["score"] > 0.9 and clip["score"] > 0.9, "a probe decodes both"
    assert question["control_by"] == "question" and question["control"] > 0.8 and question["selectivity"] < 0.15
    assert clip["selectivity"] > 0.5
    assert question["baseline"] > 0.9 and clip["baseline"] < 0.1, "the question alone predicts only the first"
    permuted = fit_probes(tmp_path, targets, groups, folds=5).table.set_index(["position", "target"])
    assert permuted.loc[("slots", "by-question"), "selectivity"] > 0.8, "a shuffled-label control misses it"


def test_layers_are_chosen_on_half_the_clips_and_compared_on_the_other():
    clips = [f"c{i}" for i in range(40)]

    def per_clip(best_layer: int, level: float, seed: int) -> pd.DataFrame:
        rng = np.random.default_rng(seed)
        return pd.concat([pd.DataFrame({"layer": layer, "clip": clips, "control": 0.0, "score": (
            level if layer == best_layer else 0.0) + 0.1 * rng.standard_normal(40)}) for layer in range(3)])

    result = held_out_comparison(per_clip(2, 0.6, 0), per_clip(1, 0.2, 1), n=500)
    assert (result["coat_layer"], result["plain_layer"], result["n_clips"]) == (2, 1, 20)
    assert result["diff"] == pytest.approx(result["coat"] - result["plain"]) and 0.3 < result["diff"] < 0.5
    assert result["ci_low"] > 0.2 and result["ci_high"] < 0.6
    with pytest.raises(ValueError, match="share 2 probed clips"):
        held_out_comparison(per_clip(2, 0.6, 0).head(2), per_clip(1, 0.2, 1), n=10)


def test_folds_never_split_a_clip_or_a_speaker():
    rows = pd.DataFrame({"clip_hash": ["h0", "h0", "h1", "h2", "h3", "h4", "h5", "h6", "h7", "h8"],
                         "speaker": ["s0", "s1", "s1", "s2", "s3", "s3", None, "s6", "s7", "s8"]})
    groups = clip_groups(rows)
    # h0 links rows 0 and 1, s1 links 1 and 2, s3 links 4 and 5; the others stand alone.
    assert len(set(groups[:3])) == 1 and groups[4] == groups[5] and len(np.unique(groups)) == 7
    tested = []
    for train, test in cv_splits(groups, 3, seed=1):
        assert not set(groups[train]) & set(groups[test])
        assert not set(rows["clip_hash"].iloc[train]) & set(rows["clip_hash"].iloc[test])
        assert not set(rows["speaker"].iloc[train].dropna()) & set(rows["speaker"].iloc[test].dropna())
        tested += list(test)
    assert sorted(tested) == list(range(len(rows)))


def test_grouped_folds_stop_a_probe_from_memorising_groups(tmp_path):
    """Features identify the group and the target is arbitrary per group: only a leaky split could score."""
    rng = np.random.default_rng(1)
    n_groups, per_group, hidden = 40, 3, 64
    groups = np.repeat(np.arange(n_groups), per_group)
    features = rng.standard_normal((n_groups, hidden))[groups] + 0.01 * rng.standard_normal((len(groups), hidden))
    write_features(tmp_path, {0: features}, features)
    target = ProbeTarget("per-group", "regression", rng.standard_normal((n_groups, 1))[groups], np.arange(len(groups)))
    leaky = fit_probes(tmp_path, [target], np.arange(len(groups)), folds=5).table
    grouped = fit_probes(tmp_path, [target], groups, folds=5).table
    assert (leaky["score"] > 0.8).all() and (grouped["score"] < 0.1).all()


# ---------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    app = typer.Typer()
    app.command()(probe_command)
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow').resolve()}/mlruns.db"

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args], env={"MLFLOW_TRACKING_URI": uri, "COLUMNS": "200"})
        assert "Traceback" not in result.output, result.output
        return result.exit_code, " ".join(result.output.split())

    invoke.uri = uri
    return invoke


def test_probes_of_mel_and_family_are_written_and_logged_to_mlflow(cli, checkpoint, coat_mini, tmp_path):
    out = tmp_path / "probes"
    code, output = cli("--checkpoint", checkpoint, "--data", coat_mini, "--targets", "mel", "--split", "train",
                       "--batch-size", "8", "--out", out, "--experiment", "probes")
    assert code == 0, output
    assert "mel │ slots │ r2 │ 2 │" in output and "mel │ response │ r2 │" in output, output
    assert "(train, 4 batches, 32 clips)" in output
    table = pd.read_parquet(out / "results.parquet")
    csv = pd.read_csv(out / "results.csv")
    assert list(csv.columns) == list(table.columns) and np.allclose(csv["score"], table["score"])
    assert set(table["position"]) == {"slots", "response"} and sorted(set(table["layer"])) == [0, 1, 2]
    assert (table["target"] == "mel").all() and (table["n_clips"] == 32).all() and (table["num_slots"] == 4).all()
    assert (table["score"] - table["control"] == table["selectivity"]).all()
    assert read_extraction(out / "hidden").chunks == 4

    client = MlflowClient(cli.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("probes").experiment_id])
    assert run.info.run_name == "probe-checkpoint_000010" and run.info.status == "FINISHED"
    history = tracking.metric_history(cli.uri, run.info.run_id, "probe/slots/mel/r2")
    expected = table[table["position"] == "slots"].sort_values("layer")
    assert [step for step, _ in history] == [0, 1, 2]
    np.testing.assert_allclose([value for _, value in history], expected["score"])
    assert [s for s, _ in tracking.metric_history(cli.uri, run.info.run_id, "probe/response/mel/r2_selectivity")] \
        == [0, 1, 2]
    artifact = client.download_artifacts(run.info.run_id, "probes/results.parquet", str(tmp_path))
    pd.testing.assert_frame_equal(pd.read_parquet(artifact), table)

    code, output = cli("--checkpoint", checkpoint, "--data", coat_mini, "--targets", "family", "--split", "train",
                       "--out", out, "--mlflow-run", run.info.run_id)
    assert code == 0, output
    assert "reusing the hidden states" in output and "not probed: family/transcription (free-text" in output
    table = pd.read_parquet(out / "results.parquet")
    fitted = table[table["note"] == ""]
    assert {name.rsplit("/", 1)[0] for name in fitted["target"]} <= {
        "family/emotion", "family/music", "family/reasoning", "family/understanding"} and len(fitted)
    assert (fitted["metric"] == "accuracy").all() and fitted["score"].between(0, 1).all()
    history = tracking.metric_history(cli.uri, run.info.run_id, f"probe/slots/{fitted['target'].iloc[0]}/accuracy")
    assert [step for step, _ in history] == [0, 1, 2]


def test_probe_errors_name_the_problem(cli, checkpoint, coat_mini, tmp_path):
    common = ["--data", coat_mini, "--split", "train", "--out", tmp_path / "out"]
    cases = [
        (["--checkpoint", tmp_path, "--targets", "mel", *common], 1, "is not a CoAT checkpoint"),
        (["--checkpoint", checkpoint, "--targets", "mel", "--data", tmp_path / "none.jsonl"], 1,
         "none.jsonl: manifest not found"),
        (["--checkpoint", checkpoint, "--targets", "mel,nope", *common], 2, "unknown expert 'nope'"),
        (["--checkpoint", checkpoint, "--targets", "mel", "--layers", "0,7", *common], 2,
         "layer 7 is out of range: this model has 3 hidden states"),
        (["--checkpoint", checkpoint, "--targets", "mel", "--layers", "last", *common], 2,
         "'last' is not a comma-separated list of layer indices"),
        (["--checkpoint", checkpoint, "--targets", "mel", "--data", coat_mini, "--split", "dev"], 2,
         "'dev' is not one of test, train, val"),
        (["--checkpoint", checkpoint, "--targets", "prosody", *common], 1,
         "coat experts precompute --data"),
        (["--checkpoint", checkpoint, "--targets", "mel", *common, "--mlflow-run", "0" * 32], 1, "MLflow:"),
        (["--checkpoint", checkpoint, "--targets", "mel", *common, "--mlflow-run", "x", "--experiment", "e"], 2,
         "give --mlflow-run or --experiment, not both"),
    ]
    for args, expected_code, message in cases:
        code, output = cli(*args)
        assert code == expected_code and message in output, (args, output)
    assert not (tmp_path / "out").exists()


def test_an_empty_split_is_reported(cli, checkpoint, tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    rows = [{"id": "a", "audio": "a.wav", "task": "emotion", "prompt": "p", "answer": "happy", "split": "train"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, output = cli("--checkpoint", checkpoint, "--targets", "family", "--data", manifest, "--split", "test")
    assert code == 1 and "no usable rows in split 'test'" in output, output
