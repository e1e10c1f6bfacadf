"""`coat eval`: score a checkpoint, and the baselines built from it, on coat-mini or a local benchmark copy.

    coat eval --checkpoint runs/k16/checkpoint_000300 --suite coat-mini
    coat eval --checkpoint runs/k16/checkpoint_000300 --suite mmau --data /data/MMAU --baseline base --baseline cot
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from coat.config import default_suites

SUITES = tuple(default_suites())
BASELINES = ("base", "cot")


def _recipes() -> str:
    lines = ["Suites (prompt; token budget; scoring rule; metrics; breakdowns):"]
    for name, r in default_suites().items():
        budget = r.max_new_tokens or "1.5 x longest reference"
        metrics = "wer" if r.rule == "wer" else ", ".join(r.metrics)
        lines.append(f"{name}: {r.prompt or 'each item’s question'}; {budget}; {r.rule}; {metrics}"
                     f"{'; by ' + ', '.join(r.breakdowns) if r.breakdowns else ''}")
    return "\n\n".join(lines)


def predictions_path(out: Path | None, checkpoint: Path, suite: str, split: str, system: str) -> Path:
    """`out` for CoAT and `<out stem>.<system><suffix>` for a baseline; by default
    `<checkpoint>/eval/<suite>-<split>-<system>.json[l]` (MMAU's official scorer reads a JSON list)."""
    if out is not None:
        return out if system == "coat" else out.with_name(f"{out.stem}.{system}{out.suffix}")
    return checkpoint / "eval" / f"{suite}-{split}-{system}{'.json' if suite == 'mmau' else '.jsonl'}"


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
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", min=1, help="Token budget (default: the suite's).")] = None,
    cot_tokens: Annotated[int, typer.Option("--cot-tokens", min=1, help="cot: extra tokens for the reasoning.")] = 256,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Per-example predictions of CoAT (baselines beside it as <stem>.<baseline><suffix>); MMAU "
                      "and MMAR in their own submission format.")] = None,
) -> None:
    """Evaluate and print per-task scores with 95% intervals, chance levels, tokens and latency, system by
    system, with paired tests of CoAT against each baseline; write the per-example predictions.

    Exits 2 on a bad option, 1 when the checkpoint or the data cannot be read.
    """
    import sys

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes: room for the systems side by side
    baselines = list(dict.fromkeys(baseline or []))
    if suite not in SUITES:
        raise typer.BadParameter(f"{suite!r} is not one of {', '.join(SUITES)}", param_hint="--suite")
    if bad := [b for b in baselines if b not in BASELINES]:
        raise typer.BadParameter(f"{bad[0]!r} is not one of {', '.join(BASELINES)}", param_hint="--baseline")
    if scoring not in ("generate", "loglik"):
        raise typer.BadParameter(f"{scoring!r} is not generate or loglik", param_hint="--scoring")
    if suite != "coat-mini" and data is None:
        raise typer.BadParameter(f"--suite {suite} needs --data: the local copy of the benchmark", param_hint="--data")

    # Imported here so that `coat --help` does not pay for torch.
    import pandas as pd
    import torch

    from coat.config import ConfigError, from_yaml
    from coat.data.manifest import ManifestError, read_manifest
    from coat.eval.benchmarks import load_suite
    from coat.eval.runner import base_model, evaluate, print_reports
    from coat.eval.scoring import paired_comparison, write_predictions
    from coat.model.coat_model import CONFIG_FILE, CoATModel, not_a_checkpoint

    def fail(err: Exception) -> typer.Exit:
        console.print(f"[red]error:[/] {err}")
        return typer.Exit(1)

    quirks: dict[str, int] = {}
    try:
        if not (checkpoint / CONFIG_FILE).is_file():
            raise FileNotFoundError(not_a_checkpoint(checkpoint, CONFIG_FILE))
        cfg = from_yaml((checkpoint / CONFIG_FILE).read_text())
        if suite == "coat-mini":
            rows = read_manifest(data or cfg.data.manifest)
            rows = rows[rows["split"] == split]
        else:
            rows, quirks = load_suite(suite, data, split)
    except (FileNotFoundError, ValueError, ManifestError, ConfigError) as err:
        raise fail(err) from err
    if rows.empty:
        raise fail(ValueError(f"no rows in split {split!r} of {data or cfg.data.manifest}"))

    eval_cfg = cfg.eval
    eval_cfg.max_examples, eval_cfg.seed, eval_cfg.scoring = max_examples, seed, scoring
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = {"suite": suite, "max_new_tokens": max_new_tokens, "cot_tokens": cot_tokens,
              "max_seconds": cfg.data.max_seconds, "crop": cfg.data.long_clips == "crop"}
    with console.status(f"loading {checkpoint}"):
        model = CoATModel.load(checkpoint, device=device)
    reports = [evaluate(model, rows, eval_cfg, system="coat", **common)]
    del model
    if baselines:
        with console.status(f"loading the base backbone of {checkpoint}"):
            base = base_model(checkpoint, device)
        reports += [evaluate(base, rows, eval_cfg, system=system, **common) for system in baselines]
    paired = [paired_comparison(reports[0].examples, r.examples, n=eval_cfg.bootstrap, seed=seed)
              .assign(system_a="coat", system_b=r.system) for r in reports[1:]]
    print_reports(reports, title=f"{suite} {split}: {checkpoint}", console=console,
                  paired=pd.concat(paired, ignore_index=True) if paired else None)
    if quirks:
        console.print("benchmark quirks handled: " + ", ".join(f"{k} {v}" for k, v in quirks.items() if v))
    for report in reports:
        path = predictions_path(out, checkpoint, suite, split, report.system)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_predictions(report.examples, suite, path)
        console.print(f"{report.system} predictions: {path}")


eval_command.__doc__ = inspect.cleandoc(eval_command.__doc__) + "\n\n" + _recipes()
