"""A training mixture: several manifests read as one, and the weights training draws from them with.

`combine` writes the entries' rows into one manifest, so that everything downstream (precompute, the stream,
evaluation, provenance) reads a single file: ids gain the entry's name in front (`librispeech/1089-...`: ids of
two corpora may collide), audio paths become absolute, and a `mixture` column names the entry. Rows are copied as
they are; the usual quarantine sets bad ones aside later, entry by entry, without losing the rest.

`sample_weights` gives each training row the probability that makes every entry's share of the draws its
weight's share, whatever the entries' sizes (`epoch_order` draws with it).
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from coat.config import MixtureEntry, mixture_name
from coat.data.manifest import ManifestError, read_manifest, write_table


def combine(entries: Sequence[MixtureEntry], out: str | Path) -> Path:
    """Write the rows of every entry's manifest to `out` (JSONL), atomically. Raises ManifestError naming an entry's
    manifest that cannot be read, or `out` when it holds a manifest `combine` did not write (never overwritten)."""
    out = Path(out)
    if out.is_file() and not _combined(out):
        raise ManifestError(f"data.manifest={out} is a manifest of its own; with data.mixture, data.manifest is where "
                            "the combined manifest is written: point it at a new path")
    rows = []
    for entry in entries:
        name = mixture_name(entry)
        try:
            manifest = read_manifest(entry.manifest)
        except ManifestError as err:
            raise ManifestError(f"data.mixture entry {name!r}: {err}") from None
        rows.append(manifest.assign(id=[f"{name}/{i}" for i in manifest["id"]], audio=manifest["audio_path"],
                                    mixture=name).drop(columns="audio_path"))
    # Every trial of a sweep combines again, some at once: each stages under a name of its own and renames it
    # whole into place, so no reader ever sees a file two writers tore; the same rows leave the file as it was.
    staging = write_table(pd.concat(rows, ignore_index=True), out.with_name(f".{out.stem}.{uuid.uuid4().hex}.jsonl"))
    if out.is_file() and out.read_bytes() == staging.read_bytes():
        staging.unlink()
    else:
        os.replace(staging, out)
    return out


def _combined(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    try:
        return first is None or "mixture" in json.loads(first)
    except json.JSONDecodeError:
        return False


def sample_weights(entries: Sequence[str], weights: Mapping[str, float]) -> np.ndarray:
    """Per row (named by its mixture entry), the probability of drawing it: `weights[entry]` shared equally among
    that entry's rows, normalised to sum to 1. Raises KeyError naming an entry without a weight."""
    counts = Counter(entries)
    missing = sorted(set(counts) - set(weights))
    if missing:
        raise KeyError(f"rows of mixture entries {missing} have no weight")
    total = sum(weights[e] for e in counts)
    return np.array([weights[e] / total / counts[e] for e in entries])
