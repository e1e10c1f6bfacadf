"""Shared test helpers: tiny configs, real audio decoded from WAV files, a real MLflow server on loopback, a real
PostgreSQL server of the tests' own."""

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import requests
import soundfile as sf
import torch

from coat import tracking
from coat.config import CoATConfig, load_config
from coat.data.synth import synthesize
from coat.experts.base import ExpertSpec

BACKBONE_NAMES = ["qwen2-audio", "qwen2.5-omni", "audio-flamingo-3"]

# Synthetic expert shapes covering every kind the model supports: frame-level continuous, discrete, clip-level.
SYNTHETIC_EXPERTS = {
    "pitch": ExpertSpec("pitch", 2, 100.0),
    "phonetic": ExpertSpec("phonetic", 6, 100.0, "discrete"),
    "speaker": ExpertSpec("speaker", 8, None),
}


def tiny_config(backbone: str, *overrides: str):
    return load_config(overrides=[
        f"backbone.name={backbone}", "backbone.audio_window_s=2", "data.max_seconds=2", "thinking.max_slots=8",
        "thinking.num_slots=4", "experts.names=[pitch,phonetic,speaker]", "heads.dim=32", *overrides,
    ])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on 2 shared cores: intra-op threads only contend (a decode step goes from ms to 0.5 s).
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def coat_mini(tmp_path_factory) -> Path:
    """One small coat-mini (40 clips) for every test that trains or sweeps: its feature store fills once."""
    return synthesize(tmp_path_factory.mktemp("coat-mini"), size=40, seed=3)


# A sweep's trials on coat_mini: tiny, in-process, a few steps; the baselines evaluated beside CoAT.
SWEEP = [
    "experts.names=[mel]", "thinking.max_slots=8", "thinking.num_slots=4", "heads.dim=32",
    "lora.modules_to_save=[lm_head]",
    "train.num_workers=0", "train.batch_size=4", "train.warmup_steps=1", "train.val_batches=1",
    "train.stages=[{steps: 2, ce_weight: 0.1}, {steps: 2}]", "train.checkpoint_every=2",
    "eval.max_examples=4", "eval.suites.coat-mini.max_new_tokens=4", "eval.bootstrap=100", "eval.latency_examples=2",
    "eval.latency_warmup=1", "sweep.grace_steps=2",
]


def sweep_args(root: Path, manifest: Path, *extra: str) -> list[str]:
    return [f"data.manifest={manifest}", f"data.store={manifest.parent / 'store'}", f"train.storage={root}",
            f"tracking.uri=sqlite:///{root / 'mlruns.db'}", *SWEEP, *extra]


def sweep_config(root: Path, manifest: Path, *extra: str) -> CoATConfig:
    """The config of a test sweep: `sweep_args` loaded."""
    return load_config(overrides=sweep_args(root, manifest, *extra))


@pytest.fixture(scope="session")
def sweeps(tmp_path_factory, coat_mini) -> dict:
    """Two real sweeps in one MLflow store, run once per session: a grid over K and the expert set whose trials
    also evaluate the base and text-CoT baselines, and a multi-objective Optuna search over K and a loss weight.
    Returns {"root", "uri", "grid", "pareto"} (the last two `SweepResult`s)."""
    from coat.tune.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweeps")
    (root / "k.yaml").write_text("thinking.num_slots: {grid: [0, 4]}\nexperts.names: {grid: [[mel], [mel, prosody]]}\n")
    (root / "m.yaml").write_text("thinking.num_slots: {choice: [0, 2, 4]}\nloss.weights.mel: {loguniform: [0.1, 10]}\n")
    grid = run_sweep(sweep_config(root, coat_mini, "sweep.name=k", "eval.baselines=[base,cot]", "eval.cot_tokens=4"),
                     root / "k.yaml")
    pareto = run_sweep(sweep_config(root, coat_mini, "sweep.name=m", "sweep.multi_objective=true",
                                    "sweep.num_samples=3", "sweep.scheduler=none"), root / "m.yaml")
    return {"root": root, "uri": f"sqlite:///{root / 'mlruns.db'}", "grid": grid, "pareto": pareto}


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> list[np.ndarray]:
    """Two clips written to WAV and decoded back: a 1.5 s chirp-on-noise and a 1 s two-tone clip."""
    root: Path = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    t1, t2 = np.arange(24000) / 16000, np.arange(16000) / 16000
    signals = [
        0.3 * np.sin(2 * np.pi * (200 + 300 * t1) * t1) + 0.01 * rng.standard_normal(t1.size),
        0.3 * np.sin(2 * np.pi * np.where(t2 < 0.5, 220, 330) * t2),
    ]
    decoded = []
    for i, wave in enumerate(signals):
        sf.write(root / f"clip{i}.wav", wave.astype(np.float32), 16000, subtype="PCM_16")
        audio, rate = sf.read(root / f"clip{i}.wav", dtype="float32")
        assert rate == 16000
        decoded.append(audio)
    return decoded


def write_tone(path: Path, seconds: float = 1.0, hz: float = 440.0, rate: int = 16000) -> Path:
    """A real audio file holding a sine tone; the format follows the suffix (.wav, .flac)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate)
    return path


@pytest.fixture(scope="session")
def librispeech(tmp_path_factory) -> Path:
    """A LibriSpeech subset folder in its published layout: two chapters, three utterances."""
    root = tmp_path_factory.mktemp("LibriSpeech") / "test-clean"
    transcripts = {("84", "121123"): ["GO DO YOU HEAR", "BUT IN LESS THAN FIVE MINUTES THE STAIRCASE GROANED"],
                   ("1089", "134686"): ["HE HOPED THERE WOULD BE STEW FOR DINNER"]}
    for (speaker, chapter), lines in transcripts.items():
        folder = root / speaker / chapter
        for i, _ in enumerate(lines):
            write_tone(folder / f"{speaker}-{chapter}-{i:04d}.flac", hz=200 + 50 * i)
        text = "".join(f"{speaker}-{chapter}-{i:04d} {line}\n" for i, line in enumerate(lines))
        (folder / f"{speaker}-{chapter}.trans.txt").write_text(text)
    return root


def synthetic_targets(k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Learnable synthetic targets: frame experts constant within each of the K segments (so every slot has a
    well-defined target), of different valid lengths per clip, padded with garbage past the length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([150, 100])
    frames = 160
    batch = {}
    pitch_levels = torch.randn(2, k, 2, generator=g)
    phone_classes = torch.randint(0, 6, (2, k), generator=g)
    pitch = torch.randn(2, frames, 2, generator=g) * 10
    phones = torch.randint(0, 6, (2, frames), generator=g)
    for b, n in enumerate(lengths.tolist()):
        for i in range(k):
            pitch[b, i * n // k:(i + 1) * n // k] = pitch_levels[b, i]
            phones[b, i * n // k:(i + 1) * n // k] = phone_classes[b, i]
    batch["target.pitch"], batch["target_len.pitch"] = pitch, lengths
    batch["target.phonetic"], batch["target_len.phonetic"] = phones, lengths
    batch["target.speaker"] = torch.randn(2, 8, generator=g)
    return batch


def kill_when(root: Path, pattern: str, marker: str, killed: list[int]) -> None:
    """Once a path under `root` matches glob `pattern`, SIGKILL the first process whose command line holds
    `marker` and append its pid to `killed`. Gives up after ten minutes. Run it in a thread beside the job."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not killed:
        if any(root.glob(pattern)):
            for process in psutil.process_iter(["cmdline"]):
                if any(marker in part for part in process.info["cmdline"] or []):
                    process.send_signal(signal.SIGKILL)
                    killed.append(process.pid)
                    return
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, what: str, timeout_s: float = 240.0):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what}"
        time.sleep(0.2)
    return value


def open_run(uri: str, run_name: str) -> str | None:
    """The run's id once it is open on the server (None while it is not, or the server is away)."""
    try:
        return tracking.find_run(uri, tracking.get_or_create_experiment(uri, "coat"), run_name)
    except mlflow.exceptions.MlflowException:
        return None


def wait_for_health(uri: str, timeout_s: float = 120.0) -> None:
    """Until the tracking server at `uri` answers /health."""
    def healthy() -> bool:
        try:
            return requests.get(f"{uri}/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_for(healthy, f"{uri} to answer /health", timeout_s)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, root: Path, *args: str, port: int | None = None):
    """A real `mlflow server` on `port` (default: a free one) of the loopback over `backend_uri` (log in `root`),
    answering /health; yields its URI and stops it, uvicorn worker included, on leaving."""
    uri = f"http://127.0.0.1:{port or free_port()}"
    # The GenAI job executor starts ~7 huey consumer processes and doubles start-up time; tracking needs none.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1",
           "--port", uri.rsplit(":", 1)[1], "--workers", "1", *args]
    log_path = root / "server.log"
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{uri}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the uvicorn worker goes too
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real tracking server that proxies artifacts (clients upload over HTTP into <root>/art)."""
    root = tmp_path_factory.mktemp("server").resolve()
    with mlflow_server(f"sqlite:///{root}/db", root, "--artifacts-destination", str(root / "art")) as uri:
        yield uri, root / "art"


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries Debian's `postgresql` installs (/usr/lib/postgresql/<major>/bin)."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parent.parent.name.isdigit()]
    return max(found, key=lambda p: int(p.parent.name), default=None)


@contextlib.contextmanager
def postgres_server():
    """A real PostgreSQL server of its own: a cluster initialised in a temporary folder, listening on a free port of
    127.0.0.1 only (its unix socket in that folder), up to 200 connections (4 MLflow workers' pools and more).
    Yields `new_database(name)`, which creates database `name` and returns its SQLAlchemy URI (the driver named:
    a bare `postgresql://` makes SQLAlchemy 2 look for psycopg 3); stops the server and removes the folder on
    leaving. PostgreSQL refuses to run as root: as root, it runs as the `postgres` user."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's server binaries (/usr/lib/postgresql/*/bin/initdb) are absent: `make test-slow` "
                    "installs Debian's postgresql")
    # Not under pytest's temporary root, which only its owner may enter; short, for the unix socket's path.
    root = Path(tempfile.mkdtemp(prefix="coat-pg-", dir="/tmp"))
    owner = {}
    if os.geteuid() == 0:
        import pwd  # Unix only, as PostgreSQL's refusal of root is

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root, PostgreSQL needs the `postgres` user that Debian's postgresql creates "
                        "(`make test-slow` installs it)")
        os.chown(root, account.pw_uid, account.pw_gid)
        owner = {"user": account.pw_uid, "group": account.pw_gid}
    data, log, port = root / "data", root / "server.log", free_port()

    def run(tool: str, *args: str) -> None:
        done = subprocess.run([str(bin_dir / tool), *args], cwd=root, capture_output=True, text=True, **owner)
        if done.returncode:
            server_log = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
                               f"{server_log}")

    def new_database(name: str) -> str:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
        return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{name}"

    try:
        run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync")
        run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c max_connections=200", "start")
        try:
            yield new_database
        finally:
            run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the session (`postgres_server`): `postgres(name)` creates a database."""
    with postgres_server() as new_database:
        yield new_database


_databases = itertools.count()


@pytest.fixture
def postgres_uri(postgres) -> str:
    """The URI of a fresh database of the session's PostgreSQL server, one per test."""
    return postgres(f"coat_{next(_databases)}")
