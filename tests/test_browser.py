"""The dashboard reads without clicking through: real sweeps, the real `coat analyze`, a real MLflow 3.17 server
over their store, and headless Chromium driven the way a user would - open the link coat prints, expand the
sweep's row, open its parent run and find the analysis figures and the executed notebook among its artifacts.

`make test-browser` installs what this needs (Debian's chromium, playwright) and runs it; plain `pytest` leaves
it out (marker `browser`). Screenshots go to $COAT_SCREENSHOTS if set, else the test's tmp_path."""

import os
import re
import struct
from pathlib import Path

import pytest
import typer
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from coat import tracking
from coat.cli import analyze_command
from coat.tune.sweep import trial_label
from tests.conftest import mlflow_server

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # skipped below, after marker deselection (a module-level skip would show in plain `pytest`)
    expect = sync_playwright = None

CHROMIUM = "/usr/bin/chromium"  # Debian's: Playwright drives it, no browser download
TIMEOUT_MS = 60_000  # every wait; the test machine may have two slow cores
FIGURES = "analysis/thinking_length"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(sync_playwright is None or not Path(CHROMIUM).exists(),
                       reason=f"needs playwright and {CHROMIUM}: run `make test-browser`"),
]


@pytest.fixture(scope="module")
def analysed_grid(sweeps, tmp_path_factory) -> dict:
    """`coat analyze --notebooks thinking_length` on the grid sweep: its figures go onto the sweep's parent run.
    Returns the parent's id, name and experiment, its children's display names and the PNG figures (artifact
    path -> local file)."""
    uri, grid = sweeps["uri"], sweeps["grid"]
    out = tmp_path_factory.mktemp("browser-analysis")
    app = typer.Typer()
    app.command()(analyze_command)
    result = CliRunner().invoke(app, ["--notebooks", "thinking_length", "--sweep", grid.name, "--tracking-uri", uri,
                                      "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    parent = client.get_run(grid.parent_run_id)
    pngs = {a.path: out / "thinking_length" / Path(a.path).name for a in client.list_artifacts(parent.info.run_id,
                                                                                                 FIGURES)
            if a.path.endswith(".png")}
    assert pngs, f"coat analyze attached no PNG under {FIGURES} to the parent run {parent.info.run_id}"
    children = sorted(client.get_run(r).info.run_name for r in tracking.child_run_ids(uri, parent.info.run_id))
    # The grid of tests/conftest.py's `sweeps` (no sweep.seeds, so no seed in the labels), named as sweep.py does.
    expected = sorted(trial_label({"thinking.num_slots": k, "experts.names": names})
                      for k in (0, 4) for names in (["mel"], ["mel", "prosody"]))
    assert children == expected
    return {"run_id": parent.info.run_id, "name": parent.info.run_name, "experiment_id": parent.info.experiment_id,
            "children": children, "pngs": pngs}


@pytest.fixture(scope="module")
def dashboard(sweeps, tmp_path_factory):
    """A real MLflow server over the sweeps' SQLite store; it reads the runs' local artifact folders itself."""
    with mlflow_server(sweeps["uri"], tmp_path_factory.mktemp("dashboard")) as uri:
        yield uri


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("COAT_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def png_width(path: Path) -> int:
    """The width in a PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">I", header[16:20])[0]


def test_the_sweep_link_shows_the_runs_nested_and_the_parent_run_shows_its_analysis_figures(
        analysed_grid, dashboard, sweeps, screenshots, capsys):
    run = analysed_grid
    link = tracking.dashboard_link(dashboard, run["experiment_id"])
    # The link coat printed for the sweep opens the same view (its base is `make dashboard`'s address).
    assert link.split("#", 1)[1] == sweeps["grid"].link.split("#", 1)[1]
    assert link.endswith(f"#/experiments/{run['experiment_id']}/runs?workflowType=machine_learning")
    shots = {"runs": screenshots / "dashboard-runs.png", "artifacts": screenshots / "dashboard-artifacts.png",
             "notebook": screenshots / "dashboard-notebook.png"}
    with sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses to run as root
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            read_the_dashboard(page, link, run, shots)
        except Exception:
            page.screenshot(path=screenshots / "dashboard-failure.png", full_page=True)
            with capsys.disabled():
                print(f"\nfailure screenshot: {screenshots / 'dashboard-failure.png'} (page {page.url})")
            raise
        finally:
            browser.close()
    for shot in shots.values():
        assert shot.stat().st_size > 0, shot
    with capsys.disabled():
        print("\n" + "\n".join(f"dashboard screenshot ({what}): {path}" for what, path in shots.items()))


def read_the_dashboard(page, link: str, run: dict, shots: dict[str, Path]) -> None:
    # The runs table ("Model training" view): the sweep's parent run is a row; its trials nest under it, hidden
    # until the row's expand button is clicked.
    page.goto(link)
    parent_link = page.get_by_role("link", name=run["name"], exact=True)
    expect(parent_link).to_be_visible(timeout=TIMEOUT_MS)
    children = [page.get_by_role("link", name=name, exact=True) for name in run["children"]]
    expect(children[0]).to_have_count(0)
    parent_row = page.get_by_role("row").filter(has=parent_link)
    expect(parent_row).to_have_count(1, timeout=TIMEOUT_MS)
    parent_row.get_by_role("button").click()  # the row's only button: expand its child runs
    for child in children:
        expect(child).to_be_visible(timeout=TIMEOUT_MS)
    page.screenshot(path=shots["runs"], full_page=True)

    # The parent run's page, by clicking its name, then its artifacts: analysis/thinking_length's figures.
    parent_link.click()
    page.wait_for_url(re.compile(rf".*#/experiments/{run['experiment_id']}/runs/{run['run_id']}(\?.*)?$"),
                      timeout=TIMEOUT_MS)
    page.get_by_role("tab", name="Artifacts").click()
    tree = page.get_by_test_id("artifact-tree-node")
    for folder in FIGURES.split("/"):
        tree.get_by_text(folder, exact=True).click()
    for path in run["pngs"]:
        expect(tree.get_by_text(Path(path).name, exact=True)).to_be_visible(timeout=TIMEOUT_MS)
    shown, local = next(iter(sorted(run["pngs"].items())))
    tree.get_by_text(Path(shown).name, exact=True).click()
    image = page.get_by_role("img", name=shown, exact=True)  # the preview's alt text is the artifact path
    expect(image).to_be_visible(timeout=TIMEOUT_MS)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                           timeout=TIMEOUT_MS)
    assert image.evaluate("img => img.naturalWidth") == png_width(local), "the preview is not the logged figure"
    page.screenshot(path=shots["artifacts"], full_page=True)

    # The executed notebook as HTML, shown inline: its title and a conclusion it printed, inside MLflow's iframe.
    tree.get_by_text("thinking_length.html", exact=True).click()
    notebook = page.frame_locator("iframe.mlflow-html-iframe")
    expect(notebook.get_by_role("heading", name=re.compile("How much thinking"))).to_be_visible(timeout=TIMEOUT_MS)
    printed = notebook.locator(".jp-OutputArea-output pre", has_text="beats K=0").first  # the conclusions
    expect(printed).to_be_visible(timeout=TIMEOUT_MS)
    page.screenshot(path=shots["notebook"], full_page=True)
