"""The sweep's results as a terminal table: one row per setting, metrics per task family with intervals."""

from __future__ import annotations

import sys

import pandas as pd
from rich.console import Console
from rich.table import Table

from coat import tracking
from coat.config import CoATConfig


def results_columns(table: pd.DataFrame) -> list[str]:
    """Per-task evaluation scores (with their intervals folded in), validation metric, prefill cost."""
    tasks = sorted({c.split("/")[1] for c in table if c.startswith("eval/") and c.count("/") == 2
                    and not c.endswith(("_ci_low", "_ci_high"))})
    return tasks


def print_results(result, cfg: CoATConfig, console: Console | None = None) -> None:
    table = result.table
    out = Table(title=f"sweep {result.name}: {len(table)} trials (best by {cfg.sweep.metric})")
    for column in ("setting", "status", "steps", cfg.sweep.metric, *results_columns(table), "prefill +pos",
                   "ttft s"):
        out.add_column(column, justify="left" if column == "setting" else "right")
    best = result.best["trial"] if result.best else None
    ordered = table.sort_values(cfg.sweep.metric, ascending=cfg.sweep.mode == "min") \
        if cfg.sweep.metric in table else table
    for _, row in ordered.iterrows():
        cells = [row["setting"] + (" *" if row["trial"] == best else ""), row["status"], str(int(row["steps"])),
                 _num(row.get(cfg.sweep.metric))]
        for task in results_columns(table):
            cells.append(_scored(row, task))
        cells += [_num(row.get(tracking.PREFILL_COST), "{:.0f}"), _num(row.get("latency/ttft_s"))]
        out.add_row(*cells)
    # Logs and `ray submit` output are not terminals: give the table room instead of folding every cell.
    console = console or Console(width=None if sys.stdout.isatty() else 220)
    console.print(out)
    if result.link:
        served = " (after `make dashboard`)" if result.link.startswith(tracking.DASHBOARD) else ""
        console.print(f"MLflow: {result.link}{served}")


def _scored(row: pd.Series, task: str) -> str:
    for metric, label in (("accuracy", "acc"), ("loglik_accuracy", "ll-acc"), ("wer", "wer")):
        key = f"eval/{task}/{metric}"
        if key in row and pd.notna(row[key]):
            low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
            return f"{label} {row[key]:.2f} [{low:.2f}, {high:.2f}]"
    return "-"


def _num(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None or pd.isna(value) else fmt.format(value)
