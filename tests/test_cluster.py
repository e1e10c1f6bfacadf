"""Offline checks of the cluster configs in cluster/: Ray's own schema validator on the launcher YAMLs, the
environment their setup commands leave on a node (run through Ray's own command wrapping in a scratch home), the
KubeRay RayJob's shape, and that every path they name exists in the repository. No network, no cloud credentials."""

import configparser
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import jsonschema
import mlflow
import psutil
import pytest
import ray
import yaml
from ray.autoscaler._private.command_runner import _with_interactive
from ray.autoscaler._private.util import prepare_config, validate_config, with_head_node_ip
from ray.runtime_env import RuntimeEnv

from coat import tracking
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = ["gpu.yaml", "local.yaml"]
ENV_VARS = ("COAT_STORAGE", "COAT_PROJECT", "HF_HOME", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI")
SCRIPT_PATH = re.compile(r"experiments/[\w/.-]+\.py")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key, [])]


def require_script(path: str) -> None:
    assert (ROOT / path).is_file(), f"{path} is named in cluster/ but does not exist"


def run_like_ray(cmd: str, home: Path, head_ip: str | None = None) -> str:
    """Run `cmd` as Ray's SSH command runner runs it on a node: `bash --login -i` after `source ~/.bashrc`, with
    RAY_HEAD_IP exported first on a worker (as the autoscaler does). `home` stands in for the node's home."""
    if head_ip is not None:
        cmd = with_head_node_ip([cmd], head_ip)[0]
    result = subprocess.run(" ".join(_with_interactive(cmd)), shell=True, stdin=subprocess.DEVNULL, capture_output=True,
                            env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def node_env(home: Path) -> dict[str, str]:
    out = run_like_ray("env", home)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_ray_validator_accepts_launcher_config(name):
    validate_config(prepare_config(load(name)))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_ray_validator_rejects_unknown_keys(name):
    """Proves the validator above is strict: a misspelt key at the top or inside a node type fails."""
    raw = load(name)
    raw["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(raw))
    prepared = prepare_config(load(name))
    node_type = next(iter(prepared["available_node_types"].values()))
    node_type["gpus"] = 8
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        validate_config(prepared)


def test_gpu_cluster_has_cpu_head_and_autoscaling_gpu_workers():
    config = prepare_config(load("gpu.yaml"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert [t["resources"].get("GPU", 0) >= 1 for t in workers.values()] == [True]
    (worker,) = workers.values()
    assert worker["min_workers"] == 0 < worker["max_workers"] <= config["max_workers"]
    assert all(t["node_config"].get("InstanceType") for t in types.values())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_file_mounts_carry_what_the_install_needs(name):
    """Every mount source exists, and the directory `pip install -e` installs receives pyproject.toml, its readme,
    the package and the experiment scripts."""
    config = load(name)
    mounts = config["file_mounts"]
    for remote, local in mounts.items():
        assert (ROOT / local).exists(), f"{name}: file_mounts source {local!r} (for {remote}) is missing"
    installs = [cmd for cmd in all_commands(config) if "pip install" in cmd and " -e " in cmd]
    assert len(installs) == 1, installs
    tokens = shlex.split(installs[0])
    target, _, extras = tokens[tokens.index("-e") + 1].replace("$HOME", "~").partition("[")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["name"] == "coat"
    assert set(extras.rstrip("]").split(",")) - {""} <= set(project["project"]["optional-dependencies"])
    for needed in ["pyproject.toml", project["project"]["readme"], "coat", "experiments", SUPERVISOR_CONF]:
        assert mounts.get(f"{target}/{needed}") == needed, f"{name}: {target}/{needed} is not mounted from {needed}"


def test_ray_version_pins_match_installed_ray():
    """The cluster must run the Ray that drives it from here."""
    pins = [pin for name in LAUNCHER_CONFIGS for cmd in all_commands(load(name))
            for pin in re.findall(r"ray\[[\w,]+\]==([\w.]+)", cmd)]
    assert pins and set(pins) == {ray.__version__}
    assert load("rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_setup_commands_give_every_process_the_environment(name, tmp_path):
    """Runs the env-file setup command as Ray would, on a worker (RAY_HEAD_IP set) and on the head (unset), then
    checks what a later command (`ray start`, the `ray submit` driver) sees, including the activated venv."""
    config = load(name)
    (env_cmd,) = [cmd for cmd in config["setup_commands"] if "> ~/coat.env" in cmd]
    worker, head = tmp_path / "worker", tmp_path / "head"
    for home in (worker, head):
        home.mkdir()
        (home / ".bashrc").write_text("")
    for _ in range(2):  # `ray up` reruns setup commands: the ~/.bashrc hook must not pile up
        run_like_ray(env_cmd, worker, head_ip="10.1.2.3")
    assert (worker / ".bashrc").read_text().splitlines() == [". ~/coat.env"]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", worker / "coat-venv"], check=True)

    env = node_env(worker)
    assert {k: env.get(k) for k in ENV_VARS} == {
        "COAT_STORAGE": "/mnt/shared/coat", "COAT_PROJECT": str(worker / "coat"), "HF_HOME": "/mnt/shared/hf",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": "http://10.1.2.3:5000",
    }
    assert run_like_ray("command -v python", worker).strip() == str(worker / "coat-venv/bin/python")

    run_like_ray(env_cmd, head)
    head_ip = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()[0]
    assert node_env(head)["MLFLOW_TRACKING_URI"] == f"http://{head_ip}:5000"


LOOPBACK = {"127.0.0.1", "localhost", "::1"}
AUTH_EXPORT = re.compile(r"'(export (?:RAY_AUTH_\w+|MLFLOW_TRACKING_(?:USERNAME|PASSWORD))=[^']*)'")


def secrets_command(config: dict) -> str:
    (cmd,) = [c for c in config["setup_commands"] if "/secrets" in c and "> ~/coat.env" not in c]
    return cmd


def flag(cmd: str, name: str) -> str | None:
    """The value of `--name=value` or `--name value` in a shell command line."""
    tokens = shlex.split(cmd.replace(";", " "))
    for i, token in enumerate(tokens):
        if token == name and i + 1 < len(tokens):
            return tokens[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_no_launcher_config_opens_a_service_without_auth(name, tmp_path):
    """Anyone who reaches Ray's GCS or dashboard (its Jobs API) runs code on the cluster, and anyone who reaches the
    MLflow server reads and rewrites every run: every node runs Ray with token auth, the dashboard listens on loopback,
    and an MLflow server that listens beyond loopback runs the basic-auth app with the password every node holds."""
    config = load(name)
    (env_cmd,) = [cmd for cmd in config["setup_commands"] if "> ~/coat.env" in cmd]
    (tmp_path / ".bashrc").write_text("")
    run_like_ray(env_cmd, tmp_path, head_ip="10.1.2.3")
    env = node_env(tmp_path)
    assert env.get("RAY_AUTH_MODE") == "token", f"{name}: Ray's GCS and dashboard accept anyone"
    assert env.get("RAY_AUTH_TOKEN_PATH") == "/mnt/shared/coat/secrets/ray-token"
    assert env.get("MLFLOW_TRACKING_USERNAME") == "coat" and "MLFLOW_TRACKING_PASSWORD" in env
    (head,) = [cmd for cmd in config["head_start_ray_commands"] if "ray start --head" in cmd]
    assert flag(head, "--dashboard-host") in LOOPBACK, f"{name}: the dashboard listens beyond loopback"
    assert START_SCRIPT in mlflow_start_command(name), f"{name}: the MLflow server runs from elsewhere"
    server, environment = mlflow_program()
    if flag(server, "--host") not in LOOPBACK:
        assert flag(server, "--app-name") == "basic-auth", f"{name}: MLflow listens beyond loopback without auth"
        assert 'MLFLOW_AUTH_ADMIN_PASSWORD="%(ENV_MLFLOW_TRACKING_PASSWORD)s"' in environment


def test_rayjob_opens_its_dashboard_only_with_token_auth():
    """KubeRay's job submitter reaches the dashboard through the head's Service, so it listens beyond loopback:
    then Ray's token auth must be on (KubeRay's authOptions, or RAY_AUTH_MODE=token in every container)."""
    spec = load("rayjob.yaml")["spec"]["rayClusterSpec"]
    if spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "127.0.0.1") in LOOPBACK:
        return
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    in_every_container = all({"name": "RAY_AUTH_MODE", "value": "token"} in c.get("env", [])
                             for pod in pods for c in pod["template"]["spec"]["containers"])
    assert spec.get("authOptions", {}).get("mode") == "token" or in_every_container


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_secrets_are_made_once_for_the_owner_only(name, tmp_path):
    """The secrets command, run as Ray runs it on two nodes that share storage, makes each secret once (a rerun or
    a second node keeps it), readable by the SSH user alone; the environment file hands the password to MLflow."""
    shared = tmp_path / "shared"
    homes = [tmp_path / "head", tmp_path / "worker"]
    for home in homes:
        home.mkdir()
        (home / ".bashrc").write_text(f"export COAT_STORAGE={shared}\n")
    config = load(name)
    run_like_ray(secrets_command(config), homes[0])
    made = {p.name: p.read_text() for p in (shared / "secrets").iterdir()}
    run_like_ray(secrets_command(config), homes[0])
    run_like_ray(secrets_command(config), homes[1], head_ip="10.1.2.3")
    assert {p.name: p.read_text() for p in (shared / "secrets").iterdir()} == made
    assert set(made) == {"ray-token", "mlflow-password", "mlflow-flask-key"} and len(set(made.values())) == 3
    assert all(re.fullmatch(r"[0-9a-f]{64}", value) for value in made.values()), made
    assert (shared / "secrets").stat().st_mode & 0o777 == 0o700
    assert {(shared / "secrets" / n).stat().st_mode & 0o777 for n in made} == {0o600}
    (env_cmd,) = [cmd for cmd in config["setup_commands"] if "> ~/coat.env" in cmd]
    run_like_ray(env_cmd.replace("/mnt/shared/coat", str(shared)), homes[1], head_ip="10.1.2.3")
    env = node_env(homes[1])
    assert env["MLFLOW_TRACKING_PASSWORD"] == made["mlflow-password"]
    assert Path(env["RAY_AUTH_TOKEN_PATH"]).read_text() == made["ray-token"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SUPERVISOR_CONF = "cluster/mlflow-supervisord.conf"
START_SCRIPT = "cluster/start-mlflow.sh"


def mlflow_start_command(name: str) -> str:
    (cmd,) = [c for c in load(name)["head_start_ray_commands"] if START_SCRIPT in c]
    return cmd


def mlflow_program() -> tuple[str, str]:
    """The MLflow server's command line and environment, as supervisord runs them."""
    parser = configparser.RawConfigParser()
    parser.read(ROOT / SUPERVISOR_CONF)
    return parser["program:mlflow"]["command"], parser["program:mlflow"]["environment"]


def test_launcher_configs_share_the_mlflow_server_command():
    """The faults test below runs gpu.yaml's command; local.yaml's must be the same, on the port the URI names,
    and both must ship the PostgreSQL store the script starts (the distribution's package on the head)."""
    cmd = mlflow_start_command("gpu.yaml")
    assert mlflow_start_command("local.yaml") == cmd
    assert cmd.count("COAT_MLFLOW_PORT=5000") == 1 and "--port %(ENV_COAT_MLFLOW_PORT)s" in mlflow_program()[0]
    script = (ROOT / START_SCRIPT).read_text()
    assert "nohup" not in script, "a server that dies stays dead: run it under the supervisor"
    assert "sqlite" not in mlflow_program()[0] + script, "SQLite serialises every write of dozens of trials"
    for name in LAUNCHER_CONFIGS:
        assert any("apt-get install" in c and "postgresql" in c for c in load(name).get("head_setup_commands", [])), \
            f"{name}: the head has no PostgreSQL"
        assert load(name)["file_mounts"].get(f"~/coat/{START_SCRIPT}") == START_SCRIPT, name


@pytest.mark.faults  # PostgreSQL and an MLflow server started by supervisord, each killed and restarted: ~2 min
def test_head_runs_one_mlflow_server_on_postgresql_under_a_supervisor_that_restarts_both(tmp_path, monkeypatch):
    """Runs the head's MLflow start command as Ray would (on a free port instead of the URI's 5000): it must return at
    once (an SSH session that waits on the server would hang `ray up`), refuse a client without the password the
    secrets command made, serve runs whose PostgreSQL store and artifacts land under $COAT_STORAGE, not start a
    second server when `ray up` reruns it, and when the server or PostgreSQL is killed (as the OOM killer would),
    serve again with the run and its metrics intact; a write made while PostgreSQL is away is not lost."""
    port = free_port()
    cmd = mlflow_start_command("gpu.yaml").replace("5000", str(port))
    home = Path(tempfile.mkdtemp(prefix="coat-head-"))  # as root, PostgreSQL runs as `postgres`: it must get in
    home.chmod(0o755)
    shared = home / "shared"
    shared.mkdir(mode=0o755)  # as the initialization commands make it
    venv_bin = Path(sys.executable).parent
    exports = AUTH_EXPORT.findall(next(c for c in load("gpu.yaml")["setup_commands"] if "> ~/coat.env" in c))
    (home / ".bashrc").write_text("\n".join([f"export COAT_STORAGE={shared}", f"export COAT_PROJECT={ROOT}",
                                              f"export PATH={venv_bin}:$PATH", *exports, ""]))
    run_like_ray(secrets_command(load("gpu.yaml")), home)
    password = (shared / "secrets" / "mlflow-password").read_text()
    supervisorctl = f"supervisorctl -c {ROOT / SUPERVISOR_CONF}"
    uri = f"http://127.0.0.1:{port}"

    def supervised(program: str) -> int:
        """The pid of `program` as supervisord runs it (0: not running)."""
        return int(run_like_ray(f"{supervisorctl} pid {program}", home).strip() or 0)

    try:
        run_like_ray(cmd, home)
        wait_until_healthy(uri)
        with pytest.raises(tracking.TrackingUnavailableError, match="HTTP 401"):
            tracking.check_reachable(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "coat")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        tracking.check_reachable(uri)
        client = mlflow.MlflowClient(tracking_uri=uri)
        run_id = client.create_run(client.create_experiment("cluster-test")).info.run_id
        client.log_metric(run_id, "loss", 0.5, step=1)
        (tmp_path / "table.txt").write_text("k,loss\n4,0.5\n")
        client.log_artifact(run_id, str(tmp_path / "table.txt"))
        assert (shared / "mlflow/postgres/PG_VERSION").is_file() and (shared / "mlflow/basic_auth.db").is_file()
        assert not (shared / "mlflow/mlruns.db").exists()
        assert [p.name for p in (shared / "mlflow/artifacts").rglob("table.txt")] == ["table.txt"]
        server, database = supervised("mlflow"), supervised("postgres")
        assert psutil.Process(database).username() == ("postgres" if os.geteuid() == 0 else psutil.Process().username())
        run_like_ray(cmd, home)
        assert supervised("mlflow") == server, "a second `ray up` started a second server"
        for web_server in psutil.Process(server).children(recursive=True):  # what the OOM killer would pick
            web_server.kill()
        wait_until_healthy(uri, lambda: supervised("mlflow") not in (0, server))
        client.log_metric(run_id, "loss", 0.25, step=2)
        run = tracking.TrackedRun(uri, run_id, tmp_path / "spool", retry_s=1)
        psutil.Process(database).kill()
        run.log_metrics({"loss": 0.125}, step=3)  # answered 503 until PostgreSQL is back
        wait_until_healthy(uri, lambda: supervised("postgres") not in (0, database))
        wait_for(run.flush, "the spooled write to reach the restarted store", 120)
        assert tracking.metric_history(uri, run_id, "loss") == [(1, 0.5), (2, 0.25), (3, 0.125)]
    finally:
        subprocess.run(f"HOME={home} {venv_bin}/{supervisorctl} shutdown", shell=True, capture_output=True)
        leftover = [p for p in psutil.process_iter(["cmdline"]) if str(shared) in " ".join(p.info["cmdline"] or [])]
        for proc in leftover:
            proc.kill()
        shutil.rmtree(home, ignore_errors=True)


def wait_until_healthy(uri: str, restarted=lambda: True, timeout_s: float = 180) -> None:
    """Until the server at `uri` answers /health (and `restarted()` holds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if subprocess.run(["curl", "-sf", f"{uri}/health"], capture_output=True).returncode == 0 and restarted():
            return
        time.sleep(0.5)
    raise AssertionError(f"{uri} did not answer /health in {timeout_s:.0f} s")


NAMED_SCRIPTS = sorted({path for f in sorted(CLUSTER.iterdir()) for path in SCRIPT_PATH.findall(f.read_text())})


def test_configs_name_the_main_experiment():
    """Guards the scan behind the next test: each config names its script by repository path."""
    for name in [*LAUNCHER_CONFIGS, "rayjob.yaml", "README.md"]:
        assert "experiments/ablate_thinking_len.py" in SCRIPT_PATH.findall((CLUSTER / name).read_text()), name


@pytest.mark.parametrize("path", NAMED_SCRIPTS)
def test_named_script_exists(path):
    require_script(path)


def test_rayjob_header():
    job = load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_entrypoint_runs_an_experiment_script():
    tokens = shlex.split(load("rayjob.yaml")["spec"]["entrypoint"])
    assert tokens[0] == "python" and SCRIPT_PATH.fullmatch(tokens[1]), tokens
    require_script(tokens[1])


def test_rayjob_cluster_spec():
    """Fields the RayJob CRD requires, GPUs requested only by worker containers, the environment in every container,
    and every volume mount backed by a volume of its pod."""
    spec = load("rayjob.yaml")["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = spec["workerGroupSpecs"]
    assert groups
    pods = [("head", head["template"]["spec"])]
    for group in groups:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pods.append(("worker", group["template"]["spec"]))
    for role, pod in pods:
        volumes = {v["name"] for v in pod.get("volumes", [])}
        assert pod["containers"]
        for container in pod["containers"]:
            assert container["image"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert set(ENV_VARS) <= env.keys() and env["HF_HUB_OFFLINE"] == "1"
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
            resources = container["resources"]
            gpus = resources.get("limits", {}).get("nvidia.com/gpu", 0)
            if role == "worker":
                # Kubernetes schedules extended resources from limits; a request, if given, must equal it.
                assert gpus >= 1
                assert resources.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus
            else:
                assert gpus == 0 and "nvidia.com/gpu" not in resources.get("requests", {})


def test_rayjob_runtime_env_matches_the_image():
    """runtimeEnvYAML holds only runtime_env fields Ray knows, and its working_dir is where the README's image puts
    the repository (the submitter pod runs the head's image and uploads that copy)."""
    runtime_env = yaml.safe_load(load("rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) <= set(RuntimeEnv.known_fields), set(runtime_env) - set(RuntimeEnv.known_fields)
    install = re.search(r"RUN pip install .*-e (\S+)", (CLUSTER / "README.md").read_text())
    assert install and runtime_env["working_dir"] == install.group(1)
