"""Replaying a long outage while training goes on: how long the writer waits, side by side with the old replay.

    python experiments/benchmarks/spool_replay.py                     # 2000 spooled steps of 10 metrics
    python experiments/benchmarks/spool_replay.py --steps 500 --metrics 4

A real `mlflow server` on 127.0.0.1 (SQLite, one worker). A run's spool holds `--steps` step records, as a run
that trained through an outage leaves it; then the server answers and a writer shaped like training appends a
step's metrics every `--step-ms` while the spool is replayed. Two replays of the same spool, each into a run of
its own:
- `inline`: the replay before this change: on the writer's own thread, one request per record, the spool's lock
  held to the end (the writer waits for the whole replay);
- `background`: the spool's replayer thread, consecutive steps merged into one request, the lock let go between
  batches (the writer waits for one batch at most).
Per replay: its wall time, requests sent, and the writer's waits (p50, p99, max of its appends, and the longest
stretch it could not write). Prints one JSON line per replay, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))

from faults import free_port, mlflow_server  # noqa: E402 - the benchmark next door starts servers the same way

from coat import spool as spool_module  # noqa: E402
from coat import tracking  # noqa: E402
from coat.spool import Spool  # noqa: E402


def outage_spool(folder: Path, uri: str, name: str, steps: int, metrics: int) -> Spool:
    """A spool holding a run opened during an outage and `steps` step records of `metrics` metrics each."""
    spool = tracking._spool(uri, folder, 0.5)
    spool.append({"kind": "open", "pending": "pending-run", "experiment": "coat", "run_name": name,
                  "display_name": name, "resume": True, "params": {}, "tags": {}})
    for step in range(1, steps + 1):
        spool.append(step_record("pending-run", step, metrics))
    return spool


def step_record(run: str, step: int, metrics: int) -> dict:
    return {"kind": "log", "run": run,
            "metrics": [[f"train/m{i}", 1.0 / step, 1_000_000 + step, step] for i in range(metrics)]}


class CountingSend:
    """`tracking._send`, counting the requests it makes."""

    def __init__(self, uri: str):
        self.uri, self.requests = uri, 0

    def __call__(self, record: dict, ids: dict) -> str | None:
        self.requests += 1
        return tracking._send(self.uri, record, ids)


def replay(spool: Spool, mode: str, steps: int, metrics: int, step_ms: float) -> dict:
    """Replay `spool` per `mode` while a writer appends a step every `step_ms`; the writer's waits, measured."""
    send = spool.send = CountingSend(spool.send.args[0])
    waits, done = [], threading.Event()
    step = steps

    def writer():
        nonlocal step
        while not done.is_set():
            step += 1
            started = time.perf_counter()
            spool.write(step_record("pending-run", step, metrics))
            waits.append(time.perf_counter() - started)
            time.sleep(step_ms / 1000)

    thread = threading.Thread(target=writer)
    started = time.perf_counter()
    if mode == "inline":  # the old replay: everything under one hold of the lock, one request per record
        with spool.locked():
            thread.start()
            old = spool_module.BATCH_S, spool_module.BATCH_METRICS
            spool_module.BATCH_S, spool_module.BATCH_METRICS = float("inf"), 0
            try:
                while spool._replay_batch() is not None:
                    pass
            finally:
                spool_module.BATCH_S, spool_module.BATCH_METRICS = old
    else:
        thread.start()
        spool.replay_in_background()
        while spool.replayer is not None:
            time.sleep(0.01)
    replay_s = time.perf_counter() - started
    done.set()
    thread.join()
    while spool.waiting():  # what the writer appended meanwhile
        spool.replay()
    ordered = sorted(waits)
    return {"mode": mode, "spooled_steps": steps, "metrics_per_step": metrics, "replay_s": replay_s,
            "requests": send.requests, "writer_appends": len(waits),
            "append_p50_ms": 1000 * statistics.median(ordered),
            "append_p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))], "append_max_ms": 1000 * ordered[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="step records waiting when the server comes back")
    parser.add_argument("--metrics", type=int, default=10, help="metrics per step")
    parser.add_argument("--step-ms", type=float, default=10.0, help="the writer's time between steps")
    args = parser.parse_args()
    mlflow.utils.logging_utils.disable_logging()
    work = Path(tempfile.mkdtemp(prefix="coat-spool-replay-"))
    rows = []
    with mlflow_server(work, free_port()) as uri:
        for mode in ("inline", "background"):
            spool = outage_spool(work / f"spool-{mode}", uri, f"replay-{mode}", args.steps, args.metrics)
            rows.append(replay(spool, mode, args.steps, args.metrics, args.step_ms))
            print(json.dumps(rows[-1]), flush=True)
    table = Table(title=f"replaying {args.steps} spooled steps of {args.metrics} metrics while a writer appends a step "
                        f"every {args.step_ms:g} ms")
    for column in ("replay", "wall time", "requests", "writer's appends", "append p50", "append p99", "longest wait"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["mode"], f"{row['replay_s']:.1f} s", str(row["requests"]), str(row["writer_appends"]),
                      f"{row['append_p50_ms']:.1f} ms", f"{row['append_p99_ms']:.1f} ms",
                      f"{row['append_max_ms']:.0f} ms")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
