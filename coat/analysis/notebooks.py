"""The notebooks in `analysis/`, executed headless against an MLflow store, their outputs attached to the sweep.

Each notebook is a jupytext percent-format `.py` file with a cell tagged `parameters` (`tracking_uri`,
`experiment`, `sweep`, `out_dir`); `execute` injects the values after it, as papermill does, runs it top to
bottom with nbclient in `out_dir`, and writes the executed `.ipynb` there. Inside, notebooks save through
`Outputs`: figures as PNG (refusing an empty one), tables as CSV and Parquet, and the conclusions they computed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

NOTEBOOKS = ("thinking_length", "loss_weights", "expert_sets", "backbones", "probes")
SUMMARY = "summary.json"
ANALYSIS_HEADING = "## Analysis"


class EmptyFigureError(ValueError):
    """A figure with nothing drawn on one of its axes."""


@dataclass
class Outputs:
    """What a notebook leaves in its folder: figures, tables, conclusions, and the sweep they are about."""

    folder: Path
    parent_run_id: str | None = None
    figures: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    conclusions: list[str] = field(default_factory=list)

    def figure(self, fig, name: str) -> Path:
        """Save `fig` as `<name>.png`. Raises EmptyFigureError when an axes holds no data (no lines, points,
        bars or images): a plot of nothing is a failure, not a result."""
        for ax in fig.axes:
            if not (ax.lines or ax.collections or ax.patches or ax.images or ax.containers):
                raise EmptyFigureError(f"figure {name!r}: axes {ax.get_title()!r} has nothing drawn on it")
        path = self.folder / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        self.figures.append(path.name)
        self._write()
        return path

    def table(self, df, name: str) -> Path:
        """Save `df` as `<name>.csv` and `<name>.parquet` (lists and dicts as text in the CSV)."""
        df.to_csv(self.folder / f"{name}.csv", index=False)
        df.astype({c: str for c in df.columns if df[c].dtype == object}).to_parquet(
            self.folder / f"{name}.parquet", index=False)
        self.tables.append(name)
        self._write()
        return self.folder / f"{name}.csv"

    def conclude(self, sentences: list[str], parent_run_id: str | None) -> None:
        """Record the notebook's conclusions (computed from the data) and the sweep parent run they are about."""
        self.conclusions, self.parent_run_id = list(sentences), parent_run_id
        self._write()
        print("\n".join(self.conclusions))

    def _write(self) -> None:
        summary = {"parent_run_id": self.parent_run_id, "figures": self.figures, "tables": self.tables,
                   "conclusions": self.conclusions}
        (self.folder / SUMMARY).write_text(json.dumps(summary, indent=2))


def outputs(out_dir: str | Path) -> Outputs:
    """The notebook's `Outputs`, in `out_dir` (created)."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return Outputs(folder)


def notebook_folder(explicit: str | Path | None = None) -> Path:
    """`explicit`, else `analysis/` in the working directory, else in $COAT_PROJECT (the cluster configs set it).

    Raises FileNotFoundError naming where it looked and the option to give."""
    project = [Path(os.environ["COAT_PROJECT"]) / "analysis"] if os.environ.get("COAT_PROJECT") else []
    candidates = [Path(explicit)] if explicit else [Path.cwd() / "analysis", *project]
    for folder in candidates:
        if (folder / f"{NOTEBOOKS[0]}.py").is_file():
            return folder
    raise FileNotFoundError(f"no analysis notebooks in {', '.join(map(str, candidates))}: run from the project's "
                            "checkout or give --notebook-dir DIR")


def execute(name: str, parameters: dict, out_dir: Path, folder: Path, timeout_s: int = 1200) -> dict:
    """Run notebook `name` from `folder` with `parameters` in `out_dir`; write `<name>.ipynb` there, and once it ran
    through `<name>.html` (the dashboard shows an HTML artifact inline), and return its summary (figures, tables,
    conclusions, parent run).

    Raises nbclient.exceptions.CellExecutionError on the first failing cell (the executed notebook up to it is
    still written), FileNotFoundError for an unknown notebook."""
    # `coat` imports this module for the notebooks' names: executing them (nbclient, nbconvert, MLflow) stays out of
    # every command's start-up.
    import jupytext
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    source, out_dir = folder / f"{name}.py", out_dir.resolve()  # the kernel runs in out_dir: no relative paths
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such notebook; notebooks: {', '.join(NOTEBOOKS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    notebook = jupytext.read(source)
    at = next((i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])), -1)
    injected = "\n".join(f"{key} = {value!r}" for key, value in {**parameters, "out_dir": str(out_dir)}.items())
    cell = nbformat.v4.new_code_cell(f"# Parameters\n{injected}", metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(at + 1, cell)
    client = NotebookClient(notebook, timeout=timeout_s, kernel_name="python3",
                            resources={"metadata": {"path": str(out_dir)}},
                            # The kernel listens on loopback only; its warning about TCP is not for a user.
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    try:
        client.execute()
    finally:
        nbformat.write(notebook, out_dir / f"{name}.ipynb")
    (out_dir / f"{name}.html").write_text(HTMLExporter().from_notebook_node(notebook)[0], encoding="utf-8")
    return json.loads((out_dir / SUMMARY).read_text()) if (out_dir / SUMMARY).is_file() else {}


def analyze(uri: str, experiment: str, sweep: str | None, names: list[str], out: Path, folder: Path
            ) -> dict[str, dict]:
    """Execute notebooks `names` from `folder` against the store at `uri`, each into `<out>/<name>/`, and attach
    their outputs to the parent run of the sweep each analysed (artifacts `analysis/<name>/`; the run's description
    gains their conclusions, replacing an earlier analysis). Returns each notebook's summary, with `error` instead
    when a cell failed, or `skipped` (what would produce its inputs) when the store holds nothing it analyses: the
    others still run."""
    # as in `execute`: kept out of every command's start-up
    from nbclient.exceptions import CellExecutionError

    from coat import tracking
    from coat.analysis.runs import NothingToAnalyse

    summaries: dict[str, dict] = {}
    for name in names:
        try:
            summaries[name] = execute(name, {"tracking_uri": uri, "experiment": experiment, "sweep": sweep},
                                      out / name, folder)
        except CellExecutionError as err:
            if err.ename == NothingToAnalyse.__name__:
                summaries[name] = {"skipped": err.evalue}
            else:
                summaries[name] = {"error": str(err).strip().splitlines()[-1]}
    by_parent: dict[str, list[str]] = {}
    for name, summary in summaries.items():
        parent = summary.get("parent_run_id")
        if parent:
            tracking.TrackedRun(uri, parent).log_artifacts(out / name, f"analysis/{name}")
            by_parent.setdefault(parent, []).append(f"**{name}**\n" + "\n".join(f"- {s}" for s in
                                                                              summary["conclusions"]))
    client = tracking.mlflow_client(uri)
    for parent, sections in by_parent.items():
        described = client.get_run(parent).data.tags.get("mlflow.note.content", "")
        kept = described.split(ANALYSIS_HEADING)[0].rstrip()
        tracking.TrackedRun(uri, parent).set_description(f"{kept}\n\n{ANALYSIS_HEADING}\n\n" + "\n\n".join(sections))
    return summaries
