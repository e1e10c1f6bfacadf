"""The faults a long run meets, each injected into a real run on the embedded default, beside the same run left alone.

    python experiments/benchmarks/faults.py                       # every fault
    python experiments/benchmarks/faults.py --only outage,torn    # those whose name holds one of these

Every run is a real `coat train` process (tiny qwen2-audio, coat-mini, in-process training, 8 steps with a
checkpoint every 2) against a real MLflow store (a real `mlflow server` for the outages); kills are real SIGKILLs
(`COAT_TEST_SIGKILL_AT`), torn checkpoints and store parts are real files cut short or overwritten on disk.

Per fault: whether the run survived (ended normally, by itself or when started again, or for the store: the damage
was found and repaired), the steps lost (trained, then thrown away and redone), the step metrics duplicated and
missing in MLflow, and the wall-time cost against the same run left alone (with the store already full; for the
concurrent precomputes, one precompute alone), less the benchmark's own time (tracking server start-ups, a
process held while the server restarts). Prints one JSON line per fault, then a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import ray
import requests
from rich.console import Console
from rich.table import Table

from coat import tracking
from coat.config import load_config, to_yaml
from coat.data.precompute import precompute
from coat.data.store import FeatureStore
from coat.data.synth import synthesize
from coat.ray_runtime import ensure_ray
from coat.spool import REJECTED, Spool, records
from coat.train.checkpoint import latest_checkpoint, load_training_state

STEPS = 8
COAT = str(Path(sys.executable).parent / "coat")
SETTINGS = [
    "experts.names=[mel]", "thinking.num_slots=4", "thinking.max_slots=8", "heads.dim=32", "train.num_workers=0",
    "train.batch_size=2", "train.warmup_steps=2", f"train.stages=[{{steps: {STEPS}}}]", "train.checkpoint_every=2",
    "eval.max_examples=4", "eval.suites.coat-mini.max_new_tokens=4", "eval.bootstrap=100", "eval.latency_examples=2",
    "eval.latency_warmup=1", "tracking.retry_s=1",
]


class Bench:
    """The work folder, the coat-mini every run trains on, and one local Ray that every `coat train` joins."""

    def __init__(self, work: Path):
        self.work = work
        self.manifest = synthesize(work / "coat-mini", size=40, seed=3)
        ensure_ray()
        self.env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}

    def config(self, name: str, uri: str, *extra: str) -> Path:
        cfg = load_config(overrides=[
            f"data.manifest={self.manifest}", f"data.store={self.work / 'store'}", *SETTINGS,
            f"train.storage={self.work / 'runs'}", f"train.run_name={name}", f"tracking.uri={uri}", *extra])
        path = self.work / f"{name}.yaml"
        path.write_text(to_yaml(cfg))
        return path

    def train(self, config: Path, fault: str = "", **popen) -> subprocess.Popen:
        log = open(self.work / f"{config.stem}.log", "a")  # noqa: SIM115 - the process writes it until it ends
        env = {**self.env, "COAT_TEST_SIGKILL_AT": fault}
        return subprocess.Popen([COAT, "train", "--config", str(config)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, **popen)

    def run(self, config: Path, fault: str = "") -> int:
        return self.train(config, fault).wait(timeout=900)

    def storage(self, name: str) -> Path:
        return self.work / "runs" / name


def sqlite(work: Path, name: str) -> str:
    return f"sqlite:///{work / f'{name}.db'}"


def logged(uri: str, name: str) -> tuple[str | None, dict]:
    """The run's status, and its step metrics counted: duplicated records and missing steps of `train/loss`."""
    run_id = tracking.find_run(uri, tracking.get_or_create_experiment(uri, "coat"), name)
    if run_id is None:
        return None, {"duplicated": 0, "missing": STEPS}
    steps = [step for step, _ in tracking.metric_history(uri, run_id, "train/loss")]
    return tracking.run_status(uri, run_id), {"duplicated": len(steps) - len(set(steps)),
                                              "missing": len(set(range(1, STEPS + 1)) - set(steps))}


def resumes_from(storage: Path) -> int:
    """The step of the checkpoint a restart resumes from (0: none)."""
    checkpoint = latest_checkpoint(storage)
    return 0 if checkpoint is None else load_training_state(checkpoint)["step"]


def killed(bench: Bench, name: str, fault: str, killed_at: int, damage: Callable[[Path], None] | None = None
           ) -> dict:
    """A run SIGKILLed at `fault` (having trained `killed_at` steps), its storage then `damage`d, started again."""
    uri = sqlite(bench.work, name)
    config = bench.config(name, uri)
    codes = [bench.run(config, fault)]
    if damage is not None:
        damage(latest_checkpoint(bench.storage(name)))
    lost = killed_at - resumes_from(bench.storage(name))
    codes.append(bench.run(config, fault))
    status, counts = logged(uri, name)
    return {"survived": codes == [-signal.SIGKILL, 0] and status == "FINISHED", "steps_lost": lost,
            "exit_codes": codes, **counts}


def truncate(checkpoint: Path) -> None:
    weights = checkpoint / "coat.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def flip_bytes(checkpoint: Path) -> None:
    state = checkpoint / "training_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = bytes(16)
    state.write_bytes(bytes(data))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root: Path, port: int) -> Iterator[str]:
    """A real tracking server over `root`'s store (the same one every time), until leaving."""
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'db'}",
               "--artifacts-destination", str(root / "art"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "a") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: healthy(uri), "the tracking server")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def healthy(uri: str) -> bool:
    try:
        return requests.get(f"{uri}/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.2)
    return value


def opened(uri: str, name: str) -> bool:
    with contextlib.suppress(Exception):
        return tracking.find_run(uri, tracking.get_or_create_experiment(uri, "coat"), name) is not None
    return False


def outage(bench: Bench, name: str, back_mid_run: bool, damage: Callable[[Path], None] | None = None) -> dict:
    """The server killed once the run is open; back half-way through training (the process held while it
    restarts), or only after the run has ended, when the same command is started again (the spool `damage`d
    before that)."""
    root, port = bench.work / name, free_port()
    root.mkdir()
    stack = contextlib.ExitStack()
    started = time.perf_counter()
    uri = stack.enter_context(mlflow_server(root, port))
    harness = time.perf_counter() - started  # server start-ups and the held process: the benchmark's, not the fault's
    config = bench.config(name, uri)
    process = bench.train(config)
    wait_for(lambda: opened(uri, name), "the run to open")
    stack.close()
    codes = []
    if back_mid_run:
        wait_for(lambda: (bench.storage(name) / f"checkpoint_{STEPS // 2:06d}").is_dir(), "training to go on")
        process.send_signal(signal.SIGSTOP)
        held = time.perf_counter()
        with mlflow_server(root, port):
            process.send_signal(signal.SIGCONT)
            harness += time.perf_counter() - held
            codes.append(process.wait(timeout=900))
            status, counts = logged(uri, name)
    else:
        codes.append(process.wait(timeout=900))
        if damage is not None:
            damage(bench.storage(name) / "mlflow-spool")
        started = time.perf_counter()
        with mlflow_server(root, port):
            harness += time.perf_counter() - started
            codes.append(bench.run(config))
            status, counts = logged(uri, name)
    waiting = list((bench.storage(name) / "mlflow-spool").glob("*.jsonl"))
    refused = bench.storage(name) / "mlflow-spool" / REJECTED
    return {"survived": set(codes) == {0} and status == "FINISHED" and not waiting, "steps_lost": 0,
            "exit_codes": codes, "harness_s": harness, "set_aside": len(refused.read_text().splitlines())
            if refused.is_file() else 0, **counts}


def tear_last_line(spool: Path) -> None:
    """Cut the spool's last line in half, as a kill mid-append leaves it; the next start appends after it."""
    newest = max(spool.glob("*.jsonl"), key=lambda f: f.stat().st_size)
    lines = newest.read_bytes().splitlines(keepends=True)
    newest.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])


def refused_record(spool: Path) -> None:
    """A write among the spooled ones that the server will refuse when it is back (a tag key it does not take,
    as a run deleted during the outage would be refused): it must go aside, and every other write replay."""
    run = next(r["run"] for r in records(max(spool.glob("*.jsonl"), key=lambda f: f.stat().st_size)) if "run" in r)
    Spool(spool, lambda record, ids: None, lambda: True, "bench", retry_s=1).append(
        {"kind": "log", "run": run, "tags": {"bad key!": "refused"}})


def diverging(bench: Bench, name: str) -> dict:
    """A learning rate that sends the weights to inf: the run must skip the non-finite steps, stop after
    train.max_nonfinite_steps of them with an error naming the step, and leave no non-finite checkpoint."""
    from safetensors.torch import load_file

    uri = sqlite(bench.work, name)
    config = bench.config(name, uri, "train.lr=1e30", "train.warmup_steps=0", "train.max_nonfinite_steps=2")
    code = bench.run(config)
    log = (bench.work / f"{name}.log").read_text()
    finite = all(bool(t.isfinite().all()) for checkpoint in bench.storage(name).glob("checkpoint_*")
                 for t in load_file(checkpoint / "coat.safetensors").values())
    status, counts = logged(uri, name)
    stopped = code == 1 and "training stopped at step" in log and status == "FAILED"
    return {"survived": stopped and finite, "steps_lost": 0, "exit_codes": [code], **counts,
            "note": "stops by design: survived = stopped with its error, every checkpoint finite; the steps it "
                    "never trained count as missing"}


def not_a_file(bench: Bench, name: str) -> dict:
    """A manifest whose rows name a FIFO, /dev/zero and a folder as audio (a manifest from elsewhere): each is
    quarantined unread and the run trains on the rest to the end."""
    rows = bench.manifest.read_text().splitlines()
    folder = bench.work / name
    folder.mkdir()
    os.mkfifo(folder / "pipe.wav")
    (folder / "folder.wav").mkdir()
    first = json.loads(rows[0])
    odd = [{**first, "id": f"odd-{i}", "audio": str(path)}
           for i, path in enumerate([folder / "pipe.wav", "/dev/zero", folder / "folder.wav"])]
    kept = [{**row, "audio": str(bench.manifest.parent / row["audio"])} for row in map(json.loads, rows)]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in [*kept, *odd]))
    uri = sqlite(bench.work, name)
    code = bench.run(bench.config(name, uri, f"data.manifest={manifest}"))
    status, counts = logged(uri, name)
    return {"survived": code == 0 and status == "FINISHED", "steps_lost": 0, "exit_codes": [code], **counts}


def damaged_part(bench: Bench, name: str) -> dict:
    """A part of the store the runs train on cut short: `coat data check --store` must find it, and the next run
    must recompute exactly its clips, then train to the end."""
    store = FeatureStore(bench.work / "store")
    (expert, version), *_ = [v for v in store.versions() if v[0] == "mel"]
    part = store.parts(expert, version)[0]
    affected = set(store.ledger(expert, version)[part.name]["clips"])
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    check = subprocess.run([COAT, "data", "check", "--store", str(store.root)], capture_output=True, text=True,
                           env=bench.env, timeout=300)
    before = set(store.ledger(expert, version))
    uri = sqlite(bench.work, name)
    code = bench.run(bench.config(name, uri))
    recomputed = {clip for part_name, entry in store.ledger(expert, version).items() if part_name not in before
                  for clip in entry["clips"]}
    status, counts = logged(uri, name)
    found = check.returncode == 1 and part.name in check.stdout + check.stderr
    return {"survived": found and code == 0 and status == "FINISHED" and recomputed == affected, "steps_lost": 0,
            "exit_codes": [check.returncode, code], "clips_affected": len(affected),
            "clips_recomputed": len(recomputed), **counts}


def concurrent_precompute(bench: Bench, name: str) -> dict:
    """Two precomputes started at once into one new store (two sweeps started together): it must end whole, every
    clip present, no part damaged."""
    def command(root: Path) -> list[str]:
        return [COAT, "experts", "precompute", "--data", str(bench.manifest), "--experts", "mel,prosody",
                "--store", str(root)]

    start = time.perf_counter()
    subprocess.run(command(bench.work / f"{name}-alone"), env=bench.env, capture_output=True, timeout=900, check=True)
    alone = time.perf_counter() - start
    root = bench.work / name
    runs = [subprocess.Popen(command(root), env=bench.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(2)]
    codes = [run.wait(timeout=900) for run in runs]
    together = time.perf_counter() - start - alone
    store = FeatureStore(root)
    damage = [d for expert, version in store.versions() for d in store.verify(expert, version)]
    after = precompute(bench.manifest, ["mel", "prosody"], root, progress=False)  # what a third run still lacks
    missing = sum(run.computed for run in after.experts)
    return {"survived": codes == [0, 0] and not damage and missing == 0, "steps_lost": 0, "exit_codes": codes,
            "duplicated": 0, "missing": missing, "damaged_parts": len(damage), "baseline_s": alone,
            "harness_s": time.perf_counter() - start - alone - together}


KILLED_REPLAY = """
import os, signal, sys
from pathlib import Path
import coat.tracking
send, sent = coat.tracking._send, []
def killing(*args):
    result = send(*args)
    sent.append(1)
    if len(sent) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
coat.tracking._send = killing
coat.tracking.replay_spool(sys.argv[1], Path(sys.argv[2]))
"""


def replay_killed(bench: Bench, name: str) -> dict:
    """The server away past the run's end; when it is back, the replay of the run's spool is SIGKILLed after its
    second request (a node going down mid-replay); the same command then started again finishes it."""
    root, port = bench.work / name, free_port()
    root.mkdir()
    started = time.perf_counter()
    with mlflow_server(root, port) as uri:
        harness = time.perf_counter() - started
        config = bench.config(name, uri)
        process = bench.train(config)
        wait_for(lambda: opened(uri, name), "the run to open")
    codes = [process.wait(timeout=900)]
    started = time.perf_counter()
    with mlflow_server(root, port):
        harness += time.perf_counter() - started
        spool = bench.storage(name) / "mlflow-spool"
        killed_replay = subprocess.run([sys.executable, "-c", KILLED_REPLAY, uri, str(spool)], env=bench.env,
                                       capture_output=True, timeout=300)
        codes += [killed_replay.returncode, bench.run(config)]
        status, counts = logged(uri, name)
    waiting = list(spool.glob("*.jsonl"))
    return {"survived": codes == [0, -signal.SIGKILL, 0] and status == "FINISHED" and not waiting, "steps_lost": 0,
            "exit_codes": codes, "harness_s": harness, **counts}


@contextlib.contextmanager
def tmpfs(folder: Path, kib: int) -> Iterator[None]:
    """A real tmpfs of `kib` KiB on `folder` (root only), unmounted on leaving."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)], check=True,
                   capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def storage_full(bench: Bench, name: str) -> dict:
    """The run's storage (a real tmpfs) holds one checkpoint and a half: the second checkpoint's write fails with
    an error naming the folder and the run stops; with space freed, the same command resumes from the first."""
    if os.geteuid() != 0:
        return {"survived": "skipped (mounting a tmpfs needs root)", "steps_lost": 0, "duplicated": 0, "missing": 0}
    undisturbed = latest_checkpoint(bench.storage("undisturbed"))
    kib = sum(-(-f.stat().st_size // 4096) * 4 for f in undisturbed.rglob("*") if f.is_file())
    storage, uri = bench.work / f"{name}-storage", sqlite(bench.work, name)
    config = bench.config(name, uri, f"train.storage={storage}")
    with tmpfs(storage, kib + kib // 2):
        codes = [bench.run(config)]
        said = f"could not write checkpoint {storage / name}" in (bench.work / f"{name}.log").read_text()
        lost = 4 - resumes_from(storage / name)
        subprocess.run(["mount", "-o", f"remount,size={8 * kib}k", str(storage)], check=True)
        codes.append(bench.run(config))
    status, counts = logged(uri, name)
    return {"survived": codes[0] != 0 and said and codes[1] == 0 and status == "FINISHED", "steps_lost": lost,
            "exit_codes": codes, **counts}


FAULTS: dict[str, Callable[[Bench, str], dict]] = {
    "killed mid-checkpoint": lambda bench, name: killed(bench, name, "checkpoint@6", 6),
    "killed after a commit, before logging": lambda bench, name: killed(bench, name, "reported@6", 6),
    "newest checkpoint cut short": lambda bench, name: killed(bench, name, "step@7", 7, truncate),
    "newest checkpoint overwritten": lambda bench, name: killed(bench, name, "step@7", 7, flip_bytes),
    "tracking server away mid-run": lambda bench, name: outage(bench, name, back_mid_run=True),
    "tracking server away past the end": lambda bench, name: outage(bench, name, back_mid_run=False),
    "spool's last line torn, then appended to": lambda bench, name: outage(bench, name, False, tear_last_line),
    "a spooled write the server refuses": lambda bench, name: outage(bench, name, False, refused_record),
    "learning rate that diverges": diverging,
    "a FIFO, /dev/zero and a folder as audio": not_a_file,
    "feature store part cut short": damaged_part,
    "two precomputes into one store at once": concurrent_precompute,
    "a spool's replay killed half-way": replay_killed,
    "storage full at a checkpoint": storage_full,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated words; runs the faults whose name holds one")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="coat-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(work)
    bench.run(bench.config("warm-up", sqlite(work, "warm-up")))  # fills the store: every run below finds it full
    start = time.perf_counter()
    undisturbed = bench.run(bench.config("undisturbed", sqlite(work, "undisturbed")))
    baseline = time.perf_counter() - start
    assert undisturbed == 0, f"the undisturbed run failed: see {work / 'undisturbed.log'}"
    chosen = [name for name in FAULTS if not args.only or any(word in name for word in args.only.split(","))]
    rows = []
    for index, fault in enumerate(chosen):
        start = time.perf_counter()
        row = {"fault": fault, "baseline_s": baseline, "harness_s": 0.0, **FAULTS[fault](bench, f"fault{index}")}
        row["wall_s"] = time.perf_counter() - start
        row["cost_s"] = row["wall_s"] - row["harness_s"] - row["baseline_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    table = Table(title=f"faults injected into an {STEPS}-step run (the undisturbed run: {baseline:.0f} s)")
    for column in ("fault", "survived", "steps lost", "metrics duplicated", "missing", "wall-time cost"):
        table.add_column(column)
    for row in rows:
        survived = {True: "yes", False: "NO"}.get(row["survived"], row["survived"])
        table.add_row(row["fault"], survived, str(row["steps_lost"]),
                      str(row["duplicated"]), str(row["missing"]),
                      f"{row['cost_s']:+.1f} s ({row['cost_s'] / row['baseline_s']:+.0%})")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
