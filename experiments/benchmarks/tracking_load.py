"""Many trials writing to one tracking server at once: where each backend and server size stops keeping up.

    python experiments/benchmarks/tracking_load.py                                   # the whole grid
    python experiments/benchmarks/tracking_load.py --backends postgresql --workers 4 --writers 64
    python experiments/benchmarks/tracking_load.py --writers 1 8 --steps 5           # a quick look
    python experiments/benchmarks/tracking_load.py --mlflow-pool --workers 1 --writers 64   # MLflow's own pool

A cell is a backend (SQLite: a file; PostgreSQL: a database of its own in a cluster this benchmark starts with
initdb on 127.0.0.1 and removes at the end), a number of server workers and a number of writers. Each cell gets a
fresh `mlflow server` on 127.0.0.1 over a fresh store, with the database settings the cluster configs ship
(cluster/mlflow-supervisord.conf: each worker's connection pool, PostgreSQL's max_connections); `--mlflow-pool`
keeps MLflow's own pool of 5 + 10 instead, `--server-env` sets more. Each writer is a process shaped like a trial,
its imports done and its run open before the shared start (start-up is not timed): it logs a handful of params, then
`--steps` steps of `--metrics` metrics (one `TrackedRun.log_metrics`, so one log_batch, a step), one step every
`--step-s` seconds (the rest of the period slept; nothing when a step ran late), a `--artifact-mb` file of random
bytes every `--artifact-every` steps (`TrackedRun.log_artifacts`, a checkpoint's upload), then ends its run and
flushes its spool. Writes go through the run's spool (a `TrackedRun` with a spool folder), as a trial's do, but for
the params: coat writes a run's params only as it opens it, so they go by the MLflow client, unspooled (a params
call that fails would have waited in the spool in a real trial). Writers start at random offsets within the first
period, as independent trials would (`--aligned`: all at once, every second).

Per cell: steps/s of all writers together (each writer's steps over its own stepping time, from its first step to
the end of its last period, summed: exactly writers / step-s when every step kept its period; the phase offsets and
the end's flush would otherwise count against the server) against the steps/s they offered, p50/p99/max latency of
the calls (every call: params, steps, artifacts, the run's end), calls that raised, calls that went to the spool,
metric points lost or duplicated in the store after every writer's flush, artifacts or run ends that never arrived,
the machine's CPU use in the timed phase (whoever used it), and a writer's memory. A cell holds when no call failed,
p99 < 1 s, at least 90% of the offered steps/s got through, and everything arrived exactly once. Prints one JSON
line per cell, a table, then per backend and server size where it stops holding.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import glob
import json
import logging
import multiprocessing
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests
from mlflow.entities import Param
from rich.console import Console
from rich.table import Table

from coat import tracking
from coat.config import TrackingConfig
from coat.spool import SENT_FILE, SEQ_FILE, records

METRIC = "train/m0"  # the metric whose history is checked for exactly-once delivery
PARAMS = {"lr": "3e-4", "batch_size": "8", "seed": "0", "backbone": "qwen2-audio", "experts": "mel,prosody"}


SHIPPED = Path(__file__).resolve().parents[2] / "cluster" / "mlflow-supervisord.conf"


def shipped_settings() -> tuple[dict[str, str], int]:
    """The cluster configs' server settings that decide its load: each worker's database pool (the
    MLFLOW_SQLALCHEMYSTORE_* variables it runs with) and PostgreSQL's max_connections."""
    parser = configparser.RawConfigParser()
    parser.read(SHIPPED)
    pool = dict(re.findall(r'(MLFLOW_SQLALCHEMYSTORE_\w+)="([^"]*)"', parser["program:mlflow"]["environment"]))
    return pool, int(re.search(r"max_connections=(\d+)", parser["program:postgres"]["command"]).group(1))


def free_port() -> int:
    """As faults.py's: that module imports Ray and torch, which every writer process would then import too."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def appended(spool: Path) -> int:
    """How many records the run's spool has taken: its `sequence` counter, which only an append moves and a replay
    never resets. A call went to the spool exactly when it moved this (the outage it met, or earlier writes still
    waiting, which every later write queues behind to keep their order)."""
    try:
        return int((spool / SEQ_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return 0


def timed_call(calls, kind: str, spool: Path, call, *args) -> None:
    """Make one call, recording in the file `calls` its latency, the first line of what it raised, whether it was
    spooled, and when it started (to see when a cell fell behind): a line a call, written at once, so that a cell cut
    short by its timeout still counts them."""
    before, at = appended(spool), time.time()
    started = time.perf_counter()
    try:
        call(*args)
        error = None
    except Exception as err:  # a failed call is what is measured: record it and go on, as a trial would not
        error = f"{kind}: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
    calls.write(json.dumps([kind, time.perf_counter() - started, error, appended(spool) > before, at]) + "\n")
    calls.flush()


def writer(index: int, uri: str, experiment_id: str, cell: Path, shape: dict, ready, start, results) -> None:
    """One trial's writes. Reports (index, run id, pid) on `ready` once its run is open, waits for `start`, then
    writes its calls into the cell's `calls/` and puts how its steps went on `results`."""
    with open(cell / "writers.log", "ab") as log:
        os.dup2(log.fileno(), 1)  # MLflow's "View run" lines, coat's and MLflow's warnings: out of the benchmark's
        os.dup2(log.fileno(), 2)
    logging.basicConfig(level=logging.WARNING, format=f"writer {index} %(asctime)s %(name)s: %(message)s")
    try:
        client = tracking.mlflow_client(uri)
        run_id = client.create_run(experiment_id, run_name=f"writer-{index}").info.run_id
        spool = cell / "spools" / f"writer-{index}"
        run = tracking.TrackedRun(uri, run_id, spool, shape["retry_s"])
        checkpoint = cell / "checkpoints" / f"writer-{index}"
        checkpoint.mkdir(parents=True)
    except Exception as err:
        ready.put((index, None, f"{type(err).__name__}: {str(err)[:300]}"))
        return
    ready.put((index, run_id, os.getpid()))
    start.wait()
    calls = open(cell / "calls" / f"writer-{index}.jsonl", "w")  # noqa: SIM115 - written until the process ends
    if not shape["aligned"]:
        time.sleep(random.Random(index).uniform(0, shape["step_s"]))
    # coat writes a run's params only when it opens it; these go as a trial's extra params would, by the client
    timed_call(calls, "params", spool, client.log_batch, run_id, [], [Param(k, v) for k, v in PARAMS.items()])
    stepping = time.perf_counter()
    for step in range(shape["steps"]):
        began = time.perf_counter()
        metrics = {f"train/m{i}": step * 0.01 + i for i in range(shape["metrics"])}
        timed_call(calls, "metrics", spool, run.log_metrics, metrics, step)
        if (step + 1) % shape["artifact_every"] == 0:
            (checkpoint / "weights.bin").write_bytes(os.urandom(shape["artifact_bytes"]))
            timed_call(calls, "artifact", spool, run.log_artifacts, checkpoint, f"checkpoints/step_{step:06d}")
        time.sleep(max(0.0, shape["step_s"] - (time.perf_counter() - began)))
    stepping = time.perf_counter() - stepping
    timed_call(calls, "end", spool, run.end)
    flushed, deadline = False, time.monotonic() + shape["flush_s"]
    while not (flushed := run.flush()) and time.monotonic() < deadline:
        time.sleep(1)
    results.put({"index": index, "steps_per_s": shape["steps"] / stepping, "unflushed": not flushed})


@contextlib.contextmanager
def postgres(bin_dir: Path, max_connections: int) -> Iterator[tuple[int, Path]]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth, fine on loopback for a benchmark), stopped and
    removed on leaving. Yields its port and its folder."""
    folder = Path(tempfile.mkdtemp(prefix="coat-tracking-load-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, sockets, port = folder / "data", folder / "sockets", free_port()
    as_postgres(folder, "mkdir", str(sockets))
    as_postgres(folder, str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "-E", "UTF8")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c max_connections={max_connections} -k {sockets}"
    as_postgres(folder, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "postgres.log"), "-o", options,
                "-w", "start")
    try:
        yield port, folder
    finally:
        as_postgres(folder, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder)


def as_postgres(folder: Path, *command: str) -> None:
    """Run a PostgreSQL tool in `folder`, as the `postgres` user when this runs as root (the server refuses root);
    its output goes to `folder`/tools.log (a pipe would be held open by the server pg_ctl starts)."""
    owner = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
    with open(folder / "tools.log", "ab") as log:
        if subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, **owner).returncode:
            raise SystemExit(f"{' '.join(command)} failed: see {folder / 'tools.log'}")


def postgres_bin(given: Path | None) -> Path:
    """`given`, else the folder of the `pg_ctl` on PATH, else the newest /usr/lib/postgresql/*/bin."""
    if given is not None:
        return given
    if found := shutil.which("pg_ctl"):
        return Path(found).resolve().parent  # through a link on PATH: its neighbours (initdb, createdb) are there
    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if not installed:
        raise SystemExit("no PostgreSQL server found: install it, or pass --pg-bin or --backends sqlite")
    return Path(installed[-1])


@contextlib.contextmanager
def mlflow_server(store_uri: str, cell: Path, workers: int, extra_env: dict) -> Iterator[str]:
    """A real tracking server over `store_uri`, artifacts proxied into the cell's folder; its whole process group
    killed on leaving."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri, "--artifacts-destination",
               str(cell / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **extra_env}
    with open(cell / "server.log", "ab") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not healthy(uri):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = (cell / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the tracking server over {store_uri} did not come up:\n{tail}")
            time.sleep(0.3)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def healthy(uri: str) -> bool:
    try:
        return requests.get(f"{uri}/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def cpu_times() -> tuple[int, int]:
    """The machine's (busy, total) CPU ticks since boot."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def memory_mb(pid: int) -> tuple[float, float]:
    """A process's RSS and PSS (its shared pages divided among the processes that share them), in MB."""
    fields = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, value, *_ = line.split()
            fields[name.rstrip(":")] = int(value) if value.isdigit() else 0
    return fields.get("Rss", 0) / 1024, fields.get("Pss", 0) / 1024


def quantile(ordered: list[float], q: float) -> float:
    return ordered[int(q * (len(ordered) - 1))] if ordered else float("nan")


def run_cell(context, uri: str, cell: Path, writers: int, shape: dict, timeout_s: float) -> dict:
    """Start `writers` writers, wait until every run is open, start them together, collect their calls."""
    experiment_id = tracking.get_or_create_experiment(uri, "tracking-load")
    ready, start, results = context.Queue(), context.Event(), context.Queue()
    (cell / "calls").mkdir()
    processes = [context.Process(target=writer, args=(i, uri, experiment_id, cell, shape, ready, start, results),
                                 daemon=True) for i in range(writers)]
    for process in processes:
        process.start()
    outcome: dict = {"reports": [], "run_ids": [], "timeout": None}
    try:
        deadline = time.monotonic() + timeout_s
        opened = []
        while len(opened) < writers:
            try:
                opened.append(ready.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                outcome["timeout"] = f"only {len(opened)} of {writers} writers opened their run in {timeout_s:.0f} s"
                return outcome
        outcome["run_ids"] = [run_id for _, run_id, _ in opened if run_id is not None]
        if errors := [error for _, run_id, error in opened if run_id is None]:
            outcome["timeout"] = f"{len(errors)} writers could not open their run: {errors[0]}"
            return outcome
        outcome["memory"] = [memory_mb(pid) for _, _, pid in opened]
        cpu_before = cpu_times()
        started = time.perf_counter()
        start.set()
        deadline = time.monotonic() + timeout_s
        while len(outcome["reports"]) < writers:
            try:
                outcome["reports"].append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                outcome["timeout"] = (f"timed out after {timeout_s:.0f} s with {len(outcome['reports'])} of "
                                      f"{writers} writers done")
                break
        outcome["wall_s"] = time.perf_counter() - started
        cpu_after = cpu_times()
        outcome["cpu_busy"] = (cpu_after[0] - cpu_before[0]) / max(1, cpu_after[1] - cpu_before[1])
        return outcome
    finally:
        for process in processes:
            process.join(timeout=5 if outcome["timeout"] is None else 0)
            if process.is_alive():
                process.kill()
                process.join()


def delivered(uri: str, run_ids: list[str], steps: int, artifacts: int) -> dict:
    """Over every run: the points of `METRIC` missing and those stored more than once or at a step never logged
    (each run must hold steps 0..steps-1, once each), and the artifacts and run ends that never arrived."""
    client = tracking.mlflow_client(uri)
    missing = duplicated = undelivered = 0
    for run_id in run_ids:
        logged = [step for step, _ in tracking.metric_history(uri, run_id, METRIC)]
        missing += len(set(range(steps)) - set(logged))
        duplicated += len(logged) - len(set(logged) & set(range(steps)))
        undelivered += max(0, artifacts - len(client.list_artifacts(run_id, "checkpoints")))
        undelivered += tracking.run_status(uri, run_id) != "FINISHED"
    return {"lost_or_duplicated": missing + duplicated, "missing_points": missing, "duplicated_points": duplicated,
            "undelivered": undelivered}


def waiting_in_spools(cell: Path) -> int:
    """Writes still waiting in the writers' spools once the cell is over: not lost (the run's next start replays
    them), but not delivered either."""
    count = 0
    for folder in (cell / "spools").glob("*"):
        sent = int((folder / SENT_FILE).read_text()) if (folder / SENT_FILE).is_file() else -1
        count += sum(record.get("seq", 0) > sent for path in folder.glob("*.jsonl") for record in records(path))
    return count


def measure(context, backend: str, workers: int, writers: int, store_uri: str, cell: Path, args, shape: dict
            ) -> dict:
    row = {"backend": backend, "workers": workers, "writers": writers, "steps": args.steps, "metrics": args.metrics,
           "offered_steps_per_s": writers / args.step_s}
    with mlflow_server(store_uri, cell, workers, args.server_settings) as uri:
        outcome = run_cell(context, uri, cell, writers, shape, args.timeout_s)
        reports = outcome["reports"]
        calls = [json.loads(line) for path in sorted((cell / "calls").glob("*.jsonl"))
                 for line in path.read_text().splitlines()]
        unfinished = writers - len(reports)  # cut short by the timeout: their steps so far, over the whole wall
        latencies = sorted(seconds for _, seconds, *_ in calls)
        errors = [error for _, _, error, *_ in calls if error]
        row.update({
            "steps_per_s": sum(r["steps_per_s"] for r in reports) + (
                (sum(kind == "metrics" for kind, *_ in calls) - len(reports) * args.steps) / outcome["wall_s"]
                if unfinished and outcome.get("wall_s") else 0.0),
            "calls": len(calls), "p50_s": quantile(latencies, 0.5), "p99_s": quantile(latencies, 0.99),
            "max_s": latencies[-1] if latencies else float("nan"),
            "metrics_p99_s": quantile(sorted(s for kind, s, *_ in calls if kind == "metrics"), 0.99),
            "artifact_p99_s": quantile(sorted(s for kind, s, *_ in calls if kind == "artifact"), 0.99),
            "failed_calls": len(errors), "spooled_calls": sum(spooled for _, _, _, spooled, _ in calls),
            "unflushed_writers": sum(r["unflushed"] for r in reports),
            "wall_s": outcome.get("wall_s", 0.0), "cpu_busy": outcome.get("cpu_busy", 0.0),
            "writer_rss_mb": max((rss for rss, _ in outcome.get("memory", [])), default=0.0),
            "writer_pss_mb": max((pss for _, pss in outcome.get("memory", [])), default=0.0),
            "first_error": errors[0] if errors else None, "timeout": outcome["timeout"]})
        row.update(delivered(uri, outcome["run_ids"], args.steps, args.steps // args.artifact_every))
    row["waiting_in_spools"] = waiting_in_spools(cell)
    row["holds"] = (row["timeout"] is None and row["failed_calls"] == 0 and row["p99_s"] < 1
                    and row["steps_per_s"] >= 0.9 * row["offered_steps_per_s"] and row["lost_or_duplicated"] == 0
                    and row["undelivered"] == 0 and len(outcome["run_ids"]) == writers)
    row["why_not"] = None if row["holds"] else why_not(row)
    shutil.rmtree(cell / "artifacts", ignore_errors=True)  # 64 writers leave hundreds of MB a cell
    shutil.rmtree(cell / "checkpoints", ignore_errors=True)
    return row


def why_not(row: dict) -> str:
    reasons = [row["timeout"]] if row["timeout"] else []
    if row["failed_calls"]:
        reasons.append(f"{row['failed_calls']} failed calls (first: {row['first_error']})")
    if not row["p99_s"] < 1:
        reasons.append(f"p99 {row['p99_s']:.2f} s")
    if row["steps_per_s"] < 0.9 * row["offered_steps_per_s"]:
        reasons.append(f"{row['steps_per_s']:.1f} of {row['offered_steps_per_s']:.1f} steps/s")
    if row["lost_or_duplicated"]:
        reasons.append(f"{row['missing_points']} metric points missing, {row['duplicated_points']} duplicated "
                       f"({row['waiting_in_spools']} writes still waiting in the spools)")
    if row["undelivered"]:
        reasons.append(f"{row['undelivered']} artifacts or run ends never arrived")
    return "; ".join(reasons)


def summary(rows: list[dict]) -> list[str]:
    """Per backend and server size: the most writers that held, and the first count that did not, with why."""
    lines = []
    for backend, workers in dict.fromkeys((r["backend"], r["workers"]) for r in rows):
        cells = sorted((r for r in rows if (r["backend"], r["workers"]) == (backend, workers)),
                       key=lambda r: r["writers"])
        failing = next((r for r in cells if not r["holds"]), None)
        held = [r["writers"] for r in cells if failing is None or r["writers"] < failing["writers"]]
        where = f"{backend}, {workers} worker{'s' if workers > 1 else ''}"
        if failing is None:
            lines.append(f"{where}: holds at every writer count tried (up to {held[-1]})")
        elif not held:
            lines.append(f"{where}: fails already at {failing['writers']} writers: {failing['why_not']}")
        else:
            lines.append(f"{where}: holds up to {held[-1]} writers; fails at {failing['writers']}: "
                         f"{failing['why_not']}")
    return lines


def main() -> None:
    defaults = TrackingConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 4], help="server worker processes")
    parser.add_argument("--writers", nargs="+", type=int, default=[1, 8, 32, 64], help="trials writing at once")
    parser.add_argument("--steps", type=int, default=30, help="steps each writer logs")
    parser.add_argument("--metrics", type=int, default=10, help="metrics a step")
    parser.add_argument("--artifact-every", type=int, default=10, help="steps between checkpoint-sized artifacts")
    parser.add_argument("--artifact-mb", type=float, default=2.0)
    parser.add_argument("--step-s", type=float, default=1.0, help="each writer's period: one step per this")
    parser.add_argument("--aligned", action="store_true", help="every writer steps at the same instant")
    parser.add_argument("--retry-s", type=float, default=defaults.retry_s, help="the spool's tracking.retry_s")
    parser.add_argument("--flush-s", type=float, default=120.0, help="how long a writer's flush may wait at its end")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="a cell's limit, for its start and its run")
    parser.add_argument("--server-env", nargs="*", default=[], type=lambda kv: tuple(kv.split("=", 1)),
                        help="KEY=VALUE settings for the server, e.g. MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=20")
    parser.add_argument("--mlflow-pool", action="store_true",
                        help="MLflow's own connection pool (5 + 10 a worker), not the cluster configs'")
    parser.add_argument("--pg-bin", type=Path, default=None, help="PostgreSQL's bin folder (initdb, pg_ctl)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    pool, max_connections = shipped_settings()
    args.server_settings = {**({} if args.mlflow_pool else pool), **dict(args.server_env)}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="coat-tracking-load-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = {"steps": args.steps, "metrics": args.metrics, "artifact_every": args.artifact_every,
             "artifact_bytes": int(args.artifact_mb * 2**20), "step_s": args.step_s, "aligned": args.aligned,
             "retry_s": args.retry_s, "flush_s": args.flush_s}
    # Writers fork from a fork server that has imported coat.tracking once: quick to start, their pages shared.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["coat.tracking"])
    rows = []
    with contextlib.ExitStack() as stack:
        if "postgresql" in args.backends:
            pg_bin = postgres_bin(args.pg_bin)
            pg_port, pg_folder = stack.enter_context(postgres(pg_bin, max_connections))
        for backend in args.backends:
            for workers in args.workers:
                for writers in sorted(args.writers):
                    name = f"{backend}_w{workers}_n{writers}"
                    cell = work / name
                    cell.mkdir()
                    if backend == "sqlite":
                        store_uri = f"sqlite:///{cell / 'mlruns.db'}"
                    else:
                        as_postgres(pg_folder, str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port),
                                    "-U", "postgres", name)
                        store_uri = f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/{name}"
                    rows.append(measure(context, backend, workers, writers, store_uri, cell, args, shape))
                    print(json.dumps(rows[-1]), flush=True)
    table = Table(title=f"{args.steps} steps of {args.metrics} metrics a writer, one per {args.step_s:g} s, a "
                        f"{args.artifact_mb:g} MB artifact every {args.artifact_every} steps "
                        f"({'aligned' if args.aligned else 'random phases'}); work in {work}")
    for column in ("backend", "server workers", "writers", "steps/s (offered)", "p50", "p99", "max", "failed",
                   "spooled", "lost/dup", "undelivered", "CPU", "holds"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["backend"], str(row["workers"]), str(row["writers"]),
                      f"{row['steps_per_s']:.1f} ({row['offered_steps_per_s']:g})", f"{row['p50_s']:.3f} s",
                      f"{row['p99_s']:.3f} s", f"{row['max_s']:.2f} s", str(row["failed_calls"]),
                      str(row["spooled_calls"]), str(row["lost_or_duplicated"]), str(row["undelivered"]),
                      f"{row['cpu_busy']:.0%}", "yes" if row["holds"] else "NO")
    console = Console(width=150)
    console.print(table)
    most = max(rows, key=lambda row: row["writers"])
    console.print(f"a writer: {most['writer_rss_mb']:.0f} MB RSS; {most['writer_pss_mb']:.0f} MB its own share (PSS) "
                  f"with {most['writers']} writers sharing the fork server's pages, "
                  f"{most['writer_pss_mb'] * most['writers'] / 1024:.1f} GB for all")
    for line in summary(rows):
        console.print(line)


if __name__ == "__main__":
    main()
