"""Starting Ray or attaching to it, in one place: training, sweeps, precompute, preflight and the experiment
scripts all come through here, so they agree on what "a cluster" means and on Ray's settings."""

from __future__ import annotations

import logging
import os

import ray

# Ray Train's placement-group cleaner asks Ray's state API, which the dashboard serves, whether the controller
# lives; a local Ray without the dashboard (what this project installs) leaves it warning every second of a run.
QUIET_IN_WORKERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_workers() -> None:
    """Each of this job's Ray worker processes runs this first (`worker_process_setup_hook`)."""
    for name in QUIET_IN_WORKERS:
        logging.getLogger(name).setLevel(logging.ERROR)


# Ray stops a worker idle for a second (its default) once a node's workers outnumber its CPUs, which on a small
# machine running trials, Ray Train workers and Ray Data's own actors they always do: the decode tasks of every
# epoch and every trial then waited for new processes, each importing torch again (a grid sweep on 2 CPUs started
# 27 worker processes, 13 with this, and took 13 % less time). A worker idle for a minute still goes.
IDLE_WORKER_MS = 60_000


def ensure_ray() -> None:
    """Start a local Ray (or attach to RAY_ADDRESS) unless this process already has one."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on for local clusters
        os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", str(IDLE_WORKER_MS))  # read at start
        ray.init(runtime_env={"worker_process_setup_hook": quiet_workers})


def attach_cluster() -> bool:
    """Attach to the cluster when there is one: `ray job submit` sets RAY_ADDRESS, and the cluster configs set
    COAT_STORAGE on every node (`ray submit` runs the script on the head). Not by probing with
    address="auto" alone, which would also attach to any local Ray left running on a workstation.
    Returns False without a cluster: the caller starts a local Ray (`ensure_ray`) when it needs one."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not (os.environ.get("RAY_ADDRESS") or os.environ.get("COAT_STORAGE")):
        return False
    ray.init(address="auto")
    return True


def quiet(dataset):
    """`dataset`, to run without Ray Data's own progress output: coat shows its own progress where one helps (the
    precompute's bar), and a training worker's pipeline per epoch would only flood the logs. Ray Data then says
    once that its bars are off, and logs each execution's start, plan and end at INFO: neither is for a user."""
    dataset.context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return dataset
