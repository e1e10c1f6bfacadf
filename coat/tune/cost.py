"""What a sweep will cost, before it runs: the bill an experiment script's `--dry-run` prints.

A trial costs its optimizer steps times the step time times its GPUs. The step time is measured, not guessed:
`coat preflight` stores what it measured in `<storage>/preflight/measurements.json` (`$COAT_STORAGE` when set, as
the experiment scripts use it on a cluster, else `train.storage`), one record per setting that determines a step's
time (`KEY`), with when, where and on which card. A dry run takes each trial's own record; when only K differs
from what was measured it scales the nearest K by tokens per example and says so; for any other difference it
names the difference and bills nothing rather than trust another setting in silence.

ASHA's saving is an estimate beside the bill without stopping: it assumes each of ASHA's decisions stops the
share of trials that ASHA's cutoff stops, 1 - 1/reduction_factor (see `asha_for`).

This module loads no torch, Ray or pandas: a dry run answers in about a second.
"""

from __future__ import annotations

import heapq
import json
import os
import shlex
import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from coat.config import CoATConfig, ThinkingConfig, apply_overrides
from coat.errors import UserError
from coat.locks import locked
from coat.tune.space import Param, Space, overrides

STORE = Path("preflight") / "measurements.json"
# What a step's time depends on, as a record's key, with the config field each comes from (for messages).
KEY = {"backbone": "backbone.name", "size": "backbone.size", "dtype": "backbone.dtype", "device": "train.use_gpu",
       "num_slots": "thinking.num_slots", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum",
       "clip_s": "data.max_seconds"}
# Fields a space may vary that change a trial's steps, step time or GPUs: a sampled space's bill averages over them.
COST_PATHS = {*KEY.values(), "backbone.name", "train.stages", "train.num_workers"}
EXCLUDED = ("start-up, validation, checkpoints and the final evaluation are not in the step time: --overhead-s adds "
            "a per-trial amount (e.g. a past run's time/eval_s)")


class MeasurementsError(UserError):
    """A measurements file that cannot be read; the message names it and the fix."""


def store_path(cfg: CoATConfig) -> Path:
    """Where preflight writes and a dry run reads: `$COAT_STORAGE` wins over `train.storage`, as it does for the
    experiment scripts on a cluster, so a preflight run with the cluster config lands where their dry run looks."""
    return Path(os.environ.get("COAT_STORAGE") or cfg.train.storage) / STORE


def setting_key(cfg: CoATConfig, device: str | None = None) -> dict:
    """The record key of a run of `cfg` on `device` (default: where `train.use_gpu` puts it)."""
    return {"backbone": cfg.backbone.name, "size": cfg.backbone.size, "dtype": cfg.backbone.dtype,
            "device": device or ("cuda" if cfg.train.use_gpu else "cpu"), "num_slots": cfg.thinking.num_slots,
            "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum, "clip_s": cfg.data.max_seconds}


def records_of(measurement: dict, measured_at: datetime | None = None) -> list[dict]:
    """One record per K that preflight's model check (`coat.preflight.measure_model`) timed."""
    when = (measured_at or datetime.now(UTC)).isoformat(timespec="seconds")
    base = {k: measurement[k] for k in KEY if k != "num_slots"}
    memory = measurement.get("memory") or {}
    return [{"key": {**base, "num_slots": t["num_slots"]}, "step_s": t["step_s"],
             "tokens_per_example": t["tokens_per_example"], "gpu": measurement.get("gpu"),
             "host": measurement.get("host", socket.gethostname()), "measured_at": when,
             "peak_gpu_gb": measurement.get("peak_gpu_gb"), "largest_batch": memory.get("largest_batch")}
            for t in measurement["step_times"]]


def load_records(path: Path) -> list[dict]:
    """The stored records ([] when there is no file). Raises MeasurementsError for a file that is not one."""
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())["measurements"]
        for record in records:
            if set(record["key"]) != set(KEY) or not record["step_s"] > 0:
                raise ValueError(f"a record's key must hold {', '.join(KEY)} and its step_s be positive: {record}")
    except (ValueError, KeyError, TypeError) as err:
        raise MeasurementsError(f"{path} is not a preflight measurements file ({err}): delete it and run "
                                "`coat preflight` again") from None
    return records


def save_records(path: Path, new: list[dict]) -> None:
    """Add `new` to the file at `path`, replacing records of the same setting measured on the same card. Several
    preflights may write at once on shared storage: under a lock, and replaced whole so a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_name(path.name + ".lock")):
        kept = [r for r in load_records(path)
                if not any(r["key"] == n["key"] and r.get("gpu") == n.get("gpu") for n in new)]
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps({"measurements": kept + new}, indent=1) + "\n")
        os.replace(partial, path)


@dataclass(frozen=True)
class StepTime:
    seconds: float | None  # None: no measurement fits, and `source` says what differs
    source: str
    kind: str  # measured, scaled, given, missing


def step_time(records: list[dict], key: dict) -> StepTime:
    """The step time of the setting `key`: its newest record; else the nearest K of the same setting, scaled;
    else missing, naming how the nearest record differs."""
    same = [r for r in records if all(r["key"][f] == key[f] for f in KEY if f != "num_slots")]
    exact = [r for r in same if r["key"]["num_slots"] == key["num_slots"]]
    if exact:
        record = max(exact, key=lambda r: r["measured_at"])
        return StepTime(record["step_s"], _origin(record), "measured")
    if same:
        return _scaled(same, key["num_slots"])
    if not records:
        return StepTime(None, "no preflight measurement", "missing")
    nearest = min(records, key=lambda r: len(_differences(r["key"], key)))
    return StepTime(None, "measured only for " + ", ".join(_differences(nearest["key"], key)), "missing")


def _origin(record: dict) -> str:
    return f"preflight {record['measured_at'][:16].replace('T', ' ')}, {record.get('gpu') or record['key']['device']}"


def _differences(measured: dict, wanted: dict) -> list[str]:
    return [f"{KEY[f]}={_shown(f, measured[f])} (this trial: {_shown(f, wanted[f])})"
            for f in KEY if measured[f] != wanted[f]]


def _shown(field_name: str, value) -> str:
    return str(value == "cuda").lower() if field_name == "device" else str(value)


def _scaled(same: list[dict], k: int) -> StepTime:
    """The nearest measured K's step time times the ratio of tokens per example, the thinking block's tokens being
    the only ones K changes: a step's time is taken to grow with its tokens."""
    newest_first = sorted(same, key=lambda r: r["measured_at"], reverse=True)
    record = min(newest_first, key=lambda r: abs(r["key"]["num_slots"] - k))
    measured_k, tokens = record["key"]["num_slots"], record["tokens_per_example"]
    scaled = tokens - block_tokens(measured_k) + block_tokens(k)
    return StepTime(record["step_s"] * scaled / tokens,
                    f"scaled from K={measured_k} by tokens {tokens} -> {scaled} ({_origin(record)})", "scaled")


def block_tokens(k: int) -> int:
    """Tokens the thinking block adds to a prompt at K = `k`."""
    return ThinkingConfig(num_slots=k).prefill_positions


@dataclass(frozen=True)
class Asha:
    """ASHA as `coat.tune.sweep` builds it: rungs as Ray places them, and the steps at which a trial meets them."""

    rungs: list[int]
    decisions: list[int]  # report steps at which ASHA decides on a trial (one rung per report)
    reduction_factor: int
    expected_steps: float  # per trial, if each decision stops 1 - 1/reduction_factor of the trials meeting it
    total_steps: int

    @property
    def fraction(self) -> float:
        return self.expected_steps / self.total_steps


def asha_for(cfg: CoATConfig) -> Asha:
    """The scheduler of `coat.tune.sweep._new_tuner` (max_t one past the last step, grace capped at it), its rungs
    computed as Ray's `_Bracket` does, met at the trial's reports (`report_steps`)."""
    total, rf = cfg.train.total_steps, cfg.sweep.reduction_factor
    max_t, grace = total + 1, min(cfg.sweep.grace_steps, total)
    count = int(np.log(max_t / grace) / np.log(rf) + 1)
    rungs = [grace * rf ** k for k in range(count)]
    decisions = decision_steps(rungs, report_steps(cfg))
    return Asha(rungs, decisions, rf, expected_steps(decisions, total, rf), total)


def report_steps(cfg: CoATConfig) -> list[int]:
    """The steps at which a trial reports to Tune: every `train.checkpoint_every` and each stage's end, as the
    training loop checkpoints."""
    ends, total = 0, cfg.train.total_steps
    stage_ends = set()
    for stage in cfg.train.stages:
        ends += stage.steps
        stage_ends.add(ends)
    return sorted(set(range(cfg.train.checkpoint_every, total + 1, cfg.train.checkpoint_every)) | stage_ends)


def decision_steps(rungs: list[int], reports: list[int]) -> list[int]:
    """At each report Ray's bracket decides at most one rung not yet decided whose milestone the trial has
    passed; a rung passed between two reports is decided at the later one, and rungs passed together are
    decided at successive reports."""
    decided, steps = 0, []
    for step in reports:
        if decided < sum(m <= step for m in rungs):
            decided += 1
            steps.append(step)
    return steps


def expected_steps(decisions: list[int], total: int, rf: int) -> float:
    """Steps per trial if each decision before the end stops 1 - 1/rf of the trials that reach it (ASHA's cutoff
    is that quantile of the rung's results): sum of P(stopped at d) * d, plus P(never stopped) * total."""
    reach, spent = 1.0, 0.0
    for step in (d for d in decisions if d < total):
        spent += reach * (1 - 1 / rf) * step
        reach /= rf
    return spent + reach * total


@dataclass
class Row:
    """Trials of one setting (a grid point and its seeds, or every sampled trial)."""

    setting: str
    trials: int
    steps: int
    gpus: int  # per trial
    step: StepTime
    overhead_s: float = 0.0

    @property
    def trial_s(self) -> float | None:
        return None if self.step.seconds is None else self.step.seconds * self.steps + self.overhead_s

    @property
    def gpu_hours(self) -> float | None:
        """One trial's GPU-hours."""
        return None if self.trial_s is None else self.trial_s * self.gpus / 3600


@dataclass
class Bill:
    search: str  # grid or optuna
    rows: list[Row]
    gpus: int
    gpus_from: str
    concurrency: int
    asha: Asha | None
    notes: list[str] = field(default_factory=list)

    @property
    def trials(self) -> int:
        return sum(r.trials for r in self.rows)

    @property
    def known(self) -> bool:
        return all(r.trial_s is not None for r in self.rows)

    @property
    def gpu_hours(self) -> float | None:
        return sum(r.gpu_hours * r.trials for r in self.rows) if self.known else None

    @property
    def wall_s(self) -> float | None:
        """Trials in order, each started on the first free slot of `concurrency`, as Tune launches them."""
        if not self.known:
            return None
        return makespan([r.trial_s for r in self.rows for _ in range(r.trials)], self.concurrency)

    @property
    def asha_gpu_hours(self) -> float | None:
        if self.asha is None or not self.known:
            return None
        return sum((r.step.seconds * self.asha.expected_steps + r.overhead_s) * r.gpus * r.trials / 3600
                   for r in self.rows)

    @property
    def asha_wall_s(self) -> float | None:
        """The expected trial-seconds spread over the slots, but never less than one trial run to the end."""
        if self.asha is None or not self.known:
            return None
        spent = sum((r.step.seconds * self.asha.expected_steps + r.overhead_s) * r.trials for r in self.rows)
        return max(spent / self.concurrency, max(r.trial_s for r in self.rows))

    def to_json(self) -> dict:
        rows = [{**asdict(r), "trial_s": r.trial_s, "gpu_hours_per_trial": r.gpu_hours} for r in self.rows]
        asha = None if self.asha is None else {**asdict(self.asha), "fraction": self.asha.fraction,
                                               "gpu_hours": self.asha_gpu_hours, "wall_s": self.asha_wall_s}
        return {"search": self.search, "trials": self.trials, "rows": rows, "gpus": self.gpus,
                "gpus_from": self.gpus_from, "concurrency": self.concurrency, "gpu_hours": self.gpu_hours,
                "wall_s": self.wall_s, "asha": asha, "notes": self.notes}


def makespan(durations: list[float], slots: int) -> float:
    free = [0.0] * max(1, slots)
    for duration in durations:
        heapq.heappush(free, heapq.heappop(free) + duration)
    return max(free)


def gpus_per_trial(cfg: CoATConfig) -> int:
    """GPUs a trial holds: one per worker (one in-process) when `train.use_gpu`, else none."""
    return max(1, cfg.train.num_workers) if cfg.train.use_gpu else 0


def concurrency(cfg: CoATConfig, gpus: int, cpus: float) -> int:
    """Trials at once on `gpus` GPUs and `cpus` CPUs: what `coat.tune.sweep.max_concurrent` derives, or
    `sweep.max_concurrent` where the resources hold that many."""
    per_trial = gpus_per_trial(cfg)
    if per_trial:
        fits = derived = gpus // per_trial
    else:
        trial_cpus = cfg.train.cpus_per_worker if cfg.train.num_workers == 0 else 0.5
        fits, derived = int(cpus // trial_cpus), int(cpus // (2 * trial_cpus))
    return max(1, min(cfg.sweep.max_concurrent, fits) if cfg.sweep.max_concurrent else derived)


def estimate(cfg: CoATConfig, space: Space, records: list[dict], *, step_s: float | None = None, gpus: int = 1,
             gpus_from: str = "default", cpus: float = 1.0, overhead_s: float = 0.0) -> Bill:
    """The bill of sweeping `space` over `cfg`: step times from `records` (or `step_s` for every trial), wall time
    on `gpus` GPUs (`gpus_from` says who said so) and `cpus` CPUs."""
    def timed(point_cfg: CoATConfig) -> StepTime:
        if step_s is not None:
            return StepTime(step_s, "--step-s", "given")
        return step_time(records, setting_key(point_cfg))

    if space.is_grid:
        seeds = max(1, len(cfg.sweep.seeds))
        rows = [_row(cfg, point, ", ".join(overrides(point)), seeds, timed, overhead_s) for point in space.grid()]
    else:
        rows = [_sampled_row(cfg, space, timed, overhead_s)]
    asha = asha_for(cfg) if not space.is_grid and cfg.sweep.scheduler == "asha" else None
    bill = Bill("grid" if space.is_grid else "optuna", rows, gpus, gpus_from,
                concurrency(cfg, gpus, cpus), asha)
    bill.notes += _notes(cfg, space, bill, step_s is not None)
    return bill


def _row(cfg: CoATConfig, point: dict, setting: str, trials: int, timed, overhead_s: float) -> Row:
    point_cfg = apply_overrides(cfg, overrides(point))
    return Row(setting, trials, point_cfg.train.total_steps, gpus_per_trial(point_cfg), timed(point_cfg), overhead_s)


def _sampled_row(cfg: CoATConfig, space: Space, timed, overhead_s: float) -> Row:
    """Every sampled trial in one row. Where the space varies what a step costs, the step time is the mean over
    its values (both bounds of a range): TPE draws them unevenly, and the note says the bill assumes evenly."""
    points = representative(space).grid()
    rows = [_row(cfg, point, "", 1, timed, overhead_s) for point in points]
    label = f"each of {cfg.sweep.num_samples} sampled trials"
    varied = sorted({path for p in points for path in p if path in COST_PATHS})
    if varied:
        label += " (mean over " + ", ".join(f"{path} in {sorted({str(p.get(path)) for p in points})}"
                                            for path in varied) + ")"
    steps, gpus = max(r.steps for r in rows), max(r.gpus for r in rows)
    if len({(r.steps, r.gpus) for r in rows}) > 1:  # no mean of a product: each trial billed as the costliest
        label += f"; billed at the most steps ({steps}) and GPUs ({gpus}) of any value: an upper bound"
    missing = [r.step for r in rows if r.step.seconds is None]
    sources = "; ".join(dict.fromkeys(r.step.source for r in rows))
    step = missing[0] if missing else StepTime(sum(r.step.seconds for r in rows) / len(rows), sources,
                                               "given" if all(r.step.kind == "given" for r in rows) else
                                               "measured" if all(r.step.kind == "measured" for r in rows) else
                                               "scaled")
    return Row(label, cfg.sweep.num_samples, steps, gpus, step, overhead_s)


def representative(space: Space) -> Space:
    """A grid of the sampled space's values that change a trial's cost (the options of a choice, both bounds of a
    range), with the entries those depend on; every other entry at one value."""
    costly = [p for p in space.params if p.path in COST_PATHS]
    conditions = {path for p in costly for path in p.when}
    return Space(tuple(Param(p.path, "grid", p.values if p in costly or p.path in conditions else p.values[:1],
                             p.when) for p in space.params))


def _notes(cfg: CoATConfig, space: Space, bill: Bill, given: bool) -> list[str]:
    notes = []
    per_trial = gpus_per_trial(cfg)
    if not per_trial:
        notes.append(f"train.use_gpu=false: the trials use no GPU, and {bill.concurrency} run at once on the CPUs "
                     "(sweep.max_concurrent, else as coat.tune.sweep derives it)")
    elif per_trial > bill.gpus:
        notes.append(f"a trial needs {per_trial} GPUs (train.num_workers={cfg.train.num_workers}) and {bill.gpus} "
                     "offer fewer: no trial could start; the wall time assumes one at a time")
    if given:
        notes.append("every trial's step is billed at --step-s")
    elif any(r.step.kind == "scaled" for r in bill.rows):
        notes.append("a scaled step time assumes a step's time grows with its tokens per example; `coat preflight "
                     "--space SPACE` measures every K the space names")
    if per_trial > 1:
        notes.append("step time measured on one device: communication between a trial's "
                     f"{per_trial} workers is not in it")
    if not given and len({tuple(stage.train) for stage in cfg.train.stages}) > 1:
        notes.append("a step is measured training the last stage's parts and every stage's steps are billed at it: "
                     "stages that freeze more (e.g. the LLM) step faster, so the bill is an upper bound")
    notes.append(EXCLUDED)
    if space.is_grid:
        notes.append("grid: every trial runs to its last step (coat.tune.sweep uses no early stopping on grids)")
    elif bill.asha is None:
        notes.append("sweep.scheduler=none: every trial runs to its last step")
    else:
        a = bill.asha
        notes.append(f"ASHA (estimate): rungs at steps {', '.join(map(str, a.rungs))} (grace "
                     f"{min(cfg.sweep.grace_steps, a.total_steps)}, reduction factor {a.reduction_factor}, max_t "
                     f"{a.total_steps + 1}), decided at the reports of steps {', '.join(map(str, a.decisions))}; "
                     f"if each decision stops {1 - 1 / a.reduction_factor:.0%} of the trials it meets, a trial "
                     f"trains {a.expected_steps:.1f} of {a.total_steps} steps on average. ASHA's first trials at a "
                     "rung always pass, so with few trials it saves less")
    return notes


def missing_hint(bill: Bill, command: str, store: Path) -> str:
    """How to get the step times the bill lacks."""
    lacking = sum(r.step.seconds is None for r in bill.rows)
    return (f"no step time for {lacking} of {len(bill.rows)} setting(s) (see 'step time from'): run `{command}` "
            f"where the trials will run (it stores its measurements in {store}), or pass --step-s SECONDS")


def preflight_command(config: Path, space: Path, extra: list[str]) -> str:
    """The `coat preflight` line that measures what a dry run of `config` + `extra` over `space` needs."""
    relevant = [o for o in extra if o.startswith(("backbone.", "thinking.", "train.", "data.max_seconds"))]
    return shlex.join(["coat", "preflight", "--config", str(config), "--space", str(space), *relevant])


def hours(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def duration(seconds: float) -> str:
    """`2 d 3 h`, `3 h 12 min`, `45 min`, `18 s`."""
    minutes, whole_hours = round(seconds / 60), round(seconds / 3600)
    if whole_hours >= 48:
        return f"{whole_hours // 24} d {whole_hours % 24} h"
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes} min" if minutes >= 1 else f"{seconds:.0f} s"


