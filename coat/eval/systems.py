"""A checkpoint and its baselines evaluated side by side on the same rows, each system's predictions written in
its suite's format: what `coat eval` runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from coat.config import CoATConfig, EvalConfig, from_yaml
from coat.data.manifest import read_manifest
from coat.eval.benchmarks import load_suite
from coat.eval.runner import EvalReport, base_model, evaluate
from coat.eval.scoring import paired_comparison, write_predictions
from coat.model.coat_model import CONFIG_FILE, CoATModel, not_a_checkpoint


def suite_rows(checkpoint: Path, suite: str, data: Path | None, split: str
               ) -> tuple[CoATConfig, pd.DataFrame, dict[str, int]]:
    """The checkpoint's config, the rows of `split` to evaluate, and the benchmark quirks their loader handled.
    coat-mini reads the manifest `data` (default: the config's data.manifest); a benchmark reads its local copy.

    Raises:
        FileNotFoundError: `checkpoint` holds no config, or the data is not there.
        ConfigError, ManifestError, ValueError: the config or the data cannot be read, or the split is empty.
    """
    if not (checkpoint / CONFIG_FILE).is_file():
        raise FileNotFoundError(not_a_checkpoint(checkpoint, CONFIG_FILE))
    cfg = from_yaml((checkpoint / CONFIG_FILE).read_text())
    quirks: dict[str, int] = {}
    if suite == "coat-mini":
        rows = read_manifest(data or cfg.data.manifest)
        rows = rows[rows["split"] == split]
    else:
        rows, quirks = load_suite(suite, data, split)
    if rows.empty:
        raise ValueError(f"no rows in split {split!r} of {data or cfg.data.manifest}")
    return cfg, rows, quirks


def evaluate_systems(checkpoint: Path, rows: pd.DataFrame, cfg: EvalConfig, baselines: list[str], device: str,
                     **common) -> list[EvalReport]:
    """The trained model first, then each of `baselines` (base, cot) built from the checkpoint's backbone, on the
    same rows; `common` goes to every `evaluate` call. One model is held at a time."""
    model = CoATModel.load(checkpoint, device=device)
    reports = [evaluate(model, rows, cfg, system="coat", **common)]
    del model
    if baselines:
        base = base_model(checkpoint, device)
        reports += [evaluate(base, rows, cfg, system=system, **common) for system in baselines]
    return reports


def paired_with_coat(reports: list[EvalReport], n: int, seed: int) -> pd.DataFrame | None:
    """Paired bootstrap differences of the trained model against each baseline, on the ids both answered; on
    circular accuracy too when the evaluation was circular."""
    circular = "correct_circular" in reports[0].examples
    paired = [paired_comparison(reports[0].examples, r.examples, n=n, seed=seed, correct=correct)
              .assign(system_a="coat", system_b=r.system)
              for r in reports[1:] for correct in ("correct", *(["correct_circular"] if circular else []))]
    return pd.concat(paired, ignore_index=True) if paired else None


def predictions_path(out: Path | None, checkpoint: Path, suite: str, split: str, system: str) -> Path:
    """`out` for CoAT and `<out stem>.<system><suffix>` for a baseline; by default
    `<checkpoint>/eval/<suite>-<split>-<system>.json[l]` (MMAU's official scorer reads a JSON list)."""
    if out is not None:
        return out if system == "coat" else out.with_name(f"{out.stem}.{system}{out.suffix}")
    return checkpoint / "eval" / f"{suite}-{split}-{system}{'.json' if suite == 'mmau' else '.jsonl'}"


def write_all_predictions(reports: list[EvalReport], out: Path | None, checkpoint: Path, split: str) -> list[Path]:
    """Each system's per-example predictions at its `predictions_path`, in its suite's format; returns the paths."""
    paths = []
    for report in reports:
        path = predictions_path(out, checkpoint, report.suite, split, report.system)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_predictions(report.examples, report.suite, path)
        paths.append(path)
    return paths
