"""`coat preflight`: will this run work here? Answered before a sweep spends GPU hours on the question.

Each check answers one question and, when the answer is no, says what to change. In order:

- `ray`: the cluster holds the CPUs and GPUs one training run asks for (waiting for the autoscaler, if asked);
- `workers`: a real worker group of `train.num_workers` starts, and on GPUs every worker has CUDA and bf16; an
  all-reduce across the workers (NCCL on GPUs, gloo on CPUs) returns the right sum;
- `weights[<backbone>]`: the checkpoint is a local directory or in the local hub cache (nothing is downloaded);
- `data`: the manifest reads, its splits can fill a step, sampled clips decode, and the store holds every
  configured expert's features for the training and validation splits;
- `mlflow`: the tracking store answers and takes a run (a throwaway one, deleted after);
- `model[<backbone>]`: the backbone at its configured size runs real training steps, saves a checkpoint and loads
  it back, and generates an answer, on the device training will use. It reports step time (at every K a space
  names, too), peak GPU memory and the largest batch that fits the card, tokens/s and the thinking block's
  prefill overhead (K as configured against K = 0).

The step times are stored (`coat.tune.cost.store_path`) where an experiment script's `--dry-run` finds them to
bill a sweep before it runs.

Inputs of the model check are synthetic ids (`coat.model.synthetic`): random real-size weights come without a
tokenizer, and the data check already covers the real rows.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.autoscaler.sdk import request_resources
from ray.train.torch import TorchConfig, TorchTrainer

from coat import tracking
from coat.backbones import backbone_source
from coat.config import CoATConfig, apply_overrides, validate
from coat.data.audio import check_audio_rows
from coat.data.manifest import ManifestError, read_manifest, reason_code, validate_rows
from coat.data.mixture import combine
from coat.data.prepare import training_streams
from coat.experts.registry import expert_specs
from coat.model import CoATModel
from coat.model.synthetic import prompt_inputs, synthetic_batch
from coat.ray_runtime import ensure_ray
from coat.train.checkpoint import load_training_state, save_checkpoint
from coat.train.loop import make_optimizer, train_step
from coat.tune.cost import MeasurementsError, records_of, save_records, store_path

PROMPT_TOKENS, RESPONSE_TOKENS = 48, 16
SAMPLED_CLIPS = 16  # per split, decoded by the data check
# Share of the card the largest batch leaves free: the caching allocator reserves more than it hands out
# (fragmentation), the CUDA context and NCCL's buffers are not in max_memory_allocated, and real rows vary.
HEADROOM = 0.10


@dataclass
class Check:
    name: str
    status: str  # "ok", "fail" or "skip"
    detail: str
    fix: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    measurements: list[dict] = field(default_factory=list)  # one per backbone whose model check ran
    stored: str | None = None  # where the step times went (`store_measurements`)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_json(self) -> dict:
        return {"ok": not self.failures, "checks": [asdict(c) for c in self.checks],
                "measurements": self.measurements, "stored": self.stored}


def run_preflight(cfg: CoATConfig, *, backbones: list[str] | None = None, slots: list[int] | None = None,
                  random_weights: bool = False, wait_s: float = 0.0) -> Report:
    """Every check, for `cfg` and each of `backbones` (default: the configured one). A check whose premise
    failed is skipped, and says which. `slots`: the values of K whose step time is measured too (a sweep's).
    `random_weights`: real-size backbones get random weights instead of their checkpoints. `wait_s`: how long the
    resource check waits for an autoscaler to add nodes."""
    report = Report()
    add = report.checks.append
    add(check_ray(cfg, wait_s))
    if report.checks[-1].status == "ok":
        add(check_workers(cfg))
    else:
        add(Check("workers", "skip", "the cluster lacks the resources to start them (see ray)"))
    configs = {}
    for name in backbones or [cfg.backbone.name]:
        configs[name] = for_backbone(cfg, name, random_weights)
        add(check_weights(configs[name], random_weights))
    add(check_data(cfg))
    add(check_tracking(cfg))
    for name, config in configs.items():
        if next(c for c in report.checks if c.name == f"weights[{name}]").status != "ok":
            add(Check(f"model[{name}]", "skip", "no weights to build it from (see weights)"))
            continue
        try:
            measured = measure_on_training_device(config, slots or [])
        except Exception as err:  # noqa: BLE001 - whatever breaks the step is the answer
            add(Check(f"model[{name}]", "fail", f"{type(err).__name__}: {err}",
                      "fix what the error names, then run preflight again (`coat --debug preflight ...` for the "
                      "traceback)"))
            continue
        report.measurements.append(measured)
        add(Check(f"model[{name}]", "ok", model_summary(measured)))
    if wait_s > 0:  # the autoscaler holds a request until it is replaced: let idle nodes go again

        request_resources(bundles=[])
    return report


def for_backbone(cfg: CoATConfig, name: str, random_weights: bool) -> CoATConfig:
    """`cfg` with backbone `name` (its own checkpoint from `backbone.checkpoints` at real size), or with random
    weights instead of any checkpoint."""
    backbone = cfg.backbone if name == cfg.backbone.name else replace(cfg.backbone, name=name, checkpoint=None)
    if random_weights:
        backbone = replace(backbone, checkpoint=None, checkpoints={})
    out = replace(cfg, backbone=backbone)
    validate(out)
    return out


def needed_resources(cfg: CoATConfig) -> dict[str, float]:
    """What one training run holds: its workers' CPUs and GPUs (one worker in-process)."""
    workers = max(1, cfg.train.num_workers)
    return {"CPU": workers * cfg.train.cpus_per_worker, "GPU": float(workers if cfg.train.use_gpu else 0)}


def check_ray(cfg: CoATConfig, wait_s: float) -> Check:
    ensure_ray()
    need = needed_resources(cfg)

    def short() -> dict[str, tuple[float, float]]:
        have = ray.cluster_resources()
        return {k: (have.get(k, 0.0), v) for k, v in need.items() if v > have.get(k, 0.0)}

    missing = short()
    if missing and wait_s > 0:
        bundle = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}
        request_resources(bundles=[bundle] * max(1, cfg.train.num_workers))
        deadline = time.monotonic() + wait_s
        while missing and time.monotonic() < deadline:
            time.sleep(5)
            missing = short()
    have = ray.cluster_resources()
    detail = f"the cluster has CPU {have.get('CPU', 0):g}, GPU {have.get('GPU', 0):g}; one run needs " + ", ".join(
        f"{k} {v:g}" for k, v in need.items() if v)
    if not missing:
        return Check("ray", "ok", detail)
    lacking = ", ".join(f"{k}: {have_k:g} of {need_k:g}" for k, (have_k, need_k) in missing.items())
    return Check("ray", "fail", f"{detail} (short of {lacking})",
                 f"lower train.num_workers={cfg.train.num_workers} or train.cpus_per_worker="
                 f"{cfg.train.cpus_per_worker:g}, or add nodes (an autoscaling cluster: --wait-s 900 asks for "
                 "them and waits)")


def _probe_worker(_config: dict) -> None:
    """In each worker: what its device offers, and an all-reduce of rank + 1 across the group."""
    device = ray.train.torch.get_device()  # Ray has made it this worker's current device
    facts = {"rank": dist.get_rank(), "host": socket.gethostname(), "backend": dist.get_backend(), **_device_facts()}
    total = torch.tensor([dist.get_rank() + 1.0], device=device)
    dist.all_reduce(total)
    facts["all_reduce"] = total.item()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, facts)
    if dist.get_rank() != 0:
        ray.train.report({})
        return
    with tempfile.TemporaryDirectory() as folder:  # a result keeps the metrics reported with a checkpoint
        ray.train.report({"workers": gathered}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def check_workers(cfg: CoATConfig) -> Check:
    if cfg.train.num_workers == 0:
        if not cfg.train.use_gpu:
            return Check("workers", "skip", "training runs in-process (train.num_workers=0): no worker group")
        facts = ray.get(ray.remote(num_gpus=1)(_device_facts).remote())
        ok = facts["cuda"] and facts["bf16"]
        return Check("workers", "ok" if ok else "fail", f"1 in-process GPU worker: {facts}",
                     "" if ok else "train.use_gpu=true needs a GPU with CUDA and bf16 (Ampere or newer)")
    world = cfg.train.num_workers
    backend = "nccl" if cfg.train.use_gpu else "gloo"
    with tempfile.TemporaryDirectory(prefix="coat-preflight-") as storage:
        trainer = TorchTrainer(
            _probe_worker, torch_config=TorchConfig(backend=backend),
            scaling_config=ray.train.ScalingConfig(
                num_workers=world, use_gpu=cfg.train.use_gpu,
                resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}),
            run_config=ray.train.RunConfig(name="preflight", storage_path=storage),
        )
        try:
            workers = trainer.fit().metrics["workers"]
        except Exception as err:  # noqa: BLE001 - a group that cannot start is the answer
            return Check("workers", "fail", f"{world} workers over {backend} did not start: {err}",
                         "check that every node runs the same environment (cluster/README.md)")
    expected = world * (world + 1) / 2
    problems = [f"rank {w['rank']} all-reduce gave {w['all_reduce']:g}, not {expected:g}"
                for w in workers if w["all_reduce"] != expected]
    if cfg.train.use_gpu:
        problems += [f"rank {w['rank']} on {w['host']} has no CUDA" for w in workers if not w["cuda"]]
        problems += [f"rank {w['rank']} ({w['gpu']}) has no bf16" for w in workers if w["cuda"] and not w["bf16"]]
    hosts = sorted({w["host"] for w in workers})
    gpus = sorted({w["gpu"] for w in workers if w["gpu"]})
    detail = (f"{world} workers on {len(hosts)} host(s), {backend} all-reduce"
              + (f", {', '.join(gpus)}" if gpus else ""))
    if problems:
        return Check("workers", "fail", f"{detail}: {'; '.join(problems)}",
                     "give every GPU worker CUDA, bf16 (Ampere or newer) and NCCL, or set train.use_gpu=false")
    return Check("workers", "ok", detail)


def _device_facts() -> dict:
    cuda = torch.cuda.is_available()
    return {"cuda": cuda, "gpu": torch.cuda.get_device_name() if cuda else None,
            "bf16": bool(cuda and torch.cuda.is_bf16_supported())}


def check_weights(cfg: CoATConfig, random_weights: bool) -> Check:
    """A real-size backbone without a checkpoint would train random weights: a failure unless asked for."""
    name, b = f"weights[{cfg.backbone.name}]", cfg.backbone
    if b.size == "real" and b.resolved_checkpoint is None and not random_weights:
        return Check(name, "fail", f"no checkpoint for {b.name} at size real: training would start from random "
                                   "weights",
                     f"set backbone.checkpoints.{b.name}=DIR (a local copy), or pass --random-weights to measure "
                     "the architecture with random weights")
    try:
        return Check(name, "ok", backbone_source(cfg))
    except FileNotFoundError as err:  # the message names the checkpoint and how to copy it
        return Check(name, "fail", str(err))


def check_data(cfg: CoATConfig) -> Check:
    manifest, store = Path(cfg.data.manifest).resolve(), Path(cfg.data.store).resolve()
    if cfg.data.mixture:
        try:
            combine(cfg.data.mixture, manifest)
        except ManifestError as err:
            return Check("data", "fail", str(err))
    if not manifest.is_file():
        if cfg.data.synth_size > 0 and manifest.name == "manifest.jsonl":
            return Check("data", "ok", f"{manifest} absent: the run generates coat-mini there "
                                       f"({cfg.data.synth_size} clips) and computes its expert features")
        return Check("data", "fail", f"data.manifest={manifest} does not exist",
                     "build one with `coat data import FORMAT ROOT --out DIR` and set data.manifest, or set "
                     "data.synth_size>0 for coat-mini")
    try:
        rows, quarantined = validate_rows(read_manifest(manifest))
        per_split = rows["split"].value_counts()
        splits = [cfg.data.train_split, cfg.data.val_split, cfg.data.test_split]
        empty = [s for s in splits if not per_split.get(s, 0)]
        if empty:
            return Check("data", "fail", f"{manifest}: no usable rows in split(s) {', '.join(empty)}",
                         "give the manifest train, val and test rows (or set data.*_split)")
        sample = rows.groupby("split", group_keys=False).head(SAMPLED_CLIPS)
        _, bad_audio, _ = check_audio_rows(sample, 16000, cfg.data.reject_seconds or float("inf"))
        if len(bad_audio):
            reasons = bad_audio["reason"].map(reason_code).value_counts().to_dict()
            return Check("data", "fail", f"{len(bad_audio)} of {len(sample)} sampled clips unusable: {reasons}",
                         f"`coat data check {manifest}` lists every bad row")
        training_streams(cfg, manifest, store)  # features of every expert, both splits; rows fill a step
    except Exception as err:  # noqa: BLE001 - each names the file, split or expert, and the missing features the fix
        return Check("data", "fail", str(err))
    counts = ", ".join(f"{s} {per_split.get(s, 0)}" for s in splits)
    experts = ", ".join(cfg.experts.names) or "none"
    return Check("data", "ok", f"{manifest.name}: {counts} rows ({len(quarantined)} quarantined); features of "
                               f"{experts} in {store}")


def check_tracking(cfg: CoATConfig) -> Check:
    uri = tracking.resolve_uri(cfg.tracking.uri)
    try:
        tracking.check_reachable(uri)
        client = tracking.mlflow_client(uri)
        experiment = tracking.get_or_create_experiment(uri, cfg.tracking.experiment)
        run = client.create_run(experiment, run_name="preflight")
        client.log_metric(run.info.run_id, "preflight", 1.0)
        client.delete_run(run.info.run_id)
    except Exception as err:  # noqa: BLE001 - unreachable, refused, read-only: all the same answer
        return Check("mlflow", "fail", f"{uri}: {err}",
                     "start the server (`make dashboard`, or the cluster's) or set tracking.uri / MLFLOW_TRACKING_URI")
    return Check("mlflow", "ok", f"{uri}: experiment {cfg.tracking.experiment!r} takes runs")


def measure_on_training_device(cfg: CoATConfig, slots: list[int]) -> dict:
    """`measure_model` on a GPU in a Ray task when training uses GPUs (the driver may have none), else here."""
    if not cfg.train.use_gpu:
        return measure_model(cfg, "cpu", slots=slots)

    return ray.get(ray.remote(num_gpus=1, num_cpus=cfg.train.cpus_per_worker)(measure_model).remote(
        cfg, "cuda", slots=slots))


def measure_model(cfg: CoATConfig, device: str, repeats: int = 3, slots: list[int] = ()) -> dict:
    """Build the model as training does, take `repeats` training steps of `train.batch_size` clips of
    `data.max_seconds` at the configured K and at each other K of `slots`, measure a step's peak GPU memory at two
    batch sizes (on CUDA), save a checkpoint and load it back, generate, and time prefills with and without the
    thinking block. Raises whatever building or stepping raises; RuntimeError when the checkpoint does not load
    back the trained parts it saved."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    experts = expert_specs(cfg)
    torch.manual_seed(cfg.train.seed)
    coat = CoATModel(cfg, experts, device=device)
    coat.train()
    coat.set_trainable(cfg.train.stages[-1].train)
    optimizer = make_optimizer(coat, cfg)
    k = cfg.thinking.num_slots
    batch = synthetic_batch(coat, cfg.train.batch_size, cfg.data.max_seconds, PROMPT_TOKENS, k, RESPONSE_TOKENS,
                            device)
    step_s, metrics = _step_seconds(coat, batch, optimizer, cfg, device, sync, repeats)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    step_times = [{"num_slots": k, "step_s": step_s, "tokens_per_example": batch["input_ids"].shape[1]}]
    for other in sorted(set(slots) - {k}):
        step_times.append(_step_time_at(coat, other, optimizer, cfg, device, sync, repeats))
    step_times.sort(key=lambda t: t["num_slots"])
    memory = _memory_fit(coat, optimizer, cfg, device) if cuda else None
    checkpoint_round_trip(coat, optimizer, repeats, metrics)
    coat.eval()
    prompt = prompt_inputs(coat, {key: v[:1] for key, v in batch.items()}, RESPONSE_TOKENS)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cuda)
    with torch.no_grad(), autocast:
        answer = coat.lm.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    prefill_s = {}
    for block in (k, 0):
        with thinking_length(coat, block):
            inputs = prompt_inputs(coat, synthetic_batch(coat, 1, cfg.data.max_seconds, PROMPT_TOKENS, block,
                                                         RESPONSE_TOKENS, device), RESPONSE_TOKENS)
        prefill_s[block] = _median_seconds(lambda inputs=inputs: coat.lm(**inputs, use_cache=True), sync, autocast)
    return {
        "backbone": cfg.backbone.name, "size": cfg.backbone.size, "device": device, "dtype": cfg.backbone.dtype,
        "gpu": torch.cuda.get_device_name(device) if cuda else None, "host": socket.gethostname(),
        "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum, "clip_s": cfg.data.max_seconds,
        "num_slots": k, "step_s": step_s, "tokens_per_s": batch["input_ids"].numel() * cfg.train.grad_accum / step_s,
        "step_times": step_times, "peak_gpu_gb": peak_gb, "memory": memory,
        "train_loss": metrics["train/loss"], "checkpoint_round_trip": True,
        "generated_tokens": int(answer.shape[1] - prompt["input_ids"].shape[1]),
        "prefill_s": prefill_s[k], "prefill_s_k0": prefill_s[0], "prefill_ratio": prefill_s[k] / prefill_s[0],
        "trained_params": coat.parameter_counts()["total"],
    }


def _step_seconds(coat, batch: dict, optimizer, cfg: CoATConfig, device: str, sync, repeats: int
                  ) -> tuple[float, dict]:
    """The median time of `repeats` training steps on `batch` after the first, which pays for allocation and
    kernel selection; and the last step's metrics."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        metrics = train_step(coat, coat, itertools.repeat(batch), optimizer, cfg, cfg.train.total_steps - 1, device)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] or times), metrics


def checkpoint_round_trip(coat, optimizer, step: int, metrics: dict) -> None:
    """Save a checkpoint as training does, zero the trained parts, and load it back. Raises RuntimeError when the
    trained parts or the step do not come back as saved."""
    with tempfile.TemporaryDirectory(prefix="coat-preflight-") as folder:
        saved = {n: v.detach().cpu().clone() for n, v in coat.trained_state().items()}
        save_checkpoint(Path(folder), coat, coat.trained_state(), optimizer.state_dict(), step, 0, 0, metrics, [], {})
        with torch.no_grad():
            for members in coat.parameter_groups().values():
                for _, param in members:
                    param.zero_()
        coat.load_trained(folder)
        state = load_training_state(Path(folder))
        restored = coat.trained_state()
        if state["step"] != step or any(not torch.equal(saved[n], restored[n].cpu()) for n in saved):
            raise RuntimeError(f"checkpoint {folder}: the trained parts did not load back as saved")


def _step_time_at(coat, k: int, optimizer, cfg: CoATConfig, device: str, sync, repeats: int) -> dict:
    """The step time of the same model with K = `k` (a sweep's other K): the block is positions in the prompt,
    so the model need not be built again."""
    try:
        with thinking_length(coat, k):
            batch = synthetic_batch(coat, cfg.train.batch_size, cfg.data.max_seconds, PROMPT_TOKENS, k,
                                    RESPONSE_TOKENS, device)
            seconds, _ = _step_seconds(coat, batch, optimizer, cfg, device, sync, repeats)
    except Exception as err:
        raise RuntimeError(f"at thinking.num_slots={k}: {type(err).__name__}: {err}") from err
    return {"num_slots": k, "step_s": seconds, "tokens_per_example": batch["input_ids"].shape[1]}


@contextlib.contextmanager
def thinking_length(coat, k: int) -> Iterator[None]:
    """`coat` with a config derived for K = `k` while inside: the block is positions in the prompt, so one model
    serves every K up to its `thinking.max_slots`."""
    configured = coat.cfg
    coat.cfg = apply_overrides(configured, [f"thinking.num_slots={k}"])
    try:
        yield
    finally:
        coat.cfg = configured


def memory_batches(batch_size: int) -> tuple[int, int]:
    """The two batch sizes whose peak memory is measured: half the configured one and itself (both known to fit
    when the configured one does), or 1 and 2 when it is 1."""
    return (batch_size // 2, batch_size) if batch_size >= 2 else (1, 2)


def _memory_fit(coat, optimizer, cfg: CoATConfig, device: str) -> dict:
    """Peak memory of one training step at each of `memory_batches`, fitted by `largest_batch` to the card."""
    one_micro = apply_overrides(cfg, ["train.grad_accum=1"])  # each micro-batch's activations are freed: one peaks
    peaks = [(b, _peak_gb(coat, optimizer, one_micro, b, device)) for b in memory_batches(cfg.train.batch_size)]
    return largest_batch(peaks, torch.cuda.get_device_properties(device).total_memory / 1e9)


def _peak_gb(coat, optimizer, cfg: CoATConfig, batch_size: int, device: str) -> float | None:
    """The peak memory allocated (GB) during one training step of `batch_size` clips; None when the step runs out
    of memory. The weights, optimizer state and gradients held between steps are in it."""
    batch = synthetic_batch(coat, batch_size, cfg.data.max_seconds, PROMPT_TOKENS, cfg.thinking.num_slots,
                            RESPONSE_TOKENS, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        train_step(coat, coat, itertools.repeat(batch), optimizer, cfg, cfg.train.total_steps - 1, device)
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def largest_batch(peaks: list[tuple[int, float | None]], card_gb: float, headroom: float = HEADROOM) -> dict:
    """The largest batch whose step fits `card_gb` less `headroom`, from peaks (GB) measured at two batch sizes
    (None: ran out of memory) fitted as peak = fixed + per_sample * batch. `largest_batch` is None when the fit
    cannot say (the peak did not grow with the batch); `note` says why, or which batch did not fit."""
    fitted = [(b, gb) for b, gb in peaks if gb is not None]
    out = {"peaks": [{"batch_size": b, "peak_gb": gb} for b, gb in peaks], "card_gb": card_gb,
           "headroom": headroom, "fixed_gb": None, "per_sample_gb": None, "largest_batch": None, "note": ""}
    if len(fitted) < len(peaks):
        failed = [b for b, gb in peaks if gb is None]
        tight = [b for b, gb in fitted if gb > card_gb * (1 - headroom)]  # fit, but without the headroom
        out["largest_batch"] = max((b for b, _ in fitted if b not in tight), default=0)
        out["note"] = f"batch {failed[0]} ran out of memory" + "".join(
            f"; batch {b} fit with less than {headroom:.0%} of the card free" for b in tight)
        return out
    (small, small_gb), (large, large_gb) = fitted
    per_sample = (large_gb - small_gb) / (large - small)
    fixed = small_gb - per_sample * small
    out |= {"fixed_gb": fixed, "per_sample_gb": per_sample}
    if per_sample <= 0:
        out["note"] = f"the peak did not grow from batch {small} to {large}: no per-sample cost to fit"
        return out
    out["largest_batch"] = max(0, math.floor((card_gb * (1 - headroom) - fixed) / per_sample))
    return out


def space_slots(space) -> list[int]:
    """The values of K a search space names (both bounds of a range), whose step times a dry run bills."""
    return [int(v) for p in space.params if p.path == "thinking.num_slots" for v in p.values]


def store_measurements(cfg: CoATConfig, report: Report) -> Path | None:
    """Add the report's step times to the measurements file of `cfg` (`coat.tune.cost.store_path`), where a dry run
    finds them; None when no model check ran, or when they could not be stored (a failed `store` check says why).
    """
    if not report.measurements:
        return None
    path = store_path(cfg)
    try:
        save_records(path, [r for m in report.measurements for r in records_of(m)])
    except (MeasurementsError, OSError) as err:
        report.checks.append(Check("store", "fail", f"step times not stored in {path}: {err}",
                                   "fix what it names (a writable train.storage, or $COAT_STORAGE on a cluster); "
                                   "until then a dry run takes --step-s"))
        return None
    report.stored = str(path)
    return path


@torch.no_grad()
def _median_seconds(fn, sync, autocast, repeats: int = 10) -> float:
    times = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        with autocast:
            fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first call warms up


def batch_summary(memory: dict | None) -> str:
    """`22 (40.1 GB + 4.62 GB per clip of 141 GB)`, or `-` where there is no card."""
    if memory is None:
        return "-"
    if memory["per_sample_gb"] is None or memory["per_sample_gb"] <= 0:
        return f"{memory['largest_batch'] if memory['largest_batch'] is not None else '-'} ({memory['note']})"
    return (f"{memory['largest_batch']} ({memory['fixed_gb']:.1f} GB + {memory['per_sample_gb']:.2f} GB per clip "
            f"of {memory['card_gb']:.0f} GB)")


def model_summary(m: dict) -> str:
    memory = f", peak {m['peak_gpu_gb']:.1f} GB" if m["peak_gpu_gb"] is not None else ""
    if m["memory"] is not None:
        memory += f", largest batch {batch_summary(m['memory'])}"
    return (f"{m['size']} on {m['device']}: step {m['step_s']:.3g} s ({m['tokens_per_s']:.0f} tokens/s){memory}; "
            f"checkpoint saved and loaded; prefill x{m['prefill_ratio']:.2f} at K={m['num_slots']} vs K=0")
