"""The cluster guide's commands, run for real: `ray up` of cluster/local.yaml over SSH to 127.0.0.1, `ray submit` of an
experiment script, its sweep's runs on the cluster's MLflow server, `ray down`.

The test overlays only what cannot run here: the machines (127.0.0.1, no workers), the SSH login (a key made for
the test, an sshd of its own), and the setup commands that would download uv and install the project (replaced by
one that writes the same environment file, pointing at this venv, and the file's own command that makes the
secrets). The file mounts, the head's start commands
(Ray, the MLflow server) and the script's way of finding its configs are the file's own. Runs in the slow tier
(`make test-slow` installs openssh-server and rsync, and runs it alone: the file's `ray stop` stops every Ray on
this machine); minutes.
"""

import getpass
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from tests.conftest import free_port
from tests.test_cluster import AUTH_EXPORT, secrets_command

ROOT = Path(__file__).parents[1]
SSHD = Path("/usr/sbin/sshd")
MLFLOW_PORT = 5000  # the port the cluster file's MLflow server and URI use

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture()
def sshd(tmp_path):
    """An sshd of the test's own on 127.0.0.1:22 (Ray's launcher has no SSH port setting), trusting a new key."""
    if not SSHD.is_file() or shutil.which("rsync") is None:
        pytest.skip("needs openssh-server and rsync (`make test-slow` installs them)")
    if port_taken(22) or port_taken(MLFLOW_PORT):
        pytest.skip(f"127.0.0.1:22 or :{MLFLOW_PORT} is taken: the launched cluster needs both")
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keys / name], check=True)
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    (keys / "sshd_config").write_text("\n".join([
        "ListenAddress 127.0.0.1:22", f"HostKey {keys / 'host'}", f"AuthorizedKeysFile {keys / 'authorized_keys'}",
        f"PidFile {keys / 'sshd.pid'}", "PasswordAuthentication no", "PermitRootLogin prohibit-password",
        "UsePAM no", "StrictModes no", "MaxStartups 100", "MaxSessions 100", ""]))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", keys / "sshd_config"], stderr=subprocess.DEVNULL)
    for _ in range(100):
        if port_taken(22):
            break
        time.sleep(0.1)
    yield keys / "client"
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture()
def home_restored():
    """`ray up` edits the SSH user's home as on a real node (~/.bashrc, the bootstrap files): put it back after."""
    home = Path.home()
    bashrc = home / ".bashrc"
    before = bashrc.read_bytes() if bashrc.exists() else None
    created = [p for p in (home / "ray_bootstrap_config.yaml", home / "ray_bootstrap_key.pem") if not p.exists()]
    yield
    if before is None:
        bashrc.unlink(missing_ok=True)
    else:
        bashrc.write_bytes(before)
    for path in created:
        path.unlink(missing_ok=True)


def overlay(tmp_path: Path, shared: Path, key: Path, ray_port: int) -> Path:
    """cluster/local.yaml on this machine: the test's login, the project mounted under tmp_path, `shared` as the
    shared storage, and this venv in place of the download-and-install setup."""
    config = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    project, env = tmp_path / "project", tmp_path / "coat.env"
    config["cluster_name"] = f"coat-test-{ray_port}"
    config["provider"] |= {"head_ip": "127.0.0.1", "worker_ips": []}
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(key)}
    config["file_mounts"] = {target.replace("~/coat", str(project)): source
                             for target, source in config["file_mounts"].items()}
    exports = {"COAT_STORAGE": shared, "COAT_PROJECT": project, "HF_HUB_OFFLINE": "1",
               "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{MLFLOW_PORT}", "RAY_ADDRESS": f"127.0.0.1:{ray_port}"}
    (env_command,) = [cmd for cmd in config["setup_commands"] if "> ~/coat.env" in cmd]
    lines = [f"export {k}={v}" for k, v in exports.items()] + [f". {Path(sys.executable).parent / 'activate'}"]
    lines += AUTH_EXPORT.findall(env_command)  # the file's own: Ray's token and the MLflow login
    config["setup_commands"] = [
        f"printf '%s\\n' {' '.join(shlex.quote(line) for line in lines)} > {env} && "
        f"(grep -qxF '. {env}' ~/.bashrc || echo '. {env}' >> ~/.bashrc)", secrets_command(config)]
    config["head_start_ray_commands"] = [c.replace("--port=6379", f"--port={ray_port}")
                                         for c in config["head_start_ray_commands"]]
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ray(*args: str, timeout: int) -> subprocess.CompletedProcess:
    done = subprocess.run([str(Path(sys.executable).parent / "ray"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, f"ray {args[0]} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.mark.timeout(1500)  # above the sum of the commands' own limits (1440 s)
def test_ray_up_submit_and_down_on_a_local_cluster_over_ssh(tmp_path, sshd, home_restored, monkeypatch):
    shared = Path(tempfile.mkdtemp(prefix="coat-shared-"))  # as root, the head's PostgreSQL runs as `postgres`:
    shared.chmod(0o755)                                      # it must get in, as into a cluster's /mnt/shared
    cluster = overlay(tmp_path, shared, sshd, free_port())
    cpu_tiny = ["backbone.size=tiny", "backbone.checkpoint=null", "backbone.dtype=float32", "train.use_gpu=false",
                "train.num_workers=0", "train.cpus_per_worker=0.5", "experts.names=[mel]", "experts.settings={}",
                "data.max_seconds=8", "lora.modules_to_save=[lm_head]", "train.max_failures=0", "eval.batch_size=4"]
    try:
        ray("up", "-y", "--no-config-cache", str(cluster), timeout=300)
        assert (tmp_path / "project" / "experiments" / "configs").is_dir()
        checked = ray("exec", str(cluster), "coat preflight --json --config "
                      "$COAT_PROJECT/experiments/configs/train_tiny.yaml train.batch_size=2 data.max_seconds=2",
                      timeout=240)
        printed = [line for line in checked.stdout.splitlines() if not line.lstrip("\x1b[0123456789m").startswith("(")]
        start = len(printed) - printed[::-1].index("{") - 1  # Ray's forwarded worker logs, "(name pid=...)", dropped
        report = json.loads("\n".join(printed[start:printed.index("}", start) + 1]))
        assert report["ok"] and [c["status"] for c in report["checks"]] == ["ok"] * 6, report
        assert f"http://127.0.0.1:{MLFLOW_PORT}" in report["checks"][4]["detail"]
        submitted = ray("submit", str(cluster), "experiments/ablate_thinking_len.py", "--", "--smoke", "--",
                        *cpu_tiny, timeout=720)
        assert "executed notebook:" in submitted.stdout, submitted.stdout[-3000:]
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "coat")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", (shared / "secrets/mlflow-password").read_text())
        client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{MLFLOW_PORT}")
        [experiment] = [e for e in client.search_experiments() if e.name == "coat"]
        runs = client.search_runs([experiment.experiment_id])
        [parent] = [r for r in runs if r.info.run_name == "sweep-ablate_thinking_len-smoke"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.data.params["thinking.num_slots"] for r in children) == ["0", "4"]
        assert {r.info.status for r in children} == {"FINISHED"} == {parent.info.status}
        assert all(any(key.startswith("eval/") for key in r.data.metrics) for r in children)
        assert (shared / "mlflow" / "postgres" / "PG_VERSION").is_file(), "the runs are in the head's PostgreSQL"
    finally:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "down", "-y", str(cluster)], cwd=ROOT,
                       capture_output=True, timeout=180)
        subprocess.run([str(Path(sys.executable).parent / "supervisorctl"), "-c",  # the head's MLflow supervisor
                        str(tmp_path / "project" / "cluster" / "mlflow-supervisord.conf"), "shutdown"],
                       capture_output=True, timeout=60)
        servers = [p for p in psutil.process_iter(["cmdline"]) if str(shared) in " ".join(p.info["cmdline"] or [])]
        for proc in servers:  # `ray down` stops Ray, not the head's MLflow server (on a cloud the node goes)
            proc.terminate()
        psutil.wait_procs(servers, timeout=10)
        shutil.rmtree(shared, ignore_errors=True)
