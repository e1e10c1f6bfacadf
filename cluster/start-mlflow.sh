#!/usr/bin/env bash
# The cluster's MLflow tracking server, started on the head by head_start_ray_commands (gpu.yaml, local.yaml) from
# the environment ~/coat.env gives, plus COAT_MLFLOW_PORT. Returns at once: supervisord (mlflow-supervisord.conf)
# runs PostgreSQL and the server in the background and restarts either whenever it exits. Started once: `ray up`
# runs this again, and a running supervisord is left alone.
#
# The store is PostgreSQL, in $COAT_STORAGE/mlflow/postgres on shared storage, so runs outlive `ray down` (a hard
# NFS mount, as the configs mount it, is what PostgreSQL asks of a network file system). It listens on a Unix
# socket only, in a folder only its own user may enter, so only the head's user (and root) reach it. COAT_MLFLOW_BACKEND in ~/coat.env (a
# `postgresql+psycopg2://...` URI of a managed database) replaces it, and then no local PostgreSQL runs.
set -euo pipefail
conf="$COAT_PROJECT/cluster/mlflow-supervisord.conf"
if supervisorctl -c "$conf" pid > /dev/null 2>&1; then
  exit 0
fi
mkdir -p "$COAT_STORAGE/mlflow"
export COAT_PG_DATA="$COAT_STORAGE/mlflow/postgres" COAT_PG_SOCKET="/tmp/coat-pg-$(id -un)"
if [ -n "${COAT_MLFLOW_BACKEND:-}" ]; then
  export COAT_LOCAL_POSTGRES=false COAT_PG_BIN=/nonexistent COAT_PG_USER="$(id -un)"
else
  COAT_PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2> /dev/null | sort -V | tail -n 1)"
  if [ -z "$COAT_PG_BIN" ]; then
    echo "start-mlflow.sh: no PostgreSQL under /usr/lib/postgresql: install the distribution's postgresql package" \
         "(head_setup_commands does) or set COAT_MLFLOW_BACKEND to a managed database's URI" >&2
    exit 1
  fi
  # PostgreSQL refuses to run as root: a head logged into as root runs it as the distribution's postgres user.
  COAT_PG_USER="$(id -un)"
  if [ "$(id -u)" = 0 ]; then COAT_PG_USER=postgres; fi
  as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
  mkdir -p "$COAT_PG_DATA" "$COAT_PG_SOCKET"
  chown "$COAT_PG_USER" "$COAT_PG_DATA" "$COAT_PG_SOCKET" && chmod 700 "$COAT_PG_DATA" "$COAT_PG_SOCKET"
  if [ ! -s "$COAT_PG_DATA/PG_VERSION" ]; then
    as_pg "$COAT_PG_BIN/initdb" -D "$COAT_PG_DATA" -U coat --auth=trust > "$HOME/mlflow-initdb.log"
    echo "CREATE DATABASE mlflow" | as_pg "$COAT_PG_BIN/postgres" --single -D "$COAT_PG_DATA" postgres > /dev/null
  fi
  export COAT_LOCAL_POSTGRES=true COAT_PG_BIN COAT_PG_USER
  export COAT_MLFLOW_BACKEND="postgresql+psycopg2://coat@/mlflow?host=$COAT_PG_SOCKET"
fi
# A server worker per 4 cores of the head, 2 to 4 (4 took 64 trials logging every second with p99 0.5 s:
# docs/platform.md). Each worker serves up to 40 requests at once, and a metrics write holds one database
# connection while it takes a second, so its pool (mlflow-supervisord.conf) has 45 connections: with SQLAlchemy's
# default 15, fifteen concurrent writes hold them all and wait on each other until they time out. 4 x 45 = 180
# connections, within PostgreSQL's 250.
workers=$(( $(nproc) / 4 ))
export COAT_MLFLOW_WORKERS=$(( workers < 2 ? 2 : workers > 4 ? 4 : workers ))
export MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$COAT_STORAGE/secrets/mlflow-flask-key")"
supervisord -c "$conf"
