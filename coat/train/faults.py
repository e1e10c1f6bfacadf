"""Deterministic fault injection, for the tests that kill training at its worst moments (a name no one sets by
mistake; a run with it set says so when it starts).

`COAT_TEST_SIGKILL_AT=<point>@<step>[,<point>@<step>...]`, read by `coat.train.launch.train`, makes rank 0
SIGKILL its own process when it reaches `point` at optimizer step `step`, once per run (a marker file in the run's
storage remembers that it fired, so the restarted worker carries on). Points: `step` (the step's update applied,
before any checkpoint covers it), `checkpoint` (mid-write: trained parts and step metrics written, training state
not), `reported` (the checkpoint handed to Ray Train or committed in-process, its metrics maybe not yet logged).
Unset, every call is a no-op.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "COAT_TEST_SIGKILL_AT"
POINTS = ("step", "checkpoint", "reported")
_armed: dict[tuple[str, int], Path] = {}


def parse(spec: str | None) -> list[tuple[str, int]]:
    """The (point, step) pairs of a `COAT_TEST_SIGKILL_AT` value. Raises ValueError naming a malformed entry."""
    faults = []
    for entry in spec.split(",") if spec else []:
        point, _, step = entry.strip().partition("@")
        if point not in POINTS or not step.isdigit():
            raise ValueError(f"{ENV}={spec!r}: {entry!r} is not <point>@<step> with point one of {', '.join(POINTS)}")
        faults.append((point, int(step)))
    return faults


def arm(spec: str | None, rank: int, marker_dir: Path) -> None:
    """Arm the faults of `spec` in this process when it is rank 0. Raises ValueError as `parse`."""
    _armed.clear()
    if rank == 0:
        _armed.update({(point, step): marker_dir / f".fault-{point}-{step}" for point, step in parse(spec)})


def point(name: str, step: int) -> None:
    """Kill this process here if a fault is armed at (`name`, `step`) and has not fired in this run yet."""
    marker = _armed.get((name, step))
    if marker is None or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)
