"""`coat probe`: linear probes per layer on a checkpoint's hidden states — does expert information reach the
thinking slots and the response position?

    coat probe --checkpoint runs/k16/checkpoint_000300 --targets mel,prosody --split test
    coat probe --checkpoint runs/k0/checkpoint_000300 --targets family --experiment probes

Writes the hidden states (`<out>/hidden/`, reused while the checkpoint, clips and layers stay the same) and the
tidy table `results.csv` / `results.parquet`, one row per (position, layer, target), to `--out` (default
`<checkpoint>/probes/<split>/`). Compare a CoAT checkpoint with its K = 0 twin by concatenating their tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RUN_PREFIX = "probe-"


def parse_targets(text: str) -> list[str]:
    """`mel,prosody,family` -> distinct names in order. Raises typer.BadParameter for an empty list."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise typer.BadParameter("give expert names and/or 'family', comma-separated", param_hint="--targets")
    return names


def parse_layers(text: str | None) -> list[int] | None:
    """`0,4,-1` -> [0, 4, -1]; None: every layer. Raises typer.BadParameter naming a non-integer."""
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()] or None
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of layer indices (e.g. 0,8,-1)",
                                 param_hint="--layers") from None


def probe_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint folder written by CoATModel.save.")],
    targets: Annotated[str, typer.Option(
        "--targets", help="Comma-separated expert names (their standardised features, frame-averaged) and/or "
                          "'family' (each task family's answers).")],
    data: Annotated[Path | None, typer.Option(
        "--data", help="Manifest (default: the checkpoint config's data.manifest).")] = None,
    layers: Annotated[str | None, typer.Option(
        "--layers", help="Comma-separated hidden_states indices: 0 = embeddings, -1 = last (default: all).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split to probe.")] = "test",
    store: Annotated[Path | None, typer.Option(
        "--store", help="Feature store (default: the checkpoint config's data.store).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Output folder (default: <checkpoint>/probes/<split>).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Clips per forward pass.")] = 8,
    max_clips: Annotated[int | None, typer.Option(
        "--max-clips", min=1, help="A seeded random subset of N clips (default: all).")] = None,
    folds: Annotated[int, typer.Option("--folds", min=2, help="Cross-validation folds.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subset, the folds and the control.")] = 0,
    mlflow_run: Annotated[str | None, typer.Option(
        "--mlflow-run", help="Log into this existing MLflow run.")] = None,
    experiment: Annotated[str | None, typer.Option(
        "--experiment", help="Log into a new run probe-<checkpoint folder> of this MLflow experiment.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns.db).")] = None,
) -> None:
    """Fit linear probes per layer and position (thinking slots, response) for expert features or task answers,
    with grouped cross-validation, a baseline and a shuffled-label control; print the best and last layers.

    Exits 2 on a bad option, 1 when the checkpoint, the data or the tracking store cannot be used.
    """
    import sys

    from rich.console import Console

    from coat.analysis.probes import FAMILY
    from coat.data.manifest import SPLITS
    from coat.experts.registry import UnknownExpertError, expert_spec

    console = Console(width=None if sys.stdout.isatty() else 160)
    names = parse_targets(targets)
    requested_layers = parse_layers(layers)
    if split not in SPLITS:
        raise typer.BadParameter(f"{split!r} is not one of {', '.join(sorted(SPLITS))}", param_hint="--split")
    if mlflow_run and experiment:
        raise typer.BadParameter("give --mlflow-run or --experiment, not both", param_hint="--experiment")

    experts = [n for n in names if n != FAMILY]
    for name in experts:
        try:
            expert_spec(name)
        except (UnknownExpertError, ValueError, FileNotFoundError) as err:
            raise typer.BadParameter(str(err), param_hint="--targets") from None

    # Imported here so that `coat --help` does not pay for torch.
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from coat import tracking
    from coat.analysis import probes
    from coat.config import ConfigError, from_yaml
    from coat.data.manifest import ManifestError
    from coat.data.stream import MissingFeaturesError
    from coat.model.coat_model import CONFIG_FILE, CoATModel, not_a_checkpoint

    def fail(message: object) -> typer.Exit:
        console.print(f"[red]error:[/] {message}", soft_wrap=True)
        return typer.Exit(1)

    if not (checkpoint / CONFIG_FILE).is_file():
        raise fail(not_a_checkpoint(checkpoint, CONFIG_FILE))
    try:
        cfg = from_yaml((checkpoint / CONFIG_FILE).read_text())
    except (ConfigError, ValueError) as err:
        raise fail(f"{checkpoint / CONFIG_FILE}: {err}") from None
    manifest, store_dir = data or Path(cfg.data.manifest), store or Path(cfg.data.store)
    out = out or checkpoint / "probes" / split

    uri = tracking.resolve_uri(tracking_uri)
    if mlflow_run or experiment:
        try:
            tracking.check_reachable(uri)
            if mlflow_run:
                MlflowClient(tracking_uri=uri).get_run(mlflow_run)
        except (tracking.TrackingUnavailableError, MlflowException) as err:
            raise fail(f"MLflow: {str(err).splitlines()[0]}") from None

    try:
        rows, sources, left_out, from_store = probes.probe_rows(
            manifest, split, experts, store_dir, target_stats=probes.load_target_stats(checkpoint),
            max_seconds=cfg.data.max_seconds, long_clips=cfg.data.long_clips, train_split=cfg.data.train_split,
            max_clips=max_clips, seed=seed)
    except (ManifestError, MissingFeaturesError, ValueError) as err:
        raise fail(err) from None
    if from_store:
        console.print(f"{', '.join(from_store)}: not in the checkpoint's target_stats.json; standardised with "
                      f"split {cfg.data.train_split!r}'s statistics from the store")
    if len(left_out):
        console.print(f"{len(left_out)} manifest rows left out (invalid, undecodable or too long)")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with console.status(f"loading {checkpoint}"):
        try:
            model = CoATModel.load(checkpoint, device=device)
        except (FileNotFoundError, ValueError, ConfigError) as err:
            raise fail(err) from None
    try:
        chosen = probes.normalise_layers(requested_layers, probes.hidden_state_count(model))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--layers") from None

    hidden_dir = out / "hidden"
    fingerprint = _fingerprint(checkpoint, rows, chosen, cfg.data.max_seconds, cfg.data.long_clips)
    extraction = probes.extract_hidden_states(
        model, rows, hidden_dir, chosen, batch_size, max_seconds=cfg.data.max_seconds,
        crop=cfg.data.long_clips == "crop", fingerprint=fingerprint, progress=True)
    del model
    if extraction.reused:
        console.print(f"reusing the hidden states in {hidden_dir} (same checkpoint, clips and layers)", soft_wrap=True)
    if extraction.skipped:
        console.print(f"{len(extraction.skipped)} clips did not decode and were left out")
    rows = rows.set_index("id").loc[extraction.ids].reset_index()

    table = probes.fit_probes(hidden_dir, probes.probe_targets(rows, names, sources), probes.clip_groups(rows),
                              folds=folds, seed=seed)
    table = table.assign(checkpoint=str(checkpoint.resolve()), split=split, num_slots=cfg.thinking.num_slots)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    table.to_parquet(out / "results.parquet", index=False)

    run_id = mlflow_run
    try:
        if experiment:
            run_id = _new_run(uri, experiment, checkpoint, cfg, split, names)
        if run_id:
            probes.log_probe_results(uri, run_id, table)
            if experiment:
                tracking.end_run(uri, run_id)
    except (MlflowException, ValueError) as err:
        raise fail(f"MLflow: {str(err).splitlines()[0]} (results are in {out})") from None

    _print_summary(console, table, f"probes: {checkpoint} ({split}, {extraction.chunks} batches, "
                                   f"{len(extraction.ids)} clips)")
    console.print(f"results: {out / 'results.parquet'} (and results.csv); hidden states: {hidden_dir}", soft_wrap=True)
    if run_id:
        console.print(f"MLflow run: {run_id} at {uri}", soft_wrap=True)


def _fingerprint(checkpoint: Path, rows, layers: list[int], max_seconds: float, long_clips: str) -> str:
    """What the hidden states depend on: the trained parts, the config, the clips and prompts, layers and cropping."""
    import hashlib

    from coat.model.coat_model import CONFIG_FILE, WEIGHTS_FILE

    digest = hashlib.sha256()
    with open(checkpoint / WEIGHTS_FILE, "rb") as f:
        digest.update(hashlib.file_digest(f, "sha256").digest())
    digest.update((checkpoint / CONFIG_FILE).read_bytes())
    digest.update(repr((layers, max_seconds, long_clips)).encode())
    for row in rows[["id", "clip_hash", "prompt"]].itertuples(index=False):
        digest.update("\t".join(map(str, row)).encode() + b"\n")
    return digest.hexdigest()[:16]


def _new_run(uri: str, experiment: str, checkpoint: Path, cfg, split: str, names: list[str]) -> str:
    from mlflow.tracking import MlflowClient

    from coat import tracking

    experiment_id = tracking.get_or_create_experiment(uri, experiment)
    tags = {"coat.probe.checkpoint": str(checkpoint.resolve()), "coat.probe.split": split,
            "coat.probe.targets": ",".join(names), "backbone": cfg.backbone.name,
            "thinking.num_slots": str(cfg.thinking.num_slots)}
    run = MlflowClient(tracking_uri=uri).create_run(experiment_id, run_name=f"{RUN_PREFIX}{checkpoint.resolve().name}",
                                                    tags=tags)
    return run.info.run_id


def _print_summary(console, table, title: str) -> None:
    from rich.table import Table

    from coat.analysis.probes import summarise

    view = Table(title=title)
    for column in ("target", "position", "metric", "best layer", "score", "selectivity", "baseline",
                   "last layer", "last score", "last selectivity"):
        view.add_column(column, justify="left" if column in ("target", "position", "metric") else "right")
    for row in summarise(table).itertuples():
        view.add_row(row.target, row.position, row.metric, str(row.best_layer), f"{row.best_score:.3f}",
                     f"{row.best_selectivity:+.3f}", f"{row.baseline:.3f}", str(row.last_layer),
                     f"{row.last_score:.3f}", f"{row.last_selectivity:+.3f}")
    console.print(view)
    skipped = table[table["note"] != ""].drop_duplicates("target")
    for row in skipped.itertuples():
        console.print(f"not probed: {row.target} ({row.note})", soft_wrap=True)
