"""Which code made a number: the checkout's commit, a hash of coat's own source, and the versions of the packages
the numbers depend on (the model stack, the scorers and the experts). Light enough for `coat score` to record
without loading a model, Ray or MLflow."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The model stack, then what scores (WER, its normaliser, F1 and probes, intervals and tests), then the experts.
PACKAGES = ("torch", "torchaudio", "transformers", "peft", "ray", "mlflow", "optuna", "numpy", "pandas",
            "jiwer", "whisper-normalizer", "scikit-learn", "scipy", "statsmodels",
            "opensmile", "torchcrepe", "pocketsphinx", "resemblyzer", "silero-vad")


@functools.cache
def provenance() -> dict[str, str]:
    """`git_commit` of the checkout this package lives in and `git_dirty` (whether its tracked files had changes;
    `unknown` outside a checkout), `code_sha256` (a hash of the package's source files, which names the code even
    when installed from a wheel) and `version.<package>` of each of `PACKAGES` (`absent` when not installed).
    Raises nothing."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(str(source.relative_to(package)).encode() + source.read_bytes())
    tags = {"git_commit": _git(package, "rev-parse", "HEAD"), "code_sha256": digest.hexdigest()[:16]}
    status = _git(package, "status", "--porcelain", "--untracked-files=no")
    tags["git_dirty"] = "unknown" if tags["git_commit"] == "unknown" else str(status not in ("", "unknown")).lower()
    for name in PACKAGES:
        try:
            tags[f"version.{name}"] = version(name)
        except PackageNotFoundError:
            tags[f"version.{name}"] = "absent"
    return tags


def _git(where: Path, *args: str) -> str:
    """`git args` run in `where`, stripped; "unknown" when git or the checkout is not there."""
    try:
        out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if args[0] == "status" else out.stdout.strip() or "unknown"
