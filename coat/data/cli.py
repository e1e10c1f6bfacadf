"""`coat data ...`: generate coat-mini and check a manifest before anything trains on it.

    coat data synth --out data/coat-mini --size 200 --seed 0
    coat data check data/coat-mini/manifest.jsonl --max-seconds 30
    coat data import librispeech data/LibriSpeech --out data/librispeech
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

app = typer.Typer(help="Data: coat-mini generation, corpus import and manifest checks.", no_args_is_help=True)


def _print_kept(console: Console, title: str, rows) -> None:
    """Rows per task family and split, with totals (the summary of `check` and `import`)."""
    from coat.data.importers import split_counts

    counts = split_counts(rows)
    splits = ["train", "val", "test"]
    table = Table(title=title)
    for col in ["task", *splits, "total"]:
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, row in counts.iterrows():
        table.add_row(str(task), *(str(row[s]) for s in splits), str(row["total"]))
    table.add_row("total", *(str(int(counts[s].sum())) for s in splits), str(len(rows)), style="bold")
    console.print(table)


def _print_reasons(console: Console, quarantine) -> None:
    """Quarantined rows per reason code, when there are any."""
    from coat.data.manifest import reason_code

    if not len(quarantine):
        return
    codes = quarantine["reason"].map(reason_code).value_counts()
    reasons = Table(title="quarantined rows by reason")
    reasons.add_column("reason")
    reasons.add_column("rows", justify="right")
    for code, n in codes.items():
        reasons.add_row(code, str(n))
    console.print(reasons)


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

    _print_kept(console, f"{manifest.name}: rows kept per task and split", good)

    rates = stats["sample_rate"].value_counts().sort_index()
    overview = Table(title="overview", show_header=False)
    overview.add_row("rows read", str(len(df)))
    overview.add_row("rows kept", str(len(good)))
    overview.add_row("rows quarantined", str(len(quarantine)))
    seconds = stats["duration_s"].sum()
    overview.add_row("audio kept", f"{seconds / 3600:.3f} h ({seconds:.1f} s)")
    overview.add_row("sample rates seen (Hz: rows)", ", ".join(f"{r}: {n}" for r, n in rates.items()) or "-")
    console.print(overview)

    _print_reasons(console, quarantine)
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


@app.command("import")
def import_(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="librispeech, meld, gtzan, mmau, mmar or table.")],
    root: Annotated[Path, typer.Argument(
        metavar="ROOT", help="The corpus in its published layout (table: the .csv/.jsonl file).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for manifest.jsonl, quarantine.jsonl and audio/.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split where the corpus defines none.")] = 0,
    val_share: Annotated[float, typer.Option("--val-share", help="Seeded split: share of groups for val.")] = 0.1,
    test_share: Annotated[float, typer.Option("--test-share", help="Seeded split: share of groups for test.")] = 0.1,
    rate: Annotated[int, typer.Option("--rate", min=1, help="Sample rate of extracted audio and checks (Hz).")
                    ] = 16000,
    max_seconds: Annotated[float, typer.Option("--max-seconds", min=0.0, help="Longest clip kept.")] = 30.0,
    audio_col: Annotated[str | None, typer.Option(
        "--audio-col", help="table: audio path column (default: audio).")] = None,
    question_col: Annotated[str | None, typer.Option(
        "--question-col", help="table: question column (default: question, unless --prompt).")] = None,
    answer_col: Annotated[str | None, typer.Option(
        "--answer-col", help="table: answer column (default: answer).")] = None,
    choices_col: Annotated[str | None, typer.Option(
        "--choices-col", help="table: choices column (a list, a JSON list or a|b|c).")] = None,
    split_col: Annotated[str | None, typer.Option(
        "--split-col", help="table: split column (train/val/test); else a seeded split.")] = None,
    speaker_col: Annotated[str | None, typer.Option(
        "--speaker-col", help="table: speaker column; the seeded split keeps each speaker in one split.")] = None,
    id_col: Annotated[str | None, typer.Option(
        "--id-col", help="table: id column (default: <file stem>-<row number>).")] = None,
    task: Annotated[str | None, typer.Option(
        "--task", help="table: the task family of every row (reasoning, understanding, music, emotion, "
        "transcription).")] = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", help="table: the instruction for every row, when there is no question column.")] = None,
) -> None:
    """Build DIR/manifest.jsonl from a local copy of a corpus; bad rows go to DIR/quarantine.jsonl with reasons.

    Splits come from the corpus where it defines them (LibriSpeech subsets, MELD CSVs, MMAU/MMAR: test), else
    from a seeded split by speaker where known, else by clip (GTZAN: stratified by genre).
    """
    from coat.data.importers import ImportUsageError, TableColumns, import_corpus

    console = Console()
    table_options = (audio_col, question_col, answer_col, choices_col, split_col, speaker_col, id_col)
    columns = None
    if fmt == "table":
        columns = TableColumns(audio=audio_col or "audio",
                               question=question_col or (None if prompt is not None else "question"),
                               answer=answer_col or "answer", choices=choices_col, split=split_col,
                               speaker=speaker_col, id=id_col)
    elif any(o is not None for o in (*table_options, task, prompt)):
        raise ImportUsageError(f"--audio-col and the other column options, --task and --prompt are for the table "
                               f"format, not {fmt!r}: drop them")
    summary = import_corpus(
        fmt, root, out, seed=seed, val_share=val_share, test_share=test_share, columns=columns, task=task,
        prompt=prompt, sample_rate=rate, max_seconds=max_seconds,
        progress=lambda items, what: track(items, description=what, console=console, transient=True))
    _print_kept(console, f"{fmt}: rows kept per task and split", summary.rows)
    _print_reasons(console, summary.quarantine)
    console.print(f"{len(summary.rows)} of {summary.rows_read} rows kept -> {summary.manifest}; "
                  f"{len(summary.quarantine)} quarantined -> {summary.quarantine_path}")
