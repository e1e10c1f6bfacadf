"""Feature store, Ray Data precompute and the training stream: real coat-mini audio, a real local Ray."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from coat.config import load_config
from coat.data.audio import decode
from coat.data.precompute import manifest_clips, non_finite, precompute
from coat.data.store import (
    STD_FLOOR,
    DamagedFeaturesError,
    FeatureStore,
    NonFiniteFeaturesError,
    clip_hash,
    feature_rows,
    feature_version,
)
from coat.data.stream import MissingFeaturesError, Stream, epoch_order, iter_training_batches, training_items
from coat.data.synth import synthesize
from coat.experts.registry import build_expert
from coat.model import CoATModel
from coat.ray_runtime import ensure_ray

SIZE = 16
EXPERTS = ["mel", "prosody"]


@pytest.fixture(scope="module")
def ray_address():
    """The session's one local Ray (started here when no earlier test did); subprocesses attach through
    RAY_ADDRESS."""
    ensure_ray()
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """coat-mini (16 clips) plus two bad rows: one whose audio is not audio, one without an answer."""
    root = tmp_path_factory.mktemp("mini")
    path = synthesize(root, size=SIZE, seed=0)
    (root / "audio" / "broken.wav").write_bytes(b"not a wav file at all")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows.append({**rows[0], "id": "broken-audio", "audio": "audio/broken.wav"})
    rows.append({k: v for k, v in {**rows[1], "id": "no-answer"}.items() if k != "answer"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def first_run(ray_address, manifest, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return store, precompute(manifest, EXPERTS, store, batch_size=4, progress=False)


def test_store_roundtrip_dedup_and_split_stats_without_ray(tmp_path):
    store = FeatureStore(tmp_path)
    a, b = np.arange(6, dtype=np.float32).reshape(3, 2), np.array([[10.0, -1.0]], np.float32)
    store.write("e", "v1", feature_rows(["a", "b"], [a, b]))
    store.write("e", "v1", feature_rows(["b", "c"], [b, np.array([7.0, 8.0])]))  # "b" twice: two runs raced
    (store.folder("e", "v1") / "part-killed.tmp").write_bytes(b"half a part")  # an interrupted write
    assert store.present("e", "v1") == {"a", "b", "c"}
    assert store.missing("e", "v1", ["a", "c", "d"]) == {"d"}
    got = store.read("e", "v1", ["c", "a", "b"])
    assert np.array_equal(got["a"], a) and np.array_equal(got["b"], b) and got["c"].shape == (1, 2)
    stats = store.split_stats("e", "v1", ["a", "b", "a"])  # the clips of one split: "c" is not among them
    frames = np.concatenate([a, b])
    assert stats["frames"] == 4 and stats["clips"] == 2 and stats == store.split_stats("e", "v1", ["b", "a"])
    np.testing.assert_allclose(stats["mean"], frames.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], frames.std(0), rtol=1e-6)
    assert store.split_stats("e", "v1", ["a", "b", "c"])["id"] != stats["id"]
    with pytest.raises(KeyError, match="e/v1 has no features for clip d"):
        store.read("e", "v1", ["a", "d"])
    with pytest.raises(KeyError, match="e/v1 has no features for clip d"):
        store.split_stats("e", "v1", ["a", "d"])


def test_kept_statistics_are_computed_once_per_id_and_a_torn_file_is_computed_again(tmp_path):
    store = FeatureStore(tmp_path)
    calls = []

    def compute(stats_id: str) -> dict:
        calls.append(stats_id)
        return {"id": stats_id, "mean": [0.1 * len(calls)]}

    first = store.kept_stats("e", "v1", "k4", compute)
    assert first == {"id": "k4", "mean": [0.1]} and store.kept_stats("e", "v1", "k4", compute) == first
    assert store.kept_stats("e", "v1", "k8", compute)["mean"] == [0.2]  # another id: its own statistics
    assert store.kept_stats("e", "v2", "k4", compute)["mean"] == pytest.approx([0.3])  # another version too
    (store.folder("e", "v1") / "stats" / "k4.json").write_text('{"id": "k4", "mean": [0.1')  # a torn write
    assert store.kept_stats("e", "v1", "k4", compute)["mean"] == pytest.approx([0.4])
    assert calls == ["k4", "k8", "k4", "k4"] and not list(store.folder("e", "v1").glob("stats/*.tmp"))


def test_precompute_stores_every_good_clip_and_a_second_run_computes_nothing(first_run, manifest):
    store_dir, summary = first_run
    store = FeatureStore(store_dir)
    good, _ = manifest_clips(manifest)
    hashes = set(good["clip_hash"]) - {clip_hash(manifest.parent / "audio" / "broken.wav")}
    assert len(hashes) == SIZE
    for run in summary.experts:
        assert (run.clips, run.computed, run.present, run.failed) == (SIZE + 1, SIZE, 0, 1)
        assert store.present(run.name, run.version) == hashes
    reasons = dict(zip(summary.quarantine["id"], summary.quarantine["reason"], strict=True))
    assert reasons["no-answer"] == "missing_field:answer"
    assert reasons["broken-audio"].startswith("undecodable")

    # Stored features are the expert's own output for that clip.
    row = good.iloc[3]
    for name in EXPERTS:
        expert = build_expert(name)
        want = expert([decode(row["audio_path"], expert.sample_rate)])[0][0].numpy()
        got = store.read(name, expert.version, [row["clip_hash"]])[row["clip_hash"]]
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)

    files = sorted(p for p in Path(store_dir).rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    again = precompute(manifest, EXPERTS, store_dir, batch_size=4, progress=False)
    for run in again.experts:
        assert (run.computed, run.present, run.failed) == (0, SIZE, 1)
    assert sorted(p for p in Path(store_dir).rglob("*") if p.is_file()) == files
    assert [p.stat().st_mtime_ns for p in files] == stamps, "a finished store must not be rewritten"


def test_statistics_come_from_the_training_split_alone(first_run, manifest, tmp_path):
    store_dir = shutil.copytree(first_run[0], tmp_path / "store")
    store = FeatureStore(store_dir)
    good, _ = manifest_clips(manifest)
    train = good[(good["split"] == "train") & (good["id"] != "broken-audio")]
    items, sources, _ = training_items(manifest, "train", EXPERTS, store_dir)
    for run in first_run[1].experts:
        frames = np.concatenate(list(store.read(run.name, run.version, train["clip_hash"]).values()))
        stats = sources[run.name].stats
        assert stats["clips"] == train["clip_hash"].nunique() and stats["frames"] == len(frames)
        np.testing.assert_allclose(stats["mean"], frames.astype(np.float64).mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats["std"], frames.astype(np.float64).std(0), rtol=1e-5, atol=1e-9)
    before = next(iter(Stream(items, sources, 16000).dataset([0]).iter_rows()))

    # Extreme test-split clips join the store (as precomputing a benchmark beside coat-mini would add them).
    for run in first_run[1].experts:
        dim = len(sources[run.name].stats["mean"])
        store.write(run.name, run.version, feature_rows([f"test-{i}" for i in range(3)],
                                                        [np.full((50, dim), 1e6, np.float32)] * 3))
    items, again, _ = training_items(manifest, "train", EXPERTS, store_dir)
    assert {n: s.stats for n, s in again.items()} == {n: s.stats for n, s in sources.items()}
    after = next(iter(Stream(items, again, 16000).dataset([0]).iter_rows()))
    for name in EXPERTS:
        np.testing.assert_array_equal(before[f"target.{name}"], after[f"target.{name}"])
    _, val_sources, _ = training_items(manifest, "val", EXPERTS, store_dir, stats_from=again)
    assert {n: s.stats["id"] for n, s in val_sources.items()} == {n: s.stats["id"] for n, s in sources.items()}


def test_a_changed_expert_version_recomputes_only_that_expert(first_run, manifest):
    store_dir, before = first_run
    summary = precompute(manifest, EXPERTS, store_dir, settings={"mel": {"n_mels": 40}}, batch_size=8,
                         progress=False)
    mel, prosody = summary.experts
    old_mel = before.experts[0]
    assert mel.version != old_mel.version and (mel.computed, mel.present) == (SIZE, 0)
    assert (prosody.version, prosody.computed, prosody.present) == (before.experts[1].version, 0, SIZE)
    store = FeatureStore(store_dir)
    clip = next(iter(store.present("mel", mel.version)))
    assert store.read("mel", mel.version, [clip])[clip].shape[1] == 40
    assert store.present("mel", old_mel.version) == store.present("mel", mel.version)  # old version kept


def test_a_killed_run_resumes_and_computes_only_the_missing_clips(ray_address, manifest, tmp_path):
    store_dir, name = tmp_path / "store", "vad"
    version = build_expert(name).version
    script = (f"from coat.data.precompute import precompute; "
              f"precompute({str(manifest)!r}, [{name!r}], {str(store_dir)!r}, batch_size=1, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "RAY_ADDRESS": ray_address},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder, deadline = store_dir / name / version, time.monotonic() + 120
    while not list(folder.glob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = FeatureStore(store_dir).present(name, version)
    assert 0 < len(done) < SIZE, f"kill landed after {len(done)} of {SIZE} clips"

    summary = precompute(manifest, [name], store_dir, batch_size=4, progress=False)
    (run,) = summary.experts
    assert (run.computed, run.present) == (SIZE - len(done), len(done))
    assert len(FeatureStore(store_dir).present(name, version)) == SIZE


def test_stream_gives_standardised_targets_of_the_right_clips_in_the_given_order(first_run, manifest):
    store_dir, summary = first_run
    store = FeatureStore(store_dir)
    versions = {run.name: run.version for run in summary.experts}
    items, sources, left_out = training_items(manifest, "train", EXPERTS, store_dir)
    assert set(left_out["id"]) == {"broken-audio", "no-answer"}
    order = [5, 0, 3, 1]
    rows = list(Stream(items, sources, 16000).dataset(order).iter_rows())
    assert [r["id"] for r in rows] == [items[i]["id"] for i in order]
    good, _ = manifest_clips(manifest)
    train = good[(good["split"] == "train") & (good["id"] != "broken-audio")].set_index("id")
    assert sorted(item["id"] for item in items) == sorted(train.index)
    for r in rows:
        clip = train.loc[r["id"]]
        assert np.array_equal(r["audio"], decode(clip["audio_path"], 16000).numpy())
        for name in EXPERTS:
            stats = sources[name].stats
            stored = store.read(name, versions[name], [clip["clip_hash"]])[clip["clip_hash"]]
            want = (stored - np.array(stats["mean"])) / np.maximum(stats["std"], STD_FLOOR)
            got = np.asarray(r[f"target.{name}"])
            np.testing.assert_allclose(got, want[0] if name == "prosody" else want, rtol=1e-4, atol=1e-4)


def test_epoch_order_is_random_per_epoch_reproducible_and_dealt_to_disjoint_ranks():
    def order(epoch, rank, seed=0):
        return epoch_order(30, seed=seed, epoch=epoch, world=2, rank=rank, step_rows=4).tolist()

    assert order(0, 0) == order(0, 0) and order(0, 0) != order(1, 0) and order(0, 0) != order(0, 0, seed=1)
    for epoch in range(3):
        ranks = [order(epoch, 0), order(epoch, 1)]
        assert all(len(r) == 12 for r in ranks)  # 30 rows: 3 whole steps of 2 ranks x 4 rows
        seen = ranks[0] + ranks[1]
        assert len(set(seen)) == 24 and set(seen) <= set(range(30))
    assert order(0, 0) != sorted(order(0, 0))
    left_over = [set(range(30)) - set(order(e, 0) + order(e, 1)) for e in range(3)]
    assert left_over[0] != left_over[1] or left_over[1] != left_over[2]


def test_cropped_clips_give_model_and_experts_the_same_samples(ray_address, manifest, tmp_path):
    store_dir = tmp_path / "store"
    (run,) = precompute(manifest, ["mel"], store_dir, batch_size=4, crop_seconds=1.0, progress=False).experts
    assert run.version == f"{build_expert('mel').version}-crop1s"
    items, sources, _ = training_items(manifest, "train", ["mel"], store_dir, max_seconds=1.0, long_clips="crop")
    stream = Stream(items, sources, 16000, crop_seconds=1.0)
    longest = max(range(len(items)), key=lambda i: decode(items[i]["audio_path"], 16000).numel())
    whole = decode(items[longest]["audio_path"], 16000)
    assert len(whole) > 16000
    (row,) = stream.dataset([longest]).iter_rows()
    assert np.array_equal(row["audio"], whole[:16000].numpy())  # the model hears the first second only
    mel = build_expert("mel")
    heard = mel([whole[:16000]])[0][0].numpy()
    stored = FeatureStore(store_dir).read("mel", run.version, [items[longest]["clip_hash"]])
    np.testing.assert_allclose(stored[items[longest]["clip_hash"]], heard, rtol=1e-5, atol=1e-5)
    assert len(heard) == 1 + 16000 // 160 < len(mel([whole])[0][0])

    rejected, _, left_out = training_items(manifest, "train", [], store_dir, max_seconds=1.0, long_clips="reject")
    long_ids = {i["id"] for i in items if decode(i["audio_path"], 16000).numel() > 16000}
    assert {i["id"] for i in rejected}.isdisjoint(long_ids)
    assert long_ids <= set(left_out.loc[left_out["reason"].str.startswith("too_long"), "id"])


@ray.remote(num_cpus=0)
def worker_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_decode_workers_outlive_a_pause_between_two_epochs(ray_address):
    # More task workers than CPUs, as two trials' decode tasks make on a small machine: Ray's default stops those
    # idle for a second beyond one per CPU, and the next epoch's decode tasks wait for new processes.
    pids = set(ray.get([worker_pid.remote(2.0) for _ in range(int(ray.cluster_resources()["CPU"]) + 2)]))
    time.sleep(3)  # validation and a checkpoint between two epochs; Ray looks for idle workers every 200 ms
    stopped = [pid for pid in pids if not Path(f"/proc/{pid}").exists()]
    assert not stopped, f"Ray stopped {len(stopped)} of {len(pids)} idle workers within a pause of seconds"


def test_stream_reads_only_the_requested_experts(first_run, manifest, tmp_path):
    store_dir = shutil.copytree(first_run[0], tmp_path / "store")
    items, sources, _ = training_items(manifest, "train", ["prosody"], store_dir)
    for part in (store_dir / "mel").rglob("part-*.parquet"):
        part.write_bytes(b"garbage: reading mel now would fail")
    rows = list(Stream(items, sources, 16000).dataset().iter_rows())
    assert rows and all(set(r) == {"id", "prompt", "answer", "audio", "target.prosody"} for r in rows)


def test_a_clip_missing_from_the_store_is_a_clear_error(first_run, manifest, tmp_path):
    store_dir = shutil.copytree(first_run[0], tmp_path / "store")
    good, _ = manifest_clips(manifest)
    victim = good[good["split"] == "train"].iloc[2]
    mel = first_run[1].experts[0]
    for part in (store_dir / "mel" / mel.version).glob("part-*.parquet"):
        table = pq.read_table(part)
        keep = pa.array(np.array(table.column("clip_hash").to_pylist()) != victim["clip_hash"])
        pq.write_table(table.filter(keep), part)
    (store_dir / "mel" / mel.version / "parts.jsonl").unlink()  # as a store from before the ledger: no checksums
    with pytest.raises(MissingFeaturesError) as err:
        training_items(manifest, "train", EXPERTS, store_dir)
    message = str(err.value)
    assert f"expert 'mel' (version {mel.version})" in message and f"clip {victim['id']!r}" in message
    assert f"coat experts precompute --data {manifest} --experts mel --store {store_dir}" in message


def test_collated_stream_batch_gives_finite_losses_for_each_expert(first_run, manifest):
    cfg = load_config(overrides=["experts.names=[mel,prosody]", "thinking.num_slots=4",
                                 "thinking.max_slots=8", "backbone.audio_window_s=8"])
    model = CoATModel(cfg, experts=None)
    items, sources, _ = training_items(manifest, "train", EXPERTS, first_run[0])
    dataset = Stream(items, sources, model.backbone.sample_rate).dataset()
    batch = next(iter_training_batches(dataset, model, batch_size=3))
    lengths = batch["target_len.mel"]
    assert batch["target.mel"].shape == (3, int(lengths.max()), 80)
    assert batch["target.prosody"].shape == (3, 8)
    for i, n in enumerate(lengths.tolist()):  # zero padding past each clip's frames, real frames before
        assert batch["target.mel"][i, n:].abs().sum() == 0 and batch["target.mel"][i, n - 1].abs().sum() > 0
    out = model(batch)
    assert set(out.losses) == {"ce", "mel", "prosody"}
    assert all(torch.isfinite(v) for v in out.losses.values()) and torch.isfinite(out.loss)


@pytest.mark.timeout(120)  # before the fix hashing a FIFO waited for a writer and /dev/zero never ended
def test_a_fifo_a_device_or_a_folder_in_a_manifest_is_quarantined_unread(manifest, tmp_path):
    rows = [json.loads(line) for line in manifest.read_text().splitlines()[:2]]
    os.mkfifo(tmp_path / "pipe.wav")
    (tmp_path / "folder.wav").mkdir()
    odd = {"pipe": str(tmp_path / "pipe.wav"), "zero": "/dev/zero", "folder": str(tmp_path / "folder.wav")}
    rows += [{**rows[0], "id": name, "audio": path} for name, path in odd.items()]
    for row in rows[:2]:
        row["audio"] = str(manifest.parent / row["audio"])
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    good, quarantine = manifest_clips(path)
    assert len(good) == 2
    reasons = dict(zip(quarantine["id"], quarantine["reason"], strict=True))
    assert reasons == {"pipe": f"not_a_file: {odd['pipe']} is a FIFO, not a file",
                       "zero": "not_a_file: /dev/zero is a device or socket, not a file",
                       "folder": f"not_a_file: {odd['folder']} is a folder, not a file"}


def test_a_run_that_leaves_long_clips_out_decodes_none_of_them(ray_address, manifest, tmp_path):
    """Under data.long_clips=reject a clip over data.max_seconds is never trained on: precompute reads only its
    header and reports it, without a mark in the store, whose features another run with a longer cap computes."""
    store_dir = tmp_path / "store"
    good, _ = manifest_clips(manifest)
    good = good[good["id"] != "broken-audio"]
    seconds = {h: decode(p, 16000).numel() / 16000 for h, p in zip(good["clip_hash"], good["audio_path"],
                                                                    strict=True)}
    cap = float(np.median(list(seconds.values())))
    long_clips = {h for h, s in seconds.items() if s > cap}
    assert 0 < len(long_clips) < len(seconds)
    summary = precompute(manifest, ["mel"], store_dir, batch_size=4, max_seconds=cap, progress=False)
    (run,) = summary.experts
    store = FeatureStore(store_dir)
    assert set(store.index("mel", run.version)["clip_hash"]) == set(seconds) - long_clips
    too_long = summary.quarantine[summary.quarantine["reason"].str.startswith("too_long")]
    assert set(good.set_index("id").loc[too_long["id"], "clip_hash"]) == long_clips
    assert long_clips.isdisjoint(store.quarantined())
    (again,) = precompute(manifest, ["mel"], store_dir, batch_size=4, progress=False).experts
    assert again.computed == len(long_clips) and set(store.index("mel", run.version)["clip_hash"]) == set(seconds)


def test_precompute_takes_a_runs_expert_settings(ray_address, manifest, tmp_path):
    from typer.testing import CliRunner

    from coat.cli import app
    from coat.experts.registry import expert_version

    config = tmp_path / "run.yaml"
    config.write_text("backbone: {seed: 3, audio_window_s: 2}\ndata: {max_seconds: 3}\n")
    result = CliRunner().invoke(app, ["experts", "precompute", "--data", str(manifest), "--store",
                                      str(tmp_path / "store"), "--experts", "reconstruction,audio-encoder",
                                      "--config", str(config)])
    assert result.exit_code == 0, result.output
    encoder = feature_version(expert_version("audio-encoder", backbone="qwen2-audio", size="tiny", seed=3,
                                             audio_window_s=2.0), 3.0)  # cropped to the run's data.max_seconds
    assert encoder != feature_version(expert_version("audio-encoder"), 3.0), "the run's backbone, not the default"
    store, (good, _) = FeatureStore(tmp_path / "store"), manifest_clips(manifest)
    decodable = set(good["clip_hash"]) - set(store.quarantined())
    mel = feature_version(build_expert("mel").version, 3.0)
    assert store.present("audio-encoder", encoder) == decodable == store.present("mel", mel), \
        "a role ('reconstruction') stands for its default expert"
    first = good.iloc[0]
    (frames,) = store.read("audio-encoder", encoder, [first["clip_hash"]]).values()
    seconds = min(2.0, decode(first["audio_path"], 16_000).shape[-1] / 16_000)
    assert frames.shape[1] == 64 and abs(frames.shape[0] - 25 * seconds) <= 1, "25 fps over the 2 s audio window"


def _truncate(part: Path) -> None:
    """A copy cut short: the part loses its second half."""
    data = part.read_bytes()
    part.write_bytes(data[:len(data) // 2])


def _flip_bytes(part: Path) -> None:
    """A flipped block: 16 bytes in the middle of the part inverted, its size unchanged."""
    data = bytearray(part.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    part.write_bytes(bytes(data))


def _ledger_lines(folder: Path) -> list[dict]:
    """Every line of a version's ledger, parsed strictly: a torn or interleaved line fails here."""
    return [json.loads(line) for line in (folder / "parts.jsonl").read_text().splitlines()]


def _features(store: FeatureStore, runs, hashes) -> dict:
    return {run.name: store.read(run.name, run.version, hashes) for run in runs}


def _assert_same_features(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for h in want[name]:
            np.testing.assert_allclose(got[name][h], want[name][h], rtol=1e-5, atol=1e-5, err_msg=f"{name} {h}")


def _check_store(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """`coat data check --store ...` as a user runs it: exit code and everything it printed."""
    from coat.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as done:
        main(["data", "check", "--store", *args])
    captured = capsys.readouterr()
    return done.value.code, captured.out + captured.err


def test_each_committed_part_is_in_the_ledger_with_its_size_checksum_and_clips(tmp_path):
    store = FeatureStore(tmp_path)
    first = store.write("e", "v1", feature_rows(["a", "b"], [np.ones((3, 2)), np.zeros((1, 2))]))
    with (store.folder("e", "v1") / "parts.jsonl").open("a") as ledger:
        ledger.write('{"part": "part-killed-mid-li')  # a writer killed mid-line
    second = store.write("e", "v1", feature_rows(["c"], [np.full((2, 2), 5.0)]))
    ledger = store.ledger("e", "v1")
    assert set(ledger) == {first.name, second.name}, "the torn line must not swallow the next commit"
    for part in (first, second):
        entry = ledger[part.name]
        assert entry["bytes"] == part.stat().st_size and entry["sha256"] == clip_hash(part)
        stored = pq.read_table(part).column("clip_hash").to_pylist()
        assert entry["clips"] == stored and entry["rows"] == len(stored)
    assert store.verify("e", "v1") == [] and store.unrecorded("e", "v1") == []
    assert store.present("e", "v1") == {"a", "b", "c"}


def test_a_store_written_before_the_ledger_reads_as_before_and_is_reported_without_checksums(tmp_path):
    store = FeatureStore(tmp_path)
    folder = store.folder("e", "v1")
    folder.mkdir(parents=True)
    old = folder / "part-old.parquet"
    pq.write_table(feature_rows(["a", "b"], [np.ones((3, 2)), np.zeros((1, 2))]), old)  # as older code wrote
    assert store.ledger("e", "v1") == {} and store.present("e", "v1") == {"a", "b"}
    assert store.verify("e", "v1") == [] and store.unrecorded("e", "v1") == [old]
    store.write("e", "v1", feature_rows(["c"], [np.full((2, 2), 5.0)]))
    assert store.present("e", "v1") == {"a", "b", "c"} and store.unrecorded("e", "v1") == [old]
    np.testing.assert_array_equal(store.read("e", "v1", ["a"])["a"], np.ones((3, 2)))

    old.write_bytes(b"garbage where a legacy part was")
    (damage,) = store.verify("e", "v1")
    assert damage.part == old and damage.reason.startswith("unreadable (no checksum recorded)")
    assert store.present("e", "v1") == {"c"}, "an unreadable legacy part's clips count as missing"


def test_damaged_parts_are_found_and_reading_their_clips_names_the_part_and_the_fix(tmp_path):
    store = FeatureStore(tmp_path)
    rng = np.random.default_rng(0)
    values = {f"clip{i}": rng.standard_normal((50, 8)).astype(np.float32) for i in range(8)}
    names = list(values)
    truncated, flipped, lost, sound = (store.write("e", "v1", feature_rows(names[i:i + 2],
                                                                          [values[h] for h in names[i:i + 2]]))
                                       for i in range(0, 8, 2))
    _truncate(truncated)
    _flip_bytes(flipped)
    lost.unlink()

    damage = {d.part: d for d in store.verify("e", "v1")}
    assert set(damage) == {truncated, flipped, lost}
    assert damage[truncated].reason.startswith("truncated") and damage[truncated].clips == ("clip0", "clip1")
    assert damage[flipped].reason.startswith("corrupt: its sha256 differs") and damage[flipped].clips == (
        "clip2", "clip3")
    assert damage[lost].reason.startswith("missing") and damage[lost].clips == ("clip4", "clip5")

    index = store.index("e", "v1")
    assert set(index["clip_hash"]) == set(names), "the index must not drop the clips of a damaged part"
    assert store.present("e", "v1") == {"clip2", "clip3", "clip6", "clip7"}  # sizes only: the flip reads at read
    for clip, part in [("clip1", truncated), ("clip4", lost), ("clip3", flipped)]:
        with pytest.raises(DamagedFeaturesError) as err:
            store.read("e", "v1", ["clip7", clip])
        assert part.name in str(err.value) and f"coat data check --store {tmp_path} --repair" in str(err.value)
    with pytest.raises(DamagedFeaturesError, match=truncated.name):
        store.split_stats("e", "v1", names)
    np.testing.assert_array_equal(store.read("e", "v1", ["clip7"])["clip7"], values["clip7"])

    store.set_aside("e", "v1", damage.values())
    assert sorted(p.name for p in (store.folder("e", "v1") / "damaged").iterdir()) == sorted(
        [truncated.name, flipped.name])
    assert set(store.ledger("e", "v1")) == {sound.name} and store.verify("e", "v1") == []
    assert store.missing("e", "v1", names) == {f"clip{i}" for i in range(6)}


def test_a_training_start_checks_sizes_and_leaves_hashes_to_a_deep_verify(tmp_path, monkeypatch):
    """A start stats the recorded parts (a cut-short part is found), reads only what a killed writer left
    unrecorded, and hashes nothing: a part changed in place passes it, and fails its first read and a deep verify."""
    store = FeatureStore(tmp_path)
    rng = np.random.default_rng(1)
    values = {f"clip{i}": rng.standard_normal((50, 8)).astype(np.float32) for i in range(6)}
    names = list(values)
    truncated, flipped, _ = (store.write("e", "v1", feature_rows(names[i:i + 2], [values[h] for h in names[i:i + 2]]))
                             for i in range(0, 6, 2))
    _truncate(truncated)
    _flip_bytes(flipped)
    unrecorded = store.folder("e", "v1") / "part-left-by-a-killed-writer.parquet"
    unrecorded.write_bytes(b"half a part")
    hashed = []
    monkeypatch.setattr("coat.data.store._checksum_problem", lambda part, entry: hashed.append(part))
    assert {d.part for d in store.verify("e", "v1", hashes=False)} == {truncated, unrecorded} and not hashed
    monkeypatch.undo()
    assert {d.part for d in store.verify("e", "v1")} == {truncated, flipped, unrecorded}
    with pytest.raises(DamagedFeaturesError, match=flipped.name):
        store.read("e", "v1", ["clip2"])


def test_features_holding_nan_never_reach_training_and_are_set_aside_for_recompute(tmp_path):
    """A part a buggy expert wrote with NaN: the split's statistics refuse it naming the part and the fix, verify
    reports it, and repair sets it aside so its clips are computed again (precompute quarantines such output)."""
    store = FeatureStore(tmp_path)
    good = np.ones((4, 2), np.float32)
    sound = store.write("e", "v1", feature_rows(["a", "b"], [good, good * 2]))
    poisoned = store.write("e", "v1", feature_rows(["c"], [np.array([[1.0, np.nan], [np.inf, 0.0]], np.float32)]))
    assert store.split_stats("e", "v1", ["a", "b"])["frames"] == 8
    with pytest.raises(NonFiniteFeaturesError, match=rf"{poisoned.name}.*--repair"):
        store.split_stats("e", "v1", ["a", "c"])
    (damage,) = store.verify("e", "v1")
    assert damage.part == poisoned and damage.reason == "non_finite: 2 NaN/inf feature values"
    store.set_aside("e", "v1", [damage])
    assert store.missing("e", "v1", ["a", "b", "c"]) == {"c"} and set(store.ledger("e", "v1")) == {sound.name}
    assert non_finite(np.array([[0.0, np.nan]]), "mel") == "non_finite_features: mel gave 1 NaN/inf values"
    assert non_finite(good, "mel") is None


def test_check_store_reports_damage_and_after_repair_precompute_recomputes_exactly_those_clips(
        first_run, manifest, tmp_path, capsys, monkeypatch):
    store_dir = shutil.copytree(first_run[0], tmp_path / "store")
    store, runs = FeatureStore(store_dir), first_run[1].experts
    good, _ = manifest_clips(manifest)
    hashes = sorted(set(good["clip_hash"]) - set(store.quarantined()))
    before = _features(store, runs, hashes)
    mel, prosody = runs
    first_train_clip = good.loc[good["split"] == "train", "clip_hash"].iloc[0]
    mel_part = Path(store.index("mel", mel.version).set_index("clip_hash").loc[first_train_clip, "part"])
    prosody_part = store.parts("prosody", prosody.version)[0]
    affected = {"mel": set(store.ledger("mel", mel.version)[mel_part.name]["clips"]),
                "prosody": set(store.ledger("prosody", prosody.version)[prosody_part.name]["clips"])}
    _truncate(mel_part)
    _flip_bytes(prosody_part)

    with pytest.raises(DamagedFeaturesError, match=mel_part.name):
        training_items(manifest, "train", EXPERTS, store_dir)
    code, output = _check_store(capsys, monkeypatch, str(store_dir))
    assert code == 1, output
    assert f"damaged: {mel_part}: truncated or overwritten" in output
    assert f"{len(affected['mel'])} clips)" in output.split(str(mel_part))[1].splitlines()[0]
    assert f"damaged: {prosody_part}: corrupt: its sha256 differs" in output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: feature store {store_dir}: 2 damaged parts holding "
                      f"{len(affected['mel'] | affected['prosody'])} clips; run `coat data check --store "
                      f"{store_dir} --repair` to set the damaged parts aside; the next `coat experts precompute` "
                      "(or `coat train`, which precomputes first) recomputes exactly their clips"]

    code, output = _check_store(capsys, monkeypatch, str(store_dir), "--repair")
    assert code == 0 and "set 2 damaged parts aside" in output, output
    assert (mel_part.parent / "damaged" / mel_part.name).is_file() and not mel_part.exists()
    assert _check_store(capsys, monkeypatch, str(store_dir))[0] == 0

    summary = precompute(manifest, EXPERTS, store_dir, batch_size=4, progress=False)
    for run in summary.experts:
        assert (run.computed, run.present) == (len(affected[run.name]), SIZE - len(affected[run.name])), run.name
        assert store.verify(run.name, run.version) == []
        assert store.present(run.name, run.version) == set(hashes)
    _assert_same_features(_features(store, runs, hashes), before)


def test_the_next_precompute_sets_damaged_parts_aside_and_recomputes_their_clips(first_run, manifest, tmp_path):
    store_dir = shutil.copytree(first_run[0], tmp_path / "store")
    store, (mel, _) = FeatureStore(store_dir), first_run[1].experts
    hashes = sorted(store.present("mel", mel.version))
    before = _features(store, [mel], hashes)
    part = store.parts("mel", mel.version)[-1]
    affected = store.ledger("mel", mel.version)[part.name]["clips"]
    _flip_bytes(part)  # same size: only the checksum tells

    (run,) = precompute(manifest, ["mel"], store_dir, batch_size=4, progress=False).experts
    assert run.damaged == run.computed == len(affected) and run.present == SIZE - len(affected)
    assert (part.parent / "damaged" / part.name).is_file() and store.verify("mel", mel.version) == []
    _assert_same_features(_features(store, [mel], hashes), before)


@pytest.mark.faults  # two more Ray Data pipelines at once: 20 s on 2 cores
def test_two_precomputes_filling_one_store_at_once_leave_it_whole(ray_address, first_run, manifest, tmp_path):
    store_dir = tmp_path / "store"
    script = ("import sys, time; from pathlib import Path; from coat.data.precompute import precompute\n"
              "ready = Path(sys.argv[1]); ready.touch()\n"
              "deadline = time.monotonic() + 120\n"
              "while len(list(ready.parent.glob('ready-*'))) < 2 and time.monotonic() < deadline:\n"
              "    time.sleep(0.01)\n"
              f"precompute({str(manifest)!r}, {EXPERTS!r}, {str(store_dir)!r}, batch_size=2, progress=False)\n")
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    writers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"ready-{i}")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for writer in writers:
        _, err = writer.communicate(timeout=600)
        assert writer.returncode == 0, err[-3000:]

    store, single = FeatureStore(store_dir), FeatureStore(first_run[0])
    overlapped = []
    for run in first_run[1].experts:
        folder = store.folder(run.name, run.version)
        ledger = _ledger_lines(folder)
        clips = [clip for entry in ledger for clip in entry["clips"]]
        overlapped.append(len(clips) > len(set(clips)))
        assert {entry["part"] for entry in ledger} == {part.name for part in store.parts(run.name, run.version)}
        assert store.verify(run.name, run.version) == []
        assert store.present(run.name, run.version) == single.present(run.name, run.version)
    assert any(overlapped), "the two writers never stored the same clip: they did not race, the test proves nothing"
    assert [json.loads(line) for line in (store_dir / "quarantine.jsonl").read_text().splitlines()]
    hashes = sorted(single.present("mel", first_run[1].experts[0].version))
    _assert_same_features(_features(store, first_run[1].experts, hashes),
                          _features(single, first_run[1].experts, hashes))
