"""A training mixture: manifests combined into one without losing or confusing rows, and drawn from by weight."""

import json

import numpy as np
import pandas as pd
import pytest

from coat.config import ConfigError, load_config
from coat.data.manifest import ManifestError, read_manifest, validate_rows
from coat.data.mixture import combine, sample_weights
from coat.data.prepare import prepare_data, training_streams
from coat.data.stream import Stream, epoch_order


@pytest.fixture()
def second(tmp_path, coat_mini):
    """A second corpus in another folder: 12 coat-mini clips under the same ids, and one row whose answer is not
    among its choices."""
    rows = [json.loads(line) for line in coat_mini.read_text().splitlines()][:12]
    rows = [r | {"audio": str(coat_mini.parent / r["audio"])} for r in rows]
    rows.append(rows[0] | {"id": "broken", "choices": ["yes", "no"], "answer": "maybe"})
    path = tmp_path / "second" / "manifest.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_combine_prefixes_ids_keeps_audio_and_leaves_bad_rows_to_the_quarantine(tmp_path, coat_mini, second):
    cfg = load_config(overrides=[f"data.mixture=[{{manifest: {coat_mini}, name: mini}}, {{manifest: {second}}}]"])
    out = combine(cfg.data.mixture, tmp_path / "mix" / "manifest.jsonl")
    rows = read_manifest(out)
    assert len(rows) == 40 + 13 and rows["mixture"].value_counts().to_dict() == {"mini": 40, "second": 13}
    assert rows["id"].is_unique and set(rows["id"][:2]) == {f"mini/{i}" for i in read_manifest(coat_mini)["id"][:2]}
    assert all(p.startswith("/") and (tmp_path / p).is_file() for p in rows["audio"])
    good, quarantined = validate_rows(rows)
    assert len(good) == 52 and quarantined[["id", "reason"]].values.tolist() == [["second/broken",
                                                                                  "answer_not_in_choices"]]


def test_combine_never_overwrites_a_manifest_it_did_not_write(coat_mini, second):
    cfg = load_config(overrides=[f"data.mixture=[{{manifest: {second}}}]"])
    before = coat_mini.read_text()
    with pytest.raises(ManifestError, match=f"data.manifest={coat_mini} is a manifest of its own"):
        combine(cfg.data.mixture, coat_mini)
    assert coat_mini.read_text() == before


def test_mixture_config_names_a_bad_entry():
    with pytest.raises(ConfigError, match=r"data.mixture.1.weight.: 0.0 must be > 0"):
        load_config(overrides=["data.mixture=[{manifest: a/m.jsonl}, {manifest: b/m.jsonl, weight: 0}]"])
    with pytest.raises(ConfigError, match="repeat"):
        load_config(overrides=["data.mixture=[{manifest: a/m.jsonl}, {manifest: a/other.jsonl}]"])


def test_training_draws_each_source_by_its_weight_not_its_size():
    sources = ["small"] * 10 + ["large"] * 90
    weights = sample_weights(sources, {"small": 3.0, "large": 1.0})
    assert weights.sum() == pytest.approx(1.0)
    drawn = np.concatenate([epoch_order(100, seed=0, epoch=e, world=2, rank=r, step_rows=5, weights=weights)
                            for e in range(40) for r in range(2)])
    share = np.mean(np.array(sources)[drawn] == "small")
    assert share == pytest.approx(0.75, abs=0.03)
    plain = np.concatenate([epoch_order(100, seed=0, epoch=e, world=1, rank=0, step_rows=5) for e in range(40)])
    assert np.mean(np.array(sources)[plain] == "small") == pytest.approx(0.10)
    again = epoch_order(100, seed=0, epoch=3, world=2, rank=1, step_rows=5, weights=weights)
    assert np.array_equal(again, epoch_order(100, seed=0, epoch=3, world=2, rank=1, step_rows=5, weights=weights))


def test_a_run_on_a_mixture_trains_on_every_source_at_its_weight(tmp_path, coat_mini, second):
    cfg = load_config(overrides=[
        f"data.manifest={tmp_path / 'mix' / 'manifest.jsonl'}", f"data.store={coat_mini.parent / 'store'}",
        f"data.mixture=[{{manifest: {coat_mini}, weight: 1, name: mini}}, {{manifest: {second}, weight: 3}}]",
        "experts.names=[mel]", "train.num_workers=0", "train.batch_size=2"])
    manifest, store = prepare_data(cfg)
    train = training_streams(cfg, manifest, store)["train"]
    sources = np.array([item["mixture"] for item in train.items])
    by_source = {s: train.weights[sources == s].sum() for s in ("mini", "second")}
    assert by_source == pytest.approx({"mini": 0.25, "second": 0.75})
    train_ids = set(read_manifest(coat_mini).query("split == 'train'")["id"])
    second_train = sum(r["id"] in train_ids for r in map(json.loads, second.read_text().splitlines()[:12]))
    assert {s: (sources == s).sum() for s in ("mini", "second")} == {"mini": len(train_ids), "second": second_train}


def test_validation_weighs_every_source_and_family_of_a_mixture():
    """The validation subset is not the first rows in manifest order, where a mixture's first corpus stands."""
    items = [{"id": f"{source}-{i}", "task": ("emotion", "music", "reasoning", "music")[i % 4], "mixture": source}
             for source, count in (("first", 60), ("second", 20)) for i in range(count)]
    val = Stream(items, {}, 16000)
    chosen = pd.DataFrame(items).loc[val.stratified(20, seed=0)]
    shares = {"first": 15, "second": 5, "emotion": 5, "music": 10, "reasoning": 5}  # of 20, as in the split
    got = chosen.groupby("mixture").size().to_dict() | chosen.groupby("task").size().to_dict()
    assert all(abs(got[key] - share) <= 1 for key, share in shares.items()), got
    assert list(chosen.index) == list(val.stratified(20, seed=0)) and list(chosen.index) == sorted(chosen.index)
    assert list(chosen.index) != list(val.stratified(20, seed=1))


def combine_often(entries: list, out: str, times: int) -> None:
    from coat.config import MixtureEntry

    for _ in range(times):
        combine([MixtureEntry(**entry) for entry in entries], out)


@pytest.mark.faults  # processes racing to write one mixture: 25 s on 2 cores
def test_trials_combining_one_mixture_at_once_never_tear_it(tmp_path, coat_mini, second):
    """Every trial of a sweep combines the mixture again: two at once, as two real processes, while a third reads."""
    import multiprocessing

    rows = [json.loads(line) for line in coat_mini.read_text().splitlines()]
    large = tmp_path / "large" / "manifest.jsonl"  # long enough to write that two writes overlap
    large.parent.mkdir()
    large.write_text("".join(json.dumps(r | {"id": f"{r['id']}-{i}", "audio": str(coat_mini.parent / r["audio"])})
                             + "\n" for i in range(100) for r in rows))
    entries = [{"manifest": str(large), "name": "mini"}, {"manifest": str(second)}]
    out = tmp_path / "mix" / "manifest.jsonl"
    combine_often(entries, str(out), 1)
    expected = out.read_bytes()
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=combine_often, args=(entries, str(out), 30)) for _ in range(2)]
    for writer in writers:
        writer.start()
    reads = 0
    while any(w.is_alive() for w in writers) or reads < 30:
        assert out.read_bytes() == expected, "a reader saw a manifest two writers tore"
        reads += 1
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert not list(out.parent.glob(".*.jsonl")), "no staging file left behind"
