"""What the `coat` commands and the experiment scripts print: every table is rendered here, from what the library
returned (evaluation reports, a sweep's results, a preflight report, a sweep's bill); the library prints nothing."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pandas as pd
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coat.data.manifest import reason_code
from coat.eval.scoring import metric_key
from coat.tune.cost import Bill, duration, hours

if TYPE_CHECKING:  # `coat score` prints from here and must load no model, Ray or MLflow: names for annotations only
    from coat.config import CoATConfig
    from coat.eval.evaluate import EvalReport
    from coat.preflight import Report
    from coat.tune.sweep import SweepResult


def print_eval_reports(reports: list[EvalReport], title: str = "evaluation", console: Console | None = None,
                       paired: pd.DataFrame | None = None) -> None:
    """Every system side by side: per task, value [95% CI]; then tokens, time to first token and latency (batch
    size 1); then paired comparisons and the quarantine. Raises nothing."""
    console = console or Console()
    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    for report in reports:
        table.add_column(report.system, justify="right")
    table.add_column("n", justify="right")
    table.add_column("chance", justify="right")
    keyed = [r.table.set_index(["task", "metric"]) if len(r.table) else None for r in reports]
    rows = list(dict.fromkeys(k for t in keyed if t is not None for k in t.index))
    for task, metric in rows:
        cells, counts, chances = [], [], []
        for t in keyed:
            if t is None or (task, metric) not in t.index:
                cells.append("-")
                continue
            row = t.loc[(task, metric)]
            cell = f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
            if pd.notna(row.get("chance_empirical")):  # each system's own scorer on silence
                cell += f" ({row['chance_empirical']:.3f} on silence)"
            cells.append(cell)
            counts.append(str(int(row["n"])))
            chances.append("" if pd.isna(row["chance"]) else f"{row['chance']:.3f}")
        scoring = reports[0].setting["scoring"]
        table.add_row(task, metric if scoring == "generate" or metric == "wer" else f"{metric} ({scoring})", *cells,
                      " / ".join(dict.fromkeys(counts)), " / ".join(dict.fromkeys(chances)))
    budgets = [r.metrics().get("eval/out_of_budget") for r in reports]
    table.add_row("out of budget", "share", *["-" if b is None else f"{b:.3f}" for b in budgets], "", "")
    for label, key, fmt in (("new tokens", "new_tokens", "{:.1f}"), ("time to first token (s)", "ttft_s", "{:.4f}"),
                            ("latency per answer (s)", "total_s", "{:.4f}")):
        table.add_row(label, "batch 1", *[fmt.format(r.latency[key]) if key in r.latency else "-" for r in reports],
                      "", "")
    console.print(table)
    first = reports[0].setting
    console.print(f"device {first['device']}, {first['dtype']}; quality in batches of {first['batch_size']}, "
                  f"latency one example at a time; examples: {first['subsample']}")
    if paired is not None and len(paired):
        comparison = Table(title="paired comparison (a - b)")
        for col in ("a", "b", "task", "metric", "a value", "b value", "diff [95% CI]", "p (bootstrap)", "p (McNemar)",
                    "pairs"):
            comparison.add_column(col, justify="left" if col in ("a", "b", "task", "metric") else "right")
        for row in paired.itertuples(index=False):
            comparison.add_row(row.system_a, row.system_b, row.task, row.metric, f"{row.a:.3f}", f"{row.b:.3f}",
                               f"{row.diff:+.3f} [{row.diff_ci_low:+.3f}, {row.diff_ci_high:+.3f}]",
                               f"{row.p_bootstrap:.3g}", "-" if pd.isna(row.p_mcnemar) else f"{row.p_mcnemar:.3g}",
                               str(int(row.n_pairs)))
        console.print(comparison)
    for report in reports:
        if len(report.quarantine):
            first_bad = report.quarantine.iloc[0]
            counts = report.quarantine["reason"].map(reason_code).value_counts()
            console.print(f"{report.system}: {len(report.quarantine)} rows quarantined (not evaluated: "
                          + ", ".join(f"{code} {n}" for code, n in counts.items())
                          + f"), first: {first_bad['id']}: {first_bad['reason']}")
    if first.get("cut"):
        suites = {part.rsplit(":", 1)[-1] for part in str(first["suite"]).split("+")}
        knobs = [knob for knob, governs in (("data.long_clips", "coat-mini" in suites),  # coat-mini follows data.*
                                            ("eval.long_clips", bool(suites - {"coat-mini"}))) if governs]
        console.print(f"{first['cut']} clips are longer than the {first['heard_s']:g} s the model hears of a clip: "
                      f"heard as their first part ({' or '.join(f'{k}=reject' for k in knobs)} leaves them out)")


def print_preflight_report(report: Report) -> None:
    """The checks as a table (details and fixes in full), then the measurements, one row per backbone."""
    from coat.preflight import HEADROOM, batch_summary  # preflight loads torch and Ray: not for `coat score`

    console = Console()
    checks = Table(title="coat preflight")
    checks.add_column("check", no_wrap=True)
    checks.add_column("status", no_wrap=True)
    checks.add_column("detail")
    marks = {"ok": "[green]ok[/]", "fail": "[red]FAIL[/]", "skip": "[dim]skip[/]"}
    for check in report.checks:
        text = check.detail + (f"\nfix: {check.fix}" if check.fix else "")
        checks.add_row(escape(check.name), marks[check.status], escape(text))
    console.print(checks)
    if report.measurements:  # a column per backbone: fits a terminal for all three
        on_cpu = any(m["memory"] is None for m in report.measurements)
        table = Table(title="the model check (step: median of the steps after the first)",
                      caption="on CPU there is no GPU card: no peak memory, no largest batch" if on_cpu else None)
        table.add_column("")
        for m in report.measurements:
            table.add_column(m["backbone"], justify="right")
        rows = {"size, device": lambda m: f"{m['size']}, {m['gpu'] or m['device']}",
                "batch x clip": lambda m: f"{m['batch_size']} x {m['clip_s']:g} s",
                "K": lambda m: str(m["num_slots"]), "step": lambda m: f"{m['step_s']:.3g} s",
                "step at each K": lambda m: ", ".join(f"K={t['num_slots']}: {t['step_s']:.3g} s"
                                                      for t in m["step_times"]),
                "tokens/s": lambda m: f"{m['tokens_per_s']:.0f}",
                "peak GPU memory": lambda m: "-" if m["peak_gpu_gb"] is None else f"{m['peak_gpu_gb']:.1f} GB",
                f"largest batch ({HEADROOM:.0%} of the card free)": lambda m: batch_summary(m["memory"]),
                "prefill, K vs K=0": lambda m: f"x{m['prefill_ratio']:.3f}"}
        for label, cell in rows.items():
            table.add_row(label, *(escape(cell(m)) for m in report.measurements))
        console.print(table)
    if report.stored:
        console.print(f"step times stored in {report.stored}: an experiment script's --dry-run bills its sweep with "
                      "them", markup=False, highlight=False)


def print_bill(bill: Bill, console: Console) -> None:
    """The trials, one row per setting, then the totals, then what the numbers assume."""
    trials = Table(title="what the sweep trains")
    for column in ("setting", "trials", "steps", "step", "step time from", "GPUs", "GPU-h/trial", "GPU-h"):
        trials.add_column(column, justify="left" if column in ("setting", "step time from") else "right")
    for r in bill.rows:
        cells = ("-", "-", "-") if r.trial_s is None else (f"{r.step.seconds:.3g} s", hours(r.gpu_hours),
                                                          hours(r.gpu_hours * r.trials))
        trials.add_row(escape(r.setting), str(r.trials), str(r.steps), cells[0], escape(r.step.source), str(r.gpus),
                       *cells[1:])
    console.print(trials)
    total = Table(title="the bill", show_header=False)
    total.add_column("")
    total.add_column("", justify="right")
    known = bill.known
    total.add_row("trials", str(bill.trials))
    total.add_row("GPU-hours, every trial to the end", hours(bill.gpu_hours) if known else "-")
    on = f"{bill.gpus} GPU(s) ({bill.gpus_from})" if any(r.gpus for r in bill.rows) else "the CPUs"
    total.add_row(f"wall time on {on}, {bill.concurrency} trial(s) at once", duration(bill.wall_s) if known else "-")
    if bill.asha is not None:
        total.add_row(f"GPU-hours with ASHA (estimate: {bill.asha.fraction:.0%} of the steps)",
                      hours(bill.asha_gpu_hours) if known else "-")
        total.add_row("wall time with ASHA (estimate)", f"~{duration(bill.asha_wall_s)}" if known else "-")
    console.print(total)
    for note in bill.notes:
        console.print(f"- {note}", markup=False, highlight=False)


def results_columns(table: pd.DataFrame) -> list[str]:
    """Per-task evaluation scores (with their intervals folded in), validation metric, prefill cost."""
    tasks = sorted({c.split("/")[1] for c in table if c.startswith("eval/") and c.count("/") == 2
                    and not c.endswith(("_ci_low", "_ci_high"))})
    return tasks


def print_sweep_results(result: SweepResult, cfg: CoATConfig, console: Console | None = None) -> None:
    """One row per trial, best first: the setting (`*` the best), status, steps, the sweep metric, each task's
    score with its interval, the prefill cost and time to first token; then the dashboard link."""
    from coat import tracking  # MLflow: not for `coat score`

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


def _number(value: float, digits: int = 3) -> str:
    return "" if pd.isna(value) else f"{value:.{digits}f}"


def _table(title: str, columns: tuple[str, ...]) -> Table:
    """Numbers never wrap; names and intervals fold, so a narrow terminal (80 columns in CI logs) loses nothing."""
    out = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in columns:
        text = col in ("task", "metric", "95% CI")
        out.add_column(col, justify="left" if col in ("task", "metric") else "right", overflow="fold",
                       no_wrap=not text, min_width=13 if col == "task" else None)
    return out


def rescored_table(table: pd.DataFrame, title: str) -> Table:
    """`coat score`'s scores: per task and metric, the value, its 95% interval, n and chance."""
    out = _table(title, ("task", "metric", "value", "95% CI", "n", "chance"))
    for row in table.itertuples(index=False):
        out.add_row(row.task, metric_key(row.metric, row.scoring), _number(row.value),
                    f"[{_number(row.ci_low)}, {_number(row.ci_high)}]", str(row.n), _number(row.chance))
    return out


def rescored_pairs_table(table: pd.DataFrame, title: str) -> Table:
    """`coat score --against`: per task, A, B, their difference with its interval, the tests' p-values and the
    items only one got right."""
    out = _table(title, ("task", "A", "B", "A - B", "95% CI", "p boot", "p McN", "only A/B"))
    for row in table.itertuples(index=False):
        only = "" if pd.isna(row.a_only_correct) else f"{row.a_only_correct:.0f}/{row.b_only_correct:.0f}"
        out.add_row(f"{row.task} {row.metric}, {row.n_pairs} pairs", _number(row.a), _number(row.b),
                    f"{row.diff:+.3f}", f"[{row.diff_ci_low:+.3f}, {row.diff_ci_high:+.3f}]",
                    _number(row.p_bootstrap), _number(row.p_mcnemar), only)
    return out
