"""What `coat probe` is asked to fit, and on which clips, as one typed spec: the command's options and
`probe_checkpoint` share its defaults. Kept free of heavy imports because the CLI reads it for its options'
defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProbeSpec:
    """Probe `split` of `data` (default: the checkpoint config's `data.manifest`, features from its `data.store`) at
    `layers` (hidden_states indices; None: all), `batch_size` clips per forward pass, on a subset of `max_clips`
    clips drawn with `seed` (None: all), with `folds`-fold cross-validation (`seed` also fixes the folds and the
    control task); results in `out` (default: `<checkpoint>/probes/<split>`). With `lens_top_k`, also the slots'
    logit lens with that many tokens each."""

    split: str = "test"
    data: Path | None = None
    store: Path | None = None
    out: Path | None = None
    layers: tuple[int, ...] | None = None
    batch_size: int = 8
    max_clips: int | None = None
    folds: int = 5
    seed: int = 0
    lens_top_k: int | None = None
