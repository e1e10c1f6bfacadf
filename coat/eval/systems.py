"""A checkpoint and its baselines evaluated side by side on the same rows, each system's predictions written in
its suite's format: what `coat eval` runs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from coat.config import CoATConfig, EvalConfig, from_yaml
from coat.data.corpora import load_suite
from coat.data.manifest import read_manifest
from coat.eval.evaluate import EvalReport, base_model, evaluate
from coat.eval.scoring import paired_comparison, results_table, write_predictions
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


def source_parts(rows: pd.DataFrame, suites: Iterable[str]) -> list[tuple[str | None, str, pd.DataFrame]]:
    """A manifest split's rows by the evaluation suite that scores them: per mixture entry (column `mixture`) and the
    suite its import names (column `source`: mmau, meld, ... where it is one of `suites`; coat-mini's recipe
    otherwise), as (source, suite, rows). One part with source None when there is one of each. Raises nothing."""
    suite = rows["source"].map(lambda s: s if s in suites else "coat-mini") if "source" in rows else "coat-mini"
    keyed = rows.assign(_suite=suite, _entry=rows["mixture"] if "mixture" in rows else "")
    groups = list(keyed.groupby(["_entry", "_suite"], sort=True))
    if len(groups) == 1:
        [((_, only), part)] = groups
        return [(None, only, part.drop(columns=["_suite", "_entry"]))]
    return [(entry if entry else only, only, part.drop(columns=["_suite", "_entry"]))
            for (entry, only), part in groups]


def evaluate_systems(checkpoint: Path, parts: list[tuple[str | None, str, pd.DataFrame]], cfg: EvalConfig,
                     baselines: list[str], device: str, **common) -> list[EvalReport]:
    """The trained model first, then each of `baselines` (base, cot) built from the checkpoint's backbone, on the
    same rows: each part (`source_parts`) by its suite's recipe, the parts of a system then joined into one report
    (`join_sources`). `common` goes to every `evaluate` call. One model is held at a time."""
    def run(model, system: str) -> EvalReport:
        return join_sources([replace(evaluate(model, rows, cfg, suite=suite, system=system, **common), source=source)
                             for source, suite, rows in parts], cfg)

    model = CoATModel.load(checkpoint, device=device)
    reports = [run(model, "coat")]
    del model
    if baselines:
        base = base_model(checkpoint, device)
        reports += [run(base, system) for system in baselines]
    return reports


def join_sources(reports: list[EvalReport], cfg: EvalConfig) -> EvalReport:
    """One system's reports on several sources as one: each source's rows of the table under `<source>/<task>`, each
    scored by its own suite's recipe, and pooled rows per task family of the metrics of one kind every source has
    (accuracy, or WER for transcription) over all sources' examples; the examples with their `source`, latency over
    every source's measured examples (`pooled_latency`). A single report (source None) is returned as it is."""
    if len(reports) == 1 and reports[0].source is None:
        return reports[0]
    examples = pd.concat([r.examples.assign(source=r.source) for r in reports], ignore_index=True)
    pooled = results_table(examples, metrics=["accuracy"], breakdowns=[], scoring=cfg.scoring, n=cfg.bootstrap,
                           seed=cfg.seed)
    table = pd.concat([pooled, *[r.table.assign(task=r.source + "/" + r.table["task"]) for r in reports]],
                      ignore_index=True)
    measured = [r for r in reports if r.latency]
    latency = pooled_latency(measured, examples) if measured else {}
    first = reports[0]
    setting = first.setting | {"suite": "+".join(f"{r.source}:{r.suite}" for r in reports),
                               "examples": len(examples), "eligible": sum(r.setting["eligible"] for r in reports),
                               "cut": sum(r.setting.get("cut", 0) for r in reports),
                               "subsample": "; ".join(f"{r.source}: {r.setting['subsample']}" for r in reports)}
    quarantine = pd.concat([r.quarantine for r in reports], ignore_index=True)
    return EvalReport(first.system, setting["suite"], examples, table, latency, setting, quarantine)


def pooled_latency(measured: list[EvalReport], examples: pd.DataFrame) -> dict[str, float]:
    """The latency of several sources' measurements as one: means weighted by the examples each measured, those
    examples counted, 90th percentiles over every measured example (`examples`' `ttft_s` and `latency_s`), and
    seconds per decode step over every decode step (each source's steps recovered from its decode time and rate)."""
    counts = np.array([r.latency["examples"] for r in measured])

    def mean(key: str) -> float:
        return float(np.dot(counts, [r.latency[key] for r in measured]) / counts.sum())

    decoding = counts * np.array([r.latency["total_s"] - r.latency["ttft_s"] for r in measured])
    rates = np.array([r.latency["s_per_decode_step"] for r in measured])
    steps = np.divide(decoding, rates, out=np.zeros_like(decoding), where=np.isfinite(rates) & (rates > 0))
    timed = examples.dropna(subset=["ttft_s"])
    return {"ttft_s": mean("ttft_s"), "ttft_p90_s": float(np.quantile(timed["ttft_s"], 0.9)),
            "total_s": mean("total_s"), "total_p90_s": float(np.quantile(timed["latency_s"], 0.9)),
            "new_tokens": mean("new_tokens"), "examples": float(counts.sum()),
            "s_per_decode_step": float(decoding.sum() / steps.sum()) if steps.sum() else float("nan")}


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
