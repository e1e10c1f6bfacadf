"""`coat data ...`: generate coat-mini, check a manifest before anything trains on it, check a feature store.

    coat data synth --out data/coat-mini --size 200 --seed 0
    coat data check data/coat-mini/manifest.jsonl --max-seconds 30
    coat data check --store data/coat-mini/store [--repair]
    coat data import librispeech data/LibriSpeech --out data/librispeech
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

app = typer.Typer(help="Data: coat-mini generation, corpus import, manifest and feature store checks.",
                  no_args_is_help=True)


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
    manifest: Annotated[Path | None, typer.Argument(help="Manifest (.jsonl or .parquet).")] = None,
    rate: Annotated[int, typer.Option("--rate", min=1, help="Target sample rate (Hz).")] = 16000,
    max_seconds: Annotated[float, typer.Option("--max-seconds", min=0.0, help="Longest clip kept.")] = 30.0,
    quarantine_out: Annotated[Path | None, typer.Option(
        "--quarantine-out", help="Quarantine table (.jsonl or .parquet); default "
        "<manifest stem>.quarantine.jsonl beside the manifest.")] = None,
    store: Annotated[Path | None, typer.Option(
        "--store", help="A feature store: check every part against the size and sha256 recorded when it was "
        "committed.")] = None,
    repair: Annotated[bool, typer.Option(
        "--repair", help="With --store: set damaged parts aside (into <expert>/<version>/damaged/), so the next "
        "precompute recomputes exactly their clips.")] = False,
) -> None:
    """Check a manifest (validate every row, decode every clip, print a summary and write the quarantined rows)
    and/or a feature store (`--store`: list damaged parts per expert version, with the reason and the clips they
    hold).

    Exits 0 when rows are quarantined (they are listed in the quarantine file) and 1 when the manifest itself
    cannot be read, or when the store holds damaged parts and `--repair` was not given (with it: 0 once they are
    set aside).
    """
    from coat.errors import UsageError

    if manifest is None and store is None:
        raise UsageError("coat data check: give a MANIFEST, --store STORE, or both")
    if repair and store is None:
        raise UsageError("coat data check: --repair repairs a feature store: give --store STORE")
    console = Console()
    if manifest is not None:
        _check_manifest(console, manifest, rate, max_seconds, quarantine_out)
    if store is not None:
        _check_store(console, store, repair)


def _check_manifest(console: Console, manifest: Path, rate: int, max_seconds: float,
                    quarantine_out: Path | None) -> None:
    """`check` of a manifest: validate, decode, summarise, write the quarantine (exit 1 when it cannot be read)."""
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


def _check_store(console: Console, root: Path, repair: bool) -> None:
    """`check --store`: verify every expert version, print a table and each damaged part; with `repair`, set them
    aside. Raises DamagedFeaturesError (exit 1) for damage left in place."""
    from coat.data.store import DAMAGED_FOLDER, DamagedFeaturesError, FeatureStore, repair_hint

    if not root.is_dir():
        raise FileNotFoundError(f"feature store {root} does not exist: give the folder of data.store")
    store = FeatureStore(root)
    table = Table(title=f"feature store {root}")
    for column in ("expert", "version", "parts", "clips", "without checksums", "damaged parts", "clips affected"):
        table.add_column(column, justify="left" if column in ("expert", "version") else "right")
    found = {}
    for name, version in store.versions():
        damage = found[name, version] = store.verify(name, version)
        counts = (len(store.parts(name, version)), len(store.index(name, version)),
                  len(store.unrecorded(name, version)), len(damage), len({c for d in damage for c in d.clips}))
        table.add_row(name, version, *map(str, counts))
    console.print(table)
    damaged = [d for damage in found.values() for d in damage]
    for d in damaged:
        console.print(f"damaged: {d.part}: {d.reason} ({len(d.clips) or 'unknown'} clips)", soft_wrap=True)
    if not damaged:
        console.print(f"no damaged parts in {len(found)} expert versions")
        return
    clips = len({c for d in damaged for c in d.clips})
    if not repair:
        raise DamagedFeaturesError(f"feature store {root}: {len(damaged)} damaged parts holding {clips} clips; "
                                   f"{repair_hint(root)}")
    for (name, version), damage in found.items():
        store.set_aside(name, version, damage)
    console.print(f"set {len(damaged)} damaged parts aside (into <expert>/<version>/{DAMAGED_FOLDER}/); their {clips} "
                  "clips are missing now: the next `coat experts precompute` (or `coat train`) recomputes exactly "
                  "those", soft_wrap=True)


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
