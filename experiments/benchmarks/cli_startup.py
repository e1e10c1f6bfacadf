"""How long the `coat` command takes to answer `--help`, beside a bare Python start, in one run.

    python experiments/benchmarks/cli_startup.py                      # this checkout
    python experiments/benchmarks/cli_startup.py --tree /path/to/other/checkout --repeat 5

Each command runs `--repeat` times in a fresh interpreter with `--tree` first on the import path; the median
wall time is reported per command, with its ratio to `python -c pass` (the floor no command can beat). Prints
one JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

COMMANDS = [[], ["train"], ["sweep"], ["eval"], ["score"], ["analyze"], ["probe"], ["data"], ["data", "import"],
            ["experts"], ["experts", "precompute"], ["preflight"], ["config", "show"]]


def median_seconds(code: str, tree: Path, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=tree, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[2],
                        help="the checkout whose coat package is timed (default: this one)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tree = args.tree.resolve()
    floor = median_seconds("pass", tree, args.repeat)
    results = {"python -c pass": floor}
    for command in COMMANDS:
        argv = [*command, "--help"]
        code = (f"import sys; sys.path.insert(0, {str(tree)!r}); from coat.cli import app; "
                f"app({argv!r}, prog_name='coat', standalone_mode=False)")
        results[" ".join(["coat", *argv])] = median_seconds(code, tree, args.repeat)
    print(json.dumps({"tree": str(tree), "repeat": args.repeat, "median_s": results,
                      "ratio_to_bare_python": {k: v / floor for k, v in results.items()}}))
    table = Table(title=f"start-up of `coat` from {tree} (median of {args.repeat})")
    for column in ("command", "seconds", "x bare python"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name, seconds in results.items():
        table.add_row(name, f"{seconds:.2f}", f"{seconds / floor:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
