"""Run experts over a manifest's clips on Ray Data and fill the feature store with what it lacks.

Per expert: hash the clips, verify the store's parts against their checksums and set damaged ones aside (their
clips become missing), ask the store which (clip, version) pairs are missing, stream only those through
an actor pool that loads the expert once per actor and decodes each clip at the expert's rate inside the
batch function, and write every output batch as a part as it arrives. A run killed part-way keeps its
finished parts; the next run computes the rest. Clips whose audio cannot be decoded, or whose features hold NaN
or inf, go to the store's quarantine with the reason, never retried. With `crop_seconds`, experts hear each clip's
first `crop_seconds` only, as the model does under `data.long_clips=crop`; those features are filed under a
version of their own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
from rich import get_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from coat.config import apply_overrides, load_config
from coat.data.audio import AudioError, decode, header_seconds
from coat.data.manifest import NotRegularFileError, quarantine_records, read_manifest, validate_rows
from coat.data.store import FeatureStore, clip_hash, feature_rows, feature_version
from coat.locks import check_locking
from coat.ray_runtime import ensure_ray, quiet


@dataclass
class ExpertRun:
    """One expert's share of a precompute: clips it needed, found stored, computed, and failed to decode;
    `damaged`: of the clips it needed, those whose stored part was damaged and set aside (so computed again)."""

    name: str
    version: str
    clips: int
    present: int
    computed: int
    failed: int
    seconds: float
    damaged: int = 0


@dataclass
class PrecomputeSummary:
    experts: list[ExpertRun]
    quarantine: pd.DataFrame  # id, path, reason: manifest rows no expert was run on


class ExpertActor:
    """Ray Data batch function: decode each clip at the expert's rate, run the expert on the batch.

    Returns the store's columns plus `error` (the quarantine reason of a clip that did not decode, else null).
    Raises RuntimeError when the actor's expert version differs from the driver's, and whatever the expert
    raises on a bad batch (see `check_waveforms`).
    """

    def __init__(self, name: str, settings: Mapping[str, object], version: str, device: str,
                 crop_seconds: float | None = None):
        # the expert registry loads transformers (seconds): the decode tasks that import this module never need it
        from coat.experts.registry import build_expert

        extra = {"device": device} if device != "cpu" and "device" not in settings else {}
        try:
            self.expert = build_expert(name, **settings, **extra)
        except ValueError:  # an expert without a `device` setting runs where it runs
            self.expert = build_expert(name, **settings)
        if self.expert.version != version:
            raise RuntimeError(f"expert {name!r}: the actor built version {self.expert.version}, the driver "
                               f"{version}; features would land under the wrong version")
        self.crop_seconds = crop_seconds

    def __call__(self, batch: pa.Table) -> pa.Table:
        rate = self.expert.sample_rate
        hashes, paths = batch.column("clip_hash").to_pylist(), batch.column("path").to_pylist()
        waves, good, errors = [], [], []
        for h, p in zip(hashes, paths, strict=True):
            try:
                waves.append(decode(p, rate, self.crop_seconds, crop=True))
                good.append(h)
            except AudioError as err:
                errors.append((h, err.reason))
        features = [f.numpy() for f in self.expert(waves, sample_rate=rate)[0]] if waves else []
        for i in reversed(range(len(good))):  # NaN/inf would make the split's statistics, then training, NaN
            if reason := non_finite(features[i], self.expert.name):
                errors.append((good.pop(i), reason))
                features.pop(i)
        table = feature_rows(good, features)
        failed = feature_rows([h for h, _ in errors], [[0.0]] * len(errors))  # placeholders, never stored
        reasons = [None] * len(good) + [r for _, r in errors]
        return pa.concat_tables([table, failed]).append_column("error", pa.array(reasons, pa.string()))


def non_finite(features: np.ndarray, expert: str) -> str | None:
    """The quarantine reason of features holding NaN or inf (`non_finite_features: ...`), else None."""
    bad = int((~np.isfinite(features)).sum())
    return f"non_finite_features: {expert} gave {bad} NaN/inf values" if bad else None


def hash_clips(good: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add `clip_hash` to manifest rows (one read per distinct file); rows whose file cannot be read go to a
    quarantine table (`missing_file` / `not_a_file` / `unreadable`)."""
    hashes, reasons = {}, {}
    for path in dict.fromkeys(good["audio_path"]):
        try:
            hashes[path] = clip_hash(path)
        except FileNotFoundError:
            reasons[path] = "missing_file"
        except NotRegularFileError as err:
            reasons[path] = f"not_a_file: {err}"
        except OSError as err:
            reasons[path] = f"unreadable: {err.strerror}"
    bad = good["audio_path"].isin(reasons)
    quarantine = quarantine_records(good[bad], [reasons[p] for p in good.loc[bad, "audio_path"]])
    good = good[~bad].reset_index(drop=True)
    good["clip_hash"] = good["audio_path"].map(hashes)
    return good, quarantine


def manifest_clips(manifest: str | Path, split: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Good manifest rows (of `split` only, when given: hashing reads every clip) with `clip_hash`, and the
    quarantine of rows that failed validation or hashing.

    Raises:
        ManifestError: the manifest cannot be read.
    """
    good, bad_rows = validate_rows(read_manifest(manifest))
    if split is not None:
        good = good[good["split"] == split]
    good, bad_files = hash_clips(good)
    return good, pd.concat([bad_rows, bad_files], ignore_index=True)


def precompute(manifest: str | Path, experts: Sequence[str], store_dir: str | Path, *,
               settings: Mapping[str, Mapping[str, object]] | None = None, num_cpus_per_actor: float = 0.5,
               batch_size: int = 8, num_actors: int | None = None, crop_seconds: float | None = None,
               max_seconds: float | None = None, verify_hashes: bool = True, progress: bool = True
               ) -> PrecomputeSummary:
    """Compute and store each expert's features for every good clip of `manifest` the store lacks.

    `settings` maps an expert name to its settings (`build_expert(name, **settings)`); they set its version.
    Actors: `num_actors` (default: one per GPU, or 1 on CPU), each `num_cpus_per_actor` CPUs and one GPU when
    the cluster has GPUs. Ray starts (or attaches to RAY_ADDRESS) only when something is missing. With
    `crop_seconds`, experts run on each clip's first `crop_seconds` and the features are filed under
    `feature_version(version, crop_seconds)` (the versions the summary reports). With `max_seconds` (a run that
    leaves longer clips out, data.long_clips=reject), clips whose header says they are longer are not decoded
    and go to the summary's quarantine as `too_long`, not to the store's (another run may keep them). Before
    computing, each expert version's parts are verified against the checksums recorded at commit (one read of
    its features, less than an epoch of training reads; without `verify_hashes`, against their sizes only) and
    damaged parts are set aside, so their clips are computed again.

    Raises:
        ManifestError: the manifest cannot be read.
        UnknownExpertError, ValueError: an expert name or its settings are invalid (before any compute).
        ValueError: `experts` is empty, `batch_size` < 1, or `crop_seconds` or `max_seconds` <= 0.
    """
    from coat.experts.registry import expert_version  # as in `ExpertActor`

    _check_arguments(experts, batch_size, crop_seconds, max_seconds)
    settings = settings or {}
    versions = {name: expert_version(name, **settings.get(name, {})) for name in experts}  # fail before compute
    check_locking(Path(store_dir))  # precomputes of several hosts commit into one store
    good, quarantine = usable_clips(manifest, max_seconds)
    clips = good.drop_duplicates("clip_hash")
    store = FeatureStore(store_dir)

    runs = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    # Shown on a terminal only: elsewhere (a log, a sweep's trial) a transient bar leaves nothing but an empty line.
    with Progress(*columns, disable=not (progress and get_console().is_interactive), transient=True) as bar:
        for name, built in versions.items():
            start, version = time.perf_counter(), feature_version(built, crop_seconds)
            damaged = set_aside_damage(store, name, version, verify_hashes) & set(clips["clip_hash"])
            failed_before = clips["clip_hash"].isin(store.quarantined())
            todo = clips[~failed_before]
            todo = todo[todo["clip_hash"].isin(store.missing(name, version, todo["clip_hash"]))]
            task = bar.add_task(f"{name} ({version})", total=len(todo))
            computed, failed = 0, 0
            if len(todo):
                computed, failed = _compute(
                    store, name, built, dict(settings.get(name, {})), todo, batch_size=batch_size,
                    num_cpus=num_cpus_per_actor, num_actors=num_actors, crop_seconds=crop_seconds,
                    advance=partial(bar.advance, task))
            present = len(clips) - len(todo) - int(failed_before.sum())
            runs.append(ExpertRun(name, version, len(clips), present, computed,
                                  failed + int(failed_before.sum()), time.perf_counter() - start, len(damaged)))

    undecodable = store.quarantined()
    bad = good[good["clip_hash"].isin(undecodable)]
    quarantine = pd.concat([quarantine, quarantine_records(bad, bad["clip_hash"].map(undecodable))],
                           ignore_index=True)
    return PrecomputeSummary(runs, quarantine)


def _check_arguments(experts: Sequence[str], batch_size: int, crop_seconds: float | None,
                     max_seconds: float | None) -> None:
    if not experts:
        raise ValueError("precompute: give at least one expert")
    if batch_size < 1:
        raise ValueError(f"precompute: batch_size must be >= 1, got {batch_size}")
    for name, value in (("crop_seconds", crop_seconds), ("max_seconds", max_seconds)):
        if value is not None and value <= 0:
            raise ValueError(f"precompute: {name} must be positive, got {value}")


def usable_clips(manifest: str | Path, max_seconds: float | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The manifest's good rows (`manifest_clips`), less those whose header says they outlast `max_seconds`, and the
    quarantine of the others, those as `too_long`."""
    good, quarantine = manifest_clips(manifest)
    if max_seconds is None:
        return good, quarantine
    seconds = good["audio_path"].map(header_seconds)
    too_long = (seconds > max_seconds).to_numpy()
    quarantine = pd.concat([quarantine, quarantine_records(good[too_long], [
        f"too_long: {s:.1f}s > {max_seconds:.1f}s" for s in seconds[too_long]])], ignore_index=True)
    return good[~too_long], quarantine


def settings_of_run(config: str | Path, experts: Sequence[str]
                    ) -> tuple[dict[str, dict], float | None, float | None]:
    """The settings the run that `config` describes gives `experts` (experts.settings; its backbone for
    audio-encoder), the crop its training applies (data.max_seconds under data.long_clips=crop) and the length
    above which it leaves clips out (data.max_seconds under data.long_clips=reject): what the store must hold for
    that run to find its features, and no more.

    Raises:
        ConfigError, FileNotFoundError: the config cannot be used.
    """
    run = apply_overrides(load_config(config), [f"experts.names=[{','.join(experts)}]"])
    return run.expert_settings, run.data.crop_seconds, run.data.reject_seconds


def set_aside_damage(store: FeatureStore, name: str, version: str, hashes: bool = True) -> set[str]:
    """Verify one expert version's parts (`FeatureStore.verify`) and set the damaged ones aside; returns the clip
    hashes they held."""
    damage = store.verify(name, version, hashes)
    store.set_aside(name, version, damage)
    return {clip for d in damage for clip in d.clips}


def _compute(store: FeatureStore, name: str, version: str, settings: dict, todo: pd.DataFrame, *,
             batch_size: int, num_cpus: float, num_actors: int | None, crop_seconds: float | None, advance
             ) -> tuple[int, int]:
    """Stream `todo` clips through an actor pool of expert `name` (expert version `version`), writing a part per
    output batch as it arrives. Returns (clips computed, clips that did not decode)."""
    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    paths = dict(zip(todo["clip_hash"], todo["audio_path"], strict=True))
    out = quiet(ray.data.from_items([{"clip_hash": h, "path": p} for h, p in paths.items()]).map_batches(
        ExpertActor, batch_format="pyarrow", batch_size=batch_size,
        fn_constructor_kwargs={"name": name, "settings": settings, "version": version,
                               "device": "cuda" if gpus else "cpu", "crop_seconds": crop_seconds},
        compute=ray.data.ActorPoolStrategy(size=num_actors or max(gpus, 1)),
        num_cpus=num_cpus, num_gpus=1 if gpus else 0))
    computed, failed, stored_as = 0, 0, feature_version(version, crop_seconds)
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        ok = batch.column("error").is_null().to_numpy(zero_copy_only=False)
        store.write(name, stored_as, batch.filter(pa.array(ok)).drop_columns(["error"]))
        bad = batch.filter(pa.array(~ok)).to_pylist()
        store.quarantine([{"clip_hash": r["clip_hash"], "path": paths[r["clip_hash"]],
                           "reason": r["error"]} for r in bad])
        computed, failed = computed + int(ok.sum()), failed + len(bad)
        advance(len(ok))
    return computed, failed
