"""`coat analyze`: execute the analysis notebooks against the tracking store and attach what they found.

    coat analyze                                        # every notebook, experiment "coat", newest sweeps
    coat analyze --notebooks thinking_length --sweep ablate_thinking_len --out analysis-out

Each notebook's executed `.ipynb`, figures (PNG) and tables (CSV, Parquet) land in `<out>/<notebook>/` and on
the parent run of the sweep it analysed (artifacts `analysis/<notebook>/`), whose description gains the
notebook's conclusions, so the dashboard shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coat.analysis.notebooks import NOTEBOOKS

ANALYSIS_HEADING = "## Analysis"


def analyze(uri: str, experiment: str, sweep: str | None, names: list[str], out: Path, folder: Path
            ) -> dict[str, dict]:
    """Execute `names` and attach their outputs to the sweeps they analysed. Returns each notebook's summary
    (with `error` instead when a cell failed: the others still run)."""
    from nbclient.exceptions import CellExecutionError

    from coat import tracking
    from coat.analysis.notebooks import execute

    summaries: dict[str, dict] = {}
    for name in names:
        try:
            summaries[name] = execute(name, {"tracking_uri": uri, "experiment": experiment, "sweep": sweep},
                                      out / name, folder)
        except CellExecutionError as err:
            summaries[name] = {"error": str(err).strip().splitlines()[-1]}
    by_parent: dict[str, list[str]] = {}
    for name, summary in summaries.items():
        parent = summary.get("parent_run_id")
        if parent:
            tracking.log_artifacts(uri, parent, out / name, f"analysis/{name}")
            by_parent.setdefault(parent, []).append(f"**{name}**\n" + "\n".join(f"- {s}" for s in
                                                                              summary["conclusions"]))
    client = tracking.mlflow_client(uri)
    for parent, sections in by_parent.items():
        described = client.get_run(parent).data.tags.get("mlflow.note.content", "")
        kept = described.split(ANALYSIS_HEADING)[0].rstrip()
        tracking.set_description(uri, parent, f"{kept}\n\n{ANALYSIS_HEADING}\n\n" + "\n\n".join(sections))
    return summaries


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
    """Execute the analysis notebooks headless, write their outputs, attach them to the sweeps' parent runs and
    print each notebook's conclusions. Exits 1 when a notebook fails (the others still run), 2 on a bad option."""
    from rich.console import Console

    from coat import tracking
    from coat.analysis.notebooks import notebook_folder

    console = Console()
    names = [n.strip() for n in (notebooks or ",".join(NOTEBOOKS)).split(",") if n.strip()]
    if bad := [n for n in names if n not in NOTEBOOKS]:
        raise typer.BadParameter(f"{bad[0]!r} is not one of {', '.join(NOTEBOOKS)}", param_hint="--notebooks")
    try:
        folder = notebook_folder(notebook_dir)
    except FileNotFoundError as err:
        raise typer.BadParameter(str(err), param_hint="--notebook-dir") from None
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)
    summaries = analyze(uri, experiment, sweep, names, out, folder)
    for name, summary in summaries.items():
        if "error" in summary:
            console.print(f"[red]{name} failed:[/] {summary['error']} (see {out / name / f'{name}.ipynb'})")
            continue
        console.print(f"[bold]{name}[/]: {out / name / f'{name}.ipynb'}; figures: "
                      + ", ".join(str(out / name / f) for f in summary["figures"]))
        for sentence in summary["conclusions"]:
            console.print(f"  {sentence}", markup=False, highlight=False)
    if any("error" in s for s in summaries.values()):
        raise typer.Exit(1)
