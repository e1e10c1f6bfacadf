"""`coat experts precompute`: fill the feature store with the experts' features for a manifest's clips.

    coat experts precompute --data data/coat-mini/manifest.jsonl --experts mel,prosody --store data/features

Run it again at will: clips already stored are skipped, so a second run computes nothing and a killed run
resumes where it stopped. Parts that fail their checksums are set aside first and their clips computed again
(the `damaged` column).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


def precompute_command(
    data: Annotated[Path, typer.Option("--data", help="Manifest (.jsonl or .parquet).")],
    experts: Annotated[str, typer.Option("--experts", help="Expert names, comma-separated (see `coat experts "
                                                           "list`).")],
    store: Annotated[Path, typer.Option("--store", help="Feature store folder (created if absent).")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Clips per expert call.")] = 8,
    actors: Annotated[int | None, typer.Option("--actors", min=1, help="Expert actors (default: one per GPU, "
                                                                       "or 1 on CPU).")] = None,
    crop_seconds: Annotated[float | None, typer.Option(
        "--crop-seconds", min=0.001, help="Experts hear each clip's first SECONDS only, as training does with "
                                          "data.long_clips=crop (data.max_seconds; with --config, its value).")
    ] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", exists=True, dir_okay=False,
        help="A run config whose expert settings (experts.settings, and the backbone for audio-encoder) the experts "
             "take, so the store holds what that run reads.")] = None,
) -> None:
    """Compute every expert's features for the clips the store lacks and print what was done.

    Exits 1 when the manifest cannot be read; a bad expert name is a usage error (exit 2).
    """
    from coat.config import ConfigError, apply_overrides, expert_settings, load_config
    from coat.data.manifest import ManifestError
    from coat.data.precompute import precompute
    from coat.experts.registry import UnknownExpertError, expert_spec
    from coat.experts.roles import resolve_roles

    console = Console()
    names = resolve_roles([n.strip() for n in experts.split(",") if n.strip()])
    if not names:
        raise typer.BadParameter("give at least one expert name", param_hint="--experts")
    settings = {}
    if config is not None:
        try:
            run = apply_overrides(load_config(config), [f"experts.names=[{','.join(names)}]"])
        except (ConfigError, FileNotFoundError) as err:
            raise typer.BadParameter(str(err), param_hint="--config") from err
        settings = expert_settings(run)
        if crop_seconds is None and run.data.long_clips == "crop":  # the features the run will look for
            crop_seconds = run.data.max_seconds
    for name in names:
        try:
            expert_spec(name, **settings.get(name, {}))
        except (UnknownExpertError, ValueError, FileNotFoundError) as err:
            raise typer.BadParameter(str(err), param_hint="--experts") from err
    try:
        summary = precompute(data, names, store, settings=settings, batch_size=batch_size, num_actors=actors,
                             crop_seconds=crop_seconds)
    except ManifestError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(1) from err

    table = Table(title=f"feature store {store}")
    for column in ("expert", "version", "clips", "computed", "present", "undecodable", "damaged", "seconds"):
        table.add_column(column, justify="left" if column in ("expert", "version") else "right")
    for run in summary.experts:
        counts = (run.clips, run.computed, run.present, run.failed, run.damaged)
        table.add_row(run.name, run.version, *map(str, counts), f"{run.seconds:.1f}")
    console.print(table)
    if len(summary.quarantine):
        console.print(f"{len(summary.quarantine)} manifest rows quarantined (not computed), first: "
                      f"{summary.quarantine.iloc[0]['id']}: {summary.quarantine.iloc[0]['reason']}")
