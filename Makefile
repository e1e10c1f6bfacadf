# The README's commands. Each target sets up the virtual environment on first use.
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: setup demo analysis test test-slow test-faults test-browser bench dashboard lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,cluster]'
	rm -f .venv/.installed-* && touch $@

# The main job on the embedded default: the thinking-length ablation (local Ray, tiny qwen2-audio, coat-mini,
# MLflow in ./mlruns.db — `make dashboard` shows it).
demo: setup
	$(PY) experiments/ablate_thinking_len.py

analysis: setup
	.venv/bin/coat analyze

test: setup
	$(PY) -m pytest -q

# The cluster test launches a Ray cluster over SSH to 127.0.0.1 (openssh-server and rsync from Debian's packages);
# its `ray stop` would stop the other tests' Ray, so it runs on its own, last. The PostgreSQL-backed MLflow tests
# start a PostgreSQL server of their own from Debian's postgresql (initdb, pg_ctl).
test-slow: setup
	(test -x /usr/sbin/sshd && command -v rsync > /dev/null) || (apt-get update -q && apt-get install -y -q openssh-server rsync)
	ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 || (apt-get update -q && apt-get install -y -q postgresql)
	$(PY) -m pytest -q -m "slow and not cluster"
	$(PY) -m pytest -q -m cluster

# The head's MLflow start command runs PostgreSQL from Debian's postgresql package, as a cluster's head does.
test-faults: setup
	ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 || (apt-get update -q && apt-get install -y -q postgresql)
	$(PY) -m pytest -q -m faults

# The dashboard read in headless Chromium: Debian's chromium (Playwright drives it; no browser download).
test-browser: setup
	test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)
	$(PY) -m pip install -q -e '.[dev,cluster,browser]'
	$(PY) -m pytest -q -m browser

bench: setup
	$(PY) experiments/benchmarks/model_overhead.py --size tiny
	$(PY) experiments/benchmarks/data_throughput.py
	$(PY) experiments/benchmarks/train_throughput.py
	$(PY) experiments/benchmarks/sweep_efficiency.py

dashboard: setup
	@$(PY) -c "from coat import tracking; uri = tracking.resolve_uri(None); \
		print('MLflow dashboard, coat runs:', tracking.dashboard_link(uri, tracking.get_or_create_experiment(uri, 'coat')))"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlruns.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port 5000

lint: setup
	.venv/bin/ruff check coat experiments tests analysis
