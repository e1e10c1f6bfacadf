"""A non-editable install works: the wheel built from the tree carries everything the package reads, and an
experiment script copied alone (as `ray submit` copies it to the head node) finds its configs through
$COAT_PROJECT, as the cluster configs set it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coat.analysis.notebooks import notebook_folder

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """The package installed from a wheel of the tree into a folder of its own (dependencies: this venv's)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "coat", src / "coat", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", "./src"], cwd=tmp,
                   check=True, timeout=120)
    (wheel,) = (tmp / "dist").glob("coat-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp / "site", wheel], check=True, timeout=120)
    return tmp / "site"


def python(code_or_script: list[str], cwd: Path, site: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("COAT_PROJECT", "COAT_STORAGE", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, *code_or_script], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=environ | {"PYTHONPATH": str(site), **env})


def test_the_installed_wheel_is_what_runs_and_needs_no_checkout(wheel_site, tmp_path):
    done = python(["-c", "import coat.cli, coat.config_help, coat.backbones.tokenizer as t; print(coat.cli.__file__); "
                         "print(coat.config_help.reference() == open(r'%s').read()); "
                         "print(len(t.tiny_corpus()))" % (ROOT / "docs/config.md")],
                  tmp_path, wheel_site)
    assert done.returncode == 0, done.stderr
    location, same, corpus_lines = done.stdout.split()
    assert Path(location).is_relative_to(wheel_site) and same == "True"
    assert int(corpus_lines) == len((ROOT / "coat/backbones/tiny_corpus.txt").read_text().splitlines()) > 0


def test_a_script_copied_alone_finds_its_configs_through_coat_project(wheel_site, tmp_path):
    head_home = tmp_path / "home"
    head_home.mkdir()
    script = shutil.copy(ROOT / "experiments" / "ablate_thinking_len.py", head_home)
    lost = python([script, "--dry-run"], head_home, wheel_site)
    assert lost.returncode == 1 and lost.stderr.startswith("error: no experiment runner beside")
    assert "set COAT_PROJECT to the project folder" in lost.stderr and "Traceback" not in lost.stderr
    found = python([script, "--dry-run", "--", "thinking.max_slots=64"], head_home, wheel_site,
                   COAT_PROJECT=str(ROOT))
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines()[:3] == [  # then the bill (tests/test_cost.py)
        f"config: {ROOT / 'experiments/configs/ablate_thinking_len.yaml'}",
        f"space: {ROOT / 'experiments/configs/spaces/ablate_thinking_len.yaml'}", "trials: 6 (grid)"]


def test_a_script_in_a_checkout_finds_the_configs_beside_it(tmp_path):
    done = subprocess.run([sys.executable, ROOT / "experiments" / "compare_backbones.py", "--dry-run", "--smoke"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "COAT_PROJECT"})
    assert done.returncode == 0, done.stderr
    assert f"space: {ROOT / 'experiments/configs/spaces/compare_backbones.smoke.yaml'}" in done.stdout


def test_notebooks_are_found_through_coat_project_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COAT_PROJECT", raising=False)
    with pytest.raises(FileNotFoundError, match="--notebook-dir"):
        notebook_folder()
    monkeypatch.setenv("COAT_PROJECT", str(ROOT))
    assert notebook_folder() == ROOT / "analysis"
