"""`coat data ...`: generate coat-mini and check a manifest before anything trains on it.

    coat data synth --out data/coat-mini --size 200 --seed 0
    coat data check data/coat-mini/manifest.jsonl --max-seconds 30
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

app = typer.Typer(help="Data: coat-mini generation and manifest checks.", no_args_is_help=True)


@app.command()
def check(
    manifest: Annotated[Path, typer.Argument(help="Manifest (.jsonl or .parquet).")],
    rate: Annotated[int, typer.Option("--rate", min=1, help="Target sample rate (Hz).")] = 16000,
    max_seconds: Annotated[float, typer.Option("--max-seconds", min=0.0, help="Longest clip kept.")] = 30.0,
    quarantine_out: Annotated[Path | None, typer.Option(
        "--quarantine-out", help="Quarantine table (.jsonl or .parquet); default "
        "<manifest stem>.quarantine.jsonl beside the manifest.")] = None,
) -> None:
    """Validate every row, decode every clip, print a summary and write the quarantined rows.

    Exits 0 when rows are quarantined (they are listed in the quarantine file); exits 1 only when the
    manifest itself cannot be read.
    """
    # Imported here so that `coat --help` does not pay for torch.
    import pandas as pd

    from coat.data.audio import check_audio_rows
    from coat.data.manifest import (
        SUFFIXES,
        ManifestError,
        read_manifest,
        reason_code,
        validate_rows,
        write_table,
    )

    console = Console()
    out = quarantine_out or manifest.with_name(f"{manifest.stem}.quarantine.jsonl")
    if out.suffix not in SUFFIXES:
        raise typer.BadParameter(f"{out}: expected a .jsonl or .parquet path", param_hint="--quarantine-out")
    try:
        df = read_manifest(manifest)
    except ManifestError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from e
    good, bad_rows = validate_rows(df)
    good, bad_audio, stats = check_audio_rows(
        good, rate, max_seconds,
        progress=lambda paths: track(paths, description="decoding", console=console, transient=True))
    quarantine = pd.concat([bad_rows, bad_audio], ignore_index=True)
    write_table(quarantine, out)

    splits = ["train", "val", "test"]
    per_task = pd.crosstab(good["task"], good["split"]).reindex(columns=splits, fill_value=0)
    table = Table(title=f"{manifest.name}: rows kept per task and split")
    for col in ["task", *splits, "total"]:
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, row in per_task.iterrows():
        table.add_row(task, *(str(row[s]) for s in splits), str(row.sum()))
    table.add_row("total", *(str(int((good["split"] == s).sum())) for s in splits), str(len(good)),
                  style="bold")
    console.print(table)

    rates = stats["sample_rate"].value_counts().sort_index()
    overview = Table(title="overview", show_header=False)
    overview.add_row("rows read", str(len(df)))
    overview.add_row("rows kept", str(len(good)))
    overview.add_row("rows quarantined", str(len(quarantine)))
    seconds = stats["duration_s"].sum()
    overview.add_row("audio kept", f"{seconds / 3600:.3f} h ({seconds:.1f} s)")
    overview.add_row("sample rates seen (Hz: rows)", ", ".join(f"{r}: {n}" for r, n in rates.items()) or "-")
    console.print(overview)

    if len(quarantine):
        codes = quarantine["reason"].map(reason_code).value_counts()
        reasons = Table(title="quarantined rows by reason")
        reasons.add_column("reason")
        reasons.add_column("rows", justify="right")
        for code, n in codes.items():
            reasons.add_row(code, str(n))
        console.print(reasons)
    console.print(f"{len(quarantine)} of {len(df)} rows quarantined -> {out}")


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder for the clips and the manifest.")],
    size: Annotated[int, typer.Option("--size", min=1, help="Number of examples.")],
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same data.")],
    rate: Annotated[int, typer.Option("--rate", min=1, help="Sample rate of the clips (Hz).")] = 16000,
    test_share: Annotated[float, typer.Option(
        "--test-share", help="Share of the clips held out for test, in tenths (a tenth is validation).")] = 0.1,
) -> None:
    """Write the synthetic coat-mini data set (offline, deterministic) and print where its manifest is."""
    from coat.data.synth import synthesize

    try:
        path = synthesize(out, size=size, seed=seed, sample_rate=rate, test_share=test_share)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    Console().print(f"coat-mini: {size} examples -> {path}")
