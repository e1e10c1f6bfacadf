"""The `coat` command: one plain line per user mistake with the right exit code, and a start that loads nothing
heavy."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coat.cli import main
from coat.config import ConfigError
from tests.conftest import free_port

COAT = str(Path(sys.executable).parent / "coat")


def run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(argv)
    captured = capsys.readouterr()
    return done.value.code, captured.out + captured.err


def mistakes(tmp: Path) -> list[tuple[str, list[str], int, str]]:
    (tmp / "broken.yaml").write_text("thinking: [1, 2\n")
    (tmp / "space.yaml").write_text("thinking.num_slots: {gird: [0, 4]}\n")
    local = [f"tracking.uri=sqlite:///{tmp / 'mlruns.db'}", f"train.storage={tmp / 'runs'}"]
    return [
        ("missing config", ["train", "--config", "nope.yaml"], 2, "file 'nope.yaml' does not exist"),
        ("malformed config", ["train", "--config", str(tmp / "broken.yaml")], 2,
         f"config file {tmp / 'broken.yaml'} is not valid YAML"),
        ("unknown field", ["train", "thinking.num_slot=8"], 2, "'thinking.num_slot'"),
        ("out of range", ["train", "thinking.num_slots=99"], 2, "'thinking.num_slots': 99 must be between 0 and"),
        ("bad override", ["train", "thinking.num_slots"], 2, "is not of the form dotted.key=value"),
        ("bad list index", ["train", "train.stages.5.steps=3"], 2, "train.stages has 2 entries"),
        ("bad space file", ["sweep", "--space", str(tmp / "space.yaml")], 2, "needs exactly one of grid"),
        ("missing data", ["train", f"data.manifest={tmp}/none/manifest.json", "data.synth_size=0", *local], 1,
         f"data.manifest={tmp}/none/manifest.json does not exist; point it at a manifest"),
        ("missing checkpoint", ["eval", "--checkpoint", str(tmp / "nothing")], 1,
         "is not a CoAT checkpoint (no coat.yaml): give a checkpoint folder"),
        ("unreachable MLflow", ["train", f"tracking.uri=http://127.0.0.1:{free_port()}"], 1,
         "is not reachable"),
    ]


def test_each_kind_of_mistake_prints_one_plain_message_and_its_exit_code(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for kind, argv, code, message in mistakes(tmp_path):
        got, output = run(argv, capsys)
        assert (got, message in output) == (code, True), (kind, output)
        assert "Traceback" not in output, kind
        if code == 1:  # ours: one line (MLflow may log its own start-up before it)
            assert [line for line in output.splitlines() if line.startswith("error: ")] == [
                output.strip().splitlines()[-1]], (kind, output)


def test_debug_lets_the_error_through_with_its_traceback(monkeypatch, capsys):
    with pytest.raises(ConfigError, match="thinking.num_slots"):
        main(["--debug", "train", "thinking.num_slots=99"])
    monkeypatch.setenv("COAT_DEBUG", "1")
    with pytest.raises(ConfigError, match="thinking.num_slots"):
        main(["train", "thinking.num_slots=99"])


def test_the_command_starts_without_loading_torch_ray_mlflow_or_transformers(tmp_path):
    heavy = ("torch", "ray", "mlflow", "transformers", "pandas")
    code = f"import sys, coat.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]"
    env = {k: v for k, v in os.environ.items() if k != "COAT_DEBUG"}
    helped = subprocess.run([COAT, "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert helped.returncode == 0 and "--debug" in helped.stdout and "sweep" in helped.stdout
    refused = subprocess.run([COAT, "train", "thinking.num_slots=99"], capture_output=True, text=True, timeout=60,
                             env=env, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == ("error: config field 'thinking.num_slots': 99 must be between 0 and "
                              "thinking.max_slots=64\n")
