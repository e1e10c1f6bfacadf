"""`coat ...`: the command line. Each command parses its options, calls one library function, and prints what it
returned; the work itself lives in the library, callable from Python without this file.

    coat data synth --out data/coat-mini --size 200 --seed 0
    coat data check data/coat-mini/manifest.jsonl --max-seconds 30
    coat data check --store data/coat-mini/store [--repair]
    coat data import librispeech data/LibriSpeech --out data/librispeech
    coat experts list
    coat experts precompute --data data/coat-mini/manifest.jsonl --experts mel,prosody --store data/features
    coat train --config FILE [dotted.key=value ...]
    coat eval --checkpoint runs/k16/checkpoint_000300 --suite mmau --data /data/MMAU --baseline base --baseline cot
    coat score --suite coat-mini runs/k16/coat-mini.jsonl --against runs/base/coat-mini.jsonl
    coat probe --checkpoint runs/k16/checkpoint_000300 --targets mel,family --experiment probes
    coat analyze --notebooks thinking_length --sweep ablate_thinking_len
    coat sweep --config FILE --space SPACE.yaml [--resume]
    coat preflight --space SPACE.yaml
    coat config show [--reference]

Importing this module loads no torch, Ray, MLflow, transformers or pandas: each command imports what it needs
when it runs, so `coat --help` and `coat score` answer at once. A user's mistake becomes one line (`coat.errors`).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from coat.analysis.notebooks import NOTEBOOKS
from coat.analysis.probe_spec import ProbeSpec
from coat.config import BASELINES, default_suites
from coat.data.import_spec import FORMATS, ImportSpec, TableColumns
from coat.errors import UsageError, reported
from coat.provenance import provenance
from coat.roles import PAPER_ROLES, ROLE_DEFAULTS

SUITES = tuple(default_suites())
LENS_TOP_K = 5  # tokens kept per slot and layer by `coat probe --logit-lens`

Overrides = Annotated[list[str] | None, typer.Argument(help="dotted.key=value overrides")]
ConfigFile = Annotated[Path | None, typer.Option("--config", exists=True, dir_okay=False,
                                                 help="YAML config (defaults + this + overrides)")]

app = typer.Typer(no_args_is_help=True)
data_app = typer.Typer(help="Data: coat-mini generation, corpus import, manifest and feature store checks.",
                       no_args_is_help=True)
experts_app = typer.Typer(help="Audio experts whose features the thinking slots regress.", no_args_is_help=True)
config_app = typer.Typer(help="The config tree: fields, help, bounds.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(experts_app, name="experts")
app.add_typer(config_app, name="config")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (or COAT_DEBUG=1).")):
    """Continuous Audio Thinking: data, experts, training, evaluation and sweeps."""
    # `main` reads --debug wherever it stands on the line; declared here so that `coat --help` lists it.


def _fail(console: Console, err: object) -> typer.Exit:
    """`error: <err>` on the console and exit 1: data or a checkpoint that cannot be used."""
    console.print(f"[red]error:[/] {err}", soft_wrap=True)
    return typer.Exit(1)


def _table(title: str, columns: list[str], rows, left: int = 1, caption: str | None = None) -> Table:
    """A table whose first `left` columns are text (left-aligned) and the rest numbers."""
    table = Table(title=title, caption=caption)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*map(str, row))
    return table


# ---------------------------------------------------------------- coat data

def _print_kept(console: Console, title: str, rows) -> None:
    """Rows per task family and split, with totals (the summary of `check` and `import`)."""
    from coat.data.importers import split_counts

    counts, splits = split_counts(rows), ["train", "val", "test"]
    table = _table(title, ["task", *splits, "total"],
                   [(task, *(row[s] for s in splits), row["total"]) for task, row in counts.iterrows()])
    table.add_row("total", *(str(int(counts[s].sum())) for s in splits), str(len(rows)), style="bold")
    console.print(table)


def _print_reasons(console: Console, quarantine) -> None:
    """Quarantined rows per reason code, when there are any."""
    from coat.data.manifest import reason_code

    if len(quarantine):
        codes = quarantine["reason"].map(reason_code).value_counts()
        console.print(_table("quarantined rows by reason", ["reason", "rows"], codes.items()))


@data_app.command("check")
def data_check_command(
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
    if manifest is None and store is None:
        raise UsageError("coat data check: give a MANIFEST, --store STORE, or both")
    if repair and store is None:
        raise UsageError("coat data check: --repair repairs a feature store: give --store STORE")
    console = Console()
    if manifest is not None:
        _check_manifest(console, manifest, rate, max_seconds,
                        quarantine_out or manifest.with_name(f"{manifest.stem}.quarantine.jsonl"))
    if store is not None:
        _check_store(console, store, repair)


def _check_manifest(console: Console, manifest: Path, rate: int, max_seconds: float, out: Path) -> None:
    from coat.data.audio import check_manifest
    from coat.data.manifest import SUFFIXES, ManifestError

    if out.suffix not in SUFFIXES:
        raise typer.BadParameter(f"{out}: expected a .jsonl or .parquet path", param_hint="--quarantine-out")
    try:
        check = check_manifest(manifest, rate, max_seconds, out, progress=lambda paths: track(
            paths, description="decoding", console=console, transient=True))
    except ManifestError as err:
        raise _fail(console, err) from err
    _print_kept(console, f"{manifest.name}: rows kept per task and split", check.kept)
    rates = check.stats["sample_rate"].value_counts().sort_index()
    seconds = check.stats["duration_s"].sum()
    overview = Table(title="overview", show_header=False)
    for name, value in [("rows read", check.read), ("rows kept", len(check.kept)),
                        ("rows quarantined", len(check.quarantine)),
                        ("audio kept", f"{seconds / 3600:.3f} h ({seconds:.1f} s)"),
                        ("sample rates seen (Hz: rows)", ", ".join(f"{r}: {n}" for r, n in rates.items()) or "-")]:
        overview.add_row(name, str(value))
    console.print(overview)
    _print_reasons(console, check.quarantine)
    console.print(f"{len(check.quarantine)} of {check.read} rows quarantined -> {out}")


def _check_store(console: Console, root: Path, repair: bool) -> None:
    from coat.data.store import DAMAGED_FOLDER, DamagedFeaturesError, check_store, repair_hint

    checks = check_store(root, repair)
    columns = ["expert", "version", "parts", "clips", "without checksums", "damaged parts", "clips affected"]
    console.print(_table(f"feature store {root}", columns, [
        (c.name, c.version, c.parts, c.clips, c.unrecorded, len(c.damage), len({h for d in c.damage for h in d.clips}))
        for c in checks], left=2))
    damaged = [d for c in checks for d in c.damage]
    for d in damaged:
        console.print(f"damaged: {d.part}: {d.reason} ({len(d.clips) or 'unknown'} clips)", soft_wrap=True)
    if not damaged:
        console.print(f"no damaged parts in {len(checks)} expert versions")
        return
    clips = len({h for d in damaged for h in d.clips})
    if not repair:
        raise DamagedFeaturesError(f"feature store {root}: {len(damaged)} damaged parts holding {clips} clips; "
                                   f"{repair_hint(root)}")
    console.print(f"set {len(damaged)} damaged parts aside (into <expert>/<version>/{DAMAGED_FOLDER}/); their {clips} "
                  "clips are missing now: the next `coat experts precompute` (or `coat train`) recomputes exactly "
                  "those", soft_wrap=True)


@data_app.command("synth")
def data_synth_command(
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


def _table_columns(fmt: str, prompt: str | None, **given: str | None) -> TableColumns | None:
    """The columns named on the command line over `TableColumns`' defaults; a --prompt without --question-col
    stands in for the default question column. None for another format when no column is named."""
    columns = {field: name for field, name in given.items() if name is not None}
    if prompt is not None and given["question"] is None:
        columns["question"] = None
    return TableColumns(**columns) if columns or fmt == "table" else None


@data_app.command("import")
def data_import_command(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help=f"One of {', '.join(FORMATS)}.")],
    root: Annotated[Path, typer.Argument(
        metavar="ROOT", help="The corpus in its published layout (table: the .csv/.jsonl file).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for manifest.jsonl, quarantine.jsonl and audio/.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split where the corpus defines none.")
                    ] = ImportSpec.seed,
    val_share: Annotated[float, typer.Option("--val-share", help="Seeded split: share of groups for val.")
                         ] = ImportSpec.val_share,
    test_share: Annotated[float, typer.Option("--test-share", help="Seeded split: share of groups for test.")
                          ] = ImportSpec.test_share,
    rate: Annotated[int, typer.Option("--rate", min=1, help="Sample rate of extracted audio and checks (Hz).")
                    ] = ImportSpec.sample_rate,
    max_seconds: Annotated[float, typer.Option("--max-seconds", min=0.0, help="Longest clip kept.")
                           ] = ImportSpec.max_seconds,
    allow_outside_root: Annotated[bool, typer.Option(
        "--allow-outside-root", help="Import rows whose audio lies outside the corpus folder (an absolute path or "
                                     "a `..` in a table); by default they are quarantined as outside_root.")
                                  ] = ImportSpec.allow_outside_root,
    audio_col: Annotated[str | None, typer.Option(
        "--audio-col", help=f"table: audio path column (default: {TableColumns.audio}).")] = None,
    question_col: Annotated[str | None, typer.Option(
        "--question-col", help=f"table: question column (default: {TableColumns.question}, unless --prompt).")
                            ] = None,
    answer_col: Annotated[str | None, typer.Option(
        "--answer-col", help=f"table: answer column (default: {TableColumns.answer}).")] = None,
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
    from coat.data.importers import import_corpus

    console = Console()
    columns = _table_columns(fmt, prompt, audio=audio_col, question=question_col, answer=answer_col,
                             choices=choices_col, split=split_col, speaker=speaker_col, id=id_col)
    spec = ImportSpec(seed=seed, val_share=val_share, test_share=test_share, sample_rate=rate,
                      max_seconds=max_seconds, allow_outside_root=allow_outside_root, columns=columns, task=task,
                      prompt=prompt)
    summary = import_corpus(fmt, root, out, spec,
                            progress=lambda items, what: track(items, description=what, console=console,
                                                               transient=True))
    _print_kept(console, f"{fmt}: rows kept per task and split", summary.rows)
    _print_reasons(console, summary.quarantine)
    console.print(f"{len(summary.rows)} of {summary.rows_read} rows kept -> {summary.manifest}; "
                  f"{len(summary.quarantine)} quarantined -> {summary.quarantine_path}")


# ---------------------------------------------------------------- coat experts

@experts_app.callback()
def _experts() -> None:
    """Audio experts whose features the thinking slots regress."""


@experts_app.command("list")
def experts_list_command(
    hub: Annotated[list[str] | None, typer.Option(help="Also list the hub model in this folder.")] = None,
) -> None:
    """Print name, role, dim, frame rate, kind, version and source of each expert (building it hashes its
    weights). A role marked * is one of the method's five; a config may name a role for its default expert."""
    from coat.experts.registry import HUB_PREFIX, available_experts, build_expert

    table = Table(title="coat experts", caption="* one of the method's five roles; experts.names may name a role "
                                               "for its default expert")
    for column in ("name", "role", "dim", "frame rate", "kind", "version", "source"):
        table.add_column(column, overflow="fold")
    defaults = {expert: role for role, expert in ROLE_DEFAULTS.items()}
    for name in [*available_experts(), *(HUB_PREFIX + path for path in hub or [])]:
        expert = build_expert(name)
        rate = "clip" if expert.spec.frame_rate is None else f"{expert.spec.frame_rate:g} fps"
        role = expert.role + ("*" if expert.role in PAPER_ROLES else "")
        if name in defaults:
            role += f" (default for {defaults[name]})"
        table.add_row(expert.name, role, str(expert.spec.dim), rate, expert.spec.kind, expert.version,
                      expert.source)
    Console().print(table)


@experts_app.command("precompute")
def experts_precompute_command(
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
    """Compute every expert's features for the clips the store lacks and print what was done. Run it again at
    will: stored clips are skipped, a killed run resumes where it stopped, and parts that fail their checksums are
    set aside first and their clips computed again (the `damaged` column).

    Exits 1 when the manifest cannot be read; a bad expert name is a usage error (exit 2).
    """
    from coat.config import ConfigError
    from coat.data.manifest import ManifestError
    from coat.data.precompute import precompute, settings_of_run
    from coat.experts.registry import UnknownExpertError, expert_spec
    from coat.roles import resolve_roles

    console = Console()
    names = resolve_roles([n.strip() for n in experts.split(",") if n.strip()])
    if not names:
        raise typer.BadParameter("give at least one expert name", param_hint="--experts")
    settings, longest = {}, None
    if config is not None:
        try:
            settings, crop_of_run, longest = settings_of_run(config, names)
        except (ConfigError, FileNotFoundError) as err:
            raise typer.BadParameter(str(err), param_hint="--config") from err
        crop_seconds = crop_of_run if crop_seconds is None else crop_seconds
    for name in names:
        try:
            expert_spec(name, **settings.get(name, {}))
        except (UnknownExpertError, ValueError, FileNotFoundError) as err:
            raise typer.BadParameter(str(err), param_hint="--experts") from err
    try:
        summary = precompute(data, names, store, settings=settings, batch_size=batch_size, num_actors=actors,
                             crop_seconds=crop_seconds, max_seconds=longest if crop_seconds is None else None)
    except ManifestError as err:
        raise _fail(console, err) from err
    columns = ["expert", "version", "clips", "computed", "present", "undecodable", "damaged", "seconds"]
    console.print(_table(f"feature store {store}", columns, [
        (r.name, r.version, r.clips, r.computed, r.present, r.failed, r.damaged, f"{r.seconds:.1f}")
        for r in summary.experts], left=2))
    if len(summary.quarantine):
        first = summary.quarantine.iloc[0]
        console.print(f"{len(summary.quarantine)} manifest rows quarantined (not computed), first: "
                      f"{first['id']}: {first['reason']}")


# ---------------------------------------------------------------- training, evaluation, analysis

@app.command("train")
def train_command(overrides: Overrides = None, config: ConfigFile = None) -> None:
    """Train a CoAT model with Ray Train, evaluate it on the test split and log the run to MLflow."""
    from coat.config import load_config
    from coat.report import print_eval_reports
    from coat.train.launch import train

    result = train(load_config(config, overrides or []))
    console = Console()
    if result.eval_reports:
        print_eval_reports(result.eval_reports, title=f"test split: {result.checkpoint}", console=console)
    metrics = sorted({**result.metrics, **result.eval_metrics}.items())
    console.print(_table(f"run {result.run_name}", ["metric", "value"],
                         [(key, f"{value:.4g}") for key, value in metrics if isinstance(value, int | float)]))
    console.print(f"checkpoint: {result.checkpoint}\nMLflow run: {result.mlflow_run_id}")


@app.command("eval")
def eval_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint folder written by CoATModel.save.")],
    suite: Annotated[str, typer.Option("--suite", help=f"One of {', '.join(SUITES)}.")] = "coat-mini",
    data: Annotated[Path | None, typer.Option(
        "--data", help="Local benchmark copy (needed for all but coat-mini; for coat-mini: a manifest, default "
                       "the checkpoint config's data.manifest).")] = None,
    baseline: Annotated[list[str] | None, typer.Option(
        "--baseline", help="Also evaluate, side by side on the same examples: base (the backbone without the "
                           "thinking block or fine-tune) or cot (that backbone reasoning in text first). "
                           "Repeatable.")] = None,
    split: Annotated[str, typer.Option("--split", help="Split to evaluate.")] = "test",
    max_examples: Annotated[int | None, typer.Option(
        "--max-examples", min=1, help="A subsample of N, stratified by task, drawn with --seed (default: all).",
    )] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subsample and the bootstrap.")] = 0,
    scoring: Annotated[str, typer.Option(
        "--scoring", help="generate: the suite's rule on generated text; loglik: the most likely choice.",
    )] = "generate",
    loglik: Annotated[str | None, typer.Option(
        "--loglik", help="loglik scoring ranks choices per_token (their mean token log-probability), by sum, or "
                         "calibrated against silence (default: the checkpoint config's eval.loglik).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", min=1, help="Token budget (default: the suite's).")] = None,
    cot_tokens: Annotated[int | None, typer.Option(
        "--cot-tokens", min=1, help="cot: extra tokens for the reasoning (default: the checkpoint config's "
                                    "eval.cot_tokens).")] = None,
    circular: Annotated[bool, typer.Option(
        "--circular", help="CircularEval: ask each multiple-choice item once per rotation of its choices; it counts "
                           "as right only when right under every rotation (circular_accuracy, beside accuracy).",
    )] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Per-example predictions of CoAT (baselines beside it as <stem>.<baseline><suffix>); MMAU "
                      "and MMAR in their own submission format.")] = None,
) -> None:
    """Evaluate and print per-task scores with 95% intervals, chance levels, tokens and latency, system by
    system, with paired tests of CoAT against each baseline; write the per-example predictions.

    Exits 2 on a bad option, 1 when the checkpoint or the data cannot be read.
    """
    console = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes: room for the systems side by side
    baselines = list(dict.fromkeys(baseline or []))
    if suite not in SUITES:
        raise typer.BadParameter(f"{suite!r} is not one of {', '.join(SUITES)}", param_hint="--suite")
    if bad := [b for b in baselines if b not in BASELINES]:
        raise typer.BadParameter(f"{bad[0]!r} is not one of {', '.join(BASELINES)}", param_hint="--baseline")
    if suite != "coat-mini" and data is None:
        raise typer.BadParameter(f"--suite {suite} needs --data: the local copy of the benchmark", param_hint="--data")

    import torch

    from coat.config import ConfigError, apply_overrides
    from coat.data.manifest import ManifestError
    from coat.eval import systems
    from coat.report import print_eval_reports

    try:
        cfg, rows, quirks = systems.suite_rows(checkpoint, suite, data, split)
    except (FileNotFoundError, ValueError, ManifestError, ConfigError) as err:
        raise _fail(console, err) from err
    # The options are overrides of the checkpoint config's eval section, validated as any config is; the first three
    # always apply (their defaults are this command's: every example, seed 0, generation), the rest when given.
    chosen = {"max_examples": "null" if max_examples is None else max_examples, "seed": seed, "scoring": scoring,
              "circular": "true" if circular else None, "cot_tokens": cot_tokens, "loglik": loglik}
    try:
        eval_cfg = apply_overrides(cfg, [f"eval.{k}={v}" for k, v in chosen.items() if v is not None]).eval
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from err
    device = "cuda" if torch.cuda.is_available() else "cpu"
    heard = {"max_seconds": cfg.data.max_seconds, "crop": cfg.data.long_clips == "crop"} if suite == "coat-mini" \
        else {}  # a benchmark is heard whole, up to the backbone's audio window
    reports = systems.evaluate_systems(checkpoint, [(None, suite, rows)], eval_cfg, baselines, device,
                                       max_new_tokens=max_new_tokens, **heard)
    print_eval_reports(reports, title=f"{suite} {split}: {checkpoint}", console=console,
                       paired=systems.paired_with_coat(reports, eval_cfg.bootstrap, seed))
    if quirks:
        console.print("benchmark quirks handled: " + ", ".join(f"{k} {v}" for k, v in quirks.items() if v))
    _write_predictions(console, reports, out, checkpoint, split)


def _write_predictions(console: Console, reports: list, out: Path | None, checkpoint: Path, split: str) -> None:
    """Each system's per-example predictions, and beside them how they were made (the code, the packages, each
    system's settings)."""
    from coat.eval import systems

    for report, path in zip(reports, systems.write_all_predictions(reports, out, checkpoint, split), strict=True):
        console.print(f"{report.system} predictions: {path}")
    made = path.with_name(f"{(out or path).stem}.provenance.json")
    made.write_text(json.dumps({"checkpoint": str(checkpoint), "split": split, **provenance(),
                                "systems": {r.system: r.setting for r in reports}}, indent=2, default=str))
    console.print(f"how they were made: {made}\n{_provenance_line()}", soft_wrap=True)


def _provenance_line() -> str:
    made = provenance()
    scorers = ", ".join(f"{name} {made[f'version.{name}']}" for name in ("jiwer", "whisper-normalizer", "scikit-learn"))
    return f"scored by coat {made['code_sha256']} (git {made['git_commit'][:12]}, dirty {made['git_dirty']}); {scorers}"


def _suite_recipes() -> str:
    lines = ["Suites (prompt; token budget; scoring rule; metrics; breakdowns):"]
    for name, r in default_suites().items():
        budget = r.max_new_tokens or "1.5 x longest reference"
        metrics = "wer" if r.rule == "wer" else ", ".join(r.metrics)
        lines.append(f"{name}: {r.prompt or 'each item’s question'}; {budget}; {r.rule}; {metrics}"
                     f"{'; by ' + ', '.join(r.breakdowns) if r.breakdowns else ''}")
    return "\n\n".join(lines)


eval_command.__doc__ = inspect.cleandoc(eval_command.__doc__) + "\n\n" + _suite_recipes()


@app.command("score")
def score_command(
    file: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False, metavar="FILE",
        help="Predictions file (write_predictions: the benchmark's submission format for mmau/mmar, JSON Lines "
             "otherwise).")],
    suite: Annotated[str, typer.Option("--suite", help=f"One of {', '.join(SUITES)}.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print only {\"metrics\": {...}} as JSON.")] = False,
    against: Annotated[Path | None, typer.Option(
        "--against", exists=True, dir_okay=False,
        help="A second system's predictions on the same suite: adds a paired comparison (FILE minus it).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=1, help="Resamples for the intervals.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
) -> None:
    """Rescore FILE offline with the suite's recipe (rule, metrics, breakdowns) and print scores with 95%
    intervals; scoring needs no model, so the rule can be checked after a run.

    Exits 2 on a bad option or a missing file, 1 when a file cannot be read as the suite's predictions.
    """
    from coat.eval import rescoring
    from coat.eval.scoring import paired_comparison, results_table
    from coat.report import rescored_pairs_table, rescored_table

    if suite not in SUITES:
        raise typer.BadParameter(f"{suite!r} is not one of {', '.join(SUITES)}", param_hint="--suite")
    recipe = default_suites()[suite]
    console = Console()
    try:
        examples, scoring = rescoring.scored(file, suite, recipe)
        other, other_scoring = rescoring.scored(against, suite, recipe) if against is not None else (None, None)
    except (OSError, ValueError) as err:
        Console(stderr=True).print(f"[red]error:[/] {err}", highlight=False)
        raise typer.Exit(1) from None
    table = results_table(examples, metrics=recipe.metrics, breakdowns=recipe.breakdowns, scoring=scoring,
                          n=bootstrap, seed=seed)
    paired = None if other is None else paired_comparison(examples, other, n=bootstrap, seed=seed)
    if as_json:
        out: dict = {"metrics": rescoring.json_metrics(examples, table, recipe, scoring)}
        if paired is not None:
            out["paired"] = rescoring.records(paired)
        typer.echo(json.dumps(out | {"provenance": provenance()}, indent=2))
        return
    console.print(rescored_table(table, f"{suite}: {file} ({recipe.rule}, {scoring})"))
    console.print(_provenance_line(), soft_wrap=True)
    if examples.attrs.get("skipped"):
        console.print(f"{examples.attrs['skipped']} items without a model output skipped, as the official "
                      "scorer skips them")
    if paired is not None:
        console.print(rescored_pairs_table(paired, f"A: {file} ({scoring}), B: {against} ({other_scoring}), paired "
                                                   "on id"))
        if paired.attrs["a_unpaired"] + paired.attrs["b_unpaired"]:
            console.print(f"not compared: {paired.attrs['a_unpaired']} ids only in A, "
                          f"{paired.attrs['b_unpaired']} only in B")
        if other.attrs.get("skipped"):
            console.print(f"{other.attrs['skipped']} items of B without a model output skipped, as the official "
                          "scorer skips them")


def _comma_list(text: str | None) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in (text or "").split(",") if t.strip()))


@app.command("probe")
def probe_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint folder written by CoATModel.save.")],
    targets: Annotated[str, typer.Option(
        "--targets", help="Comma-separated expert names (their standardised features, frame-averaged) and/or "
                          "'family' (each task family's answers).")],
    data: Annotated[Path | None, typer.Option(
        "--data", help="Manifest (default: the checkpoint config's data.manifest).")] = None,
    layers: Annotated[str | None, typer.Option(
        "--layers", help="Comma-separated hidden_states indices: 0 = embeddings, -1 = last (default: all).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split to probe.")] = ProbeSpec.split,
    store: Annotated[Path | None, typer.Option(
        "--store", help="Feature store (default: the checkpoint config's data.store).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Output folder (default: <checkpoint>/probes/<split>).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Clips per forward pass.")
                          ] = ProbeSpec.batch_size,
    max_clips: Annotated[int | None, typer.Option(
        "--max-clips", min=1, help="A seeded random subset of N clips (default: all).")] = None,
    folds: Annotated[int, typer.Option("--folds", min=2, help="Cross-validation folds.")] = ProbeSpec.folds,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subset, the folds and the control.")
                    ] = ProbeSpec.seed,
    mlflow_run: Annotated[str | None, typer.Option(
        "--mlflow-run", help="Log into this existing MLflow run.")] = None,
    experiment: Annotated[str | None, typer.Option(
        "--experiment", help="Log into a new run probe-<checkpoint folder> of this MLflow experiment.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns.db).")] = None,
    lens: Annotated[bool, typer.Option(
        "--logit-lens", help="Also decode each thinking slot's state at each layer through the LM head: its top "
                             "tokens and their probabilities, averaged over the clips (logit_lens.parquet).")] = False,
) -> None:
    """Fit linear probes per layer and position (thinking slots, response) for expert features or each subtask's
    answers, with grouped cross-validation, a baseline conditioned on the question and a control task (random
    targets per question type); print the best and last layers.

    Writes the hidden states (`<out>/hidden/`, reused while the checkpoint, clips and layers stay the same), the
    tidy table `results.csv` / `results.parquet`, one row per (position, layer, target), and each clip's
    out-of-fold scores (`clips.parquet`). Compare a CoAT checkpoint with its K = 0 twin by concatenating their
    tables (the probes notebook does).

    Exits 2 on a bad option, 1 when the checkpoint, the data or the tracking store cannot be used.
    """
    from coat.analysis.hidden_states import LayerError
    from coat.analysis.probes import ProbeError, probe_checkpoint
    from coat.data.manifest import SPLITS
    from coat.tracking import resolve_uri

    console = Console(width=None if sys.stdout.isatty() else 160)
    names = _probe_targets(targets)
    try:
        requested = tuple(int(t) for t in _comma_list(layers)) or None
    except ValueError:
        raise typer.BadParameter(f"{layers!r} is not a comma-separated list of layer indices (e.g. 0,8,-1)",
                                 param_hint="--layers") from None
    if split not in SPLITS:
        raise typer.BadParameter(f"{split!r} is not one of {', '.join(sorted(SPLITS))}", param_hint="--split")
    if mlflow_run and experiment:
        raise typer.BadParameter("give --mlflow-run or --experiment, not both", param_hint="--experiment")
    uri = resolve_uri(tracking_uri)
    try:
        spec = ProbeSpec(split=split, data=data, store=store, out=out, layers=requested, batch_size=batch_size,
                         max_clips=max_clips, folds=folds, seed=seed, lens_top_k=LENS_TOP_K if lens else None)
        run = probe_checkpoint(checkpoint, names, spec, uri=uri, mlflow_run=mlflow_run, experiment=experiment,
                               progress=True)
    except LayerError as err:
        raise typer.BadParameter(str(err), param_hint="--layers") from None
    except ProbeError as err:
        raise _fail(console, err) from None
    for note in run.notes:
        console.print(note, soft_wrap=True)
    _print_probe_summary(console, run.table, f"probes: {checkpoint} ({split}, {run.extraction.chunks} batches, "
                                             f"{len(run.extraction.ids)} clips)")
    console.print(f"results: {run.out / 'results.parquet'} (and results.csv, clips.parquet); hidden states: "
                  f"{run.out / 'hidden'}", soft_wrap=True)
    if run.lens is not None:
        _print_logit_lens(console, run.lens)
    if run.run_id:
        console.print(f"MLflow run: {run.run_id} at {uri}", soft_wrap=True)


def _probe_targets(targets: str) -> list[str]:
    """`--targets` as names, each an expert or `family`; raises BadParameter naming the first that is neither."""
    from coat.analysis.linear_probes import FAMILY
    from coat.experts.registry import UnknownExpertError, expert_spec

    names = _comma_list(targets)
    if not names:
        raise typer.BadParameter("give expert names and/or 'family', comma-separated", param_hint="--targets")
    for name in names:
        try:
            if name != FAMILY:
                expert_spec(name)
        except (UnknownExpertError, ValueError, FileNotFoundError) as err:
            raise typer.BadParameter(str(err), param_hint="--targets") from None
    return names


def _print_probe_summary(console: Console, table, title: str) -> None:
    from coat.analysis.linear_probes import summarise

    columns = ["target", "position", "metric", "best layer", "score", "selectivity", "baseline", "last layer",
               "last score", "last selectivity"]
    console.print(_table(title, columns, [
        (r.target, r.position, r.metric, r.best_layer, f"{r.best_score:.3f}", f"{r.best_selectivity:+.3f}",
         f"{r.baseline:.3f}", r.last_layer, f"{r.last_score:.3f}", f"{r.last_selectivity:+.3f}")
        for r in summarise(table).itertuples()], left=3))
    for row in table[table["note"] != ""].drop_duplicates("target").itertuples():
        console.print(f"not probed: {row.target} ({row.note})", soft_wrap=True)


def _print_logit_lens(console: Console, lens) -> None:
    if lens.empty:
        console.print("logit lens: K = 0, no thinking slots to read")
        return
    top = lens[lens["rank"] == 1]
    console.print(_table("logit lens: each slot's likeliest next token per layer (probability, mean over clips)",
                         ["layer", *[f"slot {k}" for k in sorted(top["slot"].unique())]],
                         [(layer, *[f"{t!r} {p:.2f}" for t, p in zip(rows["token"], rows["probability"], strict=True)])
                          for layer, rows in top.sort_values(["layer", "slot"]).groupby("layer")]))


@app.command("analyze")
def analyze_command(
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment holding the sweeps.")] = "coat",
    sweep: Annotated[str | None, typer.Option(
        "--sweep", help="Analyse this sweep (its name); default: each notebook's newest matching sweep.")] = None,
    notebooks: Annotated[str | None, typer.Option(
        "--notebooks", help=f"Comma-separated, of {', '.join(NOTEBOOKS)} (default: all).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Where executed notebooks, figures and tables go.")] = Path(
        "analysis-out"),
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI, else ./mlruns.db.")] = None,
    notebook_dir: Annotated[Path | None, typer.Option(
        "--notebook-dir", help="Folder of the notebooks (default: ./analysis, else the checkout's).")] = None,
) -> None:
    """Execute the analysis notebooks headless against the tracking store; each one's executed `.ipynb`, figures
    (PNG) and tables (CSV, Parquet) land in `<out>/<notebook>/` and on the parent run of the sweep it analysed,
    whose description gains its conclusions, so the dashboard shows them. Prints each notebook's conclusions.

    A notebook with nothing to analyse (no sweep of its kind, no probe results) is skipped with one line saying
    what would produce its inputs. Exits 1 when a notebook fails (the others still run), 2 on a bad option."""
    from coat import tracking
    from coat.analysis.notebooks import analyze, notebook_folder

    names = _comma_list(notebooks) or list(NOTEBOOKS)
    if bad := [n for n in names if n not in NOTEBOOKS]:
        raise typer.BadParameter(f"{bad[0]!r} is not one of {', '.join(NOTEBOOKS)}", param_hint="--notebooks")
    try:
        folder = notebook_folder(notebook_dir)
    except FileNotFoundError as err:
        raise typer.BadParameter(str(err), param_hint="--notebook-dir") from None
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)
    summaries = analyze(uri, experiment, sweep, names, out, folder)
    console = Console()
    for name, summary in summaries.items():
        executed = out / name / f"{name}.ipynb"
        if "error" in summary:
            console.print(f"[red]{name} failed:[/] {summary['error']} (see {executed})")
            continue
        if "skipped" in summary:
            console.print(f"{name}: skipped, {summary['skipped']}", markup=False, highlight=False)
            continue
        console.print(f"[bold]{name}[/]: {executed}; figures: "
                      + ", ".join(str(out / name / f) for f in summary["figures"]))
        for sentence in summary["conclusions"]:
            console.print(f"  {sentence}", markup=False, highlight=False)
    if any("error" in s for s in summaries.values()):
        raise typer.Exit(1)


@app.command("sweep")
def sweep_command(
    space: Annotated[Path, typer.Option("--space", exists=True, dir_okay=False,
                                        help="Search space YAML over dotted config paths")],
    overrides: Overrides = None,
    config: ConfigFile = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the sweep of the same name")] = False,
) -> None:
    """Sweep with Ray Tune (Optuna TPE + ASHA, or an exact grid); one MLflow parent run, a child per trial."""
    from coat.config import load_config
    from coat.report import print_sweep_results
    from coat.tune.sweep import run_sweep

    cfg = load_config(config, overrides or [])
    print_sweep_results(run_sweep(cfg, space, resume=resume), cfg)


@app.command("preflight")
def preflight_command(
    overrides: Overrides = None,
    config: ConfigFile = None,
    space: Annotated[Path | None, typer.Option(
        "--space", exists=True, dir_okay=False,
        help="A sweep's search space: check every backbone it names, and time every K it names.")] = None,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="Real-size backbones get random weights instead of their checkpoints.")] = False,
    wait_s: Annotated[float, typer.Option(
        "--wait-s", min=0, help="Wait this long for an autoscaling cluster to add the nodes a run needs.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of tables.")] = False,
) -> None:
    """Check that a run will work here before it starts: Ray resources, the worker group (CUDA, bf16, an
    all-reduce), backbone weights, data and expert features, MLflow, then real training steps, a checkpoint round
    trip and a generated answer per backbone, with step time, memory, tokens/s and the thinking block's prefill
    overhead, and on GPUs the peak memory and the largest batch that fits the card. The step times (at every K
    the space names) are stored under train.storage ($COAT_STORAGE on a cluster), where an experiment script's
    --dry-run finds them to bill its sweep. Exits 1 naming each failure and its fix."""
    from coat.config import load_config
    from coat.preflight import run_preflight, space_slots, store_measurements
    from coat.report import print_preflight_report
    from coat.tune.space import load_space

    cfg = load_config(config, overrides or [])
    searched = load_space(space, cfg) if space is not None else None
    report = run_preflight(cfg, backbones=searched.backbones() if searched else None,
                           slots=space_slots(searched) if searched else None, random_weights=random_weights,
                           wait_s=wait_s)
    store_measurements(cfg, report)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_preflight_report(report)
    for failure in report.failures:
        typer.echo(f"preflight: {failure.name}: {failure.detail}" + (f" (fix: {failure.fix})" if failure.fix else ""),
                   err=True)
    if report.failures:
        raise typer.Exit(1)


@config_app.command("show")
def config_show_command(
    overrides: Overrides = None,
    config: ConfigFile = None,
    reference: Annotated[bool, typer.Option(
        "--reference", help="Print the Markdown reference of the defaults (docs/config.md) instead.")] = False,
) -> None:
    """Print the resolved config as YAML, each field with its help and bounds as a comment."""
    from coat.config import load_config
    from coat.config_help import reference as markdown_reference
    from coat.config_help import show

    typer.echo(markdown_reference() if reference else show(load_config(config, overrides or [])), nl=False)


def main(argv: list[str] | None = None) -> None:
    """The `coat` command. A user's mistake (`UserError`, a missing file) prints `error: <message>` and exits with
    its code (2 for a bad command line, config or space; 1 otherwise); `--debug` anywhere on the line, or
    COAT_DEBUG=1, lets the exception through with its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with reported("--debug" in argv or os.environ.get("COAT_DEBUG") == "1"):
        app([a for a in argv if a != "--debug"], prog_name="coat")
