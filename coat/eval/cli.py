"""`coat eval`: score a checkpoint (or a baseline built from it) on coat-mini or a local benchmark copy.

    coat eval --checkpoint runs/k16/final --suite coat-mini
    coat eval --checkpoint runs/k16/final --suite mmau --data /data/MMAU --baseline base
    coat eval --checkpoint runs/k16/final --suite coat-mini --baseline cot --cot-tokens 64
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SUITES = ("coat-mini", "mmau", "mmar", "meld", "librispeech", "gtzan")
BASELINES = ("base", "cot")


def eval_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint folder written by CoATModel.save.")],
    suite: Annotated[str, typer.Option("--suite", help=f"One of {', '.join(SUITES)}.")] = "coat-mini",
    data: Annotated[Path | None, typer.Option(
        "--data", help="Local benchmark copy (needed for all but coat-mini; for coat-mini: a manifest, default "
                       "the checkpoint config's data.manifest).")] = None,
    baseline: Annotated[str | None, typer.Option(
        "--baseline", help="base: the backbone without fine-tune; cot: text chain-of-thought prompt.")] = None,
    split: Annotated[str, typer.Option("--split", help="Manifest split to evaluate.")] = "test",
    max_examples: Annotated[int | None, typer.Option("--max-examples", min=1, help="Evaluate the first N.")] = None,
    cot_tokens: Annotated[int, typer.Option(
        "--cot-tokens", min=1, help="cot: extra new tokens allowed for the reasoning.")] = 64,
) -> None:
    """Evaluate and print per-task scores with 95% intervals, chance levels and latency.

    Exits 2 on a bad option, 1 when the checkpoint or the data cannot be read.
    """
    # Imported here so that `coat --help` does not pay for torch.
    import torch
    from rich.console import Console

    from coat.config import ConfigError, from_yaml
    from coat.data.manifest import ManifestError, read_manifest
    from coat.eval.benchmarks import LOADERS
    from coat.eval.runner import COT_SUFFIX, base_model, evaluate, print_report
    from coat.model.coat_model import CONFIG_FILE, CoATModel

    console = Console()
    if suite not in SUITES:
        raise typer.BadParameter(f"{suite!r} is not one of {', '.join(SUITES)}", param_hint="--suite")
    if baseline is not None and baseline not in BASELINES:
        raise typer.BadParameter(f"{baseline!r} is not one of {', '.join(BASELINES)}", param_hint="--baseline")
    if suite != "coat-mini" and data is None:
        raise typer.BadParameter(f"--suite {suite} needs --data: the local copy of the benchmark", param_hint="--data")

    def fail(err: Exception) -> typer.Exit:
        console.print(f"[red]error:[/] {err}")
        return typer.Exit(1)

    try:
        if not (checkpoint / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{checkpoint} is not a CoAT checkpoint (no {CONFIG_FILE})")
        cfg = from_yaml((checkpoint / CONFIG_FILE).read_text())
        if suite == "coat-mini":
            rows = read_manifest(data or cfg.data.manifest)
            rows = rows[rows["split"] == split]
        else:
            rows = LOADERS[suite](data, split)
    except (FileNotFoundError, ValueError, ManifestError, ConfigError) as err:
        raise fail(err) from err
    if rows.empty:
        raise fail(ValueError(f"no rows in split {split!r} of {data or cfg.data.manifest}"))

    eval_cfg = cfg.eval
    if max_examples is not None:
        eval_cfg.max_examples = max_examples
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with console.status(f"loading {'the base backbone of ' if baseline == 'base' else ''}{checkpoint}"):
        model = base_model(checkpoint, device) if baseline == "base" else CoATModel.load(checkpoint).to(device)
    cot = baseline == "cot"
    report = evaluate(model, rows, eval_cfg, prompt_suffix=COT_SUFFIX if cot else "",
                      max_new_tokens=eval_cfg.max_new_tokens + cot_tokens if cot else None)
    label = f"{suite} {split}: {checkpoint}" + (f" (baseline: {baseline})" if baseline else "")
    print_report(report, title=label, console=console)
