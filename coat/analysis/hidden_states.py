"""Hidden states of a checkpoint, for its probes: `extract_hidden_states` runs the model once over a split's prompts
(no generation) and streams, per batch, two vectors per clip and requested layer to disk: the mean hidden state of
the K thinking slots (`slots`, absent when K = 0) and the hidden state at the last prompt position, which produces
the first response token (`response`). A 7B model's 29 layers over thousands of clips never sit in memory at once.
`logit_lens` decodes each thinking slot's hidden state at each layer through the LM head (`coat probe
--logit-lens`): whether the slots carry language.

Layout under the extraction folder (`read_layer` reads it; `HiddenStateWriter` writes it):

    <position>/chunk-<n>.npy   float32 [layers, batch, hidden], one per batch, layers in `meta.json` order
    clips.json                 the clip ids, in row order across the chunks
    meta.json                  layers, positions, hidden size, chunk count; written last (absent: incomplete)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import track

from coat.data.audio import AudioError, decode
from coat.errors import UsageError

POSITIONS = ("slots", "response")
META_FILE = "meta.json"
CLIPS_FILE = "clips.json"


class LayerError(UsageError, ValueError):
    """A requested layer index the model does not have."""



@dataclass
class Extraction:
    """A finished extraction folder: what `meta.json` records. `skipped`: rows whose audio did not decode
    (`id`, `path`, `reason`), left out of `ids`."""

    path: Path
    ids: list[str]
    layers: list[int]
    positions: list[str]
    hidden_size: int
    chunks: int
    fingerprint: str | None = None
    skipped: list[dict] = field(default_factory=list)
    reused: bool = False  # returned as found: an earlier extraction with the same fingerprint


class HiddenStateWriter:
    """Streams per-batch hidden states into the extraction layout (see the module docstring).

    Anything a previous extraction left in `path` (chunks, meta, clip list) is removed first, so a folder never
    mixes two extractions; other files are left alone.
    """

    def __init__(self, path: str | Path, layers: Sequence[int], positions: Sequence[str], hidden_size: int,
                 fingerprint: str | None = None):
        unknown = [p for p in positions if p not in POSITIONS]
        if unknown:
            raise ValueError(f"unknown positions {unknown}; expected a subset of {POSITIONS}")
        self.path, self.layers, self.positions = Path(path), list(layers), list(positions)
        self.hidden_size, self.fingerprint = hidden_size, fingerprint
        self.ids: list[str] = []
        self.chunks = 0
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in (META_FILE, CLIPS_FILE):
            (self.path / stale).unlink(missing_ok=True)
        for position in POSITIONS:
            for chunk in (self.path / position).glob("chunk-*.npy"):
                chunk.unlink()

    def append(self, ids: Sequence[str], states: Mapping[str, np.ndarray]) -> None:
        """One batch: `states[position]` is [layers, len(ids), hidden]. Raises ValueError on a shape mismatch."""
        expected = (len(self.layers), len(ids), self.hidden_size)
        if set(states) != set(self.positions):
            raise ValueError(f"batch has positions {sorted(states)}, the writer expects {self.positions}")
        for position, values in states.items():
            if tuple(values.shape) != expected:
                raise ValueError(f"{position}: batch states have shape {tuple(values.shape)}, expected {expected} "
                                 "(layers, clips, hidden)")
        for position, values in states.items():
            folder = self.path / position
            folder.mkdir(exist_ok=True)
            np.save(folder / f"chunk-{self.chunks:06d}.npy", np.ascontiguousarray(values, dtype=np.float32))
        self.ids += [str(i) for i in ids]
        self.chunks += 1

    def close(self, skipped: Sequence[Mapping[str, object]] = ()) -> Extraction:
        """Write the clip list, then `meta.json` (which marks the folder complete)."""
        extraction = Extraction(self.path, self.ids, self.layers, self.positions, self.hidden_size, self.chunks,
                                self.fingerprint, [dict(s) for s in skipped])
        (self.path / CLIPS_FILE).write_text(json.dumps(self.ids))
        meta = {k: v for k, v in asdict(extraction).items() if k not in ("path", "ids", "reused")}
        tmp = self.path / f"{META_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, self.path / META_FILE)
        return extraction


def read_extraction(path: str | Path) -> Extraction:
    """The extraction in `path`. Raises FileNotFoundError when it holds no finished extraction."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no finished hidden-state extraction (no {META_FILE}): run "
                                "extract_hidden_states (coat probe) into it")
    meta = json.loads((path / META_FILE).read_text())
    return Extraction(path=path, ids=json.loads((path / CLIPS_FILE).read_text()), **meta)


def read_layer(path: str | Path, position: str, layer: int) -> np.ndarray:
    """[clips, hidden] float32 states of one position and layer (an index into `hidden_states`), read chunk by
    chunk. Raises ValueError naming the positions or layers the extraction holds."""
    extraction = read_extraction(path)
    if position not in extraction.positions:
        raise ValueError(f"{path}: no {position!r} states (it holds {extraction.positions}; slots need K > 0)")
    if layer not in extraction.layers:
        raise ValueError(f"{path}: layer {layer} was not extracted (it holds layers {extraction.layers})")
    j = extraction.layers.index(layer)
    folder = Path(path) / position
    parts = [np.load(folder / f"chunk-{c:06d}.npy", mmap_mode="r")[j] for c in range(extraction.chunks)]
    if not parts:
        return np.zeros((0, extraction.hidden_size), np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def hidden_state_count(model) -> int:
    """Entries of the LLM's `hidden_states`: the embeddings plus one per decoder layer."""
    return model.backbone.model.config.get_text_config().num_hidden_layers + 1


def normalise_layers(layers: Sequence[int] | None, count: int) -> list[int]:
    """Requested `hidden_states` indices (negative ones count from the end; None: all) as sorted distinct indices.

    Raises:
        LayerError: naming a layer outside [-count, count - 1].
    """
    if layers is None:
        return list(range(count))
    out = set()
    for layer in layers:
        if not -count <= layer < count:
            raise LayerError(f"layer {layer} is out of range: this model has {count} hidden states (0 = embeddings "
                             f"... {count - 1} = last layer; negative indices count from the end)")
        out.add(layer % count)
    return sorted(out)


def extract_hidden_states(model, rows: pd.DataFrame, out_dir: str | Path, layers: Sequence[int] | None = None,
                          batch_size: int = 8, *, max_seconds: float | None = None, crop: bool = True,
                          fingerprint: str | None = None, progress: bool = False) -> Extraction:
    """Run `model` (a CoATModel) over `rows` (`id`, `audio_path`, `prompt`: the question as the model is asked it,
    `model_prompt(prompt, choices)`) and stream the `slots` and `response` states of `layers` to `out_dir`.

    One forward per batch on the left-padded prompt encoding (`model.encode(audio, prompts)`), under no_grad, on
    the model's device with bf16 autocast on CUDA. Audio is decoded as training decodes it: cut to `max_seconds`
    with `crop`, else refused when longer. Rows whose audio does not decode are left out and listed in
    `skipped`. With a `fingerprint` equal to the one a finished extraction in `out_dir` recorded, that
    extraction is returned as it is (the caller hashes whatever determines the states).

    Raises:
        ValueError: a layer out of range, `batch_size` < 1, or rows lacking a column.
    """


    _check_rows(rows, batch_size)
    count = hidden_state_count(model)
    layers = normalise_layers(layers, count)
    out_dir = Path(out_dir)
    if fingerprint is not None and (out_dir / META_FILE).is_file():
        previous = read_extraction(out_dir)
        if previous.fingerprint == fingerprint:
            return replace(previous, reused=True)
    k = model.num_slots
    positions = [p for p in POSITIONS if p != "slots" or k > 0]
    writer = HiddenStateWriter(out_dir, layers, positions, model.backbone.hidden_size, fingerprint)
    skipped: list[dict] = []
    for kept, inputs, hidden in _forward_batches(model, rows, batch_size, max_seconds, crop, skipped,
                                                 "hidden states" if progress else None):
        states = {"response": np.stack([hidden[layer][:, -1].float().cpu().numpy() for layer in layers])}
        if k > 0:
            states["slots"] = np.stack([_slot_states(model, inputs, hidden[layer]).float().mean(1).cpu().numpy()
                                        for layer in layers])
        writer.append(kept, states)
    return writer.close(skipped)


def logit_lens(model, rows: pd.DataFrame, layers: Sequence[int] | None = None, batch_size: int = 8, *,
               top_k: int = 5, max_seconds: float | None = None, crop: bool = True, progress: bool = False
               ) -> pd.DataFrame:
    """Each thinking slot's hidden state at each of `layers` read through the LM head, as latent-reasoning papers
    do to ask whether slots carry language: the final norm applied (the last layer's states have had it), the
    next-token distribution averaged over `rows`' clips, and its `top_k` tokens. Columns: layer, slot, rank,
    token_id, token, probability. Empty at K = 0; rows are read as `extract_hidden_states` reads them.

    Raises:
        ValueError: a layer out of range, `batch_size` < 1, or rows lacking a column.
    """
    _check_rows(rows, batch_size)
    count = hidden_state_count(model)
    layers = normalise_layers(layers, count)
    columns = ["layer", "slot", "rank", "token_id", "token", "probability"]
    k = model.num_slots
    if k == 0:
        return pd.DataFrame(columns=columns)
    norm, head = model.backbone.llm.norm, model.backbone.model.get_output_embeddings()
    dtype = next(head.parameters()).dtype

    def next_token(layer: int, states: torch.Tensor) -> torch.Tensor:
        states = states if layer == count - 1 else norm(states)
        return torch.softmax(head(states.to(dtype)).float(), -1)

    sums, clips = None, 0
    for kept, inputs, hidden in _forward_batches(model, rows, batch_size, max_seconds, crop, [],
                                                 "logit lens" if progress else None):
        with torch.no_grad():  # [layers, K, vocabulary], summed over the batch's clips
            probabilities = torch.stack([next_token(layer, _slot_states(model, inputs, hidden[layer])).sum(0)
                                         for layer in layers])
        sums = probabilities if sums is None else sums + probabilities
        clips += len(kept)
    if sums is None:
        return pd.DataFrame(columns=columns)
    top = (sums / clips).topk(min(top_k, sums.shape[-1]), dim=-1)
    tokenizer = model.backbone.tokenizer
    records = [(layer, slot, rank + 1, int(token), tokenizer.decode([int(token)]), float(p))
               for j, layer in enumerate(layers) for slot in range(k)
               for rank, (token, p) in enumerate(zip(top.indices[j, slot], top.values[j, slot], strict=True))]
    return pd.DataFrame(records, columns=columns)


def _check_rows(rows: pd.DataFrame, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if missing := [c for c in ("id", "audio_path", "prompt") if c not in rows.columns]:
        raise ValueError(f"rows lack the columns {missing}")


def _forward_batches(model, rows: pd.DataFrame, batch_size: int, max_seconds: float | None, crop: bool,
                     skipped: list[dict], progress: str | None):
    """Per batch of `rows`: the ids whose audio decoded, the model inputs (the left-padded prompt encoding) and the
    hidden states of one forward pass under no_grad, in eval mode, with bf16 autocast on CUDA. Rows whose audio
    does not decode are appended to `skipped` (`id`, `path`, `reason`). `progress`: a progress bar's description."""
    device, rate, count = model.slot_table.device, model.backbone.sample_rate, hidden_state_count(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(rows), batch_size)
        for start in track(starts, description=progress or "", transient=True, disable=progress is None):
            chunk = rows.iloc[start:start + batch_size]
            audio, kept, prompts = [], [], []
            for i, path, prompt in zip(chunk["id"], chunk["audio_path"], chunk["prompt"], strict=True):
                try:
                    audio.append(decode(path, rate, max_seconds, crop).numpy())
                except AudioError as err:
                    skipped.append({"id": str(i), "path": str(path), "reason": err.reason})
                    continue
                kept.append(str(i))
                prompts.append(str(prompt))
            if not kept:
                continue
            with torch.no_grad(), autocast:
                inputs = model._model_inputs(model.encode(audio, prompts))
                if not bool(inputs["attention_mask"][:, -1].all()):
                    raise RuntimeError("the prompt encoding is not left-padded: the last position is not every "
                                       "row's last prompt token")
                hidden = model.lm(**inputs, output_hidden_states=True, use_cache=False).hidden_states
            if len(hidden) != count:
                raise RuntimeError(f"the model returned {len(hidden)} hidden states, its config promises {count}")
            yield kept, inputs, hidden
    finally:
        model.train(was_training)


def _slot_states(model, inputs: dict, hidden):
    """[B, K, H]: the states at the K thinking slots of each row."""
    is_slot = model.backbone.thinking.is_slot(inputs["input_ids"])
    return hidden[is_slot].view(is_slot.shape[0], model.num_slots, -1)


