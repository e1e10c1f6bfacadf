"""The step-time spike around a checkpoint under Ray Train: checkpoints copied in the background against copies that
training waits for (`train.async_upload`).

    python experiments/benchmarks/checkpoint_spike.py                 # tiny qwen2-audio, CPU, 24 steps, every 4
    python experiments/benchmarks/checkpoint_spike.py --repeats 3 --checkpoint-every 2

Both modes train the same model (LoRA and lm_head trained, so a checkpoint carries the output layer too) on the
same rows for the same steps with one Ray Train worker, alternating (async, sync, async, sync, ...) so a machine
that slows down shifts both alike. Each logged step carries the seconds since launch, taken before the step's
checkpoint; the gap to the next step is therefore the step itself, plus, after a checkpoint step, its validation,
checkpoint write, copy into train.storage and report. Reported per mode: the median gap after an ordinary step, the
median after a checkpoint step, the spike (their difference), and the checkpoint's size. One JSON line, a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from coat import tracking
from coat.config import load_config
from coat.data.prepare import prepare_data
from coat.train.launch import train


def gaps(cfg, run_id: str, every: int) -> tuple[list[float], list[float]]:
    """Seconds from each logged step to the next: after ordinary steps, after checkpoint steps."""
    uri = tracking.resolve_uri(cfg.tracking.uri)
    times = tracking.metric_history(uri, run_id, "train/since_launch_s")
    ordinary, checkpointed = [], []
    for (step, at), (_, following) in zip(times[1:], times[2:], strict=False):  # the first step warms up
        (checkpointed if step % every == 0 else ordinary).append(following - at)
    return ordinary, checkpointed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="coat-checkpoint-bench-"))

    def config(async_upload: bool, repeat: int):
        return load_config(overrides=[
            f"data.manifest={workdir / 'coat-mini' / 'manifest.jsonl'}", f"data.store={workdir / 'store'}",
            "data.synth_size=200", "data.decode_tasks=1", f"train.storage={workdir / 'runs'}",
            f"tracking.uri=sqlite:///{workdir / 'mlruns.db'}", "experts.names=[mel,prosody]",
            "thinking.num_slots=8", "lora.modules_to_save=[lm_head]", "train.num_workers=1",
            "train.cpus_per_worker=1", f"train.batch_size={args.batch_size}", f"train.stages=[{{steps: {args.steps}}}]",
            f"train.checkpoint_every={args.checkpoint_every}", f"train.async_upload={str(async_upload).lower()}",
            f"train.run_name={'async' if async_upload else 'sync'}-{repeat}", "tracking.log_every=1",
        ])

    prepare_data(config(True, 0))
    measured = {True: ([], []), False: ([], [])}
    checkpoint_mb = 0.0
    for repeat in range(args.repeats):
        for async_upload in (True, False):
            cfg = config(async_upload, repeat)
            result = train(cfg, evaluate_after=False)
            ordinary, checkpointed = gaps(cfg, result.mlflow_run_id, args.checkpoint_every)
            measured[async_upload][0].extend(ordinary)
            measured[async_upload][1].extend(checkpointed)
            checkpoint_mb = sum(p.stat().st_size for p in result.checkpoint.rglob("*") if p.is_file()) / 1e6

    out: dict[str, float | int] = {"steps": args.steps, "checkpoint_every": args.checkpoint_every,
                                   "repeats": args.repeats, "checkpoint_mb": checkpoint_mb}
    for async_upload, (ordinary, checkpointed) in measured.items():
        mode = "async" if async_upload else "sync"
        out[f"{mode}_step_s"] = statistics.median(ordinary)
        out[f"{mode}_after_checkpoint_s"] = statistics.median(checkpointed)
        out[f"{mode}_spike_s"] = out[f"{mode}_after_checkpoint_s"] - out[f"{mode}_step_s"]
    out["spike_ratio_async_to_sync"] = out["async_spike_s"] / out["sync_spike_s"]
    print(json.dumps(out))
    table = Table(title=f"step time around a checkpoint (Ray Train, 1 worker): {args.steps} steps, a checkpoint "
                        f"every {args.checkpoint_every}, {checkpoint_mb:.1f} MB each")
    for column in ("upload", "step s", "after a checkpoint s", "spike s"):
        table.add_column(column, justify="right")
    for mode in ("sync", "async"):
        table.add_row(mode, *(f"{out[f'{mode}_{key}']:.3f}" for key in ("step_s", "after_checkpoint_s", "spike_s")))
    Console().print(table)


if __name__ == "__main__":
    main()
