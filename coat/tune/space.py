"""Search spaces in YAML over dotted config paths, checked against the config tree before any trial starts.

    thinking.num_slots: {grid: [0, 4, 8, 16, 32, 64]}
    train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    experts.names: {choice: [[pitch], [mel], [pitch, mel]]}
    loss.weights.pitch: {uniform: [0.1, 2.0], when: {experts.names: {contains: pitch}}}
    lora.r: {int: [4, 32], when: {backbone.name: qwen2-audio}}

A space is either all `grid` (an exact ablation: every combination, run in full) or sampled (`choice`,
`uniform`, `loguniform`, `int`; Optuna's TPE). `when` makes an entry conditional on a value sampled by an
entry above it: equality, or `{contains: x}` for lists.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from coat.config import CoATConfig, ConfigError, apply_overrides, load_config
from coat.errors import UsageError
from coat.roles import resolve_roles

KINDS = ("grid", "choice", "uniform", "loguniform", "int")


class SpaceError(UsageError, ValueError):
    """A search space that cannot work; the message names the dotted path."""


@dataclass(frozen=True)
class Param:
    path: str
    kind: str
    values: tuple  # grid/choice: the options; uniform/loguniform/int: (low, high)
    when: dict[str, Any]

    def applies(self, sampled: dict[str, Any]) -> bool:
        for path, condition in self.when.items():
            value = sampled.get(path)
            if isinstance(condition, dict):
                if condition["contains"] not in (value or []):
                    return False
            elif value != condition:
                return False
        return True


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    @property
    def is_grid(self) -> bool:
        return all(p.kind == "grid" for p in self.params)

    def grid(self) -> list[dict[str, Any]]:
        """Every combination, with inapplicable conditional entries dropped and duplicates removed."""
        points: list[dict[str, Any]] = []
        for combination in itertools.product(*(p.values for p in self.params)):
            point: dict[str, Any] = {}
            for param, value in zip(self.params, combination, strict=True):
                if param.applies(point):
                    point[param.path] = value
            if point not in points:
                points.append(point)
        return points

    def backbones(self) -> list[str] | None:
        """The backbones the space sweeps over, in file order; None when it does not vary `backbone.name`."""
        named = [p.values for p in self.params if p.path == "backbone.name"]
        return list(dict.fromkeys(named[0])) if named else None

    def suggest(self, trial) -> dict[str, Any]:
        """Optuna define-by-run: sample the entries that apply, in file order."""
        point: dict[str, Any] = {}
        for p in self.params:
            if not p.applies(point):
                continue
            if p.kind == "choice":
                index = trial.suggest_categorical(p.path, list(range(len(p.values))))
                point[p.path] = p.values[index]
            elif p.kind == "uniform":
                point[p.path] = trial.suggest_float(p.path, *p.values)
            elif p.kind == "loguniform":
                point[p.path] = trial.suggest_float(p.path, *p.values, log=True)
            else:
                point[p.path] = trial.suggest_int(p.path, *p.values)
        return point


def overrides(point: dict[str, Any]) -> list[str]:
    """A sampled point as dotted overrides for `load_config`."""
    return [f"{path}={_yaml_value(value)}" for path, value in point.items()]


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def load_space(path: str | Path, base: CoATConfig | None = None) -> Space:
    """Parse and check a space file against the base config `base` (None: the defaults). Every value of every entry
    (both bounds of a range) is applied to the base config and validated.

    Raises SpaceError naming the path, FileNotFoundError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search space {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpaceError(f"search space {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{path}: a space is a mapping of dotted config paths to distributions")
    params = []
    for key, spec in raw.items():
        params.append(_param(path, str(key), spec, [p.path for p in params]))
    space = Space(tuple(params))
    if not space.is_grid and any(p.kind == "grid" for p in params):
        raise SpaceError(f"{path}: 'grid' entries make an exact ablation; mix them with sampled entries as 'choice'")
    _check_against_config(path, space, load_config() if base is None else base)
    return space


def _param(file: Path, key: str, spec: Any, earlier: list[str]) -> Param:
    where = f"{file}: {key!r}"
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: expected {{kind: values}} with kind one of {', '.join(KINDS)}")
    when = spec.get("when", {})
    kinds = [k for k in spec if k != "when"]
    if len(kinds) != 1 or kinds[0] not in KINDS:
        raise SpaceError(f"{where}: needs exactly one of {', '.join(KINDS)} (got {kinds})")
    kind, values = kinds[0], spec[kinds[0]]
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}: {kind} takes a non-empty list")
    else:
        if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, int | float) for v in values)):
            raise SpaceError(f"{where}: {kind} takes [low, high]")
        if values[0] >= values[1] or (kind == "loguniform" and values[0] <= 0):
            raise SpaceError(f"{where}: {kind} bounds {values} must satisfy 0 < low < high" if kind == "loguniform"
                             else f"{where}: {kind} bounds {values} must satisfy low < high")
        if kind == "int" and not all(isinstance(v, int) for v in values):
            raise SpaceError(f"{where}: int bounds must be integers")
    if not isinstance(when, dict):
        raise SpaceError(f"{where}: 'when' maps an earlier entry's path to a value or {{contains: value}}")
    for condition_path, condition in when.items():
        if condition_path not in earlier:
            raise SpaceError(f"{where}: 'when' refers to {condition_path!r}, which is not an entry above it")
        if isinstance(condition, dict) and set(condition) != {"contains"}:
            raise SpaceError(f"{where}: a condition is a value or {{contains: value}}")
    return Param(key, kind, tuple(values), dict(when))


def _check_against_config(file: Path, space: Space, base: CoATConfig) -> None:
    base_tree = OmegaConf.structured(base)
    for param in space.params:
        for value in param.values:
            point = {param.path: value}
            # A conditional entry is checked in a config where its conditions hold.
            for condition_path, condition in param.when.items():
                if isinstance(condition, dict):
                    current, wanted = list(OmegaConf.select(base_tree, condition_path) or []), condition["contains"]
                    if wanted not in current and resolve_roles([wanted])[0] not in current:  # a role: its expert
                        current.append(wanted)
                    condition = current
                point[condition_path] = condition
            try:
                apply_overrides(base, overrides(point))
            except ConfigError as err:
                raise SpaceError(f"{file}: {param.path!r} = {value!r} gives a bad config: {err}") from None
